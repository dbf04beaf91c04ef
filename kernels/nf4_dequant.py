"""NF4 (4-bit NormalFloat, QLoRA) decoding: the device helpers every NF4 kernel uses, and the dequantize op.

Packed layout (`lora_fast.nf4.NF4Tensor`, the same bytes as bitsandbytes' `Params4bit` when K % 64 == 0):
  qweight [N, K // 2] uint8: element (n, 2j) in the high nibble of byte (n, j), (n, 2j + 1) in the low nibble;
  absmax  [N, K // 64]: fp32 per 64-element block along K, or, double-quantized, uint8 codes with
          absmax = abs_code[q] * abs_scale[flat // ABS_GROUP] + abs_offset (flat = n * K // 64 + block).
  W[n, k] = NF4_CODE[code(n, k)] * absmax[n, k // 64].
A tile is decoded in registers: one byte load per two weights, a 16-entry code lookup, one multiply by the
block's absmax. Nothing here writes W except `nf4_dequantize`, the "dequantize then GEMM" path for large M.
"""
import torch
import triton
import triton.language as tl

from .config import nf4_config
from .helpers import cached_device_tensor, cdiv, check_shapes, is_interpret
from .launch import Launch, PlanCache, plan_key

# The NF4 code book of the QLoRA paper (Dettmers et al. 2023, appendix E): the 2^4 quantiles of N(0, 1) with an
# exact zero, normalised to [-1, 1] (fp32 values, as bitsandbytes stores them).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# Quantization block along K (the paper's and bitsandbytes' default): one fp32 absmax per 64 weights.
NF4_BLOCK = 64

# The code book as constexprs for the select-tree decode (no memory access at all).
_C = [tl.constexpr(v) for v in NF4_CODE]
C0, C1, C2, C3, C4, C5, C6, C7, C8, C9, C10, C11, C12, C13, C14, C15 = _C

# How a kernel turns 4-bit codes into values (the `decode` argument of the launchers):
#   "prmt"   byte permutes (PTX inline assembly, NVIDIA GPUs only): the code book's bytes sit in immediates and
#            one `prmt` looks up 4 codes at once, about 3 instructions per weight for 16-bit values and 6 for fp32;
#   "select" a 4-level select tree with the values as immediates, about 20 instructions per weight;
#   "table"  a gather from the 64-byte code book in global memory (L1).
NF4_DECODES = ("prmt", "select", "table")


def _code_bits(dtype: torch.dtype) -> list:
    """The 16 code values rounded to `dtype` (fp16, bf16 or fp32), as unsigned bit patterns."""
    vals = torch.tensor(NF4_CODE, dtype=torch.float32).to(dtype)
    bits = vals.view(torch.int32 if dtype == torch.float32 else torch.int16).tolist()
    return [b & ((1 << (8 * vals.element_size())) - 1) for b in bits]


def _prmt_words(dtype: torch.dtype) -> list:
    """The code book as `prmt` tables: for each byte b of a `dtype` value (b = 0 lowest), 4 words holding byte b
    of the values of codes 4w .. 4w + 3 (code 4w in the word's lowest byte). 8 words for fp16/bf16, 16 for fp32."""
    bits = _code_bits(dtype)
    nbytes = 4 if dtype == torch.float32 else 2
    return [sum(((bits[4 * w + j] >> (8 * b)) & 0xFF) << (8 * j) for j in range(4))
            for b in range(nbytes) for w in range(4)]


# Where each dtype's words sit in the code table (`nf4_code_table`), after the 16 fp32 code values.
PRMT_WORD_OFFSET = {torch.bfloat16: 16, torch.float16: 24, torch.float32: 32}
CODE_TABLE_SIZE = 48


def _plane_ptx(dst: str, words: list, half: int) -> str:
    """PTX: byte i of `dst` = the plane's byte of the value of the code in nibble i of selector half `half`.

    words: the operands holding the plane's 4 table words. Two `prmt`s look the 4 codes up among codes 0-7 and
    among codes 8-15 (s<half>: the low 3 bits of every code), and a third picks, byte by byte, the half that bit 3
    of the code names (x<half>: selector i, or 4 + i where bit 3 is set).
    """
    return (f"prmt.b32 pl, {words[0]}, {words[1]}, s{half};\n"
            f"prmt.b32 ph, {words[2]}, {words[3]}, s{half};\n"
            f"prmt.b32 {dst}, pl, ph, x{half};")


