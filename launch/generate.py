"""Generate with the disaggregated engine: `python -m launch.generate --model tiny`.

All prompts are served together as one continuous batch. Prints each prompt's output (or one
JSON line per prompt with --json, in the order given) and the throughput on stderr.
"""
from launch import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import json
import os
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint directory (config.json + *.safetensors).")
flags.DEFINE_enum("model", None, ["tiny"], "Built-in model instead of --checkpoint.")
flags.DEFINE_enum("tiny_family", "qwen2_moe", ["mixtral", "qwen2_moe", "qwen3_moe"], "Family of --model tiny.")
flags.DEFINE_multi_string("prompt_ids", None, "Comma-separated token ids; repeat for more prompts.")
flags.DEFINE_multi_string("prompt", None, "Text prompt (needs tokenizer.json in the checkpoint); repeatable.")
flags.DEFINE_integer("num_random_prompts", 0, "Add this many random prompts (for throughput runs).")
flags.DEFINE_integer("random_prompt_len", 16, "Length of each random prompt.")
flags.DEFINE_integer("max_new_tokens", 16, "New tokens per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("num_attention_workers", 2, "Attention workers (AWs).")
flags.DEFINE_integer("num_expert_workers", 4, "Expert workers (EWs).")
flags.DEFINE_enum("expert_backend", "auto", ["auto", "dense", "ragged_dot", "pallas"],
                  "Grouped FFN backend; auto = Pallas on GPU/TPU, ragged_dot on CPU.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Device dtype.")
flags.DEFINE_integer("page_size", 16, "KV page size (tokens).")
flags.DEFINE_integer("num_pages", 256, "KV pages per attention worker.")
flags.DEFINE_integer("prefill_chunk", 32, "Max prompt tokens of a request per step.")
flags.DEFINE_bool("warmup", False, "Serve the prompts once untimed first (compiles), then time a second run.")
flags.DEFINE_bool("json", False, 'One JSON line per prompt: {"prompt_ids": [...], "output_ids": [...]}.')
flags.DEFINE_string("compile_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "tarragon_jax", "xla"),
                    "Persistent XLA compilation cache ('' to disable).")


def load_model():
    """(config, params, checkpoint dir or None) from --model / --checkpoint."""
    from tarragon_jax.model.hf_loader import load_checkpoint
    from tarragon_jax.model.tiny import tiny_model
    if (FLAGS.model is None) == (FLAGS.checkpoint is None):
        raise app.UsageError("give exactly one of --model tiny or --checkpoint DIR")
    if FLAGS.model == "tiny":
        return (*tiny_model(FLAGS.tiny_family), None)
    return (*load_checkpoint(FLAGS.checkpoint), FLAGS.checkpoint)


def collect_prompts(ckpt, vocab_size: int) -> list[list[int]]:
    import numpy as np
    prompts = []
    for s in FLAGS.prompt_ids or []:
        try:
            prompts.append([int(t) for t in s.split(",") if t.strip()])
        except ValueError:
            raise app.UsageError(f"--prompt_ids must be comma-separated integers, got {s!r}") from None
    if FLAGS.prompt:
        tok_path = os.path.join(ckpt or "", "tokenizer.json")
        if ckpt is None or not os.path.exists(tok_path):
            raise app.UsageError(f"--prompt needs a checkpoint with tokenizer.json ({tok_path} not found)")
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tok_path)
        prompts += [tok.encode(t).ids for t in FLAGS.prompt]
    rng = np.random.default_rng(FLAGS.seed)
    prompts += [rng.integers(3, vocab_size, FLAGS.random_prompt_len).tolist() for _ in range(FLAGS.num_random_prompts)]
    if not prompts:
        raise app.UsageError("no prompts: give --prompt_ids, --prompt or --num_random_prompts")
    return prompts


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    from tarragon_jax.config import CacheConfig, EngineConfig, SamplingParams
    from tarragon_jax.engine import Engine
    from tarragon_jax.errors import RequestError
    if FLAGS.compile_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compile_cache_dir)
    from tarragon_jax.config import ConfigError
    from tarragon_jax.model.hf_loader import CheckpointError
    try:
        cfg, params, ckpt = load_model()
    except (CheckpointError, ConfigError) as e:
        sys.exit(f"error: {e}")
    prompts = collect_prompts(ckpt, cfg.vocab_size)
    engine_cfg = EngineConfig(num_attention_workers=FLAGS.num_attention_workers,
                              num_expert_workers=FLAGS.num_expert_workers, expert_backend=FLAGS.expert_backend,
                              prefill_chunk=FLAGS.prefill_chunk, max_step_tokens=max(256, FLAGS.prefill_chunk),
                              dtype=FLAGS.dtype)
    sp = SamplingParams(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                        seed=FLAGS.seed)

    def run():
        engine = Engine(cfg, params, engine_cfg, CacheConfig(FLAGS.page_size, FLAGS.num_pages))
        t0 = time.perf_counter()
        try:
            outs = engine.generate(prompts, sp)
        except RequestError as e:
            sys.exit(f"error: {e}")
        return outs, time.perf_counter() - t0, engine

    if FLAGS.warmup:
        run()
    outs, secs, engine = run()
    for p, o in zip(prompts, outs):
        print(json.dumps({"prompt_ids": p, "output_ids": o}) if FLAGS.json else f"{p} -> {o}")
    n_out = sum(len(o) for o in outs)
    ttfts = [t.ttft_s for t in engine.metrics.requests.values()]
    print(f"{len(prompts)} prompts, {n_out} tokens in {secs:.3f} s: {n_out / secs:.1f} tokens/s, "
          f"mean TTFT {1e3 * sum(ttfts) / len(ttfts):.1f} ms, {engine.metrics.steps} steps "
          f"({FLAGS.num_attention_workers} AWs x {FLAGS.num_expert_workers} EWs, {engine.ews[0].backend}, "
          f"{jax.devices()[0].platform})", file=sys.stderr)
    engine.close()


if __name__ == "__main__":
    app.run(main)
