"""LoRA shrink: xa = drop(x) @ A^T, the [M, r] rank product, computed once per row block.

Used by the forward when xa is not fused into the GEMM (dropout, large rank), and by the backward for
dY @ B (pass `B.t()` as `lora_A`, no dropout). Each program owns BLOCK_M rows and a BLOCK_R slice of the rank
and walks K once; the dropout mask is drawn once per element of x.

`lora_shrink_partials` splits K as well and leaves fp32 partial sums [splits, M, r] for the consumer to add up:
at decode sizes (a few rows) one program per rank block would walk all of A alone. Both can signal a
programmatic dependent launch (helpers.pdl_enabled): the GEMM that consumes xa then starts while they run.
"""
import torch
import triton
import triton.language as tl

from .config import shrink_config
from .helpers import (
    acc_dtype, apply_dropout, cdiv, check_dropout, check_shapes, dot, dot_precision, dot_precision_key, dropout_keep,
    dropout_threshold, gdc_launch_dependents_if, matrix_shape, next_pow2, seed_arg,
)
from .launch import Launch, PlanCache, plan_key, seed_key

# Widest rank slice per program: [BLOCK_M, 128] fp32 accumulators still fit the registers of 4 warps.
MAX_SHRINK_RANK_BLOCK = 128


@triton.jit(do_not_specialize=["M", "seed", "keep_thr"])
def _lora_shrink_kernel(
    X, A, XA, ZERO,
    M, K, RANK, K_PER_SPLIT, ZERO_COUNT,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_os, stride_om, stride_or,
    seed, keep_thr, inv_keep, K8,
    DROPOUT: tl.constexpr, TRIGGER: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """XA[split, m, r] = sum over split's K range of drop(X)[m, k] * A[r, k], for BLOCK_M rows and BLOCK_R ranks.

    X: [M, K], A: [RANK, K] (any strides); XA: [splits, M, RANK] (strides stride_os, stride_om, stride_or; with one
    split, stride_os is unused and XA is the [M, RANK] result, stored in its own dtype).
    grid = (cdiv(M, BLOCK_M), cdiv(RANK, BLOCK_R), splits); K_PER_SPLIT: a multiple of BLOCK_K.
    seed, keep_thr, inv_keep, K8: the dropout mask of helpers.dropout_keep, applied when DROPOUT.
    TRIGGER: let a PDL-launched consumer start now (helpers.gdc_launch_dependents_if).
    HAS_ZERO: program (0, 0, 0) also sets ZERO[0 : ZERO_COUNT] (int32) to zero, for the consumer (the one-row
    NF4 GEMV's split counters: the consumer's `gdc_wait` makes the zeros visible before it counts).
    """
    gdc_launch_dependents_if(TRIGGER)
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    if HAS_ZERO:
        if pid_m + pid_r + pid_s == 0:
            offs_z = tl.arange(0, 1024)
            for z0 in range(0, ZERO_COUNT, 1024):
                tl.store(ZERO + z0 + offs_z, tl.zeros((1024,), dtype=tl.int32), mask=z0 + offs_z < ZERO_COUNT)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < RANK
    k_start = pid_s.to(tl.int64) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    x_ptrs = X + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    a_ptrs = A + offs_r[None, :] * stride_ar + (k_start + offs_k)[:, None] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = offs_k < k_end - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DROPOUT:
            x = apply_dropout(x, dropout_keep(seed, offs_m, k0, K8, keep_thr, BLOCK_M, BLOCK_K), inv_keep)
        acc = dot(x, a, acc, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    out_ptrs = XA + pid_s.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(XA.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


_PLANS = PlanCache()


def shrink_splits(M: int, K: int, dtype: torch.dtype, splits: int) -> tuple[int, int]:
    """(K ranges, K per range) of a shrink asked for `splits` ranges: each range a whole number of K steps,
    so short K gives fewer ranges (at least one)."""
    block_k = shrink_config(M, dtype).block_k
    k_per_split = max(1, cdiv(cdiv(K, max(splits, 1)), block_k)) * block_k
    return max(1, cdiv(K, k_per_split)), k_per_split


class _ShrinkPlan:
    """`lora_shrink` / `lora_shrink_partials` for one call signature (see kernels/launch.py): checks, config and
    grid done once. splits == 0: the [M, r] result in x's dtype; else fp32 partials over `splits` K ranges."""

    def __init__(self, x, lora_A, dropout_p, splits, trigger, zero):
        M, K = matrix_shape(x, "x")
        rank = lora_A.shape[0]
        check_shapes(x=(x, (M, K)), lora_A=(lora_A, (rank, K)))
        self.launch = None
        cfg = shrink_config(M, x.dtype)
        self.partial = splits > 0
        splits, k_per_split = shrink_splits(M, K, x.dtype, splits)
        self.shape = (splits, M, rank) if self.partial else (M, rank)
        self.dtype = torch.float64 if x.dtype == torch.float64 else torch.float32 if self.partial else x.dtype
        if M == 0 or (self.partial and K == 0):
            return
        block_r = min(MAX_SHRINK_RANK_BLOCK, max(16, next_pow2(rank)))
        self.launch = Launch(
            _lora_shrink_kernel, (cdiv(M, cfg.block_m), cdiv(rank, block_r), splits),
            ("X", "A", "XA", "ZERO", "seed"),
            None, None, None, None, M, K, rank, k_per_split, zero.numel() if zero is not None else 0,
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), M * rank, rank, 1,  # a new contiguous xa
            None, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), cdiv(K, 8),
            DROPOUT=dropout_p > 0.0, TRIGGER=trigger, HAS_ZERO=zero is not None, BLOCK_M=cfg.block_m,
            BLOCK_K=cfg.block_k, BLOCK_R=block_r,
            PRECISION=dot_precision(x.dtype), ACC=acc_dtype(x.dtype), **cfg.launch(),
        )

    def __call__(self, x, lora_A, seed, zero):
        xa = torch.empty(self.shape, device=x.device, dtype=self.dtype)
        if self.launch is not None:
            self.launch(x, lora_A, xa, zero if zero is not None else xa, seed_arg(seed))
        else:
            if self.partial:
                xa.zero_()  # K == 0: the empty sum
            if zero is not None:
                zero.zero_()
        return xa


def _shrink(x, lora_A, dropout_p, seed, splits, trigger, zero=None):
    check_dropout(dropout_p, seed, x)
    key = plan_key((x, lora_A, zero), dropout_p, splits, trigger, dot_precision_key(x), seed_key(seed))
    plan = _PLANS.find(key)
    if plan is None:
        if zero is not None and (not isinstance(zero, torch.Tensor) or zero.dtype != torch.int32
                                 or not zero.is_contiguous() or zero.device != x.device):
            raise ValueError(f"zero must be a contiguous int32 tensor on x's device ({x.device}) or None, got "
                             f"{zero.dtype if isinstance(zero, torch.Tensor) else type(zero).__name__}")
        plan = _PLANS.put(key, _ShrinkPlan(x, lora_A, dropout_p, splits, trigger, zero))
    return plan(x, lora_A, seed, zero)


def lora_shrink(x, lora_A, dropout_p=0.0, seed=0, trigger=False):
    """xa = drop(x) @ lora_A^T.

    x: [M, K], lora_A: [r, K] (any strides, x's dtype); dropout_p in [0, 1) with the mask of `seed`.
    trigger: signal a programmatic dependent launch (the next kernel, launched with PDL, must `gdc_wait` before
    reading xa; kernels/helpers.py).
    Returns xa: [M, r] in x's dtype, accumulated in fp32.

    >>> xa = lora_shrink(x, A)                  # x @ A^T
    >>> dyb = lora_shrink(dy, B.t())            # dY @ B
    """
    return _shrink(x, lora_A, dropout_p, seed, 0, bool(trigger))


def lora_shrink_partials(x, lora_A, splits, dropout_p=0.0, seed=0, trigger=False, zero=None):
    """Partial sums of xa = drop(x) @ lora_A^T over `splits` ranges of K (fewer when K is short): the consumer
    adds them up in a fixed order, then rounds to x's dtype as `lora_shrink` does.

    x: [M, K], lora_A: [r, K]; returns fp32 (fp64 for fp64 x) [splits', M, r] with splits' <= splits.
    zero: a contiguous int32 tensor the same launch sets to zero (the consumer's counters), or None.

    >>> ws = lora_shrink_partials(x, A, 8)      # ws.sum(0).to(x.dtype) == lora_shrink(x, A)
    """
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be an int >= 1, got {splits!r}")
    return _shrink(x, lora_A, dropout_p, seed, splits, bool(trigger), zero)
