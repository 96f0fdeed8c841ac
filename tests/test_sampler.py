"""The batched sampler against references: HF's logits warpers in float64 for the distribution each row
draws from, a plain per-row loop for the penalties, HF `generate` and HF logits for whole requests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from compiled_llm import SamplingParams
from compiled_llm.engine.sampler import apply_penalties
from compiled_llm.sampling import SamplingTensors, sample
from tests.test_llm import hf_greedy, llm, prompts  # noqa: F401  (the module-scoped LLM fixture)

# (temperature, top_k, top_p, min_p) per row; one batch holds them all.
ROWS = [(0.0, None, 1.0, 0.0), (0.7, 4, 1.0, 0.0), (1.3, None, 0.7, 0.0), (1.0, 6, 0.6, 0.0),
        (1.0, None, 1.0, 0.15), (0.5, 8, 0.9, 0.05)]  # fmt: skip
VOCAB = 12
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def reference_probs(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """What HF's warpers, in float64, leave of one row's distribution."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )  # fmt: skip

    scores = logits.double()[None]
    if temperature == 0:
        return torch.nn.functional.one_hot(scores.argmax(), VOCAB).double()
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores.softmax(-1)[0]


def rows(params) -> list[SimpleNamespace]:
    return [SimpleNamespace(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in params]


@pytest.mark.parametrize("device", DEVICES)
def test_each_row_draws_from_its_own_warped_distribution(device):
    logits = torch.randn(len(ROWS), VOCAB, device=device) * 2  # fresh each run; continuous: no ties at a cut-off
    draws = 4000
    batch = logits.repeat_interleave(draws, dim=0)  # row i's copies are rows i*draws ... (i+1)*draws-1
    params = SamplingTensors.build(rows([r for r in ROWS for _ in range(draws)]), batch.device, VOCAB)
    tokens = sample(batch, params).view(len(ROWS), draws)
    for i, row_params in enumerate(ROWS):
        expected = reference_probs(logits[i].cpu(), *row_params)
        assert (expected[tokens[i].cpu()] > 0).all(), f"row {i} drew a token the warpers drop"
        frequencies = torch.bincount(tokens[i].cpu(), minlength=VOCAB).double() / draws
        assert (frequencies - expected).abs().max() < 0.04, (i, frequencies, expected)  # ~5 sigma


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_do_not_depend_on_their_neighbours(device):
    logits = torch.randn(5, 40, device=device)

    def draw(order: list[int], seed_rows: dict[int, int]) -> dict[int, list[int]]:
        generators = [torch.Generator(device).manual_seed(seed_rows[i]) if i in seed_rows else None for i in order]
        params = SamplingTensors.build(rows([(0.9, None, 0.95, 0.0)] * len(order)), logits.device, 40, generators)
        steps = [sample(logits[order], params) for _ in range(6)]
        return {i: [int(s[pos]) for s in steps] for pos, i in enumerate(order) if i in seed_rows}

    alone = draw([2], {2: 7})
    together = draw([4, 0, 2, 1], {2: 7, 1: 3})
    assert together[2] == alone[2]
    assert draw([1, 3], {1: 3})[1] == together[1]


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_a_per_row_loop(device):
    vocab = 30
    logits = torch.randn(5, vocab, device=device) * 2
    original = logits.clone()
    specs = [  # (prompt, output, repetition, presence, frequency); rows 1 and 4 are not penalized
        ([1, 2, 3], [4, 4, 5], 1.5, 0.0, 0.0),
        ([6, 7], [8, 9], 1.0, 0.0, 0.0),
        ([7, 7], [7, 8, 8, 8], 1.0, 0.5, 0.3),
        ([9], [], 1.2, -0.4, 1.1),
        ([1, 2] * 50, [3], 1.0, 0.0, 0.0),
    ]
    requests = [
        SimpleNamespace(prompt_token_ids=p, output_token_ids=o,
                        params=SamplingParams(repetition_penalty=r, presence_penalty=pres, frequency_penalty=f))
        for p, o, r, pres, f in specs
    ]  # fmt: skip
    expected = logits.double().cpu()
    for row, (prompt, output, repetition, presence, frequency) in enumerate(specs):
        for token in set(prompt) | set(output):
            value = expected[row, token]
            expected[row, token] = value * repetition if value < 0 else value / repetition
        for token in set(output):
            expected[row, token] -= presence + frequency * output.count(token)
    torch.testing.assert_close(apply_penalties(logits, requests).double().cpu(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(logits, original)  # the caller's logits (kept for logprobs) are not modified
    everyone = [requests[i] for i in (0, 2, 3)]
    torch.testing.assert_close(apply_penalties(logits[[0, 2, 3]], everyone).double().cpu(), expected[[0, 2, 3]],
                               rtol=1e-6, atol=1e-6)  # fmt: skip


def test_greedy_repetition_penalty_gives_hf_tokens(llm):  # noqa: F811
    batch = prompts(4, seed=21, lengths=(4, 12))
    outputs = llm.generate(batch, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=1.6),
                           use_tqdm=False)  # fmt: skip
    for prompt, output in zip(batch, outputs):
        with torch.no_grad():
            out = llm.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=[],
                                     pad_token_id=0, repetition_penalty=1.6)  # fmt: skip
        assert output.outputs[0].token_ids == out[0, len(prompt) :].tolist()
    assert any(o.outputs[0].token_ids != hf_greedy(llm.model, p, 10) for p, o in zip(batch, outputs))  # it bites


def test_greedy_presence_and_frequency_penalties_follow_their_formula(llm):  # noqa: F811
    prompt = prompts(1, seed=22, lengths=(6, 6))[0]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, presence_penalty=1.5, frequency_penalty=0.7)
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    ids = list(prompt)
    for _ in range(10):
        with torch.no_grad():
            scores = llm.model(torch.tensor([ids])).logits[0, -1].double()
        output = ids[len(prompt) :]
        for token in set(output):
            scores[token] -= 1.5 + 0.7 * output.count(token)
        ids.append(int(scores.argmax()))
    assert got == ids[len(prompt) :]


def test_logprobs_are_the_models_log_softmax(llm):  # noqa: F811
    batch = prompts(3, seed=23, lengths=(5, 20))
    outputs = llm.generate(batch, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3),
                           use_tqdm=False)  # fmt: skip
    for prompt, output in zip(batch, outputs):
        completion = output.outputs[0]
        ids = prompt + completion.token_ids
        with torch.no_grad():
            logprobs = llm.model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        assert len(completion.logprobs) == len(completion.token_ids)
        for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            row = logprobs[len(prompt) - 1 + step]
            top = row.topk(3)
            assert set(entry) == set(top.indices.tolist()) and token == int(top.indices[0])  # greedy: the top one
            for candidate, value in entry.items():
                assert value == pytest.approx(float(row[candidate]), abs=1e-4)
    no_logprobs = llm.generate(batch[:1], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert no_logprobs[0].outputs[0].logprobs is None
