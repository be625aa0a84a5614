"""Attention workers as processes (`--runtime ray`): each AW is a Ray actor holding its KV pages,
its scheduler and its compiled programs; the driver keeps only the request records and the
tokens already emitted (what the controller needs to move requests when an AW dies).

The AW drives its own step. The driver sends it one message to learn the batch's shape
(start_step: every AW of a step pads to one token bucket) and one to run the step (run_step);
the AW's process then runs every layer itself: its layer program, the packed buffer to each live
EW process over a data channel (workers/channel.py: shared memory and a Unix socket on one host),
their answers back, the next layer, the head; it answers with the sampled tokens, or with the
EW that failed and the layer where, so the driver can re-plan and have it replay from there.
Nothing of a layer passes through the driver or through Ray.

Snapshots go from the AW process straight to the checkpoint store's process; what the store has
is committed and survives a SIGKILL of the AW.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from tarragon_jax.config import CacheConfig, EngineConfig, ModelConfig
from tarragon_jax.kv.block_manager import BlockManager
from tarragon_jax.errors import WorkerFailed, WorkerId
from tarragon_jax.kv.remote_store import RemoteCheckpointStore
from tarragon_jax.workers import channel as chan
from tarragon_jax.workers.attention_worker import AttentionWorker, PrefixStats, RestoreStats
from tarragon_jax.workers.grammar import Vocabulary
from tarragon_jax.workers.keepalive import is_busy, vouch
from tarragon_jax.workers.program_log import CompileLog
from tarragon_jax.workers.remote_worker import RemoteWorker, WorkerProcess
from tarragon_jax.workers.routing_table import RoutingTable
from tarragon_jax.workers.runtime import WorkerHandle, use_compile_cache
from tarragon_jax.workers.sequence import Sequence, SeqState, emit, record_prompt_logprobs

EW_WAIT_FRACTION = 0.5      # of the step deadline: an AW's wait for a layer's EW answers (the
                            # driver's wait for the AW's step is the whole deadline: the AW
                            # names a hung EW before the driver would blame the AW)
STORE_WAIT_FRACTION = 0.25  # of the step deadline: an AW's wait for the checkpoint store (a restore
                            # that finds it hung costs the AW's step that much, and the driver never
                            # takes the AW for hung: before, a hung store made it fence healthy AWs)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What the driver needs of an AW's step batch: its shape and which rows emit a token."""
    T: int                        # token rows (bucketed)
    n_tokens: int                 # real tokens
    rids: tuple[int, ...]         # request of each row
    starts: tuple[int, ...]       # where each row's chunk starts (its cached tokens: a prefix-cache hit
                                  # or a restore can skip ahead)
    chunks: tuple[int, ...]       # tokens each row puts in the cache
    emits: tuple[bool, ...]
    num_free: int                 # free KV pages after admission
    restored: RestoreStats
    prefix: PrefixStats

    def padded_to(self, T: int) -> "StepInfo":
        return dataclasses.replace(self, T=max(T, self.T))


