"""FP8 checkpoints: which format a Hugging Face directory holds, and its weights loaded without requantizing.

Formats, told apart by config.json's `quantization_config` (or ModelOpt's hf_quant_config.json):
- compressed-tensors, `format: float-quantized` (llm-compressor): `<linear>.weight` e4m3 and `<linear>.weight_scale`,
  per output channel [N, 1], per tensor [1] or per 128 x 128 block [N/128, K/128]; `input_scale` when static;
- ModelOpt FP8 (TensorRT Model Optimizer): e4m3 weights with a per-tensor `weight_scale` and `input_scale`;
- Hugging Face `fp8` (DeepSeek-V3, Qwen3-FP8): e4m3 weights with `weight_scale_inv` per 128 x 128 block.
In all three W = W8 * scale. Channel and tensor scales run as `quantization="fp8"` (a tensor's scale repeated per
channel: q, k and v fuse with their own scales, none requantized), blocks as `"fp8_block"`. Activations are
quantized per token at run time (the ops' numerics); a checkpoint's static `input_scale` is not used.

Each quantized linear's parameter holds the dequantized weight in the model's dtype, so the module still runs
as itself, and carries the checkpoint's tensors as attributes (`fp8_weight`, `fp8_scale`) that the quantize_fp8
pass takes as they are. An unsupported scheme is a ValueError that names it and lists what is supported.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from compiled_llm.mtp_weights import is_mtp_tensor
from compiled_llm.quantized_directory import load_state, plain_model, read_tensors
from custom_ops.linear.fp8 import FP8
from custom_ops.linear.fp8_block import BLOCK

log = logging.getLogger("compiled_llm")

SUPPORTED = (
    "compressed-tensors float-quantized FP8 (8-bit float weights per channel, per tensor or in 128x128 blocks), "
    "ModelOpt FP8 (quant_algo FP8), Hugging Face fp8 (weight_block_size [128, 128]), MXFP4 (GPT-OSS's experts, "
    "quant_method mxfp4), 4-bit AutoAWQ GEMM and GPTQ (int4_checkpoint.py), and NVFP4 from ModelOpt and "
    "compressed-tensors (nvfp4_checkpoint.py)"
)
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale", ".k_scale", ".v_scale")


@dataclass(frozen=True)
class Fp8Checkpoint:
    quantization: str  # the CompileConfig.quantization it runs as: "fp8" or "fp8_block"
    scale_name: str  # the weight scales' tensor suffix
    description: str  # for logs


def _unsupported(what: str) -> ValueError:
    return ValueError(f"this checkpoint's quantization ({what}) is not supported; supported: {SUPPORTED}")


def _compressed_tensors(config: dict) -> Fp8Checkpoint:
    if config.get("format") != "float-quantized":
        raise _unsupported(f"compressed-tensors format {config.get('format')!r}")
    strategies = set()
    for name, group in (config.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise _unsupported(
                f"compressed-tensors group {name}: {weights.get('num_bits')}-bit {weights.get('type')} weights"
            )
        strategy = weights.get("strategy")
        if strategy == "block" and list(weights.get("block_structure") or ()) != [BLOCK, BLOCK]:
            raise _unsupported(f"compressed-tensors group {name}: blocks of {weights.get('block_structure')}")
        if strategy not in ("channel", "tensor", "block"):
            raise _unsupported(f"compressed-tensors group {name}: weight strategy {strategy!r}")
        strategies.add(strategy)
    if not strategies:
        raise _unsupported("compressed-tensors without config_groups")
    if "block" in strategies and len(strategies) > 1:
        raise _unsupported(f"compressed-tensors groups mixing weight strategies {sorted(strategies)}")
    block = strategies == {"block"}
    return Fp8Checkpoint("fp8_block" if block else "fp8", "weight_scale",
                         f"compressed-tensors FP8, {'/'.join(sorted(strategies))} weight scales")  # fmt: skip


def checkpoint_format(quantization_config: dict | None) -> Fp8Checkpoint | None:
    """The FP8 format a `quantization_config` describes; None for none; a ValueError for any other."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(quantization_config)
    if method == "modelopt":
        algorithm = quantization_config.get("quant_algo")
        if algorithm != "FP8":
            raise _unsupported(f"ModelOpt quant_algo {algorithm!r}")
        return Fp8Checkpoint("fp8", "weight_scale", "ModelOpt FP8, per-tensor weight scales")
    if method == "fp8":
        block = quantization_config.get("weight_block_size")
        if list(block or ()) != [BLOCK, BLOCK]:
            raise _unsupported(f"Hugging Face fp8 with weight_block_size {block}")
        return Fp8Checkpoint("fp8_block", "weight_scale_inv", "Hugging Face fp8, 128x128 weight blocks")
    raise _unsupported(f"quant_method {method!r}")


