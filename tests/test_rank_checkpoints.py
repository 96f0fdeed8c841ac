"""What a tensor-parallel rank loads from a checkpoint.

- Its slices of a float safetensors checkpoint (compiled_llm/checkpoint_slices.py): the model is built on the meta
  device, captured and rewritten without weights, and each rank then reads what its graph needs. Held against the
  same ranks compiling the whole model loaded by transformers (the same logits, to the bit) and against HF's own
  greedy tokens; each rank reads about its share of the files.
- Its slices of an FP8 checkpoint: its part of each e4m3 weight and the scales that go with it (by row per channel,
  by 128 x 128 block), the same tensors as a rank that loads the whole checkpoint and cuts them (fx_passes/sharding.py),
  whose graph passes its self-check against the module quantized as the ranks compute it; weights whose parts do not
  fall on 128 x 128 quantization blocks are refused either way, naming the weight."""

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
from conftest import (
    ARCHITECTURES,
    free_port,
    llama_with_biases,
    random_prompt,
    relative_error,
    spawn_ranks,
    tiny_model,
    whole_random_model,
)
from safetensors.torch import load_file, save_file
from torch import nn

from compiled_llm import compile_model
from compiled_llm.checkpoint_slices import CheckpointSlices, Fp8Weight
from compiled_llm.fp8_checkpoint import Fp8Checkpoint, dequantized, weight_scales
from compiled_llm.meta_model import meta_model
from compiled_llm.model_source import load_model
from compiled_llm.random_slices import random_meta_model
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
# (name, weight strategy, intermediate features) of compressed-tensors checkpoints (tests/fp8_checkpoints.py): blocks of
# 384 features split in two parts of 192, which do not fall on 128-wide blocks (refused), and of 512 (parts of 256).
# Random weights made by slices (compiled_llm/random_slices.py), float and FP8, against the same made whole.
RANDOM_JOBS = (("random", False), ("random_fp8", True))
FP8_JOBS = (("fp8_channel", "channel", 384), ("fp8_block", "block", 512), ("fp8_block_unaligned", "block", 384))


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
        for job, fp8 in RANDOM_JOBS:  # random weights made by slices: each rank makes its shards of one model
            config, ids = _model("llama_bias").config, random_prompt(12, seed=3)
            fields = {"tensor_parallel_size": world, "max_batch_size": 2, "compile_backend": "eager"}
            ranks = compile_model(whole_random_model(config, fp8), verify=True, **fields)
            model = random_meta_model("random:test", config, torch.float32, "cpu", fp8)
            slices = model.checkpoint_slices
            results[job] = {"ranks": ranks(ids).logits, "sliced": compile_model(model, **fields)(ids).logits,
                            "read": (slices.bytes_read, slices.stored_bytes, slices.dequantized_bytes)}  # fmt: skip
        for job, _, _ in FP8_JOBS:  # one rank loads it whole and cuts the FP8 tensors; another reads its slices
            path = str(Path(directory) / job)
            if not Path(path).exists():
                continue
            fields = {"max_batch_size": 2, "compile_backend": "eager"}
            whole, sliced = load_model(path, device="cpu").model, load_model(path, device="cpu", by_slices=True).model
            assert hasattr(sliced, "checkpoint_slices"), f"{job} loaded whole"
            try:
                ranks = compile_model(whole, tensor_parallel_size=world, verify=True, **fields)
            except TensorParallelError as error:
                with pytest.raises(TensorParallelError) as sliced_error:
                    compile_model(sliced, tensor_parallel_size=world, **fields)
                results[job] = {"errors": (str(error), str(sliced_error.value))}
                continue
            from_slices = compile_model(sliced, tensor_parallel_size=world, **fields)
            ids = random_prompt(12, seed=3)
            results[job] = {
                "ranks": ranks(ids).logits, "sliced": from_slices(ids).logits,
                "quantization": (ranks.config.quantization, from_slices.config.quantization),
                "sites": [(cm.report.pass_sites("shard_tensor_parallel"), cm.report.pass_sites("quantize_fp8"))
                          for cm in (ranks, from_slices)],
                "weight_bytes": (ranks.report.weight_bytes, from_slices.report.weight_bytes),
                "bytes_read": sliced.checkpoint_slices.bytes_read,
                "dequantized_bytes": sliced.checkpoint_slices.dequantized_bytes,
            }  # fmt: skip
            if job == "fp8_channel":  # and one rank alone, whole
                results[job]["one"] = compile_model(whole, verify=True, **fields)(ids).logits
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

        for job, strategy, intermediate_size in FP8_JOBS:
            write_compressed_tensors_fp8(tiny_llama(intermediate_size), str(root / job), strategy)
    return root, expected


