"""Hugging Face checkpoint directory (config.json + *.safetensors) -> ModelConfig + param pytrees.

The key map is explicit: every tensor the family needs is looked up by name and shape-checked, and
every tensor in the files must be claimed, so a renamed or extra tensor is an error, not silence.
Routed experts are accepted both per expert (the Hub layout, `experts.{j}.w1`) and fused
(`experts.gate_up_proj`, transformers >= 5 in-memory layout).
"""
from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
from safetensors import safe_open

from tarragon_jax.config import ConfigError, ModelConfig


class CheckpointError(ValueError):
    """The checkpoint directory is missing files, tensors, or has mis-shaped tensors."""


_ARCH_TO_FAMILY = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                   "Qwen3MoeForCausalLM": "qwen3_moe"}


def _family(raw: dict) -> str:
    for arch in raw.get("architectures") or []:
        if arch in _ARCH_TO_FAMILY:
            return _ARCH_TO_FAMILY[arch]
    mt = raw.get("model_type")
    if mt in _ARCH_TO_FAMILY.values():
        return mt
    raise ConfigError(f"unknown model family: architectures={raw.get('architectures')} "
                      f"model_type={mt!r}; supported: {sorted(_ARCH_TO_FAMILY)}")


def _rope_theta(raw: dict) -> float:
    rp = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling")
    rtype = rp.get("rope_type", (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")))
    if rtype not in (None, "default"):
        raise ConfigError(f"unsupported config field: rope type {rtype!r} (only default RoPE)")
    return float(rp.get("rope_theta", raw.get("rope_theta", 10000.0)))


def config_from_hf(raw: dict) -> ModelConfig:
    """Translate a transformers config.json dict; unsupported features raise, naming the field."""
    fam = _family(raw)
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported config field: hidden_act={raw['hidden_act']!r} (only silu)")
    if raw.get("use_sliding_window") or (fam == "mixtral" and raw.get("sliding_window")):
        raise ConfigError(f"unsupported config field: sliding_window={raw.get('sliding_window')}")
    if fam != "mixtral":
        if raw.get("decoder_sparse_step", 1) != 1 or raw.get("mlp_only_layers"):
            raise ConfigError("unsupported config field: decoder_sparse_step/mlp_only_layers "
                              "(dense MLP layers are not supported)")
    if fam == "qwen3_moe" and raw.get("attention_bias"):
        raise ConfigError("unsupported config field: attention_bias=True for qwen3_moe")
    d, h = raw["hidden_size"], raw["num_attention_heads"]
    try:
        return ModelConfig(
            family=fam, vocab_size=raw["vocab_size"], d_model=d, n_layers=raw["num_hidden_layers"],
            n_heads=h, n_kv_heads=raw.get("num_key_value_heads", h),
            head_dim=raw.get("head_dim") or d // h,
            n_experts=raw["num_local_experts"] if fam == "mixtral" else raw.get("num_experts",
                                                                                 raw.get("num_local_experts")),
            top_k=raw["num_experts_per_tok"],
            d_expert=raw["intermediate_size"] if fam == "mixtral" else raw["moe_intermediate_size"],
            norm_topk_prob=True if fam == "mixtral" else bool(raw.get("norm_topk_prob", False)),
            d_shared=raw.get("shared_expert_intermediate_size", 0) if fam == "qwen2_moe" else 0,
            qkv_bias=fam == "qwen2_moe" and raw.get("qkv_bias", True),
            qk_norm=fam == "qwen3_moe", rope_theta=_rope_theta(raw),
            rms_eps=raw.get("rms_norm_eps", 1e-6), max_position=raw["max_position_embeddings"],
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise ConfigError(f"config.json lacks required field {e.args[0]!r} for family {fam}") from None


def _shard_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, n) for n in names]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise CheckpointError(f"shard listed in {index} is missing: {missing[0]}")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in checkpoint directory {path}")
    return files


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors as host numpy arrays (bf16 via ml_dtypes), never placed on an accelerator."""
    out = {}
    with jax.default_device(jax.devices("cpu")[0]):
        for fn in _shard_files(path):
            with safe_open(fn, framework="flax") as f:
                for k in f.keys():
                    out[k] = np.asarray(f.get_tensor(k))
    return out


class _Claimer:
    """Pops tensors by name with a shape check, so leftovers can be reported at the end."""

    def __init__(self, tensors: dict[str, np.ndarray], dtype):
        self.t, self.dtype = dict(tensors), dtype

    def has(self, key: str) -> bool:
        return key in self.t

    def take(self, key: str, shape: tuple, transpose: bool = False) -> np.ndarray:
        if key not in self.t:
            raise CheckpointError(f"missing tensor {key!r} (expected shape {shape})")
        a = self.t.pop(key)
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"tensor {key!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        a = a.astype(self.dtype)
        return np.ascontiguousarray(a.T if transpose else a)


def _experts(c: _Claimer, cfg: ModelConfig, pre: str) -> dict:
    E, D, F = cfg.n_experts, cfg.d_model, cfg.d_expert
    if c.has(pre + "experts.gate_up_proj"):            # fused layout [E, 2F, D] / [E, D, F]
        gu = c.take(pre + "experts.gate_up_proj", (E, 2 * F, D))
        down = c.take(pre + "experts.down_proj", (E, D, F))
        return {"w_gate": np.ascontiguousarray(gu[:, :F].transpose(0, 2, 1)),
                "w_up": np.ascontiguousarray(gu[:, F:].transpose(0, 2, 1)),
                "w_down": np.ascontiguousarray(down.transpose(0, 2, 1))}
    names = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    g = [c.take(f"{pre}experts.{j}.{names[0]}.weight", (F, D), True) for j in range(E)]
    u = [c.take(f"{pre}experts.{j}.{names[1]}.weight", (F, D), True) for j in range(E)]
    dn = [c.take(f"{pre}experts.{j}.{names[2]}.weight", (D, F), True) for j in range(E)]
    return {"w_gate": np.stack(g), "w_up": np.stack(u), "w_down": np.stack(dn)}


def _layer(c: _Claimer, cfg: ModelConfig, i: int) -> tuple[dict, dict]:
    D, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    p = f"model.layers.{i}."
    a = f"{p}self_attn."
    lp = {"input_norm": c.take(p + "input_layernorm.weight", (D,)),
          "post_norm": c.take(p + "post_attention_layernorm.weight", (D,)),
          "wq": c.take(a + "q_proj.weight", (H * hd, D), True),
          "wk": c.take(a + "k_proj.weight", (KV * hd, D), True),
          "wv": c.take(a + "v_proj.weight", (KV * hd, D), True),
          "wo": c.take(a + "o_proj.weight", (D, H * hd), True)}
    if cfg.qkv_bias:
        lp.update(bq=c.take(a + "q_proj.bias", (H * hd,)), bk=c.take(a + "k_proj.bias", (KV * hd,)),
                  bv=c.take(a + "v_proj.bias", (KV * hd,)))
    if cfg.qk_norm:
        lp.update(q_norm=c.take(a + "q_norm.weight", (hd,)), k_norm=c.take(a + "k_norm.weight", (hd,)))
    moe = p + ("block_sparse_moe." if cfg.family == "mixtral" and c.has(p + "block_sparse_moe.gate.weight")
               else "mlp.")
    lp["router"] = c.take(moe + "gate.weight", (cfg.n_experts, D), True)
    if cfg.d_shared:
        s, Fs = moe + "shared_expert.", cfg.d_shared
        lp["shared"] = {"w_gate": c.take(s + "gate_proj.weight", (Fs, D), True),
                        "w_up": c.take(s + "up_proj.weight", (Fs, D), True),
                        "w_down": c.take(s + "down_proj.weight", (D, Fs), True),
                        "gate": c.take(moe + "shared_expert_gate.weight", (1, D))[0]}
    return lp, _experts(c, cfg, moe)


def load_checkpoint(path: str, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """Returns (config, {"attn": ..., "experts": [...]}) with host numpy leaves of `dtype`."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory does not exist: {path}")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"missing config.json in checkpoint directory {path}")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f))
    c = _Claimer(_read_tensors(path), dtype)
    V, D = cfg.vocab_size, cfg.d_model
    embed = c.take("model.embed_tokens.weight", (V, D))
    layers, experts = zip(*(_layer(c, cfg, i) for i in range(cfg.n_layers)))
    if cfg.tie_embeddings:
        c.t.pop("lm_head.weight", None)
        head = np.ascontiguousarray(embed.T)
    else:
        head = c.take("lm_head.weight", (V, D), True)
    attn = {"embed": embed, "final_norm": c.take("model.norm.weight", (D,)), "lm_head": head,
            "layers": list(layers)}
    if c.t:
        raise CheckpointError(f"unexpected tensors in checkpoint (unsupported layout?): {sorted(c.t)[:5]}")
    return cfg, {"attn": attn, "experts": list(experts)}