def directory_quantization_config(path: Path) -> dict | None:
    """config.json's quantization_config, or ModelOpt's hf_quant_config.json as one."""
    config = json.loads((path / "config.json").read_text()).get("quantization_config")
    if config:
        return config
    modelopt = path / "hf_quant_config.json"
    if modelopt.exists():
        return {"quant_method": "modelopt", **json.loads(modelopt.read_text()).get("quantization", {})}
    return None


def scale_kind(scale_shape: list[int], weight_shape: list[int], checkpoint: Fp8Checkpoint, name: str) -> str:
    """How a stored weight scale of `scale_shape` covers a [N, K] weight: "block" ([N/128, K/128]), "tensor" (one
    value) or "channel" (N values, one an output row); a ValueError naming the weight for anything else."""
    n, k = weight_shape
    if checkpoint.quantization == "fp8_block":
        blocks = (-(-n // BLOCK), -(-k // BLOCK))
        if tuple(scale_shape) != blocks:
            raise ValueError(
                f"{name}: block scales of shape {tuple(scale_shape)} for a [{n}, {k}] weight; expected {blocks}"
            )
        return "block"
    if math.prod(scale_shape) == 1:
        return "tensor"
    if math.prod(scale_shape) == n:
        return "channel"
    raise ValueError(f"{name}: a weight scale of shape {tuple(scale_shape)} for a [{n}, {k}] weight is neither per tensor "
                     "nor per output channel")  # fmt: skip


def weight_scales(scale: torch.Tensor, weight_shape: list[int], checkpoint: Fp8Checkpoint, name: str) -> torch.Tensor:
    """The checkpoint's weight scale in the op's layout: [N] per channel (a tensor's repeated), or [N/128, K/128]."""
    kind = scale_kind(list(scale.shape), list(weight_shape), checkpoint, name)
    scale = scale.float()
    if kind == "block":
        return scale.contiguous()
    return scale.reshape(1).expand(weight_shape[0]).contiguous() if kind == "tensor" else scale.reshape(-1).contiguous()


def dequantized(weight8: torch.Tensor, scale: torch.Tensor, quantization: str, dtype: torch.dtype) -> torch.Tensor:
    """W = W8 * scale, in `dtype`: scales in the op's layout (weight_scales), [N] or [N/128, K/128] for `fp8_block`."""
    if quantization == "fp8_block":
        n, k = weight8.shape
        scale = scale.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
        return (weight8.float() * scale).to(dtype)
    return (weight8.float() * scale[:, None]).to(dtype)


def load_fp8_directory(path: Path, checkpoint: Fp8Checkpoint, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model of an FP8 checkpoint directory, on `device` in `dtype`, its quantized linears marked (module
    docstring) and `model.compiled_llm_quantization` set to the CompileConfig.quantization it runs as."""
    model = plain_model(path, dtype, device)
    config = model.config
    tensors = read_tensors(path, device, "FP8")
    state, marked, static_inputs, mtp = {}, {}, 0, 0
    for name, tensor in tensors.items():
        if is_mtp_tensor(name, config.num_hidden_layers):  # not built by transformers: mtp_weights.load_mtp_weights
            mtp += 1
            continue
        if name.endswith(SCALE_SUFFIXES):
            static_inputs += name.endswith(".input_scale")
            continue
        if tensor.dtype == FP8:
            prefix = name.removesuffix(".weight")
            scale = tensors.get(f"{prefix}.{checkpoint.scale_name}")
            if scale is None or not name.endswith(".weight"):
                raise ValueError(f"{path}: {name} is float8 but has no {prefix}.{checkpoint.scale_name}")
            if tensor.dim() != 2:
                raise ValueError(f"{path}: {name} is a {tensor.dim()}-D float8 tensor; FP8 checkpoints load 2-D "
                                 "linear weights (experts stored as one float8 tensor are not supported yet)")  # fmt: skip
            scale = weight_scales(scale, tensor.shape, checkpoint, name)
            marked[name] = (tensor.contiguous(), scale)
            tensor = dequantized(tensor, scale, checkpoint.quantization, dtype)
        elif tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1:
            # Another float8 (e5m2, e4m3fnuz, ...) has scales this loader does not apply: cast alone, it is wrong.
            raise ValueError(f"{path}: {name} is stored as {tensor.dtype}; FP8 checkpoints load float8_e4m3fn weights "
                             "only")  # fmt: skip
        elif tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    load_state(model, state, path, set(marked), "float8")
    for name, (weight8, scale) in marked.items():
        parameter = model.get_parameter(name)
        parameter.fp8_weight, parameter.fp8_scale = weight8, scale
    if mtp:
        log.info("%s: %d tensors of multi-token-prediction layers set aside (compiled_llm.mtp_weights)", path, mtp)
    if static_inputs:
        log.info("%s: %d static input scales not used: activations are quantized per token at run time", path,
                 static_inputs)  # fmt: skip
    log.info("%s: %s, %d linears loaded as float8 (run as quantization=%r)", path, checkpoint.description, len(marked),
             checkpoint.quantization)  # fmt: skip
    model.compiled_llm_quantization = checkpoint.quantization
    return model.eval()


def resolve_quantization(requested: str, model: torch.nn.Module, quantize_lm_head: bool) -> tuple[str, str]:
    """(quantization, why) for CompileConfig.quantization `requested` and `model`: `auto` is the checkpoint's
    format (an FP8 or MXFP4 checkpoint loaded by load_fp8_directory or mxfp4_checkpoint.load_mxfp4_directory),
    `none` for a float one; an explicit value that contradicts the checkpoint is a ValueError naming both."""
    checkpoint = getattr(model, "compiled_llm_quantization", None)
    if checkpoint is None and getattr(getattr(model, "config", None), "quantization_config", None):
        method = model.config.quantization_config
        method = method.get("quant_method") if isinstance(method, dict) else getattr(method, "quant_method", method)
        raise ValueError(f"the model carries a quantization_config ({method}) that transformers applied when loading "
                         "it; compiled-llm reads quantized checkpoints itself: pass the directory "
                         "(LLM('path/to/dir') or compiled_llm.model_source.load_model) instead of the loaded model")  # fmt: skip
    if checkpoint == "gguf" and requested == "auto" and next(model.parameters()).device.type != "cuda":
        return "none", ("auto: a GGUF file's dequantized weights, off CUDA (int4_linear's kernels run on CUDA; on a "
                        "CPU its reference dequantizes every call: quantization='gguf' keeps the blocks anyway)")  # fmt: skip
    if requested == "auto":
        resolved = checkpoint or "none"
        if quantize_lm_head and resolved == "none":
            raise ValueError("quantize_lm_head=True needs a quantization; quantization='auto' found a float "
                             "checkpoint: pass quantization='fp8'")  # fmt: skip
        return resolved, f"auto: {f'a checkpoint stored as {checkpoint!r}' if checkpoint else 'a float checkpoint'}"
    if checkpoint == "gguf" and requested != "gguf":  # its weights are dequantized too: any format runs
        return requested, "requested (the GGUF file's dequantized weights)"
    if checkpoint is not None and requested != checkpoint:
        raise ValueError(f"quantization={requested!r} contradicts the checkpoint, whose weights are stored as "
                         f"{checkpoint!r}: leave quantization='auto' (or pass {checkpoint!r})")  # fmt: skip
    return requested, "requested"
