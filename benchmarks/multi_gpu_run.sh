#!/usr/bin/env bash
# Several GPUs of one host (issue 27): the 2-GPU tests, then each figure beside its baseline in the same call.
#   benchmarks/multi_gpu_run.sh OUT_DIR
# STEPS (default "tests tp8b ep fp70"): tests (the one-shot all-reduce and the slices' GPU test); tp8b (Llama-8B batch 1
# and 1000 x 128/128 at TP=1 and TP=GPUS); fp70 (Llama-70B FP8, made by slices in e4m3 on each rank: batch 1 and
# throughput at TP=GPUS, and TP=1 where GPUS is 1 (72.7 GB fits one H200)); ep (Qwen3-30B-A3B, EP=GPUS). GPUS (default:
# every visible GPU). NVLink multicast stays off in every command. A cold 70B compile is minutes: one step a call.
set -euo pipefail
out=$1
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# The one-shot all-reduce is opt-in until the tests step has passed; set -e stops the benches if it fails.
export COMPILED_LLM_ONE_SHOT_ALL_REDUCE=1
gpus=${GPUS:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
latency=(--mode latency --batch-size 1 --input-len 128 --output-len 128 --baselines none)
throughput=(--mode throughput --num-requests 1000 --input-len 128 --output-len 128 --max-batch-size 512 --baselines none)
for step in ${STEPS:-tests tp8b ep fp70}; do
    case $step in
    tests)
        python3 -m pytest -q -m gpu tests/test_all_reduce.py tests/test_rank_checkpoints.py ;;
    tp8b)
        for tp in 1 "$gpus"; do
            python3 -m compiled_llm.cli bench random:llama-3.1-8b "${latency[@]}" --tensor-parallel-size "$tp" \
                --json "$out/llama8b_b1_tp$tp.json"
            python3 -m compiled_llm.cli bench random:llama-3.1-8b "${throughput[@]}" --tensor-parallel-size "$tp" \
                --json "$out/llama8b_throughput_tp$tp.json"
        done ;;
    fp70)
        python3 -m compiled_llm.cli bench random:llama-3.1-70b-fp8 "${latency[@]}" --tensor-parallel-size "$gpus" \
            --json "$out/llama70b_fp8_b1_tp$gpus.json"
        python3 -m compiled_llm.cli bench random:llama-3.1-70b-fp8 "${throughput[@]}" --tensor-parallel-size "$gpus" \
            --json "$out/llama70b_fp8_throughput_tp$gpus.json" ;;
    ep)
        for ep in 1 "$gpus"; do
            python3 -m compiled_llm.cli bench random:qwen3-30b-a3b "${latency[@]}" --expert-parallel-size "$ep" \
                --json "$out/qwen3_30b_b1_ep$ep.json"
        done
        python3 -m compiled_llm.cli bench random:qwen3-30b-a3b "${throughput[@]}" --expert-parallel-size "$gpus" \
            --json "$out/qwen3_30b_throughput_ep$gpus.json" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
