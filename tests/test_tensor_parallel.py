"""Tensor parallelism (fx_passes/shard_tensor_parallel.py): the ranks of a gloo group on CPU each compile their
shard of a tiny model, and compute the unsharded model's logits and greedy tokens; what the pass cannot prove
right is refused, naming the op."""

from __future__ import annotations

import asyncio
import datetime
import time

import pytest
import torch
import torch.distributed as dist
from conftest import free_port, llama_with_biases, random_prompt, relative_error, spawn_ranks, tiny_model
from torch import nn

from compiled_llm import LLM, CompileConfig, SamplingParams, compile_model
from compiled_llm.capture import capture_model
from fx_passes import DEFAULT_PIPELINE, registered_passes
from fx_passes.shard_tensor_parallel import shard
from fx_passes.shard_vocabulary import shard as shard_vocabulary
from fx_passes.sharding import ALL_GATHER, ALL_REDUCE, TensorParallelError

JOIN_TIMEOUT_S = 300  # every rank, compile included; a hung collective fails the test instead of CI
NEW_TOKENS = 8

# arch -> (column-parallel + row-parallel linears, all-reduces, experts ops split) for the tiny 2-layer models: q/k/v,
# gate/up and o/down per layer, and one all-reduce for the embedding (shard_vocabulary: it and the LM head, 2 sites,
# every arch); Mixtral's experts are split by their features (shard_experts), with an all-reduce a layer.
EXPECTED_SITES = {"llama": (14, 5, 0), "llama_bias": (14, 5, 0), "qwen3": (14, 5, 0), "gemma3": (14, 5, 0),
                  "mixtral": (8, 5, 2)}  # fmt: skip


def _model(arch: str) -> nn.Module:
    """tiny_model(arch); `llama_bias`: Llama with random biases on every linear (split with the column-parallel
    rows; added once, after the all-reduce, on the row-parallel ones) and a vocabulary of 257 tokens, not divisible
    by the ranks (the last rank's vocabulary shard padded); `gemma3` (tied embeddings) with a final logit soft-cap,
    which reads the gathered logits."""
    if arch == "gemma3":
        model = tiny_model("gemma3", final_logit_softcapping=30.0)
        assert model.config.tie_word_embeddings
        return model
    return llama_with_biases() if arch == "llama_bias" else tiny_model(arch)


def _rank_main(rank: int, world: int, port: int, jobs: list[tuple], out_dir: str) -> None:
    """One rank: compile each job, (arch, compile_backend) for tensor_parallel_size=world or (name, arch, CompileConfig
    fields), and save what it computed under the arch or the name."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        results = {}
        for job in jobs:
            name, arch, fields = job if len(job) == 3 else (job[0], job[0], {"compile_backend": job[1]})
            fields = {"tensor_parallel_size": world, "max_batch_size": 2, **fields}
            cm = compile_model(_model(arch), **fields)
            ids = random_prompt(12, seed=3)
            results[name] = {
                "logits": cm(ids).logits,
                "tokens": cm.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False),
                "sites": cm.report.pass_sites("shard_tensor_parallel"),
                "vocab_sites": cm.report.pass_sites("shard_vocabulary"),
                "all_gathers": sum(n.target is ALL_GATHER for n in cm.graph_module.graph.nodes),
                "expert_sites": cm.report.pass_sites("shard_experts"),
                "routers": cm.report.pass_sites("fuse_moe_routing"),
                "all_reduces": sum(n.target is ALL_REDUCE for n in cm.graph_module.graph.nodes),
                "fused_all_reduces": cm.report.pass_sites("fuse_all_reduce_rms_norm"),
                "heads": [(layer.features.num_q_heads, layer.num_kv_heads) for layer in cm.report.attention],
                "kv_cache": cm.report.kv_cache,
            }
            if name == "qwen3":  # the LLM engine's steps over the shards: greedy, and a seeded request sampled
                llm = LLM(_model(arch), **fields)
                prompts = [ids[0].tolist(), ids[0, 4:].tolist()]
                greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
                seeded = SamplingParams(max_tokens=NEW_TOKENS, seed=11, ignore_eos=True)
                results["llm"] = [out.outputs[0].token_ids for out in llm.generate(prompts, greedy, use_tqdm=False)]
                results["llm_sampled"] = llm.generate(prompts[:1], seeded, use_tqdm=False)[0].outputs[0].token_ids
                try:  # requests arriving on each rank's own event loop would break the ranks' lockstep
                    asyncio.run(anext(llm.generate_async(prompts[0], greedy)))
                    results["async"] = "ran"
                except ValueError as error:
                    results["async"] = str(error)
            if name == "llama":  # sampling: one seed on every rank draws one stream; different seeds are refused
                torch.manual_seed(7)
                results["sampled"] = cm.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0)
                torch.manual_seed(rank)
                try:
                    cm.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=True)
                    results["unseeded"] = "sampled"
                except ValueError as error:
                    results["unseeded"] = str(error)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, jobs: list[tuple], out_dir) -> list[dict]:
    """Each rank's results, from `world` spawned processes; a rank that fails or hangs fails the test."""
    spawn_ranks(_rank_main, world, (world, free_port(), jobs, str(out_dir)), JOIN_TIMEOUT_S)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]


