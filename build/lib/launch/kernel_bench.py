"""Benchmark the Pallas kernels at MoE decode shapes, each against its XLA alternatives.

  gmm:        grouped matmul (expert gate/up projection [m, d] x [g, d, f]): Pallas gmm vs
              lax.ragged_dot vs dense, at Mixtral-8x7B / Qwen3-30B-A3B / DeepSeek-V3 expert shapes.
  ffn:        the expert worker's whole layer, grouped SwiGLU FFN (fused gate/up, then down):
              Pallas vs three ragged_dots, same shapes.
  attention:  paged decode attention over the KV page pool: Pallas kernel vs the jnp gather path,
              at Mixtral-8x7B / Qwen3-30B-A3B attention shapes, batch x context.

Decode is memory bound (expert weights or KV pages read once for a few tokens), so the tables
report achieved GB/s and TFLOP/s and the fraction of a roofline built from the memory bandwidth
and bf16 matmul rate measured on the same device in the same run:
    roofline_s = max(bytes / mem_bw, flops / matmul_rate);  fraction = roofline_s / time_s,
where mem_bw is the better of a copy (read + write counted) and a read-only reduction: decode
mostly reads, and on an H200 the kernels read faster than a copy moves bytes.
Every implementation is checked against its reference on the device before it is timed.

  python launch/kernel_bench.py                      # GPU: both suites
  python launch/kernel_bench.py --smoke              # CPU: tiny shapes, interpret mode, seconds
  python launch/kernel_bench.py --json_out=bench.json --md_out=BENCHMARKS.md
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
from pallas_kernels.paged_attention import paged_attention  # noqa: E402
from pallas_kernels.paged_attention import paged_attention_reference  # noqa: E402
from pallas_kernels.swiglu_ffn import grouped_swiglu_ffn  # noqa: E402
from pallas_kernels.gmm_common import silu_mul  # noqa: E402

_SMOKE = flags.DEFINE_bool("smoke", False, "tiny shapes, interpret mode; runs on CPU in seconds")
_JSON_OUT = flags.DEFINE_string("json_out", None, "write results as JSON to this path")
_MD_OUT = flags.DEFINE_string("md_out", None, "write the tables as Markdown (for BENCHMARKS.md)")
_SUITES = flags.DEFINE_list("suites", ["gmm", "ffn", "attention"], "which kernels: gmm, ffn, attention")
_BATCH = flags.DEFINE_list("attention_batch", ["1", "8", "64"], "decode batch sizes (attention)")
_CONTEXT = flags.DEFINE_list("attention_context", ["1024", "8192"], "context lengths (attention)")
_TOKENS = flags.DEFINE_list("tokens_per_expert", ["1", "4", "16", "64"], "decode batch sizes")
_MODELS = flags.DEFINE_list("models", None, "subset of model names (default: all)")
_ITERS = flags.DEFINE_integer("iters", 20, "timed calls per measurement (after warm-up)")
_GPU_IMPL = flags.DEFINE_enum(
    "gpu_impl", "both", ["both", "auto", "mosaic", "triton"], "CUDA kernel(s); both: Mosaic and Triton rows"
)
_MIN_TIME_S = flags.DEFINE_float("min_time_s", 0.2, "time at least iters calls or this long, whichever is less")
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
# name: (query heads, kv heads, head_dim); pages of 16 tokens, bf16.
ATTN_MODELS = {"mixtral-8x7b": (32, 8, 128), "qwen3-30b-a3b": (32, 4, 128)}
SMOKE_ATTN_MODELS = {"smoke-attn": (8, 2, 32)}
PAGE_SIZE = 16


def timeit(fn, *args, iters, min_time_s=0.0):
    """Seconds per call: one warm-up (compile), then back-to-back calls, median of 3 runs.

    A run is `iters` calls, or fewer for a slow op (down to 3 calls, about min_time_s), so one
    slow XLA path cannot use up a lent GPU's minutes.
    """
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one_s = time.perf_counter() - t0
    if min_time_s:
        iters = max(3, min(iters, int(min_time_s / max(one_s, 1e-9))))
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - t0) / iters)
    return float(np.median(runs))


def measure_device(smoke, iters):
    """(copy GB/s counting read + write, read-only GB/s, bf16 matmul TFLOP/s) on the default device."""
    n_bytes = (16 << 20) if smoke else (1 << 30)
    buf = jax.random.normal(jax.random.key(1), (n_bytes // 2,), jnp.bfloat16)
    copy_s = timeit(jax.jit(lambda b: b * 2), buf, iters=iters)
    read_s = timeit(jax.jit(lambda b: jnp.sum(b, dtype=jnp.float32)), buf, iters=iters)
    dim = 256 if smoke else 8192
    a = jax.random.normal(jax.random.key(0), (dim, dim), jnp.bfloat16)
    mm_s = timeit(
        jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
        a,
        a,
        iters=iters,
    )
    return 2 * n_bytes / copy_s / 1e9, n_bytes / read_s / 1e9, 2 * dim**3 / mm_s / 1e12


def dense_gmm(x_MxK, w_GxKxN, sizes_G):
    """Every expert on every token, then keep each token's own expert (G x the FLOPs)."""
    y_GxMxN = jnp.einsum("mk,gkn->gmn", x_MxK, w_GxKxN, preferred_element_type=jnp.float32)
    onehot_GxM = row_groups(sizes_G, x_MxK.shape[0])[None] == jnp.arange(w_GxKxN.shape[0])[:, None]
    return jnp.einsum("gmn,gm->mn", y_GxMxN, onehot_GxM.astype(jnp.float32)).astype(x_MxK.dtype)


