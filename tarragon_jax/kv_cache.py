"""Device page buffers of one attention worker's paged KV cache (donated through every step)."""
from __future__ import annotations

import jax.numpy as jnp

from tarragon_jax.config import CacheConfig, ModelConfig
from tarragon_jax.runtime import WorkerHandle


def allocate_pages(model: ModelConfig, cache: CacheConfig, worker: WorkerHandle, dtype) -> list[dict]:
    """Per layer {"k", "v"}: [num_pages, page_size, kv_heads, head_dim] on the worker's mesh."""
    shape = (cache.num_pages, cache.page_size, model.n_kv_heads, model.head_dim)
    return [worker.put({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)})
            for _ in range(model.n_layers)]
