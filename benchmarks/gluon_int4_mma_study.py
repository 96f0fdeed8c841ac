"""A study, not a kernel of the project yet: the one-row int4 decode on tensor cores, written in Gluon (Triton's
lower-level language: explicit layouts), compiled for sm_90a without a GPU and counted from its machine code.

The one-row GEMVs are bound by instructions (BENCHMARKS.md: ~6-7 a weight on CUDA cores against a budget of ~4 at the
H200's bandwidth), and Triton's tensor-core GEMM at 16 rows spends 10-12 a weight moving the dequantized tile into
the MMA's operand layout. Here the packed codes are loaded straight in the MMA's A-operand layout (weights as the
16-row side of mma.m16n8k16, x as the 8-column side: decode rows 1 to 8 for the same cost) and decoded in registers
by inline PTX, int4_linear's own storage kept (column 2b in byte b's low nibble, 2b + 1 in its high one):
- prmt puts byte b in both halves of a register, lop3 puts each nibble under its own bf16 exponent (128 + q0 and
  0.5 + q1 / 16), and one bf16x2 fma makes the pair (q0 - z, q1 - z): 1.5 instructions a weight;
- the layouts line up (the codes' 4-byte chunks are the A operand's 8-column chunks), so no shared memory and no
  shuffle sits in the loop.

    python benchmarks/gluon_int4_mma_study.py     # the loop's instructions a weight, and its opcode mix

The prototype's zero point is a constant 8, its scales are left out and x is read into all 8 columns; what it
measures is the decode's cost. Not run on a GPU yet: the kernel built from it must be held to int4_linear's reference
there (Gluon kernels do not run in Triton's interpreter).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_sass import hot_loop

# Per byte: both nibbles under their exponents, then x1 - 136 and x16 - 16 (bf16x2 constants 0x41803F80: (1, 16);
# 0xC180C308: (-136, -16)): (q0 - 8, q1 - 8). Four bytes in ($4), two registers out for each of the two outputs.
_BYTE = """prmt.b32 t, $4, 0, 0x4{b}4{b};
lop3.b32 t, t, 0x00F0000F, 0x3F004300, 0xEA;
fma.rn.bf16x2 ${b}, t, m, a;
"""
DECODE = gl.constexpr(
    "{\n.reg .b32 t, m, a;\nmov.b32 m, 0x41803F80;\nmov.b32 a, 0xC180C308;\n"
    + "".join(_BYTE.format(b=b) for b in range(4))
    + "}\n"
)


@gluon.jit
def int4_mma_decode(w_ptr, x_ptr, y_ptr, K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                    num_warps: gl.constexpr):  # fmt: skip
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
    codes_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)  # 4 bytes: 8 columns
    rows = gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, codes_layout))
    cols = gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(0, codes_layout))
    xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, b_layout))
    xn = gl.arange(0, 8, layout=gl.SliceLayout(0, b_layout))
    acc = gl.zeros([BLOCK_N, 8], gl.float32, layout=mma)
    for k0 in range(0, K, BLOCK_K):
        packed = gl.load(w_ptr + rows[:, None] * (K // 2) + k0 // 2 + cols[None, :])  # uint8 [BLOCK_N, BLOCK_K / 2]
        first, second = gl.inline_asm_elementwise(DECODE, "=r,=r,=r,=r,r", [packed],
                                                  dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)  # fmt: skip
        # first[4g + i] holds column 8g + i, second[4g + i] column 8g + 4 + i
        w = gl.join(first, second).reshape([BLOCK_N, BLOCK_K // 8, 4, 2]).permute(0, 1, 3, 2)
        w = gl.convert_layout(w.reshape([BLOCK_N, BLOCK_K]), a_layout)  # the same registers: no data moves
        x = gl.load(x_ptr + k0 + xk[:, None] + xn[None, :] * 0)
        acc = mma_v2(w, x, acc)
    out_rows = gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    out_cols = gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
    gl.store(y_ptr + out_rows[:, None] + out_cols[None, :] * 0, acc, mask=out_cols[None, :] == 0)


def main() -> None:
    block_n, block_k, warps, k = 64, 128, 4, 4096
    fn = int4_mma_decode
    types = {"w_ptr": "*u8", "x_ptr": "*bf16", "y_ptr": "*fp32"}
    constexprs = {"K": k, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in types}
    source = GluonASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in constexprs.items()}, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as out:
        cubin = os.path.join(out, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([f"{tools}/cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    loop = hot_loop(sass)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in loop)
    weights_a_thread = block_n * block_k / (32 * warps)
    print(f"int4 MMA decode, tile {block_n} x {block_k}, {warps} warps: loop {len(loop)} instructions, "
          f"{len(loop) / weights_a_thread:.2f} a weight")  # fmt: skip
    print("    " + ", ".join(f"{op} {n}" for op, n in ops.most_common(12)))


if __name__ == "__main__":
    main()
