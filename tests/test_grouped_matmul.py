"""Grouped matmul: interpret-mode kernels vs the jnp reference on CPU, and CUDA/TPU lowering.

Lowering tests trace with ShapeDtypeStructs at Mixtral-8x7B expert shapes and lower for
"cuda"/"tpu" on this CPU-only machine, so shared-memory, layout and block-shape errors of the
GPU/TPU kernels fail here rather than on the first GPU run. Nothing here needs a GPU.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gmm_common
from pallas_kernels.gmm_mosaic_gpu import gmm_mosaic_gpu
from pallas_kernels.gmm_tpu import gmm_tpu
from pallas_kernels.gmm_triton import block_sizes as triton_block_sizes
from pallas_kernels.gpu_target import gpu_target
from pallas_kernels.grouped_matmul import gmm
from pallas_kernels.grouped_matmul import gmm_reference
from pallas_kernels.grouped_matmul import gmm_swiglu

S = jax.ShapeDtypeStruct
MIXTRAL = dict(g=8, k=4096, n=14336)  # experts, d_model, d_ff


def random_sizes(rng, m, g, *, tail, empty):
    """Group sizes summing to m - tail, with `empty` groups forced to zero."""
    p = rng.dirichlet(np.ones(g))
    p[rng.choice(g, size=empty, replace=False)] = 0
    sizes = rng.multinomial(m - tail, p / p.sum()).astype(np.int32)
    return jnp.asarray(sizes)


def random_case(seed, m, k, n, g, dtype, *, tail=0, empty=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
    return x, w, random_sizes(rng, m, g, tail=tail, empty=empty)


def assert_close(actual, expected, dtype):
    """f32: products are exact f32 (HIGHEST); only summation order differs -> 1e-5 relative to the
    output scale. bf16 output: one bf16 rounding (2^-8 relative) -> 1e-2 of the scale."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = float(np.max(np.abs(expected))) or 1.0
    tol = 1e-5 if jnp.dtype(dtype) == jnp.float32 else 1e-2
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


# (seed, m, k, n, g, dtype, rows past the total, empty groups): decode-like ragged shapes.
CASES = [
    (0, 37, 96, 80, 5, jnp.float32, 3, 1),  # k, n not multiples of the blocks
    (1, 64, 128, 256, 8, jnp.bfloat16, 0, 2),
    (2, 19, 64, 128, 16, jnp.float32, 2, 6),  # more groups than rows: many empty
    (3, 130, 256, 128, 4, jnp.bfloat16, 7, 0),  # groups larger than a row block
]


@pytest.mark.parametrize("seed,m,k,n,g,dtype,tail,empty", CASES)
def test_gmm_interpret_matches_reference(seed, m, k, n, g, dtype, tail, empty):
    x, w, sizes = random_case(seed, m, k, n, g, dtype, tail=tail, empty=empty)
    expected = gmm_reference(x, w, sizes)
    assert_close(gmm(x, w, sizes), expected, dtype)  # CPU: portable kernel, interpret mode
    if tail:
        assert not np.asarray(gmm(x, w, sizes)[m - tail :]).any()
    # f32 output from bf16 inputs keeps the f32 accumulator.
    out32 = gmm(x, w, sizes, preferred_element_type=jnp.float32)
    assert out32.dtype == jnp.float32
    assert_close(out32, gmm_reference(x, w, sizes, preferred_element_type=jnp.float32), jnp.float32)


def test_reference_matches_ragged_dot():
    x, w, sizes = random_case(4, 40, 64, 48, 6, jnp.float32, tail=5, empty=2)
    hi = jax.lax.Precision.HIGHEST
    assert_close(gmm_reference(x, w, sizes), jax.lax.ragged_dot(x, w, sizes, precision=hi), jnp.float32)


