"""quantization="int4_awq" (fx_passes/quantize_int4.py, fx_passes/awq_calibration.py): site counts, logits against the
module computing with the same 4-bit weights and within 4-bit rounding of the float module, the self-check, the AWQ
search against plain rounding, the calibration cache, and refusals."""

from __future__ import annotations

import importlib.resources
import logging

import pytest
import torch
from conftest import random_prompt, tiny_model

from compiled_llm import compile_model
from compiled_llm.verify import SelfCheckError
from custom_ops.linear.int4 import dequantize, fake_quantize, quantize_weight
from fx_passes import calibration, quantized_reference
from fx_passes.awq_calibration import fit_grid, search_clip, search_scales
from fx_passes.calibration import calibration_sequences
from fx_passes.quantize_int4 import group_size_for, int4_module, rerounded
from fx_passes.quantized_reference import linear_parts
from tests.misscaled import pipeline_misscaling

INT4_LINEAR = torch.ops.compiled_llm.int4_linear.default
# Widths that 128-column groups tile (the tiny models' 64 do not), and 96 for the down projection's input: groups of 32.
SHAPES = {"hidden_size": 128, "intermediate_size": 96, "head_dim": 32}


def compiled_int4(arch: str, cache_dir, **fields):
    model = tiny_model(arch, **SHAPES)
    compiled = compile_model(model, quantization="int4_awq", compile_backend="eager", max_batch_size=2, max_seq_len=64,
                             cache_dir=cache_dir, **fields)  # fmt: skip
    return model, compiled


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory):
    """A tiny Llama compiled with int4_awq and the self-check on (eager: the rewritten graph, no Inductor), its records
    keeping the search's grids past the self-check (for the tests that round the weights again)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantized_reference, "KEEP_ROUNDINGS", True)
        return compiled_int4("llama", tmp_path_factory.mktemp("awq_cache"), verify=True)


def int4_ops(compiled) -> list[torch.fx.Node]:
    return [n for n in compiled.graph_module.graph.nodes if n.target is INT4_LINEAR]


def test_qwen3_with_its_qk_norms(tmp_path, monkeypatch):
    """Another family: the q/k norms between the fused projection and attention stay as they were."""
    monkeypatch.setattr(quantized_reference, "KEEP_ROUNDINGS", True)  # int4_module rounds the weights again below
    model, compiled = compiled_int4("qwen3", tmp_path)
    assert compiled.report.pass_sites("quantize_int4") == 4 * model.config.num_hidden_layers
    ids = random_prompt(9)
    with torch.no_grad(), int4_module(model, compiled.graph_module.meta["int4_weights"]):
        expected = model(ids, use_cache=False).logits
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_site_counts_and_group_sizes(llama_int4):
    model, compiled = llama_int4
    layers = model.config.num_hidden_layers
    assert compiled.report.pass_sites("quantize_int4") == 4 * layers  # fused q/k/v, o, fused gate/up, down
    ops = int4_ops(compiled)
    assert len(ops) == 4 * layers
    groups = sorted({n.args[7] for n in ops})
    assert groups == [32, 128]  # 128 columns, and the down projection's 96 in groups of 32
    assert not any(
        n.target is torch.ops.aten.linear.default for n in compiled.graph_module.graph.nodes
    )  # LM head: routed
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_int4"]
    assert "the LM head (quantize_lm_head=False)" in result.detail and "AWQ scales" in result.detail


def test_logits_match_the_module_computing_with_the_same_4_bit_weights(llama_int4):
    """The compiled graph against the module itself whose linears run the reference op over the pass's tensors (each
    part's rows of the fused ones): exact up to float32 summation, prefill and decode."""
    model, compiled = llama_int4
    ids = random_prompt(12)
    meta = compiled.graph_module.meta
    with torch.no_grad(), int4_module(model, meta["int4_weights"]):
        expected = model(ids, use_cache=False).logits
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        float_logits = model(ids, use_cache=False).logits
    relative = (expected - float_logits).norm() / float_logits.norm()
    # ~10% RMS a linear (a step of range / 15), 8 of them over random weights: ~30%. The real-weights bound is
    # test_int4_accuracy.py's perplexity.
    assert 0 < relative < 0.5


