"""Forwarding engine (REFE) of one attention worker: group this AW's (token, k) pairs by the
expert worker that serves them per the routing table, send each EW its rows, and bring the
outputs back with a bounded wait for the combine.

On a failed EW the engine calls `replan` for exactly the rows that were bound for it: the same
(token, k, expert) rows, resolved again under the newer routing table (a shadow or another
primary), are replayed; nothing else is redone. Expert compute is stateless and deterministic,
so the replayed outputs are the ones the failed EW would have returned.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tarragon_jax.expert_worker import ExpertInput
from tarragon_jax.model.attention_stage import gather_rows
from tarragon_jax.program_log import ProgramLog
from tarragon_jax.routing_table import RoutingTable
from tarragon_jax.runtime import WorkerHandle
from tarragon_jax.scheduler import bucket
from tarragon_jax.transport import Transport


@dataclasses.dataclass
class Rows:
    """This AW's rows bound for one EW in one layer (real rows only; padding is added on send)."""
    ew: int
    tok: np.ndarray          # token row in the AW's step batch
    k: np.ndarray            # which of the token's top-k
    expert: np.ndarray       # logical expert id
    slot: np.ndarray         # slot on the EW
    on_aw: tuple = ()        # (tok, k) padded, on the AW's mesh once sent: the combine needs them

    def padded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tok, k, slot) padded to a bucketed length; padding rows: token 0, k -1, slot -1."""
        n = bucket(len(self.tok), 8)
        return tuple(np.pad(a, (0, n - len(a)), constant_values=c).astype(np.int32)
                     for a, c in ((self.tok, 0), (self.k, -1), (self.slot, -1)))


class ForwardingEngine:
    def __init__(self, aw: int, handle: WorkerHandle, transport: Transport, ert: RoutingTable,
                 programs: ProgramLog):
        self.aw, self.handle, self.transport, self.ert, self.programs = aw, handle, transport, ert, programs

    def publish(self, ert: RoutingTable) -> None:
        """Adopt a newer routing table (the controller broadcasts every version)."""
        if ert.version > self.ert.version:
            self.ert = ert

    def _resolve(self, layer: int, tok, k, expert) -> list[Rows]:
        ew_of, slot_of = (np.asarray(a) for a in self.ert.resolve_layer(layer))
        ews = ew_of[expert]
        return [Rows(int(w), tok[ews == w], k[ews == w], expert[ews == w], slot_of[expert[ews == w]])
                for w in np.unique(ews)]

    def plan(self, layer: int, ids_Txk: np.ndarray, n_tokens: int) -> list[Rows]:
        """Every (token, k) of the real tokens, grouped by the EW the ERT resolves its expert to."""
        ids = ids_Txk[:n_tokens]
        tok, k = np.nonzero(np.ones_like(ids, bool))
        return self._resolve(layer, tok, k, ids[tok, k])

    def replan(self, layer: int, rows: Rows) -> list[Rows]:
        """The same rows, resolved under the current (newer) ERT: the replay after an EW failure."""
        return self._resolve(layer, rows.tok, rows.k, rows.expert)

    def send(self, hn_TxD: jax.Array, rows: Rows, ew: WorkerHandle) -> ExpertInput:
        tok, k, slot = rows.padded()
        rows.on_aw = self.handle.put((tok, k))
        x = self.programs.call(gather_rows, hn_TxD, rows.on_aw[0])
        return ExpertInput(self.aw, self.transport.send(x, ew), slot)

    def receive(self, y_NxD: jax.Array, rows: Rows, ew: WorkerHandle) -> tuple:
        """(y, tok, k) on this AW's mesh; raises WorkerFailed if the EW died or missed the deadline."""
        y = self.transport.send(self.transport.wait(y_NxD, ew), self.handle)
        return (y, *rows.on_aw)
