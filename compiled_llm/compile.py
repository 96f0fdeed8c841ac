"""Compile the rewritten graph: TorchInductor with the custom ops opaque, one graph for every step shape."""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from compiled_llm import compiled_artifact
from compiled_llm.capture.attention_routing import CaptureError
from compiled_llm.runtime.model_runner import STEP_INPUTS
from fx_passes.causal_mask import user_line

log = logging.getLogger("compiled_llm")

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
    """Calls the graph with inputs by name; compiled once, at the first call, for every token count.

    With a `cache_dir` (Inductor only), the compiled graph is stored as torch's AOT-compiled function and a later
    compile of the same graph loads it, skipping Dynamo (compiled_artifact.py). `source` says where the code came
    from: "stored artifact", "compiled" (and stored), or None (torch.compile as usual, nothing stored)."""

    def __init__(self, gm: torch.fx.GraphModule, backend: str, inductor_options: dict | None = None, device_type="cpu",
                 cache_dir: str | Path | None = None):  # fmt: skip
        self.gm = gm
        self.backend = backend
        self.input_names = [node.target for node in gm.graph.nodes if node.op == "placeholder"]
        self.source = None
        self.artifact_path: Path | None = None  # the stored compiled graph, where one is used
        self._aot = None  # the wrapper to AOT-compile at the first call, when the artifact path is taken
        self._static_sizes = None  # of the step inputs, for a function that runs without Dynamo's guards
        if backend == "inductor":
            defaults = DEFAULT_CUDA_INDUCTOR_OPTIONS if device_type == "cuda" else {}
            self._options = {**defaults, **(inductor_options or {})}
            # gm.forward, not gm: GraphModule.__call__'s exception handler walks the traceback with a
            # generator, which Dynamo then tries to trace, so any error inside the compiled graph (a CUDA
            # OOM, an op's own error) reached the user as "Attempt to trace generator".
            self._fn = torch.compile(gm.forward, backend="inductor", fullgraph=True, options=self._options)
            if cache_dir is not None:
                # No guards: a loaded function checks nothing, the artifact's key covers what they would have.
                options = {**self._options, "guard_filter_fn": lambda guards: [False for _ in guards]}
                # torch 2.11 gives a compiled function its `aot_compile` only under this flag (on by default later).
                flag = {"enable_aot_compile": True} if hasattr(torch._dynamo.config, "enable_aot_compile") else {}
                with torch._dynamo.config.patch(**flag):
                    aot = torch.compile(compiled_artifact.run_graph, backend="inductor", fullgraph=True, options=options)
                if hasattr(aot, "aot_compile") and hasattr(torch.compiler, "load_compiled_function"):
                    self._aot, self._cache_dir = aot, cache_dir
        else:
            self._fn = gm
        self.inductor_options = dict(inductor_options or {})
        self._compiled_once = False

    @staticmethod
    def _dynamic_dims(name: str) -> tuple[int, ...]:
        # The KV cache's block count is unbacked too: the cache is sized after a profiling step.
        if name == "block_table":  # [sequences, blocks of the longest sequence]
            return (0, 1)
        if name in STEP_INPUTS or name.startswith("kv_cache_"):
            return (0,)
        return ()

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.backend == "inductor":
            for name in self.input_names:
                _mark_unbacked(inputs[name], self._dynamic_dims(name))
        args = tuple(inputs[name] for name in self.input_names)
        with torch.no_grad():
            if self._compiled_once:
                if self._static_sizes is not None:
                    self._check_static_sizes(args)
                return self._fn(*args)[0]
            try:  # the first call compiles: name the op and the user's options if it fails
                out = self._first_call(args)
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

    def _first_call(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Load the stored function or AOT-compile and store it; else (no cache_dir, or this torch cannot save
        one) torch.compile as usual."""
        if self._aot is None:
            if self.backend == "inductor":
                register_custom_op_fallbacks(self.gm)
            return self._fn(*args)[0]
        step_inputs = [(name, arg, self._dynamic_dims(name)) for name, arg in zip(self.input_names, args)]
        key = compiled_artifact.artifact_key(self.gm, self._options, args[0].device, step_inputs)
        path = self.artifact_path = compiled_artifact.path_for(self._cache_dir, key)
        compiled = compiled_artifact.load(path)
        if compiled is not None:
            try:
                out = compiled(self.gm, *args)[0]
            except Exception as error:  # noqa: BLE001  (stored by code the key did not tell apart: compile afresh)
                log.warning("compiled graph %s failed at its first call (%s: %s); removed, compiling afresh", path,
                            type(error).__name__, error)  # fmt: skip
                compiled_artifact.remove(path)
            else:
                self._fn, self.source = functools.partial(compiled, self.gm), "stored artifact"
                self._static_sizes = self._sizes(args)
                return out
        # Before Inductor runs, not before a stored function loads: importing Inductor's lowerings takes seconds.
        register_custom_op_fallbacks(self.gm)
        try:
            compiled = self._aot.aot_compile(((self.gm, *args), {}))
        except Exception as error:  # noqa: BLE001  (the usual compile decides, below)
            # Whatever failed (the graph, or saving-related limits of this torch's AOT compile), the usual compile
            # decides: it succeeds without storing, or fails with the error the caller explains.
            log.warning("AOT-compiling the graph failed (%s: %s); compiling it as usual, without storing it",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")  # fmt: skip
            return self._fn(*args)[0]
        try:
            compiled_artifact.store(compiled, path)
        except Exception as error:  # noqa: BLE001  (it still runs: only the next warm start is slower)
            log.warning("storing the compiled graph at %s failed (%s: %s)", path, type(error).__name__, error)
        self._fn, self.source = functools.partial(compiled, self.gm), "compiled"
        self._static_sizes = self._sizes(args)
        return self._fn(*args)[0]

    def _sizes(self, args) -> list:
        """The step inputs' sizes and dtypes, None where a size is dynamic. The KV cache's tensors are left out:
        they are made once, in one layout, and there are two a layer."""
        return [(name, tuple(None if i in self._dynamic_dims(name) else n for i, n in enumerate(arg.shape)), arg.dtype)
                for name, arg in zip(self.input_names, args) if not name.startswith("kv_cache_")]  # fmt: skip

    def _check_static_sizes(self, args) -> None:
        """A compiled function without guards would run wrong code for a size it was compiled as a constant, where
        Dynamo would have recompiled: refuse instead."""
        sizes = self._sizes(args)
        if sizes != self._static_sizes:
            name, got, expected = next(
                (a[0], a[1:], b[1:]) for a, b in zip(sizes, self._static_sizes) if a != b
            )  # fmt: skip
            raise RuntimeError(
                f"graph input {name!r} has sizes/dtype {got}, the compiled graph was compiled for {expected} (None: "
                "any size): this step does not fit it; compile with graph_cache=False to compile without storing"
            )

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
