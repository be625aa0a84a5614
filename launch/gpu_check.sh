#!/usr/bin/env bash
# The one device check for a session that is lent a GPU (DEVELOPERS.md: 15 minutes in all).
# Ordered by value, each step teed under $OUT so a cut run still returns what it did:
# 1. kernel_bench: every kernel checked against its reference on the device, then timed
#    against XLA's alternatives (JSON + Markdown for BENCHMARKS.md). All suites at all four
#    decode sizes took ~9 min on an H200 (2026-11-27), so this runs the EW's FFN first and
#    1/16/64 tokens per expert; run the rest in a second call if the first leaves time;
# 2. kernel tests on the device: the compiled Mosaic GPU / Triton kernels on random shapes with
#    empty groups and ragged tails;
# 3. the engine end to end on the GPU with the Pallas backends, with an EW and an AW failure, on
#    the tiny DeepSeek-V3 (MLA latent cache, a dense layer, sigmoid routing: not yet run on a GPU;
#    the tiny qwen2_moe passed on an H200 on 2026-11-27).
# Step timeouts add up to 560 s: one device call with timeout_s=590 holds it all.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Seven files come back (the device tool returns at most 8).
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/kernel_bench.txt"
$PY -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/kernel_bench.txt"
timeout 400 $PY -m launch.kernel_bench --suites ffn,gmm,attention --tokens_per_expert 1,16,64 \
    --json_out "$OUT/kernel_bench.json" --md_out "$OUT/BENCHMARKS.md" 2>&1 | grep -v Warning | tee -a "$OUT/kernel_bench.txt"
timeout 90 $PY -m pytest -q -p no:cacheprovider -rf --tb=short -W ignore::DeprecationWarning \
    tests/test_grouped_matmul.py tests/test_swiglu_ffn.py tests/test_paged_attention.py > "$OUT/kernel_tests.txt" 2>&1
tail -n 12 "$OUT/kernel_tests.txt"
GEN=(-m launch.generate --model tiny --tiny_family deepseek_v3 --dtype bfloat16 --num_random_prompts 16 --random_prompt_len 16
     --max_new_tokens 32 --json)
timeout 35 $PY "${GEN[@]}" > "$OUT/generate_clean.jsonl" 2> >(tail -n 40 > "$OUT/engine.txt")
timeout 35 $PY "${GEN[@]}" --fail ew:1@step=5 --fail aw:0@step=9 > "$OUT/generate_fail.jsonl" \
    2> >(tail -n 40 >> "$OUT/engine.txt")
sleep 1
tail -n 12 "$OUT/engine.txt"
if cmp -s "$OUT/generate_clean.jsonl" "$OUT/generate_fail.jsonl" && [ -s "$OUT/generate_clean.jsonl" ]; then
  echo "engine on GPU: tokens identical with an EW and an AW failure" | tee -a "$OUT/engine.txt"
else
  echo "engine on GPU: OUTPUTS DIFFER (or empty)" | tee -a "$OUT/engine.txt"
fi
