"""The checkpoint store's background writer: everything a snapshot costs after snapshot() returns.

The store sends typed messages, done in order on one low-priority thread, so the decode loop never
waits on storage nor competes with it for CPU. A Snapshot's host copy lands and is checksummed
(kv/checksum.py; or its checksums came with it); with the memory tier (the paper's DRAM bucket of
the store) its blocks commit right then and the writer keeps their host copies. Every flush
window each AW's landed blocks go into one Orbax checkpoint, the durable copy; without the memory
tier that is when they commit. Both commits are one function. A Remove deletes a checkpoint no
committed block lives in; Flush writes the window now; Stop writes it and ends the thread.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import threading
from typing import Any, Callable, NamedTuple

import numpy as np
from etils import epath

from tarragon_jax.kv.checksum import block_sums_host
from tarragon_jax.kv.snapshot_files import SnapshotFiles
from tarragon_jax.kv.snapshot_manifest import BlockRef, Entry, SnapshotManifest

log = logging.getLogger(__name__)


# ---- messages --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Blocks of one AW to land, commit and write; tagged as SnapshotManifest.epochs/life said when sent."""
    seq: int
    aw: int
    refs: list[BlockRef]
    blocks: Any           # [n >= len(refs), L, parts, page_size, kv, hd]: jax.Array (copy in flight) or np.ndarray
    sums: Any             # [n] uint32 block checksums (device or host); None: computed on landing
    epochs: list[int]     # per ref: its request's drop epoch
    life: int             # the AW's life


@dataclasses.dataclass(frozen=True)
class Link:
    """Content-addressed blocks a request shares (refs with a hash) take the committed copy of
    their hash: no data moves. One that is not committed yet is tried again after the window's
    write (without the memory tier, the copy commits only then)."""
    refs: list[BlockRef]
    epochs: list[int]


@dataclasses.dataclass(frozen=True)
class Remove:
    """Delete a checkpoint no committed block lives in."""
    path: str


@dataclasses.dataclass(frozen=True)
class Flush:
    """Write the current window now (someone waits for it)."""


@dataclasses.dataclass(frozen=True)
class Stop:
    """Write the current window and end the thread."""


Message = Snapshot | Link | Remove | Flush | Stop


class _Row(NamedTuple):
    """One landed block, as a commit needs it."""
    ref: BlockRef
    block: np.ndarray     # [L, parts, page_size, kv, hd], read-only host copy
    sum: int
    epoch: int
    seq: int


class _Landed(NamedTuple):
    """A snapshot waiting in the window for its Orbax write (rows: none if its AW died first)."""
    seq: int
    aw: int
    refs: list[BlockRef]
    rows: list[_Row]


def _describe(snaps: list[Snapshot] | list[_Landed]) -> str:
    return "; ".join(f"snapshot {s.seq} of aw {s.aw} ({s.refs})" for s in snaps)


class Timer:
    """Count, mean and max of a duration."""

    def __init__(self) -> None:
        self.n, self.total, self.max = 0, 0.0, 0.0

    def add(self, s: float) -> None:
        self.n, self.total, self.max = self.n + 1, self.total + s, max(self.max, s)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0


