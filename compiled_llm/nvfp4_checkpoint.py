"""NVFP4 checkpoints: which format a Hugging Face directory holds, and its weights loaded without requantizing.

Formats, told apart by config.json's `quantization_config` (or ModelOpt's hf_quant_config.json), each quantized
linear W [N, K] stored as E2M1 codes, two a byte (column 2j in the low nibble), with an e4m3 scale per 16 columns:
- ModelOpt (`quant_method: modelopt`, `quant_algo: NVFP4` or the weight-only `W4A16_NVFP4`): `<linear>.weight` uint8
  [N, K/2], `.weight_scale` float8_e4m3fn [N, K/16], `.weight_scale_2` float32 (one value); W = e2m1 * (s * s2).
  Its `.input_scale` (for FP4 activations, which Hopper cannot multiply) is not used.
- compressed-tensors (`format: nvfp4-pack-quantized`, llm-compressor's NVFP4 and NVFP4A16): `<linear>.weight_packed`,
  `.weight_scale` as above and `.weight_global_scale` float32 [1], the reciprocal: W = e2m1 * (s / gs). Run as
  s * (1 / gs), which can differ from compressed-tensors' own division in the last bit of a scale.
Both run as `compiled_llm::nvfp4_linear` (custom_ops/linear/nvfp4.py), whose global scale is per output channel (a
weight's one value repeated), so fused q/k/v and gate/up keep each part's. Each quantized linear's parameter holds
the dequantized weight in the model's dtype, so the module still runs as itself, and carries the stored tensors as
`nvfp4_tensors` (codes, scales, global scales [N]), which the quantize_nvfp4 pass takes as they are. An unsupported
variant is a ValueError that names it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from compiled_llm.mtp_weights import is_mtp_tensor
from compiled_llm.quantized_directory import load_state, plain_model, read_tensors
from custom_ops.linear.nvfp4 import BLOCK, dequantize

log = logging.getLogger("compiled_llm")

SUPPORTED = ("ModelOpt NVFP4 and W4A16_NVFP4 (group_size 16), compressed-tensors nvfp4-pack-quantized (4-bit float "
             "weights in groups of 16, symmetric)")  # fmt: skip
MODELOPT_ALGORITHMS = ("NVFP4", "W4A16_NVFP4")


@dataclass(frozen=True)
class Nvfp4Checkpoint:
    codes: str  # the codes' tensor suffix
    global_name: str  # the global scale's tensor suffix
    reciprocal: bool  # the global scale stored as its reciprocal (compressed-tensors')
    unused: tuple[str, ...]  # suffixes of tensors this weight-only runtime does not read
    description: str  # for logs


# The KV cache's FP8 scales (kv_cache_quant_algo FP8, kv_cache_scheme) are not used either: the cache's dtype is
# CompileConfig.kv_cache_dtype's, its scales computed at run time.
KV_SCALES = (".k_scale", ".v_scale")
MODELOPT = Nvfp4Checkpoint(".weight", ".weight_scale_2", False, (".input_scale", *KV_SCALES), "ModelOpt NVFP4")
COMPRESSED_TENSORS = Nvfp4Checkpoint(".weight_packed", ".weight_global_scale", True,
                                     (".input_global_scale", *KV_SCALES), "compressed-tensors NVFP4")  # fmt: skip


def _unsupported(what: str) -> ValueError:
    return ValueError(f"this checkpoint's quantization ({what}) is not supported; supported NVFP4 formats: {SUPPORTED}")


def nvfp4_checkpoint_format(quantization_config: dict | None) -> Nvfp4Checkpoint | None:
    """The NVFP4 format a `quantization_config` describes; None for another; a ValueError for an NVFP4 variant that is
    not supported."""
    config = quantization_config or {}
    method = config.get("quant_method")
    if method == "modelopt" and "NVFP4" in str(config.get("quant_algo")):
        if config.get("quant_algo") not in MODELOPT_ALGORITHMS:
            raise _unsupported(f"ModelOpt quant_algo {config.get('quant_algo')!r}")
        groups = {g.get("weights", {}).get("group_size") for g in (config.get("config_groups") or {}).values()}
        if config.get("group_size", BLOCK) != BLOCK or groups - {BLOCK}:
            raise _unsupported(f"ModelOpt NVFP4 with group_size {config.get('group_size', groups)}")
        return MODELOPT
    if method == "compressed-tensors" and config.get("format") == "nvfp4-pack-quantized":
        for name, group in (config.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            found = (weights.get("num_bits"), weights.get("type"), weights.get("group_size"), weights.get("symmetric"))
            if found != (4, "float", BLOCK, True):
                raise _unsupported(f"compressed-tensors group {name}: {weights.get('num_bits')}-bit "
                                   f"{weights.get('type')} weights in groups of {weights.get('group_size')}, symmetric "
                                   f"{weights.get('symmetric')}")  # fmt: skip
        return COMPRESSED_TENSORS
    return None


def _stored_linear(tensors: dict, prefix: str, checkpoint: Nvfp4Checkpoint, path: Path) -> tuple:
    """(codes, scales, global scales [N]) in nvfp4_linear's layout for the linear `prefix`, checked."""
    try:
        codes, scales, global_scale = (tensors[prefix + part] for part in (checkpoint.codes, ".weight_scale",
                                                                           checkpoint.global_name))  # fmt: skip
    except KeyError as missing:
        raise ValueError(f"{path}: {prefix}{checkpoint.codes} has no {missing.args[0]}") from None
    n, k = codes.shape[0], 2 * codes.shape[1] if codes.dim() == 2 else 0
    if codes.dtype != torch.uint8 or codes.dim() != 2 or k % BLOCK:
        raise ValueError(f"{path}: {prefix}{checkpoint.codes} is {codes.dtype} {tuple(codes.shape)}; expected uint8 "
                         f"[N, K/2] with K a multiple of {BLOCK}")  # fmt: skip
    if scales.dtype != torch.float8_e4m3fn or tuple(scales.shape) != (n, k // BLOCK):
        raise ValueError(f"{path}: {prefix}.weight_scale is {scales.dtype} {tuple(scales.shape)} for a [{n}, {k}] "
                         f"weight; expected float8_e4m3fn [{n}, {k // BLOCK}]")  # fmt: skip
    if torch.isnan(scales.float()).any():  # e4m3's only non-finite value; the kernels would read it as 480
        raise ValueError(f"{path}: {prefix}.weight_scale holds NaN scales: the checkpoint is corrupt")
    if global_scale.numel() != 1:
        raise ValueError(f"{path}: {prefix}{checkpoint.global_name} has {global_scale.numel()} values; expected one")
    value = global_scale.float().reshape(1)
    if checkpoint.reciprocal:
        value = torch.reciprocal(value)
    return codes.contiguous(), scales.contiguous(), value.expand(n).contiguous()


def load_nvfp4_directory(path: Path, checkpoint: Nvfp4Checkpoint, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model of an NVFP4 checkpoint directory, on `device` in `dtype`, its quantized linears marked (module
    docstring) and `model.compiled_llm_quantization` set to "nvfp4"."""
    model = plain_model(path, dtype, device)
    tensors = read_tensors(path, device, "NVFP4")
    state, marked, mtp, unused = {}, {}, 0, 0
    parts = (checkpoint.codes, ".weight_scale", checkpoint.global_name)
    for name, tensor in tensors.items():
        if is_mtp_tensor(name, model.config.num_hidden_layers):
            mtp += 1
        elif name.endswith(checkpoint.unused):
            unused += 1
        elif name.endswith(checkpoint.codes) and tensor.dtype == torch.uint8:
            prefix = name.removesuffix(checkpoint.codes)
            stored = _stored_linear(tensors, prefix, checkpoint, path)
            marked[f"{prefix}.weight"] = stored
            state[f"{prefix}.weight"] = dequantize(*stored).to(dtype)
        elif not (name.endswith(parts[1:]) and f"{name.rpartition('.')[0]}{checkpoint.codes}" in tensors):
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if not marked:
        raise ValueError(f"{path}: quantization_config says {checkpoint.description}, but no tensor holds its codes "
                         f"(*{checkpoint.codes} in uint8)")  # fmt: skip
    load_state(model, state, path, set(marked), "NVFP4")
    for name, stored in marked.items():
        model.get_parameter(name).nvfp4_tensors = stored
    if mtp:
        log.info("%s: %d tensors of multi-token-prediction layers set aside (compiled_llm.mtp_weights)", path, mtp)
    if unused:
        log.info("%s: %d activation and KV-cache scales not used: activations stay in the model's dtype (weight-only "
                 "NVFP4, as on Hopper, which has no FP4 tensor cores)", path, unused)  # fmt: skip
    log.info("%s: %s, %d linears loaded as NVFP4 (run as quantization='nvfp4')", path, checkpoint.description,
             len(marked))  # fmt: skip
    model.compiled_llm_quantization = "nvfp4"
    return model.eval()
