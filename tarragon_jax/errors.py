"""Typed errors shared across workers, engine and launchers, and the worker identity they name."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WorkerId:
    """Which worker: an attention ("aw") or expert ("ew") worker by index, or a singleton service
    ("store", no index). The runtimes make them; `name` is how health events, records, logs and
    the /fail endpoint spell one ("aw0", "ew3", "store")."""
    kind: str
    index: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.index is None else f"{self.kind}{self.index}"

    @classmethod
    def parse(cls, name: str) -> WorkerId:
        """The id a name spells: for a name that arrived as text (a process's channel peer)."""
        kind, index = name[:2], name[2:]
        return cls(kind, int(index)) if kind in ("aw", "ew") and index.isdigit() else cls(name)

    def __str__(self) -> str:
        return self.name


class WorkerFailed(RuntimeError):
    """A cross-worker call failed or missed its deadline; names the worker (`id`, and its name
    as `worker`, the key the controller and health monitor use)."""

    def __init__(self, worker: WorkerId | str, reason: str, layer: int | None = None):
        self.id = worker if isinstance(worker, WorkerId) else WorkerId.parse(worker)
        super().__init__(f"worker {self.id.name} failed: {reason}")
        self.reason = reason
        self.layer = layer            # a step deadline miss: the layer of the late output

    @property
    def worker(self) -> str:
        return self.id.name


class RequestError(ValueError):
    """A request was rejected at submission (bad ids, prompt too long, cannot ever fit)."""