# Both decodes take 4 packed bytes and give the codes of their high nibbles (even elements, in byte order) and of
# their low nibbles (odd elements); nibble i of a 16-bit half of the bytes is, in order: odd, even, odd, even.
# The table words come in as operands (loaded once per program) so that they stay in registers.
_PRMT_PROLOGUE = """and.b32 s0, {q}, 0x77777777;
shr.b32 s1, s0, 16;
shr.b32 x0, {q}, 1;
and.b32 x0, x0, 0x44444444;
or.b32 x0, x0, 0x32103210;
shr.b32 x1, x0, 16;"""


def _word_operands(first: int, count: int) -> list:
    """Operand names of `count` 32-bit scalar inputs starting at operand `first`: with pack=4 each scalar
    takes 4 operands (one per packed element, all the same value), and the first of them is used."""
    return [f"${first + 4 * i}" for i in range(count)]


def decode16_ptx(q: str, even: tuple, odd: tuple, words: list) -> list:
    """PTX lines of the 16-bit decode of the 4 bytes in register `q`: even[h] = the values of the high nibbles of
    bytes 2h and 2h + 1 (2 per register, byte 2h in the low half), odd[h] those of their low nibbles; `words`: the
    registers holding the 8 table words. Scratch registers: s0, s1, x0, x1, pl, ph, lo, hi (declared by the
    caller)."""
    body = [_PRMT_PROLOGUE.format(q=q)]
    for half in (0, 1):
        body += [_plane_ptx("lo", words[:4], half), _plane_ptx("hi", words[4:], half),
                 f"prmt.b32 {even[half]}, lo, hi, 0x7351;", f"prmt.b32 {odd[half]}, lo, hi, 0x6240;"]
    return body


DECODE16_SCRATCH = ".reg .b32 s0, s1, x0, x1, pl, ph, lo, hi;"


def _pairs16_ptx() -> str:
    """16-bit decode: $0, $1 = even values (2 per register), $2, $3 = odd; $4 = 4 bytes; then 8 table words."""
    body = ["{", DECODE16_SCRATCH] + decode16_ptx("$4", ("$0", "$1"), ("$2", "$3"), _word_operands(5, 8))
    return "\n".join(body + ["}"])


def _pairs32_ptx() -> str:
    """fp32 decode (exact code values): $0-$3 = even values, $4-$7 = odd; $8 = 4 bytes; then 16 table words."""
    words = _word_operands(9, 16)
    body = ["{", ".reg .b32 s0, s1, x0, x1, pl, ph, p0, p1, p2, p3, l01, l23;", _PRMT_PROLOGUE.format(q="$8")]
    for half in (0, 1):
        body += [_plane_ptx(f"p{b}", words[4 * b:4 * b + 4], half) for b in range(4)]
        for j, sel in ((0, "0x5140"), (1, "0x7362")):  # codes (odd, even) of byte 2 * half + j
            body += [f"prmt.b32 l01, p0, p1, {sel};", f"prmt.b32 l23, p2, p3, {sel};",
                     f"prmt.b32 ${4 + 2 * half + j}, l01, l23, 0x5410;",
                     f"prmt.b32 ${2 * half + j}, l01, l23, 0x7632;"]
    return "\n".join(body + ["}"])


def scaled_words_ptx(dtype: torch.dtype) -> str:
    """PTX: the 8 `prmt` table words ($0-$7, as `_prmt_words` lays them out) of the code book times the fp32 scale
    in $8, each product rounded once to `dtype` (fp16 or bf16): the words of one quantization block, with which the
    16-bit decode gives deq(W) = round(code * absmax) itself, with no multiply or conversion per weight."""
    cvt = {torch.bfloat16: "cvt.rn.bf16x2.f32", torch.float16: "cvt.rn.f16x2.f32"}[dtype]
    body = ["{", ".reg .b32 f<16>, v<8>;"]
    body += [f"mul.rn.f32 f{c}, $8, 0f{b:08X};" for c, b in enumerate(_code_bits(torch.float32))]
    body += [f"{cvt} v{i}, f{2 * i + 1}, f{2 * i};" for i in range(8)]  # value 2i in the low half
    # plane 0 (low bytes), word w: byte j = low byte of value 4w + j; plane 1 the same with the high bytes
    body += [f"prmt.b32 ${w}, v{2 * w}, v{2 * w + 1}, 0x6420;" for w in range(4)]
    body += [f"prmt.b32 ${4 + w}, v{2 * w}, v{2 * w + 1}, 0x7531;" for w in range(4)]
    return "\n".join(body + ["}"])


