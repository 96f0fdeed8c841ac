"""`compiled_llm::int4_linear` (custom_ops/linear/int4.py): the packing pinned by a hand-worked example, the quantizer's
rounding, the reference against float64, and the Triton kernels against the reference in Triton's interpreter on CPU
and on the GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error, run_in_interpreter

from custom_ops.linear.int4 import (
    dequantize,
    fake_quantize,
    fake_quantize_with_offsets,
    int4_linear_reference,
    pack_codes,
    quantize_weight,
    unpack_codes,
)
from custom_ops.triton_runtime import triton_available

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def test_codes_pack_two_a_byte_low_nibble_first():
    """Columns 0..7 with codes 1..8: bytes 0x21 0x43 0x65 0x87, which read as one little-endian int32 word hold
    column j in nibble j (what the GEMV's word reads assume)."""
    codes = torch.arange(1, 9, dtype=torch.uint8).view(1, 8)
    packed = pack_codes(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x65, 0x87]]
    word = packed.view(torch.int32).item() & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 15 for j in range(8)] == list(range(1, 9))
    assert torch.equal(unpack_codes(packed), codes)


def test_a_group_dequantizes_to_its_codes_minus_zero_times_scale():
    """A group of 16 columns spanning [-1, 2]: s = 3/15 = 0.2, z = round(1 / 0.2) = 5; -1 -> code 0, 2 -> code 15,
    0.3 -> round(1.5) + 5 = 7 (half to even), each dequantized as (q - 5) * 0.2."""
    weight = torch.zeros(1, 16)
    weight[0, :3] = torch.tensor([-1.0, 2.0, 0.3])
    qweight, scales, zeros = quantize_weight(weight, group_size=16)
    assert scales.item() == pytest.approx(0.2) and zeros.item() == 5
    assert unpack_codes(qweight)[0, :4].tolist() == [0, 15, 7, 5]
    expected = torch.tensor([-1.0, 2.0, 0.4, 0.0])
    assert torch.allclose(dequantize(qweight, scales, zeros, 16)[0, :4], expected, atol=1e-6)


