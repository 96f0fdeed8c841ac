"""Requests' prompts to token ids, off the event loop, refusing what cannot fit before tokenizing it.

Tokenizing (and chat templating) a long prompt takes seconds of CPU: on the event loop it stalled every
stream and /health (a 10 MiB prompt: 33.6 s). It runs in a worker thread instead. A completion prompt whose
length alone proves it longer than the context is refused at once, where the tokenizer makes that a proof:
a byte-level BPE (GPT-2's, Llama-3's, Qwen's) with no normalizer that can delete characters and no added
token that strips whitespace turns every character into at least one byte, and one token covers at most as
many bytes as the longest token's text has characters; so a text of more than max_seq_len times that many
characters cannot fit. Other tokenizers (normalizers that strip or collapse, unknown-token fusing) and chat
templates (which may drop earlier turns' reasoning) are always tokenized; the body limit bounds that work.
"""

from __future__ import annotations

import asyncio
import json

from compiled_llm.server.errors import APIError


class PromptTokenizer:
    def __init__(self, llm, max_seq_len: int):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_seq_len = max_seq_len

        # Read here, at start-up: the vocabulary is large, and the first request runs on the event loop.
        self._max_token_chars = _max_token_chars(self.tokenizer)

    def check_length(self, chars: int, param: str) -> None:
        """Refuse a text of `chars` characters that cannot fit (where the tokenizer allows the proof)."""
        per_token = self._max_token_chars
        if per_token is not None and chars > self.max_seq_len * per_token:
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
        return await asyncio.to_thread(self._chat, messages)

    def _chat(self, messages: list[dict]) -> list[int]:
        from jinja2 import TemplateError

        try:
            return self.llm.chat_prompt_ids(messages)
        except (ValueError, TemplateError) as error:  # e.g. a template that refuses a role order
            raise APIError(400, f"messages: {error}", param="messages") from None
        except (TypeError, UnicodeError) as error:
            raise APIError(400, f"messages are not valid Unicode text ({error})", "invalid_text", "messages") from None


def _max_token_chars(tokenizer) -> int | None:
    """The most characters of text one token can stand for, where the tokenizer makes that bound sound (see
    the module's docstring), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: no way to tell
        return None
    state = json.loads(backend.to_str())
    normalizer, pre_tokenizer, model = state.get("normalizer"), state.get("pre_tokenizer") or {}, state.get("model") or {}
    normalizers = (normalizer or {}).get("normalizers", [normalizer] if normalizer else [])
    byte_level = pre_tokenizer.get("type") == "ByteLevel" or any(
        p.get("type") == "ByteLevel" for p in pre_tokenizer.get("pretokenizers") or []
    )
    if not byte_level or model.get("type") != "BPE" or any(n.get("type") != "NFC" for n in normalizers):
        return None
    if any(token.get("lstrip") or token.get("rstrip") for token in state.get("added_tokens") or []):
        return None
    # NFC may compose characters (e + combining accent): at most halve them, as a margin.
    return 2 * max((len(token) for token in tokenizer.get_vocab()), default=1)
