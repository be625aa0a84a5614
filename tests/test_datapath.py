"""The shape of the datapath: a decode step dispatches everything and waits once.

Blocking waits and device-to-host pulls per step do not grow with the number of layers, with
resilience on and off (the transport counts both). And nothing else in a step reads a device
value on the host: one step's embedding is made slow (a busy program the CPU runtime dispatches
asynchronously), so every later program of the step depends on it; when the step reaches its one
wait, that embedding must still be running. A hidden np.asarray / int() / .item() of anything
the step computed would have waited for it. (jax.transfer_guard cannot check this: on CPU a
device-to-host read is no transfer, and np.asarray reads through the buffer protocol.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tarragon_jax.config import CacheConfig, EngineConfig, SamplingParams
from tarragon_jax.model import reference
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine
from tarragon_jax.workers.attention_worker import AttentionWorker
from tarragon_jax.workers.transport import Transport
from seeding import fresh_rng


@jax.jit
def _slow_identity(x):
    busy = jax.lax.fori_loop(0, 150, lambda i, a: jnp.tanh(a @ a), jnp.full((512, 512), 0.01) + x[0, 0])
    return x + 0.0 * busy[0, 0]          # tanh keeps busy finite: x unchanged


@pytest.fixture
def slow_step(monkeypatch):
    """Arm to make the next step's embedding slow; records whether it was still running when the
    step reached its wait."""
    state = {"armed": False, "slow": [], "running_at_wait": []}
    begin, wait = AttentionWorker.begin, Transport.wait

    def slow_begin(self, batch, step):
        begin(self, batch, step)
        if state["armed"]:
            x = _slow_identity(self._carry[0])
            self._carry = (x,) + tuple(self._carry[1:])
            state["slow"].append(x)

    def watched_wait(self, results, trail):
        if state["slow"]:
            state["running_at_wait"].append(not any(x.is_ready() for x in state["slow"]))
            state["slow"], state["armed"] = [], False
        return wait(self, results, trail)
    monkeypatch.setattr(AttentionWorker, "begin", slow_begin)
    monkeypatch.setattr(Transport, "wait", watched_wait)
    return state


def _per_step(n_layers: int, resilience: bool, slow_step, logprobs: int | None = None) -> list[tuple[int, int]]:
    """(blocking waits, pulls) of each decode step, 2 AWs x 4 EWs, both AWs busy; the first decode
    step's embedding is slow. logprobs: what every request asks."""
    cfg, params = tiny_model("qwen3_moe", seed=11, n_layers=n_layers)
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=4, resilience=resilience,
                                           heartbeat_interval_s=1e3),
                 CacheConfig(page_size=4, num_pages=64))
    rng = fresh_rng()
    prompts = [rng.integers(3, cfg.vocab_size, 5).tolist() for _ in range(4)]
    ids = [eng.submit(p, SamplingParams(max_new_tokens=6, logprobs=logprobs)) for p in prompts]
    eng.step()                                       # prefill (and compiles)
    eng.step()                                       # the first decode step compiles its shapes
    slow_step["armed"] = True
    t, counts = eng.controller.transport, []
    while eng.has_work:
        before = (t.waits, t.pulls)
        eng.step()
        counts.append((t.waits - before[0], t.pulls - before[1]))
    for rid, p in zip(ids, prompts):
        assert eng.requests[rid].output == reference.greedy_generate(cfg, params, p, 6)
    eng.close()
    return counts


@pytest.mark.parametrize("resilience, logprobs", [(True, None), (False, None), (True, 3)])
def test_one_wait_per_step_and_no_host_read_inside_it(resilience, logprobs, slow_step):
    shallow = _per_step(2, resilience, slow_step, logprobs)
    deep = _per_step(8, resilience, slow_step, logprobs)
    assert shallow == deep == [(1, 2)] * 4           # one wait; one pull per AW (its tokens, and logprobs)
    assert slow_step["running_at_wait"] == [True, True]


def test_a_hidden_read_is_caught(slow_step, monkeypatch):
    """The instrument works: a host read slipped in after a layer program finds the step done."""
    attend = AttentionWorker.attend

    def attend_and_peek(self, layer):
        out = attend(self, layer)
        np.asarray(self._carry[0])
        return out
    monkeypatch.setattr(AttentionWorker, "attend", attend_and_peek)
    _per_step(2, True, slow_step)
    assert slow_step["running_at_wait"] == [False]
