"""Shared pieces of the grouped-matmul kernels: group-aligned work items and output masking.

Why group-aligned tiles: at decode an expert sees 1-64 tokens, so the kernel is bound by reading
expert weights. Row tiles aligned to the matrix (megablox, jax's ragged_dot_mgpu) make a group
that straddles a tile boundary read its weights twice; here every work item is
(group, row tile inside that group), so a group with <= bm rows reads its weights exactly once
and an empty group reads nothing.
"""

import functools

import jax
import jax.numpy as jnp


def num_work_items(m: int, g: int, bm: int) -> int:
    """Static bound on sum_g cdiv(size_g, bm) given sum_g size_g <= m."""
    return pl_cdiv(m, bm) + g


def pl_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def clamp_group_sizes(group_sizes_G: jax.Array, m: int) -> jax.Array:
    """Clip groups so that cumsum never passes m (ragged_dot leaves sum > m undefined)."""
    ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), m)
    starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
    return (ends_G - starts_G).astype(jnp.int32)


def work_items(group_sizes_G: jax.Array, m: int, bm: int):
    """Per work item w (static count W): (group_W, row_start_W, rows_W) int32.

    Work item w covers rows [row_start, row_start + rows) of the lhs, all in group `group`.
    Items past the real count have rows == 0 and repeat the last real group (so a BlockSpec
    pipeline would not fetch new weights for them).
    """
    g = group_sizes_G.shape[0]
    w = num_work_items(m, g, bm)
    sizes_G = clamp_group_sizes(group_sizes_G, m)
    ends_G = jnp.cumsum(sizes_G)  # [G]
    starts_G = ends_G - sizes_G
    tiles_G = (sizes_G + bm - 1) // bm
    tile_ends_G = jnp.cumsum(tiles_G)
    idx_W = jnp.arange(w, dtype=jnp.int32)
    group_W = jnp.searchsorted(tile_ends_G, idx_W, side="right", method="compare_all").astype(jnp.int32)
    real_W = group_W < g
    last_real = jnp.searchsorted(
        tile_ends_G, jnp.maximum(tile_ends_G[-1] - 1, 0), side="right", method="compare_all"
    ).astype(jnp.int32)
    group_W = jnp.where(real_W, group_W, jnp.minimum(last_real, g - 1))
    tile_W = idx_W - (tile_ends_G - tiles_G)[group_W]
    row_start_W = starts_G[group_W] + tile_W * bm
    rows_W = jnp.where(real_W, jnp.clip(sizes_G[group_W] - tile_W * bm, 0, bm), 0)
    row_start_W = jnp.where(real_W, row_start_W, 0)
    return group_W, row_start_W.astype(jnp.int32), rows_W.astype(jnp.int32)


def zero_rows_past_total(out_MxN: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """ragged_dot semantics: rows beyond sum(group_sizes) are zero (kernels never write them)."""
    total = jnp.sum(group_sizes_G.astype(jnp.int32))
    row_M = jax.lax.broadcasted_iota(jnp.int32, (out_MxN.shape[0], 1), 0)
    return jnp.where(row_M < total, out_MxN, jnp.zeros((), out_MxN.dtype))


def silu_mul(gate, up):
    """SwiGLU activation in f32: silu(gate) * up."""
    gate = gate.astype(jnp.float32)
    return gate / (1.0 + jnp.exp(-gate)) * up.astype(jnp.float32)  # exp/div lower everywhere


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def input_dtype(lhs, rhs):
    """The weights' dtype: casting the small activation is cheap, casting weights is a full copy."""
    del lhs
    return jnp.dtype(rhs.dtype)


def check_shapes(lhs, rhs, group_sizes):
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(
            f"expected lhs [m,k], rhs [g,k,n], group_sizes [g]; got {lhs.shape}, "
            f"{rhs.shape}, {group_sizes.shape}"
        )
    if lhs.shape[1] != rhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"shape mismatch: lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")


@functools.cache
def default_num_sms() -> int:
    """SM count of the local GPU, else an H100 SXM's 132 (lowering on a machine without one)."""
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        devs = []
    if devs and getattr(devs[0], "core_count", None):
        return int(devs[0].core_count)
    return 132
