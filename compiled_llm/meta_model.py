"""The model of a safetensors directory built with its parameters on the meta device, for a rank that reads only its
slices of the checkpoint (checkpoint_slices.py): `meta_model(directory)` keeps the buffers its code computes (RoPE's
frequencies), maps each parameter to its stored tensor(s) (checkpoint_keys.py) and attaches the `CheckpointSlices`
that reads them; FP8 checkpoints' e4m3 weights are marked to be read as fp8_checkpoint.load_fp8_directory reads them.
Where the slices could not be read as the whole load reads them, it says why instead, and the rank loads whole."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from compiled_llm.checkpoint_keys import SAFETENSORS_DTYPES, merged_shape, stored_keys
from compiled_llm.checkpoint_slices import CheckpointSlices, Fp8Weight, named_tensors, owning_module, stored_places
from compiled_llm.fp8_checkpoint import Fp8Checkpoint, scale_kind
from custom_ops.linear.fp8 import FP8

log = logging.getLogger("compiled_llm")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside make their parameters on the meta device and their buffers where they would."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def rank_device(device: torch.device) -> torch.device:
    """`device` with its index: a bare "cuda" is this process's current GPU (the rank's)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def tied_names(model: nn.Module) -> list[list[str]]:
    """Each parameter's names (several for tied ones: one tensor), in the model's order."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    return list(names_of.values())


def mark_fp8_weight(param: nn.Parameter, scale_shape: list[int]) -> None:
    """Give a meta parameter the FP8 tensors it will be read with (meta too), which the passes cut and fuse as they do
    a whole FP8 load's (sharding.shard_parameter)."""
    param.fp8_weight = torch.empty(param.shape, dtype=FP8, device="meta")
    param.fp8_scale = torch.empty(scale_shape, dtype=torch.float32, device="meta")


def move_buffer_to_meta(model: nn.Module, name: str, buffer: torch.Tensor) -> None:
    module, leaf = owning_module(model, name)
    module._buffers[leaf] = buffer.to("meta")  # captured on meta with the parameters; load() puts it back


