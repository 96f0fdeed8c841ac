"""Captured graphs on disk: a later compile of the same model loads its graph instead of running torch.export.

An entry is torch.export's own serialization of the captured program without its weights: the graph, its
symbolic shapes and the constants tracing created. A load takes the weights (and buffers) from the model being
compiled, so an entry never holds a tensor derived from a checkpoint, and a model with other weights but the
same code and config hits and computes with its own weights.

The key is everything else the graph depends on: the model's config (Hugging Face models only: for other modules
no config describes what the code computes), its parameter and buffer names, shapes, dtypes and device, the code
of every function and class in the modules that define its layers and in the transformers modules every forward
runs (masks, RoPE, forward's decorators, the base classes: a monkeypatched function changes it), compiled-llm's
capture code, max_num_tokens, and the torch and transformers versions. A model whose forward is replaced on an
instance, or that has forward hooks, is not cached at all (`why_uncacheable`). An entry that cannot be read is
removed with a warning: the model is captured again and stored anew.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("compiled_llm.capture")

FORMAT = 2  # 2: the program pickled (1: as JSON, which took 3x as long to read)
# The capture code, and the canonical ops it routes attention and experts to.
_OPS = Path(__file__).parents[2] / "custom_ops"
_CAPTURE_CODE = [Path(__file__).parent, _OPS / "attention" / "op.py", _OPS / "moe" / "op.py"]
# transformers' code that every model's forward runs besides its own modeling file: masks, RoPE, the decorators on
# forward, the base classes' methods
_TRANSFORMERS_MODULES = ("transformers.masking_utils", "transformers.modeling_rope_utils", "transformers.utils.generic",
                         "transformers.modeling_utils", "transformers.modeling_layers", "transformers.cache_utils",
                         "transformers.activations", "transformers.integrations.moe", "transformers.utils.deprecation",
                         "transformers.integrations.hub_kernels", "transformers.utils.output_capturing")  # fmt: skip


def why_uncacheable(model: nn.Module) -> str | None:
    """Why a captured graph of `model` cannot be reused by key (None: it can)."""
    from transformers import PretrainedConfig

    if not isinstance(getattr(model, "config", None), PretrainedConfig):
        return "not a Hugging Face model: no config says what its code computes"
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return "global forward hooks are registered"
    for name, module in model.named_modules():
        if "forward" in vars(module):
            return f"the forward of {name or 'the model'} is replaced on the instance"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{name or 'the model'} has forward hooks"
    return None


class UndescribedValue(Exception):
    """A value the key cannot describe (the model is then not cached)."""


def _code_digest(code: types.CodeType, digest) -> None:
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_digest(const, digest)
        else:
            digest.update(_stable_repr(const).encode())


def _stable_repr(value) -> str:
    """repr() without what changes between processes: the order of a set (string hashing is seeded)."""
    if isinstance(value, (set, frozenset)):
        return "{" + ",".join(sorted(map(_stable_repr, value))) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(map(_stable_repr, value)) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(sorted(f"{_stable_repr(k)}:{_stable_repr(v)}" for k, v in value.items())) + "}"
    return repr(value)


def _shallow_repr(value, depth: int = 0) -> str:
    """repr() of plain values and containers of them; other objects by their type (a default argument that is a
    sentinel object, say)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        return repr(value)
    if depth < 4 and isinstance(value, (tuple, list)):
        return "(" + ",".join(_shallow_repr(v, depth + 1) for v in value) + ")"
    if depth < 4 and isinstance(value, dict):
        return "{" + ",".join(sorted(f"{_shallow_repr(k, depth + 1)}:{_shallow_repr(v, depth + 1)}"
                                     for k, v in value.items())) + "}"  # fmt: skip
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def function_digest(function: types.FunctionType, digest, seen: set | None = None) -> None:
    """A function as it runs: its code, defaults and closure, and those of what it wraps (a decorator's wrapper
    hides the body it calls in __wrapped__ or in its closure); each function once (closures can be cycles)."""
    seen = set() if seen is None else seen
    while isinstance(function, types.FunctionType) and id(function) not in seen:
        seen.add(id(function))
        _code_digest(function.__code__, digest)
        digest.update(_shallow_repr((function.__defaults__, function.__kwdefaults__)).encode())
        for cell in function.__closure__ or ():
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(content, types.FunctionType):
                function_digest(content, digest, seen)
            elif isinstance(content, functools.partial):
                function_digest(content.func, digest, seen)
            else:
                digest.update(type(content).__qualname__.encode())
        function = getattr(function, "__wrapped__", None)


