"""Forwarding engine (REFE) of one attention worker: the routing table's device copy, and the
transfers of a layer's exchange with the expert workers.

Each ERT version becomes one small [E, C, 2] int32 array per MoE layer (expert -> C (EW, slot) entries by share) on
this AW's mesh, built once when the version is published; the AW's layer program reads it to
resolve and pack every (token, k) pair, so a new version is a new array, never a recompile, and
nothing about routing comes back to the host. `outbound` names the transfers of the packed buffer
to the EWs and `inbound` those of their answers; the engine sends a layer's transfers of every AW
in one batch (Transport.send_all), with liveness checks, never waiting. On a failed EW the engine
replays the layer: the AW re-runs it from its kept inputs under the newer table, so the same (token, k, expert) pairs go to the next replica. Expert compute is
stateless and deterministic, so the replayed outputs are the ones the failed EW would have given.
"""
from __future__ import annotations

import jax

from tarragon_jax.workers.routing_table import RoutingTable
from tarragon_jax.workers.runtime import WorkerHandle


class ForwardingEngine:
    def __init__(self, handle: WorkerHandle, ert: RoutingTable):
        self.handle = handle
        self.ert, self._routes = None, []
        self.publish(ert)

    def publish(self, ert: RoutingTable) -> None:
        """Adopt a newer routing table (the controller broadcasts every version): one device put."""
        if self.ert is None or ert.version > self.ert.version:
            self.ert, self._routes = ert, self.handle.put(list(ert.arrays()))

    def route(self, layer: int) -> jax.Array:
        """[E, C, 2] int32 (EW, slot) entries per expert of an MoE layer (by share), on this AW's mesh."""
        return self._routes[layer]

    def outbound(self, buf: jax.Array, ews: list) -> list[tuple]:
        """The transfers of this AW's packed layer buffer, one to each live EW (the engine sends
        every AW's at once: Transport.send_all)."""
        return [(buf, ew.handle, self.handle) for ew in ews]

    def inbound(self, y: jax.Array, ew) -> tuple:
        """The transfer of an EW's [T, k, D] answer back onto this AW's mesh."""
        return (y, self.handle, ew.handle)
