"""A Triton GEMV for the few-row linears of decode steps: y[M, N] = x[M, K] @ W[N, K]^T for M <= 8.

With one to a few tokens a linear is a stream over its weight: every byte of W is read once and the
arithmetic is negligible. cuBLAS picks GEMM tiles for these shapes (an 8- or 64-row tile, sometimes
split-K with a second reduce kernel), which leaves small weights latency-bound and large ones short of
the copy bandwidth. Here each program owns BLOCK_N rows of W, streams them in BLOCK_K columns at a time
(the first PREFETCH_K before it waits for the previous kernel, see gemv_config) and dots them with all
M rows of x, which it keeps in registers; no split-K, no second kernel.

`silu_mul`: W is a gated MLP's [gate; up] and the output silu(x @ gate^T) * (x @ up^T): each program
owns BLOCK_N rows of both halves, so the activation costs no kernel of its own.
"""

from __future__ import annotations

import functools

import torch

from custom_ops.triton_runtime import KERNEL_DTYPES, pdl_launch_options

MAX_ROWS = 8  # x rows this kernel serves; larger batches go to cuBLAS (compute starts to matter)


@functools.cache
def _kernel():
    from custom_ops.linear.triton_gemv_kernels import gemv_kernel  # needs triton: imported on first use

    return gemv_kernel


WEIGHTS_PER_LOAD = 4096  # one-row calls: weights each program loads at once (8 KB in bf16)
MIN_PROGRAMS = 1024  # ~8 per SM of an H100: fewer leave the memory system idle at the start and the end


def gemv_config(m: int, k: int, n: int) -> dict:
    """Tile shape for x [m, k] @ W[n, k]^T (n: output rows, for `silu_mul` each half's).

    One row (every GEMV call of a model): each program loads its rows' first PREFETCH_K weights in one
    piece before the PDL wait, so they stream in while the previous kernel drains. Found on an H100
    (`benchmarks/gemv_bench.py --prefetch`, BENCHMARKS.md) over the linears of SmolLM2-135M and
    Llama-3.1-8B: whole rows for K <= 4096 (each program's weights all in flight at once; 5-50% faster
    than loads of 512-1024 columns), 2048 columns at a time beyond; about WEIGHTS_PER_LOAD weights per
    load, but fewer rows per program where that would leave under MIN_PROGRAMS programs; 4 warps. Where a whole
    row's power of 2 would leave over a quarter of its lanes masked (K = 2,880: 4,096, 70% used), steps of 1,024
    columns instead (3 steps, 94% used): on an H100, GPT-OSS-20B's LM head [201088, 2880] took 361.5 us against 390.8
    at the whole row (`gemv_bench.py --models gptoss20b`, BENCHMARKS.md, session 27). SmolLM2's K = 576 keeps its
    whole row (1,024 either way, measured best).
    Several rows: the older grid search's tile (x's rows share the registers with fewer columns).
    (Per-shape choice is the kernel cache's job.)"""
    import triton

    if m == 1:
        whole = triton.next_power_of_2(k)
        block_k = whole if whole <= WEIGHTS_PER_LOAD else WEIGHTS_PER_LOAD // 2
        if 3 * block_k > 4 * k and block_k > 1024:  # over a quarter of the lanes masked
            block_k = 1024
        block_n = max(1, WEIGHTS_PER_LOAD // block_k)
        while block_n > 1 and n // block_n < MIN_PROGRAMS:
            block_n //= 2
        return {"BLOCK_N": block_n, "BLOCK_K": block_k, "PREFETCH_K": block_k, "num_warps": 4}
    block_k = (512 if k < 1024 else 1024) // (1 if m <= 2 else 2 if m <= 4 else 4)
    return {"BLOCK_N": 2 if k < 1024 else 4, "BLOCK_K": block_k, "PREFETCH_K": block_k, "num_warps": 4}


@functools.cache
def _tile(m: int, k: int, n: int) -> tuple:
    """gemv_config, worked out once per shape (the ops launch the GEMV on every call outside CUDA graphs)."""
    return tuple(gemv_config(m, k, n).items())


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         silu_mul: bool = False, **config) -> torch.Tensor:  # fmt: skip
    """x [M, K] (M <= MAX_ROWS, unit last stride) @ weight[N, K]^T (contiguous) + bias -> [M, N] in x's
    dtype. `silu_mul`: weight (and bias) hold [gate; up] of 2 * I rows and the result is
    silu(gate) * up, [M, I]. `config` overrides the tile shape (BLOCK_N, BLOCK_K, PREFETCH_K, num_warps)."""
    m, k = x.shape
    rows = weight.shape[0]
    shape_ok = 0 < k == weight.shape[1] and m <= MAX_ROWS and not (silu_mul and rows % 2)
    if not shape_ok or x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError(
            f"gemv takes at most {MAX_ROWS} rows of K > 0 with contiguous rows and a contiguous [N, {k}] weight "
            f"(N even for silu_mul); got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    bias_ok = bias is None or (bias.shape == (rows,) and bias.is_contiguous())
    if x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype or not bias_ok:
        raise ValueError(f"gemv: x in {KERNEL_DTYPES}, weight and bias in x's dtype {x.dtype}, a contiguous bias [{rows}]")
    return launch_gemv(x, weight, out, bias, silu_mul, **config)


def launch_gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None, bias: torch.Tensor | None,
                silu_mul: bool, **config) -> torch.Tensor:  # fmt: skip
    """`gemv` without its checks, for callers that made them already (the linear ops, once per call)."""
    import triton

    m, k = x.shape
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    out = x.new_empty(m, n) if out is None else out
    overrides = config
    config = dict(_tile(m, k, n)) | overrides
    if "BLOCK_K" in overrides and "PREFETCH_K" not in overrides:
        config["PREFETCH_K"] = overrides["BLOCK_K"]  # a caller's tile width holds from the first load on
    num_warps = config.pop("num_warps")
    prefetch = config["PREFETCH_K"]
    _kernel()[(triton.cdiv(n, config["BLOCK_N"]),)](
        x, weight, bias if bias is not None else weight, out, n, x.stride(0), weight.stride(0), out.stride(0),
        n * weight.stride(0),  # SILU_MUL: where the up rows start
        K=k, M=m, M_PADDED=triton.next_power_of_2(m), HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
        EVEN_K=max(k - prefetch, 0) % config["BLOCK_K"] == 0, num_warps=num_warps, **config, **pdl_launch_options(x),
    )  # fmt: skip
    return out
