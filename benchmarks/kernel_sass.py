"""A Triton kernel's Hopper machine code without a GPU: compile it for sm_90a as a launch would specialize it, and
count the instructions of its hottest loop (registers, spills and shared memory beside). For kernels whose time is
their instructions (an ALU-bound decode), the loop's count per unit of work predicts the change a rewrite makes
before a GPU measures it; it is not a timing.

    python benchmarks/kernel_sass.py mxfp4-gemv      # the MoE one-token GEMV over MXFP4 experts, GPT-OSS-20B's shape
    python benchmarks/kernel_sass.py mxfp4-mma       # the same on tensor cores (Gluon), at every MMA tile
    python benchmarks/kernel_sass.py decode-attention  # the triton paged-attention kernel's decode step, Llama-8B's
    python benchmarks/kernel_sass.py int4-gemv       # int4_linear's one-row GEMV at Llama-8B's linears (and Q4_K's form)
    python benchmarks/kernel_sass.py nvfp4-gemv      # nvfp4_linear's one-row GEMV (the int4 GEMV with E2M1=True)
    python benchmarks/kernel_sass.py 4bit-gemm       # the int4 and NVFP4 tensor-core GEMMs at a decode batch's tile
    python benchmarks/kernel_sass.py int4-mma        # int4_linear's Gluon tensor-core decode (up to 16 rows)
    python benchmarks/kernel_sass.py nvfp4-mma       # the same kernel decoding NVFP4 (E2M1)
    python benchmarks/kernel_sass.py decode-gemm     # the 16-bit decode GEMM's tuning tiles (shared memory, MMA kind)

Needs triton (its wheel carries ptxas and cuobjdump); `--out DIR` keeps each kernel's TTGIR, PTX and SASS.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compile_for_hopper(fn, types: dict, constexprs: dict, multiples_of_16=(), num_warps=4, num_stages=3):
    """fn (a @triton.jit or @gluon.jit function) compiled for sm_90a. `types`: argument -> Triton type ('*bf16', 'fp32'); others are
    i32. As a launch does, pointers and `multiples_of_16` are specialized as divisible by 16, and an integer argument
    that is 1 at the launch must be given in `constexprs` (Triton makes it a constant)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    divisible = {(names.index(n),): [["tt.divisibility", 16]] for n in names
                 if signature[n].startswith("*") or n in multiples_of_16}  # fmt: skip
    if type(fn).__name__ == "GluonJITFunction":  # Gluon's source kind; its layouts are written in the kernel
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    source = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=divisible)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def hot_loop(sass: str) -> list[str]:
    """The instructions of the longest backward branch's range: the kernel's main loop."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]
    at = {address: i for i, (address, _) in enumerate(code)}
    best = (0, -1)
    for i, (address, text) in enumerate(code):
        jump = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < address and i - at[int(jump.group(1), 16)] > best[1] - best[0]:
            best = (at[int(jump.group(1), 16)], i)
    return [text for _, text in code[best[0] : best[1] + 1]]


def report(kernel, name: str, work_a_thread: float, out_dir: str, whole: bool = False) -> None:
    """One line of totals and the loop's opcode mix; `work_a_thread`: units (weights, keys) a thread's loop step
    handles, for the count per unit (`whole`: the kernel has no loop, and its every instruction counts)."""
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cubin = os.path.join(out_dir, f"{name}.cubin")
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    for kind in ("ttgir", "ptx"):
        with open(os.path.join(out_dir, f"{name}.{kind}"), "w") as f:
            f.write(kernel.asm[kind])
    sass = subprocess.run([f"{tools}/cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    with open(os.path.join(out_dir, f"{name}.sass"), "w") as f:
        f.write(sass)
    usage = subprocess.run(
        [f"{tools}/cuobjdump", "-res-usage", cubin], capture_output=True, text=True, check=True
    ).stdout
    registers = " ".join(re.findall(r"(REG:\d+|STACK:\d+|LOCAL:\d+)", usage))
    loop = re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*?)\s*;", sass) if whole else hot_loop(sass)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in loop)
    print(f"{name}: {registers} shared {kernel.metadata.shared} B, loop {len(loop)} instructions, "
          f"{len(loop) / work_a_thread:.2f} a unit")  # fmt: skip
    print("    " + ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))


def mxfp4_gemv(out_dir: str) -> None:
    """one_token_gemv_kernel over MXFP4 experts at GPT-OSS-20B's shapes (K 2880; gate/up gated, down with routing
    weights), at the default tile and two others; a unit is one weight."""
    from custom_ops.moe.triton_moe import MXFP4_ONE_TOKEN_TILE
    from custom_ops.moe.triton_one_token_kernels import one_token_gemv_kernel

    types = {"a_ptr": "*bf16", "w_ptr": "*u8", "bias_ptr": "*bf16", "out_ptr": "*bf16", "route_w_ptr": "*bf16",
             "ids_ptr": "*i32", "a_scale_ptr": "*bf16", "w_scale_ptr": "*u8", "round_ptr": "*bf16", "alpha": "fp32",
             "limit": "fp32"}  # fmt: skip
    strides = {"stride_am", "stride_we", "stride_wn", "stride_be", "stride_se", "stride_sn", "stride_om", "up_offset",
               "bias_up_offset", "scale_up_offset"}  # fmt: skip
    tiles = [MXFP4_ONE_TOKEN_TILE | {"num_stages": s} for s in (1, 2, 3)]
    tiles += [MXFP4_ONE_TOKEN_TILE | {"BLOCK_N": 32}, MXFP4_ONE_TOKEN_TILE | {"BLOCK_K": 512}]
    for tile in tiles:
        for gated in (True, False):
            constexprs = {"stride_wk": 1, "stride_sk": 1, "stride_bn": 1, "K": 2880, "GATED": gated,
                          "ACTIVATION": 2 if gated else 0, "A_PER_TOKEN": gated, "HAS_BIAS": True,
                          "ROUTE_WEIGHTS": not gated, "FP8": False, "MXFP4": True, "BLOCK_N": tile["BLOCK_N"],
                          "BLOCK_K": tile["BLOCK_K"], "STAGES": tile["num_stages"], "SUM_PAIRS": 0, "PAIRS_PADDED": 1,
                          "USE_PDL": True}  # fmt: skip
            kernel = compile_for_hopper(one_token_gemv_kernel, types, constexprs, strides, tile["num_warps"],
                                        tile["num_stages"])  # fmt: skip
            weights = tile["BLOCK_N"] * tile["BLOCK_K"] * (2 if gated else 1) / (32 * tile["num_warps"])
            shape = f"{tile['BLOCK_N']}x{tile['BLOCK_K']}_s{tile['num_stages']}"
            name = f"mxfp4_gemv_{'gate_up' if gated else 'down'}_{shape}"
            report(kernel, name, weights, out_dir)


def mxfp4_mma(out_dir: str) -> None:
    """One token's MXFP4 experts on tensor cores (custom_ops/moe/gluon_mxfp4_kernels.py) at GPT-OSS-20B's gate/up
    (5760 x 2880), each MMA tile the tuning offers; a unit is one weight (a thread's step: 16 rows x 32 columns over
    a warp's 32 lanes, times UNROLL steps a loop iteration)."""
    from custom_ops.moe.gluon_mxfp4 import mma_launch
    from custom_ops.moe.gluon_mxfp4_kernels import mxfp4_experts_mma_kernel
    from custom_ops.moe.tuning import MMA_TILES

    types = {"x_ptr": "*bf16", "w_ptr": "*u8", "e_ptr": "*u8", "ids_ptr": "*i64", "y_ptr": "*fp32"}
    strides = ("N", "stride_xm", "stride_we", "stride_wn", "stride_ee", "stride_en", "stride_ym")
    for tile in MMA_TILES:
        launch = mma_launch(5760, 2880, SPLIT=tile["SPLIT"], UNROLL=tile["UNROLL"])
        kernel = compile_for_hopper(mxfp4_experts_mma_kernel, types,
                                    {"K": 2880, "A_PER_TOKEN": True, "USE_PDL": True, **launch}, strides,
                                    launch["SPLIT"])  # fmt: skip
        report(kernel, f"mxfp4_mma_s{launch['SPLIT']}_u{launch['UNROLL']}", 16 * launch["UNROLL"], out_dir)


def int4_gemv(out_dir: str) -> None:
    """int4_linear's one-row GEMV (custom_ops/linear/triton_int4.py) at Llama-8B's gate/up (K 4096) and down (K 14336)
    shapes, group 128, with and without AWQ's smooth, at its default launch and one with 4 groups a step; then GGUF
    Q4_K's form (groups of 32 with float offsets); a unit is one weight."""
    from custom_ops.linear.triton_int4 import gemv_config
    from custom_ops.linear.triton_int4_kernels import int4_gemv_kernel

    types = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*u8", "smooth_ptr": "*fp32",
             "b_ptr": "*bf16", "y_ptr": "*bf16"}  # fmt: skip
    for n, k in ((28672, 4096), (4096, 14336)):
        default = gemv_config(n, k, 128)
        for tweak in ({}, {"GROUPS_A_STEP": 4}, {"PTX_DECODE": True}, {"STAGES": 3}):
            launch = default | tweak
            for smooth in (False, True):
                constexprs = {"K": k, "GROUP": 128, "BLOCK_N": launch["BLOCK_N"], "GROUPS_A_STEP": launch["GROUPS_A_STEP"],
                              "HAS_SMOOTH": smooth, "HAS_BIAS": False, "USE_PDL": True, "E2M1": False,
                              "OFFSET": False, "PTX_DECODE": launch.get("PTX_DECODE", False),
                              "STAGES": launch.get("STAGES", 1)}  # fmt: skip
                kernel = compile_for_hopper(int4_gemv_kernel, types, constexprs, ("stride_wn", "stride_sn"),
                                            launch["num_warps"])  # fmt: skip
                weights = launch["BLOCK_N"] * launch["GROUPS_A_STEP"] * 128 / (32 * launch["num_warps"])
                ptx = "_ptx" if launch.get("PTX_DECODE") else ""
                ptx += f"_s{launch['STAGES']}" if "STAGES" in launch else ""
                name = f"int4_gemv_{n}x{k}_n{launch['BLOCK_N']}_g{launch['GROUPS_A_STEP']}{ptx}{'_smooth' if smooth else ''}"
                report(kernel, name, weights, out_dir)
    # GGUF Q4_K's form: groups of 32, float32 scales and offsets; its default launch (PTX, pipelined), without PTX,
    # and with twice the channels a program
    types |= {"s_ptr": "*fp32", "z_ptr": "*fp32"}
    for n, k in ((28672, 4096), (4096, 14336)):
        default = gemv_config(n, k, 32, ptx=True)
        for tweak in ({}, {"PTX_DECODE": False}, {"BLOCK_N": 32}, {"BF16_PAIRS": True}):
            launch = default | tweak
            constexprs = {"K": k, "GROUP": 32, "BLOCK_N": launch["BLOCK_N"], "GROUPS_A_STEP": launch["GROUPS_A_STEP"],
                          "HAS_SMOOTH": False, "HAS_BIAS": False, "USE_PDL": True, "E2M1": False, "OFFSET": True,
                          "PTX_DECODE": launch["PTX_DECODE"], "STAGES": launch.get("STAGES", 1),
                          "BF16_PAIRS": launch.get("BF16_PAIRS", False)}  # fmt: skip
            kernel = compile_for_hopper(int4_gemv_kernel, types, constexprs, ("stride_wn", "stride_sn"),
                                        launch["num_warps"])  # fmt: skip
            weights = launch["BLOCK_N"] * launch["GROUPS_A_STEP"] * 32 / (32 * launch["num_warps"])
            ptx = "_ptx" if launch["PTX_DECODE"] else ""
            ptx += "_pairs" if launch.get("BF16_PAIRS") else ""
            name = f"q4_k_gemv_{n}x{k}_n{launch['BLOCK_N']}_g{launch['GROUPS_A_STEP']}{ptx}_s{launch.get('STAGES', 1)}"
            report(kernel, name, weights, out_dir)


