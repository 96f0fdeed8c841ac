"""Compile the rewritten graph: TorchInductor with the custom ops opaque, one graph for every step shape."""

from __future__ import annotations

import torch
import torch.fx

from compiled_llm.runtime.model_runner import STEP_INPUTS

# Inductor settings compiled-llm sets itself (CompileConfig.inductor_options go over them). None so far:
# combo_kernels (RoPE of q and k in one kernel) and coordinate_descent_tuning measured within run-to-run
# noise at batch 1 on an H100 (BENCHMARKS.md).
DEFAULT_INDUCTOR_OPTIONS: dict = {}


def _mark_unbacked(tensor: torch.Tensor, dims: tuple[int, ...] = (0,)) -> None:
    # Unbacked, not merely dynamic: a dynamic size would still be specialized at 0 and 1, so a batch-1
    # decode step (one token, one sequence, one logit) would compile a second graph.
    for dim in dims:
        torch._dynamo.decorators.mark_unbacked(tensor, dim)


class CompiledGraph:
    """Calls the graph with inputs by name; compiled once, at the first call, for every token count."""

    def __init__(self, gm: torch.fx.GraphModule, backend: str, inductor_options: dict | None = None):
        self.gm = gm
        self.backend = backend
        self.input_names = [node.target for node in gm.graph.nodes if node.op == "placeholder"]
        if backend == "inductor":
            options = {**DEFAULT_INDUCTOR_OPTIONS, **(inductor_options or {})}
            self._fn = torch.compile(gm, backend="inductor", fullgraph=True, options=options)
        else:
            self._fn = gm

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.backend == "inductor":
            # The KV cache's block count is unbacked too: the cache is sized after a profiling step.
            for name in self.input_names:
                if name == "block_table":  # [sequences, blocks of the longest sequence]
                    _mark_unbacked(inputs[name], (0, 1))
                elif name in STEP_INPUTS or name.startswith("kv_cache_"):
                    _mark_unbacked(inputs[name])
        with torch.no_grad():
            return self._fn(*(inputs[name] for name in self.input_names))[0]
