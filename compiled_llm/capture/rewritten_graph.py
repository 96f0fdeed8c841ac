"""Rewritten graphs on disk: a warm start loads the graph as the passes left it, with neither torch.export nor
the passes (issue 23).

An entry lives inside the graph-cache entry of the graph it was rewritten from (`graphs/<graph key>/rewritten/
<key>.pkl`), so whatever removes that graph (a failed self-check, `cache clear`) removes its rewrites too. It holds:
the graph's nodes (op, name, target by its qualified name, arguments), the graph-level metadata the runtime reads,
the passes' results for the report, where each tensor attribute comes from, and the recipes the passes built
tensors from weights with (fx_passes/derived_weights.py). It holds no tensor derived from weights: a load takes the
model's own parameters and buffers by name and replays the recipes over them (quantizing, fusing), so a model with
other weights computes with its own. The only tensors stored are constants that tracing itself created.

The key adds to the graph key (the model's code, config, parameter shapes and dtypes) everything else the passes
read: the CompileConfig (but cache_dir), max_seq_len, the device, library versions and the code of the passes and
ops. A graph that cannot be described this way (an attribute that is neither the model's, a recipe's nor tracing's)
is not stored, and compiles as before. A loaded graph is self-checked unless `verify=False` (compiled_model.py),
and an entry whose graph fails there, or anywhere before its first token, is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.fx
from torch import nn

from compiled_llm.capture.graph_cache import attribute_tensor, function_digest, why_uncacheable
from compiled_llm.capture.graph_encoding import (
    UnstorableGraph,
    decode_nodes,
    encode_nodes,
    pickled,
    place,
    tensor_attributes,
    unpickled,
)
from fx_passes.derived_weights import derived_names, rebuild
from fx_passes.quantized_reference import WEIGHT_RECORDS

log = logging.getLogger("compiled_llm.capture")

FORMAT = 1


def rewrite_key(graph_key: str, config, max_seq_len: int, device: torch.device, model: nn.Module) -> str:
    """What, beside the captured graph, decides what the passes make of it."""
    from compiled_llm.compiled_artifact import code_digest
    from fx_passes import DEFAULT_PIPELINE, registered_passes
    from fx_passes.derived_weights import registered_recipes

    functions = hashlib.sha256()  # passes and recipes as they run: one registered or patched outside fx_passes too
    passes = registered_passes()
    for name in config.passes if config.passes is not None else DEFAULT_PIPELINE:
        functions.update(name.encode())
        function_digest(passes[name], functions)
    for name, fn in sorted(registered_recipes().items()):
        functions.update(name.encode())
        function_digest(fn, functions)
    # An FP8 checkpoint's tensors ride on its float parameters (fp8_checkpoint.py): which ones have them decides
    # what fuses and what is taken as stored.
    fp8_tensors = [(name, list(p.fp8_weight.shape), str(p.fp8_weight.dtype), list(p.fp8_scale.shape))
                   for name, p in model.named_parameters() if hasattr(p, "fp8_weight")]  # fmt: skip
    parts = {
        "functions": functions.hexdigest(),
        "fp8_checkpoint": fp8_tensors,
        "format": FORMAT,
        "graph": graph_key,
        "config": config.model_dump(mode="json", exclude={"cache_dir"}),
        "max_seq_len": max_seq_len,
        "device": str(device.type),
        "versions": {name: _version(name) for name in ("torch", "triton", "flashinfer")},
        "env": {name: os.environ.get(name) for name in ("TRITON_INTERPRET", "COMPILED_LLM_DISABLE_PDL")},
        "code": [code_digest(), hashlib.sha256(Path(__file__).read_bytes()).hexdigest()],
    }
    if config.parallel_ranks > 1:  # each rank's graph holds its own shards
        from compiled_llm.parallel_ranks import parallel_rank

        parts["rank"] = parallel_rank(config)[0]
    if device.type == "cuda":
        parts["gpu"] = [torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    for dist in (module, f"{module}-python"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


# -- the cache -------------------------------------------------------------------------------------------------------


class RewrittenGraphCache:
    """The rewritten graph of one compile: `load()` it, or run the passes and `store()` what they made. Inactive
    (load gives None, store does nothing) without a graph cache, for a model the graph cache does not key, and
    where the graph cache may not be read."""

    def __init__(self, model: nn.Module, config, max_seq_len: int, device: torch.device, graph_cache):
        from compiled_llm.capture.export import FlatTokenForward
        from compiled_llm.capture.graph_cache import graph_key  # looked up at the call: tests replace it

        self.path: Path | None = None
        self.graph_key: str | None = None
        self.loaded = False
        self.pass_results: list = []
        self._model = model
        if graph_cache is None or graph_cache.unreadable or why_uncacheable(model) is not None:
            return
        try:
            self.graph_key = graph_key(model, config.max_num_tokens)
        except Exception:  # noqa: BLE001  (capture_model says why the graph cache passes this model by)
            return
        key = rewrite_key(self.graph_key, config, max_seq_len, device, model)
        self.path = graph_cache.root / self.graph_key / "rewritten" / f"{key}.pkl"
        self._root = FlatTokenForward(model)  # what the captured graph's attribute names start from

    def load(self):
        """The CapturedModel of the stored rewritten graph over this model's weights, or None (a miss, or an entry
        that cannot be used: removed, with a warning)."""
        from compiled_llm.capture.export import CapturedModel

        if self.path is None or not self.path.exists():
            return None
        start = time.perf_counter()
        try:
            entry = unpickled(self.path.read_bytes())
            if entry.get("format") != FORMAT:
                raise ValueError(f"format {entry.get('format')}, expected {FORMAT}")
            graph = decode_nodes(entry["nodes"])
        except Exception as error:  # noqa: BLE001  (a corrupt or foreign entry: run the passes, and replace it)
            log.warning("rewritten graph %s cannot be used (%s: %s); running the passes", self.path,
                        type(error).__name__, error)  # fmt: skip
            self.remove()
            return None
        try:
            gm = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
            for target, kind, source, shape, dtype in entry["attributes"]:
                if source == "model":
                    value = attribute_tensor(self._root, target)
                    if value is None or tuple(value.shape) != shape or value.dtype != dtype:
                        raise ValueError(f"the model's {target} is not a {dtype} tensor of shape {list(shape)}")
                else:
                    value, device = entry["constants"][target]
                    value = value.to(device)
                place(gm, target, kind, value)
            gm.meta.update(entry["graph_meta"])
            rebuild(gm, entry["recipes"])
            gm.graph = graph
            gm.recompile()
        except Exception as error:  # noqa: BLE001  (out of memory while quantizing, say: the entry may be sound)
            log.warning("rewritten graph %s could not be rebuilt over this model (%s: %s); running the passes",
                        self.path, type(error).__name__, error)  # fmt: skip
            return None
        self.loaded, self.pass_results = True, entry["pass_results"]
        source = "rewritten graph from the graph cache (no torch.export, no passes)"
        return CapturedModel(gm, **entry["captured"], seconds=time.perf_counter() - start, source=source,
                             cache_key=self.graph_key)  # fmt: skip

    def remove(self) -> None:
        """Drop this compile's entry (it failed after loading: the next compile runs the passes and stores anew)."""
        if self.path is not None:
            _remove(self.path)

    def tracing_constants(self, gm: torch.fx.GraphModule) -> dict[int, torch.Tensor] | None:
        """id -> the captured graph's tensors that tracing created (not the model's), before the passes; None where
        nothing will be stored. The tensors are held, so no tensor made later can take one of their ids."""
        if self.path is None:
            return None
        try:
            return {id(v): v for name, _, v in tensor_attributes(gm) if attribute_tensor(self._root, name) is not v}
        except UnstorableGraph as error:
            log.info("rewritten graph not stored: %s", error)
            return None

    def store(self, captured, tracing_constants: dict[int, torch.Tensor] | None, pass_results: list) -> bool:
        """Store the rewritten `captured.gm`, if its captured graph is in the graph cache; whether it is stored now.
        A graph it cannot describe is not (logged at info)."""
        path = self.path
        if tracing_constants is None or path is None or not path.parents[1].is_dir():  # its graph was not stored
            return False
        if path.exists():
            return True
        described = {"architecture": captured.architecture, "num_layers": captured.num_layers,
                     "vocab_size": captured.vocab_size, "logits_dtype": captured.logits_dtype}  # fmt: skip
        try:
            data = pickled(_describe(captured.gm, self._root, tracing_constants, pass_results, described))
        except UnstorableGraph as error:
            log.info("rewritten graph not stored: %s", error)
            return False
        try:
            path.parent.mkdir(exist_ok=True)  # not its graph's entry: one a failed self-check just removed stays gone
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
            os.close(fd)
            try:
                Path(tmp).write_bytes(data)
                os.replace(tmp, path)  # atomic: a concurrent compile or a killed one never leaves half an entry
            finally:
                _remove(Path(tmp))
        except Exception as error:  # noqa: BLE001  (the compile goes on; the next warm start runs the passes)
            log.warning("could not store the rewritten graph at %s (%s: %s)", path, type(error).__name__, error)
            return False
        return True