def _module_code_digest(module: types.ModuleType, digest) -> None:
    """`module`'s source file and every function and class method in it as they are now (patched or not)."""
    path = getattr(module, "__file__", None)
    if path:
        digest.update(Path(path).read_bytes())
    for name, value in sorted(vars(module).items()):
        functions = []
        if isinstance(value, types.FunctionType):
            functions = [value]
        elif isinstance(value, type) and value.__module__ == module.__name__:
            functions = [v for _, v in sorted(vars(value).items()) if isinstance(v, types.FunctionType)]
        for function in functions:
            digest.update(name.encode())
            function_digest(function, digest)


_MODULE_INTERNALS = set(vars(nn.Module()))  # parameters, buffers, submodules, hooks, training: keyed elsewhere


def _instance_digest(model: nn.Module, digest) -> None:
    """What each module of `model` holds beside its tensors and submodules (a scaling computed at __init__, PEFT's
    adapter scalings and merged state): values the traced graph bakes in. Raises UndescribedValue for a value it
    cannot describe."""
    from transformers import GenerationConfig, PretrainedConfig

    for name, module in model.named_modules(remove_duplicate=False):
        for attribute, value in sorted(vars(module).items()):
            if attribute in _MODULE_INTERNALS or isinstance(value, (PretrainedConfig, GenerationConfig)):
                continue  # the config is keyed as a whole; generation settings are not in the graph
            digest.update(f"{name}.{attribute}=".encode())
            digest.update(_plain_repr(value, f"{name or 'model'}.{attribute}").encode())


def _plain_repr(value, where: str) -> str:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return repr(value)
    if isinstance(value, enum.Enum):  # transformers 5.25 keeps the kernels package's Mode flag on the model
        return f"{type(value).__module__}.{type(value).__qualname__}.{value.value!r}"
    if isinstance(value, (tuple, list, set, frozenset)):
        return _stable_repr([_plain_repr(v, where) for v in value] if not isinstance(value, (set, frozenset))
                            else {_plain_repr(v, where) for v in value})  # fmt: skip
    if isinstance(value, dict):
        return _stable_repr({_plain_repr(k, where): _plain_repr(v, where) for k, v in value.items()})
    if isinstance(value, torch.Tensor):  # bound from the live model at a load: its kind only
        return f"tensor{tuple(value.shape)}{value.dtype}{value.device}"
    if isinstance(value, (types.FunctionType, functools.partial)):
        digest = hashlib.sha256()
        function_digest(value.func if isinstance(value, functools.partial) else value, digest)
        if isinstance(value, functools.partial):
            digest.update(_plain_repr((value.args, value.keywords), where).encode())
        return digest.hexdigest()
    if isinstance(value, nn.Module) and next(iter(value.parameters()), None) is None \
            and next(iter(value.buffers()), None) is None:  # fmt: skip
        # A module held as a value, without tensors: the `kernels` package's per-model function wrappers
        # (transformers' `_kernel_funcs`): its class's forward (with the function it wraps) and what it holds.
        digest = hashlib.sha256(f"{type(value).__module__}.{type(value).__qualname__}".encode())
        function_digest(type(value).forward, digest)
        for attribute, inner in sorted(vars(value).items()):
            if attribute not in _MODULE_INTERNALS:
                inner = inner.__func__ if isinstance(inner, types.MethodType) else inner  # a forward `kernelize` set
                digest.update(f"{attribute}={_plain_repr(inner, where)}".encode())
        return digest.hexdigest()
    raise UndescribedValue(f"{where} is a {type(value).__name__}, which the graph cache's key cannot describe")


def _shared_names(model: nn.Module) -> list[list[str]]:
    """Names that reach one tensor (tied embeddings, a module used twice): the graph reads one of them for all."""
    groups: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        groups.setdefault(id(tensor), []).append(name)
    return sorted(sorted(names) for names in groups.values() if len(names) > 1)


def _private_config_values(model: nn.Module) -> list:
    """The settings configs keep out of their JSON (`_attn_implementation_internal`, `_experts_implementation...`)."""
    from transformers import PretrainedConfig

    configs = {
        id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)
    }
    return sorted(
        (type(config).__name__, key, repr(value))
        for config in configs.values()
        for key, value in vars(config).items()
        if key.startswith("_") and (value is None or isinstance(value, (bool, int, float, str)))
    )


def graph_key(model: nn.Module, max_num_tokens: int) -> str:
    """The cache key of `model`'s captured graph (see the module docstring); raises UndescribedValue where a module
    holds a value it cannot describe."""
    import transformers

    digest = hashlib.sha256()
    parts = {
        "format": FORMAT,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "max_num_tokens": max_num_tokens,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": model.config.to_json_string(use_diff=False),
        "state": [
            (n, tuple(t.shape), str(t.dtype), str(t.device)) for n, t in model.state_dict(keep_vars=True).items()
        ],
        "non_persistent": sorted(n for n, _ in model.named_buffers(remove_duplicate=False)),
        "shared": _shared_names(model),
        "config_private": _private_config_values(model),
    }
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    _instance_digest(model, digest)
    for path in sorted(p for root in _CAPTURE_CODE for p in ([root] if root.is_file() else root.glob("*.py"))):
        digest.update(path.read_bytes())
    modules = {type(m).__module__ for m in model.modules()} | set(_TRANSFORMERS_MODULES)
    for name in sorted(modules):
        if name in sys.modules:
            _module_code_digest(sys.modules[name], digest)
    return digest.hexdigest()[:32]


