"""A GGUF file's quantized linears kept in their blocks: Q4_0, Q4_1 and Q4_K weights moved into
`compiled_llm::int4_linear`'s layout (codes two a byte, a scale and an offset per 32 columns), Q5_K, Q6_K and Q8_0
into `compiled_llm::int8_weight_linear`'s (a signed byte a code, a scale and, for Q5_K, an offset per group), never
rounded again.

ggml's blocks (32 weights each, a row of the weight [N, K] being K / 32 blocks):
- Q4_1: float16 d, float16 m, 16 bytes of codes: byte j holds weight j in its low nibble and weight j + 16 in its
  high one; w = d q + m (offsets: int4_linear's float zeros);
- Q4_0: float16 d, 16 bytes of codes as Q4_1's; w = d (q - 8), kept as offsets m = -8 d (exact in float16, and q d +
  m is (q - 8) d exactly in float32), so that every GGUF linear has one form and fused parts concatenate;
- Q4_K: super-blocks of 256 weights: float16 d and dmin, 12 bytes of 6-bit scales and mins for its 8 groups of 32,
  128 bytes of codes (each 32 bytes: a group's codes in the low nibbles, the next group's in the high ones);
  w = (d sc) q - dmin mn, kept as float32 scales d sc and offsets -dmin mn (both exact: a float16 times a 6-bit
  integer), which int4_linear's q s + m reproduces bit for bit;
- Q8_0: float16 d, 32 int8 codes; w = d q (groups of 32);
- Q6_K: super-blocks of 256 weights: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales (one a group of 16),
  float16 d; w = (d sc) (q - 32), kept as codes q - 32 and float32 scales d sc (exact);
- Q5_K: Q4_K's super-blocks with a fifth bit a code from 32 bytes of high bits; w = (d sc) q - dmin mn.
transformers loads a GGUF file dequantized (the `gguf` package's dequantizer, then its own renames and row
permutations: Llama's q/k rows are reordered for its RoPE). `attach_gguf_blocks` finds, for each decoder linear of the
loaded model, the block tensor of its layer whose dequantization equals its weight, row for row (exactly: the same
float32 values, in the model's dtype), and attaches the codes in that row order as `int4_tensors`, which the
quantize_int4 pass takes as they are, or the 5/6/8-bit ones as `int8_tensors` (codes, scales, offsets or None, group
size, "gguf"), which keep_gguf_int8_blocks takes. A weight no block tensor reproduces stays float (logged).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from custom_ops.linear import int8_weight
from custom_ops.linear.int4 import dequantize, pack_codes

log = logging.getLogger("compiled_llm")

BLOCK = 32
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}
_INT8_BLOCK_BYTES = {"Q8_0": 34, "Q6_K": 210, "Q5_K": 176}  # kept as int8_weight_linear's codes
_LAYER = re.compile(r"\.(\d+)\.")


def block_tensors(raw: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight [N, K/2] uint8, scales [N, K/32] float16, offsets [N, K/32] float16) of a Q4_0 or Q4_1 tensor's bytes
    [N, K/32 * block bytes]: Q4_1's m, Q4_0's -8 d."""
    rows = torch.from_numpy(np.array(raw, dtype=np.uint8)).view(raw.shape[0], -1, _BLOCK_BYTES[kind])  # a copy
    if kind == "Q4_K":
        return q4_k_tensors(rows)
    n, blocks = rows.shape[:2]
    d = rows[..., 0:2].contiguous().view(torch.float16).view(n, blocks)
    start = 4 if kind == "Q4_1" else 2
    qs = rows[..., start : start + BLOCK // 2]
    codes = torch.cat((qs & 15, qs >> 4), dim=-1).reshape(n, blocks * BLOCK)  # weights 0..15, then 16..31
    if kind == "Q4_1":
        offsets = rows[..., 2:4].contiguous().view(torch.float16).view(n, blocks)
    else:
        offsets = d * -8
    return pack_codes(codes), d.clone(), offsets.clone()


def q4_k_tensors(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """block_tensors of Q4_K super-blocks rows [N, K/256, 144] uint8, on their device (module docstring; the 6-bit
    scales unpacked as ggml's get_scale_min_k4)."""
    n, blocks = rows.shape[:2]
    scales, offsets = _k_scales(rows)
    qs = rows[..., 16:].view(n, blocks, 4, 1, 32)
    codes = torch.cat((qs & 15, qs >> 4), dim=3).reshape(n, blocks * 256)  # group 2c low nibbles, 2c + 1 high
    return pack_codes(codes), scales, offsets


def _k_scales(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's float32 scales d sc and offsets -dmin mn [N, K/32] of super-blocks rows [N, K/256, bytes]
    (float16 d and dmin, then 12 bytes of 6-bit scales and mins, unpacked as ggml's get_scale_min_k4)."""
    n, blocks = rows.shape[:2]
    d = rows[..., 0:2].contiguous().view(torch.float16).float()  # [N, B, 1]
    dmin = rows[..., 2:4].contiguous().view(torch.float16).float()
    packed = rows[..., 4:16].reshape(n, blocks, 3, 4)
    low, high, rest = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]  # groups 0-3's bits, 4-7's in rest
    sc = torch.cat((low & 63, (rest & 15) | ((low >> 2) & 48)), dim=-1).float()  # [N, B, 8]
    mn = torch.cat((high & 63, (rest >> 4) | ((high >> 2) & 48)), dim=-1).float()
    return (d * sc).view(n, -1), (-(dmin * mn)).view(n, -1)


def int8_block_tensors(raw: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(codes int8 [N, K], scales [N, K/G], offsets [N, K/G] or None, G) of a Q8_0, Q6_K or Q5_K tensor's bytes
    (module docstring), int8_weight_linear's operands."""
    rows = torch.from_numpy(np.array(raw, dtype=np.uint8)).view(raw.shape[0], -1, _INT8_BLOCK_BYTES[kind])  # a copy
    n, blocks = rows.shape[:2]
    if kind == "Q8_0":
        d = rows[..., 0:2].contiguous().view(torch.float16).view(n, blocks)
        return rows[..., 2:].contiguous().view(torch.int8).reshape(n, blocks * 32), d.clone(), None, 32
    if kind == "Q6_K":  # per half of 128 weights: 64 bytes of low bits, 32 of high bits
        low = rows[..., :128].reshape(n, blocks, 2, 2, 32)  # [.., half, byte run, 32]
        high = rows[..., 128:192].reshape(n, blocks, 2, 1, 32).to(torch.int16)
        sc = rows[..., 192:208].contiguous().view(torch.int8).float()  # [N, B, 16]
        d = rows[..., 208:210].contiguous().view(torch.float16).float()
        # weights 32 j + l of a half: j = 0, 1 the low nibbles of runs 0, 1; j = 2, 3 their high nibbles; high bits
        # 2 j of byte l
        nibbles = torch.cat((low & 15, low >> 4), dim=3).to(torch.int16)  # [.., half, 4, 32]
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16).view(4, 1)
        codes = nibbles | (((high >> shifts) & 3) << 4)
        return (codes - 32).to(torch.int8).reshape(n, blocks * 256), (d * sc).view(n, -1), None, 16
    scales, offsets = _k_scales(rows)  # Q5_K: 32 bytes of high bits, then Q4_K's 128 bytes of nibbles
    high = rows[..., 16:48].reshape(n, blocks, 1, 1, 32)
    qs = rows[..., 48:].reshape(n, blocks, 4, 1, 32)
    nibbles = torch.cat((qs & 15, qs >> 4), dim=3)  # [.., chunk c, 2, 32]: groups 2c, 2c + 1
    bits = torch.arange(8, dtype=torch.uint8).view(4, 2, 1)  # group g's high bit: bit g of each byte
    codes = nibbles | (((high >> bits) & 1) << 4)
    return codes.to(torch.int8).reshape(n, blocks * 256), scales, offsets, 32


def _row_order(stored: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The permutation p with stored[p] == weight (rows compared bit for bit, in any dtype: numpy has no bfloat16),
    or None."""
    index = {row.tobytes(): i for i, row in enumerate(stored.contiguous().view(torch.uint8).numpy())}
    order = [index.get(row.tobytes()) for row in weight.contiguous().view(torch.uint8).numpy()]
    return None if None in order else torch.tensor(order)


def attach_gguf_blocks(model: torch.nn.Module, path: Path) -> int:
    """Attach the file's block tensors (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0) to the decoder linears they reproduce
    (module docstring); how many. Sets `model.compiled_llm_quantization = "gguf"` where any is."""
    from gguf import GGUFReader

    candidates: dict[tuple[int, tuple[int, int]], list] = {}  # (layer, [N, K]) -> the file's block tensors
    for tensor in GGUFReader(path).tensors:
        kind = tensor.tensor_type.name
        layer = _LAYER.search(tensor.name)
        if (kind in _BLOCK_BYTES or kind in _INT8_BLOCK_BYTES) and layer and len(tensor.shape) == 2:
            k, n = (int(s) for s in tensor.shape)  # ne0 is the input width
            candidates.setdefault((int(layer.group(1)), (n, k)), []).append((tensor.name, kind, tensor.data))
    attached, missed = 0, []
    for name, module in model.named_modules():
        layer = _LAYER.search(name)
        if not isinstance(module, torch.nn.Linear) or not layer:
            continue
        weight = module.weight.detach()
        found = None
        for _, kind, raw in candidates.get((int(layer.group(1)), tuple(weight.shape)), ()):
            if kind in _INT8_BLOCK_BYTES:
                *stored, group = int8_block_tensors(raw, kind)
                unpacked = int8_weight.dequantize(*(None if t is None else t.to(weight.device) for t in stored), group)
            else:
                stored, group = list(block_tensors(raw, kind)), BLOCK
                unpacked = dequantize(*(t.to(weight.device) for t in stored), BLOCK)
            unpacked = unpacked.to(weight.dtype)
            # Rows in order are compared where the weight is; only a reordered tensor (RoPE's q/k) goes to the host
            order = (
                torch.arange(len(weight)) if torch.equal(unpacked, weight) else _row_order(unpacked.cpu(), weight.cpu())
            )
            if order is not None:
                rows = order.to(weight.device)
                found = (kind, *(None if t is None else t.to(weight.device)[rows].contiguous() for t in stored), group)
                break
        if found is None:
            missed.append(name)
            continue
        kind, *tensors, group = found
        attribute = "int8_tensors" if kind in _INT8_BLOCK_BYTES else "int4_tensors"
        setattr(module.weight, attribute, (*tensors, group, "gguf"))
        attached += 1
    if missed:
        log.info("%s: %d linears stay dequantized (no block tensor of a kept kind reproduces them), e.g. %s", path,
                 len(missed), missed[0])  # fmt: skip
    if attached:
        model.compiled_llm_quantization = "gguf"
        log.info("%s: %d linears keep their blocks (quantization='gguf'; 'none' runs them dequantized)",
                 path, attached)  # fmt: skip
    return attached
