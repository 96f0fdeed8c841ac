"""Expert parallelism (fx_passes/shard_experts.py): two gloo ranks on CPU each keep half of every MoE layer's experts,
route every token, compute their experts' pairs and all-reduce, with attention replicated (tensor_parallel_size=1)
or tensor-parallel over the same ranks; the unsharded model's logits and greedy tokens come out. Sizes the pass
cannot honour are refused, naming the fields or the op."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompt, relative_error, tiny_model
from test_tensor_parallel import NEW_TOKENS, _expected, run_ranks

from compiled_llm import CompileConfig, compile_model
from compiled_llm.capture import capture_model
from fx_passes import DEFAULT_PIPELINE, registered_passes
from fx_passes.shard_experts import shard, split_features
from fx_passes.sharding import TensorParallelError

MOE_EXPERTS = torch.ops.compiled_llm.moe_experts.default
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default

# name -> (arch, CompileConfig fields, experts ops split, tensor-parallel linears, all-reduces, heads per rank) for the
# tiny 2-layer models (4 experts, 4 query and 2 KV heads a layer): an all-reduce per MoE layer, plus o_proj's and the
# embedding's (shard_vocabulary) where attention is tensor-parallel (Qwen3-MoE's router and Mixtral's stay whole: the plan leaves them out).
JOBS = {
    "qwen3_moe_ep": ("qwen3_moe", {"expert_parallel_size": 2}, 2, 0, 2, (4, 2)),
    "mixtral_ep": ("mixtral", {"expert_parallel_size": 2}, 2, 0, 2, (4, 2)),
    "qwen3_moe_tp_ep": ("qwen3_moe", {"tensor_parallel_size": 2, "expert_parallel_size": 2}, 2, 8, 5, (2, 1)),
    "mixtral_tp_ep": ("mixtral", {"tensor_parallel_size": 2, "expert_parallel_size": 2}, 2, 8, 5, (2, 1)),
    # moe_backend="triton" (on CPU the ops run their references): fuse_moe_routing's router op, the ids shifted after it
    "qwen3_moe_ep_routed": ("qwen3_moe", {"expert_parallel_size": 2, "moe_backend": "triton"}, 2, 0, 2, (4, 2)),
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    # One spawn for every job; the graphs run uncompiled (Inductor's collective lowering is test_tensor_parallel's).
    jobs = [(name, arch, {"compile_backend": "eager", "tensor_parallel_size": 1, **fields})
            for name, (arch, fields, *_) in JOBS.items()]  # fmt: skip
    jobs.append(("qwen3_moe_ep_fp8", "qwen3_moe", {"compile_backend": "eager", "tensor_parallel_size": 1,
                                                   "expert_parallel_size": 2, "quantization": "fp8", "verify": True}))  # fmt: skip
    jobs.append(("qwen3_moe_tp_fp8", "qwen3_moe", {"compile_backend": "eager", "tensor_parallel_size": 2,
                                                   "quantization": "fp8", "verify": True}))  # fmt: skip
    return run_ranks(2, jobs, tmp_path_factory.mktemp("ep2"))


@pytest.mark.parametrize("name", list(JOBS))
def test_two_ranks_of_experts_match_the_unsharded_model(two_ranks, name):
    arch, _, expert_sites, linear_sites, all_reduces, heads = JOBS[name]
    expected_logits, expected_tokens = _expected(arch)
    rank0, rank1 = (results[name] for results in two_ranks)
    assert torch.equal(rank0["logits"], rank1["logits"])  # one answer, whichever rank samples
    assert relative_error(rank0["logits"], expected_logits) < 1e-5
    assert torch.equal(rank0["tokens"], expected_tokens) and torch.equal(rank1["tokens"], expected_tokens)
    assert rank0["expert_sites"] == rank1["expert_sites"] == expert_sites
    assert rank0["sites"] == rank1["sites"] == linear_sites
    assert rank0["all_reduces"] == all_reduces
    assert rank0["heads"] == [heads] * 2


def test_the_fused_router_keeps_the_shift_to_the_ranks_experts(two_ranks):
    assert two_ranks[0]["qwen3_moe_ep_routed"]["routers"] == two_ranks[1]["qwen3_moe_ep_routed"]["routers"] == 2


def test_fp8_experts_of_two_ranks_match_one(two_ranks):
    """quantize_fp8 after shard_experts quantizes each rank's experts with the scales one rank gives them (per expert
    and output channel, over all of its input features; the tokens' rows whole on every rank): the same e4m3 values,
    only the sum over a token's experts split in two."""
    model, ids = tiny_model("qwen3_moe"), random_prompt(12, seed=3)
    one = compile_model(model, quantization="fp8", compile_backend="eager", max_batch_size=2)
    assert one.report.pass_sites("quantize_fp8") > 2  # the linears and both layers' experts
    rank0 = two_ranks[0]["qwen3_moe_ep_fp8"]
    assert relative_error(rank0["logits"], one(ids).logits) < 1e-5
    assert torch.equal(rank0["tokens"], one.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))


