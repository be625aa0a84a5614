"""Ray runtime: every worker is its own OS process (a Ray actor): each attention worker
(workers/attention_process.py), each expert worker (workers/expert_process.py) and the
checkpoint store (kv/remote_store.py). The actors go round-robin over the live nodes of the Ray
cluster, this machine's or one joined by address, each worker on an accelerator of its own
where the cluster has them.

Why: with the local runtime a "failure" is simulated inside one process. Here it is what the
paper means: the process dies (fault injection kills it; so can anyone, by the pid /health
shows), nobody tells the driver, and whoever exchanges data with it finds out at once: its
channels close. A hung process misses a deadline instead.

Ray does what it is good at: placing processes over nodes, starting and killing them. It is not
on the data path: each AW process exchanges every layer with the EW processes over channels of
its own (workers/channel.py), and the driver talks to each worker over a control channel; a Ray
actor call costs ~1 ms here, a channel round trip ~50 us.
Each process reads its own part of the weights (model/weights.py) on the node it runs on: an AW
the attention side, an EW its primaries and shadows, and any orphaned expert it is told to load,
from the checkpoint's files; the driver holds none. Only weights built in memory (HostWeights)
go through Ray's object store, once, each process mapping them zero-copy.
"""
from __future__ import annotations

import os
import warnings


from tarragon_jax.config import EngineConfig
from tarragon_jax.errors import WorkerId
from tarragon_jax.kv.remote_store import RemoteCheckpointStore
from tarragon_jax.model.weights import Weights
from tarragon_jax.workers.attention_process import AttentionActor
from tarragon_jax.workers.expert_process import ExpertActor
from tarragon_jax.workers.remote_worker import RemoteHandle

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def connect(address: str | None = None, object_store_bytes: int = 0) -> None:
    """Join the Ray cluster at `address` (started with `ray start`), or start one on this machine;
    nothing when this process is connected already. Workers import this package: on a cluster of
    several hosts it must be installed on each (pip install); PYTHONPATH covers one machine."""
    import ray
    if ray.is_initialized():
        return
    # a worker uses one device: no simulated CPU devices (each is a thread pool of its own)
    xla = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p),
                        "XLA_FLAGS": xla}}
    with warnings.catch_warnings():      # Ray forks only to exec its daemons at once
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        if address:
            ray.init(address=address, log_to_driver=False, runtime_env=env)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     object_store_memory=object_store_bytes + (128 << 20), runtime_env=env)


class RayRuntime:
    """Every AW and EW, and the checkpoint store, as Ray actors spread over the nodes of the Ray
    cluster (this machine's unless `address` names another). Each process reads its own part of
    the weights."""

    def __init__(self, weights: Weights, deadline_s: float, compile_cache_dir: str | None = None,
                 address: str | None = None, num_workers: int = 1, spin_s: float = 0.0):
        import ray
        connect(address, weights.nbytes)
        self.actor_class = ray.remote(num_cpus=0, max_restarts=0)(ExpertActor)
        self.aw_class = ray.remote(num_cpus=0, max_restarts=0)(AttentionActor)
        self.weights_ref = ray.put(weights)     # a path or a recipe (or, HostWeights, the arrays)
        self.deadline_s, self.compile_cache_dir, self.num_workers = deadline_s, compile_cache_dir, num_workers
        self.spin_s = spin_s              # how long a worker's receive polls before it sleeps
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
        return ([self._remote(WorkerId("aw", i)) for i in range(num_aws)],
                [self._remote(WorkerId("ew", j)) for j in range(num_ews)])

    def replacement(self, failed: RemoteHandle) -> RemoteHandle:
        return self._remote(failed.id)               # a new process

    def transport(self, deadline_s: float) -> None:
        """None: the worker processes exchange layers themselves (attention_process.py)."""
        del deadline_s

    def checkpoint_store(self, cfg: EngineConfig, generation: int = 0) -> RemoteCheckpointStore:
        """The KV snapshot store in its own process: committed blocks outlive any AW. A
        replacement (generation > 0) writes to a directory of its own under checkpoint_dir."""
        directory = cfg.checkpoint_dir
        if directory is not None and generation:
            directory = os.path.join(directory, f"store{generation}")
        return RemoteCheckpointStore.start(directory, memory_tier=cfg.snapshot_memory_tier,
                                           flush_interval_s=cfg.snapshot_flush_s, deadline_s=self.deadline_s,
                                           options=self.actor_options(accelerator=False))

    def _remote(self, worker: WorkerId) -> RemoteHandle:
        handle = RemoteHandle(worker, self.deadline_s)
        self._actors.append(handle)
        return handle

    def close(self) -> None:
        """Stop every actor this runtime started (the Ray cluster itself stays up)."""
        import ray
        for handle in self._actors:
            if handle.rpc is not None:
                handle.rpc.close()
            if handle.actor is not None:
                ray.kill(handle.actor)
        self._actors.clear()
        self.weights_ref = None     # a restart puts the weights again: free this copy first
