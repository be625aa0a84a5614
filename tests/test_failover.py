"""The invariant under injected faults: every request's tokens equal the failure-free run's and
no request is lost — EW failure, AW failure, both, a failure during a recovery, during prefill,
with no shadow left, a lost snapshot, and the restart baseline.

CI runs these on the local runtime. `TARRAGON_TEST_RUNTIME=ray pytest tests/test_failover.py`
runs the same tests with every worker its own Ray process (about 5x longer); the two tests that
plant a fault by patching a class in this process cannot reach the worker processes and say so
(their ray counterparts, a killed store and a hung EW process, are in test_ray_runtime.py)."""
import time

import pytest

from tarragon_jax.config import EngineConfig, SamplingParams
from tarragon_jax.control.faults import FaultInjector
from tarragon_jax.kv.checkpoint_store import SnapshotCorrupt
from tarragon_jax.model.tiny import tiny_model
from tarragon_jax.serving.engine import Engine
from tests.fault_workload import CACHE, RUNTIME, model, serve as _serve, workload as _workload  # noqa: F401 -- fixture

SLOW = RUNTIME != "local"          # ray steps take ~40 ms here (local ~5), and first calls compile in each process
in_this_process = pytest.mark.skipif(RUNTIME != "local", reason="patches a class of this process; the workers "
                                     "are other processes under this runtime")


def _check(model, faults, **kw):
    cfg, params, early, late, clean = model
    outs, eng = _serve(cfg, params, early, late, faults, **kw)
    assert outs == clean
    assert all(len(o) == 12 for o in outs)                      # nobody lost, nobody cut short
    assert len(eng.controller.records) == len(faults)
    eng.close()
    return eng


def test_ew_failure_mid_layer_replays_to_shadows(model):
    eng = _check(model, ["ew:1@step=5,layer=1"])
    rec = eng.controller.records[0]
    assert rec.kind == "ew" and rec.detected_by == "call" and rec.detect_s is not None
    assert eng.replayed_rows > 0 and rec.orphans_loaded == 0
    assert rec.replacement_ready_s is not None                   # replacement EW joined while serving
    assert eng.ews[1].handle.alive and eng.controller.ert.version >= 2


def test_aw_failure_restores_committed_blocks(model):
    eng = _check(model, ["aw:0@step=9"], wait_store=True, snapshot_interval_s=0)    # snapshots every step
    rec = eng.controller.records[0]
    assert rec.kind == "aw" and rec.requests_moved > 0
    restored = eng.aws[1].restored
    assert restored.requests == rec.requests_moved and restored.blocks > 0 and restored.fallbacks == 0
    assert restored.tokens_recomputed < restored.requests * 4      # only the tail past the last full block


def test_snapshots_are_batched_over_the_interval(model):
    """An AW hands filled blocks to the store at most every snapshot_interval_s: with the interval
    longer than the run there is no snapshot call at all, and an AW failure then recomputes its
    requests from their tokens (the same tokens); with 0, a call in every step that filled one."""
    never = _check(model, ["aw:0@step=9"], wait_store=True, snapshot_interval_s=1e9)
    assert never.controller.store.stats["snapshots"] == 0 and never.aws[1].restored.blocks == 0
    assert never.aws[1].restored.fallbacks == never.controller.records[0].requests_moved > 0
    cfg, params, early, late, clean = model
    outs, each = _serve(cfg, params, early, late, snapshot_interval_s=0)
    batched, eng = _serve(cfg, params, early, late, snapshot_interval_s=0.3 if SLOW else 0.03,
                          before_step=lambda _: time.sleep(0.01))                 # a call every few steps
    assert outs == batched == clean
    assert 0 < eng.controller.store.stats["snapshots"] < each.controller.store.stats["snapshots"]
    each.close()
    eng.close()


def test_aw_failure_with_the_paged_attention_kernel(model):
    """The Pallas attention kernel (interpret mode here) is batch invariant, so restored and
    recomputed requests on the other AW decode exactly the kernel's failure-free tokens."""
    cfg, params, early, late, _ = model
    clean, _ = _serve(cfg, params, early, late, attention_backend="pallas")
    outs, eng = _serve(cfg, params, early, late, ["aw:0@step=9"], wait_store=True, attention_backend="pallas",
                       snapshot_interval_s=0)
    assert outs == clean and eng.aws[1].restored.blocks > 0
    eng.close()


def test_failures_under_pingpong(model):
    """An EW killed mid-layer and an AW killed later, with an EW call per AW (--pingpong): the
    replayed layer and the restored requests decode the failure-free tokens."""
    _check(model, ["ew:1@step=5,layer=1", "aw:0@step=9"], wait_store=True, pingpong=True)


def test_ew_and_aw_fail_at_once(model):
    _check(model, ["ew:2@step=6", "aw:1@step=6"])


def test_failure_during_recovery(model):
    # ew2 holds ew1's shadows (ring): losing it while ew1 is being replaced orphans experts,
    # which the controller loads from host memory
    eng = _check(model, ["ew:1@step=4", "ew:2@recovery"])
    assert eng.replayed_rows > 0


