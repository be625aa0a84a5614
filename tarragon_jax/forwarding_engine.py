"""Forwarding engine (REFE) of one attention worker: the routing table's device copy, and the
transfers of a layer's exchange with the expert workers.

Each ERT version becomes one small [E, 2] int32 array per MoE layer (expert -> (EW, slot)) on
this AW's mesh, built once when the version is published; the AW's layer program reads it to
resolve and pack every (token, k) pair, so a new version is a new array, never a recompile, and
nothing about routing comes back to the host. `send` hands the packed buffer to an EW, `receive`
brings an EW's answer back; both are transfers with the transport's liveness checks and never
wait. On a failed EW the engine replays the layer: the AW re-runs it from its kept inputs under
the newer table, so the same (token, k, expert) pairs go to the next replica. Expert compute is
stateless and deterministic, so the replayed outputs are the ones the failed EW would have given.
"""
from __future__ import annotations

import jax

from tarragon_jax.routing_table import RoutingTable
from tarragon_jax.runtime import WorkerHandle
from tarragon_jax.transport import Transport


class ForwardingEngine:
    def __init__(self, handle: WorkerHandle, transport: Transport, ert: RoutingTable):
        self.handle, self.transport = handle, transport
        self.ert, self._routes = None, []
        self.publish(ert)

    def publish(self, ert: RoutingTable) -> None:
        """Adopt a newer routing table (the controller broadcasts every version): one device put."""
        if self.ert is None or ert.version > self.ert.version:
            self.ert, self._routes = ert, self.handle.put(list(ert.arrays()))

    def route(self, layer: int) -> jax.Array:
        """[E, 2] int32 (EW, slot) per expert of an MoE layer, on this AW's mesh."""
        return self._routes[layer]

    def send(self, buf: jax.Array, ew) -> jax.Array:
        """This AW's packed layer buffer onto an EW's mesh (or its process); raises WorkerFailed."""
        return self.transport.send(buf, ew, src=self.handle)

    def receive(self, y: jax.Array, ew) -> jax.Array:
        """An EW's [T, k, D] answer onto this AW's mesh; raises WorkerFailed."""
        return self.transport.send(y, self.handle, src=ew)
