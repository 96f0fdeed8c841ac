"""`compiled_llm::moe_experts`: the reference against a float64 loop over every token's experts, the Triton grouped
GEMMs against the reference (under TRITON_INTERPRET=1 on CPU, and on the GPU), on random routings that leave
experts without a token; the capture's routing of transformers' experts to the op, in compiled MoE models."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from conftest import ARCHITECTURES, random_prompt, relative_error, run_in_interpreter, tiny_model
from fp8_rounding import e4m3_rows, e4m3_weight

import custom_ops.moe  # noqa: F401  (registers the op)
from compiled_llm import compile_model
from custom_ops.moe import moe_experts_reference, triton_moe
from custom_ops.triton_runtime import triton_available

MOE_ARCHS = ("deepseek_v2", "deepseek_v3", "gpt_oss", "mixtral", "qwen3_moe")
MOE_LAYERS = {"deepseek_v2": 1, "deepseek_v3": 1}  # their first layer is dense
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative to the output's norm


def random_routing(tokens: int, experts: int, top_k: int, seed: int, dtype=torch.float32, device="cpu"):
    """(ids [T, k], weights [T, k]) from random router logits: softmax, top-k, renormalised, as Qwen3-MoE routes."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=generator) * 3
    weights, ids = logits.softmax(-1).topk(top_k)
    return ids.to(device), (weights / weights.sum(-1, keepdim=True)).to(device, dtype)


def random_experts(experts: int, hidden: int, inter: int, seed: int, dtype=torch.float32, device="cpu", bias=False):
    generator = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=generator) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, generator=generator) * inter**-0.5
    b13 = torch.randn(experts, 2 * inter, generator=generator) * 0.1 if bias else None
    b2 = torch.randn(experts, hidden, generator=generator) * 0.1 if bias else None
    return tuple(None if t is None else t.to(device, dtype) for t in (w13, w2, b13, b2))


def float64_experts(x, ids, weights, w13, w2, b13, b2, gpt_oss: tuple[float, float] | None = None) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]), token by token in float64; `gpt_oss`
    (alpha, limit): GPT-OSS's clamped activation over interleaved gate/up rows instead, written out here."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e].double() @ x[t].double() + (0 if b13 is None else b13[e].double())
            if gpt_oss is None:
                gate, up = h.chunk(2)
                act = F.silu(gate) * up
            else:
                alpha, limit = gpt_oss
                gate, up = torch.minimum(h[0::2], torch.tensor(limit)), h[1::2].clamp(-limit, limit)
                act = gate / (1 + torch.exp(-alpha * gate)) * (up + 1)
            y = w2[e].double() @ act + (0 if b2 is None else b2[e].double())
            out[t] += weights[t, j].double() * y
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_reference_against_float64(bias):
    x = torch.randn(7, 48, generator=torch.Generator().manual_seed(1))
    ids, weights = random_routing(7, 16, 2, seed=2)  # 16 experts, at most 14 picked: some get no token
    assert ids.unique().numel() < 16
    w13, w2, b13, b2 = random_experts(16, 48, 24, seed=3, bias=bias)
    out = moe_experts_reference(x, ids, weights, w13, w2, b13, b2, "silu")
    assert relative_error(out, float64_experts(x, ids, weights, w13, w2, b13, b2)) < 1e-6


def test_reference_of_gpt_oss_activation_against_float64():
    """Interleaved rows, biases, gate and up past the clamp (limit 1.5 on unit-scale values)."""
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(6))
    ids, weights = random_routing(6, 8, 2, seed=7)
    w13, w2, b13, b2 = random_experts(8, 32, 16, seed=8, bias=True)
    w13 = w13 * 4  # gate/up values of a few units: both clamps act
    out = moe_experts_reference(x, ids, weights, w13, w2, b13, b2, "swiglu_oai", (1.702, 1.5))
    assert relative_error(out, float64_experts(x, ids, weights, w13, w2, b13, b2, gpt_oss=(1.702, 1.5))) < 1e-6


def test_reference_keeps_the_input_dtype_and_rounds_like_transformers():
    """bf16 rows with float32 routing weights: the product in float32, the sum over experts rounded once."""
    x = torch.randn(5, 32).bfloat16()
    ids, weights = random_routing(5, 4, 2, seed=4)
    w13, w2, _, _ = random_experts(4, 32, 16, seed=5, dtype=torch.bfloat16)
    out = moe_experts_reference(x, ids, weights, w13, w2, None, None, "silu")
    assert out.dtype == torch.bfloat16
    assert relative_error(out, float64_experts(x, ids, weights, w13, w2, None, None)) < 1e-2


@pytest.mark.parametrize("shift", [0, 3])
def test_sort_by_expert_groups_every_pair_once(shift):
    """shift: the ids of a rank whose experts start there; the pairs of ids outside [0, E) in blocks of expert E."""
    for tokens, experts, top_k, block_m in ((1, 8, 2, 16), (37, 6, 3, 16), (300, 128, 8, 32), (5, 64, 4, 64)):
        ids, _ = random_routing(tokens, experts, top_k, seed=tokens)
        ids = ids - shift
        sorted_pairs, block_expert, used_rows = triton_moe.sort_by_expert(ids, experts, block_m)
        pairs = tokens * top_k
        used = int(used_rows)
        assert used % block_m == 0 and used <= sorted_pairs.numel()
        real = sorted_pairs[sorted_pairs < pairs]
        assert sorted(real.tolist()) == list(range(pairs))  # each pair exactly once
        assert (sorted_pairs[used:] == pairs).all()  # nothing past the used blocks
        flat = ids.reshape(-1)
        for block in range(used // block_m):
            rows = sorted_pairs[block * block_m : (block + 1) * block_m]
            rows = rows[rows < pairs]
            assert rows.numel() > 0  # no empty block among the used ones
            outside = (flat[rows] < 0) | (flat[rows] >= experts)
            assert (torch.where(outside, experts, flat[rows]) == block_expert[block]).all()


def other_ranks_routing(tokens: int, experts: int, top_k: int, seed: int, local: range, device="cpu"):
    """(ids, weights, kept): random_routing over `experts`, the ids shifted to the rank that holds experts `local`
    (expert parallelism: another rank's expert falls outside [0, len(local)), below or above); `kept` [T, k], the
    pairs this rank computes."""
    ids, weights = random_routing(tokens, experts, top_k, seed, device=device)
    return ids - local.start, weights, (ids >= local.start) & (ids < local.stop)


@pytest.mark.parametrize("local", [range(4), range(4, 8), range(2, 4)])
def test_ids_outside_the_experts_add_zero(local):
    """The pairs routed to experts outside this rank's [start, stop): zero, the others as over every expert."""
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(4))
    ids, weights, kept = other_ranks_routing(9, 8, 3, seed=5, local=local)
    assert kept.any() and not kept.all()
    w13, w2, b13, b2 = random_experts(8, 32, 16, seed=6, bias=True)
    mine = slice(local.start, local.stop)
    out = moe_experts_reference(x, ids, weights, w13[mine], w2[mine], b13[mine], b2[mine], "silu")
    every = ids + local.start  # the routing over every expert, with the other ranks' pairs weighted 0
    expected = float64_experts(x, every, weights * kept, w13, w2, b13, b2)
    assert relative_error(out, expected) < 1e-6


