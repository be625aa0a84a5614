"""Shared per-token math (norms, RoPE, SwiGLU, GQA attention), written to match transformers.

Parameter layout (plain pytrees, see hf_loader):
  attention side  {"embed" [V, D], "final_norm" [D], "lm_head" [D, V], "layers": [layer, ...]}
  layer           {"input_norm" [D], "post_norm" [D], "wq" [D, H*hd], "wk"/"wv" [D, KV*hd],
                   "wo" [H*vd, D], "router" [D, E], optional "bq"/"bk"/"bv", "q_norm"/"k_norm" [hd],
                   optional "router_bias" [E] (sigmoid routing's selection bias),
                   optional "shared": {"w_gate" [D, Fs], "w_up" [D, Fs], "w_down" [Fs, D], "gate" [D]?}}
  MLA layer       "wq" or "wq_a" [D, Rq] + "q_a_norm" [Rq] + "wq_b" [Rq, H*hd]; "wkv_a" [D, Rkv + r],
                   "kv_a_norm" [Rkv], "wkv_b" [Rkv, H*(hd - r + vd)] instead of wq/wk/wv
  dense layer     "mlp": {"w_gate" [D, Fd], "w_up", "w_down"} instead of router/shared (no experts)
  expert side     [ {"w_gate" [E, D, F], "w_up" [E, D, F], "w_down" [E, F, D]} per MoE layer ]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tarragon_jax.config import ModelConfig
from tarragon_jax.model.rope import apply_rope


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in f32 and cast back before the weight, as transformers does."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def qkv(layer: dict, xn_TxD: jax.Array, pos_T: jax.Array, cfg: ModelConfig):
    """Projections, optional bias and per-head q/k norm, then RoPE. Returns q [T,H,hd], k/v [T,KV,hd]."""
    if cfg.kv_lora_rank:
        return _mla_qkv(layer, xn_TxD, pos_T, cfg)
    T = xn_TxD.shape[0]
    q, k, v = xn_TxD @ layer["wq"], xn_TxD @ layer["wk"], xn_TxD @ layer["wv"]
    if cfg.qkv_bias:
        q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    q = q.reshape(T, cfg.n_heads, cfg.head_dim)
    k = k.reshape(T, cfg.n_kv_heads, cfg.head_dim)
    v = v.reshape(T, cfg.n_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q, k = rms_norm(q, layer["q_norm"], cfg.rms_eps), rms_norm(k, layer["k_norm"], cfg.rms_eps)
    return _partial_rope(q, pos_T, cfg) * cfg.attn_scale, _partial_rope(k, pos_T, cfg), v


def _partial_rope(x_TxHxd: jax.Array, pos_T: jax.Array, cfg: ModelConfig) -> jax.Array:
    """RoPE on the first cfg.rotary_dim dims of each head (all of them when 0), the rest as they are."""
    r = cfg.rotary_dim or x_TxHxd.shape[-1]
    if r == x_TxHxd.shape[-1]:
        return apply_rope(x_TxHxd, pos_T, cfg)
    return jnp.concatenate([apply_rope(x_TxHxd[..., :r], pos_T, cfg), x_TxHxd[..., r:]], axis=-1)


MLA_NORM_EPS = 1e-6  # transformers' q_a/kv_a latent norms keep their default eps, whatever the config says


def _mla_q_latent(layer: dict, xn_TxD: jax.Array, pos_T: jax.Array, cfg: ModelConfig):
    """DeepSeek multi-head latent attention, shared part: q [T, H, hd] (rotary part roped) from a
    low-rank (or direct) projection, and the token's latent [T, 1, Rkv + r]: the normed c_kv and
    the roped rotary key, one head shared by every query head."""
    T, H, hd, r = xn_TxD.shape[0], cfg.n_heads, cfg.head_dim, cfg.qk_rope_dim
    if "wq_a" in layer:
        q = rms_norm(xn_TxD @ layer["wq_a"], layer["q_a_norm"], MLA_NORM_EPS) @ layer["wq_b"]
    else:
        q = xn_TxD @ layer["wq"]
    q = q.reshape(T, H, hd)
    q = jnp.concatenate([q[..., :hd - r], apply_rope(q[..., hd - r:], pos_T, cfg)], -1)
    ckv = xn_TxD @ layer["wkv_a"]                                          # [T, Rkv + r]
    c = rms_norm(ckv[:, :cfg.kv_lora_rank], layer["kv_a_norm"], MLA_NORM_EPS)
    k_rot = apply_rope(ckv[:, None, cfg.kv_lora_rank:], pos_T, cfg)       # [T, 1, r]
    return q, jnp.concatenate([c[:, None, :], k_rot], axis=-1)


def _mla_up(layer: dict, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """kv_b split per head: W_uk [Rkv, H, nope] (latent -> key) and W_uv [Rkv, H, vd] (-> value)."""
    nope = cfg.head_dim - cfg.qk_rope_dim
    w = layer["wkv_b"].reshape(cfg.kv_lora_rank, cfg.n_heads, nope + cfg.value_dim)
    return w[..., :nope], w[..., nope:]


def _mla_qkv(layer: dict, xn_TxD: jax.Array, pos_T: jax.Array, cfg: ModelConfig):
    """MLA decompressed, as transformers computes it: K/V per head from the latent. Returns q,
    k [T, H, hd] and v [T, H, hd] (value_dim, zero-padded to hd)."""
    q, lat_Tx1xL = _mla_q_latent(layer, xn_TxD, pos_T, cfg)
    T, H, hd, Rkv = q.shape[0], cfg.n_heads, cfg.head_dim, cfg.kv_lora_rank
    w_uk, w_uv = _mla_up(layer, cfg)
    k = jnp.concatenate([jnp.einsum("tr,rhn->thn", lat_Tx1xL[:, 0, :Rkv], w_uk),
                         jnp.broadcast_to(lat_Tx1xL[:, :, Rkv:], (T, H, cfg.qk_rope_dim))], axis=-1)
    v = jnp.einsum("tr,rhv->thv", lat_Tx1xL[:, 0, :Rkv], w_uv)
    return q * cfg.attn_scale, k, jnp.pad(v, ((0, 0), (0, 0), (0, hd - cfg.value_dim)))


def mla_latent_query(layer: dict, xn_TxD: jax.Array, pos_T: jax.Array, cfg: ModelConfig):
    """MLA against a latent cache: the query absorbs W_uk (q_nope . W_uk c == q_nope . k_nope), so
    every head attends over the shared latent rows [c, k_rot] as one KV head. Returns q [T, H,
    Rkv + r], scaled so that attention's 1/sqrt(Rkv + r) becomes MLA's attn_scale/sqrt(hd), and the
    token's latent [T, 1, Rkv + r] to cache."""
    q, lat_Tx1xL = _mla_q_latent(layer, xn_TxD, pos_T, cfg)
    w_uk, _ = _mla_up(layer, cfg)
    nope, L = cfg.head_dim - cfg.qk_rope_dim, lat_Tx1xL.shape[-1]
    q_lat = jnp.concatenate([jnp.einsum("thn,rhn->thr", q[..., :nope], w_uk), q[..., nope:]], axis=-1)
    return q_lat * (cfg.attn_scale * (L / cfg.head_dim) ** 0.5), lat_Tx1xL


