"""The command line's CompileConfig: every field a flag (`--max-seq-len 2048`), `--config FILE.yaml` for any of them
(flags override the file), errors that name the field; and `--dtype`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from compiled_llm.config import CompileConfig, unknown_fields


# vLLM's and TensorRT-LLM's short spellings of the parallel sizes.
SHORT_FLAGS = {"tensor_parallel_size": ("--tp",), "expert_parallel_size": ("--ep",)}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compile config (CompileConfig fields)")
    group.add_argument("--config", metavar="FILE.yaml", help="CompileConfig fields in a YAML mapping (flags override)")
    for name, field in CompileConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        first_sentence = re.split(r"\.(?:\s|$)", field.description or "")[0]  # not at dots inside names
        help_text = f"{first_sentence} (default: {default})"
        flags = [f"--{name.replace('_', '-')}", *SHORT_FLAGS.get(name, ())]
        group.add_argument(*flags, dest=name, metavar="VALUE", help=help_text)


def config_file(path: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"--config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of CompileConfig fields, got {type(data).__name__}")
    problem = unknown_fields(data)
    if problem:
        raise ValueError(f"--config {path}: {problem}")
    return data


def config_from_args(args: argparse.Namespace, ranks: bool = False) -> CompileConfig:
    """The CompileConfig of the flags and --config; `ranks`: the command may run over several ranks (serve: its
    engine core's LLM starts them, rank_workers.py)."""
    from pydantic import ValidationError

    fields = config_file(args.config) if getattr(args, "config", None) else {}
    flags = {name: getattr(args, name) for name in CompileConfig.model_fields if getattr(args, name) is not None}
    for name in ("passes", "cuda_graph_batch_sizes"):  # tuple fields: comma-separated on the command line
        if isinstance(flags.get(name), str):
            flags[name] = tuple(p.strip() for p in flags[name].split(",") if p.strip())
    try:
        config = CompileConfig(**{**fields, **flags})
    except ValidationError as error:  # one line per bad field, naming it
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}{e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        )
        raise ValueError(f"invalid configuration: {problems}") from None
    if config.parallel_ranks > 1 and not ranks:  # they compile or time the model in this process alone
        command = getattr(args, "command", "this command")
        raise ValueError(
            f"--tensor-parallel-size / --expert-parallel-size {config.parallel_ranks}: {command} runs on one rank for "
            "now (serve and bench --mode latency or throughput run over several); from Python, LLM(model, tensor_parallel_size=N) starts the other ranks "
            "itself, or run each rank under torchrun (examples/tensor_parallel.py)"
        )
    return config


def torch_dtype(name: str | None):
    import torch

    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype must name a torch dtype (bfloat16, float16, float32), got {name!r}")
    return dtype
