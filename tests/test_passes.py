"""Graph passes: ops present before and gone after, exact site counts, numerics against eager."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compiled_llm import CompileConfig, compile_model
from compiled_llm.capture import capture_model
from conftest import random_prompt, relative_error, tiny_model
from custom_ops.triton_runtime import triton_available
from fx_passes import DEFAULT_PIPELINE, registered_passes, run_passes

aten = torch.ops.aten


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


class TinyDecoder(nn.Module):
    """Not an HF model: a gpt-fast-style decoder calling F.scaled_dot_product_attention directly."""

    def __init__(self, vocab=64, dim=32, heads=4, kv_heads=2, layers=3, masked_layer=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.masked_layer = masked_layer
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, dim + 2 * kv_heads * self.head_dim, bias=False) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def rope(self, x, position_ids):  # x [B, H, T, D]
        freqs = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2) / self.head_dim)
        angles = position_ids[:, None, :, None].float() * freqs  # [B, 1, T, D/2]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], dim=-1)

    def forward(self, input_ids, position_ids):
        x = self.embed(input_ids)
        batch, length, _ = x.shape
        for i, (qkv, out) in enumerate(zip(self.qkv, self.out)):
            q, k, v = qkv(x).split([self.heads * self.head_dim, *(2 * [self.kv_heads * self.head_dim])], dim=-1)
            q = self.rope(q.view(batch, length, self.heads, self.head_dim).transpose(1, 2), position_ids)
            k = self.rope(k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2), position_ids)
            v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            if i == self.masked_layer:
                mask = torch.ones(length, length, dtype=torch.bool).tril()
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + out(y.transpose(1, 2).reshape(batch, length, -1))
        return self.head(x)


def test_graph_cleanup_removes_export_leftovers():
    captured = capture_model(tiny_model("llama"))
    gm = captured.gm
    asserts = count(gm, aten._assert_tensor_metadata.default)
    assert asserts > 0
    casts = count(gm, aten.to.dtype)
    result = registered_passes()["graph_cleanup"](gm, CompileConfig())
    assert count(gm, aten._assert_tensor_metadata.default) == 0
    assert 0 < count(gm, aten.to.dtype) < casts  # the float32 -> float32 casts are gone, real ones stay
    assert result.sites >= asserts + casts - count(gm, aten.to.dtype)
    # every remaining dtype cast changes the dtype
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.to.dtype:
            assert node.args[0].meta["val"].dtype != node.meta["val"].dtype


def test_match_sdpa_attention_on_non_hf_module():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    captured = capture_model(model)
    assert count(captured.gm, aten.scaled_dot_product_attention.default) == 3
    config = CompileConfig()
    results = [registered_passes()[name](captured.gm, config) for name in ("graph_cleanup", "match_sdpa_attention")]
    assert results[1].sites == 3
    assert count(captured.gm, aten.scaled_dot_product_attention.default) == 0
    layers = [n.args[3] for n in captured.gm.graph.nodes if n.target == torch.ops.compiled_llm.attention.default]
    assert layers == [0, 1, 2]
    captured.gm.recompile()
    ids = torch.randint(0, 64, (9,))
    with torch.no_grad():
        expected = model(ids[None], torch.arange(9)[None])[0]
        actual = captured.gm(ids, torch.arange(9), torch.arange(9))[0]
    assert relative_error(actual, expected) < 1e-5


def test_compile_model_on_non_hf_module_matches_eager():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    cm = compile_model(model, max_seq_len=64, max_batch_size=4)
    assert cm.report.pass_sites("match_sdpa_attention") == 3
    assert cm.report.pass_sites("insert_paged_attention") == 3
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        expected = model(ids, torch.arange(12).expand(2, -1))
    assert relative_error(cm(ids).logits, expected) < 1e-4


def test_masked_sdpa_is_left_alone_and_refused():
    model = TinyDecoder(masked_layer=1).eval()
    with pytest.raises(ValueError, match="scaled_dot_product_attention calls the paged cache cannot serve"):
        compile_model(model, max_seq_len=64, compile_backend="eager")


def test_eager_backend_runs_the_rewritten_graph():
    model = tiny_model("mistral")
    cm = compile_model(model, compile_backend="eager", max_batch_size=2)
    assert count(cm.graph_module, torch.ops.compiled_llm.paged_attention.default) == 2
    assert count(cm.graph_module, torch.ops.compiled_llm.attention.default) == 0
    placeholders = [n.target for n in cm.graph_module.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids", "position_ids", "logits_indices", "slot_mapping", "block_table",
                            "query_start_loc", "seq_lens", "kv_cache_0", "kv_cache_1"]  # fmt: skip
    ids = random_prompt(20, seed=5)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert relative_error(cm(ids).logits, expected) < 1e-5
    assert [r.name for r in cm.report.passes] == list(DEFAULT_PIPELINE)


def test_pipeline_config_is_validated():
    with pytest.raises(ValueError, match="unknown pass"):
        CompileConfig(passes=("graph_cleanup", "no_such_pass", "insert_paged_attention"))
    with pytest.raises(ValueError, match="must include"):
        CompileConfig(passes=("graph_cleanup",))
    gm = capture_model(tiny_model("qwen3")).gm
    results = run_passes(gm, CompileConfig(passes=("insert_paged_attention",)))
    assert [(r.name, r.sites) for r in results] == [("insert_paged_attention", 2)]


def test_fuse_parallel_linears_on_llama():
    model = tiny_model("llama")
    ids = random_prompt(20, seed=6)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    gm = capture_model(model).gm
    registered_passes()["graph_cleanup"](gm, CompileConfig())
    linears = count(gm, aten.linear.default)
    result = registered_passes()["fuse_parallel_linears"](gm, CompileConfig())
    layers = model.config.num_hidden_layers
    assert result.sites == 2 * layers  # q/k/v and gate/up of each layer
    assert count(gm, aten.linear.default) == linears - 3 * layers  # 7 -> 4 GEMMs per layer
    # q, k, v are viewed as [1, T, heads, head_dim] in place; gate and up, used whole, are copied out
    assert count(gm, aten.as_strided.default) == 3 * layers
    assert count(gm, aten.clone.default) == 2 * layers
    # the model's own weights now live inside the fused ones: nothing is stored twice
    fused = gm.get_parameter("fused_linear_0_weight")
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    with torch.no_grad():
        assert relative_error(model(ids, use_cache=False).logits, expected) == 0  # the HF model is unchanged
    gm.recompile()
    cm = compile_model(model, compile_backend="eager", max_batch_size=2)
    assert cm.report.pass_sites("fuse_parallel_linears") == 2 * layers
    assert relative_error(cm(ids).logits, expected) < 1e-5


def _linear_graph(use_gate_up_elsewhere: bool) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """By hand, with meta values: a = silu(gate) * up of linear(x, W_gate_up), a parameter;
    b = linear(x, w_in), a weight that is a graph input (computed, as far as the graph knows)."""
    torch.manual_seed(0)
    root = nn.Module()
    root.gate_up = nn.Parameter(torch.randn(16, 8), requires_grad=False)
    graph = torch.fx.Graph()
    x, w_in = graph.placeholder("x"), graph.placeholder("w_in")
    x.meta["val"], w_in.meta["val"] = torch.randn(3, 8), torch.randn(5, 8)
    weight = graph.get_attr("gate_up")
    weight.meta["val"] = root.gate_up

    def call(target, *args):
        node = graph.call_function(target, args)
        node.meta["val"] = target(*[a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args])
        return node

    gate_up = call(aten.linear.default, x, weight)
    split = call(aten.split_with_sizes.default, gate_up, [8, 8], -1)
    gate, up = call(operator.getitem, split, 0), call(operator.getitem, split, 1)
    act = call(aten.mul.Tensor, call(aten.silu.default, gate), up)
    other = call(aten.linear.default, x, w_in)
    graph.output((act, other, gate_up) if use_gate_up_elsewhere else (act, other))
    return torch.fx.GraphModule(root, graph), torch.randn(3, 8)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("use_gate_up_elsewhere", [False, True])
def test_linear_passes_only_over_parameters_and_single_uses(use_gate_up_elsewhere):
    """insert_linear_op routes the parameter's linear, not the one over a graph input (the GEMV reads its
    weight before waiting for the previous kernel); fuse_linear_silu_mul fuses only a gate/up output
    that feeds nothing else. The rewritten graph computes what the original did."""
    gm, x = _linear_graph(use_gate_up_elsewhere)
    w_in = torch.randn(5, 8)
    expected = gm(x, w_in)
    config = CompileConfig(linear_backend="triton")
    assert registered_passes()["insert_linear_op"](gm, config).sites == 1
    assert count(gm, aten.linear.default) == 1 and count(gm, torch.ops.compiled_llm.linear.default) == 1
    fused = registered_passes()["fuse_linear_silu_mul"](gm, config).sites
    assert fused == (0 if use_gate_up_elsewhere else 1)
    gm.recompile()
    for got, want in zip(gm(x, w_in), expected, strict=True):
        torch.testing.assert_close(got, want)


class ComplexRopeDecoder(TinyDecoder):
    """TinyDecoder with DeepSeek-V2's complex RoPE as transformers 5.17 writes it: a constant made like the
    transposed angle table (strided over the tokens), which torch 2.11's Inductor could not fold."""

    def rope(self, x, position_ids):  # x [B, H, T, D]
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2) / self.head_dim)
        freqs = (inv_freq[None, :, None] @ position_ids[:, None, :].float()).transpose(1, 2)  # [B, T, D/2], strided
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs)[:, None]
        rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs_cis
        return torch.view_as_real(rotated).flatten(3).to(x.dtype)


def test_contiguous_constants_makes_a_strided_constant_contiguous():
    model = ComplexRopeDecoder().eval()
    captured = capture_model(model)
    likes = [n for n in captured.gm.graph.nodes if n.target is aten.ones_like.default]
    assert len(likes) == 6 and all(n.meta["val"].stride()[1] == 1 for n in likes)  # q's and k's, 3 layers: transposed
    result = registered_passes()["contiguous_constants"](captured.gm, CompileConfig())
    assert result.sites == 6 and all(n.kwargs["memory_format"] == torch.contiguous_format for n in likes)
    assert registered_passes()["contiguous_constants"](capture_model(TinyDecoder().eval()).gm, CompileConfig()).sites == 0
    compiled = compile_model(model, max_batch_size=2, max_seq_len=32, compile_backend="eager")  # the fix is for Inductor on GPU
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, torch.arange(10)[None])
    assert relative_error(compiled(ids).logits, expected) < 1e-5
