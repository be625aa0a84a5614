"""Benchmark the grouped matmul at MoE expert shapes: Pallas gmm vs lax.ragged_dot vs dense.

Decode is memory bound (each active expert's [d, f] weights are read once for a few tokens), so
the table reports achieved GB/s and TFLOP/s and the fraction of a roofline built from the copy
bandwidth and bf16 matmul rate measured on the same device in the same run:
    roofline_s = max(bytes / copy_bw, flops / matmul_rate);  fraction = roofline_s / time_s.
Every implementation is checked against gmm_reference on the device before it is timed.

  python launch/kernel_bench.py                      # GPU: Mixtral / Qwen3-30B-A3B / DeepSeek-V3
  python launch/kernel_bench.py --smoke              # CPU: tiny shapes, interpret mode, seconds
  python launch/kernel_bench.py --json_out=bench.json
"""

import json
import os
import sys
import time
import zlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

try:
    import pallas_kernels  # noqa: F401
except ImportError:  # run as a script from a checkout: put the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.grouped_matmul import gmm  # noqa: E402
from pallas_kernels.grouped_matmul import gmm_reference  # noqa: E402
from pallas_kernels.grouped_matmul import row_groups  # noqa: E402

_SMOKE = flags.DEFINE_bool("smoke", False, "tiny shapes, interpret mode; runs on CPU in seconds")
_JSON_OUT = flags.DEFINE_string("json_out", None, "write results as JSON to this path")
_TOKENS = flags.DEFINE_list("tokens_per_expert", ["1", "4", "16", "64"], "decode batch sizes")
_MODELS = flags.DEFINE_list("models", None, "subset of model names (default: all)")
_ITERS = flags.DEFINE_integer("iters", 20, "timed calls per measurement (after warm-up)")
_GPU_IMPL = flags.DEFINE_enum("gpu_impl", "auto", ["auto", "mosaic", "triton"], "CUDA kernel")
_DENSE_LIMIT_GIB = flags.DEFINE_float(
    "dense_limit_gib", 4.0, "skip dense when its [g, m, n] f32 output exceeds this"
)

# name: (experts, d_model, d_ff per expert); timed op: the gate/up projection [m,d] x [g,d,f].
MODELS = {
    "mixtral-8x7b": (8, 4096, 14336),
    "qwen3-30b-a3b": (128, 2048, 768),
    "deepseek-v3": (256, 7168, 2048),
}
SMOKE_MODELS = {"smoke-4x128x256": (4, 128, 256), "smoke-16x64x128": (16, 64, 128)}


def timeit(fn, *args, iters):
    """Seconds per call: one warm-up (compile), then `iters` back-to-back calls, median of 3."""
    jax.block_until_ready(fn(*args))
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - t0) / iters)
    return float(np.median(runs))


def measure_device(smoke, iters):
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s) on the default device."""
    n_bytes = (16 << 20) if smoke else (1 << 30)
    buf = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    copy_s = timeit(jax.jit(lambda b: b * 2), buf, iters=iters)
    dim = 256 if smoke else 8192
    a = jax.random.normal(jax.random.key(0), (dim, dim), jnp.bfloat16)
    mm_s = timeit(
        jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
        a,
        a,
        iters=iters,
    )
    return 2 * n_bytes / copy_s / 1e9, 2 * dim**3 / mm_s / 1e12


def dense_gmm(x_MxK, w_GxKxN, sizes_G):
    """Every expert on every token, then keep each token's own expert (G x the FLOPs)."""
    y_GxMxN = jnp.einsum("mk,gkn->gmn", x_MxK, w_GxKxN, preferred_element_type=jnp.float32)
    onehot_GxM = row_groups(sizes_G, x_MxK.shape[0])[None] == jnp.arange(w_GxKxN.shape[0])[:, None]
    return jnp.einsum("gmn,gm->mn", y_GxMxN, onehot_GxM.astype(jnp.float32)).astype(x_MxK.dtype)


def implementations(gpu_impl):
    return {
        "pallas_gmm": jax.jit(lambda x, w, s: gmm(x, w, s, gpu_impl=gpu_impl)),
        "ragged_dot": jax.jit(lambda x, w, s: jax.lax.ragged_dot(x, w, s)),
        "dense": jax.jit(dense_gmm),
    }


