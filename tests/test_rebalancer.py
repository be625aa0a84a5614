"""Load-balanced replicas (--eplb) keep every token: shares rebalanced every window, experts moved
between EWs in place (no recompile), an EW killed with replicas serving, and a kill during a
move; each against the same workload's tokens with --noeplb."""
import pytest

from tarragon_jax.control import eplb
from tarragon_jax.control.rebalancer import MOVING
from tarragon_jax.model.expert_stage import expert_layer
from tarragon_jax.workers.expert_worker import _set_slot
from tests.fault_workload import RUNTIME, model, serve as _serve  # noqa: F401 -- the shared workload fixture


def _eplb(model, faults=(), before_step=None, check=None, **kw):
    """The workload with --eplb: tokens as with --noeplb; check(engine) runs before it closes."""
    cfg, params, early, late, clean = model
    kw = {"eplb": True, "eplb_window_s": 1e-3, **kw}
    outs, eng = _serve(cfg, params, early, late, faults, before_step=before_step, **kw)
    try:
        assert outs == clean
        assert all(len(o) == 12 for o in outs)
        if check is not None:
            check(eng)
    finally:
        eng.close()
    return eng


def test_every_replica_serves_and_tokens_match_noeplb(model):
    def every_ew_served(eng):
        rows = {ew.index: ew.rows_served() for ew in eng.controller.ews}
        assert all(r > 0 for r in rows.values()), (rows, eng.controller.records, eng.controller.placement.ert)
    eng = _eplb(model, check=every_ew_served)
    reb = eng.controller.rebalancer
    assert reb.rebalances >= 1 and reb.windows                     # load was read and shares published
    w = reb.windows[-1]
    assert sum(map(sum, w.expert_rows)) == sum(map(sum, w.ew_rows.values()))   # every row attributed


def _skew_plans(eng):
    """Plans that move experts: the experts EW 0 holds are hot, and a fresh packing is taken."""
    c = eng.controller
    live = {ew.index: ew for ew in c.ews}
    plans = []
    for layer in range(c.model.n_moe_layers):
        loads = [1.0] * c.model.n_experts
        for e in live[0].slots[layer]:
            loads[e] = 10.0
        plans.append(eplb.plan_layer(loads, {j: list(ew.slots[layer]) for j, ew in live.items()},
                                     tolerance=0.0, min_gain=-1.0))
    assert any(p.moves for p in plans)
    return plans


def test_moves_overwrite_slots_in_place_without_recompiling(model):
    seen = {}

    def before_step(eng):
        c = eng.controller
        if eng.step_index == 4:
            seen["compiled"] = (expert_layer._cache_size(), _set_slot._cache_size())
            seen["moves"] = [m for p in _skew_plans(eng) for m in p.moves]
            c.rebalancer._carry_out(_skew_plans(eng))
            assert any(MOVING in s for ew in c.ews for s in ew.slots)         # the first round is loading
    eng = _eplb(model, before_step=before_step, precompile="all", eplb_window_s=1e9)
    c = eng.controller
    assert c.rebalancer.moves >= 1
    assert not any(MOVING in s for ew in c.ews for s in ew.slots)             # every round finished
    if RUNTIME == "local":
        assert (expert_layer._cache_size(), _set_slot._cache_size()) == seen["compiled"]
    for ew in c.ews:                                                           # the table matches the slots
        for layer in range(c.model.n_moe_layers):
            assert ew.slots[layer] == c.placement.slots(ew.index, layer)
            for slot, e in enumerate(ew.slots[layer]):
                assert ew.index in {r.ew for r in c.ert.replicas(layer, e)}


@pytest.mark.parametrize("faults", [["ew:1@step=5,layer=1"], ["ew:2@step=4", "aw:0@step=8"]])
def test_failures_with_every_replica_serving(model, faults):
    eng = _eplb(model, faults)
    assert len(eng.controller.records) == len(faults)


def _table_matches_slots(c):
    """Every replica in the table points at a slot that holds its expert, and no slot is mid-move."""
    for layer in range(c.model.n_moe_layers):
        for e in range(c.model.n_experts):
            for r in c.ert.replicas(layer, e):
                assert c.ews[r.ew].slots[layer][r.slot] == e, (layer, e, r)
    assert not any(MOVING in s for ew in c.ews for s in ew.slots)


def test_a_failure_during_a_move_drops_the_rebalance(model):
    def before_step(eng):
        if eng.step_index == 4:
            eng.controller.rebalancer._carry_out(_skew_plans(eng))
    eng = _eplb(model, ["ew:0@step=5,layer=0"], before_step=before_step, eplb_window_s=1e9)
    c = eng.controller
    assert len(c.records) == 1 and c.rebalancer.moves >= 1
    _table_matches_slots(c)


@pytest.mark.ray
@pytest.mark.skipif(RUNTIME != "local", reason="the whole module already runs on worker processes")
def test_moves_and_a_kill_on_worker_processes(model):
    """The process runtime: slot counters and in-place moves are calls to the EW processes, and
    an EW process is SIGKILLed while every replica serves; tokens as with --noeplb."""
    def before_step(eng):
        if eng.step_index == 3:
            eng.controller.rebalancer._carry_out(_skew_plans(eng))

    def moved_and_counted(eng):
        c = eng.controller
        assert c.rebalancer.moves >= 1 and len(c.records) == 1
        _table_matches_slots(c)
        assert sum(ew.rows_served() for ew in c.ews if not c.health.is_failed(ew.handle.name)) > 0
    _eplb(model, ["ew:2@step=6"], before_step=before_step, check=moved_and_counted, runtime="ray",
          eplb_window_s=1e9)
