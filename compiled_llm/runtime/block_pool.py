"""The KV blocks of a paged cache: reference counts, a free list, and the prefix cache of full blocks.

A usable block (ids 1..num_blocks; block 0 is the scratch block) is in one of three states:
- in use: held by one or more sequences (`ref > 0`);
- cached: free, but still holding the keys/values of a full block of known tokens, findable by the hash
  of those tokens and of every token before them; evicted least recently freed first;
- empty: free, holding nothing anyone can find.

A full block's hash chains its parent's: `hash(block i) = sha256(hash(block i-1) || tokens of block i)`,
so equal hashes mean equal token prefixes (sha256: no collision in practice), and a block can only be
found through the blocks before it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence


class OutOfKVBlocks(RuntimeError):
    """More KV blocks were asked for than are free."""


def extend_block_hashes(hashes: list[bytes], token_ids: Sequence[int], block_size: int) -> None:
    """Append to `hashes` (those of the first len(hashes) blocks) the hashes of the further full blocks of
    `token_ids`: a growing sequence hashes each block once."""
    parent = hashes[-1] if hashes else b""
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashlib.sha256(parent + array("q", token_ids[start : start + block_size]).tobytes()).digest()
        hashes.append(parent)


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chained hash of each full block of `token_ids` (a trailing partial block has none)."""
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids, block_size)
    return hashes


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._empty = deque(range(1, num_blocks + 1))
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # eviction order: oldest first
        self._ref: dict[int, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.queried_tokens = 0  # prompt tokens looked up, and found, in the prefix cache (for its hit rate)
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: empty ones and cached ones it may evict."""
        return len(self._empty) + len(self._cached_free)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def ref_count(self, block: int) -> int:
        return self._ref.get(block, 0)

    def allocate(self, count: int) -> list[int]:
        """`count` blocks for new tokens: empty ones first, then the least recently freed cached ones."""
        if count > self.num_free:
            raise OutOfKVBlocks(f"asked for {count} KV blocks, {self.num_free} of {self.num_blocks} are free")
        blocks = []
        for _ in range(count):
            if self._empty:
                block = self._empty.popleft()
            else:
                block, _ = self._cached_free.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
            self._ref[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block nobody holds becomes cached (if hashed) or empty."""
        for block in blocks:
            ref = self._ref[block] - 1
            if ref:
                self._ref[block] = ref
                continue
            del self._ref[block]
            if block in self._hash_of:
                self._cached_free[block] = None
            else:
                self._empty.append(block)

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Take a reference to the cached blocks that hold the longest run of full blocks at the start of
        `token_ids`, stopping before the block of the last token (whose logits must be computed, so its
        keys/values are written again: never into a block others read). Returns those blocks."""
        if not self.enable_prefix_caching:
            return []
        usable = (len(token_ids) - 1) // self.block_size
        blocks = []
        for digest in block_hashes(token_ids[: usable * self.block_size], self.block_size):
            block = self._block_of.get(digest)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            self._cached_free.pop(block, None)
            self._ref[block] = self._ref.get(block, 0) + 1
        self.queried_tokens += len(token_ids)
        self.hit_tokens += len(blocks) * self.block_size
        return blocks

    def cache_full_blocks(self, blocks: Sequence[int], token_ids: Sequence[int]) -> None:
        """Make the full blocks of a sequence findable: `blocks[i]` holds tokens i*B..(i+1)*B of `token_ids`,
        whose keys/values are computed. A block whose content is cached already (under another id) stays
        unregistered; it becomes empty when freed."""
        if self.enable_prefix_caching:
            self.register(blocks, block_hashes(token_ids, self.block_size))

    def register(self, blocks: Sequence[int], hashes: Sequence[bytes]) -> None:
        """`cache_full_blocks` with the blocks' hashes known (`blocks[i]` has `hashes[i]`)."""
        if not self.enable_prefix_caching:
            return
        for block, digest in zip(blocks, hashes):
            if block in self._hash_of or digest in self._block_of:
                continue
            self._hash_of[block] = digest
            self._block_of[digest] = block
