"""Lower the Pallas GPU kernels for a GPU this machine does not have (AOT export, CPU-only CI).

From jax 0.11 on, Pallas Triton lowering reads the target GPU from the abstract mesh's device and
refuses to lower with neither that nor a local GPU; jax 0.10 assumed a target. Everything lowered
inside `gpu_target` targets the named GPU, on every jax this project supports.
"""

import contextlib
from typing import Iterator

import jax
from jax.sharding import AbstractDevice
from jax.sharding import AbstractMesh

# compute capability x10 -> (device kind as jax names it, SM count)
BY_ARCH = {75: ("Tesla T4", 40), 80: ("NVIDIA A100", 108), 90: ("NVIDIA H100", 132)}


@contextlib.contextmanager
def gpu_target(arch: int = 90) -> Iterator[None]:
    """Lower for the GPU of compute capability arch/10 (75: T4, 80: A100, 90: H100/H200)."""
    if arch not in BY_ARCH:
        raise ValueError(f"unknown GPU arch {arch}; choose from {sorted(BY_ARCH)}")
    kind, num_sms = BY_ARCH[arch]
    mesh = AbstractMesh((1,), ("gpu",), abstract_device=AbstractDevice(kind, num_sms, "gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        yield
