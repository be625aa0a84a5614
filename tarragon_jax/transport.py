"""Explicit transfers between worker meshes, each with a deadline.

`send` places an array on the destination worker's mesh; `wait` blocks until arrays are ready
but never longer than the deadline (host arrays from a remote EW, whose own call already had
the deadline, are ready). A dead destination/source or a missed deadline raises
WorkerFailed naming the worker, which is what the forwarding engine and controller act on.
Each source worker has its own waiter thread, so a hung worker only ever blocks waits on itself.
"""
from __future__ import annotations

import concurrent.futures

import jax

from tarragon_jax.errors import WorkerFailed
from tarragon_jax.runtime import WorkerHandle


class Transport:
    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self._waiters: dict[int, concurrent.futures.ThreadPoolExecutor] = {}

    def send(self, tree, dst: WorkerHandle):
        if not dst.alive:
            raise WorkerFailed(dst.name, "send to a dead worker")
        return dst.put(tree)

    def wait(self, tree, src: WorkerHandle):
        """Bounded wait for results produced by `src`."""
        if not src.alive:
            raise WorkerFailed(src.name, "worker is dead")
        if all(not isinstance(x, jax.Array) or x.is_ready() for x in jax.tree.leaves(tree)):
            return tree
        pool = self._waiters.get(id(src))
        if pool is None:
            pool = self._waiters[id(src)] = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"wait-{src.name}")
        try:
            return pool.submit(jax.block_until_ready, tree).result(timeout=self.deadline_s)
        except concurrent.futures.TimeoutError:
            raise WorkerFailed(src.name, f"no result within the {self.deadline_s:.3f} s deadline") from None

    def close(self) -> None:
        for pool in self._waiters.values():
            pool.shutdown(wait=False, cancel_futures=True)
