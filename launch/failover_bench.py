"""Failover benchmark: `python -m launch.failover_bench --model tiny`.

A Poisson workload runs under the scenarios no_failure / ew_failure / aw_failure, each with
recovery=tarragon and recovery=restart, in one process on the same warm programs. For each run it
reports the stall (longest inter-token gap of an in-flight request across the failure minus the
pre-failure median gap), the zero-throughput window, tokens recomputed, throughput, lost requests,
whether every token equals the failure-free run, and the recovery breakdown: detection, reroute
(new ERT / request moves), restore (snapshot reads into pages), recompute (wall time of the steps
that carried recompute chunks), replacement worker ready and its recompile share, restart. It also measures the no-failure overhead of
resilience (saturated throughput off / on, interleaved repeats) and, for one request at several
decoded lengths, restoring it on another AW vs replaying it from scratch.
"""
from launch import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import json
import statistics
import sys
import time

from absl import app, flags

from launch import serving_flags

FLAGS = flags.FLAGS
flags.DEFINE_float("rate", 16.0, "Poisson arrival rate, requests/s.")
flags.DEFINE_float("duration_s", 3.0, "Arrival window, seconds.")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per request.")
flags.DEFINE_integer("output_len", 48, "New tokens per request.")
flags.DEFINE_float("fail_at_s", 1.5, "When the failure is injected, seconds after the first arrival.")
flags.DEFINE_integer("fail_ew", 1, "Expert worker killed in ew_failure.")
flags.DEFINE_integer("fail_aw", 0, "Attention worker killed in aw_failure.")
flags.DEFINE_list("scenarios", ["no_failure", "ew_failure", "aw_failure"], "Scenarios to run.")
flags.DEFINE_list("recoveries", ["tarragon", "restart"], "Recoveries to compare.")
flags.DEFINE_list("restore_lengths", ["64", "128", "256", "512"], "Decoded lengths for restore vs replay.")
flags.DEFINE_integer("overhead_requests", 96, "Requests of the saturated no-failure overhead runs.")
flags.DEFINE_integer("overhead_repeats", 6, "Interleaved off/on repeats for the overhead ratio.")
flags.DEFINE_float("bucket_s", 0.1, "Timeline bucket for the plot.")
flags.DEFINE_integer("warmup_rounds", 2, "Untimed rounds of every scenario (other seeds) before measuring.")
flags.DEFINE_integer("repeats", 1, "Run every scenario this many times; the table shows medians.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
flags.DEFINE_string("plot_out", None, "Draw tokens/s over time per scenario (PNG) here.")


def _engine(cfg, params, reload, **overrides):
    from tarragon_jax.serving.engine import Engine
    return Engine(cfg, params, serving_flags.engine_config(**overrides), serving_flags.cache_config(),
                  load_params=reload)


def _workload(vocab: int, seed: int | None = None):
    import numpy as np
    rng = np.random.default_rng(FLAGS.seed if seed is None else seed)
    n = max(1, rng.poisson(FLAGS.rate * FLAGS.duration_s))
    arrivals = np.sort(rng.uniform(0, FLAGS.duration_s, n))
    return arrivals, [rng.integers(3, vocab, FLAGS.prompt_len).tolist() for _ in range(n)]


def run_scenario(cfg, params, reload, scenario: str, recovery: str, workload, **overrides) -> dict:
    """Serve the workload in real time, inject the scenario's failure, and measure."""
    from tarragon_jax.config import SamplingParams
    from tarragon_jax.metrics import stall_around, throughput_timeline, zero_throughput_window
    arrivals, prompts = workload
    eng = _engine(cfg, params, reload, recovery=recovery, **overrides)
    sp = SamplingParams(max_new_tokens=FLAGS.output_len)
    clock, ids, t_fail = eng.metrics.clock, [], None
    target = {"ew_failure": f"ew{FLAGS.fail_ew}", "aw_failure": f"aw{FLAGS.fail_aw}"}.get(scenario)
    t0 = clock()
    while len(ids) < len(prompts) or eng.has_work:
        now = clock() - t0
        while len(ids) < len(prompts) and arrivals[len(ids)] <= now:
            ids.append(eng.submit(prompts[len(ids)], sp))
        if target and t_fail is None and now >= FLAGS.fail_at_s:
            eng.controller.kill(target)
            t_fail = clock()
        if eng.has_work:
            eng.step()
        else:
            time.sleep(min(0.005, max(0.0, arrivals[len(ids)] - now)) if len(ids) < len(prompts) else 0.001)
    eng.controller.wait_recoveries()
    times = [eng.metrics.requests[i] for i in ids]
    outputs = [list(eng.requests[i].output) for i in ids]
    span = max(t for r in times for t in r.token_s) - t0
    recs = eng.controller.records
    res = {"name": scenario, "recovery": recovery, "outputs": outputs,
           "stall_s": stall_around(times, t_fail) if t_fail else 0.0,
           "zero_throughput_s": zero_throughput_window(times, t_fail) if t_fail else 0.0,
           "tokens_recomputed": sum(a.restored.tokens_recomputed for a in eng.aws) + sum(r.tokens_recomputed for r in recs),
           "rows_replayed": eng.replayed_rows,
           "throughput_tok_s": sum(len(o) for o in outputs) / span,
           "lost_requests": sum(len(o) != FLAGS.output_len for o in outputs),
           "timeline": throughput_timeline(times, t0, FLAGS.bucket_s),
           "fail_at_s": (t_fail - t0) if t_fail else None,
           "breakdown": {"detect_s": recs[0].detect_s if recs else None,
                         "reroute_s": recs[0].reroute_s if recs else None,
                         "restore_s": sum(a.restored.seconds for a in eng.aws),
                         "recompute_steps_s": eng.recompute_s,
                         "replacement_ready_s": recs[0].replacement_ready_s if recs else None,
                         "recompile_s": recs[0].recompile_s if recs else None,
                         "restart_s": recs[0].restart_s if recs else None}}
    eng.close()
    return res


def median_run(same: list[dict]) -> dict:
    """One row from repeats of a scenario: medians of the timings, the worst of the invariants;
    the timeline and breakdown of the first repeat (for the plot), every repeat kept in `repeats`."""
    row = dict(same[0])
    for key in ("stall_s", "zero_throughput_s", "tokens_recomputed", "rows_replayed", "throughput_tok_s"):
        row[key] = statistics.median(r[key] for r in same)
    row["lost_requests"] = max(r["lost_requests"] for r in same)
    row["tokens_identical"] = all(r["tokens_identical"] for r in same)
    row["repeats"] = [{k: r[k] for k in ("stall_s", "zero_throughput_s", "throughput_tok_s")} for r in same]
    return row


def overhead(cfg, params, reload) -> dict:
    """Saturated throughput (all requests at t=0) with resilience off and on, interleaved."""
    import numpy as np
    from tarragon_jax.config import SamplingParams
    rng = np.random.default_rng(FLAGS.seed + 1)
    prompts = [rng.integers(3, cfg.vocab_size, FLAGS.prompt_len).tolist() for _ in range(FLAGS.overhead_requests)]
    tput = {False: [], True: []}
    for rep in range(FLAGS.overhead_repeats):
        for on in ((False, True) if rep % 2 == 0 else (True, False)):     # ABBA: cancels drift
            eng = _engine(cfg, params, reload, resilience=on)
            # untimed pass on the same engine first: every program compiled or loaded (with
            # --runtime ray each engine's EWs are fresh processes), so only steady state is timed;
            # its snapshot writes and deletions finish before the clock starts
            eng.generate(prompts, SamplingParams(max_new_tokens=FLAGS.output_len))
            if eng.controller.store is not None:
                eng.controller.store.wait()
            t0 = time.perf_counter()
            outs = eng.generate(prompts, SamplingParams(max_new_tokens=FLAGS.output_len))
            tput[on].append(sum(map(len, outs)) / (time.perf_counter() - t0))
            eng.close()
    ratios = [off / on for off, on in zip(tput[False], tput[True])]
    return {"off_tok_s": tput[False], "on_tok_s": tput[True], "ratio": statistics.median(ratios)}


def restore_vs_replay(cfg, params, reload) -> list[dict]:
    """One request decoded to length L: restored on another AW after its AW dies, vs generated
    again from scratch (what a restart must do). Second of two passes (the first compiles)."""
    import numpy as np
    from tarragon_jax.config import SamplingParams
    prompt = np.random.default_rng(FLAGS.seed + 2).integers(3, cfg.vocab_size, FLAGS.prompt_len).tolist()
    out = []
    for L in map(int, FLAGS.restore_lengths):
        if FLAGS.prompt_len + L + 2 > cfg.max_position:
            continue
        sp = SamplingParams(max_new_tokens=L + 2)
        for _ in range(2):
            eng = _engine(cfg, params, reload)
            rid = eng.submit(prompt, sp)
            while len(eng.requests[rid].output) < L:
                eng.step()
            eng.controller.store.wait()
            victim = next(a for a in eng.aws if a.scheduler.running)
            eng.controller.kill(victim.handle.name)
            t0 = time.perf_counter()
            while len(eng.requests[rid].output) < L + 1:
                eng.step()
            restore = time.perf_counter() - t0
            moved_to = next(a for a in eng.aws if a.restored.requests)
            eng.close()
            eng = _engine(cfg, params, reload)
            t0 = time.perf_counter()
            rid = eng.submit(prompt, sp)
            while len(eng.requests[rid].output) < L + 1:
                eng.step()
            replay = time.perf_counter() - t0
            eng.close()
        out.append({"decoded": L, "restore_s": restore, "replay_s": replay, "ratio": replay / restore,
                    "blocks_restored": moved_to.restored.blocks, "tokens_recomputed": moved_to.restored.tokens_recomputed})
    return out


RATIO_FLOOR_S = 1e-3    # a tarragon stall at or below timer/step noise counts as 1 ms in ratios


def _ratio(results, key, name):
    """restart / tarragon for one failure kind; the tarragon value is floored at 1 ms (a stall of
    zero or less means the failure step was no slower than a normal step)."""
    by = {r["recovery"]: r[key] for r in results if r["name"] == name}
    if not {"restart", "tarragon"} <= set(by):
        return None
    return by["restart"] / max(by["tarragon"], RATIO_FLOOR_S)


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 1, figsize=(8, 1.8 * len(results)), sharex=True)
    for ax, r in zip(list(axes) if len(results) > 1 else [axes], results):
        xs = [FLAGS.bucket_s * i for i in range(len(r["timeline"]))]
        ax.plot(xs, r["timeline"], lw=1)
        if r["fail_at_s"] is not None:
            ax.axvline(r["fail_at_s"], color="red", ls="--", lw=1)
        ax.set_ylabel("tok/s")
        ax.set_title(f"{r['name']} / {r['recovery']}", fontsize=9)
    axes[-1].set_xlabel("seconds since first arrival") if len(results) > 1 else None
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    cfg, params, _, reload, _ = serving_flags.start()
    workload = _workload(cfg.vocab_size)
    # Warm-up, as a server that has run a while: every scenario on other workloads, so the batch
    # shapes a failure produces are mostly compiled (a first-seen shape compiles in the step).
    for r in range(FLAGS.warmup_rounds):
        for scenario in FLAGS.scenarios:
            run_scenario(cfg, params, reload, scenario, "tarragon", _workload(cfg.vocab_size, seed=FLAGS.seed + 100 + r))
    # Every repeat of one recovery before the next: a restart clears the in-memory compiled
    # programs, which must not leak into the other recovery's measurements.
    runs = [[run_scenario(cfg, params, reload, s, r, workload) for _ in range(FLAGS.repeats)]
            for r in FLAGS.recoveries for s in FLAGS.scenarios]
    clean = next((same[0]["outputs"] for same in runs if same[0]["name"] == "no_failure"), None)
    for r in (r for same in runs for r in same):
        r["tokens_identical"] = clean is None or r.pop("outputs") == clean
    results = [median_run(same) for same in runs]
    over = overhead(cfg, params, reload)
    rvr = restore_vs_replay(cfg, params, reload)

    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    cols = ["stall_s", "zero_throughput_s", "tokens_recomputed", "rows_replayed", "throughput_tok_s",
            "lost_requests", "tokens_identical"]
    bcols = ["detect_s", "reroute_s", "restore_s", "recompute_steps_s", "replacement_ready_s", "recompile_s",
             "restart_s"]
    print(f"{len(workload[1])} requests, Poisson {FLAGS.rate}/s over {FLAGS.duration_s}s, prompt {FLAGS.prompt_len}, "
          f"output {FLAGS.output_len}; {FLAGS.num_attention_workers} AWs x {FLAGS.num_expert_workers} EWs; "
          f"failure at {FLAGS.fail_at_s}s; median of {FLAGS.repeats} run(s) per row")
    print(" | ".join(["scenario", "recovery"] + cols + bcols))
    for r in results:
        print(" | ".join([r["name"], r["recovery"]] + [fmt(r[c]) for c in cols] + [fmt(r["breakdown"][c]) for c in bcols]))
    ratios = {f"{name}_{key}": _ratio(results, key, name) for name in ("ew_failure", "aw_failure")
              for key in ("stall_s", "zero_throughput_s")}
    print("restart/tarragon (tarragon floored at 1 ms): " + ", ".join(f"{k} {fmt(v)}" for k, v in ratios.items()))
    print(f"no-failure overhead (throughput resilience off/on, median of {FLAGS.overhead_repeats}): {over['ratio']:.4f}")
    print("restore vs replay: " + "; ".join(f"L={x['decoded']}: restore {x['restore_s'] * 1e3:.1f} ms, replay "
                                           f"{x['replay_s'] * 1e3:.1f} ms (x{x['ratio']:.1f})" for x in rvr))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"scenarios": results, "ratios": ratios, "no_failure_overhead": over["ratio"],
                       "overhead_runs": over, "restore_vs_replay": rvr,
                       "config": {k: FLAGS[k].value for k in ("rate", "duration_s", "prompt_len", "output_len",
                                                             "fail_at_s", "num_attention_workers", "repeats",
                                                             "num_expert_workers", "model", "checkpoint")}},
                      f, indent=1)
    if FLAGS.plot_out:
        plot(results, FLAGS.plot_out)
    if any(not r["tokens_identical"] or r["lost_requests"] for r in results):
        sys.exit("invariant violated: a request lost or changed tokens")


if __name__ == "__main__":
    app.run(main)
