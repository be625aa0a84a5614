"""Host-side page allocator and per-request block tables for one attention worker's KV cache,
with automatic prefix caching.

Page 0 is never handed out: padded tokens write there, so a padded write can never touch a page
that belongs to a request. Admission reserves every page a request can need (prompt +
max_new_tokens), so a running request never runs out mid-decode and never steals another's page;
a request that does not fit waits in the scheduler queue.

Prefix caching (on with `caching=True`): a full block whose KV is computed is registered under
its chained token hash (kv/prefix_hash.py). A new request takes the longest run of registered
blocks matching its own hashes (their pages are shared, reference-counted, never written again:
a request writes only positions past its cached ones) and computes only the rest. A page whose
last holder left stays cached but evictable, least recently freed first; evictable pages count
as free, so a request that fits never waits on a cached block it could evict.
"""
from __future__ import annotations

import collections
from typing import Sequence


class BlockManager:
    SINK_PAGE = 0

    def __init__(self, num_pages: int, page_size: int, caching: bool = False):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the padding sink), got {num_pages}")
        self.page_size, self.num_pages, self.caching = page_size, num_pages, caching
        self._free = list(range(num_pages - 1, 0, -1))    # uncached; pop() hands out low pages first
        self._tables: dict[int, list[int]] = {}
        self._refs: dict[int, int] = {}                   # page -> holders (pages in some table)
        self._hash_of: dict[int, int] = {}                # page -> the block hash it is cached under
        self._page_of: dict[int, int] = {}                # block hash -> page
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, no holder; LRU first

    @property
    def num_free(self) -> int:
        """Pages a new request can take: uncached ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held or evictable)."""
        return len(self._page_of)

    @property
    def capacity(self) -> int:
        """Pages a single request could ever hold."""
        return self.num_pages - 1

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def cached_run(self, hashes: Sequence[int]) -> list[int]:
        """Pages of the longest leading run of `hashes` in the cache (none when caching is off)."""
        pages = []
        for h in hashes if self.caching else ():
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def can_allocate(self, num_tokens: int, hashes: Sequence[int] = ()) -> bool:
        """Would allocate(num_tokens, hashes) succeed now? Cached hits need no new page; an
        evictable hit is not free for the rest."""
        hits = self.cached_run(hashes)
        idle_hits = sum(p in self._evictable for p in hits)
        return self.pages_for(num_tokens) - len(hits) <= self.num_free - idle_hits

    def allocate(self, request_id: int, num_tokens: int, hashes: Sequence[int] = ()) -> list[int]:
        """Reserve pages for `num_tokens` tokens, the first ones shared from the cache where the
        request's leading block `hashes` are (cached_run: their KV is there); returns the pages.
        Raises if already allocated or out of pages."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id} already holds pages")
        if not self.can_allocate(num_tokens, hashes):
            raise MemoryError(f"request {request_id} needs {self.pages_for(num_tokens)} pages, {self.num_free} free")
        hits = self.cached_run(hashes)
        for p in hits:
            self._evictable.pop(p, None)
        pages = hits + [self._take() for _ in range(self.pages_for(num_tokens) - len(hits))]
        for p in pages:
            self._refs[p] = self._refs.get(p, 0) + 1
        self._tables[request_id] = pages
        return list(pages)

    def _take(self) -> int:
        """An uncached page, else the least recently freed cached one (its hash forgotten)."""
        if self._free:
            return self._free.pop()
        page, _ = self._evictable.popitem(last=False)
        del self._page_of[self._hash_of.pop(page)]
        return page

    def register(self, request_id: int, block: int, block_hash: int) -> None:
        """Block `block` of the request is full and its KV computed: cache it under its hash
        (unless another page already holds that block: this one then stays private)."""
        if not self.caching or block_hash in self._page_of:
            return
        page = self._tables[request_id][block]
        if page in self._hash_of:
            return
        self._hash_of[page], self._page_of[block_hash] = block_hash, page

    def share(self, request_id: int, block: int, block_hash: int) -> bool:
        """Point the request's block at the cached page of `block_hash` (its KV is the same),
        returning its own page; False when that hash is not cached or is this very page."""
        page = self._page_of.get(block_hash) if self.caching else None
        table = self._tables[request_id]
        if page is None or page == table[block]:
            return False
        self._evictable.pop(page, None)
        self._refs[page] = self._refs.get(page, 0) + 1
        self._release(table[block])
        table[block] = page
        return True

    def reset_cache(self) -> int:
        """Forget every cached prefix (benchmarks start cold; vLLM's /reset_prefix_cache): pages no
        request holds become plain free pages, held ones stay with their requests unshared.
        Returns how many blocks were cached."""
        n = len(self._page_of)
        self._free = sorted(self._free + list(self._evictable), reverse=True)   # as at start: low pages first
        self._evictable.clear()
        self._hash_of.clear()
        self._page_of.clear()
        return n

    def block_table(self, request_id: int) -> list[int]:
        return list(self._tables[request_id])

    def holds(self, request_id: int) -> bool:
        return request_id in self._tables

    def free(self, request_id: int) -> None:
        """Return a request's pages; freeing an unknown request raises (a double free is a bug).
        Its cached blocks stay cached, the last ones first in line for eviction."""
        pages = self._tables.pop(request_id, None)
        if pages is None:
            raise KeyError(f"request {request_id} holds no pages")
        for p in reversed(pages):
            self._release(p)

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page]:
            return
        del self._refs[page]
        if page in self._hash_of:
            self._evictable[page] = None
        else:
            self._free.append(page)