class GraphCache:
    """Entries under `<cache_dir>/graphs/<key>/`: program.pkl (torch.export's serialized graph, pickled: its JSON
    form reads 3x slower), constants.pt, example_inputs.pt, entry.json (what it is, for `cache ls`)."""

    def __init__(self, cache_dir: str | Path, unreadable: str | None = None):
        """`unreadable`: why this compile may store its graph but not load one (the self-check that guards a loaded
        graph cannot hold its configuration)."""
        self.root = Path(cache_dir).expanduser() / "graphs"
        self.unreadable = unreadable

    def load(self, key: str, root: nn.Module) -> torch.export.ExportedProgram | None:
        """The program stored under `key` over the tensors of `root` (the exported module: its parameters, buffers
        and tensor attributes, by name); None on a miss or an entry that cannot be read (a warning)."""
        weights = {**root.state_dict(keep_vars=True), **dict(root.named_buffers(remove_duplicate=False))}
        from torch._export.serde import serialize as serde

        entry = self.root / key
        if not entry.is_dir():
            return None
        try:
            program = pickle.loads((entry / "program.pkl").read_bytes())
            if not isinstance(program, serde.ExportedProgram):
                raise TypeError(f"program.pkl holds a {type(program).__name__}")
            constants = serde.deserialize_torch_artifact((entry / "constants.pt").read_bytes())
            for name in constants:  # buffers and tensor attributes: the live model's; only tracing's own are stored
                live = weights.get(name, attribute_tensor(root, name))
                if live is not None:
                    constants[name] = live
            state = {name: weights[name] for name in _state_names(program)}
            return serde.ExportedProgramDeserializer().deserialize(
                program, state, constants, (entry / "example_inputs.pt").read_bytes()
            )
        except Exception as error:  # noqa: BLE001  (a corrupt or foreign entry: capture again, and replace it)
            log.warning("graph cache entry %s cannot be used (%s: %s); capturing the model again", entry,
                        type(error).__name__, error)  # fmt: skip
            shutil.rmtree(entry, ignore_errors=True)  # entries appear whole (a rename): this one will not mend
            return None

    def store(self, key: str, program: torch.export.ExportedProgram, description: dict) -> bool:
        """Write the entry for `key` (not its weights) atomically; whether it is there now (a failure to write is a
        warning)."""
        from torch._export.serde import serialize as serde

        entry = self.root / key
        if entry.is_dir():
            return True
        try:
            artifact = serde.ExportedProgramSerializer().serialize(_without_weights(program))
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
            (staging / "program.pkl").write_bytes(pickle.dumps(artifact.exported_program, protocol=5))
            (staging / "constants.pt").write_bytes(artifact.constants)
            (staging / "example_inputs.pt").write_bytes(artifact.example_inputs)
            (staging / "entry.json").write_text(json.dumps({**description, "torch": torch.__version__}, indent=1))
            try:
                os.rename(staging, entry)  # atomic; another process that wrote the same key first wins
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
            return entry.is_dir()
        except Exception as error:  # noqa: BLE001  (the compile goes on; the next one captures again)
            log.warning("graph cache: could not store %s (%s: %s)", entry, type(error).__name__, error)
            return False


def attribute_tensor(root: nn.Module, name: str):
    """The tensor at dotted `name` under `root`, or None."""
    value = root
    for part in name.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def remove(cache_dir: str | Path, key: str) -> None:
    """Drop the entry of `key` (a self-check found its graph computing something else)."""
    shutil.rmtree(Path(cache_dir).expanduser() / "graphs" / key, ignore_errors=True)


def _state_names(program) -> list[str]:
    """The parameter and persistent-buffer names a serialized program's graph reads."""
    names = []
    for spec in program.graph_module.signature.input_specs:
        for kind in ("parameter", "buffer"):
            value = getattr(spec, kind, None)
            if value is not None and (kind == "parameter" or value.persistent):
                names.append(value.parameter_name if kind == "parameter" else value.buffer_name)
    return names


def _without_weights(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`program` with empty meta tensors for its state (serialize() writes the state; the entry must not hold it)."""
    state = {}
    for name, tensor in program.state_dict.items():
        empty = torch.empty_like(tensor, device="meta")
        state[name] = (
            nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
        )
    return torch.export.ExportedProgram(
        root=program.graph_module, graph=program.graph, graph_signature=program.graph_signature, state_dict=state,
        range_constraints=program.range_constraints, module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs, constants=program.constants, verifiers=program.verifiers,
    )  # fmt: skip
