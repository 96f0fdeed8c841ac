"""`EngineCoreClient`: the API process's side of the engine core (core.py), with the interface a server needs
of an `LLM` (`generate_async`, `check_request`, `num_waiting`, `stats`, `engine_failure`, `tokenizer`), so
server/app.py runs over either.

Two threads carry the messages (protocol.py), so the event loop never blocks on the pipe: a writer sends
what requests queued since its last send, in one message; a reader hands each step's deltas to the event
loop, where each request's output is rebuilt and its waiter woken.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import AsyncIterator

from compiled_llm.engine import SamplingParams
from compiled_llm.engine.limits import EngineStats
from compiled_llm.engine_core.protocol import (
    ABORT, ADD, FAILED, READY, REJECTED, SHUTDOWN, START_FAILED, STEP, EngineInfo, RequestDelta,
)  # fmt: skip
from compiled_llm.llm import CompletionOutput, RequestMetrics, RequestOutput, chat_prompt_ids, prompt_token_ids

log = logging.getLogger("compiled_llm.engine_core")

STOP_TIMEOUT_S = 10.0  # close(): how long the engine core gets to exit before it is killed


class _Stream:
    """One request as the API process sees it: its output rebuilt from the deltas, and its waiter."""

    def __init__(self, request_id: int, prompt: str | None, prompt_token_ids: list[int], logprobs: bool):
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.token_ids: list[int] = []
        self.text: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if logprobs else None
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0
        self.arrival_time = time.time()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.error: Exception | None = None
        self.updated = asyncio.Event()

    def apply(self, delta: RequestDelta) -> None:
        _, new_token_ids, text_start, new_text, new_logprobs, self.finish_reason, self.num_cached_tokens, \
            self.first_token_time, self.finish_time = delta
        self.token_ids += new_token_ids
        if new_text is not None:
            self.text = (self.text or "")[:text_start] + new_text
        if new_logprobs is not None and self.logprobs is not None:
            self.logprobs += new_logprobs
        self.updated.set()

    def output(self) -> RequestOutput:
        logprobs = None if self.logprobs is None else list(self.logprobs)
        completion = CompletionOutput(0, self.text, list(self.token_ids), self.finish_reason, logprobs)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.num_cached_tokens, [completion],
                             self.finish_reason is not None,
                             RequestMetrics(self.arrival_time, self.first_token_time, self.finish_time))  # fmt: skip


class EngineCoreClient:
    def __init__(self, process, to_core, from_core, info: EngineInfo):
        self.process = process
        self.tokenizer = info.tokenizer
        self.limits = info.limits
        self.engine_failure: Exception | None = None  # set when the core fails or dies, never cleared
        self._to_core, self._from_core = to_core, from_core
        self._stats, self._received = info.stats, 0  # the core's last report
        self._sent = 0  # adds sent
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="compiled-llm-core-writer", daemon=True)
        self._reader = threading.Thread(target=self._read, name="compiled-llm-core-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    @classmethod
    def start(cls, model: str, dtype=None, log_level: int | str = "INFO", **config_fields) -> EngineCoreClient:
        """Spawn the engine core for `model` (what `LLM(model, dtype, **config_fields)` takes) and wait until it
        has compiled; its errors are raised here (ValueError for bad input)."""
        from compiled_llm.engine_core.core import run_engine_core

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA or thread state
        core_inbox, to_core = context.Pipe(duplex=False)
        from_core, core_outbox = context.Pipe(duplex=False)
        process = context.Process(target=run_engine_core, name="compiled-llm-engine-core",
                                  args=(core_inbox, core_outbox, model, dtype, config_fields, log_level))  # fmt: skip
        process.start()
        core_inbox.close()  # the core's ends: closed here, so that its exit reads as EOF
        core_outbox.close()
        try:
            while not from_core.poll(0.5):
                if not process.is_alive():
                    raise RuntimeError(f"the engine core process exited with code {process.exitcode} while starting "
                                       "(its error is above)")  # fmt: skip
            kind, payload = from_core.recv()
        except BaseException:  # Ctrl-C while it compiles, too: it ignores SIGINT, so it is stopped here
            process.kill()
            process.join()
            raise
        if kind == START_FAILED:
            process.join()
            raise payload
        assert kind == READY, kind
        log.info("engine core started (pid %d)", process.pid)
        return cls(process, to_core, from_core, payload)

    # What server/app.py needs, as LLM has it.
    @property
    def max_seq_len(self) -> int:
        return self.limits.max_seq_len

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.limits.check(prompt_token_ids, params)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    @property
    def num_waiting(self) -> int:
        """Requests queued and not running yet: the core's queue, and those sent that it has not received."""
        return self._stats.waiting + self._sent - self._received

    def stats(self) -> EngineStats:
        return self._stats._replace(waiting=self.num_waiting)

    async def generate_async(self, prompt, sampling_params: SamplingParams | None = None,
                             streaming: bool = True) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """As `LLM.generate_async`: the request's output as it grows (or once, finished); leaving early aborts
        it; a bad request raises ValueError before anything is sent; a failed engine raises RuntimeError."""
        text, ids = prompt_token_ids(self.tokenizer, prompt)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if params.n != 1:
            raise ValueError(f"generate_async streams one completion: n must be 1, got n={params.n}")
        self.check_request(ids, params)
        if self.engine_failure is not None:
            raise RuntimeError(f"the engine failed: {self.engine_failure}") from self.engine_failure
        self._loop = asyncio.get_running_loop()
        stream = _Stream(next(self._ids), text, ids, params.logprobs is not None)
        self._streams[stream.request_id] = stream
        self._sent += 1
        self._outgoing.put((ADD, stream.request_id, ids, params, text))
        try:
            while True:
                await stream.updated.wait()
                stream.updated.clear()
                if isinstance(stream.error, ValueError):  # refused by the engine (its own check)
                    raise stream.error
                if stream.error is not None:
                    raise RuntimeError(f"the engine failed: {stream.error}") from stream.error
                if stream.finish_reason is not None:
                    yield stream.output()
                    return
                if streaming:
                    yield stream.output()
        finally:
            del self._streams[stream.request_id]
            if stream.finish_reason is None and stream.error is None:
                self._outgoing.put((ABORT, stream.request_id))

    def close(self) -> None:
        """Stop the engine core (after the step in progress) and wait for it to exit."""
        if self._closing:
            return
        self._closing = True
        self._outgoing.put((SHUTDOWN,))
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            log.warning("the engine core did not stop within %g s: killing it", STOP_TIMEOUT_S)
            self.process.kill()
            self.process.join()
        self._outgoing.put(None)

    def _write(self) -> None:
        while True:
            messages = [self._outgoing.get()]
            while not self._outgoing.empty():  # everything queued meanwhile, in one send
                messages.append(self._outgoing.get())
            if None in messages:
                return
            try:
                self._to_core.send(messages)
            except OSError:  # the core is gone: the reader says so
                return

    def _read(self) -> None:
        while True:
            try:
                message = self._from_core.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == STEP:
                _, deltas, self._stats, self._received = message
                if deltas:
                    self._call_soon(self._apply, deltas)
            elif kind == REJECTED:
                self._call_soon(self._fail, message[1], ValueError(message[2]))
            elif kind == FAILED:
                self._failed(RuntimeError(message[1]))
                return
        if not self._closing:
            self.process.join(1.0)
            self._failed(RuntimeError(f"the engine core process exited (exit code {self.process.exitcode})"))

    def _call_soon(self, callback, *args) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the event loop is closed: nobody waits
                pass

    def _failed(self, error: Exception) -> None:
        log.error("the engine failed: %s", error)
        self.engine_failure = error
        self._call_soon(self._fail_all, error)

    def _apply(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta[0])
            if stream is not None:  # else its caller left
                stream.apply(delta)

    def _fail(self, request_id: int, error: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.error = error
            stream.updated.set()

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._streams):
            self._fail(request_id, error)