def nvfp4_gemv(out_dir: str) -> None:
    """nvfp4_linear's one-row GEMV (int4_gemv_kernel with E2M1=True) at Llama-8B's gate/up and down shapes, with and
    without AWQ's smooth, at its default launch; a unit is one weight."""
    from custom_ops.linear.triton_int4_kernels import int4_gemv_kernel
    from custom_ops.linear.triton_nvfp4 import gemv_config

    types = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "z_ptr": "*fp32", "smooth_ptr": "*fp32",
             "b_ptr": "*bf16", "y_ptr": "*bf16"}  # fmt: skip
    for n, k in ((28672, 4096), (4096, 14336)):
        launch = gemv_config(n, k)
        for smooth in (False, True):
            constexprs = {"K": k, "GROUP": 16, "BLOCK_N": launch["BLOCK_N"], "GROUPS_A_STEP": launch["GROUPS_A_STEP"],
                          "HAS_SMOOTH": smooth, "HAS_BIAS": False, "USE_PDL": True, "E2M1": True, "OFFSET": False,
                          "PTX_DECODE": False}  # fmt: skip
            kernel = compile_for_hopper(int4_gemv_kernel, types, constexprs, ("stride_wn", "stride_sn"),
                                        launch["num_warps"])  # fmt: skip
            weights = launch["BLOCK_N"] * launch["GROUPS_A_STEP"] * 16 / (32 * launch["num_warps"])
            name = f"nvfp4_gemv_{n}x{k}_n{launch['BLOCK_N']}_g{launch['GROUPS_A_STEP']}{'_smooth' if smooth else ''}"
            report(kernel, name, weights, out_dir)


