"""The OpenAI-compatible HTTP server: FastAPI routes over `generate_async` of an engine: an `LLM` in this process,
or the `EngineCoreClient` of an engine-core process (what `compiled-llm serve` runs).

Each HTTP request becomes one engine request per prompt and per completion (n); their outputs are merged
into one response, or into server-sent events as they grow. A client that disconnects mid-stream cancels
the response, which aborts its requests and frees their KV blocks after the engine step in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from compiled_llm.llm import LLM, RequestOutput
from compiled_llm.server.admission import Admission
from compiled_llm.server.errors import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_READ_TIMEOUT_S,
    APIError,
    error_body,
    error_response,
)  # fmt: skip
from compiled_llm.server.jobs import Job, JobRunner
from compiled_llm.server.metrics import ServerMetrics
from compiled_llm.server.middleware import ApiKeyGuard, RequestId, RequestSizeLimit
from compiled_llm.server.prompts import PromptTokenizer
from compiled_llm.server.protocol import ChatCompletionRequest, CompletionRequest
from compiled_llm.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    StreamChunks,
    Usage,
    chat_logprobs,
    completion_logprobs,
)  # fmt: skip
from compiled_llm.server.shutdown import Drain

if TYPE_CHECKING:
    from compiled_llm.engine_core import EngineCoreClient

log = logging.getLogger("compiled_llm.server")


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its event generator when the response ends, however it ends. When the client leaves,
    Starlette cancels the task that iterates the generator while the generator waits at a `yield`: left to
    the garbage collector, its requests ran on (a stream of 150 tokens whose client left after one ran to the
    end) and were never counted or logged."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def build_app(llm: LLM | EngineCoreClient, model_name: str, api_key: str | None = None, max_waiting: int = 1024,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, metrics_require_key: bool = False,
              drain: Drain | None = None, request_timeout_s: float | None = None,
              read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> FastAPI:  # fmt: skip
    """The server's app. `max_waiting`: queued requests beyond which new ones get 503 (Retry-After);
    `max_request_bytes`: larger bodies get 413; `metrics_require_key`: /metrics needs the API key too;
    `drain`: the shutdown in progress (shutdown.py); `request_timeout_s`: a request still running then is
    failed (408); `read_timeout_s`: a body that stops arriving for that long gets 408."""
    for name, value in (("request_timeout_s", request_timeout_s), ("read_timeout_s", read_timeout_s)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}={value}: give a number of seconds > 0")
    app = FastAPI(title="compiled-llm", docs_url=None, redoc_url=None)
    drain = drain or Drain()
    app.add_middleware(RequestSizeLimit, max_bytes=max_request_bytes, read_timeout_s=read_timeout_s, drain=drain)
    if api_key is not None:  # before the body is read
        app.add_middleware(ApiKeyGuard, api_key=api_key, guard_metrics=metrics_require_key)
    tokenizer = llm.tokenizer
    max_seq_len = llm.max_seq_len
    prompts = PromptTokenizer(llm, max_seq_len)
    admission = Admission(llm, max_waiting)
    run = JobRunner(llm, admission, drain, request_timeout_s).run
    metrics = ServerMetrics(llm, waiting=lambda: llm.num_waiting + admission.accepted)
    # Added last, so it runs first: every response (a 401, a 413) carries the id and is counted.
    app.add_middleware(RequestId, on_status=lambda status: metrics.responses.labels(str(status)).inc())

    def failed(status: int, message: str, code: str | None = None, param: str | None = None, headers=None):
        metrics.errors.labels(code or str(status)).inc()
        return error_response(status, message, code, param, headers)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError):
        return failed(error.status, error.message, error.code, error.param, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            return failed(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
                          "invalid_json")  # fmt: skip
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        if not where and first.get("type") == "model_attributes_type":
            return failed(400, "the body must be a JSON object, sent with Content-Type: application/json",
                          "invalid_json")  # fmt: skip
        return failed(400, f"{where}: {first.get('msg')}" if where else first.get("msg"), param=where or None)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, error: HTTPException):  # 404, 405, a body that cannot be parsed
        code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return failed(error.status_code, str(error.detail), code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception):  # logged by the server; the client gets JSON
        # Starlette runs this outside every middleware: the id and the status count are added here.
        request_id = request.scope.get("state", {}).get("request_id", "-")
        log.error("%s: %s %s failed", request_id, request.method, request.url.path, exc_info=error)
        metrics.responses.labels("500").inc()
        return failed(500, f"internal error: {type(error).__name__}: {error}", "internal_error",
                      headers={"Connection": "close", "X-Request-Id": request_id})  # fmt: skip

    @app.get("/health")
    async def health():
        if llm.engine_failure is not None:
            return error_response(503, f"the engine failed: {llm.engine_failure!r}", "engine_failed")
        if drain.draining:
            return error_response(503, "the server is shutting down", "server_shutting_down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "compiled-llm",
                "max_model_len": max_seq_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    def check(body) -> None:
        if body.model != model_name:
            raise APIError(400, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           "model_not_found", "model")  # fmt: skip
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"{', '.join(unsupported)}: not supported by this server", "unsupported", unsupported[0])

    def make_job(body, prompt_ids: list[list[int]], max_tokens: list[int], logprobs: int | None) -> Job:
        for ids, limit in zip(prompt_ids, max_tokens):
            if ids and len(ids) + limit > max_seq_len:
                raise APIError(400, f"prompt of {len(ids)} tokens + max_tokens={limit} exceeds the model's context of "
                               f"max_seq_len={max_seq_len} tokens", "context_length_exceeded")  # fmt: skip
        try:
            job = Job(llm, body, prompt_ids, max_tokens, logprobs)
        except (ValueError, ValidationError) as error:
            raise APIError(400, str(error)) from None
        if drain.draining:
            raise drain.error()
        admission.admit(job, len(job.params))
        return job

    def token_text(token: int) -> str:
        return tokenizer.decode([token]) if tokenizer is not None else str(token)

    def finish_log(request_id: str, job: Job, start: float, unfinished: str) -> None:
        """Count the request's choices and log its line; `unfinished`: what ended those that did not finish
        ("abort": the client left; "error": the server failed)."""
        reasons = []
        for index, output in enumerate(job.finals):
            if output is None:
                metrics.requests.labels(unfinished).inc()
                reasons.append(unfinished)
            else:  # choices of one prompt share it: its tokens count once
                metrics.finished(output, count_prompt=index % job.n == 0)
                reasons.append(output.outputs[0].finish_reason or "abort")
        usage = job.usage()
        firsts = [f.metrics.first_token_time for f in job.finals if f is not None and f.metrics.first_token_time]
        ttft = f"{min(firsts) - start:.3f} s" if firsts else "-"
        log.info("%s: %d prompt tokens, %d output tokens, TTFT %s, total %.3f s, finish %s", request_id,
                 usage["prompt_tokens"], usage["completion_tokens"], ttft, time.time() - start, ",".join(reasons))  # fmt: skip

    def sse(payload: BaseModel | str) -> str:
        return f"data: {payload if isinstance(payload, str) else payload.model_dump_json()}\n\n"

    async def respond(job: Job, body, kind: str, logprobs_k: int | None, http: Request):
        """A JSON response, or a stream of server-sent events; `kind`: "completion" or "chat"."""
        completion_kind = kind == "completion"
        base = {"id": f"{'cmpl' if completion_kind else 'chatcmpl'}-{uuid.uuid4().hex}", "model": model_name}
        start, k = time.time(), logprobs_k or 0
        request_id = http.state.request_id  # X-Request-Id, or one of ours (middleware.RequestId)
        unfinished = "abort"  # what ended choices that did not finish: the client leaving, unless set otherwise

        def delta(index: int, output: RequestOutput) -> tuple[str, list[int], list[dict] | None]:
            completion = output.outputs[0]
            text = completion.text or ""
            new_text, new_tokens = text[len(job.sent_text[index]) :], completion.token_ids[job.sent_tokens[index] :]
            entries = completion.logprobs[job.sent_tokens[index] :] if completion.logprobs is not None else None
            job.sent_text[index], job.sent_tokens[index] = text, len(completion.token_ids)
            metrics.tokens(len(new_tokens))
            if output.finished:
                job.finals[index] = output
            return new_text, new_tokens, entries

        if not body.stream:

            async def collect() -> None:
                async for index, output in run(job, stream=False):
                    delta(index, output)

            task = asyncio.ensure_future(collect())
            try:  # a client gone before its answer: abort (cancelling `run` aborts the requests)
                while not (await asyncio.wait([task], timeout=0.25))[0]:
                    if await http.is_disconnected():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                        # Nobody to answer: an empty response (nginx's 499), not a CancelledError out of the
                        # route, which uvicorn logs as an error with its traceback. A cancel of this task
                        # itself still propagates.
                        if getattr(asyncio.current_task(), "cancelling", lambda: 0)():  # Python >= 3.11
                            raise asyncio.CancelledError
                        return Response(status_code=499)
                await task
            except Exception as error:  # APIError: the shutdown's deadline or --request-timeout
                unfinished = error.code if isinstance(error, APIError) else "error"
                raise
            finally:
                task.cancel()
                admission.release(job)
                finish_log(request_id, job, start, unfinished)
            finals = [(i, final.outputs[0]) for i, final in enumerate(job.finals)]
            usage = Usage(**job.usage())
            if completion_kind:
                return CompletionResponse(**base, usage=usage, choices=[
                    CompletionChoice(index=i, text=c.text or "", token_ids=c.token_ids, finish_reason=c.finish_reason,
                                     logprobs=completion_logprobs(c.token_ids, c.logprobs, k, 0, token_text))
                    for i, c in finals
                ])  # fmt: skip
            return ChatCompletionResponse(**base, usage=usage, choices=[
                ChatChoice(index=i, message=AssistantMessage(content=c.text or ""), finish_reason=c.finish_reason,
                           logprobs=chat_logprobs(c.token_ids, c.logprobs, k, token_text))
                for i, c in finals
            ])  # fmt: skip

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = StreamChunks(kind, base["id"], model_name)

        async def events() -> AsyncIterator[str]:
            # The final event of the last choice to finish waits for the usage chunk and [DONE], to go out with
            # them in one write: when a whole batch finishes in one step, the event loop has that many streams
            # to end at once, and a write (through the middleware, the HTTP layer and a syscall) is what costs.
            last = ""
            try:
                if not completion_kind:  # OpenAI's first chunk of each choice: the role
                    for index in range(len(job.params)):
                        yield sse(ChatCompletionChunk(**base, choices=[
                            ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))]))  # fmt: skip
                finished = 0
                # Closed explicitly, so that a client who leaves aborts its requests now, not at GC.
                async with contextlib.aclosing(run(job, stream=True)) as outputs:
                    async for index, output in outputs:
                        offset = len(job.sent_text[index])
                        text, tokens, entries = delta(index, output)
                        reason = output.outputs[0].finish_reason if output.finished else None
                        finished += output.finished
                        if not text and not tokens and reason is None:
                            continue
                        logprobs = (completion_logprobs(tokens, entries, k, offset, token_text) if completion_kind
                                    else chat_logprobs(tokens, entries, k, token_text))  # fmt: skip
                        event = sse(chunks.chunk(index, text, tokens, reason, logprobs))
                        if finished < len(job.params):
                            yield event
                        else:
                            last = event
                end, last = last, ""
                if include_usage:
                    usage = Usage(**job.usage())
                    end += sse(CompletionResponse(**base, choices=[], usage=usage) if completion_kind
                               else ChatCompletionChunk(**base, choices=[], usage=usage))  # fmt: skip
                yield end + sse("[DONE]")
            except Exception as error:  # headers are sent: the failure goes in the stream, then its end
                nonlocal unfinished
                if last:  # held back above; nothing fails after the last choice's end, but nothing is lost if so
                    yield last
                if isinstance(error, APIError):  # the shutdown's deadline or --request-timeout
                    unfinished, body = error.code, error_body(error.status, error.message, error.code)
                else:
                    log.error("%s failed mid-stream", request_id, exc_info=error)
                    unfinished = "error"
                    body = error_body(500, f"internal error: {type(error).__name__}: {error}", "internal_error")
                metrics.errors.labels(body["error"]["code"]).inc()
                yield sse(json.dumps(body))
                yield sse("[DONE]")
            finally:
                admission.release(job)
                finish_log(request_id, job, start, unfinished)

        return _ClosingStreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check(body)
        try:
            texts = body.prompts()
        except ValueError as error:
            raise APIError(400, str(error), param="prompt") from None
        ids = await prompts.encode(texts)
        max_tokens = [body.max_tokens or max(1, max_seq_len - len(p)) for p in ids]
        return await respond(make_job(body, ids, max_tokens, body.logprobs), body, "completion", body.logprobs, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        check(body)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as error:
            raise APIError(400, f"messages: {error}", param="messages") from None
        ids = await prompts.chat(messages)
        limit = body.max_completion_tokens or body.max_tokens or max(1, max_seq_len - len(ids))
        k = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(make_job(body, [ids], [limit], k), body, "chat", k, http)

    return app
