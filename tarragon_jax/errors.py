"""Typed errors shared across workers, engine and launchers."""
from __future__ import annotations


def worker_kind(name: str) -> tuple[str, int | None]:
    """("aw", 3) for "aw3", ("ew", 0) for "ew0", (name, None) for "store": what a worker's name
    says of it. Names are made in one place (the runtimes' `workers`) and read only here."""
    kind, index = name[:2], name[2:]
    return (kind, int(index)) if kind in ("aw", "ew") and index.isdigit() else (name, None)


class WorkerFailed(RuntimeError):
    """A cross-worker call failed or missed its deadline; names the worker."""

    def __init__(self, worker: str, reason: str, layer: int | None = None):
        super().__init__(f"worker {worker} failed: {reason}")
        self.worker, self.reason = worker, reason
        self.layer = layer            # a step deadline miss: the layer of the late output
        self.kind, self.index = worker_kind(worker)


class RequestError(ValueError):
    """A request was rejected at submission (bad ids, prompt too long, cannot ever fit)."""
