"""The fault tests' shared workload: a tiny Qwen3-MoE engine (2 AWs x 4 EWs, on the runtime
TARRAGON_TEST_RUNTIME names), four prompts plus two that join at step 3, and its failure-free
tokens with --noeplb as the `model` fixture."""
import os

import numpy as np
import pytest

from tarragon_jax.config import CacheConfig, EngineConfig, SamplingParams
from tarragon_jax.control.faults import FaultInjector
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine

CACHE = CacheConfig(page_size=4, num_pages=96)
RUNTIME = os.environ.get("TARRAGON_TEST_RUNTIME", "local")
# sampled, with logit bias and every penalty: what a request's own tokens and seed decide
PENALIZED = dict(temperature=0.9, seed=11, repetition_penalty=1.3, frequency_penalty=0.8, presence_penalty=0.4,
                 logit_bias=((5, 4.0), (9, -3.0)))


def workload(seed, vocab):
    rng = np.random.default_rng(seed)
    early = [rng.integers(3, vocab, n).tolist() for n in (5, 13, 3, 9)]
    late = [rng.integers(3, vocab, n).tolist() for n in (7, 4)]
    return early, late


def serve(cfg, params, early, late, faults=(), wait_store=False, before_step=None, sampling=None, **engine_kw):
    """The workload (late prompts join at step 3); before_step(engine) runs before every step;
    sampling: more SamplingParams fields for every request (logprobs, ...)."""
    kw = dict(num_attention_workers=2, num_expert_workers=4, prefill_chunk=8, runtime=RUNTIME)
    kw.update(engine_kw)
    eng = Engine(cfg, params, EngineConfig(**kw), CACHE, faults=FaultInjector.from_strings(faults),
                 load_params=lambda: params)
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


@pytest.fixture(scope="module")
def model():
    cfg, params = tiny_model("qwen3_moe", seed=3)
    early, late = workload(7, cfg.vocab_size)
    clean, eng = serve(cfg, params, early, late, eplb=False)   # the paper's idle shadows: every
    eng.close()                                                   # faulted run (eplb by default) must match
    return cfg, params, early, late, clean