@pytest.mark.parametrize("shape", [(24, 256), (5, 128)])
def test_rounding_error_is_at_most_half_a_step(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    qweight, scales, zeros = quantize_weight(weight, group_size=64)
    error = (dequantize(qweight, scales, zeros, 64) - weight).abs().view(shape[0], -1, 64)
    assert (error <= scales[..., None] / 2 + 1e-6).all()
    assert 0 < error.max() and zeros.max() <= 15 and unpack_codes(qweight).max() <= 15


def smooth_per_part(smooth: torch.Tensor, smooth_rows: list[int]) -> torch.Tensor:
    """smooth [P, K] as a row for each output channel [N, K] (what quantize_weight divides by)."""
    return smooth.repeat_interleave(torch.tensor(smooth_rows), dim=0)


def test_smooth_scales_the_columns_each_part_was_divided_by():
    """Quantizing each part of W divided by its smooth and multiplying x by that part's smooth computes x W^T up to
    the rounding of W / smooth: the parts' outputs side by side, each with its own scaling."""
    generator = torch.Generator().manual_seed(1)
    weight, x = torch.randn(32, 128, generator=generator), torch.randn(3, 128, generator=generator)
    smooth, smooth_rows = torch.rand(2, 128, generator=generator) + 0.5, [8, 24]
    quantized = quantize_weight(weight, 64, smooth_per_part(smooth, smooth_rows))
    out = int4_linear_reference(x, *quantized, smooth, smooth_rows, None, 64)
    rounded = dequantize(*quantized, 64) * smooth_per_part(smooth, smooth_rows)  # the weight the op computes with
    assert torch.allclose(out, x @ rounded.t(), atol=1e-4)
    with pytest.raises(ValueError, match="does not cover the weight's 32 output channels"):
        int4_linear_reference(x, *quantized, smooth, [8, 8], None, 64)
    assert relative_error(out, x @ weight.t()) < 0.15  # 4 bits: a step of ~range / 15, ~10% RMS


def test_float_offsets_dequantize_as_codes_times_scale_plus_offset():
    """GGUF's Q4_1 form: zeros in a float dtype are offsets m, w = q s + m."""
    codes = torch.tensor([[0, 15, 7, 1]], dtype=torch.uint8)
    scales, offsets = torch.tensor([[0.5, 0.25]]), torch.tensor([[-1.0, 2.0]])
    weight = dequantize(pack_codes(codes), scales, offsets, 2)
    assert weight.tolist() == [[-1.0, 6.5, 3.75, 2.25]]


def test_the_reference_is_the_float64_product_of_its_dequantized_weight():
    generator = torch.Generator().manual_seed(2)
    weight, x, bias = (
        torch.randn(48, 256, generator=generator),
        torch.randn(2, 3, 256, generator=generator),
        torch.randn(48),
    )
    quantized = quantize_weight(weight, 128)
    out = torch.ops.compiled_llm.int4_linear(x, *quantized, None, [], bias, 128, "torch")
    expected = x.double() @ dequantize(*quantized, 128).double().t() + bias.double()
    assert out.shape == (2, 3, 48) and relative_error(out, expected) < 1e-6


def check_triton_against_reference(device: str, dtype: torch.dtype) -> None:
    """The `triton` backend (GEMV for one row, tensor-core GEMM for more) against the reference, over group sizes,
    smooths of one to three parts, a bias, shapes that leave partial tiles."""
    from custom_ops.linear import triton_int4

    generator = torch.Generator().manual_seed(3)
    # (N, K, group, rows, the parts' channels): 40 leaves partial tiles (no parts: a smooth needs 16-channel parts)
    # and zero points or int4_awq's float offsets
    cases = ((40, 256, 128, 1, None, False), (48, 256, 128, 5, [16, 32], False), (96, 384, 64, 1, [32, 48, 16], False),
             (96, 384, 64, 20, [96], False), (16, 128, 32, 3, [16], False), (40, 256, 128, 7, None, False),
             (48, 256, 128, 1, [16, 32], True), (96, 384, 64, 20, [32, 48, 16], True))  # fmt: skip
    for n, k, group, rows, smooth_rows, offsets in cases:
        weight = torch.randn(n, k, generator=generator)
        smooth = torch.rand(len(smooth_rows), k, generator=generator) + 0.5 if smooth_rows else None
        divided = smooth_per_part(smooth, smooth_rows) if smooth_rows else None
        qweight, scales, zeros = quantize_weight(weight, group, divided, scale_dtype=dtype, offsets=offsets)
        x = torch.randn(rows, k, generator=generator).to(dtype)
        bias = torch.randn(n, generator=generator).to(dtype)
        for with_bias in (True, False):
            args = [t.to(device) for t in (x, qweight, scales, zeros)]
            extra = (smooth.to(device) if smooth_rows else None, smooth_rows or [])
            b = bias.to(device) if with_bias else None
            expected = int4_linear_reference(*args, *extra, b, group)
            actual = torch.ops.compiled_llm.int4_linear(*args, *extra, b, group, "triton")
            error = relative_error(actual.cpu(), expected.cpu())
            assert error < TOLERANCE[dtype], (n, k, group, rows, smooth_rows, error)
    # Float offsets (w = q s + m, GGUF's Q4_1): random codes, scales and offsets in the model's dtype, groups of 32
    # (at one row, a K of 8192 takes the GEMV's pipelined default, and on the GPU its PTX decode)
    for n, k, rows in ((48, 256, 1), (48, 256, 6), (40, 96 * 2, 1), (40, 8192, 1)):
        codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
        scales = (torch.rand(n, k // 32, generator=generator) * 0.1).to(dtype)
        offsets = (torch.randn(n, k // 32, generator=generator) * 0.5).to(dtype)
        x = torch.randn(rows, k, generator=generator).to(dtype)
        args = [t.to(device) for t in (x, pack_codes(codes), scales, offsets)]
        expected = int4_linear_reference(*args, None, [], None, 32)
        actual = torch.ops.compiled_llm.int4_linear(*args, None, [], None, 32, "triton")
        assert relative_error(actual.cpu(), expected.cpu()) < TOLERANCE[dtype], ("offsets", n, k, rows)
    # Each kernel by itself too (the op routes by rows), with a tile that takes more than one step of K.
    x = torch.randn(1, 384, generator=generator).to(dtype).to(device)
    quantized = [
        t.to(device) for t in quantize_weight(torch.randn(24, 384, generator=generator), 64, scale_dtype=dtype)
    ]
    expected = int4_linear_reference(x, *quantized, None, [], None, 64)
    for out in (triton_int4.int4_gemv(x, *quantized, None, [], None, 64, GROUPS_A_STEP=1, BLOCK_N=4),
                triton_int4.int4_gemm(x, *quantized, None, [], None, 64, BLOCK_K=32),
                triton_int4.int4_gemm(x, *quantized, None, [], None, 64, BLOCK_K=32, SPLIT_NIBBLES=True)):  # fmt: skip
        assert relative_error(out.cpu(), expected.cpu()) < TOLERANCE[dtype]


def check_bf16_pairs(device: str) -> None:
    """The GEMV reading bfloat16 x as 32-bit pairs (BF16_PAIRS) against the reference: offsets (GGUF's groups of 32)
    and zero points, a partial tile of channels, a bias, more than one step of K; and the flag dropped, with the same
    result, where x sits at a 2-byte address or a smooth multiplies it."""
    from custom_ops.linear import triton_int4

    generator = torch.Generator().manual_seed(5)
    for n, k, group, offsets, tile in ((40, 256, 32, True, {"GROUPS_A_STEP": 2}), (48, 512, 128, False, {}),
                                       (24, 1024, 32, True, {"STAGES": 3, "BLOCK_N": 8})):  # fmt: skip
        weight = torch.randn(n, k, generator=generator)
        quantized = [t.to(device) for t in quantize_weight(weight, group, scale_dtype=torch.bfloat16, offsets=offsets)]
        buffer = torch.randn(k + 1, generator=generator).to(torch.bfloat16).to(device)
        bias = torch.randn(n, generator=generator).to(torch.bfloat16).to(device)
        for x in (buffer[:k].view(1, k), buffer[1:].view(1, k)):  # a 4-byte address, then a 2-byte one
            expected = int4_linear_reference(x, *quantized, None, [], bias, group)
            actual = triton_int4.int4_gemv(x, *quantized, None, [], bias, group, MMA=False, BF16_PAIRS=True, **tile)
            error = relative_error(actual.cpu(), expected.cpu())
            assert error < TOLERANCE[torch.bfloat16], (n, k, group, x.data_ptr() % 4, error)
        assert triton_int4.takes_bf16_pairs(buffer[:k].view(1, k), None)
        assert not triton_int4.takes_bf16_pairs(buffer[1:].view(1, k), None)
    smooth = torch.rand(1, k, generator=generator).to(device) + 0.5
    assert not triton_int4.takes_bf16_pairs(buffer[:k].view(1, k), smooth)
    x = buffer[:k].view(1, k)
    expected = int4_linear_reference(x, *quantized, smooth, [n], None, group)
    actual = triton_int4.int4_gemv(x, *quantized, smooth, [n], None, group, MMA=False, BF16_PAIRS=True)
    assert relative_error(actual.cpu(), expected.cpu()) < TOLERANCE[torch.bfloat16]


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernels_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_int4_linear as t; "
        "t.check_triton_against_reference('cpu', torch.float32); "
        "t.check_triton_against_reference('cpu', torch.float16); "
        "t.check_bf16_pairs('cpu')"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernels_on_the_gpu(dtype):
    check_triton_against_reference("cuda", dtype)
    if dtype == torch.bfloat16:
        check_bf16_pairs("cuda")


def test_the_triton_backend_falls_back_to_the_reference_where_it_cannot_run():
    """On a CPU without the interpreter, or a group that is not a multiple of 16: the reference's result."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, generator=generator)
    quantized = quantize_weight(torch.randn(8, 64, generator=generator), 8)
    expected = int4_linear_reference(x, *quantized, None, [], None, 8)
    assert torch.equal(torch.ops.compiled_llm.int4_linear(x, *quantized, None, [], None, 8, "triton"), expected)


def test_a_group_that_does_not_tile_the_weight_is_refused():
    with pytest.raises(ValueError, match="groups of 128 columns do not tile a weight of 192 columns"):
        quantize_weight(torch.randn(4, 192), 128)


def test_fake_quantize_is_the_dequantized_quantization():
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(16, 256, generator=generator)
    smooth = torch.rand(256, generator=generator) + 0.5
    clip = torch.rand(16, 2, generator=generator) + 0.5
    for offsets in (False, True):
        expected = dequantize(*quantize_weight(weight, 128, smooth, torch.float32, clip, offsets), 128)
        assert torch.equal(fake_quantize(weight, 128, smooth, clip, offsets), expected)
        assert (expected.abs().view(16, 2, 128).amax(-1) <= clip * (1 + 1 / 15) + 1e-6).all()  # clipped to +-clip
    assert torch.equal(fake_quantize_with_offsets(weight, 128, smooth, clip), expected)


def test_offsets_put_the_grid_on_each_groups_range():
    """Float offsets (int4_awq's storage): code 0 is a group's minimum and code 15 its maximum, both to the stored
    dtype's rounding, and every weight within half a step of the grid; zero points widen a range to hold 0 (a group of
    positive weights then loses its lowest codes) and round the zero onto the grid."""
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(8, 256, generator=generator)
    weight[0, :64] = weight[0, :64].abs() + 1  # a group of positive weights
    qweight, scales, offsets = quantize_weight(weight, 64, scale_dtype=torch.bfloat16, offsets=True)
    assert offsets.dtype == scales.dtype == torch.bfloat16
    groups = weight.view(8, 4, 64)
    assert torch.equal(offsets, groups.amin(-1).to(torch.bfloat16))
    torch.testing.assert_close(scales.float(), (groups.amax(-1) - groups.amin(-1)) / 15, rtol=2**-8, atol=0)
    codes = unpack_codes(qweight).view(8, 4, 64)
    assert (codes.amin(-1) == 0).all() and (codes.amax(-1) >= 14).all()
    error = (dequantize(qweight, scales, offsets, 64).view(8, 4, 64) - groups).abs()
    assert (error <= scales.float()[..., None] * 0.51 + offsets.float().abs()[..., None] * 2**-8).all()
    zero_points = quantize_weight(weight, 64, scale_dtype=torch.bfloat16)
    assert unpack_codes(zero_points[0])[0, :64].amin() >= 3  # its range [0, max]: the lowest codes go unused
    worse = (dequantize(*zero_points, 64) - weight).pow(2).mean()
    assert (dequantize(qweight, scales, offsets, 64) - weight).pow(2).mean() < worse


def check_tuning_candidates_against_reference(device: str = "cpu") -> None:
    """Every candidate of the GEMV's and the GEMM's tunings (int4_tuning.py), in the interpreter (CPU tensors; the PTX
    decode and the Gluon tensor-core decode left out) or on the GPU, against the reference (with a smooth: the tunings
    time the calls the pass makes); the tensor-core decode's in bfloat16, which it takes."""
    from custom_ops.linear import int4_tuning

    generator = torch.Generator().manual_seed(6)
    n, k, group = 64, 512, 128
    weight, smooth = torch.randn(n, k, generator=generator), torch.rand(1, k, generator=generator) + 0.5
    quantized = [t.to(device) for t in quantize_weight(weight, group, smooth[0])]
    smooth = smooth.to(device)
    for tuning, rows in ((int4_tuning.Int4GemvTuning(), 1), (int4_tuning.Int4GemmTuning(), 16)):
        x = torch.randn(rows, k, generator=generator).to(device)
        expected = tuning.reference(x, *quantized, smooth, group)
        x16 = x.to(torch.bfloat16)  # the tensor-core decode writes 16-bit floats
        expected16 = tuning.reference(x16, *quantized, smooth, group)
        for candidate in tuning.candidates({"n": n, "k": k, "group_size": group, "rows": rows}):
            if (candidate.config.get("PTX_DECODE") or candidate.config.get("MMA")) and device == "cpu":
                continue  # the interpreter runs no PTX, nor Gluon: test_tuning_candidates_on_the_gpu
            if candidate.config.get("MMA"):
                actual = candidate.run(x16, *quantized, smooth, group)
                assert relative_error(actual, expected16) < TOLERANCE[torch.bfloat16], candidate.name
                continue
            actual = candidate.run(x, *quantized, smooth, group)
            assert relative_error(actual, expected) < TOLERANCE[torch.float32], candidate.name


@pytest.mark.gpu
def test_tuning_candidates_on_the_gpu():
    """The PTX decode too (the interpreter cannot run it), and every launch compiled for the GPU."""
    check_tuning_candidates_against_reference("cuda")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_tuning_candidates_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import test_int4_linear as t; t.check_tuning_candidates_against_reference()"
    )


def test_the_tunings_find_the_triton_int4_linears_and_install_their_launches(monkeypatch):
    """Buckets: each `triton` int4_linear's (N, K, group size), and the GEMM's row buckets; the fallback first, named
    as the heuristic; an installed choice lands in the table the launchers read."""
    from custom_ops.linear import int4_tuning, triton_int4

    root = torch.nn.Module()
    root.q1, root.q2 = torch.zeros(64, 256, dtype=torch.uint8), torch.zeros(32, 64, dtype=torch.uint8)
    root.z1, root.z2 = torch.zeros(64, 4, dtype=torch.uint8), torch.zeros(32, 4, dtype=torch.float16)  # z2: offsets
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    op = torch.ops.compiled_llm.int4_linear.default
    for name, group, backend in (("1", 128, "triton"), ("2", 32, "triton"), ("1", 128, "torch")):
        weight, zeros = graph.get_attr(f"q{name}"), graph.get_attr(f"z{name}")
        graph.call_function(op, (x, weight, None, zeros, None, [], None, group, backend))
    graph.output(x)
    gm = torch.fx.GraphModule(root, graph)
    gemv, gemm = int4_tuning.Int4GemvTuning(), int4_tuning.Int4GemmTuning()
    assert gemv.buckets(gm) == [{"n": 32, "k": 128, "group_size": 32, "offsets": True},
                                {"n": 64, "k": 512, "group_size": 128, "offsets": False}]  # fmt: skip
    assert [b["rows"] for b in gemm.buckets(gm)] == [16, 64, 16, 64]
    for tuning in (gemv, gemm):
        candidates = tuning.candidates({})
        assert candidates[0].name == tuning.heuristic({}) and len({c.name for c in candidates}) == len(candidates)
    # up to 16 rows the fallback is the tensor-core decode's launch, so the Triton kernels' own is a candidate of its own
    for tuning, bucket, kind in ((gemv, {}, "gemv"), (gemm, {"rows": 16}, "gemm")):
        assert [c.name for c in tuning.candidates(bucket)[:2]] == [kind, f"{kind}-triton"]
    assert not any(c.name.startswith(("mma", "gemm-triton")) for c in gemm.candidates({"rows": 64}))
    monkeypatch.setattr(triton_int4, "TUNED_GEMV", {})
    monkeypatch.setattr(triton_int4, "TUNED_GEMM", {})
    cpu = torch.device("cpu")
    gemv.install({"n": 64, "k": 512, "group_size": 128, "offsets": False}, gemv.candidates({})[1], cpu)
    gemm.install({"n": 64, "k": 512, "group_size": 128, "offsets": True, "rows": 64}, gemm.candidates({"rows": 64})[2],
                 cpu)  # fmt: skip
    assert triton_int4.TUNED_GEMV == {(-1, 64, 512, 128, False): int4_tuning.TRITON_DEFAULT}
    assert triton_int4.TUNED_GEMM == {(-1, 64, 512, 128, True, 64): int4_tuning.GEMM_TILES[1]}
