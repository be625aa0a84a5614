"""Checkpoint store: asynchronous, incremental snapshots of attention-worker KV blocks (paper 2.4, 2.6).

An AW hands `snapshot()` a device array of whole KV blocks; the call only starts the device->host
copy and enqueues, so the decode loop never waits on storage. One background thread (low CPU
priority) turns each snapshot into numpy and keeps every block's checksum (kv/checksum.py: computed
by the AW's read program, or here in one vectorized pass). With the memory tier
(the paper's DRAM bucket of the store) the blocks *commit* right then; every `flush_interval_s`
the window's blocks of each AW are written as one Orbax checkpoint (`directory/aw{aw}/{seq:08d}`,
one array `{"blocks": [n, L, parts, page_size, kv, hd]}`; the manifest knows each block's row),
the durable copy. One save per window, not per step, and one array per save, not per block, keep
Orbax's host cost (Python, per save and per leaf: a pytree of every block took ~12% of a core at
batch 96 on the tiny model) off the decode loop. Without the
memory tier blocks commit only once written. A request's committed token index is its contiguous
committed block prefix from block 0 times page_size; a failed AW's requests are restored from that
prefix on another AW (memory tier first, else an Orbax restore of the windows that hold its
blocks) and only the tokens after it are recomputed.

Checksums are ours, not Orbax's: Orbax 0.12.8 / tensorstore return silently changed values after
bytes of a data file are overwritten. Compression is off by default: KV values
barely compress (random-like mantissas) and zstd would take host CPU from the engine thread.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import queue
import tempfile
import threading
import time
import weakref
from typing import Any, Callable

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tarragon_jax.kv.checksum import block_sums_host

log = logging.getLogger(__name__)


class SnapshotMissing(LookupError):
    """Nothing committed for a request/block, or its checkpoint files are gone."""


class StoreUnavailable(SnapshotMissing):
    """The store's process is dead or silent: nothing it held can be restored."""


class SnapshotCorrupt(ValueError):
    """A block's checksum does not match, or its checkpoint cannot be read."""


@dataclasses.dataclass(frozen=True)
class BlockRef:
    request_id: int
    block: int            # block b holds token positions [b * page_size, (b + 1) * page_size)

    @property
    def key(self) -> str:
        return f"r{self.request_id}_b{self.block}"


@dataclasses.dataclass(frozen=True)
class _Entry:
    """Where a committed block lives and what it must hash to."""
    path: str | None      # checkpoint directory holding it; None until persisted (memory tier only)
    key: str
    sum: int              # kv/checksum.py's block_sums of the block
    shape: tuple
    dtype: np.dtype
    seq: int
    aw: int
    row: int = 0          # its row in the checkpoint's "blocks" array (when persisted)


@dataclasses.dataclass
class _Job:
    seq: int
    aw: int
    refs: list[BlockRef]
    blocks: Any           # jax.Array (host copy in flight) or np.ndarray, [n, L, parts, ps, kv, hd]
    epochs: list[int]     # per ref: the request's drop epoch when enqueued (stale -> not committed)
    life: int = 0         # the sending AW's life (abandon() ends it): a dead AW's copy never lands
    sums: Any = None      # [n] uint32 block checksums (device or host), None: computed on ingest
    host: list = dataclasses.field(default_factory=list)   # (ref, block, sum, epoch) once ingested


_FLUSH = object()          # queue token: wait()/close() want the current window written now


def check_snapshot(refs: list[BlockRef], shape: tuple) -> None:
    """ValueError for a snapshot() whose blocks cannot be these refs' (any store's contract)."""
    if len(shape) != 6 or shape[0] < len(refs) or shape[2] not in (1, 2):
        raise ValueError(f"blocks must be [n>={len(refs)}, L, parts (2: K and V; 1: a latent), page_size, kv, hd], got {shape}")
    if len(set(refs)) != len(refs):
        raise ValueError(f"duplicate BlockRefs in one snapshot: {refs}")


def start_host_copy(*arrays) -> None:
    """Start the device->host copy of a snapshot's device arrays (nothing for host arrays)."""
    for a in arrays:
        if hasattr(a, "copy_to_host_async"):
            a.copy_to_host_async()


def _tier(memory_copy, e: _Entry) -> str:
    return "memory-tier" if memory_copy is not None else f"disk ({e.path})"


