"""Continuous batching for one attention worker: admission under the page budget, chunked prefill.

Every step, waiting requests are admitted FIFO while they fit (pages reserved for their whole
length, so a running request never stalls for pages); then running requests get tokens: one each
for those decoding, then prefill chunks of at most `prefill_chunk` while the step budget lasts
(a request recomputing after a move or a restart gets the whole budget: one chunked pass). A step
that recomputes has one of two token buckets, that of `prefill_chunk` (a restored request
recomputes less than a page or so) or the full `max_step_tokens`, so the shapes a recovery meets
are few and known, and compiled at startup (shape_grid.recovery_grid).
Requests join and leave the running batch at any step. With prefix caching, admission shares the
longest cached run of a request's leading blocks (BlockManager) and only the rest is computed.
Host-only (numpy).
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from tarragon_jax.kv.block_manager import BlockManager
from tarragon_jax.workers.sequence import Sequence, SeqState


def bucket(n: int, minimum: int) -> int:
    """Next power of two >= max(n, minimum): bounds the number of compiled shapes."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def recovery_buckets(prefill_chunk: int, max_step_tokens: int) -> tuple[int, ...]:
    """The token buckets of a step that recomputes: a small one, or the whole budget."""
    return tuple(sorted({bucket(prefill_chunk, 8), bucket(max_step_tokens, 8)}))


@dataclasses.dataclass
class StepBatch:
    """Flat ragged token batch of one AW step, padded to bucketed shapes."""
    seqs: list[Sequence]          # requests with tokens in this step, in row order
    chunks: list[int]             # tokens each contributes
    ids_T: np.ndarray             # int32 [T]
    pos_T: np.ndarray             # int32 [T]
    slot_T: np.ndarray            # int32 [T]  row in tables_BxP (padding -> last, all-zero row)
    tables_BxP: np.ndarray        # int32 [B, P] page ids (0 = sink)
    last_B: np.ndarray            # int32 [R]  index of each row's last token (padding -> 0)
    emits: list[bool]             # whether the row's chunk reaches the end of its tokens
    n_tokens: int                 # real tokens (T minus padding)

    @property
    def T(self) -> int:
        """Token rows, padding included (the step's bucket)."""
        return len(self.ids_T)

    def padded_to(self, T: int) -> "StepBatch":
        """The same batch over T >= len(ids_T) token rows (the step's common bucket across AWs);
        the new rows are padding: token 0 at position 0 of the all-zero table row."""
        extra = T - len(self.ids_T)
        if extra <= 0:
            return self
        pad = lambda a, v: np.concatenate([a, np.full(extra, v, np.int32)])
        return dataclasses.replace(self, ids_T=pad(self.ids_T, 0), pos_T=pad(self.pos_T, 0),
                                   slot_T=pad(self.slot_T, len(self.tables_BxP) - 1))


class Scheduler:
    def __init__(self, blocks: BlockManager, max_running: int, max_step_tokens: int, prefill_chunk: int,
                 salt: bytes = b""):
        """salt: what the KV depends on besides the tokens (prefix_hash.cache_salt), when the
        blocks cache prefixes."""
        self.blocks, self.salt = blocks, salt
        self.max_running, self.max_step_tokens, self.prefill_chunk = max_running, max_step_tokens, prefill_chunk
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.query_tokens = self.hit_tokens = 0       # prefix cache: tokens of admitted requests, and cached ones

    def hashes(self, seq: Sequence) -> list[int]:
        """The request's chained block hashes (extended to its tokens now); none without caching."""
        if not self.blocks.caching:
            return []
        return seq.block_hashes(self.blocks.page_size, self.salt)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def admit(self) -> list[Sequence]:
        """Move waiting requests into the running batch while pages last; returns the admitted."""
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            usable = self.hashes(seq)[:(seq.num_tokens - 1) // self.blocks.page_size]   # the last token is computed
            if seq.sampling.prompt_logprobs is not None:
                usable = []                               # every prompt token is computed: it is scored
            if not self.blocks.can_allocate(seq.max_len, usable):
                break                                     # FIFO: the head waits for pages
            self.waiting.popleft()
            hits = len(self.blocks.cached_run(usable))
            self.blocks.allocate(seq.request_id, seq.max_len, usable)
            self.query_tokens += seq.num_tokens
            self.hit_tokens += hits * self.blocks.page_size
            seq.num_cached = hits * self.blocks.page_size
            seq.state = SeqState.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    @property
    def table_rows(self) -> int:
        """B, fixed: a row per running request, +1 all-zero row for padding tokens, bucketed."""
        return bucket(self.max_running + 1, 4)

    def remove(self, seq: Sequence) -> bool:
        """Drop a request wherever it is (finished or cancelled); False if this scheduler does not
        hold it."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq.request_id)
            return True
        if seq in self.waiting:
            self.waiting.remove(seq)                      # not admitted: it holds no pages
            return True
        return False

    def schedule(self) -> StepBatch | None:
        """This step's tokens for the running batch (call admit() first)."""
        budget = self.max_step_tokens
        picked: list[tuple[Sequence, int]] = []
        recomputing = False
        decoding = [s for s in self.running if s.num_pending == 1]
        prefilling = [s for s in self.running if s.num_pending > 1]
        for s in decoding + prefilling:
            recompute = s.num_cached < s.recompute_until
            n = min(s.num_pending, self.max_step_tokens if recompute else self.prefill_chunk, budget)
            if n <= 0:
                break
            picked.append((s, n))
            recomputing |= recompute
            budget -= n
        return self._build(picked, recomputing) if picked else None

    def _build(self, picked: list[tuple[Sequence, int]], recomputing: bool) -> StepBatch:
        n_tok = sum(n for _, n in picked)
        T = (next(b for b in recovery_buckets(self.prefill_chunk, self.max_step_tokens) if b >= n_tok)
             if recomputing else bucket(n_tok, 8))
        B = self.table_rows
        R = bucket(len(picked), 4)                        # rows that may sample
        P = bucket(max(self.blocks.pages_for(s.num_cached + n) for s, n in picked), 1)
        ids, pos = np.zeros(T, np.int32), np.zeros(T, np.int32)
        slot = np.full(T, B - 1, np.int32)
        tables, last = np.zeros((B, P), np.int32), np.zeros(R, np.int32)
        emits, t = [], 0
        for row, (s, n) in enumerate(picked):
            pages = self.blocks.block_table(s.request_id)[:P]
            tables[row, :len(pages)] = pages
            ids[t:t + n] = s.tokens[s.num_cached:s.num_cached + n]
            pos[t:t + n] = np.arange(s.num_cached, s.num_cached + n)
            slot[t:t + n] = row
            last[row] = t + n - 1
            emits.append(s.num_cached + n == s.num_tokens)
            t += n
        return StepBatch([s for s, _ in picked], [n for _, n in picked], ids, pos, slot, tables, last,
                         emits, n_tok)
