"""OpenAI's request schemas for /v1/completions and /v1/chat/completions (with vLLM's extensions top_k,
min_p, repetition_penalty, ignore_eos, stop_token_ids), and their translation to `SamplingParams`.

Fields of OpenAI's API that this server does not implement are refused when set (400), never ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compiled_llm.engine import SamplingParams
from compiled_llm.sampling import GREEDY_BELOW


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # torch.Generator's range (n completions add to it)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    def unsupported(self) -> list[str]:
        """Names of set fields this server does not implement."""
        return ["logit_bias"] if self.logit_bias else []

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        temperature = 1.0 if self.temperature is None else self.temperature
        greedy = temperature < GREEDY_BELOW  # top-p/top-k/min-p have no effect then: dropped rather than refused
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=None if greedy or self.top_k in (None, -1, 0) else self.top_k,
            top_p=1.0 if greedy or self.top_p is None else self.top_p,
            min_p=0.0 if greedy else self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=logprobs,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        return names + [n for n in ("echo", "suffix") if getattr(self, n)] + (["best_of"] if (self.best_of or 1) > 1 else [])

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        if not self.prompt:
            raise ValueError("prompt is empty")
        return list(self.prompt)


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"message content parts of type {part.get('type')!r} are not supported, only 'text'")
            if not isinstance(part.get("text", ""), str):
                raise ValueError("a text content part's 'text' must be a string")
            parts.append(part.get("text", ""))
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    response_format: dict | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported() + (["tools"] if self.tools else [])
        if self.response_format and self.response_format.get("type") != "text":
            names.append("response_format")
        return names