def _expected(arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The unsharded HF model's logits and greedy tokens on the ranks' prompt."""
    model, ids = _model(arch), random_prompt(12, seed=3)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    return logits, model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    # Inductor for one model (the functional all-reduce through Inductor's collective lowering), the graph run
    # uncompiled for the rest: the sharding is the same, and each Inductor compile costs both ranks seconds.
    jobs = [
        ("llama", "inductor"),
        ("llama_bias", "eager"),
        ("qwen3", "eager"),
        ("gemma3", "eager"),
        ("mixtral", "eager"),
        ("llama_fp8", "llama", {"compile_backend": "eager", "quantization": "fp8", "verify": True}),
        # the norms as compiled_llm's ops (on CPU: their torch code), so each row-parallel sum fuses with its norm
        ("llama_fused_norms", "llama", {"compile_backend": "eager", "norm_backend": "triton"}),
    ]
    return run_ranks(2, jobs, tmp_path_factory.mktemp("tp2"))


def test_the_llm_engine_runs_the_shards_in_lockstep(two_ranks):
    """LLM over the shards (its scheduler and sampler on every rank): both ranks' tokens equal, greedy ones HF's;
    generate_async, whose requests arrive on each rank's own loop, is refused."""
    assert two_ranks[0]["llm"] == two_ranks[1]["llm"] and two_ranks[0]["llm_sampled"] == two_ranks[1]["llm_sampled"]
    assert all("generate_async over 2 ranks started outside this LLM" in rank["async"] for rank in two_ranks)
    expected = _expected("qwen3")[1][0, 12:].tolist()
    assert list(two_ranks[0]["llm"][0]) == expected


def test_ranks_sample_one_stream_or_refuse(two_ranks):
    """Sampling with one seed on every rank draws the same tokens on each (the ranks stay in lockstep); ranks seeded
    apart are refused before a step, naming what to do."""
    assert torch.equal(two_ranks[0]["sampled"], two_ranks[1]["sampled"])
    for rank in two_ranks:
        assert "same random stream on every rank" in rank["unseeded"]


@pytest.mark.parametrize("arch", list(EXPECTED_SITES))
def test_two_ranks_match_the_unsharded_model(two_ranks, arch):
    expected_logits, expected_tokens = _expected(arch)
    rank0, rank1 = (results[arch] for results in two_ranks)
    assert torch.equal(rank0["logits"], rank1["logits"])  # one answer, whichever rank samples
    assert relative_error(rank0["logits"], expected_logits) < 1e-5
    assert torch.equal(rank0["tokens"], expected_tokens) and torch.equal(rank1["tokens"], expected_tokens)
    sites, all_reduces, expert_sites = EXPECTED_SITES[arch]
    assert rank0["sites"] == rank1["sites"] == sites
    assert rank0["expert_sites"] == rank1["expert_sites"] == expert_sites
    assert rank0["all_reduces"] == all_reduces
    assert rank0["vocab_sites"] == rank1["vocab_sites"] == 2 and rank0["all_gathers"] == 1
    assert rank0["heads"] == [(2, 1)] * 2  # 4 query heads and 2 KV heads per layer, halved
    assert rank0["kv_cache"] == rank1["kv_cache"]  # one block count: the ranks' schedulers run in lockstep


def test_each_row_parallel_sum_fuses_with_the_norm_after_it(two_ranks):
    """fuse_all_reduce_rms_norm: the o and down projections' sums, each read by a residual add and RMSNorm, become one
    op a layer each (4 in 2 layers: the last down projection's with the final norm); the embedding's, read by a norm
    without an add, stays. The ranks compute the unsharded model's logits and tokens through it."""
    expected_logits, expected_tokens = _expected("llama")
    rank0, rank1 = (results["llama_fused_norms"] for results in two_ranks)
    assert rank0["fused_all_reduces"] == rank1["fused_all_reduces"] == 4
    assert rank0["all_reduces"] == rank1["all_reduces"] == 1
    assert torch.equal(rank0["logits"], rank1["logits"])
    assert relative_error(rank0["logits"], expected_logits) < 1e-5
    assert torch.equal(rank0["tokens"], expected_tokens) and torch.equal(rank1["tokens"], expected_tokens)
    assert two_ranks[0]["llama"]["fused_all_reduces"] == 0  # norm_backend auto on CPU: HF's norms, nothing to fuse


def test_two_ranks_of_fp8_match_one(two_ranks):
    """quantization="fp8" quantizes each rank's shards: a column-parallel shard's rows keep the scales they have on
    one rank, but a row-parallel shard's output channels take scales over the rank's own columns, and its input rows
    scales over the rank's own features, so the shards round other values to e4m3 than one rank does. The ranks'
    self-check (verify=True) holds them to the module quantized as they quantize it, part by part."""
    model, ids = _model("llama"), random_prompt(12, seed=3)
    one = compile_model(model, quantization="fp8", compile_backend="eager", max_batch_size=2)
    logits, tokens = one(ids).logits, one.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        unquantized = model(ids, use_cache=False).logits
    rank0, rank1 = (results["llama_fp8"] for results in two_ranks)
    assert rank0["sites"] == rank1["sites"] == EXPECTED_SITES["llama"][0]
    assert torch.equal(rank0["logits"], rank1["logits"])
    # One stream of tokens over the ranks. Against one rank's greedy tokens they agree until a near-tie that the other
    # roundings flip (here the 6th new token, with the weight scales' clip search), so one rank is compared by logits.
    assert torch.equal(rank0["tokens"], rank1["tokens"])
    assert torch.equal(rank0["tokens"][:, : ids.shape[1] + 1], tokens[:, : ids.shape[1] + 1])
    fp8_error = relative_error(logits, unquantized)  # e4m3's 3 mantissa bits over 7 linears a layer: 9.4% here
    assert 1e-3 < fp8_error < 0.15
    # Two ranks round to e4m3 values of the same size as one rank, some of them other values (the row-parallel
    # linears' and their inputs'): each is as far from the unquantized model as the other (measured 7.8% vs 9.4%),
    # and they differ by at most about sqrt(2) times that, the two roundings' errors were they independent
    # (measured 7.6%: the column-parallel roundings are the same). A wrong shard (a missing all-reduce, another
    # rank's columns) differs by the size of the logits themselves.
    assert relative_error(rank0["logits"], unquantized) < 1.25 * fp8_error
    assert relative_error(rank0["logits"], logits) < 1.5 * fp8_error


def test_four_ranks_replicate_the_kv_heads(tmp_path):
    """2 KV heads over 4 ranks: ranks 0-1 keep KV head 0, ranks 2-3 KV head 1, each for its one query head."""
    expected_logits, expected_tokens = _expected("llama")
    ranks = run_ranks(4, [("llama", "eager")], tmp_path)
    for results in ranks:
        assert results["llama"]["heads"] == [(1, 1)] * 2
        assert results["llama"]["sites"] == 14
        assert relative_error(results["llama"]["logits"], expected_logits) < 1e-5
        assert torch.equal(results["llama"]["tokens"], expected_tokens)


def test_tied_embeddings_share_one_vocabulary_shard():
    """Gemma 3's embedding and LM head read one parameter: both read the rank's one shard of it, the whole gone."""
    gm = _graph_before_sharding("gemma3")
    assert shard_vocabulary(gm, 1, 2, "0") == (1, 1)
    embedding = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.embedding.default)
    head = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    assert embedding.args[0].target == head.args[1].target == "shard_model_lm_head_weight_0_128_128"
    assert torch.equal(gm.get_parameter(embedding.args[0].target), gm.get_parameter("model.lm_head.weight")[128:])
    assert not any(n.op == "get_attr" and n.target == "model.lm_head.weight" for n in gm.graph.nodes)
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(ALL_REDUCE) == targets.count(ALL_GATHER) == 1


