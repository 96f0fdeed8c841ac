"""The HF causal-LM calls of a compiled model: `__call__` / `forward` (the logits of every position) and `generate`
(HF's generation over the paged KV cache), run through the model's `runner` (compiled_model.py builds it)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from compiled_llm.decode_loop import decode
from compiled_llm.generation import GenerationSettings
from compiled_llm.parallel_ranks import check_ranks_share_random_stream
from compiled_llm.prompt_batch import PromptBatch
from compiled_llm.runtime import ScheduledChunk, Sequence


class CausalLMCalls:
    """What CompiledModel answers as the HF model did. Needs of its subclass: `model`, `config` (CompileConfig),
    `runner` (a runtime.ModelRunner with its KV cache), `device`, `vocab_size`, `logits_dtype`, `max_seq_len`."""

    def _prompt_batch(self, input_ids, attention_mask) -> PromptBatch:
        return PromptBatch.from_inputs(
            input_ids, attention_mask, self.vocab_size, self.max_seq_len, self.config.max_batch_size
        )

    def _check_kv_capacity(self, token_counts: list[int]) -> None:
        cache = self.runner.kv_cache
        needed = sum(cache.blocks_for(n) for n in token_counts)
        if needed > cache.allocator.num_free:
            raise ValueError(
                f"this batch needs {needed} KV blocks but {cache.allocator.num_free} are free; "
                "lower the batch size or max_new_tokens, or compile with a larger num_kv_blocks"
            )

    def _prefill(self, seqs: list[Sequence], logits: str, take: Callable[[int, int, torch.Tensor], None]) -> None:
        """Compute every pending token of `seqs`, in steps of at most max_num_tokens tokens and
        max_batch_size sequences (long prompts are split into chunks). Each step's logits are handed to
        `take(sequence index, index of the first token they belong to, logits rows)` before the next
        step runs (a step's logits may live in a buffer the next step reuses)."""
        queue = [i for i, seq in enumerate(seqs) if seq.num_pending]
        while queue:
            chunks, owners, budget = [], [], self.config.max_num_tokens
            for i in queue[: self.config.max_batch_size]:
                if budget == 0:
                    break
                seq = seqs[i]
                n = min(seq.num_pending, budget)
                wanted = logits if n == seq.num_pending or logits == "all" else "none"
                chunks.append(ScheduledChunk(seq, n, wanted))
                if wanted == "all":
                    owners.append((i, seq.num_computed, n))
                elif wanted == "last":
                    owners.append((i, seq.num_computed + n - 1, 1))
                budget -= n
            out = self.runner.execute(chunks)
            offset = 0
            for i, first, count in owners:
                take(i, first, out[offset : offset + count])
                offset += count
            queue = [i for i in queue if seqs[i].num_pending]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutputWithPast:
        """Logits [batch, seq, vocab] of every position, equal to `model(input_ids, attention_mask,
        use_cache=False).logits`; positions where `attention_mask` is 0 (padding) get zeros."""
        batch = self._prompt_batch(input_ids, attention_mask)
        self._check_kv_capacity([len(row) for row in batch.rows])
        # HF numbers positions by column, padding included, when a forward gets no position_ids.
        seqs = [Sequence(row, first_position=start) for row, start in zip(batch.rows, batch.starts)]
        logits = torch.zeros(*input_ids.shape, self.vocab_size, dtype=self.logits_dtype, device=self.device)

        def take(b: int, first: int, rows: torch.Tensor) -> None:  # straight into the output: no copies
            start = batch.starts[b] + first
            logits[b, start : start + len(rows)] = rows

        try:
            self._prefill(seqs, "all", take)
        finally:
            for seq in seqs:
                self.runner.release(seq)
        return CausalLMOutputWithPast(logits=logits)

    forward = __call__

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """HF-style generation: returns [batch, prompt_len + generated] token ids (prompt included, left
        padding kept; rows that hit EOS are filled with `pad_token_id`). Arguments left as None come from
        the model's `generation_config`, as in HF; greedy results equal HF's `generate`."""
        settings = GenerationSettings.resolve(
            getattr(self.model, "generation_config", None), input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else 0,
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )  # fmt: skip
        if settings.do_sample and self.config.parallel_ranks > 1:
            check_ranks_share_random_stream(self.device)
        batch = self._prompt_batch(input_ids, attention_mask)
        if batch.right_padded_rows:
            raise ValueError(
                f"attention_mask pads rows {batch.right_padded_rows} on the right; generate() needs left padding "
                "(tokenizer.padding_side = 'left'), as HF generate does"
            )
        longest = max(len(row) for row in batch.rows)
        if longest + settings.max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"max_new_tokens={settings.max_new_tokens} with a prompt of {longest} tokens exceeds "
                f"max_seq_len={self.max_seq_len}"
            )
        self._check_kv_capacity([len(row) + settings.max_new_tokens for row in batch.rows])

        seqs = [Sequence(list(row)) for row in batch.rows]
        # HF penalizes every id of the input rows, left padding included, and every generated one.
        seen = batch.input_ids.detach().long().to(self.device)
        logits = torch.empty(len(seqs), self.vocab_size, dtype=self.logits_dtype, device=self.device)
        try:
            self._prefill(seqs, "last", lambda i, first, rows: logits[i].copy_(rows[0]))
            generated = decode(self.runner, seqs, logits, settings, seen)
        finally:
            for seq in seqs:
                self.runner.release(seq)

        width = max(len(tokens) for tokens in generated)
        pad = settings.pad_token_id if settings.pad_token_id is not None else 0
        new = torch.full((len(seqs), width), pad, dtype=torch.long)
        for i, tokens in enumerate(generated):
            new[i, : len(tokens)] = torch.tensor(tokens)
        return torch.cat([input_ids.long(), new.to(input_ids.device)], dim=1)