def bench_case(name, g, d, f, tpe, impls, bw_gbs, tflops, iters, dense_limit_gib):
    m = g * tpe
    kx, kw = jax.random.split(jax.random.key(zlib.crc32(f"{name}/{tpe}".encode())))
    x = jax.random.normal(kx, (m, d), jnp.bfloat16)
    w = (jax.random.normal(kw, (g, d, f), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
    sizes = jnp.full((g,), tpe, jnp.int32)  # decode: every expert active, tpe tokens each
    ref = np.asarray(jax.jit(gmm_reference)(x, w, sizes), np.float32)
    scale = float(np.max(np.abs(ref))) or 1.0
    n_bytes = g * d * f * 2 + m * d * 2 + m * f * 2
    flops = 2 * m * d * f
    roofline_s = max(n_bytes / (bw_gbs * 1e9), flops / (tflops * 1e12))
    rows = []
    for impl, fn in impls.items():
        row = dict(model=name, experts=g, d=d, f=f, tokens_per_expert=tpe, m=m, impl=impl)
        if impl == "dense" and g * m * f * 4 > dense_limit_gib * (1 << 30):
            rows.append(dict(row, status="skipped (dense output too large)"))
            continue
        try:
            err = float(np.max(np.abs(np.asarray(fn(x, w, sizes), np.float32) - ref))) / scale
        except Exception as e:  # noqa: BLE001 -- report a failing kernel, keep benchmarking
            rows.append(dict(row, status=f"error: {type(e).__name__}: {str(e)[:200]}"))
            continue
        ok = err < 2e-2  # bf16 output: one rounding of 2^-8 relative, plus summation order
        secs = timeit(fn, x, w, sizes, iters=iters)
        rows.append(
            dict(
                row,
                status="ok" if ok else "WRONG",
                rel_err=err,
                time_us=secs * 1e6,
                gb_s=n_bytes / secs / 1e9,
                tflop_s=flops / secs / 1e12,
                roofline_frac=roofline_s / secs,
            )
        )
    return rows


def print_table(rows, bw_gbs, tflops):
    print(
        f"device: {jax.devices()[0].device_kind}  copy {bw_gbs:.0f} GB/s  "
        f"matmul {tflops:.1f} TFLOP/s (bf16, measured)"
    )
    head = (
        f"{'model':16} {'g':>4} {'d':>5} {'f':>6} {'tok/e':>5} {'impl':11} {'us':>9} "
        f"{'GB/s':>7} {'TFLOP/s':>8} {'roof%':>6} {'relerr':>8} status"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "time_us" in r:
            nums = (
                f"{r['time_us']:9.1f} {r['gb_s']:7.1f} {r['tflop_s']:8.2f} "
                f"{100 * r['roofline_frac']:6.1f} {r['rel_err']:8.1e}"
            )
        else:
            nums = f"{'-':>9} {'-':>7} {'-':>8} {'-':>6} {'-':>8}"
        print(
            f"{r['model']:16} {r['experts']:4d} {r['d']:5d} {r['f']:6d} "
            f"{r['tokens_per_expert']:5d} {r['impl']:11} {nums} {r['status']}"
        )


def main(argv):
    del argv
    smoke = _SMOKE.value
    if not smoke and jax.default_backend() == "cpu":
        print("No GPU/TPU: pass --smoke for the CPU (interpret-mode) check.")
        return 1
    models = SMOKE_MODELS if smoke else MODELS
    if _MODELS.value:
        models = {k: v for k, v in models.items() if k in _MODELS.value}
    tokens = [1, 4] if smoke else [int(t) for t in _TOKENS.value]
    iters = 2 if smoke else _ITERS.value
    bw_gbs, tflops = measure_device(smoke, iters)
    impls = implementations(_GPU_IMPL.value)
    rows = []
    for name, (g, d, f) in models.items():
        for tpe in tokens:
            rows += bench_case(name, g, d, f, tpe, impls, bw_gbs, tflops, iters, _DENSE_LIMIT_GIB.value)
    print_table(rows, bw_gbs, tflops)
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as fh:
            json.dump(
                dict(
                    device=jax.devices()[0].device_kind,
                    backend=jax.default_backend(),
                    copy_gb_s=bw_gbs,
                    matmul_tflop_s=tflops,
                    smoke=smoke,
                    rows=rows,
                ),
                fh,
                indent=1,
            )
    bad = [r for r in rows if r["status"] not in ("ok",) and not r["status"].startswith("skip")]
    return 1 if bad else 0


if __name__ == "__main__":
    app.run(main)
