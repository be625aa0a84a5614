"""How a worker exists in this process: a subset of its devices with its own Mesh (WorkerHandle:
put, probe, and a kill after which every call raises WorkerFailed, like a dead process), the
batched copy between such meshes, and the persistent compile cache. The local runtime that
hands out the handles: workers/local_runtime.py.
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

from tarragon_jax.errors import WorkerFailed, WorkerId

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
    id: WorkerId
    devices: tuple
    alive: bool = True

    @property
    def name(self) -> str:
        return self.id.name

    def __post_init__(self) -> None:
        self.mesh = Mesh(np.array(self.devices), ("d",))
        self.sharding = NamedSharding(self.mesh, PartitionSpec())     # replicated on its mesh

    def check(self) -> None:
        if not self.alive:
            raise WorkerFailed(self.id, "worker is dead")

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
    restart, on a replacement worker's new mesh or in a fresh worker process hit the cache; and
    one cache entry per program whichever device it runs on (`_device_agnostic_cpu_keys`)."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _device_agnostic_cpu_keys()


def _device_agnostic_cpu_keys() -> None:
    """Key CPU programs in the persistent cache without their device assignment, as JAX already
    does for GPU programs. Why: the local runtime runs the same program on every worker's device
    (2 AWs x 4 EWs: each AW program 2 times, each EW program 4 times), and on CPU the device id
    is part of the key, so each device compiled its own copy: 4x the startup compile of the
    demo's EW programs. A single-device executable is loaded onto the device the call names
    (the compile options passed at load carry it); tests/test_compile_cache.py checks that one
    entry serves every device with identical results. Another jax without this private hook:
    left as it is (one compile per device, slower, still correct)."""
    try:
        from jax._src import cache_key
        hash_options = cache_key._hash_serialized_compile_options
    except (ImportError, AttributeError):
        return
    if getattr(hash_options, "device_agnostic", False):
        return

    def device_agnostic(hash_obj, compile_options, strip_device_assignment=False):
        return hash_options(hash_obj, compile_options, strip_device_assignment=True)
    device_agnostic.device_agnostic = True
    cache_key._hash_serialized_compile_options = device_agnostic
