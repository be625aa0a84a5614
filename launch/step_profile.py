"""Decode speed and step efficiency at each batch size: how much of a decode step's wall time the
devices spend computing.

  python -m launch.step_profile --checkpoint launch/configs/qwen3_30b_a3b --load_format dummy \
      --dtype bfloat16 --batch_sizes 1,16,64,256 --json_out step.json

For each batch size, serves that many requests into steady decode, times --steps decode steps
(wall; decode tok/s = batch / step), then replays every stage program one decode step dispatched,
each alone with its recorded arguments (donated KV pages are copied first, outside the timing),
and sums their device times. Efficiency = that sum / the step's wall time: 1.0 means the host
never keeps the devices waiting (where workers share one device, as on a single GPU, programs run
one after another, so the sum is the device's busy time; transfers are not in it). Also the
fraction of --hbm_tb_s the step reaches on the weights a token touches (attention, LM head and
its top-k experts per layer): the batch-1 memory roofline. Prints a table and writes JSON.
"""
from . import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import collections
import json
import statistics
import time

from absl import app, flags

from . import serving_flags

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["1", "16", "64"], "Concurrent requests per measurement.")
flags.DEFINE_float("hbm_tb_s", 4.8, "Memory bandwidth for the roofline column (H200: 4.8 TB/s).")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per request.")
flags.DEFINE_integer("steps", 20, "Timed decode steps.")
flags.DEFINE_integer("program_repeats", 5, "Timed runs of each recorded program (median).")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")


DONATED = {"attention_layer": (2, 3), "write_blocks": (0,)}   # argnums a program consumes (KV pages)


def _copy_donated(fn, args) -> tuple:
    import jax
    return tuple(jax.tree.map(lambda a: a.copy(), a) if i in DONATED.get(fn.__name__, ()) and a is not None else a
                 for i, a in enumerate(args))


def _record_one_step(engine) -> list:
    """(fn, args, static) of every stage program one step dispatches (donated arguments copied
    before the call consumes them)."""
    from tarragon_jax.workers.program_log import ProgramLog
    calls, call = [], ProgramLog.call

    def recording(self, fn, *args, **static):
        calls.append((fn, _copy_donated(fn, args), static))
        return call(self, fn, *args, **static)
    ProgramLog.call = recording
    try:
        engine.step()
    finally:
        ProgramLog.call = call
    return calls


def _device_time(fn, args, static) -> float:
    """Median seconds of one program alone; arguments it donates are fresh copies each run."""
    import jax
    times = []
    for _ in range(FLAGS.program_repeats + 1):
        run = _copy_donated(fn, args)
        jax.block_until_ready(run)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*run, **static))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def active_weight_bytes(cfg, sizes: dict, itemsize: int) -> int:
    """Bytes of weights one decoded token reads: every attention-side weight but the embedding
    table (one row), and top_k of each MoE layer's experts (sizes: weights.sizes(cfg))."""
    import jax
    attn = sum(jax.tree.leaves(sizes["attn"])) - sizes["attn"]["embed"] + cfg.d_model
    experts = sum(n for layer in sizes["experts"] for n in layer.values()) * cfg.top_k // cfg.n_experts
    return (attn + experts) * itemsize


def measure_batch(engine, cfg, batch: int) -> dict:
    import numpy as np
    from tarragon_jax.config import SamplingParams
    rng = np.random.default_rng(batch)
    ids = [engine.submit(rng.integers(3, cfg.vocab_size, FLAGS.prompt_len).tolist(),
                         SamplingParams(max_new_tokens=FLAGS.steps + 16)) for _ in range(batch)]
    while any(engine.requests[i].num_pending > 1 or engine.requests[i].num_cached == 0 for i in ids):
        engine.step()                                   # prefill done: every request decodes
    engine.step()                                       # compiles the decode shapes
    walls = []
    for _ in range(FLAGS.steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    calls = _record_one_step(engine)
    by_fn = collections.defaultdict(float)
    for fn, args, static in calls:
        by_fn[fn.__name__] += _device_time(fn, args, static)
    for i in ids:
        engine.cancel(i)
        engine.forget(i)
    wall, device = statistics.median(walls), sum(by_fn.values())
    return {"batch": batch, "step_wall_s": wall, "decode_tok_s": batch / wall, "device_s": device,
            "efficiency": device / wall, "program_calls": len(calls), "programs": dict(by_fn)}


def main(argv):
    del argv
    import jax.numpy as jnp
    from tarragon_jax.model.weights import sizes
    from tarragon_jax.serving.engine import Engine
    cfg, params, _, _, engine_cfg = serving_flags.start()
    engine = Engine(cfg, params, engine_cfg, serving_flags.cache_config())
    try:
        rows = [measure_batch(engine, cfg, b) for b in map(int, FLAGS.batch_sizes)]
    finally:
        engine.close()
    weights = active_weight_bytes(cfg, sizes(cfg), jnp.dtype(FLAGS.dtype).itemsize)
    for r in rows:
        r["roofline_fraction"] = weights / r["step_wall_s"] / (FLAGS.hbm_tb_s * 1e12)
    print(f"{cfg.family} d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_experts} experts top-{cfg.top_k}, "
          f"{FLAGS.dtype}, {FLAGS.num_attention_workers} AWs x {FLAGS.num_expert_workers} EWs, experts "
          f"{FLAGS.expert_backend}, attention {FLAGS.attention_backend}; a token's weights {weights / 1e9:.2f} GB")
    print(f"{'batch':>5} {'step ms':>8} {'tok/s':>8} {'device ms':>10} {'efficiency':>10} {'of HBM roofline':>15}  top programs")
    for r in rows:
        top = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in sorted(r["programs"].items(), key=lambda kv: -kv[1])[:3])
        print(f"{r['batch']:5d} {1e3 * r['step_wall_s']:8.2f} {r['decode_tok_s']:8.1f} {1e3 * r['device_s']:10.2f} "
              f"{r['efficiency']:10.3f} {r['roofline_fraction']:15.3f}  {top}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump({"config": {k: FLAGS[k].value for k in ("checkpoint", "load_format", "dtype",
                                                               "num_attention_workers", "num_expert_workers",
                                                               "expert_backend", "attention_backend", "hbm_tb_s")},
                       "active_weight_bytes": weights, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