def _lower_priority() -> None:
    """Linux: nice is per thread (and inherited by Orbax's helper threads)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class SnapshotWriter:
    """The background thread, the memory tier's host copies and the Orbax writes.

    `lock` is the store's: it guards the manifest, `memory`, `pending`, `errors` and the counters.
    `pending` counts Snapshots and Removes sent and not yet done (a Snapshot is done once its
    window was written); wait() blocks until it is 0.
    """

    def __init__(self, manifest: SnapshotManifest, lock: threading.Lock, files: SnapshotFiles, *,
                 save: Callable[[epath.Path, dict[str, np.ndarray]], None], memory_tier: bool,
                 flush_interval_s: float | None, clock: Callable[[], float]):
        """save: writes one checkpoint, (path, {"blocks": [n, L, parts, page_size, kv, hd]});
        flush_interval_s: how long a window stays open after its first snapshot (None: 0)."""
        self._manifest, self._lock, self._files, self._save = manifest, lock, files, save
        self._memory_tier, self._flush_interval_s, self._clock = memory_tier, flush_interval_s, clock
        self.memory: dict[tuple[int, int], np.ndarray] = {}   # (request, block) -> [L, parts, page_size, kv, hd]
        self.pending = 0
        self.errors: list[str] = []
        self.saved_blocks = 0
        self.save_time = Timer()
        self._idle = threading.Condition(lock)
        self._discard = False
        self._queue: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._window: dict[int, list[_Landed]] = {}          # aw -> landed snapshots not yet written
        self._links: list[tuple[BlockRef, int]] = []          # links whose hash was not committed yet
        self._due: float | None = None                       # when the window is written
        self._thread = threading.Thread(target=self._run, name="kv-checkpoint", daemon=True)
        self._thread.start()

    # ---- the store's side --------------------------------------------------------------------
    def send(self, msg: Snapshot | Link | Remove) -> None:
        """Queue work; the caller holds the lock (so wait() sees it pending at once)."""
        self.pending += 1
        self._queue.put(msg)

    def wait(self, timeout: float | None = None) -> None:
        """Block until no work is pending (the window is written now); TimeoutError otherwise."""
        self._queue.put(Flush())                     # don't let the writer sit out its window
        with self._idle:
            if not self._idle.wait_for(lambda: self.pending == 0, timeout):
                raise TimeoutError(f"{self.pending} checkpoint jobs still in flight after {timeout} s")

    def stop(self) -> None:
        """End the thread once it did what was queued before."""
        self._queue.put(Stop())
        self._thread.join()

    def discard(self) -> None:
        """Interpreter exit: queued work serves nobody now (the engine is gone); skip it."""
        self._discard = True

    # ---- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        _lower_priority()
        while self._handle(self._next()):
            pass

    def _next(self) -> Message:
        """The next message; a Flush once the window is due."""
        if self._due is None:
            return self._queue.get()
        try:
            return self._queue.get(timeout=max(0.0, self._due - self._clock()))
        except queue.Empty:
            return Flush()

    def _handle(self, msg: Message) -> bool:
        """Do one message's work; False after Stop."""
        match msg:
            case Snapshot():
                rows = self._guarded(functools.partial(self._land, msg), functools.partial(_describe, [msg]), done=0)
                self._window.setdefault(msg.aw, []).append(_Landed(msg.seq, msg.aw, msg.refs, rows or []))
                if self._due is None:
                    self._due = self._clock() + (self._flush_interval_s or 0.0)
            case Link(refs=refs, epochs=epochs):
                self._guarded(functools.partial(self._link, list(zip(refs, epochs))), lambda: f"link {refs}", done=1)
            case Remove(path=path):
                self._guarded(functools.partial(self._files.remove, path), lambda: path, done=1)
            case Flush() | Stop():
                self._write_window()
                return isinstance(msg, Flush)
        if self._due is not None and self._clock() >= self._due:
            self._write_window()
        return True

    def _guarded(self, work: Callable[[], Any], what: Callable[[], str], *, done: int) -> Any:
        """Run one unit of work and return its result; a failure is recorded (its blocks stay
        uncommitted) and the writer goes on. `done` pending jobs end with it, counted down once."""
        try:
            return None if self._discard else work()
        except Exception as e:
            log.exception("checkpoint job failed: %s", what())
            with self._lock:
                self.errors.append(f"{what()}: {type(e).__name__}: {e}")
            return None
        finally:
            with self._idle:
                self.pending -= done
                if self.pending == 0:
                    self._manifest.settled()
                self._idle.notify_all()

    def _land(self, msg: Snapshot) -> list[_Row]:
        """The host copy [len(refs), L, parts, page_size, kv, hd] and checksums of a snapshot;
        with the memory tier its blocks commit now. Nothing if its AW died before the copy
        landed (it was a read of that AW's device memory)."""
        if hasattr(msg.blocks, "block_until_ready"):
            msg.blocks.block_until_ready()           # waits with the GIL released (np.array would hold it)
        with self._lock:
            if self._manifest.lost(msg.aw, msg.life):
                return []
        n = len(msg.refs)
        host = np.asarray(msg.blocks)[:n]            # the host copy (CPU: the buffer itself); rows past n: padding
        if host.flags.writeable:                     # a caller's own numpy array: the store keeps a copy
            host = host.copy()
        host.flags.writeable = False                 # its rows (views, no copy each) are the blocks
        sums = block_sums_host(host) if msg.sums is None else np.asarray(msg.sums)[:n]
        rows = [_Row(r, b, s, e, msg.seq) for r, b, s, e in zip(msg.refs, host, sums.tolist(), msg.epochs)]
        if self._memory_tier:
            self._commit(msg.aw, rows, None)
        return rows

    def _link(self, links: list[tuple[BlockRef, int]]) -> None:
        """Commit links whose hash is committed; keep the others for the window's write."""
        with self._lock:
            self._links += [(ref, epoch) for ref, epoch in links if not self._manifest.commit(ref, None, epoch)]
            self._drop_released()

    def _write_window(self) -> None:
        for aw, landed in sorted(self._window.items()):
            self._guarded(functools.partial(self._persist, aw, landed), functools.partial(_describe, landed),
                          done=len(landed))
        self._window, self._due = {}, None
        links, self._links = self._links, []
        with self._lock:                  # a copy that never committed (its request left): the link is lost
            for ref, epoch in links:
                self._manifest.commit(ref, None, epoch)
            self._drop_released()

    def _drop_released(self) -> None:
        """Host copies of content-addressed blocks no request holds any more (under the lock)."""
        for key in self._manifest.released():
            self.memory.pop(key, None)

    def _persist(self, aw: int, landed: list[_Landed]) -> None:
        """One Orbax checkpoint for one AW's snapshots of the window (a later copy of a block
        wins), holding only blocks commit would still take: a request that finished within the
        window is never written."""
        t0 = self._clock()
        latest = {row.ref: row for snap in landed for row in snap.rows}
        rows, links, seen = [], [], set()
        with self._lock:                  # a content-addressed block is written once: later copies link
            for r in latest.values():
                if not self._manifest.wanted(r.ref, r.seq, r.epoch, own_only=self._memory_tier):
                    continue
                h = r.ref.hash
                (links if h is not None and (h in seen or self._manifest.known(h) and not self._memory_tier)
                 else rows).append(r)
                seen.add(h)
        if rows:
            path = self._files.path(aw, landed[0].seq)
            self._save(path, {"blocks": np.stack([r.block for r in rows])})
            self._commit(aw, rows, str(path))
        with self._lock:
            for r in links:
                self._manifest.commit(r.ref, None, r.epoch)
            self._drop_released()
            if rows:
                self.saved_blocks += len(rows)
                self.save_time.add(self._clock() - t0)

    def _commit(self, aw: int, rows: list[_Row], path: str | None) -> None:
        """The one commit. path None: the memory tier takes the rows' host copies; else the rows
        were written to checkpoint `path`, in this order (with the memory tier: the durable copies
        of its entries, unless replaced since). Files no committed block lives in any more go."""
        with self._lock:
            for i, r in enumerate(rows):
                entry = Entry(path, r.ref.key, r.sum, r.block.shape, r.block.dtype, r.seq, aw, i)
                fresh = path is not None or not self._manifest.known(r.ref.hash)    # else: a link, no copy kept
                if (self._manifest.commit(r.ref, entry, r.epoch, own_only=self._memory_tier and path is not None)
                        and path is None and fresh):
                    self.memory[self._manifest.memory_key(r.ref.request_id, r.ref.block)] = r.block
            self._drop_released()
            dead = self._manifest.unreferenced()
            if path is not None and not self._manifest.referenced(path):
                dead.append(path)                    # every block dropped or replaced before it landed
            for p in dead:
                self.send(Remove(p))
