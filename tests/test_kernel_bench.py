"""launch/kernel_bench.py --smoke, as a user runs it: every suite checks and time every
implementation (interpret mode on CPU) and write JSON and Markdown tables."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_checks_every_kernel_and_writes_tables(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    r = subprocess.run([sys.executable, "-m", "launch.kernel_bench", "--smoke", f"--json_out={out_json}",
                        f"--md_out={out_md}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    bench = json.loads(out_json.read_text())
    rows = bench["rows"]
    assert bench["mem_gb_s"] == max(bench["copy_gb_s"], bench["read_gb_s"]) > 0
    assert {(x["suite"], x["impl"]) for x in rows} == {
        ("gmm", "pallas"), ("gmm", "ragged_dot"), ("gmm", "dense"), ("ffn", "pallas"),
        ("ffn", "ragged_dot"), ("attention", "pallas_paged"), ("attention", "jnp_gather")}
    assert all(x["status"] == "ok" and x["rel_err"] < 2e-2 and x["time_us"] > 0 for x in rows)
    md = out_md.read_text()
    assert sum(md.count(f"\n| {suite} |") for suite in ("gmm", "ffn", "attention")) == len(rows)


def test_unknown_suite_is_named():
    r = subprocess.run([sys.executable, "-m", "launch.kernel_bench", "--smoke", "--suites=gmm,flash"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "flash" in r.stderr
