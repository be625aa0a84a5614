"""Gating: softmax over expert logits in f32, top-k, optional renormalisation (as transformers)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def route(hn_TxD: jax.Array, w_router_DxE: jax.Array, top_k: int, norm_topk_prob: bool):
    """Returns (expert ids [T, k] int32, gate weights [T, k] in hn's dtype)."""
    logits = (hn_TxD @ w_router_DxE).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    w, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), w.astype(hn_TxD.dtype)
