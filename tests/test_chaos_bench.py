"""launch/chaos_bench.py's choices and counts, without a server: a fault only ever hits a live
process, never the last live AW or EW, the store only when asked; a wrong text and a failed
request are counted as such."""
import random

from launch import chaos_bench


def _state(workers: dict, store: bool = True) -> dict:
    procs = {name: {"pid": 100 + i} for i, name in enumerate(workers)}
    if store:
        procs["store"] = {"pid": 99}
    procs["driver"] = {"pid": 1}
    return {"workers": workers, "processes": procs}


def test_targets_spare_the_last_live_worker_of_each_kind():
    state = _state({"aw0": "ok", "aw1": "failed", "ew0": "ok", "ew1": "ok", "ew2": "failed"})
    assert chaos_bench.targets(state, include_store=True) == [("ew0", 102), ("ew1", 103), ("store", 99)]
    assert chaos_bench.targets(state, include_store=False) == [("ew0", 102), ("ew1", 103)]
    n = random.randint(2, 5)
    state = _state({**{f"aw{i}": "ok" for i in range(n)}, "ew0": "ok"}, store=False)
    assert [name for name, _ in chaos_bench.targets(state, include_store=True)] == [f"aw{i}" for i in range(n)]


def test_summary_counts_wrong_and_failed_requests():
    reference = ["alpha", "beta", "gamma"]
    ok = lambda job, text: {"job": job, "text": text, "e2e_s": 1.0 + job, "ttft_s": 0.1, "gaps_s": [0.01, 0.2]}
    phase = {"results": [ok(0, "alpha"), ok(1, "BETA"), ok(2, "gamma"), {"job": 1, "error": "APIError: boom"}],
             "faults": [{"t": 1.0, "target": "ew1", "signal": "SIGSTOP"}, {"t": 2.0, "target": "store", "signal": "SIGKILL"}],
             "health_not_200": []}
    s = chaos_bench.summary("chaos", phase, reference)
    assert (s["finished"], s["wrong"], s["failed"], s["faults"], s["sigstop"], s["store_faults"]) == (3, 1, 1, 2, 1, 1)
    assert s["errors"] == ["APIError: boom"] and s["itl_max_s"] == 0.2
    assert "chaos" in chaos_bench.table([s])


def test_idle_bench_reads_cpu_time_from_proc():
    """launch/idle_bench.py's meter: a process's CPU seconds grow by what it spins, not by what it sleeps."""
    import os
    import time

    from launch import idle_bench
    t0 = idle_bench.cpu_seconds(os.getpid())
    time.sleep(0.2)
    slept = idle_bench.cpu_seconds(os.getpid()) - t0
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    spun = idle_bench.cpu_seconds(os.getpid()) - t0 - slept
    assert slept < 0.1 and 0.2 < spun < 1.0
