"""Continuous batching: which tokens of which requests the next engine step computes.

Each step has a token budget (`max_num_tokens`) and at most `max_batch_size` sequences. Running requests
go first, in admission order, so that decoding requests keep their pace (one token each) and a prompt
being prefilled in chunks continues; waiting requests are admitted after them while budget and KV blocks
last, their prompts reusing cached blocks (prefix caching) and split into chunks where the budget ends.
When a running request needs a block and none is free, the most recently admitted request is preempted:
its blocks are freed and it waits again, to be recomputed (prompt and generated tokens) when it returns.
"""

from __future__ import annotations

from collections import deque

from compiled_llm.engine.request import Request, RequestState
from compiled_llm.runtime import BlockPool, ScheduledChunk


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_tokens: int, max_batch_size: int):
        self.pool = pool
        self.max_num_tokens = max_num_tokens
        self.max_batch_size = max_batch_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, request: Request, num_tokens: int) -> int:
        seq = request.seq
        return -(-(seq.num_computed + num_tokens) // self.pool.block_size) - len(seq.block_ids)

    def _grow(self, request: Request, num_tokens: int) -> None:
        request.seq.block_ids += self.pool.allocate(self._blocks_needed(request, num_tokens))

    def release(self, request: Request) -> None:
        """Free a request's blocks (shared prefix blocks stay with their other holders)."""
        request.seq.release(self.pool)
        request.num_registered_blocks = 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.release(request)
        request.state = RequestState.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _chunk(self, request: Request, num_tokens: int) -> ScheduledChunk:
        seq = request.seq
        done = seq.num_computed + num_tokens == len(seq.token_ids)  # the chunk ends the pending tokens: sample after it
        return ScheduledChunk(seq, num_tokens, "last" if done else "none")

    def schedule(self) -> list[tuple[Request, ScheduledChunk]]:
        budget = self.max_num_tokens
        scheduled: list[tuple[Request, ScheduledChunk]] = []
        running = RequestState.RUNNING
        # Runs for every running request every step (a thousand at large batches): kept to plain
        # attribute reads in the common case of a decode token that needs no new block.
        for request in list(self.running):
            if budget == 0:
                break
            if request.state is not running:
                continue  # preempted below, by an earlier request of this loop
            if request.last_token_in_flight:
                continue  # finishes when its token is read: nothing left to compute
            seq = request.seq
            num_tokens = min(len(seq.token_ids) - seq.num_computed, budget)
            if self._blocks_needed(request, num_tokens) > 0:
                while self._blocks_needed(request, num_tokens) > self.pool.num_free:
                    victim = self.running[-1]  # the latest admitted; never one already scheduled this step
                    self._preempt(victim)
                    if victim is request:
                        break
                if request.state is not running:
                    break
                self._grow(request, num_tokens)
            scheduled.append((request, self._chunk(request, num_tokens)))
            budget -= num_tokens

        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            if not request.seq.block_ids:
                cached = self.pool.match_prefix(request.seq.token_ids)
                request.seq.block_ids = cached
                request.seq.num_computed = len(cached) * self.pool.block_size
                request.num_registered_blocks = len(cached)
                if request.num_cached_tokens is None:
                    request.num_cached_tokens = request.seq.num_computed
            num_tokens = min(request.seq.num_pending, budget)
            if self._blocks_needed(request, num_tokens) > self.pool.num_free:
                if not self.running and not scheduled:  # alone, it would still not fit: never happens for
                    raise RuntimeError(  # requests that Engine.add_request accepted
                        f"request {request.request_id} needs more KV blocks than the cache has"
                    )
                self.release(request)  # give back the cached blocks it took; retry in a later step
                break
            self.waiting.popleft()
            request.state = RequestState.RUNNING
            self.running.append(request)
            self._grow(request, num_tokens)
            scheduled.append((request, self._chunk(request, num_tokens)))
            budget -= num_tokens
        return scheduled

    def finish(self, request: Request) -> None:
        """Remove a finished (or aborted) request and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.release(request)
