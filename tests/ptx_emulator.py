"""A lockstep emulator of the PTX that Triton emits, so that a compiled Gluon kernel (which Triton's interpreter cannot
run) can be checked on the CPU, or a Triton kernel's inline PTX: `run_kernel` compiles a kernel for sm_90a
(benchmarks/kernel_sass.py's compile_for_hopper, specialized as a launch would be), places its tensors in a flat
memory, runs the whole grid (or each program of a 3-D grid alone) and copies the tensors back.

Every thread of the grid is a lane of one numpy vector and all run each instruction together, so:
- branches must be uniform over the grid (Triton's loops are), or over a program where each runs alone; a divergent
  one raises. Barriers are no-ops, as every store is visible to every thread before the next instruction, and so is
  cp.async's copy (done at once): a race between warps is not seen.
- warp-wide instructions (mma.sync m16n8k16 row.col with float32 accumulators, ldmatrix, stmatrix, shfl.sync.bfly and
  .idx) take whole warps of 32 lanes and no guard.
- the PTX subset is the one Triton emits for gluon_int4_kernels.int4_mma_kernel and the paged-attention decode kernel
  (tests/test_decode_attention_ptx.py); an instruction outside it (an opcode
  or a modifier) raises NotImplementedError naming it, and an access outside the memory or the shared memory raises
  IndexError: nothing is skipped. (The memory holds the tensors' storages with a gap of 256 bytes or more after each:
  a small overrun reads zeros there rather than raising.)
- numerics: float32 arithmetic goes through float64 and rounds once to float32 (fma.rn.f32 so rounds twice, which
  differs from the hardware in rare ties); the MMA adds its exact products in float64 (the hardware's order and
  rounding of the additions differ in the last bits); 16-bit pair arithmetic (the decode's fma) must be exact in
  float32 before its one rounding to 16 bits, else it raises; ex2.approx and div.full round the exact result once (the
  GPU's approximations are within 2 ulp).
"""

from __future__ import annotations

import functools
import os
import re
import sys

import numpy as np
import torch

U64 = np.uint64
GLOBAL_BASE = 1 << 20  # global addresses start here: a null or small pointer's access is out of bounds
TYPE_BITS = {"pred": 1, "b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16,
             "b32": 32, "u32": 32, "s32": 32, "f32": 32, "f16x2": 32, "bf16x2": 32, "b64": 64, "u64": 64, "s64": 64}  # fmt: skip
INTEGER_TYPES = {name for name in TYPE_BITS if name[0] in "bus" and name[1:].isdigit()}
TRITON_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8",
                torch.int32: "*i32", torch.int64: "*i64", torch.float8_e4m3fn: "*fp8e4nv"}  # fmt: skip
# mma.m16n8k16's fragments: (row, column) of each register's low half, per lane (g = lane // 4, t = lane % 4)
_LANE = np.arange(32)
_G, _T = _LANE // 4, _LANE % 4
A_FRAGMENT = [(_G, 2 * _T), (_G + 8, 2 * _T), (_G, 2 * _T + 8), (_G + 8, 2 * _T + 8)]  # high half: column + 1
B_FRAGMENT = [(2 * _T, _G), (2 * _T + 8, _G)]  # (k, n); high half: k + 1
C_FRAGMENT = [(_G, 2 * _T), (_G, 2 * _T + 1), (_G + 8, 2 * _T), (_G + 8, 2 * _T + 1)]


def unsupported(ins: Instruction) -> NotImplementedError:
    return NotImplementedError(f"the PTX emulator does not know {ins.opcode!r} (operands {', '.join(ins.args)})")


def mask_bits(value, bits: int):
    return value if bits >= 64 else value & U64((1 << bits) - 1)


def signed(value, bits: int) -> np.ndarray:
    """The low `bits` of uint64 values as signed integers."""
    value = mask_bits(np.asarray(value, U64), bits).astype(np.int64)
    return value if bits >= 64 else np.where(value >= 1 << (bits - 1), value - (1 << bits), value)


def f32_of(bits) -> np.ndarray:
    return mask_bits(np.asarray(bits, U64), 32).astype(np.uint32).view(np.float32)


def bits_of_f32(value) -> np.ndarray:
    return np.asarray(value, np.float32).view(np.uint32).astype(U64)


def f32_of_half(bits, kind: str) -> np.ndarray:
    bits = mask_bits(np.asarray(bits, U64), 16)
    if kind == "bf16":
        return f32_of(bits << U64(16))
    return bits.astype(np.uint16).view(np.float16).astype(np.float32)


def e4m3_to_f32(bits) -> np.ndarray:
    """float8_e4m3fn bytes as float32 values (torch's conversion; 0x7F and 0xFF are NaN)."""
    codes = torch.from_numpy(np.asarray(bits, U64).astype(np.uint8))
    return codes.view(torch.float8_e4m3fn).float().numpy()


