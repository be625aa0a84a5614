"""Logprobs (SamplingParams.logprobs): computed on the device from the logits each token was
chosen from, equal to the dense reference's log-softmax and transformers', only for the requests
that ask; bit-identical through EW failures, and within float rounding through AW failures."""
import json
import os

import jax
import numpy as np
import pytest

from tarragon_jax.config import ConfigError, EngineConfig, SamplingParams
from tarragon_jax.model import reference
from tarragon_jax.model.hf_loader import load_checkpoint
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine
from tarragon_jax.workers.grammar import json_grammar
from seeding import fresh_rng
from tests.fault_workload import PENALIZED, RUNTIME, SCHEMA, byte_vocab, model, serve  # noqa: F401 -- the shared workload fixture

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def _reference_logprobs(cfg, params, prompt, output):
    """log-softmax [len(output), V] of the dense reference at the positions that chose each token."""
    logits = np.asarray(reference.forward(cfg, params, np.asarray(prompt + output, np.int32)))
    return np.asarray(jax.nn.log_softmax(logits[len(prompt) - 1:-1], axis=-1))


def test_logprobs_are_the_references_and_only_for_requests_that_ask():
    """A mixed batch on 2 AWs x 4 EWs: greedy with 5 alternatives, sampled (the logprobs are the
    model's, before temperature) with 0, and one request that asks for none."""
    rng = fresh_rng()
    cfg, params = tiny_model("qwen3_moe", seed=int(rng.integers(1 << 30)))
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=4, prefill_chunk=8))
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 13, 9)]
    asks = [SamplingParams(max_new_tokens=6, logprobs=5),
            SamplingParams(max_new_tokens=6, temperature=0.8, seed=int(rng.integers(1 << 30)), logprobs=0),
            SamplingParams(max_new_tokens=6)]
    ids = [eng.submit(p, sp) for p, sp in zip(prompts, asks)]
    events = [ev for ev in eng.stream()]
    eng.close()
    for rid, prompt, sp in zip(ids, prompts, asks):
        seq = eng.requests[rid]
        if sp.logprobs is None:
            assert seq.logprobs == [] and all(ev.logprob is None for ev in events if ev.request_id == rid)
            continue
        assert [ev.logprob for ev in events if ev.request_id == rid] == seq.logprobs
        want = _reference_logprobs(cfg, params, prompt, seq.output)
        for t, (tok, got) in enumerate(zip(seq.output, seq.logprobs)):
            assert abs(got.logprob - want[t, tok]) <= 1e-5
            assert [j for j, _ in got.top] == np.argsort(-want[t], kind="stable")[:sp.logprobs].tolist()
            np.testing.assert_allclose([v for _, v in got.top], want[t][[j for j, _ in got.top]], atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_first_token_logprobs_are_transformers_log_softmax(name):
    """The first generated token comes from the prompt's last logits, which the fixture holds as
    transformers computed them: top-5 logprobs within 1e-4 of their log-softmax."""
    cfg, params = load_checkpoint(os.path.join(FIX, name))
    with open(os.path.join(FIX, name, "expected.json")) as f:
        exp = json.load(f)
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=4, prefill_chunk=16))
    ids = [eng.submit(p, SamplingParams(max_new_tokens=1, logprobs=5)) for p in exp["prompts"]]
    for _ in eng.stream():
        pass
    eng.close()
    for rid, logits in zip(ids, exp["last_logits"]):
        want = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float32)))
        got = eng.requests[rid].logprobs[0]
        assert [j for j, _ in got.top] == np.argsort(-want)[:5].tolist()
        assert max(abs(v - want[j]) for j, v in got.top) <= 1e-4


ASKS = {"logprobs": 3, "prompt_logprobs": 2}


def _served(model, faults=(), sampling=ASKS, **kw):
    """The workload asking for logprobs of every token, prompt included: (tokens, logprobs, prompt
    logprobs) per request, and the engine (closed)."""
    cfg, params, early, late, _ = model
    outs, eng = serve(cfg, params, early, late, faults, sampling=sampling, vocab=byte_vocab(cfg)[0], **kw)
    eng.close()
    seqs = [eng.requests[r] for r in sorted(eng.requests)]
    return outs, [s.logprobs for s in seqs], [s.prompt_logprobs for s in seqs], eng


