#!/usr/bin/env bash
# The one device check for a session that is lent a GPU (DEVELOPERS.md: 15 minutes in all).
# Ordered by value, each step teed under $OUT so a cut run still returns what it did:
# 1. the engine at real shapes: Qwen3-30B-A3B with dummy weights (launch/configs, bf16), 2 AWs x
#    4 EWs sharing the GPU, decode tok/s, step efficiency (device time of a step's programs over
#    its wall time) and the fraction of the HBM roofline at batch 1/16/64/256 (issue 9's GPU
#    targets: efficiency >= 0.7 at batch 64, batch 1 >= 50% of the roofline). Every worker shares
#    the one GPU, so shadows are held at a quarter of an EW's primaries (--shadow_budget 0.25):
#    58 GB of bf16 experts + 25% fits 141 GB with the KV pages; the host builds them in ~61 GB;

# 2. the engine end to end on the GPU with the Pallas backends, with an EW and an AW failure, on
#    the tiny DeepSeek-V3 (MLA latent cache, a dense layer, sigmoid routing);
# 3. kernel tests on the device (one bf16 Mosaic GPU gmm case failed on 2026-11-27, undiagnosed);
# 4. kernel_bench, the EW's FFN suite, while time is left.
# Step timeouts add up to 565 s: one device call with timeout_s=590 holds it all.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/step_profile.txt"
$PY -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/step_profile.txt"
timeout 300 $PY -m launch.step_profile --checkpoint launch/configs/qwen3_30b_a3b --load_format dummy \
    --dtype bfloat16 --batch_sizes 1,16,64,256 --num_pages 2048 --max_running 128 --shadow_budget 0.25 --steps 10 --program_repeats 3 --precompile none \
    --json_out "$OUT/step_profile.json" 2>&1 | grep -v Warning | tail -n 30 | tee -a "$OUT/step_profile.txt"
GEN=(-m launch.generate --model tiny --tiny_family deepseek_v3 --dtype bfloat16 --num_random_prompts 16 --random_prompt_len 16
     --max_new_tokens 32 --json --precompile none)   # the GPU minutes go to the step profile
timeout 35 $PY "${GEN[@]}" > "$OUT/generate_clean.jsonl" 2> >(tail -n 40 > "$OUT/engine.txt")
timeout 35 $PY "${GEN[@]}" --fail ew:1@step=5 --fail aw:0@step=9 > "$OUT/generate_fail.jsonl" \
    2> >(tail -n 40 >> "$OUT/engine.txt")
sleep 1
if cmp -s "$OUT/generate_clean.jsonl" "$OUT/generate_fail.jsonl" && [ -s "$OUT/generate_clean.jsonl" ]; then
  echo "engine on GPU: tokens identical with an EW and an AW failure" | tee -a "$OUT/engine.txt"
else
  echo "engine on GPU: OUTPUTS DIFFER (or empty)" | tee -a "$OUT/engine.txt"
fi
timeout 90 $PY -m pytest -q -p no:cacheprovider -rf --tb=short -W ignore::DeprecationWarning \
    tests/test_grouped_matmul.py tests/test_swiglu_ffn.py tests/test_paged_attention.py > "$OUT/kernel_tests.txt" 2>&1
tail -n 12 "$OUT/kernel_tests.txt"
timeout 100 $PY -m launch.kernel_bench --suites ffn --tokens_per_expert 1,16,64 \
    --json_out "$OUT/kernel_bench.json" --md_out "$OUT/BENCHMARKS.md" 2>&1 | grep -v Warning | tee "$OUT/kernel_bench.txt"
