"""Attention worker (AW): owns its requests, their paged KV cache, and the attention-side params.

The AW's data path per step, all dispatched without waiting: embed -> for each layer one program
(combine of the previous layer, attention, router, dispatch packed for the EWs) and the forwarding
engine's exchange -> head (last combine, LM head, sampling). The engine drives the layer loop
across AWs so each EW sees one layer's tokens from every AW together, waits once for the sampled
tokens, and `commit` then snapshots newly filled KV blocks to the checkpoint store
(asynchronously). A request moved here after its AW failed restores its
committed blocks on admission and recomputes only the positions after them.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tarragon_jax.config import CacheConfig, EngineConfig, ModelConfig
from tarragon_jax.kv.block_manager import BlockManager
from tarragon_jax.kv.checkpoint_store import (BlockRef, CheckpointStore, SnapshotCorrupt, SnapshotMissing,
                                              StoreUnavailable)
from tarragon_jax.kv.kv_cache import allocate_pages, read_blocks, write_blocks
from tarragon_jax.kv.prefix_hash import cache_salt
from tarragon_jax.model import attention_stage as stage
from tarragon_jax.model.sampling import LOGPROB_KS, adjust, constrain, logprob_k, logprobs, sample
from tarragon_jax.workers import backends
from tarragon_jax.workers.forwarding_engine import ForwardingEngine
from tarragon_jax.workers.grammar import Grammars, Vocabulary
from tarragon_jax.workers.logit_adjust import adjust_inputs
from tarragon_jax.workers.program_log import ProgramLog
from tarragon_jax.workers.routing_table import RoutingTable
from tarragon_jax.workers.runtime import WorkerHandle
from tarragon_jax.workers.scheduler import Scheduler, StepBatch, bucket
from tarragon_jax.workers.sequence import Sequence, SeqState, emit, prompt_positions, record_prompt_logprobs
from tarragon_jax.workers.shape_grid import ShapeGrid


def _serving_params(model: ModelConfig, attn_params: dict, dtype) -> dict:
    """Host params in the serving dtype, except a sigmoid router's weight and selection bias,
    which stay f32 as transformers keeps them (DeepSeek): bf16 scores would pick other experts."""
    keep = {"router", "router_bias"} if model.router_scoring == "sigmoid" else set()

    def cast(path, a):
        last = path[-1]
        f32 = isinstance(last, jax.tree_util.DictKey) and last.key in keep
        return np.asarray(a).astype(np.float32 if f32 else dtype)
    return jax.tree_util.tree_map_with_path(cast, attn_params)


def _keep_pages(kv: dict, k, v) -> None:
    """A layer's pages as attention_layer returned them (v is None for an MLA latent cache)."""
    kv["k"] = k
    if v is not None:
        kv["v"] = v


@dataclasses.dataclass
class RestoreStats:
    """What moving requests here cost: for the recovery breakdown."""
    requests: int = 0
    blocks: int = 0
    fallbacks: int = 0                    # missing/corrupt snapshot -> recomputed from tokens
    tokens_recomputed: int = 0
    shared: int = 0                       # restored blocks another moved request had written (not rewritten)
    seconds: float = 0.0                  # reading snapshots and writing them into pages
    recompute_steps: int = 0              # steps that carried recompute chunks


@dataclasses.dataclass(frozen=True)
class PrefixStats:
    """The AW's prefix cache: tokens of the requests it admitted, those it found cached, and the
    blocks it caches now (for /metrics; counts start at 0 with each worker)."""
    query_tokens: int = 0
    hit_tokens: int = 0                   # not computed: cached here, or read from the store
    cached_blocks: int = 0
    store_hit_tokens: int = 0             # of the hits, those read from the store (another AW computed them)


