"""Quickstart: compile a small random-weight Llama, generate with it, compare with eager Hugging Face.

    python examples/quickstart.py

Builds the model from a transformers config (no download), compiles it with `compile_model`, checks that
greedy generation gives Hugging Face's tokens, and prints the compile report and decode speed of both.
"""

from __future__ import annotations

import time

import torch
import transformers as tf

from compiled_llm import compile_model

BATCH, PROMPT_LEN, NEW_TOKENS = 4, 32, 64


def tokens_per_s(generate, ids) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = generate(ids)
    return BATCH * NEW_TOKENS / (time.perf_counter() - start), out


def main() -> None:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    print(f"model: random Llama, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, float32, CPU")

    cm = compile_model(model, max_batch_size=BATCH, max_seq_len=256)
    print(cm.report)

    ids = torch.randint(3, config.vocab_size, (BATCH, PROMPT_LEN))
    # eos_token_id=[]: random weights would stop at EOS at random; generate every token instead
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[], pad_token_id=0)
    mask = torch.ones_like(ids)
    cm.generate(ids, attention_mask=mask, max_new_tokens=2)  # a first call outside the timing, for both
    ours, out = tokens_per_s(lambda x: cm.generate(x, attention_mask=mask, **greedy), ids)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
        theirs, expected = tokens_per_s(lambda x: model.generate(x, attention_mask=mask, **greedy), ids)

    print(f"\nfirst generated tokens: {out[0, PROMPT_LEN:PROMPT_LEN + 12].tolist()}")
    print(f"same tokens as HF greedy generate: {torch.equal(out, expected)}")
    print(f"decode, batch {BATCH}, {NEW_TOKENS} new tokens:")
    print(f"  compiled-llm  {ours:8.1f} tokens/s")
    print(f"  HF eager      {theirs:8.1f} tokens/s   ({ours / theirs:.2f}x)")


if __name__ == "__main__":
    main()
