"""launch/throughput_bench.py as a user runs it: a table and JSON per batch size, no failures."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_run_writes_a_row_per_batch_size(tmp_path):
    out = tmp_path / "tput.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "launch.throughput_bench", "--model", "tiny", "--batch_sizes", "1,3",
                        "--output_len", "6", "--repeats", "2", f"--json_out={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [x["batch"] for x in rows] == [1, 3] and all(len(x["runs"]) == 2 for x in rows)
    assert all(x["tok_s_min"] <= x["tok_s"] <= x["tok_s_max"] and x["ttft_p50_s"] > 0 for x in rows)
    assert all(1 <= x["ew_load"] <= x["ew_load_worst_layer"] for x in rows)      # rows were read per EW
    assert "tok/s" in r.stdout and "EW load max/mean" in r.stdout