def check_other_ranks_experts(device: str) -> None:
    """The grouped GEMMs (float and e4m3) of one rank's experts: ids outside them add zero, one token and rows."""
    from custom_ops.moe import fp8

    for seed, (tokens, experts, top_k, local) in enumerate([(1, 8, 4, range(4, 8)), (1, 8, 2, range(4)),
                                                              (37, 8, 2, range(2, 4)), (70, 6, 3, range(3))]):  # fmt: skip
        x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed)).to(device)
        ids, weights, _ = other_ranks_routing(tokens, experts, top_k, seed, local, device)
        w13, w2, b13, b2 = (t[local.start : local.stop] for t in random_experts(experts, 64, 32, seed, device=device,
                                                                              bias=True))  # fmt: skip
        quantized = (*fp8.quantize_experts(w13), *fp8.quantize_experts(w2))
        expected = moe_experts_reference(x, ids, weights, w13, w2, b13, b2, "silu")
        expected8 = fp8.moe_experts_fp8_reference(x, ids, weights, *quantized, b13, b2, "silu")

        def check(case=seed, x=x, ids=ids, weights=weights, w13=w13, w2=w2, b13=b13, b2=b2, quantized=quantized,
                  expected=expected, expected8=expected8):  # fmt: skip
            actual = torch.ops.compiled_llm.moe_experts(x, ids, weights, w13, w2, b13, b2, "silu", [], "triton")
            actual8 = torch.ops.compiled_llm.moe_experts_fp8(x, ids, weights, *quantized, b13, b2, "silu", [],
                                                             "triton")  # fmt: skip
            assert relative_error(actual, expected) < 1e-5, f"case {case}"
            assert relative_error(actual8, expected8) < 1e-5, f"fp8 case {case}"

        check()
        if tokens == 1:
            with_tile(GEMV_TILE, check)
            with_tile(WHOLE_ROW_GEMV_TILE, check)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_other_ranks_experts_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import test_moe_experts as t; t.check_other_ranks_experts('cpu')"
    )


def check_triton_against_reference(device: str, dtype: torch.dtype) -> None:
    """The grouped GEMMs against the reference: decode and prefill row counts, sizes off the tiles, transposed
    weight storage (a view), biases, float32 routing weights beside 16-bit rows."""
    cases = [  # tokens, hidden, inter, experts, top_k, bias, transposed, activation
        (1, 64, 32, 8, 2, False, False, "silu"),
        (3, 80, 48, 16, 4, False, False, "silu"),  # K (80), N (48) off the 64-wide tiles; at most 12 of 16 experts
        (37, 64, 96, 6, 2, True, False, "silu"),
        (70, 96, 32, 4, 2, False, True, "silu"),  # 35 pairs an expert: two blocks of 32 rows for some
        (1, 64, 32, 8, 4, True, True, "swiglu_oai"),  # GPT-OSS: interleaved, transposed storage, biases
        (1, 80, 40, 8, 2, True, True, "swiglu_oai"),  # one token, K and N off the 32-wide tiles (the GEMV's masks)
        (29, 48, 40, 5, 2, True, True, "swiglu_oai"),
    ]
    for seed, (tokens, hidden, inter, experts, top_k, bias, transposed, activation) in enumerate(cases):
        params = [1.702, 1.5] if activation == "swiglu_oai" else []
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
        ids, weights = random_routing(tokens, experts, top_k, seed, dtype=torch.float32, device=device)
        w13, w2, b13, b2 = random_experts(experts, hidden, inter, seed, dtype, device, bias)
        if activation == "swiglu_oai":
            w13 = w13 * 4  # both clamps act
        if transposed:  # GPT-OSS stores [E, H, 2I] and [E, I, H]: the capture passes transposed views
            w13, w2 = w13.transpose(1, 2).contiguous().transpose(1, 2), w2.transpose(1, 2).contiguous().transpose(1, 2)
            assert w13.stride(2) != 1
        expected = moe_experts_reference(x, ids, weights, w13, w2, b13, b2, activation, params)
        actual = torch.ops.compiled_llm.moe_experts(x, ids, weights, w13, w2, b13, b2, activation, params, "triton")
        assert actual.dtype == dtype and actual.shape == x.shape
        error = relative_error(actual, expected)
        assert error < TOLERANCE[dtype], f"case {seed} {dtype}: relative error {error:.2e}"


# One token's GEMV without tensor cores: K in several steps, the columns off the tile (48 of 32).
GEMV_TILE = {"gemv": True, "BLOCK_N": 32, "BLOCK_K": 32}
# The dense GEMV's form: one row a program, the whole row in one masked load (one token only: as a tensor-core tile,
# one column a program, it would take the interpreter minutes over the other cases).
WHOLE_ROW_GEMV_TILE = {"gemv": True, "BLOCK_N": 1, "BLOCK_K": 128, "num_stages": 1}
OTHER_TILES = ({"BLOCK_N": 16, "BLOCK_K": 32}, {"BLOCK_N": 128, "BLOCK_K": 16}, GEMV_TILE)


def with_tile(tile: dict, check, *args):
    """check(*args) with `tile` as what every untuned call runs (one token's GEMV tiles run only one token)."""
    heuristic = triton_moe.heuristic_tile
    try:
        triton_moe.heuristic_tile = lambda mode, *args, **kwargs: triton_moe.DEFAULT_TILE | tile
        return check(*args)
    finally:
        triton_moe.heuristic_tile = heuristic