def test_two_ranks_reading_their_slices_compute_what_whole_ranks_do(checkpoints, tmp_path):
    root, expected = checkpoints
    world = 2
    spawn_ranks(_rank_main, world, (world, free_port(), str(root), str(tmp_path)), JOIN_TIMEOUT_S)
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        fp8_jobs = [job for job, _, _ in FP8_JOBS if (root / job).exists()]
        assert list(results) == [job for job, _, _ in JOBS] + [job for job, _ in RANDOM_JOBS] + fp8_jobs
        for job, _ in RANDOM_JOBS:  # the shards the whole model's ranks cut (their graph self-checked), to the bit
            got = results[job]
            assert torch.equal(got["ranks"], got["sliced"]), (rank, job)
            bytes_read, stored, dequantized = got["read"]
            assert bytes_read < 0.56 * stored and dequantized == 0, (rank, job, got["read"])
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
        for job in fp8_jobs:
            got = results[job]
            if job == "fp8_block_unaligned":  # gate_proj's 384 rows in parts of 192, the same refusal either way
                whole, sliced = got["errors"]
                assert "gate_proj.weight: this rank's part [" in whole and whole == sliced, (rank, got["errors"])
                assert "does not align with its FP8 checkpoint's 128 x 128 quantization blocks" in whole
                continue
            # The slices are the tensors the whole rank cut: the same logits to the bit, over FP8 ops on both.
            assert torch.equal(got["ranks"], got["sliced"]), (rank, job)
            assert got["quantization"] == ("fp8" if job == "fp8_channel" else "fp8_block",) * 2, (rank, job)
            assert got["sites"][0] == got["sites"][1] and min(got["sites"][0]) > 0, (rank, job, got["sites"])
            assert got["weight_bytes"][0] == got["weight_bytes"][1], (rank, job)
            # Its half of the e4m3 weights and their scales, of the embedding and the LM head; KV's one head whole.
            stored = sum(p.stat().st_size for p in (root / job).glob("*.safetensors"))
            assert got["bytes_read"] < 0.56 * stored, (rank, job, got["bytes_read"], stored)
            # Every FP8 linear runs the stored tensors: no float copy of its weight was made (the rank's peak memory)
            assert got["dequantized_bytes"] == 0, (rank, job, got["dequantized_bytes"])
            # The whole rank's graph passed its self-check (verify=True); per channel, the ranks differ from one by
            # quantizing each its part of a row-parallel linear's input.
            if job == "fp8_channel":
                assert relative_error(got["ranks"], got["one"]) < 0.1, (rank, job)


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


# An FP8 checkpoint's weight: its e4m3 values and scales cut by shard_parameter from what load_fp8_directory loads
# (fp8_checkpoint.py), against read_fp8's slices of them: per channel (scales [N, 1] or [N]), per tensor ([1] or 0-dim,
# ModelOpt's), per 128 x 128 block (weights past whole blocks; parts on blocks' edges or not, refused alike).


def _fp8_cases(seed: int, count: int):
    rng = random.Random(seed)
    while count:
        kind, dim, blocks = rng.choice(["channel", "tensor", "block"]), rng.randrange(2), rng.choice([1, 2, 3])
        shape = [rng.choice([64, 128, 200, 256, 384]) for _ in range(2)]
        if shape[dim] % blocks:
            continue
        extent = shape[dim] // blocks
        start = rng.choice([0, 64, 128, 256, rng.randint(0, extent + 3)])  # on a block's edge, or anywhere
        size = rng.choice([64, 128, 256, extent - start, rng.randint(1, extent + 3)])
        yield kind, rng.choice([0, 1]), shape, (dim, start, max(size, 1), blocks)
        count -= 1


