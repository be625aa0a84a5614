"""Attention workers as processes (`--runtime ray`): each AW is a Ray actor holding its KV pages,
its scheduler and its compiled programs; the driver keeps only the request records and the
tokens already emitted (what the controller needs to move requests when an AW dies).

The engine drives a remote AW exactly as a local one (start_step, begin, attend, receive, head,
commit, rewind), but every call is an actor call whose result stays an ObjectRef: the AW's
packed buffer goes to the EW processes as a ref, their answers come back to the AW as refs, and
the driver never holds the data (Ray moves it between the processes). Calls from the driver to
one actor run in submission order, so a step is dispatched whole and waited on once, for the
sampled tokens (plus once at its start, for the batch's shape: start_step). A dead AW fails its
refs with its actor id, which the transport maps back to the worker's name.

Snapshots go from the AW process straight to the checkpoint store's process; what the store has
is committed and survives a SIGKILL of the AW.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from tarragon_jax.config import CacheConfig, EngineConfig, ModelConfig
from tarragon_jax.kv.block_manager import BlockManager
from tarragon_jax.kv.remote_store import RemoteCheckpointStore, where
from tarragon_jax.workers.attention_worker import AttentionWorker, RestoreStats
from tarragon_jax.workers.program_log import CompileLog
from tarragon_jax.workers.remote_worker import RemoteWorker, WorkerProcess
from tarragon_jax.workers.routing_table import RoutingTable
from tarragon_jax.workers.runtime import WorkerHandle, use_compile_cache
from tarragon_jax.workers.sequence import Sequence, SeqState


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What the driver needs of an AW's step batch: its shape and which rows emit a token."""
    T: int                        # token rows (bucketed)
    n_tokens: int                 # real tokens
    rids: tuple[int, ...]         # request of each row
    chunks: tuple[int, ...]       # tokens each row puts in the cache
    emits: tuple[bool, ...]
    num_free: int                 # free KV pages after admission
    restored: RestoreStats

    def padded_to(self, T: int) -> "StepInfo":
        return dataclasses.replace(self, T=max(T, self.T))


class AttentionActor(WorkerProcess):
    """Runs inside the AW's process: one AttentionWorker on the process's first device."""

    def __init__(self, index: int, model: ModelConfig, attn_params: dict, cache: CacheConfig, engine: EngineConfig,
                 ert: RoutingTable, dtype: str, store, compile_cache_dir: str | None):
        import jax
        if compile_cache_dir:
            use_compile_cache(compile_cache_dir)
        client = (RemoteCheckpointStore(store, memory_tier=engine.snapshot_memory_tier,
                                        deadline_s=engine.transfer_deadline_s) if store is not None else None)
        self.compiles = CompileLog()
        with self.compiles.warming():
            self.aw = AttentionWorker(index, WorkerHandle(f"aw{index}", (jax.devices()[0],)), model, attn_params,
                                      cache, engine, ert, jax.numpy.dtype(dtype), client, time.perf_counter)
        self.batch = None

    def info(self) -> dict:
        from tarragon_jax.workers import backends
        device = self.aw.handle.devices[0]
        return {**where(), "devices": [f"{device} (ray actor)"], "attention_backend": self.aw.attention_backend,
                "device": backends.describe(device)}

    def ping(self) -> bool:
        return self.aw.handle.probe()

    def add(self, seq: Sequence) -> None:
        self.aw.scheduler.add(seq)

    def release(self, request_id: int) -> bool:
        seq = next((s for s in self.aw.live_requests() if s.request_id == request_id), None)
        return seq is not None and self.aw.release(seq)

    def start_step(self) -> StepInfo | None:
        self.batch = self.aw.start_step()
        if self.batch is None:
            return None
        b = self.batch
        return StepInfo(len(b.ids_T), b.n_tokens, tuple(s.request_id for s in b.seqs), tuple(b.chunks),
                        tuple(b.emits), self.aw.blocks.num_free, self.aw.restored)

    def begin(self, T: int) -> None:
        self.batch = self.batch.padded_to(T)
        self.aw.begin(self.batch)

    def attend(self, layer: int, *ys) -> np.ndarray | None:
        """The previous MoE layer's answers (if any), then this layer: one call per layer."""
        self._receive(ys)
        send = self.aw.attend(layer)
        return None if send is None else np.asarray(send)

    def _receive(self, ys: tuple) -> None:
        if ys:
            self.aw.receive([None if y is None else self.aw.handle.put(y) for y in ys])

    def rewind(self, layer: int) -> None:
        self.aw.rewind(layer)

    def head(self, *ys) -> np.ndarray:
        self._receive(ys)
        return np.asarray(self.aw.head())

    def commit(self, toks_R: np.ndarray) -> None:
        """The step's tokens (the driver waited for them: the step stands). Finished requests
        leave at once, their pages back in the pool."""
        for seq, _, _ in self.aw.commit(self.batch, toks_R):
            if seq.state is SeqState.FINISHED:
                self.aw.release(seq)

    def publish(self, ert: RoutingTable) -> None:
        self.aw.refe.publish(ert)

    def precompile(self, grid) -> None:
        with self.compiles.warming():
            self.aw.precompile(grid)


