import pytest

from tarragon_jax.placement import primary_placement
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
