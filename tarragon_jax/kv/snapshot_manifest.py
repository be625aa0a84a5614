"""Snapshot manifest: which KV blocks of which request are committed, and where (paper 2.4, 2.6).

Plain bookkeeping, apart from the checkpoint store's thread and files so that it can be checked on
its own; the store calls it under its lock. A request's committed prefix is its contiguous run of
committed blocks from block 0 (a failed AW's request resumes after it). A checkpoint file stays
while some committed block lives in it and is reported once none does, for the caller to delete.
A snapshot in flight carries two tags taken when it was sent: its requests' drop epochs (a request
dropped since then never commits it) and its AW's life (an AW abandoned since then never lands it).
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class BlockRef:
    request_id: int
    block: int            # block b holds token positions [b * page_size, (b + 1) * page_size)

    @property
    def key(self) -> str:
        return f"r{self.request_id}_b{self.block}"


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where a committed block lives and what it must hash to."""
    path: str | None      # checkpoint directory holding it; None until persisted (memory tier only)
    key: str
    sum: int              # kv/checksum.py's block_sums of the block
    shape: tuple          # [L, parts, page_size, kv, hd]
    dtype: Any            # np.dtype
    seq: int              # the snapshot it came from (later snapshots have larger ones)
    aw: int
    row: int = 0          # its row in the checkpoint's "blocks" array (when persisted)


class SnapshotManifest:
    """Committed blocks, the files they live in, and the tags of snapshots in flight."""

    def __init__(self) -> None:
        self._blocks: dict[int, dict[int, Entry]] = {}   # request -> block -> entry
        self._refs: dict[str, int] = {}                  # checkpoint path -> committed entries in it
        self._dead: list[str] = []                       # paths whose last entry went, not yet reported
        self._epoch: dict[int, int] = {}                 # request -> times dropped (while snapshots fly)
        self._life: dict[int, int] = {}                  # AW -> times abandoned (its failures)

    # ---- tags of snapshots in flight ---------------------------------------------------------
    def epochs(self, refs: list[BlockRef]) -> list[int]:
        """Each ref's request's drop epoch now: the tag a snapshot of these refs carries."""
        return [self._epoch.get(r.request_id, 0) for r in refs]

    def life(self, aw: int) -> int:
        """AW `aw`'s life now: the tag its snapshots carry."""
        return self._life.get(aw, 0)

    def abandon(self, aw: int) -> None:
        """AW `aw` died: snapshots tagged with its earlier life are lost()."""
        self._life[aw] = self._life.get(aw, 0) + 1

    def lost(self, aw: int, life: int) -> bool:
        """Was the AW abandoned since a snapshot tagged `life` was sent?"""
        return life != self._life.get(aw, 0)

    def settled(self) -> None:
        """No snapshot is in flight: no epoch tag is held any more, so forget them."""
        self._epoch.clear()

    # ---- committed blocks --------------------------------------------------------------------
    def __contains__(self, request_id: int) -> bool:
        """Does the request have any committed block (in its prefix or not)?"""
        return request_id in self._blocks

    def requests(self) -> list[int]:
        """Requests with at least one committed block."""
        return sorted(self._blocks)

    def prefix(self, request_id: int) -> list[Entry]:
        """The entries of the request's committed prefix: blocks 0, 1, ... up to the first gap."""
        blocks = self._blocks.get(request_id, {})
        out = []
        while len(out) in blocks:
            out.append(blocks[len(out)])
        return out

    def num_blocks(self) -> int:
        """Committed blocks of all requests."""
        return sum(len(b) for b in self._blocks.values())

    def wanted(self, ref: BlockRef, seq: int, epoch: int, *, own_only: bool = False) -> bool:
        """Would commit() take snapshot `seq`'s copy of `ref` (sent at drop epoch `epoch`)? Not if
        its request was dropped since; with own_only (the durable copy of a block the memory tier
        committed) not unless the block's entry is still that snapshot's: a newer one replaced it."""
        if self._epoch.get(ref.request_id, 0) != epoch:
            return False
        if not own_only:
            return True
        entry = self._blocks.get(ref.request_id, {}).get(ref.block)
        return entry is not None and entry.seq == seq

    def commit(self, ref: BlockRef, entry: Entry, epoch: int, *, own_only: bool = False) -> bool:
        """Make `entry` the block's committed copy if wanted() (else False). A file whose last
        entry this replaced is reported by unreferenced()."""
        if not self.wanted(ref, entry.seq, epoch, own_only=own_only):
            return False
        if entry.path is not None:
            self._refs[entry.path] = self._refs.get(entry.path, 0) + 1
        blocks = self._blocks.setdefault(ref.request_id, {})
        old = blocks.get(ref.block)
        blocks[ref.block] = entry
        if old is not None:
            self._unref(old.path)
        return True

    def drop(self, request_id: int) -> list[int]:
        """Forget a request; returns its blocks that were committed. Its snapshots in flight will
        not commit; files left without an entry are reported by unreferenced()."""
        self._epoch[request_id] = self._epoch.get(request_id, 0) + 1
        blocks = self._blocks.pop(request_id, {})
        for entry in blocks.values():
            self._unref(entry.path)
        return list(blocks)

    def referenced(self, path: str) -> bool:
        """Does some committed block live in checkpoint `path`?"""
        return path in self._refs

    def unreferenced(self) -> list[str]:
        """Checkpoint paths that lost their last committed block since the last call (the caller
        deletes them)."""
        dead, self._dead = self._dead, []
        return dead

    def _unref(self, path: str | None) -> None:
        if path is None:
            return
        self._refs[path] -= 1
        if self._refs[path] == 0:
            del self._refs[path]
            self._dead.append(path)
