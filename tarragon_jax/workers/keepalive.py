"""A worker process that is compiling tells whoever waits on it that it is alive.

Why: a step deadline must find a hung process (SIGSTOP) quickly, so it is short (1 s by default).
An XLA compile of a shape first met mid-run takes longer than that on a small host, and a
deadline that cannot tell "compiling" from "hung" declared healthy workers dead, then their
replacements too (each meets the same new shapes), in a loop. So the rule is: silence, not
slowness, is a failure, and a compile is the one kind of slowness a worker vouches for.

A thread of the process looks at the serving thread's stack every `interval_s`. While it is, at
two looks in a row within the same message (a normal step never spans two), inside JAX's
tracing, lowering or compiling (COMPILE_FRAMES), or asleep on its channels with work
outstanding (`outstanding`: an AW inside its step, waiting on EWs; an EW holding an AW's layer
buffer while it gathers the other senders'), the thread sends a `busy` frame to each channel
that may wait on the process (every channel its loop serves: the driver's, and on an EW every
AW's, since a buffer may sit unread behind the one being run). A waiter extends its bound by `grace_s` from each frame. A process stopped (SIGSTOP)
stops sending and is found `grace_s` after its last frame; one stuck anywhere else (a sleep, a
kernel that never ends) never vouches and is found at the deadline, as before. Waits on peers
are bounded by the peers' own deadlines; a compile longer than LIMIT_S stops being vouched for.

An AW that receives `busy` from an EW `relay`s it to the driver, which waits on the AW. Looking
costs a wake-up and one stack walk per interval while the process serves; after DORMANT_AFTER
quiet looks the thread sleeps until the serving loop's next wake-up (`woke`): an idle server's
keepalives do not run at all.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable

BUSY = "busy"          # the meta of a busy frame on a data channel; on a control channel the call id
BUSY_ID = -1           # ... is BUSY_ID: (BUSY_ID, True, grace_s)
LIMIT_S = 300.0        # a compile (or a relayed wait) longer than this stops being vouched for
DORMANT_AFTER = 16     # idle looks in a row (asleep in its loop, nothing in hand) after which the
                       # keepalive sleeps until the loop wakes for a message
COMPILE_FRAMES = frozenset({    # jax/_src functions that run only while a program is traced, lowered or compiled
    "trace_to_jaxpr", "_trace_for_jit", "lower_sharding_computation", "_cached_lowering_to_hlo",
    "compile_or_get_cached", "backend_compile_and_load", "backend_compile", "_cached_compilation"})
POLL_FRAMES = frozenset({"wait_readable", "spin"})     # channel.py: a serving loop asleep on its channels


def frame(role: str | None, grace_s: float) -> tuple:
    """The busy frame's meta for a channel of `role` ("control": an RPC answer's shape)."""
    return (BUSY_ID, True, grace_s) if role == "control" else (BUSY, grace_s)


def is_busy(meta) -> float | None:
    """The grace a data-channel message grants if it is a busy frame, else None."""
    if isinstance(meta, tuple) and len(meta) == 2 and meta[0] == BUSY:
        return float(meta[1])
    return None


def doing(thread: threading.Thread) -> str:
    """What `thread` is doing right now, by its stack: "compiling" (tracing, lowering or compiling
    a JAX program), "polling" (asleep in channel.wait_readable: waiting on peers, not stuck), or
    "other"."""
    f = sys._current_frames().get(thread.ident)
    top = f
    while f is not None:
        if f.f_code.co_name in COMPILE_FRAMES and "jax" in f.f_code.co_filename:
            return "compiling"
        f = f.f_back
    return "polling" if top is not None and top.f_code.co_name in POLL_FRAMES else "other"


class Keepalive:
    """The busy frames of one process: `waiting()` lists the channels waiting on it now,
    `serving` is the thread that runs its programs."""

    def __init__(self, waiting: Callable[[], list], interval_s: float, grace_s: float, serving: threading.Thread,
                 outstanding: Callable[[], bool] = lambda: False):
        self.waiting, self.interval_s, self.grace_s, self.serving = waiting, interval_s, grace_s, serving
        self.outstanding = outstanding
        self._relay_until = 0.0
        self._since: float | None = None             # vouching since (monotonic)
        self._closed = threading.Event()
        self._wake = threading.Event()
        self.dormant = False                         # asleep until the serving loop's next wake-up
        self.wakeups = 0                             # the serving loop's wake-ups (see `woke`)
        self.sent = 0                                # frames sent (tests, diagnostics)
        threading.Thread(target=self._loop, name="keepalive", daemon=True).start()

    def woke(self) -> None:
        """The serving loop woke for a message (called by it each time: an increment and a test).
        An idle process's keepalive sleeps (no wake-ups at all) until this."""
        self.wakeups += 1
        if self.dormant:
            self.dormant = False
            self._wake.set()

    def relay(self) -> None:
        """Something this process waits on is compiling (an EW said so): vouch for this one too."""
        self._relay_until = time.monotonic() + self.grace_s

    def close(self) -> None:
        self._closed.set()
        self._wake.set()

    def _look(self) -> str:
        """"busy" (vouch for the process), "idle" (asleep on its channels, nothing in hand) or
        "working" (running something that is not a compile: no vouching)."""
        if time.monotonic() < self._relay_until:
            return "busy"
        state = doing(self.serving) if self.serving.ident is not None else "other"
        if state == "compiling":
            return "busy"
        if state == "polling":
            return "busy" if self.outstanding() else "idle"
        return "working"

    def _loop(self) -> None:
        quiet, seen, armed = 0, self.wakeups, None
        while not self._closed.wait(self.interval_s):
            look = self._look()
            if look != "busy":
                self._since, armed, quiet = None, None, (quiet + 1 if look == "idle" else 0)
                if quiet >= DORMANT_AFTER:
                    self._doze(seen)
                    quiet = 0
                seen = self.wakeups
                continue
            quiet = 0
            if armed != self.wakeups and time.monotonic() >= self._relay_until:
                armed = self.wakeups           # busy since this look only: a normal step or layer ends
                continue                       # well within an interval, and sends nothing
            self._since = self._since or time.monotonic()
            if time.monotonic() - self._since >= LIMIT_S:
                continue
            for ch in self.waiting():
                try:
                    ch.send(frame(ch.peer.get("role"), self.grace_s), timeout=self.interval_s, lock_s=self.interval_s)
                    self.sent += 1
                except (ConnectionError, TimeoutError):
                    pass                          # that waiter is gone or stuck: its problem

    def _doze(self, seen: int) -> None:
        """Sleep until the serving loop wakes up, unless it already did since `seen` (the flag is
        set before the count is read, and the loop counts before it reads the flag: no wake-up
        is missed)."""
        self.dormant = True
        if self.wakeups != seen:
            self.dormant = False
            return
        self._wake.wait()
        self._wake.clear()
