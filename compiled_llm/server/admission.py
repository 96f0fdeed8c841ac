"""Admission control (--max-waiting): requests accepted but not yet handed to the engine count as waiting.

A request reaches the engine when its response starts (a stream's first iteration), a moment after it was
accepted; a burst of requests all passed a check that counted only the engine's queue (limit 4: 40 of 40
admitted). Each accepted request now holds a place until it is handed over, or until its job is dropped
unstarted (the response over, or, for a client gone before its response began, when the job is collected).
"""

from __future__ import annotations

import threading
import weakref

from compiled_llm.server.errors import APIError


class Admission:
    def __init__(self, llm, max_waiting: int):
        self.llm = llm
        self.max_waiting = max_waiting
        self.accepted = 0  # accepted, not yet handed to the engine
        # A job collected by the cyclic GC releases its places from whichever thread runs the collection.
        self._lock = threading.Lock()

    def admit(self, job, requests: int) -> None:
        """Hold `requests` places for `job`, or raise APIError (400 if it could never fit, 503 if busy)."""
        if requests > self.max_waiting:
            raise APIError(400, f"{requests} completions (n x prompts) exceed the server's queue of {self.max_waiting}",
                           param="n")  # fmt: skip
        waiting = self.llm.num_waiting + self.accepted
        if waiting + requests > self.max_waiting:
            raise APIError(503, f"the server is busy ({waiting} requests waiting); retry later",
                           headers={"Retry-After": "1"})  # fmt: skip
        with self._lock:
            self.accepted += requests
        job.places = [requests]  # a cell the finalizer shares, so that it does not hold the job
        weakref.finalize(job, self._release, job.places)

    def handed_over(self, job) -> None:
        """One of `job`'s requests is now the engine's (counted by llm.num_waiting): its place is freed."""
        with self._lock:
            if job.places[0] > 0:
                job.places[0] -= 1
                self.accepted -= 1

    def release(self, job) -> None:
        """The job is over (answered, failed or abandoned): places of requests it never handed over are freed."""
        self._release(job.places)

    def _release(self, places: list[int]) -> None:
        with self._lock:
            self.accepted -= places[0]
            places[0] = 0
