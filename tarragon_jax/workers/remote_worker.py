"""A worker process as the driver sees it (`--runtime ray`): its handle (identity, liveness, the
bounded wait on its calls), the programs a replacement must compile, and what every proxy of a
worker process does alike (spawn, precompile, hang, kill, fence, its serving compiles). The
proxies: expert_process.RemoteExpertWorker, attention_process.RemoteAttentionWorker; inside
the processes, what their actors share (WorkerProcess).

Ray starts the process and tells us where it is; from then on every call goes over the
process's control channel (workers/rpc.py), never through a Ray task: ~30 us instead of ~1 ms,
and a dead process fails its caller at once (its socket closes).
"""
from __future__ import annotations

import os
import signal
import threading
import time

from tarragon_jax.errors import WorkerFailed, WorkerId
from tarragon_jax.heap import freeze_startup_heap
from tarragon_jax.workers.channel import host_id, wait_readable
from tarragon_jax.workers.keepalive import Keepalive
from tarragon_jax.workers.rpc import RemoteError, RpcClient, Server

STARTUP_DEADLINE_S = 120.0     # an actor process imports jax and stacks its weights
PRECOMPILE_DEADLINE_S = 3600.0 # compiling the whole shape grid (cache misses) in one process
WARMUP_NICE = 15               # a worker process's CPU priority until it joins (0: normal)
FOREGROUND_DEADLINE_S = 30.0   # a full collection of the warm process's heap, then freezing it
MEMORY_QUERY_S = 0.2           # /health's question to a process on another host
KEEPALIVE_FRACTION = 0.125     # of the step deadline: how often a compiling (or long-waiting) worker
                               # process says it is alive


class RemoteHandle:
    """A worker process's identity and liveness from the driver's side."""

    def __init__(self, worker: WorkerId, deadline_s: float):
        self.id, self.deadline_s, self.alive = worker, deadline_s, True
        self.actor = None
        self.rpc: RpcClient | None = None
        self.where: dict = {}             # pid, node (IP), node_id, host, devices: set once the process answered

    @property
    def name(self) -> str:
        return self.id.name

    def identity(self) -> dict:
        return dict(self.where)

    def check(self) -> None:
        if not self.alive:
            raise WorkerFailed(self.id, "worker is dead")

    def probe(self, timeout_s: float | None = None) -> bool:
        try:
            bound = min(self.deadline_s, 5.0) if timeout_s is None else timeout_s
            return self.alive and self.rpc is not None and bool(self.rpc.call("ping", timeout=bound))
        except (WorkerFailed, RemoteError):
            return False

    def gone(self) -> bool:
        """The process closed its control channel (it died), seen without a call: a poll."""
        if self.rpc is None or not self.alive or not wait_readable([self.rpc.ch], 0):
            return False
        try:
            self.rpc.pump(0.1)           # an answer nobody awaited yet is kept for its caller
            return False
        except WorkerFailed:
            return True

    def fence(self) -> None:
        """Make sure the process is gone (a hung one must never answer later): Ray kills it
        wherever it runs; on this host a SIGKILL lands at once, SIGSTOPped or not. Never
        waits: the kill goes out from a thread of its own."""
        self.alive = False
        if self.rpc is not None:
            self.rpc.close()
        actor, pid, local = self.actor, self.where.get("pid"), self.where.get("host") == host_id()

        def kill():
            if local and pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if actor is not None:
                import ray
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 -- already gone, or Ray itself shut down
                    pass
        threading.Thread(target=kill, name=f"fence-{self.name}", daemon=True).start()


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
            handle.rpc.call("precompile", self.grid, timeout=PRECOMPILE_DEADLINE_S)
        return int(self.grid is not None)


