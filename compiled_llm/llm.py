"""`LLM`: offline generation over the engine, for many prompts at once.

    from compiled_llm import LLM, SamplingParams
    llm = LLM(hf_model, tokenizer)                      # kwargs are CompileConfig fields
    outputs = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import nn
from tqdm.auto import tqdm

from compiled_llm.compiled_model import compile_model
from compiled_llm.engine import Engine, Request, SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str | None  # None without a tokenizer
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length" or "abort"


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    num_cached_tokens: int  # prompt tokens whose keys/values came from the prefix cache
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


def _eos_token_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return frozenset(operator.index(i) for i in ids)


class LLM:
    def __init__(self, model: nn.Module | str, tokenizer=None, **config_fields):
        """`model`: a Hugging Face causal LM, or a local HF directory / `random:NAME` preset (loaded, with the
        directory's tokenizer when there is one). `config_fields`: CompileConfig fields."""
        if isinstance(model, str):
            from compiled_llm.presets import load_model

            spec = model
            model = load_model(spec)
            if tokenizer is None and not spec.startswith("random:"):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(spec)
        self.model = model
        self.tokenizer = tokenizer
        self.compiled = compile_model(model, **config_fields)
        self.engine = Engine(self.compiled, _eos_token_ids(model, tokenizer))

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer: pass LLM(model, tokenizer) or token id lists")
            return prompt, self.tokenizer(prompt)["input_ids"]
        try:
            return None, [operator.index(t) for t in prompt]
        except TypeError:
            raise ValueError(f"a prompt is a string or a list of token ids, got {prompt!r:.80}") from None

    def _output(self, request: Request) -> RequestOutput:
        tokens = list(request.output_token_ids)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            num_cached_tokens=request.num_cached_tokens or 0,
            outputs=[CompletionOutput(0, text, tokens, request.finish_reason)],
            finished=request.finish_reason is not None,
            metrics=RequestMetrics(request.arrival_time, request.first_token_time, request.finish_time),
        )

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:  # fmt: skip
        """One RequestOutput per prompt, in order. `prompts`: a string, a list of strings, a list of token
        ids, or a list of those; `sampling_params`: one for all prompts or one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        parsed = [self._prompt_ids(p) for p in prompts]  # all checked before any is queued
        requests = []
        try:
            for (text, ids), p in zip(parsed, params):
                requests.append(self.engine.add_request(ids, p, text))
            with tqdm(total=len(requests), desc="generate", unit="req", disable=not use_tqdm) as progress:
                while self.engine.has_work:
                    for request in self.engine.step():
                        if request.finish_reason is not None:
                            progress.update()
        finally:
            for request in requests:  # after an error, leave nothing queued or holding blocks
                self.engine.abort(request)
        return [self._output(r) for r in requests]
