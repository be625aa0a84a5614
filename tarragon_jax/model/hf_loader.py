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

import ml_dtypes
import numpy as np

from tarragon_jax.config import ConfigError, ModelConfig
from tarragon_jax.model.quantized import FP8_DTYPES, fp8_block_size, fp8_dequantize
from tarragon_jax.model.rope import yarn_mscale


class CheckpointError(ValueError):
    """The checkpoint directory is missing files, tensors, or has mis-shaped tensors."""


_ARCH_TO_FAMILY = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                   "Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV2ForCausalLM": "deepseek_v2",
                   "DeepseekV3ForCausalLM": "deepseek_v3", "Glm4MoeForCausalLM": "glm4_moe"}
_DEEPSEEK = ("deepseek_v2", "deepseek_v3")     # MLA, shared experts, leading dense layers: one layout
_DEEPSEEK_FFN = _DEEPSEEK + ("glm4_moe",)      # DeepSeek's FFN side (GLM-4.5: with GQA attention), and
                                               # its multi-token-prediction layers after the decoder's


def _family(raw: dict) -> str:
    for arch in raw.get("architectures") or []:
        if arch in _ARCH_TO_FAMILY:
            return _ARCH_TO_FAMILY[arch]
    mt = raw.get("model_type")
    if mt in _ARCH_TO_FAMILY.values():
        return mt
    raise ConfigError(f"unknown model family: architectures={raw.get('architectures')} "
                      f"model_type={mt!r}; supported: {sorted(_ARCH_TO_FAMILY)}")


def _fp8_block(raw: dict) -> tuple[int, int] | None:
    """The FP8 block size of a block-quantized checkpoint, None when not quantized; other
    quantizations are refused by name."""
    quant = raw.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
    if method != "fp8":
        raise ConfigError(f"unsupported config field: quantization_config (quant_method={method!r}): of the "
                          "quantized formats only block-quantized FP8 loads; use the bf16/f16/f32 weights")
    return fp8_block_size(quant)


def _rope(raw: dict, family: str) -> dict:
    """ModelConfig's RoPE fields from rope_parameters (transformers >= 5) or rope_scaling (older
    files): default RoPE or YaRN, as transformers computes them (model/rope.py)."""
    rp = dict(raw.get("rope_scaling") or {}, **(raw.get("rope_parameters") or {}))
    rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
    out = {"rope_theta": float(rp.get("rope_theta", raw.get("rope_theta", 10000.0)))}
    if rtype == "default":
        return out
    if rtype != "yarn":
        raise ConfigError(f"unsupported config field: rope type {rtype!r} (default RoPE or yarn)")
    original = rp.get("original_max_position_embeddings")
    if not original:
        raise ConfigError("unsupported config field: yarn RoPE without original_max_position_embeddings")
    factor = rp.get("factor") or raw["max_position_embeddings"] / original
    mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")
    attention_factor = rp.get("attention_factor")
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all
                            else yarn_mscale(factor))
    out.update(rope_yarn_factor=float(factor), rope_yarn_original_max=int(original),
               rope_yarn_beta_fast=float(rp.get("beta_fast") or 32), rope_yarn_beta_slow=float(rp.get("beta_slow") or 1),
               rope_yarn_truncate=bool(rp.get("truncate", True)), rope_attention_factor=float(attention_factor))
    if family in _DEEPSEEK and mscale_all:           # DeepSeek also scales the softmax by mscale^2
        out["attn_scale"] = yarn_mscale(factor, mscale_all) ** 2
    return out


