"""Engine: request lifecycle and the disaggregated decode loop.

request -> engine (validate, assign to an AW) -> AW (attention + router) -> forwarding engine ->
EWs (one grouped FFN per layer over every AW's tokens) -> AW (combine, next layer, LM head) ->
token out. `step()` runs one iteration of that for every AW with work and returns the tokens it
produced; `stream()` iterates them until nothing is left.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence as Seq

import jax.numpy as jnp
import numpy as np

from tarragon_jax.attention_worker import AttentionWorker
from tarragon_jax.config import CacheConfig, EngineConfig, ModelConfig, SamplingParams
from tarragon_jax.errors import RequestError
from tarragon_jax.expert_worker import ExpertWorker
from tarragon_jax.metrics import Metrics
from tarragon_jax.placement import primary_placement
from tarragon_jax.runtime import LocalRuntime
from tarragon_jax.sequence import Sequence, SeqState
from tarragon_jax.transport import Transport


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request_id: int
    token: int
    index: int                # position in the request's output
    finished: bool
    finish_reason: str = ""


class Engine:
    def __init__(self, model: ModelConfig, params: dict, engine: EngineConfig = EngineConfig(),
                 cache: CacheConfig = CacheConfig(), devices: list | None = None,
                 metrics: Metrics | None = None):
        self.model, self.config, self.cache = model, engine, cache
        self.metrics = metrics or Metrics()
        dtype = jnp.dtype(engine.dtype)
        aw_handles, ew_handles = LocalRuntime(devices).workers(engine.num_attention_workers,
                                                                engine.num_expert_workers)
        hosted, self.ert = primary_placement(model.n_layers, model.n_experts, engine.num_expert_workers)
        self.transport = Transport(engine.transfer_deadline_s)
        self.ew_handles = ew_handles
        self.ews = [ExpertWorker(j, h, hosted[j], params["experts"], engine.expert_backend, dtype)
                    for j, h in enumerate(ew_handles)]
        self.aws = [AttentionWorker(i, h, model, params["attn"], cache, engine, self.transport, self.ert, dtype)
                    for i, h in enumerate(aw_handles)]
        self.requests: dict[int, Sequence] = {}
        self._next_id = 0

    # ---- requests -------------------------------------------------------------------------
    def submit(self, prompt_ids: Seq[int], sampling: SamplingParams = SamplingParams()) -> int:
        """Validate and queue a request; returns its id. Nothing already accepted is affected."""
        prompt = self._validate(prompt_ids, sampling)
        rid = self._next_id
        self._next_id += 1
        seq = Sequence(rid, prompt, sampling, min(len(prompt) + sampling.max_new_tokens, self.model.max_position))
        self.requests[rid] = seq
        min(self.aws, key=lambda a: a.scheduler.num_requests).scheduler.add(seq)
        self.metrics.submitted(rid)
        return rid

    def _validate(self, prompt_ids, sampling) -> list[int]:
        if not isinstance(sampling, SamplingParams):
            raise RequestError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise RequestError(f"prompt must be a sequence of integer token ids, got {prompt_ids!r}") from None
        if not prompt:
            raise RequestError("prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.model.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} out of range [0, {self.model.vocab_size})")
        if len(prompt) >= self.model.max_position:
            raise RequestError(f"prompt too long: {len(prompt)} tokens, model context is "
                               f"{self.model.max_position} (need room for at least one new token)")
        need = self.aws[0].blocks.pages_for(min(len(prompt) + sampling.max_new_tokens, self.model.max_position))
        if need > self.aws[0].blocks.capacity:
            raise RequestError(f"request needs {need} KV pages, an attention worker has "
                               f"{self.aws[0].blocks.capacity}; lower max_new_tokens or raise num_pages")
        return prompt

    @property
    def has_work(self) -> bool:
        return any(a.scheduler.num_requests for a in self.aws)

    # ---- the data path --------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        batches = {a.index: b for a in self.aws if (b := a.start_step()) is not None}
        active = [a for a in self.aws if a.index in batches]
        for layer in range(self.model.n_layers):
            outs = {a.index: a.attend(layer) for a in active}
            sent = {a.index: a.refe.dispatch(layer, outs[a.index].hn, np.asarray(outs[a.index].ids),
                                             batches[a.index].n_tokens, self.ew_handles) for a in active}
            results = self._run_experts(layer, sent)
            for a in active:
                ys, toks, ks = a.refe.collect(sent[a.index], results[a.index], self.ew_handles)
                a.combine(outs[a.index], ys, toks, ks)
        events = []
        for a in active:
            for seq, tok in a.finish_step(batches[a.index]):
                self.metrics.token(seq.request_id)
                if seq.state is SeqState.FINISHED:
                    a.scheduler.finish(seq)
                events.append(TokenEvent(seq.request_id, tok, len(seq.output) - 1,
                                         seq.state is SeqState.FINISHED, seq.finish_reason))
        self.metrics.steps += 1
        return events

    def _run_experts(self, layer: int, sent: dict) -> dict[int, dict]:
        """Each EW runs once over the rows every AW sent it; returns aw -> ew -> output rows."""
        results: dict[int, dict] = {aw: {} for aw in sent}
        for ew in self.ews:
            mine = [(aw, o) for aw, outs in sent.items() for o in outs if o.ew == ew.index]
            if mine:
                ys = ew.run_layer(layer, [o.msg for _, o in mine])
                for (aw, _), y in zip(mine, ys):
                    results[aw][ew.index] = y
        return results

    def stream(self) -> Iterator[TokenEvent]:
        while self.has_work:
            yield from self.step()

    def generate(self, prompts: Seq[Seq[int]], sampling: SamplingParams = SamplingParams()) -> list[list[int]]:
        """Serve all prompts as one continuous batch; outputs in prompt order."""
        ids = [self.submit(p, sampling) for p in prompts]
        for _ in self.stream():
            pass
        return [list(self.requests[i].output) for i in ids]

    def close(self) -> None:
        self.transport.close()
