"""compiled_llm::qk_rms_norm against float64 and against two rms_norm calls, its kernel under TRITON_INTERPRET=1 and
on the GPU; the fuse_qk_norm pass on HF models (exact sites, logits and greedy tokens as HF's)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import random_prompt, relative_error, run_in_interpreter, tiny_model
from test_linear_op import TOLERANCE

import custom_ops.rms_norm  # noqa: F401  (registers the ops)
from compiled_llm import CompileConfig, compile_model
from compiled_llm.capture import capture_model
from custom_ops.rms_norm.op import reference_rms_norm
from custom_ops.rms_norm.qk import reference_rope
from custom_ops.triton_runtime import triton_available
from fx_passes import DEFAULT_PIPELINE, run_passes

TOLERANCE = {**TOLERANCE, torch.float16: 2e-3}


def qkv_heads(tokens: int, hq: int, hk: int, d: int, dtype, device: str, generator: torch.Generator):
    """q [1, T, Hq, D] and k [1, T, Hk, D] as views of one fused qkv output (strided over the tokens), weights [D]."""
    qkv = torch.randn(1, tokens, (hq + 2 * hk) * d, generator=generator).to(device=device, dtype=dtype)
    q = qkv[..., : hq * d].view(1, tokens, hq, d)
    k = qkv[..., hq * d : (hq + hk) * d].view(1, tokens, hk, d)
    weights = [(1 + 0.5 * torch.randn(d, generator=generator)).to(device=device, dtype=dtype) for _ in range(2)]
    return q, k, *weights


def rope_tables(tokens: int, d: int, dtype, device: str, generator: torch.Generator):
    """cos and sin [T, D] of random angles, each column its own (HF repeats the halves; the op takes any table, and a
    kernel that read a column's partner would pass on HF's), cos a view strided over the tokens."""
    angles = torch.rand(tokens, d, generator=generator, dtype=torch.float64) * 100
    cos = torch.cat([angles.cos(), torch.zeros_like(angles)], -1)[:, :d]  # a row stride of 2D
    return cos.to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def exact_rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = y.shape[-1] // 2
    rotated = torch.cat([-y[..., half:], y[..., :half]], -1)
    return y * cos.double()[:, None, :] + rotated * sin.double()[:, None, :]


def check_qk_rms_norm(device: str, dtype: torch.dtype, backend: str = "triton", cases: int = 3,
                      rope: bool = False) -> None:  # fmt: skip
    """The op on fresh random views against float64 math and against the rms_norm reference called twice
    (equal for the reference; the kernel within its float32 summation order); with `rope`, RoPE after the norms."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(cases):
        tokens, d, eps = rng.randint(1, 9), rng.choice([16, 64, 80, 128]), rng.choice([1e-6, 1e-5])
        hq, hk = rng.choice([(6, 3), (5, 1), (4, 2)])  # head counts off powers of two among them
        q, k, w_q, w_k = qkv_heads(tokens, hq, hk, d, dtype, device, generator)
        tables = rope_tables(tokens, d, dtype, device, generator) if rope else ()
        q_out, k_out = torch.ops.compiled_llm.qk_rms_norm(q, k, w_q, w_k, eps, backend, *tables)
        for x, w, out in ((q, w_q, q_out), (k, w_k, k_out)):
            where = f"seed {seed}: {backend} {dtype} T={tokens} heads={x.shape[2]} D={d} rope={rope}"
            assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous(), where
            expected = reference_rms_norm(x, w, eps)
            if rope:
                expected = reference_rope(expected, *tables)
            rtol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
            if backend == "torch":
                assert torch.equal(out, expected), where
            elif rope:  # a norm output a rounding step apart moves y * cos + y' * sin by that step of each term, which
                # may nearly cancel: bounded by the terms' sizes, not the result's
                y = reference_rms_norm(x, w, eps).float().reshape(-1, *x.shape[-2:])
                cos, sin = (table.float()[:, None, :] for table in tables)
                half = d // 2
                terms = y.abs() * cos.abs() + torch.cat([y[..., half:], y[..., :half]], -1).abs() * sin.abs()
                apart = (out.float() - expected.float()).reshape(terms.shape).abs()
                assert (apart <= 2 * rtol * terms + 1e-5).all(), f"{where}: {apart.max()}"
            else:  # float32 sums in another order, so a 16-bit output may round one step apart
                torch.testing.assert_close(
                    out, expected, rtol=rtol, atol=1e-5, msg=lambda m, where=where: f"{where}: {m}"
                )
            h = x.double()
            exact = w.double() * h / (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            if rope:
                exact = exact_rope(exact[0], *tables)[None]
            assert relative_error(out, exact) < TOLERANCE[dtype] * (2 if rope else 1), where


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_rms_norm_reference_on_cpu(dtype):
    check_qk_rms_norm("cpu", dtype, "torch")
    check_qk_rms_norm("cpu", dtype, "torch", rope=True)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_qk_rms_norm_kernel_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_qk_rms_norm as t\n"
        "for dtype in (torch.float32, torch.float16):\n"
        "    t.check_qk_rms_norm('cpu', dtype)\n"
        "    t.check_qk_rms_norm('cpu', dtype, rope=True)"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_qk_rms_norm_kernel_on_gpu():
    check_qk_rms_norm("cuda", torch.bfloat16, cases=20)
    check_qk_rms_norm("cuda", torch.bfloat16, cases=20, rope=True)


def test_qk_rms_norm_refuses_mismatched_inputs():
    q, k, w = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(8)
    with pytest.raises(ValueError, match="leading dims"):
        torch.ops.compiled_llm.qk_rms_norm(q, torch.randn(2, 2, 8), w, w, 1e-6, "triton")
    with pytest.raises(ValueError, match="k_weight of shape"):
        torch.ops.compiled_llm.qk_rms_norm(q, k, w, torch.randn(4), 1e-6, "triton")
    with pytest.raises(ValueError, match="one dtype"):
        torch.ops.compiled_llm.qk_rms_norm(q, k.double(), w, w, 1e-6, "torch")
    with pytest.raises(ValueError, match="cos and sin come together"):
        torch.ops.compiled_llm.qk_rms_norm(q, k, w, w, 1e-6, "triton", torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"must be \[tokens, head_dim\] = \(3, 8\)"):
        torch.ops.compiled_llm.qk_rms_norm(q, k, w, w, 1e-6, "triton", torch.randn(4, 8), torch.randn(4, 8))


def _sites(model) -> dict[str, int]:
    gm = capture_model(model).gm
    results = run_passes(gm, CompileConfig(norm_backend="triton" if triton_available() else "torch"))
    ops = torch.ops.compiled_llm
    counts = {
        target: sum(n.target is target for n in gm.graph.nodes)
        for target in (ops.rms_norm.default, ops.qk_rms_norm.default)
    }
    with_rope = sum(n.target is ops.qk_rms_norm.default and len(n.args) == 8 for n in gm.graph.nodes)
    return {"sites": next(r.sites for r in results if r.name == "fuse_qk_norm"), "with_rope": with_rope, **counts}


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize(
    "arch, pairs",
    # One pair a layer (2 layers; Qwen3's below); Llama and DeepSeek's latent norms (two norms in one attention layer,
    # not per head) have none; Gemma 3's (1 + w) norm is not fuse_rms_norm's, so its q/k norms stay Inductor's.
    [("qwen3_moe", 2), ("llama", 0), ("deepseek_v3", 0), ("gemma3", 0)],
)
def test_fuse_qk_norm_sites(arch, pairs):
    sites = _sites(tiny_model(arch))
    assert sites["sites"] == pairs
    assert sites[torch.ops.compiled_llm.qk_rms_norm.default] == pairs
    assert sites["with_rope"] == pairs  # each pair with its layer's RoPE (HF's rotate_half form)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_fuse_qk_norm_leaves_a_pair_of_two_eps_alone():
    model = tiny_model("qwen3")
    model.model.layers[0].self_attn.k_norm.variance_epsilon = 1e-5  # q's is 1e-6: one op cannot compute both
    sites = _sites(model)
    assert sites["sites"] == 1 and sites["with_rope"] == 1
    assert sites[torch.ops.compiled_llm.rms_norm.default] == 1 + 2  # the first layer's input norm, and that pair


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_fuse_qk_norm_on_qwen3_matches_hf():
    """With the pass and without: logits as HF's, and HF's greedy tokens."""
    model = tiny_model("qwen3")
    ids = random_prompt(20, seed=7)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        expected_tokens = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
    without = tuple(p for p in DEFAULT_PIPELINE if p != "fuse_qk_norm")
    for passes, pairs in ((DEFAULT_PIPELINE, 2), (without, None)):
        cm = compile_model(model, norm_backend="triton", compile_backend="eager", max_batch_size=2, passes=passes)
        if pairs:
            assert cm.report.pass_sites("fuse_qk_norm") == pairs
            assert (
                sum(n.target is torch.ops.compiled_llm.qk_rms_norm.default for n in cm.graph_module.graph.nodes)
                == pairs
            )
        assert relative_error(cm(ids).logits, expected) < 1e-4
        if pairs:
            assert torch.equal(cm.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[]), expected_tokens)


