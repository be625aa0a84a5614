"""The shipped demo model (`--model demo`, written by launch/train_demo.py): a real checkpoint the
loader reads like any other, with 8 experts top-2, a BPE tokenizer and a chat template; the
engine's greedy tokens on a text prompt equal the dense reference's, and they decode to text.
launch/train_demo.py itself runs end to end at a few steps and writes a loadable checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
from tokenizers import Tokenizer

from tarragon_jax import CacheConfig, Engine, EngineConfig, SamplingParams, load_checkpoint
from tarragon_jax.model import reference
from tarragon_jax.serving.chat_template import ChatTemplate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "tarragon_jax", "model", "demo")


def test_shipped_demo_model_generates_the_reference_text():
    cfg, params = load_checkpoint(DEMO)
    assert cfg.n_experts >= 8 and cfg.top_k == 2
    n = sum(np.asarray(a).size for layer in params["experts"] for a in layer.values())
    assert 1e6 < n < 1e7
    tok = Tokenizer.from_file(os.path.join(DEMO, "tokenizer.json"))
    prompt = tok.encode("The for statement is used to").ids
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=3, prefill_chunk=8),
                 CacheConfig(page_size=8, num_pages=32))
    out, = eng.generate([prompt], SamplingParams(max_new_tokens=12))
    eng.close()
    assert out == reference.greedy_generate(cfg, params, prompt, 12)
    text = tok.decode(out)
    assert sum(c.isalpha() for c in text) > len(text) / 3                     # words, not byte soup
    assert "<|im_start|>assistant" in ChatTemplate.from_checkpoint(DEMO).render([{"role": "user", "content": "x"}])
    with open(os.path.join(DEMO, "generation_config.json")) as f:
        assert tok.token_to_id("<|endoftext|>") in json.load(f)["eos_token_id"]


def test_train_demo_writes_a_loadable_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "launch.train_demo", "--steps", "2", "--batch", "2", "--seq_len", "16",
                        "--vocab_size", "512", "--out", str(tmp_path / "demo"), "--load_json", str(tmp_path / "l.json")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cfg, _ = load_checkpoint(str(tmp_path / "demo"))
    assert cfg.vocab_size == 512 and cfg.n_experts == 8
    load = json.loads((tmp_path / "l.json").read_text())["share_per_layer"]
    assert len(load) == cfg.n_layers and all(abs(sum(s) - 1) < 1e-2 for s in load)
