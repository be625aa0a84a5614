"""Frozen configuration dataclasses, validated with messages that name the offending value.

Config is data: the engine, workers and launchers receive these objects; nothing reads flags or
environment variables behind their back.
"""
from __future__ import annotations

import dataclasses
import numbers

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe")
ROUTER_SCORING = ("softmax", "sigmoid")
EXPERT_BACKENDS = ("auto", "tiles", "dense", "ragged_dot", "pallas")
ATTENTION_BACKENDS = ("auto", "pallas", "jnp")
RECOVERIES = ("tarragon", "restart", "restart_regenerate")
PRECOMPILES = ("none", "recovery", "all")
RUNTIMES = ("local", "ray")
MAX_LOGPROBS = 20          # most alternatives a token's logprobs list (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 300       # most tokens one request's logit_bias names (OpenAI's limit)


class ConfigError(ValueError):
    """A configuration value is missing, unsupported or inconsistent."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of an MoE decoder; one object covers every supported family."""
    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    d_expert: int                      # routed expert intermediate size
    norm_topk_prob: bool               # renormalise the top-k gate weights to sum to 1
    d_shared: int = 0                  # shared expert intermediate size (qwen2_moe); 0 = none
    qkv_bias: bool = False             # qwen2_moe
    qk_norm: bool = False              # qwen3_moe: RMSNorm on q and k per head before RoPE
    rope_theta: float = 10000.0
    rotary_dim: int = 0                # RoPE on the first rotary_dim dims of each q/k head, the rest pass
                                       # unrotated (GLM-4.5's partial RoPE); 0: the whole head
    rope_yarn_factor: float = 0.0      # YaRN context scaling (0: plain RoPE); see model/rope.py
    rope_yarn_original_max: int = 0    # the pretraining context YaRN extends
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    rope_yarn_truncate: bool = True
    rope_attention_factor: float = 1.0  # cos/sin scale (YaRN)
    attn_scale: float = 1.0            # softmax scale multiplier (DeepSeek's YaRN mscale^2), applied to q
    rms_eps: float = 1e-6
    max_position: int = 4096
    tie_embeddings: bool = False
    # DeepSeek-V3. MLA attention (kv_lora_rank > 0): q/k heads are head_dim = nope + qk_rope_dim and
    # n_kv_heads = n_heads; the cache holds the latent (cache_parts / cache_row), or K/V per head.
    q_lora_rank: int = 0               # 0: a direct q projection
    kv_lora_rank: int = 0              # 0: plain (GQA) attention
    qk_rope_dim: int = 0               # the rotary part of each q/k head
    v_head_dim: int = 0                # value head size (0: head_dim)
    rope_interleave: bool = False      # RoPE on interleaved pairs (DeepSeek) instead of halves
    mla_latent_cache: bool = True      # MLA: cache the latent [c_kv, k_rope] per token (one row, no
                                       # V), queries absorb the up-projections; False: K/V per head
    router_scoring: str = "softmax"    # sigmoid: + a per-expert selection bias, group-limited top-k
    n_group: int = 1                   # expert groups; top-k only within the topk_group best groups
                                       # (ranked by their best expert under softmax, DeepSeek-V2; by
                                       # their two best biased scores under sigmoid, DeepSeek-V3)
    topk_group: int = 1
    routed_scaling: float = 1.0        # gate weights are multiplied by this
    first_k_dense: int = 0             # leading layers with a dense FFN (d_dense) and no experts
    d_dense: int = 0

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_k_dense

    def moe_index(self, layer: int) -> int | None:
        """The expert-side index of a decoder layer (placement, ERT, EWs); None for a dense layer."""
        return None if layer < self.first_k_dense else layer - self.first_k_dense

    @property
    def value_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def latent_cache(self) -> bool:
        return bool(self.kv_lora_rank) and self.mla_latent_cache

    @property
    def cache_parts(self) -> tuple:
        """The page buffers of a layer: the latent alone (MLA), else K and V."""
        return ("k",) if self.latent_cache else ("k", "v")

    @property
    def cache_row(self) -> tuple:
        """(heads, dim) of one cached token in one part."""
        return (1, self.kv_lora_rank + self.qk_rope_dim) if self.latent_cache else (self.n_kv_heads, self.head_dim)

    def __post_init__(self) -> None:
        _require(self.family in FAMILIES,
                 f"unknown model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "n_experts", "top_k", "d_expert", "max_position"):
            _require(getattr(self, name) > 0, f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        _require(self.n_heads % self.n_kv_heads == 0,
                 f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        _require(self.top_k <= self.n_experts,
                 f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        _require(self.d_shared >= 0, f"d_shared must be >= 0, got {self.d_shared}")
        _require(not self.rope_yarn_factor or self.rope_yarn_original_max > 0,
                 "YaRN RoPE needs original_max_position_embeddings")
        _require(self.router_scoring in ROUTER_SCORING,
                 f"unknown router_scoring {self.router_scoring!r}; choose from {ROUTER_SCORING}")
        _require(self.n_group >= 1 and self.n_experts % self.n_group == 0 and 1 <= self.topk_group <= self.n_group,
                 f"n_group={self.n_group} must divide n_experts={self.n_experts}, 1 <= topk_group={self.topk_group} "
                 f"<= n_group")
        _require(self.n_group == 1 or self.n_experts // self.n_group >= 2,
                 f"group-limited routing needs >= 2 experts a group, got {self.n_experts // self.n_group}")
        _require(0 <= self.first_k_dense < self.n_layers and (self.first_k_dense == 0 or self.d_dense > 0),
                 f"first_k_dense={self.first_k_dense} must leave an MoE layer (n_layers={self.n_layers}) "
                 f"and needs d_dense > 0 (got {self.d_dense})")
        _require(self.rotary_dim == 0 or (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0
                                          and not self.kv_lora_rank),
                 f"rotary_dim={self.rotary_dim} must be even, at most head_dim={self.head_dim}, and not with MLA")
        if self.kv_lora_rank:
            _require(self.n_kv_heads == self.n_heads, "MLA caches K/V per head: n_kv_heads must equal n_heads")
            _require(0 < self.qk_rope_dim < self.head_dim and self.qk_rope_dim % 2 == 0,
                     f"qk_rope_dim={self.qk_rope_dim} must be even and below head_dim={self.head_dim}")
            _require(0 < self.value_dim <= self.head_dim,
                     f"v_head_dim={self.v_head_dim} must be in (0, head_dim={self.head_dim}] (V is padded to head_dim)")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache of one attention worker. Page 0 is reserved as the padding sink."""
    page_size: int = 16
    num_pages: int = 256               # per attention worker, including the reserved page 0

    def __post_init__(self) -> None:
        _require(self.page_size > 0, f"CacheConfig.page_size must be > 0, got {self.page_size}")
        _require(self.num_pages >= 2,
                 f"CacheConfig.num_pages must be >= 2 (page 0 is reserved), got {self.num_pages}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the service is laid out and scheduled."""
    num_attention_workers: int = 2
    num_expert_workers: int = 4
    expert_backend: str = "auto"      # auto: by device (workers/backends.py): Pallas on sm_80+ GPUs and TPU,
                                      # ragged_dot on older GPUs, the XLA tile loop ("tiles") on CPU
    attention_backend: str = "auto"   # auto: the Pallas paged-attention kernel on sm_80+ GPUs, jnp elsewhere
    prefill_chunk: int = 32            # max prompt tokens of one request per step (chunked prefill)
    max_step_tokens: int = 256         # token budget of one step on one AW
    max_running: int = 64              # requests in the running batch of one AW
    transfer_deadline_s: float = 30.0  # bounded wait on every cross-worker transfer
    dtype: str = "float32"             # activation/param dtype on device
    runtime: str = "local"             # local: workers are device subsets of this process; ray: every worker
                                       # (and the checkpoint store) is a process of its own
    channel_spin_s: float | None = None  # ray: a worker's receive polls this long before it sleeps (waking a
                                       # sleeping process costs ~30 us on a VM; an idle one sleeps); None:
                                       # 100 us when the host has a core per worker, else 0 (a polling
                                       # worker takes the core another one computes on)
    ray_address: str | None = None     # ray: join this Ray cluster ("auto", "ray://host:10001", "host:6379");
                                       # None: start one on this machine (or use the one ray.init made)
    recovery: str = "tarragon"         # tarragon: mask failures; restart: tear everything down and
                                       # re-prefill every request (baseline); restart_regenerate: the
                                       # same, but regenerating the sent tokens one step at a time
    resilience: bool = True            # shadows + KV snapshots + heartbeats (off: the overhead baseline)
    shadow_budget: float = 1.0         # fraction of an EW's primary-expert memory spent on shadows
    eplb: bool = False                 # every replica serves traffic, shares and placement rebalanced by
                                       # measured load (control/rebalancer.py); off: the paper's idle shadows
    eplb_window_s: float = 10.0        # eplb: load is read and the experts rebalanced once per window
    prefix_caching: bool = True        # full KV blocks are cached by their token prefix's hash and shared by later
                                       # requests that start with it (kv/block_manager.py); placement prefers
                                       # the AW holding a request's prefix
    checkpoint_dir: str | None = None  # KV snapshots (any Orbax path); None: a fresh dir under the temp dir
    snapshot_flush_s: float = 10.0     # KV snapshots within this window share one Orbax write (durability lag)
    snapshot_interval_s: float = 0.05  # an AW hands its newly filled KV blocks to the store at most this
                                       # often (each call costs the decode loop ~0.3 ms of host time; a
                                       # block commits up to this much later; 0: every step)
    snapshot_memory_tier: bool = True  # blocks commit in the store's host memory at once; off: only once
                                       # written to the Orbax files (restores read disk)
    heartbeat_interval_s: float = 0.05 # controller liveness probes of idle workers
    precompile: str = "none"           # at startup: "recovery" compiles what a recovery runs (restore
                                       # writes, the recompute step's shapes; the launchers' default),
                                       # "all" every shape, "none" nothing (first uses compile in steps)
    pingpong: bool = False             # an EW call per AW, not one over all AWs: one AW's attention
                                       # overlaps the expert work of another (MegaScale-Infer); costs
                                       # an expert weight read per AW (launch/peer_bench.py measures)

    @property
    def restarts(self) -> bool:
        """Whether a failure restarts the whole service (a baseline) instead of being masked."""
        return self.recovery != "tarragon"

    def __post_init__(self) -> None:
        _require(self.num_attention_workers >= 1,
                 f"num_attention_workers must be >= 1, got {self.num_attention_workers}")
        _require(self.num_expert_workers >= 1,
                 f"num_expert_workers must be >= 1, got {self.num_expert_workers}")
        _require(self.expert_backend in EXPERT_BACKENDS,
                 f"unknown expert_backend {self.expert_backend!r}; choose from {EXPERT_BACKENDS}")
        _require(self.attention_backend in ATTENTION_BACKENDS,
                 f"unknown attention_backend {self.attention_backend!r}; choose from {ATTENTION_BACKENDS}")
        _require(self.prefill_chunk > 0, f"prefill_chunk must be > 0, got {self.prefill_chunk}")
        _require(self.max_step_tokens >= self.prefill_chunk,
                 f"max_step_tokens={self.max_step_tokens} < prefill_chunk={self.prefill_chunk}")
        _require(self.max_running > 0, f"max_running must be > 0, got {self.max_running}")
        _require(self.transfer_deadline_s > 0,
                 f"transfer_deadline_s must be > 0, got {self.transfer_deadline_s}")
        _require(self.channel_spin_s is None or self.channel_spin_s >= 0, f"channel_spin_s must be >= 0, got {self.channel_spin_s}")
        _require(self.runtime in RUNTIMES, f"unknown runtime {self.runtime!r}; choose from {RUNTIMES}")
        _require(self.ray_address is None or self.runtime == "ray",
                 f"ray_address={self.ray_address!r} needs runtime='ray', got runtime={self.runtime!r}")
        _require(self.recovery in RECOVERIES, f"unknown recovery {self.recovery!r}; choose from {RECOVERIES}")
        _require(self.precompile in PRECOMPILES,
                 f"unknown precompile {self.precompile!r}; choose from {PRECOMPILES}")
        _require(self.shadow_budget >= 0, f"shadow_budget must be >= 0, got {self.shadow_budget}")
        _require(self.eplb_window_s > 0, f"eplb_window_s must be > 0, got {self.eplb_window_s}")
        _require(self.snapshot_flush_s >= 0, f"snapshot_flush_s must be >= 0, got {self.snapshot_flush_s}")
        _require(self.snapshot_interval_s >= 0, f"snapshot_interval_s must be >= 0, got {self.snapshot_interval_s}")
        _require(self.heartbeat_interval_s > 0,
                 f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")
        _require(self.dtype in ("float32", "bfloat16", "float16"),
                 f"unsupported dtype {self.dtype!r}; use float32, bfloat16 or float16")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding: greedy when temperature == 0, else seeded temperature / top-p.
    logprobs: None computes none; n (0..MAX_LOGPROBS) returns with each token its log-probability
    and the n most likely tokens', from the model's distribution (before temperature / top-p).
    prompt_logprobs: the same for every prompt token after the first (each given those before
    it); such a request computes its whole prompt (no prefix-cache hits).
    Before a token is chosen (greedy or sampled; logprobs stay the model's), in vLLM's order:
    logit_bias ((token id, bias in [-100, 100]) pairs) is added; repetition_penalty divides the
    positive logits and multiplies the negative ones of every token in the prompt or the output
    (1: off); frequency_penalty x (times the token is in the output) and presence_penalty x (it
    is in the output at all) are subtracted (both in [-2, 2], OpenAI's range).
    grammar: an llguidance grammar (a JSON schema's, Lark, a regex; workers/grammar.py) every
    token must follow; the engine needs the tokenizer for it (Engine's vocab)."""
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple = ()
    grammar: str | None = None

    @property
    def adjusts_logits(self) -> bool:
        """Whether anything changes this request's logits before a token is chosen."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0 \
            or self.repetition_penalty != 1

    def __post_init__(self) -> None:
        def is_int(x) -> bool:
            return isinstance(x, numbers.Integral) and not isinstance(x, bool)

        def is_num(x) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool)
        _require(is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
                 f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _require(is_num(self.temperature) and self.temperature >= 0.0,
                 f"temperature must be a number >= 0, got {self.temperature!r}")
        _require(is_num(self.top_p) and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        _require(is_int(self.seed) and 0 <= self.seed < 2**32, f"seed must be an integer in [0, 2^32), got {self.seed!r}")
        _require(isinstance(self.stop_token_ids, tuple) and all(is_int(t) for t in self.stop_token_ids),
                 f"stop_token_ids must be a tuple of integers, got {self.stop_token_ids!r}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            _require(n is None or (is_int(n) and 0 <= n <= MAX_LOGPROBS),
                     f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            x = getattr(self, name)
            _require(is_num(x) and -2.0 <= x <= 2.0, f"{name} must be a number in [-2, 2], got {x!r}")
        _require(is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
                 f"repetition_penalty must be a number in (0, 10], got {self.repetition_penalty!r}")
        _require(isinstance(self.logit_bias, tuple) and len(self.logit_bias) <= MAX_LOGIT_BIAS
                 and all(isinstance(e, tuple) and len(e) == 2 and is_int(e[0]) and e[0] >= 0 and is_num(e[1])
                         and -100.0 <= e[1] <= 100.0 for e in self.logit_bias),
                 f"logit_bias must be a tuple of up to {MAX_LOGIT_BIAS} (token id >= 0, bias in [-100, 100]) pairs, "
                 f"got {self.logit_bias!r}")
        _require(self.grammar is None or (isinstance(self.grammar, str) and self.grammar),
                 f"grammar must be a non-empty string (an llguidance grammar) or None, got {self.grammar!r}")


def tiny_model_config(family: str = "qwen2_moe", **overrides) -> ModelConfig:
    """The embedded default model: small enough for 2 CPU cores, every feature switched on."""
    base = dict(family=family, vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=16, n_experts=8, top_k=2, d_expert=32, norm_topk_prob=family != "qwen2_moe",
                d_shared=48 if family == "qwen2_moe" else 0, qkv_bias=family == "qwen2_moe",
                qk_norm=family == "qwen3_moe", rope_theta=10000.0, rms_eps=1e-6, max_position=1024)
    if family == "deepseek_v3":   # MLA with a q LoRA, 2 groups of 4 experts, one leading dense layer
        base.update(n_layers=3, n_kv_heads=4, head_dim=24, q_lora_rank=32, kv_lora_rank=16, qk_rope_dim=8,
                    v_head_dim=16, rope_interleave=True, router_scoring="sigmoid", n_group=2, topk_group=1,
                    routed_scaling=2.5, d_shared=32, first_k_dense=1, d_dense=96)
    if family == "glm4_moe":      # GQA with q/k/v bias, qk-norm, partial RoPE, V3's routing, a dense layer
        base.update(n_layers=3, qkv_bias=True, qk_norm=True, rotary_dim=8, router_scoring="sigmoid", n_group=2,
                    topk_group=1, routed_scaling=2.5, d_shared=32, first_k_dense=1, d_dense=96)
    base.update(overrides)
    return ModelConfig(**base)

