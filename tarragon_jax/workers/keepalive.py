"""A worker process that is compiling tells whoever waits on it that it is alive.

Why: a step deadline must find a hung process (SIGSTOP) quickly, so it is short (1 s by default).
An XLA compile of a shape first met mid-run takes longer than that on a small host, and a
deadline that cannot tell "compiling" from "hung" declared healthy workers dead, then their
replacements too (each meets the same new shapes), in a loop. So the rule is: silence, not
slowness, is a failure, and a compile is the one kind of slowness a worker vouches for.

When JAX traces or lowers a program on the serving thread (the start of every compile: a cache
miss; a jax.monitoring event), the keepalive thread wakes and sends a `busy` frame on every
channel the process serves (a call, or an AW's layer buffer, may sit unread behind the one being
handled), then one every `interval_s` for as long as the serving thread's stack is inside JAX's
tracing, lowering or compiling (COMPILE_FRAMES); then it sleeps until the next compile. A waiter
extends its bound by `grace_s` from each frame. A process stopped (SIGSTOP) sends nothing and is
found `grace_s` after its last frame; one stuck anywhere else (a sleep, a kernel that never
ends) never vouches and is found at the deadline, as before; a compile longer than LIMIT_S stops
being vouched for. Between compiles the thread never runs: serving pays nothing for it.

An AW waiting on EWs vouches for itself (attention_process: its wait is sliced, and it relays
an EW's busy frames), bounded by its own wait on them.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable

BUSY = "busy"          # the meta of a busy frame on a data channel; on a control channel the call id
BUSY_ID = -1           # ... is BUSY_ID: (BUSY_ID, True, grace_s)
LIMIT_S = 300.0        # a compile longer than this stops being vouched for
COMPILE_FRAMES = frozenset({    # jax/_src functions that run only while a program is traced, lowered or compiled
    "trace_to_jaxpr", "_trace_for_jit", "lower_sharding_computation", "_cached_lowering_to_hlo",
    "compile_or_get_cached", "backend_compile_and_load", "backend_compile", "_cached_compilation"})


def frame(role: str | None, grace_s: float) -> tuple:
    """The busy frame's meta for a channel of `role` ("control": an RPC answer's shape)."""
    return (BUSY_ID, True, grace_s) if role == "control" else (BUSY, grace_s)


def is_busy(meta) -> float | None:
    """The grace a data-channel message grants if it is a busy frame, else None."""
    if isinstance(meta, tuple) and len(meta) == 2 and meta[0] == BUSY:
        return float(meta[1])
    return None


def vouch(channels: list, grace_s: float, timeout_s: float) -> int:
    """A busy frame on each channel (their peers wait on this process); how many went out."""
    sent = 0
    for ch in channels:
        try:
            ch.send(frame(ch.peer.get("role"), grace_s), timeout=timeout_s, lock_s=timeout_s)
            sent += 1
        except (ConnectionError, TimeoutError):
            pass                              # that waiter is gone or stuck: its problem
    return sent


def compiling(thread: threading.Thread) -> bool:
    """Is `thread` tracing, lowering or compiling a JAX program right now (by its stack)?"""
    f = sys._current_frames().get(thread.ident)
    while f is not None:
        if f.f_code.co_name in COMPILE_FRAMES and "jax" in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


class Keepalive:
    """The busy frames of one process while its serving thread compiles: `waiting()` lists the
    channels that may wait on it."""

    def __init__(self, waiting: Callable[[], list], interval_s: float, grace_s: float, serving: threading.Thread):
        self.waiting, self.interval_s, self.grace_s, self.serving = waiting, interval_s, grace_s, serving
        self._kicked = threading.Event()
        self.closed = False
        self.sent = 0                                # frames sent (tests, diagnostics)
        _listen(self)
        threading.Thread(target=self._loop, name="keepalive", daemon=True).start()

    def compile_began(self) -> None:
        """A jax.monitoring event on some thread: if it is the serving thread, wake up."""
        if threading.current_thread() is self.serving and not self.closed:
            self._kicked.set()

    def kick(self) -> None:
        """The serving thread is about to run a program at shapes it has not run before: vouch
        now, before the trace (its first event comes only at the trace's end)."""
        self._kicked.set()

    def close(self) -> None:
        self.closed = True
        self._kicked.set()

    def _loop(self) -> None:
        while True:
            self._kicked.wait()
            self._kicked.clear()
            since = time.monotonic()
            while not self.closed and time.monotonic() - since < LIMIT_S:
                self.sent += vouch(self.waiting(), self.grace_s, self.interval_s)
                time.sleep(self.interval_s)
                if not compiling(self.serving):
                    break
            if self.closed:
                return


def _listen(keepalive: Keepalive) -> None:
    """A jax.monitoring listener that tells `keepalive` a compile began: the end of a trace, or
    of a lowering (a program traced before, compiled anew). A worker process has one Keepalive;
    listeners cannot be removed, so a closed one stays registered, inert."""
    import jax
    from jax._src import dispatch
    starts = (dispatch.JAXPR_TRACE_EVENT, dispatch.JAXPR_TO_MLIR_MODULE_EVENT)
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: event in starts and keepalive.compile_began())
