"""What each FP8 format costs on the Llama-3.1-8B shape with random weights (`random:llama-3.1-8b`, bf16), on a GPU:
the logits of every position of a batch of random prompts, one forward each, against the unquantized model's
compiled the same way (quantization "none", KV cache in bf16):

  relative error   ||logits - reference|| / ||reference|| (Frobenius, float32)
  top-1            share of positions whose most likely token is the reference's

per (quantization, kv_cache_dtype). With random weights only these two mean anything (no perplexity).

    python benchmarks/fp8_logit_error.py --json out.json [--compile-backend inductor]
"""

from __future__ import annotations

import argparse
import json

import torch

from compiled_llm import compile_model
from compiled_llm.model_source import load_model

CONFIGS = [("none", "auto"), ("fp8", "auto"), ("fp8_block", "auto"), ("fp8", "fp8"), ("none", "fp8")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--compile-backend", default="eager", help="eager: no Inductor compile (the same numerics)")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = load_model(args.model, torch.bfloat16).model
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    fields = {"compile_backend": args.compile_backend, "max_seq_len": args.length + 1, "max_batch_size": args.batch,
              "max_num_tokens": args.batch * args.length, "cuda_graphs": False}  # fmt: skip
    rows, reference = [], None
    for quantization, kv_cache_dtype in CONFIGS:
        compiled = compile_model(model, quantization=quantization, kv_cache_dtype=kv_cache_dtype, **fields)
        with torch.no_grad():
            logits = compiled(ids.to(compiled.device)).logits.float()
        del compiled
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if reference is None:
            reference = logits
            continue
        row = {
            "quantization": quantization, "kv_cache_dtype": kv_cache_dtype,
            "relative_error": ((logits - reference).norm() / reference.norm()).item(),
            "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "batch": args.batch,
                       "length": args.length, "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