# -- errors -----------------------------------------------------------------------------------------------------------


def _graph_before_sharding(arch: str = "llama") -> torch.fx.GraphModule:
    gm = capture_model(tiny_model(arch)).gm
    for name in DEFAULT_PIPELINE[: DEFAULT_PIPELINE.index("shard_tensor_parallel")]:
        registered_passes()[name](gm, CompileConfig())
    return gm


@pytest.mark.parametrize(("field", "arch"), [("tensor_parallel_size", "llama"), ("expert_parallel_size", "mixtral")])
def test_parallelism_needs_a_process_group_of_its_size(field, arch):
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=f"{field}=2 needs torch.distributed initialized"):
        compile_model(tiny_model(arch), **{field: 2}, compile_backend="eager")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=f"{field}=2 does not match torch.distributed's world size 1"):
            compile_model(tiny_model(arch), **{field: 2}, compile_backend="eager")
    finally:
        dist.destroy_process_group()


def test_ranks_sharing_a_gpu_are_named():
    from compiled_llm.parallel_ranks import shared_gpu

    assert shared_gpu([("a", 0), ("a", 1), ("b", 0), ("b", 1)]) is None
    assert shared_gpu([("a", 0), ("a", 1), ("a", 0)]) == "ranks 0 and 2 both run on cuda:0 of host a"