def four_bit_gemm(out_dir: str) -> None:
    """The int4 and NVFP4 tensor-core GEMMs at a 16-row decode batch's tile over Llama-8B's q/k/v (K 4096), with AWQ's
    smooth; a unit is one weight of the tile."""
    from custom_ops.linear import triton_int4, triton_nvfp4
    from custom_ops.linear.triton_int4_kernels import int4_gemm_kernel, nvfp4_gemm_kernel

    strides = ("stride_xm", "stride_wn", "stride_sn", "stride_ym")
    common = {"x_ptr": "*bf16", "w_ptr": "*u8", "smooth_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16"}
    int4_tile, fp4_tile = triton_int4.gemm_config(16, 6144, 128), triton_nvfp4.gemm_config(16)
    int4_types = {**common, "s_ptr": "*bf16", "z_ptr": "*u8"}
    for kernel_fn, types, tile, extra in (
        (int4_gemm_kernel, int4_types, int4_tile, {"GROUP": 128, "OFFSET": False, "CODES8": False,
                                                   "SPLIT_NIBBLES": False}),
        (int4_gemm_kernel, int4_types, int4_tile, {"GROUP": 128, "OFFSET": False, "CODES8": False,
                                                   "SPLIT_NIBBLES": True}),
        (nvfp4_gemm_kernel, {**common, "s_ptr": "*u8", "g_ptr": "*fp32"}, fp4_tile, {}),
    ):  # fmt: skip
        constexprs = {"K": 4096, "BLOCK_M": tile["BLOCK_M"], "BLOCK_N": tile["BLOCK_N"], "BLOCK_K": tile["BLOCK_K"],
                      "HAS_SMOOTH": True, "HAS_BIAS": False, "USE_PDL": True, **extra}  # fmt: skip
        kernel = compile_for_hopper(kernel_fn, types, constexprs, strides, tile["num_warps"], tile["num_stages"])
        weights = tile["BLOCK_N"] * tile["BLOCK_K"] / (32 * tile["num_warps"])
        split = "_split" if extra.get("SPLIT_NIBBLES") else ""
        report(kernel, f"{kernel_fn.__name__}_16x{tile['BLOCK_N']}x{tile['BLOCK_K']}{split}_smooth", weights, out_dir)


