"""A worker process as the driver sees it (`--runtime ray`): its handle (identity, liveness, the
bounded wait on its calls), the programs a replacement must compile, and what every proxy of a
worker process does alike (precompile, hang, kill, its serving compiles). The proxies:
ray_runtime.RemoteExpertWorker, ray_attention.RemoteAttentionWorker; inside the processes, what
their actors share (WorkerProcess)."""
from __future__ import annotations

import os
import signal
import time

from tarragon_jax.errors import WorkerFailed

STARTUP_DEADLINE_S = 120.0     # an actor process imports jax and stacks its weights
PRECOMPILE_DEADLINE_S = 3600.0 # compiling the whole shape grid (cache misses) in one process


class RemoteHandle:
    """A worker process's identity and liveness from the driver's side; `get` is the bounded wait."""

    def __init__(self, name: str, deadline_s: float):
        self.name, self.deadline_s, self.alive = name, deadline_s, True
        self.actor = None
        self.where: dict = {}             # pid, node (IP), devices: set once the process answered

    def identity(self) -> dict:
        return dict(self.where)

    def check(self) -> None:
        if not self.alive:
            raise WorkerFailed(self.name, "worker is dead")

    def get(self, ref, deadline_s: float | None = None):
        import ray
        try:
            return ray.get(ref, timeout=self.deadline_s if deadline_s is None else deadline_s)
        except ray.exceptions.GetTimeoutError:
            raise WorkerFailed(self.name, f"no result within the {self.deadline_s:.3f} s deadline") from None
        except ray.exceptions.RayError as e:             # died, or failed inside (e.g. out of memory)
            detail = " ".join(str(e).split())[:300]      # why, e.g. an error in its startup
            raise WorkerFailed(self.name, f"process failed ({type(e).__name__}: {detail})") from None

    def probe(self, timeout_s: float | None = None) -> bool:
        try:
            bound = min(self.deadline_s, 5.0) if timeout_s is None else timeout_s
            return self.alive and bool(self.get(self.actor.ping.remote(), bound))
        except WorkerFailed:
            return False


class RemotePrograms:
    """The ProgramLog interface for a remote worker: the shape grid it compiled at startup, which a
    replacement process compiles too before it joins (what a dead process compiled later is
    gone with it)."""

    def __init__(self):
        self.grid = None

    def extend(self, other: "RemotePrograms") -> None:
        self.grid = self.grid or other.grid

    def replay(self, handle: RemoteHandle) -> int:
        if self.grid is not None:
            handle.get(handle.actor.precompile.remote(self.grid), PRECOMPILE_DEADLINE_S)
        return int(self.grid is not None)


class RemoteWorker:
    """What every driver-side proxy of a worker process does the same way."""

    def _spawn(self, handle: RemoteHandle, runtime, actor_class, *args) -> dict:
        """Start the worker's process where the runtime places it and wait for it to answer;
        returns what it reports of itself (its pid and node go on the handle)."""
        self.handle, self.programs = handle, RemotePrograms()
        self.actor = handle.actor = actor_class.options(**runtime.actor_options()).remote(*args)
        info = handle.get(self.actor.info.remote(), STARTUP_DEADLINE_S)
        self.pid = info["pid"]
        handle.where = {k: v for k, v in info.items() if k in ("pid", "node", "node_id", "devices")}
        return info

    def precompile(self, grid) -> None:
        self.handle.get(self.actor.precompile.remote(grid), PRECOMPILE_DEADLINE_S)
        self.programs.grid = grid

    def hang(self, seconds: float) -> None:
        """Fault injection: the process stops answering for `seconds` without dying."""
        self.actor.hang.remote(seconds)

    def compile_times(self) -> list[float]:
        """Wall-clock times of the compiles the process ran while serving (CompileLog)."""
        return self.handle.get(self.actor.compile_times.remote())

    def kill(self) -> None:
        """Fault injection: SIGKILL the process. The driver is not told; its next call fails."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class WorkerProcess:
    """What the actors of every worker process do alike, inside it (`self.compiles` a CompileLog)."""

    def hang(self, seconds: float) -> None:
        time.sleep(seconds)                 # the calls queued behind this one wait: a hung process

    def compile_times(self) -> list[float]:
        return self.compiles.times
