"""Device page buffers of one attention worker's paged KV cache (donated through every step),
and the block moves the checkpoint store needs: read full pages out, write restored pages in."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tarragon_jax.config import CacheConfig, ModelConfig
from tarragon_jax.runtime import WorkerHandle


def allocate_pages(model: ModelConfig, cache: CacheConfig, worker: WorkerHandle, dtype) -> list[dict]:
    """Per layer {"k", "v"}: [num_pages, page_size, kv_heads, head_dim] on the worker's mesh."""
    shape = (cache.num_pages, cache.page_size, model.n_kv_heads, model.head_dim)
    return [worker.put({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)})
            for _ in range(model.n_layers)]


@jax.jit
def read_blocks(pages: list[dict], page_ids_N: jax.Array) -> jax.Array:
    """[N, L, 2, page_size, kv_heads, head_dim]: the pages of N blocks across every layer."""
    return jnp.stack([jnp.stack([p["k"][page_ids_N], p["v"][page_ids_N]], axis=1) for p in pages], axis=1)


@functools.partial(jax.jit, donate_argnums=0)
def write_blocks(pages: list[dict], page_ids_N: jax.Array, blocks_NxLx2: jax.Array) -> list[dict]:
    """Inverse of read_blocks into (possibly other) pages; the cache is donated and returned."""
    return [{"k": p["k"].at[page_ids_N].set(blocks_NxLx2[:, l, 0].astype(p["k"].dtype)),
             "v": p["v"].at[page_ids_N].set(blocks_NxLx2[:, l, 1].astype(p["v"].dtype))}
            for l, p in enumerate(pages)]