def test_heads_not_divisible_by_the_ranks_are_refused():
    gm = _graph_before_sharding()
    with pytest.raises(TensorParallelError, match=r"3 ranks do not divide the 4 heads \(64 rows\) of the column-"
                                                  r"parallel linear model\.model\.layers\.0\.self_attn\.q_proj"):  # fmt: skip
        shard(gm, gm.meta["tp_plan"], 0, 3, "0")
    gm = _graph_before_sharding()
    with pytest.raises(TensorParallelError, match="node attention .*8 ranks do not divide the 4 query heads of "
                                                  "attention layer 0"):  # fmt: skip
        shard(gm, gm.meta["tp_plan"], 0, 8, "0")


def test_a_model_without_a_plan_is_refused(monkeypatch):
    import fx_passes.shard_tensor_parallel as pass_module

    monkeypatch.setattr(pass_module, "parallel_rank", lambda config: (0, 2))
    gm = _graph_before_sharding()
    gm.meta["tp_plan"] = {}  # a module transformers gives no plan (the graph-analysis fallback is later)
    with pytest.raises(TensorParallelError, match="the model has no tensor-parallel plan"):
        pass_module.shard_tensor_parallel(gm, CompileConfig(tensor_parallel_size=2))


ATTENTION = "model.model.layers.*.self_attn."


