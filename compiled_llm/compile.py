"""Compile the rewritten graph: TorchInductor with the custom ops opaque, one graph for every step shape."""

from __future__ import annotations

import torch
import torch.fx

from compiled_llm.runtime.model_runner import STEP_INPUTS

# Inductor settings compiled-llm sets itself on CUDA (CompileConfig.inductor_options go over them).
# combo_kernels launches independent kernels as one: RoPE of q and k, one launch fewer per layer, which
# is what limits batch-1 decode of a small model; the tok/s it gains were within run-to-run spread on an
# H100 for SmolLM2-135M and Llama-3.1-8B (BENCHMARKS.md), and it costs no compile time there.
DEFAULT_CUDA_INDUCTOR_OPTIONS: dict = {"combo_kernels": True}


def _mark_unbacked(tensor: torch.Tensor, dims: tuple[int, ...] = (0,)) -> None:
    # Unbacked, not merely dynamic: a dynamic size would still be specialized at 0 and 1, so a batch-1
    # decode step (one token, one sequence, one logit) would compile a second graph.
    for dim in dims:
        torch._dynamo.decorators.mark_unbacked(tensor, dim)


class CompiledGraph:
    """Calls the graph with inputs by name; compiled once, at the first call, for every token count."""

    def __init__(self, gm: torch.fx.GraphModule, backend: str, inductor_options: dict | None = None, device_type="cpu"):
        self.gm = gm
        self.backend = backend
        self.input_names = [node.target for node in gm.graph.nodes if node.op == "placeholder"]
        if backend == "inductor":
            defaults = DEFAULT_CUDA_INDUCTOR_OPTIONS if device_type == "cuda" else {}
            options = {**defaults, **(inductor_options or {})}
            # gm.forward, not gm: GraphModule.__call__'s exception handler walks the traceback with a
            # generator, which Dynamo then tries to trace, so any error inside the compiled graph (a CUDA
            # OOM, an op's own error) reached the user as "Attempt to trace generator".
            self._fn = torch.compile(gm.forward, backend="inductor", fullgraph=True, options=options)
        else:
            self._fn = gm
        self.inductor_options = dict(inductor_options or {})
        self._compiled_once = False

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.backend == "inductor":
            # The KV cache's block count is unbacked too: the cache is sized after a profiling step.
            for name in self.input_names:
                if name == "block_table":  # [sequences, blocks of the longest sequence]
                    _mark_unbacked(inputs[name], (0, 1))
                elif name in STEP_INPUTS or name.startswith("kv_cache_"):
                    _mark_unbacked(inputs[name])
        with torch.no_grad():
            if self._compiled_once or not self.inductor_options:
                return self._fn(*(inputs[name] for name in self.input_names))[0]
            try:  # the first call compiles: name the user's options if Inductor fails with them
                out = self._fn(*(inputs[name] for name in self.input_names))[0]
            except torch._dynamo.exc.BackendCompilerFailed as error:
                raise ValueError(
                    f"Inductor failed to compile the graph (inductor_options were {self.inductor_options}): {error}"
                ) from error
            self._compiled_once = True
            return out
