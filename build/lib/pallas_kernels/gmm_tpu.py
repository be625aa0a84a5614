"""Grouped matmul on TPU (Mosaic TPU): jax's megablox gmm behind the project's gmm signature.

Megablox pipelines [tm, tk] x-tiles and [tk, tn] weight tiles HBM -> VMEM with scalar-prefetched
group metadata, which is what a TPU wants; its row tiles are aligned to the matrix, so a group
straddling a tile boundary reads its weights twice (acceptable here: TPU is not this project's
main target). This wrapper adds what ragged_dot semantics need and megablox does not do:
m not a multiple of tm (rows padded), tile sizes that fit decode shapes, and zeros for rows past
sum(group_sizes) (megablox leaves them uninitialised).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox.ops import gmm as megablox_gmm  # custom VJP

from pallas_kernels import gmm_common as common


def tiling(m, k, n):
    """(tm, tk, tn): TPU blocks must be multiples of (8|16, 128) or the full dimension."""
    tm = min(128, -(-m // 16) * 16)

    def lane_tile(d):
        if d <= 512:
            return d
        return next((t for t in (512, 256, 128) if d % t == 0), 512)

    return tm, lane_tile(k), lane_tile(n)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "tiles"))
def gmm_tpu(lhs_MxK, rhs_GxKxN, group_sizes_G, *, out_dtype=None, interpret=False, tiles=None):
    """[m, k] x [g, k, n] ragged dot on TPU; rows past sum(group_sizes) are zero."""
    common.check_shapes(lhs_MxK, rhs_GxKxN, group_sizes_G)
    dtype = common.input_dtype(lhs_MxK, rhs_GxKxN)
    out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
    m, k = lhs_MxK.shape
    n = rhs_GxKxN.shape[2]
    tm, tk, tn = tiles or tiling(m, k, n)
    m_pad = -(-m // tm) * tm
    x_MxK = lhs_MxK.astype(dtype)
    if m_pad != m:
        x_MxK = jnp.pad(x_MxK, ((0, m_pad - m), (0, 0)))
    sizes_G = common.clamp_group_sizes(group_sizes_G, m)
    # positional: custom_vjp's nondiff args (dtype, tiling, transpose_rhs, interpret)
    out = megablox_gmm(x_MxK, rhs_GxKxN, sizes_G, out_dtype, (tm, tk, tn), None, None, False, interpret)
    return common.zero_rows_past_total(out[:m], sizes_G)


def gmm_swiglu_tpu(lhs_MxK, w_gate_GxKxN, w_up_GxKxN, group_sizes_G, *, out_dtype=None, interpret=False):
    """silu(x @ w_gate) * (x @ w_up) per group: two kernels in f32, XLA fuses the activation."""
    gate = gmm_tpu(lhs_MxK, w_gate_GxKxN, group_sizes_G, out_dtype=jnp.float32, interpret=interpret)
    up = gmm_tpu(lhs_MxK, w_up_GxKxN, group_sizes_G, out_dtype=jnp.float32, interpret=interpret)
    return common.silu_mul(gate, up).astype(out_dtype or lhs_MxK.dtype)
