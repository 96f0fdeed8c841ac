"""The engine-core process: builds the LLM, then steps its engine while requests arrive from the API process,
and sends back after each step what each request gained. Messages: protocol.py.

Between steps it only reads what has arrived (a poll, no wait) and sends one message, so it runs the engine
as `LLM.generate` does offline; it blocks only when it has no work. It ignores SIGINT and SIGTERM: the API
process (the one a terminal or a supervisor signals) drains the server, then stops it with SHUTDOWN. If the
API process dies, it exits too: at its next read of the pipe, or within a second while it compiles.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time

import torch

from compiled_llm.engine import Engine, Request
from compiled_llm.engine_core.protocol import (
    ABORT, ADD, FAILED, READY, REJECTED, SHUTDOWN, START_FAILED, STEP, EngineInfo, RequestDelta,
)  # fmt: skip

log = logging.getLogger("compiled_llm.engine_core")


class _Sent:
    """How much of a request the API process has been sent."""

    __slots__ = ("logprobs", "request_id", "text", "tokens")

    def __init__(self, request_id: int):
        self.request_id = request_id
        self.tokens = 0
        self.text = ""
        self.logprobs = 0


class EngineCore:
    def __init__(self, engine: Engine, inbox, outbox):
        self.engine, self.inbox, self.outbox = engine, inbox, outbox
        self.requests: dict[int, Request] = {}
        self.sent: dict[Request, _Sent] = {}
        self.received = 0  # adds received: the API process counts those it sent and not yet received as waiting

    def run(self) -> int:
        """Serve until SHUTDOWN or the API process is gone (0), or a step fails (1)."""
        with torch.no_grad():
            while self._receive(wait=not self.engine.has_work):
                if not self.engine.has_work:  # an add refused, or aborts only: the stats show it
                    self._send_step([])
                    continue
                try:
                    updated = self.engine.step()
                except Exception as error:
                    log.exception("engine step failed; aborting all requests")
                    for request in list(self.requests.values()):
                        self.engine.abort(request)
                    self.outbox.send((FAILED, f"{type(error).__name__}: {error}"))
                    return 1
                self._send_step(updated)
        return 0

    def _receive(self, wait: bool) -> bool:
        """Apply what the API process sent: every message waiting (blocking for one if `wait`). False when
        told to shut down, or when the API process is gone."""
        if not wait and not self.inbox.poll():
            return True
        while True:
            try:
                messages = self.inbox.recv()
            except (EOFError, OSError):
                log.warning("the API process is gone: stopping the engine core")
                return False
            for message in messages:
                kind = message[0]
                if kind == ADD:
                    self._add(*message[1:])
                elif kind == ABORT:
                    request = self.requests.pop(message[1], None)
                    if request is not None:
                        self.sent.pop(request)
                        self.engine.abort(request)
                elif kind == SHUTDOWN:
                    return False
            if not self.inbox.poll():
                return True

    def _add(self, request_id: int, prompt_token_ids: list[int], params, prompt: str | None) -> None:
        self.received += 1
        try:
            request = self.engine.make_request(prompt_token_ids, params, prompt)
        except ValueError as error:  # checked in the API process too: only an engine that differs gets here
            self.outbox.send((REJECTED, request_id, str(error)))
            return
        self.engine.queue(request)
        self.requests[request_id] = request
        self.sent[request] = _Sent(request_id)

    def _send_step(self, updated: list[Request]) -> None:
        deltas = []
        for request in updated:
            sent = self.sent.get(request)
            if sent is not None:  # else aborted meanwhile
                deltas.append(self._delta(request, sent))
                if request.finish_reason is not None:
                    del self.sent[request], self.requests[sent.request_id]
        self.outbox.send((STEP, deltas, self.engine.stats(), self.received))

    @staticmethod
    def _delta(request: Request, sent: _Sent) -> RequestDelta:
        finished = request.finish_reason is not None
        start = len(request.prompt_token_ids) + sent.tokens
        new_tokens = request.seq.token_ids[start : len(request.seq.token_ids) - request.token_in_flight]
        sent.tokens += len(new_tokens)
        new_logprobs = None
        if request.logprobs is not None:
            new_logprobs = request.logprobs[sent.logprobs :]
            sent.logprobs += len(new_logprobs)
        text_start, new_text = 0, None
        if request.detokenizer is not None:
            text = request.detokenizer.streamable_text(finished)
            # Running, the text only grows; the final one is decoded anew from every token, and is sent from
            # where it first differs from what was sent (compared once, not at every step).
            text_start = len(sent.text)
            if finished and not text.startswith(sent.text):
                text_start = len(os.path.commonprefix([text, sent.text]))
            new_text, sent.text = text[text_start:], text
        return (sent.request_id, new_tokens, text_start, new_text, new_logprobs, request.finish_reason,
                request.num_cached_tokens or 0, request.first_token_time, request.finish_time)  # fmt: skip


def exit_with_parent() -> None:
    """Exit when the process that started this one dies (the API process, or an LLM's rank 0), even in the middle of
    compiling (when nothing reads the pipe)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="compiled-llm-parent-watch", daemon=True).start()


def run_engine_core(inbox, outbox, model: str, dtype, config_fields: dict, log_level: int | str) -> None:
    """The engine-core process's entry point (multiprocessing, spawned by EngineCoreClient.start)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    exit_with_parent()
    from compiled_llm.llm import LLM

    try:
        llm = LLM(model, dtype=dtype, **config_fields)
    except Exception as error:
        if not isinstance(error, ValueError):
            log.exception("the engine could not be built")
        try:
            outbox.send((START_FAILED, error))
        except Exception:  # noqa: BLE001  (an exception that does not pickle)
            outbox.send((START_FAILED, RuntimeError(f"{type(error).__name__}: {error}")))
        sys.exit(1)
    engine = llm.engine
    start = time.perf_counter()
    with torch.no_grad():
        engine.warm_up()
    log.info("engine warmed up in %.2f s", time.perf_counter() - start)
    gc.collect()  # what the warm-up left, out of the cyclic collector as LLM did with the model (llm.py)
    gc.freeze()
    outbox.send((READY, EngineInfo(llm.tokenizer, engine.limits, engine.stats())))
    log.info("engine core ready (pid %d)", os.getpid())
    sys.exit(EngineCore(engine, inbox, outbox).run())
