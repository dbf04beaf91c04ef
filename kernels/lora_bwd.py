"""Fused LoRA backward with a frozen base weight.

    dX = dY @ W + s * drop'((dY @ B) @ A)       (drop' = the forward's mask, scaled by 1 / (1 - p))
    dA = s * (dY @ B)^T @ drop(X)
    dB = s * dY^T @ xa,  xa = drop(X) @ A^T      (saved by the forward)

`lora_backward_dx` is one GEMM over N. Up to 256 rows its K loop also accumulates dyb = dY @ B for its rows
("fused": no second pass over dY; the programs of the first K tile store dyb for dA); above, `lora_shrink`
computes dyb first ("shrink", measured faster there), or, for the persistent large-M walk without DoRA's
column scale, the GEMM computes it itself: its first programs before their tiles ("inline", the default), or its
first K tile of each row block inside its N loop ("producer", lora_fwd's default, measured slower here). Its
epilogue adds the rank-r term, masked by the regenerated dropout mask, and writes dX once; except with dropout in
"shrink", "inline" or "producer" mode, where the GEMM writes dY @ W with its dropout-free tile and
`_lora_dx_dropout_term_kernel` adds the masked term in a second, memory-bound pass, or (a training step above
MAX_FUSED_ROWS rows, `dx_term_in_grad_ab`) `lora_grad_ab`'s dA programs add it with the mask they draw for dA:
the same kernel time on the H200, one launch fewer (bench/NOTES.md, ninth session). On request
(`term_epilogue=True`) the "shrink" / "inline" GEMM adds the masked term in its own epilogue instead, column
slice by column slice of the tile (`_dx_dropout_epilogue`: one tile-sized accumulator live); measured no faster.
`lora_grad_ab` computes dA and dB in one launch of a reduce-over-M kernel, split over M so that the [r, K] and
[N, r] outputs still fill the GPU; the fp32 partial sums of both are added in a fixed order by one more launch
(`_sum_splits_kernel`: deterministic, no atomics, rounded once).
"""

import os
from dataclasses import replace

import torch
import triton
import triton.language as tl

from .config import dx_dropout_term_config, fill_sms, gemm_config, mid_tile, num_sms, reduce_m_config
from .helpers import (
    acc_dtype, apply_dropout, cdiv, check_dropout, check_dtype, check_flag, check_scaling, check_shapes,
    check_vector, dot, dot_precision, dot_precision_key, dropout_keep, dropout_threshold, gdc_wait_if,
    inline_shrink_grid, is_interpret, matrix_shape, next_pow2_rank, pdl_enabled, publish_row_block, seed_arg,
    persistent_start, tensor_descriptor, tma_enabled, upcast, wait_row_block, walk_tile,
)
from .launch import Launch, PlanCache, plan_key, seed_key
from .lora_fwd import EPILOGUE_RANK_BLOCK, MAX_FUSED_ROWS, _output, choose_xa_mode, inline_pays
from .lora_shrink import lora_shrink