@pytest.mark.parametrize(
    "drop, add, message",
    [
        # A column-parallel output reaching a linear the plan leaves whole would be summed over half the features.
        ([ATTENTION + "o_proj"], {}, r"node linear_3 \(aten\.linear\.default.*reads a value split over the ranks"),
        # The LM head split by rows with no gather: the logits would be one rank's slice of the vocabulary.
        ([], {"model.lm_head": "colwise"}, "node output .*the graph's output would hold one rank's part only"),
        # A row-parallel linear over a whole input: each rank would add the whole product.
        ([ATTENTION + p for p in ("q_proj", "k_proj", "v_proj")], {}, r"node linear_3 .*must read a value split"),
    ],
)
def test_plans_the_pass_cannot_prove_right_are_refused(drop, add, message):
    gm = _graph_before_sharding()
    plan = {**{k: v for k, v in gm.meta["tp_plan"].items() if k not in drop}, **add}
    with pytest.raises(TensorParallelError, match=message):
        shard(gm, plan, 0, 2, "0")


class _NotHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16, bias=False)
        self.down = nn.Linear(16, 8, bias=False)

    def forward(self, x):  # [3, 8]: the rank's 2 of 4 "heads" end up inner after the transpose
        return self.down(self.up(x).view(3, 4, 4).transpose(1, 2).reshape(3, 16))


def test_a_view_that_is_not_a_head_reshape_is_refused():
    gm = torch.export.export(_NotHeads(), (torch.randn(3, 8),)).module()
    with pytest.raises(TensorParallelError, match=r"node reshape \(aten\.reshape\.default.*not a head reshape"):
        shard(gm, {"up": "colwise", "down": "rowwise"}, 0, 2, "0")


# -- LLM starting its own ranks (rank_workers.py) ------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its dead parent's reaper) is gone too
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


_LLM_OVER_TWO_RANKS = """
import asyncio, json, os, sys
import torch
from compiled_llm import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, compile_backend="eager", max_batch_size=2)
prompt = json.loads(sys.argv[2])
llm.engine.warm_up()  # as the server's engine core does: its steps mirrored too
greedy_params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
greedy = llm.generate([prompt], greedy_params, use_tqdm=False)
sampled = llm.generate([prompt, prompt[2:]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # no seed

async def streamed():  # requests arriving one by one on rank 0's event loop, one aborted early
    async def first(ids):
        async for out in llm.generate_async(ids, greedy_params):
            return out.outputs[0].token_ids
    async def whole(ids):
        async for out in llm.generate_async(ids, greedy_params, streaming=False):
            return out.outputs[0].token_ids
    return await asyncio.gather(whole(prompt), first(prompt[3:]), whole(prompt))
streams = asyncio.run(streamed())
pids = [p.pid for p in llm._workers.processes]
if sys.argv[3] == "die":  # rank 0 dies without stopping its workers: each must exit by itself
    print(json.dumps({"pids": pids}), flush=True)
    os._exit(1)
if sys.argv[3] == "kill-worker":  # a worker dies: rank 0's next step is an error naming it, not a hang
    os.kill(pids[0], 9)
    llm._workers.processes[0].join(10)
    try:
        llm.generate([prompt], greedy_params, use_tqdm=False)
        error = None
    except RuntimeError as e:
        error = str(e)
    print(json.dumps({"error": error}), flush=True)
    os._exit(0)
runner = llm.engine.runner
def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
runner.execute = interrupted  # Ctrl-C in rank 0's step, after the workers were sent it: the ranks are out of step
try:
    llm.generate([prompt], greedy_params, use_tqdm=False)
except KeyboardInterrupt:
    pass
del runner.execute
try:
    llm.generate([prompt], greedy_params, use_tqdm=False)
    after_interrupt = None
except RuntimeError as error:
    after_interrupt = str(error)
llm.close()
print(json.dumps({"after_interrupt": after_interrupt, "greedy": greedy[0].outputs[0].token_ids, "sampled": [o.outputs[0].token_ids for o in sampled],
                  "streams": streams, "initialized": torch.distributed.is_initialized(), "pids": pids}))
"""


