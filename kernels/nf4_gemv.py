"""NF4 LoRA forward for decode (M <= 16 rows): a split-K GEMV that reads the 4-bit weights directly.

    Y = X @ deq(Wq)^T + b + s * (drop(X) @ A^T) @ B^T

At one to sixteen rows the time is the read of W: 4.5 bits per weight here against 16 for bf16. Reading it at
full bandwidth needs several CTAs per SM, far more than N / BLOCK_N output tiles, so K is split too: program
(n, s) decodes its [BLOCK_N, K / splits] slab of W in registers and writes an fp32 partial [M, BLOCK_N]; the
programs of the first N tile also accumulate the partial rank-r product drop(X) @ A^T of their K slab, which
costs nothing extra in reads of X. A second small kernel sums the partials in a fixed order (deterministic),
adds the bias and s * xa @ B^T, and writes Y (and xa for the backward).
"""
import torch
import triton
import triton.language as tl

from .config import nf4_config, num_sms
from .helpers import (
    acc_dtype, apply_dropout, cdiv, dot, dot_precision, dropout_keep, dropout_threshold, next_pow2_rank,
)
from .nf4_dequant import check_nf4_operands, nf4_kernel_args, nf4_tile

# Programs per SM the split over K aims for: enough loads in flight to reach the memory bandwidth.
TARGET_CTAS_PER_SM = 4