def _fp8_checkpoint(kind: str, variant: int, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, its scale as stored): `variant` picks [N, 1] or [N], [1] or 0-dim, float32 or bfloat16 blocks."""
    weight8 = (torch.randn(shape) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    if kind == "block":
        scale = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128)) + 0.01
        return weight8, scale.to(torch.bfloat16) if variant else scale
    if kind == "tensor":
        return weight8, torch.tensor(0.01) if variant else torch.tensor([0.01])
    scale = torch.rand(shape[0], 1) + 0.01
    return weight8, scale.flatten() if variant else scale


def test_read_fp8_is_shard_parameter_over_the_whole_load(tmp_path):
    """The same dequantized part, e4m3 values and scales, to the bit, or the same refusal."""
    cases = list(_fp8_cases(0, 200))
    tensors = {}
    for i, (kind, variant, shape, _) in enumerate(cases):
        tensors[f"w{i}"], tensors[f"w{i}_scale"] = _fp8_checkpoint(kind, variant, shape)
    save_file(tensors, tmp_path / "model.safetensors")
    slices = CheckpointSlices(tmp_path, {k: ("model.safetensors", k) for k in tensors}, {}, torch.float32, CPU)
    refused = 0
    for i, (kind, variant, shape, cut) in enumerate(cases):
        name, scale_name = f"w{i}", f"w{i}_scale"
        fmt = Fp8Checkpoint("fp8_block" if kind == "block" else "fp8", "_scale", "a test's")
        slices.fp8[name], slices.dtypes[scale_name] = Fp8Weight(scale_name, kind, fmt), tensors[scale_name].dtype
        scale = weight_scales(tensors[scale_name], shape, fmt, name)  # as load_fp8_directory loads it
        whole = nn.Parameter(dequantized(tensors[name], scale, fmt.quantization, torch.float32), requires_grad=False)
        whole.fp8_weight, whole.fp8_scale = tensors[name], scale
        read = slices.read_fp8(name)
        assert [torch.equal(a, b) for a, b in zip(_fp8_tensors(read), _fp8_tensors(whole))] == [True] * 3, name
        gm = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
        gm.register_parameter(name, whole)
        try:
            shard_parameter(gm, "part", name, *cut)
        except TensorParallelError as error:
            with pytest.raises(TensorParallelError) as slices_error:
                slices.read_fp8(name, cut)
            assert str(slices_error.value) == str(error)
            refused += 1
            continue
        got, want = _fp8_tensors(slices.read_fp8(name, cut)), _fp8_tensors(gm.get_parameter("part"))
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (kind, variant, shape, cut)
    assert 0 < refused < len(cases) / 2, refused


def _fp8_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    return [param.detach(), param.fp8_weight.float(), param.fp8_scale]


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


def test_an_mxfp4_checkpoint_over_several_ranks_loads_whole(tmp_path, caplog):
    from test_mxfp4_checkpoint import write_checkpoint

    from compiled_llm.model_source import load_model

    write_checkpoint(tmp_path)
    with caplog.at_level(logging.INFO, logger="compiled_llm"):
        loaded = load_model(str(tmp_path), device="cpu", by_slices=True)
    assert not hasattr(loaded.model, "checkpoint_slices")
    assert "each rank loads the whole checkpoint" in caplog.text and "an MXFP4 checkpoint" in caplog.text


# -- FP8 checkpoints by slices, the formats the two ranks do not run ------------------------------------------------


@pytest.mark.parametrize("fmt", ["modelopt", "hf_fp8"])
def test_an_fp8_checkpoint_read_by_slices_computes_what_its_whole_load_does(tmp_path, fmt):
    """ModelOpt's scale per tensor (a 0-dim tensor) and Hugging Face fp8's `weight_scale_inv` blocks, on one rank: it
    reads each tensor whole, as load_fp8_directory does, and runs the same FP8 ops."""
    from test_fp8_checkpoint import write_checkpoint

    write_checkpoint(tiny_model("llama"), tmp_path, fmt)
    fields = {"max_batch_size": 2, "compile_backend": "eager"}
    whole = compile_model(load_model(str(tmp_path), device="cpu").model, **fields)
    model = load_model(str(tmp_path), device="cpu", by_slices=True).model
    sliced = compile_model(model, **fields)
    ids = random_prompt(12, seed=3)
    assert torch.equal(whole(ids).logits, sliced(ids).logits)
    assert sliced.config.quantization == whole.config.quantization == ("fp8" if fmt == "modelopt" else "fp8_block")
    assert sliced.report.pass_sites("quantize_fp8") == whole.report.pass_sites("quantize_fp8") > 0
    assert model.checkpoint_slices.bytes_read == model.checkpoint_slices.stored_bytes


def test_float8_tensors_are_read_only_as_their_format_says(tmp_path):
    """Without the FP8 format (a float checkpoint's path), or with per-channel scales not stored one a row, the slices
    would misread them: refused, the rank loads whole."""
    from test_fp8_checkpoint import _tensors, write_checkpoint

    from compiled_llm.fp8_checkpoint import checkpoint_format, directory_quantization_config

    write_checkpoint(tiny_model("llama"), tmp_path, "modelopt")
    model, why = meta_model(tmp_path, None, CPU)
    assert model is None and "is stored in float8, and the checkpoint's config names no FP8 format" in why
    fmt = checkpoint_format(directory_quantization_config(tmp_path))
    tensors = _tensors(tmp_path)
    name = "model.layers.0.mlp.down_proj"
    tensors[f"{name}.weight_scale"] = torch.rand(1, tensors[f"{name}.weight"].shape[0])  # [1, N]: one a column
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, why = meta_model(tmp_path, torch.float32, CPU, fmt)
    assert model is None and why == f"{name}.weight_scale [1, 64]: per-channel scales not stored one a row"
