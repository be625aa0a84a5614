"""The fault tests' shared workload: a tiny Qwen3-MoE engine (2 AWs x 4 EWs, on the runtime
TARRAGON_TEST_RUNTIME names), four prompts plus two that join at step 3, and its failure-free
tokens with --noeplb as the `model` fixture."""
import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer

from tarragon_jax.config import CacheConfig, EngineConfig, SamplingParams
from tarragon_jax.control.faults import FaultInjector
from tarragon_jax.model import byte_tokenizer
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine
from tarragon_jax.workers.grammar import Vocabulary

CACHE = CacheConfig(page_size=4, num_pages=96)
RUNTIME = os.environ.get("TARRAGON_TEST_RUNTIME", "local")
# sampled, with logit bias and every penalty: what a request's own tokens and seed decide
PENALIZED = dict(temperature=0.9, seed=11, repetition_penalty=1.3, frequency_penalty=0.8, presence_penalty=0.4,
                 logit_bias=((5, 4.0), (9, -3.0)))
# a JSON schema every structured request here follows: bounded, so a random model ends it
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "size": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
          "required": ["name", "size"], "additionalProperties": False}


def follows_schema(text: str) -> bool:
    """The text is JSON following SCHEMA."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (isinstance(obj, dict) and set(obj) <= {"name", "size", "tags"} and {"name", "size"} <= set(obj)
            and isinstance(obj["name"], str) and len(obj["name"]) <= 12
            and type(obj["size"]) is int and 0 <= obj["size"] <= 999
            and all(t in ("a", "b", "c") for t in obj.get("tags", [])) and len(obj.get("tags", [])) <= 3)


def workload(seed, vocab):
    rng = np.random.default_rng(seed)
    early = [rng.integers(3, vocab, n).tolist() for n in (5, 13, 3, 9)]
    late = [rng.integers(3, vocab, n).tolist() for n in (7, 4)]
    return early, late


def serve(cfg, params, early, late, faults=(), wait_store=False, before_step=None, sampling=None, vocab=None,
          **engine_kw):
    """The workload (late prompts join at step 3); before_step(engine) runs before every step;
    sampling: more SamplingParams fields for every request (logprobs, ...); vocab: the Engine's."""
    kw = dict(num_attention_workers=2, num_expert_workers=4, prefill_chunk=8, runtime=RUNTIME)
    kw.update(engine_kw)
    eng = Engine(cfg, params, EngineConfig(**kw), CACHE, faults=FaultInjector.from_strings(faults),
                 load_params=lambda: params, vocab=vocab)
    sp = SamplingParams(max_new_tokens=12, **(sampling or {}))
    ids = [eng.submit(p, sp) for p in early]
    while eng.has_work:
        if eng.step_index == 3:
            ids += [eng.submit(p, sp) for p in late]
        if wait_store and eng.controller.store is not None:
            eng.controller.store.wait()      # make snapshots committed before the fault fires
        if before_step is not None:
            before_step(eng)
        eng.step()
    eng.controller.wait_recoveries()
    outs = [list(eng.requests[i].output) for i in ids]
    return outs, eng


def byte_vocab(cfg) -> tuple[Vocabulary, Tokenizer]:
    """The byte tokenizer as the vocabulary structured outputs of the tiny model follow."""
    tok = byte_tokenizer.byte_tokenizer(cfg.vocab_size)
    return Vocabulary(tok.to_str(), (tok.token_to_id(byte_tokenizer.EOS),), cfg.vocab_size), tok


@pytest.fixture(scope="module")
def model():
    cfg, params = tiny_model("qwen3_moe", seed=3)
    early, late = workload(7, cfg.vocab_size)
    clean, eng = serve(cfg, params, early, late, eplb=False)   # the paper's idle shadows: every
    eng.close()                                                   # faulted run (eplb by default) must match
    return cfg, params, early, late, clean
