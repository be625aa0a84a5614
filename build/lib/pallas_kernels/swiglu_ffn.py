"""Grouped SwiGLU expert FFN: y = (silu(x @ w_gate[g]) * (x @ w_up[g])) @ w_down[g] per row group.

This is the expert worker's whole per-layer computation: rows of x are tokens sorted by expert,
group_sizes_G counts tokens per local expert, and rows past sum(group_sizes) give zeros (the
worker pads its batch to a static size). Backends:
  "pallas":     two Pallas kernels: gate/up fused (one pass over x, both weight streams, SwiGLU
                on the f32 accumulators, h [M, F] written once), then down. Lowered per platform
                by grouped_matmul (Mosaic GPU / Triton / Mosaic TPU / interpret on CPU).
  "ragged_dot": three jax.lax.ragged_dot calls (XLA's grouped matmul), activation fused by XLA.
  "tiles":      XLA, no Pallas: per group, a loop over its row tiles ([bm, D] x [D, F] products
                with that group's weights). Only routed (row, expert) pairs are computed and an
                empty group's weights are never read: the CPU path (ragged_dot computes every
                group for every row there: 1.6-20x slower, launch/expert_backend_bench.py).
  "dense":      every expert on every row (einsum) then a one-hot mask; G times the FLOPs, but
                simple and a useful baseline when groups are tiny.
Numerics (all backends and the reference): f32 accumulation and activation, h rounded to the
weights' dtype before the down projection, output in x's dtype. x is cast to the weights' dtype.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import gmm_common as common
from pallas_kernels import grouped_matmul

BACKENDS = ("pallas", "tiles", "ragged_dot", "dense")
TILE_ROWS = 16   # "tiles": rows per work item (fixed, so a row's result never depends on the batch)


def _check(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G):
    g, d, f = w_gate_GxDxF.shape
    if (
        w_up_GxDxF.shape != (g, d, f)
        or w_down_GxFxD.shape != (g, f, d)
        or x_MxD.ndim != 2
        or x_MxD.shape[1] != d
        or group_sizes_G.shape != (g,)
    ):
        raise ValueError(
            f"expected x [M,{d}], w_gate/w_up [{g},{d},{f}], w_down [{g},{f},{d}], group_sizes "
            f"[{g}]; got {x_MxD.shape}, {w_gate_GxDxF.shape}, {w_up_GxDxF.shape}, "
            f"{w_down_GxFxD.shape}, {group_sizes_G.shape}"
        )


@functools.partial(jax.jit, static_argnames=("backend", "interpret", "gpu_impl"))
def grouped_swiglu_ffn(
    x_MxD,
    w_gate_GxDxF,
    w_up_GxDxF,
    w_down_GxFxD,
    group_sizes_G,
    *,
    backend="pallas",
    interpret=None,
    gpu_impl="auto",
):
    """Grouped SwiGLU FFN over rows sorted by group; returns y [M, D] in x's dtype.

    interpret: None interprets on CPU only (chosen at lowering); True forces interpret mode.
    gpu_impl: "auto" | "mosaic" | "triton" for the CUDA Pallas kernels.
    """
    _check(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    group_sizes_G = group_sizes_G.astype(jnp.int32)
    w_dtype = w_gate_GxDxF.dtype
    x = x_MxD.astype(w_dtype)
    if backend == "pallas":
        h_MxF = grouped_matmul.gmm_swiglu(
            x,
            w_gate_GxDxF,
            w_up_GxDxF,
            group_sizes_G,
            out_dtype=w_dtype,
            interpret=bool(interpret),
            gpu_impl=gpu_impl,
        )
        return grouped_matmul.gmm(
            h_MxF,
            w_down_GxFxD,
            group_sizes_G,
            preferred_element_type=x_MxD.dtype,
            interpret=bool(interpret),
            gpu_impl=gpu_impl,
        )
    if backend == "tiles":
        return _tiles_ffn(x, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G, x_MxD.dtype)
    if backend == "ragged_dot":
        rd = functools.partial(
            jax.lax.ragged_dot, group_sizes=group_sizes_G, preferred_element_type=jnp.float32
        )
        h_MxF = common.silu_mul(rd(x, w_gate_GxDxF), rd(x, w_up_GxDxF)).astype(w_dtype)
        return rd(h_MxF, w_down_GxFxD).astype(x_MxD.dtype)
    # dense: all experts on all rows, then keep each row's own expert.
    onehot_GxM = (
        grouped_matmul.row_groups(group_sizes_G, x.shape[0])[None, :]
        == jnp.arange(group_sizes_G.shape[0])[:, None]
    )
    gate_GxMxF = jnp.einsum("md,gdf->gmf", x, w_gate_GxDxF, preferred_element_type=jnp.float32)
    up_GxMxF = jnp.einsum("md,gdf->gmf", x, w_up_GxDxF, preferred_element_type=jnp.float32)
    h_GxMxF = jnp.where(onehot_GxM[:, :, None], common.silu_mul(gate_GxMxF, up_GxMxF), 0)
    y_MxD = jnp.einsum(
        "gmf,gfd->md", h_GxMxF.astype(w_dtype), w_down_GxFxD, preferred_element_type=jnp.float32
    )
    return y_MxD.astype(x_MxD.dtype)


@jax.jit
def grouped_swiglu_ffn_slots(x_MxD, w_gate_slots, w_up_slots, w_down_slots, group_sizes_G):
    """The "tiles" backend over weights kept one array per expert (tuples of [D, F], [D, F],
    [F, D]), as an expert worker keeps them on CPU: no slicing of a stack at all (30% faster at
    64 routed rows than slicing one), and loading an expert appends to the tuples, no copy.
    Same numerics and contract as grouped_swiglu_ffn; returns y [M, D] in x's dtype."""
    g = len(w_gate_slots)
    if not (len(w_up_slots) == len(w_down_slots) == g == group_sizes_G.shape[0]):
        raise ValueError(f"expected {group_sizes_G.shape[0]} experts' weights, got {len(w_gate_slots)}, "
                         f"{len(w_up_slots)}, {len(w_down_slots)}")
    x = x_MxD.astype(w_gate_slots[0].dtype)
    return _tiles_ffn(x, w_gate_slots, w_up_slots, w_down_slots, group_sizes_G.astype(jnp.int32), x_MxD.dtype)


