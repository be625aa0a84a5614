"""Average a comparison over several runs of launch/throughput_bench (fresh processes, either
build order): `python -m launch.compare_runs --over no_prefix_caching results/prefix_overhead_demo/*seed_*.json`.

One run's paired ratio moves by several percent on a shared host, and the engine built first
tends to run slower (`--reverse_variants` flips the order), so the figure to quote is the mean
of the two orders' means. Each run's ratio is the `--over` variant's throughput over the
other's (inverted where the run was built the other way round).
"""
from __future__ import annotations

import json
import statistics
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("over", None, "The variant in the numerator (e.g. no_prefix_caching, or ray).", required=True)
flags.DEFINE_string("json_out", None, "Write the per-run ratios and their means as JSON here.")


def ratios(run: dict, over: str) -> dict[int, tuple[float, float]]:
    """batch -> (throughput ratio, tokens-per-CPU-second ratio) of `over` against the other variant."""
    variants = list(run["by_runtime"])
    if over not in variants or len(variants) != 2:
        raise ValueError(f"a run of {variants}: --over must name one of two variants")
    second = run["by_runtime"][variants[1]]                 # its rows hold ratios over the first's
    sign = 1 if variants[1] == over else -1
    return {r["batch"]: (r["ratio"] ** sign, r["cpu_ratio"] ** sign) for r in second}


def main(argv):
    paths = argv[1:]
    if not paths:
        sys.exit("error: name the JSON files of throughput_bench runs")
    try:
        runs = {p: json.load(open(p)) for p in paths}
        per_run = {p: ratios(r, FLAGS.over) for p, r in runs.items()}
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    batches = sorted({b for r in per_run.values() for b in r})
    order = {p: list(r["by_runtime"])[0] for p, r in runs.items()}     # the variant built first
    print(f"{FLAGS.over} over the other variant, per run (throughput; tokens per CPU second)")
    for p, r in per_run.items():
        print(f"{p:60} built first: {order[p]:20} " + "  ".join(f"B={b} {r[b][0]:.3f} ({r[b][1]:.3f})" for b in batches if b in r))
    summary = {}
    for b in batches:
        t = [r[b][0] for r in per_run.values() if b in r]
        c = [r[b][1] for r in per_run.values() if b in r]
        sd = statistics.stdev(t) if len(t) > 1 else float("nan")
        by_order = {o: statistics.mean(r[b][0] for p, r in per_run.items() if b in r and order[p] == o)
                    for o in sorted(set(order.values()))}
        summary[b] = {"runs": len(t), "mean": statistics.mean(t), "sd": sd, "cpu_mean": statistics.mean(c),
                      "mean_by_first_built": by_order, "balanced_mean": statistics.mean(by_order.values())}
        print(f"B={b}: mean of {len(t)} runs {summary[b]['mean']:.3f} (sd {sd:.3f}; its standard error "
              f"{sd / len(t) ** 0.5:.3f}), per CPU second {summary[b]['cpu_mean']:.3f}; by the variant built first: "
              + ", ".join(f"{o} {m:.3f}" for o, m in by_order.items())
              + (f"; both orders weighed alike {summary[b]['balanced_mean']:.3f}" if len(by_order) > 1 else ""))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump({"over": FLAGS.over, "per_run": {p: {str(b): v for b, v in r.items()} for p, r in per_run.items()},
                       "summary": {str(b): v for b, v in summary.items()}}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