def selected(models: dict) -> dict:
    """The --models subset (all when unset)."""
    return {k: v for k, v in models.items() if not _MODELS.value or k in _MODELS.value}


def measure(row, fn, args, ref, n_bytes, flops, roof, iters, tol):
    """Check fn(*args) against ref (max error relative to ref's scale), then time it."""
    scale = float(np.max(np.abs(ref))) or 1.0
    try:
        err = float(np.max(np.abs(np.asarray(fn(*args), np.float32) - ref))) / scale
        secs = timeit(fn, *args, iters=iters, min_time_s=_MIN_TIME_S.value)
    except Exception as e:  # noqa: BLE001 -- report a failing kernel, keep benchmarking
        return dict(row, status=f"error: {type(e).__name__}: {str(e)[:200]}")
    roofline_s = max(n_bytes / (roof["mem_gb_s"] * 1e9), flops / (roof["matmul_tflop_s"] * 1e12))
    return dict(row, status="ok" if err < tol else "WRONG", rel_err=err, time_us=secs * 1e6,
                gb_s=n_bytes / secs / 1e9, tflop_s=flops / secs / 1e12, roofline_frac=roofline_s / secs)


def pallas_impls(make):
    """{row name: jitted fn} for the Pallas kernel(s): with --gpu_impl=both on CUDA, one row per
    CUDA kernel (Mosaic GPU, Triton); otherwise the one --gpu_impl picks."""
    if _GPU_IMPL.value == "both" and jax.default_backend() == "gpu":
        return {"pallas_mosaic": jax.jit(make("mosaic")), "pallas_triton": jax.jit(make("triton"))}
    impl = "auto" if _GPU_IMPL.value == "both" else _GPU_IMPL.value
    return {"pallas": jax.jit(make(impl))}


def decode_weights(name, tpe, g, shapes):
    """Decode inputs: every expert active with tpe tokens; bf16 x [g*tpe, d] and weights of the
    given [g, ., .] shapes scaled by 1/sqrt(fan_in); same draws for a model/tpe in every suite."""
    keys = jax.random.split(jax.random.key(zlib.crc32(f"{name}/{tpe}".encode())), 1 + len(shapes))
    x = jax.random.normal(keys[0], (g * tpe, shapes[0][1]), jnp.bfloat16)
    ws = [(jax.random.normal(k, s, jnp.float32) / np.sqrt(s[1])).astype(jnp.bfloat16)
          for k, s in zip(keys[1:], shapes)]
    return x, ws, jnp.full((g,), tpe, jnp.int32)


def decode_grid(smoke):
    """(model name, (g, d, f), tokens per expert) for the gmm/ffn suites."""
    models = selected(SMOKE_MODELS if smoke else MODELS)
    tokens = [1, 4] if smoke else [int(t) for t in _TOKENS.value]
    return [(name, gdf, tpe) for name, gdf in models.items() for tpe in tokens]


