"""Online expert load balancing (`--eplb`): the mechanism. The policy is control/eplb.py.

Every window (`--eplb_window_s`) at a step boundary it reads the rows each live EW served per
(layer, slot) since the last window (device counters, one read per EW per window, never per
step), turns them into per-expert load, adds it to the decayed load of the earlier windows (one
window's mix of requests is a noisy sample of the next one's), and plans each layer in the
background:

- a plan that only changes shares is a new routing table, published at the next step boundary;
- a plan that moves experts first publishes a table without the slots being overwritten, then
  the EWs load the new experts into those slots in place (`replace_slots`: from the host copy or
  the checkpoint files; same shapes, never a recompile) in the background, and only then is the
  table with the new replicas and shares published.

A failure while a plan or a move is under way abandons it: the controller's failure path
derives its table from the placement in force, in which a slot being overwritten has no replica
and is marked -1 in its EW's slot list, so nothing is ever routed to a half-loaded slot.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable

from tarragon_jax.control import eplb, expert_load
from tarragon_jax.control.placement import Placement
from tarragon_jax.workers.routing_table import Replica, RoutingTable

MOVING = -1      # a slot's expert id while it is being overwritten
DECAY = 0.5      # the load planned for: this window's rows plus DECAY x the previous estimate


@dataclasses.dataclass(frozen=True)
class Window:
    """What one window measured: per layer, rows per expert and the EW imbalance (max/mean of
    rows per EW) under the placement in force."""
    at: float
    expert_rows: list[list[int]]          # [layer][expert]
    ew_rows: dict[int, list[int]]         # ew -> [layer]
    imbalance: list[float]                # per layer
    overall: float                        # max/mean of rows per EW summed over layers


class Rebalancer:
    def __init__(self, controller, window_s: float, clock: Callable[[], float],
                 pool: concurrent.futures.ThreadPoolExecutor):
        self.c, self.window_s, self.clock, self.pool = controller, window_s, clock, pool
        self._last_at = clock()
        self._reader = expert_load.SlotRowReader()
        self._load: list[list[float]] | None = None     # [layer][expert], decayed over windows
        self._job: concurrent.futures.Future | None = None
        self._generation = 0                  # failures seen; a job started under another is dropped
        self.windows: list[Window] = []
        self.rebalances = 0                   # tables published by a rebalance
        self.moves = 0                        # slots overwritten

    def failed(self) -> None:
        """A worker failed: whatever is under way is dropped when it finishes."""
        self._generation += 1

    def settle(self) -> None:
        """Wait for what is under way, every round of a move included (tests, shutdown)."""
        while self._job is not None:
            concurrent.futures.wait([self._job])
            self._finish()

    def tick(self) -> None:
        """At a step boundary; never waits on a job."""
        if self._job is not None:
            if self._job.done():
                self._finish()
            return
        if self.clock() - self._last_at >= self.window_s:
            self._last_at = self.clock()
            self._run(self._measure_and_plan)

    def _finish(self) -> None:
        """The job is done: what it returned runs now, unless a failure came in between."""
        job, self._job = self._job, None
        try:
            generation, then = job.result()
        except Exception:  # noqa: BLE001 -- a move hit a dead EW: the controller finds the failure
            return
        if generation == self._generation:
            then()

    def _run(self, work: Callable[[], Callable[[], None] | None]) -> None:
        """`work` in the background; what it returns runs at a later step boundary, unless a
        failure came in between."""
        generation = self._generation
        self._job = self.pool.submit(lambda: (generation, work() or (lambda: None)))

    # ---- measuring and planning (background) --------------------------------------------------
    def _live(self) -> dict:
        return {ew.index: ew for ew in self.c.ews if not self.c.health.is_failed(ew.handle.name)}

    def _measure_and_plan(self) -> Callable[[], None] | None:
        window = self._measure()
        if window is None:
            return None
        self._load = [[DECAY * a + b for a, b in zip(old, new)]
                      for old, new in zip(self._load or window.expert_rows, window.expert_rows)]
        current = {j: [list(s) for s in ew.slots] for j, ew in self._live().items()}
        plans = [eplb.plan_layer(rows, {j: slots[l] for j, slots in current.items()})
                 for l, rows in enumerate(self._load)]
        turns = self._rotations({j: [p.slots[j] for p in plans] for j in current}, [p.shares for p in plans])
        return lambda: self._carry_out(plans, turns)

    def _rotations(self, slots: dict[int, list[list[int]]], shares: list[eplb.Shares]) -> dict[tuple[int, int], int]:
        """Each expert's row rotation in the table the plan ends with, so that a step is balanced
        (eplb.rotations), computed here in the background rather than when the table is published."""
        ert = self._table(slots, shares)
        return {(l, e): o for l in range(ert.n_layers)
                for e, o in enumerate(eplb.rotations(self._load[l], [[r.ew for r in ert.choices(l, e)]
                                                                   for e in range(ert.n_experts)]))}

    def _measure(self) -> Window | None:
        """Rows since the last window per (layer, expert) and per EW; None when nothing ran."""
        L, E = self.c.model.n_moe_layers, self.c.model.n_experts
        experts = [[0] * E for _ in range(L)]
        raw = {}
        for j, ew in self._live().items():
            try:
                raw[j] = self._reader.read(ew.handle.name, ew)
            except Exception:  # noqa: BLE001 -- a dead EW: the controller finds the failure
                continue
            for l, per in enumerate(expert_load.expert_rows(raw[j], ew.slots, E)):
                experts[l] = [a + b for a, b in zip(experts[l], per)]
        per_ew = {j: [int(r.sum()) for r in rows] for j, rows in raw.items()}
        if not any(map(sum, per_ew.values())):
            return None
        load = expert_load.summary(raw)
        window = Window(self.clock(), experts, per_ew, load["ew_load_per_layer"], load["ew_load"])
        self.windows = self.windows[-63:] + [window]
        return window

    # ---- carrying out a plan (at step boundaries, moves in the background) -------------------
    def _carry_out(self, plans: list[eplb.LayerPlan], turns: dict[tuple[int, int], int] | None = None) -> None:
        """Publish the plan's shares, or start its next round of moves. A round overwrites only
        slots whose expert keeps another replica that is not moving, so every expert stays
        routable while its slot loads."""
        shares = [p.shares for p in plans]
        live = self._live()
        todo = {(ew, layer, slot): expert for layer, p in enumerate(plans) for ew, slot, expert in p.moves
                if ew in live and live[ew].slots[layer][slot] not in (expert, MOVING)}
        round_ = _round(todo, {j: ew.slots for j, ew in live.items()})
        if not round_:
            self._install(self._slots(), shares, turns)
            return
        for ew, layer, slot in round_:            # nothing is routed to a slot being overwritten
            live[ew].slots[layer][slot] = MOVING
        self._install(self._slots(), shares, turns, {k: todo[k] for k in round_})
        by_slot: dict[tuple[int, int], dict[int, int]] = {}
        for ew, layer, slot in round_:
            by_slot.setdefault((ew, layer), {})[slot] = todo[(ew, layer, slot)]
        self.moves += len(round_)

        def move():
            for (ew, layer), experts in sorted(by_slot.items()):
                live[ew].replace_slots(layer, experts)
            return lambda: self._carry_out(plans, turns)
        self._run(move)

    def _slots(self) -> dict[int, list[list[int]]]:
        """Every EW's slot lists as they are now (a dead EW's as its replacement would build them)."""
        live, old = self._live(), self.c.placement
        return {j: [list(live[j].slots[l]) if j in live else old.slots(j, l) for l in range(old.n_layers)]
                for j in old.ews}

    def _table(self, slots: dict[int, list[list[int]]], shares: list[eplb.Shares],
               turns: dict[tuple[int, int], int] | None = None) -> RoutingTable:
        """The table of these slots (MOVING ones route nothing) with these shares and rotations."""
        n_layers, n_experts = self.c.model.n_moe_layers, self.c.model.n_experts
        replicas: dict[tuple[int, int], list[Replica]] = {}
        for j in sorted(slots):
            for layer, ids in enumerate(slots[j]):
                for slot, e in enumerate(ids):
                    if e >= 0 and all(r.ew != j for r in replicas.get((layer, e), ())):
                        replicas.setdefault((layer, e), []).append(Replica(j, slot))
        weights = {k: tuple(shares[k[0]][k[1]].get(r.ew, 0.0) for r in reps) for k, reps in replicas.items()}
        return RoutingTable.build(n_layers, n_experts, replicas, self.c.placement.ert.version + 1, weights, turns)

    def _install(self, slots: dict[int, list[list[int]]], shares: list[eplb.Shares],
                 turns: dict[tuple[int, int], int] | None, incoming: dict[tuple[int, int, int], int] | None = None
                 ) -> None:
        """Make these slots (MOVING ones route nothing; `incoming` says what they will hold, for a
        replacement built meanwhile) with these shares and rotations the placement, and publish
        its table."""
        old, incoming = self.c.placement, incoming or {}
        ert = self._table(slots, shares, turns)
        built = {j: [[incoming.get((j, l, s), e) for s, e in enumerate(ids)] for l, ids in enumerate(v)]
                 for j, v in slots.items()}
        split = {j: [len(p) for p in old.primaries[j]] for j in old.ews}
        self.c.placement = Placement(old.n_layers, old.n_experts,
                                     {j: [ids[:n] for ids, n in zip(built[j], split[j])] for j in built},
                                     {j: [ids[n:] for ids, n in zip(built[j], split[j])] for j in built}, ert)
        self.c._publish(self.c._derive_ert()[0])
        self.rebalances += 1


def _round(todo: dict[tuple[int, int, int], int], slots: dict[int, list[list[int]]]) -> list[tuple[int, int, int]]:
    """The moves (ew, layer, slot) that can go together: each overwritten expert keeps a replica
    on another EW that is not moving in this round (an expert with a single replica stays put)."""
    moving: set[tuple[int, int, int]] = set()
    for ew, layer, slot in sorted(todo):
        old = slots[ew][layer][slot]
        others = [(j, s) for j, v in slots.items() if j != ew for s, e in enumerate(v[layer])
                  if e == old and (j, layer, s) not in moving]
        if old < 0 or others:
            moving.add((ew, layer, slot))
    return sorted(moving)
