"""What a tensor-parallel rank loads from a checkpoint.

- Its slices of a float safetensors checkpoint (compiled_llm/checkpoint_slices.py): the model is built on the meta
  device, captured and rewritten without weights, and each rank then reads what its graph needs. Held against the
  same ranks compiling the whole model loaded by transformers (the same logits, to the bit) and against HF's own
  greedy tokens; each rank reads about its share of the files.
- An FP8 checkpoint's e4m3 weights and scales, cut with the weights (fx_passes/sharding.py): each rank's graph passes
  its self-check against the module quantized as the ranks compute it; weights whose parts do not fall on 128 x 128
  quantization blocks are refused, naming the weight."""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as tf
from conftest import ARCHITECTURES, free_port, llama_with_biases, random_prompt, relative_error, spawn_ranks, tiny_model
from safetensors.torch import load_file, save_file
from torch import nn

from compiled_llm import compile_model
from compiled_llm.checkpoint_slices import CheckpointSlices, meta_model
from compiled_llm.model_source import load_model
from fx_passes.sharding import TensorParallelError, shard_parameter

JOIN_TIMEOUT_S = 300
NEW_TOKENS = 8
# (name, checkpoint, CompileConfig fields): Llama with biases and a vocabulary of 257 (the last rank's vocabulary
# shard padded with zeros past the file's rows); Gemma 3 with tied embeddings (one tensor of the files for two
# parameters); Qwen3; fp8, whose quantization runs on the rank's slices; Mixtral, whose files hold a tensor an expert
# that transformers merges (each rank reads its half of every expert's rows: gate, up, and down's columns); Qwen3-MoE
# with expert parallelism (each rank reads its half of the experts); Llama with one KV head (replicated on both ranks).
JOBS = (("llama_bias", "llama_bias", {}), ("gemma3", "gemma3", {}), ("qwen3", "qwen3", {}),
        ("llama_bias_fp8", "llama_bias", {"quantization": "fp8"}), ("mixtral", "mixtral", {}),
        ("qwen3_moe_ep", "qwen3_moe", {"expert_parallel_size": 2}), ("llama_mqa", "llama_mqa", {}))  # fmt: skip
FP8_STRATEGIES = ("channel", "block")  # compressed-tensors checkpoints (tests/fp8_checkpoints.py)


def _model(arch: str) -> torch.nn.Module:
    if arch == "llama_mqa":
        return tiny_model("llama", num_key_value_heads=1)
    return llama_with_biases() if arch == "llama_bias" else tiny_model(arch)