def test_the_reference_rounds_the_module_s_own_weights_to_the_graph_s_tensors_bit_for_bit(llama_int4):
    """The self-check's reference rounds each module's weight again (its rows of a fused q/k/v or gate/up, with its
    part's smooth and rows of the search's grids, kept on the host): the graph's codes, scales and offsets exactly,
    which the self-check of the fixture's compile (verify=True) held the graph to."""
    model, compiled = llama_int4
    assert compiled.report.self_check_share is not None and compiled.report.self_check_share < 1
    records = compiled.graph_module.meta["int4_weights"]
    # FIT_GRIDS: a grid for every weight
    assert all(t[6] is not None and t[6].kept and t[6].grid is not None and t[6].grid.device.type == "cpu"
               for _, t in records)  # fmt: skip
    parts = linear_parts(model, records, "int4_awq")
    assert len(parts) == 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down
    for module, _, tensors, first, count in parts:
        again = rerounded(module.weight, tensors, first, count)
        for graph, mine in zip(tensors[:3], again):
            assert mine.dtype == graph.dtype and torch.equal(mine, graph[first : first + count])


def test_the_self_check_fails_a_wrongly_scaled_int4_weight(llama_int4):
    """The self-check's reference rounds the module's own weights, so a scale the pass wrote wrongly is not its
    reference's too (the search's results from the fixture's calibration cache)."""
    _, compiled = llama_int4
    passes = pipeline_misscaling(INT4_LINEAR, 2, after="quantize_int4")  # one int4 weight's scales
    with pytest.raises(SelfCheckError, match="differs from the module itself"):
        compiled_int4("llama", compiled.config.cache_dir, verify=True, graph_cache=False, passes=passes)


def test_the_grids_are_released_after_the_self_check(llama_int4):
    """Nothing reads the search's grids after the self-check (host memory: 1/4 byte a weight)."""
    _, compiled = compiled_int4("llama", llama_int4[1].config.cache_dir, verify=True)
    assert compiled.report.self_check_share is not None
    assert all(t[6].grid is None and not t[6].kept for _, t in compiled.graph_module.meta["int4_weights"])


def test_without_the_self_check_the_records_keep_no_grids(llama_int4):
    """verify=False: the search's grids are not kept past the rewrite (host memory), and a reference asked of the
    records says why it cannot round the weights again."""
    model, compiled = compiled_int4("llama", llama_int4[1].config.cache_dir, verify=False)
    records = compiled.graph_module.meta["int4_weights"]
    assert all(not t[6].kept and t[6].grid is None for _, t in records)
    with pytest.raises(ValueError, match="verify=False"), torch.no_grad(), int4_module(model, records):
        model(random_prompt(4), use_cache=False)


def test_the_model_itself_is_left_as_it_was(llama_int4):
    model, _ = llama_int4
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())


def test_awq_scales_beat_plain_rounding_where_a_few_channels_carry_large_activations():
    """AWQ's premise: inputs with outlier channels. Its search keeps the scaling that measured best, so its error is
    at most plain rounding's, and here well under it."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator)
    x = torch.randn(512, 256, generator=generator)
    x[:, :8] *= 30
    smooth, clip, ratio = search_scales(x, weight, 128)
    assert smooth is not None and smooth.shape == (256,) and ratio < 0.7
    assert smooth[:8].max() < smooth[8:].min()  # the outlier columns' weights were scaled up: smaller smooth
    assert clip is None or clip.shape == (64, 2)
    _, _, ratio = search_scales(torch.randn(512, 256, generator=generator), weight, 128)
    assert ratio <= 1.0


def test_clipping_a_group_with_one_outlier_weight_measures_better():
    """A group whose range one weight stretches: clipping it gives the other 127 finer steps, which the search finds
    against the group's share of x W^T (every ratio's error, computed from the inputs' second moments, is the mean
    over rows of the squared product)."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 128, generator=generator) * 0.1
    weight[:, 5] = 3.0
    x = torch.randn(256, 128, generator=generator)
    clip = search_clip(x, weight, 128, None)
    assert clip is not None and (clip < 3.0).any()
    errors = [((x @ (fake_quantize(weight, 128, None, c) - weight).t()) ** 2).mean()
              for c in (None, clip)]  # fmt: skip
    assert errors[1] < errors[0]


