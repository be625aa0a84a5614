"""Engine: request lifecycle and the disaggregated decode loop.

request -> engine (validate, assign to an AW) -> AW (attention + router) -> forwarding engine ->
EWs (one grouped FFN per layer over every AW's tokens) -> AW (combine, next layer, LM head) ->
token out. `step()` runs one iteration of that for every live AW and returns the tokens it
produced; `stream()` iterates them until nothing is left.

Every cross-worker call can raise WorkerFailed. The engine reports it to the controller and then
carries on with what the controller decided: an EW's rows of the current layer are replayed to
the next replica (only the AWs that used it), a failed AW drops out of the step (its requests
were moved), and under `recovery=restart` the whole cluster is rebuilt.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence as Seq

import numpy as np

from tarragon_jax.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SamplingParams
from tarragon_jax.controller import Controller, RecoveryRecord
from tarragon_jax.errors import RequestError, WorkerFailed
from tarragon_jax.faults import FaultInjector
from tarragon_jax.metrics import Metrics
from tarragon_jax.sequence import Sequence, SeqState


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request_id: int
    token: int
    index: int                # position in the request's output
    finished: bool
    finish_reason: str = ""


_FAILED = object()      # an AW-side call raised WorkerFailed (already reported)


class _Restart(Exception):
    def __init__(self, rec: RecoveryRecord):
        self.rec = rec


class Engine:
    def __init__(self, model: ModelConfig, params: dict, engine: EngineConfig = EngineConfig(),
                 cache: CacheConfig = CacheConfig(), devices: list | None = None,
                 metrics: Metrics | None = None, faults: FaultInjector | None = None,
                 load_params: Callable[[], dict] | None = None):
        """load_params: re-reads the weights from the checkpoint files (the restart baseline)."""
        self.model, self.config, self.cache = model, engine, cache
        self.metrics = metrics or Metrics()
        self.faults = faults or FaultInjector([])
        for spec in self.faults.pending:
            count = engine.num_attention_workers if spec.kind == "aw" else engine.num_expert_workers
            if spec.index >= count:
                raise ConfigError(f"fault {spec} targets {spec.kind}{spec.index}, but there are only {count} "
                                  f"{'attention' if spec.kind == 'aw' else 'expert'} workers")
        self.controller = Controller(model, params, engine, cache, devices, self.metrics.clock, load_params)
        self.requests: dict[int, Sequence] = {}
        self._unfinished: set[int] = set()
        self.step_index = 0
        self.replayed_rows = 0
        self.recompute_s = 0.0      # wall time of steps in which some AW recomputed moved requests
        self._next_id = 0

    @property
    def aws(self):
        return self.controller.aws

    @property
    def ews(self):
        return self.controller.ews

    # ---- requests -------------------------------------------------------------------------
    def submit(self, prompt_ids: Seq[int], sampling: SamplingParams = SamplingParams()) -> int:
        """Validate and queue a request; returns its id. Nothing already accepted is affected."""
        prompt = self.validate(prompt_ids, sampling)
        rid = self._next_id
        self._next_id += 1
        seq = Sequence(rid, prompt, sampling, min(len(prompt) + sampling.max_new_tokens, self.model.max_position))
        self.requests[rid] = seq
        self._unfinished.add(rid)
        min(self.controller.live_aws(), key=lambda a: a.scheduler.num_requests).scheduler.add(seq)
        self.metrics.submitted(rid)
        return rid

    def validate(self, prompt_ids, sampling) -> list[int]:
        """The prompt as token ids, or RequestError naming why the request can never be served."""
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
        blocks = self.aws[0].blocks
        need = blocks.pages_for(min(len(prompt) + sampling.max_new_tokens, self.model.max_position))
        if need > blocks.capacity:
            raise RequestError(f"request needs {need} KV pages, an attention worker has "
                               f"{blocks.capacity}; lower max_new_tokens or raise num_pages")
        return prompt

    @property
    def has_work(self) -> bool:
        return bool(self._unfinished)

    def cancel(self, request_id: int) -> bool:
        """Stop a request now (its client went away): pages and snapshots are released at once and
        it emits nothing more. False if it already finished or is unknown. Call between steps."""
        seq = self.requests.get(request_id)
        if seq is None or request_id not in self._unfinished:
            return False
        for aw in self.controller.live_aws():
            if aw.release(seq):
                break
        seq.state, seq.finish_reason = SeqState.FINISHED, "cancelled"
        self._unfinished.discard(request_id)
        return True

    @property
    def num_unfinished(self) -> int:
        return len(self._unfinished)

    # ---- failures ---------------------------------------------------------------------------
    def _failure(self, name: str, reason: str, source: str) -> None:
        rec = self.controller.failed(name, reason, source)
        if rec is not None and self.config.recovery == "restart":
            raise _Restart(rec)

    def _inject(self, layer: int | None) -> None:
        if not self.faults.pending:
            return
        prefill = {a.index for a in self.controller.live_aws() if any(s.num_pending > 1 for s in a.live_requests())}
        for spec in self.faults.due(self.step_index, layer, prefill_aws=prefill,
                                    recovering=self.controller.recovering):
            name = f"{spec.kind}{spec.index}"
            if self.controller.worker(name).handle.alive:
                self.controller.kill(name)

    def _guard(self, fn, *args):
        """Run an AW-side call; a WorkerFailed is reported and turns into _FAILED."""
        try:
            return fn(*args)
        except WorkerFailed as f:
            self._failure(f.worker, f.reason, "call")
            return _FAILED

    # ---- the data path --------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        t0, before = self.metrics.clock(), self._recompute_steps()
        try:
            for rec in self.controller.tick():
                if self.config.recovery == "restart":
                    raise _Restart(rec)
            self._inject(None)
            events = self._step()
        except _Restart as r:
            self.controller.restart([self.requests[i] for i in sorted(self._unfinished)], r.rec)
            events = []
        self.step_index += 1
        self.metrics.steps += 1
        if self._recompute_steps() != before:
            self.recompute_s += self.metrics.clock() - t0
        return events

    def idle(self) -> None:
        """Between requests: join finished replacements and probe silent workers, so a worker
        that dies while the service is idle is found and replaced before the next request."""
        for rec in self.controller.tick():
            if self.config.recovery == "restart":
                self.controller.restart([], rec)

    def forget(self, request_id: int) -> None:
        """Drop a finished request's record (a long-running server would otherwise grow)."""
        if request_id not in self._unfinished:
            self.requests.pop(request_id, None)
            self.metrics.requests.pop(request_id, None)

    def _recompute_steps(self) -> int:
        return sum(a.restored.recompute_steps for a in self.aws)

    def _step(self) -> list[TokenEvent]:
        active = {}
        for aw in self.controller.live_aws():
            if not aw.scheduler.num_requests:
                continue                    # nothing assigned: no call (heartbeats watch idle AWs)
            batch = self._guard(aw.start_step)
            if batch is not None and batch is not _FAILED:
                active[aw.index] = (aw, batch)
        for layer in range(self.model.n_layers):
            self._inject(layer)
            moe_layer = self.model.moe_index(layer)            # None: a dense layer, no experts
            outs, ids = {}, {}
            for i, (aw, batch) in list(active.items()):
                outs[i] = self._guard(aw.attend, layer)
                if outs[i] is not _FAILED and moe_layer is not None:
                    ids[i] = self._guard(np.asarray, outs[i].ids)
                if outs[i] is _FAILED or ids.get(i) is _FAILED:
                    del active[i]
            returned = ({i: [] for i in active} if moe_layer is None
                        else self._exchange(moe_layer, active, outs, ids))
            for i, (aw, _) in list(active.items()):
                if self._guard(aw.combine, outs[i], returned[i]) is _FAILED:
                    del active[i]
        events = []
        for aw, batch in active.values():
            emitted = self._guard(aw.finish_step, batch)
            if emitted is _FAILED:
                continue
            self.controller.health.heard_from(aw.handle.name)
            for seq, tok, new in emitted:
                if seq.state is SeqState.FINISHED:
                    aw.release(seq)
                    self._unfinished.discard(seq.request_id)
                if new:
                    self.metrics.token(seq.request_id)
                    events.append(TokenEvent(seq.request_id, tok, len(seq.output) - 1,
                                             seq.state is SeqState.FINISHED, seq.finish_reason))
        return events

    def _exchange(self, layer: int, active: dict, outs: dict, ids: dict) -> dict[int, list]:
        """Send every AW's rows of this MoE layer (expert-side index), run each EW once over the
        rows from all AWs, bring the outputs back; rows bound for an EW that fails are replanned
        and replayed."""
        todo = [(i, rows) for i, (aw, batch) in active.items()
                for rows in aw.refe.plan(layer, ids[i], batch.n_tokens)]
        returned: dict[int, list] = {i: [] for i in active}
        while todo:
            by_ew: dict[int, list] = {}
            for i, rows in todo:
                by_ew.setdefault(rows.ew, []).append((i, rows))
            todo = []
            for j, items in sorted(by_ew.items()):
                items = [(i, r) for i, r in items if i in active]
                if not items:
                    continue                                # every sender died this layer
                ew = self.ews[j]
                try:
                    msgs = [active[i][0].refe.send(outs[i].hn, r, ew.handle) for i, r in items]
                    ys = ew.run_layer(layer, msgs)
                    got = [(i, active[i][0].refe.receive(y, r, ew.handle)) for (i, r), y in zip(items, ys)]
                except WorkerFailed as f:
                    self._failure(f.worker, f.reason, "call")
                    if f.worker == ew.handle.name:          # replay these rows to the next replica
                        self.replayed_rows += sum(len(r.tok) for _, r in items)
                        todo += [(i, r2) for i, r in items for r2 in active[i][0].refe.replan(layer, r)]
                    else:                                   # an AW died: the others retry as they were
                        active.pop(int(f.worker[2:]), None)
                        todo += [(i, r) for i, r in items if i in active]
                    continue
                self.controller.health.heard_from(ew.handle.name)
                for i, out in got:
                    returned[i].append(out)
        return returned

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
        self.controller.shutdown()
