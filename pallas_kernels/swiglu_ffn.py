"""Grouped SwiGLU expert FFN: y = (silu(x @ w_gate[g]) * (x @ w_up[g])) @ w_down[g] per row group.

This is the expert worker's whole per-layer computation: rows of x are tokens sorted by expert,
group_sizes_G counts tokens per local expert, and rows past sum(group_sizes) give zeros (the
worker pads its batch to a static size). Backends:
  "pallas":     two Pallas kernels: gate/up fused (one pass over x, both weight streams, SwiGLU
                on the f32 accumulators, h [M, F] written once), then down. Lowered per platform
                by grouped_matmul (Mosaic GPU / Triton / Mosaic TPU / interpret on CPU).
  "ragged_dot": three jax.lax.ragged_dot calls (XLA's grouped matmul), activation fused by XLA.
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

BACKENDS = ("pallas", "ragged_dot", "dense")


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
