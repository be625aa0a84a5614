"""Expert-worker stage programs: one grouped SwiGLU FFN over one layer's tokens from every AW.

The rows of each AW are packed into one zeroed [N, D] buffer (`pack_rows`, one call per AW, so
compiled variants stay per (N, n) bucket instead of per combination of senders); the host plan
gives a permutation that sorts the buffer by slot, so the grouped matmul sees contiguous groups,
and its inverse, which puts outputs back in buffer order; `take_rows` cuts each AW's answer out.
Rows past sum(group_sizes) are padding and come out as zeros.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.swiglu_ffn import grouped_swiglu_ffn


@functools.partial(jax.jit, donate_argnums=0)
def pack_rows(buf_NxD: jax.Array, x_nxD: jax.Array, offset: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buf_NxD, x_nxD.astype(buf_NxD.dtype), offset, axis=0)


@functools.partial(jax.jit, static_argnums=2)
def take_rows(y_NxD: jax.Array, offset: jax.Array, n: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(y_NxD, offset, n, axis=0)


@functools.partial(jax.jit, static_argnames=("backend",))
def expert_layer(weights: dict, extra: dict | None, x_NxD: jax.Array, perm_N: jax.Array, inv_perm_N: jax.Array,
                 group_sizes_S: jax.Array, *, backend: str) -> jax.Array:
    """weights: {"w_gate" [P, D, F], "w_up" [P, D, F], "w_down" [P, F, D]} primaries; extra: the same
    for shadow/loaded slots P.., or None when no row targets them. Returns y [N, D]."""
    if extra is not None:
        weights = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), weights, extra)
    y_sorted = grouped_swiglu_ffn(x_NxD[perm_N], weights["w_gate"], weights["w_up"], weights["w_down"],
                                  group_sizes_S, backend=backend)
    return y_sorted[inv_perm_N]
