"""launch/failover_bench.py end to end on a very short workload: every scenario under both
recoveries keeps every token and request, and the JSON has what the README promises."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_failover_bench_smoke(tmp_path):
    out, png = tmp_path / "f.json", tmp_path / "f.png"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "launch.failover_bench", "--model", "tiny", "--rate", "10",
                        "--duration_s", "0.6", "--output_len", "10", "--fail_at_s", "0.4", "--restore_lengths", "20",
                        "--overhead_repeats", "1", "--overhead_requests", "4", "--warmup_rounds", "1", "--json_out", str(out),
                        "--plot_out", str(png)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    names = {(s["name"], s["recovery"]) for s in d["scenarios"]}
    assert names == {(n, rec) for n in ("no_failure", "ew_failure", "aw_failure") for rec in ("tarragon", "restart")}
    for s in d["scenarios"]:
        assert {"stall_s", "zero_throughput_s", "tokens_recomputed", "throughput_tok_s", "lost_requests",
                "tokens_identical"} <= set(s)
        assert s["tokens_identical"] and s["lost_requests"] == 0
    assert d["no_failure_overhead"] > 0 and d["restore_vs_replay"][0]["decoded"] == 20
    assert png.stat().st_size > 1000 and "restart/tarragon" in r.stdout
