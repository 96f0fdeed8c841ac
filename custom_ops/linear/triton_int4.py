"""Triton kernels of `compiled_llm::int4_linear`'s `triton` backend, in the op's numerics (int4.py):

- `int4_gemv`: one row (a batch-1 decode step), on CUDA cores. Each program owns BLOCK_N output channels and streams
  their codes as 32-bit words (8 columns each). Two codes of a word become two float16 values 1024 + q at once (a
  shift and a mask-or: the magic-number trick of TensorRT-LLM's and Marlin's dequantization), the group's 1024 + z
  is subtracted in float16 (exact: small integers), and the products with x are summed in float32 per group, then
  scaled once a group. About 3 instructions a weight beside the load, against ~1 of a bf16 GEMV, which reads 4x the
  bytes.
- `int4_gemm`: more rows, on tensor cores: a tile of codes unpacked in registers, q - z (exact in bf16 or fp16)
  dotted with x's tile, and the group's scale applied to the float32 partial sum, so only x is rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from custom_ops.triton_runtime import pdl_launch_options


@triton.jit
def add_pair_products(sums, words, shift, zero16, x_low, x_high):
    """sums + the products of codes j and j + 4 of each int32 word (`shift` = 4 j, j < 4), minus their group's zero
    point, with their columns of x: (word >> 4 j) & 0x000F000F | 0x64006400 holds the float16 values 1024 + q in its
    halves, and 1024 + z (`zero16`, float16) taken from each leaves q - z exactly. Two multiply-adds, each its own
    (one expression of both costs a multiply and an add more)."""
    bits = ((words >> shift) & 0x000F000F) | 0x64006400
    low = bits.to(tl.int16).to(tl.float16, bitcast=True)
    high = (bits >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    sums = sums + (low - zero16).to(tl.float32) * x_low[None, :, :]
    return sums + (high - zero16).to(tl.float32) * x_high[None, :, :]


@triton.jit
def smooth_part(smooth_ptr, first_col, part_end0, part_end1, K: tl.constexpr):
    """The row of smooth [P, K] for the part of the output channels a program computes: its channels lie in one part
    (the launcher's BLOCK_N divides every part's), the first part ending at channel part_end0, the second at
    part_end1 (N where there are fewer parts)."""
    part = (first_col >= part_end0).to(tl.int32) + (first_col >= part_end1).to(tl.int32)
    return smooth_ptr + part * K


@triton.jit
def int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, b_ptr, y_ptr, N, stride_wn, stride_sn, part_end0, part_end1,
    K: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_A_STEP: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    G: tl.constexpr = GROUPS_A_STEP
    WORDS: tl.constexpr = GROUP // 8  # a group's words
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    smooth_row = smooth_part(smooth_ptr, tl.program_id(0) * BLOCK_N, part_end0, part_end1, K)
    col_ok = cols < N
    w_rows = (w_ptr + cols[:, None].to(tl.int64) * stride_wn).to(tl.pointer_type(tl.int32))  # [BLOCK_N, 1]
    s_rows = s_ptr + cols[:, None].to(tl.int64) * stride_sn
    z_rows = z_ptr + cols[:, None].to(tl.int64) * stride_sn
    word = tl.arange(0, G)[:, None] * WORDS + tl.arange(0, WORDS)[None, :]  # [G, WORDS] within a step
    acc = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    for g0 in range(0, K // GROUP, G):
        groups = g0 + tl.arange(0, G)
        group_ok = groups < K // GROUP
        words = tl.load(w_rows[:, :, None] + (g0 * WORDS + word)[None, :, :],
                        mask=col_ok[:, None, None] & group_ok[None, :, None], other=0,
                        eviction_policy="evict_first")  # fmt: skip
        ks = (g0 * WORDS + word)[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]  # [G, WORDS, 8]
        x = tl.load(x_ptr + ks, mask=group_ok[:, None, None], other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(smooth_row + ks, mask=group_ok[:, None, None], other=0.0)
        # x's column j of each word (j = 4 h + 2 j1 + j0) as [G, WORDS] tensors, by splits of the last axis
        x_even, x_odd = tl.split(tl.reshape(x, (G, WORDS, 2, 2, 2)))  # j0
        x_0, x_2 = tl.split(x_even)  # j1: [G, WORDS, 2 (h)]
        x_1, x_3 = tl.split(x_odd)
        x_0l, x_0h = tl.split(x_0)
        x_1l, x_1h = tl.split(x_1)
        x_2l, x_2h = tl.split(x_2)
        x_3l, x_3h = tl.split(x_3)
        zero = tl.load(z_rows + groups[None, :], mask=col_ok[:, None] & group_ok[None, :], other=0)
        zero16 = (zero.to(tl.float32) + 1024.0).to(tl.float16)[:, :, None]  # [BLOCK_N, G, 1]
        sums = tl.zeros(words.shape, dtype=tl.float32)
        sums = add_pair_products(sums, words, 0, zero16, x_0l, x_0h)
        sums = add_pair_products(sums, words, 4, zero16, x_1l, x_1h)
        sums = add_pair_products(sums, words, 8, zero16, x_2l, x_2h)
        sums = add_pair_products(sums, words, 12, zero16, x_3l, x_3h)
        scale = tl.load(s_rows + groups[None, :], mask=col_ok[:, None] & group_ok[None, :], other=0.0)
        acc += tl.sum(sums, axis=2) * scale.to(tl.float32)
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + cols, out.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def int4_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_sn, stride_ym, part_end0,
    part_end1, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    smooth_row = smooth_part(smooth_ptr, tl.program_id(1) * BLOCK_N, part_end0, part_end1, K)
    row_ok, col_ok = rows < M, cols < N
    dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides GROUP, which divides K
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None], other=0.0)
        if HAS_SMOOTH:
            x = (x.to(tl.float32) * tl.load(smooth_row + ks)[None, :]).to(dtype)
        packed = tl.load(w_rows + k0 // 2 + tl.arange(0, BLOCK_K // 2)[None, :], mask=col_ok[:, None], other=0)
        codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, BLOCK_K))  # columns 2j, 2j + 1
        group = k0 // GROUP
        zero = tl.load(z_ptr + cols * stride_sn + group, mask=col_ok, other=0)
        w = (codes.to(tl.int32) - zero.to(tl.int32)[:, None]).to(dtype)  # q - z, exact
        if dtype == tl.float32:
            part = tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            part = tl.dot(x, tl.trans(w))
        scale = tl.load(s_ptr + cols * stride_sn + group, mask=col_ok, other=0.0).to(tl.float32)
        acc += part * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


def gemv_config(n: int, k: int, group_size: int) -> dict:
    """The GEMV's launch for weight [n, k]: 2 groups (256 columns, 128 bytes a row) a step, and channels per program
    so that there are a few programs an SM on a large linear without starving a small one."""
    return {"BLOCK_N": 16 if n >= 4096 else 8, "GROUPS_A_STEP": max(1, min(2, k // group_size)), "num_warps": 4}


def _part_ends(n: int, smooth_rows: list[int]) -> tuple[int, int]:
    """part_end0, part_end1 of the kernels: where the first two parts of the channels end (n past the last)."""
    ends = [sum(smooth_rows[: i + 1]) for i in range(len(smooth_rows) - 1)]
    return (*ends, n, n)[:2]


def _divides_parts(block_n: int, smooth_rows: list[int]) -> int:
    """block_n halved until it divides every part's channels (int4.triton_takes: each a multiple of 16)."""
    while any(rows % block_n for rows in smooth_rows):
        block_n //= 2
    return block_n


