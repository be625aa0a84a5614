"""launch/failover_bench.py end to end on a very short workload: every scenario under both
recoveries keeps every token and request, each row is checked against a separate failure-free
run, and the JSON has the contract the README promises."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = {"no_failure", "ew_failure", "aw_failure", "ew_midstep", "aw_midstep", "ew_hang", "aw_failure_disk",
             "double"}


def test_failover_bench_smoke(tmp_path):
    out, png = tmp_path / "f.json", tmp_path / "f.png"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "launch.failover_bench", "--model", "tiny", "--scenarios", "all", "--rate", "10",
                        "--duration_s", "0.6", "--output_len", "10", "--fail_at_s", "0.4", "--restore_lengths", "20",
                        "--overhead_repeats", "1", "--overhead_requests", "4", "--overhead_sample_s", "0.2", "--warmup_rounds", "0", "--repeats", "1",
                        "--hang_deadline_s", "0.5", "--hang_s", "1.5", "--json_out", str(out), "--plot_out", str(png)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    names = {(s["name"], s["recovery"]) for s in d["scenarios"]}
    assert names == {(n, rec) for n in SCENARIOS for rec in ("tarragon", "restart")}
    for s in d["scenarios"]:
        assert {"stall_s", "worst_gap_s", "dip_s", "back_s", "serving_compiles", "zero_throughput_s",
                "tokens_recomputed", "throughput_tok_s", "lost_requests", "tokens_checked", "tokens_identical",
                "compiles_in_recovery", "runs", "range"} <= set(s)
        assert s["worst_gap_s"] > 0 and (s["back_s"] is None) == (s["name"] == "no_failure")
        for c in s["runs"][0]["compiles"]:
            assert {"t_s", "program", "shapes", "seconds", "thread", "serving"} <= set(c)
        assert s["tokens_checked"] and s["tokens_identical"] is True and s["lost_requests"] == 0
        assert (s["fail_at_s"] is None) == (s["name"] == "no_failure")
    by = {(s["name"], s["recovery"]): s for s in d["scenarios"]}
    hang = by["ew_hang", "tarragon"]["runs"][0]["failures"]
    assert hang[0]["worker"] == "ew1" and hang[0]["detected_by"] in ("call", "heartbeat")   # a deadline either way
    assert hang[0]["detect_s"] <= 0.5 + 0.5
    assert by["aw_failure_disk", "tarragon"]["blocks_restored"] >= 0
    assert {f["worker"] for f in by["double", "tarragon"]["runs"][0]["failures"]} == {"ew1", "aw0"}
    assert by["ew_failure", "restart"]["breakdown"]["restart_s"] > 0
    assert isinstance(d["no_failure_overhead"], float) and d["restore_vs_reprefill"][0]["decoded"] == 20
    assert d["restore_vs_reprefill"][0]["same_token"]
    assert all(d["restore_vs_reprefill"][0][tier]["blocks_restored"] > 0 for tier in ("memory", "disk"))
    assert png.stat().st_size > 1000 and "restart/tarragon" in r.stdout
