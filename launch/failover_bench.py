"""Failover benchmark: `python -m launch.failover_bench --model tiny`.

A Poisson workload is served in real time under every scenario (no_failure; ew_failure and
aw_failure between steps; ew_midstep and aw_midstep between two layers of a step; ew_hang, an EW
that stops answering without dying; aw_failure_disk, whose moved requests restore from the Orbax
files because the store's memory tier is off; double, an EW and an AW in the same step), each
under recovery=tarragon and recovery=restart (teardown, weights reloaded from the files, every
in-flight request re-prefilled in chunked passes batched across requests; `restart_regenerate`,
which regenerates sent tokens one step at a time, only on request).

Every row's tokens are checked against a separate failure-free run of the same workload (with
resilience off). Per row: stall (longest inter-token gap of an in-flight request across the
failure minus the pre-failure median gap), zero-throughput window, tokens recomputed, compiles on
the serving thread inside the recovery window (from the failure until every request in flight at
it has its next token; under --runtime ray also those of the serving worker processes),
throughput, lost requests, and the recovery breakdown. Medians of `--repeats` with every run
kept. Ratios restart/tarragon use no floor: where Tarragon's stall is
within the jitter of the failure-free runs (their p90 "stall" over instants: the resolution), the
values are reported as they are and the ratio as a lower bound. Also: the no-failure overhead of
resilience (ABBA repeats) and, for one request of several decoded lengths, restoring it on
another AW vs re-prefilling it (what a restart does per request).
"""
from . import host_devices  # noqa: F401  (sets XLA_FLAGS before jax is imported)

import json
import statistics
import sys
import time

from absl import app, flags

from . import serving_flags

FLAGS = flags.FLAGS
SCENARIOS = ("no_failure", "ew_failure", "aw_failure", "ew_midstep", "aw_midstep", "ew_hang", "aw_failure_disk",
             "double")
flags.DEFINE_float("rate", 16.0, "Poisson arrival rate, requests/s.")
flags.DEFINE_float("duration_s", 3.0, "Arrival window, seconds.")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per request.")
flags.DEFINE_integer("output_len", 48, "New tokens per request.")
flags.DEFINE_float("fail_at_s", 1.5, "When the failure is injected, seconds after the first arrival.")
flags.DEFINE_integer("fail_ew", 1, "Expert worker that fails.")
flags.DEFINE_integer("fail_aw", 0, "Attention worker that fails.")
flags.DEFINE_list("scenarios", ["no_failure", "ew_failure", "aw_failure"],
                  f"Scenarios to run, or 'all' ({', '.join(SCENARIOS)}).")
flags.DEFINE_list("recoveries", ["tarragon", "restart"], "Recoveries to compare (restart_regenerate too on request).")
flags.DEFINE_float("hang_s", 0.5, "ew_hang: how long the EW stops answering.")
flags.DEFINE_float("hang_deadline_s", 0.1, "ew_hang: the step deadline that finds it.")
flags.DEFINE_float("disk_flush_s", 0.1, "aw_failure_disk: the Orbax write window (blocks commit once written).")
flags.DEFINE_list("restore_lengths", ["128"], "Decoded lengths for restore vs re-prefill (the full table: "
                  "64,128,256,512).")
flags.DEFINE_integer("overhead_requests", 96, "Requests of the saturated no-failure overhead runs.")
flags.DEFINE_integer("overhead_repeats", 0, "Off/on pairs, in ABBA order, for the no-failure overhead of "
                     "resilience (0: not measured; the full table: 16).")
flags.DEFINE_float("overhead_sample_s", 6.0, "Each engine of a pair serves passes over the requests for at least "
                   "this long, then waits for its snapshot writes (it pays for them): this machine's noise falls "
                   "only as the square root of the time measured.")
flags.DEFINE_float("bucket_s", 0.1, "Timeline bucket for the plot.")
flags.DEFINE_integer("warmup_rounds", 0, "Untimed rounds of every scenario (other seeds) before measuring "
                     "(startup compiles every shape already; the full table: 1).")
flags.DEFINE_integer("repeats", 1, "Run every scenario this many times; the table shows medians and ranges "
                     "(the full table: 3).")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
flags.DEFINE_string("plot_out", None, "Draw tokens/s over time per scenario (PNG) here.")

