"""Drop-in acceleration of decoders written outside Hugging Face, as their codebases write them
(tests/drop_in_models/): compile_model(module) gives the module's own logits and greedy tokens, refuses
what it cannot run, and checks itself against the module before it returns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compiled_llm import compile_model
from compiled_llm.capture import CaptureError
from compiled_llm.capture.forward_signature import compute_dtype, forward_signature
from compiled_llm.verify import SelfCheckError, share_of_bound
from drop_in_models import gptfast, gptfast_greedy, meta_greedy, meta_llama, mingpt, naive_greedy, nanogpt
from fx_passes import DEFAULT_PIPELINE
from fx_passes.node_meta import insert_call
from fx_passes.registry import PassResult, register_pass


def assert_greedy_tokens(cm, prompts: list[list[int]], expected: list[list[int]]) -> None:
    """Each prompt alone, then all together left-padded: each row the tokens of that prompt alone."""
    new = len(expected[0])
    for prompt, tokens in zip(prompts, expected):
        assert cm.generate(torch.tensor([prompt]), max_new_tokens=new)[0, len(prompt) :].tolist() == tokens
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=new)
    assert [out[row, width:].tolist() for row in range(len(prompts))] == expected


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
    assert_greedy_tokens(cm, prompts, [naive_greedy(model, p, 32) for p in prompts])


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
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (5, 9)]
    assert_greedy_tokens(cm, prompts, [naive_greedy(model, p, 32) for p in prompts])


def test_gptfast_with_its_own_kv_cache_complex_pairs_rope_and_gqa():
    model = gptfast()
    prompt = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (6, 11)]
    with torch.no_grad():  # the module's own answers, before compile_model releases its cache
        logits = model(prompt, torch.arange(20))
    expected = [naive_greedy(model, prompt, 32) for prompt in prompts]
    assert [gptfast_greedy(model, prompt, 32) for prompt in prompts] == expected  # its own cached loop agrees
    # The paged cache replaces the module's: its buffers are released, from the device it was on.
    cache = model.layers[0].attention.kv_cache
    cm = compile_model(model, max_batch_size=4)
    assert cache.k_cache.numel() == cache.v_cache.numel() == 0 and "module's own kv cache released (4 tensors" in str(cm.report)
    assert cm.report.pass_sites("module_kv_cache") == 2 and cm.max_seq_len == 64  # the rows of freqs_cis
    assert not any(n.op == "get_attr" and "kv_cache" in n.target for n in cm.graph_module.graph.nodes)
    assert (cm(prompt).logits - logits).abs().max() < 1e-4
    assert_greedy_tokens(cm, prompts, expected)
    with pytest.raises(ValueError, match=r"own KV cache \(layers.0.attention.kv_cache.k_cache, .*\) was released by an "
                       r"earlier compile_model.*model.max_seq_length = -1, then model.setup_caches"):  # fmt: skip
        compile_model(model)
    model.max_seq_length = -1
    model.setup_caches(max_batch_size=1, max_seq_length=64)  # set up again: compiles again
    assert compile_model(model, compile_backend="eager").generate(torch.tensor([prompts[0]]), max_new_tokens=8)[
        0, len(prompts[0]) :].tolist() == expected[0][:8]  # fmt: skip


def test_meta_reference_llama_start_pos_complex_rope_sliced_cache_and_repeat_kv():
    model = meta_llama(max_batch_size=1)  # its cache's batch slice [:1] is then elided from the graph
    prompt = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(10))
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 96, (n,), generator=generator).tolist() for n in (7, 3, 12)]
    logits = model(prompt, 0)
    expected = [naive_greedy(model, p, 32) for p in prompts]
    assert [meta_greedy(model, p, 32) for p in prompts] == expected  # its own cached loop agrees
    cm = compile_model(model, max_batch_size=4)
    # start_pos is captured as 0; the cache reads at [0:T] become the keys and values just written.
    assert cm.report.pass_sites("module_kv_cache") == 4 and cm.report.pass_sites("match_explicit_attention") == 2
    assert cm.report.pass_sites("runtime_positions") == 1 and cm.max_seq_len == 128  # freqs_cis: 2 x max_seq_len
    assert cm.report.pass_sites("complex_as_real_pairs") == 4  # its complex RoPE: q and k of 2 layers
    assert model.layers[1].attention.cache_v.numel() == 0 and "released (4 tensors" in str(cm.report)
    assert (cm(prompt).logits - logits).abs().max() < 1e-4
    assert_greedy_tokens(cm, prompts, expected)


def test_an_explicit_attention_mask_that_is_not_causal_is_refused():
    model = mingpt()
    for block in model.transformer.h:
        block.attn.bias.fill_(1.0)  # every token sees every other: bidirectional
    with pytest.raises(ValueError, match=r"attention at .*drop_in_models/mingpt.py.* att = F.softmax\(att, dim=-1\): its "
                       "mask is not the causal mask for 2 tokens"):  # fmt: skip
        compile_model(model, compile_backend="eager")


def test_the_self_check_refuses_a_rewrite_that_changes_the_answer():
    """Without runtime_positions nanoGPT's arange numbers the tokens of a step, not of each sequence."""
    passes = tuple(p for p in DEFAULT_PIPELINE if p != "runtime_positions")
    with pytest.raises(SelfCheckError, match=r"differs from the module itself .* first op that differs: aten.arange.start "
                       r"\(.*drop_in_models/nanogpt.py.* pos = torch.arange\(0, t.*\), over the tokens at positions 2..2"):  # fmt: skip
        compile_model(nanogpt(), passes=passes, compile_backend="eager")
    cm = compile_model(nanogpt(), passes=passes, compile_backend="eager", verify=False)  # at the user's risk
    assert "self-check" not in str(cm.report)


