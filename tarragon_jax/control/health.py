"""Failure detector: who is dead, since when, and how it was noticed. No recovery policy here.

Detection has two sources, as in the paper (the paper, arXiv 2601.01310, section 2.2): a failed or timed-out call on
the data path ("call", "deadline"), and an explicit probe ("heartbeat") of workers the data path
has not heard from recently (successful calls are implicit heartbeats).
Fault injection reports the ground-truth kill time too, so the benchmark can measure detection
latency. The clock is injected so tests run on a fake one.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, NamedTuple


class HealthEvent(NamedTuple):
    t: float           # clock time
    worker: str        # "aw0", "ew3"
    kind: str          # "killed" | "failed" | "revived"
    detail: str


class HealthMonitor:
    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._failed: set[str] = set()
        self._killed_at: dict[str, float] = {}
        self._injected: set[str] = set()        # killed here, not yet replaced (detected or not)
        self._detected_at: dict[str, float] = {}
        self._heard: dict[str, float] = {}
        self.events: list[HealthEvent] = []

    def heard_from(self, worker: str) -> None:
        """A data-path call to `worker` succeeded: an implicit heartbeat (no probe needed)."""
        self._heard[worker] = self._clock()

    def silent_for(self, worker: str) -> float:
        """Seconds since the last implicit heartbeat (inf if never heard from)."""
        return self._clock() - self._heard.get(worker, float("-inf"))

    def killed(self, worker: str, detail: str = "injected") -> None:
        """Ground truth: a fault was injected into `worker` now (starts a new incident)."""
        t = self._clock()
        self._killed_at[worker] = t
        self._injected.add(worker)
        if worker not in self._failed:
            self._detected_at.pop(worker, None)
        self.events.append(HealthEvent(t, worker, "killed", detail))

    def report_failure(self, worker: str, reason: str, source: str) -> bool:
        """Record that `worker` was seen failing; True only for a new detection (the first report
        of an incident), so the caller starts recovery once."""
        if worker in self._failed:
            return False
        t = self._clock()
        self._failed.add(worker)
        self._detected_at[worker] = t
        self.events.append(HealthEvent(t, worker, "failed", f"{source}: {reason}"))
        return True

    def heartbeat(self, probes: Mapping[str, Callable[[], bool]]) -> list[str]:
        """Probe every worker not yet failed; a probe that returns False or raises is a failure.
        Returns the newly failed names in probe order."""
        newly = []
        for worker, probe in probes.items():
            if worker in self._failed:
                continue
            try:
                ok, reason = bool(probe()), "probe returned False"
            except Exception as e:  # a dead worker's probe may raise anything
                ok, reason = False, f"probe raised {type(e).__name__}: {e}"
            if ok:
                self._heard[worker] = self._clock()       # an answered probe is a heartbeat too
            elif self.report_failure(worker, reason, "heartbeat"):
                newly.append(worker)
        return newly

    def revive(self, worker: str, detail: str = "replacement joined") -> None:
        """A worker with this name is serving again (a replacement); keeps the last incident's times."""
        self._failed.discard(worker)
        self._injected.discard(worker)
        self.events.append(HealthEvent(self._clock(), worker, "revived", detail))

    def is_failed(self, worker: str) -> bool:
        return worker in self._failed

    def is_down(self, worker: str) -> bool:
        """Failed, or killed by fault injection and not detected yet (a process that was sent
        SIGKILL still looks alive until a call or a heartbeat finds it)."""
        return worker in self._failed or worker in self._injected

    @property
    def failed(self) -> frozenset[str]:
        return frozenset(self._failed)

    def detection_latency_s(self, worker: str) -> float | None:
        """Detection time minus kill time of the worker's latest incident; None until both exist."""
        if worker not in self._killed_at or worker not in self._detected_at:
            return None
        return self._detected_at[worker] - self._killed_at[worker]
