"""Attention worker (AW): owns its requests, their paged KV cache, and the attention-side params.

The AW's data path per step: embed -> for each layer (attention + router, forwarding engine
exchange with the EWs, combine) -> LM head -> sample. The engine drives the layer loop across
AWs so each EW sees one layer's tokens from every AW together.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tarragon_jax.block_manager import BlockManager
from tarragon_jax.config import CacheConfig, EngineConfig, ModelConfig
from tarragon_jax.forwarding_engine import ForwardingEngine
from tarragon_jax.kv_cache import allocate_pages
from tarragon_jax.model import attention_stage as stage
from tarragon_jax.routing_table import RoutingTable
from tarragon_jax.runtime import WorkerHandle
from tarragon_jax.sampling import sample
from tarragon_jax.scheduler import Scheduler, StepBatch
from tarragon_jax.sequence import Sequence
from tarragon_jax.transport import Transport


@dataclasses.dataclass
class LayerOut:
    h: jax.Array
    hn: jax.Array
    ids: jax.Array
    w: jax.Array
    shared: jax.Array


class AttentionWorker:
    def __init__(self, index: int, handle: WorkerHandle, model: ModelConfig, attn_params: dict,
                 cache: CacheConfig, engine: EngineConfig, transport: Transport, ert: RoutingTable, dtype):
        self.index, self.handle, self.model = index, handle, model
        self.params = handle.put(jax.tree.map(lambda a: np.asarray(a).astype(dtype), attn_params))
        self.pages = allocate_pages(model, cache, handle, dtype)
        self.blocks = BlockManager(cache.num_pages, cache.page_size)
        self.scheduler = Scheduler(self.blocks, engine.max_running, engine.max_step_tokens,
                                   engine.prefill_chunk)
        self.refe = ForwardingEngine(index, handle, transport, ert)
        self._dev: dict = {}

    def start_step(self) -> StepBatch | None:
        """Pick this step's tokens and embed them; None when the AW has nothing to run."""
        batch = self.scheduler.schedule()
        if batch is not None:
            self._dev = dict(zip(("ids", "pos", "slot", "tables", "last"), self.handle.put(
                (batch.ids_T, batch.pos_T, batch.slot_T, batch.tables_BxP, batch.last_B))))
            self._dev["x"] = stage.embed(self.params, self._dev["ids"])
        return batch

    def attend(self, layer: int) -> LayerOut:
        d, kv = self._dev, self.pages[layer]
        h, hn, ids, w, shared, kv["k"], kv["v"] = stage.attention_layer(
            self.model, self.params["layers"][layer], kv["k"], kv["v"], d["x"], d["pos"], d["slot"],
            d["tables"])
        return LayerOut(h, hn, ids, w, shared)

    def combine(self, out: LayerOut, ys: tuple, toks: tuple, ks: tuple) -> None:
        self._dev["x"] = stage.combine(out.h, out.shared, out.w, ys, toks, ks)

    def finish_step(self, batch: StepBatch) -> list[tuple[Sequence, int]]:
        """Sample for every row whose chunk ended its tokens; advance cache progress of all rows."""
        logits = stage.lm_head(self.model, self.params, self._dev["x"], self._dev["last"])
        B = len(batch.last_B)
        sp = [s.sampling for s in batch.seqs] + [batch.seqs[0].sampling] * (B - len(batch.seqs))
        toks = np.asarray(sample(logits, *self.handle.put((
            np.array([p.temperature for p in sp], np.float32), np.array([p.top_p for p in sp], np.float32),
            np.array([p.seed for p in sp], np.uint32),
            np.array([len(s.output) for s in batch.seqs] + [0] * (B - len(batch.seqs)), np.int32)))))
        emitted = []
        for row, (s, n) in enumerate(zip(batch.seqs, batch.chunks)):
            s.num_cached += n
            if batch.emits[row]:
                s.append(int(toks[row]))
                emitted.append((s, int(toks[row])))
        return emitted
