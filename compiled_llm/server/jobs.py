"""A request's engine requests (`Job`: one per prompt and per completion) and their outputs as one async stream
(`JobRunner.run`), failed from outside by the shutdown's deadline or --request-timeout (`Interrupt`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from compiled_llm.llm import LLM, RequestOutput
from compiled_llm.server.admission import Admission
from compiled_llm.server.errors import APIError
from compiled_llm.server.shutdown import Drain

if TYPE_CHECKING:
    from compiled_llm.engine_core import EngineCoreClient

NEWER = object()  # in a job's queue: its choice has a newer output


class Interrupt:
    """The failure of a job of one choice from outside (the shutdown's deadline, --request-timeout), put as
    `(index, error)` like into the queue of a job of several (Drain tracks either). The job's task waits in
    the engine's stream itself, so the failure cancels that wait, and only that wait: a task busy elsewhere
    (writing to its client) finds the failure before it next waits."""

    def __init__(self):
        self.task = asyncio.current_task()
        self.error: BaseException | None = None
        self.waiting = False

    def put_nowait(self, item: tuple[int, BaseException]) -> None:
        if self.error is None:
            self.error = item[1]
            if self.waiting:
                self.task.cancel()

    async def next(self, outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
        """The next of `outputs` (StopAsyncIteration after the last), or the failure if it comes first."""
        if self.error is not None:
            raise self.error
        self.waiting = True
        try:
            return await outputs.__anext__()
        except asyncio.CancelledError:
            if self.error is None:
                raise  # not ours: the client left, or the task was cancelled from outside
            if hasattr(self.task, "uncancel"):  # Python >= 3.11: the task is not being cancelled any more
                self.task.uncancel()
            raise self.error from None
        finally:
            self.waiting = False


class Job:
    """One HTTP request's engine requests (prompt i, completion j -> choice i * n + j), and what has been
    sent of each choice."""

    def __init__(self, llm: LLM | EngineCoreClient, body, prompt_ids: list[list[int]], max_tokens: list[int],
                 logprobs: int | None):  # fmt: skip
        self.prompt_ids = prompt_ids
        self.params = []
        for ids, limit in zip(prompt_ids, max_tokens):
            base = body.sampling_params(limit, logprobs)
            self.params += [(ids, base.for_completion(j)) for j in range(body.n)]
        for ids, params in self.params:
            llm.check_request(ids, params)  # every check before anything is queued (raises ValueError)
        self.n = body.n
        self.sent_text = [""] * len(self.params)
        self.sent_tokens = [0] * len(self.params)
        self.finals: list[RequestOutput | None] = [None] * len(self.params)

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.prompt_ids)
        completion = sum(len(f.outputs[0].token_ids) for f in self.finals if f is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class JobRunner:
    """Runs jobs on the engine, holding what every job shares: the engine, admission, the shutdown and the
    request timeout."""

    def __init__(self, llm: LLM | EngineCoreClient, admission: Admission, drain: Drain,
                 request_timeout_s: float | None):  # fmt: skip
        self.llm, self.admission, self.drain, self.request_timeout_s = llm, admission, drain, request_timeout_s

    def run(self, job: Job, stream: bool) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output so far) as the engine produces them; the last per choice is finished.
        Each output holds everything so far, so only a choice's newest unread one is kept: a client that reads
        slowly skips to it, instead of a queue of copies growing with the square of its length. A failure
        from outside (the shutdown's deadline, --request-timeout) is raised in the outputs' place."""
        return self._run_one(job, stream) if len(job.params) == 1 else self._run_merged(job, stream)

    def _fail_later(self, put_nowait) -> asyncio.TimerHandle | None:
        """--request-timeout: the job's failure, handed to `put_nowait` as a `(-1, error)` item."""
        if self.request_timeout_s is None:
            return None
        return asyncio.get_running_loop().call_later(self.request_timeout_s, put_nowait, (-1, APIError(
            408, f"the request ran past the server's --request-timeout of {self.request_timeout_s:g} s",
            "request_timeout")))  # fmt: skip

    async def _run_one(self, job: Job, stream: bool) -> AsyncIterator[tuple[int, RequestOutput]]:
        """`run` for a job of one choice (most are), in the caller's task: the engine's stream keeps only its
        newest output itself, and a task and a queue between it and the response cost the event loop a task
        switch for every token of every stream."""
        ids, params = job.params[0]
        interrupt = Interrupt()
        self.drain.track(interrupt)  # past the shutdown timeout, it fails the job through `interrupt`
        timeout = self._fail_later(interrupt.put_nowait)
        # The place is freed and the request queued in one step of this task (no await between: the
        # generator's first step queues it before it waits), so the two are never both counted.
        self.admission.handed_over(job)
        outputs = self.llm.generate_async(ids, params, streaming=stream)
        try:
            while True:
                try:
                    output = await interrupt.next(outputs)
                except StopAsyncIteration:
                    return
                yield 0, output
        finally:  # finished, failed or closed (client gone): an unfinished request is aborted
            self.drain.untrack(interrupt)
            if timeout is not None:
                timeout.cancel()
            await outputs.aclose()

    async def _run_merged(self, job: Job, stream: bool) -> AsyncIterator[tuple[int, RequestOutput]]:
        """`run` for a job of several choices: a task per choice, and their outputs merged through a queue."""
        queue: asyncio.Queue = asyncio.Queue()  # (index, NEWER | None when done | an error)
        newest: dict[int, RequestOutput] = {}

        async def pump(index: int, ids: list[int], params) -> None:
            self.admission.handed_over(job)  # as in _run_one
            try:
                async for output in self.llm.generate_async(ids, params, streaming=stream):
                    if index not in newest:
                        queue.put_nowait((index, NEWER))
                    newest[index] = output
            except BaseException as error:  # noqa: BLE001  (handed to the consumer, which re-raises it)
                queue.put_nowait((index, error))
                raise
            queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, ids, params)) for i, (ids, params) in enumerate(job.params)]
        self.drain.track(queue)  # past the shutdown timeout, it fails the job through its queue
        timeout = self._fail_later(queue.put_nowait)
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, newest.pop(index)
        finally:  # finished, failed or cancelled (client gone): unfinished requests are aborted
            self.drain.untrack(queue)
            if timeout is not None:
                timeout.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
