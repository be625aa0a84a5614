"""Gating, as transformers computes it for each family.

softmax (Mixtral, Qwen-MoE, DeepSeek-V2): softmax over the expert logits in f32, top-k, optional
renormalisation, times routed_scaling; with groups (DeepSeek-V2's group_limited_greedy) the top-k
is taken only inside the topk_group groups whose best expert scores highest.
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
        if cfg.n_group > 1:          # the other groups' experts score 0, as transformers masks them
            probs = jnp.where(_best_groups(jnp.max(_grouped(probs, cfg), axis=-1), cfg), probs, 0.0)
        w, ids = jax.lax.top_k(probs, cfg.top_k)
        if cfg.norm_topk_prob:
            w = w / jnp.sum(w, axis=-1, keepdims=True)
        if cfg.routed_scaling != 1.0:
            w = w * cfg.routed_scaling
        return ids.astype(jnp.int32), w.astype(hn_TxD.dtype)
    scores = jax.nn.sigmoid(hn_TxD.astype(jnp.float32) @ lp["router"].astype(jnp.float32))   # [T, E]
    choice = scores + lp["router_bias"].astype(jnp.float32)
    group_TxG = jnp.sum(jax.lax.top_k(_grouped(choice, cfg), 2)[0], axis=-1)
    choice = jnp.where(_best_groups(group_TxG, cfg), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, cfg.top_k)
    w = jnp.take_along_axis(scores, ids, axis=1)
    if cfg.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), (w * cfg.routed_scaling).astype(hn_TxD.dtype)


def _grouped(scores_TxE: jax.Array, cfg: ModelConfig) -> jax.Array:
    """[T, n_group, E / n_group]: experts in their groups."""
    return scores_TxE.reshape(scores_TxE.shape[0], cfg.n_group, cfg.n_experts // cfg.n_group)


def _best_groups(group_TxG: jax.Array, cfg: ModelConfig) -> jax.Array:
    """[T, E] bool: whether each expert's group is among the token's topk_group best groups."""
    T = group_TxG.shape[0]
    _, best = jax.lax.top_k(group_TxG, cfg.topk_group)
    keep_TxG = jnp.zeros((T, cfg.n_group), bool).at[jnp.arange(T)[:, None], best].set(True)
    return jnp.repeat(keep_TxG, cfg.n_experts // cfg.n_group, axis=1)
