"""Ray runtime: every worker is its own OS process (a Ray actor): each attention worker
(workers/ray_attention.py), each expert worker (ExpertActor here) and the checkpoint store
(kv/remote_store.py). The actors go round-robin over the live nodes of the Ray cluster, this
machine's or one joined by address, each worker on an accelerator of its own where the cluster
has them.

Why: with the local runtime a "failure" is simulated inside one process. Here it is what the
paper means: the process dies (fault injection sends it SIGKILL; so can anyone, by the pid
/health shows), nobody tells the driver, and whatever depended on its outputs fails with Ray's
actor-died error naming the actor, which the transport turns into `WorkerFailed` for that
worker; a hung process misses the step's deadline the same way. Recovery is unchanged (shadows,
replay, moved requests, background replacements) because the driver-side proxies have the
workers' interfaces.

Data path per layer: the AW's layer call returns its packed buffer as an ObjectRef, every EW
process is called with the refs of every AW (Ray resolves them: the data goes from process to
process, never through the driver's Python), each EW's answer per AW is a ref again, and the AW's
next call takes them. The driver waits once per step, for the sampled tokens (RayTransport).
The host weights go into Ray's object store once; each process maps them zero-copy and puts its
part (an EW: its primaries and shadows, and any orphaned expert it is told to load) on its device.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from tarragon_jax.config import EngineConfig
from tarragon_jax.errors import WorkerFailed
from tarragon_jax.kv.remote_store import RemoteCheckpointStore, where
from tarragon_jax.workers.program_log import CompileLog
from tarragon_jax.workers.ray_attention import AttentionActor
from tarragon_jax.workers.remote_worker import RemoteHandle, RemoteWorker, WorkerProcess
from tarragon_jax.workers.runtime import WorkerHandle, use_compile_cache
from tarragon_jax.workers.transport import DRAIN_S, Transport, check_live

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ExpertActor(WorkerProcess):
    """Runs inside the actor process: one ExpertWorker on the process's first device."""

    def __init__(self, index: int, primaries, shadows, experts: list[dict], backend: str, dtype, top_k: int,
                 compile_cache_dir: str | None):
        import jax
        if compile_cache_dir:
            use_compile_cache(compile_cache_dir)
        from tarragon_jax.workers.expert_worker import ExpertWorker
        self.experts, self.compiles = experts, CompileLog()
        with self.compiles.warming():
            self.ew = ExpertWorker(index, WorkerHandle(f"ew{index}", (jax.devices()[0],)), primaries, shadows,
                                   experts, backend, dtype, top_k)

    def info(self) -> dict:
        return {**where(), "platform": self.ew.handle.devices[0].platform, "backend": self.ew.backend,
                "devices": [f"{self.ew.handle.devices[0]} (ray actor)"]}

    def ping(self) -> bool:
        return self.ew.handle.probe()

    def run_layer(self, layer: int, *bufs: np.ndarray):
        """One AW's buffer per argument (Ray resolved the refs); one return value per buffer."""
        ys = [np.asarray(y) for y in self.ew.run_layer(layer, self.ew.handle.put(bufs))]
        return ys[0] if len(ys) == 1 else tuple(ys)

    def rows_served(self) -> int:
        return self.ew.rows_served()

    def load_experts(self, layer: int, ids: list[int]) -> None:
        self.ew.load_experts(layer, ids, self.experts[layer])

    def precompile(self, grid) -> None:
        with self.compiles.warming():
            self.ew.precompile(grid)


class RemoteExpertWorker(RemoteWorker):
    """Driver-side proxy with the ExpertWorker interface the engine and controller use."""

    def __init__(self, index: int, handle: RemoteHandle, primaries, shadows, runtime: "RayRuntime",
                 backend: str, dtype, top_k: int):
        self.index = index
        self.slots = [list(p) + list(s) for p, s in zip(primaries, shadows)]
        self.n_primary = [len(p) for p in primaries]
        info = self._spawn(handle, runtime, runtime.actor_class, index, primaries, shadows, runtime.experts_ref,
                           backend, dtype, top_k, runtime.compile_cache_dir)
        self.platform, self.backend = info["platform"], info["backend"]

    def run_layer(self, layer: int, bufs: list) -> list:
        """Call the process with every AW's buffer (refs: Ray moves the data from the AW's process
        to this one); returns one ref per buffer, for its AW's receive. Nothing waits."""
        self.handle.check()
        out = self.actor.run_layer.options(num_returns=len(bufs)).remote(layer, *bufs)
        return [out] if len(bufs) == 1 else list(out)

    def results(self, pending: list) -> list:
        """The answers' refs (the step's one wait finds a dead or late process)."""
        return pending

    def rows_served(self) -> int:
        return self.handle.get(self.actor.rows_served.remote())

    def load_experts(self, layer: int, ids: list[int], layer_experts: dict) -> None:
        """The actor loads from its zero-copy view of the host weights (layer_experts is the same)."""
        del layer_experts
        self.handle.get(self.actor.load_experts.remote(layer, list(ids)))
        self.slots[layer] += list(ids)


