"""The "prmt" NF4 decode is PTX inline assembly, which only a GPU runs. These tests execute the generated PTX
text with a small emulator of the instructions it uses (and, or, shr, prmt), on the code table the kernels read,
so that the tables, the selector arithmetic and the operand numbering are checked on the CPU as well. The GPU
script (bench/exp_nf4_decode.py, bench/gpu_qlora.py) checks the compiled kernels against the select tree."""
import importlib
import random
import re

import pytest
import torch

from lora_fast.kernels import nf4_dequant as nd


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32, default mode: byte i of the result is byte (c >> 4i) & 7 of b:a, sign-replicated if bit 3."""
    pool = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (pool >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _f32(bits: int) -> torch.Tensor:
    return torch.tensor([bits - (1 << 32) if bits >= 1 << 31 else bits], dtype=torch.int32).view(torch.float32)


def _mul_f32(a: int, b: int) -> int:
    """mul.rn.f32 on bit patterns (one fp32 multiply, round to nearest even)."""
    return (_f32(a) * _f32(b)).view(torch.int32).item() & 0xFFFFFFFF


def _cvt_x2(dtype):
    """cvt.rn.{bf16,f16}x2.f32 d, a, b: a rounded to `dtype` in the high half of d, b in the low half."""
    def cvt(a: int, b: int) -> int:
        hi, lo = (_f32(v).to(dtype).view(torch.int16).item() & 0xFFFF for v in (a, b))
        return (hi << 16) | lo
    return cvt


_OPS = {"and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b, "shr.b32": lambda a, b: a >> b,
        "mul.rn.f32": _mul_f32, "cvt.rn.bf16x2.f32": _cvt_x2(torch.bfloat16),
        "cvt.rn.f16x2.f32": _cvt_x2(torch.float16)}


def run_ptx(asm: str, operands: dict) -> dict:
    """Run the decode's PTX on 32-bit `operands` ({"$4": value, ...}); returns every register, $-outputs included."""
    regs = dict(operands)

    def value(tok):
        tok = tok.strip()
        if tok.startswith("0f"):  # a PTX fp32 immediate: its bit pattern in hex
            return int(tok[2:], 16)
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    for line in asm.splitlines():
        line = line.strip()
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        m = re.fullmatch(r"(\S+)\s+([^,]+),(.*);", line)
        assert m, f"unparsed PTX line {line!r}"
        op, dst, srcs = m.group(1), m.group(2).strip(), [value(t) for t in m.group(3).split(",")]
        if op == "prmt.b32":
            regs[dst] = _prmt(*srcs)
        else:
            assert op in _OPS, f"the emulator does not know {op}"
            regs[dst] = _OPS[op](*srcs) & 0xFFFFFFFF
    return regs


def _table_words(dtype) -> list:
    table = nd.nf4_code_table("cpu")
    off = nd.PRMT_WORD_OFFSET[dtype]
    n = 16 if dtype == torch.float32 else 8
    return [w & 0xFFFFFFFF for w in table[off:off + n].view(torch.int32).tolist()]


