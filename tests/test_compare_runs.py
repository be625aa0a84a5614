"""launch/compare_runs.py: runs of either build order averaged as one variant over the other."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(first: str, second: str, r: float, c: float) -> dict:
    """A throughput_bench result whose second-built variant ran r (c per CPU second) times the first."""
    return {"by_runtime": {first: [{"batch": 8, "tok_s": 100.0}],
                           second: [{"batch": 8, "tok_s": 100.0 * r, "ratio": r, "cpu_ratio": c}]}}


def _compare(over: str, paths: list, out=None) -> subprocess.CompletedProcess:
    extra = [f"--json_out={out}"] if out else []
    return subprocess.run([sys.executable, "-m", "launch.compare_runs", "--over", over, *extra, *map(str, paths)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_either_build_order_gives_the_same_variant_over_the_other(tmp_path):
    rng = np.random.default_rng()
    r1, r2, c1, c2 = rng.uniform(0.8, 1.2, 4)
    runs = {"a": _run("on", "off", r1, c1),       # off built second: its ratio is off / on
            "b": _run("off", "on", r2, c2)}       # on built second: its ratio is on / off
    paths = []
    for name, run in runs.items():
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "summary.json"
    p = _compare("off", paths, out)
    assert p.returncode == 0, p.stderr
    result = json.loads(out.read_text())
    assert result["per_run"][str(paths[0])]["8"] == pytest.approx([r1, c1])
    assert result["per_run"][str(paths[1])]["8"] == pytest.approx([1 / r2, 1 / c2])
    summary = result["summary"]["8"]
    assert summary["runs"] == 2 and summary["mean"] == pytest.approx((r1 + 1 / r2) / 2)
    assert summary["mean_by_first_built"] == pytest.approx({"on": r1, "off": 1 / r2})
    assert summary["balanced_mean"] == pytest.approx((r1 + 1 / r2) / 2)
    assert "mean of 2 runs" in p.stdout
    bad = _compare("ray", paths)                  # a variant no run has
    assert bad.returncode != 0 and "--over must name one of" in bad.stderr
