"""Compile the rewritten graph: TorchInductor with the custom ops opaque, one graph for every step shape."""

from __future__ import annotations

import re

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from compiled_llm.capture.attention_routing import CaptureError
from compiled_llm.runtime.model_runner import STEP_INPUTS
from fx_passes.causal_mask import user_line

# Inductor settings compiled-llm sets itself on CUDA (CompileConfig.inductor_options go over them).
# combo_kernels launches independent kernels as one: RoPE of q and k, one launch fewer per layer, which
# is what limits batch-1 decode of a small model; the tok/s it gains were within run-to-run spread on an
# H100 for SmolLM2-135M and Llama-3.1-8B (BENCHMARKS.md), and it costs no compile time there.
DEFAULT_CUDA_INDUCTOR_OPTIONS: dict = {"combo_kernels": True}


def register_custom_op_fallbacks(gm: torch.fx.GraphModule) -> list[str]:
    """Register the graph's custom ops (ours and any library's) with Inductor as fallback kernels before it
    compiles, with the layout constraint it would pick itself; returns the names newly registered.

    Inductor makes that registration at an op's first call in the graph, and torch 2.11 logs the call's
    arguments there, formatted eagerly whatever the log level. Printing an argument prints the chain of extern
    kernels that produced it, each with its inputs; an op first called deep in the graph (an FP8 model's bf16
    LM head, after 32 layers of FP8 ops whose two outputs, rows and scales, feed one consumer) makes that string
    exponential in the depth, and the compile never ends. Registered beforehand, no op is new when lowered."""
    from torch._inductor import config as inductor_config
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import FALLBACK_ALLOW_LIST, lowerings, make_fallback, tag_to_layout_constraint
    from torch._library.utils import get_layout_constraint_tag, is_builtin

    if not inductor_config.implicit_fallbacks:  # Inductor is to refuse ops it cannot lower: leave that to it
        return []
    registered, decompositions = [], select_decomp_table()
    for node in gm.graph.nodes:
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload) or is_builtin(op):
            continue
        special = op in decompositions or op.name().split(".")[0] in FALLBACK_ALLOW_LIST  # Inductor's own handling
        if op not in lowerings and not special:
            constraint = tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
            make_fallback(op, layout_constraint=constraint, warn=False)
            registered.append(str(op))
    return registered


def _mark_unbacked(tensor: torch.Tensor, dims: tuple[int, ...] = (0,)) -> None:
    # Unbacked, not merely dynamic: a dynamic size would still be specialized at 0 and 1, so a batch-1
    # decode step (one token, one sequence, one logit) would compile a second graph.
    for dim in dims:
        torch._dynamo.decorators.mark_unbacked(tensor, dim)


# Dynamo quotes the graph's generated code where it stopped: `name = torch.ops...` under the file FX gives it.
_GENERATED_LINE = re.compile(r'File "<eval_with_key>[^"]*", line \d+, in forward\n\s+(\w+) = ')


def _causes(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _caused_by(error: BaseException, kind: type) -> bool:
    return any(isinstance(e, kind) for e in _causes(error))


def _compiler_error(error: BaseException) -> bool:
    """Whether `error` comes from compiling (Dynamo, Inductor, symbolic shapes), not from running a kernel."""
    return _caused_by(error, (torch._dynamo.exc.TorchDynamoException, GuardOnDataDependentSymNode))


def _failing_node(gm: torch.fx.GraphModule, error: BaseException) -> torch.fx.Node | None:
    """The graph's node where compiling stopped, from the generated line Dynamo quotes."""
    nodes = {node.name: node for node in gm.graph.nodes}
    for e in _causes(error):
        names = [name for name in _GENERATED_LINE.findall(str(e)) if name in nodes]
        if names:
            return nodes[names[-1]]
    return None


class CompiledGraph:
    """Calls the graph with inputs by name; compiled once, at the first call, for every token count."""

    def __init__(self, gm: torch.fx.GraphModule, backend: str, inductor_options: dict | None = None, device_type="cpu"):
        self.gm = gm
        self.backend = backend
        self.input_names = [node.target for node in gm.graph.nodes if node.op == "placeholder"]
        if backend == "inductor":
            defaults = DEFAULT_CUDA_INDUCTOR_OPTIONS if device_type == "cuda" else {}
            options = {**defaults, **(inductor_options or {})}
            register_custom_op_fallbacks(gm)
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
            if self._compiled_once:
                return self._fn(*(inputs[name] for name in self.input_names))[0]
            try:  # the first call compiles: name the op and the user's options if it fails
                out = self._fn(*(inputs[name] for name in self.input_names))[0]
            except Exception as error:
                if not _compiler_error(error):
                    raise
                if self.inductor_options:
                    raise ValueError(
                        f"Inductor failed to compile the graph (inductor_options were {self.inductor_options}): {error}"
                    ) from error
                raise CaptureError(self._compile_failure(error)) from error
            self._compiled_once = True
            return out

    def _compile_failure(self, error: BaseException) -> str:
        """What failed to compile, in the user's terms: the op, its line of user code, what to change."""
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        node = _failing_node(self.gm, error)
        where = f" at {node.target} ({user_line(node) or node.name})" if node is not None else ""
        data_dependent = _caused_by(error, GuardOnDataDependentSymNode)
        advice = (
            "its sizes depend on the step's token count in a way the compiler cannot decide for every count "
            "(a -1 in a view over the tokens, a size computed from the data): write the sizes out"
            if data_dependent else "compiling stopped at this op; if the message is about shapes or dtypes, the "
            "op's inputs are not what it accepts for some token count"
        )  # fmt: skip
        return (
            f"TorchInductor could not compile the model's graph{where} ({first_line}): {advice}, or pass "
            "compile_backend='eager' to run the rewritten graph without Inductor"
        )
