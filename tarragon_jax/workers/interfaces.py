"""The calls the engine and the controller make on a worker, one Protocol per kind.

Each kind has two implementations: the in-process worker (attention_worker.AttentionWorker,
expert_worker.ExpertWorker) and the driver's proxy of a worker process
(attention_process.RemoteAttentionWorker, expert_process.RemoteExpertWorker). What the engine and
controller may rely on is written down here, and tests/test_layout.py checks that all four
implement it with the same parameters, so neither side drifts. A step runs differently on the
two (the in-process AW's layers are dispatched by the engine, a process AW runs its own:
`begin`/`attend`/`receive`/`head` against `launch`), and those calls are not part of the
common surface.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from tarragon_jax.workers.sequence import Sequence


@runtime_checkable
class Worker(Protocol):
    """What every worker offers the controller: identity and liveness (`handle`: id and name, alive,
    check, probe, identity), the programs its replacement must compile, and a fail-stop kill."""
    index: int
    joined_at: float             # when it joined as a replacement (0: built at startup)

    def precompile(self, grid) -> None: ...
    def kill(self) -> None: ...


@runtime_checkable
class AttentionWorkerAPI(Worker, Protocol):
    """An attention worker: owns its requests' KV pages (`scheduler`, `blocks`), its forwarding
    engine (`refe`: routing-table versions), what its last restore cost (`restored`) and its
    prefix cache's counts (`prefix_stats`)."""

    def prefetch(self) -> None: ...
    def start_step(self): ...
    def commit(self, batch, out: dict) -> list[tuple[Sequence, int, bool]]: ...
    def release(self, seq: Sequence) -> bool: ...
    def live_requests(self) -> list[Sequence]: ...
    def reset_prefix_cache(self) -> int: ...


@runtime_checkable
class ExpertWorkerAPI(Worker, Protocol):
    """An expert worker: the experts it hosts per MoE layer (`slots`, primaries first), loads of
    orphaned experts after a failure, and the rows it served (load accounting)."""

    def load_experts(self, layer: int, ids: list[int]) -> None: ...
    def replace_slots(self, layer: int, experts: dict[int, int]) -> None: ...
    def slot_rows(self) -> list[np.ndarray]: ...
    def rows_served(self) -> int: ...
