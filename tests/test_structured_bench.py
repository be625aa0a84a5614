"""launch/structured_bench.py as a user runs it: every answer ends with EOS, parses and follows
the schema, and the table and JSON say so."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_answer_parses_and_validates(tmp_path):
    out = tmp_path / "s.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "launch.structured_bench", "--model", "tiny", "--num_requests", "6",
                        "--precompile", "none", f"--json_out={out}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["requests"] == result["ended_with_eos"] == result["parsed"] == result["valid"] == 6, result
    assert "valid" in r.stdout and result["tok_s"] > 0
