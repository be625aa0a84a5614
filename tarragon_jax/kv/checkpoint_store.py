"""Checkpoint store: asynchronous, incremental snapshots of attention-worker KV blocks (paper 2.4, 2.6).

An AW hands `snapshot()` a device array of whole KV blocks; the call only starts the device->host
copy and sends the work to the store's writer (kv/snapshot_writer.py), so the decode loop never
waits on storage. With the memory tier (the paper's DRAM bucket of the store) blocks commit once
their host copy lands; every `flush_interval_s` the window's blocks of each AW are written as one
Orbax checkpoint (kv/snapshot_files.py), the durable copy. Without the memory tier blocks commit
only once written. The manifest (kv/snapshot_manifest.py) knows what is committed and where.
A request's committed token index is its contiguous committed block prefix from block 0 times
page_size; a failed AW's requests are restored from that prefix on another AW (memory tier first,
else an Orbax restore of the windows that hold its blocks) and only the tokens after it are
recomputed.

Checksums are ours, not Orbax's: Orbax 0.12.8 / tensorstore return silently changed values after
bytes of a data file are overwritten.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Callable

import numpy as np
from etils import epath

from tarragon_jax.kv.checksum import block_sums_host
from tarragon_jax.kv.snapshot_files import SnapshotFiles
from tarragon_jax.kv.snapshot_manifest import BlockRef, Entry, SnapshotManifest
from tarragon_jax.kv.snapshot_writer import Link, Remove, Snapshot, SnapshotWriter, Timer


class SnapshotMissing(LookupError):
    """Nothing committed for a request/block, or its checkpoint files are gone."""


class StoreUnavailable(SnapshotMissing):
    """The store's process is dead or silent: nothing it held can be restored."""


class SnapshotCorrupt(ValueError):
    """A block's checksum does not match, or its checkpoint cannot be read."""


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


