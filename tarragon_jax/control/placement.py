"""Placement of routed experts on expert workers: primaries plus shadow replicas.

Primaries are spread round-robin (expert e of every layer on EW e % M, slots in expert order),
which balances load when routing is uniform. Each EW then spends part of its memory on *shadows*:
inactive copies of other EWs' primaries that an AW replays to when the primary's EW dies. An EW's
slots in a layer are its primaries (0..P-1), then its shadows (P..P+S-1).

The paper gives no shadow policy (the paper, arXiv 2601.01310, section 2.5); ours is a ring. Only experts whose primary
sat on the dead EW can be lost, so coverage after one failure depends only on which experts have
at least one shadow: EW w first shadows the primaries of EW (w-1) mod M, then, with memory left,
those of (w-2) mod M, and so on. With the budget below one full set, every EW shadows the same
number of experts in a layer, which loses the fewest experts in the worst case; the uncovered
ones rotate with the layer so no expert id is unprotected everywhere.
"""
from __future__ import annotations

import dataclasses
import math

from tarragon_jax.workers.routing_table import Replica, RoutingTable


@dataclasses.dataclass(frozen=True)
class Placement:
    """Who hosts what. Treat the lists as read-only: recovery derives new Placements.

    primaries[ew][layer] / shadows[ew][layer]: expert ids in slot order (shadow slots follow the
    primaries). `ert` lists each expert's primary first, then its shadows by ring distance.
    """
    n_layers: int
    n_experts: int
    primaries: dict[int, list[list[int]]]
    shadows: dict[int, list[list[int]]]
    ert: RoutingTable

    @property
    def ews(self) -> list[int]:
        return sorted(self.primaries)

    def slots(self, ew: int, layer: int) -> list[int]:
        """Expert ids in every slot of `ew` for `layer`: primaries then shadows."""
        return self.primaries[ew][layer] + self.shadows[ew][layer]


def shadow_slots_per_layer(n_layers: int, n_experts: int, n_ews: int, shadow_budget: float) -> list[int]:
    """Shadow slots every EW gets in each layer.

    The budget is a fraction of ceil(E / M) slots per layer: the largest primary share, which is
    the expert memory every EW of a uniform fleet reserves anyway. Budget 1.0 is therefore enough
    to shadow any one other EW completely, even when E is not a multiple of M. The budget's total
    over all layers is spread evenly (earlier layers take the remainder), so a fractional budget
    below 1 / ceil(E / M) still buys some slots.
    """
    if not (math.isfinite(shadow_budget) and shadow_budget >= 0):
        raise ValueError(f"shadow_budget must be a finite number >= 0, got {shadow_budget}")
    if n_ews < 2:
        return [0] * n_layers
    total = math.floor(shadow_budget * -(-n_experts // n_ews) * n_layers + 1e-9)
    base, extra = divmod(total, n_layers)
    return [base + (l < extra) for l in range(n_layers)]


def place(n_layers: int, n_experts: int, n_ews: int, shadow_budget: float, serve_all: bool = False) -> Placement:
    """Primaries round-robin plus ring shadows within `shadow_budget` (see module docstring).
    serve_all (`--eplb`): every replica takes an equal share of its expert's traffic until the
    first rebalance measures load (control/rebalancer.py); else shadows stay idle (the paper).

    With shadow_budget >= 1.0 and M >= 2, losing any single EW leaves every expert a live replica.
    With M == 1 no shadow is possible (an EW cannot back itself up): the budget is ignored.
    Deterministic: the same arguments give the same placement on every host.
    """
    if n_layers < 1:
        raise ValueError(f"need at least one layer, got {n_layers}")
    if n_ews < 1:
        raise ValueError(f"need at least one expert worker, got {n_ews}")
    if n_ews > n_experts:
        raise ValueError(f"{n_ews} expert workers for {n_experts} experts: some would host nothing")
    budget = shadow_slots_per_layer(n_layers, n_experts, n_ews, shadow_budget)
    primaries = {w: [[e for e in range(n_experts) if e % n_ews == w] for _ in range(n_layers)]
                 for w in range(n_ews)}
    shadows: dict[int, list[list[int]]] = {w: [[] for _ in range(n_layers)] for w in range(n_ews)}
    for l in range(n_layers):
        count = [0] * n_experts              # shadows of each expert so far in this layer
        for dist in range(1, n_ews):         # ring rounds: cover everyone once before anyone twice
            for w in range(n_ews):
                room = budget[l] - len(shadows[w][l])
                if room <= 0:
                    continue
                owned = primaries[(w - dist) % n_ews][l]
                start = l % len(owned)
                rotated = owned[start:] + owned[:start]
                pick = sorted(rotated, key=lambda e: (count[e], rotated.index(e)))[:room]
                for e in pick:
                    count[e] += 1
                shadows[w][l] += pick
    return Placement(n_layers, n_experts, primaries, shadows, _ert(n_layers, n_experts, primaries, shadows, serve_all))


def _ert(n_layers: int, n_experts: int, primaries: dict, shadows: dict, serve_all: bool) -> RoutingTable:
    n_ews = len(primaries)
    reps: dict[tuple[int, int], list[tuple[int, Replica]]] = {}
    for w in primaries:
        for l in range(n_layers):
            for slot, e in enumerate(primaries[w][l] + shadows[w][l]):
                owner = e % n_ews
                reps.setdefault((l, e), []).append(((w - owner) % n_ews, Replica(w, slot)))
    replicas = {k: tuple(r for _, r in sorted(v)) for k, v in reps.items()}
    shares = {k: (1.0,) * len(r) for k, r in replicas.items()} if serve_all else None
    return RoutingTable.build(n_layers, n_experts, replicas, shares=shares)
