"""lm-evaluation-harness's local-completions backend against the server, on the demo model and
a few examples of the local task (launch/lm_eval_check.py): every choice's loglikelihood within
1e-3 of lm-eval's hf backend (transformers) on the same checkpoint, as that backend computed them
(results/lm_eval_demo.json: the full run), and the same examples right."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_server_loglikelihoods_are_the_hf_backends(tmp_path):
    out = tmp_path / "lm.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "launch.lm_eval_check", "--model", "demo", "--limit", "6",
                        "--precompile", "none", "--reference", os.path.join(ROOT, "results", "lm_eval_demo.json"),
                        f"--json_out={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["agree"] and result["max_abs_diff"] <= 1e-3 and len(result["server"]["loglikelihoods"]) == 6
    assert all(len(choices) == 4 for choices in result["server"]["loglikelihoods"])
