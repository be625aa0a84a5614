"""launch/generate.py end to end, as a user runs it (a fresh process, flags only)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}     # the launcher sets it itself
    return subprocess.run([sys.executable, "-m", "launch.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_json_lines_in_prompt_order_match_transformers():
    with open(os.path.join(FIX, "mixtral", "expected.json")) as f:
        exp = json.load(f)
    args = ["--checkpoint", os.path.join(FIX, "mixtral"), "--json", "--max_new_tokens", "16"]
    for p in exp["prompts"]:
        args += ["--prompt_ids", ",".join(map(str, p))]
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert [l["prompt_ids"] for l in lines] == exp["prompts"]
    assert [l["output_ids"] for l in lines] == exp["greedy_new_tokens"]
    assert "tokens/s" in r.stderr and "2 AWs x 4 EWs" in r.stderr


def test_text_prompt_with_tokenizer():
    with open(os.path.join(FIX, "qwen3_moe", "expected.json")) as f:
        tp = json.load(f)["text_prompt"]
    r = _run("--checkpoint", os.path.join(FIX, "qwen3_moe"), "--prompt", tp["text"], "--json",
             "--max_new_tokens", str(len(tp["greedy_new_tokens"])), "--num_attention_workers", "1")
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["prompt_ids"] == tp["ids"] and line["output_ids"] == tp["greedy_new_tokens"]
    assert line["prompt"] == tp["text"]                              # and the text, decoded


def test_clear_errors():
    r = _run("--model", "tiny", "--prompt_ids", "1,x")
    assert r.returncode != 0 and "--prompt_ids must be comma-separated integers" in r.stderr
    r = _run("--model", "tiny", "--prompt_ids", "1,99999")
    assert r.returncode != 0 and "token id 99999 out of range" in r.stderr
    r = _run("--checkpoint", "/nonexistent/dir", "--prompt_ids", "1")
    assert r.returncode != 0 and "checkpoint directory does not exist: /nonexistent/dir" in r.stderr


def test_fault_flags_keep_outputs_and_report_recoveries():
    args = ["--model", "tiny", "--prompt_ids", "1,2,3", "--prompt_ids", "7,8", "--json", "--max_new_tokens", "8"]
    clean = _run(*args)
    failed = _run(*args, "--fail", "ew:1@step=3", "--fail", "aw:0@step=5")
    assert clean.returncode == 0 and failed.returncode == 0, failed.stderr
    assert failed.stdout == clean.stdout
    recs = [json.loads(l)["recovery"] for l in failed.stderr.splitlines() if l.startswith('{"recovery"')]
    assert [r["worker"] for r in recs] == ["ew1", "aw0"]
    assert all(r["process"]["pid"] > 0 and r["process"]["node"] for r in recs)      # where it ran
    bad = _run(*args, "--fail", "ew:9@step=3")
    assert bad.returncode != 0 and "targets ew9, but there are only 4 expert workers" in bad.stderr


def test_generation_stops_at_the_checkpoints_eos(tmp_path):
    import shutil
    with open(os.path.join(FIX, "qwen3_moe", "expected.json")) as f:
        tp = json.load(f)["text_prompt"]
    ckpt = tmp_path / "qwen3_moe"
    shutil.copytree(os.path.join(FIX, "qwen3_moe"), ckpt)
    eos = tp["greedy_new_tokens"][4]
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps(dict(gen, eos_token_id=[eos, 1])))
    args = ("--checkpoint", str(ckpt), "--prompt", tp["text"], "--json", "--max_new_tokens", "16",
            "--num_attention_workers", "1")
    out = json.loads(_run(*args).stdout.strip().splitlines()[-1])["output_ids"]
    assert out == tp["greedy_new_tokens"][:tp["greedy_new_tokens"].index(eos) + 1]
    out = json.loads(_run(*args, "--nostop_at_eos").stdout.strip().splitlines()[-1])["output_ids"]
    assert out == tp["greedy_new_tokens"]


@pytest.mark.ray
def test_json_stdout_holds_only_results_when_a_ray_ew_process_is_killed():
    """Ray prints a dead worker's error on stdout; with --json the launcher keeps it on stderr."""
    args = ("--model", "tiny", "--runtime", "ray", "--prompt_ids", "1,2,3", "--max_new_tokens", "8",
            "--fail", "ew:1@step=3", "--json")
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and len(json.loads(lines[0])["output_ids"]) == 8
    local = _run(*args[:2], *args[4:8], "--json")
    assert local.stdout.splitlines() == lines
