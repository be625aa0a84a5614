"""A built-in random model (`--model tiny`): needs no files, exercises every family feature."""
from __future__ import annotations

from typing import Callable

import numpy as np

from tarragon_jax.config import ModelConfig, tiny_model_config


def random_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32,
                  make: Callable[[tuple, float, float], object] | None = None) -> dict:
    """Weights scaled so logits and router choices are well separated (no greedy near-ties).

    make(shape, scale, mean) builds one leaf (default: mean + scale * standard normal, in dtype);
    the dummy load format passes a cheaper one (model/dummy.py)."""
    rng = np.random.default_rng(seed)
    D, H, KV, hd, E, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_experts, cfg.d_expert
    make = make or (lambda shape, scale, mean: (mean + rng.standard_normal(shape) * scale).astype(dtype))

    def w(*shape, scale=None):
        return make(shape, scale if scale is not None else 1.0 / np.sqrt(shape[-2] if len(shape) > 1 else 1), 0.0)

    def norm(n):
        return make((n,), 0.1, 1.0)

    def mlp(f):
        return {"w_gate": w(D, f), "w_up": w(D, f), "w_down": w(f, D)}

    layers, experts = [], []
    for layer in range(cfg.n_layers):
        lp = {"input_norm": norm(D), "post_norm": norm(D)}
        if cfg.kv_lora_rank:
            r, Rq, Rkv, vd = cfg.qk_rope_dim, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.value_dim
            lp.update({"wq_a": w(D, Rq), "q_a_norm": norm(Rq), "wq_b": w(Rq, H * hd)} if Rq else {"wq": w(D, H * hd)})
            lp.update(wkv_a=w(D, Rkv + r), kv_a_norm=norm(Rkv), wkv_b=w(Rkv, H * (hd - r + vd)), wo=w(H * vd, D))
        else:
            lp.update(wq=w(D, H * hd), wk=w(D, KV * hd), wv=w(D, KV * hd), wo=w(H * hd, D))
        if cfg.qkv_bias:
            lp.update(bq=w(H * hd, scale=0.1), bk=w(KV * hd, scale=0.1), bv=w(KV * hd, scale=0.1))
        if cfg.qk_norm:
            lp.update(q_norm=norm(hd), k_norm=norm(hd))
        if cfg.moe_index(layer) is None:                       # a dense layer
            lp["mlp"] = mlp(cfg.d_dense)
            layers.append(lp)
            continue
        lp["router"] = w(D, E, scale=1.0)
        if cfg.router_scoring == "sigmoid":
            lp["router_bias"] = w(E, scale=0.3)
        if cfg.d_shared:
            lp["shared"] = mlp(cfg.d_shared)
            if cfg.family == "qwen2_moe":
                lp["shared"]["gate"] = w(D, scale=0.2)
        layers.append(lp)
        experts.append({"w_gate": w(E, D, F), "w_up": w(E, D, F), "w_down": w(E, F, D)})
    attn = {"embed": w(cfg.vocab_size, D, scale=1.0), "final_norm": norm(D),
            "lm_head": w(D, cfg.vocab_size, scale=2.0 / np.sqrt(D)), "layers": layers}
    return {"attn": attn, "experts": experts}


def tiny_model(family: str = "qwen2_moe", seed: int = 0, **overrides) -> tuple[ModelConfig, dict]:
    cfg = tiny_model_config(family, **overrides)
    return cfg, random_params(cfg, seed)