_OVERRIDES = {"ew_hang": lambda: dict(transfer_deadline_s=FLAGS.hang_deadline_s),
              "aw_failure_disk": lambda: dict(snapshot_memory_tier=False, snapshot_flush_s=FLAGS.disk_flush_s)}


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


def _inject(eng, scenario: str) -> None:
    """The scenario's fault, now (between steps) or at layer 1 of the next step (midstep, double)."""
    from tarragon_jax.control.faults import FaultSpec
    ew, aw = f"ew{FLAGS.fail_ew}", f"aw{FLAGS.fail_aw}"
    layer = min(1, eng.model.n_layers - 1)
    if scenario == "ew_failure":
        eng.controller.kill(ew)
    elif scenario in ("aw_failure", "aw_failure_disk"):
        eng.controller.kill(aw)
    elif scenario == "ew_hang":
        eng.controller.hang(ew, FLAGS.hang_s)
    else:
        kinds = {"ew_midstep": ["ew"], "aw_midstep": ["aw"], "double": ["ew", "aw"]}[scenario]
        for kind in kinds:
            eng.faults.add(FaultSpec(kind, FLAGS.fail_ew if kind == "ew" else FLAGS.fail_aw,
                                     step=eng.step_index, layer=layer))


def run_scenario(cfg, params, reload, scenario: str, recovery: str, workload, watch, reference=None,
                 **overrides) -> dict:
    """Serve the workload in real time, inject the scenario's failure, and measure. reference:
    the failure-free run's timeline, for the time until throughput is back."""
    from tarragon_jax.config import SamplingParams
    from tarragon_jax.metrics import (back_to, longest_dip, recovered_at, stall_around, throughput_timeline,
                                      worst_gap_after, zero_throughput_window)
    arrivals, prompts = workload
    eng = _engine(cfg, params, reload, recovery=recovery, **{**_OVERRIDES.get(scenario, dict)(), **overrides})
    startup_s = eng.controller.precompile_s
    sp = SamplingParams(max_new_tokens=FLAGS.output_len)
    clock, ids, injected = eng.metrics.clock, [], False
    t0 = clock()
    offset = time.time() - t0                      # wall clock -> the engine's clock (one host)
    seen = len(watch.events)
    while len(ids) < len(prompts) or eng.has_work:
        now = clock() - t0
        while len(ids) < len(prompts) and arrivals[len(ids)] <= now:
            ids.append(eng.submit(prompts[len(ids)], sp))
        if scenario != "no_failure" and not injected and now >= FLAGS.fail_at_s:
            with watch.warming():           # a hang's busy program compiles here: fault injection, not serving
                _inject(eng, scenario)
            injected = True
        if eng.has_work:
            eng.step()
        else:
            time.sleep(min(0.005, max(0.0, arrivals[len(ids)] - now)) if len(ids) < len(prompts) else 0.001)
    eng.controller.wait_recoveries()
    times = [eng.metrics.requests[i] for i in ids]
    outputs = [list(eng.requests[i].output) for i in ids]
    span = max(t for r in times for t in r.token_s) - t0
    recs = eng.controller.records
    kills = [e.t for e in eng.controller.health.events if e.kind == "killed"]
    # no_failure: the same measures at the same instant, a failure-free run's jitter (the resolution)
    t_fail = min(kills) if kills else t0 + FLAGS.fail_at_s
    t_back = recovered_at(times, t_fail)
    compiles = sorted(watch.events[seen:] + worker_compiles(eng), key=lambda e: e.t)
    compiles = [{"t_s": e.t - offset - t0, "program": e.program, "shapes": e.shapes, "seconds": e.seconds,
                 "worker": e.worker, "thread": e.thread, "serving": e.serving} for e in compiles if e.t - offset >= t0]
    step_s = statistics.median(g for r in times for g in r.gaps_s) if any(r.gaps_s for r in times) else None
    timeline = throughput_timeline(times, t0, FLAGS.bucket_s)
    dip_s, below_s = longest_dip(timeline, FLAGS.bucket_s)
    res = {"name": scenario, "recovery": recovery, "outputs": outputs,
           "stall_s": stall_around(times, t_fail),
           "jitter_s": None if kills else jitter(times, t0, FLAGS.duration_s),
           "zero_throughput_s": zero_throughput_window(times, t_fail),
           # over the whole run (after the failure; from the start without one)
           "worst_gap_s": worst_gap_after(times, t_fail if kills else t0),
           "dip_s": dip_s, "below_s": below_s,
           "back_s": back_to(timeline, reference, t_fail - t0, FLAGS.bucket_s) if kills and reference else None,
           "serving_compiles": sum(c["serving"] for c in compiles),
           "compiles": compiles,
           "compiles_in_recovery": sum(c["serving"] and t_fail <= c["t_s"] + t0 <= t_back for c in compiles),
           "tokens_recomputed": sum(a.restored.tokens_recomputed for a in eng.aws) + sum(r.tokens_recomputed for r in recs),
           "rows_replayed": eng.replayed_rows,
           "blocks_restored": sum(a.restored.blocks for a in eng.aws),
           "restore_fallbacks": sum(a.restored.fallbacks for a in eng.aws),
           "throughput_tok_s": sum(len(o) for o in outputs) / span,
           "lost_requests": sum(len(o) != FLAGS.output_len for o in outputs),
           "timeline": timeline,
           "fail_at_s": (t_fail - t0) if kills else None,
           "startup_s": startup_s,
           "step_s": step_s,
           "deadline_s": eng.config.transfer_deadline_s,
           "failures": [{"worker": r.worker, "detected_by": r.detected_by, "detect_s": r.detect_s} for r in recs],
           "breakdown": {"detect_s": recs[0].detect_s if recs else None,
                         "reroute_s": recs[0].reroute_s if recs else None,
                         "restore_s": sum(a.restored.seconds for a in eng.aws),
                         "recompute_steps_s": eng.recompute_s,
                         "replacement_ready_s": recs[0].replacement_ready_s if recs else None,
                         "recompile_s": recs[0].recompile_s if recs else None,
                         "restart_s": recs[0].restart_s if recs else None}}
    eng.close()
    return res


