"""compiled-llm: a torch.compile-centric LLM inference runtime.

    from compiled_llm import compile_model
    cm = compile_model(hf_model)            # kwargs are CompileConfig fields
    cm(input_ids).logits; cm.generate(input_ids, max_new_tokens=32); print(cm.report)

    from compiled_llm import LLM, SamplingParams
    LLM(hf_model, tokenizer).generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
"""

from compiled_llm.capture import CaptureError
from compiled_llm.compiled_model import CompiledModel, compile_model
from compiled_llm.config import CompileConfig
from compiled_llm.engine import SamplingParams
from compiled_llm.llm import LLM, CompletionOutput, RequestOutput
from compiled_llm.report import CompileReport

__all__ = [
    "LLM",
    "CaptureError",
    "CompileConfig",
    "CompileReport",
    "CompiledModel",
    "CompletionOutput",
    "RequestOutput",
    "SamplingParams",
    "compile_model",
]
__version__ = "0.1.0"
