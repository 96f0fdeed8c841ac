"""capture/graph_cache.py: a captured graph stored without weights, reused by a later compile of the same code and
config (no torch.export), never by a model its key does not describe."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import random_prompt, tiny_model

from compiled_llm import compile_model
from compiled_llm.capture import graph_cache
from compiled_llm.capture.graph_cache import graph_key, why_uncacheable

FIELDS = {"compile_backend": "eager", "max_batch_size": 4}
# Another CompileConfig over the same captured graph: it misses the rewritten graph the first compile stored
# (rewritten_graph.py) and loads the captured one, which is what these tests are about.
OTHER_FIELDS = {**FIELDS, "max_batch_size": 3}


def capture_line(compiled) -> str:
    return next(line for line in str(compiled.report).splitlines() if line.startswith("  capture"))


def test_a_second_compile_reads_the_graph_and_computes_with_its_own_weights(tmp_path):
    """The entry holds no weights: a model of the same config with other weights hits and generates what HF does
    with those weights."""
    first = compile_model(tiny_model("llama"), cache_dir=tmp_path, **FIELDS)
    assert "torch.export, flat tokens (stored in the graph cache)" in capture_line(first)
    (entry,) = (tmp_path / "graphs").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == [
        "constants.pt",
        "entry.json",
        "example_inputs.pt",
        "program.pkl",
        "rewritten",
    ]
    stored = b"".join(p.read_bytes() for p in entry.rglob("*") if p.is_file())
    for name, parameter in tiny_model("llama").named_parameters():  # no weight's bytes anywhere in the entry
        assert parameter.detach().numpy().tobytes()[:256] not in stored, name

    other = tiny_model("llama", seed=3)
    prompt = random_prompt(9, batch=2, seed=1)
    expected = other.generate(prompt, max_new_tokens=6, do_sample=False)
    second = compile_model(other, cache_dir=tmp_path, **OTHER_FIELDS)
    assert "from the graph cache (no torch.export)" in capture_line(second)
    assert torch.equal(second.generate(prompt, max_new_tokens=6), expected)
    assert not torch.equal(first.generate(prompt, max_new_tokens=6), expected)  # the weights differ
    parameter = other.model.layers[0].mlp.down_proj.weight
    assert any(p is parameter for p in second.graph_module.parameters())  # shared, not copied


def test_every_part_of_the_key_changes_it():
    model = tiny_model("llama")
    key = graph_key(model, 8192)
    assert graph_key(tiny_model("llama", seed=5), 8192) == key  # weights are not in it
    assert graph_key(model, 4096) != key
    model.config.rope_theta = 1234.0
    assert graph_key(model, 8192) != key
    assert graph_key(tiny_model("llama").to(torch.bfloat16), 8192) != key
    assert graph_key(tiny_model("qwen3"), 8192) != key


def test_a_patched_function_of_the_models_code_changes_the_key(monkeypatch):
    from transformers.models.llama import modeling_llama

    model = tiny_model("llama")
    key = graph_key(model, 8192)
    monkeypatch.setattr(modeling_llama, "rotate_half", lambda x: -x)
    assert graph_key(model, 8192) != key
    monkeypatch.undo()
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: x)
    assert graph_key(model, 8192) != key
    monkeypatch.undo()
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "causal_mask_function", lambda *args: True)  # transformers' own, not the model's
    assert graph_key(model, 8192) != key
    monkeypatch.undo()
    assert graph_key(model, 8192) == key


def test_models_the_key_cannot_describe_are_not_cached(tmp_path):
    model = tiny_model("llama")
    assert why_uncacheable(model) is None
    model.model.layers[0].mlp.forward = lambda x: x
    assert why_uncacheable(model) == "the forward of model.layers.0.mlp is replaced on the instance"
    hooked = tiny_model("llama")
    hooked.model.norm.register_forward_hook(lambda module, args, out: out * 2)
    assert why_uncacheable(hooked) == "model.norm has forward hooks"
    assert why_uncacheable(torch.nn.Linear(2, 2)) == "not a Hugging Face model: no config says what its code computes"
    compiled = compile_model(hooked, cache_dir=tmp_path, **FIELDS)
    assert "(no graph cache: model.norm has forward hooks)" in capture_line(compiled)
    assert not (tmp_path / "graphs").exists()


def test_a_corrupt_entry_is_ignored_with_a_warning_and_the_model_captured_again(tmp_path, caplog):
    model = tiny_model("llama")
    compile_model(model, cache_dir=tmp_path, **FIELDS)
    (entry,) = (tmp_path / "graphs").iterdir()
    (entry / "program.pkl").write_bytes(b"not a pickle")
    prompt = random_prompt(7, seed=2)
    with caplog.at_level(logging.WARNING, logger="compiled_llm.capture"):
        again = compile_model(model, cache_dir=tmp_path, **OTHER_FIELDS)
    assert "cannot be used" in caplog.text and "capturing the model again" in caplog.text
    assert capture_line(again).endswith("torch.export, flat tokens (stored in the graph cache)")  # replaced
    assert torch.equal(
        again.generate(prompt, max_new_tokens=4), model.generate(prompt, max_new_tokens=4, do_sample=False)
    )
    assert "from the graph cache" in capture_line(compile_model(model, cache_dir=tmp_path, **OTHER_FIELDS))


def test_graph_cache_off_stores_nothing(tmp_path):
    compile_model(tiny_model("llama"), cache_dir=tmp_path, graph_cache=False, **FIELDS)
    assert not (tmp_path / "graphs").exists()


@pytest.mark.parametrize("arch", ["gemma2", "qwen3_moe"])
def test_other_architectures_round_trip(arch, tmp_path):
    """Soft-capping and sliding windows (Gemma 2), routed experts (Qwen3-MoE): the loaded graph computes what HF
    does, captured (another config) or rewritten (the same config)."""
    model = tiny_model(arch)
    compile_model(model, cache_dir=tmp_path, **FIELDS)
    prompt = random_prompt(11, seed=4)
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False)
    for fields, source in ((OTHER_FIELDS, "from the graph cache (no torch.export)"), (FIELDS, "rewritten graph")):
        loaded = compile_model(model, cache_dir=tmp_path, **fields)
        assert source in capture_line(loaded)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=5), expected)
    assert graph_cache.FORMAT == 2


def test_what_modules_hold_beside_tensors_is_in_the_key():
    """Values set at __init__ or after (an attention scaling, PEFT's adapter scalings) are baked into the graph;
    a value the key cannot describe makes the model uncached, not keyed without it."""
    model = tiny_model("llama")
    key = graph_key(model, 8192)
    model.model.layers[0].self_attn.scaling = 0.05
    assert graph_key(model, 8192) != key
    model.model.layers[0].self_attn.scaling = tiny_model("llama").model.layers[0].self_attn.scaling
    assert graph_key(model, 8192) == key
    model.model.layers[1].mlp.note = object()
    with pytest.raises(graph_cache.UndescribedValue, match="model.layers.1.mlp.note is a object"):
        graph_key(model, 8192)


def test_tied_weights_and_config_settings_outside_its_json_are_in_the_key():
    model = tiny_model("gemma2")  # ties its LM head to the embedding
    key = graph_key(model, 8192)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert graph_key(model, 8192) != key  # the tied graph reads one of the two names for both
    llama = tiny_model("llama")
    key = graph_key(llama, 8192)
    llama.config._attn_implementation_internal = "eager"
    assert graph_key(llama, 8192) != key


def test_a_decorated_function_is_keyed_by_the_body_it_wraps(monkeypatch):
    import functools

    from transformers.models.llama import modeling_llama

    model = tiny_model("llama")
    key = graph_key(model, 8192)
    original = modeling_llama.LlamaMLP.forward

    def decorate(body):
        @functools.wraps(body)
        def wrapper(*args, **kwargs):
            return body(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", decorate(original))
    same_body = graph_key(model, 8192)
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", decorate(lambda self, x: original(self, x) * 2))
    assert graph_key(model, 8192) != same_body != key


def test_buffers_and_their_aliases_are_bound_from_the_live_model(tmp_path):
    """A buffer reachable under two names (a module used twice) and changed in place: the loaded graph reads the
    live values under both names, never the stored ones."""

    def aliased(scale: float):
        model = tiny_model("llama")
        model.model.layers[0].self_attn.rotary = model.model.rotary_emb  # a second name for its buffers
        model.model.rotary_emb.inv_freq.mul_(scale)
        return model

    compile_model(aliased(1.0), cache_dir=tmp_path, **FIELDS)
    changed = aliased(0.25)
    prompt = random_prompt(12, seed=6)
    expected = changed.generate(prompt, max_new_tokens=5, do_sample=False)
    for fields, source in ((OTHER_FIELDS, "from the graph cache (no torch.export)"), (FIELDS, "rewritten graph")):
        loaded = compile_model(changed, cache_dir=tmp_path, **fields)
        assert source in capture_line(loaded)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=5), expected)


@pytest.mark.parametrize("loaded", ["captured", "rewritten"])
def test_a_graph_from_the_cache_is_self_checked_and_a_wrong_one_removed(loaded, tmp_path, monkeypatch):
    """Whatever the key misses, a cached graph (captured, or rewritten: rewritten_graph.py) that computes something
    else than the model fails the self-check (a loud error naming the entry), and the entry, rewritten graphs
    included, is gone for the next compile."""
    from compiled_llm.capture import export
    from compiled_llm.verify import SelfCheckError

    model = tiny_model("llama")
    compile_model(model, cache_dir=tmp_path, **FIELDS)
    (entry,) = (tmp_path / "graphs").iterdir()
    # A key that misses the change below: the captured graph's (export), or the rewritten graph's (graph_cache).
    monkeypatch.setattr(export if loaded == "captured" else graph_cache, "graph_key", lambda m, n: entry.name)
    changed = tiny_model("llama")
    for layer in changed.model.layers:
        layer.self_attn.scaling *= 4
    with pytest.raises(SelfCheckError, match=f"graph cache \\(entry {entry.name}, now removed\\)"):
        compile_model(changed, cache_dir=tmp_path, **FIELDS)
    assert not entry.exists()


def test_an_fp8_kv_cache_compile_does_not_read_the_cache(tmp_path):
    """Every graph loaded from the cache is self-checked, and the check cannot hold an fp8 KV cache's rounding:
    such a compile captures afresh (its graph is the same, so it still stores it)."""
    compile_model(tiny_model("llama"), cache_dir=tmp_path, **FIELDS)
    fp8_cache = compile_model(tiny_model("llama"), cache_dir=tmp_path, kv_cache_dtype="fp8", **FIELDS)
    assert "(graph cache not read: the self-check cannot hold an fp8 KV cache)" in capture_line(fp8_cache)