def test_llm_starts_the_other_ranks_itself(tmp_path):
    """LLM(path, tensor_parallel_size=2) outside torchrun: this process is rank 0 and starts rank 1, which loads the
    model and steps as rank 0's engine does (rank_workers.MirroredEngine): a warm-up, generate (unseeded sampling too:
    rank 1 takes rank 0's random state), and generate_async's requests arriving one by one, one of them left after its
    first tokens (aborted); the greedy tokens are HF's; after a step interrupted on rank 0 every step is refused; close()
    stops the worker and leaves the group, a worker whose rank 0 dies exits, and a worker that dies makes rank 0's next
    step an error naming it. A model object cannot be
    sent to a new process: refused."""
    import json
    import subprocess
    import sys

    model = _model("qwen3")
    model.save_pretrained(tmp_path)
    ids = random_prompt(12, seed=3)
    expected = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    runs = {end: subprocess.run([sys.executable, "-c", _LLM_OVER_TWO_RANKS, str(tmp_path), json.dumps(ids[0].tolist()),
                                 end], capture_output=True, text=True, timeout=JOIN_TIMEOUT_S, check=False)
            for end in ("close", "die", "kill-worker")}  # fmt: skip
    assert runs["close"].returncode == 0, runs["close"].stderr[-3000:]
    out = json.loads(runs["close"].stdout.strip().splitlines()[-1])
    assert out["greedy"] == expected[0, 12:].tolist()
    assert out["streams"][0] == out["streams"][2] == out["greedy"] and len(out["streams"][1]) >= 1
    assert [len(tokens) for tokens in out["sampled"]] == [NEW_TOKENS] * 2 and not out["initialized"]
    assert "the ranks are out of step since a step failed on rank 0 (KeyboardInterrupt" in out["after_interrupt"]
    orphans = json.loads(runs["die"].stdout.strip().splitlines()[-1])["pids"]
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in orphans + out["pids"]), "a worker outlived rank 0"
    error = json.loads(runs["kill-worker"].stdout.strip().splitlines()[-1])["error"]
    assert error is not None and "rank 1 (pid" in error and "has exited with code -9" in error
    with pytest.raises(ValueError, match="LLM over 2 ranks starts the other 1 as processes that load the model"):
        LLM(model, tensor_parallel_size=2)


def test_a_configuration_the_ranks_refuse_is_one_error_not_a_traceback_from_each(tmp_path):
    """tensor_parallel_size=3 over a model of 4 heads: every rank refuses the sharding. Rank 0 raises the ValueError
    that names the node; the ranks it started exit without printing a traceback of their own."""
    import subprocess
    import sys

    model = _model("llama")
    assert model.config.num_attention_heads % 3
    model.save_pretrained(tmp_path / "model")
    script = ("import sys\nfrom compiled_llm import LLM\nif __name__ == '__main__':\n    try:\n"
              f"        LLM({str(tmp_path / 'model')!r}, tensor_parallel_size=3, compile_backend='eager')\n"
              "    except ValueError as error:\n        print('refused:', error)\n        sys.exit(2)\n")  # fmt: skip
    (tmp_path / "three_ranks.py").write_text(script)
    run = subprocess.run([sys.executable, str(tmp_path / "three_ranks.py")], capture_output=True, text=True,
                         timeout=JOIN_TIMEOUT_S, check=False)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert "refused: tensor_parallel_size=3: cannot shard node" in run.stdout and "do not divide" in run.stdout
    assert "Traceback" not in run.stderr, run.stderr[-3000:]


def test_an_unguarded_script_is_a_clear_error_not_a_wait(tmp_path):
    """A script that builds an LLM over two ranks at import: the spawned rank imports it again and stops; rank 0 says
    so at once (not after the group's 600 s timeout), naming the guard it needs."""
    import subprocess
    import sys

    _model("llama").save_pretrained(tmp_path / "model")
    script = tmp_path / "unguarded.py"
    script.write_text("from compiled_llm import LLM\n"
                      f"LLM({str(tmp_path / 'model')!r}, tensor_parallel_size=2, compile_backend='eager')\n")  # fmt: skip
    start = time.monotonic()
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode != 0 and time.monotonic() - start < 100
    assert "rank 1 (pid" in run.stderr and "before the ranks met" in run.stderr
    assert 'if __name__ == "__main__":' in run.stderr
