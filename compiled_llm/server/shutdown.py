"""Draining on shutdown: what running requests get when the server stops.

From the first SIGTERM/SIGINT (`begin`), new requests get 503 and /health answers 503; running requests
have `timeout_s` to finish; then (`expire`) each one still running fails the way the API says a request
fails: a non-streaming one with a 503 JSON error, a stream with an `error` event and `data: [DONE]`, their
engine requests aborted. uvicorn's own deadline comes a little later, for whatever is left.
"""

from __future__ import annotations

import asyncio
import logging

from compiled_llm.server.errors import APIError

log = logging.getLogger("compiled_llm.server")


class Drain:
    def __init__(self, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self.draining = False
        self.expired = False
        self._jobs: set[asyncio.Queue] = set()  # the output queue of each running job

    def track(self, queue: asyncio.Queue) -> None:
        self._jobs.add(queue)
        if self.expired:
            queue.put_nowait((-1, self.error()))

    def untrack(self, queue: asyncio.Queue) -> None:
        self._jobs.discard(queue)

    @staticmethod
    def error() -> APIError:
        return APIError(503, "the server is shutting down; retry on another replica or later", "server_shutting_down",
                        headers={"Retry-After": "5"})  # fmt: skip

    def begin(self) -> None:
        """The first shutdown signal: called on the event loop."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: %d requests running get %.0f s to finish", len(self._jobs), self.timeout_s)
        asyncio.get_running_loop().call_later(self.timeout_s, self.expire)

    def expire(self) -> None:
        """The deadline (or a second signal): every job still running fails now."""
        if self.expired:
            return
        self.expired = True
        if self._jobs:
            log.warning("shutdown timeout: failing %d requests still running", len(self._jobs))
        for queue in list(self._jobs):
            queue.put_nowait((-1, self.error()))