def check_other_tiles(device: str) -> None:
    """The cases again with tiles other than the heuristic's: narrow and wide columns, short and long K steps, and
    one token's GEMV."""
    for tile in OTHER_TILES:
        with_tile(tile, check_triton_against_reference, device, torch.float32)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_moe_experts as t; "
        "t.check_triton_against_reference('cpu', torch.float32); t.check_triton_against_reference('cpu', torch.float16); "
        "t.check_other_tiles('cpu')"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_on_the_gpu(dtype):
    check_triton_against_reference("cuda", dtype)
    if dtype == torch.float32:
        check_other_tiles("cuda")
    if dtype == torch.float16:
        check_strided_routing_and_float32_biases("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_triton_in_a_cuda_graph_at_qwen3_moe_shape(tokens):
    """Qwen3-30B-A3B's experts (128 of 2048 x 768, 8 a token): replayed from a CUDA graph over a new routing."""
    x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    ids, weights = random_routing(tokens, 128, 8, seed=tokens, dtype=torch.bfloat16, device="cuda")
    w13, w2, _, _ = random_experts(128, 2048, 768, seed=0, dtype=torch.bfloat16, device="cuda")
    run = lambda: torch.ops.compiled_llm.moe_experts(x, ids, weights, w13, w2, None, None, "silu", [], "triton")
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    new_ids, new_weights = random_routing(tokens, 128, 8, seed=tokens + 1, dtype=torch.bfloat16, device="cuda")
    ids.copy_(new_ids)
    weights.copy_(new_weights)
    x.normal_()
    graph.replay()
    expected = moe_experts_reference(x, ids, weights, w13, w2, None, None, "silu")
    assert relative_error(out, expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_capture_routes_every_moe_layer_to_the_op(compiled, arch):
    model, cm = compiled(arch)
    layers = MOE_LAYERS.get(arch, model.config.num_hidden_layers)
    assert cm.report.pass_sites("insert_fused_moe") == layers
    targets = [str(n.target) for n in cm.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count("compiled_llm.moe_experts.default") == layers
    assert not [t for t in targets if "grouped_mm" in t]  # transformers' expert GEMMs are gone


def test_experts_the_op_does_not_take_keep_transformers_forward(own_cache_dir):
    """Experts with an activation the op lacks (GELU) are not routed: they run transformers' grouped GEMMs, the report
    says so, and the logits are still HF's."""
    torch.manual_seed(0)
    config = ARCHITECTURES["qwen3_moe"]()
    config.hidden_act = "gelu"
    model = tiny_model("qwen3_moe")
    gelu = type(model)(config).eval()
    gelu.load_state_dict(model.state_dict())
    cm = compile_model(gelu, max_batch_size=2, cache_dir=own_cache_dir)
    assert cm.report.pass_sites("insert_fused_moe") == 0
    assert "grouped_mm calls of experts it does not take" in str(cm.report)
    ids = random_prompt(12, batch=2, seed=3)
    with torch.no_grad():
        expected = gelu(ids, use_cache=False).logits
    assert relative_error(cm(ids).logits, expected) < 1e-4


@pytest.mark.gpu
def test_the_torch_backend_refuses_a_cuda_graph_capture_with_a_message():
    x = torch.randn(2, 16, device="cuda")
    ids, weights = random_routing(2, 4, 2, seed=0, device="cuda")
    w13, w2, _, _ = random_experts(4, 16, 16, seed=0, device="cuda")
    torch.ops.compiled_llm.moe_experts(x, ids, weights, w13, w2, None, None, "silu", [], "torch")
    with pytest.raises(RuntimeError, match="moe_backend"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        torch.ops.compiled_llm.moe_experts(x, ids, weights, w13, w2, None, None, "silu", [], "torch")


def test_the_grouped_gemm_tuning_finds_both_expert_shapes_of_a_triton_graph():
    """Buckets: the gate_up [E, 2I, H] and down [E, H, I] weights of the tiny Qwen3-MoE's `triton` experts calls, with
    the router's k, x the row modes; the fallback is the heuristic, first; an installed tile is what a call of that
    shape and row mode reads."""
    from custom_ops.moe import tuning

    model = tiny_model("qwen3_moe")
    compiled = compile_model(model, moe_backend="triton", compile_backend="eager", autotune="off", max_batch_size=2)
    moe = tuning.MoeGroupedGemmTuning()
    buckets = moe.buckets(compiled.graph_module)
    shapes = [(4, 64, 32, False), (4, 64, 64, True)]  # down [E, H, I], gate_up [E, 2I, H]
    assert buckets == [
        {"experts": e, "n": n, "k": k, "gated": gated, "fp8": False, "top_k": 2, "rows": rows}
        for e, n, k, gated in shapes
        for rows in (1, 16, 32, 64)
    ]
    fp8_graph = compile_model(model, moe_backend="triton", compile_backend="eager", autotune="off", max_batch_size=2,
                              quantization="fp8").graph_module  # fmt: skip
    assert [b for b in moe.buckets(fp8_graph) if b["fp8"]] == [dict(b, fp8=True) for b in buckets]
    candidates = moe.candidates(buckets[0])
    assert candidates[0].name == moe.heuristic(buckets[1]) == tuning.tile_name(triton_moe.DEFAULT_TILE)
    # One token of float experts: the GEMV, its down GEMM summed over the pairs in it; of e4m3 ones, narrower tiles
    assert moe.heuristic(buckets[0]) == tuning.tile_name(triton_moe.FLOAT_ONE_TOKEN_DOWN_TILE)
    assert moe.heuristic(buckets[4]) == tuning.tile_name(triton_moe.FLOAT_ONE_TOKEN_TILE)
    assert moe.heuristic(dict(buckets[0], fp8=True)) == tuning.tile_name(triton_moe.ONE_TOKEN_TILE)
    assert moe.heuristic(buckets[0]) in {c.name for c in candidates}
    assert len({c.name for c in candidates}) == len({c.identity for c in candidates}) == len(candidates)
    moe.install(buckets[5], candidates[2], torch.device("cpu"))
    try:
        w13 = torch.empty(4, 64, 64)
        assert triton_moe.tile_for(torch.empty(3, 64), w13, 16) == candidates[2].config
        assert triton_moe.tile_for(torch.empty(3, 64), w13, 32) == triton_moe.DEFAULT_TILE
    finally:
        triton_moe.TUNED_TILES.clear()
    assert tuning.tokens_for(1, 128, 8) == 1 and triton_moe.block_m_for(tuning.tokens_for(32, 128, 8) * 8, 128) == 32


def test_the_float_one_token_gemv_is_the_default_only_where_its_k_loop_unrolls_and_its_pairs_fit():
    heuristic, gemv, down = triton_moe.heuristic_tile, triton_moe.FLOAT_ONE_TOKEN_TILE, triton_moe.FLOAT_ONE_TOKEN_DOWN_TILE
    steps = triton_moe.GEMV_UNROLLED_STEPS
    assert heuristic(1, "float", True, True, steps * gemv["BLOCK_K"], 8) == gemv  # Mixtral's gate/up: 4 x 1,024
    assert heuristic(1, "float", True, True, steps * gemv["BLOCK_K"] + 1, 8) == triton_moe.ONE_TOKEN_TILE
    assert heuristic(1, "float", False, True, 768, triton_moe.SUM_GEMV_MAX_PAIRS) == down  # Qwen3-30B-A3B's down
    assert heuristic(1, "float", False, True, 14336, 2) == triton_moe.ONE_TOKEN_TILE  # Mixtral's down: 28 steps
    assert heuristic(1, "float", False, True, 768, triton_moe.SUM_GEMV_MAX_PAIRS + 1) == triton_moe.ONE_TOKEN_TILE
    assert heuristic(16, "float", True, True, 768, 8) == triton_moe.DEFAULT_TILE


def test_experts_stored_transposed_keep_tensor_core_tiles_for_one_token():
    """GPT-OSS stores its experts [E, K, N] and the op reads them transposed: K strided, so the one-token GEMV (whose
    loads run along K) is neither the heuristic nor a candidate there, and its tuning bucket says so."""
    from custom_ops.moe import tuning

    stored = torch.empty(4, 32, 64)  # [E, K, N]
    assert triton_moe.tile_for(torch.empty(1, 32), stored.transpose(1, 2), 1) == triton_moe.ONE_TOKEN_TILE
    assert triton_moe.tile_for(torch.empty(1, 32), stored.transpose(1, 2).contiguous(), 1) == (
        triton_moe.FLOAT_ONE_TOKEN_TILE
    )  # fmt: skip
    root = torch.nn.Module()
    root.w = torch.nn.Parameter(stored, requires_grad=False)
    graph = torch.fx.Graph()
    view = graph.call_function(torch.ops.aten.transpose.int, (graph.get_attr("w"), 1, 2))
    gm = torch.fx.GraphModule(root, graph)
    assert tuning._weight_layout(gm, view) == (4, 64, 32, True)
    assert tuning._weight_layout(gm, next(iter(gm.graph.nodes))) == (4, 32, 64, False)
    moe = tuning.MoeGroupedGemmTuning()
    for gated in (True, False):
        bucket = {"experts": 4, "n": 64, "k": 32, "gated": gated, "fp8": False, "top_k": 2, "rows": 1}
        names = {c.name for c in moe.candidates(dict(bucket, transposed=True))}
        assert moe.heuristic(dict(bucket, transposed=True)) == tuning.tile_name(triton_moe.ONE_TOKEN_TILE)
        assert not [name for name in names if name.startswith("gemv")] and names < {c.name for c in moe.candidates(bucket)}
        assert gated or "sum-n32-k256-s4-w4" in names  # the tensor-core tiles that sum the pairs stay


@pytest.mark.gpu
def test_a_full_tuning_run_of_the_experts_keeps_the_logits(tmp_path, monkeypatch):
    """Every expert shape and row mode of the tiny Qwen3-MoE gets a winner checked against the reference; the tuned
    model's logits are the untuned one's within bf16 roundings. A few tiles of each kind: every candidate is a Triton
    compile, and all of them took this test past 300 s on an H100."""
    from custom_ops.moe import tuning

    monkeypatch.setattr(triton_moe, "TUNED_TILES", {})
    for name in ("TILES", "GEMV_TILES", "SUM_TILES"):
        monkeypatch.setattr(tuning, name, getattr(tuning, name)[:3])
    model = tiny_model("qwen3_moe").to("cuda", torch.bfloat16)
    fields = {"compile_backend": "eager", "max_batch_size": 4, "cache_dir": tmp_path}
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        expected = compile_model(model, autotune="off", **fields)(ids).logits.float()
        tuned = compile_model(model, autotune="full", **fields)
        actual = tuned(ids).logits.float()
    gemms = [c for c in tuned.report.kernels if c.op == "moe_grouped_gemm"]
    assert len(gemms) == 8 and all(c.source == "tuned" for c in gemms)
    assert relative_error(actual, expected) < 2e-2


def float64_fp8_experts(x, ids, weights, w13, w2) -> torch.Tensor:
    """float64_experts with each expert weight's rows and each GEMM's input rows rounded to e4m3, written out here."""
    x8 = e4m3_rows(x)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (e4m3_weight(w13[e]) @ x8[t]).chunk(2)
            act = (F.silu(gate) * up).float()
            out[t] += weights[t, j].double() * (e4m3_weight(w2[e]) @ e4m3_rows(act[None])[0])
    return out


def test_fp8_reference_against_float64():
    from custom_ops.moe import fp8

    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(9))
    ids, weights = random_routing(6, 8, 2, seed=10)
    w13, w2, _, _ = random_experts(8, 64, 32, seed=11)
    quantized = (*fp8.quantize_experts(w13), *fp8.quantize_experts(w2))
    assert quantized[0].dtype == torch.float8_e4m3fn and quantized[1].shape == (8, 64)
    out = fp8.moe_experts_fp8_reference(x, ids, weights, *quantized, None, None, "silu")
    expected = float64_fp8_experts(x, ids, weights, w13, w2)
    assert relative_error(out, expected) < 1e-5  # float32 roundings of the same e4m3 values
    assert relative_error(out, float64_experts(x, ids, weights, w13, w2, None, None)) > 1e-3  # it did round


def check_fp8_triton_against_reference(device: str, dtype: torch.dtype) -> None:
    """The e4m3 grouped GEMMs against moe_experts_fp8's reference: one token, prefill rows, GPT-OSS's layout."""
    from custom_ops.moe import fp8

    cases = [(1, 64, 32, 8, 2, False, "silu"), (37, 80, 48, 6, 2, True, "silu"), (9, 64, 32, 4, 2, True, "swiglu_oai")]
    for seed, (tokens, hidden, inter, experts, top_k, bias, activation) in enumerate(cases):
        params = [1.702, 1.5] if activation == "swiglu_oai" else []
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
        ids, weights = random_routing(tokens, experts, top_k, seed, dtype=torch.float32, device=device)
        w13, w2, b13, b2 = random_experts(experts, hidden, inter, seed, dtype, device, bias)
        quantized = (*fp8.quantize_experts(w13), *fp8.quantize_experts(w2))
        expected = fp8.moe_experts_fp8_reference(x, ids, weights, *quantized, b13, b2, activation, params)
        actual = torch.ops.compiled_llm.moe_experts_fp8(x, ids, weights, *quantized, b13, b2, activation, params,
                                                        "triton")  # fmt: skip
        error = relative_error(actual, expected)
        assert error < TOLERANCE[dtype], f"fp8 case {seed} {dtype}: relative error {error:.2e}"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_fp8_triton_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_moe_experts as t; "
        "t.check_fp8_triton_against_reference('cpu', torch.float32); "
        "t.check_fp8_triton_against_reference('cpu', torch.float16); "
        "t.with_tile(t.GEMV_TILE, t.check_fp8_triton_against_reference, 'cpu', torch.float16)"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_triton_on_the_gpu(dtype):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 tensor cores need compute capability 8.9")
    check_fp8_triton_against_reference("cuda", dtype)
    with_tile(GEMV_TILE, check_fp8_triton_against_reference, "cuda", dtype)


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_moe"])
def test_quantize_fp8_takes_the_experts_and_the_self_check_holds_them(arch, own_cache_dir):
    """quantization="fp8": each MoE layer's experts become moe_experts_fp8 (the routers stay), and the forced self-check
    holds the graph against the module with its linears and experts computing the FP8 reference."""
    model = tiny_model(arch)
    compiled = compile_model(model, quantization="fp8", compile_backend="eager", verify=True, cache_dir=own_cache_dir,
                             max_batch_size=2)  # fmt: skip
    layers = model.config.num_hidden_layers
    targets = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.compiled_llm.moe_experts_fp8.default) == layers
    assert torch.ops.compiled_llm.moe_experts.default not in targets
    assert compiled.report.pass_sites("quantize_fp8") == 2 * layers + layers  # fused qkv and o, and the experts
    assert compiled.report.pass_sites("insert_fused_moe") == layers
    assert "self_check_s" in compiled.report.timings


def distinct_logits(tokens: int, experts: int, seed: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """Router logits without ties in any dtype (a permutation of evenly spaced values per row): the routing decisions
    compare exactly, with no near-tie to make a test flaky."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(experts, generator=generator) for _ in range(tokens)]
    return (torch.stack(rows).float() * (8.0 / experts) - 4.0).to(device, dtype)


def check_routing_against_reference(device: str) -> None:
    from custom_ops.moe import routing

    routers = (("softmax", True, 1.0), ("softmax", False, 1.0), ("topk_softmax", False, 1.0), ("softmax", False, 2.5))
    for scoring, renormalize, scale in routers:  # the last: DeepSeek-V2's greedy routing, scaled
        for dtype in (torch.float32, torch.float16):
            for experts, top_k in ((8, 2), (60, 4), (128, 8)):
                logits = distinct_logits(13, experts, seed=experts + top_k, dtype=dtype, device=device)
                expected = routing.moe_route_reference(logits, top_k, scoring, renormalize, scale, dtype)
                actual = torch.ops.compiled_llm.moe_route(logits, top_k, scoring, renormalize, scale, dtype, "triton")
                assert torch.equal(actual[1], expected[1]), f"{scoring} {dtype} {experts}: other experts"
                torch.testing.assert_close(actual[0], expected[0], rtol=1e-6, atol=1e-6)


def test_routing_reference_is_transformers_qwen3_moe_router():
    """The reference against the router module itself: Qwen3-MoE's (softmax, top-k, renormalised)."""
    from custom_ops.moe import routing

    router = tiny_model("qwen3_moe").model.layers[0].mlp.gate
    router.norm_topk_prob = True
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, weights, ids = router(x)
    actual = routing.moe_route_reference(logits, 2, "softmax", True, 1.0, weights.dtype)
    assert torch.equal(actual[1], ids) and torch.equal(actual[0], weights)


def test_routing_reference_is_transformers_deepseek_v2_greedy_router():
    """The reference against DeepSeek-V2's router module (softmax, greedy top-k, times routed_scaling_factor)."""
    from custom_ops.moe import routing

    model = tiny_model("deepseek_v2")
    router = next(m.mlp.gate for m in model.model.layers if hasattr(m.mlp, "gate"))
    router.routed_scaling_factor = 2.5
    assert router.topk_method == "greedy"
    x = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, weights, ids = router(x)
    actual = routing.moe_route_reference(logits, router.top_k, "softmax", False, 2.5, weights.dtype)
    order = ids.argsort(dim=-1)  # transformers asks for the top-k unsorted
    assert torch.equal(actual[1].sort(dim=-1).values, ids.gather(1, order))
    assert torch.equal(actual[0].gather(1, actual[1].argsort(dim=-1)), weights.gather(1, order))


def check_grouped_routing_against_reference(device: str) -> None:
    """The grouped routing kernel: DeepSeek-V3's 256 experts in 8 groups, group counts and group sizes off the powers
    of two (A.X K1's 192 experts in 8 groups of 24: a padding slot of the tile shares its index with the next group's
    member), one group, with and without the bias correction; the chosen sets equal, their weights within float32
    roundings."""
    from custom_ops.moe import routing

    shapes = ((256, 8, 4, 8), (16, 4, 2, 3), (24, 3, 2, 4), (8, 1, 1, 2), (192, 8, 4, 8), (12, 4, 2, 2))
    for experts, groups, topk_groups, top_k in shapes:
        for dtype in (torch.float32, torch.float16):
            logits = distinct_logits(7, experts, seed=experts, dtype=dtype, device=device)
            bias = torch.randn(experts, generator=torch.Generator().manual_seed(1)).to(device) * 0.1
            # DeepSeek-V3's (with and without the correction), and V2's group_limited_greedy (softmax, unnormalised)
            for correction, scoring, renormalize in ((bias, "sigmoid", True), (None, "sigmoid", True),
                                                     (None, "softmax", False)):  # fmt: skip
                args = (correction, top_k, scoring, groups, topk_groups, renormalize, 2.5, torch.float32)
                expected = routing.moe_route_grouped_reference(logits, *args)
                actual = torch.ops.compiled_llm.moe_route_grouped(logits, *args, "triton")
                ours, theirs = actual[1].sort(dim=-1), expected[1].sort(dim=-1)
                assert torch.equal(ours.values, theirs.values), f"{experts} experts in {groups} groups: other experts"
                torch.testing.assert_close(actual[0].gather(1, ours.indices), expected[0].gather(1, theirs.indices),
                                           rtol=1e-6, atol=1e-6)  # fmt: skip


def test_grouped_routing_refuses_a_bias_with_softmax_scores():
    """A correction bias has no meaning for softmax scores (transformers' softmax router has none): refused by every
    backend, not added by one and ignored by another."""
    logits, bias = torch.randn(4, 16), torch.randn(16)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="a correction bias goes with scoring 'sigmoid', not 'softmax'"):
            torch.ops.compiled_llm.moe_route_grouped(logits, bias, 4, "softmax", 4, 2, False, 1.0, torch.float32,
                                                     backend)  # fmt: skip


def grouped_router(n_group: int = 4, topk_group: int = 2, top_k: int = 3):
    """A DeepSeek-V3 router of 16 experts in `n_group` groups, random weights and bias correction."""
    config = ARCHITECTURES["deepseek_v3"]()
    config.n_routed_experts, config.n_group, config.topk_group, config.num_experts_per_tok = 16, n_group, topk_group, top_k
    config.norm_topk_prob, config.routed_scaling_factor = True, 2.5
    router = tf.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
        router.e_score_correction_bias.copy_(torch.randn(16, generator=generator) * 0.1)
    return router


def test_grouped_routing_reference_is_transformers_deepseek_v3_router():
    """The reference against DeepSeek-V3's router module, and the capture's check accepts that router (and refuses a
    look-alike whose forward weighs the experts otherwise, or a router it does not describe)."""
    from compiled_llm.capture.grouped_routing import grouped_router_mismatch
    from custom_ops.moe import routing

    router = grouped_router()
    x = torch.randn(11, router.weight.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, weights, ids = router(x)
    actual = routing.moe_route_grouped_reference(logits, router.e_score_correction_bias, 3, "sigmoid", 4, 2, True, 2.5,
                                                 weights.dtype)  # fmt: skip
    ours, theirs = actual[1].sort(dim=-1), ids.sort(dim=-1)
    assert torch.equal(ours.values, theirs.values)
    assert torch.equal(actual[0].gather(1, ours.indices), weights.gather(1, theirs.indices))
    assert grouped_router_mismatch(router) is None

    class Doubled(type(router)):  # a look-alike: the same attributes, other weights
        def forward(self, hidden_states):
            logits, weights, ids = super().forward(hidden_states)
            return logits, weights * 2, ids

    router.__class__ = Doubled
    assert "weighs" in grouped_router_mismatch(router)

    class ZeroMasked(type(grouped_router())):  # dropped groups filled with 0.0 (A.X-K2's): negative choices show it
        def forward(self, hidden_states):
            logits = F.linear(hidden_states.float(), self.weight.float())
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias
            groups = choice.view(-1, self.num_group, 16 // self.num_group).topk(2, dim=-1)[0].sum(dim=-1)
            kept = torch.zeros_like(groups).scatter_(1, groups.topk(self.topk_group, dim=-1)[1], 1).bool()
            choice = choice.masked_fill(~kept.repeat_interleave(16 // self.num_group, dim=1), 0.0)
            ids = choice.topk(self.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)
            return logits, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.routed_scaling_factor, ids

    look_alike = grouped_router()
    look_alike.__class__ = ZeroMasked
    assert "chooses other experts" in grouped_router_mismatch(look_alike)
    hooked = grouped_router()
    hooked.forward = hooked.forward  # what accelerate's hooks leave on the instance
    assert "of its own on the instance" in grouped_router_mismatch(hooked)
    no_groups = grouped_router()
    no_groups.num_group = no_groups.topk_group = None  # A.X-K2-Light's
    assert grouped_router_mismatch(no_groups) == "not a grouped router"
    with pytest.raises(ValueError, match="top_k=9 of the 8 experts in the kept groups"):
        routing.moe_route_grouped_reference(logits, None, 9, "sigmoid", 4, 2, True, 1.0, torch.float32)
    v2_router = next(m.mlp.gate for m in tiny_model("deepseek_v2").model.layers if hasattr(m.mlp, "gate"))
    assert grouped_router_mismatch(v2_router) == "not a grouped router"  # greedy: fuse_moe_routing's


def test_grouped_routing_reference_is_transformers_deepseek_v2_group_limited_router():
    """DeepSeek-V2's group_limited_greedy router (softmax, the groups ranked by their best, the others scored 0, times
    routed_scaling_factor): the reference against the module, and the capture's check accepts it."""
    from compiled_llm.capture.grouped_routing import grouped_router_mismatch
    from custom_ops.moe import routing

    config = ARCHITECTURES["deepseek_v2"]()
    config.n_routed_experts, config.n_group, config.topk_group, config.num_experts_per_tok = 16, 4, 2, 3
    config.topk_method, config.routed_scaling_factor = "group_limited_greedy", 2.5
    router = tf.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(5)))
        x = torch.randn(11, router.weight.shape[1], generator=torch.Generator().manual_seed(3))
        logits, weights, ids = router(x)
    actual = routing.moe_route_grouped_reference(logits, None, 3, "softmax", 4, 2, False, 2.5, weights.dtype)
    ours, theirs = actual[1].sort(dim=-1), ids.sort(dim=-1)
    assert torch.equal(ours.values, theirs.values)
    assert torch.equal(actual[0].gather(1, ours.indices), weights.gather(1, theirs.indices))
    assert grouped_router_mismatch(router) is None


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_routing_kernel_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import test_moe_experts as t; t.check_routing_against_reference('cpu');"
        " t.check_grouped_routing_against_reference('cpu')"
    )


@pytest.mark.gpu
def test_routing_kernel_on_the_gpu():
    check_routing_against_reference("cuda")
    check_grouped_routing_against_reference("cuda")


def test_the_routing_ops_pass_opcheck():
    from custom_ops.moe import routing  # noqa: F401

    logits = distinct_logits(5, 16, seed=2, dtype=torch.float32)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(1)) * 0.1
    torch.library.opcheck(torch.ops.compiled_llm.moe_route_grouped.default,
                          (logits, bias, 3, "sigmoid", 4, 2, True, 2.5, torch.float32, "torch"))  # fmt: skip
    torch.library.opcheck(torch.ops.compiled_llm.moe_route.default, (logits, 3, "softmax", False, 2.5, torch.float32,
                                                                     "torch"))  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "sites"), [("gpt_oss", 2), ("mixtral", 2), ("qwen3_moe", 2), ("deepseek_v2", 1), ("deepseek_v3", 1)]
)
def test_fuse_moe_routing_replaces_each_router_and_keeps_the_logits(arch, sites, own_cache_dir):
    """Where moe_backend is triton (asked for here on the CPU, where the ops then run their references): each router's
    softmax/top-k chain is one moe_route whose outputs feed the experts, DeepSeek-V2's scaled one included;
    DeepSeek-V3's grouped router is the capture's moe_route_grouped, on the same backend."""
    model = tiny_model(arch)
    compiled = compile_model(model, moe_backend="triton", compile_backend="eager", cache_dir=own_cache_dir,
                             max_batch_size=2)  # fmt: skip
    assert compiled.report.pass_sites("fuse_moe_routing") == sites
    targets = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    grouped = targets.count(torch.ops.compiled_llm.moe_route_grouped.default)
    assert targets.count(torch.ops.compiled_llm.moe_route.default) + grouped == sites
    assert torch.ops.aten.topk.default not in targets and torch.ops.aten.softmax.int not in targets
    assert all(n.args[-1] == "triton" for n in compiled.graph_module.graph.nodes
               if n.target is torch.ops.compiled_llm.moe_route_grouped.default)  # fmt: skip
    ids = random_prompt(16, batch=2, seed=4)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert relative_error(compiled(ids).logits, expected) < 1e-4


