"""Requests' prompts to token ids, off the event loop, refusing what cannot fit before tokenizing it.

Tokenizing (and chat templating) a long prompt takes seconds of CPU: on the event loop it stalled every
stream and /health (a 10 MiB prompt: 33.6 s). It runs in a worker thread instead. A prompt whose characters
alone prove it longer than the context is refused at once: one token covers at most as many characters as
the longest token's text, so a text of more than max_seq_len times that many cannot fit.
"""

from __future__ import annotations

import asyncio

from compiled_llm.server.errors import APIError


class PromptTokenizer:
    def __init__(self, llm, max_seq_len: int):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_seq_len = max_seq_len
        self._max_token_chars: int | None = None

    def max_token_chars(self) -> int:
        """Characters of text one token can cover, at most (the longest token's text; a byte-level BPE
        token's characters each stand for one byte, at most one character of text)."""
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
            self._max_token_chars = max((len(token) for token in vocab), default=1)
        return self._max_token_chars

    def check_length(self, chars: int, param: str) -> None:
        per_token = self.max_token_chars()
        if chars > self.max_seq_len * per_token:
            raise APIError(
                400, f"{param} has {chars} characters, so at least {chars // per_token} tokens (a token covers at most "
                f"{per_token}): more than the model's context of max_seq_len={self.max_seq_len} tokens",
                "context_length_exceeded", param,
            )  # fmt: skip

    async def encode(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of each prompt (strings tokenized in a worker thread, token ids as given)."""
        texts = [p for p in prompts if isinstance(p, str)]
        if texts and self.tokenizer is None:
            raise APIError(400, "string prompts need a tokenizer; this model has none: send token ids", param="prompt")
        for text in texts:
            self.check_length(len(text), "prompt")
        if not texts:
            return [list(p) for p in prompts]
        return await asyncio.to_thread(self._encode, prompts)

    def _encode(self, prompts: list[str | list[int]]) -> list[list[int]]:
        try:
            return [self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
        except (TypeError, UnicodeError) as error:  # lone surrogates ("\ud800") in the JSON string
            raise APIError(400, f"prompt is not valid Unicode text ({error})", "invalid_text", "prompt") from None

    async def chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation through the chat template, in a worker thread."""
        self.check_length(sum(len(m["content"]) for m in messages), "messages")
        return await asyncio.to_thread(self._chat, messages)

    def _chat(self, messages: list[dict]) -> list[int]:
        from jinja2 import TemplateError

        try:
            return self.llm.chat_prompt_ids(messages)
        except (ValueError, TemplateError) as error:  # e.g. a template that refuses a role order
            raise APIError(400, f"messages: {error}", param="messages") from None
        except (TypeError, UnicodeError) as error:
            raise APIError(400, f"messages are not valid Unicode text ({error})", "invalid_text", "messages") from None