def worker_compiles(eng) -> list:
    """Under --runtime ray: the compiles each live worker process ran while serving (CompileLog
    events); a dead process's are gone with it, a replacement's replay before it joined is
    warm-up. Empty for the local runtime (this process's own log sees all)."""
    from tarragon_jax.workers.remote_worker import RemoteWorker
    return [e for w in eng.aws + eng.ews if isinstance(w, RemoteWorker) and w.handle.alive for e in w.compiles()]


def jitter(times, t0: float, span_s: float) -> dict:
    """The 'stall' a failure-free run shows at an instant, over every 10 ms of the arrival window
    after its first half second: how large a stall this machine makes by itself (p90, max)."""
    import numpy as np
    from tarragon_jax.metrics import stall_around
    instants = [t0 + 0.5 + 0.01 * i for i in range(max(1, int((span_s - 0.5) / 0.01)))]
    stalls = [stall_around(times, t) for t in instants]
    return {"p90_s": float(np.percentile(stalls, 90)), "max_s": max(stalls)}


PER_RUN = ("stall_s", "worst_gap_s", "dip_s", "below_s", "back_s", "serving_compiles", "zero_throughput_s",
           "compiles_in_recovery", "tokens_recomputed", "blocks_restored", "throughput_tok_s")


def median_run(same: list[dict], clean: list[list[int]] | None) -> dict:
    """One row from repeats of a scenario: medians of the timings, every run's values and their
    range, the worst of the invariants; tokens checked against the failure-free run `clean`."""
    row = {k: v for k, v in same[0].items() if k != "outputs"}
    for key in PER_RUN + ("rows_replayed", "restore_fallbacks"):
        vals = [r[key] for r in same if r[key] is not None]         # back_s: none without a failure
        row[key] = statistics.median(vals) if vals else None
    row["range"] = {k: [min(vs), max(vs)] if (vs := [r[k] for r in same if r[k] is not None]) else None
                    for k in PER_RUN}
    row["runs"] = [{k: r[k] for k in PER_RUN + ("failures", "jitter_s", "compiles", "timeline", "fail_at_s")}
                   for r in same]
    row["worst"] = {k: max(r[k] for r in same) for k in ("worst_gap_s", "dip_s", "below_s", "serving_compiles")}
    row["lost_requests"] = max(r["lost_requests"] for r in same)
    row["tokens_checked"] = clean is not None
    row["tokens_identical"] = all(r["outputs"] == clean for r in same) if clean is not None else None
    return row


