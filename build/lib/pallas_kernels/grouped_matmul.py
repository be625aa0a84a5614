"""Grouped matmul (jax.lax.ragged_dot semantics) that picks its Pallas kernel at lowering time.

    gmm(lhs [m, k], rhs [g, k, n], group_sizes [g]) -> [m, n]
    out[r] = lhs[r] @ rhs[group(r)]   for r < sum(group_sizes), rows sorted by group
    out[r] = 0                        for r >= sum(group_sizes)

One jitted function serves every platform through `lax.platform_dependent`, so the choice is
made when lowering (also when lowering for CUDA/TPU from a CPU-only machine):
  cuda: Pallas Triton (gmm_triton) by default: on an H200 it beat the Mosaic GPU TMA/wgmma
        kernel (gmm_mosaic_gpu, gpu_impl="mosaic", bf16/f16) at 21 of 23 decode shapes (Mosaic
        was at most 2.6% ahead) and by up to 1.55x at 64 tokens per expert (BENCHMARKS.md).
  rocm: Pallas Triton.    tpu: Mosaic TPU (megablox, gmm_tpu).
  cpu:  the portable Pallas kernel in interpret mode (there is no compiled Pallas on CPU).
Inputs are cast to the weights' dtype; accumulation is f32.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import gmm_common as common
from pallas_kernels.gmm_mosaic_gpu import gmm_mosaic_gpu
from pallas_kernels.gmm_mosaic_gpu import supports as mosaic_supports
from pallas_kernels.gmm_tpu import gmm_swiglu_tpu
from pallas_kernels.gmm_tpu import gmm_tpu
from pallas_kernels.gmm_triton import gmm_triton

GPU_IMPLS = ("auto", "mosaic", "triton")


def _cuda_impl(lhs, rhs_ws, gpu_impl):
    """Which CUDA kernel: "auto" is Triton, the faster one measured (module docstring)."""
    if gpu_impl not in GPU_IMPLS:
        raise ValueError(f"gpu_impl must be one of {GPU_IMPLS}, got {gpu_impl!r}")
    if gpu_impl != "mosaic":
        return "triton"
    if not all(mosaic_supports(lhs, w) for w in rhs_ws):
        raise ValueError(f"gpu_impl='mosaic' cannot take {rhs_ws[0].dtype} {rhs_ws[0].shape}")
    return "mosaic"


def _grouped(lhs_MxK, rhs_ws, group_sizes_G, *, out_dtype, interpret, gpu_impl):
    """Dispatch for n_w = len(rhs_ws) in {1 (plain), 2 (SwiGLU gate/up)}."""
    for w in rhs_ws:
        common.check_shapes(lhs_MxK, w, group_sizes_G)
    group_sizes_G = group_sizes_G.astype(jnp.int32)
    portable = functools.partial(gmm_triton, out_dtype=out_dtype)
    if interpret:
        return portable(lhs_MxK, rhs_ws, group_sizes_G, interpret=True)

    def on_cpu(x, ws, gs):
        return portable(x, ws, gs, interpret=True)

    def on_cuda(x, ws, gs):
        if _cuda_impl(x, ws, gpu_impl) == "mosaic":
            return gmm_mosaic_gpu(x, ws, gs, out_dtype=out_dtype)
        return portable(x, ws, gs)

    def on_rocm(x, ws, gs):
        return portable(x, ws, gs)

    def on_tpu(x, ws, gs):
        if len(ws) == 1:
            return gmm_tpu(x, ws[0], gs, out_dtype=out_dtype)
        return gmm_swiglu_tpu(x, *ws, gs, out_dtype=out_dtype)

    return jax.lax.platform_dependent(
        lhs_MxK,
        tuple(rhs_ws),
        group_sizes_G,
        cpu=on_cpu,
        cuda=on_cuda,
        rocm=on_rocm,
        tpu=on_tpu,
        default=on_cpu,
    )


@functools.partial(jax.jit, static_argnames=("preferred_element_type", "interpret", "gpu_impl"))
def gmm(lhs_MxK, rhs_GxKxN, group_sizes_G, *, preferred_element_type=None, interpret=False, gpu_impl="auto"):
    """ragged_dot(lhs, rhs, group_sizes) with a Pallas kernel per platform.

    preferred_element_type: output dtype (default lhs dtype); accumulation is always f32.
    interpret: True forces the portable kernel in interpret mode on any platform (CPU always
      interprets). gpu_impl: "auto" (= "triton") | "mosaic" (Hopper, bf16/f16) | "triton".
    """
    return _grouped(
        lhs_MxK,
        (rhs_GxKxN,),
        group_sizes_G,
        out_dtype=preferred_element_type,
        interpret=interpret,
        gpu_impl=gpu_impl,
    )


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "gpu_impl"))
def gmm_swiglu(
    lhs_MxK, w_gate_GxKxN, w_up_GxKxN, group_sizes_G, *, out_dtype=None, interpret=False, gpu_impl="auto"
):
    """silu(lhs @ w_gate[g]) * (lhs @ w_up[g]) per group in one pass: [m, n], zeros past total.

    Both weight streams are read in the same k loop (no per-call [g, k, 2n] concatenation, which
    would copy every expert's weights on each call); the activation runs on the f32 accumulators.
    """
    return _grouped(
        lhs_MxK,
        (w_gate_GxKxN, w_up_GxKxN),
        group_sizes_G,
        out_dtype=out_dtype,
        interpret=interpret,
        gpu_impl=gpu_impl,
    )


def gmm_reference(lhs_MxK, rhs_GxKxN, group_sizes_G, *, preferred_element_type=None):
    """Plain jnp oracle: one masked dense matmul per group (a loop, so 256 experts compile
    quickly), f32 at HIGHEST precision; x is first rounded to the weights' dtype like gmm."""
    m = lhs_MxK.shape[0]
    out_dtype = preferred_element_type or lhs_MxK.dtype
    group_M = row_groups(group_sizes_G, m)
    x_MxK = lhs_MxK.astype(rhs_GxKxN.dtype).astype(jnp.float32)

    def one_group(g, out_MxN):
        y_MxN = jnp.dot(x_MxK, rhs_GxKxN[g].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return jnp.where((group_M == g)[:, None], y_MxN, out_MxN)

    out_MxN = jax.lax.fori_loop(
        0, rhs_GxKxN.shape[0], one_group, jnp.zeros((m, rhs_GxKxN.shape[2]), jnp.float32)
    )
    return out_MxN.astype(out_dtype)


def row_groups(group_sizes_G, m):
    """Group id of each row, -1 for rows past sum(group_sizes)."""
    ends_G = jnp.cumsum(group_sizes_G.astype(jnp.int32))
    row_M = jnp.arange(m, dtype=jnp.int32)
    group_M = jnp.searchsorted(ends_G, row_M, side="right").astype(jnp.int32)
    return jnp.where(group_M < group_sizes_G.shape[0], group_M, -1)
