"""The stage programs a worker has run, by argument shapes, so its replacement can compile the
same ones before it joins.

A replacement worker lives on a new mesh, where nothing is compiled yet; without this its first
steps would compile in the serving loop and stall every request. `replay` calls each logged
program once with zeros of the logged shapes on the new worker (with the persistent compilation
cache this is mostly a cache read).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import sys
import threading
import time
from typing import Callable, Iterator

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class _HostArray:
    """A numpy argument (ids passed from the host): replayed as numpy, since a device array of
    the same shape is another signature to jit (it would compile again while serving)."""
    shape: tuple
    dtype: np.dtype


def _spec(leaf):
    if isinstance(leaf, np.ndarray):
        return _HostArray(leaf.shape, leaf.dtype)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if isinstance(leaf, jax.Array) else leaf


def _zeros(spec, handle):
    if isinstance(spec, _HostArray):
        return np.zeros(spec.shape, spec.dtype)
    return handle.put(np.zeros(spec.shape, spec.dtype)) if isinstance(spec, jax.ShapeDtypeStruct) else spec


class _Nesting:
    """True while any `with nesting():` is open (they may nest, and come from several callers)."""

    def __init__(self):
        self._depth = 0

    def __bool__(self) -> bool:
        return self._depth > 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1


class ProgramLog:
    def __init__(self, owner: str = ""):
        self.owner = owner                  # the worker whose programs these are (for CompileEvents)
        self._seen: dict[tuple, tuple] = {}
        self.recording = _Nesting()         # `with log.recording():` logs every call made meanwhile,
                                            # compiled now or not (a worker's precompile)

    def call(self, fn: Callable, *args, **static):
        """fn(*args, **static), remembering fn and the shapes of its array arguments inside
        `recording()` (precompile), and whenever the call compiled something (the jit cache grew),
        so the hot path costs two C++ calls. Why both: a worker whose device ran the same programs
        before (an earlier engine in this process) compiles nothing, and its log would stay empty."""
        before = fn._cache_size()
        out = fn(*args, **static)
        if self.recording or fn._cache_size() != before:
            self._record(fn, args, static)
        return out

    def _record(self, fn: Callable, args: tuple, static: dict) -> None:
        leaves, tree = jax.tree.flatten(args)
        specs = tuple(_spec(l) for l in leaves)
        key = (fn, tree, tuple((type(s).__name__, s.shape, str(s.dtype)) if isinstance(s, (jax.ShapeDtypeStruct, _HostArray))
                               else s for s in specs), tuple(sorted(static.items())))
        self._seen.setdefault(key, (fn, tree, specs, static))

    def replay(self, handle) -> int:
        """Run every logged program on zeros placed on `handle`'s mesh; returns how many."""
        for fn, tree, specs, static in list(self._seen.values()):
            leaves = [_zeros(s, handle) for s in specs]
            jax.block_until_ready(fn(*jax.tree.unflatten(tree, leaves), **static))
        return len(self._seen)

    def extend(self, other: "ProgramLog") -> None:
        self._seen.update(other._seen)


@dataclasses.dataclass(frozen=True)
class CompileEvent:
    """One XLA compile (or persistent-cache load) outside warm-up: for the failover bench's list of
    every compile during a run, and for finding which shapes serving met first mid-run."""
    t: float             # wall clock when it ended
    program: str         # e.g. "attention_layer"
    seconds: float       # the backend compile (or cache load) itself
    thread: str          # the thread that waited for it
    serving: bool        # that thread serves steps (a request waited on this compile)
    shapes: str = ""     # the program's array arguments, when it ran through a ProgramLog
    worker: str = ""     # whose program (its ProgramLog's owner)

    def __str__(self) -> str:
        return f"{self.worker} {self.program}({self.shapes}) {self.seconds * 1e3:.0f} ms on {self.thread}"


class CompileLog:
    """The XLA compiles (or persistent-cache loads) this process ran outside `warming()` (startup,
    precompile, a replacement's replay), as CompileEvents. A worker process keeps one, so the
    failover bench lists the compiles of a run in every process; the bench's own process keeps
    one too, where `serving_thread` (the main one by default) runs the engine. One per process:
    jax.monitoring listeners are process-wide and cannot be removed."""

    def __init__(self):
        from jax._src import dispatch
        self.events: list[CompileEvent] = []
        self.warming = _Nesting()           # `with log.warming():` startup, precompile, a replay: not logged
        self.serving_thread = threading.main_thread()   # a worker process sets its serving loop's

        def heard(event: str, duration: float, fun_name: str = "", **_) -> None:
            if event == dispatch.BACKEND_COMPILE_EVENT and not self.warming:
                now = threading.current_thread()
                self.events.append(CompileEvent(time.time(), fun_name.removeprefix("jit(").rstrip(")"), duration,
                                                now.name, now is self.serving_thread, *_calling_site()))
        jax.monitoring.register_event_duration_secs_listener(heard)



def _calling_site() -> tuple[str, str]:
    """(array shapes, worker) of the ProgramLog.call this compile happens under, if any: found by
    walking up the stack, which costs ~10 us against a compile's 10-500 ms (it runs only on a
    compile). Runs of one shape are written once with a count: "float32[128, 128]x12"."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not ProgramLog.call.__code__:
        frame = frame.f_back
    if frame is None:
        return "", ""
    shapes = [f"{np.dtype(a.dtype).name}{list(a.shape)}" for a in jax.tree.leaves(frame.f_locals.get("args", ()))
              if isinstance(a, (jax.Array, np.ndarray))]
    runs = [(k, len(list(g))) for k, g in itertools.groupby(shapes)]
    return " ".join(k if n == 1 else f"{k}x{n}" for k, n in runs), frame.f_locals["self"].owner