def _tiles_ffn(x_MxD, w_gate_slots, w_up_slots, w_down_slots, group_sizes_G, out_dtype):
    """The "tiles" backend, unrolled over groups (w_*_slots: one weight array per group, or a
    stack to index statically): a group with rows loops over its row tiles only; an empty group
    is a skipped branch, so its weights are never touched (an idle shadow costs nothing)."""
    m, d = x_MxD.shape
    bm = TILE_ROWS
    sizes_G = common.clamp_group_sizes(group_sizes_G, m)
    starts_G = jnp.cumsum(sizes_G) - sizes_G
    x_pad = jnp.concatenate([x_MxD, jnp.zeros((bm, d), x_MxD.dtype)])     # a tile never clamps
    f32 = functools.partial(jnp.dot, preferred_element_type=jnp.float32)

    def group(g, y):
        wg, wu, wd = w_gate_slots[g], w_up_slots[g], w_down_slots[g]

        def tile(j, y):
            start = starts_G[g] + j * bm
            xt = jax.lax.dynamic_slice_in_dim(x_pad, start, bm)
            h = common.silu_mul(f32(xt, wg), f32(xt, wu)).astype(x_MxD.dtype)
            yt = f32(h, wd).astype(out_dtype)
            keep = (jnp.arange(bm) < sizes_G[g] - j * bm)[:, None]     # rows of the next group stay
            old = jax.lax.dynamic_slice_in_dim(y, start, bm)
            return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(keep, yt, old), start, 0)
        return jax.lax.fori_loop(0, (sizes_G[g] + bm - 1) // bm, tile, y)

    y_pad = jnp.zeros((m + bm, d), out_dtype)
    for g in range(group_sizes_G.shape[0]):
        y_pad = jax.lax.cond(sizes_G[g] > 0, functools.partial(group, g), lambda y: y, y_pad)
    return y_pad[:m]


def grouped_swiglu_reference(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G):
    """Test oracle: gather each row's expert weights, f32 at HIGHEST precision, same roundings
    as the kernels (x to the weights' dtype, h to the weights' dtype)."""
    _check(x_MxD, w_gate_GxDxF, w_up_GxDxF, w_down_GxFxD, group_sizes_G)
    w_dtype = w_gate_GxDxF.dtype
    group_M = grouped_matmul.row_groups(group_sizes_G, x_MxD.shape[0])
    valid_M = group_M >= 0
    safe_M = jnp.maximum(group_M, 0)
    f32 = lambda a: a.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    x_MxD32 = f32(x_MxD.astype(w_dtype))
    gate_MxF = jnp.einsum("md,mdf->mf", x_MxD32, f32(w_gate_GxDxF[safe_M]), precision=hi)
    up_MxF = jnp.einsum("md,mdf->mf", x_MxD32, f32(w_up_GxDxF[safe_M]), precision=hi)
    h_MxF = f32(common.silu_mul(gate_MxF, up_MxF).astype(w_dtype))
    y_MxD = jnp.einsum("mf,mfd->md", h_MxF, f32(w_down_GxFxD[safe_M]), precision=hi)
    return jnp.where(valid_M[:, None], y_MxD, 0).astype(x_MxD.dtype)
