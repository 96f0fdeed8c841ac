"""AWQ and GPTQ checkpoints (4-bit weights, W4A16): which format a Hugging Face directory holds, and its weights loaded
without requantizing.

Formats, told apart by config.json's `quantization_config`, each linear stored as `<linear>.qweight`, `.qzeros`,
`.scales` (and GPTQ's `.g_idx`), for a weight W [N, K] (out, in) in groups of G input columns:
- AutoAWQ GEMM (`quant_method: awq`, `version: gemm`, `zero_point: true`): qweight int32 [K, N/8], each word 8 output
  channels, nibble i (bits 4i..4i+3) holding channel 8c + AWQ_ORDER[i]; qzeros int32 [K/G, N/8] in the same order;
  scales [K/G, N]. W[n, k] = (q - z) s.
- GPTQ (`quant_method: gptq`, AutoGPTQ / GPTQModel, `desc_act: false`): qweight int32 [K/8, N], each word 8 input
  columns, nibble i holding column 8r + i; qzeros int32 [K/G, N/8], nibble i channel 8c + i, holding z - 1
  (`checkpoint_format: gptq`, AutoGPTQ's convention) or z (`gptq_v2`); scales [K/G, N]; g_idx [K] = k // G.
  W[n, k] = (q - z) s.
Both run as `compiled_llm::int4_linear` (custom_ops/linear/int4.py), whose layout is [N, K/2] bytes (column 2j in the
low nibble) with scales and zeros [N, K/G]: the codes are moved, never rounded again. Each quantized linear's parameter
holds the dequantized weight in the model's dtype, so the module still runs as itself, and carries the checkpoint's
tensors in int4_linear's layout as `int4_tensors` (qweight, scales, zeros, group size, the quantization they run
as), which the quantize_int4 pass takes as they are under that quantization. An unsupported variant is a ValueError that names it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from compiled_llm.mtp_weights import is_mtp_tensor
from compiled_llm.quantized_directory import load_state, plain_model, read_tensors
from custom_ops.linear.int4 import dequantize, pack_codes

log = logging.getLogger("compiled_llm")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds channel AWQ_ORDER[i] of its 8
SUPPORTED = "AutoAWQ GEMM (4-bit, zero_point), GPTQ (4-bit, desc_act false, checkpoint_format gptq or gptq_v2)"
PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


@dataclass(frozen=True)
class Int4Checkpoint:
    quantization: str  # the CompileConfig.quantization it runs as: "int4_awq" or "int4_gptq"
    group_size: int
    zero_offset: int  # what the stored zeros are below z: 1 for AutoGPTQ's convention, else 0
    description: str  # for logs


def _unsupported(what: str) -> ValueError:
    return ValueError(f"this checkpoint's quantization ({what}) is not supported; supported 4-bit formats: {SUPPORTED}")


def int4_checkpoint_format(quantization_config: dict | None) -> Int4Checkpoint | None:
    """The 4-bit format a `quantization_config` describes; None for another method; a ValueError for a variant of
    AWQ or GPTQ that is not supported."""
    method = (quantization_config or {}).get("quant_method")
    if method not in ("awq", "gptq"):
        return None
    config = quantization_config
    bits = config.get("bits", config.get("w_bit"))
    if bits != 4:
        raise _unsupported(f"{method} with {bits}-bit weights")
    group = config.get("group_size", config.get("q_group_size"))
    if not isinstance(group, int) or group <= 0 or group % 2:
        raise _unsupported(f"{method} with group_size {group} (per-channel -1 included)")
    if method == "awq":
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm" or config.get("zero_point", True) is not True:
            raise _unsupported(f"AWQ version {version!r}, zero_point {config.get('zero_point')}")
        return Int4Checkpoint("int4_awq", group, 0, f"AutoAWQ GEMM, groups of {group}")
    if config.get("desc_act"):
        raise _unsupported("GPTQ with desc_act true (columns quantized out of order)")
    checkpoint_format = config.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise _unsupported(f"GPTQ checkpoint_format {checkpoint_format!r}")
    offset = 1 if checkpoint_format == "gptq" else 0
    return Int4Checkpoint("int4_gptq", group, offset, f"GPTQ ({checkpoint_format}), groups of {group}")


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> its 8 nibbles a word, nibble i (bits 4i..4i+3) at position 8w + i: int16 [..., 8 W]."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    return ((words[..., None] >> shifts) & 15).to(torch.int16).flatten(-2)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K], zeros [N, K/G]) of AutoAWQ's qweight [K, N/8] and qzeros [K/G, N/8] (module docstring)."""
    channel_of = torch.tensor(AWQ_ORDER, device=qweight.device)  # nibble i -> channel within the word's 8
    order = torch.argsort(channel_of)  # channel j -> the nibble that holds it

    def columns(packed: torch.Tensor) -> torch.Tensor:
        nibbles = _nibbles(packed).view(packed.shape[0], -1, 8)
        return nibbles[:, :, order].flatten(1)  # [rows, N], channel order

    return columns(qweight).t(), columns(qzeros).t()


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, zero_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K], zeros [N, K/G]) of GPTQ's qweight [K/8, N] and qzeros [K/G, N/8] (module docstring)."""
    codes = _nibbles(qweight.t())  # [N, K/8] -> [N, K]: nibble i of a word is input column 8r + i
    zeros = _nibbles(qzeros) + zero_offset  # [K/G, N]
    if (zeros > 15).any():
        # AutoGPTQ stores z - 1, so a zero point of 0 wraps to 15 and reads back as 16. Every GPTQ runtime (AutoGPTQ's,
        # exllama's, vLLM's kernels) computes with that 16, so the checkpoint means it; int4_linear takes it as is.
        log.warning("GPTQ zero points of 16 in %d groups (AutoGPTQ's wrapped z - 1 for a zero point of 0): run as "
                    "stored, as other GPTQ runtimes do", int((zeros > 15).sum()))  # fmt: skip
    return codes, zeros.t()