class RayTransport(Transport):
    """The transport between worker processes: every value is an ObjectRef that Ray moves from
    its producer's process to its consumer's; the driver forwards refs, never data."""

    def __init__(self, deadline_s: float, runtime: "RayRuntime"):
        super().__init__(deadline_s)
        self.runtime = runtime

    def send_all(self, items: list[tuple]) -> list:
        check_live(items)
        return [ref for ref, _, _ in items]

    def wait(self, results: dict, trail: list[tuple[object, int, object]]) -> dict:
        """{key: ref of sampled tokens} -> {key: numpy array}, within the deadline. Every output
        of a step feeds the sampled tokens (an AW's layer call takes the EWs' answers of the
        layer before), so a process that died fails them: the failure names it by its actor id.
        A miss names the first worker in dispatch order whose output is not ready."""
        import ray
        self.waits += 1
        refs = list(dict.fromkeys(list(results.values()) + [r for r in map(_ref, (o for _, _, o in trail)) if r is not None]))
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.deadline_s, fetch_local=False)
        if len(ready) < len(refs):
            for w, layer, out in trail:
                r = _ref(out)
                if r is not None and not ray.wait([r], timeout=0, fetch_local=False)[0]:
                    raise WorkerFailed(w.name, f"no result within the {self.deadline_s:.3f} s deadline", layer=layer)
        got = {}
        for key, ref in results.items():
            try:
                got[key] = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise self._blame(e, key) from None
        self.pulls += len(results)
        return {k: got[k] for k in results}

    def _blame(self, e: Exception, key) -> WorkerFailed:
        """The worker whose process failed: the actor named by the error, else the caller."""
        dead = getattr(e, "actor_id", None)
        by_id = {h.actor._actor_id.hex(): h for h in self.runtime._actors if h.actor is not None}
        handle = by_id.get(dead)
        name = handle.name if handle is not None else f"aw{key}"     # else it failed inside the AW's call
        detail = " ".join(str(e).split())[:300]
        return WorkerFailed(name, f"process failed ({type(e).__name__}: {detail})")

    def drain(self, trail: list[tuple[object, int, object]], bound_s: float = DRAIN_S) -> bool:
        import ray
        self.waits += 1
        refs = list(dict.fromkeys(r for r in map(_ref, (o for _, _, o in trail)) if r is not None))
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=bound_s, fetch_local=False)
        return len(ready) == len(refs)


def _ref(out):
    """The ObjectRef of a trail entry's output (None for a local one)."""
    import ray
    return out if isinstance(out, ray.ObjectRef) else None


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


class RayRuntime:
    """Every AW and EW, and the checkpoint store, as Ray actors spread over the nodes of the Ray
    cluster (this machine's unless `address` names another). The weights go into Ray's object
    store once; each process maps its part zero-copy."""

    def __init__(self, params: dict, deadline_s: float, compile_cache_dir: str | None = None,
                 address: str | None = None, num_workers: int = 1):
        import jax
        import ray
        experts = params["experts"]
        connect(address, sum(np.asarray(a).nbytes for a in jax.tree.leaves(params)))
        self.actor_class = ray.remote(num_cpus=0, max_restarts=0)(ExpertActor)
        self.aw_class = ray.remote(num_cpus=0, max_restarts=0)(AttentionActor)
        self.experts_ref, self.attn_ref = ray.put(experts), ray.put(params["attn"])
        self.deadline_s, self.compile_cache_dir, self.num_workers = deadline_s, compile_cache_dir, num_workers
        self._actors: list = []
        self._placed = 0                  # processes placed so far (round-robin over the nodes)

    def actor_options(self, accelerator: bool = True) -> dict:
        """Where the next process goes: round-robin over the cluster's live nodes in creation order
        (store, EWs, AWs; a replacement takes the next live node), so the workers of one kind are
        spread and a node's loss takes as few as can be; each worker on an accelerator of its own
        when the cluster has one per worker (shared when fewer; Ray sets the process's
        CUDA_VISIBLE_DEVICES), else on CPU devices."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        node, self._placed = nodes[self._placed % len(nodes)], self._placed + 1
        gpus = ray.cluster_resources().get("GPU", 0) if accelerator else 0
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True),
                "num_gpus": min(1.0, gpus / self.num_workers) if gpus else 0}

    def workers(self, num_aws: int, num_ews: int) -> tuple[list[RemoteHandle], list[RemoteHandle]]:
        return [self._remote(f"aw{i}") for i in range(num_aws)], [self._remote(f"ew{j}") for j in range(num_ews)]

    def replacement(self, failed: RemoteHandle) -> RemoteHandle:
        return self._remote(failed.name)               # a new process

    def transport(self, deadline_s: float) -> "RayTransport":
        return RayTransport(deadline_s, self)

    def checkpoint_store(self, cfg: EngineConfig) -> RemoteCheckpointStore:
        """The KV snapshot store in its own process: committed blocks outlive any AW."""
        return RemoteCheckpointStore.start(cfg.checkpoint_dir, memory_tier=cfg.snapshot_memory_tier,
                                           flush_interval_s=cfg.snapshot_flush_s, deadline_s=self.deadline_s,
                                           options=self.actor_options(accelerator=False))

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
        self.experts_ref = self.attn_ref = None     # a restart puts the weights again: free this copy first
