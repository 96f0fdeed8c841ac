"""Paged attention's backend per phase and decode batch size: phased backend names (custom_ops/attention/phased.py)
and their choice by the autotuner (custom_ops/attention/tuning.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from conftest import random_prompt, tiny_model

import compiled_llm.compiled_model as compiled_model_module
from autotune import select
from autotune.tuner import Candidate, cuda_timer
from compiled_llm import compile_model
from custom_ops import AttentionBackend, LayerAttentionFeatures, StepAttentionMetadata, get_attention_backend
from custom_ops.attention import backends, phased, triton, triton_decode_tuning, tuning

FEATURES = LayerAttentionFeatures(16, 4, 2, 0.25, 0, 0.0, False, torch.float32, torch.float32)


def test_a_phased_name_parses_into_ordered_rules_and_bad_ones_are_refused():
    rules = phased.parse_rules("decode<=8:triton,decode:flashinfer,prefill:flashinfer")
    assert [str(rule) for rule in rules] == ["decode<=8:triton", "decode:flashinfer", "prefill:flashinfer"]
    assert phased.members("decode<=8:triton,decode:flashinfer,prefill:flashinfer") == ["triton", "flashinfer"]
    assert phased.members("triton") == ["triton"]
    for name, why in [
        ("decode<=8:triton,prefill:flashinfer", "no rule for every decode step"),
        ("decode:triton", "no rule for every prefill step"),
        ("prefill<=4:a,decode:b,prefill:c", "is not 'decode:NAME'"),
        ("decode<=x:a,decode:b,prefill:c", "whole number"),
        ("decode:,prefill:a", "is not 'decode:NAME'"),
    ]:
        with pytest.raises(ValueError, match=why):
            phased.parse_rules(name)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        get_attention_backend("decode:nope,prefill:reference")


def test_rules_from_choices_merge_runs_of_one_backend_and_cover_larger_batches():
    chosen = {("decode", 1): "a", ("decode", 2): "a", ("decode", 4): "b", ("decode", 8): "a", ("prefill", 0): "b"}
    assert phased.phased_name(tuning._rules(chosen, "x")) == "decode<=2:a,decode<=4:b,decode:a,prefill:b"
    assert phased.phased_name(tuning._rules({("decode", 1): "a", ("prefill", 0): "a"}, "x")) == "a"
    assert phased.phased_name(tuning._rules({("decode", 1): "a"}, "x")) == "decode:a,prefill:x"


@pytest.fixture
def recording_backends(monkeypatch):
    """Backends "rec_a" and "rec_b": the reference's math, each call's (T, S) recorded, each with a planner that
    records the steps it planned."""
    calls, planned = [], []
    reference = get_attention_backend("reference")

    @dataclass
    class Planner:
        name: str

        def plan(self, metadata, cuda_graph_key=None):
            planned.append((self.name, metadata.is_decode, len(metadata.seq_lens)))

    for name in ("rec_a", "rec_b"):

        def run(out, q, *args, _name=name):
            calls.append((_name, q.shape[0], args[-6].shape[0]))  # T tokens, S sequences (seq_lens)
            reference.run(out, q, *args)

        make_planner = functools.partial(lambda layers, block, device, _name: Planner(_name), _name=name)
        monkeypatch.setitem(backends._BACKENDS, name, AttentionBackend(name, run, ("cpu",), make_planner=make_planner))
    phased.phased_backend.cache_clear()
    yield calls, planned
    phased.phased_backend.cache_clear()


def paged_step(query_lens: list[int], context: int, block: int = 4):
    """Inputs of one paged_attention call: sequences with `context` cached tokens each and `query_lens` new ones."""
    torch.manual_seed(len(query_lens) * 31 + sum(query_lens))
    lengths = [context + n for n in query_lens]
    width = -(-max(lengths) // block)
    table = (1 + torch.arange(len(lengths) * width, dtype=torch.int32)).view(len(lengths), width)
    slots = torch.tensor([int(table[s, p // block]) * block + p % block for s, n in enumerate(query_lens)
                          for p in range(lengths[s] - n, lengths[s])])  # fmt: skip
    tokens = len(slots)
    cache = torch.randn(1 + table.numel(), 2, block, FEATURES.num_kv_heads, FEATURES.head_dim)
    q = torch.randn(tokens, FEATURES.num_q_heads, FEATURES.head_dim)
    k, v = torch.randn(2, tokens, FEATURES.num_kv_heads, FEATURES.head_dim)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    metadata = StepAttentionMetadata(table, query_start_loc, seq_lens, block, width, all(n == 1 for n in query_lens))
    return (q, k, v, cache, slots, table, query_start_loc, seq_lens), metadata


def test_a_phased_backend_runs_the_rule_of_each_call_and_computes_what_the_reference_does(recording_backends):
    calls, _ = recording_backends
    name = "decode<=2:rec_a,decode:rec_b,prefill:rec_a"
    for query_lens, expected in [([1], "rec_a"), ([1, 1], "rec_a"), ([1, 1, 1], "rec_b"), ([5, 1], "rec_a"),
                                 ([3], "rec_a")]:  # fmt: skip
        inputs, _ = paged_step(query_lens, context=6)
        reference_cache = inputs[3].clone()
        actual = torch.ops.compiled_llm.paged_attention(*inputs, 0, 0.25, 0, 0.0, None, name)
        expected_out = torch.ops.compiled_llm.paged_attention(*inputs[:3], reference_cache, *inputs[4:], 0, 0.25, 0,
                                                              0.0, None, "reference")  # fmt: skip
        assert calls[-1] == (expected, sum(query_lens), len(query_lens))
        torch.testing.assert_close(actual, expected_out)
        torch.testing.assert_close(inputs[3], reference_cache)  # the new keys and values were written
    assert len(calls) == 5


def test_a_phased_backends_members_plan_only_the_steps_their_rules_give_them(recording_backends):
    calls, planned = recording_backends

    @dataclass
    class Layer:
        layer_idx: int
        features: LayerAttentionFeatures
        backend: str

    layers = [Layer(0, FEATURES, "decode<=2:rec_a,decode:rec_b,prefill:rec_b"), Layer(1, FEATURES, "rec_b")]
    planners = phased.planners_for(layers[:1], 4, torch.device("cpu"))
    assert sorted(planners) == ["rec_a", "rec_b"]
    for query_lens in ([1], [1, 1, 1], [4, 1]):
        for planner in planners.values():
            planner.plan(paged_step(query_lens, 4)[1])
    assert planned == [("rec_a", True, 1), ("rec_b", True, 3), ("rec_b", False, 2)]
    planned.clear()
    # As many tokens as sequences, one of them with none: a decode step to the run (which sees shapes only), so to the
    # planning too, although not every sequence has one token (is_decode False)
    inputs, metadata = paged_step([0, 2], 4)
    for planner in planners.values():
        planner.plan(metadata)
    torch.ops.compiled_llm.paged_attention(*inputs, 0, 0.25, 0, 0.0, None, layers[0].backend)
    assert planned == [("rec_a", False, 2)] and calls[-1] == ("rec_a", 2, 2)
    planned.clear()
    # A member that another layer runs on its own plans every step.
    planners = phased.planners_for(layers, 4, torch.device("cpu"))
    planners["rec_b"].plan(paged_step([1], 4)[1])
    assert planned == [("rec_b", True, 1)]


def fake_timer(run, input_sets, **_):
    """Fake GPU times (the checks against the reference are real): the reference fastest for decode steps of up
    to 2 sequences, sdpa elsewhere, by margins no measured host time (sdpa's planner) can change."""
    name, bucket = run.args[0], run.args[1]
    reference_wins = bucket["phase"] == "decode" and bucket["batch"] <= 2
    return {"reference": 1.0, "sdpa": 1e6}[name] if reference_wins else {"reference": 1e6, "sdpa": 1.0}[name]


def no_timer(run, input_sets, **_):
    raise AssertionError("cache mode timed a candidate")


def test_a_cpu_model_has_nothing_to_tune(tmp_path):
    """On a CPU sdpa is the only candidate (the reference syncs with the host, and is slower): no bucket, no line."""
    compiled = compile_model(tiny_model("llama"), compile_backend="eager", max_batch_size=8, cache_dir=tmp_path)
    assert [c for c in compiled.report.kernels if c.op == "paged_attention"] == []


def test_tuning_gives_each_decode_batch_size_and_prefill_its_fastest_backend(tmp_path, monkeypatch):
    """A CPU model (sdpa by `auto`, the reference made the other candidate) tuned with fake times: its layers'
    graph calls get the phased backend of the choices, generation matches the untuned model's, and a compile in
    cache mode serves the same choices without timing."""
    monkeypatch.setattr(tuning.PagedAttentionTuning, "reference_is_a_candidate", True)
    model = tiny_model("llama")
    fields = {"compile_backend": "eager", "max_batch_size": 8, "cache_dir": tmp_path}
    untuned = compile_model(model, autotune="off", **fields)
    monkeypatch.setattr(compiled_model_module, "select_kernels", functools.partial(select.select_kernels,
                                                                                   timer=fake_timer))  # fmt: skip
    tuned = compile_model(model, autotune="full", **fields)
    choices = [c for c in tuned.report.kernels if c.op == "paged_attention"]
    assert [(c.bucket["phase"], c.bucket.get("batch"), c.winner, c.source, c.heuristic) for c in choices] == [
        ("decode", 1, "reference", "tuned", "sdpa"), ("decode", 2, "reference", "tuned", "sdpa"),
        ("decode", 4, "sdpa", "tuned", "sdpa"), ("decode", 8, "sdpa", "tuned", "sdpa"),
        ("prefill", None, "sdpa", "tuned", "sdpa"),
    ]  # fmt: skip
    assert choices[0].bucket["context"] == 255 and choices[0].bucket["layers"] == 2  # max_seq_len 256
    name = "decode<=2:reference,decode:sdpa,prefill:sdpa"
    backends_in_graph = [n.args[-1] for n in tuned.graph_module.graph.nodes
                         if n.target is torch.ops.compiled_llm.paged_attention.default]  # fmt: skip
    assert backends_in_graph == [name, name]
    assert f"attention {name} for layers 0-1 (tuned; auto" in str(tuned.report)
    for batch in (1, 3):
        prompt = random_prompt(9, batch=batch, seed=batch)
        assert torch.equal(tuned.generate(prompt, max_new_tokens=6), untuned.generate(prompt, max_new_tokens=6))

    monkeypatch.setattr(compiled_model_module, "select_kernels", functools.partial(select.select_kernels,
                                                                                   timer=no_timer))  # fmt: skip
    cached = compile_model(model, autotune="cache", **fields)
    assert [(c.winner, c.source) for c in cached.report.kernels if c.op == "paged_attention"] == [
        (c.winner, "cache") for c in choices
    ]
    assert f"attention {name}" in str(cached.report)


def test_layers_whose_backend_the_user_named_are_not_tuned(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning.PagedAttentionTuning, "reference_is_a_candidate", True)
    monkeypatch.setattr(compiled_model_module, "select_kernels", functools.partial(select.select_kernels,
                                                                                   timer=fake_timer))  # fmt: skip
    compiled = compile_model(tiny_model("llama"), attention_backend="sdpa", autotune="full", compile_backend="eager",
                             max_batch_size=8, cache_dir=tmp_path)  # fmt: skip
    assert [c for c in compiled.report.kernels if c.op == "paged_attention"] == []
    assert "attention sdpa for layers 0-1 (requested)" in str(compiled.report)


def qwen3_head_dim_64(device: str = "cuda") -> torch.nn.Module:
    """A tiny Qwen3 whose attention both GPU backends run (FlashInfer takes head_dim 64, not the tests' usual 16)."""
    import transformers as tf
    from conftest import _COMMON

    torch.manual_seed(0)
    config = tf.Qwen3Config(**{**_COMMON, "hidden_size": 256, "num_attention_heads": 8}, head_dim=64)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.normal_(0.0, 0.05)
    return model.to(device, torch.bfloat16)


@pytest.mark.gpu
def test_a_real_tuning_run_times_both_gpu_backends_for_each_bucket(tmp_path, monkeypatch):
    """Real times on the GPU: every decode batch size and prefill get a winner among FlashInfer and Triton, each
    candidate checked against the reference and timed (FlashInfer's with its planning), and the graph's calls
    get the backend the choices make."""
    pytest.importorskip("flashinfer")
    monkeypatch.setattr(triton, "TUNED_DECODE_SPLITS", {})  # this test's choices do not outlive it
    monkeypatch.setattr(triton, "TUNED_DECODE_LAUNCHES", {})
    model = qwen3_head_dim_64()
    compiled = compile_model(model, autotune="full", compile_backend="eager", max_batch_size=8, cache_dir=tmp_path)
    choices = [c for c in compiled.report.kernels if c.op == "paged_attention"]
    assert [(c.bucket["phase"], c.bucket.get("batch")) for c in choices] == [
        ("decode", 1), ("decode", 2), ("decode", 4), ("decode", 8), ("prefill", None)
    ]  # fmt: skip
    # Decode: Triton's kernel also at each key split count above its heuristic's, and in each launch but the default.
    # Prefill: sdpa too (timed by plain launches: it reads lengths on the host, no CUDA graph can hold it).
    for c in choices[:4]:
        heuristic = triton.decode_splits(c.bucket["batch"], 2, torch.device("cuda"))
        splits = {f"triton-splits{n}" for n in triton_decode_tuning.SPLITS if n > heuristic}
        launches = triton_decode_tuning.decode_launches(c.bucket, heuristic, torch.device("cuda"))
        launches = {triton_decode_tuning.launch_name(launch) for launch in launches}
        assert len(launches) == len(triton_decode_tuning.LAUNCHES) - 1
        assert set(c.times_us) == {"flashinfer", "triton"} | splits | launches
    assert set(choices[4].times_us) == {"flashinfer", "triton", "sdpa"}
    assert all(c.source == "tuned" for c in choices)
    # Every other op was tuned after them (a CUDA-graph capture that failed midway would have broken the CUDA RNG
    # that their inputs are drawn from)
    assert all(c.source == "tuned" for c in compiled.report.kernels)
    assert all(c.heuristic == "flashinfer" and min(c.times_us.values()) > 0 for c in choices)
    chosen = {("decode", c.bucket["batch"]) if c.bucket["phase"] == "decode" else ("prefill", 0):
              "triton" if c.winner.startswith("triton-") else c.winner for c in choices}  # fmt: skip
    name = phased.phased_name(tuning._rules(chosen, "flashinfer"))
    assert {n.args[-1] for n in compiled.graph_module.graph.nodes
            if n.target is torch.ops.compiled_llm.paged_attention.default} == {name}  # fmt: skip


@pytest.mark.gpu
def test_a_phased_backend_replays_in_cuda_graphs_and_generates_what_one_backend_does(own_cache_dir, monkeypatch):
    """Fake times make Triton win decode steps of up to 2 sequences and FlashInfer the rest: under Inductor with
    CUDA graphs, batches 1 (Triton's graph) and 3 (FlashInfer's graph of 4) generate what FlashInfer alone does."""
    pytest.importorskip("flashinfer")

    def triton_for_small_decode(run, input_sets, **options):
        if not (isinstance(run, functools.partial) and run.args and run.args[0] in ("triton", "flashinfer")):
            return cuda_timer(run, input_sets, **options)  # another op's candidate (the LM head's GEMV)
        name, bucket = run.args[0], run.args[1]
        small = bucket["phase"] == "decode" and bucket["batch"] <= 2
        return 1.0 if (name == "triton") == small else 1e6

    monkeypatch.setattr(triton, "TUNED_DECODE_SPLITS", {})
    monkeypatch.setattr(triton, "TUNED_DECODE_LAUNCHES", {})
    model = qwen3_head_dim_64()
    fields = {"max_batch_size": 8, "cache_dir": own_cache_dir}
    untuned = compile_model(model, autotune="off", compile_backend="eager", **fields)
    monkeypatch.setattr(compiled_model_module, "select_kernels", functools.partial(select.select_kernels,
                                                                                   timer=triton_for_small_decode))  # fmt: skip
    tuned = compile_model(model, autotune="full", **fields)
    name = "decode<=2:triton,decode:flashinfer,prefill:flashinfer"
    assert f"attention {name} for layers 0-1 (tuned; auto" in str(tuned.report)
    assert "cuda graphs decode batch sizes [1, 2, 4, 8]" in str(tuned.report)
    for batch in (1, 3):
        prompt = random_prompt(12, batch=batch, seed=batch).cuda()
        replays = tuned.runner.cuda_graphs.replays
        generated = tuned.generate(prompt, max_new_tokens=8)
        assert torch.equal(generated, untuned.generate(prompt, max_new_tokens=8))
        # Every decode step replayed its graph: the longest row's tokens after the prefill's (random weights: a
        # row may stop early at EOS, id 2)
        longest = max(row.tolist().index(2) + 1 if 2 in row else 8 for row in generated[:, prompt.shape[1]:])
        assert tuned.runner.cuda_graphs.replays - replays >= longest - 1


def test_every_input_set_has_its_split_counters_before_the_timer_captures_it(monkeypatch):
    """A one-launch candidate timed in a CUDA graph finds its cache's counters (made there, they would not exist and the
    launch would merge in a second kernel): inputs() makes them for every copy, outside the capture."""
    monkeypatch.setattr(triton, "_merge_counters", {})
    attention = tuning.PagedAttentionTuning()
    attention._device = torch.device("cpu")
    bucket = {"phase": "decode", "batch": 4, "context": 40, **tuning._layer_kind(FEATURES, 16, 2, 1)}
    sets = attention.inputs(bucket, torch.float32, 5)
    assert len(sets) > 3  # past the timer's warm-up sets
    assert {(cache.device, cache.data_ptr()) for _, _, _, cache, *_ in sets} == set(triton._merge_counters)


def test_a_triton_split_count_or_launch_that_wins_is_installed_for_its_shape_and_the_layer_runs_triton(monkeypatch):
    monkeypatch.setattr(triton, "TUNED_DECODE_SPLITS", {})
    monkeypatch.setattr(triton, "TUNED_DECODE_LAUNCHES", {})
    attention = tuning.PagedAttentionTuning()
    kind = tuning._layer_kind(FEATURES, 16, 2, 1)
    bucket = {"phase": "decode", "batch": 4, "context": 255, **kind}
    cpu = torch.device("cpu")
    attention.install(bucket, Candidate("triton-splits4", lambda: None, "src", {"splits": 4}), cpu)
    key = triton.split_key(-1, 4, FEATURES.num_q_heads, FEATURES.num_kv_heads, FEATURES.head_dim, 0, torch.float32)
    assert triton.TUNED_DECODE_SPLITS == {key: 4} and triton.TUNED_DECODE_LAUNCHES == {}
    assert attention._chosen == {tuning._kind_key(cpu, kind): {("decode", 4): "triton"}}
    launch = triton_decode_tuning.LAUNCHES[0]
    attention.install(bucket, Candidate(triton_decode_tuning.launch_name(launch), lambda: None, "src", {"launch": launch}), cpu)
    assert triton.TUNED_DECODE_LAUNCHES == {key: launch} and triton.TUNED_DECODE_SPLITS == {}  # one axis at a time
    assert attention._chosen == {tuning._kind_key(cpu, kind): {("decode", 4): "triton"}}
    attention.install(bucket, Candidate("triton", lambda: None, "src"), cpu)  # the heuristic's count and launch again
    assert triton.TUNED_DECODE_SPLITS == {} and triton.TUNED_DECODE_LAUNCHES == {}


def test_the_launch_candidates_leave_out_the_default_and_wide_heads():
    kind = tuning._layer_kind(FEATURES, 16, 2, 1)

    def names(kv_cache: str, splits: int, **changes) -> set[str]:
        bucket = {**kind, "kv_cache": kv_cache, "batch": 1, **changes}
        launches = triton_decode_tuning.decode_launches(bucket, splits, torch.device("cpu"))
        return {triton_decode_tuning.launch_name(launch) for launch in launches}

    # One split and 16: the default merges in a kernel of its own (or writes the cache in one)
    separate = names("float32", 1)
    assert separate == names("float32", 16) == {
        "triton-keys64-warps4-stages3", "triton-keys64-warps4-stages2", "triton-keys32-warps4-stages2",
        "triton-keys32-warps2-stages2", "triton-keys32-warps1-stages2", "triton-keys32-warps4-stages3-one-launch",
        "triton-keys64-warps4-stages3-one-launch", "triton-keys32-warps4-stages2-one-launch",
    }  # fmt: skip
    fp8 = names("float8_e4m3fn", 1)
    assert fp8 == separate - {"triton-keys32-warps4-stages2"} | {"triton-keys32-warps4-stages3"}  # its default: 2
    # 2 to 9 splits: the default is the one-launch form, and its separate-merge twin a candidate
    for splits in (2, triton.ONE_LAUNCH_MAX_SPLITS):
        one = separate - {"triton-keys32-warps4-stages3-one-launch"} | {"triton-keys32-warps4-stages3"}
        assert names("float32", splits) == one
        fp8_one = fp8 - {"triton-keys32-warps4-stages2-one-launch"} | {"triton-keys32-warps4-stages2"}
        assert names("float8_e4m3fn", splits) == fp8_one
    assert names("float32", 4, head_dim=576) == set()  # latent attention's head: a launch of its own
    # Enough programs an SM (the CPU counts as 32 SMs): the default is one warp, and 4 warps a candidate
    batch = 32 * triton.ONE_WARP_PROGRAMS_PER_SM // kind["kv_heads"]
    assert names("float8_e4m3fn", 1, batch=batch) == fp8 - {"triton-keys32-warps1-stages2"} | {
        "triton-keys32-warps4-stages2"
    }  # fmt: skip
    assert names("float8_e4m3fn", 1, batch=batch - 1) == fp8


def test_the_untuned_decode_launch_takes_one_warp_from_enough_programs_an_sm_of_small_tiles():
    cpu, most = torch.device("cpu"), triton.ONE_WARP_PROGRAMS_PER_SM  # the CPU counts as 32 SMs
    seqs = 32 * most // 8  # Llama-8B's layer: a program per sequence and KV head (its 4 query heads in 16 rows)
    assert triton.decode_one_warp(seqs, 32, 8, 128, 1, cpu) and not triton.decode_one_warp(seqs - 1, 32, 8, 128, 1, cpu)
    assert triton.decode_one_warp(seqs // 2, 32, 8, 128, 2, cpu)  # key splits are programs too
    assert not triton.decode_one_warp(4 * seqs, 16, 8, 256, 1, cpu)  # Gemma's head_dim 256: 16 x 256 a tile
    assert not triton.decode_one_warp(32 * seqs, 32, 1, 128, 1, cpu)  # one KV head of 32 query heads: 32 x 128
    assert triton.default_decode_launch(torch.bfloat16, 1, one_warp=True)["num_warps"] == 1
    assert triton.default_decode_launch(torch.float8_e4m3fn, 1)["num_warps"] == 4


def test_the_untuned_decode_launch_merges_in_the_kernel_at_2_to_9_splits(monkeypatch):
    """default_decode_launch's ONE_LAUNCH follows the split count, unless DECODE_LAUNCH names it."""
    ones = {n: triton.default_decode_launch(torch.bfloat16, n)["ONE_LAUNCH"] for n in (None, 1, 2, 9, 10, 16)}
    assert ones == {None: False, 1: False, 2: True, 9: True, 10: False, 16: False}
    assert triton.default_decode_launch(torch.float8_e4m3fn, 4) == {"num_warps": 4, "num_stages": 2, "ONE_LAUNCH": True,
                                                                     "TILE": triton.KEY_TILE}  # fmt: skip
    monkeypatch.setattr(triton, "DECODE_LAUNCH", {"TILE": 32, "ONE_LAUNCH": False})
    assert not triton.default_decode_launch(torch.bfloat16, 4)["ONE_LAUNCH"]


class RecordedLaunches:
    """paged_attention_kernel's stand-in: the launch options of each call."""

    def __init__(self):
        self.options = []

    def __getitem__(self, grid):
        return lambda *args, **options: self.options.append(options)


@pytest.mark.skipif(not triton.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_a_decode_step_launches_the_tuned_launch_of_its_shape_else_the_default(monkeypatch, cache_dtype):
    import random

    from custom_ops.attention import triton_kernel
    from tests.paged_steps import random_step

    monkeypatch.setattr(triton, "TUNED_DECODE_LAUNCHES", {})
    kernel = RecordedLaunches()
    monkeypatch.setattr(triton_kernel, "paged_attention_kernel", kernel)
    args, _ = random_step(random.Random(0), [(16, 1), (3, 1)], 16, 8, 2, 64, torch.bfloat16, "cpu", cache_dtype)
    out = torch.empty_like(args[0])

    def launch_options():
        triton.triton_paged_attention(out, *args, 0, 0.125, 0, 0.0, None, splits=1)
        options = kernel.options.pop()
        return options["TILE"], options.get("num_stages"), options.get("num_warps")

    fp8 = cache_dtype == torch.float8_e4m3fn
    assert launch_options() == (triton.KEY_TILE, triton.FP8_CACHE_DECODE_STAGES if fp8 else 3, 4)
    with monkeypatch.context() as patch:  # this step's 2 x 2 programs on the CPU's 32 SMs as enough for one warp
        patch.setattr(triton, "ONE_WARP_PROGRAMS_PER_SM", 4 / 32)
        assert launch_options() == (triton.KEY_TILE, triton.FP8_CACHE_DECODE_STAGES if fp8 else 3, 1)
    with monkeypatch.context() as patch:  # on a GPU, the values convert in PTX at one warp only (triton_kernel.py)
        patch.setattr(triton, "runs_ptx", lambda tensor: True)
        for share, warps in ((4 / 32, 1), (triton.ONE_WARP_PROGRAMS_PER_SM, 4)):
            patch.setattr(triton, "ONE_WARP_PROGRAMS_PER_SM", share)
            triton.triton_paged_attention(out, *args, 0, 0.125, 0, 0.0, None, splits=1)
            options = kernel.options.pop()
            assert (options["num_warps"], options["IN_PTX"], options["VALUES_IN_PTX"]) == (warps, True, warps == 1)
    key = triton.split_key(-1, 2, 8, 2, 64, 0, cache_dtype)
    triton.TUNED_DECODE_LAUNCHES[key] = {"TILE": 64, "num_warps": 4, "num_stages": 3}
    assert launch_options() == (64, 3, 4)
    triton.TUNED_DECODE_LAUNCHES[(*key[:1], 3, *key[2:])] = {"TILE": 16, "num_warps": 2, "num_stages": 4}
    assert launch_options() == (64, 3, 4)  # another batch size's launch is not this step's


def test_attention_backend_takes_rules_per_phase_and_refuses_bad_ones():
    """A hand-picked phased backend: validated in the config (a missing phase, an unknown member), refused for a
    device its members do not run on, and on the CPU (reference for decode, sdpa for prefill) generating what the
    reference alone does."""
    from compiled_llm import CompileConfig

    with pytest.raises(ValueError, match="no rule for every prefill step"):
        CompileConfig(attention_backend="decode:triton")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'; allowed: auto, flashinfer, triton, xqa, sdpa"):
        CompileConfig(attention_backend="decode:cudnn,prefill:sdpa")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"'decode:triton,prefill:sdpa' runs on \['cuda'\], but the model is on 'cpu'"):
        compile_model(model, attention_backend="decode:triton,prefill:sdpa", compile_backend="eager")
    phased_model = compile_model(model, attention_backend="decode:reference,prefill:sdpa", compile_backend="eager")
    assert "attention decode:reference,prefill:sdpa for layers 0-1 (requested)" in str(phased_model.report)
    reference = compile_model(model, attention_backend="reference", compile_backend="eager")
    prompt = random_prompt(9, batch=2, seed=5)
    assert torch.equal(phased_model.generate(prompt, max_new_tokens=6), reference.generate(prompt, max_new_tokens=6))


def test_choices_an_interrupted_tuning_left_are_dropped_by_the_next(monkeypatch):
    """select_kernels stopped before finish() (an interrupt): the next graph's buckets start from nothing."""
    attention = tuning.PagedAttentionTuning()
    attention._chosen[("stale",)] = {("decode", 1): "reference"}
    attention._planners[("reference", 0)] = object()
    compiled = compile_model(tiny_model("llama"), compile_backend="eager", autotune="off")
    attention.buckets(compiled.graph_module)
    assert attention._chosen == {} and attention._planners == {}


def test_an_untuned_batch_size_takes_the_choice_of_the_nearest_tuned_one(tmp_path, monkeypatch):
    """Tuned at batch sizes 1 and 4 (reference, then sdpa), served with 1, 2, 4 and 8: 2 takes 1's choice, 8 takes
    4's, and the report says so, where the heuristic (sdpa) would have split the rules at another size."""
    monkeypatch.setattr(tuning.PagedAttentionTuning, "reference_is_a_candidate", True)
    model = tiny_model("llama")
    fields = {"compile_backend": "eager", "max_batch_size": 8, "cache_dir": tmp_path}
    monkeypatch.setattr(compiled_model_module, "select_kernels", functools.partial(select.select_kernels,
                                                                                   timer=fake_timer))  # fmt: skip
    compile_model(model, autotune="full", cuda_graph_batch_sizes=(1, 4), **fields)
    monkeypatch.setattr(compiled_model_module, "select_kernels", functools.partial(select.select_kernels,
                                                                                   timer=no_timer))  # fmt: skip
    served = compile_model(model, autotune="cache", **fields)
    decode = [(c.bucket["batch"], c.winner, c.source) for c in served.report.kernels if "batch" in c.bucket]
    assert decode == [(1, "reference", "cache"), (2, "reference", "nearest"), (4, "sdpa", "cache"),
                      (8, "sdpa", "nearest")]  # fmt: skip
    assert "attention decode<=2:reference,decode:sdpa,prefill:sdpa for layers 0-1" in str(served.report)
    assert "(3 cache, 2 nearest)" in str(served.report)


def test_planning_counts_only_where_the_steps_weight_reads_cannot_hide_it():
    """Llama-8B's 16 GB at 4 TB/s hide a 300 us plan; SmolLM2's 0.27 GB (68 us) leave 232 us of it, over 30
    layers; on a CPU all of it counts."""
    assert tuning.unhidden_host_us(300e-6, 16 << 30, 4e12, 32) == 0.0
    assert tuning.unhidden_host_us(300e-6, 270_000_000, 4e12, 30) == pytest.approx((300 - 67.5) / 30)
    assert tuning.unhidden_host_us(300e-6, 16 << 30, None, 32) == pytest.approx(300 / 32)
