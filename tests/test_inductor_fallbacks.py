"""The graph's custom ops are registered with Inductor before it compiles (compile.register_custom_op_fallbacks).

Inductor registers an op it has no lowering for when it first lowers a call of it, and torch 2.11 formats that
call's arguments for a log line then, whatever the log level: with FP8 producers whose two outputs feed one
consumer, the string of an op first met deep in the graph grows exponentially with the depth (the 8B FP8 graph
did not finish compiling on a GPU; a 2-layer one reproduces it on torch 2.11's CPU). Newer torch formats the line
only when INFO is on, which this test turns on, so that it fails on every version if the registration is dropped."""

from __future__ import annotations

import logging

import torch
from conftest import VOCAB, tiny_model
from torch._inductor import lowering
from torch._inductor.exc import OperatorIssue

from compiled_llm import compile_model
from fx_passes import DEFAULT_PIPELINE, with_fp8_fusions


def test_inductor_never_formats_a_custom_op_call_while_lowering(monkeypatch, caplog):
    formatted = []
    original = OperatorIssue.operator_str

    def recording(target, args, kwargs):
        formatted.append(str(target))
        return original(target, args, kwargs)

    monkeypatch.setattr(OperatorIssue, "operator_str", staticmethod(recording))
    for op in [op for op in lowering.lowerings if str(op).startswith("compiled_llm.")]:
        monkeypatch.delitem(lowering.lowerings, op)  # as in a fresh process: unknown to Inductor
    fields = {"quantization": "fp8", "norm_backend": "triton", "passes": with_fp8_fusions(DEFAULT_PIPELINE)}
    # force_disable_caches: lower the graph even if an earlier test compiled the same one (config.patch, not
    # monkeypatch, whose undo deletes a config entry it did not see as an attribute)
    with caplog.at_level(logging.INFO, logger="torch._inductor.graph"), torch._inductor.config.patch(force_disable_caches=True):
        compiled = compile_model(tiny_model("llama"), **fields)
    assert formatted == []
    assert sum(p.sites for p in compiled.report.passes if p.name in ("fuse_norm_quantize_fp8", "fuse_silu_mul_quantize_fp8")) == 5
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(7))
    reference = compile_model(tiny_model("llama"), compile_backend="eager", **fields)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
