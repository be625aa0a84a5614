"""How a worker exists. `local`: a subset of this process's devices with its own Mesh.

With enough devices (8 simulated CPU devices by default, or real GPUs) every worker gets disjoint
devices; with fewer (one GPU), workers share devices round-robin but keep separate meshes, stage
programs and buffers, so the datapath is the same.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclasses.dataclass
class WorkerHandle:
    """A worker's identity, devices and liveness; transfers to it go through `sharding`."""
    name: str                       # "aw0", "ew3"
    devices: tuple
    alive: bool = True

    def __post_init__(self) -> None:
        self.mesh = Mesh(np.array(self.devices), ("d",))
        self.sharding = NamedSharding(self.mesh, PartitionSpec())     # replicated on its mesh

    def put(self, tree):
        return jax.device_put(tree, self.sharding)


class LocalRuntime:
    def __init__(self, devices: list | None = None):
        self.devices = list(devices) if devices is not None else jax.devices()

    def workers(self, num_aws: int, num_ews: int) -> tuple[list[WorkerHandle], list[WorkerHandle]]:
        """AWs take the first devices, EWs the next ones; wrap around only when devices run out."""
        n = len(self.devices)
        pick = lambda i: (self.devices[i % n],)
        aws = [WorkerHandle(f"aw{i}", pick(i)) for i in range(num_aws)]
        ews = [WorkerHandle(f"ew{j}", pick(num_aws + j)) for j in range(num_ews)]
        return aws, ews

