"""How much an FP8 weight's per-channel scale moves perplexity: SmolLM2-135M-Instruct (its GGUF, dequantized to
float32) on the CPU, Hugging Face's forward with only the decoder linears' weights rounded to e4m3 (activations and
LM head in float32), over tests/fixtures/tinyshakespeare_4k.txt. Scales per channel:

  amax         max|W[n, :]| / 448, what quantize_weight did before its clip search
  amax x c~    the same times a random c in [1, 2^(1/16)] per channel (seeds 0..3): scales that clip nothing and
               round with the same error on average; their spread is the noise in which one scale choice sits
  search       quantize_weight's: the clip of amax that rounds each channel with the least squared error

    python benchmarks/fp8_weight_scales.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from compiled_llm.model_source import load_model
from custom_ops.linear.fp8 import FP8_MAX, quantize_weight, round_to_fp8

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tinyshakespeare_4k.txt"


def scaled_by(multiplier):
    def rounded(weight: torch.Tensor) -> torch.Tensor:
        scale = weight.abs().amax(dim=1, keepdim=True) * multiplier(weight) * (1 / FP8_MAX)
        return round_to_fp8(weight, scale).float() * scale

    return rounded


def random_multiplier(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return lambda weight: 2 ** (torch.rand(weight.shape[0], 1, generator=generator) / 16)


def searched(weight: torch.Tensor) -> torch.Tensor:
    weight8, scale = quantize_weight(weight)
    return weight8.float() * scale[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    loaded = load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    model = loaded.model
    ids = torch.tensor([loaded.tokenizer(FIXTURE.read_text())["input_ids"]])
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings()}  # fmt: skip
    originals = {name: module.weight.detach().clone() for name, module in linears.items()}

    def perplexity() -> float:
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        return math.exp(F.cross_entropy(logits, ids[0, 1:]).item())

    float_perplexity = perplexity()
    variants = {"amax": scaled_by(lambda weight: 1.0)}
    variants.update({f"amax x c~ (seed {seed})": scaled_by(random_multiplier(seed)) for seed in range(4)})
    variants["search"] = searched
    rows = []
    for name, rounded in variants.items():
        error = total = 0.0
        for linear, module in linears.items():
            weight = rounded(originals[linear])
            error += (weight - originals[linear]).square().sum().item()
            total += originals[linear].square().sum().item()
            module.weight.data.copy_(weight)
        value = perplexity()
        rows.append({"scales": name, "weight_relative_rms": math.sqrt(error / total), "perplexity": value,
                     "change": value / float_perplexity - 1})  # fmt: skip
        print(
            f"| {name} | {rows[-1]['weight_relative_rms']:.3%} | {value:.3f} | {rows[-1]['change']:+.2%} |", flush=True
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"float_perplexity": float_perplexity, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