def mla_latent_values(layer: dict, o_TxHxL: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Attention output over latent rows -> per-head values [T, H, vd]: o's c lanes times W_uv
    (the rotary lanes are attention over k_rot, not a value, and are dropped)."""
    _, w_uv = _mla_up(layer, cfg)
    return jnp.einsum("thr,rhv->thv", o_TxHxL[..., :cfg.kv_lora_rank], w_uv)


def attn_output(cfg: ModelConfig, o_TxHxd: jax.Array, wo: jax.Array) -> jax.Array:
    """The output projection of attention [T, H, hd] (only the value_dim lanes are real)."""
    T = o_TxHxd.shape[0]
    return o_TxHxd[..., :cfg.value_dim].reshape(T, -1) @ wo


def gqa_attention(q_TxHxd: jax.Array, k_TxCxKxd: jax.Array, v_TxCxKxd: jax.Array,
                  mask_TxC: jax.Array) -> jax.Array:
    """Each query token attends over its own C keys; softmax in f32. Returns [T, H, hd]."""
    T, H, hd = q_TxHxd.shape
    kv = k_TxCxKxd.shape[2]
    q = q_TxHxd.reshape(T, kv, H // kv, hd)
    s = jnp.einsum("tkgd,tckd->tkgc", q, k_TxCxKxd).astype(jnp.float32) / jnp.sqrt(jnp.float32(hd))
    s = jnp.where(mask_TxC[:, None, None, :], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v_TxCxKxd.dtype)
    return jnp.einsum("tkgc,tckd->tkgd", p, v_TxCxKxd).reshape(T, H, hd)


def shared_expert(shared: dict, hn_TxD: jax.Array) -> jax.Array:
    """Shared expert(s) on every token: Qwen2-MoE's scaled by a sigmoid gate, DeepSeek's (no
    "gate") added as they are; also a dense layer's FFN."""
    y = swiglu(hn_TxD, shared["w_gate"], shared["w_up"], shared["w_down"])
    return jax.nn.sigmoid(hn_TxD @ shared["gate"])[:, None] * y if "gate" in shared else y
