#!/usr/bin/env bash
# FP8 against bf16 on one GPU, in one call (issue 22): the fp8 GPU tests, then batch-1 decode and throughput of
# MODEL with quantization=fp8 beside the same run's bf16 figures.
#   benchmarks/fp8_run.sh MODEL OUT_DIR [extra config flags...]
# NUM_REQUESTS (throughput, default 5000), SKIP_TESTS=1 to go straight to the benchmarks.
set -euo pipefail
model=$1 out=$2
shift 2
mkdir -p "$out"
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    python3 -m pytest -q -x -m gpu tests/test_fp8_linear.py tests/test_quantize_fp8.py
fi
for quantization in none fp8; do
    python3 -m compiled_llm.cli bench "$model" --mode latency --batch-size 1 --input-len 128 --output-len 128 \
        --baselines none --quantization $quantization --json "$out/latency_$quantization.json" "$@"
done
for quantization in none fp8; do
    python3 -m compiled_llm.cli bench "$model" --mode throughput --num-requests "${NUM_REQUESTS:-5000}" \
        --input-len 128 --output-len 128 --max-batch-size 512 --max-num-tokens 16384 --baselines none \
        --quantization $quantization --json "$out/throughput_$quantization.json" "$@"
done
