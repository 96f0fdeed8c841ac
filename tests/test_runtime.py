"""Runtime: block allocation, chunked prefill, one compiled graph for every step shape, sampling."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from compiled_llm import compile_model
from compiled_llm.runtime import BlockAllocator, OutOfKVBlocks
from conftest import random_prompt, relative_error, tiny_model


def test_block_allocator():
    allocator = BlockAllocator(4)
    a = allocator.allocate(3)
    assert len(set(a)) == 3 and allocator.num_free == 1
    with pytest.raises(OutOfKVBlocks, match="asked for 2 KV blocks, 1 of 4 are free"):
        allocator.allocate(2)
    allocator.free(a)
    assert sorted(allocator.allocate(4)) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def small_budget():
    """A model compiled with a 16-token step budget and a 12-block (192-token) KV cache."""
    model = tiny_model("qwen3")
    graphs_before = counters["stats"]["unique_graphs"]
    cm = compile_model(model, max_num_tokens=16, num_kv_blocks=12, max_seq_len=128, max_batch_size=4)
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
