"""A chaos soak of the process runtime, faults from outside:
`python -m launch.chaos_bench --model tiny --runtime ray --duration_s 600`.

Starts launch/serve.py (this run's serving flags) and keeps --clients streaming clients busy
(the official openai client, a closed loop over a fixed pool of prompts, each with its own
sampling seed). Phases:

  reference    every prompt of the pool once, no faults: the texts every later answer must equal
  calm         --calm_s of the steady load, no faults: the failure-free latency
  chaos        --duration_s of the same load while random worker processes (AWs, EWs and the
               checkpoint store, pids from GET /health) get SIGKILL, or SIGSTOP (--stop_fraction
               of the faults) and a SIGCONT --stop_s later, at random times --fault_every_s apart
               on average; a fault never takes the last live AW or EW of the service
  recovery     after the last fault: how long until /health shows every worker back

Counts faults, finished requests, requests whose text differs from the reference, failed
requests, /health answers other than 200, and latency percentiles per phase; prints a table and
writes --json_out.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time

from absl import app, flags

from . import serving_bench, serving_flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("clients", 8, "Concurrent streaming clients (each sends its next request when one ends).")
flags.DEFINE_integer("pool", 32, "Distinct prompts (with their sampling seeds) the clients cycle through.")
flags.DEFINE_float("duration_s", 600.0, "Length of the chaos phase.")
flags.DEFINE_float("calm_s", 60.0, "Length of the failure-free phase of the same load.")
flags.DEFINE_float("fault_every_s", 5.0, "Mean seconds between faults (exponential gaps).")
flags.DEFINE_float("stop_fraction", 0.2, "Share of the faults that are SIGSTOP (then SIGCONT) rather than SIGKILL.")
flags.DEFINE_float("stop_s", 5.0, "How long a SIGSTOPped process stays stopped (if nobody killed it meanwhile).")
flags.DEFINE_bool("include_store", True, "The checkpoint store's process is a target too.")
flags.DEFINE_float("back_timeout_s", 120.0, "How long to wait for every worker to be back after the last fault.")


async def health(http, url: str) -> tuple[int, dict]:
    try:
        r = await http.get(url + "/health", timeout=10)
        return r.status_code, r.json()
    except Exception as e:  # noqa: BLE001 -- a refused or timed-out probe counts as a bad answer
        return 0, {"error": f"{type(e).__name__}: {e}"}


def targets(state: dict, include_store: bool) -> list[tuple[str, int]]:
    """(name, pid) of the worker processes a fault may hit now: live ones, never the last live AW
    or EW (that stops the service: no system survives it), the store when asked."""
    workers = state.get("workers", {})
    procs = state.get("processes", {})
    live = {n for n, s in workers.items() if s == "ok" and procs.get(n, {}).get("pid")}
    out = [(n, procs[n]["pid"]) for n in sorted(live) if sum(m[:2] == n[:2] for m in live) >= 2]
    if include_store and procs.get("store", {}).get("pid"):
        out.append(("store", procs["store"]["pid"]))
    return out


async def faulter(url: str, t_end: float, log: list, rng: random.Random) -> None:
    """Random faults until t_end, each logged with what /health said before it."""
    import httpx
    async with httpx.AsyncClient() as http:
        while True:
            await asyncio.sleep(rng.expovariate(1.0 / FLAGS.fault_every_s))
            if time.perf_counter() >= t_end:
                return
            status, state = await health(http, url)
            choice = targets(state, FLAGS.include_store) if status == 200 else []
            if not choice:
                continue
            name, pid = rng.choice(choice)
            sig = signal.SIGSTOP if rng.random() < FLAGS.stop_fraction else signal.SIGKILL
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
            log.append({"t": time.perf_counter(), "target": name, "pid": pid, "signal": sig.name})
            if sig == signal.SIGSTOP:
                asyncio.get_running_loop().call_later(FLAGS.stop_s, _cont, pid)


def _cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass                             # fenced meanwhile: the controller killed it


async def watch_health(url: str, t_end: float, bad: list) -> None:
    """/health once a second; every answer other than 200 is kept (time, status, what it said)."""
    import httpx
    async with httpx.AsyncClient() as http:
        while time.perf_counter() < t_end:
            status, state = await health(http, url)
            if status != 200:
                bad.append({"t": time.perf_counter(), "status": status, "error": state.get("error")})
            await asyncio.sleep(1.0)


async def client_loop(client, model: str, jobs: list[dict], start: int, t_end: float, out: list) -> None:
    i = start
    while time.perf_counter() < t_end:
        job = jobs[i % len(jobs)]
        r = await serving_bench.one(client, model, serving_bench.opening(job), job["seed"])
        out.append(dict(r, job=i % len(jobs)))
        i += 1
        if "error" in r:
            await asyncio.sleep(0.5)      # a refused request is counted, not retried in a tight loop


async def load_phase(url: str, model: str, jobs: list[dict], seconds: float, with_faults: bool) -> dict:
    import openai
    t0 = time.perf_counter()
    t_end = t0 + seconds
    results, faults, bad = [], [], []
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
        tasks = [client_loop(client, model, jobs, c * len(jobs) // FLAGS.clients, t_end, results)
                 for c in range(FLAGS.clients)]
        tasks.append(watch_health(url, t_end, bad))
        if with_faults:
            tasks.append(faulter(url, t_end, faults, random.Random(FLAGS.seed)))
        await asyncio.gather(*tasks)
    return {"t0": t0, "results": results, "faults": faults, "health_not_200": bad}


async def all_back(url: str, since: float) -> float | None:
    """Seconds from `since` until /health shows every worker ok and nothing recovering."""
    import httpx
    async with httpx.AsyncClient() as http:
        while time.perf_counter() - since < FLAGS.back_timeout_s:
            status, state = await health(http, url)
            if status == 200 and all(s == "ok" for s in state["workers"].values()) and not state["recovering"]:
                return time.perf_counter() - since
            await asyncio.sleep(0.5)
    return None


async def last_health(url: str) -> dict:
    import httpx
    async with httpx.AsyncClient() as http:
        return (await health(http, url))[1]


def _error(r: dict, phase: dict) -> str:
    """A failed request: what the client saw, when in the phase, after how many text chunks."""
    if "t" not in r:
        return r["error"]
    return f"{r['error']} at {r['t'] - phase.get('t0', 0.0):.1f} s after {r['tokens_before']} chunks"


def summary(name: str, phase: dict, reference: list) -> dict:
    ok = [r for r in phase["results"] if "error" not in r]
    wrong = [r["job"] for r in ok if r["text"] != reference[r["job"]]]
    return {"phase": name, "requests": len(phase["results"]), "finished": len(ok), "wrong": len(wrong),
            "failed": len(phase["results"]) - len(ok), "errors": [_error(r, phase) for r in phase["results"] if "error" in r][:20],
            "faults": len(phase["faults"]), "sigstop": sum(f["signal"] == "SIGSTOP" for f in phase["faults"]),
            "store_faults": sum(f["target"] == "store" for f in phase["faults"]),
            "health_not_200": len(phase["health_not_200"]),
            "e2e_s": serving_bench.percentiles([r["e2e_s"] for r in ok]),
            "ttft_s": serving_bench.percentiles([r["ttft_s"] for r in ok]),
            "itl_max_s": max((g for r in ok for g in r["gaps_s"]), default=float("nan"))}


def table(rows: list[dict]) -> str:
    head = (f"{'phase':<10}{'faults':>7}{'STOP':>6}{'store':>6}{'done':>6}{'wrong':>6}{'failed':>7}{'!200':>6}"
            f"{'E2E p50':>9}{'p99':>8}{'TTFT p99':>9}{'max gap':>9}")
    out = [head]
    for r in rows:
        out.append(f"{r['phase']:<10}{r['faults']:>7}{r['sigstop']:>6}{r['store_faults']:>6}{r['finished']:>6}"
                   f"{r['wrong']:>6}{r['failed']:>7}{r['health_not_200']:>6}{r['e2e_s']['p50']:>8.2f}s"
                   f"{r['e2e_s']['p99']:>7.2f}s{r['ttft_s']['p99']:>8.2f}s{r['itl_max_s']:>8.2f}s")
    return "\n".join(out)


def main(argv):
    del argv
    import logging
    logging.getLogger().setLevel(logging.WARNING)
    if FLAGS.runtime != "ray":
        raise app.UsageError("the chaos soak signals worker processes: run it with --runtime ray")
    proc, url = serving_bench.start_server()
    try:
        import openai
        model = openai.OpenAI(base_url=url + "/v1", api_key="unused").models.list().data[0].id
        jobs = serving_bench.workload(FLAGS.pool, FLAGS.seed)
        ref = asyncio.run(serving_bench.run_pass(url, model, jobs, "reference", []))
        if ref["errors"]:
            raise SystemExit(f"error: the failure-free reference pass failed: {ref['errors'][:3]}")
        reference = ref["texts"]
        calm = asyncio.run(load_phase(url, model, jobs, FLAGS.calm_s, with_faults=False))
        chaos = asyncio.run(load_phase(url, model, jobs, FLAGS.duration_s, with_faults=True))
        last = max((f["t"] for f in chaos["faults"]), default=chaos["t0"])
        back_s = asyncio.run(all_back(url, last))
        final = asyncio.run(last_health(url))
        try:
            queries, hits = asyncio.run(serving_bench.prefix_counts(url))     # over the whole run
        except RuntimeError as e:                                            # reported, with the table
            queries = hits = None
            print(f"error: {e}", file=sys.stderr)
    finally:
        serving_bench.stop_server(proc)
    rows = [summary("calm", calm, reference), summary("chaos", chaos, reference)]
    ratio = rows[1]["e2e_s"]["p99"] / rows[0]["e2e_s"]["p99"]
    print(table(rows))
    print(f"every worker back {back_s:.1f} s after the last fault" if back_s is not None
          else f"workers NOT all back {FLAGS.back_timeout_s:.0f} s after the last fault")
    print(f"E2E p99 under chaos / failure-free: {ratio:.2f}x")
    if queries is not None:
        print(f"prefix cache: {hits / max(queries, 1):.0%} of prompt tokens found cached ({hits:.0f} of {queries:.0f})")
    for r in rows:
        for e in r["errors"]:
            print(f"{r['phase']}: error: {e}")
    if FLAGS.json_out:
        config = {k: getattr(FLAGS, k) for k in ("clients", "pool", "duration_s", "calm_s", "fault_every_s",
                                                  "stop_fraction", "stop_s", "include_store", "input_len",
                                                  "output_len", "temperature", "seed")}
        config.update(serving=[a for a in (FLAGS[f.name].serialize() for f in FLAGS.get_flags_for_module(serving_flags)) if a])
        faults = [dict(f, t=round(f["t"] - chaos["t0"], 3)) for f in chaos["faults"]]
        with open(FLAGS.json_out, "w") as f:
            json.dump({"config": config, "model": model, "phases": rows, "back_after_last_fault_s": back_s,
                       "p99_ratio": ratio, "faults": faults, "final_health": final,
                       "prefix_cache": {"query_tokens": queries, "hit_tokens": hits},
                       "health_not_200": [dict(b, t=round(b["t"] - chaos["t0"], 3)) for b in chaos["health_not_200"]]},
                      f, indent=1)
    if rows[1]["wrong"] or rows[1]["failed"] or back_s is None:
        sys.exit(1)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
