"""OpenAI's response schemas for completions and chat completions, whole and streamed (with vLLM's
`token_ids` extension on completion choices), and the log-probability blocks of each; `StreamChunks` writes the
streamed chunks that carry tokens without building a model per token."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class CompletionChoice(BaseModel):
    index: int
    text: str
    token_ids: list[int]  # vLLM's extension; all a model served without a tokenizer has
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: -item[1])[:k]


def completion_logprobs(token_ids: list[int], entries: list[dict[int, float]] | None, k: int, offset: int,
                        token_text: Callable[[int], str]) -> CompletionLogprobs | None:  # fmt: skip
    """`entries[i]`: {token id: logprob} of token i and the most likely ones; `offset`: where the tokens'
    text starts in the completion."""
    if entries is None:
        return None
    tokens = [token_text(t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[entry[t] for t, entry in zip(token_ids, entries)],
        top_logprobs=[{token_text(t): v for t, v in _top(entry, k)} for entry in entries],
        text_offset=offsets,
    )


def chat_logprobs(token_ids: list[int], entries: list[dict[int, float]] | None, k: int,
                  token_text: Callable[[int], str]) -> ChatLogprobs | None:  # fmt: skip
    if entries is None:
        return None

    def top(token: int, value: float) -> TopLogprob:
        text = token_text(token)
        return TopLogprob(token=text, logprob=value, bytes=list(text.encode()))

    return ChatLogprobs(content=[
        ChatTokenLogprob(**top(t, entry[t]).model_dump(), top_logprobs=[top(*pair) for pair in _top(entry, k)])
        for t, entry in zip(token_ids, entries)
    ])  # fmt: skip


# A JSON string as pydantic writes one: non-ASCII characters as they are, the same escapes (json's C encoder).
_string = json.encoder.encode_basestring


class StreamChunks:
    """The JSON of one streamed response's chunks with tokens: the same text `model_dump_json()` makes of a
    `CompletionResponse` / `ChatCompletionChunk` with one choice (keys, order, values, escapes; the tests compare
    them byte for byte), written around what stays the same for the whole response (its id, model and object).
    This runs for every token of every stream, on the API process's event loop: building and dumping the models
    took 3.4 us a chunk, this 0.6 us."""

    def __init__(self, kind: str, response_id: str, model: str):
        self.chat = kind == "chat"
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        self._head = f'{{"id":{_string(response_id)},"created":'
        self._choice = f',"model":{_string(model)},"object":"{obj}","choices":[{{"index":'

    def chunk(self, index: int, text: str, token_ids: list[int], finish_reason: str | None,
              logprobs: CompletionLogprobs | ChatLogprobs | None) -> str:  # fmt: skip
        """A completion chunk (`text`, `token_ids`), or a chat chunk (`text` as the delta's content, null if
        empty; chat chunks carry no token ids)."""
        logprobs_json = "null" if logprobs is None else logprobs.model_dump_json()
        reason = "null" if finish_reason is None else _string(finish_reason)
        if self.chat:
            content = _string(text) if text else "null"
            fields = f'"delta":{{"role":null,"content":{content}}},"logprobs":{logprobs_json},"finish_reason":{reason}'
        else:
            ids = ",".join(map(str, token_ids))
            fields = f'"text":{_string(text)},"token_ids":[{ids}],"logprobs":{logprobs_json},"finish_reason":{reason}'
        # `created` as the models' default makes it: the time of each chunk
        return f'{self._head}{int(time.time())}{self._choice}{index},{fields}}}],"usage":null}}'
