"""One decode step of every live AW: start the batches, run the layers, commit.

The layers run on the in-process datapath (local_step.py: the engine dispatches everything,
then waits once) or, with worker processes, in the AW processes themselves (process_step.py).
Every cross-worker call can raise WorkerFailed, and the step's wait names the worker that missed
the deadline; the controller is told (failures.py) and the step carries on with what it decided:
replayed from the affected layer (the AWs keep every layer's inputs until the step commits; KV
writes are idempotent) under the new routing table, with a failed AW dropped (its requests were
moved); or, under recovery=restart, the step ends with a Restart for the engine to carry out.
"""
from __future__ import annotations

from typing import Callable

from tarragon_jax.config import EngineConfig, ModelConfig
from tarragon_jax.control.controller import Controller
from tarragon_jax.control.faults import FaultInjector
from tarragon_jax.serving.active_set import ActiveAWs
from tarragon_jax.serving.failures import FAILED, Restart, StepFailures
from tarragon_jax.serving.local_step import LocalStep
from tarragon_jax.serving.process_step import ProcessStep
from tarragon_jax.workers.interfaces import AttentionWorkerAPI
from tarragon_jax.workers.sequence import Sequence

# (AW, what its commit emitted: (request, token, new?) per row) -> the engine's events for them
Emit = Callable[[AttentionWorkerAPI, list[tuple[Sequence, int, bool]]], list]


class StepRunner:
    def __init__(self, controller: Controller, model: ModelConfig, config: EngineConfig, faults: FaultInjector):
        self.controller, self.model, self.config = controller, model, config
        self.failures = StepFailures(controller, faults, config.restarts)
        self.replayed_rows = 0          # (token, expert) rows the EWs computed again in replays

    def run(self, step: int, emit: Emit) -> list | Restart:
        """Step number `step`: the events `emit` makes of every AW's committed tokens, or Restart
        (the controller chose to rebuild the cluster; nothing after that point ran)."""
        restart = self.failures.tick()
        if restart is not None:
            return restart
        self.failures.inject(step, None)
        batches = self._start()
        if isinstance(batches, Restart):
            return batches
        if not batches:
            return []
        T = self.controller.step_tokens(max(b.T for _, b in batches.values()))   # one compiled bucket for all
        active = ActiveAWs({i: (aw, b.padded_to(T)) for i, (aw, b) in batches.items()}, self.failures)
        path = (ProcessStep(self.controller, self.model, self.config, active, T, step)
                if self.controller.transport is None else     # worker processes: each AW drives its layers
                LocalStep(self.controller, self.model, self.config, self.failures, active, step))
        host_R = path.run()
        self.replayed_rows += path.replayed_rows
        if isinstance(host_R, Restart):
            return host_R
        return self._commit(active, host_R, emit)

    def _start(self) -> dict[int, tuple[AttentionWorkerAPI, object]] | Restart:
        """{AW index: (AW, its step batch)} of every busy live AW (every start sent before any
        answer is awaited; an idle AW gets no call: heartbeats watch it)."""
        busy = [aw for aw in self.controller.live_aws() if aw.scheduler.num_requests]
        for aw in busy:
            prefetched = self.failures.call(aw.prefetch)
            if isinstance(prefetched, Restart):
                return prefetched
        batches = {}
        for aw in busy:
            batch = self.failures.call(aw.start_step)
            if isinstance(batch, Restart):
                return batch
            if batch is not None and batch is not FAILED:
                batches[aw.index] = (aw, batch)
        return batches

    def _commit(self, active: ActiveAWs, host_R: dict, emit: Emit) -> list | Restart:
        """Every active AW's step stands: commit its tokens, and emit what it produced."""
        events = []
        for i in active.indices():
            aw = active.aw(i)
            emitted = self.failures.call(aw.commit, active.batch(i), host_R[i])
            if isinstance(emitted, Restart):
                return emitted
            if emitted is not FAILED:
                events += emit(aw, emitted)
        return events
