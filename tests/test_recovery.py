import pytest

from tarragon_jax.control.placement import place
from tarragon_jax.control.recovery import RecoveryError, plan_aw_failure, plan_expert_routing
from tarragon_jax.workers.routing_table import Replica


def test_ew_failure_with_shadows_has_no_loads():
    p = place(2, 8, 4, 1.0)
    ert, loads = plan_expert_routing(p, {2}, {w: [p.slots(w, l) for l in range(2)] for w in (0, 1, 3)}, 5)
    assert loads == [] and ert.version == 5 and 2 not in ert.ews()
    assert ert.resolve(0, 2) == Replica(3, 2)               # the shadow on the next EW of the ring
    assert p.ert.resolve(0, 2) == Replica(2, 0)             # the placement's table is untouched


def test_no_shadow_loads_onto_least_loaded_ew_and_appends_slots():
    p = place(2, 8, 3, 0.0)          # slots per layer: EW0 3, EW1 3, EW2 2
    slots = {w: [p.slots(w, l) for l in range(2)] for w in (1, 2)}
    ert, loads = plan_expert_routing(p, {0}, slots, 1)
    # EW2 has the fewest slots, then ties go to the lower index as loads even out
    assert loads == [(2, 0, 0), (1, 0, 3), (2, 0, 6), (2, 1, 0), (1, 1, 3), (2, 1, 6)]
    assert ert.orphans() == [] and ert.resolve(0, 0) == Replica(2, 2) and ert.resolve(0, 6) == Replica(2, 3)
    assert ert.resolve(0, 3) == Replica(1, 3)


def test_cumulative_failures_reuse_loaded_experts():
    p = place(1, 4, 3, 0.0)          # EW0: 0, 3; EW1: 1; EW2: 2
    slots = {1: [[1, 0, 3]], 2: [[2]]}                       # EW0's experts were loaded on EW1 earlier
    ert, loads = plan_expert_routing(p, {0}, slots, 3)
    assert loads == [] and ert.resolve(0, 0) == Replica(1, 1) and ert.resolve(0, 3) == Replica(1, 2)
    ert, loads = plan_expert_routing(p, {0, 1}, {2: [[2]]}, 4)
    assert loads == [(2, 0, 0), (2, 0, 1), (2, 0, 3)] and ert.resolve(0, 3) == Replica(2, 3)
    with pytest.raises(RecoveryError, match="every expert worker has failed"):
        plan_expert_routing(p, {0, 1, 2}, {}, 5)


def test_aw_failure_round_robin_from_least_loaded():
    reqs = {0: [1, 2, 3], 1: [10, 11, 12, 13, 14], 2: [], 3: [20]}
    moves = plan_aw_failure(reqs, 1, [0, 2, 3])
    assert moves == {10: 2, 11: 3, 12: 0, 13: 2, 14: 3}
    assert plan_aw_failure(reqs, 1, [0, 1, 0]) == {r: 0 for r in reqs[1]}   # failed/duplicates ignored
    assert plan_aw_failure(reqs, 2, []) == {}


def test_aw_failure_with_no_healthy_aw_raises():
    with pytest.raises(RecoveryError, match=r"AW 0 failed and no healthy attention worker .* 2 requests \[5, 6\]"):
        plan_aw_failure({0: [5, 6]}, 0, [0])