def int4_mma(out_dir: str) -> None:
    """int4_linear's tensor-core decode (custom_ops/linear/gluon_int4_kernels.py) at Llama-8B's q/k/v (K 4096) and
    down (K 14336) shapes, group 128, one row with AWQ's smooth and without, 8 and 16 rows, at the tunings' MMA tiles
    that differ in code; a unit is one weight."""
    cases = ((1, True, {}), (1, False, {}), (1, True, {"ROWS": 32}), (1, True, {"UNROLL": 4}), (8, True, {}),
             (16, True, {}))  # fmt: skip
    _mma_study(out_dir, False, lambda n, k: cases)


def nvfp4_mma(out_dir: str) -> None:
    """nvfp4_linear's tensor-core decode (int4_mma_kernel with E2M1) at the same shapes, one row and 8 rows with AWQ's
    smooth, at the untuned launches (gluon_int4.mma_default); a unit is one weight."""
    from custom_ops.linear.gluon_int4 import mma_default

    def cases(n: int, k: int):
        return [(m, True, {key: v for key, v in mma_default(m, n, k, True).items() if key != "MMA"}) for m in (1, 8)]

    _mma_study(out_dir, True, cases)


def _mma_study(out_dir: str, e2m1: bool, cases) -> None:
    """int4_mma_kernel (E2M1 or int4 with zero points, bf16) compiled at cases(n, k)'s (rows, smooth, tile) for
    Llama-8B's q/k/v and down shapes, each reported: the whole kernel for one row (every step unrolled), else the
    loop over UNROLL's steps."""
    from custom_ops.linear.gluon_int4 import mma_launch
    from custom_ops.linear.gluon_int4_kernels import int4_mma_kernel

    types = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8" if e2m1 else "*bf16", "z_ptr": "*fp32" if e2m1 else "*u8",
             "smooth_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16"}  # fmt: skip
    multiples = ("N", "stride_xm", "stride_wn", "stride_sn", "part_end0", "part_end1")
    for n, k in ((6144, 4096), (4096, 14336)):
        for m, smooth, tile in cases(n, k):
            launch = mma_launch(m, n, k, 128, [n] if smooth else [], **tile)
            constexprs = {"K": k, "GROUP": 128, "HAS_SMOOTH": smooth, "HAS_BIAS": False, "OFFSET": False,
                          "USE_PDL": True, "E2M1": e2m1, **launch}  # fmt: skip
            kernel = compile_for_hopper(int4_mma_kernel, types, constexprs, multiples, launch["SPLIT"])
            one_row = launch["ONE_ROW"]
            weights = launch["ROWS"] * (k / launch["SPLIT"] if one_row else 128 * launch["UNROLL"]) / 32
            name = (f"{'nvfp4' if e2m1 else 'int4'}_mma_{n}x{k}_m{m}_rows{launch['ROWS']}_split{launch['SPLIT']}"
                    f"_unroll{launch['UNROLL']}{'_smooth' if smooth else ''}")  # fmt: skip
            report(kernel, name, weights, out_dir, whole=one_row)