@register_pass("test_scale_second_mlp")
def _scale_second_mlp(gm, config, factor: float = 1.5):
    """A wrong rewrite inside one layer: the second block's c_fc output, times `factor`."""
    linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default
                  and n.args[1].target == "model.transformer.h.1.mlp.c_fc.weight")  # fmt: skip
    with gm.graph.inserting_after(linear):
        scaled = insert_call(gm.graph, torch.ops.aten.mul.Tensor, (linear, factor))
    linear.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    gm.recompile()
    return PassResult("test_scale_second_mlp", 1)


@register_pass("test_nudge_second_mlp")
def _nudge_second_mlp(gm, config):
    """A rewrite off by less than the check allows: the second block's c_fc output, times 1.0002."""
    return _scale_second_mlp(gm, config, 1.0002)


def test_the_report_says_how_close_the_self_check_came():
    """The largest difference as a share of what the check allows: a correct graph sits far inside its bound (float32
    on the CPU: summation order only), one nudged by less than the bound comes closer and still passes; the share is
    the largest of difference over allowance at any position."""
    shares = []
    for passes in (DEFAULT_PIPELINE, ("test_nudge_second_mlp", *DEFAULT_PIPELINE)):
        cm = compile_model(nanogpt(), passes=passes, compile_backend="eager", verify=True)
        shares.append(cm.report.self_check_share)
        assert f"largest difference {shares[-1]:.1%} of its bound" in str(cm.report)
    assert 0 < shares[0] < 0.01 and 10 * shares[0] < shares[1] < 1, shares
    expected = torch.tensor([[1.0, 5.0, -2.0], [0.5, -4.0, 2.0]])
    actual = expected + torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, -0.3]])
    # max |difference| against 0.1 x the largest |logit| (5): 0.1 / 0.5 and 0.3 / 0.5
    assert share_of_bound(actual, expected, 0.1) == pytest.approx(0.6)
    # RMS difference against 0.1 x each position's RMS logit
    rms = expected.pow(2).mean(-1).sqrt()
    shares = torch.tensor([0.1, 0.3]) / 3**0.5 / (0.1 * rms)
    assert share_of_bound(actual, expected, 0.1, rms_bound=0.1) == pytest.approx(shares.max().item())


def test_the_self_check_names_the_layer_where_a_rewrite_went_wrong():
    with pytest.raises(SelfCheckError, match=r"first op that differs: aten.gelu.default \(.*nanogpt.py.*self.gelu\(self.c_fc\(x\)\).*\) in "
                       r"transformer.h.1.mlp.gelu, over the tokens at positions 0..5"):  # fmt: skip
        compile_model(nanogpt(), passes=("test_scale_second_mlp", *DEFAULT_PIPELINE), compile_backend="eager")


def test_a_compiler_error_names_the_op_and_the_users_line():
    """gpt-fast's RoPE reshape with a -1 over the token count, without the pass that writes the size out."""
    passes = tuple(p for p in DEFAULT_PIPELINE if p != "explicit_view_sizes")
    with pytest.raises(CaptureError, match=r"TorchInductor could not compile the model's graph at aten.reshape.default "
                       r"\(.*drop_in_models/gptfast.py.*\) \(Could not guard on data-dependent expression .*\): its "
                       r"sizes depend on the step's token count .* compile_backend='eager'"):  # fmt: skip
        compile_model(gptfast(), passes=passes)


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