def half_of_f32(value, kind: str) -> np.ndarray:
    """Rounded to nearest even, as cvt.rn does."""
    value = np.asarray(value, np.float32)
    if kind == "f16":
        return value.astype(np.float16).view(np.uint16).astype(U64)
    bits = value.view(np.uint32).astype(U64)
    rounded = ((bits + U64(0x7FFF) + ((bits >> U64(16)) & U64(1))) >> U64(16)) & U64(0xFFFF)
    return np.where(np.isnan(value), U64(0x7FC0), rounded)


def split_operands(text: str) -> list[str]:
    """Comma-separated operands, keeping {vectors} and [addresses] whole."""
    operands, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "{[") - (ch in "}]")
        if ch == "," and depth == 0:
            operands.append(current.strip())
            current = ""
        else:
            current += ch
    return [*operands, current.strip()] if current.strip() else operands


class Instruction:
    def __init__(self, text: str):
        guard = re.match(r"@(!?)(%?\w+)\s+", text)
        self.guard = (guard.group(2), guard.group(1) == "!") if guard else None
        text = text[guard.end() :] if guard else text
        self.opcode, _, operands = text.partition(" ")
        self.parts = self.opcode.split(".")
        self.type = self.parts[-1]
        self.bits = TYPE_BITS.get(self.type, 32)
        self.args = split_operands(operands)


def parse_entry(ptx: str) -> tuple[list[Instruction], dict[str, int], list[str]]:
    """The first .entry's instructions, its labels (-> instruction index) and its parameters' names in order."""
    ptx = "\n".join(line.split("//")[0] for line in ptx.splitlines())
    start = ptx.index(".entry")
    body = ptx.index("{", ptx.index(")", start))
    params = re.findall(r"\.param\s[^,)]*?(\w+_param_\d+)", ptx[start:body])
    depth, end = 0, body
    for end in range(body, len(ptx)):
        depth += (ptx[end] == "{") - (ptx[end] == "}")
        if depth == 0:
            break
    lines = ptx[body + 1 : end].splitlines()
    text = " ".join(line for line in lines if not line.strip().startswith((".loc", ".file")))  # no semicolon
    program, labels = [], {}
    for statement in text.split(";"):
        statement = statement.strip()
        while True:  # scope braces of inline asm and labels come before a statement
            label = re.match(r"([$\w]+):", statement)
            if label:
                labels[label.group(1)] = len(program)
                statement = statement[label.end() :].strip()
            elif statement[:1] in ("{", "}"):
                statement = statement[1:].strip()
            else:
                break
        if statement and not statement.startswith("."):  # .reg, .shared: declarations
            instruction = Instruction(statement)
            if instruction.parts[0] not in ("bra", "ret") and not hasattr(Grid, "op_" + instruction.parts[0]):
                raise NotImplementedError(f"the PTX emulator does not know {instruction.opcode!r}")
            program.append(instruction)
    return program, labels, params


