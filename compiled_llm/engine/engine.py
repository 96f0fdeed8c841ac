"""`Engine`: requests in, one engine step at a time (schedule, run the compiled model, sample, stop)."""

from __future__ import annotations

import itertools
import random

from compiled_llm.compiled_model import CompiledModel
from compiled_llm.engine.detokenizer import IncrementalDetokenizer
from compiled_llm.engine.limits import EngineStats, RequestLimits
from compiled_llm.engine.request import Request, RequestState
from compiled_llm.engine.sampler import SampledStep
from compiled_llm.engine.sampling_params import SamplingParams
from compiled_llm.engine.scheduler import Scheduler
from compiled_llm.runtime.block_pool import extend_block_hashes


class Engine:
    def __init__(self, compiled: CompiledModel, eos_token_ids: frozenset[int], tokenizer=None):
        self.compiled = compiled
        self.tokenizer = tokenizer
        self.runner = compiled.runner
        self.eos_token_ids = eos_token_ids
        config = compiled.config
        self.scheduler = Scheduler(self.runner.kv_cache.allocator, config.max_num_tokens, config.max_batch_size)
        self._ids = itertools.count()
        self._in_flight: SampledStep | None = None  # the last step's tokens, not read back yet
        pool = self.runner.kv_cache.allocator
        self.limits = RequestLimits(compiled.vocab_size, compiled.max_seq_len, pool.block_size, pool.num_blocks,
                                    tokenizer is not None)  # fmt: skip

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None) -> Request:
        """Queue a request; raises ValueError for one that could never run."""
        request = self.make_request(prompt_token_ids, params, prompt)
        self.queue(request)
        return request

    def queue(self, request: Request) -> None:
        """Queue a request made by make_request."""
        self.scheduler.add(request)

    def make_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None) -> Request:
        """A checked request, not queued yet (`queue` queues it); raises ValueError for one that
        could never run. Touches no engine state: callable while a step runs in another thread."""
        self.check_request(prompt_token_ids, params)
        request = Request(str(next(self._ids)), list(prompt_token_ids), params, prompt)
        request.seed_generator(self.compiled.device)
        if self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop)
        return request

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request that could never run."""
        self.limits.check(prompt_token_ids, params)

    def stats(self) -> EngineStats:
        pool = self.scheduler.pool
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), pool.num_blocks,
                           pool.num_blocks - pool.num_free, pool.hit_tokens, pool.queried_tokens,
                           self.scheduler.num_preemptions)  # fmt: skip

    def warm_up(self, max_tokens: int = 4) -> None:
        """Run a full step of prompt tokens, then decode steps of a full batch, on random prompts, and forget
        them (their counts too): what a kernel, a library or the allocator sets up at its first use of those
        sizes is done before the first request. A server's first wave of requests waited 0.77 s more without it
        (Llama-3.1-8B on an H200, 64 requests of 128 tokens: BENCHMARKS.md)."""
        count = self.scheduler.max_batch_size
        length = max(1, min(self.compiled.max_seq_len - max_tokens, self.scheduler.max_num_tokens // count))
        pool = self.scheduler.pool
        length = min(length, pool.num_blocks * pool.block_size - max_tokens)  # a cache smaller than a step
        if length < 1:
            return
        count = min(count, pool.num_blocks // -(-(length + max_tokens) // pool.block_size))  # all fit at once
        generator = random.Random(0)
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        requests = [self.add_request([generator.randrange(self.compiled.vocab_size) for _ in range(length)], params)
                    for _ in range(count)]  # fmt: skip
        try:
            while self.has_work:
                self.step()
        finally:
            for request in requests:
                self.abort(request)
        pool.hit_tokens = pool.queried_tokens = 0
        self.scheduler.num_preemptions = 0

    def abort(self, request: Request) -> None:
        """Stop a request now and free its KV blocks."""
        if request.state is not RequestState.FINISHED:
            self.scheduler.finish(request)
            request.finish("abort")

    @property
    def has_work(self) -> bool:
        if self.scheduler.has_work:
            return True
        in_flight = self._in_flight.requests if self._in_flight is not None else ()
        return any(r.state is not RequestState.FINISHED for r in in_flight)

    def step(self) -> list[Request]:
        """Run one engine step; returns the requests that got a token (finished ones included).

        Steps overlap: a step is launched first, and only then are the tokens of the previous step read
        (they are already sampled on the device, and feed this step there). So the host schedules and
        prepares step n+1 while the GPU runs step n, and each request's newest token is one step late
        on the host. A request that stopped (EOS, stop string) is computed by one step more, whose token
        is dropped; one that reaches max_tokens is not scheduled again.
        """
        scheduled = self.scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
        logits = None
        if scheduled:
            for request, chunk in scheduled:
                if request.token_in_flight and chunk.seq.num_computed + chunk.num_tokens == len(chunk.seq.token_ids):
                    chunk.fill_row = previous.rows[request]
            logits = self.runner.execute([chunk for _, chunk in scheduled], previous.tokens if previous else None)
        updated = self._process(previous) if previous is not None else []
        if scheduled:
            if self.scheduler.pool.enable_prefix_caching:
                block_size = self.scheduler.pool.block_size
                for request, _ in scheduled:  # blocks now full of computed tokens become findable
                    filled = request.seq.num_computed >= (request.num_registered_blocks + 1) * block_size
                    if filled and request.state is not RequestState.FINISHED:
                        self._register_full_blocks(request)
            sampling = [request for request, chunk in scheduled if chunk.logits == "last"]
            if sampling:
                self._in_flight = SampledStep(sampling, logits, self.compiled.vocab_size)
                for request in sampling:
                    if request.state is not RequestState.FINISHED:
                        request.add_placeholder()
        return updated

    def _process(self, sampled: SampledStep) -> list[Request]:
        """Read a step's tokens (waiting for them if needed) and give them to their requests."""
        updated = []
        for request, (token, logprobs) in zip(sampled.requests, sampled.results()):
            if request.state is RequestState.FINISHED:  # stopped or aborted since: the token is dropped
                continue
            request.append(token, self.eos_token_ids, logprobs)
            if request.state is RequestState.FINISHED:
                self.scheduler.finish(request)
            updated.append(request)
        return updated

    def _register_full_blocks(self, request: Request) -> None:
        """Hash and register only the blocks filled since the last call (the chain of earlier ones is kept)."""
        seq = request.seq
        known = min(seq.num_computed, len(seq) - request.token_in_flight)  # never a placeholder
        full = known // self.scheduler.pool.block_size
        first = request.num_registered_blocks
        if full <= first:
            return
        extend_block_hashes(request.block_hashes, seq.token_ids[:known], self.scheduler.pool.block_size)
        self.scheduler.pool.register(seq.block_ids[first:full], request.block_hashes[first:full])
        request.num_registered_blocks = full
