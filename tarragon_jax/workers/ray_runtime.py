"""Ray runtime: every expert worker is its own OS process (a Ray actor), and so is the checkpoint
store (kv/remote_store.py); attention workers stay local device subsets of the driver (their KV
pages live on its devices). Actors spread over the nodes of the Ray cluster, this machine's or
one joined by address, each EW on an accelerator of its own where the cluster has them.

Why: with the local runtime a "failure" is simulated inside one process. Here an EW failure is
what the paper means: the process dies (fault injection sends it SIGKILL), nobody tells the
driver, and the next call to it fails with Ray's actor-died error, which becomes `WorkerFailed`;
a hung process misses the transfer deadline the same way. Recovery is unchanged (shadows,
replay, background replacement) because the driver-side proxy has the ExpertWorker interface.

Data path per layer: each AW's packed buffer leaves its device as a host array (the transfer; the
one place this runtime waits on the AW inside a step), every EW process is called with it before
any answer is gathered, the actor runs the same ExpertWorker program on its own device, and the
outputs come back as host arrays that the AW puts on its mesh. The host weights of all experts go
into Ray's object store once;
each actor maps them zero-copy and stacks its primaries and shadows (and, after a failure, any
orphaned expert it is told to load) onto its own device.
"""
from __future__ import annotations

import os
import signal
import time
import warnings

import numpy as np

from tarragon_jax.config import EngineConfig
from tarragon_jax.errors import WorkerFailed
from tarragon_jax.kv.remote_store import RemoteCheckpointStore, where
from tarragon_jax.workers.runtime import LocalRuntime, WorkerHandle, use_compile_cache

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_DEADLINE_S = 120.0     # an actor process imports jax and stacks its weights
PRECOMPILE_DEADLINE_S = 3600.0 # compiling the whole shape grid (cache misses) in one process


class ExpertActor:
    """Runs inside the actor process: one ExpertWorker on the process's first device."""

    def __init__(self, index: int, primaries, shadows, experts: list[dict], backend: str, dtype, top_k: int,
                 compile_cache_dir: str | None):
        import jax
        if compile_cache_dir:
            use_compile_cache(compile_cache_dir)
        from tarragon_jax.workers.expert_worker import ExpertWorker
        self.experts = experts
        self.ew = ExpertWorker(index, WorkerHandle(f"ew{index}", (jax.devices()[0],)), primaries, shadows,
                               experts, backend, dtype, top_k)

    def info(self) -> dict:
        return {**where(), "platform": self.ew.handle.devices[0].platform, "backend": self.ew.backend,
                "devices": [f"{self.ew.handle.devices[0]} (ray actor)"]}

    def ping(self) -> bool:
        return self.ew.handle.probe()

    def hang(self, seconds: float) -> None:
        time.sleep(seconds)                 # the calls queued behind this one wait: a hung process

    def run_layer(self, layer: int, bufs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(y) for y in self.ew.run_layer(layer, self.ew.handle.put(tuple(bufs)))]

    def rows_served(self) -> int:
        return self.ew.rows_served()

    def load_experts(self, layer: int, ids: list[int]) -> None:
        self.ew.load_experts(layer, ids, self.experts[layer])

    def precompile(self, grid) -> None:
        self.ew.precompile(grid)


class RemoteHandle:
    """A remote EW's identity and liveness from the driver's side; `get` is the bounded wait."""

    def __init__(self, name: str, deadline_s: float):
        self.name, self.deadline_s, self.alive = name, deadline_s, True
        self.actor = None
        self.where: dict = {}             # pid, node (IP), devices: set once the process answered

    def identity(self) -> dict:
        return dict(self.where)

    def check(self) -> None:
        if not self.alive:
            raise WorkerFailed(self.name, "worker is dead")

    def put(self, tree):
        """The transfer to this worker: device arrays leave as host arrays."""
        import jax
        self.check()
        return jax.tree.map(np.asarray, tree)

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
    """The ProgramLog interface for a remote EW: remembers the input shapes of every layer call,
    so a replacement process can compile the same programs (on zeros) before it joins."""

    def __init__(self):
        self._seen: set[tuple] = set()
        self.grid = None                  # the shape grid, when the EW was precompiled

    def note(self, layer: int, bufs: list) -> None:
        self._seen.add((layer, tuple((b.shape, str(b.dtype)) for b in bufs)))

    def extend(self, other: "RemotePrograms") -> None:
        self._seen |= other._seen
        self.grid = self.grid or other.grid

    def replay(self, handle: RemoteHandle) -> int:
        if self.grid is not None:
            handle.get(handle.actor.precompile.remote(self.grid), PRECOMPILE_DEADLINE_S)
        for layer, shapes in sorted(self._seen):
            handle.get(handle.actor.run_layer.remote(layer, [np.zeros(shape, dtype) for shape, dtype in shapes]),
                       STARTUP_DEADLINE_S)
        return len(self._seen)