def test_deepseek_v2_group_limited_routing_is_one_op_and_keeps_the_logits(own_cache_dir):
    """A DeepSeek-V2 model whose routers are group_limited_greedy (the 236B model's): each is the capture's
    moe_route_grouped, on the experts' backend, and the logits stay HF's."""
    config = ARCHITECTURES["deepseek_v2"]()
    config.topk_method, config.n_group, config.topk_group, config.routed_scaling_factor = "group_limited_greedy", 2, 1, 2.5
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.normal_(0.0, 0.08)
    compiled = compile_model(model, moe_backend="triton", compile_backend="eager", cache_dir=own_cache_dir,
                             max_batch_size=2)  # fmt: skip
    assert compiled.report.pass_sites("fuse_moe_routing") == 1
    grouped = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.compiled_llm.moe_route_grouped.default]
    assert [n.args[3] for n in grouped] == ["softmax"] and grouped[0].args[-1] == "triton"
    ids = random_prompt(16, batch=2, seed=4)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert relative_error(compiled(ids).logits, expected) < 1e-4


def check_strided_routing_and_float32_biases(device: str) -> None:
    """Review findings: routing weights and one-token ids given as strided views (a kernel that read them at unit
    stride gave another answer), and float32 biases beside 16-bit weights (transformers adds them in place)."""
    for tokens in (1, 5):
        x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens)).to(device, torch.float16)
        ids, weights = random_routing(tokens, 8, 2, seed=tokens, device=device)
        ids = torch.stack([ids, ids], dim=-1).reshape(tokens, 4)[:, ::2]  # the same routing, as strided views
        weights = torch.stack([weights, weights], dim=-1).reshape(tokens, 4)[:, ::2]
        assert ids.stride(-1) == 2 and weights.stride(-1) == 2
        w13, w2, b13, b2 = random_experts(8, 64, 32, seed=tokens, dtype=torch.float16, device=device, bias=True)
        b13, b2 = b13.float(), b2.float()
        expected = moe_experts_reference(x, ids, weights, w13, w2, b13, b2, "silu")
        actual = torch.ops.compiled_llm.moe_experts(x, ids, weights, w13, w2, b13, b2, "silu", [], "triton")
        assert relative_error(actual, expected) < TOLERANCE[torch.float16], f"{tokens} tokens"