@contextlib.contextmanager
def removed_on_failure(cache: Callable[[], RewrittenGraphCache | None]) -> Iterator[None]:
    """Remove the loaded entry of `cache()` if the block raises (a graph that cannot compile, capture or pass its
    self-check would otherwise fail every later compile of the same model and config)."""
    try:
        yield
    except Exception:
        loaded = cache()
        if loaded is not None and loaded.loaded:
            log.warning("removed the rewritten graph %s: the compile failed after loading it", loaded.path)
            loaded.remove()
        raise


def _describe(gm: torch.fx.GraphModule, root: nn.Module, tracing_constants: dict[int, torch.Tensor], pass_results: list,
              captured: dict) -> dict:  # fmt: skip
    if gm.meta.get("unstorable"):  # a pass's say: what it made depends on more than the recipes replay
        raise UnstorableGraph(gm.meta["unstorable"])
    derived = derived_names(gm)
    attributes, constants = [], {}
    for target, kind, value in tensor_attributes(gm):
        if target in derived:
            continue  # replayed
        if attribute_tensor(root, target) is value:
            attributes.append((target, kind, "model", tuple(value.shape), value.dtype))
        elif tracing_constants.get(id(value)) is value:
            attributes.append((target, kind, "constant", tuple(value.shape), value.dtype))
            constants[target] = (value.detach().cpu(), str(value.device))
        else:
            raise UnstorableGraph(f"attribute {target} is neither the model's, made by a recipe, nor tracing's")
    entry = {
        "format": FORMAT,
        "nodes": encode_nodes(gm),
        "attributes": attributes,
        "recipes": gm.meta.get("derived_weights", []),
        "graph_meta": {k: v for k, v in gm.meta.items() if k != "derived_weights" and k not in WEIGHT_RECORDS},
        "pass_results": pass_results,
        "captured": captured,
        "constants": constants,
    }
    return entry


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
