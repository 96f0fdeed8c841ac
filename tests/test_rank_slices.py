"""Ranks that read only their slices of a safetensors checkpoint (compiled_llm/checkpoint_slices.py): the model is
built on the meta device, captured and rewritten without weights, and each rank then reads what its graph needs. Held
against the same ranks compiling the whole model loaded by transformers (the same logits, to the bit) and against
HF's own greedy tokens; each rank reads about its share of the files."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as tf
from conftest import free_port, random_prompt, spawn_ranks, tiny_model

from compiled_llm import compile_model
from compiled_llm.checkpoint_slices import meta_model
from compiled_llm.model_source import load_model

JOIN_TIMEOUT_S = 300
NEW_TOKENS = 8
# (checkpoint, quantization): Llama with biases and a vocabulary of 257 (the last rank's vocabulary shard padded with
# zeros past the file's rows); Gemma 3 with tied embeddings (one tensor of the files for two parameters); Qwen3; fp8,
# whose quantization runs on the rank's slices.
JOBS = (("llama_bias", "none"), ("gemma3", "none"), ("qwen3", "none"), ("llama_bias", "fp8"))


def _model(arch: str) -> torch.nn.Module:
    if arch != "llama_bias":
        return tiny_model(arch)
    model = tiny_model("llama", attention_bias=True, mlp_bias=True, vocab_size=257)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and "norm" not in name:
                param.normal_(0.0, 0.08)
    return model


def _rank_main(rank: int, world: int, port: int, directory: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        results = {}
        for arch, quantization in JOBS:
            path = Path(directory) / arch
            fields = {"tensor_parallel_size": world, "max_batch_size": 2, "compile_backend": "eager",
                      "quantization": quantization}  # fmt: skip
            whole = compile_model(tf.AutoModelForCausalLM.from_pretrained(path).eval(), **fields)
            model, why = meta_model(path, None, torch.device("cpu"))
            assert model is not None, why
            sliced = compile_model(model, **fields)
            ids = random_prompt(12, seed=3)
            results[f"{arch}/{quantization}"] = {
                "whole": whole(ids).logits,
                "sliced": sliced(ids).logits,
                "tokens": sliced.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False),
                "bytes_read": model.checkpoint_slices.bytes_read,
                "weight_bytes": (whole.report.weight_bytes, sliced.report.weight_bytes),
                "sites": (
                    whole.report.pass_sites("shard_tensor_parallel"),
                    sliced.report.pass_sites("shard_tensor_parallel"),
                ),
            }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each JOBS model saved in several safetensors files, with its HF greedy tokens."""
    root = tmp_path_factory.mktemp("checkpoints")
    expected = {}
    for arch in {arch for arch, _ in JOBS}:
        model = _model(arch)
        model.save_pretrained(root / arch, max_shard_size="100KB")
        assert len(list((root / arch).glob("*.safetensors"))) > 1
        ids = random_prompt(12, seed=3)
        expected[arch] = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return root, expected


def test_two_ranks_reading_their_slices_compute_what_whole_ranks_do(checkpoints, tmp_path):
    root, expected = checkpoints
    world = 2
    spawn_ranks(_rank_main, world, (world, free_port(), str(root), str(tmp_path)), JOIN_TIMEOUT_S)
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for job, got in results.items():
            arch, quantization = job.split("/")
            assert torch.equal(got["whole"], got["sliced"]), (rank, job)
            assert got["sites"][0] == got["sites"][1] > 0, (rank, job)
            assert got["weight_bytes"][0] == got["weight_bytes"][1], (rank, job)
            if quantization == "none":
                assert got["tokens"].tolist() == expected[arch].tolist(), (rank, job)
            stored = sum(p.stat().st_size for p in (root / arch).glob("*.safetensors"))
            # Its half of the sharded weights, plus what every rank keeps whole (norms, row-parallel biases).
            assert got["bytes_read"] < 0.56 * stored, (rank, job, got["bytes_read"], stored)


def test_a_checkpoint_whose_tensors_transformers_renames_loads_whole(tmp_path, caplog):
    """Mixtral's files hold each expert's tensors, which transformers merges into one parameter at load: no slice
    of a file is a slice of the parameter, so the rank loads the whole checkpoint, and says why."""
    tiny_model("mixtral").save_pretrained(tmp_path)
    model, why = meta_model(tmp_path, None, torch.device("cpu"))
    assert model is None and "not in the files" in why
    with caplog.at_level(logging.INFO, logger="compiled_llm"):
        loaded = load_model(str(tmp_path), device="cpu", by_slices=True)
    assert not hasattr(loaded.model, "checkpoint_slices")
    assert next(loaded.model.parameters()).device.type == "cpu"
    assert "each rank loads the whole checkpoint" in caplog.text and why in caplog.text


def test_a_self_check_is_refused_without_the_whole_module(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    model, _ = meta_model(tmp_path, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="verify=True: a rank that reads only its slices"):
        compile_model(model, compile_backend="eager", verify=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_slices_on_the_gpu_compute_what_the_whole_model_does(tmp_path):
    """One rank (no process group) through the same path on a GPU, Inductor and Triton kernels: the fakes are CUDA
    tensors there, which the passes read to choose the GPU backends."""
    _model("llama_bias").to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    fields = {"max_batch_size": 2, "cuda_graphs": False}
    # As transformers loads it (RoPE's frequencies in float32, where `.to(bfloat16)` would have rounded them).
    whole = compile_model(tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval().cuda(), **fields)
    model, why = meta_model(tmp_path, None, torch.device("cuda"))
    assert model is not None, why
    sliced = compile_model(model, **fields)
    assert [r.name for r in sliced.report.passes if r.sites] == [r.name for r in whole.report.passes if r.sites]
    ids = random_prompt(12, seed=3).cuda()
    torch.testing.assert_close(sliced(ids).logits, whole(ids).logits, rtol=0, atol=0)
    assert model.checkpoint_slices.bytes_read == model.checkpoint_slices.stored_bytes
