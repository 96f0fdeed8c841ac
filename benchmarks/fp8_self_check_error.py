"""How far a correct FP8 graph's logits are from the self-check's reference (the module with its linears rounded as
`quantization="fp8"` means them), by depth, on random weights in the Llama-3.1-8B shape: the error the self-check's
FP8 tolerance must allow. Beside it, the same model's bf16 graph against the bf16 module, and the FP8 reference against
the bf16 module (FP8's own error).

    python benchmarks/fp8_self_check_error.py [--layers 2 8 32] [--json out.json]

Per depth: over the self-check's prompts and both of its step shapes, the worst position's relative RMS error
(rms(actual - expected) / rms(expected)) and max |difference| / max |expected|.
"""

from __future__ import annotations

import argparse
import json

import torch

from compiled_llm import compile_model
from compiled_llm.capture.forward_signature import forward_signature
from compiled_llm.presets import RANDOM_PRESETS
from compiled_llm.verify import PREFILL_TOKENS, PROMPT_LENGTHS, _run, reference_logits
from fx_passes.quantize_fp8 import quantized_module


def errors(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    rel_rms = ((actual - expected).pow(2).mean(-1).sqrt() / expected.pow(2).mean(-1).sqrt()).max().item()
    rel_max = ((actual - expected).abs().amax(-1) / expected.abs().amax(-1)).max().item()
    return {"rel_rms": round(rel_rms, 4), "rel_max": round(rel_max, 4)}


def worst(pairs) -> dict:
    found = [errors(a, e) for a, e in pairs]
    return {k: max(f[k] for f in found) for k in found[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args()
    import transformers as tf

    results = []
    for layers in args.layers:
        config = RANDOM_PRESETS["llama-3.1-8b"]()
        config.num_hidden_layers = layers
        with torch.device(args.device):
            model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        signature = forward_signature(model)
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
        row = {"layers": layers}
        bf16_module = [reference_logits(model, signature, p, args.device).float().cpu() for p in prompts]
        for quantization in ("none", "fp8"):
            compiled = compile_model(model, quantization=quantization, verify=False, graph_cache=False,
                                     num_kv_blocks=256, max_batch_size=8, cuda_graphs=False,
                                     compile_backend=args.compile_backend)  # fmt: skip
            meta = compiled.graph_module.meta
            with quantized_module(model, meta.get("fp8_weights", []), meta.get("fp8_format", "fp8")):
                expected = [reference_logits(model, signature, p, args.device).float().cpu() for p in prompts]
            pairs = []
            for first_step in (max(PROMPT_LENGTHS), PREFILL_TOKENS):
                pairs += list(zip(_run(compiled.runner, prompts, first_step), expected))
            row[f"{quantization}_graph_vs_its_reference"] = worst(pairs)
            if quantization == "fp8":
                row["fp8_reference_vs_bf16_module"] = worst(zip(expected, bf16_module))
            del compiled
        print(json.dumps(row), flush=True)
        results.append(row)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__, "results": results}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
