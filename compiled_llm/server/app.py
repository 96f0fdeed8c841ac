"""The OpenAI-compatible HTTP server: FastAPI routes over `LLM.generate_async`.

Each HTTP request becomes one engine request per prompt and per completion (n); their outputs are merged
into one response, or into server-sent events as they grow. A client that disconnects mid-stream cancels
the response, which aborts its requests and frees their KV blocks after the engine step in progress.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from compiled_llm.llm import LLM, RequestOutput
from compiled_llm.server.metrics import ServerMetrics
from compiled_llm.server.protocol import ChatCompletionRequest, CompletionRequest
from compiled_llm.server.responses import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    CompletionChoice, CompletionResponse, Usage, chat_logprobs, completion_logprobs,
)  # fmt: skip

log = logging.getLogger("compiled_llm.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def _error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    kind = {401: "authentication_error", 503: "service_unavailable"}.get(status, "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Job:
    """One HTTP request's engine requests (prompt i, completion j -> choice i * n + j), and what has been
    sent of each choice."""

    def __init__(self, llm: LLM, body, prompt_ids: list[list[int]], max_tokens: list[int], logprobs: int | None):
        self.prompt_ids = prompt_ids
        self.params = []
        for ids, limit in zip(prompt_ids, max_tokens):
            base = body.sampling_params(limit, logprobs)
            self.params += [(ids, base.for_completion(j)) for j in range(body.n)]
        for ids, params in self.params:
            llm.engine.check_request(ids, params)  # every check before anything is queued (raises ValueError)
        self.n = body.n
        self.sent_text = [""] * len(self.params)
        self.sent_tokens = [0] * len(self.params)
        self.finals: list[RequestOutput | None] = [None] * len(self.params)

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.prompt_ids)
        completion = sum(len(f.outputs[0].token_ids) for f in self.finals if f is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def build_app(llm: LLM, model_name: str, api_key: str | None = None, max_waiting: int = 1024) -> FastAPI:
    """The server's app. `max_waiting`: queued requests beyond which new ones get 503 (Retry-After)."""
    app = FastAPI(title="compiled-llm", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(llm)
    tokenizer = llm.tokenizer
    max_seq_len = llm.compiled.max_seq_len

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError):
        return _error_response(error.status, error.message, error.code, error.param, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return _error_response(400, f"{where}: {first.get('msg')}" if where else first.get("msg"), param=where or None)

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error_response(401, "invalid or missing API key (Authorization: Bearer KEY)")
        return await call_next(request)

    @app.get("/health")
    async def health():
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

    def make_job(body, prompt_ids: list[list[int]], max_tokens: list[int], logprobs: int | None) -> _Job:
        try:
            job = _Job(llm, body, prompt_ids, max_tokens, logprobs)
        except (ValueError, ValidationError) as error:
            raise APIError(400, str(error)) from None
        if len(job.params) > max_waiting:
            raise APIError(400, f"{len(job.params)} completions (n x prompts) exceed the server's queue of "
                           f"{max_waiting}", param="n")  # fmt: skip
        if llm.num_waiting + len(job.params) > max_waiting:
            raise APIError(503, f"the server is busy ({llm.num_waiting} requests waiting); retry later",
                           headers={"Retry-After": "1"})  # fmt: skip
        return job

    def token_text(token: int) -> str:
        return tokenizer.decode([token]) if tokenizer is not None else str(token)

    async def run(job: _Job, stream: bool) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output so far) as the engine produces them; the last per choice is finished."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, ids: list[int], params) -> None:
            try:
                async for output in llm.generate_async(ids, params, streaming=stream):
                    queue.put_nowait((index, output))
            except BaseException as error:  # noqa: BLE001  (handed to the consumer, which re-raises it)
                queue.put_nowait((index, error))
                raise
            queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, ids, params)) for i, (ids, params) in enumerate(job.params)]
        try:
            remaining = len(tasks)
            while remaining:
                index, output = await queue.get()
                if output is None:
                    remaining -= 1
                elif isinstance(output, BaseException):
                    raise output
                else:
                    yield index, output
        finally:  # finished, failed or cancelled (client gone): unfinished requests are aborted
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def finish_log(request_id: str, job: _Job, start: float) -> None:
        for index, output in enumerate(job.finals):
            if output is None:  # the client left (or the engine failed) before it finished
                metrics.requests.labels("abort").inc()
            else:  # choices of one prompt share it: its tokens count once
                metrics.finished(output, count_prompt=index % job.n == 0)
        usage = job.usage()
        firsts = [f.metrics.first_token_time for f in job.finals if f is not None and f.metrics.first_token_time]
        ttft = f"{min(firsts) - start:.3f} s" if firsts else "-"
        log.info("%s: %d prompt tokens, %d output tokens, TTFT %s, total %.3f s", request_id,
                 usage["prompt_tokens"], usage["completion_tokens"], ttft, time.time() - start)  # fmt: skip

    def sse(payload: BaseModel | str) -> str:
        return f"data: {payload if isinstance(payload, str) else payload.model_dump_json()}\n\n"

    async def respond(job: _Job, body, kind: str, logprobs_k: int | None, http: Request):
        """A JSON response, or a stream of server-sent events; `kind`: "completion" or "chat"."""
        completion_kind = kind == "completion"
        base = {"id": f"{'cmpl' if completion_kind else 'chatcmpl'}-{uuid.uuid4().hex}", "model": model_name}
        start, k = time.time(), logprobs_k or 0

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
                        break
                await task
            finally:
                task.cancel()
                finish_log(base["id"], job, start)
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

        async def events() -> AsyncIterator[str]:
            try:
                if not completion_kind:  # OpenAI's first chunk of each choice: the role
                    for index in range(len(job.params)):
                        yield sse(ChatCompletionChunk(**base, choices=[
                            ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))]))  # fmt: skip
                async for index, output in run(job, stream=True):
                    offset = len(job.sent_text[index])
                    text, tokens, entries = delta(index, output)
                    reason = output.outputs[0].finish_reason if output.finished else None
                    if not text and not tokens and reason is None:
                        continue
                    if completion_kind:
                        yield sse(CompletionResponse(**base, choices=[CompletionChoice(
                            index=index, text=text, token_ids=tokens, finish_reason=reason,
                            logprobs=completion_logprobs(tokens, entries, k, offset, token_text))]))  # fmt: skip
                    else:
                        yield sse(ChatCompletionChunk(**base, choices=[ChatChunkChoice(
                            index=index, delta=ChatDelta(content=text or None), finish_reason=reason,
                            logprobs=chat_logprobs(tokens, entries, k, token_text))]))  # fmt: skip
                if include_usage:
                    usage = Usage(**job.usage())
                    yield sse(CompletionResponse(**base, choices=[], usage=usage) if completion_kind
                              else ChatCompletionChunk(**base, choices=[], usage=usage))  # fmt: skip
                yield sse("[DONE]")
            finally:
                finish_log(base["id"], job, start)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        check(body)
        try:
            prompts = body.prompts()
        except ValueError as error:
            raise APIError(400, str(error), param="prompt") from None
        if tokenizer is None and any(isinstance(p, str) for p in prompts):
            raise APIError(400, "string prompts need a tokenizer; this model has none: send token ids", param="prompt")
        ids = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
        max_tokens = [body.max_tokens or max(1, max_seq_len - len(p)) for p in ids]
        return await respond(make_job(body, ids, max_tokens, body.logprobs), body, "completion", body.logprobs, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        check(body)
        from jinja2 import TemplateError

        try:
            ids = llm.chat_prompt_ids([{"role": m.role, "content": m.text()} for m in body.messages])
        except (ValueError, TemplateError) as error:  # e.g. a template that refuses a role order
            raise APIError(400, f"messages: {error}", param="messages") from None
        limit = body.max_completion_tokens or body.max_tokens or max(1, max_seq_len - len(ids))
        k = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(make_job(body, [ids], [limit], k), body, "chat", k, http)

    return app
