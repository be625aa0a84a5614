"""Generate with the disaggregated engine: `python -m launch.generate --model tiny`.

All prompts are served together as one continuous batch. Prints each prompt's output (or one
JSON line per prompt with --json, in the order given) and the throughput on stderr. `--fail`
injects worker failures (e.g. `--fail ew:2@step=10 --fail aw:0@step=20`); outputs stay the same.
"""
from . import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import dataclasses
import json
import os
import sys
import time

from absl import app, flags

from . import serving_flags

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("prompt_ids", None, "Comma-separated token ids; repeat for more prompts.")
flags.DEFINE_multi_string("prompt", None, "Text prompt (needs tokenizer.json in the checkpoint); repeatable.")
flags.DEFINE_integer("num_random_prompts", 0, "Add this many random prompts (for throughput runs).")
flags.DEFINE_integer("random_prompt_len", 16, "Length of each random prompt.")
flags.DEFINE_integer("max_new_tokens", 16, "New tokens per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_float("repetition_penalty", 1.0, "Divide positive logits (multiply negative ones) of tokens already "
                   "in the prompt or output by this (1 = off).")
flags.DEFINE_float("frequency_penalty", 0.0, "Subtract this x each token's count in the output (-2 to 2).")
flags.DEFINE_float("presence_penalty", 0.0, "Subtract this from every token already in the output (-2 to 2).")
flags.DEFINE_bool("stop_at_eos", True, "Stop a prompt at the checkpoint's EOS ids (generation_config.json).")
flags.DEFINE_multi_string("fail", None, "Inject a failure: ew:2@step=40, aw:0@step=80, ew:1@step=12,layer=1, "
                          "aw:1@prefill, ew:3@recovery. Repeatable.")
flags.DEFINE_bool("warmup", False, "Serve the prompts once untimed first (compiles), then time a second run.")
flags.DEFINE_bool("json", False, 'One JSON line per prompt: {"prompt_ids": [...], "output_ids": [...]} (and '
                  '"prompt", "text" where the model has a tokenizer); on stderr, a {"recovery": {...}} line '
                  'per failure, with the failed worker\'s pid and node.')


def collect_prompts(ckpt, tokenizer, vocab_size: int) -> list[list[int]]:
    import numpy as np
    prompts = []
    for s in FLAGS.prompt_ids or []:
        try:
            prompts.append([int(t) for t in s.split(",") if t.strip()])
        except ValueError:
            raise app.UsageError(f"--prompt_ids must be comma-separated integers, got {s!r}") from None
    if FLAGS.prompt:
        if tokenizer is None:
            raise app.UsageError(f"--prompt needs a checkpoint with tokenizer.json "
                                 f"({os.path.join(ckpt or '', 'tokenizer.json')} not found)")
        prompts += [tokenizer.encode(t).ids for t in FLAGS.prompt]
    rng = np.random.default_rng(FLAGS.seed)
    prompts += [rng.integers(3, vocab_size, FLAGS.random_prompt_len).tolist() for _ in range(FLAGS.num_random_prompts)]
    if not prompts:
        raise app.UsageError("no prompts: give --prompt_ids, --prompt or --num_random_prompts")
    return prompts


def main(argv):
    del argv
    results = sys.stdout
    if FLAGS.json:      # stdout carries the JSON lines only (Ray prints a dead worker's error there)
        sys.stdout = sys.stderr
    cfg, params, ckpt, reload, engine_cfg = serving_flags.start()
    from tarragon_jax.config import ConfigError, SamplingParams
    from tarragon_jax.serving.engine import Engine
    from tarragon_jax.errors import RequestError
    from tarragon_jax.control.faults import FaultInjector
    try:
        faults = [FaultInjector.from_strings(FLAGS.fail or []) for _ in range(2)]
    except ValueError as e:
        sys.exit(f"error: {e}")
    tokenizer = serving_flags.tokenizer(ckpt, cfg)
    prompts = collect_prompts(ckpt, tokenizer, cfg.vocab_size)
    try:
        sp = SamplingParams(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                            seed=FLAGS.seed, stop_token_ids=serving_flags.eos_ids(ckpt) if FLAGS.stop_at_eos else (),
                            repetition_penalty=FLAGS.repetition_penalty, frequency_penalty=FLAGS.frequency_penalty,
                            presence_penalty=FLAGS.presence_penalty)
    except ConfigError as e:
        sys.exit(f"error: {e}")

    def run(fault_injector):
        try:
            engine = Engine(cfg, params, engine_cfg, serving_flags.cache_config(), faults=fault_injector,
                            load_params=reload)
            t0 = time.perf_counter()
            outs = engine.generate(prompts, sp)
        except (RequestError, ConfigError) as e:
            sys.exit(f"error: {e}")
        return outs, time.perf_counter() - t0, engine

    if FLAGS.warmup:
        run(faults[1])[2].close()
    outs, secs, engine = run(faults[0])
    print(f"backends: {engine.backends()}", file=sys.stderr)
    for p, o in zip(prompts, outs):
        line = {"prompt_ids": p, "output_ids": o}
        if tokenizer is not None:
            line.update(prompt=tokenizer.decode(p), text=tokenizer.decode(o))
        print(json.dumps(line) if FLAGS.json else f"{line.get('prompt', p)!r} -> {line.get('text', o)!r}", file=results)
    n_out = sum(len(o) for o in outs)
    ttfts = [t.ttft_s for t in engine.metrics.requests.values()]
    print(f"{len(prompts)} prompts, {n_out} tokens in {secs:.3f} s: {n_out / secs:.1f} tokens/s, "
          f"mean TTFT {1e3 * sum(ttfts) / len(ttfts):.1f} ms, {engine.metrics.steps} steps "
          f"({FLAGS.num_attention_workers} AWs x {FLAGS.num_expert_workers} EWs, experts {engine.ews[0].backend}, "
          f"attention {FLAGS.attention_backend}, "
          f"{engine.ews[0].platform}, runtime {FLAGS.runtime})", file=sys.stderr)
    if engine.controller.precompile_s is not None:
        print(serving_flags.startup_line(engine), file=sys.stderr)
    for rec in engine.controller.records:     # with --json a JSON line each (the failed worker's pid and node)
        print(json.dumps({"recovery": dataclasses.asdict(rec)}) if FLAGS.json else f"failure {rec}", file=sys.stderr)
    engine.close()


def run() -> None:
    """The console script (pyproject.toml)."""
    app.run(main)


if __name__ == "__main__":
    run()