def int4_gemv(rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size: int, **tile) -> torch.Tensor:
    """y [1, N] for rows [1, K] (int4.triton_takes checked what the kernel reads)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    launch = {**gemv_config(n, k, group_size), **tile}
    if smooth is not None:
        launch["BLOCK_N"] = _divides_parts(launch["BLOCK_N"], smooth_rows)
    out = rows.new_empty(1, n)
    int4_gemv_kernel[(triton_cdiv(n, launch["BLOCK_N"]),)](
        rows, qweight, scales, zeros, smooth if smooth is not None else rows, bias if bias is not None else rows, out,
        n, qweight.stride(0), scales.stride(0), *_part_ends(n, smooth_rows), K=k, GROUP=group_size,
        HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None, **launch, **pdl_launch_options(rows),
    )  # fmt: skip
    return out


def gemm_config(m: int, n: int, group_size: int) -> dict:
    """The tensor-core GEMM's tile for [m] rows: the MMA's narrow side (16) for decode batches, larger tiles for
    prefill."""
    block_k = min(group_size, 64)
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 3}


def int4_gemm(rows, qweight, scales, zeros, smooth, smooth_rows, bias, group_size: int, **tile) -> torch.Tensor:
    """y [M, N] for rows [M, K] on tensor cores (int4.triton_takes checked what the kernel reads)."""
    m, n, k = rows.shape[0], qweight.shape[0], 2 * qweight.shape[1]
    launch = {**gemm_config(m, n, group_size), **tile}
    if smooth is not None:
        launch["BLOCK_N"] = _divides_parts(launch["BLOCK_N"], smooth_rows)
    if group_size % launch["BLOCK_K"]:
        raise ValueError(f"BLOCK_K={launch['BLOCK_K']} does not divide the group of {group_size} columns")
    out = rows.new_empty(m, n)
    grid = (triton_cdiv(m, launch["BLOCK_M"]), triton_cdiv(n, launch["BLOCK_N"]))
    int4_gemm_kernel[grid](
        rows, qweight, scales, zeros, smooth if smooth is not None else rows, bias if bias is not None else rows, out,
        m, n, rows.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), *_part_ends(n, smooth_rows), K=k,
        GROUP=group_size, HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None, **launch,
        **pdl_launch_options(rows),
    )  # fmt: skip
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
