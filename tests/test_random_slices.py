"""Random weights made by slices (compiled_llm/random_slices.py): a tensor's values do not depend on how it is cut,
a model made so computes what the same model made whole does (FP8 presets' e4m3 linears included), and the 70B FP8
preset is made on meta, its e4m3 linears never whole in bf16."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, random_prompt, whole_random_model

from compiled_llm import compile_model, random_slices
from compiled_llm.cli import main
from compiled_llm.model_source import convert_model, load_model
from compiled_llm.presets import random_model
from compiled_llm.random_slices import RandomTensor, random_meta_model
from custom_ops.linear.fp8 import FP8


@pytest.mark.parametrize("kind, dtype", [("normal", torch.float32), ("e4m3", FP8), ("ones", torch.bfloat16)])
def test_a_slice_holds_the_values_of_the_whole_tensor_there(monkeypatch, kind, dtype):
    monkeypatch.setattr(random_slices, "CHUNK_ELEMENTS", 60)  # chunks of 3 rows of 20: slices cross them
    whole_2d = RandomTensor("a.weight", [37, 20], kind, dtype, torch.device("cpu"), 0.5)[()]
    assert whole_2d.shape == (37, 20) and whole_2d.dtype == dtype
    if kind != "ones":
        assert whole_2d.float().std() > 0.1 and not torch.equal(whole_2d[:3].float(), whole_2d[3:6].float())
    for rows, columns in [(slice(5, 30), slice(3, 11)), (slice(0, 1), slice(None)), (slice(36, 37), slice(19, 20))]:
        again = RandomTensor("a.weight", [37, 20], kind, dtype, torch.device("cpu"), 0.5)  # another rank's reader
        assert torch.equal(again[(rows, columns)].float(), whole_2d[rows, columns].float())
    experts = RandomTensor("experts", [4, 6, 10], kind, dtype, torch.device("cpu"), 0.5)
    assert torch.equal(experts[(slice(1, 3), slice(None), slice(5, 10))].float(), experts[()][1:3, :, 5:].float())
    other = RandomTensor("b.weight", [37, 20], kind, dtype, torch.device("cpu"), 0.5)[()]  # another tensor's values
    assert torch.equal(whole_2d.float(), other.float()) == (kind == "ones")


@pytest.mark.parametrize("fp8", [False, True], ids=["float", "fp8"])
def test_a_model_made_by_slices_computes_what_it_does_made_whole(fp8):
    """One process: the meta model read by slices, compiled, against the same random model made whole and compiled
    with its self-check (its graph held to the module): the same logits to the bit; FP8 linears run from their e4m3
    tensors, without a float copy of a weight."""
    config = ARCHITECTURES["llama"]()
    ids = random_prompt(12, seed=3)
    whole = compile_model(whole_random_model(config, fp8), compile_backend="eager", max_batch_size=2, verify=True)
    model = random_meta_model("random:test", config, torch.float32, "cpu", fp8)
    assert all(p.device.type == "meta" for p in model.parameters())
    sliced = compile_model(model, compile_backend="eager", max_batch_size=2)
    assert torch.equal(sliced(ids).logits, whole(ids).logits)
    assert sliced.config.quantization == whole.config.quantization == ("fp8" if fp8 else "none")
    assert sliced.report.weight_bytes == whole.report.weight_bytes
    slices = model.checkpoint_slices
    assert slices.bytes_read == slices.stored_bytes and slices.dequantized_bytes == 0
    if fp8:
        # q/k/v and gate/up fused first: 4 FP8 linears a layer
        assert sliced.report.pass_sites("quantize_fp8") == whole.report.pass_sites("quantize_fp8") == 4 * 2


def test_the_70b_fp8_preset_is_made_on_meta_in_e4m3():
    """random:llama-3.1-70b-fp8: every parameter on meta until a compile reads it; 560 decoder linears (7 a layer)
    stored as e4m3 with a scale a channel: 68.4 GB of them, 4.2 GB of bf16 embedding and LM head. It cannot be made
    whole, converted, or measured against a baseline that needs the whole module."""
    model = load_model("random:llama-3.1-70b-fp8", device="cpu").model
    slices = model.checkpoint_slices
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(slices.fp8) == 80 * 7 and model.compiled_llm_quantization == "fp8"
    e4m3 = sum(t.shape[0] * t.shape[1] for t in slices.tensors.values() if t.kind == "e4m3")
    assert e4m3 == 80 * 8192 * (8192 + 1024 + 1024 + 8192 + 3 * 28672)
    assert 72.6e9 < slices.stored_bytes < 72.8e9
    with pytest.raises(ValueError, match="made by slices"):
        random_model("llama-3.1-70b-fp8")


def test_a_preset_made_by_slices_is_not_converted_nor_benched_against_a_whole_baseline(tmp_path, capsys):
    with pytest.raises(ValueError, match="no model to convert"):
        convert_model("random:llama-3.1-8b-fp8", tmp_path / "out")
    assert main(["bench", "random:llama-3.1-8b-fp8", "--baselines", "hf-eager", "--compile-backend", "eager"]) == 2
    assert "no whole module for the hf-eager baseline: pass --baselines none" in capsys.readouterr().err


@pytest.mark.parametrize("fp8", [False, True], ids=["float", "fp8"])
def test_loading_holds_the_graphs_tensors_and_one_recipes_inputs(fp8):
    """CheckpointSlices.load reads a recipe's inputs just before it and drops them after the last recipe that reads
    them: the most it holds at once is the rewritten graph's tensors plus one fused weight's parts (here under 1.2x
    the graph's bytes with 4 layers; reading every tensor first, then fusing, held 1.54x, and 1.90x in FP8)."""
    config = ARCHITECTURES["llama"]()
    config.num_hidden_layers = 4
    model = random_meta_model("random:test", config, torch.float32, "cpu", fp8)
    compiled = compile_model(model, compile_backend="eager", max_batch_size=2)
    assert compiled.report.weight_bytes <= model.checkpoint_slices.peak_bytes < 1.2 * compiled.report.weight_bytes


def test_ranks_loading_a_preset_made_whole_draw_the_same_weights(monkeypatch):
    """A preset that is not made by slices (MXFP4 and Q4_K ones) is made whole on each rank from the global generator:
    LLM seeds it the same on every rank, whatever the process drew before, by_slices or not."""
    from compiled_llm import presets
    from compiled_llm.llm import LLM

    monkeypatch.setitem(presets.RANDOM_PRESETS, "test-base", ARCHITECTURES["llama"])
    monkeypatch.setitem(presets.Q4_K_PRESETS, "test-q4_k", "test-base")
    embeddings = []
    for seed in (1, 2):  # two ranks' processes, each with its own history
        torch.manual_seed(seed)
        model, _ = LLM._load("random:test-q4_k", torch.float32, "tokenizer", 2, by_slices=True)
        embeddings.append(model.get_input_embeddings().weight)
    assert torch.equal(*embeddings)
