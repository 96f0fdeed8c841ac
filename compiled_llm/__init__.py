"""compiled-llm: a torch.compile-centric LLM inference runtime.

    from compiled_llm import compile_model
    cm = compile_model(hf_model)            # kwargs are CompileConfig fields
    cm(input_ids).logits; cm.generate(input_ids, max_new_tokens=32); print(cm.report)

    from compiled_llm import LLM, SamplingParams
    LLM(hf_model, tokenizer).generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))

The names below are imported on first use: importing torch and transformers takes seconds, which
`compiled-llm --help` and a script's first message (`compiled_llm.progress`) should not wait for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "LLM": "compiled_llm.llm",
    "CaptureError": "compiled_llm.capture",
    "CompileConfig": "compiled_llm.config",
    "CompileReport": "compiled_llm.report",
    "CompiledModel": "compiled_llm.compiled_model",
    "CompletionOutput": "compiled_llm.llm",
    "RequestOutput": "compiled_llm.llm",
    "SamplingParams": "compiled_llm.engine",
    "compile_model": "compiled_llm.compiled_model",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from compiled_llm.capture import CaptureError
    from compiled_llm.compiled_model import CompiledModel, compile_model
    from compiled_llm.config import CompileConfig
    from compiled_llm.engine import SamplingParams
    from compiled_llm.llm import LLM, CompletionOutput, RequestOutput
    from compiled_llm.report import CompileReport


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'compiled_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