def _share_error(x: torch.Tensor, change: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K / group]: the mean over x's rows of the square of each group's share of x . change, in float64."""
    n, k = change.shape
    shares = torch.einsum("tgj,ngj->tng", x.double().view(-1, k // group, group), change.double().view(n, -1, group))
    return shares.pow(2).mean(dim=0)


def test_fitted_grids_round_no_group_worse_than_its_range_and_most_better():
    """fit_grid's least squares against the inputs' moments: every group's share of the error of x W^T (computed here
    from the rows themselves) at most its range's grid's, and the whole error well under it."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 256, generator=generator)
    x = torch.randn(512, 256, generator=generator) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=generator))
    smooth = torch.rand(256, generator=generator) + 0.5
    grid = fit_grid(x, weight, 128, smooth, None)
    assert grid.shape == (32, 2, 2) and (grid[..., 0] > 0).all()
    fitted = fake_quantize(weight, 128, smooth, offsets=True, grid=grid) * smooth
    ranged = fake_quantize(weight, 128, smooth, offsets=True) * smooth
    fitted_error, ranged_error = _share_error(x, fitted - weight, 128), _share_error(x, ranged - weight, 128)
    assert (fitted_error <= ranged_error * (1 + 1e-5)).all()
    assert fitted_error.sum() < 0.9 * ranged_error.sum()  # 0.84 measured


def test_a_fitted_grid_is_the_least_squares_grid_of_its_codes():
    """Weights q s + m with codes 1..14 only (never 0 or 15): the range's grid (the min on code 0, the max on 15) is off
    and rounds with error. The fit's grid is, for the codes it rounds to, the s and m that minimise the mean square of
    x . (w - q s - m) over the rows (solved here by float64 least squares on the rows themselves), and its error is
    under the range's grid's."""
    step, offset = torch.tensor([0.25, 0.5]), torch.tensor([-1.0, 3.0])
    codes = torch.randint(1, 15, (2, 64), generator=torch.Generator().manual_seed(3)).float()
    codes[:, :14] = torch.arange(1, 15).float()  # every code 1..14 in each row
    weight = codes * step[:, None] + offset[:, None]
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(4))
    grid = fit_grid(x, weight, 64, None, None)
    for row in range(2):
        s, m = grid[row, 0].double()
        q = ((weight[row].double() - m) / s).round().clamp(0, 15)
        rows = x.double()
        columns = torch.stack((rows @ q, rows.sum(dim=1)), dim=1)  # x . q and x . 1: the error's terms in s and m
        solved = torch.linalg.lstsq(columns, rows @ weight[row].double()).solution
        assert torch.allclose(grid[row, 0].double(), solved, rtol=1e-4, atol=1e-6), (row, grid[row, 0], solved)
    errors = [_share_error(x, fake_quantize(weight, 64, offsets=True, grid=g) - weight, 64).sum() for g in (grid, None)]
    assert errors[0] < 0.9 * errors[1]  # 0.85 measured


