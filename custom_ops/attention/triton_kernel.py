"""The Triton kernels behind the `triton` paged-attention backend (see triton.py for the
algorithm). Importing this module needs triton; the backend imports it on first use."""

import triton
import triton.language as tl

# An fp8 cache's float16 MMAs take q times the softmax scale divided by a power of 2 that brings its largest value under
# this (float16 holds up to 65504; the margin covers log2's rounding): exact, and the scores are multiplied back.
FP16_Q_LIMIT = tl.constexpr(32768.0)

@triton.jit
def find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr, SPACED: tl.constexpr = True):
    """The sequence that owns program block `q_block`: the last s whose first block is at most it. SPACED: sequence s's
    blocks start at query_start_loc[s] // BLOCK_Q + s (triton.py's grid); otherwise at query_start_loc[s] (a block a
    token, BLOCK_Q 1), where a sequence without tokens shares its start with the next and is passed over."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q
        if SPACED:
            first += mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def exp2_flushed(x, IN_PTX: tl.constexpr):
    """2**x. IN_PTX: as one ex2.approx.ftz: Triton's exp2 keeps results below 2**-126 (ex2 without .ftz: a compare and
    two multiplies around each); a softmax weight there is nothing beside the row's largest, 1."""
    if IN_PTX:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip
    return tl.exp2(x)


@triton.jit
def e4m3_to_float16(x, IN_PTX: tl.constexpr):
    """e4m3 values as float16 (exact). IN_PTX: in PTX of Triton's, four values a register in two instructions, where
    the values are: Triton moves its own conversion (and pure inline PTX) into the MMA operand's layout, after the
    shared-memory handoff, so an fp8 value tile, whose MMA operand pairs keys that are a row apart in the cache, left
    shared memory one byte a load and was repacked (the sm_90a decode loop at one warp: 1,353 instructions for 32 keys;
    converted first, the float16 tile takes ldmatrix's transposed loads: 918; benchmarks/kernel_sass.py). The
    interpreter runs no PTX."""
    if IN_PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4,
        )  # fmt: skip
    return x.to(tl.float16)


@triton.jit
def as_cached(x, cache_ptr, SATURATE_AT: tl.constexpr):
    """x as the cache stores it: in its dtype, saturated at SATURATE_AT for fp8 (`to_cache_dtype`)."""
    if SATURATE_AT > 0:
        return tl.clamp(x.to(tl.float32), -SATURATE_AT, SATURATE_AT).to(cache_ptr.dtype.element_ty)
    return x.to(cache_ptr.dtype.element_ty)


