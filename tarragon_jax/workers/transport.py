"""Explicit transfers between worker meshes, and the one bounded wait of a step.

`send_all` places arrays on destination workers' meshes (or hands them to their processes) without
waiting for it to be computed: JAX orders the copy after its producer, so a whole step is
dispatched before anything is waited on. `wait` is that wait: it blocks until the step's sampled
tokens are on the host, but never longer than the deadline; on a miss it names the worker to
blame, the first one in dispatch order whose output is still not ready (everything it consumed
was), and raises WorkerFailed for it. A dead source or destination fails at once. Counters of
blocking waits and device-to-host pulls let a test pin the shape of the datapath.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any

import jax
import numpy as np

from tarragon_jax.errors import WorkerFailed, WorkerId
from tarragon_jax.workers.runtime import WorkerHandle, copy_arrays

DRAIN_S = 60.0     # how long a replay waits for a late worker's dispatched work to finish


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """One output a step dispatched, recorded in dispatch order (the step's trail): when the
    deadline passes, the first one not ready names the late worker and the layer it was at."""
    worker: WorkerId
    layer: int                # n_layers: the LM head and sampling
    output: Any               # device arrays (a pytree), not waited on


def check_live(items: list[tuple]) -> None:
    """WorkerFailed for the first dead source or destination of (value, destination, source)."""
    for _, dst, src in items:
        if not src.alive:
            raise WorkerFailed(src.id, "worker is dead")
        if not dst.alive:
            raise WorkerFailed(dst.id, "send to a dead worker")


class Transport:
    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.waits = 0            # blocking waits (one per step, plus failure handling)
        self.pulls = 0            # device -> host copies of step results
        # a hung worker keeps its waiter thread blocked: a few spare threads keep later steps going
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="step-wait")

    def send_all(self, items: list[tuple[jax.Array, object, object]]) -> list:
        """Many transfers at once: (array, destination, source) -> the array on the destination.
        Copies between local meshes go out in one call (runtime.copy_arrays); a host array goes
        through dst.put. Raises WorkerFailed for the first dead source or destination."""
        check_live(items)
        local = [i for i, (a, dst, _) in enumerate(items) if isinstance(dst, WorkerHandle) and isinstance(a, jax.Array)]
        out = [None] * len(items)
        for i, y in zip(local, copy_arrays([items[i][0] for i in local], [items[i][1] for i in local])):
            out[i] = y
        for i, (a, dst, _) in enumerate(items):
            if out[i] is None:
                out[i] = dst.put(a)
        return out

    def wait(self, results: dict, trail: list[Dispatch]) -> dict:
        """{key: device arrays (a pytree)} -> {key: numpy arrays}, within the deadline. trail: the step's
        dispatches in order, to find who is late, and where, when the deadline passes."""
        self.waits += 1
        try:
            self._pool.submit(jax.block_until_ready, results).result(timeout=self.deadline_s)
        except concurrent.futures.TimeoutError:
            late = next((d for d in trail
                         if not all(a.is_ready() for a in jax.tree.leaves(d.output) if isinstance(a, jax.Array))),
                        None)
            if late is not None:      # else everything arrived just after the deadline: take it
                raise WorkerFailed(late.worker, f"no result within the {self.deadline_s:.3f} s deadline",
                                   layer=late.layer) from None
        self.pulls += len(results)
        with jax.transfer_guard_device_to_host("allow"):     # the step's one sanctioned pull
            return {k: jax.tree.map(np.asarray, v) for k, v in results.items()}

    def drain(self, trail: list[Dispatch], bound_s: float = DRAIN_S) -> bool:
        """After a deadline miss: let the aborted dispatch finish (bounded) before its replay.
        A device runs its programs in order, so a survivor's queue may hold work that consumes
        the late worker's output; the replay could not start before it anyway, and waiting here
        keeps that wait from being blamed on the survivor. False: not drained within bound_s."""
        self.waits += 1
        outs = [d.output for d in trail]
        try:
            self._pool.submit(jax.block_until_ready, outs).result(timeout=bound_s)
            return True
        except concurrent.futures.TimeoutError:
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