class _Timer:
    def __init__(self):
        self.n, self.total, self.max = 0, 0.0, 0.0

    def add(self, s: float) -> None:
        self.n, self.total, self.max = self.n + 1, self.total + s, max(self.max, s)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0



def _close_before_exit(store: "CheckpointStore") -> None:
    """A store left open must stop its writer when the interpreter exits: a daemon thread cut off
    inside a jax or tensorstore call aborts the process, and one that flushes after
    concurrent.futures has shut its pools down (threading's exit hooks run before atexit's)
    fails. So the hook is one of threading's, registered after concurrent.futures' and therefore
    run before it; it holds the store weakly, so closed stores are freed."""
    ref = weakref.ref(store)

    def close() -> None:
        s = ref()
        if s is not None:
            s._close_at_exit()
    register = getattr(threading, "_register_atexit", atexit.register)   # CPython >= 3.9
    register(close)

class CheckpointStore:
    """KV snapshots of all AWs; thread-safe (engine thread calls, one background writer).

    Disk restore costs about one Orbax partial restore (~3 ms of overhead) per checkpoint that
    holds the request's blocks, so a request snapshotted one block per decode step reads many
    small checkpoints; the memory tier avoids that. A restore racing a drop() or re-snapshot of
    the same request may find its files deleted and raise SnapshotMissing.
    """

    def __init__(self, directory: str | None = None, *, memory_tier: bool = True,
                 clock: Callable[[], float] = time.perf_counter, use_compression: bool = False,
                 flush_interval_s: float | None = 0.25):
        """flush_interval_s: snapshots arriving within this window go into one Orbax checkpoint
        per AW (a save has a fixed cost of ~15 ms of host CPU, paid once per window, not per
        step); None writes one checkpoint per snapshot() call."""
        self.flush_interval_s = flush_interval_s
        self._own_dir = directory is None
        self.directory = epath.Path(directory if directory is not None
                                    else tempfile.mkdtemp(prefix="tarragon_kv_"))
        self.memory_tier = memory_tier
        self._clock = clock
        self._saver = ocp.PyTreeCheckpointer(use_compression=use_compression)
        self._reader = ocp.PyTreeCheckpointer(use_compression=use_compression)
        self._read_lock = threading.Lock()          # one Orbax restore at a time per store
        self._lock = threading.Lock()               # manifest, memory tier, counters
        self._idle = threading.Condition(self._lock)
        self._manifest: dict[int, dict[int, _Entry]] = {}
        self._memory: dict[tuple[int, int], np.ndarray] = {}
        self._live: dict[str, int] = {}             # checkpoint path -> committed entries in it
        self._epoch: dict[int, int] = {}            # request -> times dropped (while jobs in flight)
        self._life: dict[int, int] = {}             # AW -> times abandoned (its failures)
        self._pending = 0
        self._seq = self._first_seq()
        self._errors: list[str] = []
        self._n_snapshots = self._n_blocks = self._n_bytes = self._n_saved = 0
        self._blocked, self._save = _Timer(), _Timer()
        self._closed = self._exiting = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kv-checkpoint", daemon=True)
        self._thread.start()
        _close_before_exit(self)

    # ---- engine-side API ---------------------------------------------------------------------
    def snapshot(self, aw: int, refs: list[BlockRef], blocks, sums=None) -> None:
        """Queue blocks [n, L, parts, page_size, kv, hd] for a durable write; returns without waiting.
        n may exceed len(refs): the rows past it are padding of a bucketed device read (sliced
        on the host, so the device never runs a per-count slice program). sums: their [n]
        checksums (kv_cache.read_blocks computes them with the read); None: computed here."""
        t0 = self._clock()
        shape = tuple(blocks.shape)
        check_snapshot(refs, shape)
        if not refs:
            return
        start_host_copy(blocks, sums)
        with self._lock:
            if self._closed:
                raise RuntimeError("snapshot() on a closed CheckpointStore")
            seq, self._seq = self._seq, self._seq + 1
            self._pending += 1
            job = _Job(seq, aw, list(refs), blocks, [self._epoch.get(r.request_id, 0) for r in refs],
                       self._life.get(aw, 0), sums)
            self._n_snapshots += 1
            self._n_blocks += len(refs)
            self._n_bytes += len(refs) * int(np.prod(shape[1:])) * np.dtype(blocks.dtype).itemsize
            self._queue.put(job)
            self._blocked.add(self._clock() - t0)

    def committed_blocks(self, request_id: int) -> int:
        """Length of the contiguous committed block prefix starting at block 0."""
        with self._lock:
            return self._prefix(self._manifest.get(request_id, {}))

    def committed_tokens(self, request_id: int, page_size: int) -> int:
        return self.committed_blocks(request_id) * page_size

    def requests(self) -> list[int]:
        """Requests with at least one committed block."""
        with self._lock:
            return sorted(self._manifest)

    def restore(self, request_id: int, num_blocks: int | None = None) -> np.ndarray:
        """The committed prefix (or its first num_blocks) as [n, L, parts, page_size, kv, hd], verified."""
        with self._lock:
            entries = self._manifest.get(request_id, {})
            n_pre = self._prefix(entries)
            n = n_pre if num_blocks is None else num_blocks
            if num_blocks is not None and num_blocks < 1:
                raise ValueError(f"request {request_id}: num_blocks must be >= 1, got {num_blocks}")
            if not entries:
                raise SnapshotMissing(f"request {request_id}: no committed KV blocks")
            if n_pre == 0 or n > n_pre:
                raise SnapshotMissing(f"request {request_id}: block {n_pre} is not committed "
                                      f"(committed prefix {n_pre} blocks, asked for {num_blocks or 'all'})")
            chosen = [entries[b] for b in range(n)]
            mem = [self._memory.get((request_id, b)) for b in range(n)]
        out: list[np.ndarray | None] = list(mem)
        by_path: dict[str, list[int]] = {}
        for b, m in enumerate(mem):
            if m is None and chosen[b].path is None:
                raise SnapshotMissing(f"request {request_id}: block {b} was never persisted and its "
                                      f"memory-tier copy is gone")
            if m is None:
                by_path.setdefault(chosen[b].path, []).append(b)
        for path, bs in by_path.items():
            got = self._read(request_id, path, [chosen[b] for b in bs])
            for b in bs:
                out[b] = got[chosen[b].key]
        for b, (e, a) in enumerate(zip(chosen, out)):
            if a.shape != e.shape or a.dtype != e.dtype:
                raise SnapshotCorrupt(f"request {request_id} block {b}: {_tier(mem[b], e)} copy has "
                                      f"{a.dtype}{a.shape}, snapshot was {e.dtype}{e.shape}")
        blocks = np.stack(out)
        for b, got in enumerate(block_sums_host(blocks)):
            if got != chosen[b].sum:
                raise SnapshotCorrupt(f"request {request_id} block {b}: checksum mismatch in the "
                                      f"{_tier(mem[b], chosen[b])} copy")
        return blocks

    def drop(self, request_id: int) -> None:
        """Forget a finished request; in-flight snapshots of it will not commit; files go lazily."""
        with self._lock:
            self._epoch[request_id] = self._epoch.get(request_id, 0) + 1
            entries = self._manifest.pop(request_id, {})
            dead = []
            for b, e in entries.items():
                self._memory.pop((request_id, b), None)
                if e.path is not None and self._unref(e.path):
                    dead.append(e.path)
            if self._closed:
                return                               # writer stopped: files stay until rmtree
            self._pending += len(dead)
        for p in dead:
            self._queue.put(p)                       # str job: delete that checkpoint directory

    def abandon(self, aw: int) -> None:
        """AW `aw` died: its snapshots whose host copy has not landed yet never will (they were
        reads of its device memory), so they do not commit. What was ingested stays committed."""
        with self._lock:
            self._life[aw] = self._life.get(aw, 0) + 1

    def drop_memory_tier(self) -> None:
        """Forget the host copies (tests, or under host memory pressure): restores read disk."""
        with self._lock:
            self._memory.clear()

    def wait(self, timeout: float | None = None) -> None:
        """Block until every queued snapshot (and file deletion) is done; TimeoutError otherwise."""
        self._queue.put(_FLUSH)                      # don't let the writer sit out its window
        with self._idle:
            if not self._idle.wait_for(lambda: self._pending == 0, timeout):
                raise TimeoutError(f"{self._pending} checkpoint jobs still in flight after {timeout} s")

    def close(self) -> None:
        """Finish queued work, stop the writer; delete the directory only if the store made it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.wait()
        self._queue.put(None)
        self._thread.join()
        if self._own_dir:
            self.directory.rmtree(missing_ok=True)

    def _close_at_exit(self) -> None:
        """Interpreter exit: the queued writes serve nobody now (the engine is gone), so the
        writer drops them and stops."""
        self._exiting = True
        self.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def errors(self) -> list[str]:
        """Messages of failed background saves (their blocks stayed uncommitted)."""
        with self._lock:
            return list(self._errors)

    @property
    def stats(self) -> dict:
        with self._lock:
            return {
                "snapshots": self._n_snapshots, "blocks": self._n_blocks, "bytes": self._n_bytes,
                "blocked_mean_s": self._blocked.mean, "blocked_max_s": self._blocked.max,
                "save_mean_s": self._save.mean, "save_max_s": self._save.max, "save_n": self._save.n,
                "saved_blocks": self._n_saved,
                "failed": len(self._errors), "pending": self._pending,
                "committed_blocks": sum(len(e) for e in self._manifest.values()),
                "memory_bytes": sum(a.nbytes for a in self._memory.values()),
            }

    # ---- internals ---------------------------------------------------------------------------
    @staticmethod
    def _prefix(entries: dict[int, _Entry]) -> int:
        n = 0
        while n in entries:
            n += 1
        return n

    def _first_seq(self) -> int:
        """Continue after checkpoints already in a reused directory (Orbax refuses to overwrite)."""
        if self._own_dir or not self.directory.exists():
            return 0
        seqs = [int(p.name.split(".")[0]) for p in self.directory.glob("aw*/*")
                if p.name.split(".")[0].isdigit()]
        return max(seqs, default=-1) + 1

    def _unref(self, path: str) -> bool:
        """Caller holds the lock; True when no committed block lives in `path` any more."""
        self._live[path] -= 1
        if self._live[path] == 0:
            del self._live[path]
            return True
        return False

    def _write(self, path: epath.Path, tree: dict[str, np.ndarray]) -> None:
        self._saver.save(path, tree)

    def _read(self, request_id: int, path: str, entries: list[_Entry]) -> dict[str, np.ndarray]:
        """These blocks from one checkpoint: its one array restored, their rows taken."""
        keys = [e.key for e in entries]
        if not epath.Path(path).exists():
            raise SnapshotMissing(f"request {request_id}: checkpoint {path} holding {keys} is gone")
        args = ocp.args.PyTreeRestore(restore_args={"blocks": ocp.RestoreArgs(restore_type=np.ndarray)})
        try:
            with self._read_lock:
                got = self._reader.restore(path, args=args)["blocks"]
        except FileNotFoundError as e:
            raise SnapshotMissing(f"request {request_id}: checkpoint {path} is gone: {e}") from e
        except Exception as e:
            raise SnapshotCorrupt(f"request {request_id}: checkpoint {path} unreadable for {keys}: {e}") from e
        if not isinstance(got, np.ndarray) or max(e.row for e in entries) >= len(got):
            raise SnapshotCorrupt(f"request {request_id}: checkpoint {path} does not hold the rows of {keys}")
        return {e.key: got[e.row] for e in entries}

    def _run(self) -> None:
        try:    # Linux: nice is per thread (and inherited by Orbax's helper threads)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass    # the decode loop must not compete with snapshot writes for CPU
        unpersisted: dict[int, list[_Job]] = {}      # aw -> ingested jobs waiting for their Orbax write
        deadline = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            try:
                job = self._queue.get(timeout=timeout)
            except queue.Empty:
                job = _FLUSH                         # the window closed
            if isinstance(job, str):
                self._guarded([job], lambda: epath.Path(job).rmtree(missing_ok=True))
            elif isinstance(job, _Job):
                self._guarded([], lambda: self._ingest(job))
                unpersisted.setdefault(job.aw, []).append(job)
                if deadline is None:
                    deadline = self._clock() + (self.flush_interval_s or 0.0)
            if job is None or job is _FLUSH or (deadline is not None and self._clock() >= deadline):
                for aw, jobs in sorted(unpersisted.items()):
                    self._guarded(jobs, lambda: self._persist(jobs))
                unpersisted, deadline = {}, None
            if job is None:
                return

    def _guarded(self, jobs: list, work: Callable[[], None]) -> None:
        """Run one unit of background work; a failure is recorded (blocks stay uncommitted) and
        the writer keeps going. Every job counts down `pending` exactly once."""
        try:
            if not self._exiting:
                work()
        except Exception as e:
            what = "; ".join(j if isinstance(j, str) else f"snapshot {j.seq} of aw {j.aw} ({j.refs})" for j in jobs)
            log.exception("checkpoint job failed: %s", what)
            with self._lock:
                self._errors.append(f"{what}: {type(e).__name__}: {e}")
        finally:
            with self._idle:
                self._pending -= len(jobs)
                if self._pending == 0:
                    self._epoch.clear()          # no job holds an epoch any more
                self._idle.notify_all()

    def _ingest(self, job: _Job) -> None:
        """Host copy and checksum of a snapshot; with the memory tier the blocks commit now (the
        store's host memory is the paper's DRAM bucket), the Orbax write follows per window."""
        if hasattr(job.blocks, "block_until_ready"):
            job.blocks.block_until_ready()           # waits with the GIL released (np.array would hold it)
        with self._lock:
            lost = job.life != self._life.get(job.aw, 0)
        if lost:                                     # its AW died before the copy landed
            job.blocks, job.host = None, []
            return
        n = len(job.refs)
        host = np.asarray(job.blocks)[:n]            # the host copy (CPU: the buffer itself)
        if host.flags.writeable:                     # a caller's own numpy array: the store keeps a copy
            host = host.copy()
        host.flags.writeable = False                 # its rows (views, no copy each) are the blocks
        sums = block_sums_host(host) if job.sums is None else np.asarray(job.sums)[:n]
        job.blocks = job.sums = None
        job.host = list(zip(job.refs, host, sums.tolist(), job.epochs))
        if not self.memory_tier:
            return
        with self._lock:
            for r, blk, sum_, epoch in job.host:
                if self._epoch.get(r.request_id, 0) != epoch:
                    continue                         # dropped while in flight
                blocks = self._manifest.setdefault(r.request_id, {})
                old = blocks.get(r.block)
                if old is not None and old.path is not None and self._unref(old.path):
                    self._pending += 1
                    self._queue.put(old.path)
                blocks[r.block] = _Entry(None, r.key, sum_, blk.shape, blk.dtype, job.seq, job.aw)
                self._memory[(r.request_id, r.block)] = blk

    def _wanted(self, r: BlockRef, blk, sum_, epoch: int, job: _Job) -> bool:
        """Caller holds the lock: the block's request was not dropped since the snapshot, and (with
        the memory tier) no newer snapshot of the block replaced it."""
        if self._epoch.get(r.request_id, 0) != epoch:
            return False
        if not self.memory_tier:
            return True
        entry = self._manifest.get(r.request_id, {}).get(r.block)
        return entry is not None and entry.seq == job.seq

    def _persist(self, jobs: list[_Job]) -> None:
        """One Orbax checkpoint for the window's snapshots of one AW (a later copy of a block wins),
        holding only blocks still wanted: a request that finished within the window is never
        written (it had been, then deleted). Without the memory tier this is when blocks commit."""
        t0 = self._clock()
        latest = {r.key: (r, blk, sum_, epoch, job) for job in jobs for r, blk, sum_, epoch in job.host}
        with self._lock:                             # a finished request's blocks are not worth a write
            latest = {k: v for k, v in latest.items() if self._wanted(*v)}
        if not latest:
            return
        path = self.directory / f"aw{jobs[0].aw}" / f"{jobs[0].seq:08d}"
        self._write(path, {"blocks": np.stack([v[1] for v in latest.values()])})
        self._n_saved += len(latest)
        dead = []
        with self._lock:
            for row, (k, (r, blk, sum_, epoch, job)) in enumerate(latest.items()):
                if self._epoch.get(r.request_id, 0) != epoch:
                    continue                         # dropped while in flight
                blocks = self._manifest.setdefault(r.request_id, {})
                old = blocks.get(r.block)
                if self.memory_tier and (old is None or old.seq != job.seq):
                    continue                         # replaced by a newer snapshot since
                if old is not None and old.path is not None and self._unref(old.path):
                    dead.append(old.path)
                blocks[r.block] = _Entry(str(path), k, sum_, blk.shape, blk.dtype, job.seq, job.aw, row)
                self._live[str(path)] = self._live.get(str(path), 0) + 1
            if str(path) not in self._live:
                dead.append(str(path))               # every block dropped or replaced before it landed
            self._save.add(self._clock() - t0)
        for p in dead:
            epath.Path(p).rmtree(missing_ok=True)
