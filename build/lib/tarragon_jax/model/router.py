"""Gating, as transformers computes it for each family.

softmax (Mixtral, Qwen-MoE): softmax over the expert logits in f32, top-k, optional renormalisation.
sigmoid (DeepSeek-V3, "noaux_tc"): f32 sigmoid scores; experts are *chosen* by score + a learned
per-expert bias, only inside the topk_group groups whose two best biased scores sum highest, and
*weighted* by the unbiased scores (renormalised if asked), times routed_scaling.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tarragon_jax.config import ModelConfig


def route(hn_TxD: jax.Array, lp: dict, cfg: ModelConfig):
    """Returns (expert ids [T, k] int32, gate weights [T, k] in hn's dtype) for one layer's
    router params (lp["router"] [D, E], lp["router_bias"] [E] for sigmoid scoring)."""
    if cfg.router_scoring == "softmax":
        probs = jax.nn.softmax((hn_TxD @ lp["router"]).astype(jnp.float32), axis=-1)
        w, ids = jax.lax.top_k(probs, cfg.top_k)
        if cfg.norm_topk_prob:
            w = w / jnp.sum(w, axis=-1, keepdims=True)
        return ids.astype(jnp.int32), w.astype(hn_TxD.dtype)
    T, E = hn_TxD.shape[0], cfg.n_experts
    scores = jax.nn.sigmoid(hn_TxD.astype(jnp.float32) @ lp["router"].astype(jnp.float32))
    choice = scores + lp["router_bias"].astype(jnp.float32)
    per = E // cfg.n_group
    group_TxG = jnp.sum(jax.lax.top_k(choice.reshape(T, cfg.n_group, per), 2)[0], axis=-1)
    _, best = jax.lax.top_k(group_TxG, cfg.topk_group)
    keep_TxG = jnp.zeros((T, cfg.n_group), bool).at[jnp.arange(T)[:, None], best].set(True)
    choice = jnp.where(jnp.repeat(keep_TxG, per, axis=1), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, cfg.top_k)
    w = jnp.take_along_axis(scores, ids, axis=1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), (w * cfg.routed_scaling).astype(hn_TxD.dtype)
