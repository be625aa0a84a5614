#!/usr/bin/env bash
# The one device check for a session that is lent a GPU (DEVELOPERS.md: 15 minutes in all).
# 1. kernel tests on the device: the compiled Mosaic GPU / Triton kernels vs their references;
# 2. kernel_bench: every implementation checked on the device, then timed (JSON + Markdown);
# 3. the engine end to end on the GPU with the Pallas backends, with an EW and an AW failure.
# Writes everything under ${OUT:-gpu_out}; commit BENCHMARKS.md from there with the card and date.
# Step timeouts add up to 550 s, so one device call with timeout_s=600 holds it all.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
$PY -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout 150 $PY -m pytest -q -x tests/test_grouped_matmul.py tests/test_swiglu_ffn.py tests/test_paged_attention.py \
    2>&1 | tail -30 | tee "$OUT/kernel_tests.txt"
timeout 240 $PY -m launch.kernel_bench --json_out "$OUT/kernel_bench.json" --md_out "$OUT/BENCHMARKS.md" \
    2>&1 | tee "$OUT/kernel_bench.txt"
GEN=(-m launch.generate --model tiny --dtype bfloat16 --num_random_prompts 16 --random_prompt_len 16
     --max_new_tokens 32 --json)
timeout 80 $PY "${GEN[@]}" > "$OUT/generate_clean.jsonl" 2> "$OUT/generate_clean.txt"
timeout 80 $PY "${GEN[@]}" --fail ew:1@step=5 --fail aw:0@step=9 > "$OUT/generate_fail.jsonl" 2> "$OUT/generate_fail.txt"
tail -n 3 "$OUT/generate_clean.txt" "$OUT/generate_fail.txt"
if cmp -s "$OUT/generate_clean.jsonl" "$OUT/generate_fail.jsonl" && [ -s "$OUT/generate_clean.jsonl" ]; then
  echo "engine on GPU: tokens identical with an EW and an AW failure"
else
  echo "engine on GPU: OUTPUTS DIFFER (or empty)"
fi
