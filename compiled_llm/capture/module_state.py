"""State a module keeps between calls: what its forward writes, and the KV caches of its own that the paged
cache replaces.

A forward that writes its buffers (or tensors kept as plain attributes) carries state from one call to the
next, which the paged runtime, running many sequences in one flat step, cannot keep per sequence. The
`module_kv_cache` pass removes the writes of a KV cache it recognises and records the cache in
`gm.meta["replaced_caches"]`; `insert_paged_attention` refuses any write left. Once compiled, those caches
are released: the paged cache holds the keys and values, and a module's cache can be a sizeable part of the
device's memory (gpt-fast's at Llama-3.1-8B's 8192 positions: 1 GiB a sequence).
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx
from torch import nn

log = logging.getLogger("compiled_llm.capture")
RELEASED = "_compiled_llm_released_caches"


def check_caches_present(model: nn.Module) -> None:
    """ValueError if an earlier compile_model released this module's own KV cache and it was not set up again."""
    empty = [name for name in model.__dict__.get(RELEASED, ()) if _tensor(model, name) is not None
             and _tensor(model, name).numel() == 0]  # fmt: skip
    if empty:
        raise ValueError(
            f"{type(model).__name__}'s own KV cache ({', '.join(empty[:4])}{', ...' if len(empty) > 4 else ''}) was "
            "released by an earlier compile_model, whose paged cache replaced it: set it up again before compiling "
            "or running the module itself (gpt-fast: model.max_seq_length = -1, then model.setup_caches(...))"
        )


def _tensor(model: nn.Module, name: str):
    owner_path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
    except AttributeError:
        return None
    value = getattr(owner, attr, None)
    return value if isinstance(value, torch.Tensor) else None


def written_state(gm: torch.fx.GraphModule) -> list[str]:
    """The module state the forward writes in place, directly or through a view or alias of it: buffers,
    parameters, and tensors kept as plain attributes (Meta's reference Llama keeps its KV cache so)."""
    roots = {}  # node -> the attribute it is (a view of)
    written = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            roots[node] = node.target
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in roots:
            roots[node] = roots[node.args[0]]  # one of the views unbind, split or chunk return
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            for arg, value in zip(node.target._schema.arguments, node.args):
                if isinstance(value, torch.fx.Node) and value in roots and arg.alias_info is not None:
                    if arg.alias_info.is_write:
                        written.add(roots[value])
                    else:  # a view of it (or itself: a cast to its own dtype)
                        roots[node] = roots[value]
    return sorted(written)


def release_replaced_caches(model: nn.Module, gm: torch.fx.GraphModule) -> str | None:
    """Free the KV caches of the module's own that the paged cache replaced (each becomes an empty tensor on
    its device, in the module and in `gm`, which shares its tensors); what was freed, for the report, or None."""
    freed, count, released = 0, 0, []
    for name in gm.meta.get("replaced_caches", ()):
        _delete(gm, name)  # module_kv_cache records only caches whose every use it removed
        owner_path, _, attr = name.removeprefix("model.").rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        tensor = getattr(owner, attr, None)
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            continue
        freed += tensor.numel() * tensor.element_size()
        count += 1
        empty = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        if attr in owner._parameters:  # a cache kept as a Parameter(requires_grad=False)
            owner._parameters[attr] = nn.Parameter(empty, requires_grad=False)
        elif attr in owner._buffers:
            owner._buffers[attr] = empty
        else:
            setattr(owner, attr, empty)
        released.append(name.removeprefix("model."))
    if not count:
        return None
    model.__dict__[RELEASED] = released  # a later compile_model of this module says what happened to them
    what = f"{count} tensors, {freed / 2**20:.1f} MiB on {tensor.device}"
    log.info("released the module's own KV cache (%s): the paged KV cache replaces it", what)
    return what


def _delete(root: nn.Module, name: str) -> None:
    owner_path, _, attr = name.rpartition(".")
    try:
        owner = root.get_submodule(owner_path) if owner_path else root
    except AttributeError:
        return
    for table in (owner._parameters, owner._buffers, owner.__dict__):
        table.pop(attr, None)
