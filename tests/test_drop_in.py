"""Drop-in acceleration of decoders written outside Hugging Face, as their codebases write them
(tests/drop_in_models.py): compile_model(module) gives the module's own logits and greedy tokens, refuses
what it cannot run, and checks itself against the module before it returns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compiled_llm import compile_model
from compiled_llm.verify import SelfCheckError
from drop_in_models import gptfast, gptfast_greedy, mingpt, nanogpt, naive_greedy
from fx_passes import DEFAULT_PIPELINE


@pytest.fixture(scope="module")
def nano():
    model = nanogpt()
    return model, compile_model(model, max_batch_size=4)


def test_nanogpt_logits_are_the_modules_at_every_position(nano):
    model, cm = nano
    assert "self-check" in str(cm.report) and cm.report.pass_sites("runtime_positions") == 1
    assert cm.report.pass_sites("select_logits_rows") == 1
    prompt = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(3))
    ours = cm(prompt).logits[0]
    with torch.no_grad():  # the module computes its last position only: one forward per prefix
        expected = torch.cat([model(prompt[:, :end])[0][0] for end in range(1, 21)])
    assert (ours - expected).abs().max() < 1e-4


def test_nanogpt_greedy_tokens_are_the_naive_loops(nano):
    model, cm = nano
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (7, 3, 12)]
    expected = [naive_greedy(model, p, 32) for p in prompts]
    for prompt, tokens in zip(prompts, expected):  # one at a time
        assert cm.generate(torch.tensor([prompt]), max_new_tokens=32)[0, len(prompt) :].tolist() == tokens
    # Together, left-padded: each row as that prompt alone.
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=32)
    assert [out[row, width:].tolist() for row in range(len(prompts))] == expected


def test_positions_past_the_learned_table_are_refused(nano):
    model, cm = nano
    assert cm.max_seq_len == 64  # the rows of wpe
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        cm.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(ValueError, match="max_seq_len=65 exceeds the 64 rows of the model's position table"):
        compile_model(model, max_seq_len=65, compile_backend="eager")


def test_mingpt_explicit_softmax_attention_with_a_tril_buffer():
    model = mingpt()
    cm = compile_model(model, max_batch_size=4)
    assert cm.report.pass_sites("match_explicit_attention") == 2 and cm.max_seq_len == 64
    prompt = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (cm(prompt).logits - model(prompt)[0]).abs().max() < 1e-4
    generator = torch.Generator().manual_seed(6)
    for n in (5, 9):
        prompt = torch.randint(0, 96, (n,), generator=generator).tolist()
        assert cm.generate(torch.tensor([prompt]), max_new_tokens=32)[0, n:].tolist() == naive_greedy(model, prompt, 32)


def test_gptfast_with_its_own_kv_cache_complex_pairs_rope_and_gqa():
    model = gptfast()
    cm = compile_model(model, max_batch_size=4)
    assert cm.report.pass_sites("module_kv_cache") == 2 and cm.max_seq_len == 64  # the rows of freqs_cis
    assert not any(n.op == "get_attr" and "kv_cache" in n.target for n in cm.graph_module.graph.nodes)
    prompt = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (cm(prompt).logits - model(prompt, torch.arange(20))).abs().max() < 1e-4
    generator = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (6, 11)]
    for prompt in prompts:
        expected = naive_greedy(model, prompt, 24)
        assert gptfast_greedy(model, prompt, 24) == expected  # its own cached loop agrees
        assert cm.generate(torch.tensor([prompt]), max_new_tokens=24)[0, len(prompt) :].tolist() == expected


def test_an_explicit_attention_mask_that_is_not_causal_is_refused():
    model = mingpt()
    for block in model.transformer.h:
        block.attn.bias.fill_(1.0)  # every token sees every other: bidirectional
    with pytest.raises(ValueError, match=r"attention at .*drop_in_models.py.* att = F.softmax\(att, dim=-1\): its "
                       "mask is not the causal mask for 2 tokens"):  # fmt: skip
        compile_model(model, compile_backend="eager")


def test_the_self_check_refuses_a_rewrite_that_changes_the_answer():
    """Without runtime_positions nanoGPT's arange numbers the tokens of a step, not of each sequence."""
    passes = tuple(p for p in DEFAULT_PIPELINE if p != "runtime_positions")
    with pytest.raises(SelfCheckError, match=r"differs from the module itself .* aten.arange.start .*drop_in_models"
                       r".* pos = torch.arange\(0, t"):  # fmt: skip
        compile_model(nanogpt(), passes=passes, compile_backend="eager")
    cm = compile_model(nanogpt(), passes=passes, compile_backend="eager", verify=False)  # at the user's risk
    assert "self-check" not in str(cm.report)


class SlicedPositions(nn.Module):
    """Learned positions as a parameter sliced to the sequence length (the first minGPT's pos_emb[:, :t, :])."""

    def __init__(self, vocab=48, dim=16, block=32):
        super().__init__()
        self.wte, self.qkv, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, vocab)
        self.pos_emb = nn.Parameter(torch.randn(1, block, dim))

    def forward(self, idx):
        t = idx.size(1)
        x = self.wte(idx) + self.pos_emb[:, :t, :]
        q, k, v = (z.view(1, t, 2, 8).transpose(1, 2) for z in self.qkv(x).split(16, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + y.transpose(1, 2).reshape(1, t, 16))


def test_positions_from_a_sliced_table():
    torch.manual_seed(0)
    model = SlicedPositions().eval()
    cm = compile_model(model, max_batch_size=2)
    assert cm.report.pass_sites("runtime_positions") == 1 and cm.max_seq_len == 32
    prompt = torch.randint(0, 48, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (cm(prompt).logits - model(prompt)).abs().max() < 1e-4
    assert cm.generate(prompt, max_new_tokens=16)[0, 12:].tolist() == naive_greedy(model, prompt[0].tolist(), 16)


class Bidirectional(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Embedding(32, 16), nn.Linear(16, 48), nn.Linear(16, 32)

    def forward(self, tokens):
        x = self.embed(tokens)
        q, k, v = (t.view(*x.shape[:2], 2, 8).transpose(1, 2) for t in self.qkv(x).split(16, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v)  # no causal mask: every token sees the whole sequence
        return self.head(y.transpose(1, 2).reshape(x.shape))


class Recurrent(nn.Module):
    """Carries a state from one call to the next."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(32, 16), nn.Linear(16, 32)
        self.register_buffer("state", torch.zeros(16))

    def forward(self, tokens):
        x = self.embed(tokens) + self.state
        self.state.copy_(x[0, -1])
        return self.head(x)


def test_modules_the_runtime_cannot_run_are_refused_by_name():
    with pytest.raises(ValueError, match="is_causal=False"):
        compile_model(Bidirectional(), compile_backend="eager")
    with pytest.raises(ValueError, match=r"the module's forward writes buffers \['state'\]: state kept between calls"):
        compile_model(Recurrent(), compile_backend="eager")
