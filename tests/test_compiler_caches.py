"""compiler_caches.use_cache_dir: Inductor's and Triton's caches under CompileConfig.cache_dir, process-wide."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import os, sys
    from compiled_llm.compiler_caches import use_cache_dir
    first, second = sys.argv[1:]
    print(use_cache_dir(first))
    print(os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"], os.environ["FLASHINFER_WORKSPACE_BASE"])
    use_cache_dir(first)  # the same directory again: fine
    try:
        use_cache_dir(second)
    except ValueError as error:
        print("refused:", error)
""")


def run(tmp_path: Path, **env) -> list[str]:
    variables = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE")
    environment = {k: v for k, v in os.environ.items() if k not in variables}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "a"), str(tmp_path / "b")], env={**environment, **env},
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.splitlines()


def test_the_first_compile_sets_every_cache_and_another_cache_dir_is_refused(tmp_path):
    line, variables, refused = run(tmp_path)
    a = (tmp_path / "a").resolve()
    assert line == f"kernel choices, inductor, triton and flashinfer under {a}"
    assert variables == f"{a / 'inductor'} {a / 'triton'} {a / 'flashinfer'}"
    assert refused.startswith(f"refused: cache_dir='{(tmp_path / 'b').resolve()}': this process already compiles with")
    assert f"under '{a}'" in refused and "use one cache_dir per process" in refused


def test_a_variable_the_user_set_is_left_alone_and_reported(tmp_path):
    line, variables, _ = run(tmp_path, TRITON_CACHE_DIR=str(tmp_path / "mine"))
    a = (tmp_path / "a").resolve()
    assert (
        line == f"kernel choices, inductor and flashinfer under {a}; triton in {tmp_path / 'mine'} ($TRITON_CACHE_DIR)"
    )
    assert variables == f"{a / 'inductor'} {tmp_path / 'mine'} {a / 'flashinfer'}"
    line, variables, _ = run(
        tmp_path, TRITON_CACHE_DIR="/x/t", TORCHINDUCTOR_CACHE_DIR="/x/i", FLASHINFER_WORKSPACE_BASE="/x/f"
    )
    assert line == (f"kernel choices under {a}; inductor in /x/i ($TORCHINDUCTOR_CACHE_DIR); triton in /x/t "
                    "($TRITON_CACHE_DIR); flashinfer in /x/f ($FLASHINFER_WORKSPACE_BASE)")  # fmt: skip
    assert variables == "/x/i /x/t /x/f"


def test_flashinfer_imported_before_the_first_compile_keeps_its_directory(tmp_path):
    """FlashInfer reads its variable once, at import: set later, it would name a place its builds do not go."""
    script = textwrap.dedent("""
        import os, sys
        sys.modules["flashinfer"] = sys  # stands for an import of FlashInfer before the first compile
        from compiled_llm.compiler_caches import use_cache_dir
        print(use_cache_dir(sys.argv[1]))
        print(os.environ.get("FLASHINFER_WORKSPACE_BASE"))
    """)
    environment = {k: v for k, v in os.environ.items() if k != "FLASHINFER_WORKSPACE_BASE"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=environment, capture_output=True, text=True,
                         check=True)  # fmt: skip
    line, variable = out.stdout.splitlines()
    assert line.endswith("; flashinfer in its own directory (imported before this compile)")
    assert variable == "None"


def test_an_inductor_compile_caches_under_the_sessions_cache_dir(compiled):
    """The session's compiles (conftest points COMPILED_LLM_CACHE_DIR at a temporary directory) write Inductor's
    cache there, and the report says where (unless the environment chose Inductor's cache itself)."""
    from compiled_llm import compiler_caches

    if "TORCHINDUCTOR_CACHE_DIR" in compiler_caches._USERS:
        pytest.skip("TORCHINDUCTOR_CACHE_DIR is set in the environment: Inductor's cache is there")
    _, model = compiled("llama")
    root = Path(os.environ["COMPILED_LLM_CACHE_DIR"]).resolve()
    assert f"under {root}" in str(model.report)
    assert any((root / "inductor").rglob("*.py"))  # the compiled graph's module