class Grid:
    """Every thread of a launch's grid as a lane: registers are uint64 (bool for predicates) vectors over them."""

    def __init__(self, ptx: str, params: list[int], memory: np.ndarray, grid: int, threads: int, shared: int,
                 program_id: tuple[int, int, int] | None = None):  # fmt: skip
        """`program_id`: run the one program (block) of that (x, y, z) id, `grid` 1."""
        self.program, self.labels, names = parse_entry(ptx)
        # the parameters after the kernel's own: Triton's scratch pointers, unused (run_kernel checks)
        self.params = dict(zip(names, [*params, *[0] * (len(names) - len(params))]))
        self.handlers = [getattr(self, "op_" + ins.parts[0], None) for ins in self.program]
        self.memory, lanes = memory, grid * threads
        self.tid = np.arange(lanes, dtype=U64) % U64(threads)
        self.ctaid = np.arange(lanes, dtype=U64) // U64(threads)
        self.shared_size = max(shared, 1)
        self.shared = np.zeros(grid * self.shared_size, np.uint8)
        self.regs: dict[str, np.ndarray] = {}
        self.specials = {"%tid.x": self.tid, "%ctaid.x": self.ctaid, "%laneid": self.tid % U64(32)}
        for name in ("%tid.y", "%tid.z", "%ctaid.y", "%ctaid.z", "global_smem"):  # global_smem: shared offset 0
            self.specials[name] = np.zeros(lanes, U64)
        if program_id is not None:
            for axis, index in zip("xyz", program_id):
                self.specials[f"%ctaid.{axis}"] = np.full(lanes, index, U64)

    def run(self, max_steps: int = 1_000_000) -> None:
        pc = 0
        for _ in range(max_steps):
            if pc >= len(self.program):
                return
            ins = self.program[pc]
            pc += 1
            mask = None
            if ins.guard:
                mask = self.predicate(ins.guard[0])
                mask = ~mask if ins.guard[1] else mask
            if ins.parts[0] == "ret":
                if mask is not None and not mask.all():
                    raise NotImplementedError("a ret taken by some threads only")
                return
            if ins.parts[0] == "bra":
                if mask is None or mask.all():
                    pc = self.labels[ins.args[0]]
                elif mask.any():
                    raise NotImplementedError(f"a divergent branch to {ins.args[0]}")
                continue
            self.handlers[pc - 1](ins, mask)
        raise RuntimeError(f"the kernel ran over {max_steps} instructions")

    # operands and results
    def value(self, operand: str) -> np.ndarray:
        if operand in self.regs:
            return self.regs[operand]
        if operand in self.specials:
            return self.specials[operand]
        return np.full(len(self.tid), constant(operand), U64)

    def predicate(self, operand: str) -> np.ndarray:
        return self.regs[operand] if operand in self.regs else self.value(operand).astype(bool)

    def set(self, name: str, value, mask, bits: int) -> None:
        value = mask_bits(np.broadcast_to(np.asarray(value, U64), self.tid.shape), bits)
        self.regs[name] = value if mask is None else np.where(mask, value, self.regs.get(name, U64(0)))

    def set_predicate(self, name: str, value, mask) -> None:
        self.regs[name] = value if mask is None else np.where(mask, value, self.regs.get(name, False))

    # memory
    def address(self, operand: str) -> np.ndarray:
        base, _, offset = operand.strip("[] ").partition("+")
        return self.value(base.strip()).astype(np.int64) + int(offset or 0)

    def locate(self, space: str, address: np.ndarray, size: int, mask) -> tuple[np.ndarray, np.ndarray]:
        """Indices of `size` bytes at each active lane's address into the space's byte array (inactive lanes: 0)."""
        if space == "global":
            buffer, index = self.memory, address - GLOBAL_BASE
            limit = len(buffer)
        elif space == "shared":
            buffer, index = self.shared, address
            limit = self.shared_size
        else:
            raise NotImplementedError(f"the PTX emulator has no {space} memory")
        active = np.ones(len(index), bool) if mask is None else mask
        index = np.where(active, index, 0)
        bad = active & ((index < 0) | (index + size > limit))
        if bad.any():
            raise IndexError(f"a {space} access of {size} bytes at {int(address[bad][0]):#x} is outside the memory")
        if space == "shared":
            index = index + self.ctaid.astype(np.int64) * self.shared_size
        return buffer, index[:, None] + np.arange(size)

    def load(self, space: str, address, size: int, mask) -> np.ndarray:
        buffer, index = self.locate(space, address, size, mask)
        return (buffer[index].astype(U64) << (U64(8) * np.arange(size, dtype=U64))).sum(axis=1, dtype=U64)

    def store(self, space: str, address, size: int, value, mask) -> None:
        buffer, index = self.locate(space, address, size, mask)
        active = slice(None) if mask is None else mask
        data = (value[:, None] >> (U64(8) * np.arange(size, dtype=U64))) & U64(0xFF)
        buffer[index[active]] = data[active].astype(np.uint8)  # lanes storing to one byte: the last wins

    # instructions (op_<first part of the opcode>)
    def op_ld(self, ins, mask):
        destination, source = ins.args
        if ins.parts[1] == "param":
            self.set(destination, self.params[source.strip("[] ")], mask, ins.bits)
            return
        size = ins.bits // 8
        address = self.address(source)
        for i, name in enumerate(vector(destination)):
            self.set(name, self.load(ins.parts[1], address + i * size, size, mask), mask, max(ins.bits, 16))

    def op_st(self, ins, mask):
        destination, source = ins.args
        size, address = ins.bits // 8, self.address(destination)
        for i, name in enumerate(vector(source)):
            self.store(ins.parts[1], address + i * size, size, self.value(name), mask)

    def op_mov(self, ins, mask):
        destination, source = ins.args
        if ins.type == "pred":
            self.set_predicate(destination, self.predicate(source), mask)
        elif destination.startswith("{"):  # a register split into pieces, low first
            names = vector(destination)
            bits = ins.bits // len(names)
            for i, name in enumerate(names):
                self.set(name, self.value(source) >> U64(bits * i), mask, bits)
        elif source.startswith("{"):
            names = vector(source)
            bits = ins.bits // len(names)
            joined = sum(mask_bits(self.value(name), bits) << U64(bits * i) for i, name in enumerate(names))
            self.set(destination, joined, mask, ins.bits)
        else:
            self.set(destination, self.value(source), mask, ins.bits)

    def op_cvt(self, ins, mask):
        if ins.opcode in ("cvt.rpi.f32.f32", "cvt.rpi.ftz.f32.f32"):  # rounded up to an integer
            self.set(ins.args[0], bits_of_f32(np.ceil(flushed(f32_of(self.value(ins.args[1]))))), mask, 32)
            return
        kinds = [part for part in ins.parts[1:] if part != "rn"]
        if len(kinds) != 2:
            raise unsupported(ins)
        to, of = kinds
        destination, *sources = ins.args
        if to == "f16x2" and of == "e4m3x2":  # the low byte to the low half (exact: every e4m3 is a float16)
            pair = mask_bits(self.value(sources[0]), 16)
            halves = [half_of_f32(e4m3_to_f32((pair >> U64(shift)) & U64(0xFF)), "f16") for shift in (0, 8)]
            self.set(destination, halves[0] | (halves[1] << U64(16)), mask, 32)
        elif to in ("bf16x2", "f16x2") and of == "f32":  # the first source in the high half
            kind = to[:-2]
            high, low = (half_of_f32(f32_of(self.value(s)), kind) for s in sources)
            self.set(destination, (high << U64(16)) | low, mask, 32)
        elif of == "f32" and to in ("bf16", "f16"):
            self.set(destination, half_of_f32(f32_of(self.value(sources[0])), to), mask, 16)
        elif to == "f32" and of in ("bf16", "f16"):
            self.set(destination, bits_of_f32(f32_of_half(self.value(sources[0]), of)), mask, 32)
        elif to == "f32" and of[0] in "us" and ins.parts[1] == "rn":
            source, bits = self.value(sources[0]), TYPE_BITS[of]
            integer = signed(source, bits) if of[0] == "s" else mask_bits(source, bits)
            self.set(destination, bits_of_f32(integer.astype(np.float32)), mask, 32)
        elif to[0] in "us" and of[0] in "us" and ins.parts[1] != "rn":
            source = self.value(sources[0])
            extended = signed(source, TYPE_BITS[of]).astype(U64) if of[0] == "s" else mask_bits(source, TYPE_BITS[of])
            self.set(destination, extended, mask, TYPE_BITS[to])
        else:
            raise unsupported(ins)

    def integers(self, ins) -> list[np.ndarray]:
        """The sources as uint64, sign-extended where the type is signed (two's complement); .wide's addend is 64-bit."""
        if ins.type[0] == "s":
            extend = lambda v: signed(v, ins.bits).astype(U64)
        else:
            extend = lambda v: mask_bits(v, ins.bits)
        wide = ins.parts[1] == "wide"
        return [self.value(a) if wide and i == 2 else extend(self.value(a)) for i, a in enumerate(ins.args[1:])]

    def arithmetic(self, ins, mask):
        """add, sub, mul, mad, fma on integers (uint64, wrapping), float32 or 16-bit float pairs."""
        function, domains = ARITHMETIC[ins.parts[0]]
        modifiers = ins.parts[1:-1]
        if ins.type in ("bf16x2", "f16x2") and "pair" in domains and modifiers in ([], ["rn"]):
            kind, result = ins.type[:-2], np.zeros(len(self.tid), U64)
            for shift in (U64(0), U64(16)):
                exact = function(*(f32_of_half(self.value(a) >> shift, kind).astype(np.float64) for a in ins.args[1:]))
                if (exact.astype(np.float32) != exact).any():
                    raise ArithmeticError(f"{ins.opcode}: a result not exact in float32 (its rounding is not emulated)")
                result |= half_of_f32(exact.astype(np.float32), kind) << shift
            self.set(ins.args[0], result, mask, 32)
        elif ins.type in ("bf16", "f16") and "pair" in domains and modifiers in ([], ["rn"]):  # one 16-bit float
            exact = function(*(f32_of_half(self.value(a), ins.type).astype(np.float64) for a in ins.args[1:]))
            if (exact.astype(np.float32) != exact).any():
                raise ArithmeticError(f"{ins.opcode}: a result not exact in float32 (its rounding is not emulated)")
            self.set(ins.args[0], half_of_f32(exact.astype(np.float32), ins.type), mask, 16)
        elif ins.type == "f32" and "f32" in domains and modifiers in ([], ["rn"], ["ftz"], ["rn", "ftz"]):
            flush = flushed if "ftz" in modifiers else lambda x: x
            result = function(*(flush(f32_of(self.value(a))).astype(np.float64) for a in ins.args[1:]))
            self.set(ins.args[0], bits_of_f32(flush(result.astype(np.float32))), mask, 32)
        elif ins.type in INTEGER_TYPES and "integer" in domains and modifiers in ([], ["lo"], ["wide"]):
            self.set(ins.args[0], function(*self.integers(ins)), mask, 64 if modifiers == ["wide"] else ins.bits)
        else:
            raise unsupported(ins)

    op_add = op_sub = op_mul = op_mad = op_fma = arithmetic

    def integer_operands(self, ins) -> list[np.ndarray]:
        """The sources as int64 (signed types sign-extended; unsigned ones below 2^63)."""
        if ins.type not in INTEGER_TYPES:
            raise unsupported(ins)
        if ins.type[0] == "s":
            return [signed(self.value(a), ins.bits) for a in ins.args[1:]]
        return [mask_bits(self.value(a), ins.bits).astype(np.int64) for a in ins.args[1:]]

    def op_div(self, ins, mask):  # div and rem of integers, as C's (the quotient truncated toward zero)
        if ins.opcode in ("div.full.f32", "div.rn.f32"):  # div.full: within 2 ulp on the GPU; rounded once here
            a, b = (f32_of(self.value(x)).astype(np.float64) for x in ins.args[1:3])
            with np.errstate(divide="ignore", invalid="ignore"):
                self.set(ins.args[0], bits_of_f32((a / b).astype(np.float32)), mask, 32)
            return
        a, b = self.integer_operands(ins)
        b = np.where(b == 0, 1, b)  # inactive lanes may divide by 0; an active one is undefined in PTX anyway
        quotient = np.abs(a) // np.abs(b) * np.sign(a) * np.sign(b)
        result = quotient if ins.parts[0] == "div" else a - quotient * b
        self.set(ins.args[0], result.astype(U64), mask, ins.bits)

    op_rem = op_div

    def op_min(self, ins, mask):  # min and max, of integers or float32 (a NaN operand gives the other, as PTX's)
        if ins.opcode in ("min.f32", "max.f32"):
            a, b = (f32_of(self.value(x)) for x in ins.args[1:3])
            result = np.fmin(a, b) if ins.parts[0] == "min" else np.fmax(a, b)
            self.set(ins.args[0], bits_of_f32(result), mask, 32)
            return
        a, b = self.integer_operands(ins)
        result = np.minimum(a, b) if ins.parts[0] == "min" else np.maximum(a, b)
        self.set(ins.args[0], result.astype(U64), mask, ins.bits)

    op_max = op_min

    def op_shl(self, ins, mask):
        if ins.type not in INTEGER_TYPES:
            raise unsupported(ins)
        a, n = self.value(ins.args[1]), self.value(ins.args[2])
        self.set(ins.args[0], np.where(n >= ins.bits, U64(0), a << np.minimum(n, U64(63))), mask, ins.bits)

    def op_shr(self, ins, mask):
        if ins.type not in INTEGER_TYPES:
            raise unsupported(ins)
        n = np.minimum(self.value(ins.args[2]), U64(63))
        if ins.type[0] == "s":  # arithmetic: the sign fills
            shifted = (signed(self.value(ins.args[1]), ins.bits) >> n.astype(np.int64)).astype(U64)
        else:
            shifted = np.where(n >= ins.bits, U64(0), mask_bits(self.value(ins.args[1]), ins.bits) >> n)
        self.set(ins.args[0], shifted, mask, ins.bits)

    def op_and(self, ins, mask):  # and or, xor, not: on predicates or bits
        function = LOGIC[ins.parts[0]]
        if ins.type == "pred":
            self.set_predicate(ins.args[0], function(*(self.predicate(a) for a in ins.args[1:])), mask)
        elif ins.type in INTEGER_TYPES:
            self.set(ins.args[0], function(*(self.value(a) for a in ins.args[1:])), mask, ins.bits)
        else:
            raise unsupported(ins)

    op_or = op_xor = op_not = op_and

    def op_lop3(self, ins, mask):
        a, b, c = (self.value(x) for x in ins.args[1:4])
        table, result = constant(ins.args[4]), np.zeros(len(self.tid), U64)
        for i in range(8):  # the table's bit i: the result where (a, b, c) have the bits of i
            if table >> i & 1:
                result |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
        self.set(ins.args[0], result, mask, 32)

    def op_prmt(self, ins, mask):
        if ins.opcode != "prmt.b32":  # the default mode only
            raise unsupported(ins)
        pool = mask_bits(self.value(ins.args[1]), 32) | (mask_bits(self.value(ins.args[2]), 32) << U64(32))
        selector, result = self.value(ins.args[3]), np.zeros(len(self.tid), U64)
        for i in range(4):
            byte = (selector >> U64(4 * i)) & U64(7)
            result |= ((pool >> (U64(8) * byte)) & U64(0xFF)) << U64(8 * i)
        self.set(ins.args[0], result, mask, 32)

    def op_bfe(self, ins, mask):
        """The field of `length` bits at `position`; .s32 sign-extends it from its top bit (PTX: a field of length 0
        is 0; the sign comes from bit min(position + length - 1, 31))."""
        if ins.type not in ("u32", "s32"):
            raise unsupported(ins)
        a, position, length = (mask_bits(self.value(x), 8 if i else 32) for i, x in enumerate(ins.args[1:]))
        field = (a >> np.minimum(position, U64(63))) & ((U64(1) << np.minimum(length, U64(32))) - U64(1))
        if ins.type == "s32":
            top = np.minimum(position + length - U64(1), U64(31))
            sign = ((a >> top) & U64(1)).astype(bool) & (length > 0)
            field = np.where(sign, field | ~((U64(1) << np.minimum(length, U64(32))) - U64(1)), field)
        self.set(ins.args[0], field, mask, 32)

    def op_setp(self, ins, mask):
        compare = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
                   "ge": np.greater_equal}.get(ins.parts[1])  # fmt: skip
        if compare is None or len(ins.parts) != 3 or "|" in ins.args[0]:
            raise unsupported(ins)
        if ins.type == "f32":
            a, b = (f32_of(self.value(x)) for x in ins.args[1:3])
            result = compare(a, b) & ~np.isnan(a) & ~np.isnan(b)  # PTX's ne is ordered too
        elif ins.type[0] == "s":
            result = compare(*(signed(self.value(x), ins.bits) for x in ins.args[1:3]))
        else:
            result = compare(*(mask_bits(self.value(x), ins.bits) for x in ins.args[1:3]))
        self.set_predicate(ins.args[0], result, mask)

    def op_abs(self, ins, mask):  # abs and neg of float32: the sign bit
        if ins.opcode not in ("abs.f32", "neg.f32"):
            raise unsupported(ins)
        bits = mask_bits(self.value(ins.args[1]), 32)
        self.set(ins.args[0], bits & U64(0x7FFFFFFF) if ins.parts[0] == "abs" else bits ^ U64(0x80000000), mask, 32)

    op_neg = op_abs

    def op_ex2(self, ins, mask):
        """ex2.approx(.ftz).f32: 2**x, rounded once to float32 (the GPU's approximation is within 2 ulp), subnormal
        inputs and results flushed with .ftz."""
        if ins.opcode not in ("ex2.approx.f32", "ex2.approx.ftz.f32"):
            raise unsupported(ins)
        flush = flushed if "ftz" in ins.parts else lambda x: x
        with np.errstate(over="ignore"):
            result = np.exp2(flush(f32_of(self.value(ins.args[1]))).astype(np.float64)).astype(np.float32)
        self.set(ins.args[0], bits_of_f32(flush(result)), mask, 32)

    def op_selp(self, ins, mask):
        destination, a, b, p = ins.args
        self.set(destination, np.where(self.predicate(p), self.value(a), self.value(b)), mask, ins.bits)

    def op_bar(self, ins, mask):  # and the other orderings: in lockstep every thread is there, every store visible
        pass

    op_griddepcontrol = op_fence = op_membar = op_bar

    def op_cp(self, ins, mask):
        """cp.async.bulk.prefetch.L2: a hint, so no effect here; but its source must lie in the memory, 16-byte aligned,
        and its size be a multiple of 16 (PTX's rules for it). cp.async.c[ag].shared.global: the copy at once (in
        lockstep nothing reads the shared bytes before its wait), the bytes past src-size zeroed; its groups and waits:
        nothing to do."""
        if ins.parts[1] == "async" and ins.parts[2] in ("commit_group", "wait_group", "wait_all"):
            return
        if ins.parts[1] == "async" and ins.parts[2] in ("ca", "cg") and ins.parts[3:5] == ["shared", "global"]:
            destination, source, size, *src_size = ins.args
            size = constant(size)
            read = self.value(src_size[0]).astype(np.int64) if src_size else np.full(len(self.tid), size)
            for first in range(0, size, 8):  # in 8-byte pieces: load() and store() hold at most 64 bits
                piece = min(8, size - first)
                count = np.clip(read - first, 0, piece).astype(U64)
                reading = (count > 0) & (True if mask is None else mask)  # a zero src-size reads nothing (masked)
                value = np.where(reading, self.load("global", self.address(source) + first, piece, reading), U64(0))
                kept = np.where(count >= 8, ~U64(0), (U64(1) << (U64(8) * np.minimum(count, U64(7)))) - U64(1))
                self.store("shared", self.address(destination) + first, piece, value & kept, mask)
            return
        if ins.parts[1:4] != ["async", "bulk", "prefetch"]:
            raise unsupported(ins)
        address, size = self.address(ins.args[0]), self.value(ins.args[1]).astype(np.int64)
        active = np.ones(len(address), bool) if mask is None else mask
        if (active & ((address % 16 != 0) | (size % 16 != 0) | (size <= 0))).any():
            raise ValueError(f"{ins.opcode}: a source not 16-byte aligned or a size not a positive multiple of 16")
        for lane_size in np.unique(size[active]):
            lanes = active & (size == lane_size)
            self.locate("global", address, int(lane_size), lanes)

    def op_shfl(self, ins, mask):
        """shfl.sync.bfly (lane ^ b) and shfl.sync.idx (lane b within its segment, c's clamp and segment mask); a
        source lane past the clamp reads the lane's own value, as PTX says."""
        if ins.parts[2] not in ("bfly", "idx") or mask is not None:
            raise unsupported(ins)
        destination, source, b, c = ins.args[:4]
        lane = self.tid % U64(32)
        b, c = mask_bits(self.value(b), 5), self.value(c).astype(U64)
        clamp, segment = c & U64(31), (c >> U64(8)) & U64(31)
        first = lane & segment
        last = first | (clamp & ~segment & U64(31))
        chosen = lane ^ b if ins.parts[2] == "bfly" else first | (b & ~segment & U64(31))
        chosen = np.where(chosen <= last, chosen, lane)
        source_lane = np.arange(len(self.tid), dtype=U64) - lane + chosen
        self.set(destination, self.value(source)[source_lane.astype(np.int64)], mask, 32)

    def warps(self, operand: str) -> np.ndarray:
        return self.value(operand).reshape(-1, 32)

    def matrix_fragments(self, ins, mask, rows: str):
        """ldmatrix's and stmatrix's values: for matrix j (8 x 8 16-bit values in register j, its rows at the addresses
        of lanes 8 j to 8 j + 7) and each half of a lane's register, (j, half, the value's shared address): the lane
        holds (lane // 4, 2 (lane % 4) + half), or that transposed with .trans."""
        count = int(ins.parts[4][1:])
        if ins.opcode != f"{ins.parts[0]}.sync.aligned.m8n8.x{count}{'.trans' * ('trans' in ins.parts)}.shared.b16":
            raise unsupported(ins)
        if mask is not None and not mask.all():
            raise NotImplementedError(f"a guarded {ins.opcode}")
        addresses = self.address(rows).reshape(-1, 32)
        for j in range(count):
            for half in range(2):
                row, column = _G, 2 * _T + half
                if "trans" in ins.parts:
                    row, column = column, row
                yield j, half, (addresses[:, 8 * j + row] + 2 * column).reshape(-1)

    def op_stmatrix(self, ins, mask):
        registers = vector(ins.args[1])
        for j, half, at in self.matrix_fragments(ins, mask, ins.args[0]):
            self.store("shared", at, 2, self.value(registers[j]) >> U64(16 * half), None)

    def op_ldmatrix(self, ins, mask):
        registers = vector(ins.args[0])
        values = [np.zeros(len(self.tid), U64) for _ in registers]
        for j, half, at in self.matrix_fragments(ins, mask, ins.args[1]):
            values[j] |= self.load("shared", at, 2, None) << U64(16 * half)
        for register, value in zip(registers, values):
            self.set(register, value, None, 32)

    def op_mma(self, ins, mask):
        kind = ins.parts[7]
        if ins.opcode != f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32" or kind not in ("bf16", "f16"):
            raise unsupported(ins)
        if mask is not None and not mask.all():
            raise NotImplementedError(f"a guarded {ins.opcode}")
        d, a, b, c = (vector(x) for x in ins.args)
        warps = len(self.tid) // 32
        a_tile, b_tile, c_tile = np.zeros((warps, 16, 16)), np.zeros((warps, 16, 8)), np.zeros((warps, 16, 8))
        for register, (row, column) in zip(a, A_FRAGMENT):
            for half in range(2):
                a_tile[:, row, column + half] = f32_of_half(self.warps(register) >> U64(16 * half), kind)
        for register, (k, n) in zip(b, B_FRAGMENT):
            for half in range(2):
                b_tile[:, k + half, n] = f32_of_half(self.warps(register) >> U64(16 * half), kind)
        for register, (row, column) in zip(c, C_FRAGMENT):
            c_tile[:, row, column] = f32_of(self.warps(register))
        product = a_tile @ b_tile + c_tile
        for register, (row, column) in zip(d, C_FRAGMENT):
            self.set(register, bits_of_f32(product[:, row, column].astype(np.float32)).reshape(-1), None, 32)


