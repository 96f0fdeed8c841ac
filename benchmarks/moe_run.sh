#!/usr/bin/env bash
# MoE on one GPU (issue 25): the MoE GPU tests, batch-1 decode of each MoE shape against its active-bytes limit (HF
# eager in the same run), optionally FP8 experts and a tuned run, and throughput beside HF eager's batched figure.
#   benchmarks/moe_run.sh OUT_DIR
# MODELS (random: presets; default "qwen3-30b-a3b gpt-oss-20b mixtral-8x7b"), QUANTIZATIONS (default "auto"; add fp8),
# TUNE=1 (tune each model's kernels first: autotune=full, then the latency run reads them), THROUGHPUT (models to run
# 1000 x 128/128 on; default qwen3-30b-a3b; "" for none), SKIP_TESTS=1. One model's latency run is 2-4 minutes
# (weights built on the GPU, a cold compile of 24-48 layers): split the list over device calls.
set -euo pipefail
out=$1
mkdir -p "$out"
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    python3 -m pytest -q -m gpu tests/test_moe_experts.py
fi
for model in ${MODELS:-qwen3-30b-a3b gpt-oss-20b mixtral-8x7b}; do
    if [[ "${TUNE:-0}" == 1 ]]; then
        python3 -m compiled_llm.cli tune "random:$model" --batch-sizes 1,16,64 --no-end-to-end
    fi
    for quantization in ${QUANTIZATIONS:-auto}; do
        python3 -m compiled_llm.cli bench "random:$model" --mode latency --batch-size 1 --input-len 128 --output-len 128 \
            --baselines hf-eager --quantization "$quantization" --profile --json "$out/latency_${model}_${quantization}.json"
    done
done
for model in ${THROUGHPUT-qwen3-30b-a3b}; do
    python3 -m compiled_llm.cli bench "random:$model" --mode throughput --num-requests 1000 --input-len 128 \
        --output-len 128 --baselines hf-eager --json "$out/throughput_${model}.json"
done
