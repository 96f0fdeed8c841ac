"""The calibrating quantizations' cache (fx_passes/calibration.py), for each of them: a second compile of the same
model reads what the first searched (same logits), and a corrupt entry is searched anew with a warning."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import random_prompt, tiny_model

from compiled_llm import compile_model

FORMATS = {"int4_awq": ("quantize_int4", "awq"), "int8_sq": ("quantize_int8", "smoothquant")}
SHAPES = {"hidden_size": 128, "intermediate_size": 96, "head_dim": 32}  # widths 4-bit groups tile


@pytest.mark.parametrize("quantization", sorted(FORMATS))
def test_a_second_compile_reads_the_calibration_from_the_cache(quantization, tmp_path, caplog):
    pass_name, kind = FORMATS[quantization]
    model = tiny_model("llama", **SHAPES)

    def compiled():
        return compile_model(model, quantization=quantization, compile_backend="eager", max_batch_size=2,
                             max_seq_len=64, cache_dir=tmp_path)  # fmt: skip

    first = compiled()
    (entry,) = (tmp_path / kind).glob("*.pt")
    second = compiled()
    (result,) = [p for p in second.report.passes if p.name == pass_name]
    assert "from the cache" in result.detail
    ids = random_prompt(7)
    assert torch.equal(second(ids).logits, first(ids).logits)
    entry.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="compiled_llm"):
        again = compiled()
    assert "unreadable" in caplog.text
    assert torch.equal(again(ids).logits, first(ids).logits)


@pytest.mark.parametrize("quantization", sorted(FORMATS))
def test_sites_past_the_memory_bound_are_recorded_by_more_forwards_to_the_same_result(quantization, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    """calibration.recorded_inputs: with RECORDED_BYTES below one site's rows, every site is recorded by a forward of
    its own, and the searches find what they find from one forward (same logits)."""
    from fx_passes import calibration

    model = tiny_model("llama", **SHAPES)
    forwards = []
    record = calibration.record_inputs
    monkeypatch.setattr(calibration, "record_inputs", lambda gm, sites, *a: forwards.append(len(sites)) or
                        record(gm, sites, *a))  # fmt: skip

    def compiled(cache_dir):
        return compile_model(model, quantization=quantization, compile_backend="eager", max_batch_size=2,
                             max_seq_len=64, cache_dir=cache_dir)  # fmt: skip

    whole = compiled(tmp_path / "whole")
    assert len(forwards) == 1 and forwards[0] > 1
    sites = forwards[0]
    monkeypatch.setattr(calibration, "RECORDED_BYTES", 1)
    runs = compiled(tmp_path / "runs")
    assert forwards[1:] == [1] * sites
    ids = random_prompt(7)
    assert torch.equal(runs(ids).logits, whole(ids).logits)
