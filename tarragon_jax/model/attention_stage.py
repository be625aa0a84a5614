"""Attention-worker stage programs: pure jitted functions of (params, state, inputs).

One decode/prefill step on an AW runs, for every layer, `attention_layer` (attention over the
paged KV cache, router, shared expert), hands the post-norm hidden states to the forwarding
engine, and folds the expert outputs back in with `combine`. Tokens are a flat ragged batch:
token t belongs to block-table row slot_T[t] at position pos_T[t] (prefill chunks and decode
tokens mix freely); padded tokens point at an all-zero block-table row, i.e. the sink page 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import paged_attention
from tarragon_jax.config import ModelConfig
from tarragon_jax.model import layers
from tarragon_jax.model.router import route


@jax.jit
def embed(attn: dict, ids_T: jax.Array) -> jax.Array:
    return attn["embed"][ids_T]


@functools.partial(jax.jit, static_argnums=0, static_argnames=("impl",), donate_argnums=(2, 3))
def attention_layer(cfg: ModelConfig, lp: dict, k_pages: jax.Array, v_pages: jax.Array | None,
                    x_TxD: jax.Array, pos_T: jax.Array, slot_T: jax.Array, tables_BxP: jax.Array,
                    *, impl: str = "auto"):
    """k/v_pages [num_pages, page_size, KV, hd] are donated and returned updated (an MLA latent
    cache has k_pages [.., 1, Rkv + r] and v_pages None: the latent is the value). impl: the
    paged-attention backend (pallas_kernels.paged_attention: Triton on GPU, jnp on CPU).

    Returns (h_TxD residual after attention, hn_TxD expert input, ids_Txk, w_Txk,
             shared_TxD shared-expert output or zeros, y_TxkxD zeroed buffer for the expert
             outputs, k_pages, v_pages).
    """
    ps, T = k_pages.shape[1], x_TxD.shape[0]
    xn = layers.rms_norm(x_TxD, lp["input_norm"], cfg.rms_eps)
    tables_T = tables_BxP[slot_T]                                   # [T, P]
    page_T = jnp.take_along_axis(tables_T, (pos_T // ps)[:, None], axis=1)[:, 0]
    if cfg.latent_cache:
        q, lat = layers.mla_latent_query(lp, xn, pos_T, cfg)
        k_pages = k_pages.at[page_T, pos_T % ps].set(lat.astype(k_pages.dtype))
        o_TxHxL = paged_attention(q, k_pages, k_pages, tables_BxP, slot_T, pos_T, impl=impl)
        attn_TxHxd = layers.mla_latent_values(lp, o_TxHxL, cfg)
    else:
        q, k, v = layers.qkv(lp, xn, pos_T, cfg)
        k_pages = k_pages.at[page_T, pos_T % ps].set(k.astype(k_pages.dtype))
        v_pages = v_pages.at[page_T, pos_T % ps].set(v.astype(v_pages.dtype))
        attn_TxHxd = paged_attention(q, k_pages, v_pages, tables_BxP, slot_T, pos_T, impl=impl)
    h = x_TxD + layers.attn_output(cfg, attn_TxHxd, lp["wo"])
    hn = layers.rms_norm(h, lp["post_norm"], cfg.rms_eps)
    if "mlp" in lp:   # a dense layer: its FFN runs here, in the shared slot; no token goes to an EW
        ids, w = jnp.zeros((T, cfg.top_k), jnp.int32), jnp.zeros((T, cfg.top_k), hn.dtype)
        shared = layers.shared_expert(lp["mlp"], hn)
    else:
        ids, w = route(hn, lp, cfg)
        shared = layers.shared_expert(lp["shared"], hn) if "shared" in lp else jnp.zeros_like(hn)
    y_TxkxD = jnp.zeros((T, cfg.top_k, cfg.d_model), jnp.float32)
    return h, hn, ids, w, shared, y_TxkxD, k_pages, v_pages


@jax.jit
def gather_rows(hn_TxD: jax.Array, rows_N: jax.Array) -> jax.Array:
    """The expert-input rows bound for one EW (forwarding engine's send buffer)."""
    return hn_TxD[rows_N]


@functools.partial(jax.jit, donate_argnums=0)
def place_expert_out(y_TxkxD: jax.Array, y_NxD: jax.Array, tok_N: jax.Array, k_N: jax.Array) -> jax.Array:
    """Put the rows one EW returned at their [token, k] (padding rows, k == -1, are dropped).

    One call per answering EW keeps the compiled variants to (T, N) buckets, and placing by
    [token, k] makes the result independent of which EW answered, or in which order (replays).
    """
    K = y_TxkxD.shape[1]
    return y_TxkxD.at[tok_N, jnp.where(k_N >= 0, k_N, K)].set(y_NxD.astype(jnp.float32), mode="drop")


@jax.jit
def combine(h_TxD: jax.Array, shared_TxD: jax.Array, w_Txk: jax.Array, y_TxkxD: jax.Array) -> jax.Array:
    """x_next = h + (sum over k, in k order, of gate weight * expert output + shared)."""
    moe = jnp.einsum("tk,tkd->td", w_Txk.astype(jnp.float32), y_TxkxD)
    return h_TxD + (moe.astype(h_TxD.dtype) + shared_TxD)


@functools.partial(jax.jit, static_argnums=0)
def lm_head(cfg: ModelConfig, attn: dict, x_TxD: jax.Array, last_B: jax.Array) -> jax.Array:
    """f32 logits [B, V] at the rows that end a request's tokens in this step."""
    x = layers.rms_norm(x_TxD[last_B], attn["final_norm"], cfg.rms_eps)
    return (x @ attn["lm_head"]).astype(jnp.float32)