def gmm_cases(smoke, roof, iters):
    """Gate/up projection at decode; bf16 output (tol 2e-2)."""
    impls = pallas_impls(lambda impl: lambda x, w, s: gmm(x, w, s, gpu_impl=impl))
    impls["ragged_dot"] = jax.jit(lambda x, w, s: jax.lax.ragged_dot(x, w, s))
    impls["dense"] = jax.jit(dense_gmm)
    for name, (g, d, f), tpe in decode_grid(smoke):
        m = g * tpe
        x, (w,), sizes = decode_weights(name, tpe, g, [(g, d, f)])
        ref = np.asarray(jax.jit(gmm_reference)(x, w, sizes), np.float32)
        n_bytes, flops = g * d * f * 2 + m * d * 2 + m * f * 2, 2 * m * d * f
        for impl, fn in impls.items():
            row = dict(suite="gmm", model=name, shape=f"g={g} d={d} f={f} tok/e={tpe}", impl=impl)
            if impl == "dense" and g * m * f * 4 > _DENSE_LIMIT_GIB.value * (1 << 30):
                yield dict(row, status="skipped (dense output too large)")
                continue
            yield measure(row, fn, (x, w, sizes), ref, n_bytes, flops, roof, iters, 2e-2)
        del x, w


@jax.jit
def ffn_reference(x_MxD, wg_GxDxF, wu_GxDxF, wd_GxFxD, sizes_G):
    """The FFN from gmm_reference's per-group loop (the gather oracle of swiglu_ffn would
    materialize [m, d, f] weights: terabytes at DeepSeek-V3 x 64 tokens per expert)."""
    f32 = lambda w: gmm_reference(x_MxD, w, sizes_G, preferred_element_type=jnp.float32)
    h_MxF = silu_mul(f32(wg_GxDxF), f32(wu_GxDxF)).astype(wg_GxDxF.dtype)
    return gmm_reference(h_MxF, wd_GxFxD, sizes_G, preferred_element_type=x_MxD.dtype)


def ffn_cases(smoke, roof, iters):
    """The expert worker's layer at decode: three weight streams read once; bf16 (tol 2e-2)."""
    impls = pallas_impls(lambda impl: lambda *a: grouped_swiglu_ffn(*a, backend="pallas", gpu_impl=impl))
    impls["ragged_dot"] = jax.jit(lambda *a: grouped_swiglu_ffn(*a, backend="ragged_dot"))
    for name, (g, d, f), tpe in decode_grid(smoke):
        m = g * tpe
        x, ws, sizes = decode_weights(name, tpe, g, [(g, d, f), (g, d, f), (g, f, d)])
        args = (x, *ws, sizes)
        ref = np.asarray(ffn_reference(*args), np.float32)
        n_bytes, flops = 3 * g * d * f * 2 + 2 * m * d * 2, 6 * m * d * f
        for impl, fn in impls.items():
            row = dict(suite="ffn", model=name, shape=f"g={g} d={d} f={f} tok/e={tpe}", impl=impl)
            yield measure(row, fn, args, ref, n_bytes, flops, roof, iters, 2e-2)
        del x, ws, args


