"""Long jobs say what they are doing: a stage bar keeps moving while its stage runs, compile_model's stages
are named for what runs, and a script's first message does not wait for torch to be imported."""

from __future__ import annotations

import subprocess
import sys
import time

import compiled_llm.progress as progress
from conftest import tiny_model


def test_a_stage_bar_keeps_moving_while_its_stage_runs(monkeypatch):
    monkeypatch.setattr(progress, "REFRESH_S", 0.05)
    redrawn = []
    with progress.StageProgress("job", total=2) as bar:
        monkeypatch.setattr(bar._bar, "refresh", lambda *args, **kwargs: redrawn.append(bar._bar.postfix))
        with bar.stage("a slow stage"):
            time.sleep(0.6)  # one call that reports nothing, as an Inductor compile
        assert bar._bar.n == 1
    assert len(redrawn) >= 3 and all("a slow stage" in postfix for postfix in redrawn)


def test_compile_stages_are_named_for_what_runs(capsys):
    from compiled_llm import compile_model

    cm = compile_model(tiny_model("llama"), compile_backend="eager", max_batch_size=1)
    err = capsys.readouterr().err
    assert "capturing the graph (torch.export)" in err and "rewriting the graph" in err
    assert "running the graph uncompiled" in err
    assert "CUDA graphs" not in err and cm.report.cuda_graphs == "off (model on cpu)"


def test_first_messages_need_no_torch():
    """The quickstart prints before importing torch, and `compiled-llm --help` never imports it."""
    code = "import sys, compiled_llm.progress, compiled_llm.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
