"""Calls into a worker process over a channel (workers/channel.py), and the process's serving loop.

The driver holds one RpcClient per worker process. `call` sends and waits for the answer within
its bound; `cast` sends without waiting (the worker runs it in order with every other message,
so a step launched after a cast sees it); `submit` + `result` split a call so the driver can
launch every AW's step before waiting for any (`gather`). A dead process fails its callers at
once (its socket closes); a hung one at the bound; either way as WorkerFailed naming the worker.

Inside the process, `Server.serve` is one thread that sleeps in poll(2) on the listening
sockets and every channel: control messages run the target's methods in arrival order; data
messages (an EW's layer buffers) go to `on_data`. That one thread is the only one running the
worker's JAX programs after startup.
"""
from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import traceback
from typing import Callable

from tarragon_jax.errors import WorkerFailed
from tarragon_jax.workers import channel as chan
from tarragon_jax.workers.keepalive import BUSY_ID


class RemoteError(RuntimeError):
    """A call raised inside the worker process (the process itself is fine)."""


class RpcClient:
    def __init__(self, name: str, address: dict, deadline_s: float, connect_timeout_s: float = 30.0):
        self.name, self.deadline_s = name, deadline_s
        try:
            self.ch = chan.connect(address, {"name": "driver", "role": "control"}, connect_timeout_s)
        except chan.ChannelClosed as e:
            raise WorkerFailed(name, f"cannot reach its process ({e})") from None
        self.ch.peer.setdefault("name", name)
        self._ids = itertools.count()
        self._answers: dict[int, tuple] = {}
        self.busy_until = 0.0                  # the process vouched it is compiling until then (keepalive.py)
        self._lock = threading.Lock()          # one reader at a time (answers are kept by id)
        self._send_lock = threading.Lock()     # one message at a time on the socket

    def cast(self, method: str, *args) -> None:
        self._send((None, method, args))

    def submit(self, method: str, *args) -> int:
        i = next(self._ids)
        self._send((i, method, args))
        return i

    def call(self, method: str, *args, timeout: float | None = None):
        return self.result(self.submit(method, *args), timeout)

    def ready(self, i: int) -> bool:
        return i in self._answers

    def result(self, i: int, timeout: float | None = None):
        """The answer of submitted call i within `timeout` (default: the deadline)."""
        end = time.monotonic() + (self.deadline_s if timeout is None else timeout)
        while i not in self._answers:
            self.pump(max(end, self.busy_until) - time.monotonic())
        ok, value = self._answers.pop(i)
        if not ok:
            raise RemoteError(f"{self.name}: {value}")
        return value

    def pump(self, timeout: float) -> None:
        """Read one answer (kept by id) within `timeout`: WorkerFailed if none comes."""
        with self._lock:
            try:
                (i, ok, value), _ = self.ch.recv(max(timeout, 0.0))
            except chan.ChannelTimeout:
                raise WorkerFailed(self.name, f"no answer within the {self.deadline_s:.3f} s deadline") from None
            except chan.ChannelClosed as e:
                raise WorkerFailed(self.name, f"process gone ({e})") from None
            if i == BUSY_ID:                  # compiling: alive, give it `value` seconds more
                self.busy_until = max(self.busy_until, time.monotonic() + value)
            else:
                self._answers[i] = (ok, value)

    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self.ch.send(msg, timeout=self.deadline_s)
        except (chan.ChannelClosed, chan.ChannelTimeout) as e:
            raise WorkerFailed(self.name, f"process unreachable ({e})") from None

    def close(self) -> None:
        self.ch.close()


