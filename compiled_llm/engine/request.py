"""A request in the engine: its prompt, the tokens generated so far, and where it is in its life."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from compiled_llm.engine.detokenizer import IncrementalDetokenizer
from compiled_llm.engine.sampling_params import SamplingParams
from compiled_llm.runtime import Sequence


class RequestState(Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV blocks freed, to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # compared and hashed by identity: each request is its own
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    state: RequestState = RequestState.WAITING
    seq: Sequence = field(init=False)
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    finish_reason: str | None = None  # "stop" or "length"
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.time)
    first_token_time: float | None = None
    finish_time: float | None = None
    generator: torch.Generator | None = field(init=False, default=None)
    detokenizer: IncrementalDetokenizer | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks of computed tokens
    num_registered_blocks: int = 0  # of its blocks, the first ones are findable in the prefix cache
    logprobs: list[dict[int, float]] | None = None  # per output token, when params.logprobs is set
    # The last token is a placeholder: sampled on the device, not read back yet (see engine.py).
    token_in_flight: bool = False

    def __post_init__(self):
        self.seq = Sequence(list(self.prompt_token_ids))
        if self.params.logprobs is not None:
            self.logprobs = []

    def seed_generator(self, device: torch.device) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator(device).manual_seed(self.params.seed)

    @property
    def output_token_ids(self) -> list[int]:
        end = len(self.seq.token_ids) - self.token_in_flight
        return self.seq.token_ids[len(self.prompt_token_ids) : end]

    @property
    def num_output_tokens(self) -> int:
        """len(output_token_ids), without building the list."""
        return len(self.seq.token_ids) - len(self.prompt_token_ids) - self.token_in_flight

    @property
    def last_token_in_flight(self) -> bool:
        """Its token in flight is its last (max_tokens): nothing more to compute."""
        return self.token_in_flight and len(self.seq.token_ids) - len(self.prompt_token_ids) >= self.params.max_tokens

    def add_placeholder(self) -> None:
        self.seq.token_ids.append(-1)
        self.token_in_flight = True

    @property
    def text(self) -> str | None:
        return self.detokenizer.text if self.detokenizer is not None else None

    def append(self, token: int, eos_token_ids: frozenset[int], logprobs: dict[int, float] | None = None) -> None:
        """Add a generated token (in place of the placeholder, if one is in flight), extend the text, and
        finish the request if it stops here."""
        if self.token_in_flight:
            self.seq.token_ids[-1] = token
            self.token_in_flight = False
        else:
            self.seq.token_ids.append(token)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        if self.first_token_time is None:
            self.first_token_time = time.time()
        if token in self.params.stop_token_ids or (token in eos_token_ids and not self.params.ignore_eos):
            self.finish("stop")
        elif self.detokenizer is not None and self.detokenizer.update(self.output_token_ids):
            self.finish("stop")  # a stop string: the text already ends before it
            return
        elif self.num_output_tokens >= self.params.max_tokens:
            self.finish("length")
        if self.state is RequestState.FINISHED and self.detokenizer is not None:
            self.detokenizer.finish(self.output_token_ids)

    def finish(self, reason: str, now: float | None = None) -> None:
        if self.token_in_flight:  # aborted while a token was in flight: it will not be read
            self.seq.token_ids.pop()
            self.token_in_flight = False
        self.state, self.finish_reason = RequestState.FINISHED, reason
        self.finish_time = now or time.time()