def test_group_sizes_past_m_are_clamped():
    x, w, _ = random_case(5, 24, 32, 32, 3, jnp.float32)
    sizes = jnp.asarray([10, 30, 5], jnp.int32)  # sum 45 > m = 24
    clamped = gmm_common.clamp_group_sizes(sizes, 24)
    np.testing.assert_array_equal(clamped, [10, 14, 0])
    assert_close(gmm(x, w, sizes), gmm_reference(x, w, clamped), jnp.float32)


def test_work_items_cover_each_row_once():
    sizes = jnp.asarray([0, 17, 1, 0, 40, 16], jnp.int32)
    group_W, row_W, cnt_W = map(np.asarray, gmm_common.work_items(sizes, 80, 16))
    covered = np.zeros(80, int)
    for gid, r0, c in zip(group_W, row_W, cnt_W):
        covered[r0 : r0 + c] += 1
        ends = np.cumsum(np.asarray(sizes))
        if c:
            assert ends[gid] - sizes[gid] <= r0 and r0 + c <= ends[gid]
    np.testing.assert_array_equal(covered, np.arange(80) < 74)
    assert cnt_W.sum() == 74 and (cnt_W > 0).sum() == 2 + 1 + 3 + 1  # one read per <=16 rows


def test_swiglu_interpret_matches_reference():
    x, wg, sizes = random_case(6, 50, 64, 128, 6, jnp.bfloat16, tail=4, empty=2)
    wu = random_case(7, 1, 64, 128, 6, jnp.bfloat16)[1]
    expected = gmm_common.silu_mul(
        gmm_reference(x, wg, sizes, preferred_element_type=jnp.float32),
        gmm_reference(x, wu, sizes, preferred_element_type=jnp.float32),
    )
    assert_close(gmm_swiglu(x, wg, wu, sizes, out_dtype=jnp.float32), expected, jnp.float32)


@pytest.mark.usefixtures("ieee_f32_dots")  # interpret mode runs the kernel's dots in XLA
def test_tpu_kernel_interpret_matches_reference():
    x, w, sizes = random_case(8, 45, 128, 256, 6, jnp.float32, tail=5, empty=2)
    assert_close(gmm_tpu(x, w, sizes, interpret=True), gmm_reference(x, w, sizes), jnp.float32)


