"""Expert worker (EW): hosts expert weight stacks per layer and runs one grouped FFN over the
tokens of a layer from every AW. Stateless apart from weights, so a replayed input gives the
same output on any replica of the expert.

Slots of a layer are its primaries (0..P-1), then shadows and experts loaded after a failure
(P..), all in one resident stack: routing to a shadow changes which group has rows, never the
program or the weights (an idle slot is an empty group and costs no compute, which is why the
paper keeps shadows inactive). A load after a failure grows the stack once; a rebalance
(`replace_slots`) overwrites slots in place, so it never recompiles. Rows served are counted per
(layer, slot) on the device: the load the rebalancer reads once a window.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from tarragon_jax.model import wire
from tarragon_jax.model.expert_stage import expert_layer
from tarragon_jax.model.weights import Weights
from tarragon_jax.workers import backends
from tarragon_jax.workers.program_log import ProgramLog
from tarragon_jax.workers.runtime import WorkerHandle
from tarragon_jax.workers.shape_grid import ShapeGrid

_KEYS = ("w_gate", "w_up", "w_down")


class ExpertWorker:
    joined_at = 0.0          # when it joined the service as a replacement (controller clock)

    def __init__(self, index: int, handle: WorkerHandle, primaries: list[list[int]],
                 shadows: list[list[int]], weights: Weights, backend: str, dtype, top_k: int):
        """primaries/shadows[layer] = expert ids in slot order; weights: where the worker reads
        the experts it hosts (model/weights.py), now and for a load after a failure."""
        self.index, self.handle, self.dtype, self.top_k = index, handle, dtype, top_k
        self.platform = handle.devices[0].platform
        self.backend = backends.expert_backend(backend, handle.devices[0])
        self.slots = [list(p) + list(s) for p, s in zip(primaries, shadows)]
        self.source = weights
        self.weights = [self._stack(l, ids) for l, ids in enumerate(self.slots)]
        self._index = handle.put(np.int32(index))
        self.programs = ProgramLog(handle.name)
        self._zero_rows()

    def _zero_rows(self) -> None:
        """(token, k) pairs served per slot, on the device: int32 [S] per layer."""
        self._rows = [self.handle.put(np.zeros(len(ids), np.int32)) for ids in self.slots]

    def _stack(self, layer: int, ids: list[int]) -> dict:
        """The weights of these experts on this EW's mesh: one [n, ...] stack per matrix, or, for
        the "tiles" backend, a tuple of n arrays (its program reads each in place)."""
        host = {k: a.astype(self.dtype) for k, a in self.source.experts(layer, ids).items()}
        if self.backend == "tiles":
            host = {k: tuple(a) for k, a in host.items()}
        return self.handle.put(host)

    def precompile(self, grid: ShapeGrid) -> None:
        """Run the layer program once at every grid shape (token bucket x number of sending AWs)
        on buffers routed nowhere, so no serving step compiles (programs are logged), and the
        heartbeat's probe program."""
        self.handle.probe()
        d = self.weights[0]["w_down"][0].shape[-1]
        with self.programs.recording():
            for T in grid.tokens:
                buf = np.zeros((T, wire.width(d, 2 * self.top_k, self.dtype)), self.dtype)
                for n in grid.senders:
                    bufs = self.handle.put(tuple(buf for _ in range(n)))
                    for layer in range(len(self.weights)):
                        self.run_layer(layer, bufs)
            if self.backend != "tiles":      # a rebalance's in-place slot write (slot 0 onto itself)
                slot0 = self.handle.put(np.int32(0))
                for layer, w in enumerate(self.weights):
                    self.weights[layer] = self.programs.call(_set_slot, w, slot0, {k: a[:1] for k, a in w.items()})
        self._zero_rows()                             # warm-up rows are no load

    def load_experts(self, layer: int, ids: list[int]) -> None:
        """Load experts (no replica left elsewhere) from the weights' source into new slots
        appended after the existing ones. The stack grows once, so this layer's program
        recompiles once."""
        new = self._stack(layer, ids)
        join = (lambda a, b: a + b) if self.backend == "tiles" else (lambda a, b: jnp.concatenate([a, b]))
        self.weights[layer] = {k: join(self.weights[layer][k], new[k]) for k in _KEYS}
        self.slots[layer] += list(ids)
        self._rows[layer] = jnp.concatenate([self._rows[layer], self.handle.put(np.zeros(len(ids), np.int32))])

    def replace_slots(self, layer: int, experts: dict[int, int]) -> None:
        """Overwrite slots with other experts ({slot: expert id}, read from the weights' source):
        a rebalance's move. Same shapes, so no program recompiles. The routing table must send
        nothing to these slots until the move is done (the controller publishes it after)."""
        for slot, expert in sorted(experts.items()):
            new = self._stack(layer, [expert])
            if self.backend == "tiles":
                self.weights[layer] = {k: a[:slot] + new[k] + a[slot + 1:] for k, a in self.weights[layer].items()}
            else:
                self.weights[layer] = self.programs.call(_set_slot, self.weights[layer],
                                                         self.handle.put(np.int32(slot)), new)
            self.slots[layer][slot] = expert

    def run_layer(self, layer: int, bufs: tuple) -> tuple:
        """Dispatch this layer over every AW's packed buffer (already on this EW's mesh); returns
        one [T, k, D] answer per buffer without waiting for it."""
        self.handle.check()
        out, self._rows[layer] = self.programs.call(expert_layer, self.weights[layer], self._index,
                                                    self._rows[layer], tuple(bufs), top_k=self.top_k,
                                                    backend=self.backend)
        return out

    def slot_rows(self) -> list[np.ndarray]:
        """Per layer, int64 [S]: (token, k) pairs each slot computed since this worker joined,
        replays included (waits for the layers dispatched so far: call it outside steps, e.g. on
        a /metrics scrape or once a rebalance window)."""
        self.handle.check()
        return [np.asarray(r, np.int64) for r in jax.device_get(self._rows)]

    def rows_served(self) -> int:
        """(token, k) pairs this worker has computed since it joined, over every layer."""
        return int(sum(r.sum() for r in self.slot_rows()))

    def results(self, pending: tuple) -> tuple:
        """The answers of run_layer (local: the device arrays themselves, nothing waits)."""
        return pending

    def hang(self, seconds: float) -> None:
        """Fault injection: stop answering without dying. This worker's device is kept busy for
        about `seconds`, so the answers of the layers dispatched after it arrive that late (a
        device in one process still ends its queued work; under ray the process sleeps)."""
        self._index = _spin(self._index, max(1, int(seconds * _spin_rate(self.handle.sharding))))

    def kill(self) -> None:
        """Fail-stop: the device buffers are gone and every later call raises WorkerFailed."""
        self.handle.alive = False
        for a in jax.tree.leaves((self.weights, self._index, self._rows)):
            a.delete()


@jax.jit
def _set_slot(stacks: dict, slot: jax.Array, new: dict) -> dict:
    """The stacks [S, ...] with slot `slot` (int32 scalar) replaced by `new` [1, ...] (a move)."""
    return {k: jax.lax.dynamic_update_slice_in_dim(a, new[k].astype(a.dtype), slot, axis=0) for k, a in stacks.items()}


@jax.jit
def _spin(index, n):
    """index, after n rounds of busy work on its device: every layer program reads the EW's
    index, so all of them wait for this (a hang's stand-in)."""
    busy = jax.lax.fori_loop(0, n, lambda i, a: jnp.tanh(a @ a), jnp.full((128, 128), 0.5))
    return index + (busy[0, 0] > 2).astype(index.dtype)         # tanh < 1: index unchanged


@functools.cache
def _spin_rate(sharding) -> float:
    """Rounds of _spin per second on this mesh (measured once, compiled on the way)."""
    x = jax.device_put(np.int32(0), sharding)
    jax.block_until_ready(_spin(x, 1))
    t0 = time.perf_counter()
    jax.block_until_ready(_spin(x, 200))
    return 200 / max(time.perf_counter() - t0, 1e-6)
