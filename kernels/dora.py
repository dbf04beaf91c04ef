"""DoRA helper kernels: the row statistics behind ||W + s * B @ A||_row, and the column dot that gives dm.

DoRA scales each output n by g[n] = m[n] / ||W[n] + s * (B @ A)[n]||. The merged weight [N, K] is never formed:
    ||W + s B A||^2_row = ||W||^2_row + 2 s rowdot(B, W @ A^T) + s^2 rowdot(B @ (A @ A^T), B)
so one pass over W (`dora_row_stats`: ||W||^2_row and W @ A^T [N, r], both in fp32) plus rank-sized products
give the norm. The magnitude gradient is dm[n] = sum_m dY[m, n] * z[m, n] / ||.||_n with z the unscaled output;
`column_dot` reduces dY * (Y - bias) over M, tile by tile, without an [M, N] temporary.
"""
import torch
import triton
import triton.language as tl

from .config import dora_config, num_sms
from .helpers import check_shapes, dot, dot_precision, next_pow2_rank, upcast


@triton.jit
def _dora_row_stats_kernel(
    W, A, SQ, WA,
    N, K, RANK,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_wan, stride_war,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """SQ[n] = sum_k W[n, k]^2 and WA[n, :] = W[n, :] @ A^T for BLOCK_N rows, in fp32.

    W: [N, K], A: [RANK, K] (one dtype); SQ: [N] fp32; WA: [N, RANK] fp32. BLOCK_R: padded rank (>= 16).
    """
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    wa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        w = tl.load(W + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(A + offs_r[None, :] * stride_ar + (k0 + offs_k)[:, None] * stride_ak,
                    mask=mask_k[:, None] & (offs_r[None, :] < RANK), other=0.0)
        w32 = upcast(w)
        sq += tl.sum(w32 * w32, axis=1)
        wa = dot(w, a, wa, PRECISION)
    tl.store(SQ + offs_n, sq, mask=mask_n)
    tl.store(WA + offs_n[:, None] * stride_wan + offs_r[None, :] * stride_war, wa,
             mask=mask_n[:, None] & (offs_r[None, :] < RANK))


@triton.jit(do_not_specialize=["M", "ROWS_PER_SPLIT"])
def _column_dot_kernel(
    U, V, BIAS, OUT,
    M, N, ROWS_PER_SPLIT,
    stride_um, stride_un, stride_vm, stride_vn, stride_os,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """OUT[s, n] = sum over split s's rows m of U[m, n] * (V[m, n] - BIAS[n]), in fp32.

    U, V: [M, N] (any strides); BIAS: [N] (if HAS_BIAS); OUT: [splits, N] fp32. Axis 0: column tiles, axis 1:
    splits of M, ROWS_PER_SPLIT rows each (a multiple of BLOCK_M).
    """
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_start = tl.program_id(1).to(tl.int64) * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    if HAS_BIAS:
        bias = upcast(tl.load(BIAS + offs_n, mask=mask_n, other=0.0))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_n[None, :]
        u = upcast(tl.load(U + offs_m[:, None] * stride_um + offs_n[None, :] * stride_un, mask=mask, other=0.0))
        v = upcast(tl.load(V + offs_m[:, None] * stride_vm + offs_n[None, :] * stride_vn, mask=mask, other=0.0))
        if HAS_BIAS:
            v = tl.where(mask, v - bias[None, :], 0.0)
        acc += u * v
    tl.store(OUT + tl.program_id(1) * stride_os + offs_n, tl.sum(acc, axis=0), mask=mask_n)


def dora_row_stats(weight, lora_A):
    """(||W||^2 per row [N] fp32, W @ A^T [N, r] fp32) in one pass over W.

    weight: [N, K], lora_A: [r, K], one dtype and device, any strides.

    >>> sq, wa = dora_row_stats(W, A)
    >>> norm = (sq + 2 * s * (B.float() * wa).sum(1) + s * s * ((B.float() @ (A.float() @ A.float().T)) * B.float()).sum(1)).sqrt()
    """
    N, K = weight.shape
    rank = lora_A.shape[0]
    check_shapes(weight=(weight, (N, K)), lora_A=(lora_A, (rank, K)))
    sq = torch.empty(N, device=weight.device, dtype=torch.float32)
    wa = torch.empty((N, rank), device=weight.device, dtype=torch.float32)
    if N == 0:
        return sq, wa
    cfg = dora_config("row_stats", weight.dtype)
    _dora_row_stats_kernel[(triton.cdiv(N, cfg.block_m),)](
        weight, lora_A, sq, wa, N, K, rank,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), wa.stride(0), wa.stride(1),
        BLOCK_N=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=next_pow2_rank(rank),
        PRECISION=dot_precision(weight.dtype), **cfg.launch(),
    )
    return sq, wa


def column_dot(u, v, bias=None):
    """out[n] = sum_m u[m, n] * (v[m, n] - bias[n]) in fp32: [N]. Deterministic (fixed-order partial sums).

    u, v: [M, N] (one dtype and device, any strides); bias: [N] or None.

    >>> dm = column_dot(dy, y, bias) / magnitude     # DoRA's magnitude gradient
    """
    M, N = u.shape
    check_shapes(u=(u, (M, N)), v=(v, (M, N)), bias=(bias, (N,)))
    if M == 0 or N == 0:
        return torch.zeros(N, device=u.device, dtype=torch.float32)
    cfg = dora_config("column_dot", u.dtype)
    col_tiles = triton.cdiv(N, cfg.block_n)
    m_blocks = triton.cdiv(M, cfg.block_m)
    # Enough splits of M to fill the GPU twice over; the [splits, N] fp32 partials are summed by torch.
    splits = max(1, min(m_blocks, triton.cdiv(2 * num_sms(u.device), col_tiles)))
    rows_per_split = triton.cdiv(m_blocks, splits) * cfg.block_m
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty((splits, N), device=u.device, dtype=torch.float32)
    _column_dot_kernel[(col_tiles, splits)](
        u, v, bias if bias is not None else u, partial,
        M, N, rows_per_split,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), partial.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **cfg.launch(),
    )
    return partial[0] if splits == 1 else partial.sum(0)
