"""Expert load balancing policy (`--eplb`): where each layer's expert replicas live and how an
expert's traffic splits over them, from the load measured in one window. Plain Python + scipy,
no jax; the mechanism that measures and carries a plan out is control/rebalancer.py.

Two levers, cheapest first:
- **shares** on the placement in force: the split of every expert's load over its replicas that
  minimises the busiest EW, an exact linear program (makespan with divisible jobs restricted to
  their hosts; its optimum is the max-flow bound max_S load(experts hosted only in S) / |S|),
  then rounded to the routing table's 1/CHOICES steps. A new table, nothing moves.
- **moves**, only when shares cannot get within `tolerance` and a fresh placement gains at least
  `min_gain` (relative), or some expert has no live replica: DeepSeek-EPLB-style packing. Every expert gets
  `min_replicas` replicas on distinct EWs where capacity allows (so losing any one EW loses no
  expert), spare slots go to the experts with the highest load per replica, replicas are packed
  heaviest first onto the least-loaded EW (preferring EWs that already hold the expert), and an
  expert that stays on an EW keeps its slot, so only changed slots load weights.
Deterministic: the same loads and placement always give the same plan.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import linprog

from tarragon_jax.control.expert_load import imbalance
from tarragon_jax.workers.routing_table import CHOICES

REFINE = 3         # local-search sweeps over the greedy rotations
Shares = list[dict[int, float]]          # per expert: {ew: fraction of its (token, k) pairs}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    slots: dict[int, list[int]]                    # ew -> expert id per slot (-1: empty)
    shares: Shares
    imbalance: float                               # max/mean of the EW loads the plan expects
    moves: list[tuple[int, int, int]]              # (ew, slot, expert) slots to (re)load


def ew_loads(loads: Sequence[float], shares: Shares, ews: Sequence[int]) -> dict[int, float]:
    """The load each EW gets when every expert splits by its shares."""
    out = {j: 0.0 for j in ews}
    for load, split in zip(loads, shares):
        for j, f in split.items():
            out[j] += load * f
    return out


def balance_shares(loads: Sequence[float], hosts: Sequence[Sequence[int]], slack: float = 0.01) -> Shares:
    """The min-makespan split of each expert's load over its hosts (linear program, HiGHS), then,
    among the splits within `slack` of that makespan, the one closest to even (a second linear
    program): the optimum alone is a vertex that puts most experts wholly on one replica, which
    the next window's slightly different load unbalances again; near-even splits absorb it.
    Experts with no load split equally."""
    if any(not h for h in hosts):
        raise ValueError(f"experts {[e for e, h in enumerate(hosts) if not h]} have no host")
    total = float(sum(loads))
    shares: Shares = [{j: 1.0 / len(h) for j in h} for h in hosts]
    busy = [e for e, x in enumerate(loads) if x > 0]
    if not busy:
        return shares
    pairs = [(e, j) for e in busy for j in hosts[e]]
    ews = sorted({j for _, j in pairs})
    col = {j: i for i, j in enumerate(ews)}
    n = len(pairs)
    a_eq = np.zeros((len(busy), n + 1))
    a_ub = np.zeros((len(ews), n + 1))
    row = {e: i for i, e in enumerate(busy)}
    for p, (e, j) in enumerate(pairs):
        a_eq[row[e], p] = 1.0
        a_ub[col[j], p] = 1.0
    a_ub[:, n] = -1.0
    cost = np.zeros(n + 1)
    cost[n] = 1.0
    b_eq = np.asarray([loads[e] / total for e in busy])
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(len(ews)), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"share balancing failed: {res.message}")
    x = np.maximum(_even_within(res.x[n] * (1 + slack), pairs, a_eq[:, :n], b_eq, a_ub[:, :n], loads, hosts, total,
                                res.x[:n]), 0.0)
    for e in busy:
        shares[e] = {}
    for p, (e, j) in enumerate(pairs):
        shares[e][j] = float(x[p]) * total / loads[e]
    return shares


def _even_within(makespan: float, pairs: list[tuple[int, int]], a_eq: np.ndarray, b_eq: np.ndarray,
                 a_load: np.ndarray, loads: Sequence[float], hosts: Sequence[Sequence[int]], total: float,
                 fallback: np.ndarray) -> np.ndarray:
    """The split x (per (expert, EW) pair, as fractions of the total load) with every EW at most
    `makespan` that minimises the L1 distance from each expert's even split; `fallback` (the
    min-makespan split) if HiGHS fails."""
    n = len(pairs)
    even = np.asarray([loads[e] / total / len(hosts[e]) for e, _ in pairs])
    eye = np.eye(n)
    a_ub = np.block([[a_load, np.zeros((a_load.shape[0], n))], [eye, -eye], [-eye, -eye]])
    b_ub = np.concatenate([np.full(a_load.shape[0], makespan), even, -even])
    cost = np.concatenate([np.zeros(n), np.ones(n)])
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=np.hstack([a_eq, np.zeros((a_eq.shape[0], n))]), b_eq=b_eq,
                  bounds=(0, None), method="highs")
    return res.x[:n] if res.status == 0 else fallback


def quantize(fractions: Mapping[int, float], units: int = CHOICES) -> dict[int, int]:
    """Whole units (summing to `units`) closest to the fractions: largest remainder, ties to the
    smaller EW index. The routing table keeps shares in 1/CHOICES steps."""
    keys = sorted(fractions)
    total = sum(fractions.values())
    exact = {j: (fractions[j] / total if total > 0 else 1.0 / len(keys)) * units for j in keys}
    out = {j: int(exact[j]) for j in keys}
    for j in sorted(keys, key=lambda j: (out[j] - exact[j], j))[:units - sum(out.values())]:
        out[j] += 1
    return out


def quantized_shares(loads: Sequence[float], shares: Shares, ews: Sequence[int]) -> Shares:
    """Shares rounded to 1/CHOICES steps, then polished: one unit at a time moves off the busiest
    EW while that lowers it without making another EW as busy (rounding alone can cost a few %)."""
    units = [quantize(s) for s in shares]
    load = ew_loads(loads, [{j: u / CHOICES for j, u in s.items()} for s in units], ews)
    for _ in range(CHOICES * len(loads)):
        top = max(load, key=lambda j: (load[j], -j))
        best = None
        for e, s in enumerate(units):
            d = loads[e] / CHOICES
            if s.get(top, 0) == 0 or d <= 0:
                continue
            for k in s:
                after = max(load[top] - d, load[k] + d)
                if k != top and after < load[top] - 1e-12 and (best is None or after < best[0]):
                    best = (after, e, k, d)
        if best is None:
            break
        _, e, k, d = best
        units[e][top] -= 1
        units[e][k] += 1
        load[top] -= d
        load[k] += d
    return [{j: u / CHOICES for j, u in s.items()} for s in units]


def plan_layer(loads: Sequence[float], current: Mapping[int, Sequence[int]], min_replicas: int = 2,
               tolerance: float = 1.05, min_gain: float = 0.02) -> LayerPlan:
    """One layer's plan from its per-expert load and the live EWs' slots (-1: empty)."""
    ews = sorted(current)
    if sum(len(current[j]) for j in ews) < len(loads):
        raise ValueError(f"{len(loads)} experts do not fit in the {sum(len(current[j]) for j in ews)} "
                         f"slots of EWs {ews}")
    hosts = _hosts(current, len(loads))
    keep = None
    if all(hosts):
        keep = _evaluate(loads, {j: list(current[j]) for j in ews}, [])
        if keep.imbalance <= tolerance:
            return keep
    fresh = min((_evaluate(loads, *_pack(loads, current, min(min_replicas, len(ews)), by_round))
                 for by_round in (True, False)), key=lambda p: (p.imbalance, len(p.moves)))
    if keep is None or fresh.imbalance <= keep.imbalance * (1.0 - min_gain):
        return fresh
    return keep


def _hosts(slots: Mapping[int, Sequence[int]], n_experts: int) -> list[list[int]]:
    hosts: list[list[int]] = [[] for _ in range(n_experts)]
    for j in sorted(slots):
        for e in dict.fromkeys(slots[j]):
            if e >= 0:
                hosts[e].append(j)
    return hosts


def _evaluate(loads, slots, moves) -> LayerPlan:
    ews = sorted(slots)
    shares = quantized_shares(loads, balance_shares(loads, _hosts(slots, len(loads))), ews)
    return LayerPlan(slots, shares, imbalance(ew_loads(loads, shares, ews)), moves)


def _replica_counts(loads: Sequence[float], n_slots: int, n_ews: int, min_replicas: int) -> list[int]:
    """One replica each, `min_replicas` for as many (heaviest first) as capacity allows, then every
    spare slot to the expert with the most load per replica (at most one replica per EW)."""
    E = len(loads)
    order = sorted(range(E), key=lambda e: (-loads[e], e))
    counts = [1] * E
    spare = n_slots - E
    for e in order:
        add = min(min_replicas - 1, spare)
        counts[e] += add
        spare -= add
    while spare > 0:
        open_ = [e for e in order if counts[e] < n_ews]
        if not open_:
            break
        e = max(open_, key=lambda e: (loads[e] / counts[e], -e))
        counts[e] += 1
        spare -= 1
    return counts


def _pack(loads: Sequence[float], current: Mapping[int, Sequence[int]], min_replicas: int, by_round: bool
          ) -> tuple[dict[int, list[int]], list[tuple[int, int, int]]]:
    """A fresh placement (longest processing time first) and the slot writes it takes. `by_round`
    places every expert's first replica before any second one: a hot expert's later replicas then
    land on the EWs the light experts filled, so the shares have room to move load."""
    ews = sorted(current)
    cap = {j: len(current[j]) for j in ews}
    held = {j: set(current[j]) for j in ews}
    counts = _replica_counts(loads, sum(cap.values()), len(ews), min_replicas)
    items = sorted(((r if by_round else 0, -loads[e] / counts[e], e) for e in range(len(loads))
                    for r in range(counts[e])))
    chosen: dict[int, list[int]] = {j: [] for j in ews}
    weight = {j: 0.0 for j in ews}
    for _, w, e in items:
        w = -w
        free = [j for j in ews if len(chosen[j]) < cap[j] and e not in chosen[j]]
        if free:
            j = min(free, key=lambda j: (weight[j], e not in held[j], j))
        else:
            j = _swap_in(e, chosen, cap, ews)
        chosen[j].append(e)
        weight[j] += w
    slots, moves = {}, []
    for j in ews:
        mine = set(chosen[j])
        kept = [e if e in mine and e not in current[j][:s] else -1 for s, e in enumerate(current[j])]
        incoming = sorted(mine - set(kept))
        for s, e in enumerate(kept):
            if e < 0 and incoming:
                kept[s] = incoming.pop(0)
                moves.append((j, s, kept[s]))
        slots[j] = kept
    return slots, moves


def _swap_in(e: int, chosen: dict[int, list[int]], cap: dict[int, int], ews: list[int]) -> int:
    """Every EW with room already holds e: move some replica f from an EW j2 without e to the
    one with room (which lacks f), freeing j2 for e. Returns j2."""
    room = [j for j in ews if len(chosen[j]) < cap[j]]
    for j in room:
        for j2 in ews:
            if j2 == j or e in chosen[j2]:
                continue
            for f in chosen[j2]:
                if f not in chosen[j]:
                    chosen[j2].remove(f)
                    chosen[j].append(f)
                    return j2
    raise RuntimeError(f"no placement puts expert {e}'s replicas on distinct EWs")


def rotations(loads: Sequence[float], entries: Sequence[Sequence[int]]) -> list[int]:
    """Per expert, the rotation of its table row (`entries[e]`: the EW of each of its CHOICES
    entries, one block per replica) that keeps every column of the layer's table balanced: a
    step's few pairs of an expert take the column its salt points at, and the salt is the same
    for every expert of a step, so a balanced column is a balanced step. Greedy, heaviest expert
    first: each takes the rotation whose entries fall where the columns' EW loads are lowest
    (the least squares step), then REFINE sweeps re-place each expert given all the others.
    Deterministic; ties take the smallest rotation."""
    C = len(entries[0]) if entries else CHOICES
    ews = sorted({j for row in entries for j in row})
    col = {j: i for i, j in enumerate(ews)}
    load_MxC, cols = np.zeros((len(ews), C)), np.arange(C)
    out = [0] * len(entries)
    shift = (cols[None, :] - cols[:, None]) % C                           # [rotation, column] -> entry
    turning = [e for e in sorted(range(len(entries)), key=lambda e: (-loads[e], e))
               if loads[e] > 0 and len(set(entries[e])) > 1]
    ew_RxC = {e: np.asarray([col[j] for j in entries[e]])[shift] for e in turning}   # the EW at each column
    for sweep in range(1 + REFINE):          # greedy, then sweeps that re-place each expert given the rest
        for e in turning:
            if sweep:
                load_MxC[ew_RxC[e][out[e]], cols] -= loads[e]
            out[e] = int(np.argmin(load_MxC[ew_RxC[e], cols[None, :]].sum(1)))
            load_MxC[ew_RxC[e][out[e]], cols] += loads[e]
    return out
