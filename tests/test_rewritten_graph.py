"""capture/rewritten_graph.py: the graph as the passes left it, stored without weights, loaded by a later compile of
the same model code and CompileConfig (no torch.export, no passes), its weight-derived tensors rebuilt from the
new model's own weights."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import random_prompt, tiny_model

from compiled_llm import compile_model, compiled_artifact

FIELDS = {"compile_backend": "eager", "max_batch_size": 4}
REWRITTEN = "rewritten graph from the graph cache (no torch.export, no passes)"


def capture_line(compiled) -> str:
    return next(line for line in str(compiled.report).splitlines() if line.startswith("  capture"))


def entries(cache_dir) -> list:
    return sorted((cache_dir / "graphs").glob("*/rewritten/*.pkl"))


@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_a_second_compile_loads_the_rewritten_graph_over_its_own_weights(tmp_path, quantization):
    """Other weights, same code and config: the rewritten graph is loaded, its fused (and quantized) weights are
    rebuilt from the new model's, and it generates exactly what a compile without any cache does."""
    fields = {**FIELDS, "quantization": quantization}
    first = compile_model(tiny_model("llama"), cache_dir=tmp_path, **fields)
    assert REWRITTEN not in capture_line(first)
    (entry,) = entries(tmp_path)
    stored = entry.read_bytes()
    for name, parameter in tiny_model("llama").named_parameters():  # no weight's bytes in the entry
        assert parameter.detach().numpy().tobytes()[:256] not in stored, name

    other = tiny_model("llama", seed=3)
    fresh = compile_model(tiny_model("llama", seed=3), graph_cache=False, **fields)
    second = compile_model(other, cache_dir=tmp_path, **fields)
    assert capture_line(second).endswith(REWRITTEN)
    assert "passes" in str(second.report)  # the passes' results, as they were
    assert [(r.name, r.sites) for r in second.report.passes] == [(r.name, r.sites) for r in fresh.report.passes]
    assert second.graph_module.code == fresh.graph_module.code
    prompt = random_prompt(9, batch=2, seed=1)
    assert torch.equal(second.generate(prompt, max_new_tokens=6), fresh.generate(prompt, max_new_tokens=6))
    if quantization == "none":
        expected = other.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(second.generate(prompt, max_new_tokens=6), expected)
        down = other.model.layers[0].mlp.down_proj.weight
        assert any(p is down for p in second.graph_module.parameters())  # shared, not copied
    fused = dict(second.graph_module.named_parameters())["fused_linear_0_weight"]
    q = other.model.layers[0].self_attn.q_proj.weight  # the model's q/k/v view the fused weight, as after the passes
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def test_the_loaded_graph_keys_the_same_compiled_code():
    """The stored compiled graph (compiled_artifact.py) is keyed by the graph's code and the tensors it reads: the
    rewritten graph loaded in another compile must give the same key, or every warm start would compile again."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache_dir:
        first = compile_model(tiny_model("qwen3"), cache_dir=cache_dir, **FIELDS)
        second = compile_model(tiny_model("qwen3", seed=4), cache_dir=cache_dir, **FIELDS)
    assert capture_line(second).endswith(REWRITTEN)
    key = compiled_artifact.artifact_key
    assert key(second.graph_module, {}, "cpu") == key(first.graph_module, {}, "cpu")


def test_a_changed_config_or_pass_code_misses(tmp_path, monkeypatch):
    model = tiny_model("llama")
    compile_model(model, cache_dir=tmp_path, **FIELDS)
    for changed in ({"max_batch_size": 3}, {"quantization": "fp8"}, {"passes": ["insert_paged_attention"]}):
        assert REWRITTEN not in capture_line(compile_model(model, cache_dir=tmp_path, **{**FIELDS, **changed}))
    assert capture_line(compile_model(model, cache_dir=tmp_path, **FIELDS)).endswith(REWRITTEN)
    monkeypatch.setattr(compiled_artifact, "code_digest", lambda: "other passes")
    assert REWRITTEN not in capture_line(compile_model(model, cache_dir=tmp_path, **FIELDS))


def test_a_corrupt_entry_is_ignored_with_a_warning_and_replaced(tmp_path, caplog):
    model = tiny_model("llama")
    compile_model(model, cache_dir=tmp_path, **FIELDS)
    (entry,) = entries(tmp_path)
    entry.write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING, logger="compiled_llm.capture"):
        again = compile_model(model, cache_dir=tmp_path, **FIELDS)
    assert "cannot be used" in caplog.text and "running the passes" in caplog.text
    assert "from the graph cache (no torch.export)" in capture_line(again)
    prompt = random_prompt(7, seed=2)
    expected = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(again.generate(prompt, max_new_tokens=4), expected)
    loaded = compile_model(model, cache_dir=tmp_path, **FIELDS)  # stored anew
    assert capture_line(loaded).endswith(REWRITTEN)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=4), expected)


@pytest.mark.parametrize("where", ["attribute", "metadata"])
def test_a_graph_holding_a_tensor_of_unknown_origin_is_not_stored(where, tmp_path, monkeypatch, caplog):
    """A tensor a pass made without a recipe, or one kept in the graph's metadata, could be derived from the weights:
    such a graph is never stored (only the constants tracing made are stored as tensors)."""
    from fx_passes import registry

    cleanup = registry._PASSES["graph_cleanup"]

    def cleanup_and_keep_a_tensor(gm, config):
        weight = gm.get_parameter("model.model.norm.weight")
        if where == "attribute":
            gm.register_buffer("scaled_weight", weight * 2)
        else:
            gm.meta["norm_weight"] = weight
        return cleanup(gm, config)

    monkeypatch.setitem(registry._PASSES, "graph_cleanup", cleanup_and_keep_a_tensor)
    with caplog.at_level(logging.INFO, logger="compiled_llm.capture"):
        compile_model(tiny_model("llama"), cache_dir=tmp_path, **FIELDS)
    why = {"attribute": "attribute scaled_weight is neither the model's", "metadata": "its metadata or arguments hold a"}
    assert f"rewritten graph not stored: {why[where]}" in caplog.text
    assert entries(tmp_path) == []
    assert (tmp_path / "graphs").is_dir()  # the captured graph is stored as before


def test_nothing_is_read_without_the_graph_cache_or_with_an_fp8_kv_cache(tmp_path):
    """The self-check that guards a loaded graph cannot hold an fp8 KV cache's rounding."""
    compile_model(tiny_model("llama"), cache_dir=tmp_path, graph_cache=False, **FIELDS)
    assert not (tmp_path / "graphs").exists()
    fields = {**FIELDS, "kv_cache_dtype": "fp8"}
    compile_model(tiny_model("llama"), cache_dir=tmp_path, **fields)
    again = compile_model(tiny_model("llama"), cache_dir=tmp_path, **fields)
    assert "graph cache not read" in capture_line(again)
    assert entries(tmp_path) == []