def decode_attention(out_dir: str) -> None:
    """paged_attention_kernel's decode step at Llama-3.1-8B's layer, bf16 and fp8 caches, one split and 4 splits merged
    by the last program (MERGE_IN_KERNEL), at 4 warps and at the one warp of large batches, as the backend launches
    them on a GPU (IN_PTX); a unit is one key of the loop's tile (its key and value, for the GROUP query heads of a KV
    head)."""
    import torch

    from custom_ops.attention.triton import default_decode_launch
    from custom_ops.attention.triton_kernel import paged_attention_kernel

    strides = {"q_token_stride", "q_head_stride", "k_token_stride", "k_head_stride", "v_token_stride",
               "v_head_stride", "out_token_stride", "out_head_stride", "out_split_stride", "cache_block_stride",
               "cache_kv_stride", "cache_page_stride", "cache_head_stride", "merged_token_stride",
               "merged_head_stride"}  # fmt: skip
    for cache, splits, one_warp in (("bf16", 1, False), ("fp8e4nv", 1, False), ("bf16", 4, False), ("bf16", 1, True),
                                    ("fp8e4nv", 1, True)):  # fmt: skip
        # 4 warps: the backend's below triton.ONE_WARP_PROGRAMS_PER_SM programs an SM; one warp from there (large batches)
        launch = default_decode_launch(torch.bfloat16 if cache == "bf16" else torch.float8_e4m3fn, one_warp=one_warp)
        tile = launch.pop("TILE")
        types = {"out_ptr": "*bf16", "lse_ptr": "*fp32", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16",
                 "slot_ptr": "*i64", "cache_ptr": f"*{cache}", "block_table_ptr": "*i32",
                 "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32", "sinks_ptr": "*bf16", "scale": "fp32",
                 "softcap": "fp32", "merged_ptr": "*bf16", "counter_ptr": "*i32"}  # fmt: skip
        constexprs = {"GROUP": 4, "GROUP_BLOCK": 4, "BLOCK_Q": 1, "BLOCK_M": 16, "TILE": tile, "HEAD_DIM": 128,
                      "HEAD_DIM_PADDED": 128, "USE_SOFTCAP": False, "USE_WINDOW": False, "USE_SINKS": False,
                      "IEEE_DOT": False, "NUM_SPLITS": splits, "WRITE_KV": splits > 1, "DECODE": True,
                      "SATURATE_AT": 448.0 if cache != "bf16" else 0.0, "USE_PDL": True, "BLOCK_SIZE": 16,
                      "MERGE_IN_KERNEL": splits > 1, "IN_PTX": True, "VALUES_IN_PTX": one_warp}  # fmt: skip
        kernel = compile_for_hopper(paged_attention_kernel, types, constexprs, strides, launch.get("num_warps", 4),
                                    launch.get("num_stages", 3))  # fmt: skip
        name = f"decode_attention_{cache}_cache" + (f"_{splits}_splits_merged" if splits > 1 else "")
        report(kernel, name + ("_one_warp" if one_warp else ""), tile, out_dir)