def config_from_hf(raw: dict) -> ModelConfig:
    """Translate a transformers config.json dict; unsupported features raise, naming the field."""
    fam = _family(raw)
    _fp8_block(raw)
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported config field: hidden_act={raw['hidden_act']!r} (only silu)")
    if raw.get("use_sliding_window") or (fam == "mixtral" and raw.get("sliding_window")):
        raise ConfigError(f"unsupported config field: sliding_window={raw.get('sliding_window')}")
    if fam in ("qwen2_moe", "qwen3_moe"):
        if raw.get("decoder_sparse_step", 1) != 1 or raw.get("mlp_only_layers"):
            raise ConfigError("unsupported config field: decoder_sparse_step/mlp_only_layers "
                              "(dense MLP layers are not supported)")
    if fam in ("qwen3_moe",) + _DEEPSEEK and raw.get("attention_bias"):   # GLM-4.5's q/k/v bias is supported
        raise ConfigError(f"unsupported config field: attention_bias=True for {fam}")
    d, h = raw["hidden_size"], raw["num_attention_heads"]
    try:
        if fam in _DEEPSEEK:
            return _deepseek_config(raw, fam)
        if fam == "glm4_moe":
            return _glm4_moe_config(raw)
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
            qk_norm=fam == "qwen3_moe", **_rope(raw, fam),
            rms_eps=raw.get("rms_norm_eps", 1e-6), max_position=raw["max_position_embeddings"],
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise ConfigError(f"config.json lacks required field {e.args[0]!r} for family {fam}") from None


# transformers' DeepseekV3Config / DeepseekV2Config defaults: a config.json that omits a field
# means these values
DEEPSEEK_DEFAULTS = {
    "deepseek_v3": {"q_lora_rank": 1536, "n_shared_experts": 1, "n_group": 8, "topk_group": 4,
                    "first_k_dense_replace": 3, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                    "rope_interleave": True, "topk_method": "noaux_tc", "scoring_func": "sigmoid"},
    "deepseek_v2": {"q_lora_rank": 1536, "n_shared_experts": 2, "n_group": None, "topk_group": None,
                    "first_k_dense_replace": 0, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
                    "rope_interleave": True, "topk_method": "greedy", "scoring_func": "softmax"},
}
# what each family's router computes (model/router.py); anything else is refused by name
_DEEPSEEK_ROUTING = {"deepseek_v3": {"topk_method": ("noaux_tc",), "scoring_func": ("sigmoid",)},
                     "deepseek_v2": {"topk_method": ("greedy", "group_limited_greedy"), "scoring_func": ("softmax",)}}


def _deepseek_ffn_fields(raw: dict) -> dict:
    """ModelConfig's expert-side fields in DeepSeek's naming (DeepSeek-V2/V3, GLM-4.5): routed and
    shared experts, routed scaling, leading dense layers. `raw` has its family's defaults filled in."""
    F = raw["moe_intermediate_size"]
    return dict(n_experts=raw["n_routed_experts"], top_k=raw["num_experts_per_tok"], d_expert=F,
                d_shared=(raw["n_shared_experts"] or 0) * F, routed_scaling=float(raw["routed_scaling_factor"]),
                first_k_dense=raw["first_k_dense_replace"] or 0, d_dense=raw["intermediate_size"])


def _deepseek_config(raw: dict, family: str) -> ModelConfig:
    """DeepSeek-V3 (and models of its architecture, e.g. Moonlight): MLA attention, sigmoid
    group-limited routing with a selection bias, shared experts, leading dense layers.
    DeepSeek-V2 (and V2-Lite): the same, with softmax routing, greedy or limited to the groups whose
    best expert scores highest, never renormalised (transformers' router ignores norm_topk_prob)."""
    if raw.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"unsupported config field: moe_layer_freq={raw['moe_layer_freq']!r} (only 1)")
    raw = dict(DEEPSEEK_DEFAULTS[family], **raw)   # explicit nulls stay null: "none" (q LoRA, shared)
    for field, allowed in _DEEPSEEK_ROUTING[family].items():
        if raw[field] not in allowed:
            raise ConfigError(f"unsupported config field: {field}={raw[field]!r} for {family} "
                              f"(supported: {', '.join(allowed)})")
    v3 = family == "deepseek_v3"
    grouped = v3 or raw["topk_method"] == "group_limited_greedy"
    h, nope, r = raw["num_attention_heads"], raw["qk_nope_head_dim"], raw["qk_rope_head_dim"]
    return ModelConfig(
        family=family, vocab_size=raw["vocab_size"], d_model=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
        n_heads=h, n_kv_heads=h, head_dim=nope + r, q_lora_rank=raw["q_lora_rank"] or 0,
        kv_lora_rank=raw["kv_lora_rank"], qk_rope_dim=r, v_head_dim=raw["v_head_dim"],
        rope_interleave=bool(raw["rope_interleave"]) if v3 else True, **_deepseek_ffn_fields(raw),
        norm_topk_prob=v3 and bool(raw["norm_topk_prob"]), router_scoring="sigmoid" if v3 else "softmax",
        n_group=(raw["n_group"] or 1) if grouped else 1, topk_group=(raw["topk_group"] or 1) if grouped else 1,
        **_rope(raw, family), rms_eps=raw.get("rms_norm_eps", 1e-6), max_position=raw["max_position_embeddings"],
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)))


