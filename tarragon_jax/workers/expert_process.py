"""An expert worker as its own process (`--runtime ray`): the actor that runs inside it, the
receive loop over every AW's data channel, and the driver's proxy.

The EW process serves one channel per AW (layer buffers in, answers out) and one control channel
from the driver (precompile, loads of orphaned experts, heartbeats, its served-row count). A
layer's buffer names its step attempt (`tag`) and the AWs sending in that attempt, so the EW
gathers the buffers of one layer from every sender and runs ONE grouped FFN over all of them, as
the in-process EW does. It never waits on a sender for long: a sender whose channel closed (its
process died) is dropped at once, and one that has not sent within the gather window (a fraction
of the step deadline: hung, or just slow) is left out for the rest of that attempt; its buffer,
if it comes, runs alone. Expert compute per row does not depend on who else is in the batch, so
either way the answers are the same bits.
"""
from __future__ import annotations

import time

import numpy as np

from tarragon_jax.errors import WorkerId
from tarragon_jax.workers import channel as chan
from tarragon_jax.workers.program_log import CompileLog
from tarragon_jax.workers.remote_worker import RemoteHandle, RemoteWorker, WorkerProcess
from tarragon_jax.workers.runtime import WorkerHandle, use_compile_cache

GATHER_FRACTION = 0.25      # of the step deadline: how long an EW waits for a layer's other senders
KEEP_TAGS = 8               # step attempts whose late senders an EW remembers


class ExpertActor(WorkerProcess):
    """Runs inside the EW's process: one ExpertWorker on the process's first device, served by
    the process's loop (workers/rpc.py Server)."""

    def __init__(self, index: int, primaries, shadows, weights, backend: str, dtype, top_k: int,
                 compile_cache_dir: str | None, deadline_s: float, spin_s: float):
        self._setup_jax()
        import jax
        if compile_cache_dir:
            use_compile_cache(compile_cache_dir)
        from tarragon_jax.workers.expert_worker import ExpertWorker
        self.compiles = CompileLog()
        with self.compiles.warming():
            self.ew = ExpertWorker(index, WorkerHandle(WorkerId("ew", index), (jax.devices()[0],)), primaries, shadows,
                                   weights, backend, dtype, top_k)
        self.gather_s = GATHER_FRACTION * deadline_s
        self._groups: dict[tuple, dict] = {}     # (tag, layer) -> {aw: (channel, buffer)}
        self._opened: dict[tuple, float] = {}    # (tag, layer) -> when its first buffer came
        self._expect: dict[tuple, set] = {}      # (tag, layer) -> senders still awaited
        self._late: dict[object, set] = {}       # tag -> senders left out for the rest of that attempt
        self._gone: set[int] = set()             # AWs whose channel closed (until they send again)
        self._shapes: set[tuple] = set()         # buffer shapes of the groups run so far (compiled)
        self._start_server(self.ew.handle.name, spin_s, deadline_s, on_data=self._buffer, on_tick=self._tick,
                           on_closed=self._closed, next_timeout=self._next_timeout)

    def info(self) -> dict:
        return {**self._where(), "platform": self.ew.handle.devices[0].platform, "backend": self.ew.backend,
                "devices": [f"{self.ew.handle.devices[0]} (ray actor)"]}

    def ping(self) -> bool:
        return self.ew.handle.probe()

    def slot_rows(self) -> list[np.ndarray]:
        return self.ew.slot_rows()

    def load_experts(self, layer: int, ids: list[int]) -> None:
        self.ew.load_experts(layer, ids)

    def replace_slots(self, layer: int, experts: dict[int, int]) -> None:
        self.ew.replace_slots(layer, experts)

    def precompile(self, grid) -> None:
        with self.compiles.warming():
            self.ew.precompile(grid)

    # ---- the data plane -------------------------------------------------------------------------
    def _buffer(self, ch: chan.Channel, meta: tuple, buf: np.ndarray) -> None:
        """A layer buffer from an AW: join its group, run the group once every sender is in."""
        _, tag, layer, senders = meta
        aw, key = ch.peer["aw"], (tag, layer)
        if key not in self._groups:
            self._groups[key], self._opened[key] = {}, time.monotonic()
            self._expect[key] = set(senders) - self._late.get(tag, set()) - self._gone
        self._gone.discard(aw)
        self._groups[key][aw] = (ch, buf)
        self._expect[key].discard(aw)
        if not self._expect[key]:
            self._run(key)

    def _closed(self, ch: chan.Channel) -> None:
        """An AW's channel closed (its process died): no group waits for it any more."""
        aw = ch.peer.get("aw")
        if aw is None:
            return
        self._gone.add(aw)
        for key in list(self._expect):
            self._expect[key].discard(aw)
            if not self._expect[key]:
                self._run(key)

    def _tick(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self._opened.items() if now - t >= self.gather_s]:
            tag = key[0]
            self._late.setdefault(tag, set()).update(self._expect[key])
            while len(self._late) > KEEP_TAGS:
                self._late.pop(next(iter(self._late)))
            self._run(key)

    def _next_timeout(self) -> float | None:
        if not self._opened:
            return None
        return max(0.0, min(self._opened.values()) + self.gather_s - time.monotonic())

    def _run(self, key: tuple) -> None:
        """One grouped FFN over the group's buffers (in AW order); each AW gets its answer."""
        group = self._groups.pop(key)
        del self._opened[key], self._expect[key]
        aws = sorted(group)
        shapes = tuple(group[a][1].shape for a in aws)
        if shapes not in self._shapes:         # a compile is coming: the waiting AWs hear of it at once
            self._shapes.add(shapes)
            self.keepalive.kick()
        ys = self.ew.run_layer(key[1], self.ew.handle.put(tuple(group[a][1] for a in aws)))
        for a, y in zip(aws, ys):
            try:
                group[a][0].send(("ans",) + key, np.asarray(y), timeout=self.gather_s)
            except (chan.ChannelClosed, chan.ChannelTimeout):
                pass                      # that AW died or hangs: nobody waits for its answer


class RemoteExpertWorker(RemoteWorker):
    """Driver-side proxy with the ExpertWorker interface the controller uses (the engine never
    calls an EW process: the AW processes exchange every layer with it directly)."""

    def __init__(self, index: int, handle: RemoteHandle, primaries, shadows, runtime, backend: str, dtype,
                 top_k: int):
        self.index = index
        self.slots = [list(p) + list(s) for p, s in zip(primaries, shadows)]
        self.n_primary = [len(p) for p in primaries]
        info = self._spawn(handle, runtime, runtime.actor_class, index, primaries, shadows, runtime.weights_ref,
                           backend, dtype, top_k, runtime.compile_cache_dir, runtime.deadline_s, runtime.spin_s)
        self.platform, self.backend = info["platform"], info["backend"]

    def slot_rows(self) -> list[np.ndarray]:
        return self.rpc.call("slot_rows")

    def rows_served(self) -> int:
        return int(sum(r.sum() for r in self.slot_rows()))

    def load_experts(self, layer: int, ids: list[int]) -> None:
        """The process reads them itself (from the checkpoint files on its node)."""
        self.rpc.call("load_experts", layer, list(ids))
        self.slots[layer] += list(ids)

    def replace_slots(self, layer: int, experts: dict[int, int]) -> None:
        """A rebalance's move; the process reads the experts itself."""
        self.rpc.call("replace_slots", layer, dict(experts))
        for slot, e in experts.items():
            self.slots[layer][slot] = e
