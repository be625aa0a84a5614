"""launch/throughput_bench.py as a user runs it: a table and JSON per batch size, two variants
compared pass by pass, the heap frozen once warm, no failures."""
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
                        "--output_len", "6", "--repeats", "2", "--compare_prefix_caching", f"--json_out={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [x["batch"] for x in rows] == [1, 3] and all(len(x["runs"]) == 2 for x in rows)
    assert all(x["tok_s_min"] <= x["tok_s"] <= x["tok_s_max"] and x["ttft_p50_s"] > 0 for x in rows)
    assert all(1 <= x["ew_load"] <= x["ew_load_worst_layer"] for x in rows)      # rows were read per EW
    assert "tok/s" in r.stdout and "EW load max/mean" in r.stdout
    other = result["by_runtime"]["no_prefix_caching"]         # the second variant, pass by pass over the first
    assert [x["batch"] for x in other] == [1, 3] and all(x["ratio"] > 0 and x["cpu_ratio"] > 0 for x in other)
    assert result["heap"]["frozen"] > 0 and result["heap"]["full_collection_frozen_s"] < result["heap"]["full_collection_s"]


@pytest.mark.parametrize("what", ["logprobs", "grammar"])
def test_requests_compared_on_one_engine(tmp_path, what):
    """--compare_logprobs / --compare_grammar: the same engine's passes with and without every
    request asking (a grammar that never ends: both variants decode every token)."""
    out = tmp_path / "lp.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "launch.throughput_bench", "--model", "tiny", "--batch_sizes", "2",
                        "--output_len", "4", "--repeats", "2", f"--compare_{what}", f"--json_out={out}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert set(result["by_runtime"]) == {what, f"no_{what}"} and result["by_runtime"][f"no_{what}"][0]["ratio"] > 0
    assert result["resident_mb"][what] == result["resident_mb"][f"no_{what}"]     # one engine
    assert f"no_{what} / {what} throughput" in r.stdout


@pytest.mark.parametrize("launcher", ["peer_bench", "eplb_bench"])
def test_launchers_sharing_its_flags_define_none_twice(launcher):
    """peer_bench and eplb_bench import throughput_bench and with it its flags: a flag defined
    in both would stop the launcher at import (absl's DuplicateFlagError)."""
    r = subprocess.run([sys.executable, "-m", f"launch.{launcher}", "--helpfull"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    assert "DuplicateFlagError" not in r.stderr and "compare_eplb" in r.stdout + r.stderr