GLM4_MOE_DEFAULTS = {"n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                     "routed_scaling_factor": 1.0, "norm_topk_prob": True, "use_qk_norm": False,
                     "attention_bias": False, "partial_rotary_factor": 0.5}   # transformers' Glm4MoeConfig


def _glm4_moe_config(raw: dict) -> ModelConfig:
    """GLM-4.5/4.6 (`glm4_moe`): GQA attention with optional q/k/v bias and per-head q/k norm, RoPE
    on the first partial_rotary_factor of each head (halves layout), and DeepSeek-V3's FFN side:
    sigmoid group-limited routing with a selection bias, shared experts, leading dense layers."""
    rp = dict(raw.get("rope_scaling") or {}, **(raw.get("rope_parameters") or {}))
    raw = dict(GLM4_MOE_DEFAULTS, **raw)
    h = raw["num_attention_heads"]
    hd = raw.get("head_dim") or raw["hidden_size"] // h
    return ModelConfig(
        family="glm4_moe", vocab_size=raw["vocab_size"], d_model=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
        n_heads=h, n_kv_heads=raw.get("num_key_value_heads", h), head_dim=hd,
        rotary_dim=int(hd * rp.get("partial_rotary_factor", raw["partial_rotary_factor"])),
        qkv_bias=bool(raw["attention_bias"]), qk_norm=bool(raw["use_qk_norm"]), **_deepseek_ffn_fields(raw),
        norm_topk_prob=bool(raw["norm_topk_prob"]), router_scoring="sigmoid", n_group=raw["n_group"] or 1,
        topk_group=raw["topk_group"] or 1, **_rope(raw, "glm4_moe"), rms_eps=raw.get("rms_norm_eps", 1e-5),
        max_position=raw["max_position_embeddings"], tie_embeddings=bool(raw.get("tie_word_embeddings", False)))


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


