"""Device page buffers of one attention worker's paged KV cache (donated through every step),
and the block moves the checkpoint store needs: read full pages out, write restored pages in.

A layer's pages are {"k", "v"}, or {"k"} alone for an MLA latent cache (the latent is the value)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tarragon_jax.config import CacheConfig, ModelConfig
from tarragon_jax.kv import checksum


def allocate_pages(model: ModelConfig, cache: CacheConfig, sharding: jax.sharding.Sharding, dtype) -> list[dict]:
    """Per layer {part: [num_pages, page_size, heads, dim]} (ModelConfig.cache_row), made directly
    where `sharding` says (the attention worker's mesh)."""
    shape = (cache.num_pages, cache.page_size) + model.cache_row
    return [{part: jnp.zeros(shape, dtype, device=sharding) for part in model.cache_parts}
            for _ in range(model.n_layers)]


def block_sums(blocks_N: jax.Array) -> jax.Array:
    """[N] uint32 checksums of blocks [N, ...] on the device (kv/checksum.py)."""
    word = checksum.word_type(jnp.dtype(blocks_N.dtype).itemsize)
    words = jax.lax.bitcast_convert_type(blocks_N, word).astype(jnp.uint32).reshape(blocks_N.shape[0], -1)
    return checksum.weighted_sums(words, jnp)


@jax.jit
def read_blocks(pages: list[dict], page_ids_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """([N, L, parts, page_size, heads, dim], [N] uint32): the pages of N blocks across every
    layer, and each block's checksum (the store keeps it to verify restored copies)."""
    blocks = jnp.stack([jnp.stack([p[part][page_ids_N] for part in sorted(p)], axis=1) for p in pages], axis=1)
    return blocks, block_sums(blocks)


@functools.partial(jax.jit, donate_argnums=0)
def write_blocks(pages: list[dict], page_ids_N: jax.Array, blocks_NxLxP: jax.Array) -> list[dict]:
    """Inverse of read_blocks into (possibly other) pages; the cache is donated and returned."""
    return [{part: p[part].at[page_ids_N].set(blocks_NxLxP[:, l, i].astype(p[part].dtype))
             for i, part in enumerate(sorted(p))} for l, p in enumerate(pages)]
