"""The local runtime: every worker is a subset of this process's devices with its own Mesh
(workers/runtime.py WorkerHandle), the checkpoint store a thread pool of this process.

With enough devices (8 simulated CPU devices by default, or real GPUs) every worker gets its own
device and the rest are spares for replacement workers; with fewer (one GPU), workers share
devices round-robin but keep separate meshes, stage programs and buffers, so the datapath is
the same. A killed worker's handle refuses every call (WorkerFailed), like a dead process. The
process runtime (workers/ray_runtime.py) makes each worker an OS process instead.
"""
from __future__ import annotations

import jax

from tarragon_jax.config import EngineConfig
from tarragon_jax.errors import WorkerId
from tarragon_jax.kv.checkpoint_store import CheckpointStore
from tarragon_jax.workers.runtime import WorkerHandle
from tarragon_jax.workers.transport import Transport


class LocalRuntime:
    def __init__(self, devices: list | None = None):
        self.devices = list(devices) if devices is not None else jax.devices()
        self._used: list = []

    def _pick(self, fallback=None) -> tuple:
        """A device no worker has used yet, else `fallback` (default: round-robin sharing)."""
        free = [d for d in self.devices if d not in self._used]
        dev = free[0] if free else (fallback or self.devices[len(self._used) % len(self.devices)])
        self._used.append(dev)
        return (dev,)

    def workers(self, num_aws: int, num_ews: int) -> tuple[list[WorkerHandle], list[WorkerHandle]]:
        """AWs take the first devices, EWs the next ones; wrap around only when devices run out."""
        aws = [WorkerHandle(WorkerId("aw", i), self._pick()) for i in range(num_aws)]
        ews = [WorkerHandle(WorkerId("ew", j), self._pick()) for j in range(num_ews)]
        return aws, ews

    def transport(self, deadline_s: float) -> Transport:
        """Copies between this process's meshes, and the step's bounded wait."""
        return Transport(deadline_s)

    def checkpoint_store(self, cfg: EngineConfig, generation: int = 0) -> CheckpointStore:
        """The KV snapshot store, in this process (memory tier and Orbax writer thread); it lives
        as long as the process, so it is never replaced (generation: RayRuntime's signature)."""
        del generation
        return CheckpointStore(cfg.checkpoint_dir, memory_tier=cfg.snapshot_memory_tier,
                               flush_interval_s=cfg.snapshot_flush_s)

    def close(self) -> None:
        """Nothing to stop: local workers are buffers of this process (see RayRuntime)."""

    def replacement(self, failed: WorkerHandle) -> WorkerHandle:
        """A handle with the failed worker's id on a spare device, or, with no spare left, on the
        failed worker's own device once it is back (a new mesh either way, so programs recompile)."""
        return WorkerHandle(failed.id, self._pick(fallback=failed.devices[0]))