def test_reference_adds_a_float32_bias_as_transformers_does():
    x = torch.randn(4, 32).half()
    ids, weights = random_routing(4, 4, 2, seed=1, dtype=torch.float16)
    w13, w2, b13, b2 = random_experts(4, 32, 16, seed=2, dtype=torch.float16, bias=True)
    out = moe_experts_reference(x, ids, weights, w13, w2, b13.float(), b2.float(), "silu")
    assert out.dtype == torch.float16
    assert relative_error(out, float64_experts(x, ids, weights, w13, w2, b13, b2)) < 5e-3


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_strided_routing_and_float32_biases_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import test_moe_experts as t; "
        "t.check_strided_routing_and_float32_biases('cpu')"
    )


# One token's down GEMM summed in the kernel: column tiles off the hidden size (72 of 16), K in two masked steps.
SUM_TILE = {"sum": True, "BLOCK_N": 16, "BLOCK_K": 32}
# The same in the GEMV (no tensor cores), its K steps unrolled (one stage).
GEMV_SUM_TILE = {"sum": True, "gemv": True, "BLOCK_N": 16, "BLOCK_K": 32, "num_stages": 1}


def experts_in_formats(w13, w2, seed: int, formats) -> dict:
    """name -> (the experts op, its expert weights, its reference) for w13 and w2 as they are ("float") and stored as
    each of `formats`; MXFP4: random bytes of their shapes, where those take it (K a multiple of 32)."""
    from custom_ops.moe import fp8, mxfp4

    made = {"float": (torch.ops.compiled_llm.moe_experts, (w13, w2), moe_experts_reference)}
    if "fp8" in formats:
        quantized = (*fp8.quantize_experts(w13), *fp8.quantize_experts(w2))
        made["fp8"] = (torch.ops.compiled_llm.moe_experts_fp8, quantized, fp8.moe_experts_fp8_reference)
    if "mxfp4" in formats and w13.shape[2] % 32 == w2.shape[2] % 32 == 0:
        generator = torch.Generator().manual_seed(seed)
        blocks = [t.to(w13.device) for shape in (w13.shape, w2.shape)
                  for t in mxfp4.random_mxfp4(*shape, generator=generator, exponents=(121, 124))]  # fmt: skip
        made["mxfp4"] = (torch.ops.compiled_llm.moe_experts_mxfp4, blocks, mxfp4.moe_experts_mxfp4_reference)
    return made


