"""logit_bias and the repetition / frequency / presence penalties (SamplingParams): applied on
the device before the token is chosen, equal to a numpy reference of vLLM's semantics, greedy
tokens equal to the dense reference with that processor, nothing changed for requests that ask
for none, and tokens identical through EW and AW failures."""
import numpy as np
import pytest

from tarragon_jax.config import ConfigError, EngineConfig, SamplingParams
from tarragon_jax.model import reference
from tarragon_jax.model.sampling import adjust
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.errors import RequestError
from tarragon_jax.serving.engine import Engine
from tarragon_jax.workers.logit_adjust import adjust_inputs
from tarragon_jax.workers.sequence import Sequence
from seeding import fresh_rng
from tests.fault_workload import PENALIZED, model, serve  # noqa: F401 -- the shared workload fixture


def _random_sampling(rng, V: int, **kw) -> SamplingParams:
    bias = tuple((int(t), float(rng.uniform(-100, 100))) for t in rng.choice(V, rng.integers(0, 6), replace=False))
    return SamplingParams(logit_bias=bias, repetition_penalty=float(rng.uniform(0.5, 2.0)),
                          frequency_penalty=float(rng.uniform(-2, 2)), presence_penalty=float(rng.uniform(-2, 2)), **kw)


@pytest.mark.parametrize("rows,vocab", [(1, 64), (4, 512), (8, 1000)])
def test_adjust_is_the_reference_and_leaves_rows_that_ask_nothing_bit_for_bit(rows, vocab):
    rng = fresh_rng()
    seqs = []
    for r in range(rows - 1):
        seq = Sequence(r, rng.integers(0, vocab, rng.integers(1, 90)).tolist(),
                       _random_sampling(rng, vocab) if r % 3 != 1 else SamplingParams(), 200)
        seq.output = rng.integers(0, vocab, rng.integers(0, 40)).tolist()
        seqs.append(seq)
    R = rows + 2                                            # padding rows
    logits = rng.standard_normal((R, vocab)).astype(np.float32) * 4
    inputs = adjust_inputs(seqs, R, vocab)
    if inputs is None:
        assert not any(s.sampling.adjusts_logits for s in seqs)
        return
    got = np.asarray(adjust(logits, *inputs))
    for r in range(R):
        if r < len(seqs) and seqs[r].sampling.adjusts_logits:
            s = seqs[r]
            np.testing.assert_allclose(got[r], reference.adjusted(logits[r], s.prompt, s.output, s.sampling), rtol=1e-6, atol=1e-5)
        else:
            assert np.array_equal(got[r], logits[r])


def test_greedy_tokens_are_the_references_and_a_request_asking_nothing_is_unchanged():
    """2 AWs x 4 EWs: greedy requests with bias and penalties equal the dense reference with the
    numpy processor; one asking nothing in the same batches equals plain greedy."""
    rng = fresh_rng()
    cfg, params = tiny_model("qwen3_moe", seed=int(rng.integers(1 << 30)))
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=4, prefill_chunk=8))
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (6, 11, 4, 9)]
    repeat = prompts[0] * 3                                  # repetition to penalize
    asks = [SamplingParams(max_new_tokens=8, repetition_penalty=1.8),
            SamplingParams(max_new_tokens=8, frequency_penalty=1.5, presence_penalty=0.7),
            _random_sampling(rng, cfg.vocab_size, max_new_tokens=8),
            SamplingParams(max_new_tokens=8)]
    ids = [eng.submit(p, sp) for p, sp in zip([repeat] + prompts[1:], asks)]
    for _ in eng.stream():
        pass
    eng.close()
    for rid, prompt, sp in zip(ids, [repeat] + prompts[1:], asks):
        assert eng.requests[rid].output == reference.greedy_generate(cfg, params, prompt, sp.max_new_tokens, sp)
    assert eng.requests[ids[-1]].output == reference.greedy_generate(cfg, params, prompts[-1], 8)


def test_a_large_bias_forces_its_token_and_a_negative_one_bans_it():
    cfg, params = tiny_model("qwen3_moe", seed=2)
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=1, num_expert_workers=2))
    prompt = fresh_rng().integers(3, cfg.vocab_size, 7).tolist()
    plain = reference.greedy_generate(cfg, params, prompt, 6)
    forced = eng.submit(prompt, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, logit_bias=((42, 100.0),)))
    banned = eng.submit(prompt, SamplingParams(max_new_tokens=6, logit_bias=tuple((t, -100.0) for t in set(plain))))
    for _ in eng.stream():
        pass
    eng.close()
    assert eng.requests[forced].output == [42] * 6
    assert not set(eng.requests[banned].output) & set(plain)


@pytest.mark.parametrize("faults", [["ew:1@step=4,layer=1"], ["aw:0@step=5"], ["ew:2@step=3,layer=0", "aw:1@step=7"]])
def test_penalized_sampled_tokens_are_identical_through_failures(model, faults):
    """Sampled with bias and penalties: a request moved to the other AW, or replayed on a
    replica, builds its penalties from its own tokens and draws with its own key, so the tokens
    are those of the failure-free run."""
    cfg, params, early, late, _ = model
    clean, eng = serve(cfg, params, early, late, sampling=PENALIZED, eplb=False)
    eng.close()
    outs, eng = serve(cfg, params, early, late, faults, sampling=PENALIZED)
    eng.close()
    assert len(eng.controller.records) == len(faults) and outs == clean


def test_bad_penalties_and_bias_are_refused():
    with pytest.raises(ConfigError, match=r"presence_penalty must be a number in \[-2, 2\]"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(ConfigError, match="logit_bias"):
        SamplingParams(logit_bias=((3, 101.0),))
    with pytest.raises(ConfigError, match="logit_bias must be a tuple of up to 300"):
        SamplingParams(logit_bias=tuple((t, 1.0) for t in range(301)))
    cfg, params = tiny_model("qwen3_moe")
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=1, num_expert_workers=2))
    with pytest.raises(RequestError, match=r"logit_bias token id 512 out of range \[0, 512\)"):
        eng.submit([3, 4], SamplingParams(logit_bias=((512, 1.0),)))
    eng.close()