def gather(pending: dict, timeout: float) -> dict:
    """{key: (client, call id)} -> {key: answer or the WorkerFailed/RemoteError it raised}, waiting
    once for all of them: at most `timeout` overall, or longer for a process that vouches it is
    compiling (keepalive.py). A dead process's entry fails at once; one that has not answered by
    its bound fails with WorkerFailed (late)."""
    end, out = time.monotonic() + timeout, {}
    left = dict(pending)
    while left:
        for key, (client, i) in list(left.items()):     # every answer already here, read without waiting
            try:
                while not client.ready(i) and chan.wait_readable([client.ch], 0):
                    client.pump(0.5)
            except WorkerFailed as e:
                out[key] = e
                del left[key]
                continue
            if client.ready(i):
                out[key] = _settle(client, i)
                del left[key]
        now = time.monotonic()
        for key, (client, _) in list(left.items()):     # (only then: a caller descheduled past the
            if max(end, client.busy_until) <= now:       # bound must not miss what came in time)
                out[key] = WorkerFailed(client.name, f"no answer within the {client.deadline_s:.3f} s deadline")
                del left[key]
        if left:
            wake = min(max(end, c.busy_until) for c, _ in left.values())
            chan.wait_readable([c.ch for c, _ in left.values()], max(wake - now, 0.0))
    return out


def _settle(client: RpcClient, i: int):
    try:
        return client.result(i, 0.0)
    except (WorkerFailed, RemoteError) as e:
        return e


class Server:
    """A worker process's serving loop over its listener (control and data channels)."""

    def __init__(self, target, name: str, host: str = "127.0.0.1",
                 on_data: Callable | None = None, on_tick: Callable | None = None,
                 on_closed: Callable | None = None, next_timeout: Callable[[], float | None] | None = None):
        """on_data(channel, meta, array): a data message; on_tick(): after every wake-up;
        on_closed(channel): a peer went away; next_timeout(): the longest the loop may sleep."""
        self.target, self.name = target, name
        self.on_data, self.on_tick, self.on_closed = on_data, on_tick, on_closed
        self.next_timeout = next_timeout or (lambda: None)
        self.listener = chan.Listener(host, name)
        self.channels: list[chan.Channel] = []
        self.spin_s = 0.0
        self._stop = False
        self.thread = threading.Thread(target=self.serve, name=f"{name}-serve", daemon=True)

    @property
    def address(self) -> dict:
        return self.listener.address

    def waiting(self) -> list[chan.Channel]:
        """The channels that may be waiting on this process now: all of them (a call, or an AW's
        layer buffer, may sit unread behind the message under way; a busy frame nobody awaited
        only lengthens its peer's next wait once)."""
        return list(self.channels)

    def start(self) -> "Server":
        self.thread.start()
        return self

    def serve(self) -> None:
        """The loop. A bug in a handler ends the process (fail-stop): its peers see the death at
        once, where a dead loop in a live process would only be found at their deadlines."""
        try:
            self._serve()
        except BaseException:  # noqa: BLE001 -- whatever it was, this worker is no longer sound
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(70)

    def _serve(self) -> None:
        socks = {s.fileno(): s for s in self.listener.sockets()}
        while not self._stop:
            ready = chan.wait_readable(list(socks.values()) + self.channels, self.next_timeout(), self.spin_s)
            for r in ready:
                if isinstance(r, chan.Channel):
                    self._read(r)
                else:
                    try:
                        self.channels.append(self.listener.accept(r, {"name": self.name}))
                    except (OSError, EOFError, chan.ChannelClosed, chan.ChannelTimeout):
                        pass
            if self.on_tick is not None:
                self.on_tick()

    def _read(self, ch: chan.Channel) -> None:
        try:
            meta, array = ch.recv(5.0)
        except (chan.ChannelClosed, chan.ChannelTimeout):
            self.channels.remove(ch)
            ch.close()
            if self.on_closed is not None:
                self.on_closed(ch)
            return
        if ch.peer.get("role") != "control":
            self.on_data(ch, meta, array)
            return
        i, method, args = meta
        try:
            ok, value = True, getattr(self.target, method)(*args)
        except Exception as e:  # noqa: BLE001 -- the caller gets it as RemoteError
            ok, value = False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
        if i is not None:
            try:
                ch.send((i, ok, value))
            except (chan.ChannelClosed, chan.ChannelTimeout):
                pass

    def stop(self) -> None:
        self._stop = True
