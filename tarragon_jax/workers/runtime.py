"""How a worker exists. `local`: a subset of this process's devices with its own Mesh.

With enough devices (8 simulated CPU devices by default, or real GPUs) every worker gets its own
device and the rest are spares for replacement workers; with fewer (one GPU), workers share
devices round-robin but keep separate meshes, stage programs and buffers, so the datapath is
the same. A killed worker's handle refuses every call (WorkerFailed), like a dead process.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tarragon_jax.config import EngineConfig
from tarragon_jax.errors import WorkerFailed
from tarragon_jax.kv.checkpoint_store import CheckpointStore

try:    # the call jax.device_put makes for same-layout copies, without ~50 us of Python per array
    from jax._src.lib import xla_client as _xc
    _batched_copy = _xc.batched_copy_array_to_devices_with_sharding
    _REUSE = _xc.ArrayCopySemantics.REUSE_INPUT
except (ImportError, AttributeError):           # another jax: the public path below
    _batched_copy = None


PROBE_TIMEOUT_S = 5.0     # a heartbeat probe's bound (the controller passes the step deadline)
PROBE_POLL_S = 1e-4


@dataclasses.dataclass
class WorkerHandle:
    """A worker's identity, devices and liveness; transfers to it go through `sharding`."""
    name: str                       # "aw0", "ew3"
    devices: tuple
    alive: bool = True

    def __post_init__(self) -> None:
        self.mesh = Mesh(np.array(self.devices), ("d",))
        self.sharding = NamedSharding(self.mesh, PartitionSpec())     # replicated on its mesh

    def check(self) -> None:
        if not self.alive:
            raise WorkerFailed(self.name, "worker is dead")

    def identity(self) -> dict:
        """Where the worker runs (an operator, or an outside test, can find and kill it there):
        a local worker is a device subset of this process."""
        return {"pid": os.getpid(), "node": socket.gethostname(), "devices": [str(d) for d in self.devices]}

    def put(self, tree):
        self.check()
        return jax.device_put(tree, self.sharding)

    def probe(self, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        """Heartbeat: the worker is marked alive and its devices run a tiny program within
        timeout_s. Polled, never blocking: a hung device must not stall the caller."""
        if not self.alive:
            return False
        y = jax.device_put(jnp.int32(1), self.sharding) + 1
        end = time.perf_counter() + timeout_s
        while not y.is_ready():
            if time.perf_counter() > end:
                return False
            time.sleep(PROBE_POLL_S)
        return int(y) == 2


def copy_arrays(arrays: list, dsts: list) -> list:
    """Copy device arrays to worker meshes in one call, without waiting for them: arrays[i] onto
    dsts[i] (local WorkerHandles). A layer's transfers are many small arrays, and jax.device_put
    costs ~50 us of Python each; when every copy is single device to single device (what the
    local runtime's meshes are), this makes the same copy call for all of them at once."""
    if _batched_copy is not None and all(len(a.sharding.device_set) == 1 and len(d.devices) == 1
                                         for a, d in zip(arrays, dsts)):
        try:
            return _batched_copy(list(arrays), [d.sharding._internal_device_list for d in dsts],
                                 [d.sharding for d in dsts], [_REUSE] * len(arrays))
        except (TypeError, AttributeError):
            pass
    return [jax.device_put(a, d.sharding) for a, d in zip(arrays, dsts)]


def use_compile_cache(directory: str) -> None:
    """Persistent XLA compilation cache for every program, small ones too, so recompiles after a
    restart, on a replacement worker's new mesh or in a fresh worker process hit the cache."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
        aws = [WorkerHandle(f"aw{i}", self._pick()) for i in range(num_aws)]
        ews = [WorkerHandle(f"ew{j}", self._pick()) for j in range(num_ews)]
        return aws, ews

    def transport(self, deadline_s: float):
        """Copies between this process's meshes, and the step's bounded wait."""
        from tarragon_jax.workers.transport import Transport
        return Transport(deadline_s)

    def checkpoint_store(self, cfg: EngineConfig) -> CheckpointStore:
        """The KV snapshot store, in this process (memory tier and Orbax writer thread)."""
        return CheckpointStore(cfg.checkpoint_dir, memory_tier=cfg.snapshot_memory_tier,
                               flush_interval_s=cfg.snapshot_flush_s)

    def close(self) -> None:
        """Nothing to stop: local workers are buffers of this process (see RayRuntime)."""

    def replacement(self, failed: WorkerHandle) -> WorkerHandle:
        """A handle with the failed worker's name on a spare device, or, with no spare left, on the
        failed worker's own device once it is back (a new mesh either way, so programs recompile)."""
        return WorkerHandle(failed.name, self._pick(fallback=failed.devices[0]))
