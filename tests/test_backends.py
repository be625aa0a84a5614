"""`auto` picks a backend per device (workers/backends.py) that can lower for it: the Triton
kernels on sm_80 and sm_90, XLA on sm_75 (Colab's T4), each lowered here for a named GPU the way
gpu_target does, with no GPU on the machine."""
import types

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.gpu_target import gpu_target
from pallas_kernels.paged_attention import paged_attention
from tarragon_jax.model import wire
from tarragon_jax.model.expert_stage import expert_layer
from tarragon_jax.workers import backends

S = jax.ShapeDtypeStruct


def gpu(arch: int):
    return types.SimpleNamespace(platform="gpu", compute_capability=f"{arch // 10}.{arch % 10}")


@pytest.mark.parametrize("device,experts,attention", [
    (gpu(75), "ragged_dot", "jnp"), (gpu(80), "pallas", "pallas"), (gpu(90), "pallas", "pallas"),
    (gpu(120), "pallas", "pallas"), (types.SimpleNamespace(platform="cpu"), "tiles", "jnp"),
    (types.SimpleNamespace(platform="tpu"), "pallas", "jnp"), (types.SimpleNamespace(platform="rocm"), "ragged_dot", "jnp"),
])
def test_auto_by_device(device, experts, attention):
    assert backends.expert_backend("auto", device) == experts
    assert backends.attention_backend("auto", device) == attention
    assert backends.expert_backend("dense", device) == "dense" and backends.attention_backend("jnp", device) == "jnp"


@pytest.mark.parametrize("arch", [75, 80, 90])
def test_the_auto_choice_lowers_for_the_named_gpu(arch):
    """Qwen3-30B-A3B's expert shapes (D 2048, F 768, top-8, 16 slots on an EW) and attention
    (32 q / 4 kv heads, head_dim 128), bf16, lowered for CUDA as that GPU."""
    dev = gpu(arch)
    eb, ab = backends.expert_backend("auto", dev), backends.attention_backend("auto", dev)
    D, F, k, slots, T, dt = 2048, 768, 8, 16, 64, jnp.bfloat16
    weights = {"w_gate": S((slots, D, F), dt), "w_up": S((slots, D, F), dt), "w_down": S((slots, F, D), dt)}
    bufs = (S((T, wire.width(D, 2 * k, dt)), dt),)
    scalar = S((), jnp.int32)
    pool = S((1024, 16, 4, 128), dt)
    attn = (S((T, 32, 128), dt), pool, pool, S((T, 64), jnp.int32), S((T,), jnp.int32), S((T,), jnp.int32))
    with gpu_target(arch):
        experts = expert_layer.trace(weights, scalar, scalar, bufs, top_k=k, backend=eb).lower(
            lowering_platforms=("cuda",)).as_text()
        attention = jax.jit(lambda *a: paged_attention(*a, impl=ab)).trace(*attn).lower(
            lowering_platforms=("cuda",)).as_text()
    kernel = arch >= 80
    assert ("xla.gpu.triton" in experts) == kernel and ("xla.gpu.triton" in attention) == kernel
