"""Expert load balancing, side by side: `python -m launch.eplb_bench --model demo`.

Two engines on the same checkpoint and workload, one with --eplb (every replica serves, shares
and placement rebalanced each --eplb_window_s from the measured load) and one with --noeplb
(shadows idle until a failure). The workload is the model's own text: windows of
--prompt_len tokens cut from the Python help texts (pydoc_data.topics) the demo model learnt,
greedy-decoded --output_len tokens, B windows at once. Untimed warm-up passes first, with the
eplb engine rebalancing every --warmup_window_s so that it converges in a short run; the timed
passes run at --eplb_window_s (default 10 s, as deployed).

Reports, per batch size: output tokens/s of each engine (median of --repeats, passes
alternated), the median ratio of their process CPU time over the same passes (the work done,
less sensitive to a shared machine's noise than wall time), the EW load max/mean (rows per EW over the measured passes, read from the EWs'
device counters: over all layers and in the worst layer), and whether the tokens are identical.
Then an EW is killed on both engines mid-pass: tokens must still match, and the eplb engine's
load is measured again once the next rebalance has run. Prints a table and writes JSON.
"""
from . import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import contextlib
import json
import statistics
import sys
import time

from absl import app, flags

from . import serving_flags
from .throughput_bench import ew_rows, measure

FLAGS = flags.FLAGS
flags.DEFINE_integer("warmup_passes", 3, "Untimed passes first (compiles; the eplb engine's first rebalances).")
flags.DEFINE_string("kill", "ew1", "The EW killed in the failure phase (empty: no failure phase).")
flags.DEFINE_float("warmup_window_s", 0.5, "The eplb window during the warm-up and the failure phase (the timed "
                   "passes run at --eplb_window_s, as deployed).")
# --batch_sizes, --prompt_len (a window of help text), --output_len (greedy), --repeats and
# --json_out are throughput_bench's; the defaults here:
for _name, _value in (("batch_sizes", ["1", "16"]), ("prompt_len", 64), ("output_len", 32)):
    FLAGS.set_default(_name, _value)


def help_text_windows(tokenizer, length: int) -> list[list[int]]:
    """Consecutive windows of `length` tokens over the help texts, every topic in a fixed order."""
    from pydoc_data import topics
    ids = [t for k in sorted(topics.topics) for t in tokenizer.encode(topics.topics[k]).ids]
    return [ids[i:i + length] for i in range(0, len(ids) - length, length)]


class Workload:
    """Hands out the next B windows; both engines get the same ones."""

    def __init__(self, windows: list[list[int]]):
        self.windows, self.at = windows, 0

    def take(self, n: int) -> list[list[int]]:
        out = [self.windows[(self.at + i) % len(self.windows)] for i in range(n)]
        self.at += n
        return out


def passes(engines: dict, prompts: list[list[int]], sampling) -> tuple[dict, bool]:
    """One pass of the same prompts on every engine: (results by name, whether all agree)."""
    runs, outputs = {}, {}
    for name, engine in engines.items():
        first, cpu = max(engine.requests, default=-1) + 1, time.process_time()
        runs[name] = measure(engine, prompts, sampling)
        runs[name]["cpu_s"] = time.process_time() - cpu       # every thread of this process: the work, less the noise
        outputs[name] = [list(engine.requests[i].output) for i in range(first, first + len(prompts))]
    return runs, len({json.dumps(o) for o in outputs.values()}) == 1


@contextlib.contextmanager
def window(engine, seconds: float):
    """The eplb engine rebalances every `seconds` inside (short windows converge in a short run)."""
    reb = engine.controller.rebalancer
    old, reb.window_s = reb.window_s, seconds
    try:
        yield
    finally:
        reb.window_s = old


def timed(engines: dict, work: Workload, sampling, batch: int) -> tuple[dict, bool, dict]:
    """--repeats passes, engines alternated: (runs by engine, whether every pass agreed, the EW
    load over the passes by engine)."""
    from tarragon_jax.control import expert_load
    readers = {name: expert_load.SlotRowReader() for name in engines}
    for name, engine in engines.items():
        ew_rows(engine, readers[name])
    runs, identical = {name: [] for name in engines}, True
    for rep in range(FLAGS.repeats):
        order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
        r, same = passes({name: engines[name] for name in order}, work.take(batch), sampling)
        identical &= same
        for name in engines:
            runs[name].append(r[name])
    return runs, identical, {name: expert_load.summary(ew_rows(e, readers[name])) for name, e in engines.items()}


