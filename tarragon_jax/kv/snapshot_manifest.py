"""Snapshot manifest: which KV blocks of which request are committed, and where (paper 2.4, 2.6).

Plain bookkeeping, apart from the checkpoint store's thread and files so that it can be checked on
its own; the store calls it under its lock. A request's committed prefix is its contiguous run of
committed blocks from block 0 (a failed AW's request resumes after it). A checkpoint file stays
while some committed block lives in it and is reported once none does, for the caller to delete.
A snapshot in flight carries two tags taken when it was sent: its requests' drop epochs (a request
dropped since then never commits it) and its AW's life (an AW abandoned since then never lands it).

A block with a prefix hash (kv/prefix_hash.py) is content-addressed: every request whose block
has that hash holds the one committed copy, which stays while any of them does. A second copy
of a committed hash is never written (`known`), and a request that shared a cached block on its
AW takes the store's copy by hash alone (a link: no data moves).
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class BlockRef:
    request_id: int
    block: int            # block b holds token positions [b * page_size, (b + 1) * page_size)
    hash: int | None = None   # its prefix hash (prefix caching on): the block is content-addressed

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
        self._blocks: dict[int, dict[int, Entry | int]] = {}   # request -> block -> entry, or its hash
        self._content: dict[int, Entry] = {}             # hash -> the committed copy
        self._holders: dict[int, set[tuple[int, int]]] = {}   # hash -> (request, block)s holding it
        self._refs: dict[str, int] = {}                  # checkpoint path -> committed entries in it
        self._dead: list[str] = []                       # paths whose last entry went, not yet reported
        self._epoch: dict[int, int] = {}                 # request -> times dropped (while snapshots fly)
        self._life: dict[int, int] = {}                  # AW -> times abandoned (its failures)
        self._gone: list[tuple] = []                     # memory keys of content whose last holder went

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
            out.append(self._entry(blocks[len(out)]))
        return out

    def memory_key(self, request_id: int, block: int) -> tuple:
        """Where the memory tier keeps the block's host copy: by hash when content-addressed."""
        held = self._blocks.get(request_id, {}).get(block)
        return ("h", held) if isinstance(held, int) else (request_id, block)

    def content_run(self, hashes: list[int]) -> list[Entry]:
        """The committed copies of the leading run of `hashes` (content-addressed blocks)."""
        out = []
        for h in hashes:
            if h not in self._content:
                break
            out.append(self._content[h])
        return out

    def known(self, block_hash: int | None) -> bool:
        """Is a copy of this hash committed (a new one need not be written)?"""
        return block_hash is not None and block_hash in self._content

    def num_blocks(self) -> int:
        """Distinct committed blocks (a content-addressed one counts once)."""
        return sum(not isinstance(e, int) for b in self._blocks.values() for e in b.values()) + len(self._content)

    def _entry(self, held: Entry | int) -> Entry:
        return self._content[held] if isinstance(held, int) else held

    def wanted(self, ref: BlockRef, seq: int, epoch: int, *, own_only: bool = False) -> bool:
        """Would commit() take snapshot `seq`'s copy of `ref` (sent at drop epoch `epoch`)? Not if
        its request was dropped since; with own_only (the durable copy of a block the memory tier
        committed) not unless the block's entry is still that snapshot's: a newer one replaced it."""
        if own_only and ref.hash is not None:       # held by whichever requests hold it now
            entry = self._content.get(ref.hash)
            return entry is not None and entry.seq == seq
        if self._epoch.get(ref.request_id, 0) != epoch:
            return False
        if not own_only:
            return True
        entry = self._blocks.get(ref.request_id, {}).get(ref.block)
        return entry is not None and entry.seq == seq

    def commit(self, ref: BlockRef, entry: Entry | None, epoch: int, *, own_only: bool = False) -> bool:
        """Make `entry` the block's committed copy if wanted() (else False). A content-addressed
        block whose hash is committed already takes that copy (entry may be None: a link; False
        if the hash is not committed), unless this is that copy's own durable write (own_only).
        A file whose last entry this replaced is reported by unreferenced()."""
        if not self.wanted(ref, -1 if entry is None else entry.seq, epoch, own_only=own_only):
            return False
        if ref.hash is not None and not own_only and (entry is None or ref.hash in self._content):
            if ref.hash not in self._content:
                return False
            self._hold(ref, ref.hash)
            return True
        if entry.path is not None:
            self._refs[entry.path] = self._refs.get(entry.path, 0) + 1
        if ref.hash is not None:
            old = self._content.get(ref.hash)
            self._content[ref.hash] = entry
            if not own_only:
                self._hold(ref, ref.hash)
        else:
            old = self._release(ref.request_id, ref.block)
            self._blocks.setdefault(ref.request_id, {})[ref.block] = entry
        if old is not None:
            self._unref(old.path)
        return True

    def _hold(self, ref: BlockRef, block_hash: int) -> None:
        if self._blocks.get(ref.request_id, {}).get(ref.block) == block_hash:
            return
        old = self._release(ref.request_id, ref.block)
        if old is not None:
            self._unref(old.path)
        self._blocks.setdefault(ref.request_id, {})[ref.block] = block_hash
        self._holders.setdefault(block_hash, set()).add((ref.request_id, ref.block))

    def _release(self, request_id: int, block: int) -> Entry | None:
        """Take the block from the request: its private entry, or the content entry of its hash
        if it was the last holder (either is the caller's to unref); None otherwise."""
        held = self._blocks.get(request_id, {}).pop(block, None)
        if not isinstance(held, int):
            return held
        holders = self._holders[held]
        holders.discard((request_id, block))
        if holders:
            return None
        del self._holders[held]
        self._gone.append(("h", held))
        return self._content.pop(held)

    def released(self) -> list[tuple]:
        """Memory-tier keys of content-addressed blocks whose last holder went since the last call."""
        gone, self._gone = self._gone, []
        return gone

    def drop(self, request_id: int) -> list[int]:
        """Forget a request; returns its blocks that were committed. Its snapshots in flight will
        not commit; files left without an entry are reported by unreferenced()."""
        self._epoch[request_id] = self._epoch.get(request_id, 0) + 1
        blocks = list(self._blocks.get(request_id, {}))
        private = [b for b in blocks if not isinstance(self._blocks[request_id][b], int)]
        for b in blocks:
            old = self._release(request_id, b)
            if old is not None:
                self._unref(old.path)
        self._blocks.pop(request_id, None)
        return private

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