ARITHMETIC = {  # the function (over uint64 or float64 values) and the types it takes
    "add": (lambda a, b: a + b, ("integer", "f32", "pair")),
    "sub": (lambda a, b: a - b, ("integer", "f32", "pair")),
    "mul": (lambda a, b: a * b, ("integer", "f32", "pair")),  # .lo, .wide: the wrapping uint64 product's low bits
    "mad": (lambda a, b, c: a * b + c, ("integer",)),
    "fma": (lambda a, b, c: a * b + c, ("f32", "pair")),
}
LOGIC = {"and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b, "not": lambda a: ~a}


def flushed(value) -> np.ndarray:
    """float32 values with subnormals flushed to a zero of their sign (.ftz)."""
    value = np.asarray(value, np.float32)
    return np.where(np.abs(value) < np.finfo(np.float32).tiny, np.copysign(np.float32(0), value), value)


def vector(operand: str) -> list[str]:
    return [x.strip() for x in operand.strip("{} ").split(",")] if operand.startswith("{") else [operand]


@functools.cache
def constant(operand: str) -> int:
    """An immediate: decimal, 0x hexadecimal, or 0f float32 bits."""
    if re.fullmatch(r"0[fF][0-9a-fA-F]{8}", operand):
        return int("0x" + operand[2:], 0)
    if re.fullmatch(r"-?(0[xX][0-9a-fA-F]+|\d+)", operand):
        return int(operand, 0) & (1 << 64) - 1
    raise NotImplementedError(f"the PTX emulator does not know the operand {operand!r}")


@functools.cache
def _compile(fn, types: tuple, constexprs: tuple, multiples_of_16: tuple, num_warps: int,
             num_stages: int = 3) -> tuple[str, int, int]:  # fmt: skip
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from kernel_sass import compile_for_hopper

    kernel = compile_for_hopper(fn, dict(types), dict(constexprs), multiples_of_16, num_warps, num_stages)
    return kernel.asm["ptx"], kernel.metadata.shared, getattr(kernel.metadata, "global_scratch_size", 0)


def run_kernel(fn, grid, num_warps: int, args: dict, constexprs: dict, edit_ptx=None, num_stages: int = 3) -> None:
    """fn[grid](**args, **constexprs, num_warps=num_warps, num_stages=num_stages) emulated: `args` are the runtime
    arguments in order (CPU tensors, which get the kernel's writes, ints and floats); an int 1 becomes a constexpr and a
    multiple of 16 is specialized, as at a launch. `grid`: an int runs its programs together (their branches must
    agree); a tuple (x, y, z) runs each program alone, so each may take its own branches (a loop of its own length).
    `edit_ptx`: applied to the compiled PTX before it runs (to break a kernel on purpose)."""
    # data_ptr -> (the storage's bytes, their offset in the memory): a storage passed twice is one
    storages, size = {}, 0
    for value in args.values():
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in storages:
            data = torch.empty(0, dtype=torch.uint8).set_(value.untyped_storage()).numpy()
            storages[value.untyped_storage().data_ptr()] = (data, size)
            size += (data.size + 511) // 256 * 256  # 256-aligned, a gap after each: an overrun reads no other tensor
    memory = np.zeros(size, np.uint8)
    constexprs, types, multiples, params = dict(constexprs), {}, [], []
    for name, value in args.items():
        if isinstance(value, torch.Tensor):
            data, offset = storages[value.untyped_storage().data_ptr()]
            memory[offset : offset + data.size] = data
            params.append(GLOBAL_BASE + offset + value.storage_offset() * value.element_size())
            assert params[-1] % 16 == 0, f"{name}: compile_for_hopper takes every pointer as a multiple of 16"
            types[name] = TRITON_TYPES[value.dtype]
        elif isinstance(value, float):
            types[name] = "fp32"
            params.append(int(bits_of_f32(np.float32(value))))
        elif value == 1:
            constexprs[name] = 1
        else:
            multiples += [name] if value % 16 == 0 else []
            params.append(value & 0xFFFFFFFF)
    ptx, shared, scratch = _compile(fn, tuple(sorted(types.items())), tuple(sorted(constexprs.items())),
                                    tuple(multiples), num_warps, num_stages)  # fmt: skip
    if scratch:
        raise NotImplementedError("the kernel needs global scratch memory")
    ptx = edit_ptx(ptx) if edit_ptx else ptx
    if isinstance(grid, int):
        Grid(ptx, params, memory, grid, 32 * num_warps, shared).run()
    else:
        for program_id in np.ndindex(*grid[::-1]):  # z, y, x
            Grid(ptx, params, memory, 1, 32 * num_warps, shared, program_id[::-1]).run()
    for data, offset in storages.values():
        data[:] = memory[offset : offset + data.size]
