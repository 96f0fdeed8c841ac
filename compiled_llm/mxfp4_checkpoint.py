"""MXFP4 checkpoints (GPT-OSS): the experts' weights dequantized by transformers, their stored bytes kept beside them.

GPT-OSS checkpoints (config.json `quantization_config: {"quant_method": "mxfp4"}`) store each MoE layer's experts in
OCP microscaling FP4: `<experts>.gate_up_proj_blocks` uint8 [E, 2I, H/32, 16] with `gate_up_proj_scales` uint8
[E, 2I, H/32], and `down_proj_blocks` [E, H, I/32, 16] with `down_proj_scales` [E, H, I/32]. Each output row is cut
into groups of 32 inputs: 16 bytes of e2m1 values, two a byte (the low nibble the even element, the high nibble the
odd one), and one e8m0 scale byte s, W = e2m1 * 2^(s - 127). Biases, attention, router, embeddings and lm_head are
stored plain (bf16).

The model is loaded by transformers itself with `Mxfp4Config(dequantize=True)`, so each experts parameter holds the
format library's own dequantization in the model's dtype (GptOssExperts computes x @ W: `gate_up_proj` [E, H, 2I],
`down_proj` [E, I, H]) and the module still runs as itself. The stored bytes are attached to those parameters in the
[E, N, K] orientation the kernels read (N outputs, K inputs, contiguous along K):
- `gate_up_proj.mxfp4_blocks` uint8 [E, 2I, H/2] and `gate_up_proj.mxfp4_scales` uint8 [E, 2I, H/32];
- `down_proj.mxfp4_blocks` uint8 [E, H, I/2] and `down_proj.mxfp4_scales` uint8 [E, H, I/32].
An experts weight the checkpoint stores in float stays plain. The model then looks like a float one (no
quantization_config) with `compiled_llm_quantization = "mxfp4"`. Experts without their blocks or scales (or of other
shapes), or an MXFP4 config on another architecture, are a ValueError naming what is wrong.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from compiled_llm.checkpoint_files import tensor_files
from custom_ops.moe.mxfp4 import GROUP  # inputs per scale; 16 bytes of two e2m1 values

log = logging.getLogger("compiled_llm")

# transformers' MXFP4 integration dequantizes GPT-OSS's experts only (its [E, K, N] parameters): another
# architecture's fused experts, e.g. Mixtral's [E, N, K], would load transposed.
ARCHITECTURES = ("gpt_oss",)
PROJECTIONS = ("gate_up_proj", "down_proj")


def is_mxfp4_checkpoint(quantization_config: dict | None) -> bool:
    """Whether config.json's `quantization_config` describes an MXFP4 checkpoint."""
    return bool(quantization_config) and quantization_config.get("quant_method") == "mxfp4"


def _shape(files: dict[str, Path], name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(files[name], framework="pt") as f:
        return tuple(f.get_slice(name).get_shape())


def _stored_mxfp4(path: Path, config, files: dict[str, Path]) -> dict[str, tuple[str, str]]:
    """The experts parameters `path` stores in MXFP4, each with its blocks' and scales' tensor names, their shapes
    checked against the parameter's; a ValueError names what the experts lack."""
    import transformers as tf

    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"{path}: an MXFP4 checkpoint of {config.model_type!r}: MXFP4 experts are read for "
                         f"{', '.join(ARCHITECTURES)} only")  # fmt: skip
    with torch.device("meta"):  # names and shapes only, before transformers reads anything
        skeleton = tf.AutoModelForCausalLM.from_config(config)
    stored, missing = {}, []
    for name, parameter in skeleton.named_parameters():
        if name.rpartition(".")[2] not in PROJECTIONS or name in files:  # not an experts weight, or stored in float
            continue
        blocks, scales = f"{name}_blocks", f"{name}_scales"
        missing += [n for n in (blocks, scales) if n not in files]
        if blocks not in files or scales not in files:
            continue
        experts, k, n = parameter.shape  # x @ W
        expected = ((experts, n, k // GROUP, GROUP // 2), (experts, n, k // GROUP))
        found = (_shape(files, blocks), _shape(files, scales))
        if k % GROUP or found != expected:
            raise ValueError(f"{path}: {blocks} {found[0]} and {scales} {found[1]} do not store a [{experts}, {k}, "
                             f"{n}] {name}: expected {expected[0]} and {expected[1]}")  # fmt: skip
        stored[name] = (blocks, scales)
    if missing:
        raise ValueError(f"{path}: an MXFP4 checkpoint whose experts lack {', '.join(missing[:4])}"
                         f"{f' (and {len(missing) - 4} more)' if len(missing) > 4 else ''}")  # fmt: skip
    if not stored:
        raise ValueError(f"{path}: an MXFP4 checkpoint with no experts stored in MXFP4 (no "
                         f"{'/'.join(PROJECTIONS)} _blocks and _scales tensors)")  # fmt: skip
    return stored


def load_mxfp4_directory(path: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model of an MXFP4 checkpoint directory, on `device` in `dtype`, its experts' parameters dequantized by
    transformers and carrying the stored `mxfp4_blocks` and `mxfp4_scales` (module docstring), and
    `model.compiled_llm_quantization` set to "mxfp4"."""
    import transformers as tf
    from safetensors import safe_open

    config = tf.AutoConfig.from_pretrained(path)
    files = tensor_files(path)
    stored = _stored_mxfp4(path, config, files)  # checked first: transformers' own errors do not name the tensor
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                    quantization_config=tf.Mxfp4Config(dequantize=True))  # fmt: skip
    model = model.to(device)
    # transformers removes these itself when it dequantizes; a model still carrying them is refused later as
    # quantized by transformers (fp8_checkpoint.resolve_quantization)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        del model.hf_quantizer
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    by_file: dict[Path, list[str]] = {}
    for blocks, scales in stored.values():
        by_file.setdefault(files[blocks], []).append(blocks)
        by_file.setdefault(files[scales], []).append(scales)
    tensors = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device=device) as f:
            tensors.update({name: f.get_tensor(name) for name in names})
    for name, (blocks, scales) in stored.items():
        parameter = model.get_parameter(name)
        experts, n, groups, group_bytes = tensors[blocks].shape
        parameter.mxfp4_blocks = tensors[blocks].reshape(experts, n, groups * group_bytes).contiguous()
        parameter.mxfp4_scales = tensors[scales].contiguous()
    modules = {name.rpartition(".")[0] for name in stored}
    log.info("%s: MXFP4 checkpoint, %d experts modules kept in MXFP4 beside their dequantized weights (%s)", path,
             len(modules), dtype)  # fmt: skip
    model.compiled_llm_quantization = "mxfp4"
    return model.eval()
