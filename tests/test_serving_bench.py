"""launch/serving_bench.py end to end, small: it starts launch/serve.py as its own process, drives
it with the official openai client, kills an EW and an AW through /fail in the failures pass, and
every text equals the warm-up's; the JSON has what the README reports."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serving_bench_smoke(tmp_path):
    out = tmp_path / "s.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cache = os.path.join(tempfile.gettempdir(), "tarragon_jax_test_cache")
    r = subprocess.run([sys.executable, "-m", "launch.serving_bench", "--model", "tiny", "--num_requests", "12",
                        "--request_rate", "40", "--output_len", "12", "--input_len", "8", "--fail_at", "ew1@0.1,aw0@0.2",
                        "--temperature", "0.7", "--compile_cache_dir", cache, "--json_out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert [p["name"] for p in d["passes"]] == ["warmup", "no_failure", "failures"]
    for p in d["passes"]:
        assert p["errors"] == [] and p["output_tokens"] > 0 and p["throughput_tok_s"] > 0
        assert {"p50", "p90", "p99"} <= set(p["ttft_s"]) and {"p50", "p90", "p99"} <= set(p["itl_s"])
    assert all(p["texts_identical"] for p in d["passes"][1:])
    assert [(k["worker"], k["status"]) for k in d["passes"][2]["kills"]] == [("ew1", 200), ("aw0", 200)]
    assert "texts" in r.stdout and "failures" in r.stdout


def test_serving_bench_multi_turn_with_and_without_prefix_caching(tmp_path):
    """--compare_prefix_caching: the same multi-turn conversations on a server with prefix caching
    and on one without; the texts match pass by pass and the JSON has both and their ratios."""
    out = tmp_path / "m.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cache = os.path.join(tempfile.gettempdir(), "tarragon_jax_test_cache")
    r = subprocess.run([sys.executable, "-m", "launch.serving_bench", "--model", "tiny", "--workload", "multi_turn",
                        "--turns", "3", "--num_requests", "6", "--request_rate", "0", "--output_len", "6",
                        "--input_len", "10", "--prefix_len", "20", "--compare_prefix_caching", "--precompile", "recovery",
                        "--compile_cache_dir", cache, "--json_out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert [p["name"] for p in d["passes"]] == ["warmup/on", "no_failure/on", "warmup/off", "no_failure/off"]
    for p in d["passes"]:
        assert p["errors"] == [] and p["requests"] == 6 and p["output_tokens"] > 0
    assert all(p["texts_identical"] for p in d["passes"][1:])
    assert d["prefix_caching_ratios"]["ttft_p50_on_over_off"] > 0 and "prefix caching on/off" in r.stdout