class PageCounts(BlockManager):
    """The driver's view of a remote AW's KV pages: the allocator's arithmetic (capacity,
    pages_for), with the free count the AW's process reported at its last step."""

    def __init__(self, num_pages: int, page_size: int):
        super().__init__(num_pages, page_size)
        self.reported_free = self.capacity

    @property
    def num_free(self) -> int:
        return self.reported_free


class Assigned:
    """The driver's view of a remote AW's scheduler: the requests assigned to it, unfinished."""

    def __init__(self, actor):
        self.actor, self.seqs = actor, {}

    def add(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq
        self.actor.add.remote(seq)

    @property
    def num_requests(self) -> int:
        return len(self.seqs)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.seqs.values() if s.state is not SeqState.FINISHED]


class RemoteForwarding:
    """A remote AW's forwarding engine as the driver sees it: routing table versions go to the
    AW's process (which puts them on its device), and the layer's transfers are refs."""

    def __init__(self, actor, handle, ert: RoutingTable):
        self.actor, self.handle, self.ert = actor, handle, ert

    def publish(self, ert: RoutingTable) -> None:
        if ert.version > self.ert.version:
            self.ert = ert
            self.actor.publish.remote(ert)

    def outbound(self, buf, ews: list) -> list[tuple]:
        return [(buf, ew.handle, self.handle) for ew in ews]

    def inbound(self, y, ew) -> tuple:
        return (y, self.handle, ew.handle)


class RemoteAttentionWorker(RemoteWorker):
    """Driver-side proxy with the AttentionWorker interface the engine and controller use."""

    def __init__(self, index: int, handle, runtime, model: ModelConfig, cache: CacheConfig, engine: EngineConfig,
                 ert: RoutingTable, dtype, store: RemoteCheckpointStore | None):
        self.index, self.model = index, model
        info = self._spawn(handle, runtime, runtime.aw_class, index, model, runtime.attn_ref, cache, engine, ert,
                           str(np.dtype(dtype)), None if store is None else store.actor, runtime.compile_cache_dir)
        self.attention_backend, self.device = info["attention_backend"], info["device"]
        self.blocks = PageCounts(cache.num_pages, cache.page_size)
        self.scheduler = Assigned(self.actor)
        self.refe = RemoteForwarding(self.actor, handle, ert)
        self.restored = RestoreStats()
        self._ys: tuple = ()                 # the last MoE layer's answers, for the next call
        self._start = None                   # a prefetched start_step

    def prefetch(self) -> None:
        """Start this step's start_step now, so every AW's runs at once (one round trip per step)."""
        self._start = self.actor.start_step.remote()

    def start_step(self) -> StepInfo | None:
        self.handle.check()
        ref, self._start = self._start or self.actor.start_step.remote(), None
        info = self.handle.get(ref)
        if info is not None:
            self.blocks.reported_free, self.restored = info.num_free, info.restored
            for rid in info.rids:
                if rid in self.scheduler.seqs and self.scheduler.seqs[rid].state is SeqState.WAITING:
                    self.scheduler.seqs[rid].state = SeqState.RUNNING
        return info

    def begin(self, info: StepInfo) -> None:
        self.handle.check()
        self._ys = ()
        self.actor.begin.remote(info.T)

    def attend(self, layer: int):
        self.handle.check()
        ys, self._ys = self._ys, ()
        return self.actor.attend.remote(layer, *ys)

    def receive(self, ys: list) -> None:
        """The EWs' answers (refs, None where an EW sent none) ride with the next call (attend or
        head): one actor call per layer. A failed answer fails that call, and with it every later
        output of the step, the sampled tokens included: the step's wait finds it there."""
        self._ys = tuple(ys)

    def rewind(self, layer: int) -> None:
        self._ys = ()
        self.actor.rewind.remote(layer)

    def head(self):
        self.handle.check()
        ys, self._ys = self._ys, ()
        return self.actor.head.remote(*ys)

    def commit(self, info: StepInfo, toks_R: np.ndarray) -> list[tuple[Sequence, int, bool]]:
        """The same commit on both sides: the AW's process advances its cache and snapshots, the
        driver appends the emitted tokens to its records (the same stop rules decide the end)."""
        self.handle.check()
        self.actor.commit.remote(toks_R)
        emitted = []
        for row, (rid, n, emits) in enumerate(zip(info.rids, info.chunks, info.emits)):
            seq = self.scheduler.seqs.get(rid)
            if seq is None:
                continue
            seq.num_cached += n                 # the driver's copy of the cache progress
            if emits:
                emitted.append((seq, int(toks_R[row]), seq.append(int(toks_R[row]))))
        return emitted

    def release(self, seq: Sequence) -> bool:
        if self.scheduler.seqs.pop(seq.request_id, None) is None:
            return False
        if self.handle.alive:
            self.actor.release.remote(seq.request_id)
        return True

    def live_requests(self) -> list[Sequence]:
        return self.scheduler.running
