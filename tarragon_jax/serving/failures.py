"""A step's worker failures, handled in one place, and the faults a test or benchmark plants in it.

Whichever call or wait of a step finds a worker dead or late, the failure is reported here: the
controller reacts (a new routing table, moved requests, a replacement being built) and the
caller replays or drops the AW. Under recovery=restart the controller's answer is to rebuild the
cluster instead; that answer comes back as a value, `Restart`, which every step function returns
at once, so nothing more of the step runs on a cluster about to be torn down.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from tarragon_jax.control.controller import Controller, RecoveryRecord
from tarragon_jax.control.faults import FaultInjector
from tarragon_jax.errors import WorkerFailed


@dataclasses.dataclass(frozen=True)
class Restart:
    """The controller chose to rebuild the cluster for this failure: the step ends, emitting nothing."""
    record: RecoveryRecord


class _Failed:
    def __repr__(self) -> str:
        return "FAILED"


FAILED = _Failed()      # what `StepFailures.call` returns when the call raised WorkerFailed (reported)


class StepFailures:
    def __init__(self, controller: Controller, faults: FaultInjector, restarts: bool):
        self.controller, self.faults, self.restarts = controller, faults, restarts

    def tick(self) -> Restart | None:
        """At the step boundary: replacements join, silent workers are probed (controller.tick)."""
        for rec in self.controller.tick():
            if self.restarts:
                return Restart(rec)
        return None

    def report(self, f: WorkerFailed, since: float | None = None, source: str = "call") -> Restart | None:
        """The named worker failed: tell the controller, unless it was replaced after `since` (when
        the attempt that found it was launched: the failure was its predecessor's, handled)."""
        if since is not None and self.controller.worker(f.worker).joined_at > since:
            return None
        rec = self.controller.failed(f.worker, f.reason, source)
        return Restart(rec) if rec is not None and self.restarts else None

    def call(self, fn: Callable, *args):
        """fn(*args); if it raises WorkerFailed, the failure is reported and the result is FAILED,
        or a Restart."""
        try:
            return fn(*args)
        except WorkerFailed as f:
            return self.report(f) or FAILED

    def inject(self, step: int, layer: int | None) -> None:
        """Kill the workers whose planned fault is due at this point of the step (layer None: its
        start). Nothing is reported: the step's own calls must find them."""
        if not self.faults.pending:
            return
        prefill = {a.index for a in self.controller.live_aws() if any(s.num_pending > 1 for s in a.live_requests())}
        for spec in self.faults.due(step, layer, prefill_aws=prefill, recovering=self.controller.recovering):
            if self.controller.worker(spec.worker).handle.alive:
                self.controller.kill(spec.worker)
