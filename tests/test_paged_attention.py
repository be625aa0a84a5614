"""Paged attention kernel vs the jnp reference on random ragged batches, batch invariance (a
token's bits do not depend on its batch), and CUDA lowering at real model shapes. impl="pallas"
runs the kernel in interpret mode on CPU and the compiled Triton kernel on a GPU."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu_target import gpu_target
from pallas_kernels.paged_attention import PAGES_PER_SPLIT
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention import paged_attention_reference

S = jax.ShapeDtypeStruct


def random_batch(seed, *, T, H, KV, hd, ps, B, P, dtype):
    """Random pages, a block table of distinct pages per row (page 0 is the sink), and tokens
    with random rows and positions: several tokens of a row model a prefill chunk; the last
    row is all-sink padding, as the scheduler pads."""
    rng = np.random.default_rng(seed)
    n_pages = B * P + 1
    k = jnp.asarray(rng.standard_normal((n_pages, ps, KV, hd)), dtype)
    v = jnp.asarray(rng.standard_normal((n_pages, ps, KV, hd)), dtype)
    tables = rng.permutation(np.arange(1, n_pages)).reshape(B, P).astype(np.int32)
    tables[-1] = 0
    slot = rng.integers(0, B, T).astype(np.int32)
    pos = rng.integers(0, P * ps, T).astype(np.int32)
    pos[slot == B - 1] = 0
    q = jnp.asarray(rng.standard_normal((T, H, hd)), dtype)
    return q, k, v, jnp.asarray(tables), jnp.asarray(slot), jnp.asarray(pos)


def assert_close(actual, expected, dtype):
    """f32: exact products, only the summation order differs -> 2e-5. bf16: probabilities and
    output rounded to bf16 (2^-8 relative) -> 2e-2 of the output scale."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * float(np.abs(expected).max()))


# (seed, T, H, KV, hd, page_size, B rows, P pages per row, dtype)
CASES = [
    (0, 7, 4, 2, 16, 16, 3, 5, jnp.float32),       # GQA 2, P not a multiple of pages_per_block
    (1, 5, 8, 1, 32, 4, 2, 40, jnp.float32),       # MQA, small pages, 3 splits (40 > 16 pages)
    (2, 9, 4, 4, 16, 8, 4, 3, jnp.bfloat16),       # MHA (G = 1), bf16
    (3, 4, 16, 2, 64, 16, 2, 20, jnp.bfloat16),    # G = 8 as in Qwen3-30B, 2 splits
]


@pytest.mark.usefixtures("ieee_f32_dots")  # the reference is XLA einsums
@pytest.mark.parametrize("seed,T,H,KV,hd,ps,B,P,dtype", CASES)
def test_kernel_matches_reference(seed, T, H, KV, hd, ps, B, P, dtype):
    args = random_batch(seed, T=T, H=H, KV=KV, hd=hd, ps=ps, B=B, P=P, dtype=dtype)
    out = paged_attention(*args, impl="pallas")
    assert out.shape == (T, H, hd) and out.dtype == dtype
    ref32 = paged_attention_reference(*(a.astype(jnp.float32) if a.dtype == dtype else a for a in args))
    assert_close(out, ref32, dtype)


@pytest.mark.usefixtures("ieee_f32_dots")
def test_reference_is_dense_causal_attention():
    """The oracle itself, against attention written out on one contiguous sequence."""
    T, H, KV, hd, ps = 6, 4, 2, 16, 4
    q, k, v, tables, _, _ = random_batch(9, T=T, H=H, KV=KV, hd=hd, ps=ps, B=2, P=3, dtype=jnp.float32)
    slot, pos = jnp.zeros(T, jnp.int32), jnp.arange(T, dtype=jnp.int32) + 5    # a chunk at 5..10
    keys = k[tables[0]].reshape(-1, KV, hd)[:11]
    vals = v[tables[0]].reshape(-1, KV, hd)[:11]
    expected = []
    for t in range(T):
        for h in range(H):
            s = keys[: pos[t] + 1, h // (H // KV)] @ q[t, h] / np.sqrt(hd)
            expected.append(jax.nn.softmax(s) @ vals[: pos[t] + 1, h // (H // KV)])
    got = paged_attention_reference(q, k, v, tables, slot, pos)
    np.testing.assert_allclose(got.reshape(T * H, hd), np.stack(expected), rtol=1e-5, atol=1e-5)


def test_output_bits_do_not_depend_on_the_batch():
    """Failover re-runs requests in other batches (recompute, restore on another AW): a token's
    output must be bitwise the same alone, in a bigger batch, and with a wider block table."""
    q, k, v, tables, slot, pos = random_batch(4, T=6, H=4, KV=2, hd=16, ps=4, B=3, P=40, dtype=jnp.float32)
    slot, pos = slot.at[0].set(0), pos.at[0].set(4 * PAGES_PER_SPLIT + 5)  # 18 pages: 2 splits
    run = functools.partial(paged_attention, impl="pallas")
    full = np.asarray(run(q, k, v, tables, slot, pos))                      # table of 40: 3 splits
    alone = np.asarray(run(q[:1], k, v, tables[:1, :18], jnp.zeros(1, jnp.int32), pos[:1]))
    np.testing.assert_array_equal(full[0], alone[0])


def test_bad_shapes_name_the_problem():
    q, k, v, tables, slot, pos = random_batch(5, T=3, H=4, KV=2, hd=16, ps=4, B=2, P=2, dtype=jnp.float32)
    with pytest.raises(ValueError, match="KV heads"):
        paged_attention(q[:, :3], k, v, tables, slot, pos)
    with pytest.raises(ValueError, match="slot/pos"):
        paged_attention(q, k, v, tables, slot[:2], pos)
    with pytest.raises(ValueError, match="impl"):
        paged_attention(q, k, v, tables, slot, pos, impl="cuda")


def _lower(f, args, platform):
    with gpu_target() if platform == "cuda" else contextlib.nullcontext():
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _specs(T, H, KV, hd, ps, pages, P, dtype=jnp.bfloat16):
    pool = S((pages, ps, KV, hd), dtype)
    return S((T, H, hd), dtype), pool, pool, S((T, P), jnp.int32), S((T,), jnp.int32), S((T,), jnp.int32)


@pytest.mark.parametrize("T,H,KV,P", [(1, 32, 8, 512), (64, 32, 8, 256), (64, 32, 4, 256)])
def test_lowers_for_cuda_at_model_shapes(T, H, KV, P):
    """Mixtral-8x7B (32 q / 8 kv heads) and Qwen3-30B-A3B (32 / 4), head_dim 128, bf16, 16-token
    pages: decode at batch 1 with 8k context and batch 64 with 4k context."""
    args = _specs(T, H, KV, 128, 16, 8192, P)
    assert "xla.gpu.triton" in _lower(paged_attention, args, "cuda")
    cpu = _lower(paged_attention, args, "cpu")
    assert "triton" not in cpu                                    # auto: jnp path on CPU


def test_odd_head_dim_falls_back_on_gpu():
    args = _specs(4, 8, 2, 80, 16, 64, 8)
    assert "xla.gpu.triton" not in _lower(paged_attention, args, "cuda")
