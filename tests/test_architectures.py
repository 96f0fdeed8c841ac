"""Every supported architecture, compiled, against the eager HF model: logits, greedy generation, report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ARCHITECTURES, SLIDING_WINDOW, random_prompt, relative_error

ARCHS = sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf(compiled, arch):
    model, cm = compiled(arch)
    ids = random_prompt(24, batch=2, seed=1)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    actual = cm(ids).logits
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_report_pages_every_layer(compiled, arch):
    model, cm = compiled(arch)
    assert cm.report.pass_sites("insert_paged_attention") == model.config.num_hidden_layers
    assert [layer.layer_idx for layer in cm.report.attention] == list(range(model.config.num_hidden_layers))
    assert "insert_paged_attention" in str(cm.report)
    paged = [n for n in cm.graph_module.graph.nodes if n.target is torch.ops.compiled_llm.paged_attention.default]
    if arch.startswith("deepseek"):  # latent attention, absorbed: one cache plane of latent + RoPE key a token
        assert "2 layers' values are their keys (latent attention): one cache plane" in str(cm.report)
        width = model.config.kv_lora_rank + model.config.qk_rope_head_dim
        assert {tuple(t.shape[1:]) for t in cm.runner.kv_cache.tensors.values()} == {(1, cm.runner.kv_cache.block_size, 1, width)}
        assert {n.args[1] for n in paged} == {n.args[2] for n in paged}  # v is k
        return
    # q, k and v of every layer reach attention token-major, with no transpose in between
    assert cm.report.pass_sites("token_major_attention_inputs") == 3 * model.config.num_hidden_layers
    assert {arg.target for n in paged for arg in n.args[:3]} == {torch.ops.aten.select.int}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_long_prompt_matches_hf(compiled, arch):
    model, cm = compiled(arch)
    ids = random_prompt(3 * SLIDING_WINDOW, seed=2)  # longer than the sliding window of windowed models
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=[])
    actual = cm.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=[])
    assert actual.shape == (1, ids.shape[1] + 32)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_left_padded_batch_matches_hf(compiled, arch):
    model, cm = compiled(arch)
    lengths = [5, 19, 12]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)  # pad id 0, on the left
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = random_prompt(n, seed=10 + row)[0]
        mask[row, width - n :] = 1
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=[])
    actual = cm.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=[])
    assert actual.shape == (len(lengths), width + 32)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_left_padded_forward_matches_hf_on_real_tokens(compiled, arch):
    model, cm = compiled(arch)
    ids = random_prompt(16, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=False).logits
    actual = cm(ids, attention_mask=mask).logits
    real = mask.bool()
    assert relative_error(actual[real], expected[real]) < 1e-4
    assert torch.count_nonzero(actual[~real]) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_eos_stops_rows_and_pads_them_like_hf(compiled, arch):
    model, cm = compiled(arch)
    ids = random_prompt(10, batch=2, seed=4)
    free_run = cm.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[])
    eos = int(free_run[0, 10 + 4])  # row 0 emits it as its 5th token; row 1 may emit it later or never
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    actual = cm.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(actual, expected)
    assert (actual[0, 10:] == eos).nonzero()[0].item() <= 4


def test_eos_given_as_tensor_or_numpy_values(compiled):
    model, cm = compiled("llama")
    ids = random_prompt(10, seed=4)
    free_run = cm.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
    eos = free_run[0, 13]
    stopped = cm.generate(ids, max_new_tokens=np.int64(8), do_sample=False, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=int(eos), pad_token_id=0)
    assert torch.equal(stopped, expected) and stopped.shape[1] < free_run.shape[1]