def test_recipes_record_what_they_made_and_only_registered_ones_run(monkeypatch):
    from fx_passes import derived_weights

    monkeypatch.setattr(derived_weights, "_RECIPES", dict(derived_weights._RECIPES))  # this test's recipe goes with it
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    gm.register_parameter("w", torch.nn.Parameter(torch.ones(2, 3), requires_grad=False))

    def doubled(gm, source, name):
        gm.register_buffer(name, gm.get_parameter(source) * 2)

    with pytest.raises(ValueError, match="not a registered recipe"):
        derived_weights.derive(gm, doubled, "w", "w2")
    recipe = derived_weights.recipe(doubled)
    derived_weights.derive(gm, recipe, "w", "w2")
    assert derived_weights.derived_names(gm) == {"w2"}
    other = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    other.register_parameter("w", torch.nn.Parameter(torch.full((2, 3), 5.0), requires_grad=False))
    derived_weights.rebuild(other, gm.meta["derived_weights"])
    assert torch.equal(other.w2, torch.full((2, 3), 10.0))  # from the other module's own weight
    assert other.meta["derived_weights"] == gm.meta["derived_weights"]


def test_a_loaded_graph_that_fails_later_takes_its_entry_with_it(tmp_path, monkeypatch):
    """Whatever fails after a load (compiling, capturing, the self-check) removes the entry, so the next compile runs
    the passes instead of failing the same way."""
    from compiled_llm import compiled_model

    model = tiny_model("llama")
    compile_model(model, cache_dir=tmp_path, **FIELDS)
    (entry,) = entries(tmp_path)

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    with monkeypatch.context() as patch:
        patch.setattr(compiled_model, "select_kernels", fails)
        with pytest.raises(RuntimeError, match="out of memory, say"):
            compile_model(model, cache_dir=tmp_path, **FIELDS)
    assert not entry.exists()
    again = compile_model(model, cache_dir=tmp_path, **FIELDS)
    assert REWRITTEN not in capture_line(again) and entry.exists()  # the passes ran, and stored it anew


def test_the_key_covers_an_fp8_checkpoints_tensors_and_the_passes_code(monkeypatch):
    """Which parameters carry an FP8 checkpoint's tensors decides what fuses; a pass swapped outside fx_passes'
    files changes what the graph becomes."""
    from compiled_llm.capture import rewritten_graph
    from compiled_llm.config import CompileConfig
    from fx_passes import registry

    model, config, cpu = tiny_model("llama"), CompileConfig(), torch.device("cpu")
    key = rewritten_graph.rewrite_key("graph", config, 64, cpu, model)
    assert rewritten_graph.rewrite_key("graph", config, 64, cpu, model) == key
    weight = model.model.layers[0].self_attn.q_proj.weight
    weight.fp8_weight, weight.fp8_scale = weight.detach().to(torch.float8_e4m3fn), torch.ones(weight.shape[0], 1)
    assert rewritten_graph.rewrite_key("graph", config, 64, cpu, model) != key
    del weight.fp8_weight, weight.fp8_scale
    monkeypatch.setitem(registry._PASSES, "graph_cleanup", lambda gm, config: registry.PassResult("x", 0))
    assert rewritten_graph.rewrite_key("graph", config, 64, cpu, model) != key