@pytest.mark.parametrize("m,tail,n_w", [(70, 4, 2), (20, 0, 1)])  # 20 < BM: padded x box
def test_mosaic_gpu_kernel_in_gpu_interpreter(m, tail, n_w):
    """Runs the Hopper kernel itself (TMA, barriers, store ladder) in Mosaic GPU's simulator,
    with its race detector. Private API: skipped if it moves."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:
        pytest.skip(f"Mosaic GPU interpreter not available: {e}")
    # TMA zero-fills rows past m; the simulator gives NaN there instead (never stored).
    params = InterpretGPUParams(out_of_bounds_reads="uninitialized", detect_races=True)
    x, wg, sizes = random_case(9 + m, m, 128, 256, 4, jnp.bfloat16, tail=tail, empty=1)
    wu = random_case(10, 1, 128, 256, 4, jnp.bfloat16)[1]
    run = functools.partial(gmm_mosaic_gpu, out_dtype=jnp.float32, num_sms=3, interpret=params)
    ref_g = gmm_reference(x, wg, sizes, preferred_element_type=jnp.float32)
    assert_close(run(x, (wg,), sizes), ref_g, jnp.float32)
    assert not ipc.get_races().races_found
    if n_w == 1:
        return
    ref_u = gmm_reference(x, wu, sizes, preferred_element_type=jnp.float32)
    assert_close(run(x, (wg, wu), sizes), gmm_common.silu_mul(ref_g, ref_u), jnp.float32)
    assert not ipc.get_races().races_found


def _lower(f, args, platform):
    with gpu_target() if platform == "cuda" else contextlib.nullcontext():
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _mixtral_args(m, dtype, n_w=1):
    g, k, n = MIXTRAL["g"], MIXTRAL["k"], MIXTRAL["n"]
    ws = (S((g, k, n), dtype),) * n_w
    return S((m, k), dtype), ws, S((g,), jnp.int32)


@pytest.mark.parametrize("m", [64, 512])
def test_lowers_for_cuda_at_mixtral_shapes(m):
    x, (w,), sizes = _mixtral_args(m, jnp.bfloat16)
    text = _lower(gmm, (x, w, sizes), "cuda")  # auto: Triton, the faster one on an H200
    assert "xla.gpu.triton" in text and "mosaic_gpu" not in text
    text = _lower(functools.partial(gmm, gpu_impl="mosaic"), (x, w, sizes), "cuda")
    assert "mosaic_gpu" in text and "xla.gpu.triton" not in text
    x32, (w32,), _ = _mixtral_args(m, jnp.float32)
    assert "xla.gpu.triton" in _lower(gmm, (x32, w32, sizes), "cuda")
    with pytest.raises(ValueError, match="mosaic"):  # f32: no wgmma path
        _lower(functools.partial(gmm, gpu_impl="mosaic"), (x32, w32, sizes), "cuda")
    for impl in ("mosaic", "triton"):  # the fused gate/up kernels (two weight streams)
        text = _lower(functools.partial(gmm_swiglu, gpu_impl=impl), (x, w, w, sizes), "cuda")
        assert ("mosaic_gpu" if impl == "mosaic" else "xla.gpu.triton") in text


@pytest.mark.parametrize("g,k,n", [(128, 2048, 768), (256, 7168, 2048)])  # Qwen3-30B-A3B, DS-V3
def test_lowers_for_cuda_at_other_model_shapes(g, k, n):
    x, w, sizes = S((4 * g, k), jnp.bfloat16), S((g, k, n), jnp.bfloat16), S((g,), jnp.int32)
    assert "mosaic_gpu" in _lower(functools.partial(gmm_swiglu, gpu_impl="mosaic"), (x, w, w, sizes), "cuda")
    assert "xla.gpu.triton" in _lower(gmm, (x, w, sizes), "cuda")


@pytest.mark.parametrize("m", [64, 512])
def test_lowers_for_tpu_at_mixtral_shapes(m):
    x, (w,), sizes = _mixtral_args(m, jnp.bfloat16)
    assert "tpu_custom_call" in _lower(gmm, (x, w, sizes), "tpu")
    assert "tpu_custom_call" in _lower(gmm_swiglu, (x, w, w, sizes), "tpu")


def test_cpu_lowering_has_no_gpu_kernels():
    """platform_dependent prunes the other platforms' branches when lowering for one."""
    x, (w,), sizes = _mixtral_args(64, jnp.bfloat16)
    text = _lower(gmm, (x, w, sizes), "cpu")
    assert "mosaic_gpu" not in text and "xla.gpu.triton" not in text


def test_too_much_shared_memory_fails_at_lowering():
    """The point of the lowering tests: Mosaic GPU checks shared memory when lowering."""
    x, ws, sizes = _mixtral_args(64, jnp.bfloat16, n_w=2)
    f = functools.partial(gmm_mosaic_gpu, steps=10, bn=256)
    with pytest.raises(Exception, match="shared memory"):
        _lower(f, (x, ws, sizes), "cuda")


def test_triton_blocks_are_powers_of_two():
    for m, g, k, n in [(64, 8, 4096, 14336), (3, 256, 7168, 2048), (512, 128, 2048, 768)]:
        for b in triton_block_sizes(m, g, k, n, interpret=False):
            assert b >= 16 and b & (b - 1) == 0


def test_gpu_target_names_the_gpu_lowered_for():
    x, (w,), sizes = _mixtral_args(64, jnp.bfloat16)
    with gpu_target(80):  # A100: the Triton kernel
        text = jax.jit(gmm).trace(x, w, sizes).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
    with pytest.raises(ValueError, match="arch 70"):
        with gpu_target(70):
            pass
