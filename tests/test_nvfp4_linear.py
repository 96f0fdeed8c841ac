"""compiled_llm::nvfp4_linear (custom_ops/linear/nvfp4.py): E2M1 codes and their packing pinned by hand, the quantizer
held to ModelOpt's own (nvidia-modelopt's NVFP4QTensor, bit for bit), the reference against float64, and the Triton
kernels against the reference in Triton's interpreter on CPU (float32, float16: the interpreter's dot misreads
bfloat16 values made in a kernel) and on the GPU (bfloat16, float16)."""

import pytest
import torch
from conftest import relative_error, run_in_interpreter

from custom_ops.linear.nvfp4 import (
    dequantize,
    e2m1_codes,
    e2m1_values,
    nvfp4_linear_reference,
    quantize_weight,
)
from custom_ops.triton_runtime import triton_available

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def test_codes_decode_and_round_as_e2m1():
    """Code bits s e1 e0 m: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; rounding to the nearest, a tie to the even
    code (1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 5 -> 4), saturating at 6."""
    assert e2m1_values(torch.arange(16, dtype=torch.uint8)).tolist() == [
        0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6,
    ]  # fmt: skip
    values = torch.tensor([0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.1, -2.9])
    assert e2m1_codes(values).tolist() == [0, 1, 2, 2, 4, 4, 6, 6, 7, 7, 8, 13]


