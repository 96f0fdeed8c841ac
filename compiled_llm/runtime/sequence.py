"""A sequence being computed: its tokens, positions and the KV blocks that hold them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sequence:
    """Token ids < 0 are placeholders for tokens not read back from the device yet (always at the end)."""

    token_ids: list[int]
    first_position: int = 0  # position id of token 0 (HF gives left-padded rows of a forward offsets)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    def release(self, pool) -> None:
        """Give the sequence's blocks back to `pool` (a BlockPool); its tokens are to be computed again."""
        pool.free(self.block_ids)
        self.block_ids = []
        self.num_computed = 0


@dataclass
class ScheduledChunk:
    """Compute the next `num_tokens` pending tokens of `seq` in this step."""

    seq: Sequence
    num_tokens: int
    logits: str = "last"  # which of these tokens need logits: "none", "last" or "all"
    # The sequence's last token is still being sampled on the device (a placeholder on the host): this
    # chunk ends with it, and it is row `fill_row` of the `device_tokens` given to ModelRunner.execute.
    fill_row: int | None = None