def test_failures_during_prefill(model):
    _check(model, ["aw:0@prefill", "ew:3@prefill"])


def test_no_shadow_left_loads_from_host(model):
    eng = _check(model, ["ew:0@step=4"], shadow_budget=0.0)
    assert eng.controller.records[0].orphans_loaded > 0


@in_this_process
def test_missing_snapshot_recomputes_from_tokens(model, monkeypatch):
    from tarragon_jax.kv.checkpoint_store import CheckpointStore

    def broken(self, request_id, num_blocks=None):
        raise SnapshotCorrupt(f"request {request_id}: checksum mismatch (injected)")
    monkeypatch.setattr(CheckpointStore, "restore", broken)
    eng = _check(model, ["aw:1@step=8"])
    assert eng.aws[0].restored.fallbacks == eng.controller.records[0].requests_moved > 0


def test_idle_worker_failure_found_by_heartbeat():
    cfg, params = tiny_model("mixtral", seed=5)
    eng = Engine(cfg, params, EngineConfig(num_attention_workers=2, num_expert_workers=2, heartbeat_interval_s=1e-6,
                                           runtime=RUNTIME), CACHE, faults=FaultInjector.from_strings(["aw:1@step=2"]))
    eng.submit([3, 4, 5], SamplingParams(max_new_tokens=6))           # lands on aw0; aw1 stays idle
    list(eng.stream())
    rec = eng.controller.records[0]
    assert rec.worker == "aw1" and rec.detected_by == "heartbeat" and rec.requests_moved == 0


@pytest.mark.parametrize("recovery", ["restart", "restart_regenerate"])
def test_restart_baselines_are_token_identical(model, recovery):
    """restart re-prefills each request's prompt and sent tokens in chunked passes; the weaker
    restart_regenerate redoes the sent tokens one step at a time: more steps, same tokens."""
    eng = _check(model, ["ew:1@step=5"], recovery=recovery)
    rec = eng.controller.records[0]
    assert rec.restart_s > 0 and rec.tokens_recomputed > 0
    if recovery == "restart_regenerate":
        reprefill = _check(model, ["ew:1@step=5"], recovery="restart")
        assert eng.step_index > reprefill.step_index


def test_aw_failure_restores_from_the_orbax_files(model):
    """Memory tier off: blocks commit only once written (a short window here), and the moved
    requests restore them from disk."""
    eng = _check(model, ["aw:0@step=9"], wait_store=True, snapshot_memory_tier=False, snapshot_flush_s=0.0)
    assert eng.aws[1].restored.blocks > 0 and eng.aws[1].restored.fallbacks == 0
    assert eng.controller.store.stats["memory_bytes"] == 0


def test_hung_expert_worker_injected_by_the_controller(model):
    """Controller.hang (what the failover bench injects): the EW stays alive but its device is
    busy for longer than the deadline; the deadline (at the step's wait or a heartbeat probe,
    which is polled, so it cannot stall the loop) finds it, and the tokens stay the same."""
    cfg, params, early, late, clean = model

    deadline = 5.0 if SLOW else 0.2

    def hang_at_step_5(eng):
        if eng.step_index == 5:
            eng.controller.hang("ew2", 5 * deadline)
    outs, eng = _serve(cfg, params, early, late, before_step=hang_at_step_5, transfer_deadline_s=deadline)
    assert outs == clean
    rec = eng.controller.records[0]
    assert rec.worker == "ew2" and rec.detected_by in ("call", "heartbeat") and rec.detect_s < deadline + 0.5
    eng.close()


@in_this_process
def test_hung_expert_worker_found_by_deadline(model, monkeypatch):
    """An EW that stops answering (alive, but its results never arrive in time) is declared
    failed by the step's bounded wait, which names it and the layer, and the step is replayed
    from there on shadows: same tokens."""
    import jax
    import jax.numpy as jnp
    from tarragon_jax.workers.expert_worker import ExpertWorker
    cfg, params, early, late, clean = model

    @jax.jit
    def stuck(y):       # answers only after ~0.5 s of work, and with garbage: using it changes tokens
        busy = jax.lax.fori_loop(0, 200, lambda i, x: jnp.tanh(x @ x), jnp.full((512, 512), 0.01) + y.reshape(-1)[0])
        return y * jnp.nan * busy.sum()

    run_layer = ExpertWorker.run_layer

    def hang_ew2(self, layer, bufs):
        out = run_layer(self, layer, bufs)
        return tuple(stuck(y) for y in out) if self.handle.name == "ew2" and hung[0] else out

    def hang_in_step_4(eng):
        hung[0] = eng.step_index == 4 and not eng.controller.records

    hung = [False]
    monkeypatch.setattr(ExpertWorker, "run_layer", hang_ew2)
    outs, eng = _serve(cfg, params, early, late, before_step=hang_in_step_4, transfer_deadline_s=0.1)
    assert outs == clean
    rec = eng.controller.records[0]
    assert rec.worker == "ew2" and rec.detected_by == "call" and eng.replayed_rows > 0
    assert "deadline" in [e.detail for e in eng.controller.health.events if e.kind == "failed"][0]
    eng.close()


