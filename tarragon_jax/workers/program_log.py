"""The stage programs a worker has run, by argument shapes, so its replacement can compile the
same ones before it joins.

A replacement worker lives on a new mesh, where nothing is compiled yet; without this its first
steps would compile in the serving loop and stall every request. `replay` calls each logged
program once with zeros of the logged shapes on the new worker (with the persistent compilation
cache this is mostly a cache read).
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

import jax
import numpy as np


def _spec(leaf):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if isinstance(leaf, (jax.Array, np.ndarray)) else leaf


class ProgramLog:
    def __init__(self):
        self._seen: dict[tuple, tuple] = {}

    def call(self, fn: Callable, *args, **static):
        """fn(*args, **static), remembering fn and the shapes of its array arguments whenever
        the call compiled something (the jit cache grew), so the hot path costs two C++ calls."""
        before = fn._cache_size()
        out = fn(*args, **static)
        if fn._cache_size() != before:
            self._record(fn, args, static)
        return out

    def _record(self, fn: Callable, args: tuple, static: dict) -> None:
        leaves, tree = jax.tree.flatten(args)
        specs = tuple(_spec(l) for l in leaves)
        key = (fn, tree, tuple((s.shape, str(s.dtype)) if isinstance(s, jax.ShapeDtypeStruct) else s for s in specs),
               tuple(sorted(static.items())))
        self._seen.setdefault(key, (fn, tree, specs, static))

    def replay(self, handle) -> int:
        """Run every logged program on zeros placed on `handle`'s mesh; returns how many."""
        for fn, tree, specs, static in list(self._seen.values()):
            leaves = [handle.put(np.zeros(s.shape, s.dtype)) if isinstance(s, jax.ShapeDtypeStruct) else s for s in specs]
            jax.block_until_ready(fn(*jax.tree.unflatten(tree, leaves), **static))
        return len(self._seen)

    def extend(self, other: "ProgramLog") -> None:
        self._seen.update(other._seen)


class CompileLog:
    """The XLA compiles (or persistent-cache loads) this process ran outside `warming()` (startup,
    precompile, a replacement's replay): (wall-clock end time, on the main thread?) each. A worker
    process keeps one, so the failover bench counts the compiles inside a recovery in every
    process; the bench's own process keeps one too, where the main thread is the serving loop.
    One per process: jax.monitoring listeners are process-wide."""

    def __init__(self):
        from jax._src import dispatch
        self.events: list[tuple[float, bool]] = []
        self._warming = 0
        main = threading.main_thread()
        jax.monitoring.register_event_duration_secs_listener(
            lambda event, duration, **kw: event == dispatch.BACKEND_COMPILE_EVENT and not self._warming
            and self.events.append((time.time(), threading.current_thread() is main)))

    @property
    def times(self) -> list[float]:
        return [t for t, _ in self.events]

    @contextlib.contextmanager
    def warming(self) -> Iterator[None]:
        self._warming += 1
        try:
            yield
        finally:
            self._warming -= 1