def test_code_table_holds_the_code_book_and_its_words():
    table = nd.nf4_code_table("cpu")
    assert table.numel() == nd.CODE_TABLE_SIZE
    assert table[:16].tolist() == [float(v) for v in torch.tensor(nd.NF4_CODE, dtype=torch.float32).tolist()]
    for dtype in nd.PRMT_WORD_OFFSET:
        assert _table_words(dtype) == nd._prmt_words(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_prmt_ptx_decodes_every_code(dtype):
    rng = random.Random(7)
    bits = nd._code_bits(dtype)
    words = _table_words(dtype)
    wide = dtype == torch.float32
    asm = (nd._PAIRS32 if wide else nd._PAIRS16).value
    constraints = (nd._PAIRS32_CONSTRAINTS if wide else nd._PAIRS16_CONSTRAINTS).value.split(",")
    n_out = 8 if wide else 4
    assert constraints[:n_out] == ["=r"] * n_out and len(constraints) == n_out + 1 + 4 * len(words)
    # every byte value once, then random words: 4 packed bytes per call (byte j = element j)
    inputs = [list(range(b, b + 4)) for b in range(0, 256, 4)] + [[rng.randrange(256) for _ in range(4)]
                                                                 for _ in range(200)]
    for packed in inputs:
        ops = {f"${n_out}": sum(b << (8 * j) for j, b in enumerate(packed))}
        for i, w in enumerate(words):  # each scalar word fills 4 operands (one per packed element)
            for e in range(4):
                ops[f"${n_out + 1 + 4 * i + e}"] = w
        regs = run_ptx(asm, ops)
        if wide:  # one value per register: $0-$3 even (high nibbles), $4-$7 odd
            even = [regs[f"${j}"] for j in range(4)]
            odd = [regs[f"${4 + j}"] for j in range(4)]
        else:  # two 16-bit values per register, element 2i in the low half
            even = [(regs[f"${j // 2}"] >> (16 * (j % 2))) & 0xFFFF for j in range(4)]
            odd = [(regs[f"${2 + j // 2}"] >> (16 * (j % 2))) & 0xFFFF for j in range(4)]
        assert even == [bits[b >> 4] for b in packed], packed
        assert odd == [bits[b & 15] for b in packed], packed


def _half_to_float(bits: int, dtype) -> float:
    """The 16-bit value with bit pattern `bits` (0 .. 0xFFFF) of `dtype` (bf16 or fp16), as a Python float."""
    return torch.tensor([bits - (1 << 16) if bits >= 0x8000 else bits], dtype=torch.int16).view(dtype).item()


def _mma_m16n8k16(lanes: list, a_regs: list, b_regs: list, c_regs: list, dtype) -> list:
    """mma.sync.aligned.m16n8k16.row.col.f32 over 32 lanes' registers, by the PTX ISA fragment layout for 16-bit
    A / B and fp32 C / D (lane l = 4g + c): a0 = A[g, 2c:2c+2], a1 = A[g+8, 2c:2c+2], a2 = A[g, 2c+8:2c+10],
    a3 = A[g+8, 2c+8:2c+10]; b0 = B[2c:2c+2, g], b1 = B[2c+8:2c+10, g]; d0, d1 = D[g, 2c:2c+2], d2, d3 =
    D[g+8, 2c:2c+2]. Returns each lane's [d0, d1, d2, d3]."""
    A = [[0.0] * 16 for _ in range(16)]
    Bm = [[0.0] * 8 for _ in range(16)]
    C = [[0.0] * 8 for _ in range(16)]

    def halves(v):
        return [_half_to_float(v & 0xFFFF, dtype), _half_to_float((v >> 16) & 0xFFFF, dtype)]

    for lane, regs in enumerate(lanes):
        g, c = lane // 4, lane % 4
        a = [halves(regs[r]) for r in a_regs]
        for (row, col), pair in zip(((g, 2 * c), (g + 8, 2 * c), (g, 2 * c + 8), (g + 8, 2 * c + 8)), a):
            A[row][col], A[row][col + 1] = pair
        b = [halves(regs[r]) for r in b_regs]
        for k0, pair in zip((2 * c, 2 * c + 8), b):
            Bm[k0][g], Bm[k0 + 1][g] = pair
        d = [regs[r] for r in c_regs]
        C[g][2 * c], C[g][2 * c + 1], C[g + 8][2 * c], C[g + 8][2 * c + 1] = d
    D = [[C[i][j] + sum(A[i][k] * Bm[k][j] for k in range(16)) for j in range(8)] for i in range(16)]
    return [[D[l // 4][2 * (l % 4)], D[l // 4][2 * (l % 4) + 1], D[l // 4 + 8][2 * (l % 4)],
             D[l // 4 + 8][2 * (l % 4) + 1]] for l in range(32)]


def run_warp_ptx(asm: str, lane_operands: list, dtype) -> list:
    """Run `asm` on 32 lanes in lock step (integer ops and prmt as run_ptx does; mov.f32 (of a register or zero) /
    fma.rn.f32 on Python floats; mma.sync by _mma_m16n8k16). Returns each lane's registers."""
    lanes = [dict(ops) for ops in lane_operands]
    for line in asm.splitlines():
        line = line.strip()
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        if line.startswith("mma.sync"):
            groups = [g.replace(" ", "").split(",") for g in re.findall(r"\{([^}]*)\}", line)]
            d_regs, a_regs, b_regs, c_regs = groups
            out = _mma_m16n8k16(lanes, a_regs, b_regs, c_regs, dtype)
            for regs, vals in zip(lanes, out):
                regs.update(zip(d_regs, vals))
            continue
        m = re.fullmatch(r"(\S+)\s+([^,]+),(.*);", line)
        assert m, f"unparsed PTX line {line!r}"
        op, dst, srcs = m.group(1), m.group(2).strip(), [t.strip() for t in m.group(3).split(",")]
        for regs in lanes:
            if op == "mov.f32":
                regs[dst] = 0.0 if srcs == ["0f00000000"] else regs[srcs[0]]
            elif op == "fma.rn.f32":
                a, b, c = (regs[t] for t in srcs)
                regs[dst] = a * b + c
            else:
                vals = [int(t, 0) if t[0].isdigit() else regs[t] for t in srcs]
                regs[dst] = _prmt(*vals) if op == "prmt.b32" else _OPS[op](*vals) & 0xFFFFFFFF
    return lanes


def _random_block_rows(rng, rows: int, weights: int, dtype):
    """Random codes for `rows` x `weights` weights and a random x: (x, x's 16-bit patterns, the decode's table
    words, each row's decoded values in dtype as floats, byte(row, h): byte h of a row, whose high nibble is
    weight 2h and low nibble weight 2h + 1)."""
    codes = [[rng.randrange(16) for _ in range(weights)] for _ in range(rows)]
    x = torch.randn(weights).to(dtype)
    values = [torch.tensor(nd.NF4_CODE, dtype=torch.float32).to(dtype).float()[c].tolist() for c in codes]

    def byte(row, h):
        return (codes[row][2 * h] << 4) | codes[row][2 * h + 1]

    return x, x.view(torch.int16).tolist(), _table_words(dtype), values, byte


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lanes_block_ptx_sums_each_lanes_two_rows(dtype):
    """The one-row NF4 GEMV's "lanes" engine (kernels/nf4_gemv.py): one 64-weight block of 16 rows, each lane
    feeding the decoded bytes of its two rows to mma.sync with x's pairs at the same columns, gives every lane
    sum_k deq(W)[row, k] * x[k] (times the row's absmax, plus the running sum) for both of its rows."""
    gemv = importlib.import_module("lora_fast.kernels.nf4_gemv")
    asm = gemv.lanes_block_ptx("bf16" if dtype == torch.bfloat16 else "f16")
    constraints = gemv._LANES_CONSTRAINTS.value.split(",")
    assert len(constraints) == 26 and constraints[:2] == ["=f", "=f"]
    rng = random.Random(3)
    x, xbits, words, values, byte = _random_block_rows(rng, 16, 64, dtype)  # 16 rows x 64 weights
    absmax = [rng.uniform(0.5, 2.0) for _ in range(16)]
    start = [rng.uniform(-1, 1) for _ in range(16)]

    operands = []
    for lane in range(32):
        g, c = lane // 4, lane % 4
        ops = {}
        for r, row in enumerate((g, g + 8)):  # $2, $3: row a's 8 bytes, $4, $5: row b's
            for w in range(2):
                ops[f"${2 + 2 * r + w}"] = sum(byte(row, 8 * c + 4 * w + j) << (8 * j) for j in range(4))
        for j in range(8):  # $6 - $13: x's pairs at those byte columns
            h = 8 * c + j
            ops[f"${6 + j}"] = (xbits[2 * h] & 0xFFFF) | ((xbits[2 * h + 1] & 0xFFFF) << 16)
        ops["$14"], ops["$15"], ops["$16"], ops["$17"] = absmax[g], absmax[g + 8], start[g], start[g + 8]
        ops.update({f"${18 + i}": w for i, w in enumerate(words)})
        operands.append(ops)
    lanes = run_warp_ptx(asm, operands, dtype)
    xf = x.float().tolist()
    for lane, regs in enumerate(lanes):
        for out, row in (("$0", lane // 4), ("$1", lane // 4 + 8)):
            want = start[row] + absmax[row] * sum(v * xk for v, xk in zip(values[row], xf))
            assert regs[out] == pytest.approx(want, rel=1e-9, abs=1e-9), (lane, row)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wide_step_ptx_sums_each_rows_two_blocks(dtype):
    """The one-row NF4 GEMV's "wide" engine (kernels/nf4_gemv.py): one 64-byte span (two quantization blocks) of
    32 rows, lane (g, c) holding bytes 16c .. 16c + 15 of rows g, g + 8, g + 16, g + 24, and x's pairs at those
    columns only where g == c // 2 (zeros elsewhere, as the kernel loads them). B's column n then picks block n,
    so lane c = 0 ends with start + absmax0 * (block 0's sum) + absmax1 * (block 1's sum) for each of its rows,
    and every other lane (whose D columns are zero) with its start unchanged."""
    gemv = importlib.import_module("lora_fast.kernels.nf4_gemv")
    tiles = 2
    asm = gemv.wide_step_ptx("bf16" if dtype == torch.bfloat16 else "f16", tiles)
    constraints = gemv.wide_constraints(tiles).split(",")
    assert len(constraints) == 56 and constraints[:4] == ["=f"] * 4
    rng = random.Random(5)
    x, xbits, words, values, byte = _random_block_rows(rng, 32, 128, dtype)  # 32 rows x 128 weights (64 bytes)
    absmax = [[rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0)] for _ in range(32)]
    start = [rng.uniform(-1, 1) for _ in range(32)]

    operands = []
    for lane in range(32):
        g, c = lane // 4, lane % 4
        rows = (g, g + 8, g + 16, g + 24)
        ops = {}
        for r, row in enumerate(rows):  # $4 + 4r ..: row r's 16 bytes as 4 words
            for w in range(4):
                ops[f"${4 + 4 * r + w}"] = sum(byte(row, 16 * c + 4 * w + j) << (8 * j) for j in range(4))
        for m in range(16):  # $20 - $35: x's pairs at the lane's 32 columns, or zeros
            h = 16 * c + m
            pair = (xbits[2 * h] & 0xFFFF) | ((xbits[2 * h + 1] & 0xFFFF) << 16)
            ops[f"${20 + m}"] = pair if g == c // 2 else 0
        for r, row in enumerate(rows):
            ops[f"${36 + 2 * r}"], ops[f"${37 + 2 * r}"] = absmax[row]
            ops[f"${44 + r}"] = start[row]
        ops.update({f"${48 + i}": w for i, w in enumerate(words)})
        operands.append(ops)
    lanes = run_warp_ptx(asm, operands, dtype)
    xf = x.float().tolist()
    for lane, regs in enumerate(lanes):
        g, c = lane // 4, lane % 4
        for out, row in zip(("$0", "$1", "$2", "$3"), (g, g + 8, g + 16, g + 24)):
            want = start[row]
            if c == 0:
                want += sum(absmax[row][blk] * sum(values[row][k] * xf[k] for k in range(64 * blk, 64 * blk + 64))
                            for blk in (0, 1))
            assert regs[out] == pytest.approx(want, rel=1e-9, abs=1e-9), (lane, row)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wide_xa_ptx_sums_each_lanes_two_ranks(dtype):
    """The "wide" engine's fused xa (xa_mode "fused", `wide_xa_ptx`): lane (g, c) holding ranks g and g + 8 of a
    16-rank tile of A at its 32 columns of a 128-column span (16 words each, column pairs as loaded) and x's
    pairs at the same columns ends with start + sum over the span of A[rank, k] * x[k] for both ranks, in every
    lane. A lane pairing x with other columns (x shifted by one pair) fails it."""
    gemv = importlib.import_module("lora_fast.kernels.nf4_gemv")
    asm = gemv.wide_xa_ptx("bf16" if dtype == torch.bfloat16 else "f16")
    constraints = gemv._WIDE_XA_CONSTRAINTS.value.split(",")
    assert len(constraints) == 52 and constraints[:2] == ["=f"] * 2 and constraints[-2:] == ["f"] * 2
    torch.manual_seed(6)
    a = torch.randn(16, 128).to(dtype)
    x = torch.randn(128).to(dtype)
    start = torch.randn(16).tolist()

    def pairs(v):  # 16-bit values -> words of (v[2m], v[2m + 1]), v[2m] in the low half
        bits = v.view(torch.int16).tolist()
        return [(bits[2 * m] & 0xFFFF) | ((bits[2 * m + 1] & 0xFFFF) << 16) for m in range(len(bits) // 2)]

    def operands(shift):
        out = []
        for lane in range(32):
            g, c = lane // 4, lane % 4
            cols = slice(32 * c, 32 * c + 32)
            ops = {f"${2 + m}": w for m, w in enumerate(pairs(a[g, cols]))}
            ops.update({f"${18 + m}": w for m, w in enumerate(pairs(a[g + 8, cols]))})
            xw = pairs(x[cols])
            ops.update({f"${34 + m}": xw[(m + shift) % 16] for m in range(16)})
            ops["$50"], ops["$51"] = start[g], start[g + 8]
            out.append(ops)
        return out

    want = [start[r] + sum(av * xv for av, xv in zip(a[r].float().tolist(), x.float().tolist())) for r in range(16)]
    lanes = run_warp_ptx(asm, operands(0), dtype)
    for lane, regs in enumerate(lanes):
        g = lane // 4
        assert regs["$0"] == pytest.approx(want[g], rel=1e-9, abs=1e-9), lane
        assert regs["$1"] == pytest.approx(want[g + 8], rel=1e-9, abs=1e-9), lane
    wrong = run_warp_ptx(asm, operands(1), dtype)
    assert any(abs(regs["$0"] - want[lane // 4]) > 1e-3 for lane, regs in enumerate(wrong))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_words_decode_to_rounded_products(dtype):
    """The dequantize kernel's per-block words (`scaled_words_ptx`: the 16 code values times the block's absmax,
    each rounded once to dtype, laid out as `prmt` tables) fed to the 16-bit decode give, for every byte value,
    round(code * absmax) in dtype: the bits of NF4Tensor.dequantize (fp32 product, one rounding)."""
    rng = random.Random(3)
    asm = nd.scaled_words_ptx(dtype)
    assert nd._SCALED_WORDS_CONSTRAINTS.value.split(",") == ["=r"] * 8 + ["r"]
    decode = nd._PAIRS16.value
    code = torch.tensor(nd.NF4_CODE, dtype=torch.float32)
    # absmax values: typical, an exact zero (all-zero block), tiny (subnormal products), large (fp16 overflow)
    scales = [0.0, 1.0, 2.5e-3, 1e-38, 3.0e4, 7.1e4] + [rng.uniform(1e-3, 8.0) for _ in range(20)]
    for scale in scales:
        sbits = torch.tensor([scale], dtype=torch.float32).view(torch.int32).item() & 0xFFFFFFFF
        words = [run_ptx(asm, {"$8": sbits})[f"${w}"] for w in range(8)]
        want = [v & 0xFFFF for v in (code * torch.tensor(scale, dtype=torch.float32)).to(dtype).view(torch.int16)
                .tolist()]
        if scale == 1.0:  # the code book itself: the kernels' constant words
            assert words == nd._prmt_words(dtype)
        for first in range(0, 256, 4):
            packed = list(range(first, first + 4))
            ops = {"$4": sum(b << (8 * j) for j, b in enumerate(packed))}
            for i, w in enumerate(words):
                for e in range(4):
                    ops[f"${5 + 4 * i + e}"] = w
            regs = run_ptx(decode, ops)
            even = [(regs[f"${j // 2}"] >> (16 * (j % 2))) & 0xFFFF for j in range(4)]
            odd = [(regs[f"${2 + j // 2}"] >> (16 * (j % 2))) & 0xFFFF for j in range(4)]
            assert even == [want[b >> 4] for b in packed], (scale, packed)
            assert odd == [want[b & 15] for b in packed], (scale, packed)