def attention_cases(smoke, roof, iters):
    """Decode: `batch` requests, one query token each at position context-1, pages scattered
    through a pool of exactly the pages needed; bf16 (tol 2e-2 of the output scale)."""
    impls = {
        "pallas_paged": jax.jit(lambda *a: paged_attention(*a, impl="pallas")),
        "jnp_gather": jax.jit(lambda *a: paged_attention(*a, impl="jnp")),
    }
    models = selected(SMOKE_ATTN_MODELS if smoke else ATTN_MODELS)
    shapes = [(2, 64)] if smoke else [(int(b), int(c)) for b in _BATCH.value for c in _CONTEXT.value]
    for name, (H, KV, hd) in models.items():
        for batch, ctx in shapes:
            P = -(-ctx // PAGE_SIZE)
            keys = jax.random.split(jax.random.key(zlib.crc32(f"{name}/{batch}/{ctx}".encode())), 4)
            pool = (batch * P + 1, PAGE_SIZE, KV, hd)
            k = jax.random.normal(keys[0], pool, jnp.bfloat16)
            v = jax.random.normal(keys[1], pool, jnp.bfloat16)
            q = jax.random.normal(keys[2], (batch, H, hd), jnp.bfloat16)
            tables = (jax.random.permutation(keys[3], batch * P) + 1).reshape(batch, P).astype(jnp.int32)
            slot, pos = jnp.arange(batch, dtype=jnp.int32), jnp.full((batch,), ctx - 1, jnp.int32)
            args = (q, k, v, tables, slot, pos)
            ref = np.asarray(jax.jit(paged_attention_reference)(
                *(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args)), np.float32)
            n_bytes, flops = 2 * batch * ctx * KV * hd * 2 + 2 * batch * H * hd * 2, 4 * batch * H * ctx * hd
            for impl, fn in impls.items():
                row = dict(suite="attention", model=name, shape=f"H={H} KV={KV} hd={hd} B={batch} ctx={ctx}",
                           impl=impl)
                yield measure(row, fn, args, ref, n_bytes, flops, roof, iters, 2e-2)


SUITES = {"gmm": gmm_cases, "ffn": ffn_cases, "attention": attention_cases}
COLUMNS = ("time_us", "gb_s", "tflop_s", "roofline_frac", "rel_err")


def _cells(r):
    if "time_us" not in r:
        return ["-"] * len(COLUMNS)
    return [f"{r['time_us']:.1f}", f"{r['gb_s']:.1f}", f"{r['tflop_s']:.2f}",
            f"{100 * r['roofline_frac']:.1f}", f"{r['rel_err']:.1e}"]


def header(roof):
    return (f"device: {roof['device']}  copy {roof['copy_gb_s']:.0f} GB/s  read {roof['read_gb_s']:.0f} GB/s  "
            f"matmul {roof['matmul_tflop_s']:.1f} TFLOP/s (bf16, measured)")


def print_table(rows, roof):
    print(header(roof))
    head = f"{'suite':9} {'model':15} {'shape':36} {'impl':12} {'us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'roof%':>6} {'relerr':>8} status"
    print(head)
    print("-" * len(head))
    for r in rows:
        t, gb, tf, rf, er = _cells(r)
        print(f"{r['suite']:9} {r['model']:15} {r['shape']:36} {r['impl']:12} {t:>9} {gb:>7} {tf:>8} {rf:>6} {er:>8} {r['status']}")


def markdown(rows, roof):
    lines = [f"{header(roof)}, {time.strftime('%Y-%m-%d')}, jax {jax.__version__}", "",
             "| suite | model | shape | impl | us | GB/s | TFLOP/s | roofline % | rel err | status |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['suite']} | {r['model']} | {r['shape']} | {r['impl']} | " + " | ".join(_cells(r))
              + f" | {r['status']} |" for r in rows]
    return "\n".join(lines) + "\n"


def write_outputs(rows, roof):
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as fh:
            json.dump(dict(roof, rows=rows), fh, indent=1)
    if _MD_OUT.value:
        with open(_MD_OUT.value, "w") as fh:
            fh.write(markdown(rows, roof))


def main(argv):
    del argv
    smoke = _SMOKE.value
    if not smoke and jax.default_backend() == "cpu":
        print("No GPU/TPU: pass --smoke for the CPU (interpret-mode) check.")
        return 1
    unknown = set(_SUITES.value) - set(SUITES)
    if unknown:
        raise app.UsageError(f"unknown --suites {sorted(unknown)}; choose from {sorted(SUITES)}")
    iters = 2 if smoke else _ITERS.value
    copy_gbs, read_gbs, tflops = measure_device(smoke, iters)
    roof = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), copy_gb_s=copy_gbs,
                read_gb_s=read_gbs, mem_gb_s=max(copy_gbs, read_gbs), matmul_tflop_s=tflops, smoke=smoke)
    print(header(roof), flush=True)
    rows = []
    for name in _SUITES.value:
        for r in SUITES[name](smoke, roof, iters):  # each row printed and saved as it lands
            rows.append(r)
            print(" | ".join([r["suite"], r["model"], r["shape"], r["impl"], *_cells(r), r["status"]]), flush=True)
            write_outputs(rows, roof)
    print_table(rows, roof)
    bad = [r for r in rows if r["status"] != "ok" and not r["status"].startswith("skip")]
    return 1 if bad else 0


if __name__ == "__main__":
    app.run(main)
