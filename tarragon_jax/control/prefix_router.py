"""Prefix-aware placement: which attention worker a new request goes to.

Each AW caches the KV blocks of prefixes it computed (kv/block_manager.py); a request sent to
the AW holding the longest run of its leading blocks computes only the rest. Like Dynamo's
KV-aware router, the driver keeps its own approximate index of what each AW caches (the block
hashes of requests it sent there, least recently used dropped past the AW's page count) rather
than asking the workers, and weighs the saving against load: an AW's cost for a request is the
tokens it would prefill plus its load, the tokens of KV pages its requests hold (a shared page
once) and of its requests still queued. So requests sharing a prefix stay together until the
queue outweighs the prefix, and then the next AW computes the prefix once. Host-only, no jax.
"""
from __future__ import annotations

import collections
from typing import Iterable, Protocol, Sequence as Seq

from tarragon_jax.workers.sequence import Sequence, SeqState


class _Blocks(Protocol):
    page_size: int
    capacity: int
    num_free: int


class _AW(Protocol):
    index: int
    blocks: _Blocks

    def live_requests(self) -> list[Sequence]: ...


def load_tokens(aw: _AW, live: list[Sequence]) -> int:
    """Tokens of the AW's KV pages in use plus those of its `live` requests not admitted yet."""
    queued = sum(s.num_tokens for s in live if s.state is SeqState.WAITING)
    return (aw.blocks.capacity - aw.blocks.num_free) * aw.blocks.page_size + queued


class PrefixRouter:
    def __init__(self, page_size: int, capacity_blocks: int, salt: bytes, enabled: bool = True):
        self.page_size, self.capacity, self.salt, self.enabled = page_size, capacity_blocks, salt, enabled
        self._held: dict[int, collections.OrderedDict[int, None]] = {}    # AW -> block hashes, LRU first

    def hashes(self, seq: Sequence) -> list[int]:
        """The request's chained block hashes (kept on it: its AW reuses them)."""
        return seq.block_hashes(self.page_size, self.salt)

    def matched(self, aw: int, hashes: Seq[int]) -> int:
        """Leading blocks of `hashes` the index believes AW `aw` caches."""
        held, n = self._held.get(aw, {}), 0
        while n < len(hashes) and hashes[n] in held:
            n += 1
        return n

    def pick(self, seq: Sequence, aws: Iterable[_AW]) -> _AW:
        """The AW with the lowest cost for the request: tokens to prefill there + its load (ties:
        fewest requests, then lowest index). Without caching: the AW with the fewest requests."""
        aws = list(aws)
        if not self.enabled:
            return min(aws, key=lambda a: (len(a.live_requests()), a.index))
        hashes = self.hashes(seq)[:(seq.num_tokens - 1) // self.page_size]

        def cost(aw: _AW) -> tuple:
            live = aw.live_requests()
            prefill = seq.num_tokens - self.matched(aw.index, hashes) * self.page_size
            return prefill + load_tokens(aw, live), len(live), aw.index
        return min(aws, key=cost)

    def elsewhere(self, seq: Sequence, aw: int) -> int:
        """Leading blocks of the request that another AW caches, when more than AW `aw` does
        (else 0): that AW's requests snapshotted them, so `aw` can read them from the store
        instead of computing them (AttentionWorker.start_step)."""
        if not self.enabled:
            return 0
        hashes = self.hashes(seq)[:(seq.num_tokens - 1) // self.page_size]
        best = max((self.matched(a, hashes) for a in self._held if a != aw), default=0)
        return best if best > self.matched(aw, hashes) else 0

    def cached(self, aw: int, seq: Sequence) -> None:
        """AW `aw` computes (or restores) the request's full blocks: it caches them from now on."""
        if not self.enabled:
            return
        held = self._held.setdefault(aw, collections.OrderedDict())
        for h in reversed(self.hashes(seq)[:seq.num_tokens // self.page_size]):   # leading blocks go last
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def forget(self, aw: int | None = None) -> None:
        """AW `aw` failed: what it cached is gone (its replacement starts empty); None: every AW's."""
        if aw is None:
            self._held.clear()
        else:
            self._held.pop(aw, None)
