"""Expert routing table (ERT): (layer, logical expert) -> its replicas (EW, slot), each with a
share of the expert's traffic.

Immutable and versioned: every change makes a new table with version + 1, so an AW can tell
which placement a dispatch was resolved against. Plain Python; every AW holds its own copy
(and its device form, `arrays`).
Shares say how an expert's (token, k) pairs split over its replicas: the paper's idle shadows
are replicas with share 0 (the default: the first replica takes everything), load-balanced
replicas (control/eplb.py) have shares by measured load. A replica with share 0 takes over
when every replica with a share is gone, so a shadow still covers a failure.
`build` demands full coverage (a fresh placement that misses an expert is a bug); tables derived
after a failure may leave an expert with no replica, and `resolve` then raises NoLiveReplica so
the controller loads its weights somewhere instead of anyone waiting forever.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

CHOICES = 32        # entries per expert in the device table: shares are kept in 1/32 steps

Key = tuple[int, int]     # (layer, expert)


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
    _replicas: Mapping[Key, tuple[Replica, ...]]
    _shares: Mapping[Key, tuple[float, ...]] = dataclasses.field(default_factory=dict)   # aligned with replicas
    _rotations: Mapping[Key, int] = dataclasses.field(default_factory=dict)     # of each expert's row of entries

    @classmethod
    def build(cls, n_layers: int, n_experts: int, replicas: Mapping[Key, tuple[Replica, ...]], version: int = 0,
              shares: Mapping[Key, tuple[float, ...]] | None = None,
              rotations: Mapping[Key, int] | None = None) -> "RoutingTable":
        """shares[(layer, expert)]: one weight >= 0 per replica (missing: the first takes all);
        rotations[(layer, expert)]: where its row of entries starts (see `choices`; missing: 0)."""
        missing = [(l, e) for l in range(n_layers) for e in range(n_experts) if not replicas.get((l, e))]
        if missing:
            raise NoLiveReplica(f"no replica for (layer, expert) {missing[:4]}")
        shares = dict(shares or {})
        for k, s in shares.items():
            if len(s) != len(replicas[k]) or min(s) < 0:
                raise ValueError(f"shares {s} of (layer, expert) {k} do not match its replicas {replicas[k]}")
        return cls(version, n_layers, n_experts, {k: tuple(v) for k, v in replicas.items()},
                   {k: tuple(map(float, v)) for k, v in shares.items()},
                   {k: int(o) % CHOICES for k, o in (rotations or {}).items() if int(o) % CHOICES})

    def replicas(self, layer: int, expert: int) -> tuple[Replica, ...]:
        return self._replicas[(layer, expert)]

    def shares(self, layer: int, expert: int) -> tuple[float, ...]:
        """The traffic weight of each replica, normalised; replicas with weight 0 (shadows) take
        over, equally, when none with a weight is left."""
        reps = self._replicas[(layer, expert)]
        if not reps:
            raise NoLiveReplica(f"no live replica of expert {expert} in layer {layer}")
        w = self._shares.get((layer, expert)) or (1.0,) + (0.0,) * (len(reps) - 1)
        total = sum(w)
        return tuple(x / total for x in w) if total > 0 else (1.0 / len(reps),) * len(reps)

    def resolve(self, layer: int, expert: int) -> Replica:
        """The replica with the largest share (the first of those tied)."""
        s = self.shares(layer, expert)
        return self._replicas[(layer, expert)][s.index(max(s))]

    def choices(self, layer: int, expert: int) -> list[Replica]:
        """CHOICES entries, each replica as often as its share (largest remainder), in one block
        per replica, the row rotated by the expert's rotation: the AW picks entry (rank of the
        pair among the step's pairs of the expert + the step's salt) mod CHOICES. So a step's few
        pairs of an expert mostly stay on one replica (one group, one part-filled tile, not one
        on each), a run of CHOICES pairs splits exactly like the shares, and over steps the salt
        spreads even one pair a step like them. The salt is the same for every expert of a step,
        so the rotations (control/eplb.py `rotations`) choose which replicas serve together: a
        balanced column of the table is a balanced step."""
        reps, s = self._replicas[(layer, expert)], self.shares(layer, expert)
        exact = [x * CHOICES for x in s]
        units = [int(x) for x in exact]
        for i in sorted(range(len(s)), key=lambda i: (units[i] - exact[i], i))[:CHOICES - sum(units)]:
            units[i] += 1
        row = [r for r, u in zip(reps, units) for _ in range(u)]
        o = self._rotations.get((layer, expert), 0)
        return row[CHOICES - o:] + row[:CHOICES - o]            # entry c holds row[(c - o) mod CHOICES]

    def arrays(self) -> list[np.ndarray]:
        """Per layer, int32 [n_experts, CHOICES, 2]: (ew, slot) of each entry of `choices`. What
        an AW keeps on its device (forwarding engine), so routing needs no host round trip."""
        return [np.asarray([[(r.ew, r.slot) for r in self.choices(l, e)] for e in range(self.n_experts)], np.int32)
                for l in range(self.n_layers)]

    def ews(self) -> set[int]:
        return {r.ew for reps in self._replicas.values() for r in reps}

    def orphans(self) -> list[Key]:
        """(layer, expert) pairs with no replica left, in (layer, expert) order."""
        return [(l, e) for l in range(self.n_layers) for e in range(self.n_experts)
                if not self._replicas.get((l, e))]

    # ---- derived tables (never mutate self) ------------------------------------------------
    def without_ew(self, ew: int) -> "RoutingTable":
        """A new table (version + 1) with every replica on `ew` dropped (the others keep their
        shares); experts may be orphaned."""
        return self.keeping(lambda key, r: r.ew != ew)

    def keeping(self, keep) -> "RoutingTable":
        """A new table (version + 1) with only the replicas for which keep((layer, expert), replica)."""
        replicas, shares = {}, {}
        for k, reps in self._replicas.items():
            w = self._shares.get(k) or (1.0,) + (0.0,) * (len(reps) - 1)
            kept = [(r, x) for r, x in zip(reps, w) if keep(k, r)]
            replicas[k] = tuple(r for r, _ in kept)
            if kept:
                shares[k] = tuple(x for _, x in kept)
        return RoutingTable(self.version + 1, self.n_layers, self.n_experts, replicas, shares, self._rotations)

    def replace(self, replicas: Mapping[Key, tuple[Replica, ...]], shares: Mapping[Key, tuple[float, ...]] | None
                = None) -> "RoutingTable":
        """A new table (version + 1) with these experts' replicas (and shares) replaced."""
        new_r, new_s, new_o = dict(self._replicas), dict(self._shares), dict(self._rotations)
        for k, reps in replicas.items():
            new_r[k] = tuple(reps)
            new_s.pop(k, None)
            new_o.pop(k, None)
            if shares and k in shares:
                new_s[k] = tuple(shares[k])
        return RoutingTable(self.version + 1, self.n_layers, self.n_experts, new_r, new_s, new_o)
