"""The "prmt" NF4 decode is PTX inline assembly, which only a GPU runs. These tests execute the generated PTX
text with a small emulator of the instructions it uses (and, or, shr, prmt), on the code table the kernels read,
so that the tables, the selector arithmetic and the operand numbering are checked on the CPU as well. The GPU
script (bench/exp_nf4_decode.py, bench/gpu_qlora.py) checks the compiled kernels against the select tree."""
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


_OPS = {"and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b, "shr.b32": lambda a, b: a >> b}


def run_ptx(asm: str, operands: dict) -> dict:
    """Run the decode's PTX on 32-bit `operands` ({"$4": value, ...}); returns every register, $-outputs included."""
    regs = dict(operands)

    def value(tok):
        tok = tok.strip()
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