def resolution(rows: list[dict]) -> float:
    """The smallest stall this run can tell from none: what a failure-free run shows at one
    instant in ten (step jitter, a GC, a snapshot write; the median over those runs of their p90,
    so one disturbed run does not decide), at least the clock's resolution."""
    floor = time.get_clock_info("perf_counter").resolution
    p90 = [x["jitter_s"]["p90_s"] for r in rows if r["name"] == "no_failure" for x in r["runs"]]
    return max(floor, statistics.median(p90)) if p90 else floor


def ratio(rows: list[dict], key: str, name: str, res: float) -> dict | None:
    """restart / tarragon for one scenario, no floor: below the resolution the ratio is None and
    `at_least` is the bound that resolution gives."""
    by = {r["recovery"]: r[key] for r in rows if r["name"] == name}
    if not {"restart", "tarragon"} <= set(by):
        return None
    out = {"restart": by["restart"], "tarragon": by["tarragon"], "resolution_s": res}
    if by["tarragon"] > res:
        return {**out, "ratio": by["restart"] / by["tarragon"], "below_resolution": False}
    return {**out, "ratio": None, "at_least": by["restart"] / res, "below_resolution": True}


def overhead(cfg, params, reload) -> dict:
    """Saturated throughput (all requests at t=0) with resilience off and on, in ABBA order; each
    sample is passes over the requests on one engine for `overhead_sample_s`, then the wait for
    its snapshots to be written: a sample pays for its own Orbax file writes (one per AW, more
    often than the default 10 s window would). Also per CPU second of this process (all its
    threads). The median's 95% interval comes from the pairs (bootstrap)."""
    import numpy as np
    from tarragon_jax.config import SamplingParams
    rng = np.random.default_rng(FLAGS.seed + 1)
    prompts = [rng.integers(3, cfg.vocab_size, FLAGS.prompt_len).tolist() for _ in range(FLAGS.overhead_requests)]
    tput, cpu = {False: [], True: []}, {False: [], True: []}     # tokens per wall second / per CPU second
    for rep in range(-1, FLAGS.overhead_repeats):          # pair -1: untimed, warms the machine
        for on in ((False, True) if rep % 2 == 0 else (True, False)):
            eng = _engine(cfg, params, reload, resilience=on)
            # untimed pass on the same engine first: every program compiled or loaded (with
            # --runtime ray each engine's EWs are fresh processes), so only steady state is timed;
            # its snapshot writes and deletions finish before the clock starts
            eng.generate(prompts, SamplingParams(max_new_tokens=FLAGS.output_len))
            if eng.controller.store is not None:
                eng.controller.store.wait()
            t0, c0, n = time.perf_counter(), time.process_time(), 0
            while n == 0 or time.perf_counter() - t0 < FLAGS.overhead_sample_s:
                eng.reset_prefix_cache()               # the same prompts every pass: each computes them
                n += sum(map(len, eng.generate(prompts, SamplingParams(max_new_tokens=FLAGS.output_len))))
            if eng.controller.store is not None:
                eng.controller.store.wait()
            if rep >= 0:
                tput[on].append(n / (time.perf_counter() - t0))
                cpu[on].append(n / (time.process_time() - c0))
            eng.close()
    ratios = [off / on for off, on in zip(tput[False], tput[True])]
    cpu_ratios = [off / on for off, on in zip(cpu[False], cpu[True])]
    return {"off_tok_s": tput[False], "on_tok_s": tput[True], "ratios": ratios, "ratio": statistics.median(ratios),
            "ratio_ci95": median_ci95(ratios), "cpu_ratios": cpu_ratios, "cpu_ratio": statistics.median(cpu_ratios)}


def median_ci95(xs: list[float], draws: int = 10000, seed: int = 0) -> list[float]:
    """Bootstrap 95% interval of the median: how far this machine's noise lets the pairs pin it."""
    import numpy as np
    x = np.asarray(xs)
    meds = np.median(np.random.default_rng(seed).choice(x, (draws, len(x))), axis=1)
    return [float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))]