def _hf_config(cfg: ModelConfig) -> dict:
    arch = {v: k for k, v in _ARCH_TO_FAMILY.items()}[cfg.family]
    raw = {"architectures": [arch], "model_type": cfg.family, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "num_experts_per_tok": cfg.top_k,
           "max_position_embeddings": cfg.max_position, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
           "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}
    if cfg.family == "mixtral":
        raw.update(num_local_experts=cfg.n_experts, intermediate_size=cfg.d_expert)
    else:
        raw.update(num_experts=cfg.n_experts, moe_intermediate_size=cfg.d_expert, norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=1, mlp_only_layers=[])
    if cfg.family == "qwen2_moe":
        raw.update(shared_expert_intermediate_size=cfg.d_shared, qkv_bias=cfg.qkv_bias)
    return raw


def save_checkpoint(cfg: ModelConfig, params: dict, path: str) -> None:
    """Write a Hugging Face checkpoint directory (config.json + model.safetensors, Hub key layout)
    that load_checkpoint and transformers both read: the inverse of the key map above."""
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_hf_config(cfg), f, indent=1)
    attn = params["attn"]
    t = {"model.embed_tokens.weight": attn["embed"], "model.norm.weight": attn["final_norm"]}
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = attn["lm_head"].T
    names = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    moe_prefix = "block_sparse_moe." if cfg.family == "mixtral" else "mlp."
    for i, (lp, ep) in enumerate(zip(attn["layers"], params["experts"])):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.{moe_prefix}"
        t.update({p + "input_layernorm.weight": lp["input_norm"], p + "post_attention_layernorm.weight": lp["post_norm"],
                  a + "q_proj.weight": lp["wq"].T, a + "k_proj.weight": lp["wk"].T, a + "v_proj.weight": lp["wv"].T,
                  a + "o_proj.weight": lp["wo"].T, m + "gate.weight": lp["router"].T})
        if cfg.qkv_bias:
            t.update({a + "q_proj.bias": lp["bq"], a + "k_proj.bias": lp["bk"], a + "v_proj.bias": lp["bv"]})
        if cfg.qk_norm:
            t.update({a + "q_norm.weight": lp["q_norm"], a + "k_norm.weight": lp["k_norm"]})
        if cfg.d_shared:
            s = lp["shared"]
            t.update({m + "shared_expert.gate_proj.weight": s["w_gate"].T, m + "shared_expert.up_proj.weight": s["w_up"].T,
                      m + "shared_expert.down_proj.weight": s["w_down"].T, m + "shared_expert_gate.weight": s["gate"][None]})
        for j in range(cfg.n_experts):
            for name, key in zip(names, ("w_gate", "w_up", "w_down")):
                t[f"{m}experts.{j}.{name}.weight"] = ep[key][j].T
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()},
              os.path.join(path, "model.safetensors"))
