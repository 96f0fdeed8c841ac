"""Where a rewritten graph first departs from the module: the self-check's diagnosis of a mismatch.

The graph as captured computes what the module computes (torch.export traces it op for op). When the
self-check finds different logits, one prompt is run again through the rewritten graph, eagerly and keeping
every op's result, step by step as the self-check ran it, and beside it the captured graph on the whole
prompt. Ops the passes left in place keep their names, so each is compared with its counterpart over the
tokens of the step (the captured graph's rows at those positions); the first one, in the captured graph's
order, whose result differs is the op named, with its line and the module it belongs to.
"""

from __future__ import annotations

import torch
import torch.fx

from compiled_llm.runtime import ScheduledChunk, Sequence
from fx_passes.causal_mask import user_line


class _Recorder(torch.fx.Interpreter):
    """Runs a graph eagerly and keeps the tensor each op returns (not weights: get_attr is not an op)."""

    def __init__(self, gm: torch.fx.GraphModule, values: dict):
        super().__init__(gm)
        self.values = values

    def run_node(self, node):
        out = super().run_node(node)
        if node.op == "call_function" and isinstance(out, torch.Tensor):
            self.values[node.name] = (node.target, out.detach().clone())  # a later in-place op must not change it
        return out


class _RecordingGraph:
    """Stands in for the runner's CompiledGraph: the rewritten graph run eagerly, each step's values kept."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.input_names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        self.steps: list[dict] = []

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        values = {}
        with torch.no_grad():
            out = _Recorder(self.gm, values).run(*(inputs[name] for name in self.input_names))[0]
        self.steps.append(values)
        return out


def _rows(expected: torch.Tensor, actual: torch.Tensor, length: int, start: int, count: int):
    """The captured value's part that corresponds to a step's `count` tokens from position `start`: the
    whole value if shapes agree and the step is the whole prompt, else the rows along the dimension that
    is `length` long there and `count` long in the step; None if there is no such dimension."""
    if expected.shape == actual.shape and count == length:
        return expected
    if expected.dim() != actual.dim():
        return None
    for dim in range(expected.dim()):
        others = [d for d in range(expected.dim()) if d != dim]
        if (expected.shape[dim], actual.shape[dim]) == (length, count) and all(
            expected.shape[d] == actual.shape[d] for d in others
        ):
            return expected.narrow(dim, start, count)
    return None


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0].removeprefix("L['self'].")
    return f" in {path.removeprefix('model.')}" if path.startswith("model.") else ""  # "model": the module itself


def first_difference(compiled, captured: torch.fx.GraphModule, prompt: list[int], first_step: int,
                     tolerance: float) -> str | None:  # fmt: skip
    """The first op of `captured` whose result the rewritten graph does not reproduce for `prompt` run as
    a step of `first_step` tokens and then one token per step; None if every op it kept agrees."""
    runner, device = compiled.runner, compiled.device
    length = len(prompt)
    expected = {}
    ids = torch.tensor(prompt, device=device)
    positions = torch.arange(length, device=device)
    with torch.no_grad():
        _Recorder(captured, expected).run(ids, positions, positions.clone())
    recording = _RecordingGraph(compiled.graph_module)
    graph, graphs = runner.graph, runner.cuda_graphs
    runner.graph, runner.cuda_graphs = recording, None  # every step through the recording, none replayed
    seq = Sequence(list(prompt))
    spans = []
    try:
        spans.append((0, min(first_step, length)))
        runner.execute([ScheduledChunk(seq, spans[-1][1], "all")])
        while seq.num_pending:
            spans.append((seq.num_computed, 1))
            runner.execute([ScheduledChunk(seq, 1, "last")])
    finally:
        runner.graph, runner.cuda_graphs = graph, graphs
        runner.release(seq)
    for node in captured.graph.nodes:
        if node.name not in expected:
            continue
        target, whole = expected[node.name]
        for (start, count), actual in zip(spans, recording.steps):
            other_target, value = actual.get(node.name, (None, None))
            if other_target is not target or value.dtype != whole.dtype:
                continue  # not there, or another op under a reused name
            reference = _rows(whole, value, length, start, count)
            if reference is None or reference.numel() == 0:
                continue
            if reference.is_complex():  # compared as pairs of reals, with the float tolerance
                reference, value = torch.view_as_real(reference), torch.view_as_real(value)
            if reference.is_floating_point():
                ref, got = reference.double(), value.double()
                differs = (got - ref).abs().max().item() > tolerance * max(1.0, ref.abs().max().item())
            else:  # positions, indices, masks: exactly
                differs = not torch.equal(reference, value)
            if differs:
                line = user_line(node)
                where = f" ({line})" if line else ""
                return (f"{node.target}{where}{_module_path(node)}, over the tokens at positions {start}.."
                        f"{start + count - 1}")  # fmt: skip
    return None


def captured_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph as captured, kept beside the one the passes rewrite in place; it shares the weights."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)