def check_sum_over_experts(device: str, dtype: torch.dtype, sum_tiles=(SUM_TILE, GEMV_SUM_TILE),
                           formats=("fp8", "mxfp4")) -> None:  # fmt: skip
    """The sum over each token's k = 8 (or 6: pairs padded to a power of 2) pairs: inside the down GEMM (one token under `sum_tiles`) and by the sum kernel
    after it (one token under the heuristic's tile, several tokens), with biases, ids of another rank's experts
    (expert parallelism) and routing weights in float32 or the model's dtype; one token's for float, e4m3 and MXFP4
    experts (`formats`: the other tests run the sum kernel after each format's GEMM of several tokens)."""
    cases = [(1, 72, 48, None, 8), (1, 64, 32, range(4, 12), 8), (1, 64, 32, range(2, 12), 6), (6, 72, 48, None, 8),
             (6, 64, 32, range(2, 10), 8)]  # fmt: skip
    for seed, (tokens, hidden, inter, local, top_k) in enumerate(cases):
        local = local or range(16)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
        ids, weights, _ = other_ranks_routing(tokens, 16, top_k, seed, local, device)
        weights = weights.to(dtype) if seed % 2 else weights
        w13, w2, b13, b2 = random_experts(len(local), hidden, inter, seed, dtype, device, bias=True)
        one_token_formats = formats if tokens == 1 else ()
        for name, (op, experts, reference) in experts_in_formats(w13, w2, seed, one_token_formats).items():
            expected = reference(x, ids, weights, *experts, b13, b2, "silu", [])
            run = functools.partial(op, x, ids, weights, *experts, b13, b2, "silu", [], "triton")
            for tile in (None, *(sum_tiles if tokens == 1 else ())):
                actual = run() if tile is None else with_tile(tile, run)
                error = relative_error(actual, expected)
                assert actual.dtype == dtype and error < TOLERANCE[dtype], f"case {seed} {name} {tile}: {error:.2e}"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_sum_over_experts_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import torch, test_moe_experts as t; "
        "t.check_sum_over_experts('cpu', torch.float32); t.check_sum_over_experts('cpu', torch.float16, formats=())"
    )