def _tier(memory_copy, e: Entry) -> str:
    return "memory-tier" if memory_copy is not None else f"disk ({e.path})"


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
        self.memory_tier = memory_tier
        self._files = SnapshotFiles(directory, use_compression=use_compression)
        self.directory = self._files.directory
        self._clock = clock
        self._lock = threading.Lock()               # the manifest, the writer's memory tier and counters
        self._manifest = SnapshotManifest()
        self._seq = self._files.first_seq()
        self._n_snapshots = self._n_blocks = self._n_bytes = 0
        self._blocked = Timer()
        self._closed = False
        self._writer = SnapshotWriter(self._manifest, self._lock, self._files,
                                      save=lambda path, tree: self._write(path, tree),   # late-bound: see _write
                                      memory_tier=memory_tier, flush_interval_s=flush_interval_s, clock=clock)
        self._memory = self._writer.memory          # manifest.memory_key -> [L, parts, page_size, kv, hd]
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
            self._writer.send(Snapshot(seq, aw, list(refs), blocks, sums, self._manifest.epochs(refs),
                                       self._manifest.life(aw)))
            self._n_snapshots += 1
            self._n_blocks += len(refs)
            self._n_bytes += len(refs) * int(np.prod(shape[1:])) * np.dtype(blocks.dtype).itemsize
            self._blocked.add(self._clock() - t0)

    def link(self, aw: int, refs: list[BlockRef]) -> None:
        """Blocks a request shares with others (refs with their prefix hash: it took them from
        AW `aw`'s prefix cache) hold the store's committed copy of that hash; nothing is
        copied or written. Queued in order after the snapshots sent before it."""
        if any(r.hash is None for r in refs):
            raise ValueError(f"link() needs refs with a prefix hash, got {refs}")
        if not refs:
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("link() on a closed CheckpointStore")
            self._writer.send(Link(list(refs), self._manifest.epochs(refs)))

    def committed_blocks(self, request_id: int) -> int:
        """Length of the contiguous committed block prefix starting at block 0."""
        with self._lock:
            return len(self._manifest.prefix(request_id))

    def committed_tokens(self, request_id: int, page_size: int) -> int:
        return self.committed_blocks(request_id) * page_size

    def requests(self) -> list[int]:
        """Requests with at least one committed block."""
        with self._lock:
            return self._manifest.requests()

    def restore(self, request_id: int, num_blocks: int | None = None) -> np.ndarray:
        """The committed prefix (or its first num_blocks) as [n, L, parts, page_size, kv, hd], verified."""
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"request {request_id}: num_blocks must be >= 1, got {num_blocks}")
        with self._lock:
            chosen = self._manifest.prefix(request_id)
            n_pre = len(chosen)
            n = n_pre if num_blocks is None else num_blocks
            if request_id not in self._manifest:
                raise SnapshotMissing(f"request {request_id}: no committed KV blocks")
            if n_pre == 0 or n > n_pre:
                raise SnapshotMissing(f"request {request_id}: block {n_pre} is not committed "
                                      f"(committed prefix {n_pre} blocks, asked for {num_blocks or 'all'})")
            chosen = chosen[:n]
            mem = [self._memory.get(self._manifest.memory_key(request_id, b)) for b in range(n)]
        return self._load(f"request {request_id}", chosen, mem)

    def restore_prefix(self, hashes: list[int]) -> np.ndarray:
        """The committed copies of the leading run of these prefix hashes (whichever requests
        hold them) as [n, L, parts, page_size, kv, hd], verified: a prefix another AW computed,
        for a request that starts with it."""
        with self._lock:
            chosen = self._manifest.content_run(hashes)
            mem = [self._memory.get(("h", h)) for h in hashes[:len(chosen)]]
        if not chosen:
            raise SnapshotMissing(f"no committed block of prefix {hashes[:1]}...")
        return self._load(f"prefix {hashes[0]}", chosen, mem)

    def _load(self, what: str, chosen: list[Entry], mem: list) -> np.ndarray:
        """These entries' blocks, from the memory tier where `mem` has them, else their files;
        checked against their shapes and checksums."""
        out: list[np.ndarray | None] = list(mem)
        by_path: dict[str, list[int]] = {}
        for b, m in enumerate(mem):
            if m is None and chosen[b].path is None:
                raise SnapshotMissing(f"{what}: block {b} was never persisted and its memory-tier copy is gone")
            if m is None:
                by_path.setdefault(chosen[b].path, []).append(b)
        for path, bs in by_path.items():
            got = self._read(what, path, [chosen[b] for b in bs])
            for b in bs:
                out[b] = got[chosen[b].key]
        for b, (e, a) in enumerate(zip(chosen, out)):
            if a.shape != e.shape or a.dtype != e.dtype:
                raise SnapshotCorrupt(f"{what} block {b}: {_tier(mem[b], e)} copy has "
                                      f"{a.dtype}{a.shape}, snapshot was {e.dtype}{e.shape}")
        blocks = np.stack(out)
        for b, got in enumerate(block_sums_host(blocks)):
            if got != chosen[b].sum:
                raise SnapshotCorrupt(f"{what} block {b}: checksum mismatch in the {_tier(mem[b], chosen[b])} copy")
        return blocks

    def drop(self, request_id: int) -> None:
        """Forget a finished request; in-flight snapshots of it will not commit; files go lazily."""
        with self._lock:
            for b in self._manifest.drop(request_id):
                self._memory.pop((request_id, b), None)
            for key in self._manifest.released():
                self._memory.pop(key, None)
            dead = self._manifest.unreferenced()
            if self._closed:
                return                               # writer stopped: files stay until rmtree
            for path in dead:
                self._writer.send(Remove(path))

    def abandon(self, aw: int) -> None:
        """AW `aw` died: its snapshots whose host copy has not landed yet never will (they were
        reads of its device memory), so they do not commit. What was ingested stays committed."""
        with self._lock:
            self._manifest.abandon(aw)

    def drop_memory_tier(self) -> None:
        """Forget the host copies (tests, or under host memory pressure): restores read disk."""
        with self._lock:
            self._memory.clear()

    def wait(self, timeout: float | None = None) -> None:
        """Block until every queued snapshot (and file deletion) is done; TimeoutError otherwise."""
        self._writer.wait(timeout)

    def close(self) -> None:
        """Finish queued work, stop the writer; delete the directory only if the store made it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._writer.wait()
        self._writer.stop()
        self._files.close()

    def _close_at_exit(self) -> None:
        """Interpreter exit: the queued writes serve nobody now (the engine is gone), so the
        writer drops them and stops."""
        self._writer.discard()
        self.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def errors(self) -> list[str]:
        """Messages of failed background saves (their blocks stayed uncommitted)."""
        with self._lock:
            return list(self._writer.errors)

    @property
    def stats(self) -> dict:
        with self._lock:
            w = self._writer
            return {
                "snapshots": self._n_snapshots, "blocks": self._n_blocks, "bytes": self._n_bytes,
                "blocked_mean_s": self._blocked.mean, "blocked_max_s": self._blocked.max,
                "save_mean_s": w.save_time.mean, "save_max_s": w.save_time.max, "save_n": w.save_time.n,
                "saved_blocks": w.saved_blocks,
                "failed": len(w.errors), "pending": w.pending,
                "committed_blocks": self._manifest.num_blocks(),
                "memory_bytes": sum(a.nbytes for a in self._memory.values()),
            }

    # ---- internals ---------------------------------------------------------------------------
    def _write(self, path: epath.Path, tree: dict[str, np.ndarray]) -> None:
        """The writer's Orbax save of one checkpoint; the writer calls it through the store so
        that tests can wrap it (slow or failing storage)."""
        self._files.save(path, tree)

    def _read(self, what: str, path: str, entries: list[Entry]) -> dict[str, np.ndarray]:
        """These blocks from one checkpoint: its one array restored, their rows taken."""
        keys = [e.key for e in entries]
        if not self._files.exists(path):
            raise SnapshotMissing(f"{what}: checkpoint {path} holding {keys} is gone")
        try:
            got = self._files.load(path)
        except FileNotFoundError as e:
            raise SnapshotMissing(f"{what}: checkpoint {path} is gone: {e}") from e
        except Exception as e:
            raise SnapshotCorrupt(f"{what}: checkpoint {path} unreadable for {keys}: {e}") from e
        if not isinstance(got, np.ndarray) or max(e.row for e in entries) >= len(got):
            raise SnapshotCorrupt(f"{what}: checkpoint {path} does not hold the rows of {keys}")
        return {e.key: got[e.row] for e in entries}