def _interleaved_rope(q, k, cos, sin, unsqueeze_dim=1):
    """RoPE over adjacent pairs (GPT-J's form), not HF's halves: not the op's rotation."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotated(x):
        return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)

    return q * cos + rotated(q) * sin, k * cos + rotated(k) * sin


def _swapped_tables_for_k(q, k, cos, sin, unsqueeze_dim=1):
    """HF's form, but k's tables swapped: q's and k's RoPE are not one rotation."""
    from transformers.models.qwen3.modeling_qwen3 import rotate_half

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * sin + rotate_half(k) * cos


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("rope", [_interleaved_rope, _swapped_tables_for_k])
def test_a_rope_that_is_not_one_rotate_half_for_q_and_k_stays_inductors(monkeypatch, rope):
    """The norms pair, their RoPE is left to Inductor, and the logits are the module's own."""
    import transformers.models.qwen3.modeling_qwen3 as qwen3

    monkeypatch.setattr(qwen3, "apply_rotary_pos_emb", rope)
    model = tiny_model("qwen3")
    sites = _sites(model)
    assert (sites["sites"], sites["with_rope"]) == (2, 0)
    ids = random_prompt(12, seed=3)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    cm = compile_model(model, norm_backend="triton", compile_backend="eager", max_batch_size=1)
    assert relative_error(cm(ids).logits, expected) < 1e-4
