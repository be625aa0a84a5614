"""Placement of routed experts on expert workers: which (layer, expert) lives in which EW slot.

Primaries are spread round-robin (expert e of every layer on EW e % M), which balances load when
routing is uniform. Returns the per-EW slot lists and the routing table that points at them.
"""
from __future__ import annotations

from tarragon_jax.routing_table import Replica, RoutingTable


def primary_placement(n_layers: int, n_experts: int, n_ews: int) -> tuple[list[list[list[int]]], RoutingTable]:
    """Returns (hosted[ew][layer] = [expert ids in slot order], ERT version 0)."""
    if n_ews < 1:
        raise ValueError(f"need at least one expert worker, got {n_ews}")
    if n_ews > n_experts:
        raise ValueError(f"{n_ews} expert workers for {n_experts} experts: some would host nothing")
    hosted = [[[e for e in range(n_experts) if e % n_ews == w] for _ in range(n_layers)]
              for w in range(n_ews)]
    replicas = {(l, e): (Replica(ew=w, slot=hosted[w][l].index(e)),)
                for w in range(n_ews) for l in range(n_layers) for e in hosted[w][l]}
    return hosted, RoutingTable.build(n_layers, n_experts, replicas)