def checkpoint_index(directory: Path) -> dict[str, str]:
    """Tensor key -> safetensors file of a Hugging Face directory (one file, or sharded with an index)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = directory / "model.safetensors"
    if not single.exists():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single.name)


def meta_model(directory: Path, dtype: torch.dtype | None, device: torch.device,
               fp8: Fp8Checkpoint | None = None) -> tuple[nn.Module | None, str]:  # fmt: skip
    """The model of a float safetensors directory, or with `fp8` of an FP8 checkpoint of that format (its e4m3
    weights read as fp8_checkpoint.load_fp8_directory reads them: CheckpointSlices.read_fp8), with its parameters on
    the meta device and `checkpoint_slices` attached, or (None, why not): a parameter without its tensor(s) of the
    same shape in the files, or one that transformers converts at load other than by merging experts
    (checkpoint_keys.py), or a float8 tensor not read so (_fp8_weights)."""
    import transformers as tf
    from safetensors import safe_open

    files = checkpoint_index(directory)
    if not files:
        return None, "no safetensors files"
    config = tf.AutoConfig.from_pretrained(directory)
    if fp8 is not None and hasattr(config, "quantization_config"):
        del config.quantization_config  # built plain, as load_fp8_directory builds it; its FP8 weights marked below
    dtype = dtype or getattr(config, "dtype", None) or _files_dtype(directory, files)  # as dtype="auto" takes it
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = rank_device(device)
    # load_fp8_directory builds the model on the device, from_pretrained on the CPU: the buffers computed at init
    # (RoPE's frequencies) are computed where the whole load computes them (the parameters go to meta regardless).
    with parameters_on_meta(), torch.device(device) if fp8 is not None else contextlib.nullcontext():
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    get_plan = getattr(model, "_get_dtype_plan", None)  # from_pretrained keeps these in float32; from_config does not
    plan = get_plan(dtype) if get_plan is not None else getattr(model, "_keep_in_fp32_modules", None)
    kept = [n for n, _ in model.named_parameters() if any(k in n for k in plan or ())]
    if kept and dtype != torch.float32 and fp8 is None:  # load_fp8_directory builds from the config too: no such plan
        return None, f"transformers keeps {kept[0]} (and {len(kept) - 1} more) in float32 at load"
    if (directory / "generation_config.json").exists():  # its EOS tokens and defaults, as from_pretrained reads them
        model.generation_config = tf.GenerationConfig.from_pretrained(directory)
    shapes, sizes, stored_dtypes = {}, {}, {}
    for file in sorted(set(files.values())):
        with safe_open(str(directory / file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                part = f.get_slice(key)
                shapes[key] = part.get_shape()
                stored_dtypes[key] = part.get_dtype()
                sizes[key] = math.prod(shapes[key]) * SAFETENSORS_DTYPES[part.get_dtype()].itemsize
    found, why = stored_keys(model, list(files))
    if found is None:
        return None, why
    stored_as = found.single | found.merged
    for name, experts in found.merged.items():
        shapes[name] = merged_shape(experts, shapes) or ["experts of unequal shapes"]
    keys = {}
    for names in tied_names(model):  # tied parameters share one tensor of the files
        if len(stored := [stored_as[n] for n in names if n in stored_as]) > 1:
            both = " and ".join(n for n in names if n in stored_as)
            return None, f"{both} are tied, yet each is in the files (transformers unties them if they differ)"
        stored = stored[0] if stored else None
        param = model.get_parameter(names[0])
        shape = shapes[names[0] if isinstance(stored, list) else stored] if stored is not None else None
        if stored is None or list(shape) != list(param.shape):
            why = "not in the files" if stored is None else f"stored as {list(shape)}"
            return None, f"{names[0]} {list(param.shape)} is {why}"
        place = (
            [[(files[k], k) for k in expert] for expert in stored]
            if isinstance(stored, list)
            else (files[stored], stored)
        )
        keys |= dict.fromkeys(names, place)
    buffers = {}
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in found.single:  # a persistent buffer: read as a parameter is, in its own dtype
            if list(shapes[stored_as[name]]) != list(buffer.shape):
                return None, f"the buffer {name} {list(buffer.shape)} is stored as {list(shapes[stored_as[name]])}"
            keys[name] = (files[stored_as[name]], stored_as[name])
        else:
            buffers[name] = buffer
        move_buffer_to_meta(model, name, buffer)
    fp8_weights, why = _fp8_weights(keys, shapes, stored_dtypes, fp8)
    if fp8_weights is None:
        return None, why
    dtypes = {name: t.dtype for name, t in named_tensors(model)}
    if fp8 is not None:  # load_fp8_directory rounds each float tensor to `dtype`, then copies it into the model's
        rounded = [n for n in keys if dtypes[n].is_floating_point and dtypes[n] != dtype and n not in fp8_weights]
        if rounded:
            return None, f"{rounded[0]} is built in {dtypes[rounded[0]]}, and the whole load rounds it to {dtype} first"
    for name, weight in fp8_weights.items():  # the passes cut and fuse these as the whole load's (shard_parameter)
        param = model.get_parameter(name)
        mark_fp8_weight(param, shapes[weight.scale] if weight.kind == "block" else [param.shape[0]])
        keys[weight.scale] = (files[weight.scale], weight.scale)
        dtypes[weight.scale] = SAFETENSORS_DTYPES[stored_dtypes[weight.scale]]  # made float32 as the whole load does
    model.checkpoint_slices = slices = CheckpointSlices(directory, keys, buffers, dtype, device)
    slices.dtypes, slices.fp8 = dtypes, fp8_weights
    slices.stored_bytes = sum(sizes[key] for key in {k for place in keys.values() for _, k in stored_places(place)})
    if fp8 is not None:
        model.compiled_llm_quantization = fp8.quantization  # what load_fp8_directory sets: the compile runs it so
        log.info("%s: %s, %d linears read as float8 by slices (run as quantization=%r)", directory, fp8.description,
                 len(fp8_weights), fp8.quantization)  # fmt: skip
    return model, ""


def _fp8_weights(keys: dict, shapes: dict, stored_dtypes: dict,
                 checkpoint: Fp8Checkpoint | None) -> tuple[dict[str, Fp8Weight] | None, str]:  # fmt: skip
    """The parameters stored in float8, each with its scales' key and layout, or (None, why not): one that the slices
    would not read as load_fp8_directory reads it (a linear's e4m3 weight under its own name, its scales beside)."""
    found = {}
    for name, place in keys.items():
        stored = [stored_dtypes[key] for _, key in stored_places(place)]
        if not any(d.startswith("F8") for d in stored):
            continue
        if checkpoint is None:
            return None, f"{name} is stored in float8, and the checkpoint's config names no FP8 format"
        if isinstance(place, list) or place[1] != name or stored != ["F8_E4M3"] or not name.endswith(".weight"):
            return None, f"{name} is stored in float8 as {place} ({stored}), not as an e4m3 linear weight of its own"
        scale = f"{name.removesuffix('.weight')}.{checkpoint.scale_name}"
        if scale not in shapes:
            return None, f"{name} is float8 but has no {scale}"
        try:
            kind = scale_kind(shapes[scale], shapes[name], checkpoint, name)
        except ValueError as error:
            return None, str(error)
        if kind == "channel" and list(shapes[scale]) not in ([shapes[name][0]], [shapes[name][0], 1]):
            return None, f"{scale} {list(shapes[scale])}: per-channel scales not stored one a row"
        found[name] = Fp8Weight(scale, kind, checkpoint)
    return found, ""


def _files_dtype(directory: Path, files: dict[str, str]) -> torch.dtype:
    """What from_pretrained(dtype="auto") takes where config.json names none: the first floating tensor's dtype."""
    from safetensors import safe_open

    names = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for file in dict.fromkeys(files.values()):
        with safe_open(str(directory / file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                if (found := names.get(f.get_slice(key).get_dtype())) is not None:
                    return found
    return torch.float32
