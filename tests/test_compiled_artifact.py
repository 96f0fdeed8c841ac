"""compiled_artifact.py: Inductor's compiled graph stored as an AOT-compiled function and loaded by a later compile
(no Dynamo), weights staying inputs, a corrupt file replaced, the key telling apart what the dropped guards would."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import random_prompt, tiny_model

from compiled_llm import compile_model, compiled_artifact

pytestmark = pytest.mark.skipif(
    not hasattr(torch.compiler, "load_compiled_function"), reason="this torch cannot load an AOT-compiled function"
)

FIELDS = {"max_batch_size": 2}


def compile_line(compiled) -> str:
    return next(line for line in str(compiled.report).splitlines() if line.startswith("  compile"))


def generates_as_hf(compiled, model, seed: int = 1) -> torch.Tensor:
    """Batch 2: a prefill, then several decode steps; the tokens are HF's greedy ones."""
    prompt = random_prompt(9, batch=2, seed=seed)
    tokens = compiled.generate(prompt, max_new_tokens=6)
    assert torch.equal(tokens, model.generate(prompt, max_new_tokens=6, do_sample=False))
    return tokens


def test_a_second_compile_loads_the_stored_graph_and_weights_stay_inputs(own_cache_dir):
    model = tiny_model("llama")
    first = compile_model(model, cache_dir=own_cache_dir, **FIELDS)
    assert first.runner.graph.source == "compiled"
    assert "(compiled graph stored)" in compile_line(first)
    (stored,) = (own_cache_dir / "compiled").iterdir()

    second = compile_model(model, cache_dir=own_cache_dir, **FIELDS)
    assert second.runner.graph.source == "stored artifact"
    assert "(stored compiled graph, no Dynamo)" in compile_line(second)
    assert "self_check_s" in second.report.timings  # code from a file is always self-checked
    assert torch.equal(generates_as_hf(second, model), generates_as_hf(first, model))

    # Same config, other weights: the same file, and the model's own outputs (nothing of the weights in it).
    other = tiny_model("llama", seed=3)
    third = compile_model(other, cache_dir=own_cache_dir, **FIELDS)
    assert third.runner.graph.source == "stored artifact"
    assert [p.name for p in (own_cache_dir / "compiled").iterdir()] == [stored.name]
    assert not torch.equal(generates_as_hf(third, other), generates_as_hf(first, model))


def test_a_corrupt_file_is_replaced_with_a_warning(own_cache_dir, caplog):
    model = tiny_model("qwen3")
    compile_model(model, cache_dir=own_cache_dir, **FIELDS)
    (path,) = (own_cache_dir / "compiled").iterdir()
    path.write_bytes(b"not a compiled function")

    with caplog.at_level(logging.WARNING, logger="compiled_llm"):
        compiled = compile_model(model, cache_dir=own_cache_dir, **FIELDS)
    assert "could not be loaded" in caplog.text
    assert compiled.runner.graph.source == "compiled"
    assert path.read_bytes() != b"not a compiled function"  # stored afresh under the same key
    generates_as_hf(compiled, model)
    assert compiled_artifact.load(path) is not None


def test_graph_cache_off_stores_nothing(own_cache_dir):
    compiled = compile_model(tiny_model("llama"), cache_dir=own_cache_dir, graph_cache=False, **FIELDS)
    assert compiled.runner.graph.source is None
    assert not (own_cache_dir / "compiled").exists()


def test_every_part_of_the_key_changes_it():
    """Graphs from the eager backend (no compile): the key reads the graph, not what Inductor made of it."""

    def graph(arch="llama", seed=0, **fields):
        return compile_model(tiny_model(arch, seed), compile_backend="eager", graph_cache=False, verify=False,
                             **{**FIELDS, **fields}).graph_module  # fmt: skip

    gm = graph()
    key = compiled_artifact.artifact_key(gm, {}, "cpu")
    assert compiled_artifact.artifact_key(graph(seed=4), {}, "cpu") == key  # weights are not in it
    assert compiled_artifact.artifact_key(gm, {"max_autotune": True}, "cpu") != key
    assert compiled_artifact.artifact_key(graph(arch="qwen3"), {}, "cpu") != key
    kv_cache = torch.zeros(4, 16, 2, 16)
    assert compiled_artifact.artifact_key(gm, {}, "cpu", [("kv_cache_0", kv_cache, (0,))]) != key
    fp16_cache = kv_cache.half()  # a static dim or the dtype of an input changes it, its dynamic dims do not
    assert compiled_artifact.artifact_key(gm, {}, "cpu", [("kv_cache_0", fp16_cache, (0,))]) != (
        compiled_artifact.artifact_key(gm, {}, "cpu", [("kv_cache_0", kv_cache, (0,))])
    )
    assert compiled_artifact.artifact_key(gm, {}, "cpu", [("kv_cache_0", torch.zeros(9, 16, 2, 16), (0,))]) == (
        compiled_artifact.artifact_key(gm, {}, "cpu", [("kv_cache_0", kv_cache, (0,))])
    )


def test_a_step_whose_static_sizes_or_dtypes_differ_from_the_compiled_ones_is_refused(own_cache_dir):
    """The stored function runs without Dynamo's guards: an input dtype, rank or size it was compiled for as a
    constant must not reach it (Dynamo would have recompiled)."""
    graph = compile_model(tiny_model("llama"), cache_dir=own_cache_dir, **FIELDS).runner.graph
    assert graph.source is not None
    sizes = {name: (shape, dtype) for name, shape, dtype in graph._static_sizes}

    def step(changed: str | None = None, dtype=None, extra_dim: bool = False) -> list[torch.Tensor]:
        """Any size where it is dynamic (the KV cache is not checked)."""
        args = []
        for name in graph.input_names:
            shape, wanted = sizes.get(name, ((1,), torch.float32))
            shape = [3 if n is None else n for n in shape] + ([2] if extra_dim and name == changed else [])
            args.append(torch.zeros(shape, dtype=dtype if dtype is not None and name == changed else wanted))
        return args

    graph._check_static_sizes(step())
    with pytest.raises(RuntimeError, match="graph input 'position_ids' has sizes/dtype"):
        graph._check_static_sizes(step("position_ids", dtype=torch.int32))
    with pytest.raises(RuntimeError, match="graph input 'slot_mapping' has sizes/dtype"):
        graph._check_static_sizes(step("slot_mapping", extra_dim=True))
