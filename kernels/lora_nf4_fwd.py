"""QLoRA forward: Y = X @ deq(Wq)^T + b + s * (drop(X) @ A^T) @ B^T with W stored as NF4 (kernels/nf4_dequant.py).

Three paths (`kernels.config.nf4_path`, by row count):
  * "gemv" (decode, M <= 16): kernels/nf4_gemv.py, split over K to read the 4-bit W at full bandwidth.
  * "fused": this file's kernel, the fused LoRA forward of kernels/lora_fwd.py with the W tile decoded in
    registers from the packed bytes instead of loaded in bf16: there is never a bf16 copy of W. xa comes from
    `lora_shrink` (once per element of X, dropout included) and the epilogue adds (s * xa) @ B^T.
  * "dequant" (large M): `nf4_dequantize` writes deq(W) once, then the bf16 fused LoRA forward runs on it, with
    that forward's own choice of how xa is made (`lora_forward`'s "auto": producer tiles at large M). The
    fused kernel decodes each W tile once per BLOCK_M rows of X, which at thousands of rows costs more than the
    one extra write and read of W in bf16; the temporary is freed on return.
"auto" takes "dequant" for every M > 16 for now: the fused GEMM measured 19-32x the bf16 base on the H200
(config.NF4_FUSED_ROWS).
"""
import torch
import triton
import triton.language as tl

from .config import nf4_config, nf4_path
from .helpers import acc_dtype, cdiv, check_dropout, check_scaling, dot, dot_precision, next_pow2_rank, output_tile
from .lora_fwd import EPILOGUE_RANK_BLOCK, lora_forward
from .lora_shrink import lora_shrink
from .nf4_dequant import check_nf4_operands, nf4_decode, nf4_dequantize, nf4_kernel_args, nf4_tile
from .nf4_gemv import nf4_gemv


@triton.jit
def rank_r_term(U, V, offs_m, offs_n, mask_m, mask_n, RANK, stride_um, stride_ur, stride_vn, stride_vr, scaling,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NUM_R_CHUNKS: tl.constexpr,
                PRECISION: tl.constexpr, ACC: tl.constexpr):
    """s * U[offs_m, :] @ V[offs_n, :]^T as a [BLOCK_M, BLOCK_N] ACC tile, BLOCK_R ranks per step.

    U: [M, RANK] (xa or dyb, in the operands' dtype), V: [N, RANK] (B, or A^T through its strides).
    Each U chunk is scaled in fp32 and rounded to V's dtype before the MMA (the unfused reference's numerics).
    """
    offs_r = tl.arange(0, BLOCK_R)
    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for c in tl.static_range(NUM_R_CHUNKS):
        rr = c * BLOCK_R + offs_r
        u = tl.load(U + offs_m[:, None] * stride_um + rr[None, :] * stride_ur,
                    mask=mask_m[:, None] & (rr[None, :] < RANK), other=0.0)
        v = tl.load(V + offs_n[None, :] * stride_vn + rr[:, None] * stride_vr,
                    mask=(rr[:, None] < RANK) & mask_n[None, :], other=0.0)
        low = dot((u.to(ACC) * scaling).to(v.dtype), v, low, PRECISION)
    return low