def decode_gemm(out_dir: str) -> None:
    """The decode GEMM over bfloat16 at each 16-bit tile of its tuning (decode_gemm_tuning.TILES_16BIT), 16 and 64 rows
    of x, plain (Llama-8B's down, K 14336) and gated (gate/up, K 4096): whether it compiles within Hopper's shared
    memory, and with which MMA (wgmma: HGMMA in the SASS; mma.sync: HMMA); a unit is one weight of a K step."""
    from custom_ops.linear.decode_gemm_tuning import TILES_16BIT
    from custom_ops.linear.triton_decode_gemm import DECODE_TILE_16BIT
    from custom_ops.linear.triton_decode_gemm_kernels import decode_gemm_kernel

    types = {name: "*bf16" for name in ("x_ptr", "w_ptr", "w_up_ptr", "b_ptr", "y_ptr")}
    types |= {"x_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "partial_ptr": "*fp32", "count_ptr": "*i32"}
    for tile in TILES_16BIT:
        tile = DECODE_TILE_16BIT | tile
        for rows, gated in ((16, False), (64, False), (16, True), (64, True)):
            if gated and tile["SPLIT_K"] > 1:
                continue
            k = 4096 if gated else 14336
            constexprs = {"K": k, "M_PADDED": rows, "HAS_BIAS": False, "BLOCK_N": tile["BLOCK_N"],
                          "BLOCK_K": tile["BLOCK_K"], "EVEN_K": True, "PREFETCH": tile["PREFETCH"],
                          "SPLIT_K": tile["SPLIT_K"], "K_SPLIT": k // tile["SPLIT_K"], "USE_PDL": True,
                          "INT8": False, "SCALED": False, "SILU_MUL": gated}  # fmt: skip
            name = (f"decode_gemm_n{tile['BLOCK_N']}_k{tile['BLOCK_K']}_s{tile['num_stages']}_w{tile['num_warps']}"
                    f"_split{tile['SPLIT_K']}_pf{tile['PREFETCH']}_m{rows}{'_gated' if gated else ''}")  # fmt: skip
            try:
                kernel = compile_for_hopper(decode_gemm_kernel, types, constexprs, ("stride_xm", "stride_wn",
                                            "stride_ym"), tile["num_warps"], tile["num_stages"])  # fmt: skip
            except Exception as error:  # noqa: BLE001  (a tile over the shared memory: reported, not fatal)
                print(f"{name}: does not compile: {type(error).__name__}: {str(error)[:160]}")
                continue
            print(f"    ({'wgmma' if 'wgmma' in kernel.asm['ptx'] else 'mma.sync'})", end=" ")
            report(kernel, name, tile["BLOCK_N"] * tile["BLOCK_K"] * (1 + gated) / (32 * tile["num_warps"]), out_dir)


STUDIES = {"mxfp4-gemv": mxfp4_gemv, "mxfp4-mma": mxfp4_mma, "decode-attention": decode_attention,
           "int4-gemv": int4_gemv, "nvfp4-gemv": nvfp4_gemv, "4bit-gemm": four_bit_gemm, "int4-mma": int4_mma,
           "nvfp4-mma": nvfp4_mma, "decode-gemm": decode_gemm}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--out", help="keep each kernel's TTGIR, PTX, cubin and SASS here (default: a temporary dir)")
    args = parser.parse_args()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        STUDIES[args.study](args.out)
    else:
        with tempfile.TemporaryDirectory() as out_dir:
            STUDIES[args.study](out_dir)


if __name__ == "__main__":
    main()
