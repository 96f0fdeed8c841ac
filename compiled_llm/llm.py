"""`LLM`: offline generation over the engine, for many prompts at once.

    from compiled_llm import LLM, SamplingParams
    llm = LLM(hf_model, tokenizer)                      # kwargs are CompileConfig fields
    outputs = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32))
"""

from __future__ import annotations

import asyncio
import gc
import logging
import operator
import threading
import time
import weakref
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from compiled_llm.compiled_model import compile_model
from compiled_llm.config import CompileConfig
from compiled_llm.engine import Engine, Request, SamplingParams
from compiled_llm.engine.limits import EngineStats
from compiled_llm.parallel_ranks import check_ranks_share_random_stream

log = logging.getLogger("compiled_llm.llm")


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


def prompt_token_ids(tokenizer, prompt) -> tuple[str | None, list[int]]:
    """(the prompt's text or None, its token ids) of a string or a list of token ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("string prompts need a tokenizer: pass LLM(model, tokenizer) or token id lists")
        return prompt, tokenizer(prompt)["input_ids"]
    try:
        return None, [operator.index(t) for t in prompt]
    except TypeError:
        raise ValueError(f"a prompt is a string or a list of token ids, got {prompt!r:.80}") from None


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, ending with the assistant's turn."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat needs a tokenizer with a chat template; this model has none")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote them already


class LLM:
    def __init__(self, model: nn.Module | str, tokenizer=None, dtype: torch.dtype | None = None, **config_fields):
        """`model`: a Hugging Face causal LM, or what `model_source.load_model` resolves (a local HF directory,
        a .gguf file, a hub id, `smollm2-135m-instruct`, `random:NAME`), loaded in `dtype` with its tokenizer.
        `config_fields`: CompileConfig fields. With tensor_parallel_size (or expert_parallel_size) N > 1 and no
        torch.distributed group, this process becomes rank 0 and starts the other N - 1 ranks on this host, which
        step as its engine does (rank_workers.py: `model` must then be what they can load, a string); `close()` stops
        them."""
        self._workers = None
        world = CompileConfig(**config_fields).parallel_ranks  # (bad fields fail here, before any rank starts)
        if world > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            if not isinstance(model, str):
                raise ValueError(
                    f"LLM over {world} ranks starts the other {world - 1} as processes that load the model themselves: "
                    "pass it as a string (a local directory, a .gguf file, a hub id, random:NAME), or start every "
                    "rank yourself with torchrun and build the LLM in each (README, 'Several GPUs')"
                )
            from compiled_llm.rank_workers import RankWorkers

            self._workers = RankWorkers.start(model, tokenizer, dtype, config_fields, world)
            weakref.finalize(self, self._workers.close)
        try:
            if isinstance(model, str):
                # Each rank of several reads only its slices of a checkpoint (float or FP8), unless asked to self-check
                # against the whole module.
                by_slices = world > 1 and CompileConfig(**config_fields).verify is not True
                model, tokenizer = self._load(model, dtype, tokenizer, world, by_slices)
            self.model = model
            self.tokenizer = tokenizer
            self.compiled = compile_model(model, tokenizer=tokenizer, **config_fields)
        except BaseException:
            if self._workers is not None:
                self._workers.close(wait_s=5)  # they wait in a collective rank 0 will not reach
            raise
        # The model, its FX graphs and the compile caches are millions of long-lived objects: keep them out
        # of the cyclic garbage collector, whose full passes over them stalled serving for ~0.5 s.
        gc.collect()
        gc.freeze()
        if self._workers is None:
            self.engine = Engine(self.compiled, _eos_token_ids(model, tokenizer), tokenizer)
        else:  # the ranks this LLM started step as its engine does
            from compiled_llm.rank_workers import MirroredEngine

            self.engine = MirroredEngine(self.compiled, _eos_token_ids(model, tokenizer), tokenizer,
                                         workers=self._workers)  # fmt: skip
        # generate_async: an event per request, set when it got tokens; requests to add or abort between
        # steps; the task that steps the engine, in one worker thread, under a lock.
        self._updated: dict[Request, asyncio.Event] = {}
        self._pending_adds: list[Request] = []
        self.engine_failure: Exception | None = None  # set when a step fails, never cleared (a server stops on it)
        self._pending_aborts: list[Request] = []
        self._driver: asyncio.Task | None = None
        self._snapshots: dict[Request, RequestOutput] = {}  # outputs taken between steps, not yet consumed
        self._error: Exception | None = None  # what made the driver fail
        self._worker: ThreadPoolExecutor | None = None
        self._engine_lock = threading.Lock()
        if self._workers is not None:
            self._workers.wait_ready()

    @staticmethod
    def _load(spec: str, dtype: torch.dtype | None, tokenizer, world: int, by_slices: bool = False):
        from compiled_llm.model_source import load_model

        if world > 1 and spec.startswith("random:"):  # every rank must draw the same random weights
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):  # (presets made by slices seed their own generators)
                torch.manual_seed(0)
                loaded = load_model(spec, dtype, by_slices=by_slices)
        else:
            loaded = load_model(spec, dtype, by_slices=by_slices)
        return loaded.model, tokenizer or loaded.tokenizer

    @property
    def _unmirrored_ranks(self) -> bool:
        """Whether other ranks run beside this one without following its engine (each started by torchrun)."""
        return self.compiled.config.parallel_ranks > 1 and self._workers is None

    def close(self) -> None:
        """Stop the ranks this LLM started (with tensor_parallel_size > 1 outside torchrun); done at exit too."""
        if self._workers is not None:
            self._workers.close()

    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        return prompt_token_ids(self.tokenizer, prompt)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template, ending with the assistant's
        turn to speak (what `generate` takes to answer it)."""
        return chat_prompt_ids(self.tokenizer, messages)

    # What a server needs of its engine (server/app.py), here and in engine_core.EngineCoreClient.
    @property
    def max_seq_len(self) -> int:
        return self.compiled.max_seq_len

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request that could never run."""
        self.engine.check_request(prompt_token_ids, params)

    def stats(self) -> EngineStats:
        return self.engine.stats()

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
        return [self.engine.add_request(prompt_token_ids, params.for_completion(i), prompt) for i in range(params.n)]

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
        if self._driver is not None and not self._driver.done():
            raise RuntimeError("generate() cannot run while generate_async requests are running on this LLM")
        parsed = [self._prompt_ids(p) for p in prompts]  # all checked before any is queued
        if self._unmirrored_ranks and any(not p.greedy and p.seed is None for p in params):
            check_ranks_share_random_stream(self.compiled.device)  # sampled from the default generator on every rank
        groups: list[list[Request]] = []
        try:
            for (text, ids), p in zip(parsed, params):
                groups.append(self._add(ids, p, text))
            total = sum(len(group) for group in groups)
            with tqdm(total=total, desc="generate", unit="req", disable=not use_tqdm) as progress:
                tokens, started = 0, time.perf_counter()
                shown = started
                while self.engine.has_work:
                    for request in self.engine.step():
                        tokens += 1
                        if request.finish_reason is not None:
                            progress.update()
                    if use_tqdm and (now := time.perf_counter()) - shown > 0.5:  # moving while no request ends
                        progress.set_postfix_str(f"{tokens / (now - started):.1f} tokens/s")
                        shown = now
        finally:
            for request in (r for group in groups for r in group):  # after an error: nothing left queued
                self.engine.abort(request)
        return [self._output(group) for group in groups]

    async def generate_async(self, prompt, sampling_params: SamplingParams | None = None,
                             streaming: bool = True) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Yields the request's output as it grows (with `streaming`; else once, finished). Requests of
        concurrent calls share engine steps, which run in a worker thread so that the event loop stays free
        for I/O. Leaving the loop early, or cancelling the task, aborts the request and frees its KV blocks
        (after the step in progress, if any). A bad request raises ValueError before anything is queued."""
        if self._unmirrored_ranks:
            raise ValueError(
                f"generate_async over {self.compiled.config.parallel_ranks} ranks started outside this LLM (torchrun): "
                "the ranks must step through the same requests in lockstep, which requests arriving on each rank's "
                "own event loop cannot promise; call generate() with the same prompts on every rank, or let "
                "LLM(\"MODEL\", tensor_parallel_size=N) start the ranks (its engine mirrors rank 0's steps)"
            )
        text, ids = self._prompt_ids(prompt)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if params.n != 1:
            raise ValueError(f"generate_async streams one completion: n must be 1, got n={params.n}")
        request = self.engine.make_request(ids, params, text)
        updated = self._updated[request] = asyncio.Event()
        self._pending_adds.append(request)
        if self._driver is None or self._driver.done():
            self._error = None
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        try:
            while True:
                await updated.wait()
                updated.clear()
                # Snapshots are taken by the driver while no step runs: the request itself may be changing
                # now, in the worker thread.
                snapshot = self._snapshots.pop(request, None)
                if snapshot is None and (self._driver is None or self._driver.done()):
                    if self._error is not None:
                        raise RuntimeError(f"the engine failed: {self._error!r}") from self._error
                    snapshot = self._output([request])  # the driver ended (aborted): nothing runs now
                if snapshot is None:
                    continue
                if snapshot.finished:
                    yield snapshot
                    return
                if streaming:
                    yield snapshot
        finally:
            del self._updated[request]
            self._snapshots.pop(request, None)
            if request.finish_reason is None:
                self._abort_async(request)

    @property
    def num_waiting(self) -> int:
        """Requests queued and not running yet (for a server's admission control)."""
        return len(self._pending_adds) + len(self.engine.scheduler.waiting)

    def _abort_async(self, request: Request) -> None:
        if request in self._pending_adds:
            self._pending_adds.remove(request)
        elif self._driver is not None and not self._driver.done():
            self._pending_aborts.append(request)  # the driver applies it between steps
        else:  # no driver (e.g. the event loop is closing): wait for a step still running in the worker
            with self._engine_lock:
                self.engine.abort(request)

    def _apply_pending_aborts(self) -> None:
        for request in self._pending_aborts:
            self.engine.abort(request)
        self._pending_aborts.clear()

    def _step_in_worker(self) -> list[Request]:
        with self._engine_lock, torch.no_grad():
            return self.engine.step()

    async def _drive(self) -> None:
        """Steps the engine while any request is unfinished. Requests join and aborts happen here, between
        steps, never while the worker thread runs one."""
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compiled-llm-engine")
        try:
            while True:
                with self._engine_lock:
                    for request in self._pending_adds:
                        self.engine.queue(request)
                    self._pending_adds.clear()
                    self._apply_pending_aborts()
                    if not self.engine.has_work:
                        break
                for request in await loop.run_in_executor(self._worker, self._step_in_worker):
                    if request in self._updated:  # the worker is idle until the next iteration
                        self._snapshots[request] = self._output([request], streaming=request.finish_reason is None)
                        self._updated[request].set()
        except Exception as error:  # a failed step: fail every request rather than leave them waiting
            log.exception("engine step failed; aborting all requests")
            self._error = self.engine_failure = error
            with self._engine_lock:
                for request in [*self.engine.scheduler.running, *self.engine.scheduler.waiting, *self._pending_adds]:
                    self.engine.abort(request)
                self._pending_adds.clear()
        finally:  # also when cancelled (the event loop closing): free what was aborted meanwhile
            with self._engine_lock:  # waits for a step still running in the worker
                self._apply_pending_aborts()
        for event in self._updated.values():  # aborted ones see their end
            event.set()