class RemoteExpertWorker:
    """Driver-side proxy with the ExpertWorker interface the engine and controller use."""

    def __init__(self, index: int, handle: RemoteHandle, primaries, shadows, runtime: "RayRuntime",
                 backend: str, dtype, top_k: int):
        self.index, self.handle = index, handle
        self.slots = [list(p) + list(s) for p, s in zip(primaries, shadows)]
        self.n_primary = [len(p) for p in primaries]
        self.actor = handle.actor = runtime.actor_class.options(**runtime.actor_options()).remote(
            index, primaries, shadows, runtime.experts_ref, backend, dtype, top_k, runtime.compile_cache_dir)
        info = handle.get(self.actor.info.remote(), STARTUP_DEADLINE_S)
        self.pid, self.platform, self.backend = info.pop("pid"), info.pop("platform"), info.pop("backend")
        handle.where = {"pid": self.pid, **info}
        self.programs = RemotePrograms()

    def run_layer(self, layer: int, bufs: list):
        """Send every AW's buffer (host arrays) and return the call's future: the engine calls every
        EW of a layer before it gathers any answer."""
        self.handle.check()
        self.programs.note(layer, bufs)
        return self.actor.run_layer.remote(layer, list(bufs))

    def results(self, pending) -> list[np.ndarray]:
        """The answers, within the deadline; a dead or hung process raises WorkerFailed."""
        return self.handle.get(pending)

    def precompile(self, grid) -> None:
        self.handle.get(self.actor.precompile.remote(grid), PRECOMPILE_DEADLINE_S)
        self.programs.grid = grid

    def rows_served(self) -> int:
        return self.handle.get(self.actor.rows_served.remote())

    def load_experts(self, layer: int, ids: list[int], layer_experts: dict) -> None:
        """The actor loads from its zero-copy view of the host weights (layer_experts is the same)."""
        del layer_experts
        self.handle.get(self.actor.load_experts.remote(layer, list(ids)))
        self.slots[layer] += list(ids)

    def hang(self, seconds: float) -> None:
        """Fault injection: the process stops answering for `seconds` without dying."""
        self.actor.hang.remote(seconds)

    def kill(self) -> None:
        """Fault injection: SIGKILL the process. The driver is not told; its next call fails."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def connect(address: str | None = None, object_store_bytes: int = 0) -> None:
    """Join the Ray cluster at `address` (started with `ray start`), or start one on this machine;
    nothing when this process is connected already. Workers import this package: on a cluster of
    several hosts it must be installed on each (pip install); PYTHONPATH covers one machine."""
    import ray
    if ray.is_initialized():
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p)}}
    with warnings.catch_warnings():      # Ray forks only to exec its daemons at once
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        if address:
            ray.init(address=address, log_to_driver=False, runtime_env=env)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     object_store_memory=object_store_bytes + (128 << 20), runtime_env=env)


class RayRuntime(LocalRuntime):
    """AWs on the driver's devices (LocalRuntime); EWs and the checkpoint store as Ray actors,
    spread over the nodes of the Ray cluster (this machine's unless `address` names another)."""

    def __init__(self, devices: list | None, experts: list[dict], deadline_s: float,
                 compile_cache_dir: str | None = None, address: str | None = None, num_ews: int = 1):
        import ray
        super().__init__(devices)
        connect(address, sum(a.nbytes for layer in experts for a in layer.values()))
        self.actor_class = ray.remote(num_cpus=0, max_restarts=0)(ExpertActor)
        self.experts_ref = ray.put(experts)
        self.deadline_s, self.compile_cache_dir, self.num_ews = deadline_s, compile_cache_dir, num_ews
        self._actors: list = []

    def actor_options(self) -> dict:
        """Where an EW process goes: spread over the cluster's nodes, each on an accelerator of
        its own when the cluster has one per EW (shared ones when fewer; Ray sets each process's
        CUDA_VISIBLE_DEVICES), else on CPU devices."""
        import ray
        gpus = ray.cluster_resources().get("GPU", 0)
        return {"scheduling_strategy": "SPREAD", "num_gpus": min(1.0, gpus / self.num_ews) if gpus else 0}

    def workers(self, num_aws: int, num_ews: int) -> tuple[list[WorkerHandle], list[RemoteHandle]]:
        aws, _ = super().workers(num_aws, 0)
        return aws, [self._remote(f"ew{j}") for j in range(num_ews)]

    def replacement(self, failed):
        if isinstance(failed, RemoteHandle):
            return self._remote(failed.name)           # a new process
        return super().replacement(failed)

    def checkpoint_store(self, cfg: EngineConfig) -> RemoteCheckpointStore:
        """The KV snapshot store in its own process: committed blocks outlive any AW."""
        return RemoteCheckpointStore(cfg.checkpoint_dir, memory_tier=cfg.snapshot_memory_tier,
                                     flush_interval_s=cfg.snapshot_flush_s, deadline_s=self.deadline_s,
                                     options={"scheduling_strategy": "SPREAD"})

    def _remote(self, name: str) -> RemoteHandle:
        handle = RemoteHandle(name, self.deadline_s)
        self._actors.append(handle)
        return handle

    def close(self) -> None:
        """Stop every actor this runtime started (the Ray cluster itself stays up)."""
        import ray
        for handle in self._actors:
            if handle.actor is not None:
                ray.kill(handle.actor)
        self._actors.clear()
        self.experts_ref = None           # a restart puts the weights again: free this copy first
