#!/usr/bin/env bash
# FP8 against bf16 on one GPU, in one call (issue 22): the FP8 GPU tests, then batch-1 decode (with a kernel
# profile of the quantized runs) and throughput of MODEL per quantization, bf16 ("none") measured in the same call.
#   benchmarks/fp8_run.sh MODEL OUT_DIR [extra config flags...]
# LATENCY="none fp8 fp8:fused fp8_block" and THROUGHPUT="none fp8:fused" (the quantizations each workload runs;
# ":fused" adds the FP8 producer fusions, fx_passes.with_fp8_fusions), WORKLOADS (throughput, INPUT/OUTPUT:REQUESTS,
# default "128/128:5000"; TensorRT-LLM publishes 128/128, 2048/128, 1000/1000 and 128/2048), SKIP_TESTS=1 to go
# straight to the benchmarks.
set -euo pipefail
model=$1 out=$2
shift 2
mkdir -p "$out"
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    python3 -m pytest -q -m gpu tests/test_fp8_linear.py tests/test_fp8_block_linear.py tests/test_quantize_fp8.py \
        tests/test_fuse_norm_quantize_fp8.py tests/test_fuse_silu_mul_quantize_fp8.py
fi
fused_passes=$(python3 -c 'from fx_passes import DEFAULT_PIPELINE, with_fp8_fusions; print(",".join(with_fp8_fusions(DEFAULT_PIPELINE)))')
flags() {  # quantization[:fused] -> bench flags
    echo "--quantization ${1%%:*}"
    [[ $1 == *:fused ]] && echo "--passes $fused_passes"
    true
}
for variant in ${LATENCY:-none fp8 fp8:fused fp8_block}; do
    profile=$([[ $variant != none ]] && echo --profile || true)
    python3 -m compiled_llm.cli bench "$model" --mode latency --batch-size 1 --input-len 128 --output-len 128 \
        --baselines none $(flags "$variant") $profile --json "$out/latency_${variant/:/_}.json" "$@"
done
for workload in ${WORKLOADS:-128/128:5000}; do
    lengths=${workload%%:*} requests=${workload##*:}
    for variant in ${THROUGHPUT:-none fp8:fused}; do
        python3 -m compiled_llm.cli bench "$model" --mode throughput --num-requests "$requests" \
            --input-len "${lengths%%/*}" --output-len "${lengths##*/}" --max-batch-size 512 --max-num-tokens 16384 \
            --baselines none $(flags "$variant") --json "$out/throughput_${lengths/\//_}_${variant/:/_}.json" "$@"
    done
done