_SCALED_WORDS_BF16 = tl.constexpr(scaled_words_ptx(torch.bfloat16))
_SCALED_WORDS_F16 = tl.constexpr(scaled_words_ptx(torch.float16))
_SCALED_WORDS_CONSTRAINTS = tl.constexpr("=r," * 8 + "r")

_PAIRS16 = tl.constexpr(_pairs16_ptx())
_PAIRS16_CONSTRAINTS = tl.constexpr("=r," * 4 + "r," + ",".join(["r"] * 32))
_PAIRS32 = tl.constexpr(_pairs32_ptx())
_PAIRS32_CONSTRAINTS = tl.constexpr("=r," * 8 + "r," + ",".join(["r"] * 64))


def prmt_available(device) -> bool:
    """Whether the "prmt" decode can run on `device`: a CUDA (not ROCm) GPU, outside the interpreter."""
    return torch.device(device).type == "cuda" and torch.version.hip is None and not is_interpret()


def nf4_decode(decode, device) -> str:
    """The decode a kernel runs for `decode` ("auto" or None: "prmt" where it can run, else "select")."""
    if decode in ("auto", None):
        return "prmt" if prmt_available(device) else "select"
    if decode not in NF4_DECODES:
        raise ValueError(f"decode must be 'auto' or one of {NF4_DECODES}, got {decode!r}")
    if decode == "prmt" and not prmt_available(device):
        raise ValueError("decode='prmt' runs PTX inline assembly and needs an NVIDIA GPU; on "
                         f"{torch.device(device)} (or under TRITON_INTERPRET=1) use 'select' or 'table'")
    return decode


@triton.jit
def nf4_value(codes, CODE, TABLE: tl.constexpr):
    """fp32 NF4 values of int32 `codes` in [0, 16), any shape.

    TABLE: gather from CODE (fp32 [16] in global memory: 64 bytes, one cache line, so a warp's lookups are one
    L1 transaction); else a 4-level select tree on the code's bits with the values as immediates (15 selects).
    """
    if TABLE:
        return tl.load(CODE + codes)
    b0 = (codes & 1) != 0
    b1 = (codes & 2) != 0
    b2 = (codes & 4) != 0
    q0 = tl.where(b1, tl.where(b0, C3, C2), tl.where(b0, C1, C0))
    q1 = tl.where(b1, tl.where(b0, C7, C6), tl.where(b0, C5, C4))
    q2 = tl.where(b1, tl.where(b0, C11, C10), tl.where(b0, C9, C8))
    q3 = tl.where(b1, tl.where(b0, C15, C14), tl.where(b0, C13, C12))
    lo = tl.where(b2, q1, q0)
    hi = tl.where(b2, q3, q2)
    return tl.where((codes & 8) != 0, hi, lo)


# Keeps a table word in ordinary registers: t = laneid >> 5 is always 0, but ptxas cannot tell, so the sum is
# not uniform across the warp. Uniform words live in uniform registers, and every `prmt` use then costs a move
# into an ordinary register (about one extra instruction per weight, measured in the sm_90 SASS).
_PER_LANE = tl.constexpr("{.reg .b32 t; mov.u32 t, %laneid; shr.u32 t, t, 5; add.u32 $0, $1, t;}")


