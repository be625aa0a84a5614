"""Recovery plans: what should change after a failure, as pure data. The controller carries them
out (loads weights, publishes ERT versions, moves requests); nothing here touches a device.

EW failure (the paper, arXiv 2601.01310, section 2.5): drop the dead EWs from the ERT so every AW replays to the next
replica; experts left with no replica are loaded from host memory onto the live EW with the
fewest slots in that layer. AW failure (2.6): the dead AW's requests go round-robin to the
healthy AWs, least loaded first; each restores its committed KV and continues.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from tarragon_jax.control.placement import Placement
from tarragon_jax.workers.routing_table import Replica, RoutingTable

Key = tuple[int, int]    # (layer, expert)


class RecoveryError(RuntimeError):
    """No plan exists: every worker of the kind needed is gone."""


def plan_expert_routing(placement: Placement, failed: Iterable[int], slots: Mapping[int, list[list[int]]],
                        version: int) -> tuple[RoutingTable, list[tuple[int, int, int]]]:
    """The routing table for the live EWs, and the host loads it needs.

    Starts from the placement's table (primaries first, then shadows), drops every failed EW, and
    gives each expert left without a replica one: an expert already loaded on a live EW is
    reused there, otherwise it is loaded onto the live EW with the fewest slots in that layer
    (ties to the lower index). `slots[ew][layer]` are the live EWs' current expert ids per slot;
    a load appends, so its slot is known here. Returns (table at `version`, [(ew, layer, expert)]
    to load in order). Cumulative: call it again after every failure or join."""
    failed = set(failed)
    live = sorted(set(slots) - failed)
    ert = placement.ert
    for ew in failed:
        ert = ert.without_ew(ew)
    orphans = ert.orphans()
    if orphans and not live:
        raise RecoveryError(f"every expert worker has failed; {len(orphans)} experts have no replica")
    current = {(w, l): list(slots[w][l]) for w in live for l in range(placement.n_layers)}
    updates, loads = {}, []
    for layer, expert in orphans:
        holder = next((w for w in live if expert in current[(w, layer)]), None)
        if holder is None:
            holder = min(live, key=lambda w: (len(current[(w, layer)]), w))
            current[(holder, layer)].append(expert)
            loads.append((holder, layer, expert))
        updates[(layer, expert)] = (Replica(holder, current[(holder, layer)].index(expert)),)
    return dataclasses.replace(ert.replace(updates), version=version), loads     # the others keep their shares


def plan_aw_failure(requests_by_aw: Mapping[int, list[int]], failed_aw: int,
                    healthy_aws: list[int], prefix_of: Mapping[int, object] | None = None) -> dict[int, int]:
    """request id -> new AW for every request of `failed_aw`, round-robin over the healthy AWs
    ordered by current load (fewest requests first, ties in `healthy_aws` order). Requests with
    the same `prefix_of` key (their first KV block's hash) move together, one turn of the round:
    their shared blocks are restored once, on one AW."""
    healthy = list(dict.fromkeys(a for a in healthy_aws if a != failed_aw))
    moving = list(requests_by_aw.get(failed_aw, []))
    if not healthy:
        if not moving:
            return {}
        raise RecoveryError(f"AW {failed_aw} failed and no healthy attention worker is left to take "
                            f"its {len(moving)} requests {moving[:8]}")
    order = sorted(healthy, key=lambda a: (len(requests_by_aw.get(a, [])), healthy.index(a)))
    prefix_of = prefix_of or {}
    turn = {key: i for i, key in enumerate(dict.fromkeys(prefix_of.get(rid, ("alone", rid)) for rid in moving))}
    return {rid: order[turn[prefix_of.get(rid, ("alone", rid))] % len(order)] for rid in moving}
