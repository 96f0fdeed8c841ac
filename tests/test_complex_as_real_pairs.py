"""complex_as_real_pairs: complex RoPE (DeepSeek-V2's, Meta's reference Llama's) as real arithmetic, the same values as
ATen's complex kernels, and a graph with a complex op it does not cover left whole."""

from __future__ import annotations

import torch
from conftest import tiny_model
from torch import nn

from compiled_llm import CompileConfig, compile_model
from fx_passes import registered_passes

complex_as_real_pairs = registered_passes()["complex_as_real_pairs"]


def _exported(module, *args):
    """The module's graph as the pipeline gives it to the pass: exported, then without export's asserts."""
    gm = torch.export.export(module, args, strict=False).module()
    registered_passes()["graph_cleanup"](gm, CompileConfig())
    return gm


def _complex_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_complex()]


class ComplexOps(nn.Module):
    """Every op the pass rewrites, over a complex buffer and complex values made in the graph."""

    def __init__(self):
        super().__init__()
        angles = torch.randn(16, 4, dtype=torch.float64)
        self.register_buffer("table", torch.polar(torch.rand(16, 4, dtype=torch.float64) + 0.5, angles))

    def forward(self, x, positions, scale):
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # [T, H, 4]
        f = self.table.to(torch.complex128).index_select(0, positions).unsqueeze(1)  # [T, 1, 4]
        g = torch.polar(scale.unsqueeze(-1).expand(-1, 4), positions.double().unsqueeze(-1) * 0.1)  # [T, 4]
        y = z * f * (2.0 - 0.5j) + g.view(-1, 1, 4).expand(-1, z.shape[1], 4) - z * scale.view(-1, 1, 1)
        y = y.transpose(0, 1).permute(1, 0, 2).clone()[:, :, 1:].select(-1, 0).unsqueeze(-1) * 3.0
        return torch.view_as_real(y).flatten(-2), torch.view_as_real(z[1:] * f[:-1]).flatten(-2)


def test_every_rewritten_op_computes_what_atens_complex_kernels_do():
    x, positions, scale = torch.randn(5, 3, 8, dtype=torch.float64), torch.tensor([3, 0, 15, 7, 7]), torch.rand(5) + 1
    gm = _exported(ComplexOps(), x, positions, scale.double())
    expected = gm(x, positions, scale.double())
    assert len(_complex_nodes(gm)) > 10
    result = complex_as_real_pairs(gm, CompileConfig())
    assert result.sites == 2  # the two view_as_real results
    # What is left complex: the buffer itself, read through a real view of it
    assert [n.op for n in _complex_nodes(gm)] == ["get_attr"]
    for got, want in zip(gm(x, positions, scale.double()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


class AtensEdges(nn.Module):
    """What ATen's complex ops do beyond finite values in one dtype: a 0-dim operand that does not promote, infinities
    times a real (promoted to x + 0i: inf * 0 is NaN), a real first operand whose layout the result keeps (a view of it
    is valid), and a complex value turned real and back."""

    def forward(self, x, y, t):
        z = torch.view_as_complex(x.reshape(4, 3, 2))  # complex64 [4, 3]
        promoted = torch.view_as_real(z * t.double().sum() + z[1, 2].to(torch.complex128))  # complex64 still
        kept = torch.view_as_real(y * z.transpose(0, 1)).view(12, 2)  # [3, 4] in y's layout
        again = torch.view_as_real(torch.view_as_complex(torch.view_as_real(z * (1 - 2j))) * 2.5)
        # ATen lays the product out as z (transposed), where a view back to [12, 2] is valid
        ordered = torch.view_as_real(z.transpose(0, 1) * z.transpose(0, 1)).transpose(0, 1).view(12, 2)
        return promoted, kept, again, ordered


def test_dtypes_infinities_layouts_as_aten_gives_them():
    x, y, t = torch.randn(4, 6), torch.randn(3, 4), torch.randn(5)
    x[0, 1], x[2, 4] = float("inf"), float("-inf")
    gm = _exported(AtensEdges(), x, y, t)
    expected = gm(x, y, t)
    assert complex_as_real_pairs(gm, CompileConfig()).sites == 5 and not _complex_nodes(gm)  # 5 view_as_real
    for got, want in zip(gm(x, y, t), expected, strict=True):
        assert got.dtype == want.dtype and got.stride() == want.stride()
        torch.testing.assert_close(got, want, equal_nan=True)


class ComplexAbs(nn.Module):
    def forward(self, x):
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * (1 + 1j)
        return z.abs(), torch.view_as_real(z)


class ComplexExp(nn.Module):
    def forward(self, x):
        return torch.view_as_real(torch.exp(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))))


class RealToComplex(nn.Module):  # a complex value made from a real tensor by a cast
    def forward(self, x):
        return torch.view_as_real(x.to(torch.complex64) * (1 + 1j))


class ChannelsLast(nn.Module):  # a layout the pairs (one more dimension) do not have
    def forward(self, x):
        z = torch.view_as_complex(x.reshape(2, 3, 4, 5, 2)).clone(memory_format=torch.channels_last)
        return torch.view_as_real(z)


class ComplexTableOut(nn.Module):  # a complex buffer the graph returns as it is
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.polar(torch.ones(4, 4), torch.randn(4, 4)))

    def forward(self, x):
        return x * 2, self.table


def test_a_complex_op_it_does_not_cover_leaves_the_graph_whole():
    cases = [(ComplexAbs(), "abs", (4, 8)), (ComplexExp(), "exp", (4, 8)), (ComplexTableOut(), "output", (4, 8)),
             (RealToComplex(), "to.dtype", (4, 8)), (ChannelsLast(), "channels_last", (240,))]  # fmt: skip
    for module, named, shape in cases:
        x = torch.randn(shape)
        gm = _exported(module, x)
        expected, before = gm(x), len(gm.graph.nodes)
        result = complex_as_real_pairs(gm, CompileConfig())
        assert result.sites == 0 and named in result.detail and "not covered" in result.detail
        assert len(gm.graph.nodes) == before
        for got, want in zip(gm(x), expected, strict=True):
            assert torch.equal(got, want)


def test_deepseek_v2_rope_runs_as_real_pairs_and_matches_the_model():
    model = tiny_model("deepseek_v2")
    cm = compile_model(model, compile_backend="eager", max_batch_size=2, max_seq_len=64)
    assert cm.report.pass_sites("complex_as_real_pairs") == 2 * model.config.num_hidden_layers  # q and k a layer
    assert not _complex_nodes(cm.graph_module)
    prompt = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(prompt).logits
    torch.testing.assert_close(cm(prompt).logits, expected, rtol=1e-4, atol=1e-4)