def test_fp8_experts_split_by_features_pass_the_self_check(two_ranks):
    """tensor_parallel_size=2 with fp8: each rank quantizes its features' share of every expert (the down projection's
    channels scaled over the rank's features only); the self-check passed (verify=True), and the logits are about as
    near the float model's as one rank's fp8 ones."""
    model, ids = tiny_model("qwen3_moe"), random_prompt(12, seed=3)
    with torch.no_grad():
        float_logits = model(ids, use_cache=False).logits
    one = compile_model(model, quantization="fp8", compile_backend="eager", max_batch_size=2)
    fp8_error = relative_error(one(ids).logits, float_logits)
    rank0, rank1 = (results["qwen3_moe_tp_fp8"] for results in two_ranks)
    assert rank0["expert_sites"] == rank1["expert_sites"] == 2 and torch.equal(rank0["logits"], rank1["logits"])
    assert relative_error(rank0["logits"], float_logits) < 1.5 * fp8_error  # measured: 7.6% against one rank's 9.1%


# -- the rewrite, one rank's graph --------------------------------------------------------------------------------------


def _graph_before_sharding(arch: str) -> torch.fx.GraphModule:
    gm = capture_model(tiny_model(arch)).gm
    for name in DEFAULT_PIPELINE[: DEFAULT_PIPELINE.index("shard_experts")]:
        registered_passes()[name](gm, CompileConfig())
    return gm


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_keeps_its_experts_and_shifts_the_ids(rank):
    gm = _graph_before_sharding("qwen3_moe")
    whole = gm.get_parameter("model.model.layers.0.mlp.experts.gate_up_proj").detach().clone()
    assert shard(gm, rank, 2, "0") == 2
    ops = [n for n in gm.graph.nodes if n.target is MOE_EXPERTS]
    ids, w13 = ops[0].args[1], ops[0].args[3]
    assert ids.target is torch.ops.aten.sub.Tensor and ids.args[1] == 2 * rank
    assert torch.equal(getattr(gm, w13.target), whole[2 * rank : 2 * rank + 2])
    assert all(next(iter(op.users)).target is ALL_REDUCE for op in ops)


def test_experts_not_divisible_by_the_ranks_are_refused():
    gm = _graph_before_sharding("mixtral")
    with pytest.raises(TensorParallelError, match=r"expert_parallel_size=3: cannot split the experts of node "
                                                  r"moe_experts .*3 ranks do not divide its 4 experts"):  # fmt: skip
        shard(gm, 0, 3, "0")


def test_sizes_that_share_no_group_are_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size=2 with expert_parallel_size=4: expert parallelism "
                                         "runs over the tensor-parallel group"):  # fmt: skip
        CompileConfig(tensor_parallel_size=2, expert_parallel_size=4)
    assert CompileConfig(expert_parallel_size=4).parallel_ranks == 4


def test_expert_parallelism_needs_an_moe_model():
    """(Its process group is checked with tensor parallelism's: test_tensor_parallel.py.)"""
    import fx_passes.shard_experts as pass_module

    gm = _graph_before_sharding("llama")
    config = CompileConfig(expert_parallel_size=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pass_module, "parallel_rank", lambda config: (0, 2))
        with pytest.raises(TensorParallelError, match="expert_parallel_size=2: the graph has no MoE experts op"):
            pass_module.shard_experts(gm, config)


# -- tensor-parallel experts (tensor_parallel_size > 1, expert_parallel_size = 1): split by intermediate features ---------


def _value(gm: torch.fx.GraphModule, arg):
    """An experts op's weight argument as the graph computes it (a parameter, or its transpose)."""
    if not isinstance(arg, torch.fx.Node):
        return arg
    if arg.op == "get_attr":
        return gm.get_parameter(arg.target)
    return _value(gm, arg.args[0]).transpose(*arg.args[1:])


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_feature_shares_of_the_experts_add_up_to_the_whole(arch):
    """Each rank's experts op over its features (Qwen3-MoE: gate rows | up rows; GPT-OSS: interleaved rows, transposed
    storage, biases) on the same tokens and routing: the two ranks' outputs sum to the unsplit op's (float64 weights)."""
    whole_gm = _graph_before_sharding(arch)
    whole_op = next(n for n in whole_gm.graph.nodes if n.target is MOE_EXPERTS)
    hidden, experts = whole_op.args[0].meta["val"].shape[-1], whole_op.args[3].meta["val"].shape[0]
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(5, hidden, generator=generator, dtype=torch.float64)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:2] for _ in range(5)])
    route = torch.rand(5, 2, generator=generator, dtype=torch.float64)

    def run(gm, op):
        w13, w2, b13, b2 = (None if a is None else _value(gm, a).double() for a in op.args[3:7])
        return MOE_EXPERTS._overloadpacket(x, ids, route, w13, w2, b13, b2, *op.args[7:9], "torch")

    expected = run(whole_gm, whole_op)
    total = torch.zeros_like(expected)
    for rank in (0, 1):
        gm = _graph_before_sharding(arch)
        assert split_features(gm, rank, 2, "0") == (2, [])
        op = next(n for n in gm.graph.nodes if n.target is MOE_EXPERTS)
        assert next(iter(op.users)).target is ALL_REDUCE
        assert op.args[4].meta["val"].shape[-1] * 2 == whole_op.args[4].meta["val"].shape[-1]
        assert (op.args[6] is None) == (rank == 1 or whole_op.args[6] is None)  # the down bias on rank 0 only
        total += run(gm, op)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)  # the op sums a token's experts in float32


def test_experts_whose_features_the_ranks_do_not_divide_stay_whole():
    gm = _graph_before_sharding("mixtral")
    features = next(n for n in gm.graph.nodes if n.target is MOE_EXPERTS).args[4].meta["val"].shape[-1]
    split, whole = split_features(gm, 0, features + 1, "0")
    assert split == 0 and len(whole) == 2
    assert f"{features + 1} ranks do not divide its {features} intermediate features" in whole[0]
