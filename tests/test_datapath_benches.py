"""The datapath benchmarks as a user runs them: launch/step_profile.py (the GPU check's first step,
here on dummy weights from the tiny Qwen3-MoE fixture's config) and launch/expert_backend_bench.py."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dummy_weights_run_writes_efficiency_per_batch(tmp_path):
    out = tmp_path / "step.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "launch.step_profile", "--checkpoint", "tests/fixtures/qwen3_moe",
                        "--load_format", "dummy", "--batch_sizes", "1,4", "--steps", "3", "--program_repeats", "1",
                        f"--json_out={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert [x["batch"] for x in got["rows"]] == [1, 4] and got["active_weight_bytes"] > 0
    for row in got["rows"]:
        assert row["decode_tok_s"] > 0 and 0 < row["efficiency"] and row["program_calls"] > 0
        assert {"attention_layer", "expert_layer", "head"} <= set(row["programs"])
    assert "efficiency" in r.stdout


def test_expert_backend_bench_checks_and_times_every_backend(tmp_path):
    out = tmp_path / "ew.json"
    r = subprocess.run([sys.executable, "-m", "launch.expert_backend_bench", "--tokens", "1,4", "--repeats", "2",
                        "--d_model", "64", "--d_expert", "32", f"--json_out={out}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [x["tokens_per_aw"] for x in rows] == [1, 4]
    assert all(x[b] > 0 for x in rows for b in ("tiles", "ragged_dot", "dense"))
