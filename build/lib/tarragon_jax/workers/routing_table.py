"""Expert routing table (ERT): (layer, logical expert) -> ordered live replicas (EW, slot).

Immutable and versioned: every change makes a new table with version + 1, so an AW can tell
which placement a dispatch was resolved against. Plain Python; every AW holds its own copy
(and its device form, `arrays`).
`build` demands full coverage (a fresh placement that misses an expert is a bug); tables derived
after a failure may leave an expert with no replica, and `resolve` then raises NoLiveReplica so
the controller loads its weights somewhere instead of anyone waiting forever.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True, order=True)
class Replica:
    ew: int        # expert worker index
    slot: int      # position of the expert's weights in that EW's per-layer weight stack


class NoLiveReplica(LookupError):
    """An expert has no replica left; the controller must load its weights somewhere."""


@dataclasses.dataclass(frozen=True)
class RoutingTable:
    version: int
    n_layers: int
    n_experts: int
    _replicas: Mapping[tuple[int, int], tuple[Replica, ...]]

    @classmethod
    def build(cls, n_layers: int, n_experts: int,
              replicas: Mapping[tuple[int, int], tuple[Replica, ...]], version: int = 0) -> "RoutingTable":
        missing = [(l, e) for l in range(n_layers) for e in range(n_experts) if not replicas.get((l, e))]
        if missing:
            raise NoLiveReplica(f"no replica for (layer, expert) {missing[:4]}")
        return cls(version, n_layers, n_experts, {k: tuple(v) for k, v in replicas.items()})

    def replicas(self, layer: int, expert: int) -> tuple[Replica, ...]:
        return self._replicas[(layer, expert)]

    def resolve(self, layer: int, expert: int) -> Replica:
        """The replica to send to now: the first live one in order."""
        reps = self._replicas[(layer, expert)]
        if not reps:
            raise NoLiveReplica(f"no live replica of expert {expert} in layer {layer}")
        return reps[0]

    def resolve_layer(self, layer: int) -> tuple[list[int], list[int]]:
        """(ew, slot) for every expert of a layer, as two lists indexed by expert id."""
        reps = [self.resolve(layer, e) for e in range(self.n_experts)]
        return [r.ew for r in reps], [r.slot for r in reps]

    def arrays(self) -> list[np.ndarray]:
        """Per layer, int32 [n_experts, 2]: (ew, slot) of the replica to send to now. What an AW
        keeps on its device (forwarding engine), so routing needs no host round trip."""
        return [np.ascontiguousarray(np.asarray(self.resolve_layer(l), np.int32).T) for l in range(self.n_layers)]

    def ews(self) -> set[int]:
        return {r.ew for reps in self._replicas.values() for r in reps}

    def orphans(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs with no replica left, in (layer, expert) order."""
        return [(l, e) for l in range(self.n_layers) for e in range(self.n_experts)
                if not self._replicas.get((l, e))]

    # ---- derived tables (never mutate self) ------------------------------------------------
    def without_ew(self, ew: int) -> "RoutingTable":
        """A new table (version + 1) with every replica on `ew` dropped; experts may be orphaned."""
        return self._derive({k: tuple(r for r in reps if r.ew != ew) for k, reps in self._replicas.items()})

    def _derive(self, replicas: dict[tuple[int, int], tuple[Replica, ...]]) -> "RoutingTable":
        return RoutingTable(self.version + 1, self.n_layers, self.n_experts, replicas)