# safetensors dtype names -> numpy (bf16 and FP8 via ml_dtypes)
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class _Files:
    """Tensor name -> where it lies in which shard, and reads of one tensor or of some rows of it
    through a memory map, so only what is read is paged in. Host numpy arrays, never placed on an
    accelerator. The safetensors layout (an 8-byte header length, a JSON header of dtype, shape
    and byte offsets, then the data) is read directly: the safetensors package's numpy and flax
    readers have no FP8 dtypes."""

    def __init__(self, path: str):
        self.where: dict[str, tuple[str, str, tuple, int]] = {}    # name -> (file, dtype, shape, byte offset)
        self._maps: dict[str, np.memmap] = {}                      # file -> its bytes, mapped once
        for fn in _shard_files(path):
            with open(fn, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for k, t in header.items():
                self.where[k] = (fn, t["dtype"], tuple(t["shape"]), 8 + n + t["data_offsets"][0])

    def shape(self, key: str) -> tuple:
        return self.where[key][2]

    def read(self, key: str, rows: list[int] | None = None) -> np.ndarray:
        fn, dtype, shape, offset = self.where[key]
        if dtype not in _DTYPES:
            raise CheckpointError(f"tensor {key!r} has dtype {dtype}, which the loader does not read")
        if fn not in self._maps:
            self._maps[fn] = np.memmap(fn, dtype=np.uint8, mode="r")
        dt = np.dtype(_DTYPES[dtype])
        n = int(np.prod(shape, dtype=np.int64))
        a = self._maps[fn][offset:offset + n * dt.itemsize].view(dt).reshape(shape)
        return np.array(a if rows is None else a[list(rows)])


class _Claimer:
    """Reads tensors by name with a shape check, and keeps the names not claimed yet, so that a
    whole-checkpoint load can report leftovers at the end."""

    def __init__(self, files: _Files, dtype, fp8_block: tuple[int, int] | None = None):
        self.files, self.dtype, self.fp8_block, self.left = files, dtype, fp8_block, set(files.where)

    def has(self, key: str) -> bool:
        return key in self.files.where

    def drop(self, key: str) -> None:
        self.left.discard(key)

    def take(self, key: str, shape: tuple, transpose: bool = False, rows: list[int] | None = None) -> np.ndarray:
        if key not in self.files.where:
            raise CheckpointError(f"missing tensor {key!r} (expected shape {shape})")
        if self.files.shape(key) != tuple(shape):
            raise CheckpointError(f"tensor {key!r} has shape {self.files.shape(key)}, expected {tuple(shape)}")
        self.left.discard(key)
        a = self.files.read(key, rows)
        if a.dtype in FP8_DTYPES:                  # "x.weight" beside its scales, "x.weight_scale_inv"
            scale = key + "_scale_inv"
            if self.fp8_block is None or not self.has(scale):
                raise CheckpointError(f"tensor {key!r} is FP8 but the checkpoint has no {scale!r} or no FP8 "
                                      "quantization_config (weight_block_size)")
            self.left.discard(scale)
            try:
                a = fp8_dequantize(a, self.files.read(scale, rows), self.fp8_block, key)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        a = a.astype(self.dtype)
        return np.ascontiguousarray(a.T if transpose else a)


def _experts(c: _Claimer, cfg: ModelConfig, pre: str, ids: list[int]) -> dict:
    """The stacks [len(ids), ...] of these routed experts of one layer."""
    E, D, F = cfg.n_experts, cfg.d_model, cfg.d_expert
    if c.has(pre + "experts.gate_up_proj"):            # fused layout [E, 2F, D] / [E, D, F]
        gu = c.take(pre + "experts.gate_up_proj", (E, 2 * F, D), rows=ids)
        down = c.take(pre + "experts.down_proj", (E, D, F), rows=ids)
        return {"w_gate": np.ascontiguousarray(gu[:, :F].transpose(0, 2, 1)),
                "w_up": np.ascontiguousarray(gu[:, F:].transpose(0, 2, 1)),
                "w_down": np.ascontiguousarray(down.transpose(0, 2, 1))}
    names = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    g = [c.take(f"{pre}experts.{j}.{names[0]}.weight", (F, D), True) for j in ids]
    u = [c.take(f"{pre}experts.{j}.{names[1]}.weight", (F, D), True) for j in ids]
    dn = [c.take(f"{pre}experts.{j}.{names[2]}.weight", (D, F), True) for j in ids]
    return {"w_gate": np.stack(g), "w_up": np.stack(u), "w_down": np.stack(dn)}


def _moe_prefix(c: _Claimer, cfg: ModelConfig, i: int) -> str:
    """Where layer i's router and experts sit (Mixtral's Hub layout names its MoE block apart)."""
    p = f"model.layers.{i}."
    if cfg.family == "mixtral" and c.has(p + "block_sparse_moe.gate.weight"):
        return p + "block_sparse_moe."
    return p + "mlp."


def _mlp(c: _Claimer, prefix: str, D: int, F: int) -> dict:
    """A SwiGLU MLP (shared expert, dense layer) from its gate/up/down projections."""
    return {"w_gate": c.take(prefix + "gate_proj.weight", (F, D), True),
            "w_up": c.take(prefix + "up_proj.weight", (F, D), True),
            "w_down": c.take(prefix + "down_proj.weight", (D, F), True)}


def _mla(c: _Claimer, cfg: ModelConfig, a: str) -> dict:
    D, H, hd, r, Rq, Rkv = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.qk_rope_dim, cfg.q_lora_rank, cfg.kv_lora_rank
    lp = ({"wq_a": c.take(a + "q_a_proj.weight", (Rq, D), True), "q_a_norm": c.take(a + "q_a_layernorm.weight", (Rq,)),
           "wq_b": c.take(a + "q_b_proj.weight", (H * hd, Rq), True)} if Rq
          else {"wq": c.take(a + "q_proj.weight", (H * hd, D), True)})
    lp.update(wkv_a=c.take(a + "kv_a_proj_with_mqa.weight", (Rkv + r, D), True),
              kv_a_norm=c.take(a + "kv_a_layernorm.weight", (Rkv,)),
              wkv_b=c.take(a + "kv_b_proj.weight", (H * (hd - r + cfg.value_dim), Rkv), True),
              wo=c.take(a + "o_proj.weight", (D, H * cfg.value_dim), True))
    return lp


def _deepseek_ffn(c: _Claimer, cfg: ModelConfig, i: int, lp: dict) -> dict:
    """DeepSeek's FFN side of layer i (GLM-4.5's too): a dense MLP, or router (+ selection bias)
    and shared experts."""
    D, m = cfg.d_model, f"model.layers.{i}.mlp."
    if cfg.moe_index(i) is None:
        lp["mlp"] = _mlp(c, m, D, cfg.d_dense)
        return lp
    lp["router"] = c.take(m + "gate.weight", (cfg.n_experts, D), True)
    if cfg.router_scoring == "sigmoid":          # V3's selection bias (V2 has none)
        lp["router_bias"] = c.take(m + "gate.e_score_correction_bias", (cfg.n_experts,))
    if cfg.d_shared:
        lp["shared"] = _mlp(c, m + "shared_experts.", D, cfg.d_shared)
    else:                  # transformers writes zero-size shared-expert tensors for n_shared_experts=0
        for name in ("gate_proj", "up_proj", "down_proj"):
            key = f"{m}shared_experts.{name}.weight"
            if c.has(key) and 0 in c.files.shape(key):
                c.drop(key)
    return lp


def _layer(c: _Claimer, cfg: ModelConfig, i: int) -> dict:
    """The attention-side params of layer i (norms, attention, router, shared or dense MLP)."""
    D, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    p = f"model.layers.{i}."
    a = f"{p}self_attn."
    lp = {"input_norm": c.take(p + "input_layernorm.weight", (D,)),
          "post_norm": c.take(p + "post_attention_layernorm.weight", (D,))}
    if cfg.family in _DEEPSEEK:
        lp.update(_mla(c, cfg, a))
        return _deepseek_ffn(c, cfg, i, lp)
    lp.update(wq=c.take(a + "q_proj.weight", (H * hd, D), True), wk=c.take(a + "k_proj.weight", (KV * hd, D), True),
              wv=c.take(a + "v_proj.weight", (KV * hd, D), True), wo=c.take(a + "o_proj.weight", (D, H * hd), True))
    if cfg.qkv_bias:
        lp.update(bq=c.take(a + "q_proj.bias", (H * hd,)), bk=c.take(a + "k_proj.bias", (KV * hd,)),
                  bv=c.take(a + "v_proj.bias", (KV * hd,)))
    if cfg.qk_norm:
        lp.update(q_norm=c.take(a + "q_norm.weight", (hd,)), k_norm=c.take(a + "k_norm.weight", (hd,)))
    if cfg.family in _DEEPSEEK_FFN:
        return _deepseek_ffn(c, cfg, i, lp)
    moe = _moe_prefix(c, cfg, i)
    lp["router"] = c.take(moe + "gate.weight", (cfg.n_experts, D), True)
    if cfg.d_shared:
        lp["shared"] = dict(_mlp(c, moe + "shared_expert.", D, cfg.d_shared),
                            gate=c.take(moe + "shared_expert_gate.weight", (1, D))[0])
    return lp


def _attention(c: _Claimer, cfg: ModelConfig) -> dict:
    """Everything an attention worker holds: embedding, every layer's attention side, head."""
    V, D = cfg.vocab_size, cfg.d_model
    embed = c.take("model.embed_tokens.weight", (V, D))
    layers = [_layer(c, cfg, i) for i in range(cfg.n_layers)]
    if cfg.tie_embeddings:
        c.drop("lm_head.weight")
        head = np.ascontiguousarray(embed.T)
    else:
        head = c.take("lm_head.weight", (V, D), True)
    return {"embed": embed, "final_norm": c.take("model.norm.weight", (D,)), "lm_head": head, "layers": layers}


def _raw_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory does not exist: {path}")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"missing config.json in checkpoint directory {path}")
    with open(cfg_path) as f:
        return json.load(f)


def read_config(path: str) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (its config.json)."""
    return config_from_hf(_raw_config(path))


class CheckpointWeights:
    """A checkpoint directory's weights, read when a worker asks for its part: an attention worker
    reads the attention side, an expert worker the experts it hosts (by tensor, or by rows of a
    fused stack), each in its own process on its own node; no process ever holds them all, and
    what crosses to a worker process is the path. Host leaves of `dtype` (FP8 block-quantized
    weights are dequantized as they are read)."""

    nbytes = 0                             # host bytes held here: none until a part is read

    def __init__(self, path: str, dtype=np.float32):
        raw = _raw_config(path)
        self.path, self.dtype, self.config, self.fp8_block = path, np.dtype(dtype), config_from_hf(raw), _fp8_block(raw)
        self._files: _Files | None = None
        _shard_files(path)                 # a missing shard is an error now, not in a worker

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": None}     # open files stay in their process

    def _claimer(self) -> _Claimer:
        if self._files is None:
            self._files = _Files(self.path)
        return _Claimer(self._files, self.dtype, self.fp8_block)

    def attention(self) -> dict:
        return _attention(self._claimer(), self.config)

    def experts(self, layer: int, ids: list[int]) -> dict:
        """The stacks [len(ids), ...] of these experts of MoE layer `layer`."""
        c, cfg = self._claimer(), self.config
        i = layer + cfg.first_k_dense
        return _experts(c, cfg, _moe_prefix(c, cfg, i), list(ids))

    def load(self) -> dict:
        """The whole model, every tensor of the files claimed: a renamed or extra tensor is an
        error (deepseek's and GLM's multi-token-prediction layers follow the decoder's; unused here)."""
        c, cfg = self._claimer(), self.config
        attn = _attention(c, cfg)
        experts = [_experts(c, cfg, _moe_prefix(c, cfg, i), list(range(cfg.n_experts)))
                   for i in range(cfg.n_layers) if cfg.moe_index(i) is not None]
        left = sorted(k for k in c.left if not (cfg.family in _DEEPSEEK_FFN and _is_mtp(k, cfg.n_layers)))
        if left:
            raise CheckpointError(f"unexpected tensors in checkpoint (unsupported layout?): {left[:5]}")
        return {"attn": attn, "experts": experts}


def load_checkpoint(path: str, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """Returns (config, {"attn": ..., "experts": [...]}) with host numpy leaves of `dtype`."""
    w = CheckpointWeights(path, dtype)
    return w.config, w.load()


def _is_mtp(key: str, n_layers: int) -> bool:
    parts = key.split(".")
    return key.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= n_layers


def _hf_config(cfg: ModelConfig) -> dict:
    if cfg.rope_yarn_factor:
        raise ConfigError("save_checkpoint writes default-RoPE configs only (this one uses YaRN)")
    arch = {v: k for k, v in _ARCH_TO_FAMILY.items()}[cfg.family]
    raw = {"architectures": [arch], "model_type": cfg.family, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "num_experts_per_tok": cfg.top_k,
           "max_position_embeddings": cfg.max_position, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
           "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}
    if cfg.family == "mixtral":
        raw.update(num_local_experts=cfg.n_experts, intermediate_size=cfg.d_expert)
    elif cfg.family in _DEEPSEEK_FFN:
        if cfg.d_shared % cfg.d_expert:
            raise ConfigError(f"d_shared={cfg.d_shared} is not a whole number of experts of {cfg.d_expert}")
        raw.update(n_routed_experts=cfg.n_experts, moe_intermediate_size=cfg.d_expert,
                   n_shared_experts=cfg.d_shared // cfg.d_expert, norm_topk_prob=cfg.norm_topk_prob,
                   n_group=cfg.n_group, topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling,
                   first_k_dense_replace=cfg.first_k_dense, intermediate_size=cfg.d_dense)
        if cfg.family == "glm4_moe":
            raw.update(attention_bias=cfg.qkv_bias, use_qk_norm=cfg.qk_norm, num_nextn_predict_layers=0,
                       partial_rotary_factor=(cfg.rotary_dim or cfg.head_dim) / cfg.head_dim)
        else:
            del raw["head_dim"]                        # transformers derives it (= qk_rope_head_dim)
            raw.update(q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                       qk_nope_head_dim=cfg.head_dim - cfg.qk_rope_dim, qk_rope_head_dim=cfg.qk_rope_dim,
                       v_head_dim=cfg.value_dim, rope_interleave=cfg.rope_interleave, attention_bias=False)
        if cfg.family == "deepseek_v2":
            del raw["rope_interleave"]
            raw.update(topk_method="group_limited_greedy" if cfg.n_group > 1 else "greedy", scoring_func="softmax")
    else:
        raw.update(num_experts=cfg.n_experts, moe_intermediate_size=cfg.d_expert, norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=1, mlp_only_layers=[])
    if cfg.family == "qwen2_moe":
        raw.update(shared_expert_intermediate_size=cfg.d_shared, qkv_bias=cfg.qkv_bias)
    return raw


def _mlp_tensors(prefix: str, mlp: dict) -> dict:
    return {prefix + "gate_proj.weight": mlp["w_gate"].T, prefix + "up_proj.weight": mlp["w_up"].T,
            prefix + "down_proj.weight": mlp["w_down"].T}


def _attention_tensors(cfg: ModelConfig, a: str, lp: dict) -> dict:
    if cfg.kv_lora_rank:
        t = ({a + "q_a_proj.weight": lp["wq_a"].T, a + "q_a_layernorm.weight": lp["q_a_norm"],
              a + "q_b_proj.weight": lp["wq_b"].T} if cfg.q_lora_rank else {a + "q_proj.weight": lp["wq"].T})
        t.update({a + "kv_a_proj_with_mqa.weight": lp["wkv_a"].T, a + "kv_a_layernorm.weight": lp["kv_a_norm"],
                  a + "kv_b_proj.weight": lp["wkv_b"].T})
    else:
        t = {a + "q_proj.weight": lp["wq"].T, a + "k_proj.weight": lp["wk"].T, a + "v_proj.weight": lp["wv"].T}
    t[a + "o_proj.weight"] = lp["wo"].T
    if cfg.qkv_bias:
        t.update({a + "q_proj.bias": lp["bq"], a + "k_proj.bias": lp["bk"], a + "v_proj.bias": lp["bv"]})
    if cfg.qk_norm:
        t.update({a + "q_norm.weight": lp["q_norm"], a + "k_norm.weight": lp["k_norm"]})
    return t


def save_checkpoint(cfg: ModelConfig, params: dict, path: str, dtype=np.float32) -> None:
    """Write a Hugging Face checkpoint directory (config.json + model.safetensors, Hub key layout)
    that load_checkpoint and transformers both read: the inverse of the key map above. dtype:
    float32 or float16 (the tensors' on-disk type)."""
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
    for i, lp in enumerate(attn["layers"]):
        p, m = f"model.layers.{i}.", f"model.layers.{i}.{moe_prefix}"
        t.update({p + "input_layernorm.weight": lp["input_norm"], p + "post_attention_layernorm.weight": lp["post_norm"]})
        t.update(_attention_tensors(cfg, p + "self_attn.", lp))
        if cfg.moe_index(i) is None:
            t.update(_mlp_tensors(m, lp["mlp"]))
            continue
        t[m + "gate.weight"] = lp["router"].T
        if "router_bias" in lp:
            t[m + "gate.e_score_correction_bias"] = lp["router_bias"]
        if "shared" in lp and cfg.family in _DEEPSEEK_FFN:
            t.update(_mlp_tensors(m + "shared_experts.", lp["shared"]))
        elif "shared" in lp:
            t.update(_mlp_tensors(m + "shared_expert.", lp["shared"]))
            t[m + "shared_expert_gate.weight"] = lp["shared"]["gate"][None]
        ep = params["experts"][cfg.moe_index(i)]
        for j in range(cfg.n_experts):
            for name, key in zip(names, ("w_gate", "w_up", "w_down")):
                t[f"{m}experts.{j}.{name}.weight"] = ep[key][j].T
    save_file({k: np.ascontiguousarray(v, dtype=dtype) for k, v in t.items()},
              os.path.join(path, "model.safetensors"))
