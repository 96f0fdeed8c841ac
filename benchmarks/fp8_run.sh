#!/usr/bin/env bash
# FP8 against bf16 on one GPU, in one call (issue 22): the FP8 GPU tests, then batch-1 decode (with a kernel
# profile of the quantized runs) and throughput of MODEL per quantization, bf16 ("none") measured in the same call.
#   benchmarks/fp8_run.sh MODEL OUT_DIR [extra config flags...]
# LATENCY="none fp8 fp8_block" and THROUGHPUT="none fp8" (the quantizations each workload runs), NUM_REQUESTS
# (throughput, default 5000), SKIP_TESTS=1 to go straight to the benchmarks.
set -euo pipefail
model=$1 out=$2
shift 2
mkdir -p "$out"
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    python3 -m pytest -q -m gpu tests/test_fp8_linear.py tests/test_fp8_block_linear.py tests/test_quantize_fp8.py \
        tests/test_fuse_norm_quantize_fp8.py tests/test_fuse_silu_mul_quantize_fp8.py
fi
for quantization in ${LATENCY:-none fp8 fp8_block}; do
    profile=$([[ $quantization != none ]] && echo --profile || true)
    python3 -m compiled_llm.cli bench "$model" --mode latency --batch-size 1 --input-len 128 --output-len 128 \
        --baselines none --quantization "$quantization" $profile --json "$out/latency_$quantization.json" "$@"
done
for quantization in ${THROUGHPUT:-none fp8}; do
    python3 -m compiled_llm.cli bench "$model" --mode throughput --num-requests "${NUM_REQUESTS:-5000}" \
        --input-len 128 --output-len 128 --max-batch-size 512 --max-num-tokens 16384 --baselines none \
        --quantization "$quantization" --json "$out/throughput_$quantization.json" "$@"
done
