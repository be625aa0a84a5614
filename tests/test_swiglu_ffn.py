"""Grouped SwiGLU FFN: every backend vs the per-row-gather reference, and CUDA/TPU lowering."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gpu_target import gpu_target
from pallas_kernels.swiglu_ffn import grouped_swiglu_ffn
from pallas_kernels.swiglu_ffn import grouped_swiglu_ffn_slots
from pallas_kernels.swiglu_ffn import grouped_swiglu_reference

S = jax.ShapeDtypeStruct


def random_ffn(seed, m, d, f, g, x_dtype, w_dtype, *, tail, empty):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, d)), x_dtype)
    w = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[1]), w_dtype)
    p = rng.dirichlet(np.ones(g))
    p[rng.choice(g, size=empty, replace=False)] = 0
    sizes = jnp.asarray(rng.multinomial(m - tail, p / p.sum()), jnp.int32)
    return x, w(g, d, f), w(g, d, f), w(g, f, d), sizes


def tolerance(x_dtype, w_dtype):
    """f32 everywhere: summation order only. bf16 weights: h is rounded to bf16 (2^-8) and the
    reference may round a value across a bf16 boundary that the kernel does not; bf16 output:
    one more rounding."""
    if jnp.dtype(w_dtype) == jnp.float32 and jnp.dtype(x_dtype) == jnp.float32:
        return 1e-5
    return 2e-2


# (seed, m, d, f, g, x dtype, w dtype, rows past total, empty groups)
CASES = [
    (0, 29, 64, 96, 4, jnp.float32, jnp.float32, 3, 1),
    (1, 48, 128, 64, 8, jnp.float32, jnp.bfloat16, 0, 3),  # expert worker: f32 x, bf16 weights
    (2, 21, 64, 128, 12, jnp.bfloat16, jnp.bfloat16, 2, 5),  # more groups than tokens/group
]


@pytest.mark.usefixtures("ieee_f32_dots")  # the ragged_dot / dense backends are XLA dots
@pytest.mark.parametrize("backend", ["pallas", "tiles", "ragged_dot", "dense"])
@pytest.mark.parametrize("seed,m,d,f,g,x_dtype,w_dtype,tail,empty", CASES)
def test_backends_match_reference(backend, seed, m, d, f, g, x_dtype, w_dtype, tail, empty):
    args = random_ffn(seed, m, d, f, g, x_dtype, w_dtype, tail=tail, empty=empty)
    expected = np.asarray(grouped_swiglu_reference(*args), np.float32)
    y = grouped_swiglu_ffn(*args, backend=backend)
    assert y.shape == (m, d) and y.dtype == jnp.dtype(x_dtype)
    tol = tolerance(x_dtype, w_dtype)
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=tol, atol=tol * scale)
    if tail:
        assert not np.asarray(y[m - tail :]).any()  # rows past sum(group_sizes) are zero


@pytest.mark.parametrize("seed,m,d,f,g,x_dtype,w_dtype,tail,empty", CASES)
def test_per_slot_weights_match_the_stacked_tiles_backend(seed, m, d, f, g, x_dtype, w_dtype, tail, empty):
    """Weights kept one array per expert (how an EW holds them on CPU) give the stacked result
    bit for bit: same tiles, same products."""
    x, wg, wu, wd, sizes = random_ffn(seed, m, d, f, g, x_dtype, w_dtype, tail=tail, empty=empty)
    split = [tuple(w[i] for i in range(g)) for w in (wg, wu, wd)]
    y = grouped_swiglu_ffn_slots(x, *split, sizes)
    assert y.dtype == jnp.dtype(x_dtype)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(grouped_swiglu_ffn(x, wg, wu, wd, sizes, backend="tiles")))
    with pytest.raises(ValueError, match="experts' weights"):
        grouped_swiglu_ffn_slots(x, *[w[:-1] for w in split], sizes)


def test_forced_interpret_equals_default_on_cpu():
    args = random_ffn(3, 16, 64, 64, 3, jnp.float32, jnp.float32, tail=1, empty=0)
    np.testing.assert_array_equal(grouped_swiglu_ffn(*args, interpret=True), grouped_swiglu_ffn(*args))


def test_shape_errors_name_the_shapes():
    x, wg, wu, wd, sizes = random_ffn(4, 8, 32, 16, 2, jnp.float32, jnp.float32, tail=0, empty=0)
    with pytest.raises(ValueError, match="w_down"):
        grouped_swiglu_ffn(x, wg, wu, wg, sizes)
    with pytest.raises(ValueError, match="backend"):
        grouped_swiglu_ffn(x, wg, wu, wd, sizes, backend="cuda")


@pytest.mark.parametrize(
    "platform,gpu_impl,marker",
    [("cuda", "auto", "xla.gpu.triton"), ("cuda", "mosaic", "mosaic_gpu"), ("tpu", "auto", "tpu_custom_call")],
)
@pytest.mark.parametrize("m", [64, 512])
def test_lowers_at_mixtral_shapes(platform, gpu_impl, marker, m):
    g, d, f = 8, 4096, 14336  # Mixtral-8x7B experts
    args = (
        S((m, d), jnp.float32),
        S((g, d, f), jnp.bfloat16),
        S((g, d, f), jnp.bfloat16),
        S((g, f, d), jnp.bfloat16),
        S((g,), jnp.int32),
    )
    fn = functools.partial(grouped_swiglu_ffn, backend="pallas", gpu_impl=gpu_impl)
    with gpu_target() if platform == "cuda" else contextlib.nullcontext():
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) >= 2  # gate/up kernel and down kernel