def restore_vs_reprefill(cfg, params, reload) -> list[dict]:
    """One request decoded to length L: its next token after its AW dies (restored on another
    AW, from the store's memory tier, or with the tier off from its Orbax files; under --runtime
    ray the store is its own process), vs on a fresh engine that re-prefills the prompt and the
    L sent tokens in chunked passes (what a restart does for it, teardown and reload not
    counted). Second of two passes each. `read_s`: of the restore, reading the snapshots and
    writing them into pages."""
    import numpy as np
    from tarragon_jax.config import SamplingParams
    prompt = np.random.default_rng(FLAGS.seed + 2).integers(3, cfg.vocab_size, FLAGS.prompt_len).tolist()
    tiers = {"memory": {}, "disk": dict(snapshot_memory_tier=False, snapshot_flush_s=FLAGS.disk_flush_s)}
    out = []
    for L in map(int, FLAGS.restore_lengths):
        if FLAGS.prompt_len + L + 2 > cfg.max_position:
            continue
        row = {"decoded": L}
        for tier, overrides in tiers.items():
            for _ in range(2):
                eng = _engine(cfg, params, reload, **overrides)
                rid = eng.submit(prompt, SamplingParams(max_new_tokens=L + 2))
                while len(eng.requests[rid].output) < L:
                    eng.step()
                sent = list(eng.requests[rid].output)
                eng.controller.store.wait()
                victim = next(a for a in eng.aws if a.scheduler.running)
                eng.controller.kill(victim.handle.name)
                t0 = time.perf_counter()
                while len(eng.requests[rid].output) < L + 1:
                    eng.step()
                restore = time.perf_counter() - t0
                moved_to = next(a for a in eng.aws if a.restored.requests)
                row[tier] = {"restore_s": restore, "read_s": moved_to.restored.seconds,
                             "token": eng.requests[rid].output[L], "blocks_restored": moved_to.restored.blocks,
                             "tokens_recomputed": moved_to.restored.tokens_recomputed}
                eng.close()
        for _ in range(2):
            eng = _engine(cfg, params, reload)
            t0 = time.perf_counter()
            rid = eng.submit(prompt + sent, SamplingParams(max_new_tokens=1))
            while not eng.requests[rid].output:
                eng.step()
            row["reprefill_s"] = time.perf_counter() - t0
            token = eng.requests[rid].output[0]
            eng.close()
        row["same_token"] = all(row[t].pop("token") == token for t in tiers)
        row.update(restore_s=row["memory"]["restore_s"], ratio=row["reprefill_s"] / row["memory"]["restore_s"])
        out.append(row)
    return out


