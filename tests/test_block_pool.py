"""The block pool: reference counts, the free list, and the prefix cache (hash chains, LRU eviction)."""

from __future__ import annotations

import random

import pytest

from compiled_llm.runtime import BlockPool, OutOfKVBlocks
from compiled_llm.runtime.block_pool import block_hashes


def test_allocate_and_free_without_caching():
    pool = BlockPool(4, block_size=4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1
    with pytest.raises(OutOfKVBlocks, match="asked for 2 KV blocks, 1 of 4 are free"):
        pool.allocate(2)
    pool.free(a)
    assert sorted(pool.allocate(4)) == [1, 2, 3, 4]  # block 0 is the scratch block, never handed out
    assert pool.match_prefix(list(range(40))) == []  # caching off: nothing is ever found


def test_hashes_chain_over_the_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # the partial third block has no hash
    b = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different first: different hash
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == a


def run_prompt(pool: BlockPool, tokens: list[int]) -> tuple[list[int], int]:
    """What the engine does for a prompt: reuse cached blocks, allocate the rest, compute, register."""
    cached = pool.match_prefix(tokens)
    needed = -(-len(tokens) // pool.block_size) - len(cached)
    blocks = cached + pool.allocate(needed)
    pool.cache_full_blocks(blocks, tokens)
    return blocks, len(cached) * pool.block_size


def test_a_repeated_prompt_reuses_its_full_blocks_but_not_the_last():
    pool = BlockPool(16, block_size=4, enable_prefix_caching=True)
    prompt = [random.randrange(1000) for _ in range(14)]  # blocks 0-2 full, block 3 holds 2 tokens
    first, cached = run_prompt(pool, prompt)
    assert cached == 0
    second, cached = run_prompt(pool, prompt)
    assert cached == 12 and second[:3] == first[:3] and second[3] != first[3]
    assert [pool.ref_count(b) for b in first[:3]] == [2, 2, 2]
    # a prompt of exactly 3 full blocks: the block of its last token is computed again, in a new block
    third, cached = run_prompt(pool, prompt[:12])
    assert cached == 8 and third[:2] == first[:2] and third[2] not in first
    # a prompt that diverges inside block 1 reuses block 0 only
    fourth, cached = run_prompt(pool, prompt[:5] + [-1] + prompt[6:])
    assert cached == 4 and fourth[0] == first[0]
    assert pool.hit_tokens == 12 + 8 + 4 and pool.queried_tokens == 14 + 14 + 12 + 14


def test_freed_cached_blocks_stay_findable_until_evicted_least_recent_first():
    pool = BlockPool(6, block_size=2, enable_prefix_caching=True)
    a, _ = run_prompt(pool, [1, 2, 3, 4, 5])  # 3 blocks, 2 full ones cached
    b, _ = run_prompt(pool, [7, 8, 9])  # 2 blocks, 1 full one cached
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 6 and pool.num_cached == 3
    again, cached = run_prompt(pool, [1, 2, 3, 4, 5])  # found after being freed
    assert cached == 4 and again[:2] == a[:2]
    pool.free(again)
    # the 3 empty blocks are used first, then cached ones in the order they were freed: b's [7, 8] is
    # the oldest (a's blocks were freed again after it)
    fresh = pool.allocate(4)
    assert pool.num_cached == 2
    assert pool.match_prefix([7, 8, 9]) == []
    assert pool.match_prefix([1, 2, 3, 4, 5]) == a[:2]
    pool.free(fresh)


def test_shared_blocks_are_freed_only_by_their_last_holder():
    pool = BlockPool(4, block_size=2, enable_prefix_caching=True)
    a, _ = run_prompt(pool, [1, 2, 3])
    b, cached = run_prompt(pool, [1, 2, 5])
    assert cached == 2 and pool.ref_count(a[0]) == 2
    pool.free(a)
    assert pool.ref_count(a[0]) == 1 and pool.num_free == 2  # a's own last block came back
    with pytest.raises(OutOfKVBlocks):
        pool.allocate(3)  # the shared block is still held by b
    pool.free(b)
    assert pool.num_free == 4 and all(pool.ref_count(blk) == 0 for blk in a + b)


def test_a_duplicate_block_of_cached_content_is_not_registered_twice():
    pool = BlockPool(8, block_size=2, enable_prefix_caching=True)
    a = pool.allocate(2)
    b = pool.allocate(2)  # two sequences prefilled in the same step: neither found the other
    pool.cache_full_blocks(a, [1, 2, 3, 4])
    pool.cache_full_blocks(b, [1, 2, 3, 4])
    assert pool.num_cached == 2 and pool.match_prefix([1, 2, 3, 4, 9]) == a
    pool.free(b)
    assert pool.num_cached == 2 and pool.num_free == 6  # b's copies became empty blocks