def _rank_main(rank: int, world: int, port: int, directory: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        results = {}
        for job, arch, job_fields in JOBS:
            path = Path(directory) / arch
            fields = {"tensor_parallel_size": world, "max_batch_size": 2, "compile_backend": "eager", **job_fields}
            whole = compile_model(tf.AutoModelForCausalLM.from_pretrained(path).eval(), **fields)
            model, why = meta_model(path, None, torch.device("cpu"))
            assert model is not None, why
            sliced = compile_model(model, **fields)
            ids = random_prompt(12, seed=3)
            results[job] = {
                "whole": whole(ids).logits,
                "sliced": sliced(ids).logits,
                "tokens": sliced.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False),
                "bytes_read": model.checkpoint_slices.bytes_read,
                "weight_bytes": (whole.report.weight_bytes, sliced.report.weight_bytes),
                "sites": [
                    (cm.report.pass_sites("shard_tensor_parallel"), cm.report.pass_sites("shard_experts"))
                    for cm in (whole, sliced)
                ],
            }
        for strategy in FP8_STRATEGIES:  # quantized: each rank loads it whole, and cuts the FP8 tensors
            if not (Path(directory) / f"fp8_{strategy}").exists():
                continue
            model = load_model(str(Path(directory) / f"fp8_{strategy}"), device="cpu", by_slices=True).model
            fields = {"max_batch_size": 2, "compile_backend": "eager", "verify": True}
            try:
                ranks = compile_model(model, tensor_parallel_size=world, **fields)
            except TensorParallelError as error:
                results[f"fp8_{strategy}"] = {"error": str(error)}
                continue
            one = compile_model(model, **fields)
            ids = random_prompt(12, seed=3)
            results[f"fp8_{strategy}"] = {"ranks": ranks(ids).logits, "one": one(ids).logits,
                                          "quantization": ranks.config.quantization,
                                          "sites": ranks.report.pass_sites("shard_tensor_parallel")}  # fmt: skip
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each JOBS model saved in several safetensors files, with its HF greedy tokens."""
    root = tmp_path_factory.mktemp("checkpoints")
    expected = {}
    for arch in {arch for _, arch, _ in JOBS}:
        model = _model(arch)
        model.save_pretrained(root / arch, max_shard_size="100KB")
        assert len(list((root / arch).glob("*.safetensors"))) > 1
        ids = random_prompt(12, seed=3)
        expected[arch] = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    # Written by the compressed-tensors library (a test dependency; a GPU machine without it skips these jobs).
    if importlib.util.find_spec("compressed_tensors") is not None:
        from fp8_checkpoints import tiny_llama, write_compressed_tensors_fp8

        for strategy in FP8_STRATEGIES:
            write_compressed_tensors_fp8(tiny_llama(), str(root / f"fp8_{strategy}"), strategy)
    return root, expected


def test_two_ranks_reading_their_slices_compute_what_whole_ranks_do(checkpoints, tmp_path):
    root, expected = checkpoints
    world = 2
    spawn_ranks(_rank_main, world, (world, free_port(), str(root), str(tmp_path)), JOIN_TIMEOUT_S)
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        fp8_jobs = [f"fp8_{s}" for s in FP8_STRATEGIES if (root / f"fp8_{s}").exists()]
        assert list(results) == [job for job, _, _ in JOBS] + fp8_jobs
        for job, arch, fields in JOBS:
            got = results[job]
            assert torch.equal(got["whole"], got["sliced"]), (rank, job)
            assert got["sites"][0] == got["sites"][1] and sum(got["sites"][0]) > 0, (rank, job)
            assert got["weight_bytes"][0] == got["weight_bytes"][1], (rank, job)
            if "quantization" not in fields:
                assert got["tokens"].tolist() == expected[arch].tolist(), (rank, job)
            stored = sum(p.stat().st_size for p in (root / arch).glob("*.safetensors"))
            # Its half of the sharded weights, plus what every rank keeps whole (norms, row-parallel biases).
            assert got["bytes_read"] < 0.56 * stored, (rank, job, got["bytes_read"], stored)
        # Per channel: both graphs passed their self-check (verify=True); the ranks differ from one by quantizing
        # each its part of a row-parallel linear's input.
        if not fp8_jobs:
            continue
        channel = results["fp8_channel"]
        assert channel["quantization"] == "fp8" and channel["sites"] > 0
        assert relative_error(channel["ranks"], channel["one"]) < 0.1
        # Blocks: the intermediate features (384) split in two parts of 192 that do not fall on 128-wide blocks.
        assert "gate_proj.weight: this rank's part [" in results["fp8_block"]["error"]
        assert "does not align with its FP8 checkpoint's 128 x 128 quantization blocks" in results["fp8_block"]["error"]


def test_a_checkpoint_the_slices_cannot_read_loads_whole(tmp_path, caplog):
    """Tied embeddings stored twice, with different values (transformers then unties them): no rank reads slices of
    it; each loads the whole checkpoint, as transformers does, and the log says why."""
    tiny_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"]) * 0.05
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, why = meta_model(tmp_path, None, torch.device("cpu"))
    assert model is None and "are tied, yet each is in the files" in why
    with caplog.at_level(logging.INFO, logger="compiled_llm"):
        loaded = load_model(str(tmp_path), device="cpu", by_slices=True)
    assert not hasattr(loaded.model, "checkpoint_slices")
    assert torch.equal(loaded.model.lm_head.weight, tensors["lm_head.weight"])
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


# -- what a rank reads, against transformers' from_pretrained (from a review of the first version) -------------------

CPU = torch.device("cpu")


# -- read_part against shard_parameter -------------------------------------------------------------------------------


def _cases(seed: int, count: int, divisible: bool):
    rng = random.Random(seed)
    while count:
        ndim = rng.randint(1, 3)
        shape = [rng.randint(1, 9) for _ in range(ndim)]
        dim = rng.randrange(ndim)
        blocks = rng.choice([1, 2, 3])
        if (shape[dim] % blocks == 0) != divisible:
            continue
        block = -(-shape[dim] // blocks)
        yield shape, dim, rng.randint(0, block + 3), rng.randint(1, block + 3), blocks  # starts and sizes past the end
        count -= 1


def _read_and_shard(tmp_path, cases):
    tensors = {f"t{i}": torch.randn(shape) for i, (shape, *_) in enumerate(cases)}
    save_file(tensors, tmp_path / "model.safetensors")
    slices = CheckpointSlices(tmp_path, {k: ("model.safetensors", k) for k in tensors}, {}, torch.float32, CPU)
    for i, (_, dim, start, size, blocks) in enumerate(cases):
        name = f"t{i}"
        gm = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
        gm.register_parameter(name, nn.Parameter(tensors[name].clone(), requires_grad=False))
        shard_parameter(gm, "part", name, dim, start, size, blocks)
        yield (name, dim, start, size, blocks), slices, gm.get_parameter("part").detach()


def test_read_part_is_shard_parameter_where_the_blocks_divide(tmp_path):
    """Zero padding past the end, starts beyond a block, 1-3 dims, 1-3 blocks: the same tensor, to the bit."""
    for args, slices, want in _read_and_shard(tmp_path, list(_cases(0, 300, divisible=True))):
        got = slices.read_part(*args)
        assert got.shape == want.shape and torch.equal(got, want), args


def test_read_part_refuses_blocks_that_do_not_divide(tmp_path):
    """shard_parameter's chunk() would cut unequal blocks there: read_part refuses rather than cut others."""
    for args, slices, _ in _read_and_shard(tmp_path, list(_cases(1, 100, divisible=False))):
        with pytest.raises(ValueError, match="cannot be cut in"):
            slices.read_part(*args)