def test_summing_a_per_token_or_gated_gemm_is_refused():
    """sum_pairs takes one token's down GEMM, a row a pair: a gated GEMM or rows per token is a clear error (checked
    before any kernel, so on every device)."""
    _, w2, _, _ = random_experts(4, 16, 8, seed=0)
    ids, weights = random_routing(1, 4, 2, seed=0)
    blocks = triton_moe.expert_blocks(ids, 4)
    for a, gated, a_per_token in ((torch.randn(2, 8), True, False), (torch.randn(1, 8), False, True)):
        with pytest.raises(ValueError, match="sum_pairs sums one token's weighted down-GEMM rows"):
            triton_moe.grouped_gemm(a, w2, None, torch.empty(1, 16), weights.reshape(-1), blocks, gated=gated,
                                    a_per_token=a_per_token, sum_pairs=True)  # fmt: skip


@pytest.mark.gpu
def test_sum_over_experts_on_the_gpu():
    """The cases in bf16 under every summing tile the tuning times; then Qwen3-30B-A3B's down GEMM (128 experts of
    2048 x 768, k = 8): one token summed in the GEMM and after it, 16 tokens by the sum kernel."""
    from custom_ops.moe import tuning

    check_sum_over_experts("cuda", torch.bfloat16, tuning.SUM_TILES)
    w13, w2, _, _ = random_experts(128, 2048, 768, seed=0, dtype=torch.bfloat16, device="cuda")
    for tokens in (1, 16):
        x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
        ids, weights = random_routing(tokens, 128, 8, seed=tokens, device="cuda")
        expected = moe_experts_reference(x, ids, weights, w13, w2, None, None, "silu")
        run = functools.partial(torch.ops.compiled_llm.moe_experts, x, ids, weights, w13, w2, None, None, "silu", [],
                                "triton")  # fmt: skip
        for tile in (None, *(tuning.SUM_TILES if tokens == 1 else ())):
            actual = run() if tile is None else with_tile(tile, run)
            assert relative_error(actual, expected) < TOLERANCE[torch.bfloat16], f"{tokens} tokens, tile {tile}"