# Not specialized on what changes from step to step: the sequence and token counts and the block table's
# width (Triton would compile a variant for each of "== 1", "divisible by 16" and neither, and a server
# stalled ~0.9 s on each first such step). The cache's BLOCK_SIZE, fixed for an engine, is a constant: each key's
# block and slot then cost shifts and masks, not a division (its sm_90a decode loop: 465 -> 401 instructions, 94 -> 84
# registers; benchmarks/kernel_sass.py).
@triton.jit(do_not_specialize=["num_seqs", "num_tokens", "block_table_stride"])
def paged_attention_kernel(
    out_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, cache_ptr, block_table_ptr, query_start_loc_ptr,
    seq_lens_ptr, sinks_ptr, scale, softcap, sliding_window, num_seqs, num_tokens,
    q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride, v_head_stride,
    out_token_stride, out_head_stride, out_split_stride,
    cache_block_stride, cache_kv_stride, cache_page_stride, cache_head_stride, block_table_stride,
    merged_ptr, merged_token_stride, merged_head_stride, counter_ptr,
    GROUP: tl.constexpr, GROUP_BLOCK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr, IEEE_DOT: tl.constexpr,
    NUM_SPLITS: tl.constexpr, WRITE_KV: tl.constexpr, SATURATE_AT: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DECODE: tl.constexpr = False, MERGE_IN_KERNEL: tl.constexpr = False,
    IN_PTX: tl.constexpr = False, VALUES_IN_PTX: tl.constexpr = False,
):  # fmt: skip
    """IN_PTX: the kernel may hold inline PTX (a GPU; the interpreter runs none), see exp2_flushed; VALUES_IN_PTX: an
    fp8 cache's values convert in PTX (e4m3_to_float16; one-warp launches, triton.py).
    The softmax runs in base 2 (m and the sinks times log2(e)): a score's weight is one fused multiply-add and one ex2."""
    if USE_PDL:  # everything this kernel reads may be the previous kernel's output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    q_block = tl.program_id(0)
    HEAD_BLOCKS: tl.constexpr = (GROUP + GROUP_BLOCK - 1) // GROUP_BLOCK
    kv_head = tl.program_id(1) // HEAD_BLOCKS
    head_block = tl.program_id(1) % HEAD_BLOCKS
    split = tl.program_id(2)
    if DECODE:
        # As many tokens as sequences (BLOCK_Q 1): program q_block takes token q_block, which is sequence q_block's
        # one token unless some sequence has none (allowed), so the search (a chain of dependent loads) runs only then.
        seq = q_block
        first, end = tl.load(query_start_loc_ptr + q_block), tl.load(query_start_loc_ptr + q_block + 1)
        if (first != q_block) | (end != q_block + 1):
            seq = find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q, SPACED=False)
    else:
        seq = find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if DECODE:
        local_block = q_block - q_start  # the token's place in its sequence
    else:
        local_block = q_block - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= query_len:
        return
    context_len = tl.load(seq_lens_ptr + seq) - query_len

    # Row r of the tile is query token local_block * BLOCK_Q + r // GROUP_BLOCK, head kv_head * GROUP + group_head:
    # the program's block of GROUP_BLOCK of the GROUP heads that read this KV head (all of them, unless GROUP is
    # larger than a tile: multi-head latent attention's one KV head serves every query head).
    rows = tl.arange(0, BLOCK_M)
    q_local = local_block * BLOCK_Q + rows // GROUP_BLOCK
    group_head = head_block * GROUP_BLOCK + rows % GROUP_BLOCK
    head = kv_head * GROUP + group_head
    row_valid = (q_local < query_len) & (rows < BLOCK_Q * GROUP_BLOCK) & (group_head < GROUP)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_valid = dims < HEAD_DIM
    q_rows = (q_start + q_local).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * q_token_stride + head[:, None] * q_head_stride + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :], other=0.0,
    )  # fmt: skip
    q_pos = context_len + q_local  # position of each row's token in its sequence
    FP16_MMA: tl.constexpr = SATURATE_AT > 0 and not IEEE_DOT
    if FP16_MMA:
        # An e4m3 cache: its keys and values convert to float16 exactly, two in one instruction, but to bfloat16 only
        # through float32 (with bf16 MMAs the sm_90a decode loop was 569 instructions, against 401 over a bf16 cache,
        # and session 16 timed fp8-cache attention slower than bf16's; in float16, 472: benchmarks/kernel_sass.py).
        # So q (times the softmax scale) and p meet them in float16; sums stay float32. A q past float16's range is
        # divided by q_factor, a power of 2 (exact), and the scores multiplied back: nothing is clamped.
        q_scaled = q.to(tl.float32) * scale
        q_max = tl.max(tl.max(tl.abs(q_scaled), 1), 0)
        q_factor = tl.where(q_max > FP16_Q_LIMIT, tl.exp2(tl.ceil(tl.log2(q_max / FP16_Q_LIMIT))), 1.0)
        q = (q_scaled / q_factor).to(tl.float16)

    # WRITE_KV: the cache write of this step's keys and values. Split 0 writes those of its query tokens,
    # for its KV head (one row per token). No program of this step reads them back from the cache (the
    # loop takes this step's keys from k and v), so none waits for another's write. Otherwise the caller
    # wrote them before the launch.
    cache_head = cache_ptr + kv_head * cache_head_stride
    if WRITE_KV and split == 0 and head_block == 0:
        writes = (row_valid & (rows % GROUP_BLOCK == 0))[:, None] & dim_valid[None, :]
        slot = tl.load(slot_ptr + q_rows, mask=row_valid, other=0)
        dst = cache_head + (slot // BLOCK_SIZE) * cache_block_stride + (slot % BLOCK_SIZE) * cache_page_stride
        new_k = tl.load(k_ptr + q_rows[:, None] * k_token_stride + kv_head * k_head_stride + dims[None, :], mask=writes)
        new_v = tl.load(v_ptr + q_rows[:, None] * v_token_stride + kv_head * v_head_stride + dims[None, :], mask=writes)
        tl.store(dst[:, None] + dims[None, :], as_cached(new_k, cache_ptr, SATURATE_AT), mask=writes)
        tl.store(dst[:, None] + cache_kv_stride + dims[None, :], as_cached(new_v, cache_ptr, SATURATE_AT), mask=writes)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    if USE_SINKS:
        if split == 0:  # the sink is a logit with no value: start the softmax from it (in one split only)
            m = tl.load(sinks_ptr + head, mask=row_valid, other=float("-inf")).to(tl.float32) * LOG2E
            l = tl.where(row_valid, 1.0, 0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)

    kv_end = context_len + tl.minimum((local_block + 1) * BLOCK_Q, query_len)  # keys this block may see
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(context_len + local_block * BLOCK_Q - sliding_window + 1, 0)
    # This program's share of the keys: split `split` of NUM_SPLITS, whole tiles each.
    chunk = tl.cdiv(tl.cdiv(kv_end - kv_begin, NUM_SPLITS), TILE) * TILE
    kv_begin = kv_begin + split * chunk
    kv_end = tl.minimum(kv_end, kv_begin + chunk)
    keys = tl.arange(0, TILE)
    for tile_start in range(kv_begin, kv_end, TILE):
        k_pos = tile_start + keys
        k_valid = k_pos < kv_end
        if WRITE_KV:  # keys before this step's tokens from the cache, this step's from k and v
            cached = k_valid & (k_pos < context_len)
            fresh = k_valid & (k_pos >= context_len)
            fresh_rows = (q_start + k_pos - context_len).to(tl.int64)
        else:
            cached = k_valid
        block = tl.load(block_table_ptr + seq * block_table_stride + k_pos // BLOCK_SIZE, mask=cached, other=0)
        slot = block.to(tl.int64) * cache_block_stride + (k_pos % BLOCK_SIZE) * cache_page_stride
        k = tl.load(cache_head + slot[None, :] + dims[:, None], mask=cached[None, :] & dim_valid[:, None], other=0.0)
        if WRITE_KV:  # as the cache holds them; the masked load of the other source adds 0
            k_new = tl.load(k_ptr + fresh_rows[None, :] * k_token_stride + kv_head * k_head_stride + dims[:, None],
                            mask=fresh[None, :] & dim_valid[:, None], other=0.0)  # fmt: skip
            k = k.to(q.dtype) + as_cached(k_new, cache_ptr, SATURATE_AT).to(q.dtype)
        if IEEE_DOT:
            s = tl.dot(q, k.to(q.dtype), input_precision="ieee")
        else:
            s = tl.dot(q, k.to(q.dtype))
        # s times to_log2 is the score in base 2; FP16_MMA: q carries the scale, over q_factor (1 unless q is past
        # float16's range)
        s_scale = q_factor if FP16_MMA else scale
        to_log2 = s_scale * LOG2E
        if USE_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s * s_scale / softcap) - 1.0)  # softcap * tanh(s / softcap)
            to_log2 = LOG2E
        if BLOCK_Q == 1:  # a row's token comes after every key it may see (kv_end): causality is k_valid
            allowed = k_valid[None, :]
        else:
            allowed = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, 1) * to_log2)  # to_log2 > 0: the largest score's
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet stays at 0
        p = exp2_flushed(s * to_log2 - m_safe[:, None], IN_PTX)
        alpha = exp2_flushed(m - m_safe, IN_PTX)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(
            cache_head + cache_kv_stride + slot[:, None] + dims[None, :],
            mask=cached[:, None] & dim_valid[None, :], other=0.0,
        )  # fmt: skip
        if FP16_MMA:
            v = e4m3_to_float16(v, VALUES_IN_PTX)
        if WRITE_KV:
            v_new = tl.load(v_ptr + fresh_rows[:, None] * v_token_stride + kv_head * v_head_stride + dims[None, :],
                            mask=fresh[:, None] & dim_valid[None, :], other=0.0)  # fmt: skip
            v = v.to(q.dtype) + as_cached(v_new, cache_ptr, SATURATE_AT).to(q.dtype)
        acc = acc * alpha[:, None]
        if IEEE_DOT:
            acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc)
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    out_rows = out_ptr + split * out_split_stride + q_rows[:, None] * out_token_stride + head[:, None] * out_head_stride
    tl.store(out_rows + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])
    if NUM_SPLITS > 1:  # log of this split's softmax mass, for merge_splits_kernel
        lse = tl.where(l > 0, (m + tl.log2(tl.where(l > 0, l, 1.0))) / LOG2E, float("-inf"))
        num_heads = GROUP * (tl.num_programs(1) // HEAD_BLOCKS)
        tl.store(lse_ptr + (split * num_tokens + q_rows) * num_heads + head, lse, mask=row_valid)
        if MERGE_IN_KERNEL:
            merge_in_the_last_split(
                out_ptr, lse_ptr, merged_ptr, counter_ptr + q_block * tl.num_programs(1) + tl.program_id(1),
                q_rows, head, dims, row_valid, dim_valid, num_tokens * num_heads, num_heads,
                out_token_stride, out_head_stride, out_split_stride, merged_token_stride, merged_head_stride,
                NUM_SPLITS, BLOCK_M, HEAD_DIM_PADDED,
            )  # fmt: skip


@triton.jit
def merge_in_the_last_split(
    partial_ptr, lse_ptr, merged_ptr, counter_ptr, rows, head, dims, row_valid, dim_valid, lse_split_stride, num_heads,
    partial_token_stride, partial_head_stride, partial_split_stride, merged_token_stride, merged_head_stride,
    NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
):  # fmt: skip
    """merge_splits_kernel's sum, by the program that finishes its rows' splits last, so a decode step needs no second
    launch. The programs of one (token, head block) count their finished splits in `counter_ptr` (one int32 of a
    zeroed buffer); the last one reads every split's partial output and log-sum-exp, writes the merged rows and
    zeroes the counter for the next launch."""
    # Every thread's stores of this split come before its count (the barrier), and the count's release and acquire at
    # GPU scope make the other programs' stores visible to the last one (CUDA's threadFenceReduction pattern).
    tl.debug_barrier()
    finished = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if finished == NUM_SPLITS - 1:
        tl.store(counter_ptr, 0)
        lse_rows = lse_ptr + rows * num_heads + head
        valid = row_valid[:, None] & dim_valid[None, :]
        largest = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for split in tl.static_range(NUM_SPLITS):
            lse = tl.load(lse_rows + split * lse_split_stride, mask=row_valid, other=float("-inf"),
                          cache_modifier=".cg")  # fmt: skip
            largest = tl.maximum(largest, lse)
        # A row whose splits all saw no key (never in decode: a token sees itself) merges to 0, not merge_splits_kernel's
        # NaN; rows past the step's are never stored.
        largest = tl.where(largest == float("-inf"), 0.0, largest)
        mass = tl.zeros([BLOCK_M], tl.float32)
        merged = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
        partial_rows = partial_ptr + rows[:, None] * partial_token_stride + head[:, None] * partial_head_stride
        for split in tl.static_range(NUM_SPLITS):
            lse = tl.load(lse_rows + split * lse_split_stride, mask=row_valid, other=float("-inf"),
                          cache_modifier=".cg")  # fmt: skip
            weight = tl.exp(lse - largest)
            part = tl.load(partial_rows + split * partial_split_stride + dims[None, :], mask=valid, other=0.0,
                           cache_modifier=".cg")  # fmt: skip
            merged += part.to(tl.float32) * weight[:, None]
            mass += weight
        merged = merged / tl.where(mass > 0, mass, 1.0)[:, None]
        merged_rows = merged_ptr + rows[:, None] * merged_token_stride + head[:, None] * merged_head_stride
        tl.store(merged_rows + dims[None, :], merged.to(merged_ptr.dtype.element_ty), mask=valid)


@triton.jit
def merge_splits_kernel(
    out_ptr, partial_ptr, lse_ptr, num_heads,
    out_token_stride, out_head_stride, partial_split_stride, partial_token_stride, partial_head_stride,
    NUM_SPLITS: tl.constexpr, SPLITS_PADDED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """out[t, h] = the partial outputs of (t, h), weighted by each split's share of the softmax mass; BLOCK_D of
    the head's dimensions a program (grid axis 2), so a wide head's merge is not one program's long load."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    token = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PADDED)
    dims = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + (splits * tl.num_programs(0) + token) * num_heads + head, mask=splits < NUM_SPLITS,
                  other=float("-inf"))  # fmt: skip
    weights = tl.exp(lse - tl.max(lse, 0))
    partial = tl.load(
        partial_ptr + splits[:, None] * partial_split_stride + token * partial_token_stride
        + head * partial_head_stride + dims[None, :],
        mask=(splits < NUM_SPLITS)[:, None] & (dims < HEAD_DIM)[None, :], other=0.0,
    ).to(tl.float32)  # fmt: skip
    out = tl.sum(partial * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(out_ptr + token * out_token_stride + head * out_head_stride + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)  # fmt: skip
