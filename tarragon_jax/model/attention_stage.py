"""Attention-worker stage programs: pure jitted functions of (params, state, inputs).

One decode/prefill step on an AW runs `embed`, then per layer one `attention_layer` (the previous
layer's combine, attention over the paged KV cache, router, shared expert, and the dispatch: the
routing table's device copy resolves each (token, k) to an (EW, slot) and the expert inputs leave
packed with it), then `head` (last combine, LM head) and sampling. No program output is read on the
host until the sampled tokens. Tokens are a flat ragged batch:
token t belongs to block-table row slot_T[t] at position pos_T[t] (prefill chunks and decode
tokens mix freely); padded tokens point at an all-zero block-table row, i.e. the sink page 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention import paged_attention
from tarragon_jax.config import ModelConfig
from tarragon_jax.model import layers, wire
from tarragon_jax.model.router import route


def _combine(carry: tuple, ys: tuple) -> jax.Array:
    """x = h + (sum over k, in k order, of gate weight * expert output + shared).

    ys holds one [T, k, D] answer per expert worker, zero wherever another EW served the (token, k)
    pair, so their sum is exactly the served outputs whichever EW answered (replays included)."""
    h_TxD, shared_TxD, w_Txk = carry
    y_TxkxD = sum(y.astype(jnp.float32) for y in ys)
    moe = jnp.einsum("tk,tkd->td", w_Txk.astype(jnp.float32), y_TxkxD)
    return h_TxD + (moe.astype(h_TxD.dtype) + shared_TxD)


@functools.partial(jax.jit, static_argnums=0)
def embed(cfg: ModelConfig, attn: dict, ids_T: jax.Array) -> tuple:
    """The carry into layer 0: (x, 0, 0), so that combining it with zero expert outputs gives x."""
    x = attn["embed"][ids_T]
    return x, jnp.zeros_like(x), jnp.zeros((ids_T.shape[0], cfg.top_k), x.dtype)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("impl",), donate_argnums=(2, 3))
def attention_layer(cfg: ModelConfig, lp: dict, k_pages: jax.Array, v_pages: jax.Array | None,
                    carry: tuple, ys: tuple, pos_T: jax.Array, slot_T: jax.Array, tables_BxP: jax.Array,
                    route_ExCx2: jax.Array, step: jax.Array, *, impl: str = "auto"):
    """One layer's AW program: combine the previous layer's expert outputs into the residual,
    attend over the paged cache, route, and pack the EWs' input. Nothing leaves the device.

    carry: (h, shared, w) of the previous layer (embed's for layer 0); ys: one [T, k, D] answer
    per EW of the previous layer (zeros where none). k/v_pages [num_pages, page_size, KV, hd] are
    donated and returned updated (an MLA latent cache has k_pages [.., 1, Rkv + r] and v_pages
    None: the latent is the value); writes are idempotent, so a replayed layer is exact.
    impl: the paged-attention backend (pallas_kernels.paged_attention: Triton on GPU, jnp on CPU).
    route_ExCx2: the routing table of this layer: per expert, C entries (EW, slot) laid out by the
    replicas' shares (routing_table.RoutingTable.choices); a (token, k) pair takes entry
    `_choice` of its expert. step: uint32 scalar, the step number (the same on every AW).
    Padding tokens point at the last, all-zero block-table row; they are routed to no EW.

    Returns (carry for the next layer, send [T, D + wire ints] (wire.pack) or None for a dense
    layer, k_pages, v_pages).
    """
    x_TxD = _combine(carry, ys)
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
        w = jnp.zeros((T, cfg.top_k), hn.dtype)
        return (h, layers.shared_expert(lp["mlp"], hn), w), None, k_pages, v_pages
    ids, w = route(hn, lp, cfg)
    shared = layers.shared_expert(lp["shared"], hn) if "shared" in lp else jnp.zeros_like(hn)
    real_T = slot_T != tables_BxP.shape[0] - 1
    rep_Txkx2 = route_ExCx2[ids, _choice(ids, step, route_ExCx2.shape[1])]
    ew_Txk = jnp.where(real_T[:, None], rep_Txkx2[..., 0], -1)
    send = wire.pack(hn, jnp.concatenate([ew_Txk, rep_Txkx2[..., 1]], axis=1))
    return (h, shared, w), send, k_pages, v_pages


TOGETHER = 32    # up to this many pairs of one expert in an AW's step go to one replica: decode is bound by
                 # reading the weights, and a split group reads its expert's weights on two EWs


def _choice(ids_Txk: jax.Array, step: jax.Array, C: int) -> jax.Array:
    """[T, k] entry of each pair's expert row in the routing table: the pair's rank among this
    step's pairs of the same expert, plus a salt, mod C. Within a step an expert's pairs walk
    consecutive entries, so they split over its replicas like the shares (exactly, at C pairs);
    up to TOGETHER pairs all take the first entry, so they stay one group on one EW (one read of
    the expert's weights and one part-filled tile, not one on each replica). The salt
    is a Weyl sequence in the step number (floor(C * frac(step * golden ratio))): it visits the C
    entries evenly over any run of steps, so even one pair a step splits like the shares within
    a few dozen steps. It is the same for every expert and on every AW: a step's few pairs of
    every expert sit in one column of the table, whose rows are rotated so that each column is a
    balanced assignment (routing_table.choices), and an expert's pairs from all AWs start at the
    same replica. Which replica serves never changes a bit of the output (expert rows are
    computed alike on every EW), so this only spreads load."""
    T, k = ids_Txk.shape
    flat = ids_Txk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    first = jnp.searchsorted(flat[order], flat[order], side="left")   # start of each expert's run
    last = jnp.searchsorted(flat[order], flat[order], side="right")
    rank = jnp.zeros_like(flat).at[order].set(jnp.arange(T * k, dtype=flat.dtype) - first.astype(flat.dtype))
    count = jnp.zeros_like(flat).at[order].set((last - first).astype(flat.dtype))
    rank = jnp.where(count <= TOGETHER, 0, rank)                       # a small group is never split
    u = step.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)
    salt = ((u >> 16) * jnp.uint32(C) >> 16).astype(flat.dtype)       # floor(C * frac), 16-bit precision
    return ((rank + salt) % C).reshape(T, k)


@functools.partial(jax.jit, static_argnums=0)
def head(cfg: ModelConfig, attn: dict, carry: tuple, ys: tuple, last_R: jax.Array) -> jax.Array:
    """The last layer's combine and the LM head at the rows that end a request's tokens in this
    step: f32 [R, V] logits, which `sampling.sample` turns into tokens. Sampling is a program of
    its own because it depends on R alone: its vocabulary sort is most of the head's compile
    (0.33 of 0.43 s on the demo model), once per R instead of once per (T, R)."""
    x = layers.rms_norm(_combine(carry, ys)[last_R], attn["final_norm"], cfg.rms_eps)
    return (x @ attn["lm_head"]).astype(jnp.float32)
