"""Time `compile_model` on a 2-layer tiny random Llama (the CPU figure of BENCHMARKS.md).

    python benchmarks/compile_time.py            # uses Inductor's on-disk cache as it is
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compile_time.py   # cold cache
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch
import transformers as tf

from compiled_llm import compile_model


def main() -> None:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    start = time.perf_counter()
    cm = compile_model(model)
    total = time.perf_counter() - start
    print(cm.report)
    print(json.dumps({
        "compile_model_s": round(total, 2),
        **{k: round(v, 2) for k, v in cm.report.timings.items()},
        "torch": torch.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