@triton.jit
def _word(T, i, like):
    """Table word i (int32) as a tensor shaped like `like`, held per lane (see _PER_LANE)."""
    return tl.inline_asm_elementwise(_PER_LANE, "=r,r", [tl.load(T + i) + tl.zeros_like(like).to(tl.int32)],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def nf4_prmt_words(CODE, DTYPE: tl.constexpr, like, DECODE: tl.constexpr):
    """The `prmt` table words of DTYPE from the code table: 8 (fp16/bf16) or 16 (fp32) int32 tensors shaped like
    `like` (the byte tile), loaded once per program so that the decode keeps them in registers. Other decodes
    never read them: zeros, and no load."""
    T = CODE.to(tl.pointer_type(tl.int32), bitcast=True)
    if DECODE == "prmt":
        if DTYPE == tl.float32:
            words = (_word(T, 32, like), _word(T, 33, like), _word(T, 34, like), _word(T, 35, like),
                     _word(T, 36, like), _word(T, 37, like), _word(T, 38, like), _word(T, 39, like),
                     _word(T, 40, like), _word(T, 41, like), _word(T, 42, like), _word(T, 43, like),
                     _word(T, 44, like), _word(T, 45, like), _word(T, 46, like), _word(T, 47, like))
        else:
            o: tl.constexpr = 16 if DTYPE == tl.bfloat16 else 24
            words = (_word(T, o, like), _word(T, o + 1, like), _word(T, o + 2, like), _word(T, o + 3, like),
                     _word(T, o + 4, like), _word(T, o + 5, like), _word(T, o + 6, like), _word(T, o + 7, like))
    else:
        words = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    return words


@triton.jit
def nf4_pairs(byte, CODE, words, DTYPE: tl.constexpr, DECODE: tl.constexpr):
    """(even, odd): the code book values of the high and of the low nibbles of the uint8 tensor `byte` (any
    shape), in DTYPE (fp16 or bf16: the code book rounded to it; fp32: exact). DECODE: see NF4_DECODES;
    "prmt" reads `words` (nf4_prmt_words(CODE, DTYPE, byte, DECODE)), the others CODE or nothing."""
    if DECODE == "prmt":
        if DTYPE == tl.float32:
            even, odd = tl.inline_asm_elementwise(
                _PAIRS32, _PAIRS32_CONSTRAINTS,
                [byte, words[0], words[1], words[2], words[3], words[4], words[5], words[6], words[7],
                 words[8], words[9], words[10], words[11], words[12], words[13], words[14], words[15]],
                dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        elif DTYPE == tl.bfloat16:
            even, odd = tl.inline_asm_elementwise(
                _PAIRS16, _PAIRS16_CONSTRAINTS,
                [byte, words[0], words[1], words[2], words[3], words[4], words[5], words[6], words[7]],
                dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            even, odd = tl.inline_asm_elementwise(
                _PAIRS16, _PAIRS16_CONSTRAINTS,
                [byte, words[0], words[1], words[2], words[3], words[4], words[5], words[6], words[7]],
                dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        codes = byte.to(tl.int32)
        even = nf4_value(codes >> 4, CODE, DECODE == "table").to(DTYPE)
        odd = nf4_value(codes & 15, CODE, DECODE == "table").to(DTYPE)
    return even, odd


@triton.jit
def nf4_scaled_words(scale, like, DTYPE: tl.constexpr):
    """The 8 `prmt` words of the code book times `scale` (fp32, any shape broadcastable to `like`), rounded to
    DTYPE (fp16 or bf16): `nf4_pairs(byte, CODE, words, DTYPE, "prmt")` with them decodes straight to
    round(code * scale), what `nf4_tile(...) .to(DTYPE)` computes with a multiply and a conversion per weight.
    NVIDIA GPUs only (PTX), like the "prmt" decode."""
    bits = tl.broadcast_to(scale.to(tl.int32, bitcast=True), like.shape)
    if DTYPE == tl.bfloat16:
        words = tl.inline_asm_elementwise(_SCALED_WORDS_BF16, _SCALED_WORDS_CONSTRAINTS, [bits],
                                          dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        words = tl.inline_asm_elementwise(_SCALED_WORDS_F16, _SCALED_WORDS_CONSTRAINTS, [bits],
                                          dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    return words


@triton.jit
def nf4_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, flat, mask, DOUBLE_QUANT: tl.constexpr,
               ABS_GROUP: tl.constexpr):
    """fp32 absmax of the blocks at flat indices `flat` (any shape, int64), 0 where not `mask`."""
    if DOUBLE_QUANT:
        q = tl.load(ABSMAX + flat, mask=mask, other=0).to(tl.int32)
        scale = tl.load(ABS_SCALE + flat // ABS_GROUP, mask=mask, other=0.0)
        absmax = tl.where(mask, tl.load(ABS_CODE + q) * scale + abs_offset, 0.0)
    else:  # an else, not a second return: triton 3.6 types both returns even when the if is a constexpr
        absmax = tl.load(ABSMAX + flat, mask=mask, other=0.0)
    return absmax


@triton.jit
def nf4_tile(QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE, offs_n, k0, N, K, stride_qn,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr,
             DECODE: tl.constexpr):
    """deq(W)[offs_n, k0 : k0 + BLOCK_K] as an fp32 [BLOCK_N, BLOCK_K] tile, zero outside W.

    QW: [N, K // 2] uint8 (row stride stride_qn, unit byte stride); ABSMAX [N * K // 64] (fp32, or uint8 codes
    with DOUBLE_QUANT: ABS_CODE [256] fp32, ABS_SCALE [ceil(N * K // 64 / ABS_GROUP)] fp32, abs_offset);
    CODE: the NF4 code book [16] fp32 (read by DECODE == "table"). offs_n: [BLOCK_N] int64 rows; k0: a multiple of
    BLOCK_K, below K. BLOCK_K is a multiple of 64 or divides 64: each row of the tile spans whole blocks or lies in one.
    """
    tl.static_assert(BLOCK_K % 64 == 0 or 64 % BLOCK_K == 0)
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask_n = offs_n < N
    byte = tl.load(QW + offs_n[:, None] * stride_qn + offs_b[None, :],
                   mask=mask_n[:, None] & (offs_b[None, :] < tl.multiple_of(K // 2, 32)), other=0)
    even, odd = nf4_pairs(byte, CODE, nf4_prmt_words(CODE, tl.float32, byte, DECODE), tl.float32, DECODE)
    # join(...)[n, j, 0] is the high nibble: flattening puts element 2j before 2j + 1, as packed.
    vals = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))
    blocks_per_row = K // 64
    if BLOCK_K <= 64:
        flat = offs_n * blocks_per_row + k0 // 64
        scale = nf4_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, flat, mask_n, DOUBLE_QUANT,
                           ABS_GROUP)
        return vals * scale[:, None]
    else:
        G: tl.constexpr = BLOCK_K // 64
        offs_g = k0 // 64 + tl.arange(0, G)
        flat = offs_n[:, None] * blocks_per_row + offs_g[None, :]
        scale = nf4_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, flat,
                           mask_n[:, None] & (offs_g[None, :] < blocks_per_row), DOUBLE_QUANT, ABS_GROUP)
        return tl.reshape(tl.reshape(vals, (BLOCK_N, G, 64)) * scale[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def _nf4_dequant_kernel(
    QW, ABSMAX, ABS_CODE, ABS_SCALE, CODE, OUT,
    N, K, stride_qn, stride_on, stride_ok, abs_offset,
    DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr, DECODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED_WORDS: tl.constexpr,
):
    """OUT[n, k] = deq(W)[n, k] for one BLOCK_N x BLOCK_K tile; grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)).

    QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE: the NF4 weight (see nf4_tile). OUT: [N, K] strided.
    SCALED_WORDS (DECODE "prmt", a 16-bit OUT, BLOCK_K a multiple of 64): each quantization block's `prmt` words
    are built from its 16 products code * absmax, rounded to OUT's dtype (nf4_scaled_words), and the 16-bit decode
    looks the outputs up directly, with no multiply or conversion per weight: 8.6 instructions per weight in the
    sm_90 SASS against 12 (the words are built per block for each thread that holds some of its bytes); 19.1 ->
    16.1 µs at 4096 x 4096 on the H200 (bench/NOTES.md). Same bits either way (each output is round(code * absmax)
    once).
    """
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if SCALED_WORDS:
        G: tl.constexpr = BLOCK_K // 64
        offs_g = k0 // 64 + tl.arange(0, G)
        offs_j = tl.arange(0, 32)
        mask_n = offs_n < N
        mask_g = offs_g < K // 64
        byte = tl.load(QW + offs_n[:, None, None] * stride_qn + (offs_g * 32)[None, :, None] + offs_j[None, None, :],
                       mask=mask_n[:, None, None] & mask_g[None, :, None], other=0)
        scale = nf4_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, offs_n[:, None] * (K // 64) + offs_g[None, :],
                           mask_n[:, None] & mask_g[None, :], DOUBLE_QUANT, ABS_GROUP)
        words = nf4_scaled_words(scale[:, :, None], byte, OUT.dtype.element_ty)
        even, odd = nf4_pairs(byte, CODE, words, OUT.dtype.element_ty, "prmt")
        # join(...)[n, g, j, 0] is the high nibble: flattening puts element 2j before 2j + 1, as packed.
        w = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))
    else:
        w = nf4_tile(QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE, offs_n, k0, N, K, stride_qn,
                     BLOCK_N, BLOCK_K, DOUBLE_QUANT, ABS_GROUP, DECODE).to(OUT.dtype.element_ty)
    tl.store(OUT + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok, w,
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


_CODE_CACHE: dict = {}


def nf4_code_table(device) -> torch.Tensor:
    """The code table every NF4 kernel takes as CODE, fp32 [CODE_TABLE_SIZE] on `device` (cached per device):
    the 16 code values, then the `prmt` words of bf16, fp16 and fp32 (int32 bit patterns, PRMT_WORD_OFFSET)."""
    device = torch.device(device)
    t = _CODE_CACHE.get(device)
    if t is None:
        words = [w - (1 << 32) if w >= 1 << 31 else w
                 for dtype in PRMT_WORD_OFFSET for w in _prmt_words(dtype)]
        table = torch.cat([torch.tensor(NF4_CODE, dtype=torch.float32),
                           torch.tensor(words, dtype=torch.int32).view(torch.float32)])
        assert table.numel() == CODE_TABLE_SIZE
        t = _CODE_CACHE[device] = cached_device_tensor(table, device)  # outside CUDA-graph pools (helpers)
    return t


def nf4_kernel_args(w4):
    """(tensor/scalar args, constexpr dict) that every NF4 kernel takes for the NF4 weight `w4`.

    w4: a `lora_fast.nf4.NF4Tensor` (or anything with its fields: qweight [N, K // 2] uint8, absmax
    [N, K // 64], shape (N, K), and for double quantization absmax_code, absmax_scale, absmax_offset,
    absmax_group). Checks what a kernel needs to read in bounds.
    """
    N, K = w4.shape
    if K % NF4_BLOCK:
        raise ValueError(f"NF4 weight has K={K} columns, not a multiple of the blocksize {NF4_BLOCK}")
    qweight, absmax = w4.qweight, w4.absmax
    if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (N, K // 2) or qweight.stride(1) != 1:
        raise ValueError(f"qweight must be a uint8 [{N}, {K // 2}] tensor with unit column stride, got "
                         f"{qweight.dtype} {list(qweight.shape)}")
    dq = w4.absmax_code is not None
    if not absmax.is_contiguous() or absmax.numel() != N * K // NF4_BLOCK:
        raise ValueError(f"absmax must be contiguous with {N * K // NF4_BLOCK} elements, got {list(absmax.shape)}")
    if absmax.dtype != (torch.uint8 if dq else torch.float32):
        raise ValueError(f"absmax must be {'uint8 (double quantized)' if dq else 'float32'}, got {absmax.dtype}")
    if dq:
        group = int(w4.absmax_group)
        if w4.absmax_scale.numel() < cdiv(absmax.numel(), group) or w4.absmax_code.numel() != 256:
            raise ValueError("absmax_scale / absmax_code do not match the double-quantized absmax")
    else:
        group = 1
    args = nf4_call_args(w4)
    for t in args:
        if isinstance(t, torch.Tensor) and t.device != qweight.device:
            raise ValueError(f"every NF4 tensor must be on {qweight.device}, found one on {t.device}")
    return args, {"DOUBLE_QUANT": dq, "ABS_GROUP": group}


def nf4_key_parts(w4) -> tuple:
    """(tensors, flags) that key a launch plan on the NF4 weight `w4`: its packed tensors and its shape and
    double-quantization group. A TypeError naming w4 when it is not an NF4 weight (before any plan or check)."""
    try:
        if w4.absmax_code is not None:
            return (w4.qweight, w4.absmax, w4.absmax_code, w4.absmax_scale), (*w4.shape, w4.absmax_group)
        return (w4.qweight, w4.absmax), (*w4.shape, None)
    except (AttributeError, TypeError):
        raise TypeError("w4 must be an NF4 weight (lora_fast.nf4.NF4Tensor: qweight, absmax, shape, absmax_code, "
                        f"...), got {type(w4).__name__}") from None


def nf4_call_args(w4) -> tuple:
    """(qweight, absmax, abs_code, abs_scale, abs_offset, code): the NF4 weight's kernel arguments, unchecked
    (`nf4_kernel_args` checks them; cached launch plans call this per call). Without double quantization absmax
    stands in for the unused code and scale pointers."""
    code = nf4_code_table(w4.qweight.device)
    if w4.absmax_code is not None:
        return w4.qweight, w4.absmax, w4.absmax_code, w4.absmax_scale, float(w4.absmax_offset), code
    return w4.qweight, w4.absmax, w4.absmax, w4.absmax, 0.0, code


def check_nf4_operands(w4, lora_A, lora_B, x=None, dy=None, bias=None):
    """Launcher guard of the NF4 ops: x [M, K] (or dy [M, N]) against the NF4 weight (N, K), the adapters
    lora_A [r, K] and lora_B [N, r] and bias [N], one dtype and device. Returns (M, K, N, r)."""
    N, K = (int(d) for d in w4.shape)
    rank = lora_A.shape[0]
    act, name = (x, "x") if x is not None else (dy, "dy")
    if act.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {list(act.shape)}")
    M = act.shape[0]
    check_shapes(**{name: (act, (M, K if x is not None else N))}, bias=(bias, (N,)), lora_A=(lora_A, (rank, K)),
                 lora_B=(lora_B, (N, rank)))
    if w4.qweight.device != act.device:
        raise ValueError(f"the NF4 weight is on {w4.qweight.device} but {name} is on {act.device}")
    return M, K, N, rank


def nf4_dequantize(w4, dtype=torch.bfloat16, out=None, decode="auto"):
    """deq(W) [N, K] in `dtype`: the NF4 weight written out (the "dequantize then GEMM" path).

    w4: NF4 weight (see nf4_kernel_args); out: optional [N, K] tensor of `dtype` on w4's device.
    decode: "auto", "prmt", "select" or "table" (NF4_DECODES); every decode gives the same values.
    Checks and launch set-up are done once per call signature (kernels/launch.py).

    >>> W = nf4_dequantize(w4, torch.bfloat16)         # [N, K]
    >>> y = torch.nn.functional.linear(x, W)
    """
    tensors, flags = nf4_key_parts(w4)
    key = plan_key((out,) + tensors, *flags, dtype, decode, SCALED_WORDS)
    plan = _PLANS.find(key)
    if plan is None:
        plan = _PLANS.put(key, _DequantPlan(w4, dtype, out, decode))
    return plan(w4, out)


_PLANS = PlanCache()
# Whether 16-bit dequantizes with the "prmt" decode build per-block scaled words (_nf4_dequant_kernel's
# SCALED_WORDS); False falls back to the fp32 decode, multiply and conversion (same bits; experiments compare them).
# Part of the plan key: a switch flipped after a call takes effect on the next one.
SCALED_WORDS = True


class _DequantPlan:
    """`nf4_dequantize` for one call signature: checks, config and launch set up once."""

    def __init__(self, w4, dtype, out, decode):
        N, K = w4.shape
        (qw, *_), meta = nf4_kernel_args(w4)
        if out is not None:
            check_shapes(out=(out, (N, K)))
            if out.dtype != dtype or out.device != qw.device:
                raise ValueError(f"out must be {dtype} on {qw.device}, got {out.dtype} on {out.device}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.shape, self.dtype = (N, K), dtype
        self.launch = None
        if N == 0:
            return
        cfg = nf4_config("dequant", N)
        out_strides = out.stride() if out is not None else (K, 1)
        self.launch = Launch(
            _nf4_dequant_kernel, (cdiv(N, cfg.block_n), cdiv(K, cfg.block_k)),
            ("QW", "ABSMAX", "ABS_CODE", "ABS_SCALE", "CODE", "OUT", "abs_offset"),
            None, None, None, None, None, None, N, K, qw.stride(0), *out_strides, None,
            DECODE=nf4_decode(decode, qw.device), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SCALED_WORDS=(SCALED_WORDS and nf4_decode(decode, qw.device) == "prmt"
                          and dtype in (torch.float16, torch.bfloat16) and cfg.block_k % 64 == 0),
            # no fused multiply-add: a double-quantized absmax is code * scale + offset rounded twice, as
            # NF4Tensor.dequantize computes it, so that both give the same bits
            enable_fp_fusion=False, **meta, **cfg.launch(),
        )

    def __call__(self, w4, out):
        qw, absmax, abs_code, abs_scale, abs_offset, code = nf4_call_args(w4)
        if out is None:
            out = torch.empty(self.shape, device=qw.device, dtype=self.dtype)
        if self.launch is not None:
            self.launch(qw, absmax, abs_code, abs_scale, code, out, abs_offset)
        return out
