"""Tensors the passes build from the model's weights (a fused QKV weight, an FP8 weight and its scales), built by
named recipes that the graph records.

A pass never registers such a tensor itself: it calls `derive(gm, recipe, *args)`, which runs the recipe (a
function of the graph module and plain arguments: attribute names, a format name) and appends the call to
`gm.meta["derived_weights"]` with the names of the attributes it made. A stored rewritten graph (compiled_llm/capture/rewritten_graph.py) keeps only these
calls, never their tensors, and a warm start replays them over the new model's own weights, in the same order and
with the same peak memory as the passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Recipe = Callable[..., None]

_RECIPES: dict[str, Recipe] = {}


def recipe(fn: Recipe) -> Recipe:
    """Register `fn(gm, *args)` as a recipe, by its module and name (a stored graph names it so)."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    if name in _RECIPES and _RECIPES[name] is not fn:
        raise ValueError(f"a recipe named {name!r} is already registered")
    _RECIPES[name] = fn
    return fn


def derive(gm: torch.fx.GraphModule, fn: Recipe, *args) -> None:
    """Run the recipe `fn` over `gm` and record the call. `args` must be plain values (str, int, float, bool, None,
    tuples and lists of them): they are stored."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    if _RECIPES.get(name) is not fn:
        raise ValueError(f"{name} is not a registered recipe (decorate it with @recipe)")
    before = _tensor_names(gm)
    fn(gm, *args)
    made = [n for n in _tensor_names(gm) if n not in before]
    gm.meta.setdefault("derived_weights", []).append((name, args, made))


def registered_recipes() -> dict[str, Recipe]:
    """Every recipe by name (a rewritten graph's key covers their code)."""
    return dict(_RECIPES)


def derived_names(gm: torch.fx.GraphModule) -> set[str]:
    """The attributes of `gm` that recipes made."""
    return {made for _, _, names in gm.meta.get("derived_weights", ()) for made in names}


def _tensor_names(gm: torch.fx.GraphModule) -> dict[str, None]:
    """The graph module's own parameters and buffers (recipes register theirs there, not in submodules)."""
    return dict.fromkeys([*gm._parameters, *gm._buffers])


def rebuild(gm: torch.fx.GraphModule, calls: list[tuple[str, tuple]]) -> None:
    """Replay recorded recipe calls over `gm` (whose attributes are another model's weights), recording them anew.
    An unknown recipe (stored by other code) raises KeyError."""
    for name, args, _ in calls:
        derive(gm, _RECIPES[name], *args)
