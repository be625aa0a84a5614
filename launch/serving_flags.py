"""Flags every serving launcher shares (model, layout, cache, resilience), and what they build."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
from typing import Callable

from absl import app, flags, logging

flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint directory (config.json + *.safetensors).")
flags.DEFINE_enum("load_format", "auto", ["auto", "dummy"],
                  "dummy: random weights at the real shapes of --checkpoint's config.json alone (a directory "
                  "or the file; e.g. launch/configs/qwen3_30b_a3b), made in --dtype.")
flags.DEFINE_enum("model", None, ["tiny", "demo"], "Built-in model instead of --checkpoint: tiny (random "
                 "weights, the byte tokenizer) or demo (trained on Python's help texts by launch/train_demo.py; "
                 "prints text).")
flags.DEFINE_enum("tiny_family", "qwen2_moe", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe"],
                  "Family of --model tiny.")
flags.DEFINE_integer("num_attention_workers", 2, "Attention workers (AWs).")
flags.DEFINE_integer("num_expert_workers", 4, "Expert workers (EWs).")
flags.DEFINE_enum("expert_backend", "auto", ["auto", "tiles", "dense", "ragged_dot", "pallas"],
                  "Grouped FFN backend; auto = Pallas on GPU/TPU, the XLA tile loop (routed pairs only) on CPU.")
flags.DEFINE_enum("attention_backend", "auto", ["auto", "pallas", "jnp"],
                  "Paged attention; auto = Pallas (Triton) kernel on GPU, jnp on CPU/TPU.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Device dtype.")
flags.DEFINE_integer("max_model_len", None, "Longest request served, prompt and new tokens (default: the model's "
                     "context). A request longer than this gets a clear error; startup compiles only the KV table "
                     "widths this length can reach.")
flags.DEFINE_integer("page_size", 16, "KV page size (tokens).")
flags.DEFINE_integer("num_pages", 256, "KV pages per attention worker.")
flags.DEFINE_integer("prefill_chunk", 32, "Max prompt tokens of a request per step.")
flags.DEFINE_integer("max_running", 64, "Requests in the running batch of one AW (more wait in its queue).")
flags.DEFINE_enum("runtime", "local", ["local", "ray"],
                  "local: every worker is a device subset of this process; ray: each EW is its own process "
                  "(a Ray actor; failures are real process deaths).")
flags.DEFINE_float("channel_spin_us", None, "With --runtime ray: how long a worker process's receive polls "
                   "before it sleeps (waking a sleeping process costs ~30 us on a VM; an idle worker sleeps); "
                   "unset: 100 when the host has a core per worker, else 0.")
flags.DEFINE_string("ray_address", None, "With --runtime ray: join this Ray cluster (e.g. 'auto' on a node where "
                    "`ray start` ran, or ray://head:10001); unset: start Ray on this machine.")
flags.DEFINE_enum("recovery", "tarragon", ["tarragon", "restart", "restart_regenerate"],
                  "tarragon: mask failures (shadows, replay, KV restore); restart: rebuild everything and "
                  "re-prefill every request's prompt and sent tokens; restart_regenerate: rebuild and regenerate "
                  "the sent tokens one step at a time (a weaker baseline).")
flags.DEFINE_bool("resilience", True, "Shadow experts + KV snapshots + heartbeats (off: overhead baseline).")
flags.DEFINE_float("shadow_budget", 1.0, "Fraction of an EW's primary-expert memory spent on shadow experts.")
flags.DEFINE_bool("eplb", False, "Every replica (shadows included) serves traffic; each window the measured load "
                  "sets how an expert's traffic splits over its replicas and, where that is not enough, moves "
                  "replicas between EWs in the background (--noeplb: the paper's idle shadows, serving only after a failure).")
flags.DEFINE_float("eplb_window_s", 10.0, "With --eplb: the expert load is read and rebalanced once per window.")
flags.DEFINE_bool("enable_prefix_caching", True, "Each AW caches full KV blocks by the hash of their token prefix and "
                  "shares them with later requests that start the same way (system prompts, chat turns); new "
                  "requests go to the AW holding their prefix, balanced against load.")
flags.DEFINE_string("checkpoint_dir", None, "Where KV snapshots go (any Orbax path); default: a temp dir.")
flags.DEFINE_float("snapshot_interval_s", 0.05, "An AW hands newly filled KV blocks to the checkpoint store at "
                   "most this often (a block commits up to this much later; 0: every step).")
flags.DEFINE_float("snapshot_flush_s", 10.0, "KV snapshots within this window share one Orbax write (commit is at once, in the store memory; the files are a second tier).")
flags.DEFINE_float("transfer_deadline_s", 30.0, "Bounded wait on every cross-worker transfer.")
flags.DEFINE_float("heartbeat_interval_s", 0.05, "Controller liveness probes.")
flags.DEFINE_enum("precompile", "all", ["none", "recovery", "all"],
                  "What startup compiles: every stage program at every batch shape the configuration can reach "
                  "(all), or only what a recovery runs (recovery: two token buckets at every table width, the "
                  "restore writes; faster to start, and every step pads up to one of the two buckets), or nothing "
                  "(each new shape then compiles inside the step that meets it, with its requests waiting).")
flags.DEFINE_bool("snapshot_memory_tier", True, "KV blocks commit in the checkpoint store's host memory at once; "
                  "off: only once written to the Orbax files, and restores read them.")
flags.DEFINE_bool("pingpong", False, "One EW call per AW per layer instead of one over all AWs, so one AW's "
                  "attention overlaps another's expert work (MegaScale-Infer's ping-pong).")
flags.DEFINE_string("compile_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "tarragon_jax", "xla"),
                    "Persistent XLA compilation cache ('' to disable).")
FLAGS = flags.FLAGS
DEMO = os.path.join(os.path.dirname(os.path.abspath(importlib.util.find_spec("tarragon_jax").origin)), "model", "demo")


def setup_jax() -> None:
    from tarragon_jax.workers.runtime import use_compile_cache
    if FLAGS.compile_cache_dir:
        use_compile_cache(FLAGS.compile_cache_dir)


def start() -> tuple:
    """Launcher preamble: quiet logs, the compile cache, then (config, weights, checkpoint dir,
    reload, engine config); a bad checkpoint or flag value exits with "error: ..." naming it."""
    logging.set_verbosity(logging.WARNING)
    setup_jax()
    from tarragon_jax.config import ConfigError
    from tarragon_jax.model.hf_loader import CheckpointError
    try:
        return (*load_model(), engine_config())
    except (CheckpointError, ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")


def load_model() -> tuple:
    """(config, weights, checkpoint dir, reload) from --model / --checkpoint: where each worker
    reads its own part of the weights (model/weights.py), so the launcher's process holds none.
    The tiny model is written to a checkpoint directory first, so the restart baseline reloads
    files either way."""
    from tarragon_jax.model.hf_loader import CheckpointWeights, save_checkpoint
    from tarragon_jax.model.tiny import tiny_model
    if (FLAGS.model is None) == (FLAGS.checkpoint is None):
        raise app.UsageError("give exactly one of --model tiny or --checkpoint DIR")
    path = DEMO if FLAGS.model == "demo" else FLAGS.checkpoint
    if FLAGS.model == "tiny":
        path = tempfile.mkdtemp(prefix="tarragon_tiny_")
        save_checkpoint(*tiny_model(FLAGS.tiny_family), path)
    if FLAGS.load_format == "dummy":
        from tarragon_jax.model.dummy import DummyWeights
        import jax.numpy as jnp
        dtype = jnp.dtype(FLAGS.dtype)
        weights = DummyWeights(path, dtype)
        return _capped(weights.config), weights, None, lambda: DummyWeights(path, dtype)
    weights = CheckpointWeights(path)
    reload: Callable[[], CheckpointWeights] = lambda: CheckpointWeights(path)
    return _capped(weights.config), weights, ((FLAGS.checkpoint or FLAGS.model == "demo") and path), reload


def _capped(cfg):
    """The model's config with its context capped at --max_model_len (only validation and the
    shape grid read it: positions are computed per token)."""
    from tarragon_jax.config import ConfigError
    if FLAGS.max_model_len is None:
        return cfg
    if not 1 < FLAGS.max_model_len <= cfg.max_position:
        raise ConfigError(f"max_model_len must be in [2, {cfg.max_position}] (the model's context), "
                          f"got {FLAGS.max_model_len}")
    return dataclasses.replace(cfg, max_position=FLAGS.max_model_len)


def tokenizer(ckpt: str | None, cfg):
    """The checkpoint's tokenizer (tokenizer.json), or None. The embedded model (no checkpoint)
    gets the byte tokenizer; dummy weights get none (token ids only). Needs only the base install
    (generate, the benchmarks); the chat template (the serve extra's jinja2) is a server's."""
    if not ckpt:
        if FLAGS.load_format == "dummy":
            return None
        from tarragon_jax.model import byte_tokenizer
        return byte_tokenizer.byte_tokenizer(cfg.vocab_size)
    if os.path.exists(os.path.join(ckpt, "tokenizer.json")):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    return None


def tokenizer_and_template(ckpt: str | None, cfg):
    """(tokenizer or None, ChatTemplate or None) of the checkpoint. The embedded model (no
    checkpoint) gets the byte tokenizer with ChatML, so it can be served as text and chat."""
    from tarragon_jax.serving.chat_template import ChatTemplate, NoChatTemplate
    tok = tokenizer(ckpt, cfg)
    if not ckpt:
        from tarragon_jax.model import byte_tokenizer
        return tok, tok and ChatTemplate(byte_tokenizer.CHATML, {"eos_token": byte_tokenizer.EOS})
    try:
        return tok, ChatTemplate.from_checkpoint(ckpt)
    except NoChatTemplate:
        return tok, None


def vocabulary(tokenizer, eos: tuple, cfg):
    """What structured outputs follow (workers/grammar.py), or None without a tokenizer."""
    from tarragon_jax.workers.grammar import Vocabulary
    return None if tokenizer is None else Vocabulary(tokenizer.to_str(), tuple(eos), cfg.vocab_size)


def eos_ids(ckpt: str | None, tokenizer=None) -> tuple:
    """The checkpoint's end-of-sequence ids (generation_config.json, else config.json), where
    generation stops by default, as clients of a serving system expect; without a checkpoint,
    the byte tokenizer's end of turn (tokenizer_and_template)."""
    if not ckpt and tokenizer is not None:
        from tarragon_jax.model import byte_tokenizer
        return (tokenizer.token_to_id(byte_tokenizer.EOS),)
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(ckpt or "", name)
        if ckpt and os.path.exists(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (eos,)
    return ()


def engine_config(**overrides):
    from tarragon_jax.config import EngineConfig
    kw = dict(num_attention_workers=FLAGS.num_attention_workers, num_expert_workers=FLAGS.num_expert_workers,
              expert_backend=FLAGS.expert_backend, attention_backend=FLAGS.attention_backend,
              prefill_chunk=FLAGS.prefill_chunk, max_running=FLAGS.max_running,
              max_step_tokens=max(256, FLAGS.prefill_chunk), dtype=FLAGS.dtype, runtime=FLAGS.runtime, ray_address=FLAGS.ray_address, recovery=FLAGS.recovery,
              resilience=FLAGS.resilience, shadow_budget=FLAGS.shadow_budget, eplb=FLAGS.eplb,
              eplb_window_s=FLAGS.eplb_window_s, prefix_caching=FLAGS.enable_prefix_caching,
              checkpoint_dir=FLAGS.checkpoint_dir,
              snapshot_flush_s=FLAGS.snapshot_flush_s, snapshot_interval_s=FLAGS.snapshot_interval_s,
              snapshot_memory_tier=FLAGS.snapshot_memory_tier,
              transfer_deadline_s=FLAGS.transfer_deadline_s, heartbeat_interval_s=FLAGS.heartbeat_interval_s, precompile=FLAGS.precompile,
              pingpong=FLAGS.pingpong, channel_spin_s=None if FLAGS.channel_spin_us is None else FLAGS.channel_spin_us * 1e-6)
    kw.update(overrides)
    return EngineConfig(**kw)


def cache_config():
    from tarragon_jax.config import CacheConfig
    return CacheConfig(FLAGS.page_size, FLAGS.num_pages)


def startup_line(engine) -> str:
    """What startup compiled and how long it took (the launchers print it): after it no step
    compiles; every step pads up to a compiled token bucket."""
    c = engine.controller
    return f"precompiled ({engine.config.precompile}) in {c.precompile_s:.1f} s: {c.grid.describe()}"