def test_quantize_weight_rounds_on_a_given_grid_and_stores_it():
    """A grid's s and m are the stored scales and offsets (in the scale dtype), and the codes round on them; zero
    points cannot take a float grid."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 128, generator=generator)
    grid = torch.stack((torch.rand(4, 2, generator=generator) * 0.2 + 0.1, torch.randn(4, 2, generator=generator) - 1),
                       dim=-1)  # fmt: skip
    qweight, scales, offsets = quantize_weight(weight, 64, scale_dtype=torch.bfloat16, offsets=True, grid=grid)
    assert torch.equal(scales, grid[..., 0].to(torch.bfloat16))
    assert torch.equal(offsets, grid[..., 1].to(torch.bfloat16))
    codes = ((weight.view(4, 2, 64) - offsets.float()[..., None]) / scales.float()[..., None]).round().clamp(0, 15)
    expected = codes * scales.float()[..., None] + offsets.float()[..., None]
    assert torch.equal(dequantize(qweight, scales, offsets, 64), expected.view(4, 128))
    with pytest.raises(ValueError, match="offsets=True"):
        quantize_weight(weight, 64, grid=grid)


def test_int4_awq_with_fitted_grids_matches_the_module_and_keeps_no_grid_buffer(tmp_path, monkeypatch):
    """quantize_int4.FIT_GRIDS: the self-check passes over the fitted weights, the report says so, the calibration
    cache keys the fit (a search without it is not served), and the grids are dropped once the weights are rounded."""
    from fx_passes import quantize_int4

    monkeypatch.setattr(quantize_int4, "FIT_GRIDS", False)
    _, plain = compiled_int4("llama", tmp_path, verify=False)
    monkeypatch.setattr(quantize_int4, "FIT_GRIDS", True)
    monkeypatch.setattr(quantized_reference, "KEEP_ROUNDINGS", True)  # int4_module rounds the weights again below
    model, compiled = compiled_int4("llama", tmp_path, verify=True, graph_cache=False)
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_int4"]
    assert "fitted grids searched" in result.detail and "from the cache" not in result.detail
    assert not [name for name, _ in compiled.graph_module.named_buffers() if "_awq_grid" in name or "_awq_clip" in name]
    ids = random_prompt(10)
    with torch.no_grad(), int4_module(model, compiled.graph_module.meta["int4_weights"]):
        expected = model(ids, use_cache=False).logits
    assert torch.allclose(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)
    fitted_scales = [t[1] for _, t in compiled.graph_module.meta["int4_weights"]]
    plain_scales = [t[1] for _, t in plain.graph_module.meta["int4_weights"]]
    assert any(not torch.equal(a, b) for a, b in zip(fitted_scales, plain_scales))


def test_calibration_text_goes_through_the_tokenizer_in_sequences():
    words = lambda text: {"input_ids": list(range(len(text.split())))}
    sequences, source = calibration_sequences(words, 1000)
    assert "calibration.txt" in source
    assert [len(s) for s in sequences[:-1]] == [calibration.SEQUENCE_TOKENS] * (len(sequences) - 1)
    text = (importlib.resources.files("compiled_llm") / "calibration.txt").read_text()
    assert sum(map(len, sequences)) == min(calibration.CALIBRATION_TOKENS, len(text.split()))


def test_a_model_without_a_linear_it_can_quantize_is_refused(tmp_path):
    model = tiny_model("llama", hidden_size=40, intermediate_size=80, head_dim=10)  # widths of no group size
    with pytest.raises(ValueError, match="int4_awq' found no linear it can quantize"):
        compile_model(model, quantization="int4_awq", compile_backend="eager", max_seq_len=32, cache_dir=tmp_path)


def test_group_sizes_are_the_largest_that_divide_the_width():
    assert [group_size_for(k) for k in (4096, 576, 96, 40)] == [128, 64, 32, None]


def test_the_self_check_catches_a_rewrite_that_drops_the_awq_scales(tmp_path, monkeypatch):
    """The self-check holds int4 graphs to the module over the same 4-bit weights as tightly as float ones: a pass that
    forgets to multiply x by the smooth (a few percent on the logits, less than 4-bit rounding itself) fails it."""
    from compiled_llm.verify import SelfCheckError
    from fx_passes import registry
    from fx_passes.quantize_int4 import INT4_LINEAR, quantize_int4

    def without_smooth(gm, config):
        result = quantize_int4(gm, config)
        for node in gm.graph.nodes:
            if node.target is INT4_LINEAR:
                node.args = (*node.args[:4], None, [], *node.args[6:])
        return result

    monkeypatch.setitem(registry._PASSES, "quantize_int4", without_smooth)
    with pytest.raises(SelfCheckError, match="differs from the module itself"):
        compiled_int4("llama", tmp_path, verify=True, graph_cache=False)


@pytest.mark.gpu
def test_int4_awq_on_the_gpu_matches_the_module_over_the_same_weights(own_cache_dir, monkeypatch):
    """bf16 on CUDA, Inductor and CUDA graphs, the triton kernels (GEMV for decode, tensor-core GEMM for the prompt):
    the self-check passes, and each greedy token is the best of the module computing with the same 4-bit weights, fed
    the same tokens, or within bfloat16 rounding of it (the kernels round x * smooth to bfloat16 for the tensor cores,
    which can swap two near-tied tokens: a sequence compared whole would part there)."""
    monkeypatch.setattr(quantized_reference, "KEEP_ROUNDINGS", True)  # int4_module rounds the weights again below
    model = tiny_model("llama", **SHAPES).to("cuda", torch.bfloat16)
    compiled = compile_model(model, quantization="int4_awq", max_batch_size=2, max_seq_len=64, verify=True,
                             cache_dir=own_cache_dir)  # fmt: skip
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_int4"]
    assert "triton:" in result.detail
    ids = random_prompt(10).cuda()
    tokens = compiled.generate(ids, max_new_tokens=16, do_sample=False)
    with torch.no_grad(), int4_module(model, compiled.graph_module.meta["int4_weights"]):
        logits = model(tokens[:, :-1], use_cache=False).logits[0, ids.shape[1] - 1 :].float()
    chosen = logits.gather(1, tokens[0, ids.shape[1] :, None])[:, 0]
    assert (logits.amax(dim=1) - chosen <= 0.02 * logits.abs().amax()).all()
    assert (logits.argmax(dim=1) == tokens[0, ids.shape[1] :]).float().mean() >= 0.75


def test_a_calibrated_graph_is_not_stored_for_a_warm_start(tmp_path, caplog):
    """A rewritten graph replays its recipes over another checkpoint's weights; AWQ's scalings are this one's, so the
    graph is not stored (the calibration is, keyed by the weights), and a second compile runs the passes again."""
    with caplog.at_level(logging.INFO, logger="compiled_llm"):
        compiled_int4("llama", tmp_path)
    assert "rewritten graph not stored: AWQ's calibration is of this checkpoint's weights" in caplog.text


def test_an_unwritable_cache_costs_a_warning_not_the_compile(tmp_path, caplog, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(calibration.torch, "save", refuse)
    with caplog.at_level(logging.WARNING, logger="compiled_llm"):
        _, compiled = compiled_int4("llama", tmp_path)
    assert compiled.report.pass_sites("quantize_int4") == 8
    assert "not written (read-only file system)" in caplog.text
    assert not list((tmp_path / "awq").glob("*"))  # no temporary file left


def attach_stored(module: torch.nn.Linear, fmt: str) -> None:
    """A checkpoint's 4-bit tensors on a linear's weight, as int4_checkpoint.py / gguf_blocks.py attach them."""
    with torch.no_grad():
        stored = quantize_weight(module.weight, 32)
        module.weight.copy_(dequantize(*stored, 32))
    module.weight.int4_tensors = (*stored, 32, fmt)


def test_stored_tensors_run_only_under_their_own_format_and_fuse_only_whole(tmp_path):
    """A GGUF model's blocks run under quantization='gguf'; a fused q/k/v whose parts are not all stored keeps the
    model's dtype (reported); int4_awq asked of the same model calibrates its weights instead of running the blocks."""
    model = tiny_model("llama", **SHAPES)
    for layer in model.model.layers:
        attach_stored(layer.mlp.down_proj, "gguf")
        attach_stored(layer.self_attn.q_proj, "gguf")  # k and v stay float: q/k/v fused has no stored tensors
    fields = {"compile_backend": "eager", "max_batch_size": 2, "max_seq_len": 64, "cache_dir": tmp_path}
    compiled = compile_model(model, quantization="gguf", verify=True, **fields)
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_int4"]
    layers = model.config.num_hidden_layers
    assert result.sites == layers and "as stored" in result.detail  # the down projections
    assert f"{3 * layers} linears the checkpoint stores in float" in result.detail  # fused q/k/v, o, fused gate/up
    compiled = compile_model(model, quantization="int4_awq", **fields)
    (result,) = [p for p in compiled.report.passes if p.name == "quantize_int4"]
    assert result.sites == 4 * layers and "AWQ scales" in result.detail