@triton.jit(do_not_specialize=["M"])
def _lora_nf4_fwd_kernel(
    X, QW, ABSMAX, ABS_CODE, ABS_SCALE, CODE, B, BIAS, XA, Y,
    M, N, K, RANK,
    stride_xm, stride_xk, stride_qn, stride_bn, stride_br, stride_xam, stride_xar, stride_ym, stride_yn,
    abs_offset, scaling,
    HAS_BIAS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr, DECODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_R_CHUNKS: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of Y, reducing over K with W decoded from NF4 tile by tile.

    X: [M, K]; QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE: the NF4 weight [N, K] (nf4_dequant.nf4_tile);
    B: [N, RANK]; BIAS: [N] (if HAS_BIAS); XA: [M, RANK] = drop(X) @ A^T in X's dtype; Y: [M, N]; all strided.
    BLOCK_R: the epilogue's rank chunk, NUM_R_CHUNKS of them. BLOCK_K: a multiple of 64 or a divisor of 64.
    """
    pid_m, pid_n, offs_m, offs_n = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M, tl.program_id(0))
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        w = nf4_tile(QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE, offs_n, k0, N, K, stride_qn,
                     BLOCK_N, BLOCK_K, DOUBLE_QUANT, ABS_GROUP, DECODE)
        acc = dot(x, tl.trans(w.to(x.dtype)), acc, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
    acc += rank_r_term(XA, B, offs_m, offs_n, mask_m, mask_n, RANK, stride_xam, stride_xar, stride_bn, stride_br,
                       scaling, BLOCK_M, BLOCK_N, BLOCK_R, NUM_R_CHUNKS, PRECISION, ACC)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def lora_nf4_forward(x, w4, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, store_xa=False, path="auto",
                     decode="auto"):
    """QLoRA forward with an NF4 base weight.

    x: [M, K] (fp16, bf16 or fp32), w4: NF4 weight of shape (N, K) (`lora_fast.nf4.NF4Tensor`), bias: [N] or
    None, lora_A: [r, K], lora_B: [N, r] in x's dtype; scaling, dropout_p, seed as in `lora_forward`.
    path: "auto" (`config.nf4_path`), "gemv" (M <= 16), "fused" or "dequant". decode: how 4-bit codes become
    values (`nf4_dequant.NF4_DECODES`); "auto" runs the byte-permute decode ("prmt") on a GPU and the select
    tree elsewhere (bench/NOTES.md has the measurements).
    Returns (y [M, N], xa [M, r] = drop(x) @ A^T or None unless store_xa).

    >>> y, _ = lora_nf4_forward(x, w4, None, A, B, 2.0)
    >>> y, xa = lora_nf4_forward(x, w4, b, A, B, 2.0, dropout_p=0.1, seed=3, store_xa=True)
    """
    scaling = check_scaling(scaling)
    check_dropout(dropout_p, seed, x)
    if path in ("auto", "gemv") and isinstance(x, torch.Tensor) and x.dim() == 2 and nf4_path(x.shape[0]) == "gemv":
        # the GEMV's launch plan runs every check of check_nf4_operands, once per call signature
        return nf4_gemv(x, w4, bias, lora_A, lora_B, scaling, dropout_p, seed, store_xa, decode=decode)
    M, K, N, rank = check_nf4_operands(w4, lora_A, lora_B, x=x, bias=bias)
    if path == "auto":
        path = nf4_path(M)
    if path == "gemv":
        return nf4_gemv(x, w4, bias, lora_A, lora_B, scaling, dropout_p, seed, store_xa, decode=decode)
    if path == "dequant":
        return lora_forward(x, nf4_dequantize(w4, x.dtype, decode=decode), bias, lora_A, lora_B, scaling, dropout_p,
                            seed, store_xa=store_xa)
    if path != "fused":
        raise ValueError(f"path must be 'auto', 'gemv', 'fused' or 'dequant', got {path!r}")
    (qw, absmax, abs_code, abs_scale, abs_offset, code), meta = nf4_kernel_args(w4)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    xa = lora_shrink(x, lora_A, dropout_p, seed)
    if M == 0 or N == 0:
        return y, (xa if store_xa else None)
    cfg = nf4_config("gemm", M, x.dtype)
    block_r = min(EPILOGUE_RANK_BLOCK, next_pow2_rank(rank))
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n),)
    _lora_nf4_fwd_kernel[grid](
        x, qw, absmax, abs_code, abs_scale, code, lora_B, bias if bias is not None else y, xa, y,
        M, N, K, rank,
        x.stride(0), x.stride(1), qw.stride(0), lora_B.stride(0), lora_B.stride(1), xa.stride(0), xa.stride(1),
        y.stride(0), y.stride(1), abs_offset, float(scaling),
        HAS_BIAS=bias is not None, DECODE=nf4_decode(decode, x.device), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=block_r, NUM_R_CHUNKS=cdiv(rank, block_r), GROUP_M=cfg.group_m,
        PRECISION=dot_precision(x.dtype), ACC=acc_dtype(x.dtype), **meta, **cfg.launch(),
    )
    return y, (xa if store_xa else None)
