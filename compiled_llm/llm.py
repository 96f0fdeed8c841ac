"""`LLM`: offline generation over the engine, for many prompts at once.

    from compiled_llm import LLM, SamplingParams
    llm = LLM(hf_model, tokenizer)                      # kwargs are CompileConfig fields
    outputs = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import AsyncIterator
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
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob} of it and the top ones


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
        self.engine = Engine(self.compiled, _eos_token_ids(model, tokenizer), tokenizer)
        self._updated: dict[Request, asyncio.Event] = {}  # generate_async: set when a request got tokens
        self._driver: asyncio.Task | None = None

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer: pass LLM(model, tokenizer) or token id lists")
            return prompt, self.tokenizer(prompt)["input_ids"]
        try:
            return None, [operator.index(t) for t in prompt]
        except TypeError:
            raise ValueError(f"a prompt is a string or a list of token ids, got {prompt!r:.80}") from None

    @staticmethod
    def _output(requests: list[Request], streaming: bool = False) -> RequestOutput:
        """One prompt's output from its n requests (while `streaming`, text that may still turn into a
        stop string is held back)."""
        first = requests[0]
        outputs = []
        for i, request in enumerate(requests):
            finished = request.finish_reason is not None
            text = request.detokenizer.streamable_text(finished) if request.detokenizer is not None else None
            logprobs = None if request.logprobs is None else list(request.logprobs)
            outputs.append(CompletionOutput(i, text, list(request.output_token_ids), request.finish_reason, logprobs))
        finish_times = [r.finish_time for r in requests]
        return RequestOutput(
            request_id=first.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            num_cached_tokens=first.num_cached_tokens or 0,
            outputs=outputs,
            finished=all(r.finish_reason is not None for r in requests),
            metrics=RequestMetrics(first.arrival_time, first.first_token_time,
                                   None if None in finish_times else max(finish_times)),  # fmt: skip
        )

    def _add(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None) -> list[Request]:
        """The n requests of one prompt; with a seed, completion i samples with seed + i."""
        requests = []
        for i in range(params.n):
            child = params if params.seed is None or i == 0 else params.model_copy(update={"seed": params.seed + i})
            requests.append(self.engine.add_request(prompt_token_ids, child, prompt))
        return requests

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
        groups: list[list[Request]] = []
        try:
            for (text, ids), p in zip(parsed, params):
                groups.append(self._add(ids, p, text))
            total = sum(len(group) for group in groups)
            with tqdm(total=total, desc="generate", unit="req", disable=not use_tqdm) as progress:
                while self.engine.has_work:
                    for request in self.engine.step():
                        if request.finish_reason is not None:
                            progress.update()
        finally:
            for request in (r for group in groups for r in group):  # after an error: nothing left queued
                self.engine.abort(request)
        return [self._output(group) for group in groups]

    async def generate_async(self, prompt, sampling_params: SamplingParams | None = None,
                             streaming: bool = True) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Yields the request's output as it grows (with `streaming`; else once, finished). Requests of
        concurrent calls share engine steps. Leaving the loop early, or cancelling the task, aborts the
        request and frees its KV blocks at once."""
        text, ids = self._prompt_ids(prompt)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if params.n != 1:
            raise ValueError(f"generate_async streams one completion: n must be 1, got n={params.n}")
        request = self.engine.add_request(ids, params, text)
        updated = self._updated[request] = asyncio.Event()
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        try:
            while request.finish_reason is None:
                await updated.wait()
                updated.clear()
                if streaming and request.finish_reason is None:
                    yield self._output([request], streaming=True)
            yield self._output([request])
        finally:
            del self._updated[request]
            self.engine.abort(request)  # no-op once finished

    async def _drive(self) -> None:
        """Steps the engine while any request is unfinished, yielding to the event loop between steps
        (where consumers read outputs and aborts happen, never in the middle of a step)."""
        while self.engine.has_work:
            for request in self.engine.step():
                if request in self._updated:
                    self._updated[request].set()
            await asyncio.sleep(0)
        for event in self._updated.values():  # aborted ones see their end
            event.set()
