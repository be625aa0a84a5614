"""The AWs taking part in a step, each with its batch padded to the step's token bucket.

An AW leaves the set when it fails: the controller moved its requests to the survivors, who run
them from the next step. A replay rewinds every member to the layer it starts from (each AW
keeps every layer's inputs until the step commits). Both happen here and nowhere else.
"""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from tarragon_jax.config import ModelConfig
from tarragon_jax.errors import WorkerFailed
from tarragon_jax.serving.failures import FAILED, Restart, StepFailures
from tarragon_jax.workers.interfaces import AttentionWorkerAPI

R = TypeVar("R")


class ActiveAWs:
    def __init__(self, members: dict[int, tuple[AttentionWorkerAPI, object]], failures: StepFailures):
        """members: {AW index: (AW, its padded step batch)}, in the order the step calls them."""
        self._members, self._failures = dict(members), failures

    def __bool__(self) -> bool:
        return bool(self._members)

    def indices(self) -> list[int]:
        return list(self._members)

    def aw(self, i: int) -> AttentionWorkerAPI:
        return self._members[i][0]

    def batch(self, i: int):
        return self._members[i][1]

    @property
    def n_tokens(self) -> int:
        """Real tokens of the step over every member (padding excluded)."""
        return sum(b.n_tokens for _, b in self._members.values())

    def each(self, fn: Callable[[AttentionWorkerAPI, object], R],
             among: Iterable[int] | None = None) -> dict[int, R] | Restart:
        """{index: fn(AW, batch)} over the members (those `among` only); a member whose call
        raises WorkerFailed leaves the set (failure reported). A Restart ends it at once."""
        out = {}
        for i in list(self._members if among is None else among):
            aw, batch = self._members[i]
            got = self._failures.call(fn, aw, batch)
            if isinstance(got, Restart):
                return got
            if got is FAILED:
                del self._members[i]
            else:
                out[i] = got
        return out

    def failed(self, f: WorkerFailed, since: float | None = None, source: str = "call") -> Restart | None:
        """A worker failed during the step: a failed AW leaves the set (even when the failure was
        its predecessor's, see StepFailures.report), and the failure is reported."""
        if f.id.kind == "aw":
            self._members.pop(f.id.index, None)
        return self._failures.report(f, since, source)

    def rewind(self, layer: int) -> None:
        """Every member back to the inputs of `layer`, to replay it and every later one."""
        for aw, _ in self._members.values():
            aw.rewind(layer)


def replay_rows(model: ModelConfig, n_tokens: int, first: int, stop: int | None = None) -> int:
    """(token, expert) rows the EWs compute again when n_tokens tokens replay layers first..stop-1
    (default: through the last layer)."""
    moe_layers = sum(model.moe_index(l) is not None for l in range(first, model.n_layers if stop is None else stop))
    return n_tokens * model.top_k * moe_layers
