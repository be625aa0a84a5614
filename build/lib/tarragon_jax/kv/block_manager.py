"""Host-side page allocator and per-request block tables for one attention worker's KV cache.

Page 0 is never handed out: padded tokens write there, so a padded write can never touch a page
that belongs to a request. Admission reserves every page a request can need (prompt +
max_new_tokens), so a running request never runs out mid-decode and never steals another's page;
a request that does not fit waits in the scheduler queue.
"""
from __future__ import annotations


class BlockManager:
    SINK_PAGE = 0

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the padding sink), got {num_pages}")
        self.page_size = page_size
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))    # pop() hands out low pages first
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages a single request could ever hold."""
        return self.num_pages - 1

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) <= len(self._free)

    def allocate(self, request_id: int, num_tokens: int) -> list[int]:
        """Reserve pages for `num_tokens` tokens; raises if already allocated or out of pages."""
        if request_id in self._tables:
            raise ValueError(f"request {request_id} already holds pages")
        n = self.pages_for(num_tokens)
        if n > len(self._free):
            raise MemoryError(f"request {request_id} needs {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._tables[request_id] = pages
        return list(pages)

    def block_table(self, request_id: int) -> list[int]:
        return list(self._tables[request_id])

    def holds(self, request_id: int) -> bool:
        return request_id in self._tables

    def free(self, request_id: int) -> None:
        """Return a request's pages; freeing an unknown request raises (a double free is a bug)."""
        pages = self._tables.pop(request_id, None)
        if pages is None:
            raise KeyError(f"request {request_id} holds no pages")
        self._free.extend(reversed(pages))
