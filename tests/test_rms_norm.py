"""compiled_llm::rms_norm / add_rms_norm against float64, on the GPU and under TRITON_INTERPRET=1; the
fuse_rms_norm pass on HF models (sites, numerics against HF)."""

from __future__ import annotations

import random

import pytest
import torch

import custom_ops.rms_norm  # noqa: F401  (registers the ops)
from compiled_llm import compile_model
from conftest import random_prompt, relative_error, tiny_model
from custom_ops.triton_runtime import triton_available
from drop_in_models import gptfast, meta_llama
from test_linear_op import TOLERANCE, run_in_interpreter


def check_rms_norm(device: str, dtype: torch.dtype, cases: int = 6) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for case in range(cases):
        rows, n, eps = rng.randint(1, 40), rng.choice([64, 576, rng.randint(1, 3000)]), rng.choice([1e-5, 1e-6])
        x = torch.randn(1, rows, n, device=device).to(dtype)
        residual = torch.randn(1, rows, n, device=device).to(dtype)
        weight = torch.randn(n, device=device).to(dtype)
        for backend in ("torch", "triton"):
            total = (x.double() + residual.double()).to(dtype).double()  # the model's add rounds to its dtype
            for h, (out, out_total) in [
                (x.double(), (torch.ops.compiled_llm.rms_norm(x, weight, eps, backend), None)),
                (total, torch.ops.compiled_llm.add_rms_norm(x, residual, weight, eps, backend)),
            ]:
                expected = weight.double() * h / (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()
                assert out.dtype == dtype and out.shape == x.shape
                error = relative_error(out, expected)
                assert error < TOLERANCE[dtype], f"seed {seed}: {backend} rows={rows} N={n}: {error}"
                if out_total is not None:
                    assert torch.equal(out_total.double(), total), f"seed {seed}: {backend} sum"


def test_rms_norm_reference_on_cpu():
    check_rms_norm("cpu", torch.float32)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_rms_norm_kernel_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_rms_norm as t; t.check_rms_norm('cpu', torch.float32)"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_kernel_on_gpu(dtype):
    check_rms_norm("cuda", dtype, cases=20)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("arch, norms", [("llama", 2 * 2 + 1), ("qwen3", 2 * 2 + 1 + 2 * 2), ("gemma3", 0)])
def test_fuse_rms_norm_pass(arch, norms):
    """Every HF RMSNorm (Qwen3's q/k norms too) becomes the op, residual adds included; Gemma's norm,
    (1 + w) in float32, is another formula and is left alone. Logits as HF's."""
    model = tiny_model(arch)
    ids = random_prompt(12, seed=2)
    cm = compile_model(model, norm_backend="triton", compile_backend="eager", max_batch_size=2)
    assert cm.report.pass_sites("fuse_rms_norm") == norms
    with torch.no_grad():
        assert relative_error(cm(ids).logits, model(ids, use_cache=False).logits) < 1e-5


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_fuse_rms_norm_matches_bfloat16_norms():
    """In a bf16 model HF's norm casts to float32 and back: the matcher follows the casts."""
    model = tiny_model("llama").to(torch.bfloat16)
    ids = random_prompt(12, seed=2)
    cm = compile_model(model, norm_backend="triton", compile_backend="eager", max_batch_size=2)
    assert cm.report.pass_sites("fuse_rms_norm") == 2 * 2 + 1
    with torch.no_grad():
        assert relative_error(cm(ids).logits, model(ids, use_cache=False).logits) < 1e-2


def test_rms_norm_ops_refuse_mismatched_inputs():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight of shape"):
        torch.ops.compiled_llm.rms_norm(x, torch.randn(4), 1e-6, "triton")
    with pytest.raises(ValueError, match="residual"):  # broadcasting would read past the residual's rows
        torch.ops.compiled_llm.add_rms_norm(x, torch.randn(8), torch.randn(8), 1e-6, "triton")
    with pytest.raises(ValueError, match="residual"):
        torch.ops.compiled_llm.add_rms_norm(x, torch.randn(3, 8, dtype=torch.float64), torch.randn(8), 1e-6, "torch")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("build", [gptfast, meta_llama], ids=["gptfast", "meta_llama"])
def test_fuse_rms_norm_matches_gptfast_and_meta_norms(build):
    """gpt-fast squares with x * x and Meta with pow; both cast back with type_as."""
    model = build().to(torch.bfloat16)
    ids = random_prompt(12, seed=2).clamp(max=95)
    call = (lambda m: m(ids, torch.arange(12))) if build is gptfast else (lambda m: m(ids, 0))
    with torch.no_grad():
        expected = call(model).float()
    cm = compile_model(model, norm_backend="triton", compile_backend="eager", max_batch_size=2)
    assert cm.report.pass_sites("fuse_rms_norm") == 2 * 2 + 1
    assert relative_error(cm(ids).logits.float(), expected) < 2e-2