# -- every tensor the slices path reads, against from_pretrained ----------------------------------------------------


def _slices_tensor(slices: CheckpointSlices, name: str) -> torch.Tensor:
    return slices.read(name) if name in slices.keys else slices.buffers[name]


def _differences(directory, dtype) -> list[str]:
    ref = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or "auto").eval()
    model, why = meta_model(directory, dtype, CPU)
    if model is None:
        pytest.skip(f"meta_model refuses: {why}")
    slices, out = model.checkpoint_slices, []
    for name, want in [*ref.named_parameters(remove_duplicate=False), *ref.named_buffers(remove_duplicate=False)]:
        meta = model.get_parameter(name) if name in dict(model.named_parameters(remove_duplicate=False)) else None
        got = _slices_tensor(slices, name)
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want.detach()):
            out.append(f"{name}: read {got.dtype}{tuple(got.shape)}, from_pretrained {want.dtype}{tuple(want.shape)}")
        if meta is not None and meta.dtype != want.dtype:
            out.append(f"{name}: captured as {meta.dtype}, from_pretrained {want.dtype}")
    return out


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize(("stored", "asked"), [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])  # fmt: skip
def test_each_tensor_read_is_from_pretrained_s(tmp_path, arch, stored, asked):
    tiny_model(arch).to(stored).save_pretrained(tmp_path, max_shard_size="100KB")
    assert _differences(tmp_path, asked) == []


def test_a_config_without_dtype_loads_in_the_files_dtype(tmp_path):
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _differences(tmp_path, None) == []


def test_modules_transformers_keeps_in_float32_stay_float32(tmp_path):
    tiny_model("gpt_oss").to(torch.float16).save_pretrained(tmp_path)
    assert _differences(tmp_path, None) == []