def main(argv):
    del argv
    cfg, params, ckpt, reload, _ = serving_flags.start()
    from tarragon_jax.config import SamplingParams
    from tarragon_jax.heap import freeze_startup_heap
    from tarragon_jax.serving.engine import Engine
    tok = serving_flags.tokenizer(ckpt, cfg)
    if tok is None:
        sys.exit("error: eplb_bench needs a checkpoint with a tokenizer (--model demo)")
    work = Workload(help_text_windows(tok, FLAGS.prompt_len))
    sampling = SamplingParams(max_new_tokens=FLAGS.output_len)
    engines = {name: Engine(cfg, params, serving_flags.engine_config(eplb=on), serving_flags.cache_config(),
                            load_params=reload) for name, on in (("eplb", True), ("noeplb", False))}
    freeze_startup_heap()                        # as launch/serve.py does once warm
    rows, identical = [], True
    try:
        for batch in map(int, FLAGS.batch_sizes):
            with window(engines["eplb"], FLAGS.warmup_window_s):
                for _ in range(FLAGS.warmup_passes):
                    identical &= passes(engines, work.take(batch), sampling)[1]
                    engines["eplb"].controller.wait_recoveries()      # the rebalance under way lands
            runs, same, load = timed(engines, work, sampling, batch)
            identical &= same
            rows.append({"batch": batch, **{f"{n}_tok_s": statistics.median(r["tok_s"] for r in runs[n]) for n in runs},
                         "cpu_ratio": statistics.median(a["cpu_s"] / b["cpu_s"] for a, b in zip(runs["eplb"], runs["noeplb"])),
                         "load": load, "runs": runs})
        if FLAGS.kill:
            with window(engines["eplb"], FLAGS.warmup_window_s):
                failure = failure_phase(engines, work, sampling, max(map(int, FLAGS.batch_sizes)))
        else:
            failure = None
    finally:
        for engine in engines.values():
            engine.close()
    report(cfg, rows, failure, identical, engines["eplb"])


def failure_phase(engines: dict, work: Workload, sampling, batch: int) -> dict:
    """Kill --kill on both engines at the same step of the same pass; then, on the eplb engine,
    the load once the next rebalance has run."""
    prompts = work.take(batch)
    outputs = {}
    for name, engine in engines.items():
        ids = [engine.submit(p, sampling) for p in prompts]
        for n, _ in enumerate(engine.stream()):
            if n == batch * 4:
                engine.controller.kill(FLAGS.kill)
        outputs[name] = [list(engine.requests[i].output) for i in ids]
        engine.controller.wait_recoveries()
    eplb = engines["eplb"]
    reb = eplb.controller.rebalancer
    before = reb.rebalances
    while reb.rebalances == before:                    # a window passes, its plan lands
        passes({"eplb": eplb}, work.take(batch), sampling)
        eplb.controller.wait_recoveries()
    _, same, load = timed(engines, work, sampling, batch)
    return {"killed": FLAGS.kill, "identical": outputs["eplb"] == outputs["noeplb"] and same,
            "load_after_rebalance": load["eplb"], "load_after_noeplb": load["noeplb"],
            "records": len(eplb.controller.records)}


def report(cfg, rows, failure, identical, engine) -> None:
    reb = engine.controller.rebalancer
    print(f"{cfg.family}, {FLAGS.num_attention_workers} AWs x {FLAGS.num_expert_workers} EWs, shadow budget "
          f"{FLAGS.shadow_budget}, help-text windows of {FLAGS.prompt_len} tokens, {FLAGS.output_len} new, median of "
          f"{FLAGS.repeats}, eplb window {FLAGS.eplb_window_s} s (warm-up {FLAGS.warmup_window_s} s)")
    print(f"{'batch':>5} {'eplb tok/s':>11} {'noeplb tok/s':>13} {'ratio':>6} {'CPU s ratio':>12} {'load eplb':>10} "
          f"{'worst layer':>12} {'load noeplb':>12} {'worst layer':>12}")
    for r in rows:
        a, b = r["load"]["eplb"], r["load"]["noeplb"]
        print(f"{r['batch']:5d} {r['eplb_tok_s']:11.1f} {r['noeplb_tok_s']:13.1f} {r['eplb_tok_s'] / r['noeplb_tok_s']:6.3f} "
              f"{r['cpu_ratio']:12.3f} "
              f"{a['ew_load']:10.3f} {a['ew_load_worst_layer']:12.3f} {b['ew_load']:12.3f} {b['ew_load_worst_layer']:12.3f}")
    print(f"greedy tokens identical with --eplb and --noeplb: {identical}")
    print(f"rebalances {reb.rebalances}, slots moved {reb.moves}")
    if failure:
        f = failure["load_after_rebalance"]
        print(f"after killing {failure['killed']} and the next rebalance: load max/mean {f['ew_load']:.3f} "
              f"(worst layer {f['ew_load_worst_layer']:.3f}); tokens identical through the kill: {failure['identical']}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump({"config": {k: FLAGS[k].value for k in ("model", "checkpoint", "num_attention_workers",
                                                               "num_expert_workers", "shadow_budget", "prompt_len",
                                                               "output_len", "repeats", "eplb_window_s", "warmup_window_s",
                                                               "runtime")},
                       "rows": rows, "identical": identical, "failure": failure,
                       "rebalances": reb.rebalances, "moves": reb.moves,
                       "windows": [w.__dict__ for w in reb.windows[-4:]]}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
