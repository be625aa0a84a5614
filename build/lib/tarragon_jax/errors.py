"""Typed errors shared across workers, engine and launchers."""
from __future__ import annotations


class WorkerFailed(RuntimeError):
    """A cross-worker call failed or missed its deadline; names the worker."""

    def __init__(self, worker: str, reason: str, layer: int | None = None):
        super().__init__(f"worker {worker} failed: {reason}")
        self.worker, self.reason = worker, reason
        self.layer = layer            # a step deadline miss: the layer of the late output


class RequestError(ValueError):
    """A request was rejected at submission (bad ids, prompt too long, cannot ever fit)."""