def _close(a: list, b: list, atol: float) -> bool:
    """Per request, the same tokens ranked alike, and logprobs within atol."""
    return all(len(x) == len(y) and all([j for j, _ in u.top] == [j for j, _ in v.top] and abs(u.logprob - v.logprob) <= atol
                                        and max(abs(p - q) for (_, p), (_, q) in zip(u.top, v.top)) <= atol
                                        for u, v in zip(x, y)) for x, y in zip(a, b))


@pytest.mark.parametrize("faults", [["ew:1@step=4,layer=1"], ["ew:2@step=3,layer=0", "ew:0@step=6"]])
def test_logprobs_are_bit_identical_through_ew_failures(model, faults):
    """EWs killed mid-layer: their rows are replayed to replicas that compute them bit for bit
    alike, so every logprob, the prompt's included, is bit-identical."""
    clean, want, want_prompt, _ = _served(model, eplb=False)
    outs, got, got_prompt, eng = _served(model, faults)
    assert len(eng.controller.records) == len(faults)
    assert outs == clean and got == want and got_prompt == want_prompt
    assert all(len(lp) == 12 for lp in got) and [len(p) for p in got_prompt] == [len(p) - 1 for p in
                                                                                   model[2] + model[3]]


@pytest.mark.parametrize("faults", [["aw:0@prefill"], ["ew:2@step=3,layer=0", "aw:1@step=7"]])
def test_logprobs_through_aw_failures_agree_to_float_rounding(model, faults):
    """An AW killed during prefill (its requests' prompts are scored on the other AW, partly from
    restored KV), or later: the tokens are identical and every logprob agrees within 1e-5. Not
    bit for bit: every request then runs in the survivor's batch, whose programs have other
    shapes, and XLA's CPU kernels are not batch-invariant (measured: up to 4e-6 apart)."""
    clean, want, want_prompt, _ = _served(model, eplb=False)
    outs, got, got_prompt, eng = _served(model, faults)
    assert len(eng.controller.records) == len(faults)
    assert outs == clean and _close(got, want, 1e-5) and _close(got_prompt, want_prompt, 1e-5)


@pytest.mark.ray
@pytest.mark.skipif(RUNTIME != "local", reason="the whole module already runs on worker processes")
def test_logprobs_are_identical_through_failures_on_worker_processes(model):
    """Sampled with logit bias, penalties and a JSON schema's grammar too: the AW processes build
    them, and their grammar matchers, from their own copies of the requests' tokens."""
    sampling = {**ASKS, **PENALIZED, "grammar": json_grammar(SCHEMA)}
    clean, want, want_prompt, _ = _served(model, sampling=sampling)
    outs, got, got_prompt, _ = _served(model, ["ew:1@step=4", "aw:0@step=6"], sampling=sampling, runtime="ray")
    assert outs == clean and _close(got, want, 1e-5) and _close(got_prompt, want_prompt, 1e-5)


def test_prompt_logprobs_are_the_references_and_skip_the_prefix_cache():
    """A prompt scored over several prefill chunks equals the reference's log-softmax at every
    position; the same prompt again is computed again (not served from the prefix cache, which
    would leave its positions unscored) and scores the same."""
    rng = fresh_rng()
    cfg, params = tiny_model("qwen3_moe", seed=int(rng.integers(1 << 30)))
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=1, num_expert_workers=2, prefill_chunk=8))
    prompt = rng.integers(3, cfg.vocab_size, 29).tolist()
    first = eng.submit(prompt, SamplingParams(max_new_tokens=2, prompt_logprobs=4))
    for _ in eng.stream():
        pass
    second = eng.submit(prompt, SamplingParams(max_new_tokens=2, prompt_logprobs=4))
    for _ in eng.stream():
        pass
    hits = eng.aws[0].prefix_stats.hit_tokens
    eng.close()
    want = _reference_logprobs(cfg, params, prompt[:1], prompt[1:])
    got = eng.requests[first].prompt_logprobs
    assert len(got) == 28 and eng.requests[second].prompt_logprobs == got and hits == 0
    for k, lp in enumerate(got):
        assert abs(lp.logprob - want[k, prompt[k + 1]]) <= 1e-5
        assert [j for j, _ in lp.top] == np.argsort(-want[k], kind="stable")[:4].tolist()


def test_logprobs_beyond_twenty_are_refused():
    with pytest.raises(ConfigError, match=r"logprobs must be an integer in \[0, 20\]"):
        SamplingParams(logprobs=21)
