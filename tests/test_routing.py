import numpy as np
import pytest

from tarragon_jax.control.placement import place, shadow_slots_per_layer
from tarragon_jax.workers.routing_table import CHOICES, NoLiveReplica, Replica, RoutingTable


def coverage_after_loss(placement, ew: int) -> float:
    """Fraction of (layer, expert) pairs that still have a live replica if `ew` dies."""
    lost = len(placement.ert.without_ew(ew).orphans())
    return 1.0 - lost / (placement.n_layers * placement.n_experts)


def test_primary_placement_covers_every_expert_once():
    p = place(n_layers=3, n_experts=8, n_ews=3, shadow_budget=0.0)
    hosted, ert = [p.primaries[w] for w in p.ews], p.ert
    assert ert.version == 0 and ert.ews() == {0, 1, 2}
    for layer in range(3):
        all_hosted = sorted(e for w in range(3) for e in hosted[w][layer])
        assert all_hosted == list(range(8))
        for e in range(8):
            r = ert.resolve(layer, e)
            assert hosted[r.ew][layer][r.slot] == e
    table = ert.arrays()[1]                                   # [E, CHOICES, 2]: no shadow, one replica each
    assert table.shape == (8, CHOICES, 2)
    assert (table[:, :, 0] == np.arange(8)[:, None] % 3).all() and (table[:, :, 1] == np.arange(8)[:, None] // 3).all()


def test_routing_table_rejects_missing_replicas():
    with pytest.raises(NoLiveReplica, match=r"\(0, 1\)"):
        RoutingTable.build(1, 2, {(0, 0): (Replica(0, 0),)})


def test_resolve_prefers_first_replica():
    ert = RoutingTable.build(1, 1, {(0, 0): (Replica(2, 1), Replica(0, 0))}, version=4)
    assert ert.resolve(0, 0) == Replica(2, 1) and ert.version == 4


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
        new.arrays()


def test_shares_lay_out_the_device_table():
    a, b, c = Replica(0, 0), Replica(1, 2), Replica(2, 1)
    ert = RoutingTable.build(1, 1, {(0, 0): (a, b, c)}, shares={(0, 0): (3.0, 1.0, 0.0)})
    entries = ert.choices(0, 0)
    assert entries == [a] * 24 + [b] * 8               # a block per replica, as long as its share
    turned = RoutingTable.build(1, 1, {(0, 0): (a, b, c)}, shares={(0, 0): (3.0, 1.0, 0.0)}, rotations={(0, 0): 5})
    assert turned.choices(0, 0) == [b] * 5 + [a] * 24 + [b] * 3      # entry i holds the block row's i - 5
    assert turned.without_ew(2).choices(0, 0) == turned.choices(0, 0)  # a failure keeps the rotation
    assert ert.resolve(0, 0) == a
    assert [tuple(x) for x in ert.arrays()[0][0]] == [(r.ew, r.slot) for r in entries]
    after = ert.without_ew(0)                          # b keeps its share; the shadow c stays idle
    assert after.choices(0, 0) == [b] * CHOICES and after.shares(0, 0) == (1.0, 0.0)
    shadow_only = after.without_ew(1)                  # only a share-0 replica left: it takes over
    assert shadow_only.choices(0, 0) == [c] * CHOICES
    with pytest.raises(ValueError, match="do not match"):
        RoutingTable.build(1, 1, {(0, 0): (a, b)}, shares={(0, 0): (1.0,)})


def test_replace_keeps_the_other_experts_shares():
    a, b = Replica(0, 0), Replica(1, 0)
    ert = RoutingTable.build(1, 2, {(0, 0): (a, b), (0, 1): (b, a)}, shares={(0, 0): (1.0, 1.0)}, version=2)
    new = ert.replace({(0, 1): (a,)})
    assert new.version == 3 and new.shares(0, 0) == (0.5, 0.5) and new.replicas(0, 1) == (a,)
    assert ert.replicas(0, 1) == (b, a)


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


def test_budget_zero_has_no_shadows():
    p = place(3, 8, 3, 0.0)
    assert all(s == [[], [], []] for s in p.shadows.values())
    assert all(len(p.ert.replicas(l, e)) == 1 for l in range(3) for e in range(8))


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


# ---- the device's choice among replicas ---------------------------------------------------------
def test_a_steps_pairs_split_over_replicas_by_share():
    """An expert's pairs in one step walk consecutive table entries: with two equal replicas,
    2 x CHOICES pairs split exactly in half and up to TOGETHER stay on one replica; one pair a
    step alternates over steps; every AW starts an expert's pairs of a step at the same entry
    (the salt is the step number, not the AW's tokens)."""
    import jax.numpy as jnp

    from tarragon_jax.model.attention_stage import TOGETHER, _choice
    from tests.seeding import fresh_rng
    rng = fresh_rng()
    T, k, E = 128, 2, 4                                          # 2 * CHOICES pairs of each expert
    ids = rng.permutation(np.repeat(np.arange(E, dtype=np.int32), T * k // E)).reshape(T, k)
    ert = RoutingTable.build(1, E, {(0, e): (Replica(e % 2, e), Replica(1 - e % 2, e)) for e in range(E)},
                             shares={(0, e): (1.0, 1.0) for e in range(E)})
    table = ert.arrays()[0]
    step = jnp.uint32(rng.integers(0, 2**31))
    v = np.asarray(_choice(jnp.asarray(ids), step, CHOICES))
    ew = table[ids, v, 0]
    for e in range(E):
        mine = ew[ids == e]
        assert int((mine == 0).sum()) == int((mine == 1).sum()) == CHOICES   # split within one step
    together = [len({int(table[0, c, 0]) for c in np.asarray(_choice(jnp.zeros((TOGETHER, 1), jnp.int32), jnp.uint32(p),
                                                                   CHOICES))[:, 0]}) for p in range(64)]
    assert together.count(1) == 64                          # up to TOGETHER pairs are never split
    one = [int(table[0, int(_choice(jnp.zeros((1, 1), jnp.int32), jnp.uint32(p), CHOICES)[0, 0]), 0])
           for p in range(64)]
    assert 28 <= one.count(0) <= 36                    # one pair a step: both serve, evenly (Weyl salt)
    other = rng.permutation(ids)                                                 # another AW's pairs, same step
    w = np.asarray(_choice(jnp.asarray(other), step, CHOICES))
    for e in range(E):                      # each AW's first pair of an expert takes the same entry
        assert v[ids == e][0] == w[other == e][0]
