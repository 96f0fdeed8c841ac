"""Multi-head latent attention in its absorbed form (compiled_llm/capture/latent_attention.py): what it absorbs, what
it leaves expanded and why, against the module's own forward. The compiled tiny DeepSeek-V2/V3 models against eager
HF (logits, greedy generation, the one-plane cache) are in test_architectures.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compiled_llm.capture.attention_routing import route_attention_to_canonical_op
from compiled_llm.capture.latent_attention import latent_form, route_latent_attention
from conftest import random_prompt, relative_error, tiny_model


def _attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


def _routed(model) -> tuple[list[bool], dict[str, str]]:
    unrouted = {}
    with route_attention_to_canonical_op(model), route_latent_attention(model, unrouted):
        routed = [module.__dict__.get("expand_kv") is not None for module in _attention_modules(model)]
    return routed, unrouted


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_absorbed_layers_compute_what_their_own_forward_does(arch):
    """Within the routing, each layer (absorbed kv_b_proj, attention over the latents) against the same layer's
    transformers forward outside it (expanded keys and values, SDPA), on the model's hidden states."""
    model = tiny_model(arch)
    rotary = model.model.rotary_emb
    hidden = torch.randn(1, 9, model.config.hidden_size)
    position_embeddings = rotary(hidden, torch.arange(9)[None])
    with torch.no_grad():
        expected = [m(hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=None)[0]
                    for m in _attention_modules(model)]  # fmt: skip
        with route_attention_to_canonical_op(model), route_latent_attention(model):
            actual = [m(hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=None)[0]
                      for m in _attention_modules(model)]  # fmt: skip
            assert all("expand_kv" in m.__dict__ for m in _attention_modules(model))
    assert all("expand_kv" not in m.__dict__ for m in _attention_modules(model))  # restored after the block
    for a, e in zip(actual, expected):
        assert relative_error(a, e) < 1e-5


def test_latent_form_names_what_it_cannot_absorb():
    model = tiny_model("deepseek_v3")
    first, second, *_ = _attention_modules(model)
    assert latent_form(first)[0] is not None
    kv_b = first.kv_b_proj
    first.kv_b_proj = nn.Linear(kv_b.in_features, kv_b.out_features, bias=True)
    assert latent_form(first) == (None, "kv_b_proj has a bias")
    first.kv_b_proj = nn.Linear(kv_b.in_features, kv_b.out_features - 4, bias=False)
    assert "not [" in latent_form(first)[1]
    first.kv_b_proj = nn.Sequential(kv_b)
    assert latent_form(first)[1] == "kv_b_proj is a Sequential, not a torch.nn.Linear"
    second.kv_b_proj.weight.data = second.kv_b_proj.weight.data.to(torch.float8_e4m3fn)
    assert latent_form(second) == (None, "kv_b_proj's weight is torch.float8_e4m3fn")


def test_a_forward_the_absorbed_form_disagrees_with_is_left_expanded(monkeypatch):
    """A family whose expand_kv does more than split kv_b_proj (here: values scaled) fails the probe; its layers keep
    their own forward, and the reason is given."""
    model = tiny_model("deepseek_v3")
    cls = type(_attention_modules(model)[0])
    assert _routed(model) == ([True, True], {})
    own = cls.expand_kv

    def scaled_values(self, kv_nope, k_rot):
        keys, values = own(self, kv_nope, k_rot)
        return keys, 2 * values

    monkeypatch.setattr(cls, "expand_kv", scaled_values)
    routed, unrouted = _routed(model)
    assert routed == [False, False]
    assert "differ on a probe" in unrouted[cls.__name__]


def test_a_layer_left_expanded_still_matches_hf():
    """kv_b_proj with a bias (no family has one: it is what the absorption refuses) keeps the expanded keys and values,
    zero-padded to one width in a two-plane cache: still HF's logits and tokens."""
    from compiled_llm import compile_model

    model = tiny_model("deepseek_v2")
    for module in _attention_modules(model):
        kv_b = module.kv_b_proj
        module.kv_b_proj = nn.Linear(kv_b.in_features, kv_b.out_features, bias=True)
        with torch.no_grad():
            module.kv_b_proj.weight.copy_(kv_b.weight)
            module.kv_b_proj.bias.normal_()
    cm = compile_model(model, max_batch_size=2, max_seq_len=64)
    assert "2 layers' narrower keys or values zero-padded" in str(cm.report)
    assert all(t.shape[1] == 2 for t in cm.runner.kv_cache.tensors.values())
    ids = random_prompt(12, seed=3)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert relative_error(cm(ids).logits, expected) < 1e-4
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert torch.equal(cm.generate(ids, max_new_tokens=12, do_sample=False), hf)


def test_a_layer_whose_kv_b_proj_is_hooked_keeps_its_expanded_form():
    """The absorbed form reads kv_b_proj's weight, not its call: a layer with a forward hook there (which here changes
    its output) stays expanded, the others are absorbed, and the compiled model still gives HF's logits."""
    from compiled_llm import compile_model

    model = tiny_model("deepseek_v3")
    model.model.layers[1].self_attn.kv_b_proj.register_forward_hook(lambda module, args, out: out * 1.5)
    routed, unrouted = _routed(model)
    assert routed == [True, False] and "forward hooks" in unrouted["DeepseekV3Attention"]
    cm = compile_model(model, compile_backend="eager", max_batch_size=2, max_seq_len=32)
    assert [t.shape[1] for t in cm.runner.kv_cache.tensors.values()] == [1, 2]  # one plane for the absorbed layer
    ids = random_prompt(10, seed=7)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    assert relative_error(cm(ids).logits, expected) < 1e-4
