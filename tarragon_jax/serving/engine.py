"""Engine: request lifecycle and the disaggregated decode loop.

request -> engine (validate, assign to an AW) -> AW (attention + router) -> forwarding engine ->
EWs (one grouped FFN per layer over every AW's tokens) -> AW (combine, next layer, LM head) ->
token out. `step()` runs one iteration of that for every live AW and returns the tokens it
produced; `stream()` iterates them until nothing is left.

A step is dispatched whole before anything waits: every AW's layer program, every transfer to
and from the EWs and every EW program, for every layer, then the LM head and sampling; the host
waits once, for the sampled tokens, within the step deadline. Routing stays on the devices (the
AWs hold the routing table as arrays), so the host work of a layer is a fixed handful of calls.

Every cross-worker call can raise WorkerFailed, and the step's wait names the worker that missed
the deadline. The engine reports it to the controller and then carries on with what the
controller decided: the step is replayed from the affected layer (the AWs keep every layer's
inputs until the step commits; KV writes are idempotent) under the new routing table, a failed AW
drops out of the step (its requests were moved), and under `recovery=restart` (or
restart_regenerate) the whole cluster is rebuilt.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence as Seq

from tarragon_jax.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SamplingParams
from tarragon_jax.control.controller import Controller, RecoveryRecord
from tarragon_jax.control.faults import FaultInjector
from tarragon_jax.errors import RequestError, WorkerFailed
from tarragon_jax.metrics import Metrics
from tarragon_jax.model.weights import Weights
from tarragon_jax.workers.rpc import RemoteError, gather
from tarragon_jax.workers.sequence import Sequence, SeqState


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
    def __init__(self, model: ModelConfig, params: dict | Weights, engine: EngineConfig = EngineConfig(),
                 cache: CacheConfig = CacheConfig(), devices: list | None = None,
                 metrics: Metrics | None = None, faults: FaultInjector | None = None,
                 load_params: Callable[[], dict | Weights] | None = None):
        """params: a params pytree, or where each worker reads its own part (model/weights.py:
        a checkpoint's files, a dummy model); load_params: re-reads the weights from the
        checkpoint files (the restart baseline)."""
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

    def backends(self) -> str:
        """Which backend each stage runs, on which device: the launchers log it at startup."""
        aws = sorted({f"{aw.attention_backend} on {aw.device}" for aw in self.aws})
        ews = sorted({f"{ew.backend} on {ew.platform}" for ew in self.ews})
        return f"attention: {', '.join(aws)}; experts: {', '.join(ews)}"

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
    def _blame(self, f: WorkerFailed, active: dict | None = None, since: float | None = None,
               source: str = "call") -> None:
        """The one place a step's failure is handled, whichever transport found it: the named
        worker is reported to the controller (unless it was replaced after `since`, when the
        attempt that found it was launched: the failure was its predecessor's, already handled),
        and a failed AW leaves the step's `active` AWs (its requests were moved)."""
        if f.kind == "aw" and active is not None:
            active.pop(f.index, None)
        if since is not None and self.controller.worker(f.worker).joined_at > since:
            return
        rec = self.controller.failed(f.worker, f.reason, source)
        if rec is not None and self.config.restarts:
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
            self._blame(f)
            return _FAILED

    # ---- the data path --------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        t0, before = self.metrics.clock(), self._recompute_steps()
        try:
            for rec in self.controller.tick():
                if self.config.restarts:
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
            if self.config.restarts:
                self.controller.restart([], rec)

    def forget(self, request_id: int) -> None:
        """Drop a finished request's record (a long-running server would otherwise grow)."""
        if request_id not in self._unfinished:
            self.requests.pop(request_id, None)
            self.metrics.requests.pop(request_id, None)

    def _recompute_steps(self) -> int:
        return sum(a.restored.recompute_steps for a in self.aws)

    def _step(self) -> list[TokenEvent]:
        """Dispatch every AW and EW program of every layer, wait once for the sampled tokens,
        commit. A worker found dead while dispatching, or late at the wait, is recovered from by
        replaying the step from the affected layer with what the controller decided."""
        batches = self._start_steps()
        if not batches:
            return []
        if self.controller.transport is None:          # worker processes: each AW drives its layers
            return self._process_step(batches)
        T = self.controller.step_tokens(max(b.T for _, b in batches.values()))   # one compiled bucket for all
        active = {}
        for i, (aw, batch) in batches.items():
            batch = batch.padded_to(T)
            if self._guard(aw.begin, batch) is not _FAILED:
                active[i] = (aw, batch)
        first = 0
        while active:
            trail = self._layers(active, first)
            tokens = {}
            for i, (aw, _) in list(active.items()):
                toks = self._guard(aw.head)
                if toks is _FAILED:
                    del active[i]
                    continue
                tokens[i] = toks
                trail.append((aw.handle, self.model.n_layers, toks))
            try:
                host = self.controller.transport.wait(tokens, trail)
                break
            except WorkerFailed as f:                   # a worker missed the step deadline
                first = self._late(f, active, trail)
        else:
            return []
        for name in {handle.name for handle, _, _ in trail}:
            self.controller.health.heard_from(name)
        return self._commit(active, host)

    def _start_steps(self) -> dict:
        """{AW index: (AW, its step batch)} of every busy live AW (every start sent before any
        answer is awaited)."""
        batches = {}
        busy = [aw for aw in self.controller.live_aws() if aw.scheduler.num_requests]
        for aw in busy:                     # (an idle AW gets no call: heartbeats watch it)
            self._guard(aw.prefetch)
        for aw in busy:
            batch = self._guard(aw.start_step)
            if batch is not None and batch is not _FAILED:
                batches[aw.index] = (aw, batch)
        return batches

    def _process_step(self, batches: dict) -> list[TokenEvent]:
        """A step on worker processes: every AW is launched (it runs its layers, exchanging each
        with the EW processes itself), then the driver waits once for all of them. An AW that
        names a failed EW is re-launched from that layer once the controller re-planned (new
        routing table); an AW that died or missed the deadline drops out (its requests moved)."""
        T = self.controller.step_tokens(max(b.T for _, b in batches.values()))   # one compiled bucket for all
        active = {i: (aw, b.padded_to(T)) for i, (aw, b) in batches.items()}
        todo, host, tag = {i: 0 for i in active}, {}, self.step_index * 1000
        while todo:
            senders, launched = tuple(sorted(todo)), self.metrics.clock()
            for i in list(todo):
                if self._guard(active[i][0].launch, T, tag, todo[i], senders) is _FAILED:
                    del todo[i], active[i]
            answers = gather({i: (active[i][0].rpc, active[i][0].running) for i in todo},
                             self.config.transfer_deadline_s)
            todo, tag = {}, tag + 1
            for i, got in sorted(answers.items()):
                if isinstance(got, RemoteError):
                    raise got
                if isinstance(got, WorkerFailed):                    # the AW itself
                    self._blame(got, active, launched, "deadline" if "deadline" in got.reason else "call")
                elif got[0] == "failed":                             # an EW, at a layer
                    _, worker, layer, why = got
                    self._blame(WorkerFailed(worker, why, layer), active, launched)
                    todo[i] = layer
                    self.replayed_rows += active[i][1].n_tokens * self.model.top_k * self._moe_layers_from(layer)
                else:
                    host[i] = got[1]
                    self.controller.health.heard_from(active[i][0].handle.name)
        for name in self.controller.ew_addresses():
            self.controller.health.heard_from(f"ew{name}")
        return self._commit(active, host)

    def _commit(self, active: dict, host: dict) -> list[TokenEvent]:
        """Every AW's step stands: commit its tokens and emit the new ones."""
        events = []
        for aw, batch in active.values():
            emitted = self._guard(aw.commit, batch, host[aw.index])
            if emitted is _FAILED:
                continue
            for seq, tok, new in emitted:
                if seq.state is SeqState.FINISHED:
                    aw.release(seq)
                    self._unfinished.discard(seq.request_id)
                if new:
                    self.metrics.token(seq.request_id)
                    events.append(TokenEvent(seq.request_id, tok, len(seq.output) - 1,
                                             seq.state is SeqState.FINISHED, seq.finish_reason))
        return events

    def _late(self, f: WorkerFailed, active: dict, trail: list) -> int:
        """A worker missed the step deadline: fence it (the controller reacts as to any failure),
        let the aborted dispatch drain, and rewind the surviving AWs to the first layer the late
        worker took part in: none of its answers of this step is used, even those that came in.
        Returns that layer, where the replay starts."""
        self._blame(f, active)
        self.controller.transport.drain(trail)
        first = min([layer for h, layer, _ in trail if h.name == f.worker] + [self.model.n_layers - 1])
        self.replayed_rows += sum(b.n_tokens for _, b in active.values()) * self.model.top_k * self._moe_layers_from(first)
        for aw, _ in active.values():
            aw.rewind(first)
        return first

    def _moe_layers_from(self, first: int) -> int:
        """MoE layers a replay from `first` runs again."""
        return sum(self.model.moe_index(l) is not None for l in range(first, self.model.n_layers))

    def _layers(self, active: dict, first: int) -> list:
        """Dispatch layers first.. of every active AW (rewound to `first` by the caller on a replay);
        returns the dispatch trail (worker, layer, output) for the step's bounded wait."""
        trail: list = []
        layer = first
        while layer < self.model.n_layers and active:
            self._inject(layer)
            if self._layer(layer, active, trail):
                layer += 1
            else:                                       # a worker failed in this layer: replay it
                for aw, _ in active.values():
                    aw.rewind(layer)
        return trail

    def _layer(self, layer: int, active: dict, trail: list) -> bool:
        """One layer: every AW's program, then (MoE layer) every live EW once over the buffers of
        all AWs (with `pingpong`, once per AW, so an AW's next layer can start while the EWs work
        on another AW's rows), and the answers back. Nothing waits (a remote EW's results are
        gathered after every EW was called). False: a worker failed, the controller reacted,
        replay the layer."""
        sends = {}
        for i, (aw, _) in list(active.items()):
            send = self._guard(aw.attend, layer)
            if send is _FAILED:
                del active[i]
                continue
            sends[i] = send
            if send is not None:
                trail.append((aw.handle, layer, send))
        moe = self.model.moe_index(layer)
        if moe is None or not active:
            return True
        answers = {i: [None] * len(self.ews) for i in active}
        live = [ew for ew in self.ews if not self.controller.health.is_failed(ew.handle.name)]
        senders, send_all = list(active), self.controller.transport.send_all
        try:
            on_ew = dict(zip([(i, ew.index) for i in senders for ew in live],
                             send_all([t for i in senders for t in active[i][0].refe.outbound(sends[i], live)])))
            groups = [[i] for i in senders] if self.config.pingpong else [senders]
            calls = [(ew, g, ew.run_layer(moe, [on_ew[i, ew.index] for i in g])) for g in groups for ew in live]
            back = []
            for ew, g, call in calls:
                for i, y in zip(g, ew.results(call)):
                    trail.append((ew.handle, layer, y))
                    back.append((i, ew.index, active[i][0].refe.inbound(y, ew)))
            for (i, j, _), y in zip(back, send_all([t for _, _, t in back])):
                answers[i][j] = y
        except WorkerFailed as f:
            self._blame(f, active)
            if f.kind == "ew":
                self.replayed_rows += sum(b.n_tokens for _, b in active.values()) * self.model.top_k
            return False
        for i, (aw, _) in active.items():
            aw.receive(answers[i])
        return True

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
