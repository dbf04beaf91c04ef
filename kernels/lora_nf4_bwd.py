"""QLoRA backward for the input: dX = dY @ deq(Wq) + s * drop'((dY @ B) @ A), W stored as NF4.

The weight is frozen, so dW is never formed; dA and dB do not touch W and reuse `lora_grad_ab`
(kernels/lora_bwd.py). The dX GEMM walks N and decodes each [BLOCK_N, BLOCK_K] tile of W in registers
(the tile is read in W's natural row layout: no transpose is needed for dY @ W). dyb = dY @ B comes from
`lora_shrink`, and the epilogue adds its rank-r term under the forward's regenerated dropout mask.
As in the forward, above `config.NF4_FUSED_ROWS` rows the "dequant" path writes deq(W) once and runs the bf16
`lora_backward_dx` instead, with its own choice of how dY @ B is made ("auto": inside the persistent GEMM at large M).
"""
import torch
import triton
import triton.language as tl

from .config import nf4_config, nf4_path
from .helpers import (
    acc_dtype, cdiv, check_dropout, check_scaling, dot, dot_precision, dropout_keep, dropout_threshold,
    next_pow2_rank, output_tile, seed_arg,
)
from .lora_bwd import lora_backward_dx
from .lora_fwd import EPILOGUE_RANK_BLOCK
from .lora_nf4_fwd import rank_r_term
from .lora_shrink import lora_shrink
from .nf4_dequant import check_nf4_operands, nf4_decode, nf4_dequantize, nf4_kernel_args, nf4_tile


@triton.jit(do_not_specialize=["M", "seed", "keep_thr"])
def _lora_nf4_dx_kernel(
    DY, QW, ABSMAX, ABS_CODE, ABS_SCALE, CODE, A, DYB, DX,
    M, N, K, RANK,
    stride_dym, stride_dyn, stride_qn, stride_ar, stride_ak, stride_dybm, stride_dybr, stride_dxm, stride_dxk,
    abs_offset, scaling, seed, keep_thr, inv_keep, K8,
    DROPOUT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr, DECODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_R_CHUNKS: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One BLOCK_M x BLOCK_K tile of dX, reducing over N in BLOCK_N steps.

    DY: [M, N]; QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE: the NF4 weight [N, K] (nf4_dequant.nf4_tile);
    A: [RANK, K]; DYB: [M, RANK] = dY @ B in DY's dtype; DX: [M, K]; all strided.
    BLOCK_K: a multiple of 64 or a divisor of 64 (the decode's block alignment). BLOCK_R, NUM_R_CHUNKS: the
    epilogue's rank chunks. seed, keep_thr, inv_keep, K8: the forward's dropout mask, applied if DROPOUT.
    """
    pid_m, pid_k, offs_m, offs_k = output_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M, tl.program_id(0))
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    k0 = pid_k.to(tl.int64) * BLOCK_K
    dy_ptrs = DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & (offs_n[None, :] < N - n0), other=0.0)
        w = nf4_tile(QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE, n0 + offs_n.to(tl.int64), k0, N, K,
                     stride_qn, BLOCK_N, BLOCK_K, DOUBLE_QUANT, ABS_GROUP, DECODE)
        acc = dot(dy, w.to(dy.dtype), acc, PRECISION)
        dy_ptrs += BLOCK_N * stride_dyn
    # A^T [K, RANK] through A's strides: the rank-r term's V operand.
    low = rank_r_term(DYB, A, offs_m, offs_k, mask_m, mask_k, RANK, stride_dybm, stride_dybr, stride_ak,
                      stride_ar, scaling, BLOCK_M, BLOCK_K, BLOCK_R, NUM_R_CHUNKS, PRECISION, ACC)
    if DROPOUT:
        low = tl.where(dropout_keep(seed, offs_m, k0, K8, keep_thr, BLOCK_M, BLOCK_K), low * inv_keep, 0.0)
    acc += low
    tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, acc.to(DX.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


def lora_nf4_backward_dx(dy, w4, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, store_dyb=True, path="auto",
                         decode="auto"):
    """dX = dY @ deq(Wq) + s * drop'((dY @ B) @ A) with an NF4 base weight.

    dy: [M, N] (fp16, bf16 or fp32), w4: NF4 weight of shape (N, K), lora_A: [r, K], lora_B: [N, r] in dy's
    dtype; scaling, dropout_p and seed as in the forward. path: "auto" (`config.nf4_path`; "gemv" rows take
    the fused kernel), "fused" or "dequant". decode: as in `lora_nf4_forward`. Returns (dx [M, K], dyb [M, r] = dY @ B, or None unless store_dyb).

    >>> dx, dyb = lora_nf4_backward_dx(dy, w4, A, B, 2.0)
    """
    M, K, N, rank = check_nf4_operands(w4, lora_A, lora_B, dy=dy)
    scaling = check_scaling(scaling)
    check_dropout(dropout_p, seed, dy)
    if path == "auto":
        path = "fused" if nf4_path(M) == "gemv" else nf4_path(M)
    if path == "dequant":
        return lora_backward_dx(dy, nf4_dequantize(w4, dy.dtype, decode=decode), lora_A, lora_B, scaling, dropout_p,
                                seed, store_dyb=store_dyb)
    if path != "fused":
        raise ValueError(f"path must be 'auto', 'fused' or 'dequant', got {path!r}")
    (qw, absmax, abs_code, abs_scale, abs_offset, code), meta = nf4_kernel_args(w4)
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    dyb = lora_shrink(dy, lora_B.t())
    if M == 0 or K == 0:
        return dx, (dyb if store_dyb else None)
    cfg = nf4_config("gemm", M, dy.dtype)
    block_r = min(EPILOGUE_RANK_BLOCK, next_pow2_rank(rank))
    # Output tile BLOCK_M x cfg.block_n over (M, K), reducing N in cfg.block_k steps: the forward's shape with
    # the roles of N and K exchanged, so the decoded W tile keeps its [BLOCK_N, BLOCK_K] orientation.
    block_k, block_n = cfg.block_n, cfg.block_k
    if block_k > 64 and block_k % 64:
        block_k = 64
    grid = (cdiv(M, cfg.block_m) * cdiv(K, block_k),)
    _lora_nf4_dx_kernel[grid](
        dy, qw, absmax, abs_code, abs_scale, code, lora_A, dyb, dx,
        M, N, K, rank,
        dy.stride(0), dy.stride(1), qw.stride(0), lora_A.stride(0), lora_A.stride(1), dyb.stride(0),
        dyb.stride(1), dx.stride(0), dx.stride(1),
        abs_offset, float(scaling), seed_arg(seed), dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        cdiv(K, 8),
        DROPOUT=dropout_p > 0.0, DECODE=nf4_decode(decode, dy.device), BLOCK_M=cfg.block_m, BLOCK_K=block_k, BLOCK_N=block_n,
        BLOCK_R=block_r, NUM_R_CHUNKS=cdiv(rank, block_r), GROUP_M=cfg.group_m,
        PRECISION=dot_precision(dy.dtype), ACC=acc_dtype(dy.dtype), **meta, **cfg.launch(),
    )
    return dx, (dyb if store_dyb else None)
