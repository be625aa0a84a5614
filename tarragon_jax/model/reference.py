"""Dense single-device forward over a whole sequence: the test oracle for every engine path.

No cache, no workers, no routing table: every expert is evaluated on every token and combined
through a dense [T, E] gate matrix, so it shares nothing with the disaggregated datapath but the
per-token math in layers.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tarragon_jax.config import ModelConfig, SamplingParams
from tarragon_jax.model import layers
from tarragon_jax.model.router import route


def _dense_moe(cfg: ModelConfig, experts: dict, hn_TxD: jax.Array, lp: dict) -> tuple[jax.Array, jax.Array]:
    """(the layer's MoE output [T, D], the router's choices [T, k])."""
    ids, w = route(hn_TxD, lp, cfg)
    gates_TxE = jnp.zeros((hn_TxD.shape[0], cfg.n_experts), hn_TxD.dtype)
    gates_TxE = gates_TxE.at[jnp.arange(hn_TxD.shape[0])[:, None], ids].add(w)
    y_ExTxD = jax.vmap(layers.swiglu, in_axes=(None, 0, 0, 0))(
        hn_TxD, experts["w_gate"], experts["w_up"], experts["w_down"])
    return jnp.einsum("te,etd->td", gates_TxE, y_ExTxD), ids


@functools.partial(jax.jit, static_argnums=0)
def forward(cfg: ModelConfig, params: dict, ids_T: jax.Array) -> jax.Array:
    """Logits [T, V] (f32) for a causal sequence of token ids [T]."""
    return _forward(cfg, params, ids_T)[0]


@functools.partial(jax.jit, static_argnums=0)
def expert_choices(cfg: ModelConfig, params: dict, ids_T: jax.Array) -> tuple:
    """The router's top-k expert ids [T, k] of every MoE layer, on this sequence (expert load)."""
    return _forward(cfg, params, ids_T)[1]


def _forward(cfg: ModelConfig, params: dict, ids_T: jax.Array) -> tuple[jax.Array, tuple]:
    attn = params["attn"]
    T = ids_T.shape[0]
    pos = jnp.arange(T)
    x = attn["embed"][ids_T]
    choices = []
    causal_TxT = pos[None, :] <= pos[:, None]
    for layer, lp in enumerate(attn["layers"]):
        q, k, v = layers.qkv(lp, layers.rms_norm(x, lp["input_norm"], cfg.rms_eps), pos, cfg)
        k_T = jnp.broadcast_to(k[None], (T,) + k.shape)
        v_T = jnp.broadcast_to(v[None], (T,) + v.shape)
        h = x + layers.attn_output(cfg, layers.gqa_attention(q, k_T, v_T, causal_TxT), lp["wo"])
        hn = layers.rms_norm(h, lp["post_norm"], cfg.rms_eps)
        moe_layer = cfg.moe_index(layer)
        if moe_layer is None:                      # a dense layer
            x = h + layers.shared_expert(lp["mlp"], hn)
            continue
        moe, chosen_Txk = _dense_moe(cfg, params["experts"][moe_layer], hn, lp)
        choices.append(chosen_Txk)
        if "shared" in lp:
            moe = moe + layers.shared_expert(lp["shared"], hn)
        x = h + moe
    x = layers.rms_norm(x, attn["final_norm"], cfg.rms_eps)
    return (x @ attn["lm_head"]).astype(jnp.float32), tuple(choices)


def greedy_generate(cfg: ModelConfig, params: dict, prompt: list[int], max_new_tokens: int,
                    sampling: SamplingParams | None = None) -> list[int]:
    """Greedy continuation by re-running the full forward for every token (slow, obviously right),
    with `sampling`'s logit bias and penalties applied (adjusted) if given."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        n = len(seq)
        padded = seq + [0] * (-n % 64)                 # causal: padding never affects row n-1
        logits = np.asarray(forward(cfg, params, jnp.asarray(padded, jnp.int32))[n - 1])
        if sampling is not None:
            logits = adjusted(logits, prompt, seq[len(prompt):], sampling)
        seq.append(int(np.argmax(logits)))
    return seq[len(prompt):]


def adjusted(logits_V: np.ndarray, prompt: list[int], output: list[int], sp: SamplingParams) -> np.ndarray:
    """f32 logits after sp's logit bias and penalties, in numpy, in vLLM's order: bias, then the
    repetition penalty over prompt and output tokens, frequency and presence over the output's."""
    x = logits_V.astype(np.float32).copy()
    for t, b in sp.logit_bias:
        x[t] += np.float32(b)
    if sp.repetition_penalty != 1:
        seen = np.zeros(len(x), bool)
        seen[list(prompt) + list(output)] = True
        rep = np.float32(sp.repetition_penalty)
        x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(x)).astype(np.float32)
    return x - np.float32(sp.frequency_penalty) * counts - np.float32(sp.presence_penalty) * (counts > 0)