def plot(results: list[dict], path: str) -> None:
    """One panel per scenario, every recovery overlaid on one axis (its first run): tokens/s over
    time, the failure (dashed) and every compile a request waited on (a dot on the curve)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["name"] for r in results))
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.8 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        for r, color in zip((r for r in results if r["name"] == name), ("tab:blue", "tab:orange", "tab:green")):
            run = r["runs"][0]
            xs = [FLAGS.bucket_s * i for i in range(len(run["timeline"]))]
            ax.plot(xs, run["timeline"], lw=1, color=color, label=r["recovery"])
            if run["fail_at_s"] is not None:
                ax.axvline(run["fail_at_s"], color=color, ls="--", lw=1)
            at = [c["t_s"] for c in run["compiles"] if c["serving"]]
            ax.plot(at, [0] * len(at), "o", ms=4, color=color, label=f"{r['recovery']}: compile" if at else None)
        ax.set_ylabel("tok/s")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds since first arrival (dashed: the failure; dots: compiles a request waited on)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def headline(rows: list[dict]) -> str:
    """One line: per failure, the longest wait for a next token under each recovery, and whether
    every token matched the failure-free run."""
    by = {(r["name"], r["recovery"]): r for r in rows}
    parts = []
    for name in dict.fromkeys(r["name"] for r in rows if r["name"] != "no_failure"):
        t, rs = by.get((name, "tarragon")), by.get((name, "restart"))
        text = f"{name}: a request waited at most {t['worst_gap_s'] * 1e3:.0f} ms" if t else name
        if t and rs:
            text += f" (restart: {rs['worst_gap_s'] * 1e3:.0f} ms, x{rs['worst_gap_s'] / t['worst_gap_s']:.0f})"
        parts.append(text)
    same = all(r["tokens_checked"] and r["tokens_identical"] and not r["lost_requests"] for r in rows)
    return "; ".join(parts) + f"; every token identical to a failure-free run: {'yes' if same else 'NO'}"


def report(rows, ratios, res, over, rvr, n_requests, startup_s) -> None:
    cols = ["stall_s", "worst_gap_s", "dip_s", "back_s", "serving_compiles", "zero_throughput_s", "tokens_recomputed",
            "rows_replayed", "blocks_restored", "restore_fallbacks", "throughput_tok_s", "lost_requests",
            "tokens_checked", "tokens_identical"]
    bcols = ["detect_s", "reroute_s", "restore_s", "recompute_steps_s", "replacement_ready_s", "restart_s"]
    print(f"{n_requests} requests, Poisson {FLAGS.rate}/s over {FLAGS.duration_s}s, prompt {FLAGS.prompt_len}, "
          f"output {FLAGS.output_len}; {FLAGS.num_attention_workers} AWs x {FLAGS.num_expert_workers} EWs; "
          f"failure at {FLAGS.fail_at_s}s; median of {FLAGS.repeats} run(s) per row [min-max]; startup "
          f"precompile ({FLAGS.precompile}) {_fmt(startup_s)} s")
    print(" | ".join(["scenario", "recovery"] + cols + bcols))
    for r in rows:
        cells = [f"{_fmt(r[c])} [{_fmt(r['range'][c][0])}-{_fmt(r['range'][c][1])}]"
                 if c in ("stall_s", "worst_gap_s", "dip_s") and r["range"][c] else _fmt(r[c]) for c in cols]
        print(" | ".join([r["name"], r["recovery"]] + cells + [_fmt(r["breakdown"][c]) for c in bcols]))
    print("worst_gap_s: the longest wait for a next token after the failure (whole run without one); dip_s: the "
          f"longest stretch below a tenth of the median throughput ({FLAGS.bucket_s * 1e3:.0f} ms buckets, first to "
          "last token); back_s: until throughput is back to 90% of the failure-free run's; serving_compiles: "
          "compiles a request waited on, whole run")
    for r in rows:               # a restart recompiles by design (new workers): counted, not listed
        for i, run in enumerate(r["runs"] if r["recovery"] == "tarragon" else []):
            for c in (c for c in run["compiles"] if c["serving"]):
                print(f"  compile in {r['name']} run {i} at {c['t_s']:.2f} s: {c['worker']} {c['program']}"
                      f"({c['shapes']}) {c['seconds'] * 1e3:.0f} ms on {c['thread']}")
    worst = max((x["jitter_s"]["max_s"] for r in rows if r["name"] == "no_failure" for x in r["runs"]), default=0.0)
    print(f"resolution (median over failure-free runs of their p90 'stall' over instants): {res * 1e3:.2f} ms; "
          f"the largest at any instant: {worst * 1e3:.2f} ms")
    for name, v in ratios.items():
        if v is None:
            continue
        text = (f"x{v['ratio']:.0f}" if not v["below_resolution"]
                else f"tarragon below the resolution, x{v['at_least']:.0f} at least")
        print(f"restart/tarragon {name}: {v['restart'] * 1e3:.1f} ms / {v['tarragon'] * 1e3:.2f} ms = {text}")
    hang = [r for r in rows if r["name"] == "ew_hang" and r["recovery"] == "tarragon"]
    for r in hang:
        detect = [f["detect_s"] for run in r["runs"] for f in run["failures"]]
        print(f"ew_hang: detected after {', '.join(f'{d * 1e3:.0f}' for d in detect if d is not None)} ms; deadline "
              f"{r['deadline_s'] * 1e3:.0f} ms + one step {r['step_s'] * 1e3:.1f} ms")
    if over is None:
        print("no-failure overhead: not measured (--overhead_repeats 16 measures it)")
    else:
        print(f"no-failure overhead (throughput resilience off/on, median of {FLAGS.overhead_repeats} ABBA pairs): "
              f"{over['ratio']:.4f}, 95% interval {over['ratio_ci95'][0]:.3f}-{over['ratio_ci95'][1]:.3f} "
              f"(per pair {', '.join(f'{x:.3f}' for x in over['ratios'])}); in tokens per CPU second of this "
              f"process: {over['cpu_ratio']:.4f} (per pair {', '.join(f'{x:.3f}' for x in over['cpu_ratios'])})")
    print("restore (the next token after the AW died; in brackets reading the snapshots into pages) vs "
          "re-prefill: " + "; ".join(
              f"L={x['decoded']}: from the store's memory {x['memory']['restore_s'] * 1e3:.1f} ms "
              f"[{x['memory']['read_s'] * 1e3:.1f}], from its files {x['disk']['restore_s'] * 1e3:.1f} ms "
              f"[{x['disk']['read_s'] * 1e3:.1f}], re-prefill {x['reprefill_s'] * 1e3:.1f} ms (x{x['ratio']:.1f})"
              for x in rvr))


def main(argv):
    del argv
    if FLAGS.scenarios == ["all"]:
        FLAGS.scenarios = list(SCENARIOS)
    if unknown := set(FLAGS.scenarios) - set(SCENARIOS):
        sys.exit(f"error: unknown scenario(s) {sorted(unknown)}; choose from {SCENARIOS} or 'all'")
    if FLAGS.max_model_len is None:        # precompile only what the run needs: its requests' KV table widths
        FLAGS.max_model_len = FLAGS.prompt_len + max([FLAGS.output_len] + [int(L) + 2 for L in FLAGS.restore_lengths])
    cfg, params, ckpt, reload, _ = serving_flags.start()
    from tarragon_jax.workers.program_log import CompileLog
    watch = CompileLog()                                # this process's compiles; main thread: serving
    workload = _workload(cfg.vocab_size)
    # The reference, first (its startup is the cold one): the same workload, failure-free,
    # resilience off. Every row is checked against it.
    ref = run_scenario(cfg, params, reload, "no_failure", "tarragon", workload, watch, resilience=False)
    clean = ref["outputs"] if ref["lost_requests"] == 0 else None
    # Warm-up, as a server that has run a while: every scenario on other workloads.
    for r in range(FLAGS.warmup_rounds):
        for scenario in FLAGS.scenarios:
            run_scenario(cfg, params, reload, scenario, "tarragon", _workload(cfg.vocab_size, seed=FLAGS.seed + 100 + r),
                         watch)
    # Steady-state measures first: a restart clears the in-memory compiled programs.
    over = overhead(cfg, params, reload) if FLAGS.overhead_repeats > 0 else None
    rvr = restore_vs_reprefill(cfg, params, reload)
    # Every repeat of one recovery before the next, tarragon first, for the same reason.
    rows = [median_run([run_scenario(cfg, params, reload, s, rec, workload, watch, ref["timeline"])
                        for _ in range(FLAGS.repeats)], clean)
            for rec in FLAGS.recoveries for s in FLAGS.scenarios]
    res = resolution(rows)
    ratios = {f"{name}_{key}": ratio(rows, key, name, res) for name in FLAGS.scenarios if name != "no_failure"
              for key in ("worst_gap_s", "stall_s")}
    report(rows, ratios, res, over, rvr, len(workload[1]), ref["startup_s"])
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"scenarios": rows, "ratios": ratios, "resolution_s": res, "startup_s": ref["startup_s"],
                       "no_failure_overhead": over and over["ratio"], "headline": headline(rows),
                       "overhead_runs": over, "restore_vs_reprefill": rvr,
                       "config": {k: FLAGS[k].value for k in ("rate", "duration_s", "prompt_len", "output_len",
                                                             "fail_at_s", "num_attention_workers", "repeats",
                                                             "num_expert_workers", "model", "checkpoint", "precompile",
                                                             "hang_s", "hang_deadline_s", "disk_flush_s",
                                                             "warmup_rounds", "runtime")}},
                      f, indent=1)
    if FLAGS.plot_out:
        plot(rows, FLAGS.plot_out)
    tokenizer = serving_flags.tokenizer(ckpt, cfg)
    if tokenizer is not None and clean:
        text = tokenizer.decode(clean[0]).replace("\n", " ")
        print(f"request 0's text, the same in every checked row: {text[:300]!r}")
    print(f"headline: {headline(rows)}")
    if any(not r["tokens_checked"] or not r["tokens_identical"] or r["lost_requests"] for r in rows):
        sys.exit("invariant violated: a row unchecked, a request lost or changed tokens")


def run() -> None:
    """The console script (pyproject.toml)."""
    app.run(main)


if __name__ == "__main__":
    run()
