"""LoRA shrink: xa = drop(x) @ A^T, the [M, r] rank product, computed once per row block.

Used by the forward when xa is not fused into the GEMM (dropout, large rank), and by the backward for
dY @ B (pass `B.t()` as `lora_A`, no dropout). Each program owns BLOCK_M rows and a BLOCK_R slice of the rank
and walks K once; the dropout mask is drawn once per element of x.
"""
import torch
import triton
import triton.language as tl

from .config import shrink_config
from .helpers import (
    acc_dtype, apply_dropout, cdiv, check_shapes, dot, dot_precision, dot_precision_key, dropout_keep,
    dropout_threshold, next_pow2,
)
from .launch import Launch, PlanCache, int_width, plan_key

# Widest rank slice per program: [BLOCK_M, 128] fp32 accumulators still fit the registers of 4 warps.
MAX_SHRINK_RANK_BLOCK = 128


@triton.jit(do_not_specialize=["M", "seed", "thr_shifted"])
def _lora_shrink_kernel(
    X, A, XA,
    M, K, RANK,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
    seed, thr_shifted, inv_keep, K4,
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """XA[m, r] = sum_k drop(X)[m, k] * A[r, k] for BLOCK_M rows and BLOCK_R ranks.

    X: [M, K], A: [RANK, K], XA: [M, RANK] (any strides); grid = (cdiv(M, BLOCK_M), cdiv(RANK, BLOCK_R)).
    seed, thr_shifted, inv_keep, K4: the dropout mask of helpers.dropout_keep, applied when DROPOUT.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < RANK
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = A + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DROPOUT:
            x = apply_dropout(x, dropout_keep(seed, offs_m, k0, K4, thr_shifted, BLOCK_M, BLOCK_K), inv_keep)
        acc = dot(x, a, acc, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    out_ptrs = XA + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(XA.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


_PLANS = PlanCache()


class _ShrinkPlan:
    """`lora_shrink` for one call signature (see kernels/launch.py): checks, config and grid done once."""

    def __init__(self, x, lora_A, dropout_p):
        M, K = x.shape
        rank = lora_A.shape[0]
        check_shapes(x=(x, (M, K)), lora_A=(lora_A, (rank, K)))
        self.shape, self.launch = (M, rank), None
        if M == 0:
            return
        cfg = shrink_config(M, x.dtype)
        block_r = min(MAX_SHRINK_RANK_BLOCK, max(16, next_pow2(rank)))
        self.launch = Launch(
            _lora_shrink_kernel, (cdiv(M, cfg.block_m), cdiv(rank, block_r)), ("X", "A", "XA", "seed"),
            None, None, None, M, K, rank,
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), rank, 1,  # xa: a new contiguous [M, r]
            None, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), cdiv(K, 4),
            DROPOUT=dropout_p > 0.0, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
            PRECISION=dot_precision(x.dtype), ACC=acc_dtype(x.dtype), **cfg.launch(),
        )

    def __call__(self, x, lora_A, seed):
        xa = torch.empty(self.shape, device=x.device, dtype=x.dtype)
        if self.launch is not None:
            self.launch(x, lora_A, xa, int(seed))
        return xa


def lora_shrink(x, lora_A, dropout_p=0.0, seed=0):
    """xa = drop(x) @ lora_A^T.

    x: [M, K], lora_A: [r, K] (any strides, x's dtype); dropout_p in [0, 1) with the mask of `seed`.
    Returns xa: [M, r] in x's dtype, accumulated in fp32.

    >>> xa = lora_shrink(x, A)                  # x @ A^T
    >>> dyb = lora_shrink(dy, B.t())            # dY @ B
    """
    key = plan_key((x, lora_A), dropout_p, dot_precision_key(x), int_width(seed))
    plan = _PLANS.find(key)
    if plan is None:
        plan = _PLANS.put(key, _ShrinkPlan(x, lora_A, dropout_p))
    return plan(x, lora_A, seed)
