"""The `compiled-llm` command line on a tiny model saved as an HF directory."""

from __future__ import annotations

import pytest

from compiled_llm.cli import main
from conftest import tiny_model


def test_build_prints_the_report(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path)
    assert main(["build", str(tmp_path), "--compile-backend", "eager", "--max-seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "insert_paged_attention" in out and "max_seq_len 64" in out


def test_build_rejects_bad_input(tmp_path, capsys):
    assert main(["build", str(tmp_path / "missing")]) == 2
    assert "MODEL must be a local Hugging Face model directory" in capsys.readouterr().err
    tiny_model("llama").save_pretrained(tmp_path)
    assert main(["build", str(tmp_path), "--max-batch-size", "zero"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])
