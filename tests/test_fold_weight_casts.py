"""fold_weight_casts: which widened weights it folds, and the same values computed after it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from compiled_llm import CompileConfig, compile_model
from fx_passes import DEFAULT_PIPELINE, fold_weight_casts, registered_passes

aten = torch.ops.aten


class Casts(nn.Module):
    """A router-like linear over a widened bf16 weight (folded), and casts the pass must leave: one also read by an
    add, one narrowing, one of a buffer."""

    def __init__(self):
        super().__init__()
        self.router = nn.Parameter(torch.randn(6, 8).to(torch.bfloat16))
        self.shared = nn.Parameter(torch.randn(6, 8).to(torch.bfloat16))
        self.narrowed = nn.Parameter(torch.randn(6, 8))
        self.register_buffer("table", torch.randn(6, 8).to(torch.bfloat16))

    def forward(self, x):
        x32 = x.float()
        shared = self.shared.float()
        return (
            nn.functional.linear(x32, self.router.float()),
            nn.functional.linear(x32, shared) + shared.sum(),
            nn.functional.linear(x, self.narrowed.to(torch.bfloat16)),
            nn.functional.linear(x32, self.table.float()),
        )


def _widening_casts(gm) -> int:
    return sum(
        n.op == "call_function" and n.target is aten.to.dtype and n.args[0].op == "get_attr" for n in gm.graph.nodes
    )


def test_only_a_small_parameter_widened_for_linears_alone_is_folded():
    x = torch.randn(3, 8).to(torch.bfloat16)
    gm = torch.export.export(Casts(), (x,), strict=False).module()
    expected = gm(x)
    assert _widening_casts(gm) == 4
    result = registered_passes()["fold_weight_casts"](gm, CompileConfig())
    assert result.sites == 1 and _widening_casts(gm) == 3
    assert [name for name, _, _ in gm.meta["derived_weights"]] == ["fx_passes.fold_weight_casts.widen_parameter"]
    for got, want in zip(gm(x), expected, strict=True):
        assert torch.equal(got, want)  # widening is exact: the same values, bit for bit


def test_a_weight_over_the_limit_is_left(monkeypatch):
    x = torch.randn(3, 8).to(torch.bfloat16)
    gm = torch.export.export(Casts(), (x,), strict=False).module()
    monkeypatch.setattr(fold_weight_casts, "MAX_BYTES", 6 * 8 * 4 - 1)
    assert registered_passes()["fold_weight_casts"](gm, CompileConfig()).sites == 0


@pytest.fixture(scope="module")
def deepseek_bf16():
    return tiny_model("deepseek_v2").to(torch.bfloat16)


def test_deepseek_routers_read_their_weight_widened_once(deepseek_bf16):
    """DeepSeek-V2's routers widen their bf16 weight to float32 each step: folded in every MoE layer, and the logits
    are those of the graph without the pass, bit for bit."""
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    fields = {"compile_backend": "eager", "max_batch_size": 2}
    without = tuple(p for p in DEFAULT_PIPELINE if p != "fold_weight_casts")
    with torch.no_grad():
        folded = compile_model(deepseek_bf16, **fields)
        unfolded = compile_model(deepseek_bf16, passes=without, **fields)
        got, want = folded(ids).logits, unfolded(ids).logits
    moe_layers = sum(
        hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts") for layer in deepseek_bf16.model.layers
    )
    assert moe_layers > 0 and folded.report.pass_sites("fold_weight_casts") == moe_layers
    assert torch.equal(got, want)
