"""Block checksums: the device sum (inside kv_cache.read_blocks) and the host twin agree bit for
bit at every KV dtype, any one-word change is caught, and the store verifies with them."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tarragon_jax.kv.checksum import block_sums_host
from tarragon_jax.kv.kv_cache import block_sums, read_blocks


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16, np.int8])
@pytest.mark.parametrize("shape", [(1, 2, 2, 4, 2, 8), (5, 3, 1, 16, 1, 32), (8, 1, 2, 3, 5, 7)])
def test_device_and_host_agree(dtype, shape):
    rng = np.random.default_rng(hash((str(dtype), shape)) % 2**32)
    x = (rng.standard_normal(shape) * 50).astype(dtype)
    host = block_sums_host(x)
    dev = np.asarray(jax.jit(block_sums)(jnp.asarray(x)))
    assert host.dtype == np.uint32 and host.shape == (shape[0],)
    np.testing.assert_array_equal(dev, host)
    assert len(set(host.tolist())) == shape[0]          # random blocks: distinct sums


def test_any_one_word_change_is_caught():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 2, 4, 2, 8)).astype(np.float32)
    base = block_sums_host(x)[0]
    words = x.reshape(-1).view(np.uint32)
    for i in rng.choice(words.size, 64, replace=False):
        for bit in (0, 17, 31):
            y = words.copy()
            y[i] ^= np.uint32(1 << bit)
            assert block_sums_host(y.view(np.float32).reshape(x.shape))[0] != base
    swapped = words.copy()
    swapped[[3, 40]] = swapped[[40, 3]]
    assert block_sums_host(swapped.view(np.float32).reshape(x.shape))[0] != base


def test_read_blocks_returns_the_pages_and_their_sums():
    rng = np.random.default_rng(2)
    pages = [{part: jnp.asarray(rng.standard_normal((6, 4, 2, 8)).astype(np.float32)) for part in ("k", "v")}
             for _ in range(3)]
    ids = np.array([4, 1, 1, 0], np.int32)
    blocks, sums = read_blocks(pages, ids)
    want = np.stack([np.stack([np.asarray(p[part])[ids] for part in ("k", "v")], axis=1) for p in pages], axis=1)
    np.testing.assert_array_equal(np.asarray(blocks), want)
    np.testing.assert_array_equal(np.asarray(sums), block_sums_host(want))


def test_unsupported_element_size():
    with pytest.raises(ValueError, match="1-, 2- or 4-byte elements, got 8 bytes"):
        block_sums_host(np.zeros((1, 4), np.float64) + 1.5)