def test_a_hand_worked_block_dequantizes():
    """One output channel of 16 columns: bytes 0x2F (column 0 -6, column 1 +1) then 0x91 (0.5, -0.5), the rest 0; its
    e4m3 scale 0.75 and a global scale of 2: W = e2m1 * 0.75 * 2."""
    weight = torch.tensor([[0x2F, 0x91, 0, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    scales = torch.tensor([[0.75]]).to(torch.float8_e4m3fn)
    expected = torch.zeros(1, 16)
    expected[0, :4] = torch.tensor([-6.0, 1.0, 0.5, -0.5]) * 1.5
    assert torch.equal(dequantize(weight, scales, torch.tensor([2.0])), expected)


def test_the_quantizer_is_modelopts_bit_for_bit():
    """Codes, e4m3 scales and the global scale as ModelOpt's NVFP4QTensor.quantize makes them, and its dequantization,
    on random weights with an all-zero block (ModelOpt's scale 1 there)."""
    quantization = pytest.importorskip("modelopt.torch.quantization.qtensor")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 96, generator=generator) * 0.05
    weight[3, 16:32] = 0
    weight[5, :] *= 40  # a channel far above the rest: its blocks' scales near e4m3's top
    packed, scales, global_scale = quantize_weight(weight)
    theirs, their_scales, their_global = quantization.NVFP4QTensor.quantize(weight.clone(), 16)
    assert torch.equal(packed, theirs._quantized_data)
    assert torch.equal(scales.view(torch.uint8), their_scales.view(torch.uint8))
    assert torch.equal(global_scale, their_global.reshape(1).expand(24))  # one a weight, repeated per channel
    their_weight = theirs.dequantize(torch.float32, scale=their_scales, double_scale=their_global, block_sizes={-1: 16})
    assert torch.equal(dequantize(packed, scales, global_scale), their_weight)


def test_quantization_error_is_what_4_bits_allow():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    assert relative_error(dequantize(*quantize_weight(weight)), weight) < 0.12


def test_the_reference_matches_float64():
    """With a global scale per channel, as fused q/k/v stored with their own have it."""
    generator = torch.Generator().manual_seed(2)
    packed, scales, global_scale = quantize_weight(torch.randn(40, 128, generator=generator))
    global_scale = global_scale * torch.rand(40, generator=generator)
    x, bias = torch.randn(3, 2, 128, generator=generator), torch.randn(40, generator=generator)
    expected = x.double() @ dequantize(packed, scales, global_scale).double().t() + bias.double()
    smooth = torch.rand(2, 128, generator=generator) + 0.5  # two parts, 16 and 24 channels: x times each's row
    smoothed = torch.cat([(x.double() * s.double()) @ w.double().t() for s, w in
                          zip(smooth, dequantize(packed, scales, global_scale).split([16, 24]))], -1)  # fmt: skip
    actual = torch.ops.compiled_llm.nvfp4_linear(x, packed, scales, global_scale, smooth, [16, 24], None, "torch")
    assert relative_error(actual, smoothed) < 1e-6
    actual = torch.ops.compiled_llm.nvfp4_linear(x, packed, scales, global_scale, None, [], bias, "torch")
    assert actual.shape == (3, 2, 40)
    assert relative_error(actual, expected) < 1e-6


def test_a_width_that_is_not_a_multiple_of_16_is_refused():
    with pytest.raises(ValueError, match="blocks of 16 columns do not tile a weight of 40 columns"):
        quantize_weight(torch.randn(4, 40))


def check_triton_against_reference(device: str, dtype: torch.dtype) -> None:
    """The `triton` backend (GEMV for one row, tensor-core GEMM for more) against the reference, with and without a
    bias, smooths of one to three parts, on shapes that leave partial tiles, and each kernel with a tile that takes
    several steps of K."""
    from custom_ops.linear import triton_nvfp4

    generator = torch.Generator().manual_seed(3)
    # (N, K, rows, the parts' channels): 40 leaves partial tiles (no parts: a smooth needs 16-channel parts)
    cases = ((40, 256, 1, None), (48, 512, 5, [16, 32]), (96, 384, 1, [32, 48, 16]), (96, 384, 20, [96]),
             (16, 64, 3, None), (40, 1024, 70, None))  # fmt: skip
    for n, k, rows, smooth_rows in cases:
        smooth = torch.rand(len(smooth_rows), k, generator=generator) + 0.5 if smooth_rows else None
        divided = smooth.repeat_interleave(torch.tensor(smooth_rows), 0) if smooth_rows else None
        packed, scales, global_scale = quantize_weight(torch.randn(n, k, generator=generator) * 0.1, divided)
        global_scale = global_scale * (torch.rand(n, generator=generator) + 0.5)  # each channel its own (fused parts)
        quantized = [t.to(device) for t in (packed, scales, global_scale)]
        extra = (smooth.to(device) if smooth_rows else None, smooth_rows or [])
        x = torch.randn(rows, k, generator=generator).to(dtype).to(device)
        bias = torch.randn(n, generator=generator).to(dtype).to(device)
        for b in (bias, None):
            expected = nvfp4_linear_reference(x, *quantized, *extra, b)
            actual = torch.ops.compiled_llm.nvfp4_linear(x, *quantized, *extra, b, "triton")
            assert relative_error(actual.cpu(), expected.cpu()) < TOLERANCE[dtype], (n, k, rows, smooth_rows)
    x = torch.randn(2, 512, generator=generator).to(dtype).to(device)
    quantized = [t.to(device) for t in quantize_weight(torch.randn(24, 512, generator=generator))]
    expected = nvfp4_linear_reference(x, *quantized, None, [], None)
    for out in (triton_nvfp4.nvfp4_gemv(x[:1], *quantized, None, [], None, GROUPS_A_STEP=4, BLOCK_N=4),
                triton_nvfp4.nvfp4_gemm(x, *quantized, None, [], None, BLOCK_K=64, BLOCK_N=16)):  # fmt: skip
        assert relative_error(out.cpu(), expected[: out.shape[0]].cpu()) < TOLERANCE[dtype]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernels_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_nvfp4_linear as t; "
        "t.check_triton_against_reference('cpu', torch.float32); "
        "t.check_triton_against_reference('cpu', torch.float16); t.check_tuning_candidates_against_reference()"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernels_on_the_gpu(dtype):
    check_triton_against_reference("cuda", dtype)


def test_the_triton_backend_falls_back_to_the_reference_where_it_cannot_run():
    """On a CPU without the interpreter, or K not a multiple of 64: the reference's result."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 48, generator=generator)
    quantized = quantize_weight(torch.randn(8, 48, generator=generator))
    expected = nvfp4_linear_reference(x, *quantized, None, [], None)
    assert torch.equal(torch.ops.compiled_llm.nvfp4_linear(x, *quantized, None, [], None, "triton"), expected)


def check_tuning_candidates_against_reference(device: str = "cpu") -> None:
    """Every candidate of the GEMV's and the GEMM's tunings (nvfp4_tuning.py), in the interpreter (the Gluon
    tensor-core decode left out: the interpreter does not run Gluon) or on the GPU, against the reference; the
    tensor-core decode's in bfloat16, which it takes."""
    from custom_ops.linear import nvfp4_tuning

    generator = torch.Generator().manual_seed(6)
    n, k = 64, 512
    smooth = torch.rand(1, k, generator=generator) + 0.5
    quantized = [t.to(device) for t in (*quantize_weight(torch.randn(n, k, generator=generator), smooth[0]), smooth)]
    for tuning, rows in ((nvfp4_tuning.Nvfp4GemvTuning(), 1), (nvfp4_tuning.Nvfp4GemmTuning(), 16)):
        x = torch.randn(rows, k, generator=generator).to(device)
        expected = tuning.reference(x, *quantized)
        x16 = x.to(torch.bfloat16)
        expected16 = tuning.reference(x16, *quantized)
        for candidate in tuning.candidates({"n": n, "k": k, "rows": rows}):
            if candidate.config.get("MMA"):
                if device != "cpu":
                    actual = candidate.run(x16, *quantized)
                    assert relative_error(actual, expected16) < TOLERANCE[torch.bfloat16], candidate.name
                continue
            actual = candidate.run(x, *quantized)
            assert relative_error(actual, expected) < TOLERANCE[torch.float32], candidate.name


@pytest.mark.gpu
def test_tuning_candidates_on_the_gpu():
    check_tuning_candidates_against_reference("cuda")


def test_the_tunings_find_the_triton_nvfp4_linears_and_install_their_launches(monkeypatch):
    """Buckets: each `triton` nvfp4_linear's (N, K), and the GEMM's row buckets; the fallback first, named after its
    kind; a winner lands in triton_nvfp4's tables under the device it was tuned on."""
    from custom_ops.linear import nvfp4_tuning, triton_nvfp4

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    gm = torch.nn.Module()
    for name, (n, k, backend) in {"a": (64, 512, "triton"), "b": (32, 256, "torch")}.items():
        for part, tensor in zip(("w", "s", "g"), quantize_weight(torch.randn(n, k))):
            gm.register_buffer(f"{name}_{part}", tensor)
        args = [graph.get_attr(f"{name}_{part}") for part in ("w", "s", "g")]
        graph.call_function(nvfp4_tuning.NVFP4_LINEAR, (x, *args, None, [], None, backend))
    gm = torch.fx.GraphModule(gm, graph)
    gemv, gemm = nvfp4_tuning.Nvfp4GemvTuning(), nvfp4_tuning.Nvfp4GemmTuning()
    assert gemv.buckets(gm) == [{"n": 64, "k": 512}]
    assert gemm.buckets(gm) == [{"n": 64, "k": 512, "rows": 16}, {"n": 64, "k": 512, "rows": 64}]
    candidates = gemv.candidates({"n": 64, "k": 512})
    # up to 16 rows the fallback is the tensor-core decode's, so the Triton kernels' own launch is a candidate too
    assert [c.name for c in candidates[:3]] == ["gemv", "gemv-triton", "gemv-g32-warps8"]
    assert "mma-split8" in {c.name for c in candidates}
    assert [c.name for c in gemm.candidates({"rows": 16})[:2]] == ["gemm", "gemm-triton"]
    assert not any(c.name.startswith(("mma", "gemm-triton")) for c in gemm.candidates({"rows": 64}))
    monkeypatch.setattr(triton_nvfp4, "TUNED_GEMV", {})
    monkeypatch.setattr(triton_nvfp4, "TUNED_GEMM", {})
    gemv.install({"n": 64, "k": 512}, candidates[2], torch.device("cpu"))
    gemm.install({"n": 64, "k": 512, "rows": 64}, gemm.candidates({"rows": 64})[2], torch.device("cpu"))
    assert triton_nvfp4.TUNED_GEMV == {(-1, 64, 512): {"GROUPS_A_STEP": 32, "num_warps": 8}}
    assert triton_nvfp4.TUNED_GEMM == {(-1, 64, 512, 64): {"BLOCK_N": 32}}


def test_an_all_zero_weight_rounds_to_zeros():
    """ModelOpt's recipe divides by a global scale of 0 there (every scale 0 / 0); here the weight stays 0."""
    assert torch.equal(dequantize(*quantize_weight(torch.zeros(4, 32))), torch.zeros(4, 32))


def test_the_search_s_rounding_is_the_codes():
    """e2m1_round (AWQ's search rounds with it, without codes) is the codes' values, on a dense grid with every tie;
    fake_quantize is the dequantized quantization, with a smooth and a clip."""
    from custom_ops.linear.nvfp4 import e2m1_round, fake_quantize

    values = torch.cat([torch.linspace(-8, 8, 20001), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, 7.0])])
    assert torch.equal(e2m1_round(values), e2m1_values(e2m1_codes(values)))
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(32, 64, generator=generator)
    smooth, clip = torch.rand(64, generator=generator) + 0.5, torch.rand(32, 4, generator=generator) + 0.5
    assert torch.equal(fake_quantize(weight, 16, smooth, clip), dequantize(*quantize_weight(weight, smooth, clip)))
