"""The persistent compile cache keys a CPU program without its device: the same program on every
worker's device is one entry, compiled once, and each device's copy computes what it computes
when compiled for that device alone (runtime.use_compile_cache)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from seeding import fresh_rng


def _entries(directory: str, name: str) -> set[str]:
    return {f for f in os.listdir(directory) if f.startswith(f"jit_{name}")}


def test_one_cache_entry_serves_every_device():
    rng = fresh_rng()
    salt = float(rng.uniform(1, 2))             # a program no earlier run has cached

    def cache_probe(x_NxD, w_DxD):
        for _ in range(3):
            x_NxD = jnp.tanh(x_NxD @ w_DxD) * salt
        return x_NxD

    directory = jax.config.jax_compilation_cache_dir
    x = rng.standard_normal((16, 32)).astype(np.float32)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    before = _entries(directory, "cache_probe")
    outs = []
    for device in jax.devices()[:4]:
        f = jax.jit(cache_probe)                # a new jit: nothing in memory, the disk cache only
        out = f(jax.device_put(x, device), jax.device_put(w, device))
        assert out.devices() == {device}
        outs.append(np.asarray(out))
    assert len(_entries(directory, "cache_probe") - before) == 1
    expected = np.asarray(jax.jit(cache_probe, backend="cpu")(x, w))
    for out in outs:
        np.testing.assert_array_equal(out, expected)