class AttentionWorker:
    joined_at = 0.0          # when it joined the service as a replacement (controller clock)

    def __init__(self, index: int, handle: WorkerHandle, model: ModelConfig, attn_params: dict,
                 cache: CacheConfig, engine: EngineConfig, ert: RoutingTable, dtype,
                 store: CheckpointStore | None, clock, vocab: Vocabulary | None = None):
        """vocab: the tokenizer structured outputs follow (None: requests with a grammar are refused
        before they reach an AW)."""
        self.index, self.handle, self.model, self.store, self.clock = index, handle, model, store, clock
        self.grammars = Grammars(vocab) if vocab is not None else None
        self.attention_backend = backends.attention_backend(engine.attention_backend, handle.devices[0])
        self.device = backends.describe(handle.devices[0])
        self.n_ews = engine.num_expert_workers
        self.params = handle.put(_serving_params(model, attn_params, dtype))
        self.pages = allocate_pages(model, cache, handle.sharding, dtype)
        self.blocks = BlockManager(cache.num_pages, cache.page_size, caching=engine.prefix_caching)
        self.scheduler = Scheduler(self.blocks, engine.max_running, engine.max_step_tokens,
                                   engine.prefill_chunk, cache_salt(model, np.dtype(dtype).name, cache.page_size))
        self.programs = ProgramLog(handle.name)
        self.refe = ForwardingEngine(handle, ert)
        self.snapshot_interval_s = engine.snapshot_interval_s
        self._filled: list[BlockRef] = []        # filled since the last snapshot call
        self._shared: list[BlockRef] = []        # taken from the prefix cache since then (store links)
        self._last_snapshot = clock()
        self.restored = RestoreStats()
        self.store_hit_tokens = 0                # prefix tokens read from the store, computed by another AW
        self._store_lost = False
        self._dtype = dtype
        self._dev: dict = {}
        self._zeros: dict = {}            # T -> [T, k, D] zeros: the answer of an EW that sent none
        self._carry, self._ys, self._inputs = None, (), {}
        self._logprobs = None             # alternatives to compute for the step's logprobs (None: nobody asks)
        self._adjust = None               # the step's logit_adjust inputs on the mesh (None: nobody asks)
        self._masks = None                # the step's grammar masks on the mesh (None: nobody asks)
        self._scored: list = []           # prompt tokens the step scores (sequence.prompt_positions)
        self._prompt_k = 0                # alternatives to compute for them

    @property
    def prefix_stats(self) -> PrefixStats:
        return PrefixStats(self.scheduler.query_tokens, self.scheduler.hit_tokens, self.blocks.num_cached,
                           self.store_hit_tokens)

    def prefetch(self) -> None:
        """Nothing to start early: a local start_step is a direct call (see RemoteAttentionWorker)."""

    def start_step(self) -> StepBatch | None:
        """Admit, restore moved requests (and prefixes other AWs computed) and pick this step's
        tokens; None if idle."""
        self.handle.check()
        admitted = self.scheduler.admit()
        ps = self.blocks.page_size
        self._shared += [BlockRef(s.request_id, b, s.hashes[b]) for s in admitted for b in range(s.num_cached // ps)]
        moved = [s for s in admitted if s.restore_pending]
        hinted = [s for s in admitted if not s.restore_pending and self.store is not None
                  and min(s.prefix_hint, (s.num_tokens - 1) // ps) > s.num_cached // ps]
        if moved or hinted:
            self._restore(moved, hinted)
        batch = self.scheduler.schedule()
        if batch is not None and any(s.num_cached < s.recompute_until for s in batch.seqs):
            self.restored.recompute_steps += 1
        return batch

    def begin(self, batch: StepBatch, step: int) -> None:
        """Put the step's inputs on the mesh in one transfer and embed (the carry into layer 0).
        Every AW of a step pads to the same token bucket, so an EW's program sees one shape, and
        gets the same step number, which salts the choice among an expert's replicas alike on
        every AW (an expert's pairs of one step go to the same replicas from every AW)."""
        self.handle.check()
        R = len(batch.last_B)
        masks = None if self.grammars is None else self.grammars.masks(batch.seqs, R)   # rows kept from commit
        adjusts = adjust_inputs(batch.seqs, R, self.model.vocab_size)
        sp = [s.sampling for s in batch.seqs] + [batch.seqs[0].sampling] * (R - len(batch.seqs))
        names = ("ids", "pos", "slot", "tables", "last", "temperature", "top_p", "seed", "index", "step")
        inputs, self._masks, self._adjust = self.handle.put(((
            batch.ids_T, batch.pos_T, batch.slot_T, batch.tables_BxP, batch.last_B,
            np.array([p.temperature for p in sp], np.float32), np.array([p.top_p for p in sp], np.float32),
            np.array([p.seed for p in sp], np.uint32),
            np.array([len(s.output) for s in batch.seqs] + [0] * (R - len(batch.seqs)), np.int32),
            np.uint32(step % 2**32)), masks, adjusts))                  # None (nobody asks) puts nothing
        self._dev = dict(zip(names, inputs))
        self._carry = self.programs.call(stage.embed, self.model, self.params, self._dev["ids"])
        self._ys, self._inputs = self._no_answers(len(batch.ids_T)), {}
        asked = [s.sampling.logprobs for s in batch.seqs if s.sampling.logprobs is not None]
        self._logprobs = logprob_k(max(asked), self.model.vocab_size) if asked else None
        self._scored = prompt_positions([(s, s.num_cached, n) for s, n in zip(batch.seqs, batch.chunks)])
        if self._scored:
            self._prompt_k = logprob_k(max(s.sampling.prompt_logprobs for s, _, _ in self._scored), self.model.vocab_size)

    def _no_answers(self, T: int) -> tuple:
        if T not in self._zeros:
            self._zeros[T] = self.handle.put(np.zeros((T, self.model.top_k, self.model.d_model), self._dtype))
        return (self._zeros[T],) * self.n_ews

    def attend(self, layer: int) -> jax.Array | None:
        """Dispatch one layer (combine of the previous one, attention, routing); returns the packed
        buffer for the EWs, or None for a dense layer. The layer's inputs are kept until the step
        commits, so a failure can replay it (`rewind`)."""
        self.handle.check()
        d, kv, moe = self._dev, self.pages[layer], self.model.moe_index(layer)
        self._inputs[layer] = (self._carry, self._ys)
        self._carry, send, k, v = self.programs.call(
            stage.attention_layer, self.model, self.params["layers"][layer], kv["k"], kv.get("v"), self._carry,
            self._ys, d["pos"], d["slot"], d["tables"], self.refe.route(moe or 0), d["step"],  # dense: routes nothing
            impl=self.attention_backend)
        _keep_pages(kv, k, v)
        if send is None:
            self._ys = self._no_answers(len(d["pos"]))
        return send

    def receive(self, ys: list) -> None:
        """The EWs' answers of the layer just attended, one per EW (None: that EW sent none)."""
        zero = self._no_answers(len(self._dev["pos"]))[0]
        self._ys = tuple(zero if y is None else y for y in ys)

    def rewind(self, layer: int) -> None:
        """Back to the inputs of `layer`, to replay it and every later one (a failure in the step)."""
        self._carry, self._ys = self._inputs[layer]

    def head(self) -> dict:
        """Dispatch the last combine, LM head, the requests' logit bias and penalties and their
        grammars' token masks where some ask, and sampling: {"tokens": int32 [R]} on the device, and "logprobs" (sampling.logprobs:
        the chosen token's [R], top ids and logprobs [R, K], of the model's own logits) when some
        request of the step asks for them."""
        self.handle.check()
        d = self._dev
        logits_RxV = self.programs.call(stage.head, self.model, self.params, self._carry, self._ys, d["last"])
        chosen_from = logits_RxV if self._adjust is None else self.programs.call(adjust, logits_RxV, *self._adjust)
        if self._masks is not None:
            chosen_from = self.programs.call(constrain, chosen_from, self._masks)
        out = {"tokens": self.programs.call(sample, chosen_from, d["temperature"], d["top_p"], d["seed"], d["index"])}
        if self._logprobs is not None:
            out["logprobs"] = self.programs.call(logprobs, logits_RxV, out["tokens"], k=self._logprobs)
        if self._scored:
            out.update(self._score_prompts())
        return out

    def _score_prompts(self) -> dict:
        """Prompt logprobs: the head again at the rows of the prompt tokens the step scores
        ("prompt_logprobs": logprobs' output per row, padded to a bucket; "scored": (request id,
        position) per row, on the host)."""
        P = bucket(len(self._scored), 4)
        rows, nxt = np.zeros(P, np.int32), np.zeros(P, np.int32)
        rows[:len(self._scored)] = [r for _, r, _ in self._scored]
        nxt[:len(self._scored)] = [s.prompt[p] for s, _, p in self._scored]
        rows_P, next_P = self.handle.put((rows, nxt))
        logits_PxV = self.programs.call(stage.head, self.model, self.params, self._carry, self._ys, rows_P)
        return {"prompt_logprobs": self.programs.call(logprobs, logits_PxV, next_P, k=self._prompt_k),
                "scored": np.array([(s.request_id, p) for s, _, p in self._scored], np.int64).reshape(-1, 2)}

    def _restore(self, moved: list[Sequence], hinted: list[Sequence]) -> None:
        """Restore the committed blocks of requests moved here, and of new requests the prefix
        another AW computed (the store holds it by hash), all in one padded page write (one
        compiled variant per bucket); mark the rest of each moved one for recompute. Blocks this
        AW caches already (admission shared them) are not read back, and a block several
        requests restore is written once: the later ones share its page."""
        t0, ps = self.clock(), self.blocks.page_size
        writes: list[tuple[int, np.ndarray]] = []
        self._store_lost = False
        for seq in moved:
            seq.restore_pending = False
            usable, n = (seq.num_tokens - 1) // ps, seq.num_cached // ps    # the last token stays pending
            if self.store is not None and usable > n:
                blocks = self._read_store(lambda: self.store.restore(seq.request_id)[:usable])
                if blocks is None:
                    self.restored.fallbacks += 1
                else:
                    writes += self._place_restored(seq, blocks, 0, n)
                    n = max(n, len(blocks))
            self.restored.blocks += n - seq.num_cached // ps
            seq.num_cached = n * ps
            seq.recompute_until = seq.num_tokens - 1
            self.restored.tokens_recomputed += seq.num_tokens - 1 - n * ps
        self.restored.requests += len(moved)
        for seq in hinted:
            hits, end = seq.num_cached // ps, min(seq.prefix_hint, (seq.num_tokens - 1) // ps)
            hashes = self.scheduler.hashes(seq)
            blocks = self._read_store(lambda: self.store.restore_prefix(hashes[hits:end]))
            if blocks is not None:
                writes += self._place_restored(seq, blocks, hits, hits)
                self._shared += [BlockRef(seq.request_id, b, hashes[b]) for b in range(hits, hits + len(blocks))]
                seq.num_cached = (hits + len(blocks)) * ps
                self.scheduler.hit_tokens += len(blocks) * ps
                self.store_hit_tokens += len(blocks) * ps
        if writes:
            pages, data = [p for p, _ in writes], [b for _, b in writes]
            N = bucket(len(data), 4)                      # padding rows write zeros to the sink page 0
            blocks = np.stack(data + [np.zeros_like(data[0])] * (N - len(data)))
            ids = np.asarray(pages + [0] * (N - len(pages)), np.int32)
            self.pages = self.programs.call(write_blocks, self.pages, *self.handle.put((ids, blocks)))
        self.restored.seconds += self.clock() - t0

    def _read_store(self, read) -> np.ndarray | None:
        """Blocks from the store, or None if it has none or they are corrupt; after a store that
        did not answer, None at once for the rest of the batch (one deadline, not one each)."""
        if self._store_lost:
            return None
        try:
            return read()
        except (SnapshotMissing, SnapshotCorrupt) as e:
            self._store_lost = isinstance(e, StoreUnavailable)
            return None

    def _place_restored(self, seq: Sequence, blocks: np.ndarray, offset: int, first: int) -> list[tuple[int, np.ndarray]]:
        """(page, block) to write of the request's blocks [first, offset + len(blocks)), blocks[i]
        being block offset + i: blocks already cached here (an earlier request of this restore
        wrote them) share that page instead; the rest are registered in the cache, as they hold
        their KV once the write lands."""
        hashes, out = self.scheduler.hashes(seq), []
        for b in range(first, offset + len(blocks)):
            if b < len(hashes) and self.blocks.share(seq.request_id, b, hashes[b]):
                self.restored.shared += 1
                continue
            out.append((self.blocks.block_table(seq.request_id)[b], blocks[b - offset]))
            if b < len(hashes):
                self.blocks.register(seq.request_id, b, hashes[b])
        return out

    def commit(self, batch: StepBatch, out: dict) -> list[tuple[Sequence, int, bool]]:
        """The step's sampled tokens (head's output, on the host) are in: emit for every row whose
        chunk ended its tokens, advance cache progress of all rows, snapshot newly filled blocks.
        Returns (seq, token, is_new_to_the_user) per sampled row."""
        self.handle.check()
        self._inputs = {}
        record_prompt_logprobs(out, {s.request_id: s for s in batch.seqs})
        emitted, filled = [], []
        ps = self.blocks.page_size
        for row, (s, n) in enumerate(zip(batch.seqs, batch.chunks)):
            full = range(s.num_cached // ps, (s.num_cached + n) // ps)
            s.num_cached += n
            if full and self.blocks.caching:
                hashes = self.scheduler.hashes(s)
                for b in full:
                    self.blocks.register(s.request_id, b, hashes[b])
            if batch.emits[row]:
                emitted.append(emit(s, out, row))
            if s.state is not SeqState.FINISHED:
                filled += [BlockRef(s.request_id, b, s.hashes[b] if self.blocks.caching else None) for b in full]
        self._filled += filled
        if self.grammars is not None:
            self.grammars.advance(batch.seqs)
        if self.clock() - self._last_snapshot >= self.snapshot_interval_s:
            self._snapshot()
        return emitted

    def _snapshot(self) -> None:
        """Hand the blocks filled since the last call to the store (it copies and writes in the
        background), those of requests still here: one gather program and one host copy per
        `snapshot_interval_s`, not per step, since each call costs the decode loop ~0.3 ms of host
        time (on the tiny model's 6 ms steps, no-failure throughput 1.13x lower every step)."""
        refs, self._filled, self._last_snapshot = self._filled, [], self.clock()
        refs = list(dict.fromkeys(r for r in refs if self.blocks.holds(r.request_id)))
        shared, self._shared = [r for r in self._shared if self.blocks.holds(r.request_id)], []
        if self.store is not None and shared:
            self.store.link(self.index, shared)
        if self.store is None or not refs:
            return
        tables = {rid: self.blocks.block_table(rid) for rid in {r.request_id for r in refs}}
        ids = np.zeros(bucket(len(refs), 4), np.int32)       # the pages, padded with the sink page 0
        ids[:len(refs)] = [tables[r.request_id][r.block] for r in refs]
        blocks, sums = self.programs.call(read_blocks, self.pages, ids)     # ids travel with the call
        self.store.snapshot(self.index, refs, blocks, sums)

    def precompile(self, grid: ShapeGrid) -> None:
        """Run every stage program once at every grid shape, on zeros routed to the sink page
        (the padding path of a real step), so no serving step compiles, and the heartbeat's probe
        program. Programs are logged, so a replacement of this AW compiles the same set before it
        joins."""
        with self.programs.recording():
            self._precompile(grid)

    def _precompile(self, grid: ShapeGrid) -> None:
        self.handle.probe()
        def zeros(shape, dtype=np.int32):
            return self.handle.put(np.zeros(shape, dtype))

        call, m, B = self.programs.call, self.model, self.scheduler.table_rows
        kv = self.pages[0]
        kinds = [self.params["layers"][i] for i in sorted({0, m.first_k_dense})]   # dense and MoE layers
        for T in grid.tokens:
            carry = call(stage.embed, m, self.params, zeros(T))
            ys = self._no_answers(T)
            pos, slot = zeros(T), self.handle.put(np.full(T, B - 1, np.int32))
            for P in grid.pages:
                for lp in kinds:
                    out, _, k, v = call(stage.attention_layer, m, lp, kv["k"], kv.get("v"), carry, ys, pos, slot,
                                        zeros((B, P)), self.refe.route(0), zeros((), np.uint32),
                                        impl=self.attention_backend)
                    _keep_pages(kv, k, v)
            for R in (r for r in grid.rows if r <= max(T, 4)):
                call(stage.head, m, self.params, out, ys, zeros(R))
        for R in grid.rows:
            call(sample, zeros((R, m.vocab_size), np.float32), zeros(R, np.float32), zeros(R, np.float32),
                 zeros(R, np.uint32), zeros(R))
            for k in sorted({logprob_k(k, m.vocab_size) for k in LOGPROB_KS}):
                call(logprobs, zeros((R, m.vocab_size), np.float32), zeros(R), k=k)
            if self.grammars is not None:
                call(constrain, zeros((R, m.vocab_size), np.float32), zeros((R, self.grammars.vocab.mask_words)))
            for L in grid.entries:
                call(adjust, zeros((R, m.vocab_size), np.float32), zeros((R, L)), zeros((R, L), np.float32),
                     zeros((R, L), np.float32), self.handle.put(np.ones((R, 3), np.float32)))
        for N in grid.blocks:
            blocks, _ = call(read_blocks, self.pages, np.zeros(N, np.int32))     # host ids, as _snapshot passes
            self.pages = call(write_blocks, self.pages, zeros(N), blocks)

    def refill(self, store: CheckpointStore) -> None:
        """A new store replaced a dead one (its memory tier is empty): snapshot to it every full
        block of the requests here, with the next snapshot; until then a request moved off a
        failing AW recomputes what the new store lacks."""
        self.store = store
        ps = self.blocks.page_size
        for s in self.scheduler.running:
            hashes = self.scheduler.hashes(s)
            if s.state is not SeqState.FINISHED:
                self._filled += [BlockRef(s.request_id, b, hashes[b] if hashes else None) for b in range(s.num_cached // ps)]

    def reset_prefix_cache(self) -> int:
        """Forget the cached prefixes (BlockManager.reset_cache); returns how many blocks were cached."""
        return self.blocks.reset_cache()

    def release(self, seq: Sequence) -> bool:
        """A request leaves (finished or cancelled), running or queued: its pages return to the
        pool and its snapshots are dropped. False if this AW does not hold it."""
        if not self.scheduler.remove(seq):
            return False
        if self.grammars is not None:
            self.grammars.release(seq.request_id)
        if self.store is not None:
            self.store.drop(seq.request_id)
        return True

    def live_requests(self) -> list[Sequence]:
        return [s for s in list(self.scheduler.waiting) + self.scheduler.running if s.state is not SeqState.FINISHED]

    def kill(self) -> None:
        """Fail-stop: params and KV pages are deleted; every later call raises WorkerFailed.
        Snapshots still reading its memory are lost with it (what the store holds stays)."""
        self.handle.alive = False
        if self.store is not None:
            self.store.abandon(self.index)
        for a in jax.tree.leaves((self.params, self.pages, self._dev, self._zeros)):
            a.delete()
