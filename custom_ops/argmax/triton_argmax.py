"""Greedy decoding's argmax over the vocabulary, in two Triton launches: `argmax_rows`.

`torch.argmax` reduces each row in one thread block: 29 us for one row of Llama-3's 128,256 logits on an
H100, as long as six layers' attention. Here CHUNK-wide slices of each row are reduced by programs of
their own, then one program per row picks the best slice. The first maximal index wins, as in
torch.argmax (the first slice holding the maximum, then its first position). Rows with a NaN are not
defined here (torch returns the NaN's index; neither is a token worth sampling).
"""

from __future__ import annotations

import functools

import torch

from custom_ops.triton_runtime import KERNEL_DTYPES, pdl_launch_options, triton_runs_on

CHUNK = 2048
MIN_VOCAB = 4 * CHUNK  # below this torch.argmax's one block is as fast


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def argmax_slices_kernel(logits_ptr, values_ptr, indices_ptr, V, stride_row, CHUNK: tl.constexpr,
                             USE_PDL: tl.constexpr):  # fmt: skip
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = chunk * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=cols < V, other=float("-inf"))
        value, index = tl.max(x.to(tl.float32), 0, return_indices=True, return_indices_tie_break_left=True)
        slot = row * tl.num_programs(1) + chunk
        tl.store(values_ptr + slot, value)
        tl.store(indices_ptr + slot, chunk * CHUNK + index)

    @triton.jit
    def argmax_pick_kernel(values_ptr, indices_ptr, out_ptr, CHUNKS: tl.constexpr, CHUNKS_PADDED: tl.constexpr,
                           USE_PDL: tl.constexpr):  # fmt: skip
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        slices = tl.arange(0, CHUNKS_PADDED)
        values = tl.load(values_ptr + row * CHUNKS + slices, mask=slices < CHUNKS, other=float("-inf"))
        _, best = tl.max(values, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(out_ptr + row, tl.load(indices_ptr + row * CHUNKS + best).to(tl.int64))

    return argmax_slices_kernel, argmax_pick_kernel


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] int64: `logits.argmax(dim=-1)`, in the Triton kernels where they run and pay."""
    if logits.dim() != 2:
        raise ValueError(f"argmax_rows takes logits [rows, vocab]; got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if not (vocab >= MIN_VOCAB and rows and logits.stride(-1) == 1 and logits.dtype in KERNEL_DTYPES
            and triton_runs_on(logits)):  # fmt: skip
        return logits.argmax(dim=-1)
    import triton

    chunks = triton.cdiv(vocab, CHUNK)
    values = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    indices = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    slices_kernel, pick_kernel = _kernels()
    pdl = pdl_launch_options(logits)
    slices_kernel[(rows, chunks)](logits, values, indices, vocab, logits.stride(0), CHUNK=CHUNK, **pdl)
    pick_kernel[(rows,)](values, indices, out, CHUNKS=chunks, CHUNKS_PADDED=triton.next_power_of_2(chunks), **pdl)
    return out