@triton.jit
def _rank_term(DYB, A, offs_m, offs_k, mask_m, mask_k, RANK, stride_dybm, stride_dybr, stride_ar, stride_ak, scaling,
               low, BLOCK_R: tl.constexpr, NUM_R_CHUNKS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """low + s * DYB[offs_m, :] @ A[:, offs_k], over the rank in NUM_R_CHUNKS chunks of BLOCK_R (masked to RANK):
    dX's rank-r term from a precomputed DYB [M, RANK] (s * DYB rounded to A's dtype, as the fused path does)."""
    offs_r = tl.arange(0, BLOCK_R)
    for c in tl.static_range(NUM_R_CHUNKS):
        rr = c * BLOCK_R + offs_r
        dyb = tl.load(DYB + offs_m[:, None] * stride_dybm + rr[None, :] * stride_dybr,  # from L2: see wait_row_block
                      mask=mask_m[:, None] & (rr[None, :] < RANK), other=0.0, cache_modifier=".cg")
        a = tl.load(A + rr[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=(rr[:, None] < RANK) & mask_k[None, :], other=0.0)
        low = dot((dyb.to(ACC) * scaling).to(a.dtype), a, low, PRECISION)
    return low


@triton.jit
def _dx_term_part(part, col0, DYB, A, DX, pid_m, pid_k, offs_m, mask_m, K, RANK, stride_dybm, stride_dybr, stride_ar,
                  stride_ak, stride_dxm, stride_dxk, scaling, seed, keep_thr, inv_keep, K8,
                  BLOCK_M: tl.constexpr, TILE_K: tl.constexpr, PART_K: tl.constexpr, BLOCK_R: tl.constexpr,
                  NUM_R_CHUNKS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, DX_TMA: tl.constexpr):
    """Store columns col0 .. col0 + PART_K of dX tile (pid_m, pid_k) (TILE_K wide): `part` [BLOCK_M, PART_K] fp32
    holds dY @ W there; adds s * drop'(DYB @ A) for those columns (the mask drawn for them alone) and writes them."""
    k0 = pid_k * TILE_K + col0
    offs_k = k0.to(tl.int64) + tl.arange(0, PART_K)
    mask_k = offs_k < K
    low = _rank_term(DYB, A, offs_m, offs_k, mask_m, mask_k, RANK, stride_dybm, stride_dybr, stride_ar, stride_ak,
                     scaling, tl.zeros((BLOCK_M, PART_K), dtype=ACC), BLOCK_R, NUM_R_CHUNKS, PRECISION, ACC)
    keep = dropout_keep(seed, offs_m, k0, K8, keep_thr, BLOCK_M, PART_K)
    part += tl.where(keep, low * inv_keep, 0.0)
    if DX_TMA:
        DX.store([pid_m * BLOCK_M, k0], part.to(DX.dtype))
    else:
        tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, part.to(DX.dtype.element_ty),
                 mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _halves(t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS] -> its left and right [ROWS, COLS // 2] halves (in registers: reshape, permute, split)."""
    return tl.split(tl.permute(tl.reshape(t, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _dx_dropout_epilogue(acc, DYB, A, DX, pid_m, pid_k, offs_m, mask_m, K, RANK, stride_dybm, stride_dybr,
                         stride_ar, stride_ak, stride_dxm, stride_dxk, scaling, seed, keep_thr, inv_keep, K8,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         NUM_R_CHUNKS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
                         DX_TMA: tl.constexpr, EPI_SPLIT: tl.constexpr):
    """dX's dropout term added in the GEMM's epilogue in EPI_SPLIT (2, 4 or 8) column slices of the [BLOCK_M, BLOCK_K]
    tile `acc` (dY @ W), each with its own rank term and mask, so that no second full-tile fp32 accumulator is
    live: at 128 x 256 that one spilled registers (bench/NOTES.md). DX: a descriptor with block
    [BLOCK_M, BLOCK_K // EPI_SPLIT] when DX_TMA."""
    tl.static_assert(EPI_SPLIT == 2 or EPI_SPLIT == 4 or EPI_SPLIT == 8)
    PART: tl.constexpr = BLOCK_K // EPI_SPLIT
    left, right = _halves(acc, BLOCK_M, BLOCK_K)
    if EPI_SPLIT == 2:
        parts = (left, right)
    else:
        q0, q1 = _halves(left, BLOCK_M, BLOCK_K // 2)
        q2, q3 = _halves(right, BLOCK_M, BLOCK_K // 2)
        if EPI_SPLIT == 4:
            parts = (q0, q1, q2, q3)
        else:
            e0, e1 = _halves(q0, BLOCK_M, BLOCK_K // 4)
            e2, e3 = _halves(q1, BLOCK_M, BLOCK_K // 4)
            e4, e5 = _halves(q2, BLOCK_M, BLOCK_K // 4)
            e6, e7 = _halves(q3, BLOCK_M, BLOCK_K // 4)
            parts = (e0, e1, e2, e3, e4, e5, e6, e7)
    for i in tl.static_range(EPI_SPLIT):
        _dx_term_part(parts[i], i * PART, DYB, A, DX, pid_m, pid_k, offs_m, mask_m, K, RANK, stride_dybm,
                      stride_dybr, stride_ar, stride_ak, stride_dxm, stride_dxk, scaling, seed, keep_thr, inv_keep,
                      K8, BLOCK_M, BLOCK_K, PART, BLOCK_R, NUM_R_CHUNKS, PRECISION, ACC, DX_TMA)


@triton.jit
def _dx_tile(
    tile, DY, W, B, A, DYB, DX,
    M, N, K, RANK,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br, stride_ar, stride_ak,
    stride_dybm, stride_dybr, stride_dxm, stride_dxk,
    scaling, seed, keep_thr, inv_keep, K8,
    DROPOUT: tl.constexpr, COMPUTE_DYB: tl.constexpr, STORE_DYB: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_R_CHUNKS: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    DY_SCALE, HAS_DY_SCALE: tl.constexpr, GDC_WAIT: tl.constexpr, FLAGS, INLINE_DYB: tl.constexpr,
    DX_TMA: tl.constexpr, TILE_MAP: tl.constexpr = 0, PUBLISH: tl.constexpr = False, B_TMA: tl.constexpr = False,
    EPI_SPLIT: tl.constexpr = 1,
):
    """dX tile number `tile` of `_lora_bwd_dx_kernel`, whose docstring gives the arguments.

    TILE_MAP: helpers.walk_tile's (1: the first K tile of row block `tile`, a producer). PUBLISH (with
    COMPUTE_DYB, STORE_DYB): release FLAGS[row block] = 1 once the tile has stored its rows' dY @ B. B_TMA: B is
    a tensor descriptor with block [BLOCK_N, BLOCK_R] (columns past RANK read as zero). EPI_SPLIT > 1 (DROPOUT
    with DYB precomputed): the masked rank term is added in that many column slices (`_dx_dropout_epilogue`)."""
    pid_m, pid_k, offs_m, offs_k = walk_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M, tile, TILE_MAP)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_k = offs_k < K

    if not USE_TMA:
        dy_ptrs = DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
        w_ptrs = W + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    if not B_TMA:
        b_ptrs = B + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    dyb = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        mask_n = offs_n < N - n0
        if USE_TMA:
            dy = DY.load([pid_m * BLOCK_M, n0])
            w = W.load([n0, pid_k * BLOCK_K])
        else:
            dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            dy_ptrs += BLOCK_N * stride_dyn
            w_ptrs += BLOCK_N * stride_wn
        if HAS_DY_SCALE:
            g = tl.load(DY_SCALE + n0 + offs_n, mask=mask_n, other=0.0)
            dy = (upcast(dy) * upcast(g)[None, :]).to(dy.dtype)
        acc = dot(dy, w, acc, PRECISION)
        if COMPUTE_DYB:
            if B_TMA:
                b = B.load([n0, 0])
            else:
                b = tl.load(b_ptrs, mask=mask_n[:, None], other=0.0)
                b_ptrs += BLOCK_N * stride_bn
            dyb = dot(dy, b, dyb, PRECISION)

    # the rank-r term goes straight into acc, or (DROPOUT) into a second accumulator that the mask then filters:
    # two [BLOCK_M, BLOCK_K] fp32 accumulators spilled registers at the 128 x 256 tile (ptxas, sm_90)
    if DROPOUT and EPI_SPLIT > 1:  # the term in column slices of the tile, added and stored slice by slice
        tl.static_assert(not COMPUTE_DYB)
        gdc_wait_if(GDC_WAIT)
        if INLINE_DYB:
            wait_row_block(FLAGS, pid_m)
        _dx_dropout_epilogue(acc, DYB, A, DX, pid_m, pid_k, offs_m, mask_m, K, RANK, stride_dybm, stride_dybr,
                             stride_ar, stride_ak, stride_dxm, stride_dxk, scaling, seed, keep_thr, inv_keep, K8,
                             BLOCK_M, BLOCK_K, BLOCK_R, NUM_R_CHUNKS, PRECISION, ACC, DX_TMA, EPI_SPLIT)
    else:
        if DROPOUT:
            low = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
        else:
            low = acc
        if COMPUTE_DYB:
            if STORE_DYB:
                if pid_k == 0:
                    tl.store(DYB + offs_m[:, None] * stride_dybm + offs_r[None, :] * stride_dybr,
                             dyb.to(DYB.dtype.element_ty), mask=mask_m[:, None] & (offs_r[None, :] < RANK))
                    if PUBLISH:
                        publish_row_block(FLAGS, pid_m)
            if NUM_R_CHUNKS > 0:  # (0: the dropout term has its own pass)
                a = tl.load(A + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                            mask=(offs_r[:, None] < RANK) & mask_k[None, :], other=0.0)
                dyb_s = (dyb.to(a.dtype).to(ACC) * scaling).to(a.dtype)
                low = dot(dyb_s, a, low, PRECISION)
        else:
            gdc_wait_if(GDC_WAIT)  # DYB comes from the shrink before this kernel (a PDL launch)
            if INLINE_DYB and NUM_R_CHUNKS > 0:  # or from this launch's shrinking programs
                wait_row_block(FLAGS, pid_m)
            low = _rank_term(DYB, A, offs_m, offs_k, mask_m, mask_k, RANK, stride_dybm, stride_dybr, stride_ar,
                             stride_ak, scaling, low, BLOCK_R, NUM_R_CHUNKS, PRECISION, ACC)
        if DROPOUT:
            k0 = pid_k * BLOCK_K
            low = tl.where(dropout_keep(seed, offs_m, k0, K8, keep_thr, BLOCK_M, BLOCK_K), low * inv_keep, 0.0)
            acc += low
        else:
            acc = low
        if DX_TMA:
            DX.store([pid_m * BLOCK_M, pid_k * BLOCK_K], acc.to(DX.dtype))
        else:
            dx_ptrs = DX + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
            tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=["M", "seed", "keep_thr"])
def _lora_bwd_dx_kernel(
    DY, W, B, A, DYB, DX,
    M, N, K, RANK,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br, stride_ar, stride_ak,
    stride_dybm, stride_dybr, stride_dxm, stride_dxk,
    scaling, seed, keep_thr, inv_keep, K8,
    DROPOUT: tl.constexpr, COMPUTE_DYB: tl.constexpr, STORE_DYB: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_R_CHUNKS: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    DY_SCALE, HAS_DY_SCALE: tl.constexpr, PERSISTENT: tl.constexpr, GDC_WAIT: tl.constexpr,
    FLAGS, SHRINK_PROGS, INLINE_DYB: tl.constexpr, DX_TMA: tl.constexpr, SHRINK_STAGES: tl.constexpr,
    PRODUCER_DYB: tl.constexpr = False, B_TMA: tl.constexpr = False, EPI_SPLIT: tl.constexpr = 1,
):
    """BLOCK_M x BLOCK_K tiles of dX, reducing over N in BLOCK_N steps: one tile per program, or (PERSISTENT) a
    grid of at most one program per SM walking them all (as in lora_fwd._lora_fwd_kernel).

    DY: [M, N], W: [N, K], B: [N, RANK], A: [RANK, K], DX: [M, K], all strided. With COMPUTE_DYB, B is
        zero-padded to [N, BLOCK_R] with unit rank stride (see lora_backward_dx).
    USE_TMA: DY and W are host tensor descriptors with blocks [BLOCK_M, BLOCK_N] and [BLOCK_N, BLOCK_K].
    DYB: [M, RANK], unscaled dY @ B in DY's dtype: read when not COMPUTE_DYB, written by the pid_k == 0
        programs when STORE_DYB.
    scaling: s; seed, keep_thr, inv_keep, K8: the forward's dropout mask (helpers.dropout_keep) if DROPOUT.
    BLOCK_R: padded rank (COMPUTE_DYB) or the epilogue's rank chunk; NUM_R_CHUNKS: chunks in the epilogue.
    DY_SCALE: [N], any float dtype, read if HAS_DY_SCALE: every dY tile is scaled by it per column (in fp32,
        rounded back to dY's dtype) before both products, i.e. the kernel differentiates DY_SCALE * Y (DoRA).
    GDC_WAIT: launched with PDL right after the shrink that writes DYB: wait for it before reading DYB.
    INLINE_DYB (PERSISTENT, RANK <= BLOCK_R, no DY_SCALE): the launch computes DYB [M, RANK] itself: programs
        0 .. SHRINK_PROGS - 1 first shrink whole BLOCK_M row blocks of DY with B and publish each in FLAGS
        [cdiv(M, BLOCK_M)] int32, zero at launch (helpers.shrink_row_block); a tile's epilogue waits for its block.
        SHRINK_STAGES: the pipeline depth of that shrink's loop.
    DX_TMA: DX is a tensor descriptor with block [BLOCK_M, BLOCK_K] (out-of-range elements are not written): at the
        128 x 256 tile the pointer store's int64 addresses spilled registers.
    PRODUCER_DYB (PERSISTENT, no DY_SCALE, RANK <= BLOCK_R): as lora_fwd's PRODUCER_XA: the walk's first
        cdiv(M, BLOCK_M) positions are the first K tile of each row block, whose N loop also accumulates dY @ B
        (COMPUTE_DYB's loop) and which stores and publishes it in FLAGS; the other tiles wait for their row block.
        B_TMA (with it): B is a tensor descriptor with block [BLOCK_N, BLOCK_R], else B is padded as for
        COMPUTE_DYB. NUM_R_CHUNKS 0 (the dropout term's own pass): the producers store dY @ B and add no term.
    EPI_SPLIT (DROPOUT without COMPUTE_DYB, not PRODUCER_DYB): 1, or 2 / 4 / 8: the epilogue adds the masked term in
        that many column slices of the tile (`_dx_dropout_epilogue`); a DX descriptor then has block
        [BLOCK_M, BLOCK_K // EPI_SPLIT].
    """
    if PERSISTENT and PRODUCER_DYB:
        row_blocks = tl.cdiv(M, BLOCK_M)
        for pos in range(tl.program_id(0), row_blocks * tl.cdiv(K, BLOCK_K), tl.num_programs(0)):
            if pos < row_blocks:
                _dx_tile(pos, DY, W, B, A, DYB, DX, M, N, K, RANK,
                         stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br, stride_ar, stride_ak,
                         stride_dybm, stride_dybr, stride_dxm, stride_dxk, scaling, seed, keep_thr, inv_keep, K8,
                         DROPOUT, True, True, USE_TMA, BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, NUM_R_CHUNKS,
                         GROUP_M, PRECISION, ACC, DY_SCALE, HAS_DY_SCALE, False, FLAGS, False, DX_TMA, 1, True,
                         B_TMA)
            else:
                _dx_tile(pos - row_blocks, DY, W, B, A, DYB, DX, M, N, K, RANK,
                         stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br, stride_ar, stride_ak,
                         stride_dybm, stride_dybr, stride_dxm, stride_dxk, scaling, seed, keep_thr, inv_keep, K8,
                         DROPOUT, False, False, USE_TMA, BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, NUM_R_CHUNKS,
                         GROUP_M, PRECISION, ACC, DY_SCALE, HAS_DY_SCALE, False, FLAGS, True, DX_TMA, 2, False,
                         B_TMA)
    elif PERSISTENT:
        first = persistent_start(INLINE_DYB, DY, B, DYB, FLAGS, M, N, RANK, stride_dym, stride_dyn, stride_br,
                                 stride_bn, stride_dybm, stride_dybr, SHRINK_PROGS, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_R,
                                 PRECISION, ACC, SHRINK_STAGES, False, seed, keep_thr, inv_keep, K8)
        for tile in range(first, tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_K), tl.num_programs(0)):
            _dx_tile(tile, DY, W, B, A, DYB, DX, M, N, K, RANK,
                     stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br, stride_ar, stride_ak,
                     stride_dybm, stride_dybr, stride_dxm, stride_dxk, scaling, seed, keep_thr, inv_keep, K8,
                     DROPOUT, COMPUTE_DYB, STORE_DYB, USE_TMA, BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, NUM_R_CHUNKS,
                     GROUP_M, PRECISION, ACC, DY_SCALE, HAS_DY_SCALE, GDC_WAIT, FLAGS, INLINE_DYB, DX_TMA,
                     EPI_SPLIT=EPI_SPLIT)
    else:
        _dx_tile(tl.program_id(0), DY, W, B, A, DYB, DX, M, N, K, RANK,
                 stride_dym, stride_dyn, stride_wn, stride_wk, stride_bn, stride_br, stride_ar, stride_ak,
                 stride_dybm, stride_dybr, stride_dxm, stride_dxk, scaling, seed, keep_thr, inv_keep, K8,
                 DROPOUT, COMPUTE_DYB, STORE_DYB, USE_TMA, BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R, NUM_R_CHUNKS,
                 GROUP_M, PRECISION, ACC, DY_SCALE, HAS_DY_SCALE, GDC_WAIT, FLAGS, False, DX_TMA,
                 EPI_SPLIT=EPI_SPLIT)


@triton.jit(do_not_specialize=["M", "seed", "keep_thr"])
def _lora_dx_dropout_term_kernel(
    DYB, A, DX,
    M, K, RANK,
    stride_dybm, stride_dybr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    scaling, seed, keep_thr, inv_keep, K8,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, NUM_R_CHUNKS: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """DX += s * drop'(DYB @ A) on one BLOCK_M x BLOCK_K tile: the dropout term of dX as its own pass.

    DYB: [M, RANK] = dY @ B (unscaled), A: [RANK, K], DX: [M, K] holding dY @ W, all strided;
    grid = (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)). drop' keeps element (m, k) where the forward's mask
    (helpers.dropout_keep of seed, keep_thr, K8) kept x[m, k], scaled by inv_keep.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    low = _rank_term(DYB, A, offs_m, offs_k, mask_m, mask_k, RANK, stride_dybm, stride_dybr, stride_ar, stride_ak,
                     scaling, tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC), BLOCK_R, NUM_R_CHUNKS, PRECISION, ACC)
    keep = dropout_keep(seed, offs_m, pid_k * BLOCK_K, K8, keep_thr, BLOCK_M, BLOCK_K)
    dx_ptrs = DX + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    mask = mask_m[:, None] & mask_k[None, :]
    dx = upcast(tl.load(dx_ptrs, mask=mask, other=0.0)) + tl.where(keep, low * inv_keep, 0.0)
    tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_m_tile(
    U, V, OUT, M, P, Q, ROWS_PER_SPLIT,
    stride_um, stride_up, stride_vm, stride_vq, stride_os, stride_op, stride_oq,
    pid_p, pid_q, pid_s, scaling, seed, keep_thr, inv_keep, K8,
    DROPOUT_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
    DX, A, stride_dxm, stride_dxk, stride_ar, stride_ak, DX_TERM: tl.constexpr,
):
    """OUT[pid_s, p, q] = s * sum over split pid_s's rows m of U[m, p] * drop(V)[m, q], one BLOCK_P x BLOCK_Q tile.

    U: [M, P], V: [M, Q], OUT: [splits, P, Q] (fp32 partials, or the final tensor when splits == 1).
    Split s owns rows [s * ROWS_PER_SPLIT, ...), ROWS_PER_SPLIT a multiple of BLOCK_M. DROPOUT_V applies the
    forward's mask at (m, q) (V = X for dA).
    DX_TERM (dA with DROPOUT_V, the whole rank in one tile: P <= BLOCK_P): with the mask of each step also add
    dX's dropout term to DX [M, Q] in place, DX[m, q] += s * drop'(U @ A)[m, q] with A [P, Q] (U = dY @ B), as
    `_lora_dx_dropout_term_kernel` does: the mask is drawn once for both.
    """
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    row_start = pid_s.to(tl.int64) * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC)
    if DX_TERM:
        a = tl.load(A + offs_p[:, None] * stride_ar + offs_q[None, :] * stride_ak,
                    mask=mask_p[:, None] & mask_q[None, :], other=0.0)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        u_t = tl.load(U + offs_m[None, :] * stride_um + offs_p[:, None] * stride_up,
                      mask=mask_p[:, None] & mask_m[None, :], other=0.0)
        v = tl.load(V + offs_m[:, None] * stride_vm + offs_q[None, :] * stride_vq,
                    mask=mask_m[:, None] & mask_q[None, :], other=0.0)
        if DROPOUT_V:
            keep = dropout_keep(seed, offs_m, pid_q * BLOCK_Q, K8, keep_thr, BLOCK_M, BLOCK_Q)
            v = apply_dropout(v, keep, inv_keep)
            if DX_TERM:  # the rounding of _rank_term: s * dyb rounded to A's dtype, one MMA, masked, added in fp32
                low = dot((tl.trans(u_t).to(ACC) * scaling).to(a.dtype), a,
                          tl.zeros((BLOCK_M, BLOCK_Q), dtype=ACC), PRECISION)
                dx_ptrs = DX + offs_m[:, None] * stride_dxm + offs_q[None, :] * stride_dxk
                dx_mask = mask_m[:, None] & mask_q[None, :]
                dx = upcast(tl.load(dx_ptrs, mask=dx_mask, other=0.0)) + tl.where(keep, low * inv_keep, 0.0)
                tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=dx_mask)
        acc = dot(u_t, v, acc, PRECISION)
    out_ptrs = OUT + pid_s * stride_os + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq
    tl.store(out_ptrs, (acc * scaling).to(OUT.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])


@triton.jit(do_not_specialize=["M", "seed", "keep_thr"])
def _lora_grad_ab_kernel(
    DYB, X, DY, XA, OUT_A, OUT_B,
    M, K, N, RANK, ROWS_PER_SPLIT_A, ROWS_PER_SPLIT_B, TILES_A, SPLITS_A, TILES_B,
    stride_dybm, stride_dybr, stride_xm, stride_xk, stride_dym, stride_dyn, stride_xam, stride_xar,
    stride_oas, stride_oap, stride_oaq, stride_obs, stride_obp, stride_obq,
    scaling, seed, keep_thr, inv_keep, K8,
    DROPOUT: tl.constexpr, BLOCK_RA: tl.constexpr, BLOCK_KA: tl.constexpr, BLOCK_NB: tl.constexpr,
    BLOCK_RB: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    DX, A, stride_dxm, stride_dxk, stride_ar, stride_ak, DX_TERM: tl.constexpr,
):
    """dA and dB in one launch: the first TILES_A * SPLITS_A programs take (tile, split of M) pairs of
    dA = s * DYB^T @ drop(X), the others those of dB = s * DY^T @ XA; neighbouring programs share a split (rows).

    DYB: [M, RANK], X: [M, K], DY: [M, N], XA: [M, RANK]; OUT_A: [SPLITS_A, RANK, K], OUT_B: [splits, N, RANK].
    Tiles: dA BLOCK_RA x BLOCK_KA (TILES_A of them), dB BLOCK_NB x BLOCK_RB (TILES_B); BLOCK_M rows per step;
    split s of dA (dB) owns rows [s * ROWS_PER_SPLIT_A (B), ...).
    DX_TERM (with DROPOUT, RANK <= BLOCK_RA): dA's programs also add dX's dropout term s * drop'(DYB @ A) to
    DX [M, K] in place (A: [RANK, K]), with the mask they draw for dA (_reduce_m_tile).
    """
    pid = tl.program_id(0)
    if pid < TILES_A * SPLITS_A:
        tile = pid % TILES_A
        num_q = tl.cdiv(K, BLOCK_KA)
        _reduce_m_tile(DYB, X, OUT_A, M, RANK, K, ROWS_PER_SPLIT_A,
                       stride_dybm, stride_dybr, stride_xm, stride_xk, stride_oas, stride_oap, stride_oaq,
                       tile // num_q, tile % num_q, pid // TILES_A, scaling, seed, keep_thr, inv_keep, K8,
                       DROPOUT, BLOCK_RA, BLOCK_KA, BLOCK_M, PRECISION, ACC,
                       DX, A, stride_dxm, stride_dxk, stride_ar, stride_ak, DX_TERM)
    else:
        t = pid - TILES_A * SPLITS_A
        tile = t % TILES_B
        num_q = tl.cdiv(RANK, BLOCK_RB)
        _reduce_m_tile(DY, XA, OUT_B, M, N, RANK, ROWS_PER_SPLIT_B,
                       stride_dym, stride_dyn, stride_xam, stride_xar, stride_obs, stride_obp, stride_obq,
                       tile // num_q, tile % num_q, t // TILES_B, scaling, seed, keep_thr, inv_keep, K8,
                       False, BLOCK_NB, BLOCK_RB, BLOCK_M, PRECISION, ACC,
                       DX, A, stride_dxm, stride_dxk, stride_ar, stride_ak, False)


def lora_backward_dx(dy, weight, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, store_dyb=True, dyb_mode="auto",
                     out=None, tma="auto", dy_scale=None, dropout_term=True, term_epilogue="auto"):
    """dX = dY @ W + s * drop'((dY @ B) @ A), fused into one GEMM.

    dy: [M, N], weight: [N, K], lora_A: [r, K], lora_B: [N, r] (any strides, one dtype); scaling, dropout_p
    and seed as in the forward. Returns (dx [M, K], dyb [M, r] = dY @ B unscaled, or None unless store_dyb).
    dyb_mode: "fused" (dyb accumulated inside the GEMM), "shrink" (one extra pass over dY first), "inline" (that
        pass done by the persistent GEMM's own first programs; what "auto" picks at large M), "producer" (dyb
        accumulated by the first K tile of each row block inside its N loop and published to the others), or
        "auto".
        "inline" and "producer" need no dy_scale and r <= 64.
    out: optional preallocated dx [M, K] of dy's dtype and device. tma: as in lora_forward.
    dy_scale: optional [N] vector g: the gradient of y = g * (x @ W^T + s * xa @ B^T): dy is replaced by g * dy
        (per column) inside the kernel, and the returned dyb is (g * dy) @ B (DoRA).
    dropout_term: False (with dropout) returns dx = dY @ W without s * drop'((dY @ B) @ A), for `lora_grad_ab`
        to add with dA's mask (its dx / lora_A arguments); "auto" then never picks "fused" (whose epilogue adds the
        term), store_dyb must be True, and dyb_mode="fused" is refused.
    term_epilogue: with dropout and dY @ B precomputed ("shrink", "inline"), where the term is added: True in the
        GEMM's epilogue, column slice by column slice (`_dx_dropout_epilogue`), False in its own pass over dX
        (`_lora_dx_dropout_term_kernel`), "auto" as DX_DROPOUT_EPILOGUE says. ("producer" always takes the pass.)
    Host work is done once per call signature (kernels/launch.py).

    >>> dx, dyb = lora_backward_dx(dy, W, A, B, 2.0)
    """
    scaling = check_scaling(scaling)
    check_dropout(dropout_p, seed, dy)
    key = plan_key((dy, weight, lora_A, lora_B, out, dy_scale), dropout_p, store_dyb, dyb_mode, tma,
                   dot_precision_key(dy), seed_key(seed), dropout_term, term_epilogue, DX_DROPOUT_EPILOGUE)
    plan = _DX_PLANS.find(key)
    if plan is None:
        plan = _DX_PLANS.put(key, _DxPlan(dy, weight, lora_A, lora_B, dropout_p, store_dyb, dyb_mode, out, tma,
                                          dy_scale, dropout_term, term_epilogue))
    return plan(dy, weight, lora_A, lora_B, scaling, seed, out, dy_scale)


_DX_PLANS = PlanCache()
# With dropout and dY @ B precomputed, whether "auto" puts dX's masked term into the GEMM's epilogue (column slices
# of the tile) instead of a pass of its own (lora_backward_dx's term_epilogue). Off: on the H200 the epilogue's
# mask draw is not hidden by anything (the persistent walk runs it between two tiles' main loops), so dX's backward
# kernels took 470 µs against the own pass's 473 and dA's programs' 480 at r = 16, and 525 against 514 / 503 at
# r = 64 (bench/exp_dx_dropout_epilogue.py, bench/NOTES.md). LORA_FAST_DX_DROPOUT_EPILOGUE=1 turns it on.
DX_DROPOUT_EPILOGUE = os.environ.get("LORA_FAST_DX_DROPOUT_EPILOGUE", "0") == "1"


# Columns per slice of the dropout epilogue. At the 128 x 256 tile with r <= 16, ptxas (sm_90, Triton 3.9) fits
# 32-column slices in 254 registers where 64-column ones spill 56 bytes, yet 64 measured faster on the H200
# (dX 405 against 433 µs: half the slices, each a chain of dependent loads, mask and store). Plans keep the split
# they were built with (launch.clear_plans).
DX_EPILOGUE_COLUMNS = 64
# Where dX takes a `config.mid_tile` (65 rows and more, Hopper, half precision), "auto" accumulates dY @ B in the
# GEMM's loop ("fused") for tiles of at most this many rows and takes a shrink launch first above: with 64-row
# tiles fused measured 1.11-1.21x cuBLAS's dY @ W against 1.13-1.31x (96-256 rows); with 128 x 128 tiles at 256
# rows and K = 14336 the shrink launch 1.31x against 1.73x (H200, graphs, bench/exp_mid_rows.py).
MID_FUSED_DX_BLOCK_M = 64
# ... and ranks up to this block: each of the 64 x 128 tile's 6 stages also holds a [64, rank block] tile of B
# (at 32: 168 KiB of shared memory; at 64 it would be 192 KiB before the epilogue's).
MID_FUSED_DX_RANK_BLOCK = 32


def epilogue_split(block_k: int) -> int:
    """Column slices of a [BLOCK_M, block_k] dX tile for the dropout epilogue: 2, 4 or 8 slices of about
    DX_EPILOGUE_COLUMNS columns (each at least 8 wide: dropout_keep's Philox groups)."""
    return max(2, min(8, block_k // DX_EPILOGUE_COLUMNS, block_k // 8))


class _DxPlan:
    """`lora_backward_dx` for one call signature: every check and choice made once (kernels/launch.py)."""

    def __init__(self, dy, weight, lora_A, lora_B, dropout_p, store_dyb, dyb_mode, out, tma, dy_scale,
                 dropout_term=True, term_epilogue="auto"):
        check_flag(store_dyb, "store_dyb")
        check_flag(dropout_term, "dropout_term")
        if not (isinstance(term_epilogue, bool) or term_epilogue == "auto"):
            raise ValueError(f"term_epilogue must be 'auto', True or False, got {term_epilogue!r}")
        defer_term = dropout_p > 0.0 and not dropout_term
        if defer_term and not store_dyb:
            raise ValueError("dropout_term=False needs store_dyb=True (lora_grad_ab adds the term from dyb)")
        M, N = matrix_shape(dy, "dy")
        K, rank = matrix_shape(weight, "weight")[1], lora_A.shape[0]
        check_shapes(dy=(dy, (M, N)), weight=(weight, (N, K)), lora_A=(lora_A, (rank, K)),
                     lora_B=(lora_B, (N, rank)))
        check_vector("dy_scale", dy_scale, N, dy)
        dx_strides = _output(out, (M, K), dy, "out").stride() if out is not None else (K, 1)  # a new dx: contiguous
        sms = fill_sms(dy.device)
        mid = mid_tile("dx", M, dy.dtype, K, sms)
        if dyb_mode == "auto":
            dyb_mode = choose_xa_mode(M, rank, dropout=False)
            if mid is not None:  # 64-row tiles: dY @ B in the loop; 128 x 128: a shrink launch first
                dyb_mode = ("fused" if mid.block_m <= MID_FUSED_DX_BLOCK_M
                            and next_pow2_rank(rank) <= MID_FUSED_DX_RANK_BLOCK else "shrink")
            # dY @ B inside the persistent GEMM (as lora_forward's "inline" xa; its dropout term, if any, still
            # gets its own pass), except with DoRA's column scale, which its shrinking programs do not apply
            # (its shrinking programs, "inline": producer tiles measured slower for dX, 1.052-1.127x cuBLAS against
            # 1.033-1.084x at four shapes on the H200, bench/NOTES.md)
            if (dyb_mode == "shrink" and dy_scale is None and mid is None
                    and inline_pays(M, rank, False, dy.dtype, "dx")):
                dyb_mode = "inline"
            if dyb_mode == "fused" and defer_term:  # its epilogue adds the term: take the shrink launch instead
                dyb_mode = "shrink"
        if dyb_mode == "fused" and defer_term:
            raise ValueError("dropout_term=False needs a dyb_mode with the term in its own pass ('shrink', "
                             "'inline' or 'producer'), got 'fused'")
        if dyb_mode not in ("fused", "shrink", "inline", "producer"):
            raise ValueError(f"dyb_mode must be 'auto', 'fused', 'shrink', 'inline' or 'producer', got {dyb_mode!r}")
        if dyb_mode in ("inline", "producer") and (dy_scale is not None
                                                   or next_pow2_rank(rank) > EPILOGUE_RANK_BLOCK):
            raise ValueError(f"dyb_mode={dyb_mode!r} needs no dy_scale and a rank <= {EPILOGUE_RANK_BLOCK}, got "
                             f"rank {rank}{' and a dy_scale' if dy_scale is not None else ''}")
        self.dx_shape, self.dyb_shape, self.launch = (M, K), (M, rank), None
        # "inline" is "shrink" with dY @ B computed by the GEMM's own shrinking programs (helpers.shrink_row_block),
        # "producer" by the first K tile of each row block inside its N loop (PRODUCER_DYB); both publish by flags
        self.producer = dyb_mode == "producer"
        self.inline = dyb_mode in ("inline", "producer")
        self.shrink = dyb_mode in ("shrink", "inline", "producer")
        self.new_dyb = store_dyb and not self.shrink
        self.pad_b, self.zero_dyb, self.term = None, store_dyb, None
        if M == 0 or K == 0:
            self.shrink, self.new_dyb, self.inline, self.producer = False, False, False, False
            return
        compute = not self.shrink
        # the GEMM starts while the shrink of dY @ B runs (programmatic dependent launch, helpers.pdl_enabled)
        self.pdl = self.shrink and not self.inline and pdl_enabled(dy.device)
        block_r = next_pow2_rank(rank) if compute else min(EPILOGUE_RANK_BLOCK, next_pow2_rank(rank))
        # With dropout and dY @ B precomputed, the dropout term is a second pass over dX (read, add, write: measured
        # 87 µs at M=8192, K=4096 on the H200, mostly the Philox mask), so that the GEMM keeps the large tile of the dropout-free dX; inside the
        # GEMM's epilogue the mask and a second accumulator forced half the tile (bench/NOTES.md).
        # (with dropout_term=False there is no such pass: lora_grad_ab adds the term, dx_term_in_grad_ab)
        term_pass = dropout_p > 0.0 and self.shrink
        # ... or in the GEMM's epilogue, a column slice of the tile at a time (one tile-sized accumulator live)
        epilogue = (term_pass and not defer_term and not self.producer
                    and (DX_DROPOUT_EPILOGUE if term_epilogue == "auto" else term_epilogue))
        if term_pass and not defer_term and not epilogue:
            tcfg = dx_dropout_term_config()
            self.term = Launch(
                _lora_dx_dropout_term_kernel, (cdiv(M, tcfg.block_m), cdiv(K, tcfg.block_n)),
                ("DYB", "A", "DX", "scaling", "seed"), None, None, None, M, K, rank,
                rank, 1, lora_A.stride(0), lora_A.stride(1), *dx_strides,  # dyb: a new contiguous [M, r]
                None, None, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), cdiv(K, 8),
                BLOCK_M=tcfg.block_m, BLOCK_K=tcfg.block_n, BLOCK_R=block_r, NUM_R_CHUNKS=cdiv(rank, block_r),
                PRECISION=dot_precision(dy.dtype), ACC=acc_dtype(dy.dtype), **tcfg.launch(),
            )
        cfg = gemm_config("dx_dropout" if dropout_p > 0.0 and not term_pass else "dx", M, dy.dtype,
                          block_r if compute else 0, K, sms)
        split = epilogue_split(cfg.block_n) if epilogue else 1
        if self.inline:  # the shrinking programs need the persistent walk
            cfg = replace(cfg, persistent=True)
        if dy_scale is not None and cfg.persistent:
            # On the H200 with Triton 3.6 the persistent walk with the per-column dY scale (DoRA) gave wrong dX at
            # M=8192 (relative error 0.3; right under the interpreter and one tile per program): not used there.
            cfg = replace(cfg, persistent=False)
        b_strides = lora_B.stride()
        self.use_tma = tma_enabled(tma if tma != "auto" else ("auto" if cfg.tma else False), dy, weight)
        # producer tiles load B through a descriptor where it allows one (columns past the rank read as zero)
        self.b_tma = self.producer and self.use_tma and tma_enabled(True, lora_B)
        self.b_block = [cfg.block_k, block_r]
        if (compute or (self.producer and not self.b_tma)) and (lora_B.stride(1) != 1 or rank != block_r):
            # The in-loop B tile is read unmasked along the rank from a [N, BLOCK_R] zero-padded copy (N * BLOCK_R
            # elements, tiny): on the H100 with Triton 3.6, a pipelined load of B's rows masked to an odd rank
            # (r = 3, 12) gave wrong results at the large tile config, while unit-stride padded rows were right.
            self.pad_b, b_strides = (N, block_r), (block_r, 1)
        has_dyb = self.shrink or self.new_dyb
        dyb_strides = (rank, 1) if has_dyb else dx_strides  # a new contiguous [M, r], or dx standing in
        self.dy_block, self.w_block = [cfg.block_m, cfg.block_k], [cfg.block_k, cfg.block_n]
        # dX through a descriptor too (as lora_fwd's y): a new dx needs 16-byte rows, a given one TMA's rules (not
        # with producer tiles: two N loops and two epilogues leave no room for the store's tile buffer)
        self.dx_tma = self.use_tma and cfg.tma_store and not self.producer and (
            tma_enabled(True, out) if out is not None else (K * dy.element_size()) % 16 == 0)
        self.dx_block = [cfg.block_m, cfg.block_n // split]
        tiles = cdiv(M, cfg.block_m) * cdiv(K, cfg.block_n)
        grid, shrink_progs = min(tiles, num_sms(dy.device)) if cfg.persistent else tiles, 0
        self.row_blocks = cdiv(M, cfg.block_m)
        if self.producer:  # under the interpreter (programs run in id order) one program walks every tile
            grid = 1 if is_interpret() else grid
        elif self.inline:
            grid, shrink_progs = inline_shrink_grid(tiles, self.row_blocks, num_sms(dy.device))
        self.launch = Launch(
            _lora_bwd_dx_kernel, (grid,),
            ("DY", "W", "B", "A", "DYB", "DX", "scaling", "seed", "DY_SCALE", "FLAGS"),
            None, None, None, None, None, None,
            M, N, K, rank,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), *b_strides,
            lora_A.stride(0), lora_A.stride(1), *dyb_strides, *dx_strides,
            None, None, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), cdiv(K, 8),
            DROPOUT=dropout_p > 0.0 and (epilogue or not term_pass), COMPUTE_DYB=compute,
            STORE_DYB=compute and store_dyb,
            USE_TMA=self.use_tma, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_n, BLOCK_N=cfg.block_k, BLOCK_R=block_r,
            # no rank chunks when the dropout term has its own pass: the GEMM computes dY @ W alone
            NUM_R_CHUNKS=1 if compute else 0 if term_pass and not epilogue else cdiv(rank, block_r),
            GROUP_M=cfg.group_m,
            PRECISION=dot_precision(dy.dtype), ACC=acc_dtype(dy.dtype),
            DY_SCALE=None, HAS_DY_SCALE=dy_scale is not None, PERSISTENT=cfg.persistent, GDC_WAIT=self.pdl,
            FLAGS=None, SHRINK_PROGS=shrink_progs, INLINE_DYB=self.inline and not self.producer,
            DX_TMA=self.dx_tma, SHRINK_STAGES=cfg.shrink_stages or cfg.num_stages, PRODUCER_DYB=self.producer,
            B_TMA=self.b_tma, EPI_SPLIT=split, **cfg.launch(),
            **({"launch_pdl": True} if self.pdl else {}),
        )

    def __call__(self, dy, weight, lora_A, lora_B, scaling, seed, out, dy_scale):
        dx = out if out is not None else torch.empty(self.dx_shape, device=dy.device, dtype=dy.dtype)
        if self.launch is None:
            return dx, (torch.zeros(self.dyb_shape, device=dy.device, dtype=dy.dtype) if self.zero_dyb else None)
        flags = None
        if self.inline:
            dyb = torch.empty(self.dyb_shape, device=dy.device, dtype=dy.dtype)
            flags = torch.zeros(self.row_blocks, device=dy.device, dtype=torch.int32)  # zero at launch
        elif self.shrink:
            # (g * dy) @ B = dy @ (g * B): fold the column scale into the [N, r] factor rather than into dy.
            b_shrink = lora_B if dy_scale is None else (lora_B * dy_scale[:, None]).to(lora_B.dtype)
            dyb = lora_shrink(dy, b_shrink.t(), trigger=self.pdl)
        elif self.new_dyb:
            dyb = torch.empty(self.dyb_shape, device=dy.device, dtype=dy.dtype)
        else:
            dyb = None
        b_arg = lora_B
        if self.pad_b is not None:
            b_arg = lora_B.new_zeros(self.pad_b)
            b_arg[:, :lora_B.shape[1]] = lora_B
        if self.use_tma:
            dy, weight = tensor_descriptor(dy, self.dy_block), tensor_descriptor(weight, self.w_block)
        if self.b_tma:
            b_arg = tensor_descriptor(b_arg, self.b_block)
        self.launch(dy, weight, b_arg, lora_A, dyb if dyb is not None else dx,
                    tensor_descriptor(dx, self.dx_block) if self.dx_tma else dx, float(scaling), seed_arg(seed),
                    dy_scale if dy_scale is not None else dx, flags if flags is not None else dx)
        if self.term is not None:
            self.term(dyb, lora_A, dx, float(scaling), seed_arg(seed))
        return dx, dyb


@triton.jit
def _sum_block(P, OUT, NUM, SPLITS, block, BLOCK: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """OUT[i] = sum over s < SPLITS of P[s, i] (in P's dtype), for the BLOCK elements i of `block` below NUM.

    SPLIT_CHUNK splits are loaded at once ([SPLIT_CHUNK, BLOCK]) and added by tl.sum, chunk after chunk: a fixed
    order, so the result is the same on every call. (One load per split made dA's 32 dropout splits a chain of
    32 dependent loads: 17.5 µs a launch on the H200 at r = 16, K = 4096, against ~3 µs for 5 splits.)
    """
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUM
    rows = tl.arange(0, SPLIT_CHUNK)
    acc = tl.zeros((BLOCK,), dtype=P.dtype.element_ty)
    for s0 in range(0, SPLITS, SPLIT_CHUNK):
        s = s0 + rows
        part = tl.load(P + s.to(tl.int64)[:, None] * NUM + offs[None, :], mask=(s < SPLITS)[:, None] & mask[None, :],
                       other=0.0)
        acc += tl.sum(part, axis=0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["SPLITS_A", "SPLITS_B"])
def _sum_splits_kernel(PA, PB, OUT_A, OUT_B, NUM_A, NUM_B, SPLITS_A, SPLITS_B, BLOCK: tl.constexpr,
                       SPLIT_CHUNK: tl.constexpr):
    """The final dA and dB from `_lora_grad_ab_kernel`'s partial sums, in one launch.

    PA: [SPLITS_A, NUM_A] and PB: [SPLITS_B, NUM_B] (contiguous, NUM = P * Q of each output; fp32, fp64 for fp64),
    OUT_A: [NUM_A], OUT_B: [NUM_B] in their own dtypes. Programs 0 .. cdiv(NUM_A, BLOCK) - 1 sum A's elements, the
    rest B's (NUM_A or NUM_B is 0 when that output needs no sum). Summed in the partials' dtype in a fixed order
    (_sum_block), rounded once. NUM_A and NUM_B are specialised (Triton's divisibility by 16 keeps the partials'
    loads 16 bytes wide; unspecialised, every thread loaded single elements); the split counts are not.
    """
    pid = tl.program_id(0)
    blocks_a = tl.cdiv(NUM_A, BLOCK)
    if pid < blocks_a:
        _sum_block(PA, OUT_A, NUM_A, SPLITS_A, pid, BLOCK, SPLIT_CHUNK)
    else:
        _sum_block(PB, OUT_B, NUM_B, SPLITS_B, pid - blocks_a, BLOCK, SPLIT_CHUNK)


# Elements per program of `_sum_splits_kernel`, and the splits it loads at once (SPLIT_CHUNK x SUM_BLOCK fp32
# elements per program per step: 32 per thread at 4 warps).
SUM_BLOCK = 512
SUM_SPLIT_CHUNK = 8


def lora_grad_ab(x, dy, xa, dyb, scaling, a_dtype, b_dtype, dropout_p=0.0, seed=0, need_a=True, need_b=True,
                 dx=None, lora_A=None):
    """dA = s * dyb^T @ drop(x) and dB = s * dy^T @ xa, in one launch.

    x: [M, K], dy: [M, N], xa: [M, r] (= drop(x) @ A^T from the forward), dyb: [M, r] (= dy @ B).
    Returns (dA [r, K] in a_dtype or None, dB [N, r] in b_dtype or None). Both reduce over M, split so that the
    small outputs still fill the GPU; with several splits each output has an fp32 partial-sum buffer, summed in a
    fixed order. Host work is done once per call signature (kernels/launch.py).
    dx, lora_A (both or neither; with dropout_p > 0, need_a and r <= DX_TERM_MAX_RANK): dx [M, K] is dY @ W from
    `lora_backward_dx(..., dropout_term=False)` and lora_A [r, K]; dA's programs add dX's dropout term
    s * drop'(dyb @ A) to dx in place, with the mask they draw for dA (one draw of the mask instead of two).

    >>> dA, dB = lora_grad_ab(x, dy, xa, dyb, 2.0, A.dtype, B.dtype)
    >>> dx, dyb = lora_backward_dx(dy, W, A, B, 2.0, 0.1, seed, dropout_term=False)
    >>> dA, dB = lora_grad_ab(x, dy, xa, dyb, 2.0, A.dtype, B.dtype, 0.1, seed, dx=dx, lora_A=A)  # dx complete now
    """
    scaling = check_scaling(scaling)
    check_dropout(dropout_p, seed, x)
    key = plan_key((x, dy, xa, dyb, dx, lora_A), a_dtype, b_dtype, dropout_p, need_a, need_b, dot_precision_key(x),
                   seed_key(seed))
    plan = _AB_PLANS.find(key)
    if plan is None:
        plan = _AB_PLANS.put(key, _GradABPlan(x, dy, xa, dyb, a_dtype, b_dtype, dropout_p, need_a, need_b, dx,
                                              lora_A))
    return plan(x, dy, xa, dyb, scaling, seed, dx, lora_A)


_AB_PLANS = PlanCache()
# With dropout, dA's programs per SM (see _GradABPlan).
DROPOUT_DA_PROGRAMS_PER_SM = 8
# The largest rank whose dX dropout term dA's programs take over (their tile then covers the whole rank).
DX_TERM_MAX_RANK = 64
# dA's step with dX's term: rows per step, K columns per tile, warps (_GradABPlan; plans keep the tile they were
# built with).
DX_TERM_TILE = (32, 64, 4)
# Whether training steps leave dX's dropout term to dA's programs (dx_term_in_grad_ab).
DX_TERM_IN_AB = os.environ.get("LORA_FAST_DX_TERM_IN_AB", "1") != "0"


def dx_term_in_grad_ab(m: int, rank: int, dropout_p: float) -> bool:
    """Whether a training step should leave dX's dropout term to `lora_grad_ab` (dX with dropout_term=False, dA
    with dx and lora_A): with dropout, above MAX_FUSED_ROWS rows (where "auto" gives dX a separate term pass
    anyway), rank <= DX_TERM_MAX_RANK. LORA_FAST_DX_TERM_IN_AB=0 turns it off (the results are identical)."""
    return (DX_TERM_IN_AB and not DX_DROPOUT_EPILOGUE and dropout_p > 0.0 and m > MAX_FUSED_ROWS
            and 1 <= rank <= DX_TERM_MAX_RANK)


class _GradABPlan:
    """`lora_grad_ab` for one call signature: checks, configs, split count and grid chosen once."""

    def __init__(self, x, dy, xa, dyb, a_dtype, b_dtype, dropout_p, need_a, need_b, dx=None, lora_A=None):
        check_flag(need_a, "need_a")
        check_flag(need_b, "need_b")
        check_dtype(a_dtype, "a_dtype", none_ok=False)
        check_dtype(b_dtype, "b_dtype", none_ok=False)
        if need_a and dyb is None:
            raise ValueError("dyb (dy @ lora_B, [M, r]) is required for dA (need_a=True)")
        if need_b and xa is None:
            raise ValueError("xa (drop(x) @ lora_A^T, [M, r]) is required for dB (need_b=True)")
        if xa is None and dyb is None:
            raise ValueError("xa or dyb is required: they give the rank (need_a and need_b are both False)")
        (M, K), N = matrix_shape(x, "x"), matrix_shape(dy, "dy")[1]
        rank = matrix_shape(xa, "xa")[1] if xa is not None else matrix_shape(dyb, "dyb")[1]
        check_shapes(x=(x, (M, K)), dy=(dy, (M, N)), xa=(xa if need_b else None, (M, rank)),
                     dyb=(dyb if need_a else None, (M, rank)))
        self.dx_term = dx is not None or lora_A is not None
        if self.dx_term:
            if dx is None or lora_A is None:
                raise ValueError("dx and lora_A go together (dX's dropout term added by dA's programs)")
            if not (dropout_p > 0.0 and need_a and rank <= DX_TERM_MAX_RANK):
                raise ValueError(f"dx / lora_A (dX's dropout term) need dropout_p > 0, need_a and a rank <= "
                                 f"{DX_TERM_MAX_RANK}; got dropout_p={dropout_p}, need_a={need_a}, rank {rank}")
            check_shapes(x=(x, (M, K)), dx=(dx, (M, K)), lora_A=(lora_A, (rank, K)))
        self.need_a, self.need_b, self.a_dtype, self.b_dtype = need_a, need_b, a_dtype, b_dtype
        self.shape_a, self.shape_b, self.launch = (rank, K), (N, rank), None
        if M == 0 or not (need_a or need_b):
            return
        cfg_a = reduce_m_config(rank, K, x.dtype)
        cfg_b = reduce_m_config(N, rank, x.dtype)
        if self.dx_term:
            # The term needs the whole rank in each dA tile, and its [rows, K tile] accumulator, dX tile and mask
            # next to dA's: a [64, 128] step spilled (ptxas for sm_90, Triton 3.9: 1.2 KB of stack), [32, 64] fits.
            cfg_a = replace(cfg_a, block_m=max(cfg_a.block_m, next_pow2_rank(rank)),
                            block_n=min(cfg_a.block_n, DX_TERM_TILE[1]), block_k=min(cfg_a.block_k, DX_TERM_TILE[0]),
                            num_warps=DX_TERM_TILE[2] if not is_interpret() else cfg_a.num_warps)
        tiles_a = cdiv(rank, cfg_a.block_m) * cdiv(K, cfg_a.block_n) if need_a else 0
        tiles_b = cdiv(N, cfg_b.block_m) * cdiv(rank, cfg_b.block_n) if need_b else 0
        # Splits of M: enough programs to fill the GPU twice over. With dropout, dA's programs also draw the
        # Philox mask over all of x, integer work that needs many warps per SM to hide its latency: dA alone gets
        # DROPOUT_DA_PROGRAMS_PER_SM programs per SM (at M=8192, K=4096 the mask took dA from 36 to 131 µs on the
        # H200 with the shared split count, 5 splits: bench/NOTES.md).
        both = cdiv(2 * num_sms(x.device), max(1, tiles_a + tiles_b))
        want_a = cdiv(DROPOUT_DA_PROGRAMS_PER_SM * num_sms(x.device), max(1, tiles_a)) if dropout_p > 0 else both
        self.splits_a, rows_a = self._split(M, cfg_a.block_k, want_a)
        self.splits_b, rows_b = self._split(M, cfg_a.block_k, both)
        # Two outputs, each [splits, P, Q] of fp32 partials, or (one split) the final [P, Q] tensor in its own
        # dtype with a zero split stride: no slicing, views or casts afterwards (each torch op costs host time).
        part = torch.promote_types(x.dtype, torch.float32)
        self.out_a = self._buffer(self.shape_a, self.splits_a, a_dtype, part) if need_a else None
        self.out_b = self._buffer(self.shape_b, self.splits_b, b_dtype, part) if need_b else None
        # a missing output's placeholder is the other one (never written: its tile count is zero)
        sa = self._strides(*(self.out_a if need_a else self.out_b))
        sb = self._strides(*(self.out_b if need_b else self.out_a))
        u_a = dyb if need_a else x  # placeholders are never read: their tile count is zero
        v_b = xa if need_b else x
        dx_strides = dx.stride() if self.dx_term else (0, 0)
        a_strides = lora_A.stride() if self.dx_term else (0, 0)
        self.launch = Launch(
            _lora_grad_ab_kernel, (tiles_a * self.splits_a + tiles_b * self.splits_b,),
            ("DYB", "X", "DY", "XA", "OUT_A", "OUT_B", "scaling", "seed", "DX", "A"),
            None, None, None, None, None, None,
            M, K, N, rank, rows_a, rows_b, tiles_a, self.splits_a, tiles_b,
            u_a.stride(0), u_a.stride(1), x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), v_b.stride(0),
            v_b.stride(1), *sa, *sb,
            None, None, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), cdiv(K, 8),
            DROPOUT=dropout_p > 0.0, BLOCK_RA=cfg_a.block_m, BLOCK_KA=cfg_a.block_n, BLOCK_NB=cfg_b.block_m,
            BLOCK_RB=cfg_b.block_n, BLOCK_M=cfg_a.block_k, PRECISION=dot_precision(x.dtype), ACC=acc_dtype(x.dtype),
            DX=None, A=None, stride_dxm=dx_strides[0], stride_dxk=dx_strides[1], stride_ar=a_strides[0],
            stride_ak=a_strides[1], DX_TERM=self.dx_term, **cfg_a.launch(),
        )
        # the partial sums' final add, both outputs in one launch (none when each has one split)
        self.sum_a = rank * K if need_a and self.splits_a > 1 else 0
        self.sum_b = N * rank if need_b and self.splits_b > 1 else 0
        self.sums = None
        if self.sum_a or self.sum_b:
            self.sums = Launch(_sum_splits_kernel, (cdiv(self.sum_a, SUM_BLOCK) + cdiv(self.sum_b, SUM_BLOCK),),
                               ("PA", "PB", "OUT_A", "OUT_B"), None, None, None, None, self.sum_a, self.sum_b,
                               self.splits_a, self.splits_b, BLOCK=SUM_BLOCK,
                               SPLIT_CHUNK=min(SUM_SPLIT_CHUNK, triton.next_power_of_2(max(self.splits_a,
                                                                                           self.splits_b))),
                               num_warps=4)

    @staticmethod
    def _split(M, block_rows, want):
        """(splits, rows per split) of M for about `want` splits: whole BLOCK_M steps per split, none empty."""
        m_blocks = cdiv(M, block_rows)
        rows = cdiv(m_blocks, max(1, min(m_blocks, want))) * block_rows
        return cdiv(M, rows), rows

    @staticmethod
    def _buffer(pq, splits, dtype, part):
        """(shape, dtype) of an output buffer: [splits, P, Q] fp32 partials, or [P, Q] itself for one split."""
        return (pq, dtype) if splits == 1 else ((splits, *pq), part)

    @staticmethod
    def _strides(shape, dtype):
        """(split, row, col) strides of a new contiguous buffer of `shape` (split stride 0 when it is [P, Q])."""
        if len(shape) == 2:
            return (0, shape[1], 1)
        return (shape[1] * shape[2], shape[2], 1)

    def __call__(self, x, dy, xa, dyb, scaling, seed, dx=None, lora_A=None):
        if self.launch is None:
            return (torch.zeros(self.shape_a, device=x.device, dtype=self.a_dtype) if self.need_a else None,
                    torch.zeros(self.shape_b, device=x.device, dtype=self.b_dtype) if self.need_b else None)
        out_a = torch.empty(self.out_a[0], device=x.device, dtype=self.out_a[1]) if self.need_a else None
        out_b = torch.empty(self.out_b[0], device=x.device, dtype=self.out_b[1]) if self.need_b else None
        oa = out_a if out_a is not None else out_b
        ob = out_b if out_b is not None else out_a
        self.launch(dyb if self.need_a else x, x, dy, xa if self.need_b else x, oa, ob, float(scaling), seed_arg(seed),
                    dx if dx is not None else x, lora_A if lora_A is not None else x)
        if self.sums is None:
            return out_a, out_b
        # (torch's sum(0, dtype=bf16) would round every fp32 partial to bf16 first, in a copy kernel of its own)
        da = torch.empty(self.shape_a, device=x.device, dtype=self.a_dtype) if self.sum_a else out_a
        db = torch.empty(self.shape_b, device=x.device, dtype=self.b_dtype) if self.sum_b else out_b
        pa = out_a if self.sum_a else None
        pb = out_b if self.sum_b else None
        self.sums(pa if pa is not None else pb, pb if pb is not None else pa,
                  da if self.sum_a else db, db if self.sum_b else da)
        return da, db