class AttentionActor(WorkerProcess):
    """Runs inside the AW's process: one AttentionWorker on the process's first device, served by
    the process's loop; it drives its own step's layer loop over its data channels to the EWs."""

    def __init__(self, index: int, model: ModelConfig, weights, cache: CacheConfig, engine: EngineConfig,
                 ert: RoutingTable, dtype: str, store, compile_cache_dir: str | None, spin_s: float,
                 vocab: Vocabulary | None):
        self._setup_jax()
        import jax
        if compile_cache_dir:
            use_compile_cache(compile_cache_dir)
        self.engine = engine
        client = self._store_client(store) if store is not None else None
        self.compiles = CompileLog()
        with self.compiles.warming():
            self.aw = AttentionWorker(index, WorkerHandle(WorkerId("aw", index), (jax.devices()[0],)), model,
                                      weights.attention(), cache, engine, ert, jax.numpy.dtype(dtype), client,
                                      time.perf_counter, vocab)
        self.index, self.n_layers, self.n_ews = index, model.n_layers, engine.num_expert_workers
        self.ew_wait_s = EW_WAIT_FRACTION * engine.transfer_deadline_s
        self.batch = None
        self.peers: dict[int, dict] = {}                 # live EW -> its address
        self.channels: dict[int, chan.Channel] = {}     # live EW -> data channel (opened on first use)
        self._start_server(self.aw.handle.name, spin_s, engine.transfer_deadline_s)
        self.spin_s = spin_s

    def info(self) -> dict:
        from tarragon_jax.workers import backends
        device = self.aw.handle.devices[0]
        return {**self._where(), "devices": [f"{device} (ray actor)"], "attention_backend": self.aw.attention_backend,
                "device": backends.describe(device)}

    def ping(self) -> bool:
        return self.aw.handle.probe()

    def add(self, seq: Sequence) -> None:
        self.aw.scheduler.add(seq)

    def release(self, request_id: int) -> bool:
        seq = next((s for s in self.aw.live_requests() if s.request_id == request_id), None)
        return seq is not None and self.aw.release(seq)

    def reset_prefix_cache(self) -> int:
        return self.aw.reset_prefix_cache()

    def _store_client(self, actor) -> RemoteCheckpointStore:
        """The store as this AW calls it, bounded by STORE_WAIT_FRACTION of the step deadline."""
        return RemoteCheckpointStore(actor, memory_tier=self.engine.snapshot_memory_tier,
                                     deadline_s=self.engine.transfer_deadline_s * STORE_WAIT_FRACTION)

    def attach_store(self, actor) -> None:
        """The controller replaced a dead checkpoint store: snapshot to the new one from now on,
        every committed block of the requests here included (AttentionWorker.refill)."""
        old = self.aw.store
        self.aw.refill(self._store_client(actor))
        if old is not None:
            old.detach()             # what was queued for the dead one is dropped

    def publish(self, ert: RoutingTable, peers: dict[int, dict]) -> None:
        """A routing table version and the live EWs' addresses (a replacement's is new)."""
        self.aw.refe.publish(ert)
        for j in list(self.channels):
            if peers.get(j) != self.peers.get(j):
                self.channels.pop(j).close()
        self.peers = dict(peers)

    def start_step(self) -> StepInfo | None:
        self.batch = self.aw.start_step()
        if self.batch is None:
            return None
        b = self.batch
        return StepInfo(len(b.ids_T), b.n_tokens, tuple(s.request_id for s in b.seqs),
                        tuple(s.num_cached for s in b.seqs), tuple(b.chunks), tuple(b.emits),
                        self.aw.blocks.num_free, self.aw.restored, self.aw.prefix_stats)

    def run_step(self, T: int, step: int, tag: int, first: int, senders: tuple[int, ...]):
        """The step's layers from `first` (0: embed the batch padded to T; else replay from the
        kept inputs of `first`), each MoE layer's buffer sent to every live EW and their answers
        received here, then the head. Returns ("ok", its output on the host) or ("failed", worker, layer,
        why): an EW whose process closed its channel (found at once) or did not answer within
        its wait; the driver re-plans and calls again from that layer."""
        if first == 0:
            self.batch = self.batch.padded_to(T)
            self.aw.begin(self.batch, step)
        else:
            self.aw.rewind(first)
        for layer in range(first, self.n_layers):
            send = self.aw.attend(layer)
            if send is None:
                continue
            failed = self._exchange(np.asarray(send), tag, self.aw.model.moe_index(layer), senders)
            if failed is not None:
                return ("failed", failed[0], layer, failed[1])
        return ("ok", jax.tree.map(np.asarray, self.aw.head()))

    def _exchange(self, buf: np.ndarray, tag: int, moe: int, senders: tuple) -> tuple[WorkerId, str] | None:
        """One MoE layer's buffer (moe: its index among the MoE layers, as the EWs count them) to
        every live EW, their answers into the AW; (EW, why) on a failure."""
        live = sorted(self.peers)
        for j in live:        # bounded like the answers: a hung EW must not hold this AW longer
            try:
                if j not in self.channels:
                    self.channels[j] = chan.connect(self.peers[j], {"name": self.aw.handle.name, "aw": self.index,
                                                                    "role": "data"}, self.ew_wait_s)
                self.channels[j].send(("buf", tag, moe, senders), buf, timeout=self.ew_wait_s)
            except (chan.ChannelClosed, chan.ChannelTimeout) as e:
                self.channels.pop(j, None)
                return WorkerId("ew", j), f"send failed ({e})"
        ys: list = [None] * self.n_ews
        waiting = {self.channels[j]: j for j in live}
        end = dict.fromkeys(waiting, time.monotonic() + self.ew_wait_s)   # an EW that compiles gets longer
        while waiting:
            left = max(0.0, max(end.values()) - time.monotonic())
            ready = chan.wait_readable(list(waiting), min(left, self.keepalive.interval_s), self.spin_s)
            late = [j for ch, j in waiting.items() if ch not in ready and end[ch] <= time.monotonic()]
            if late:
                return WorkerId("ew", min(late)), f"no answer within {self.ew_wait_s:.3f} s"
            if not ready:                 # a long wait on live EWs: the driver waits on this AW meanwhile
                self._vouch()
                continue
            for ch in ready:
                j = waiting[ch]
                try:
                    meta, y = ch.recv(self.ew_wait_s)    # it is readable: the message is there or coming
                except (chan.ChannelClosed, chan.ChannelTimeout) as e:
                    self.channels.pop(j, None)
                    return WorkerId("ew", j), f"process gone ({e})"
                if (grace := is_busy(meta)) is not None:   # the EW is compiling: wait on, and say so
                    end[ch] = max(end[ch], time.monotonic() + grace)
                    self._vouch()
                elif meta == ("ans", tag, moe):          # else a stale answer of an aborted attempt
                    ys[j] = y
                    del waiting[ch], end[ch]
        self.aw.receive(list(self.aw.handle.put(tuple(ys))))
        return None

    def _vouch(self) -> None:
        """Tell the driver this AW is alive: it waits on EWs (within its own bound on them)."""
        self.keepalive.sent += vouch(self.server.waiting(), self.keepalive.grace_s, self.keepalive.interval_s)

    def commit(self, out: dict) -> None:
        """The step's output (the driver has it: the step stands). Finished requests leave at
        once, their pages back in the pool."""
        for seq, _, _ in self.aw.commit(self.batch, out):
            if seq.state is SeqState.FINISHED:
                self.aw.release(seq)

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

    def __init__(self, rpc):
        self.rpc, self.seqs = rpc, {}

    def add(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq
        self.rpc.cast("add", seq)

    @property
    def num_requests(self) -> int:
        return len(self.seqs)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.seqs.values() if s.state is not SeqState.FINISHED]