def _stored_linear(tensors: dict, prefix: str, checkpoint: Int4Checkpoint, path: Path):
    """(qweight, scales, zeros) in int4_linear's layout for the linear `prefix`, from its stored tensors."""
    try:
        qweight, qzeros, scales = (tensors[prefix + part] for part in PARTS[:3])
    except KeyError as missing:
        raise ValueError(f"{path}: {prefix} has a qweight but no {missing.args[0]}") from None
    if checkpoint.quantization == "int4_awq":
        k, n = qweight.shape[0], qweight.shape[1] * 8
        codes, zeros = unpack_awq(qweight, qzeros)
    else:
        k, n = qweight.shape[0] * 8, qweight.shape[1]
        codes, zeros = unpack_gptq(qweight, qzeros, checkpoint.zero_offset)
        g_idx = tensors.get(prefix + ".g_idx")
        expected = torch.arange(k, device=qweight.device) // checkpoint.group_size
        if g_idx is not None and not torch.equal(g_idx.long(), expected):
            raise ValueError(f"{path}: {prefix}.g_idx does not put column k in group k // {checkpoint.group_size} "
                             "(act-order GPTQ): not supported")  # fmt: skip
    groups = k // checkpoint.group_size
    if k % checkpoint.group_size or tuple(scales.shape) != (groups, n) or tuple(zeros.shape) != (n, groups):
        raise ValueError(f"{path}: {prefix}: scales {tuple(scales.shape)} and zeros for a [{n}, {k}] weight in groups "
                         f"of {checkpoint.group_size}; expected [{groups}, {n}]")  # fmt: skip
    return pack_codes(codes), scales.t().contiguous(), zeros.to(torch.uint8).contiguous()


def load_int4_directory(path: Path, checkpoint: Int4Checkpoint, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model of an AWQ or GPTQ checkpoint directory, on `device` in `dtype`, its quantized linears marked (module
    docstring) and `model.compiled_llm_quantization` set to the CompileConfig.quantization it runs as."""
    model = plain_model(path, dtype, device)
    tensors = read_tensors(path, device, "4-bit")
    state, marked, mtp = {}, {}, 0
    for name, tensor in tensors.items():
        if is_mtp_tensor(name, model.config.num_hidden_layers):
            mtp += 1
        elif name.endswith(".qweight"):
            prefix = name.removesuffix(".qweight")
            stored = _stored_linear(tensors, prefix, checkpoint, path)
            marked[f"{prefix}.weight"] = stored
            state[f"{prefix}.weight"] = dequantize(*stored, checkpoint.group_size).to(dtype)
        elif not name.endswith(PARTS):
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if not marked:
        raise ValueError(f"{path}: quantization_config says {checkpoint.description}, but no tensor is a qweight")
    load_state(model, state, path, set(marked), "4-bit")
    for name, stored in marked.items():
        model.get_parameter(name).int4_tensors = (*stored, checkpoint.group_size, checkpoint.quantization)
    if mtp:
        log.info("%s: %d tensors of multi-token-prediction layers set aside (compiled_llm.mtp_weights)", path, mtp)
    log.info("%s: %s, %d linears loaded as 4-bit (run as quantization=%r)", path, checkpoint.description, len(marked),
             checkpoint.quantization)  # fmt: skip
    model.compiled_llm_quantization = checkpoint.quantization
    return model.eval()
