"""Inductor's compiled graph stored as torch's AOT-compiled function (issue 23, warm start).

A warm start otherwise re-runs Dynamo over the rewritten graph before Inductor's on-disk cache hits (seconds);
a stored function is loaded and called, no Dynamo. It is compiled from `run_graph`, not from `gm.forward`: the
GraphModule's generated class cannot be saved, so the graph is an argument and its weights are inputs of the
compiled code, never baked into the file. A model with the same graph and other weights loads the same file.

The function is compiled with its guards dropped (a loaded one checks nothing), so the key covers everything a
guard would have checked: the graph's code, its inputs', parameters' and buffers' metadata, the Inductor options,
the library versions, the device, and the code that writes the graph (custom_ops, fx_passes, compile.py).
Files live under `cache_dir/compiled/<key>.bin`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

log = logging.getLogger("compiled_llm")


def run_graph(gm: torch.fx.GraphModule, *args):
    """What is compiled: module-level, so a new process finds it by name when it loads the function."""
    return gm.forward(*args)


def path_for(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir).expanduser() / "compiled" / f"{key}.bin"


@functools.cache
def code_digest() -> str:
    """The source of the code that decides what the graph computes and how it compiles: a change recompiles."""
    import custom_ops
    import fx_passes
    from compiled_llm import compile as compile_module

    files = [Path(compile_module.__file__)]
    for package in (custom_ops, fx_passes):
        files += sorted(Path(package.__file__).parent.rglob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.parent.name}/{path.name}".encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _tensor_meta(value: torch.Tensor) -> tuple:
    return tuple(value.shape), str(value.dtype), value.stride(), value.device.type


def _graph_tensors(gm: torch.fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """The tensors the graph reads (its get_attr nodes), by name: a module that holds other attributes, or holds these
    in another order (a graph loaded by rewritten_graph.py), compiles to the same code."""
    tensors = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in tensors:
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                tensors[node.target] = value
    return sorted(tensors.items())


def artifact_key(
    gm: torch.fx.GraphModule,
    inductor_options: dict,
    device: torch.device | str,
    step_inputs: Iterable[tuple[str, torch.Tensor, tuple[int, ...]]] = (),
) -> str:
    """sha256 of what the compiled function's dropped guards would have checked. `step_inputs`: the call's inputs
    as (name, tensor, dynamic dims); their other dims are static in the compiled code (the KV cache's block size,
    heads, head size, dtype), and placeholders added by the passes carry no meta to read them from."""
    device = torch.device(device)
    parts = [gm.code]
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            meta = (str(val.dtype), val.dim()) if isinstance(val, torch.Tensor) else None
            parts.append(f"placeholder {node.target} {meta}")
    storages: dict[int, str] = {}  # which tensors share memory: Dynamo compiles aliased inputs as one
    for name, value in _graph_tensors(gm):
        alias = storages.setdefault(value.untyped_storage().data_ptr(), name)
        parts.append(f"tensor {name} {_tensor_meta(value)} {alias}")
    for name, value, dynamic in step_inputs:
        shape = tuple(None if i in dynamic else size for i, size in enumerate(value.shape))
        parts.append(f"input {name} {shape} {value.dtype} {value.device.type} {value.is_contiguous()}")
    parts.append(repr(sorted((k, repr(v)) for k, v in inductor_options.items())))
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    parts.append(f"torch {torch.__version__} triton {triton_version} device {device.type}")
    if device.type == "cuda":
        parts.append(f"{torch.cuda.get_device_name(device)} {torch.cuda.get_device_capability(device)}")
    parts.append(code_digest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load(path: Path) -> Callable | None:
    """The stored function, or None if there is none. A file that cannot be loaded (truncated, corrupt, written by
    another torch) is removed with a warning: the caller compiles afresh and stores a new one."""
    if not path.exists():
        return None
    try:
        from torch._dynamo.aot_compile import AOTCompiledFunction

        with open(path, "rb") as f:
            fn = torch.compiler.load_compiled_function(f)
        if not isinstance(fn, AOTCompiledFunction):
            raise TypeError(f"holds a {type(fn).__name__}, not a compiled function")
        return fn
    except Exception as error:  # noqa: BLE001  (never in the way of a compile: recompiling is the fallback)
        log.warning("compiled graph %s could not be loaded (%s: %s); removed, compiling afresh", path,
                    type(error).__name__, error)  # fmt: skip
        remove(path)
        return None


def store(compiled, path: Path) -> None:
    """Save atomically: a temporary file in the same directory, then renamed, so that a concurrent compile or a
    killed process never leaves half a file under the key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        compiled.save_compiled_function(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
