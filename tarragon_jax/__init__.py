"""tarragon_jax: resilient Mixture-of-Experts LLM inference in JAX (Tarragon, arXiv 2601.01310).

The public API, for use inside a JAX program (everything else is internal and may change):

  load_checkpoint(dir) -> (ModelConfig, params)   a Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE,
                                                  Qwen3-MoE, DeepSeek-V2, DeepSeek-V3); params are plain pytrees
  CheckpointWeights(dir)                          the same checkpoint unread: each worker reads its own
                                                  part (.config is its ModelConfig); pass it as params
  save_checkpoint(cfg, params, dir)               ... and back (config.json + model.safetensors)
  tiny_model(family, seed) -> (cfg, params)       a small random model of a family, for tests
  Engine(cfg, params or weights, EngineConfig, CacheConfig, faults=FaultInjector)
      .generate(prompts, SamplingParams) -> token ids     one continuous batch, in prompt order
      .submit / .step / .stream / .cancel                 the request lifecycle, step by step
  EngineConfig, CacheConfig, SamplingParams, ModelConfig  frozen dataclasses (ConfigError names a bad field)
  FaultInjector.from_strings(["ew:1@step=3", "aw:0@step=5"])   failures injected on schedule
  WorkerFailed, RequestError, ConfigError         the typed errors
  EngineLoop, Server                              the engine on its own thread behind the HTTP API
  ChatTemplate                                    a checkpoint's chat template, as transformers renders it

    from tarragon_jax import Engine, EngineConfig, SamplingParams, load_checkpoint
    cfg, params = load_checkpoint("path/to/checkpoint")
    engine = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=4))
    print(engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16, temperature=0)))

Names load on first use, so importing a host-only module (the scheduler, the routing table) does
not import jax through this file.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "tarragon_jax.serving.engine", "TokenEvent": "tarragon_jax.serving.engine",
    "EngineConfig": "tarragon_jax.config", "CacheConfig": "tarragon_jax.config",
    "SamplingParams": "tarragon_jax.config", "ModelConfig": "tarragon_jax.config",
    "ConfigError": "tarragon_jax.config",
    "load_checkpoint": "tarragon_jax.model.hf_loader", "save_checkpoint": "tarragon_jax.model.hf_loader",
    "CheckpointError": "tarragon_jax.model.hf_loader", "CheckpointWeights": "tarragon_jax.model.hf_loader",
    "tiny_model": "tarragon_jax.model.tiny",
    "FaultInjector": "tarragon_jax.control.faults",
    "WorkerFailed": "tarragon_jax.errors", "RequestError": "tarragon_jax.errors",
    "EngineLoop": "tarragon_jax.serving.engine_loop", "Server": "tarragon_jax.serving.server",
    "ChatTemplate": "tarragon_jax.serving.chat_template",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tarragon_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