class RemoteWorker:
    """What every driver-side proxy of a worker process does the same way."""

    joined_at = 0.0          # when it joined the service as a replacement (controller clock)

    def _spawn(self, handle: RemoteHandle, runtime, actor_class, *args) -> dict:
        """Start the worker's process where the runtime places it, wait for it to answer and
        open its control channel; returns what it reports of itself."""
        import ray
        self.handle, self.programs = handle, RemotePrograms()
        self.actor = handle.actor = actor_class.options(**runtime.actor_options()).remote(*args)
        try:
            info = ray.get(self.actor.info.remote(), timeout=STARTUP_DEADLINE_S)
        except ray.exceptions.GetTimeoutError:
            raise WorkerFailed(handle.id, f"process did not start within {STARTUP_DEADLINE_S:.0f} s") from None
        except ray.exceptions.RayError as e:
            detail = " ".join(str(e).split())[:300]
            raise WorkerFailed(handle.id, f"process failed to start ({type(e).__name__}: {detail})") from None
        self.pid, self.address = info["pid"], info["address"]
        handle.where = {k: v for k, v in info.items() if k in ("pid", "node", "node_id", "host", "devices")}
        self.rpc = handle.rpc = RpcClient(handle.name, info["address"], handle.deadline_s)
        return info

    def precompile(self, grid) -> None:
        self.rpc.call("precompile", grid, timeout=PRECOMPILE_DEADLINE_S)
        self.programs.grid = grid

    def hang(self, seconds: float) -> None:
        """Fault injection: the process stops answering for `seconds` without dying."""
        self.rpc.cast("hang", seconds)

    def compiles(self) -> list:
        """The compiles the process ran after it started serving (CompileEvents: when, which
        program at which shapes, how long, on which thread)."""
        return self.rpc.call("compile_events")

    def foreground(self) -> None:
        """The process joins the service: from now on it runs at normal priority."""
        self.rpc.call("foreground", timeout=FOREGROUND_DEADLINE_S)

    def memory_mb(self) -> float:
        """The process's resident memory: from /proc on this host, else asked (briefly)."""
        if self.handle.where.get("host") == host_id():
            return resident_mb(self.pid)
        return self.rpc.call("memory_mb", timeout=MEMORY_QUERY_S)

    def kill(self) -> None:
        """Fail-stop: the process is killed (fault injection, and the controller's fence)."""
        self.handle.fence()


class WorkerProcess:
    """What the actors of every worker process do alike, inside it (`self.compiles` a CompileLog,
    `self.server` its serving loop)."""

    @staticmethod
    def _setup_jax() -> None:
        """Before the process's first JAX call. A worker process waits for every layer's result
        (it sends it on), so on a CPU it runs each program on the calling thread: asynchronous
        dispatch would hand it to a pool thread and wake this one again, ~30 us each way on a
        VM's cores (a tiny model's EW layer went from ~0.7 to ~0.3 ms).

        Until it joins (foreground), the process runs at low CPU priority: a replacement that
        imports jax and compiles its programs must not take the cores of the workers serving
        meanwhile (on a small host it did, and they missed their deadlines)."""
        import jax
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        _set_priority(WARMUP_NICE)

    def foreground(self) -> None:
        """Warm: serve at normal priority, start-up's objects out of the collector's walks (the
        one full collection this takes runs at normal priority too: niced, on a busy host, it
        could hold a replacement back from joining)."""
        _set_priority(0)
        freeze_startup_heap()

    def _start_server(self, name: str, spin_s: float, deadline_s: float, **hooks) -> None:
        """The process's serving loop, and its keepalive: while the loop compiles, whoever waits
        on it hears that it is alive every KEEPALIVE_FRACTION of the deadline (keepalive.py)."""
        from tarragon_jax.kv.remote_store import where
        self.server = Server(self, name, host=where()["node"], **hooks)
        self.server.spin_s = spin_s
        self.keepalive = Keepalive(self.server.waiting, KEEPALIVE_FRACTION * deadline_s, deadline_s,
                                   serving=self.server.thread)
        self.compiles.serving_thread = self.server.thread
        self.server.start()

    def _where(self) -> dict:
        """pid, Ray node, this host, and the address of the process's channels."""
        from tarragon_jax.kv.remote_store import where
        return {**where(), "host": host_id(), "address": self.server.address}

    def hang(self, seconds: float) -> None:
        time.sleep(seconds)             # the loop sleeps: nothing it serves answers meanwhile

    def compile_events(self) -> list:
        return list(self.compiles.events)

    def memory_mb(self) -> float:
        return resident_mb()


def _set_priority(nice: int) -> None:
    """Every thread of this process at `nice` (Linux keeps a priority per thread, and a new
    thread takes its creator's). Only where it can be undone: raising a priority back needs
    root (CAP_SYS_NICE), so elsewhere nothing changes."""
    if os.geteuid() != 0:
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except OSError:
            pass                          # the thread ended meanwhile


def resident_mb(pid: str = "self") -> float:
    """Resident memory of a process (this one by default), from /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
