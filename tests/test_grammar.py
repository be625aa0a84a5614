"""Structured outputs (SamplingParams.grammar, workers/grammar.py): the device mask sets exactly
the clear bits to -inf; each row's mask is its llguidance matcher's after the request's own
tokens, on any AW; JSON-schema outputs parse and validate, greedy and sampled, on 2 AWs x 4
EWs; tokens are identical through EW and AW failures; bad grammars are refused by name."""
import json

import numpy as np
import pytest

from tarragon_jax.config import EngineConfig, SamplingParams
from tarragon_jax.errors import RequestError
from tarragon_jax.model.sampling import constrain
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine
from tarragon_jax.workers.grammar import Grammars, json_grammar
from tarragon_jax.workers.sequence import Sequence
from seeding import fresh_rng
from tests.fault_workload import SCHEMA, byte_vocab, follows_schema, model, serve  # noqa: F401 -- the shared workload fixture

def _bits(mask_RxW: np.ndarray, V: int) -> np.ndarray:
    return np.unpackbits(mask_RxW.view(np.uint8), axis=1, bitorder="little")[:, :V].astype(bool)


@pytest.mark.parametrize("rows,vocab", [(1, 40), (4, 512), (3, 1000)])
def test_constrain_sets_exactly_the_clear_bits_to_minus_infinity(rows, vocab):
    rng = fresh_rng()
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    mask = rng.integers(-2**31, 2**31, (rows, (vocab + 31) // 32), dtype=np.int64).astype(np.int32)
    mask[0] = -1                                              # a row that asks nothing
    got = np.asarray(constrain(logits, mask))
    np.testing.assert_array_equal(got, np.where(_bits(mask, vocab), logits, -np.inf))
    assert np.array_equal(got[0], logits[0])


def _walk(grammars: Grammars, seq: Sequence, rng, n: int) -> None:
    """Append n tokens the request's mask allows, chosen at random."""
    for _ in range(n):
        allowed = np.flatnonzero(_bits(grammars.masks([seq], 1), grammars.vocab.vocab_size)[0])
        seq.output.append(int(rng.choice(allowed)))


def test_masks_are_the_matchers_after_the_requests_own_tokens_on_any_aw():
    """A request walked 9 tokens on one AW's Grammars gets the same mask on a fresh one (a moved
    request: rebuilt from its tokens) and after an output restart; rows without a grammar allow
    everything; the masks only allow text that can still become SCHEMA's JSON."""
    rng = fresh_rng()
    cfg, _ = tiny_model("qwen3_moe")
    vocab, tok = byte_vocab(cfg)
    here, moved_to = Grammars(vocab), Grammars(vocab)
    seq = Sequence(0, [5, 6], SamplingParams(grammar=json_grammar(SCHEMA)), 100)
    plain = Sequence(1, [5, 6], SamplingParams(), 100)
    _walk(here, seq, rng, 9)
    assert tok.decode(seq.output).startswith('{"')
    mask = here.masks([plain, seq], 4)
    assert (mask[[0, 2, 3]] == -1).all()
    np.testing.assert_array_equal(moved_to.masks([seq], 1)[0], mask[1])
    restarted = Sequence(0, [5, 6], seq.sampling, 100)        # the restart baseline regenerates from scratch
    np.testing.assert_array_equal(here.masks([restarted], 1)[0], Grammars(vocab).masks([restarted], 1)[0])
    assert here.masks([plain], 4) is None
    here.release(0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_parse_and_validate(temperature):
    """12 requests on 2 AWs x 4 EWs, some asking for SCHEMA, some for another schema, some for
    nothing: each structured answer ends with EOS and is JSON of its schema; the plain ones equal
    a run without any structured request (a grammar changes no one else's tokens). (Any JSON
    object, json_object, has no bound a random model must reach: its keys may run on.)"""
    rng = fresh_rng()
    cfg, params = tiny_model("qwen3_moe", seed=int(rng.integers(1 << 30)))
    vocab, tok = byte_vocab(cfg)
    prompts = [rng.integers(3, 256, int(rng.integers(3, 12))).tolist() for _ in range(12)]
    flag = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}
    grammars = [json_grammar(SCHEMA), json_grammar(flag), None] * 4
    sp = lambda g, i: SamplingParams(max_new_tokens=96, temperature=temperature, seed=i, grammar=g)

    def run(with_grammars: bool) -> list:
        eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=4), vocab=vocab)
        ids = [eng.submit(p, sp(g if with_grammars else None, i)) for i, (p, g) in enumerate(zip(prompts, grammars))]
        for _ in eng.stream():
            pass
        eng.close()
        return [eng.requests[r] for r in ids]
    structured, plain = run(True), run(False)
    for seq, g, alone in zip(structured, grammars, plain):
        if g is None:
            assert seq.output == alone.output
            continue
        assert seq.finish_reason == "stop" and seq.output[-1] in vocab.eos_ids, tok.decode(seq.output)
        text = tok.decode(seq.output[:-1])
        assert follows_schema(text) if g == grammars[0] else type(json.loads(text)["ok"]) is bool, text


@pytest.mark.parametrize("faults", [["ew:1@step=4,layer=1"], ["aw:0@step=5"]])
def test_structured_tokens_are_identical_through_failures(model, faults):
    """Sampled under SCHEMA's grammar: a request moved to the other AW rebuilds its matcher from
    its tokens, so every token is the failure-free run's."""
    cfg, params, early, late, _ = model
    vocab, _ = byte_vocab(cfg)
    sampling = dict(temperature=1.0, seed=5, grammar=json_grammar(SCHEMA))
    clean, eng = serve(cfg, params, early, late, sampling=sampling, vocab=vocab, eplb=False)
    eng.close()
    outs, eng = serve(cfg, params, early, late, faults, sampling=sampling, vocab=vocab)
    eng.close()
    assert len(eng.controller.records) == len(faults) and outs == clean


def test_bad_grammars_and_a_missing_tokenizer_are_refused():
    cfg, params = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="JSON schema not usable"):
        json_grammar({"type": "object", "properties": {"x": {"type": "no-such-type"}}})
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=1, num_expert_workers=2))
    with pytest.raises(RequestError, match="needs the checkpoint's tokenizer"):
        eng.submit([3, 4], SamplingParams(grammar=json_grammar(SCHEMA)))
    eng.close()
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=1, num_expert_workers=2), vocab=byte_vocab(cfg)[0])
    with pytest.raises(RequestError, match="grammar not valid"):
        eng.submit([3, 4], SamplingParams(grammar="start: ( "))
    eng.close()
