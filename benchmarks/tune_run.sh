#!/usr/bin/env bash
# The autotuner end to end on one GPU, in one call (issue 23): `compiled-llm tune MODEL` into a fresh cache under
# OUT_DIR (its table of gains per op and bucket in tune.txt), then batch-1 decode with the tuned choices
# (autotune=cache) and without (autotune=off), each in a process of its own, beside each other.
#   benchmarks/tune_run.sh MODEL OUT_DIR [extra config flags, e.g. --quantization fp8]
# BATCH_SIZES="1 16 64" (latency batch sizes).
set -euo pipefail
model=$1 out=$2
shift 2
mkdir -p "$out"
# Tuned for the bench's sequences (128 + 128 tokens): attention's choices depend on the context length.
python3 -m compiled_llm.cli tune "$model" --cache-dir "$out/cache" --max-seq-len 256 --no-end-to-end "$@" | tee "$out/tune.txt"
for batch in ${BATCH_SIZES:-1}; do
    for mode in off cache; do
        python3 -m compiled_llm.cli bench "$model" --mode latency --batch-size "$batch" --input-len 128 --output-len 128 \
            --baselines none --autotune "$mode" --cache-dir "$out/cache" --json "$out/latency_b${batch}_${mode}.json" "$@"
    done
done
