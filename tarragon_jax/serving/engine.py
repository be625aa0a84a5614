"""Engine: the request lifecycle around the disaggregated decode step.

request -> engine (validate, assign to an AW) -> AW (attention + router) -> forwarding engine ->
EWs (one grouped FFN per layer over every AW's tokens) -> AW (combine, next layer, LM head) ->
token out. `step()` runs one iteration of that for every live AW (step.py: the datapath, and
what a worker failure during it does) and returns the tokens it produced; `stream()` iterates
them until nothing is left. Under recovery=restart (or restart_regenerate) a failure rebuilds
the whole cluster, and every unfinished request is served again from its prompt.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence as Seq

from tarragon_jax.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SamplingParams
from tarragon_jax.control.controller import Controller
from tarragon_jax.control.faults import FaultInjector
from tarragon_jax.errors import RequestError
from tarragon_jax.metrics import Metrics
from tarragon_jax.model.weights import Weights
from tarragon_jax.serving.failures import Restart
from tarragon_jax.serving.step import StepRunner
from tarragon_jax.workers.grammar import Vocabulary, check_grammar
from tarragon_jax.workers.interfaces import AttentionWorkerAPI
from tarragon_jax.workers.sequence import Sequence, SeqState, TokenLogprob


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request_id: int
    token: int
    index: int                # position in the request's output
    finished: bool
    finish_reason: str = ""
    logprob: TokenLogprob | None = None   # when the request asked (SamplingParams.logprobs)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None   # the first token's event, if asked: prompt tokens 1..


class Engine:
    def __init__(self, model: ModelConfig, params: dict | Weights, engine: EngineConfig = EngineConfig(),
                 cache: CacheConfig = CacheConfig(), devices: list | None = None,
                 metrics: Metrics | None = None, faults: FaultInjector | None = None,
                 load_params: Callable[[], dict | Weights] | None = None, vocab: Vocabulary | None = None):
        """params: a params pytree, or where each worker reads its own part (model/weights.py:
        a checkpoint's files, a dummy model); load_params: re-reads the weights from the
        checkpoint files (the restart baseline); vocab: the tokenizer that requests with a grammar
        (structured outputs) follow (None: they are refused)."""
        self.model, self.config, self.cache, self.vocab = model, engine, cache, vocab
        self.metrics = metrics or Metrics()
        self.faults = faults or FaultInjector([])
        for spec in self.faults.pending:
            count = engine.num_attention_workers if spec.kind == "aw" else engine.num_expert_workers
            if spec.index >= count:
                raise ConfigError(f"fault {spec} targets {spec.worker}, but there are only {count} "
                                  f"{'attention' if spec.kind == 'aw' else 'expert'} workers")
        self.controller = Controller(model, params, engine, cache, devices, self.metrics.clock, load_params, vocab)
        self.requests: dict[int, Sequence] = {}
        self._unfinished: set[int] = set()
        self.step_index = 0
        self.recompute_s = 0.0      # wall time of steps in which some AW recomputed moved requests
        self._next_id = 0
        self._steps = StepRunner(self.controller, model, engine, self.faults)

    @property
    def aws(self):
        return self.controller.aws

    @property
    def ews(self):
        return self.controller.ews

    @property
    def replayed_rows(self) -> int:
        """(token, expert) rows the EWs computed again because a failure replayed layers."""
        return self._steps.replayed_rows

    def backends(self) -> str:
        """Which backend each stage runs, on which device: the launchers log it at startup."""
        aws = sorted({f"{aw.attention_backend} on {aw.device}" for aw in self.aws})
        ews = sorted({f"{ew.backend} on {ew.platform}" for ew in self.ews})
        return f"attention: {', '.join(aws)}; experts: {', '.join(ews)}"

    # ---- requests -------------------------------------------------------------------------
    def submit(self, prompt_ids: Seq[int], sampling: SamplingParams = SamplingParams()) -> int:
        """Validate and queue a request; returns its id. Nothing already accepted is affected."""
        prompt = self.validate(prompt_ids, sampling)
        if sampling.grammar is not None:             # the grammar ends with EOS: it must stop the request
            missing = tuple(e for e in self.vocab.eos_ids if e not in sampling.stop_token_ids)
            sampling = dataclasses.replace(sampling, stop_token_ids=sampling.stop_token_ids + missing)
        rid = self._next_id
        self._next_id += 1
        seq = Sequence(rid, prompt, sampling, min(len(prompt) + sampling.max_new_tokens, self.model.max_position))
        self.requests[rid] = seq
        self._unfinished.add(rid)
        router = self.controller.router
        aw = router.pick(seq, self.controller.live_aws())
        seq.prefix_hint = router.elsewhere(seq, aw.index) if sampling.prompt_logprobs is None else 0
        aw.scheduler.add(seq)
        router.cached(aw.index, seq)
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
        bad = [t for t, _ in sampling.logit_bias if t >= self.model.vocab_size]
        if bad:
            raise RequestError(f"logit_bias token id {bad[0]} out of range [0, {self.model.vocab_size})")
        if sampling.grammar is not None:
            if self.vocab is None:
                raise RequestError("structured output (a grammar) needs the checkpoint's tokenizer (tokenizer.json)")
            if error := check_grammar(sampling.grammar):
                raise RequestError(f"grammar not valid: {error}")
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

    def reset_prefix_cache(self) -> int:
        """Every live AW forgets its cached prefixes (a benchmark pass starts cold); returns how
        many blocks were cached. Call between steps."""
        self.controller.router.forget()
        return sum(aw.reset_prefix_cache() for aw in self.controller.live_aws())

    @property
    def num_unfinished(self) -> int:
        return len(self._unfinished)

    def forget(self, request_id: int) -> None:
        """Drop a finished request's record (a long-running server would otherwise grow)."""
        if request_id not in self._unfinished:
            self.requests.pop(request_id, None)
            self.metrics.requests.pop(request_id, None)

    # ---- steps ----------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One decode step of every live AW; the tokens it produced."""
        t0, before = self.metrics.clock(), self._recompute_steps()
        outcome = self._steps.run(self.step_index, self._emit)
        if isinstance(outcome, Restart):
            self.controller.restart([self.requests[i] for i in sorted(self._unfinished)], outcome.record)
        events = [] if isinstance(outcome, Restart) else outcome
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

    def _recompute_steps(self) -> int:
        return sum(a.restored.recompute_steps for a in self.aws)

    def _emit(self, aw: AttentionWorkerAPI, emitted: list[tuple[Sequence, int, bool]]) -> list[TokenEvent]:
        """An AW committed its step: finished requests leave it (pages freed at once), new tokens
        become events."""
        events = []
        for seq, tok, new in emitted:
            if seq.state is SeqState.FINISHED:
                self.controller.router.cached(aw.index, seq)     # its answer's blocks stay cached there
                aw.release(seq)
                self._unfinished.discard(seq.request_id)
            if new:
                self.metrics.token(seq.request_id)
                first = len(seq.output) == 1 and seq.sampling.prompt_logprobs is not None
                events.append(TokenEvent(seq.request_id, tok, len(seq.output) - 1,
                                         seq.state is SeqState.FINISHED, seq.finish_reason,
                                         seq.logprobs[-1] if seq.logprobs else None,
                                         tuple(seq.prompt_logprobs) if first else None))
        return events

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
