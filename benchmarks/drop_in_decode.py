"""Batch-1 decode of Llama-3.1-8B-shaped modules written outside Hugging Face, through compile_model, against
this project's HF Llama path in the same process (random bf16 weights; speed does not depend on them).

    python benchmarks/drop_in_decode.py [--input-len 128] [--output-len 128] [--repeats 5] [--meta]

Systems: `hf` (random:llama-3.1-8b), `gptfast` (tests/drop_in_models/gptfast.py at the 8B shape, its own KV
cache set up for 8192 positions) and, with --meta, `meta` (Meta's reference Llama, complex RoPE). Each is
compiled with the same fields; decode tokens/s = (output_len - 1) / (t(output_len) - t(1)), medians of
`repeats`, the systems measured in alternation so drift of the GPU's clocks reaches each alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from compiled_llm import compile_model  # noqa: E402
from compiled_llm.bench.measure import copy_bandwidth, timed  # noqa: E402
from compiled_llm.presets import random_model  # noqa: E402

LLAMA_8B = dict(vocab_size=128256, dim=4096, n_layer=32, n_head=32, n_local_heads=8, head_dim=128,
                intermediate_size=14336, rope_base=500000, block_size=8192)  # fmt: skip


def build(system: str):
    torch.manual_seed(0)
    if system == "hf":
        return random_model("llama-3.1-8b")
    with torch.device("cuda"):
        if system == "gptfast":
            from drop_in_models.gptfast import ModelArgs, Transformer

            model = Transformer(ModelArgs(**LLAMA_8B)).to(torch.bfloat16).eval()
            model.setup_caches(max_batch_size=1, max_seq_length=8192)
        else:
            from drop_in_models.meta_llama import ModelArgs, Transformer

            args = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                             ffn_dim_multiplier=1.3, rope_theta=500000, max_batch_size=1, max_seq_len=1024)  # fmt: skip
            torch.set_default_dtype(torch.bfloat16)
            try:
                model = Transformer(args).eval()
            finally:
                torch.set_default_dtype(torch.float32)
            for layer in model.layers:  # Meta's own are float32 until its first forward casts them
                layer.attention.cache_k = layer.attention.cache_k.to(torch.bfloat16)
                layer.attention.cache_v = layer.attention.cache_v.to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--meta", action="store_true", help="also Meta's reference Llama (complex RoPE)")
    args = parser.parse_args()
    device = torch.device("cuda")
    total = args.input_len + args.output_len
    fields = dict(max_batch_size=1, max_seq_len=total, num_kv_blocks=math.ceil(total / 16) + 1,
                  max_num_tokens=max(args.input_len, 256), cuda_graph_batch_sizes=(1,))  # fmt: skip
    ids = torch.randint(3, 32000, (1, args.input_len), generator=torch.Generator().manual_seed(0)).to(device)
    systems = ["hf", "gptfast"] + (["meta"] if args.meta else [])
    compiled, out = {}, {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "systems": {}}
    for system in systems:
        model = build(system)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        start = time.perf_counter()
        cm = compile_model(model, **fields)
        compile_s = time.perf_counter() - start
        del model  # the compiled model keeps what it needs
        gc.collect()
        print(cm.report, flush=True)
        compiled[system] = cm
        out["systems"][system] = {"compile_s": compile_s, "weight_bytes": weight_bytes, "decode": []}

    def generate(cm, n):
        return cm.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[], pad_token_id=0)

    for cm in compiled.values():
        generate(cm, args.output_len)  # warm-up
    for _ in range(args.repeats):
        for system, cm in compiled.items():
            first = timed(lambda: generate(cm, 1), device)
            full = timed(lambda: generate(cm, args.output_len), device)
            out["systems"][system]["decode"].append((args.output_len - 1) / (full - first))
    bandwidth = copy_bandwidth(device)
    out["copy_bandwidth_gb_s"] = bandwidth / 1e9
    hf = statistics.median(out["systems"]["hf"]["decode"])
    for system, result in out["systems"].items():
        speed = statistics.median(result["decode"])
        result["decode_tokens_per_s"] = speed
        result["ratio_to_hf"] = speed / hf
        print(f"{system:8s} {speed:7.1f} tok/s  ({speed / hf:.3f}x hf)  compile {result['compile_s']:.1f} s  "
              f"runs {[round(x, 1) for x in result['decode']]}")  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