@triton.jit(do_not_specialize=["M", "seed", "thr_shifted"])
def _nf4_gemv_kernel(
    X, QW, ABSMAX, ABS_CODE, ABS_SCALE, CODE, A, PART, XA_PART,
    M, N, K, RANK, K_PER_SPLIT,
    stride_xm, stride_xk, stride_qn, stride_ar, stride_ak, abs_offset,
    seed, thr_shifted, inv_keep, K4,
    DROPOUT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr, TABLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Partial sums of split pid_s over K for output columns pid_n * BLOCK_N + [0, BLOCK_N).

    X: [M, K] (M <= BLOCK_M), A: [RANK, K], strided; QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE: the NF4
    weight (nf4_dequant.nf4_tile). PART: [splits, BLOCK_M, N] fp32 contiguous; XA_PART: [splits, BLOCK_M,
    BLOCK_R] fp32 contiguous, written by the pid_n == 0 programs. K_PER_SPLIT: a multiple of BLOCK_K.
    seed, thr_shifted, inv_keep, K4: the dropout mask (helpers.dropout_keep) on X's LoRA branch if DROPOUT.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    k_start = pid_s.to(tl.int64) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = offs_k < k_end - k0
        x = tl.load(X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = nf4_tile(QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE, offs_n, k0, N, K, stride_qn,
                     BLOCK_N, BLOCK_K, DOUBLE_QUANT, ABS_GROUP, TABLE)
        acc = dot(x, tl.trans(w.to(x.dtype)), acc, PRECISION)
        if pid_n == 0:
            a = tl.load(A + offs_r[None, :] * stride_ar + (k0 + offs_k)[:, None] * stride_ak,
                        mask=mask_k[:, None] & (offs_r[None, :] < RANK), other=0.0)
            if DROPOUT:
                x = apply_dropout(x, dropout_keep(seed, offs_m, k0, K4, thr_shifted, BLOCK_M, BLOCK_K), inv_keep)
            xa = dot(x, a, xa, PRECISION)
    part = PART + pid_s.to(tl.int64) * BLOCK_M * N
    tl.store(part + offs_m[:, None] * N + offs_n[None, :], acc, mask=offs_n[None, :] < N)
    if pid_n == 0:
        xa_part = XA_PART + pid_s.to(tl.int64) * BLOCK_M * BLOCK_R
        tl.store(xa_part + offs_m[:, None] * BLOCK_R + offs_r[None, :], xa)


@triton.jit
def _nf4_gemv_finish_kernel(
    PART, XA_PART, B, BIAS, Y, XA,
    M, N, RANK, SPLITS,
    stride_bn, stride_br, stride_ym, stride_yn, stride_xam, stride_xar, scaling,
    HAS_BIAS: tl.constexpr, STORE_XA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """Y[:, tile] = sum_s PART[s] + BIAS + s * xa @ B^T with xa = sum_s XA_PART[s] rounded to Y's dtype.

    PART: [SPLITS, BLOCK_M, N] fp32; XA_PART: [SPLITS, BLOCK_M, BLOCK_R] fp32; B: [N, RANK]; BIAS: [N];
    Y: [M, N]; XA: [M, RANK], written by program 0 when STORE_XA.
    """
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for s in range(0, SPLITS):
        acc += tl.load(PART + s * BLOCK_M * N + offs_m[:, None] * N + offs_n[None, :], mask=mask_n[None, :],
                       other=0.0)
        xa += tl.load(XA_PART + s * BLOCK_M * BLOCK_R + offs_m[:, None] * BLOCK_R + offs_r[None, :])
    xa_in = xa.to(Y.dtype.element_ty)  # rounded to the input dtype before it meets B, as PEFT does
    if STORE_XA:
        if pid == 0:
            tl.store(XA + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar, xa_in,
                     mask=mask_m[:, None] & (offs_r[None, :] < RANK))
    b = tl.load(B + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                mask=(offs_r[:, None] < RANK) & mask_n[None, :], other=0.0)
    acc = dot((xa_in.to(ACC) * scaling).to(b.dtype), b, acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def nf4_gemv_splits(n_tiles: int, k_steps: int, device) -> int:
    """K splits: about TARGET_CTAS_PER_SM programs per SM in all, at most one BLOCK_K step per split."""
    return max(1, min(k_steps, cdiv(TARGET_CTAS_PER_SM * num_sms(device), n_tiles)))


def nf4_gemv(x, w4, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, store_xa=False, table=False,
             splits=None):
    """NF4 LoRA forward for M <= 16 rows, reading the 4-bit weight directly.

    x: [M, K] (M <= 16), w4: NF4 weight of shape (N, K) (kernels.nf4_dequant.nf4_kernel_args), bias: [N] or
    None, lora_A: [r, K], lora_B: [N, r] (x's dtype and device); scaling, dropout_p, seed as in lora_forward.
    Returns (y [M, N], xa [M, r] or None). splits: override the K split (tests).

    >>> y, _ = nf4_gemv(x, w4, None, A, B, 2.0)
    """
    M, K, N, rank = check_nf4_operands(w4, lora_A, lora_B, x=x, bias=bias)
    cfg = nf4_config("gemv", M, x.dtype)
    if M > cfg.block_m:
        raise ValueError(f"nf4_gemv takes at most {cfg.block_m} rows, got M={M}")
    (qw, absmax, abs_code, abs_scale, abs_offset, code), meta = nf4_kernel_args(w4)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    xa = torch.empty((M, rank), device=x.device, dtype=x.dtype) if store_xa else None
    if M == 0 or N == 0:
        return y, xa
    block_r = next_pow2_rank(rank)
    n_tiles = cdiv(N, cfg.block_n)
    k_steps = cdiv(K, cfg.block_k)
    splits = splits or nf4_gemv_splits(n_tiles, k_steps, x.device)
    k_per_split = cdiv(k_steps, splits) * cfg.block_k
    splits = cdiv(K, k_per_split)
    part = torch.empty((splits, cfg.block_m, N), device=x.device, dtype=torch.float32)
    xa_part = torch.empty((splits, cfg.block_m, block_r), device=x.device, dtype=torch.float32)
    dropout = dropout_p > 0.0
    _nf4_gemv_kernel[(n_tiles, splits)](
        x, qw, absmax, abs_code, abs_scale, code, lora_A, part, xa_part,
        M, N, K, rank, k_per_split,
        x.stride(0), x.stride(1), qw.stride(0), lora_A.stride(0), lora_A.stride(1), abs_offset,
        int(seed), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), cdiv(K, 4),
        DROPOUT=dropout, TABLE=table, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=block_r, PRECISION=dot_precision(x.dtype), ACC=acc_dtype(x.dtype), **meta, **cfg.launch(),
    )
    xa_arg = xa if xa is not None else y
    _nf4_gemv_finish_kernel[(n_tiles,)](
        part, xa_part, lora_B, bias if bias is not None else y, y, xa_arg,
        M, N, rank, splits,
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), xa_arg.stride(0), xa_arg.stride(1),
        float(scaling), HAS_BIAS=bias is not None, STORE_XA=xa is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r, PRECISION=dot_precision(x.dtype),
        ACC=acc_dtype(x.dtype), num_warps=4,
    )
    return y, xa
