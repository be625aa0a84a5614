"""The one thread that drives the engine, and how the HTTP side talks to it.

The engine is single-threaded by design (stage programs, schedulers, the controller), so an
`EngineLoop` thread is its only caller: the front end hands it closures (`call`, or `call_async`
from an asyncio handler) and gets each request's TokenEvents through a sink callback, which an
async server turns into an asyncio queue with `call_soon_threadsafe`. Closures run between
steps, so a check-then-act closure (admission, /fail) is atomic with respect to the engine, and a
closure that does not come back in time (`call_async`'s timeout) means a step is stuck.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from typing import Callable

from tarragon_jax.config import SamplingParams
from tarragon_jax.serving.engine import Engine
from tarragon_jax.serving.prometheus_metrics import ServingMetrics

# Gets each TokenEvent of a request, or the engine's error; returns False once nobody reads (the
# client left), and the loop then cancels the request: even one whose handler never learnt its id.
Sink = Callable[[object], bool]


class EngineStopped(RuntimeError):
    """The engine loop died (an engine error, or no healthy worker left); the server answers 503."""


class Refused(RuntimeError):
    """The server refuses the request with this HTTP status: overloaded (429), draining (503), too
    large (413), too slow (408), fault injection off (403)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class EngineLoop(threading.Thread):
    """Steps the engine while it has work, and ticks its controller while idle (heartbeats,
    replacement joins); runs submitted closures between steps, and updates the serving metrics
    after every step (the HTTP front ends on this loop share them)."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.05, metrics: ServingMetrics | None = None):
        """idle_wait_s: between ticks while idle (a request wakes the loop at once; a tick does the
        heartbeats, which run at most every heartbeat_interval_s, 50 ms by default, anyway)."""
        super().__init__(name="engine-loop", daemon=True)
        self.engine, self.idle_wait_s = engine, idle_wait_s
        self.metrics = metrics or ServingMetrics()
        self._inbox: queue.Queue = queue.Queue()
        self._sinks: dict[int, Sink] = {}
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    # ---- the front end's side -----------------------------------------------------------------
    def _put(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        if self.error is not None or not self.is_alive():
            raise EngineStopped(f"engine loop stopped: {self.error!r}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, fut))
        return fut

    def call(self, fn: Callable[[Engine], object]):
        """Run fn(engine) on the engine thread; its result, or its exception (EngineStopped if the
        loop dies meanwhile)."""
        fut = self._put(fn)
        while True:                       # never wait on a loop that died after the put
            try:
                return fut.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if self.error is not None or not self.is_alive():
                    raise EngineStopped(f"engine loop stopped: {self.error!r}") from None

    def post(self, fn: Callable[[Engine], object]) -> None:
        """Run fn(engine) on the engine thread, without waiting (e.g. cancel from a closing stream)."""
        self._put(fn)

    async def call_async(self, fn: Callable[[Engine], object], timeout_s: float | None = None):
        """`call` for an asyncio handler: awaits without holding a thread."""
        fut = asyncio.wrap_future(self._put(fn))
        waited = 0.0
        while True:
            step = 0.5 if timeout_s is None else min(0.5, timeout_s - waited)
            try:
                return await asyncio.wait_for(asyncio.shield(fut), step)
            except asyncio.TimeoutError:
                waited += step
                if self.error is not None or not self.is_alive():
                    raise EngineStopped(f"engine loop stopped: {self.error!r}") from None
                if timeout_s is not None and waited >= timeout_s:
                    raise TimeoutError(f"the engine loop did not answer within {timeout_s} s") from None

    def accept(self, prompt_ids, sampling: SamplingParams, sink: Sink, max_unfinished: int | None = None):
        """The closure that admits a request on the engine thread: RequestError if it is invalid
        (a 400 even when full), Refused(429) past max_unfinished requests in flight (checked
        here, so concurrent clients cannot overshoot); returns its id. Its events go to sink."""
        def accept(engine: Engine) -> int:
            engine.validate(prompt_ids, sampling)
            if max_unfinished is not None and engine.num_unfinished >= max_unfinished:
                raise Refused(429, f"overloaded: {engine.num_unfinished} requests in flight "
                                       f"(limit {max_unfinished}); retry later")
            rid = engine.submit(prompt_ids, sampling)
            self._sinks[rid] = sink
            return rid
        return accept

    def cancel(self, rid: int) -> Callable[[Engine], bool]:
        """The closure that stops a request whose client went away, freeing what it holds."""
        def drop(engine: Engine) -> bool:
            self._sinks.pop(rid, None)
            cancelled = engine.cancel(rid)
            engine.forget(rid)
            return cancelled
        return drop

    # ---- the engine thread ----------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.engine.has_work:
                    self._drain(block=True)
                    self.engine.idle()
                    continue
                self._drain(block=False)
                events = self.engine.step()
                for ev in events:
                    sink = self._sinks.get(ev.request_id)
                    if sink is None:
                        continue
                    if not sink(ev):
                        self.cancel(ev.request_id)(self.engine)
                    elif ev.finished:
                        del self._sinks[ev.request_id]
                self.metrics.after_step(self.engine, events)
        except BaseException as e:  # noqa: BLE001 -- report to every waiting client, then stop
            logging.getLogger(__name__).exception("engine loop stopped: every request in flight fails")
            self.error = e
            for sink in self._sinks.values():
                sink(e)
            self._drain(block=False)

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, fut = item
            if self.error is not None:
                fut.set_exception(EngineStopped(f"engine loop stopped: {self.error!r}"))
            elif fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:  # noqa: BLE001 -- the caller's error, raised in its thread
                    fut.set_exception(e)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def stop(self) -> None:
        self._stopping.set()
        self.join()