def test_quantize_fp8_leaves_experts_held_as_buffers():
    """Expert weights that are buffers, not parameters, stay in the model's dtype (no crash in the recipe)."""
    from compiled_llm.config import CompileConfig
    from fx_passes.quantize_fp8 import quantize_fp8

    root = torch.nn.Module()
    root.register_buffer("w13", torch.randn(4, 32, 16))
    root.register_buffer("w2", torch.randn(4, 16, 16))
    graph = torch.fx.Graph()
    x, ids, weights = graph.placeholder("x"), graph.placeholder("ids"), graph.placeholder("weights")
    w13, w2 = graph.get_attr("w13"), graph.get_attr("w2")
    for node, value in ((w13, root.w13), (w2, root.w2)):
        node.meta["val"] = value
    out = graph.call_function(
        torch.ops.compiled_llm.moe_experts.default, (x, ids, weights, w13, w2, None, None, "silu", [], "torch")
    )
    graph.output(out)
    gm = torch.fx.GraphModule(root, graph)
    result = quantize_fp8(gm, CompileConfig(quantization="fp8"))
    assert result.sites == 0 and "1 MoE layers' experts (weights not parameters)" in result.detail


def check_tuning_candidates_against_their_reference(device: str) -> None:
    """The grouped-GEMM tuning's own check (a candidate against its reference), on inputs made as its `inputs` makes
    them, for both GEMMs, float, e4m3 and MXFP4, one token and 16-row blocks, a summing tile of one token's down."""
    from custom_ops.linear.fp8 import quantize_rows
    from custom_ops.moe import fp8, mxfp4, tuning

    experts, n, k, top_k = 4, 64, 32, 2
    moe = tuning.MoeGroupedGemmTuning()
    for gated in (True, False):
        for mode in (1, 16):
            tokens = tuning.tokens_for(mode, experts, top_k)
            ids = torch.rand(tokens, experts, device=device).topk(top_k).indices
            blocks = triton_moe.expert_blocks(ids, experts, None if mode == 1 else mode)
            a = torch.randn(tokens if gated else tokens * top_k, k, device=device)
            w = torch.randn(experts, n, k, device=device) * k**-0.5
            route_weights = None if gated else torch.rand(tokens * top_k, device=device)
            (a8, a_scale), (w8, w_scale) = quantize_rows(a), fp8.quantize_experts(w)
            w_bytes, w_exponents = mxfp4.random_mxfp4(experts, n, k, device)
            for inputs in (
                (a, w, route_weights, blocks, None, None, None),
                (a8, w8, route_weights, blocks, (a_scale, w_scale), a, None),
                (a, w_bytes, route_weights, blocks, None, None, w_exponents),
            ):
                expected = moe.reference(*inputs)
                candidates = moe.candidates({"gated": gated, "rows": mode})
                summing = [c for c in candidates if c.config.get("sum")][:1]  # one token's down: its sum in the GEMM
                for candidate in candidates[:2] + summing:
                    actual = candidate.run(*inputs).float()
                    error = ((actual - expected).abs().max() / expected.abs().max()).item()
                    assert error < moe.tolerance(torch.float32)[1], f"{candidate.name} gated={gated} mode={mode}"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_tuning_candidates_against_their_reference_in_the_interpreter():
    run_in_interpreter(
        "import sys; sys.path.insert(0, 'tests'); import test_moe_experts as t; "
        "t.check_tuning_candidates_against_their_reference('cpu')"
    )


def test_a_stored_rewritten_moe_graph_loads_into_other_weights(own_cache_dir):
    """The rewritten graph of an FP8 MoE model with its fused routers, stored, then loaded for a model of the same
    shape with other weights: the experts' e4m3 copies are rebuilt from the new weights (derived_weights), and the
    loaded graph gives what a fresh compile of the new model gives."""
    fields = {"moe_backend": "triton", "quantization": "fp8", "max_batch_size": 2, "cache_dir": own_cache_dir}
    compile_model(tiny_model("qwen3_moe", seed=0), **fields)
    other = tiny_model("qwen3_moe", seed=1)
    loaded = compile_model(other, **fields)  # a loaded graph is self-checked
    assert loaded.report.capture.startswith("rewritten graph from the graph cache")
    fresh = compile_model(other, graph_cache=False, **fields)
    ids = random_prompt(16, batch=2, seed=6)
    assert relative_error(loaded(ids).logits, fresh(ids).logits) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_compiled_moe_models_on_the_gpu_match_hf(arch):
    """Each tiny MoE family compiled on the GPU as a user gets it (Triton experts, fused routers where they match, CUDA
    graphs), in float32 so that no near-tie in the routing separates the two: logits within 1e-4 of eager HF, and the
    report says which kernels ran."""
    model = tiny_model(arch).cuda()
    compiled = compile_model(model, max_batch_size=2)
    layers = MOE_LAYERS.get(arch, model.config.num_hidden_layers)
    assert compiled.report.pass_sites("insert_fused_moe") == layers
    assert f"{layers} MoE layers -> triton" in str(compiled.report)
    assert compiled.report.pass_sites("fuse_moe_routing") == layers  # every family's router: one kernel
    ids = random_prompt(24, batch=2, seed=7).cuda()
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert relative_error(compiled(ids).logits, expected) < 1e-4
