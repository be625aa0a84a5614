"""launch/eplb_bench.py as a user runs it: both engines side by side on the demo model's text,
the load table, identical tokens, and the failure phase, in JSON."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_run_balances_and_keeps_every_token(tmp_path):
    out = tmp_path / "eplb.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "launch.eplb_bench", "--model", "demo", "--batch_sizes", "8",
                        "--prompt_len", "32", "--output_len", "8", "--repeats", "2", "--warmup_passes", "3",
                        "--warmup_window_s", "0.01", f"--json_out={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["identical"] and res["failure"]["identical"] and res["rebalances"] >= 1
    (row,) = res["rows"]
    assert row["batch"] == 8 and row["eplb_tok_s"] > 0 and row["noeplb_tok_s"] > 0
    for load in (row["load"]["eplb"], row["load"]["noeplb"], res["failure"]["load_after_rebalance"]):
        assert 1 <= load["ew_load"] <= load["ew_load_worst_layer"]
    assert "greedy tokens identical with --eplb and --noeplb: True" in r.stdout
