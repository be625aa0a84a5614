"""Host cost a layer adds to a decode step: `python -m launch.layer_cost_bench`.

On a model whose device work is negligible (the tiny dims: d_model 64), a batch-1 decode step
costs about what the host spends dispatching it, so the slope of the median step time over the
number of layers is the host cost of one layer (one AW program, the batched transfers to and from
the EWs, one program per EW). Measured for resilience on and off, same run; prints a table and
writes JSON. The target (issue 9) is at most 0.5 ms a layer on a 2-core CPU.
"""
from . import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import json
import statistics
import time

from absl import app, flags

from . import serving_flags     # layout, backends, dtype, compile cache (--model/--checkpoint unused)

FLAGS = flags.FLAGS
flags.DEFINE_list("layers", ["2", "8", "16"], "Layer counts to measure.")
flags.DEFINE_integer("steps", 200, "Timed decode steps per configuration.")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
FLAGS.set_default("tiny_family", "qwen3_moe")


def step_time(n_layers: int, resilience: bool) -> float:
    """Median wall time of a batch-1 decode step (seconds), after an untimed warm-up request."""
    from tarragon_jax.config import SamplingParams
    from tarragon_jax.serving.engine import Engine
    from tarragon_jax.model.tiny import tiny_model
    cfg, params = tiny_model(FLAGS.tiny_family, seed=1, n_layers=n_layers, max_position=FLAGS.steps + 64)
    eng = Engine(cfg, params, serving_flags.engine_config(resilience=resilience), serving_flags.cache_config())
    try:
        eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=FLAGS.steps))      # compiles every shape
        eng.submit([5, 6, 7], SamplingParams(max_new_tokens=FLAGS.steps))
        eng.step()                                                                   # prefill
        times = []
        while eng.has_work:
            t0 = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t0)
    finally:
        eng.close()
    return statistics.median(times)


def main(argv):
    del argv
    serving_flags.setup_jax()
    layers = sorted(map(int, FLAGS.layers))
    rows = {}
    for resilience in (True, False):
        times = {n: step_time(n, resilience) for n in layers}
        slope = (times[layers[-1]] - times[layers[0]]) / (layers[-1] - layers[0])
        rows["on" if resilience else "off"] = {"step_s": times, "per_layer_s": slope}
    print(f"tiny {FLAGS.tiny_family} (d_model 64), batch 1, {FLAGS.num_attention_workers} AWs x "
          f"{FLAGS.num_expert_workers} EWs, median of {FLAGS.steps} decode steps")
    print(f"{'resilience':>10} " + " ".join(f"{f'{n} layers ms':>13}" for n in layers) + f" {'ms / layer':>11}")
    for mode, r in rows.items():
        print(f"{mode:>10} " + " ".join(f"{1e3 * r['step_s'][n]:13.2f}" for n in layers)
              + f" {1e3 * r['per_layer_s']:11.3f}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump({"config": {"family": FLAGS.tiny_family, "steps": FLAGS.steps,
                                  "num_attention_workers": FLAGS.num_attention_workers,
                                  "num_expert_workers": FLAGS.num_expert_workers},
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