# -- tied embeddings ------------------------------------------------------------------------------------------------


def test_a_tied_config_with_its_own_lm_head_in_the_files_is_refused_or_read(tmp_path):
    tiny_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"]) * 0.05
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, _ = meta_model(tmp_path, None, CPU)
    if model is None:
        return  # refused: loads whole
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_prompt(12, seed=3)
    sliced = compile_model(model, max_batch_size=2, compile_backend="eager")
    torch.testing.assert_close(sliced(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_tied_embeddings_stored_once_under_either_name(tmp_path):
    tiny_model("llama", tie_word_embeddings=True).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert _differences(tmp_path, None) == []


# -- persistent buffers ---------------------------------------------------------------------------------------------


class _BufferedConfig(tf.LlamaConfig):
    model_type = "review_buffered_llama"


class _BufferedForCausalLM(tf.LlamaForCausalLM):
    """Llama with persistent buffers in its files: a float32 one (as DeepSeek's e_score_correction_bias) and an int64
    one, both read by the forward."""

    config_class = _BufferedConfig

    def __init__(self, config):
        super().__init__(config)
        self.bias_fp32 = nn.Buffer(torch.zeros(config.vocab_size, dtype=torch.float32))
        self.table = nn.Buffer(torch.zeros(4, dtype=torch.int64))
        self.lm_head.register_forward_hook(
            lambda module, args, out: out + (self.bias_fp32 * (self.table[1] - 2**24)).to(out.dtype)
        )


def test_persistent_buffers_load_as_from_pretrained(tmp_path):
    try:
        tf.AutoConfig.register(_BufferedConfig.model_type, _BufferedConfig)
        tf.AutoModelForCausalLM.register(_BufferedConfig, _BufferedForCausalLM)
    except ValueError:  # registered by an earlier run in this process
        pass
    source = tiny_model("llama")
    model = _BufferedForCausalLM(_BufferedConfig(**source.config.to_dict())).eval()
    model.load_state_dict(source.state_dict(), strict=False)
    model = model.to(torch.bfloat16)
    model.bias_fp32 = nn.Buffer(torch.linspace(0, 3, model.config.vocab_size) + 1e-3)
    with torch.no_grad():
        model.table.copy_(torch.tensor([1, 2**24 + 1, 3, 4]))
    model.save_pretrained(tmp_path)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    fields = {"max_batch_size": 2, "compile_backend": "eager"}
    ids = random_prompt(12, seed=3)
    whole = compile_model(hf, **fields)(ids).logits
    meta, _ = meta_model(tmp_path, None, CPU)
    if meta is None:
        return  # refused: loads whole
    assert torch.equal(compile_model(meta, **fields)(ids).logits, whole)


# -- what transformers transforms at load ---------------------------------------------------------------------------


def test_a_converter_that_keeps_name_and_shape_is_refused(tmp_path, monkeypatch):
    from transformers import conversion_mapping
    from transformers.core_model_loading import Transpose, WeightConverter

    tiny_model("llama").save_pretrained(tmp_path)
    conversion_mapping.get_checkpoint_conversion_mapping("llama")  # builds the cache
    converter = WeightConverter(source_patterns="self_attn.q_proj.weight", target_patterns="self_attn.q_proj.weight",
                                operations=[Transpose()])  # fmt: skip
    monkeypatch.setitem(conversion_mapping._checkpoint_conversion_mapping_cache, "llama", [converter])
    model, _ = meta_model(tmp_path, None, CPU)
    if model is None:
        return
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.checkpoint_slices.read(name), ref.get_parameter(name).detach())


# -- sources that load whole ----------------------------------------------------------------------------------------


def test_an_mxfp4_checkpoint_over_several_ranks_loads_whole(tmp_path):
    from test_mxfp4_checkpoint import write_checkpoint

    from compiled_llm.model_source import load_model

    write_checkpoint(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", by_slices=True)
    assert not hasattr(loaded.model, "checkpoint_slices")
