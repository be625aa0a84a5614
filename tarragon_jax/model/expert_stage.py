"""Expert-worker stage program: one grouped SwiGLU FFN over one layer's tokens from every AW.

The rows from each AW arrive unsorted (each AW sends its rows for this EW); the host-side plan
gives a permutation that sorts them by slot, so the grouped matmul sees contiguous groups, and
its inverse that puts outputs back in arrival order. Rows past sum(group_sizes) are padding and
come out as zeros.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.swiglu_ffn import grouped_swiglu_ffn


@functools.partial(jax.jit, static_argnames=("backend",))
def expert_layer(weights: dict, extra: dict | None, xs: tuple, perm_N: jax.Array, inv_perm_N: jax.Array,
                 group_sizes_S: jax.Array, *, backend: str) -> tuple:
    """weights: {"w_gate" [P, D, F], "w_up" [P, D, F], "w_down" [P, F, D]} primaries; extra: the same
    for shadow/loaded slots P.., or None when no row targets them; xs[i] [N_i, D]."""
    if extra is not None:
        weights = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), weights, extra)
    x_NxD = jnp.concatenate(xs, axis=0)
    y_sorted = grouped_swiglu_ffn(x_NxD[perm_N], weights["w_gate"], weights["w_up"], weights["w_down"],
                                  group_sizes_S, backend=backend)
    y_NxD = y_sorted[inv_perm_N]
    out, start = [], 0
    for x in xs:
        out.append(y_NxD[start:start + x.shape[0]])
        start += x.shape[0]
    return tuple(out)
