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
    heads, head_dim = config.num_attention_heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
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


def test_the_share_of_experts_a_step_reads_is_k_of_e_for_one_token_and_uniform_routing_beyond():
    """One token reads exactly its k experts; for more, the share matches drawing each token's k experts uniformly
    (simulated here); a dense model reads all its weights."""
    from compiled_llm.bench.ceilings import active_expert_share

    assert active_expert_share(tiny_model("llama").config, 4) == 1.0
    config = tiny_model("qwen3_moe").config  # 4 experts, 2 per token
    assert active_expert_share(config, 1) == 0.5
    generator = torch.Generator().manual_seed(0)
    for tokens in (2, 3):
        picked = [
            len(set(torch.cat([torch.randperm(4, generator=generator)[:2] for _ in range(tokens)]).tolist())) / 4
            for _ in range(4000)
        ]
        assert active_expert_share(config, tokens) == pytest.approx(sum(picked) / len(picked), abs=0.01)


def test_the_bytes_read_limit_of_an_moe_model_counts_its_active_experts():
    """`bench --mode latency`'s bytes a step reads count, at batch 1, half of the tiny Qwen3-MoE's experts (2 of 4);
    the limit from all weights stays beside it."""
    from compiled_llm import compile_model
    from compiled_llm.bench.latency import bandwidth_limits

    model = tiny_model("qwen3_moe")
    cm = compile_model(model, compile_backend="eager", max_batch_size=2, graph_cache=False)
    weight_bytes = cm.report.weight_bytes
    limits = {batch: bandwidth_limits(model, weight_bytes, cm, batch, 8.0, 1e9) for batch in (1, 2)}
    experts = sum(p.nbytes for name, p in model.named_parameters() if ".experts." in name)
    embedding = model.get_input_embeddings().weight
    assert experts > 0 and limits[1]["active_expert_share"] == 0.5
    for batch, limit in limits.items():
        kv = limit["step_bytes"] - weight_bytes
        dense_read = weight_bytes - embedding.nbytes + batch * embedding.shape[1] * embedding.element_size()
        unread = (1 - limit["active_expert_share"]) * experts
        assert limit["step_bytes_read"] == pytest.approx(dense_read - unread + kv)
    assert limits[2]["active_expert_share"] == 0.75  # 1 - (1 - 2/4)^2


def test_a_rank_holds_its_share_of_the_embedding_rows():
    """Over tensor-parallel ranks the bytes a step reads count the rows of the embedding table a rank holds, as
    shard_vocabulary cuts them (ceil, padded); expert parallelism alone, or an FP8 table, keeps it whole."""
    from compiled_llm.bench.ceilings import embedding_rows_on_a_rank
    from compiled_llm.config import CompileConfig

    table = torch.empty(257, 4, device="meta")
    assert embedding_rows_on_a_rank(table, CompileConfig()) == 257
    assert embedding_rows_on_a_rank(table, CompileConfig(tensor_parallel_size=2)) == 129
    assert embedding_rows_on_a_rank(table, CompileConfig(expert_parallel_size=2)) == 257
    table.fp8_weight = table
    assert embedding_rows_on_a_rank(table, CompileConfig(tensor_parallel_size=2)) == 257


def test_the_expert_share_is_counted_from_the_models_routing():
    """Each decode step's distinct experts over the layer's: a router that ties every logit sends every token to the
    same k experts (k of E at any batch); random routers spread a batch of 4 over more."""
    from compiled_llm.bench.ceilings import routed_expert_share

    model = tiny_model("qwen3_moe")  # 4 experts, 2 a token
    ids = torch.randint(3, 200, (4, 6), generator=torch.Generator().manual_seed(0))
    spread = routed_expert_share(model, ids, steps=4)
    assert 0.5 < spread <= 1.0
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.mlp.gate.weight)
    assert routed_expert_share(model, ids, steps=4) == 0.5
    assert routed_expert_share(tiny_model("llama"), ids, steps=2) is None


def test_expert_bytes_are_what_the_graph_reads():
    """MXFP4 experts (GPT-OSS): the graph's blocks, exponents and biases, not the model's dequantized float copies."""
    from compiled_llm import compile_model
    from compiled_llm.bench.latency import graph_expert_bytes
    from compiled_llm.presets import random_mxfp4_experts

    model = tiny_model("gpt_oss")
    random_mxfp4_experts(model, torch.Generator().manual_seed(0))
    cm = compile_model(model, compile_backend="eager", max_batch_size=2, graph_cache=False)
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    stored = sum(t.nbytes for m in experts for p in (m.gate_up_proj, m.down_proj) for t in (p.mxfp4_blocks, p.mxfp4_scales))
    biases = sum(b.nbytes for m in experts for b in (m.gate_up_proj_bias, m.down_proj_bias))
    assert graph_expert_bytes(cm.graph_module) == stored + biases
    assert stored < sum(p.nbytes for m in experts for p in (m.gate_up_proj, m.down_proj)) / 7  # 4.25 bits vs 32


@pytest.mark.parametrize(("preset", "total", "active", "embedding_counted"), [
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, True), ("mixtral-8x7b", 46.7e9, 12.9e9, True),
    ("deepseek-v2-lite", 15.7e9, 2.4e9, False), ("gpt-oss-20b", 20.91e9, 3.61e9, False),
])  # fmt: skip
def test_moe_presets_have_the_published_parameter_counts(preset, total, active, embedding_counted):
    """The MoE shapes (built on the meta device: no memory) have the totals and the active parameters a token uses
    that their model cards publish (DeepSeek's and OpenAI's active counts leave the input embedding out)."""
    from compiled_llm.bench.ceilings import active_expert_share
    from compiled_llm.presets import random_model

    model = random_model(preset, device="meta")
    counted = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert counted == pytest.approx(total, rel=0.01)
    embedding = 0 if embedding_counted else model.get_input_embeddings().weight.numel()
    active_counted = counted - embedding - experts * (1 - active_expert_share(model.config, 1))
    assert active_counted == pytest.approx(active, rel=0.025)  # published to two digits: 2.4B is 2.45B
