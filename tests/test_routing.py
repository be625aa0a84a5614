import pytest

from tarragon_jax.placement import (coverage_after_loss, place, primary_placement, replacement_placement,
                                    shadow_slots_per_layer)
from tarragon_jax.routing_table import NoLiveReplica, Replica, RoutingTable


def test_primary_placement_covers_every_expert_once():
    hosted, ert = primary_placement(n_layers=3, n_experts=8, n_ews=3)
    assert ert.version == 0 and ert.ews() == {0, 1, 2}
    for layer in range(3):
        all_hosted = sorted(e for w in range(3) for e in hosted[w][layer])
        assert all_hosted == list(range(8))
        for e in range(8):
            r = ert.resolve(layer, e)
            assert hosted[r.ew][layer][r.slot] == e
    ews, slots = ert.resolve_layer(1)
    assert ews == [e % 3 for e in range(8)] and slots == [e // 3 for e in range(8)]


def test_routing_table_rejects_missing_replicas():
    with pytest.raises(NoLiveReplica, match=r"\(0, 1\)"):
        RoutingTable.build(1, 2, {(0, 0): (Replica(0, 0),)})


def test_resolve_prefers_first_replica():
    ert = RoutingTable.build(1, 1, {(0, 0): (Replica(2, 1), Replica(0, 0))}, version=4)
    assert ert.resolve(0, 0) == Replica(2, 1) and ert.version == 4


def test_placement_validates():
    with pytest.raises(ValueError, match="host nothing"):
        primary_placement(1, 4, 5)


# ---- derived tables ----------------------------------------------------------------------------
def _table():
    return RoutingTable.build(2, 2, {(0, 0): (Replica(0, 0), Replica(1, 1)), (0, 1): (Replica(1, 0),),
                                     (1, 0): (Replica(0, 0),), (1, 1): (Replica(1, 0), Replica(0, 1))},
                              version=3)


def test_without_ew_bumps_version_and_keeps_old_table():
    ert = _table()
    new = ert.without_ew(0)
    assert new.version == 4 and ert.version == 3
    assert new.replicas(0, 0) == (Replica(1, 1),) and new.replicas(1, 1) == (Replica(1, 0),)
    assert ert.replicas(0, 0) == (Replica(0, 0), Replica(1, 1))          # old table untouched
    assert new.orphans() == [(1, 0)] and ert.orphans() == []
    assert new.ews() == {1}
    with pytest.raises(NoLiveReplica, match="expert 0 in layer 1"):
        new.resolve(1, 0)
    with pytest.raises(NoLiveReplica):
        new.resolve_layer(1)


def test_with_replicas_replaces_lists():
    ert = _table().without_ew(0)
    new = ert.with_replicas({(1, 0): (Replica(1, 2),)})
    assert new.version == 5 and new.orphans() == [] and new.resolve(1, 0) == Replica(1, 2)
    assert ert.orphans() == [(1, 0)]
    with pytest.raises(KeyError, match=r"\(2, 0\)"):
        ert.with_replicas({(2, 0): (Replica(1, 0),)})
    with pytest.raises(ValueError, match="duplicate"):
        ert.with_replicas({(0, 0): (Replica(1, 0), Replica(1, 0))})


def test_replicas_on_orders_by_layer_then_slot():
    assert _table().replicas_on(0) == [((0, 0), Replica(0, 0)), ((1, 0), Replica(0, 0)),
                                       ((1, 1), Replica(0, 1))]
    assert _table().replicas_on(7) == []


# ---- shadow placement --------------------------------------------------------------------------
COMBOS = [(8, 2), (8, 3), (8, 4), (8, 8), (6, 4), (16, 5), (60, 7)]


@pytest.mark.parametrize("n_experts,n_ews", COMBOS)
def test_full_budget_survives_any_single_ew_loss(n_experts, n_ews):
    p = place(3, n_experts, n_ews, 1.0)
    for w in range(n_ews):
        assert coverage_after_loss(p, w) == 1.0
        assert p.ert.without_ew(w).orphans() == []
    _check_consistent(p)


def _check_consistent(p):
    """ERT and slot lists agree; primary first; no EW holds an expert twice or shadows its own."""
    for w in p.ews:
        for l in range(p.n_layers):
            slots = p.slots(w, l)
            assert len(set(slots)) == len(slots)
            assert not set(p.primaries[w][l]) & set(p.shadows[w][l])
    for l in range(p.n_layers):
        for e in range(p.n_experts):
            reps = p.ert.replicas(l, e)
            assert reps[0].ew == e % len(p.ews) and reps[0].slot < len(p.primaries[reps[0].ew][l])
            for r in reps:
                assert p.slots(r.ew, l)[r.slot] == e


def test_budget_zero_equals_primary_placement():
    p = place(3, 8, 3, 0.0)
    hosted, ert = primary_placement(3, 8, 3)
    assert [p.primaries[w] for w in range(3)] == hosted
    assert all(s == [[], [], []] for s in p.shadows.values())
    assert all(p.ert.replicas(l, e) == ert.replicas(l, e) for l in range(3) for e in range(8))


def test_ring_shadows_previous_ew_and_orders_replicas():
    p = place(1, 8, 4, 1.0)
    assert p.primaries[1] == [[1, 5]] and p.shadows[1] == [[0, 4]]      # EW1 shadows EW0
    assert p.shadows[0] == [[3, 7]]                                      # EW0 shadows EW3
    assert p.ert.replicas(0, 4) == (Replica(0, 1), Replica(1, 3))
    p2 = place(1, 8, 4, 2.0)                                             # second ring round
    assert p2.ert.replicas(0, 4) == (Replica(0, 1), Replica(1, 3), Replica(2, 5))


def test_uneven_full_budget_uses_largest_share():
    p = place(2, 8, 3, 1.0)          # primaries 3, 3, 2 per layer: every EW gets 3 shadow slots
    assert [len(p.primaries[w][0]) for w in range(3)] == [3, 3, 2]
    assert all(len(p.shadows[w][l]) == 3 for w in range(3) for l in range(2))
    _check_consistent(p)


@pytest.mark.parametrize("n_experts,n_ews", [(8, 3), (8, 4), (16, 5)])
def test_partial_budget_coverage_is_monotone_and_balanced(n_experts, n_ews):
    worst_prev = -1.0
    for b in [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0]:
        p = place(4, n_experts, n_ews, b)
        cov = [coverage_after_loss(p, w) for w in range(n_ews)]
        assert min(cov) >= worst_prev
        worst_prev = min(cov)
        _check_consistent(p)
        # optimal worst case: only the dead EW's unshadowed primaries are lost
        slots = shadow_slots_per_layer(4, n_experts, n_ews, b)
        p_max = -(-n_experts // n_ews)
        lost = sum(max(0, p_max - s) for s in slots)
        assert min(cov) == pytest.approx(1 - lost / (4 * n_experts))
    assert worst_prev == 1.0


def test_partial_budget_rotates_unprotected_experts_over_layers():
    p = place(4, 8, 2, 0.5)          # 2 shadow slots of 4 per layer
    unprotected = [{e for e in range(8) if len(p.ert.replicas(l, e)) == 1} for l in range(4)]
    assert len(set.union(*unprotected)) == 8 and all(len(u) == 4 for u in unprotected)
    assert place(4, 8, 2, 0.5) == p                                      # deterministic


def test_single_ew_has_no_shadows():
    p = place(2, 4, 1, 1.0)
    assert p.shadows == {0: [[], []]} and coverage_after_loss(p, 0) == 0.0


def test_place_validates():
    with pytest.raises(ValueError, match="shadow_budget"):
        place(1, 8, 2, -0.5)
    with pytest.raises(ValueError, match="host nothing"):
        place(1, 4, 5, 1.0)


@pytest.mark.parametrize("new_ew", [1, 9])
def test_replacement_takes_over_failed_slots(new_ew):
    p = place(2, 8, 3, 1.0)
    r = replacement_placement(p, 1, new_ew)
    assert r.ert.version == p.ert.version + 1 and p.ert.version == 0
    assert r.primaries[new_ew] == p.primaries[1] and r.shadows[new_ew] == p.shadows[1]
    assert r.ews == sorted({0, 2, new_ew})
    for l in range(2):
        for e in range(8):
            old, new = p.ert.replicas(l, e), r.ert.replicas(l, e)
            assert [x.slot for x in old] == [x.slot for x in new]
            assert [new_ew if x.ew == 1 else x.ew for x in old] == [x.ew for x in new]
            for x in new:
                assert r.slots(x.ew, l)[x.slot] == e
    if new_ew != 1:
        assert 1 not in r.ert.ews() and 1 not in r.primaries
    assert replacement_placement(p, 1, 1, version=7).ert.version == 7
    with pytest.raises(ValueError, match="already hosts"):
        replacement_placement(p, 1, 2)
    with pytest.raises(KeyError):
        replacement_placement(p, 5, 6)