class ReadsPastItsWrite(nn.Module):
    """A cache of its own written at start_pos, as Meta's, but read one row further than the step wrote."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Embedding(32, 16), nn.Linear(16, 48), nn.Linear(16, 32)
        self.register_buffer("cache_k", torch.zeros(1, 64, 16))
        self.register_buffer("cache_v", torch.zeros(1, 64, 16))

    def forward(self, tokens, start_pos: int):
        x = self.embed(tokens)
        t = x.shape[1]
        q, k, v = self.qkv(x).split(16, dim=-1)
        self.cache_k[:, start_pos : start_pos + t] = k
        self.cache_v[:, start_pos : start_pos + t] = v
        keys, values = self.cache_k[:, : start_pos + t + 1], self.cache_v[:, : start_pos + t + 1]
        mask = torch.full((t, t + 1), float("-inf")).triu(1)
        return self.head(torch.softmax(q @ keys.transpose(1, 2) + mask, dim=-1) @ values)


class ChangesItsValuesAfterCaching(ReadsPastItsWrite):
    """Writes k to its cache, then scales k in place before reading the cache back."""

    def forward(self, tokens, start_pos: int):
        x = self.embed(tokens)
        t = x.shape[1]
        q, k, v = self.qkv(x).split(16, dim=-1)
        k = k.contiguous()
        self.cache_k[:, start_pos : start_pos + t] = k
        self.cache_v[:, start_pos : start_pos + t] = v
        k.mul_(0.5)
        keys, values = self.cache_k[:, : start_pos + t], self.cache_v[:, : start_pos + t]
        mask = torch.full((t, t), float("-inf")).triu(1)
        return self.head(torch.softmax(q @ keys.transpose(1, 2) + mask, dim=-1) @ values + k)


class SlidingWindow(nn.Module):
    """No position table; a mask built from arange that is causal up to 20 tokens, a window beyond."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Embedding(32, 16), nn.Linear(16, 48), nn.Linear(16, 32)

    def forward(self, tokens):
        x = self.embed(tokens)
        t = x.shape[1]
        q, k, v = (z.view(1, t, 2, 8).transpose(1, 2) for z in self.qkv(x).split(16, dim=-1))
        i = torch.arange(t)
        seen = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 20)
        att = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~seen, float("-inf"))
        return self.head((torch.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(1, t, 16))


def test_modules_the_runtime_cannot_run_are_refused_by_name():
    with pytest.raises(ValueError, match=r"k.mul_\(0.5\).*|changes in place"):
        compile_model(ChangesItsValuesAfterCaching(), compile_backend="eager")
    # Proven at max_seq_len, not only at a few short lengths where the window is not reached yet.
    with pytest.raises(ValueError, match=r"its mask is not the causal mask for 64 tokens"):
        compile_model(SlidingWindow(), compile_backend="eager", max_seq_len=64)
    with pytest.raises(ValueError, match=r"self.cache_k\[:, : start_pos \+ t \+ 1\].* reads the module's own cache "
                       r"\(model.cache_k\) beyond the rows this step wrote"):  # fmt: skip
        compile_model(ReadsPastItsWrite(), compile_backend="eager")
    with pytest.raises(ValueError, match="is_causal=False"):
        compile_model(Bidirectional(), compile_backend="eager")
    with pytest.raises(ValueError, match=r"the module's forward writes buffers \['state'\]: state kept between calls"):
        compile_model(Recurrent(), compile_backend="eager")


def test_forward_signatures_by_name_and_annotation():
    class Forward(nn.Module):
        def __init__(self, forward):
            super().__init__()
            self.forward = forward

    def gpt_fast(idx, input_pos=None): ...
    def meta(tokens, start_pos: int): ...
    def offset(tokens, pos: int = 0): ...
    def indices(tokens, pos=None): ...
    def nano(idx, targets=None): ...

    found = {f.__name__: forward_signature(Forward(f)) for f in (gpt_fast, meta, offset, indices, nano)}
    assert {name: (s.tokens, s.positions, s.positions_rank) for name, s in found.items()} == {
        "gpt_fast": ("idx", "input_pos", 1), "meta": ("tokens", "start_pos", 0), "offset": ("tokens", "pos", 0),
        "indices": ("tokens", "pos", 1), "nano": ("idx", None, 2),
    }  # fmt: skip

    def needs_a_mask(tokens, mask): ...

    with pytest.raises(ValueError, match=r"requires \['mask'\] besides the token ids \('tokens'\); a decoder is called "
                       r"with token ids \[batch, seq\] and, optionally, positions \(position_ids, input_pos, start_pos, "
                       r"pos\)"):  # fmt: skip
        forward_signature(Forward(needs_a_mask))


def test_the_compute_dtype_is_the_one_most_weights_hold():
    # A float32 embedding (or norms) beside bfloat16 linears computes in bfloat16, whichever parameter comes first.
    model = nn.Sequential(nn.Embedding(64, 8), nn.Linear(8, 32), nn.Linear(32, 8))
    model[1].to(torch.bfloat16), model[2].to(torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32 and compute_dtype(model) == torch.bfloat16
    model[0].to(torch.float16)
    model.extend([nn.Linear(8, 256).double()])
    assert compute_dtype(model) == torch.float64
    assert compute_dtype(nn.Sequential()) == torch.get_default_dtype()
    # float8 weights (a checkpoint's) compute in the dtype of the rest
    fp8 = nn.Sequential(nn.Embedding(64, 8).to(torch.bfloat16), nn.Linear(8, 4096))
    fp8[1].weight.data = fp8[1].weight.data.to(torch.float8_e4m3fn)
    assert compute_dtype(fp8) == torch.float32  # the bias (float32) and the embedding (bfloat16): 4,096 against 512
