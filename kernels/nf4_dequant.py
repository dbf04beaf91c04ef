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
from .helpers import cdiv, check_shapes

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
             TABLE: tl.constexpr):
    """deq(W)[offs_n, k0 : k0 + BLOCK_K] as an fp32 [BLOCK_N, BLOCK_K] tile, zero outside W.

    QW: [N, K // 2] uint8 (row stride stride_qn, unit byte stride); ABSMAX [N * K // 64] (fp32, or uint8 codes
    with DOUBLE_QUANT: ABS_CODE [256] fp32, ABS_SCALE [ceil(N * K // 64 / ABS_GROUP)] fp32, abs_offset);
    CODE: the NF4 code book [16] fp32 (read when TABLE). offs_n: [BLOCK_N] int64 rows; k0: a multiple of
    BLOCK_K, below K. BLOCK_K is a multiple of 64 or divides 64: each row of the tile spans whole blocks or lies in one.
    """
    tl.static_assert(BLOCK_K % 64 == 0 or 64 % BLOCK_K == 0)
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask_n = offs_n < N
    byte = tl.load(QW + offs_n[:, None] * stride_qn + offs_b[None, :],
                   mask=mask_n[:, None] & (offs_b[None, :] < K // 2), other=0).to(tl.int32)
    # join(...)[n, j, 0] is the high nibble: flattening puts element 2j before 2j + 1, as packed.
    codes = tl.reshape(tl.join(byte >> 4, byte & 15), (BLOCK_N, BLOCK_K))
    vals = nf4_value(codes, CODE, TABLE)
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
    DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr, TABLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[n, k] = deq(W)[n, k] for one BLOCK_N x BLOCK_K tile; grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)).

    QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE: the NF4 weight (see nf4_tile). OUT: [N, K] strided.
    """
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = nf4_tile(QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE, offs_n, k0, N, K, stride_qn,
                 BLOCK_N, BLOCK_K, DOUBLE_QUANT, ABS_GROUP, TABLE)
    tl.store(OUT + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok, w.to(OUT.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


_CODE_CACHE: dict = {}


def nf4_code_table(device) -> torch.Tensor:
    """The NF4 code book as an fp32 [16] tensor on `device` (cached: one per device)."""
    device = torch.device(device)
    t = _CODE_CACHE.get(device)
    if t is None:
        t = _CODE_CACHE[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
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
    code = nf4_code_table(qweight.device)
    if dq:
        group = int(w4.absmax_group)
        if w4.absmax_scale.numel() < cdiv(absmax.numel(), group) or w4.absmax_code.numel() != 256:
            raise ValueError("absmax_scale / absmax_code do not match the double-quantized absmax")
        args = (qweight, absmax, w4.absmax_code, w4.absmax_scale, float(w4.absmax_offset), code)
    else:
        group = 1
        args = (qweight, absmax, absmax, absmax, 0.0, code)  # unused pointers: DOUBLE_QUANT is off
    for t in args:
        if isinstance(t, torch.Tensor) and t.device != qweight.device:
            raise ValueError(f"every NF4 tensor must be on {qweight.device}, found one on {t.device}")
    return args, {"DOUBLE_QUANT": dq, "ABS_GROUP": group}


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


def nf4_dequantize(w4, dtype=torch.bfloat16, out=None, table=True):
    """deq(W) [N, K] in `dtype`: the NF4 weight written out (the "dequantize then GEMM" path).

    w4: NF4 weight (see nf4_kernel_args); out: optional [N, K] tensor of `dtype` on w4's device.
    table: decode by code-book lookup (True) or select tree (False).

    >>> W = nf4_dequantize(w4, torch.bfloat16)         # [N, K]
    >>> y = torch.nn.functional.linear(x, W)
    """
    N, K = w4.shape
    (qw, absmax, abs_code, abs_scale, abs_offset, code), meta = nf4_kernel_args(w4)
    if out is None:
        out = torch.empty((N, K), device=qw.device, dtype=dtype)
    check_shapes(out=(out, (N, K)))
    if out.dtype != dtype or out.device != qw.device:
        raise ValueError(f"out must be {dtype} on {qw.device}, got {out.dtype} on {out.device}")
    if N == 0:
        return out
    cfg = nf4_config("dequant", N)
    grid = (cdiv(N, cfg.block_n), cdiv(K, cfg.block_k))
    _nf4_dequant_kernel[grid](
        qw, absmax, abs_code, abs_scale, code, out, N, K, qw.stride(0), out.stride(0), out.stride(1), abs_offset,
        TABLE=table, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **meta, **cfg.launch(),
    )
    return out
