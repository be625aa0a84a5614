"""Compile the Pallas Triton kernels for a real GPU target without a GPU, and report resources.

Lowering for CUDA on a CPU machine (what the tests do) checks the Pallas -> Triton IR step only.
This goes one step further: the Triton IR of each kernel at model shapes is compiled by the
`triton` wheel (TTIR -> TTGIR -> LLVM -> PTX -> cubin with its bundled ptxas) for the chosen
architecture, and cuobjdump reads the cubin's resource usage. A kernel that would not compile,
would spill registers to local memory, or would not fit the SM's shared memory fails here, before
a GPU is ever lent. Timing still needs a GPU (kernel_bench.py).

  pip install triton    # not a runtime dependency: only this check needs it (~290 MB)
  python -m launch.triton_check                       # sm_90 (H100/H200)
  python -m launch.triton_check --arch 80 --json_out triton_sm80.json

The Triton IR is captured by wrapping jax's private Pallas Triton lowering entry point
(jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module); this tool breaks, loudly, if
jax moves it. The compile uses the num_warps/num_stages each kernel lowers with.
"""

import functools
import json
import os
import re
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

try:
    import pallas_kernels  # noqa: F401
except ImportError:  # run as a script from a checkout: put the repo root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.gpu_target import gpu_target  # noqa: E402
from pallas_kernels.grouped_matmul import gmm  # noqa: E402
from pallas_kernels.grouped_matmul import gmm_swiglu  # noqa: E402
from pallas_kernels.paged_attention import paged_attention  # noqa: E402

_ARCH = flags.DEFINE_integer("arch", 90, "CUDA compute capability x10 (90 = H100/H200, 80 = A100)")
_JSON_OUT = flags.DEFINE_string("json_out", None, "write the table as JSON")

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
# Per-SM limits by arch: (registers, shared memory bytes usable by blocks).
SM_LIMITS = {80: (65536, 167936), 86: (65536, 101376), 89: (65536, 101376), 90: (65536, 232448)}


def cases():
    """(name, function, argument specs): the GPU kernels at the shapes kernel_bench times."""
    attn = functools.partial(paged_attention, impl="pallas")
    out = []
    for model, H, KV in (("mixtral", 32, 8), ("qwen3-30b", 32, 4)):
        pool = S((8192, 16, KV, 128), BF16)
        for T, P in ((1, 512), (64, 256)):
            out.append((f"paged_attention {model} B={T} ctx={P * 16}", attn,
                        (S((T, H, 128), BF16), pool, pool, S((T, P), jnp.int32), S((T,), jnp.int32),
                         S((T,), jnp.int32))))
    for model, g, d, f in (("mixtral", 8, 4096, 14336), ("qwen3-30b", 128, 2048, 768),
                           ("deepseek-v3", 256, 7168, 2048)):
        for tpe in (1, 64):
            x, w, sizes = S((g * tpe, d), BF16), S((g, d, f), BF16), S((g,), jnp.int32)
            out.append((f"gmm triton {model} m={g * tpe}", functools.partial(gmm, gpu_impl="triton"),
                        (x, w, sizes)))
            out.append((f"gmm_swiglu triton {model} m={g * tpe}",
                        functools.partial(gmm_swiglu, gpu_impl="triton"), (x, w, w, sizes)))
    x, w, sizes = S((64, 4096), jnp.float32), S((8, 4096, 14336), jnp.float32), S((8,), jnp.int32)
    out.append(("gmm triton f32 mixtral m=64", gmm, (x, w, sizes)))
    return out


def triton_modules(fn, args, arch):
    """[(Triton IR text, num_warps, num_stages)] of every Pallas Triton kernel in fn's CUDA lowering."""
    from jax._src.pallas.triton import lowering

    captured, original = [], lowering.lower_jaxpr_to_triton_module

    def spy(*a, **k):
        result = original(*a, **k)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = spy
    try:
        with gpu_target(arch):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    warps = [int(w) for w in re.findall(r"num_warps = (\d+)", text)]
    stages = [int(s) for s in re.findall(r"num_stages = (\d+)", text)]
    if not (len(captured) == len(warps) == len(stages)):
        raise RuntimeError(f"found {len(captured)} Triton modules but {len(warps)} launch configs")
    return list(zip(captured, warps, stages))


def compile_one(ttir, warps, stages, arch, workdir):
    """Compile with the triton wheel; resources from cuobjdump -res-usage on the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(workdir, "kernel.ttir")
    with open(path, "w") as fh:
        fh.write(ttir)
    kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    cubin = os.path.join(workdir, "kernel.cubin")
    with open(cubin, "wb") as fh:
        fh.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    res = {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", usage)}
    return dict(registers=res["REG"], local_bytes=res["LOCAL"] + res.get("STACK", 0),
                shared_bytes=kernel.metadata.shared + res["SHARED"], num_warps=warps, num_stages=stages)


def blocks_per_sm(row, arch):
    regs, smem = SM_LIMITS.get(arch, SM_LIMITS[80])
    by_regs = regs // (row["registers"] * 32 * row["num_warps"])
    by_smem = smem // max(row["shared_bytes"], 1)
    return min(by_regs, by_smem)


def main(argv):
    del argv
    try:
        import triton  # noqa: F401
    except ImportError:
        print("this check needs the triton wheel: pip install triton", file=sys.stderr)
        return 2
    arch, rows = _ARCH.value, []
    smem_limit = SM_LIMITS.get(arch, SM_LIMITS[80])[1]
    with tempfile.TemporaryDirectory() as workdir:
        for name, fn, args in cases():
            for ttir, warps, stages in triton_modules(fn, args, arch):
                row = dict(kernel=name, arch=arch)
                try:
                    row.update(compile_one(ttir, warps, stages, arch, workdir))
                except Exception as e:  # noqa: BLE001 -- report every kernel, fail at the end
                    rows.append(dict(row, status=f"error: {type(e).__name__}: {str(e)[:300]}"))
                    continue
                row["blocks_per_sm"] = blocks_per_sm(row, arch)
                problems = (["spills"] if row["local_bytes"] else []) + (
                    ["shared memory"] if row["shared_bytes"] > smem_limit else [])
                rows.append(dict(row, status="ok" if not problems else "FAIL: " + ", ".join(problems)))
    print(f"triton {__import__('triton').__version__}, jax {jax.__version__}, target sm_{arch}")
    print(f"{'kernel':42} {'warps':>5} {'stages':>6} {'regs':>5} {'local B':>7} {'smem KiB':>8} {'blk/SM':>6} status")
    for r in rows:
        if "registers" in r:
            print(f"{r['kernel']:42} {r['num_warps']:5d} {r['num_stages']:6d} {r['registers']:5d} "
                  f"{r['local_bytes']:7d} {r['shared_bytes'] / 1024:8.1f} {r['blocks_per_sm']:6d} {r['status']}")
        else:
            print(f"{r['kernel']:42} {r['status']}")
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as fh:
            json.dump(dict(arch=arch, jax=jax.__version__, rows=rows), fh, indent=1)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    app.run(main)
