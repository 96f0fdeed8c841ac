"""The throughput ceilings' arithmetic (compiled_llm/bench/ceilings.py) against torch's own FLOP counter on a tiny
HF model: its linears' FLOPs are counted by FlopCounterMode, not restated here."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from compiled_llm.bench.ceilings import throughput_ceilings, workload_flops


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_workload_flops_are_a_forward_of_the_computed_tokens_with_causal_attention(arch):
    """One HF forward over the input_len + output_len - 1 tokens a request computes, eager attention: its counted
    FLOPs, less the LM head on positions never sampled and the masked half of QK^T and PV, are the workload's."""
    model = tiny_model(arch)
    model.config._attn_implementation = "eager"  # plain matmuls, which the counter sees
    input_len, output_len = 7, 5
    tokens = input_len + output_len - 1
    ids = torch.randint(3, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    counted = counter.get_total_flops()
    config = model.config
    head = model.lm_head.weight.numel()
    heads, head_dim = config.num_attention_heads, getattr(config, "head_dim", None) or config.hidden_size // heads
    full_attention = 4 * config.num_hidden_layers * heads * head_dim * tokens * tokens
    causal_attention = 4 * config.num_hidden_layers * heads * head_dim * tokens * (tokens + 1) // 2
    expected = counted - 2 * head * tokens + 2 * head * output_len - full_attention + causal_attention
    assert workload_flops(model, input_len, output_len) == pytest.approx(expected, rel=1e-9)


def test_ceilings_divide_the_rates_by_a_token_s_work_and_bytes():
    model = tiny_model("llama")
    flops = workload_flops(model, 10, 4)
    ceilings = throughput_ceilings(model, weight_bytes=8e6, kv_bytes_per_token=100.0, input_len=10, output_len=4,
                                   max_batch_size=8, gemm_flops=1e12, bandwidth=2e9)  # fmt: skip
    assert ceilings["flop_ceiling_output_tokens_per_s"] == pytest.approx(1e12 / (flops / 4))
    # a decode step reads the weights once for the batch, and each sequence's cache (12 positions on average)
    assert ceilings["byte_ceiling_output_tokens_per_s"] == pytest.approx(2e9 / (8e6 / 8 + 100.0 * 12))
