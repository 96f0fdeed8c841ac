"""A rewritten graph as plain data, for rewritten_graph.py: its nodes (op, name, target by qualified name, arguments)
and its tensor attributes (name, kind), and a pickling that refuses any tensor or module where none may be."""

from __future__ import annotations

import importlib
import io
import pickle

import torch
import torch.fx
from torch import nn


class UnstorableGraph(Exception):
    """A rewritten graph this module cannot store faithfully (the reason is logged; it compiles as usual)."""


# -- nodes ---------------------------------------------------------------------------------------------------------


class _NodeRef(str):
    """An argument that is another node (by name)."""


def _encode_target(target) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return f"op:{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"hop:{target.name()}"
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if module and name and _decode_target(f"py:{module}:{name}") is target:
        return f"py:{module}:{name}"
    raise UnstorableGraph(f"the graph calls {target!r}, which cannot be named for a later process")


def _decode_target(code: str):
    kind, _, rest = code.partition(":")
    if kind == "op":
        namespace, name, overload = rest.split(".")
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    if kind == "hop":
        return getattr(torch.ops.higher_order, rest)
    if kind == "py":
        module, _, name = rest.partition(":")
        value = importlib.import_module(module)
        for part in name.split("."):
            value = getattr(value, part)
        return value
    return code  # a placeholder's, get_attr's or output's target


def encode_nodes(gm: torch.fx.GraphModule) -> list[tuple]:
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            raise UnstorableGraph(f"node {node.name} calls the submodule {node.target}")
        args = torch.fx.node.map_arg(node.args, lambda n: _NodeRef(n.name))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: _NodeRef(n.name))
        val = node.meta.get("val") if node.op == "placeholder" else None
        val = (val.dtype, val.dim()) if isinstance(val, torch.Tensor) else None  # what compiled_artifact's key reads
        nodes.append((node.op, node.name, _encode_target(node.target), args, kwargs, node.meta.get("stack_trace"), val))
    return nodes


def decode_nodes(nodes: list[tuple]) -> torch.fx.Graph:
    graph, env = torch.fx.Graph(), {}

    def resolve(value):
        if isinstance(value, _NodeRef):
            return env[str(value)]
        if isinstance(value, (list, tuple)):
            resolved = [resolve(v) for v in value]
            return resolved if isinstance(value, list) else tuple(resolved)
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(resolve(value.start), resolve(value.stop), resolve(value.step))
        return value

    for op, name, target, args, kwargs, stack_trace, val in nodes:
        node = graph.create_node(op, _decode_target(target), resolve(args), resolve(kwargs), name=name)
        if node.name != name:
            raise UnstorableGraph(f"node {name} was renamed {node.name}")
        if stack_trace is not None:
            node.meta["stack_trace"] = stack_trace
        if val is not None:
            dtype, dim = val
            node.meta["val"] = torch.empty((1,) * dim, dtype=dtype, device="meta")
        env[name] = node
    return graph


# -- tensor attributes -----------------------------------------------------------------------------------------------


def _owner(root: nn.Module, target: str, create: bool = False) -> tuple[nn.Module, str]:
    *path, attr = target.split(".")
    owner = root
    for part in path:
        child = owner._modules.get(part)
        if child is None:
            if not create:
                raise AttributeError(target)
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    return owner, attr


def tensor_attributes(gm: torch.fx.GraphModule) -> list[tuple[str, str, torch.Tensor]]:
    """(target, kind, tensor) of every tensor attribute of `gm`, in registration order: parameters, buffers
    (kind "buffer" or "buffer-non-persistent"), then plain tensor attributes the graph reads."""
    found = [(name, "parameter", p) for name, p in gm.named_parameters(remove_duplicate=False)]
    for name, b in gm.named_buffers(remove_duplicate=False):
        owner, attr = _owner(gm, name)
        found.append((name, "buffer" if attr not in owner._non_persistent_buffers_set else "buffer-non-persistent", b))
    known = {name for name, _, _ in found}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in known:
            owner, attr = _owner(gm, node.target)
            value = getattr(owner, attr)
            if not isinstance(value, torch.Tensor):
                raise UnstorableGraph(f"get_attr {node.target} reads a {type(value).__name__}, not a tensor")
            found.append((node.target, "attribute", value))
            known.add(node.target)
    return found


def place(root: nn.Module, target: str, kind: str, value: torch.Tensor) -> None:
    owner, attr = _owner(root, target, create=True)
    if kind == "parameter":
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        owner.register_parameter(attr, value)
    elif kind.startswith("buffer"):
        owner.register_buffer(attr, value, persistent=kind == "buffer")
    else:
        setattr(owner, attr, value)


class _PlainPickler(pickle.Pickler):
    """Pickles the entry but refuses any tensor or module (metadata or an argument holding the model's numbers)."""

    def persistent_id(self, obj):
        if isinstance(obj, (torch.Tensor, nn.Module)):
            raise UnstorableGraph(f"its metadata or arguments hold a {type(obj).__name__}")


def pickled(entry: dict) -> bytes:
    buffer = io.BytesIO()
    _PlainPickler(buffer, protocol=5).dump({k: v for k, v in entry.items() if k != "constants"})
    plain = buffer.getvalue()
    return pickle.dumps({"plain": plain, "constants": entry["constants"]}, protocol=5)


def unpickled(data: bytes) -> dict:
    outer = pickle.loads(data)
    return {**pickle.loads(outer["plain"]), "constants": outer["constants"]}
