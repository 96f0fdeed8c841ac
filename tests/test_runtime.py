"""Runtime: block allocation, chunked prefill, one compiled graph for every step shape, sampling."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from compiled_llm import compile_model
from conftest import random_prompt, relative_error, tiny_model


@pytest.mark.parametrize("arch, block_size, max_num_tokens", [("mistral", 5, 17), ("gemma2", 3, 16)])
def test_chunked_prefill_with_misaligned_blocks_and_padding(arch, block_size, max_num_tokens):
    """Chunk boundaries inside blocks, sliding windows, a left-padded batch: logits and tokens of HF."""
    model = tiny_model(arch)
    cm = compile_model(model, block_size=block_size, max_num_tokens=max_num_tokens, max_batch_size=3,
                       max_seq_len=96, compile_backend="eager")  # fmt: skip
    ids = random_prompt(30, batch=3, seed=9)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    mask[2, :4] = 0
    with torch.no_grad():
        expected_logits = model(ids, attention_mask=mask, use_cache=False).logits
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=[])
    real = mask.bool()
    assert relative_error(cm(ids, attention_mask=mask).logits[real], expected_logits[real]) < 1e-4
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=[]), expected)


@pytest.fixture(scope="module")
def small_budget():
    """A model compiled with a 16-token step budget and a 12-block (192-token) KV cache. Through Dynamo, not a stored
    compiled graph (graph_cache=False): a recompile for a step shape would add a Dynamo graph, which a loaded one
    (no Dynamo, no guards) would not show; it refuses such a step instead (test_compiled_artifact.py)."""
    model = tiny_model("qwen3")
    graphs_before = counters["stats"]["unique_graphs"]
    cm = compile_model(model, max_num_tokens=16, num_kv_blocks=12, max_seq_len=128, max_batch_size=4, graph_cache=False)
    cm.graphs_before = graphs_before
    return model, cm


def test_chunked_prefill_matches_hf(small_budget):
    model, cm = small_budget
    ids = random_prompt(40, batch=2, seed=7)  # 80 tokens: five steps of at most 16
    with torch.no_grad():
        expected_logits = model(ids, use_cache=False).logits
        expected_tokens = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
    assert relative_error(cm(ids).logits, expected_logits) < 1e-4
    assert torch.equal(cm.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[]), expected_tokens)


def test_one_graph_for_every_step_shape(small_budget):
    _, cm = small_budget
    for batch, length in [(1, 1), (1, 2), (3, 5), (4, 16), (1, 33)]:
        cm(random_prompt(length, batch=batch))
    cm.generate(random_prompt(3, batch=1), max_new_tokens=4, eos_token_id=[])  # decode steps of one token
    # compiled with fullgraph=True, so a graph break would have raised; a recompile adds a graph
    assert counters["stats"]["unique_graphs"] - cm.graphs_before == 1


def test_batch_that_does_not_fit_the_kv_cache_is_refused(small_budget):
    _, cm = small_budget
    free = cm.runner.kv_cache.allocator.num_free
    with pytest.raises(ValueError, match=f"this batch needs 16 KV blocks but {free} are free"):
        cm.generate(random_prompt(60, batch=4), max_new_tokens=4)
    assert cm.runner.kv_cache.allocator.num_free == free


def test_sampling_keeps_the_tokens_hf_warpers_keep():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from compiled_llm.sampling import next_tokens

    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3  # continuous values: no ties at the top-k / top-p boundary
    for temperature, top_k, top_p in [(0.7, 5, None), (1.3, None, 0.8), (1.0, 20, 0.5)]:
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p:
            scores = TopPLogitsWarper(top_p)(None, scores)
        allowed = torch.isfinite(scores)
        draws = torch.stack([next_tokens(logits, True, temperature, top_k, top_p) for _ in range(200)], dim=1)
        assert allowed.gather(1, draws).all()  # never a token HF would drop
        drawn = torch.zeros_like(allowed).scatter(1, draws, True)
        assert (drawn <= allowed).all() and drawn.sum() > allowed.shape[0]  # and more than one token per row


def test_repetition_penalty_matches_hf(small_budget):
    model, cm = small_budget
    ids = random_prompt(8, batch=2, seed=11)
    args = dict(max_new_tokens=10, do_sample=False, eos_token_id=[], pad_token_id=0, repetition_penalty=1.8)
    with torch.no_grad():
        expected = model.generate(ids, **args)
    assert torch.equal(cm.generate(ids, **args), expected)
    assert not torch.equal(expected, model.generate(ids, **{**args, "repetition_penalty": 1.0}))


def test_sampling_limits_and_seeds(small_budget):
    _, cm = small_budget
    ids = random_prompt(6, batch=2, seed=8)
    greedy = cm.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=[])
    assert torch.equal(cm.generate(ids, max_new_tokens=6, do_sample=True, top_k=1, eos_token_id=[]), greedy)
    assert torch.equal(cm.generate(ids, max_new_tokens=6, do_sample=True, top_p=1e-6, eos_token_id=[]), greedy)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(cm.generate(ids, max_new_tokens=6, do_sample=True, temperature=5.0, eos_token_id=[]))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], greedy)  # at temperature 5 over 256 tokens, 12 greedy picks are ~impossible


def test_fp8_kv_cache_stays_close_to_hf():
    """kv_cache_dtype="fp8": the cache holds float8_e4m3fn and logits move from HF's by about the rounding
    of e4m3 (3 mantissa bits), far less than an unrelated model's would."""
    model = tiny_model("llama")
    cm = compile_model(model, kv_cache_dtype="fp8", max_num_tokens=16, max_batch_size=2, max_seq_len=64,
                       compile_backend="eager")  # fmt: skip
    assert {t.dtype for t in cm.runner.kv_cache.tensors.values()} == {torch.float8_e4m3fn}
    assert "float8_e4m3fn" in str(cm.report)
    ids = random_prompt(40, batch=2, seed=5)  # chunked: later chunks read earlier keys from the fp8 cache
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    error = relative_error(cm(ids).logits, expected)
    assert 0 < error < 2**-4, error


def test_generate_under_inference_mode():
    """Users wrap generation in torch.inference_mode(): its tensors have no version counter, and every op of
    a step (the CPU attention backend among them) must still run, with HF's tokens."""
    model = tiny_model("mistral")  # a sliding window, too
    ids = random_prompt(14, seed=9)
    cm = compile_model(model, compile_backend="eager", max_batch_size=1)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(cm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), expected)