class RemoteForwarding:
    """A remote AW's forwarding engine as the driver sees it: each routing table version goes to
    the AW's process with the addresses of the live EWs it exchanges layers with."""

    def __init__(self, rpc, ert: RoutingTable, peers: Callable[[], dict]):
        self.rpc, self.ert, self.peers = rpc, ert, peers
        self.rpc.cast("publish", ert, peers())

    def publish(self, ert: RoutingTable) -> None:
        self.ert = ert
        self.rpc.cast("publish", ert, self.peers())


class RemoteAttentionWorker(RemoteWorker):
    """Driver-side proxy with the AttentionWorker calls the engine and controller make; a step is
    prefetch/start_step (the batch's shape), launch (the AW runs every layer itself) and commit."""

    def __init__(self, index: int, handle, runtime, model: ModelConfig, cache: CacheConfig, engine: EngineConfig,
                 ert: RoutingTable, dtype, store: RemoteCheckpointStore | None, peers: Callable[[], dict],
                 vocab: Vocabulary | None = None):
        self.index, self.model = index, model
        self.store_actor = None if store is None else store.actor     # the store it snapshots to
        info = self._spawn(handle, runtime, runtime.aw_class, index, model, runtime.weights_ref, cache, engine, ert,
                           str(np.dtype(dtype)), None if store is None else store.actor, runtime.compile_cache_dir,
                           runtime.spin_s, vocab)
        self.attention_backend, self.device = info["attention_backend"], info["device"]
        self.blocks = PageCounts(cache.num_pages, cache.page_size)
        self.scheduler = Assigned(self.rpc)
        self.refe = RemoteForwarding(self.rpc, ert, peers)
        self.restored, self.prefix_stats = RestoreStats(), PrefixStats()
        self._start = None                   # a prefetched start_step
        self.running: int | None = None      # the launched run_step's call id

    def prefetch(self) -> None:
        """Start this step's start_step now, so every AW's runs at once (one round trip per step)."""
        self._start = self.rpc.submit("start_step")

    def start_step(self) -> StepInfo | None:
        self.handle.check()
        i, self._start = (self._start if self._start is not None else self.rpc.submit("start_step")), None
        info = self.rpc.result(i)
        if info is not None:
            self.blocks.reported_free, self.restored, self.prefix_stats = info.num_free, info.restored, info.prefix
            for rid in info.rids:
                if rid in self.scheduler.seqs and self.scheduler.seqs[rid].state is SeqState.WAITING:
                    self.scheduler.seqs[rid].state = SeqState.RUNNING
        return info

    def launch(self, T: int, step: int, tag: int, first: int, senders: tuple[int, ...]) -> None:
        """Start the step's layers from `first` in the AW's process (rpc.gather waits for them)."""
        self.handle.check()
        self.running = self.rpc.submit("run_step", T, step, tag, first, senders)

    def commit(self, batch: StepInfo, out: dict) -> list[tuple[Sequence, int, bool]]:
        """The same commit on both sides: the AW's process advances its cache and snapshots, the
        driver appends the emitted tokens (and logprobs) to its records (the same stop rules
        decide the end)."""
        self.handle.check()
        self.rpc.cast("commit", {"tokens": out["tokens"]})   # the driver's records are the ones that hold logprobs
        record_prompt_logprobs(out, self.scheduler.seqs)
        emitted = []
        for row, (rid, start, n, emits) in enumerate(zip(batch.rids, batch.starts, batch.chunks, batch.emits)):
            seq = self.scheduler.seqs.get(rid)
            if seq is None:
                continue
            seq.num_cached = start + n          # the driver's copy of the cache progress
            if emits:
                emitted.append(emit(seq, out, row))
        return emitted

    def release(self, seq: Sequence) -> bool:
        if self.scheduler.seqs.pop(seq.request_id, None) is None:
            return False
        if self.handle.alive:
            try:
                self.rpc.cast("release", seq.request_id)
            except WorkerFailed:
                pass                            # gone: its pages went with it
        return True

    def live_requests(self) -> list[Sequence]:
        return self.scheduler.running

    def reset_prefix_cache(self) -> int:
        self.handle.check()
        return self.rpc.call("reset_prefix_cache")

    def attach_store(self, store: RemoteCheckpointStore) -> None:
        """A new checkpoint store replaced a dead one: the process snapshots to it, refilling it."""
        self.rpc.call("attach_store", store.actor)
        self.store_actor = store.actor
