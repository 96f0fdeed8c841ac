"""Text of a request's generated tokens as they come, in whole characters, with stop strings cut off.

Decoding one token at a time would split characters that span several byte-level tokens (each half
decodes to U+FFFD) and lose the spaces that sentencepiece attaches to a token's neighbour. Instead each
step decodes a short window of recent tokens twice, with and without the new ones, and appends the
difference once it no longer ends in U+FFFD (the same scheme as TGI and vLLM). Only the generated
tokens are decoded, so the final text is `tokenizer.decode(output_token_ids)`.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.skip_special_tokens = skip_special_tokens
        self.text = ""  # all text decoded so far (stop string and what follows it removed)
        self._prefix_offset = 0  # window start: tokens before it are fully in `text`
        self._read_offset = 0  # tokens before it have been turned into text

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens)

    def update(self, output_token_ids: Sequence[int]) -> bool:
        """Take the generated tokens so far (the new ones at the end); returns True when a stop string
        appeared, in which case `text` ends just before it."""
        prefix = self._decode(output_token_ids[self._prefix_offset : self._read_offset])
        window = self._decode(output_token_ids[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT):
            return False  # no whole new character yet
        new_text = window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(output_token_ids)
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += new_text
        found = [at for at in (self.text.find(stop, searched_from) for stop in self.stop) if at != -1]
        if found:
            self.text = self.text[: min(found)]
            return True
        return False

    def finish(self, output_token_ids: Sequence[int]) -> None:
        """The request ended without a stop string: the text is the decoding of all its tokens (a last
        character left incomplete included, as U+FFFD)."""
        self.text = self._decode(output_token_ids)

    def streamable_text(self, finished: bool) -> str:
        """The text safe to show now: while running, the tail that could still become a stop string is
        held back."""
        if finished or not self.stop:
            return self.text
        hold = max(len(s) for s in self.stop) - 1
        return self.text[: len(self.text) - hold] if hold else self.text