def test_second_ew_dies_while_orphans_are_loaded(model):
    """No shadows, two EWs down in one step: loading the first one's orphans onto the second,
    dead but not yet detected, fails; that is a second failure, and the plan is made again."""
    eng = _check(model, ["ew:0@step=4", "ew:1@step=4"], shadow_budget=0.0)
    assert {r.worker for r in eng.controller.records} == {"ew0", "ew1"}
    assert eng.replayed_rows > 0


def test_replacement_that_fails_to_build_is_retried_until_it_joins(model, monkeypatch):
    """The background replacement raises twice (no device, out of memory): serving goes on on the
    survivors with identical tokens, the build is retried with backoff, the record counts the
    attempts and keeps the last error, and the third build joins."""
    from tarragon_jax.control import controller
    real, calls = controller.Controller._replacement, []

    def flaky(self, make, failed, rec):
        calls.append(time.perf_counter())
        if len(calls) < 3:
            raise RuntimeError(f"no device for the replacement (injected, {len(calls)})")
        return real(self, make, failed, rec)
    monkeypatch.setattr(controller.Controller, "_replacement", flaky)
    monkeypatch.setattr(controller, "RETRY_S", (0.2, 1.0))
    eng = _check(model, ["ew:1@step=5"])
    rec = eng.controller.records[0]
    assert rec.replacement_attempts == 3 and "(injected, 2)" in rec.replacement_error
    assert rec.replacement_ready_s is not None and not eng.controller.health.is_failed("ew1")
    assert calls[2] - calls[1] >= 0.4 - 0.05           # the backoff doubled


def test_replacement_that_hangs_while_joining_is_fenced_and_rebuilt(model, monkeypatch):
    """A replacement AW that stops answering as it joins (its store attach times out, as a
    SIGSTOPped process's does): the engine thread is not failed by it; the half-joined worker is
    fenced, another is built and joins, and the tokens are the failure-free ones."""
    from tarragon_jax.control import controller
    from tarragon_jax.errors import WorkerFailed
    real, joins, fenced = controller.Controller._join_aw, [], []

    def hangs_once(self, aw, rec, t0):
        joins.append(aw)
        if len(joins) == 1:
            aw.kill = lambda: fenced.append(aw)
            raise WorkerFailed(aw.handle.name, "no answer within the 1.000 s deadline (injected)")
        return real(self, aw, rec, t0)
    monkeypatch.setattr(controller.Controller, "_join_aw", hangs_once)
    monkeypatch.setattr(controller, "RETRY_S", (0.2, 1.0))
    eng = _check(model, ["aw:1@step=4"])
    rec = eng.controller.records[0]
    assert len(joins) == 2 and fenced == [joins[0]] and eng.controller.aws[1] is joins[1]
    assert rec.replacement_attempts == 2 and "(injected)" in rec.replacement_error


def test_deepseek_v3_failures_keep_the_tokens():
    """MLA caches (restored on the other AW), group-limited routing and a dense first layer: an EW
    killed during the dense layer (no EW call there: found at the next MoE layer) and an AW
    killed later leave every token as in the failure-free run."""
    cfg, params = tiny_model("deepseek_v3", seed=4)
    early, late = _workload(8, cfg.vocab_size)
    clean, eng = _serve(cfg, params, early, late)
    eng.close()
    outs, eng = _serve(cfg, params, early, late, ["ew:1@step=5,layer=0", "aw:0@step=9"], wait_store=True,
                       snapshot_interval_s=0)
    assert outs == clean and all(len(o) == 12 for o in outs)
    assert [r.kind for r in eng.controller.records] == ["ew", "aw"] and eng.aws[1].restored.blocks > 0
    eng.close()


def test_every_ew_down_at_once_waits_for_a_replacement(model):
    """Both EWs die in one step: no expert has a replica left, so the engine waits (a stall)
    for the first replacement to join, loads the orphaned experts onto it and replays; nobody
    fails and every token is as in the failure-free run."""
    eng = _check(model, ["ew:0@step=4,layer=1", "ew:1@step=4,layer=1"], num_expert_workers=2)
    assert all(r.replacement_ready_s is not None for r in eng.controller.records)
    assert eng.replayed_rows > 0


def test_every_aw_down_at_once_waits_for_a_replacement(model):
    """Both AWs die in one step: their requests wait for the first replacement AW to join, then
    restore there from the checkpoint store; every token is as in the failure-free run."""
    eng = _check(model, ["aw:0@step=6", "aw:1@step=6"], wait_store=True, snapshot_interval_s=0.0)
    assert eng.controller.records[-1].requests_moved == 6           # the last AW takes them all with it
    assert sum(a.restored.blocks for a in eng.aws) > 0
