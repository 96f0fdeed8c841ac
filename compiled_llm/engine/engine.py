"""`Engine`: requests in, one engine step at a time (schedule, run the compiled model, sample, stop)."""

from __future__ import annotations

import itertools

import torch

from compiled_llm.compiled_model import CompiledModel
from compiled_llm.engine.detokenizer import IncrementalDetokenizer
from compiled_llm.engine.request import Request, RequestState
from compiled_llm.engine.sampling_params import SamplingParams
from compiled_llm.engine.scheduler import Scheduler
from compiled_llm.runtime.block_pool import extend_block_hashes
from compiled_llm.sampling import next_tokens


class Engine:
    def __init__(self, compiled: CompiledModel, eos_token_ids: frozenset[int], tokenizer=None):
        self.compiled = compiled
        self.tokenizer = tokenizer
        self.runner = compiled.runner
        self.eos_token_ids = eos_token_ids
        config = compiled.config
        self.scheduler = Scheduler(self.runner.kv_cache.allocator, config.max_num_tokens, config.max_batch_size)
        self._ids = itertools.count()

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None) -> Request:
        """Queue a request; raises ValueError for one that could never run."""
        vocab = self.compiled.vocab_size
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {vocab}), got {bad[:5]}")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.compiled.max_seq_len:
            raise ValueError(
                f"prompt of {len(prompt_token_ids)} tokens + max_tokens={params.max_tokens} exceeds the model's "
                f"context of max_seq_len={self.compiled.max_seq_len} tokens"
            )
        pool = self.runner.kv_cache.allocator
        if -(-total // pool.block_size) > pool.num_blocks:
            raise ValueError(
                f"prompt of {len(prompt_token_ids)} tokens + max_tokens={params.max_tokens} needs more KV blocks than "
                f"the cache has ({pool.num_blocks} of {pool.block_size} tokens): raise num_kv_blocks"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (LLM(model, tokenizer)); stop_token_ids do not")
        request = Request(str(next(self._ids)), list(prompt_token_ids), params, prompt)
        if self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop)
        self.scheduler.add(request)
        return request

    def abort(self, request: Request) -> None:
        """Stop a request now and free its KV blocks."""
        if request.state is not RequestState.FINISHED:
            self.scheduler.finish(request)
            request.finish("abort")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[Request]:
        """Run one engine step; returns the requests that got a token (finished ones included)."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        logits = self.runner.execute([chunk for _, chunk in scheduled])
        sampling = [request for request, chunk in scheduled if chunk.logits == "last"]
        tokens = self._sample(sampling, logits)
        pool = self.scheduler.pool
        if pool.enable_prefix_caching:
            for request, _ in scheduled:  # blocks now full of computed tokens become findable
                self._register_full_blocks(request)
        for request, token in zip(sampling, tokens):
            request.append(token, self.eos_token_ids)
            if request.state is RequestState.FINISHED:
                self.scheduler.finish(request)
        return sampling

    def _register_full_blocks(self, request: Request) -> None:
        """Hash and register only the blocks this step filled (the chain of earlier ones is kept)."""
        seq = request.seq
        extend_block_hashes(request.block_hashes, seq.token_ids[: seq.num_computed], self.scheduler.pool.block_size)
        full = seq.num_computed // self.scheduler.pool.block_size
        first = request.num_registered_blocks
        self.scheduler.pool.register(seq.block_ids[first:full], request.block_hashes[first:full])
        request.num_registered_blocks = full

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        if not requests:
            return []
        tokens = logits.argmax(dim=-1).tolist()  # greedy rows, and one sync for the whole step
        for i, request in enumerate(requests):
            params = request.params
            if not params.greedy:  # its own generator: the same seed gives the same tokens in any batch
                row = logits[i : i + 1].float().cpu()
                token = next_tokens(row, True, params.temperature, params.top_k, params.top_p, request.generator)
                tokens[i] = int(token[0])
        return tokens
