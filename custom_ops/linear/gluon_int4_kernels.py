"""int4_linear's and nvfp4_linear's decode on tensor cores, in Gluon (Triton's language with explicit layouts):
gluon_int4.py launches it.

For up to 16 rows of x (a decode batch), the weights are the 16-row side of mma.m16n8k16 and x the 8-column side, so
the MMA does the multiply-adds and the threads only decode. Each thread loads its packed codes straight in the A
operand's register layout (16 bytes: 32 columns of a row), and inline PTX turns each byte into the bfloat16 (or
float16) pair (q0 - z, q1 - z) in 3.25 instructions (gluon_int4_decode.py's decode_asm: a shift a word, then a prmt,
a lop3 and an fma a byte). The decoded registers are the A operand as they are (`convert_layout(..., assert_trivial=True)` proves no
data moves), so one row takes 2.3-2.7 instructions a weight, the whole kernel counted (benchmarks/kernel_sass.py
int4-mma), against 5.9-6.9 in the CUDA-core GEMV's loop. One row of x (times AWQ's smooth) is staged in shared memory
for the whole K before the steps, a column computed once, and the steps are unrolled with no barrier between them;
more rows are read in the B operand's layout each step.

A one-row GEMV of 4096 channels would give too few programs of 16 rows, so the K axis is split over the program's
warps: the MMA's batch axis is the split (a warp per slice of K, with its own x), and the warps' partial sums are
added once at the end. Numerics are int4.py's: q - z exact, the group's float32 sum scaled in float32; float offsets
(w = q s + m) add m times the group's sum of x: one row sums its staged row once and adds every group's m times its
sum after the steps (its offsets loaded before the wait for the previous kernel); more rows compute the sums each step
with an MMA of ones over x, in the accumulator's layout. (The MMA of ones at one row repeated for every 16 channels of
a program: +50% HMMA, gate/up 33.7 against 31.5 us, down 26.6 against 18.3 on an H100.)

NVFP4 (E2M1) runs the same kernel: each code becomes e2m1 * s * 2^-7, exact in bfloat16 and float16 (e2m1_decode_asm:
its bits placed as a small float, times its block's scale pair), so the MMA sums whole steps and the global scale
(times 2^7) scales the channel's sum once. The decode writes a register's two values from columns j and j + 4, so x
is read in that order of K too (e2m1_order). 3.2-4.0 instructions a weight (benchmarks/kernel_sass.py nvfp4-mma).

Importing this module needs triton with Gluon (3.5+). Gluon kernels do not run in Triton's interpreter, so the CPU
tests (tests/test_int4_mma.py, test_nvfp4_mma.py) check the decodes' PTX against the codes' values, compile the
kernel for sm_90a and run its whole PTX in tests/ptx_emulator.py against the reference; the GPU tests hold it to the
reference there.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from custom_ops.linear.gluon_int4_decode import decode_codes, decode_e2m1, e2m1_order, e2m1_scale_pairs, zero_addend


@gluon.constexpr_function
def mma_layout(split):
    """The accumulator's: mma.m16n8k16 tiles, the batch axis (K's slices) over the warps."""
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[split, 1, 1], instr_shape=[1, 16, 8])


@gluon.constexpr_function
def operand_layout(split, group, index, packed):
    """The MMA's operand `index` (0: weights, 1: x), of 16-bit values or, `packed`, of the code bytes (two columns
    each). K-width: 32 columns a thread (a group spans a row's 4 threads), fewer for groups under 128."""
    columns = 32 if group >= 128 else group // 4
    return gl.DotOperandLayout(
        operand_index=index, parent=mma_layout(split), k_width=columns // 2 if packed else columns
    )


@gluon.constexpr_function
def power_of_2_at_least(value):
    return 1 << (value - 1).bit_length()


@gluon.jit
def add_e2m1_step(acc, x, step, packed, block_scales_at, fill, a_layout: gl.constexpr, SPLIT: gl.constexpr,
                  ROWS: gl.constexpr, GROUP: gl.constexpr):  # fmt: skip
    """acc + step `step` (GROUP columns) of each warp's slice in NVFP4: its codes decoded to e2m1 * s * 2^-7 with their
    blocks' scales, times x [SPLIT, GROUP, COLS] (in e2m1_order) on the tensor cores (the global scale and 2^7 come at
    the end)."""
    dtype: gl.constexpr = x.dtype
    pairs = e2m1_scale_pairs(gl.load(block_scales_at + step * (GROUP // 16)), dtype, GROUP)  # [SPLIT, ROWS, GROUP/16]
    # a block's pair beside each of its 8 code bytes: the same registers, in the codes' layout (no data moves)
    pairs = (pairs[:, :, :, None] + fill.reshape([SPLIT, ROWS, GROUP // 16, 8])).reshape([SPLIT, ROWS, GROUP // 2])
    pairs = gl.convert_layout(pairs, fill.type.layout, assert_trivial=True)
    first, second = decode_e2m1(packed, pairs, dtype)
    # first[4 g + i] is position 8 g + i of e2m1_order's K, second[4 g + i] position 8 g + 4 + i (x's order)
    return mma_v2(a_operand(first, second, a_layout, SPLIT, ROWS, GROUP), x, acc)


@gluon.jit
def a_operand(first, second, a_layout: gl.constexpr, SPLIT: gl.constexpr, ROWS: gl.constexpr, GROUP: gl.constexpr):
    """A decode's two outputs as the MMA's weights [SPLIT, ROWS, GROUP]: first[4 g + i] is K's position 8 g + i,
    second[4 g + i] 8 g + 4 + i; the registers as they are (assert_trivial: no data moves)."""
    w = gl.join(first, second).reshape([SPLIT, ROWS, GROUP // 8, 4, 2]).permute(0, 1, 2, 4, 3)
    return gl.convert_layout(w.reshape([SPLIT, ROWS, GROUP]), a_layout, assert_trivial=True)


@gluon.jit
def add_any_step(acc, x, step, packed, zeros_at, scales_at, offsets_at, block_scales_at, code_addend, ones, fill,
                 a_layout: gl.constexpr, mma: gl.constexpr, SPLIT: gl.constexpr, ROWS: gl.constexpr,
                 COLS: gl.constexpr, GROUP: gl.constexpr, OFFSET: gl.constexpr, OFFSET_SUMS: gl.constexpr,
                 E2M1: gl.constexpr):  # fmt: skip
    """add_e2m1_step (E2M1, x already in e2m1_order) or add_step, over the step's codes `packed`."""
    if E2M1:
        return add_e2m1_step(acc, x, step, packed, block_scales_at, fill, a_layout, SPLIT, ROWS, GROUP)
    else:
        return add_step(acc, x, step, packed, zeros_at, scales_at, offsets_at, code_addend, ones, fill, a_layout, mma,
                        SPLIT, ROWS, COLS, GROUP, OFFSET, OFFSET_SUMS)  # fmt: skip


@gluon.jit
def prefetch_codes(w_ptr, n0, stride_wn, SPLIT: gl.constexpr, ROWS: gl.constexpr, BYTES: gl.constexpr):
    """A bulk L2 prefetch (sm_90) of each warp's slice of each of the program's rows: BYTES bytes from w_ptr +
    (n0 + row) * stride_wn + split * BYTES, 16-byte aligned and a multiple of 16 (the launcher's checks)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [SPLIT, 1], [1, 0])
    split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, layout))
    row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, layout))
    starts = w_ptr + (n0 + row)[None, :] * stride_wn + (split * BYTES)[:, None]
    sizes = gl.full([SPLIT, ROWS], BYTES, gl.int32, layout=layout)
    gl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0;", "=r,l,r", [starts, sizes],
                              dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def add_step(acc, x, step, packed, zeros_at, scales_at, offsets_at, code_addend, ones, fill, a_layout: gl.constexpr,
             mma: gl.constexpr, SPLIT: gl.constexpr, ROWS: gl.constexpr, COLS: gl.constexpr, GROUP: gl.constexpr,
             OFFSET: gl.constexpr, OFFSET_SUMS: gl.constexpr):  # fmt: skip
    """acc + group `step` of each warp's slice: its codes `packed` decoded, times x [SPLIT, GROUP, COLS] (the B operand) on
    the tensor cores, times the group's scales (OFFSET: the codes as they are, and with OFFSET_SUMS plus the group's
    offsets times x's sums, an MMA of ones over x)."""
    dtype: gl.constexpr = x.dtype
    if OFFSET:
        addend = code_addend
    else:
        addend = zero_addend(gl.load(zeros_at + step).to(gl.float32), dtype)[:, :, None] + fill
    first4, last4 = decode_codes(packed, addend, dtype)  # columns 8 g + i and 8 g + 4 + i of the step at [4 g + i]
    sums = mma_v2(a_operand(first4, last4, a_layout, SPLIT, ROWS, GROUP), x, gl.zeros([SPLIT, ROWS, COLS], gl.float32,
                                                                                       layout=mma))  # fmt: skip
    acc += sums * gl.load(scales_at + step).to(gl.float32)[:, :, None]
    if OFFSET_SUMS:
        x_sums = mma_v2(ones, x, gl.zeros([SPLIT, ROWS, COLS], gl.float32, layout=mma))
        acc += x_sums * gl.load(offsets_at + step).to(gl.float32)[:, :, None]
    return acc


@gluon.jit
def launch_dependents():
    """PDL: the next kernel may launch now (it waits for this one's results itself, wait_for_producers)."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)  # fmt: skip


@gluon.jit
def wait_for_producers():
    """PDL: wait until the kernels this one depends on have finished, their writes visible."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def int4_mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_sn, part_end0, part_end1,
    K: gl.constexpr, GROUP: gl.constexpr, ROWS: gl.constexpr, COLS: gl.constexpr, SPLIT: gl.constexpr,
    UNROLL: gl.constexpr, ONE_ROW: gl.constexpr, HAS_SMOOTH: gl.constexpr, HAS_BIAS: gl.constexpr, OFFSET: gl.constexpr,
    USE_PDL: gl.constexpr, E2M1: gl.constexpr = False, PREFETCH: gl.constexpr = False, PRELOAD: gl.constexpr = 0,
):  # fmt: skip
    """y [M, N] = x [M, K] @ W^T for M <= COLS (8 or 16): a program computes ROWS channels, its SPLIT warps a slice of
    K / SPLIT columns each, GROUP columns (one group) a step, UNROLL steps a loop iteration (ONE_ROW: every step
    unrolled). The launcher checks that ROWS divides N and each smooth part, and that SPLIT * UNROLL groups divide
    K's. E2M1: NVFP4's codes (nvfp4.py), s_ptr its e4m3 scales [N, K / 16] (as bytes), z_ptr its global scales [N];
    GROUP is then only the columns of a step. PREFETCH: the program's codes prefetched into L2 first (the launcher
    checks that the codes' base and row stride are multiples of 16 bytes). PRELOAD (ONE_ROW): the codes of the first
    PRELOAD steps loaded into registers before the wait, as the bf16 GEMV loads its first weights (the launcher keeps
    it within the warp's steps)."""
    if USE_PDL:
        launch_dependents()
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    # Batch axis = the K split (a warp each); K-width 32: a thread's 16 bytes of codes are 32 consecutive columns
    # (one 128-bit load), and the A and B operands agree on that permutation of K, which a dot is invariant to.
    mma: gl.constexpr = mma_layout(SPLIT)
    a_layout: gl.constexpr = operand_layout(SPLIT, GROUP, 0, False)
    b_layout: gl.constexpr = operand_layout(SPLIT, GROUP, 1, False)
    codes_layout: gl.constexpr = operand_layout(SPLIT, GROUP, 0, True)
    GROUPS: gl.constexpr = K // GROUP // SPLIT  # a warp's groups
    SLICE: gl.constexpr = GROUPS * GROUP  # a warp's columns
    n0 = gl.program_id(0) * ROWS

    # codes [SPLIT, ROWS, GROUP / 2] of a step, and their rows' zero points [SPLIT, ROWS]
    c_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, codes_layout)))
    c_row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, codes_layout)))
    c_byte = gl.arange(0, GROUP // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, codes_layout)))
    codes_at = (w_ptr + (n0 + c_row)[None, :, None] * stride_wn + (c_split * (SLICE // 2))[:, None, None]
                + c_byte[None, None, :])  # fmt: skip
    zeros_at = z_ptr + (n0 + c_row)[None, :] * stride_sn + (c_split * GROUPS)[:, None]
    # x [SPLIT, GROUP, COLS] of a step (its rows are the MMA's columns)
    x_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, b_layout)))
    x_col = gl.arange(0, GROUP, layout=gl.SliceLayout(0, gl.SliceLayout(2, b_layout)))
    x_row = gl.arange(0, COLS, layout=gl.SliceLayout(0, gl.SliceLayout(1, b_layout)))
    k_of_x = (x_split * SLICE)[:, None, None] + x_col[None, :, None]
    x_at = x_ptr + k_of_x + x_row[None, None, :] * stride_xm
    x_ok = (x_row < M)[None, None, :]
    if HAS_SMOOTH:  # the program's channels lie in one part (the launcher's ROWS divides every part's)
        part = (n0 >= part_end0).to(gl.int32) + (n0 >= part_end1).to(gl.int32)
        smooth_at = smooth_ptr + part * K + k_of_x
    # scales (and float offsets) [SPLIT, ROWS] in the accumulator's layout
    s_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, mma)))
    s_row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, mma)))
    scales_at = (n0 + s_row)[None, :] * stride_sn + (s_split * GROUPS)[:, None]

    fill = gl.zeros([SPLIT, ROWS, GROUP // 2], gl.int32, layout=codes_layout)  # broadcasts a row's addend
    block_scales_at = s_ptr  # E2M1: the scales [SPLIT, ROWS, GROUP / 16] of a step, a block's beside its code bytes
    if E2M1:
        blocks: gl.constexpr = gl.SliceLayout(3, fill.reshape([SPLIT, ROWS, GROUP // 16, 8]).type.layout)
        b_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, blocks)))
        b_row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, blocks)))
        b_block = gl.arange(0, GROUP // 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, blocks)))
        block_scales_at = (s_ptr + (n0 + b_row)[None, :, None] * stride_sn + (b_split * (SLICE // 16))[:, None, None]
                           + b_block[None, None, :])  # fmt: skip
    code_addend, ones = fill, fill  # what the offsets' form uses, else unused
    # w = q s + m: the codes as they are (z = 0), m times the group's sum of x. One row sums its staged row once and
    # adds every group's m times its sum after the steps (ONE_ROW_OFFSETS, a warp's offsets [SPLIT, ROWS, GROUPS]
    # loaded before the wait: they are weights); more rows sum x with an MMA of ones each step.
    ONE_ROW_OFFSETS: gl.constexpr = OFFSET and ONE_ROW
    GROUPS_P2: gl.constexpr = power_of_2_at_least(GROUPS)  # a warp's groups as a tensor's shape: a power of 2
    if OFFSET:
        no_zero = gl.zeros([SPLIT, ROWS], gl.float32, layout=gl.SliceLayout(2, codes_layout))
        code_addend = zero_addend(no_zero, dtype)[:, :, None] + fill
        ones = gl.full([SPLIT, ROWS, GROUP], 1.0, dtype, layout=a_layout)
    if ONE_ROW_OFFSETS:
        by_group: gl.constexpr = gl.BlockedLayout([1, 1, GROUPS_P2], [1, 32, 1], [SPLIT, 1, 1], [2, 1, 0])
        m_split = gl.arange(0, SPLIT, layout=gl.SliceLayout(1, gl.SliceLayout(2, by_group)))
        m_row = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, by_group)))
        m_group = gl.arange(0, GROUPS_P2, layout=gl.SliceLayout(0, gl.SliceLayout(1, by_group)))[None, None, :]
        offsets = gl.load(z_ptr + (n0 + m_row)[None, :, None] * stride_sn + (m_split * GROUPS)[:, None, None] + m_group,
                          mask=m_group < GROUPS, other=0.0).to(gl.float32)  # fmt: skip
    acc = gl.zeros([SPLIT, ROWS, COLS], gl.float32, layout=mma)
    if PREFETCH:  # before the wait: under PDL the codes stream into L2 while the previous kernel drains
        prefetch_codes(w_ptr, n0, stride_wn, SPLIT, ROWS, SLICE // 2)
    preloaded = ()  # before the wait too: the first steps' codes in registers (they are weights, no kernel's output)
    if ONE_ROW:
        for step in gl.static_range(PRELOAD):
            preloaded = preloaded + (gl.load(codes_at + step * (GROUP // 2)),)
    if USE_PDL:  # x is the previous kernel's output
        wait_for_producers()
    if ONE_ROW:
        # One row of x (times smooth) for the whole K, a column once over the warps' lanes, loaded at once and stored
        # in shared memory (2 bytes a column); the steps, unrolled, read it in the B operand's layout (every lane
        # holds 32 columns) with no barrier between them. B's other columns hold copies of the row, which only the
        # unstored outputs read.
        whole: gl.constexpr = gl.BlockedLayout([GROUPS_P2, 1, GROUP // 32], [1, 1, 32], [1, SPLIT, 1], [2, 1, 0])
        g = gl.arange(0, GROUPS_P2, layout=gl.SliceLayout(1, gl.SliceLayout(2, whole)))[:, None, None]
        k_of_row = (
            g * GROUP + (gl.arange(0, SPLIT, layout=gl.SliceLayout(0, gl.SliceLayout(2, whole))) * SLICE)[None, :, None]
        )
        k_of_row += gl.arange(0, GROUP, layout=gl.SliceLayout(0, gl.SliceLayout(1, whole)))[None, None, :]
        row = gl.load(x_ptr + k_of_row, mask=g < GROUPS, other=0.0)
        if HAS_SMOOTH:  # x * smooth rounded to x's dtype, as int4.py's numerics say
            row = (row.to(gl.float32) * gl.load(smooth_ptr + part * K + k_of_row, mask=g < GROUPS, other=0.0)).to(dtype)
        if ONE_ROW_OFFSETS:  # each warp's groups' sums of x [SPLIT, GROUPS], times their offsets, added once
            x_sums = gl.convert_layout(gl.permute(gl.sum(row.to(gl.float32), axis=2), [1, 0]),
                                       gl.SliceLayout(1, by_group))  # fmt: skip
            moved = gl.sum(offsets * x_sums[:, None, :], axis=2)
            acc += gl.convert_layout(moved, gl.SliceLayout(2, mma))[:, :, None]
        if E2M1:
            row = e2m1_order(row, GROUPS_P2 * SPLIT, GROUP, 1)
        row = row.reshape([GROUPS_P2 * SPLIT, GROUP])  # row g * SPLIT + s: group g of warp s's slice
        row_smem = gl.allocate_shared_memory(dtype, [GROUPS_P2 * SPLIT, GROUP], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
                                             row)  # fmt: skip
        gl.thread_barrier()
        for step in gl.static_range(GROUPS):
            x = row_smem.slice(step * SPLIT, SPLIT).load(gl.SliceLayout(2, b_layout))[:, :, None]
            x = gl.broadcast(x, gl.zeros([SPLIT, GROUP, COLS], dtype, layout=b_layout))[0]
            if step < PRELOAD:
                packed = preloaded[step]
            else:
                packed = gl.load(codes_at + step * (GROUP // 2))
            acc = add_any_step(acc, x, step, packed, zeros_at, s_ptr + scales_at, z_ptr + scales_at, block_scales_at,
                               code_addend, ones, fill, a_layout, mma, SPLIT, ROWS, COLS, GROUP, OFFSET, False,
                               E2M1)  # fmt: skip
    else:
        for first in range(0, GROUPS, UNROLL):
            for u in gl.static_range(UNROLL):
                step = first + u
                x = gl.load(x_at + step * GROUP, mask=x_ok, other=0.0)
                if HAS_SMOOTH:  # x * smooth rounded to x's dtype, as int4.py's numerics say
                    x = (x.to(gl.float32) * gl.load(smooth_at + step * GROUP)).to(dtype)
                if E2M1:
                    x = gl.convert_layout(e2m1_order(x, SPLIT, GROUP, COLS), b_layout)  # a thread's 32 columns
                packed = gl.load(codes_at + step * (GROUP // 2))
                acc = add_any_step(acc, x, step, packed, zeros_at, s_ptr + scales_at, z_ptr + scales_at,
                                   block_scales_at, code_addend, ones, fill, a_layout, mma, SPLIT, ROWS, COLS, GROUP,
                                   OFFSET, OFFSET, E2M1)  # fmt: skip
    out = gl.sum(acc, axis=0)  # [ROWS, COLS]: the warps' slices added
    o_row = gl.arange(0, ROWS, layout=gl.SliceLayout(1, gl.SliceLayout(0, mma)))
    o_col = gl.arange(0, COLS, layout=gl.SliceLayout(0, gl.SliceLayout(0, mma)))
    if E2M1:  # the global scale, and the 2^7 the decode left out
        out *= (gl.load(z_ptr + n0 + o_row) * 128.0)[:, None]
    if HAS_BIAS:
        out += gl.load(b_ptr + n0 + o_row).to(gl.float32)[:, None]
    gl.store(y_ptr + o_col[None, :] * N + (n0 + o_row)[:, None], out.to(dtype), mask=(o_col < M)[None, :])
