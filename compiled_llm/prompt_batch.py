"""Validate a `[batch, seq]` prompt tensor (with its optional attention mask) and split it into sequences.

Every check runs before any model work, and each error names the argument at fault.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # [B, S] int64, as given (on the caller's device)
    mask: torch.Tensor  # [B, S] bool: real tokens
    rows: list[list[int]]  # the real tokens of each row
    starts: list[int]  # index of each row's first real token (left padding)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def right_padded_rows(self) -> list[int]:
        width = self.input_ids.shape[1]
        return [b for b, (row, start) in enumerate(zip(self.rows, self.starts)) if start + len(row) < width]

    @classmethod
    def from_inputs(
        cls, input_ids, attention_mask, vocab_size: int, max_seq_len: int, max_batch_size: int
    ) -> PromptBatch:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(
                f"input_ids must have shape [batch, seq_len] with batch >= 1 and seq_len >= 1, got {tuple(input_ids.shape)}"
            )
        if input_ids.shape[0] > max_batch_size:
            raise ValueError(
                f"input_ids has a batch of {input_ids.shape[0]}, more than max_batch_size={max_batch_size}; "
                "compile with a larger max_batch_size or split the batch"
            )
        ids = input_ids.detach().cpu().long()
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            row, col = bad.nonzero()[0].tolist()
            raise ValueError(
                f"input_ids holds ids outside the vocabulary [0, {vocab_size}): e.g. {ids[row, col].item()} at [{row}, {col}]"
            )

        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {shape}")
            values = attention_mask.detach().cpu()
            if not ((values == 0) | (values == 1)).all():
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
            mask = values.bool()

        rows, starts = [], []
        for b in range(ids.shape[0]):
            real = mask[b].nonzero().flatten().tolist()
            if not real:
                raise ValueError(f"attention_mask row {b} has no tokens")
            if real[-1] - real[0] + 1 != len(real):
                raise ValueError(
                    f"attention_mask row {b} has padding between tokens; only left or right padding is supported"
                )
            if len(real) > max_seq_len:
                raise ValueError(f"input_ids row {b} has {len(real)} tokens, more than max_seq_len={max_seq_len}")
            rows.append(ids[b, real[0] : real[-1] + 1].tolist())
            starts.append(real[0])
        return cls(input_ids, mask, rows, starts)
