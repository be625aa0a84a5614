"""What an idle server costs: CPU and resident memory of every process it runs.
`python -m launch.idle_bench --model tiny --runtime ray`

Starts launch/serve.py with this run's serving flags, waits --settle_s after it answers, then
reads each process's CPU time (/proc/PID/stat) over --window_s with no request in flight: the
driver, every AW and EW process and the checkpoint store's (pids from GET /health). Nothing
should poll: a serving loop sleeps in poll(2), heartbeats probe a silent process at most every
1 s, a worker's keepalive thread runs only while it compiles. Prints a table, writes
--json_out.
"""
from __future__ import annotations

import json
import os
import time

import httpx
from absl import app, flags

from . import serving_bench, serving_flags

FLAGS = flags.FLAGS
flags.DEFINE_float("settle_s", 10.0, "Seconds between the server's first answer and the measurement.")
flags.DEFINE_float("window_s", 30.0, "Seconds of idle CPU time measured.")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (it must run on this host)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, window_s: float) -> dict[str, dict]:
    """{process name: pid, rss_mb, % of a core over the window}, from /health's processes."""
    procs = httpx.get(url + "/health", timeout=30).json()["processes"]
    pids = {name: p["pid"] for name, p in procs.items() if p.get("pid")}
    start, t0 = {n: cpu_seconds(p) for n, p in pids.items()}, time.monotonic()
    time.sleep(window_s)
    wall = time.monotonic() - t0
    return {n: {"pid": p, "rss_mb": procs[n].get("rss_mb"),
                "cpu_pct": round(100 * (cpu_seconds(p) - start[n]) / wall, 2)} for n, p in pids.items()}


def main(argv):
    del argv
    proc, url = serving_bench.start_server()
    try:
        time.sleep(FLAGS.settle_s)
        usage = measure(url, FLAGS.window_s)
    finally:
        serving_bench.stop_server(proc)
    total = round(sum(u["cpu_pct"] for u in usage.values()), 2)
    print(f"{'process':<10}{'pid':>9}{'RSS MB':>9}{'% core':>9}")
    for name, u in usage.items():
        print(f"{name:<10}{u['pid']:>9}{u['rss_mb'] or float('nan'):>9.0f}{u['cpu_pct']:>9.2f}")
    print(f"idle server, all processes: {total:.2f}% of a core over {FLAGS.window_s:.0f} s")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"processes": usage, "total_cpu_pct": total, "window_s": FLAGS.window_s,
                       "serving": [FLAGS[f.name].serialize() for f in FLAGS.get_flags_for_module(serving_flags)]}, f,
                      indent=1)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
