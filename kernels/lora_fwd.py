"""Fused LoRA forward: Y = X @ W^T + b + s * (drop(X) @ A^T) @ B^T in one launch.

Each program owns a BLOCK_M x BLOCK_N tile of Y and walks K once, accumulating X @ W^T in fp32. The rank-r
product xa = drop(X) @ A^T [M, r] comes one of four ways (`xa_mode`):
  * "fused": the same K loop also accumulates xa for its rows, reusing the X tile already loaded. This costs
    r / BLOCK_N more MMA work (6 % at r=16, BLOCK_N=256) and reads X once. Programs of the first N tile store
    xa for the backward. Used without dropout and at small padded rank.
  * "shrink": `lora_shrink` computes xa once (one extra read of X, the dropout mask drawn once per element) and
    the kernel loads it. Used with dropout (the mask would otherwise be redrawn for every N tile) and at large
    rank (the xa accumulator would crowd out the GEMM's registers).
  * "split": `lora_shrink_partials` computes xa as fp32 partial sums over K ranges,
    which the epilogue adds up. On Hopper the GEMM is launched with PDL while the shrink runs: its programs stream
    W at once and wait for xa only before the epilogue, so neither a second pass nor a redundant xa per N tile
    (each of N / BLOCK_N programs reading all of A) is on the critical path. The shrink draws the dropout mask;
    the first N tile's programs store the rounded xa for the backward. Where PDL is available
    (helpers.pdl_enabled; without it this would be two launches in a row) "auto" picks it up to MAX_SPLIT_ROWS
    rows, from 65 rows on `config.mid_tile`'s tiles (except the shrink launch at <= MID_SHRINK_ROWS rows without
    dropout), and on the large tile up to SPLIT_MAX_ROWS rows at rank blocks <= SPLIT_MAX_RANK_BLOCK.
  * "inline" (large M, r <= 64): the persistent GEMM computes xa itself. Its first programs, those
    with a tile fewer to walk when the tile count is not a multiple of the grid, first shrink whole row blocks and
    publish each through a flag; a tile's epilogue waits for its row block's flag (helpers.shrink_row_block).
    One launch instead of two, and the extra read of X runs in the last wave's idle time. With dropout the
    shrinking programs draw the mask (on request: measured slower than the shrink launch, INLINE_DROPOUT).
  * "producer" (what "auto" picks where "inline" would pay, above SPLIT_MAX_ROWS rows or at wider ranks): the persistent GEMM's walk starts with one producer
    tile per row block (its first N tile), whose K loop also accumulates xa from the X tiles it loads anyway
    ("fused"'s loop, for one tile in N / BLOCK_N); it stores and publishes xa before its own epilogue, and the
    other tiles of the row block wait for that flag. No extra read of X: on the H200 at 8192 x 4096 x 4096,
    r = 16 it measured 1.074x / 1.084x cuBLAS against "inline"'s 1.087x / 1.106x in two runs (bench/NOTES.md).
With "shrink" the GEMM is likewise launched with PDL after the shrink where available.
Either way the epilogue adds (s * xa) @ B^T as one more small MMA, then the bias, and writes Y once: there is
no [M, N] temporary and no dropout copy of X.
"""
import os
from dataclasses import replace

import torch
import triton
import triton.language as tl

from .config import fill_sms, gemm_config, mid_tile, num_sms
from .helpers import (
    acc_dtype, apply_dropout, cdiv, check_dropout, check_flag, check_scaling, check_shapes, check_vector, dot,
    dot_precision, dot_precision_key, dropout_keep, dropout_threshold, gdc_wait_if, inline_shrink_grid,
    is_interpret, matrix_shape, next_pow2_rank, pdl_enabled, persistent_start, publish_row_block, seed_arg,
    tensor_descriptor, tma_enabled, wait_row_block, walk_tile,
)
from .launch import Launch, PlanCache, plan_key, seed_key
from .lora_shrink import lora_shrink, lora_shrink_partials, shrink_splits

# Widest padded rank whose xa accumulator is kept next to a large GEMM tile ("fused" mode).
MAX_FUSED_RANK_BLOCK = 64
# Decode (M <= DECODE_ROWS): the rank block is padded to at least DECODE_RANK_BLOCK (masked, so no extra bytes):
# under CUDA graphs on the H100, r=64 ran at 1.01x the base linear while r=16 ran at 1.17-1.23x.
DECODE_ROWS = 16
DECODE_RANK_BLOCK = 64
# Largest M for which "fused" beats "shrink" (H100 sweep, bench/NOTES.md).
MAX_FUSED_ROWS = 256
# Rank chunk loaded per step in the epilogue when xa is precomputed: bounds the registers at any rank.
EPILOGUE_RANK_BLOCK = 64
# "split" mode: K ranges of the decode shrink (each program then reads 1 / XA_SPLITS of A), and the most rows
# for which "auto" picks it where PDL is available (H200, K = N = 4096, r = 16, graphs: bench/NOTES.md).
XA_SPLITS = 8
MAX_SPLIT_ROWS = 64
# From 65 rows, where the forward takes a `config.mid_tile` (Hopper, half precision), "auto" takes "shrink" up to
# MID_SHRINK_ROWS rows without dropout and "split" otherwise: at 96-128 rows the shrink launch measured 1.19-1.26x
# the base against 1.30-1.41x for "split"; from 256 rows, and with dropout (the shrink launch's few programs each
# walk all of K drawing the mask), "split" won: 1.34x against 1.57x at 256 rows, 1.30x / 1.50x at 512, 1.42x / 2.21x
# at 128 rows with dropout 0.1 (H200, K = N = 4096, r = 16, graphs, bench/exp_mid_rows.py).
MID_SHRINK_ROWS = 128
# Above the mid tiles, up to SPLIT_MAX_ROWS rows (half precision, PDL), "auto" keeps "split" with the large tile
# rather than the persistent walk's producer tiles: 1.13x / 1.11x the base at 1024 / 2048 rows against 1.42x / 1.25x
# (1.37x against 1.74x at 768), 1.12x against 1.11x at 4096, 1.13x against 1.07x at 8192; with dropout 1.19x against
# the shrink launch's 1.71x at 1024 and 1.20x against 1.22x at 4096 (H200, K = N = 4096, r = 16, graphs,
# bench/exp_mid_rows.py).
SPLIT_MAX_ROWS = 4096
# ... at ranks up to this block: the large tile's 3 stages and 64 KiB store buffer leave room for the epilogue's
# B chunk and partial sums of a 16-wide rank block (at r = 128, a 64-wide chunk needed 240 KiB of shared memory on
# the H200, over its 227 KiB).
SPLIT_MAX_RANK_BLOCK = 16
# "auto" may compute xa inside the persistent GEMM (the forward's "producer" tiles, dX's "inline" shrink:
# `inline_pays`); LORA_FAST_INLINE=0 turns that off (a shrink launch first; the results agree to rounding).
INLINE_SHRINK = os.environ.get("LORA_FAST_INLINE", "1") != "0"
# With dropout, "auto" takes the producer tiles (which then draw the mask) where it takes them without dropout,
# instead of a shrink launch first; a module switch for bench/exp_dropout_producer.py (part of the plan key).
PRODUCER_DROPOUT = False
# With dropout, whether "auto" takes "inline" (the GEMM's first programs draw the mask while they shrink whole row
# blocks) where it takes producer tiles without dropout, instead of a shrink launch first; its shrinking programs
# then take at most DROPOUT_SHRINK_AHEAD row blocks each. Off (LORA_FAST_INLINE_DROPOUT=1 turns it on): on the H200
# at 8192 x 4096 x 4096 the forward's kernels took 449 µs (one block each; 489 with two) against the shrink
# launch + GEMM's 414 at r = 16, 464 / 508 against 445 at r = 64 (bench/exp_inline_dropout.py). Both are part of the
# plan key.
INLINE_DROPOUT = os.environ.get("LORA_FAST_INLINE_DROPOUT", "0") == "1"
DROPOUT_SHRINK_AHEAD = 1


@triton.jit
def _fwd_tile(
    tile, X, W, A, B, BIAS, XA, Y,
    M, N, K, RANK,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xam, stride_xar, stride_ym, stride_yn,
    scaling, seed, keep_thr, inv_keep, K8,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_XA: tl.constexpr, STORE_XA: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_R_CHUNKS: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    OUT_SCALE, HAS_OUT_SCALE: tl.constexpr, Y_TMA: tl.constexpr,
    XA_OUT, stride_xas, XA_SPLITS: tl.constexpr, GDC_WAIT: tl.constexpr, FLAGS, INLINE_XA: tl.constexpr,
    TILE_MAP: tl.constexpr = 0, PUBLISH: tl.constexpr = False, A_TMA: tl.constexpr = False,
):
    """Output tile number `tile` of `_lora_fwd_kernel`, whose docstring gives the arguments.

    TILE_MAP: helpers.walk_tile's (1: the first N tile of row block `tile`, a producer). PUBLISH (with
    COMPUTE_XA, STORE_XA): once the tile has stored its rows' xa, release FLAGS[row block] = 1 (before its own
    epilogue). A_TMA: A is a tensor descriptor with block [BLOCK_R, BLOCK_K] (rows past RANK read as zero)."""
    pid_m, pid_n, offs_m, offs_n = walk_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M, tile, TILE_MAP)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N

    if not USE_TMA:
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    if not A_TMA:
        a_ptrs = A + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
    if XA_SPLITS > 0:
        # decode: the bias and B's first rank chunk (neither is the shrink's output) are loaded before the K loop,
        # so that no dependent load is left between the W stream and the store (they are a few registers here)
        b_first = tl.load(B + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                          mask=(offs_r[:, None] < RANK) & mask_n[None, :], other=0.0)
        if HAS_BIAS:
            bias_early = tl.load(BIAS + offs_n, mask=mask_n, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        if USE_TMA:
            x = X.load([pid_m * BLOCK_M, k0])
            w = W.load([pid_n * BLOCK_N, k0]).T
        else:
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        acc = dot(x, w, acc, PRECISION)
        if COMPUTE_XA:
            if A_TMA:
                a = A.load([0, k0]).T
            else:
                a = tl.load(a_ptrs, mask=mask_k[:, None] & (offs_r[None, :] < RANK), other=0.0)
                a_ptrs += BLOCK_K * stride_ak
            if DROPOUT:
                keep = dropout_keep(seed, offs_m, k0, K8, keep_thr, BLOCK_M, BLOCK_K)
                x = apply_dropout(x, keep, inv_keep)
            xa = dot(x, a, xa, PRECISION)

    if COMPUTE_XA:
        if STORE_XA:
            if pid_n == 0:
                xa_ptrs = XA + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar
                tl.store(xa_ptrs, xa.to(XA.dtype.element_ty),
                         mask=mask_m[:, None] & (offs_r[None, :] < RANK))
                if PUBLISH:
                    publish_row_block(FLAGS, pid_m)
        b = tl.load(B + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                    mask=(offs_r[:, None] < RANK) & mask_n[None, :], other=0.0)
        # Round xa to the input dtype (as the unfused reference does), scale in fp32, then one small MMA.
        xa_s = (xa.to(b.dtype).to(ACC) * scaling).to(b.dtype)
        acc = dot(xa_s, b, acc, PRECISION)
    else:
        gdc_wait_if(GDC_WAIT)  # xa comes from the kernel before this one (a PDL launch)
        if INLINE_XA:  # or from this launch's shrinking programs (helpers.shrink_row_block)
            wait_row_block(FLAGS, pid_m)
        for c in tl.static_range(NUM_R_CHUNKS):
            rr = c * BLOCK_R + offs_r
            if XA_SPLITS > 0 and c == 0:
                b = b_first
            else:
                b = tl.load(B + offs_n[None, :] * stride_bn + rr[:, None] * stride_br,
                            mask=(rr[:, None] < RANK) & mask_n[None, :], other=0.0)
            xa_ptrs = XA + offs_m[:, None] * stride_xam + rr[None, :] * stride_xar
            xa_mask = mask_m[:, None] & (rr[None, :] < RANK)
            if XA_SPLITS == 0:  # from L2 (".cg"): written by another program in the inline mode
                xa_c = tl.load(xa_ptrs, mask=xa_mask, other=0.0, cache_modifier=".cg")
            else:  # fp32 partial sums over K ranges, added in a fixed order, then rounded as the reference does
                xa_c = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
                for sp in tl.static_range(XA_SPLITS):
                    xa_c += tl.load(xa_ptrs + sp * stride_xas, mask=xa_mask, other=0.0).to(ACC)
                xa_c = xa_c.to(b.dtype)
                if STORE_XA:
                    if pid_n == 0:  # the rounded xa the backward needs, the very values used here
                        tl.store(XA_OUT + offs_m[:, None] * stride_xam + rr[None, :] * stride_xar, xa_c,
                                 mask=xa_mask)
            acc = dot((xa_c.to(ACC) * scaling).to(b.dtype), b, acc, PRECISION)

    if HAS_OUT_SCALE:
        acc = acc * tl.load(OUT_SCALE + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        if XA_SPLITS > 0:
            bias = bias_early
        else:
            bias = tl.load(BIAS + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(ACC)[None, :]
    if Y_TMA:
        Y.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(Y.dtype))
    else:
        y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M", "seed", "keep_thr"])
def _lora_fwd_kernel(
    X, W, A, B, BIAS, XA, Y,
    M, N, K, RANK,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xam, stride_xar, stride_ym, stride_yn,
    scaling, seed, keep_thr, inv_keep, K8,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, COMPUTE_XA: tl.constexpr, STORE_XA: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_R_CHUNKS: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    OUT_SCALE, HAS_OUT_SCALE: tl.constexpr, PERSISTENT: tl.constexpr, Y_TMA: tl.constexpr,
    XA_OUT, stride_xas, XA_SPLITS: tl.constexpr, GDC_WAIT: tl.constexpr,
    FLAGS, SHRINK_PROGS, INLINE_XA: tl.constexpr, SHRINK_STAGES: tl.constexpr, PRODUCER_XA: tl.constexpr = False,
    A_TMA: tl.constexpr = False, SHRINK_DROPOUT: tl.constexpr = False,
):
    """BLOCK_M x BLOCK_N tiles of Y: one per program, or (PERSISTENT) a grid of at most one program per SM, program
    p walking tiles p, p + programs, ... (one tile's epilogue overlaps the next one's first loads, and no tail wave
    of programs is launched).

    X: [M, K], W: [N, K], A: [RANK, K], B: [N, RANK], BIAS: [N] (if HAS_BIAS), Y: [M, N], all strided.
    USE_TMA: X and W are host tensor descriptors with blocks [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K] (the
        bulk tensor copy engine on Hopper; out-of-range elements read as zero), else plain pointers.
    Y_TMA: Y is a tensor descriptor with block [BLOCK_M, BLOCK_N] (out-of-range elements are not written).
    XA: [M, RANK] in X's dtype, unscaled drop(X) @ A^T; read when not COMPUTE_XA, written by the pid_n == 0
        programs when STORE_XA. With XA_SPLITS > 0 it is instead [XA_SPLITS, M, RANK] fp32 partial sums over K
        (split stride stride_xas; lora_shrink.lora_shrink_partials), summed and rounded to X's dtype here, and
        with STORE_XA the pid_n == 0 programs store that rounded xa into XA_OUT [M, RANK] (XA's row and rank
        strides); XA_OUT is unused otherwise.
    GDC_WAIT: launched with PDL after the kernel that writes XA: wait for it before reading XA.
    INLINE_XA (PERSISTENT, RANK <= BLOCK_R): the launch computes XA [M, RANK] itself: programs
        0 .. SHRINK_PROGS - 1 first shrink whole BLOCK_M row blocks and publish each in FLAGS [cdiv(M, BLOCK_M)]
        int32, zero at launch (helpers.shrink_row_block); a tile's epilogue waits for its row block.
        SHRINK_STAGES: the pipeline depth of that shrink's loop. SHRINK_DROPOUT: the shrinking programs draw
        the dropout mask on X (DROPOUT stays False: the tiles only read XA).
    PRODUCER_XA (PERSISTENT, one rank block): the launch computes XA itself in producer tiles: the
        walk's first cdiv(M, BLOCK_M) positions are the first N tile of each row block, whose K loop also
        accumulates drop(X) @ A^T for its rows (COMPUTE_XA's loop; with DROPOUT the producers draw the mask, each
        element once); it stores xa and publishes FLAGS[row block] before its
        epilogue. The other tiles follow in grouped order and wait for their row block's flag before theirs. No
        extra read of X; a producer tile takes ~22 % longer than a plain one (its in-loop rank product, r / BLOCK_N
        more MMA but a second dot per K step; H200, bench/NOTES.md). Progress needs every program resident (the
        grid is at most one per SM), as for INLINE_XA: producers never wait, and they come first in every walk.
        A_TMA (with PRODUCER_XA): A is a tensor descriptor with block [BLOCK_R, BLOCK_K].
    scaling: s; seed, keep_thr, inv_keep, K8: the dropout mask (helpers.dropout_keep), used if DROPOUT.
    BLOCK_R: padded rank (COMPUTE_XA: the whole rank, a power of two >= 16; else the epilogue's rank chunk),
    NUM_R_CHUNKS: rank chunks in the epilogue (1 when COMPUTE_XA). PRECISION: tl.dot precision for fp32; ACC: accumulator dtype.
    OUT_SCALE: [N], any float dtype, read if HAS_OUT_SCALE: Y = OUT_SCALE * (X @ W^T + LoRA term) + BIAS (DoRA's
        per-output magnitude factor, applied in fp32 before the bias).
    """
    if PERSISTENT and PRODUCER_XA:
        row_blocks = tl.cdiv(M, BLOCK_M)
        for pos in range(tl.program_id(0), row_blocks * tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
            if pos < row_blocks:
                _fwd_tile(pos, X, W, A, B, BIAS, XA, Y, M, N, K, RANK,
                          stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                          stride_xam, stride_xar, stride_ym, stride_yn, scaling, seed, keep_thr, inv_keep, K8,
                          HAS_BIAS, DROPOUT, True, True, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
                          1, GROUP_M, PRECISION, ACC, OUT_SCALE, HAS_OUT_SCALE, Y_TMA,
                          XA_OUT, stride_xas, 0, False, FLAGS, False, 1, True, A_TMA)
            else:
                _fwd_tile(pos - row_blocks, X, W, A, B, BIAS, XA, Y, M, N, K, RANK,
                          stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                          stride_xam, stride_xar, stride_ym, stride_yn, scaling, seed, keep_thr, inv_keep, K8,
                          HAS_BIAS, False, False, False, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
                          1, GROUP_M, PRECISION, ACC, OUT_SCALE, HAS_OUT_SCALE, Y_TMA,
                          XA_OUT, stride_xas, 0, False, FLAGS, True, 2, False, A_TMA)
    elif PERSISTENT:
        first = persistent_start(INLINE_XA, X, A, XA, FLAGS, M, K, RANK, stride_xm, stride_xk, stride_ar,
                                 stride_ak, stride_xam, stride_xar, SHRINK_PROGS, USE_TMA, BLOCK_M, BLOCK_K, BLOCK_R,
                                 PRECISION, ACC, SHRINK_STAGES, SHRINK_DROPOUT, seed, keep_thr, inv_keep, K8)
        for tile in range(first, tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
            _fwd_tile(tile, X, W, A, B, BIAS, XA, Y, M, N, K, RANK,
                      stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                      stride_xam, stride_xar, stride_ym, stride_yn, scaling, seed, keep_thr, inv_keep, K8,
                      HAS_BIAS, DROPOUT, COMPUTE_XA, STORE_XA, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
                      NUM_R_CHUNKS, GROUP_M, PRECISION, ACC, OUT_SCALE, HAS_OUT_SCALE, Y_TMA,
                      XA_OUT, stride_xas, XA_SPLITS, GDC_WAIT, FLAGS, INLINE_XA)
    else:
        _fwd_tile(tl.program_id(0), X, W, A, B, BIAS, XA, Y, M, N, K, RANK,
                  stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                  stride_xam, stride_xar, stride_ym, stride_yn, scaling, seed, keep_thr, inv_keep, K8,
                  HAS_BIAS, DROPOUT, COMPUTE_XA, STORE_XA, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R,
                  NUM_R_CHUNKS, GROUP_M, PRECISION, ACC, OUT_SCALE, HAS_OUT_SCALE, Y_TMA,
                  XA_OUT, stride_xas, XA_SPLITS, GDC_WAIT, FLAGS, False)


def _output(out, shape, like, name):
    """`out` checked against shape/dtype/device, or a new tensor."""
    if out is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name} must be {list(shape)} {like.dtype} on {like.device}, "
                         f"got {list(out.shape)} {out.dtype} on {out.device}")
    return out


def choose_xa_mode(m: int, rank: int, dropout: bool) -> str:
    """"fused" or "shrink" (see the module docstring; measured in bench/NOTES.md).

    On the H100 the in-loop rank product slowed the large GEMM by far more than its r / BLOCK_N MMA share
    (1.55x vs 1.27x the base at M=8192, K=N=4096, r=16), while at decode sizes, where reading W bounds the
    time, fusing it wins (1.05x vs 2.3x at M=1): fuse up to MAX_FUSED_ROWS rows. With dropout, "shrink" draws
    the mask once per element; fused, every N tile redraws it for a whole BLOCK_M of rows, which measured
    3.1x the base at M=1 against 2.5x for "shrink" (bench/NOTES.md).
    """
    if dropout or m > MAX_FUSED_ROWS:
        return "shrink"
    return "fused" if next_pow2_rank(rank) <= MAX_FUSED_RANK_BLOCK else "shrink"


def inline_pays(m: int, rank: int, dropout: bool, dtype, kernel: str) -> bool:
    """Whether "auto" computes the rank-r product inside the persistent GEMM (the forward's "producer" tiles, dX's
    "inline" shrink) rather than in a shrink launch before it: above MAX_FUSED_ROWS rows, without dropout (the
    mask would be drawn by a few programs), at a rank of one epilogue block, where the GEMM's config walks its
    tiles persistently (bench/NOTES.md)."""
    return (INLINE_SHRINK and m > MAX_FUSED_ROWS and not dropout and next_pow2_rank(rank) <= EPILOGUE_RANK_BLOCK
            and gemm_config(kernel, m, dtype, 0).persistent)


def lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, store_xa=False, xa_mode="auto",
                 out=None, tma="auto", out_scale=None):
    """Fused LoRA forward.

    x: [M, K], weight: [N, K], bias: [N] or None, lora_A: [r, K], lora_B: [N, r] (any strides, one dtype);
    scaling: float; dropout_p in [0, 1) applied to x on the LoRA branch with the mask of `seed`.
    Returns (y [M, N], xa [M, r] or None): xa = drop(x) @ A^T, returned when store_xa (for the backward).
    xa_mode: "auto", "fused", "shrink", "split", "inline" or "producer" (module docstring; "inline" and
        "producer" need r <= 64).
    out: optional preallocated y [M, N] of x's dtype and device (any strides).
    tma: "auto" (the config's choice, where the GPU and strides allow), True or False (tests force both).
    out_scale: optional [N] vector g (any float dtype, x's device): y = g * (x @ W^T + s * xa @ B^T) + b (DoRA).

    Host work (checks, config, grid, Triton's argument binding) is done once per call signature
    (kernels/launch.py).

    >>> y, _ = lora_forward(x, W, b, A, B, 2.0)
    >>> y, xa = lora_forward(x, W, None, A, B, 2.0, dropout_p=0.1, seed=7, store_xa=True)
    """
    scaling = check_scaling(scaling)
    check_dropout(dropout_p, seed, x)
    key = plan_key((x, weight, bias, lora_A, lora_B, out, out_scale), dropout_p, store_xa, xa_mode, tma,
                   dot_precision_key(x), seed_key(seed), PRODUCER_DROPOUT,
                   INLINE_DROPOUT, DROPOUT_SHRINK_AHEAD)
    plan = _PLANS.find(key)
    if plan is None:
        plan = _PLANS.put(key, _ForwardPlan(x, weight, bias, lora_A, lora_B, dropout_p, store_xa, xa_mode, out,
                                            tma, out_scale))
    return plan(x, weight, bias, lora_A, lora_B, scaling, seed, out, out_scale)


_PLANS = PlanCache()


class _ForwardPlan:
    """`lora_forward` for one call signature: every check and choice made once (kernels/launch.py)."""

    def __init__(self, x, weight, bias, lora_A, lora_B, dropout_p, store_xa, xa_mode, out, tma, out_scale):
        M, K = matrix_shape(x, "x")
        N, rank = matrix_shape(weight, "weight")[0], lora_A.shape[0]
        check_shapes(x=(x, (M, K)), weight=(weight, (N, K)), bias=(bias, (N,)), lora_A=(lora_A, (rank, K)),
                     lora_B=(lora_B, (N, rank)))
        check_vector("out_scale", out_scale, N, x)
        check_flag(store_xa, "store_xa")
        y_strides = _output(out, (M, N), x, "out").stride() if out is not None else (N, 1)  # a new y: contiguous
        dropout = dropout_p > 0.0
        pdl = pdl_enabled(x.device)
        sms = fill_sms(x.device)
        if xa_mode == "auto":
            xa_mode = choose_xa_mode(M, rank, dropout)
            if M <= MAX_SPLIT_ROWS and pdl:
                xa_mode = "split"
            elif pdl and mid_tile("fwd", M, x.dtype, N, sms) is not None:
                xa_mode = "shrink" if M <= MID_SHRINK_ROWS and not dropout else "split"
            elif (pdl and sms and M <= SPLIT_MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16)
                  and next_pow2_rank(rank) <= SPLIT_MAX_RANK_BLOCK):
                xa_mode = "split"
            elif xa_mode == "shrink" and inline_pays(M, rank, dropout and not PRODUCER_DROPOUT, x.dtype, "fwd"):
                xa_mode = "producer"
            elif xa_mode == "shrink" and dropout and INLINE_DROPOUT and inline_pays(M, rank, False, x.dtype, "fwd"):
                xa_mode = "inline"
        if xa_mode not in ("fused", "shrink", "split", "inline", "producer"):
            raise ValueError(f"xa_mode must be 'auto', 'fused', 'shrink', 'split', 'inline' or 'producer', got "
                             f"{xa_mode!r}")
        if xa_mode in ("inline", "producer") and next_pow2_rank(rank) > EPILOGUE_RANK_BLOCK:
            raise ValueError(f"xa_mode={xa_mode!r} needs a rank <= {EPILOGUE_RANK_BLOCK}, got rank {rank}")
        self.y_shape, self.xa_shape, self.dropout_p = (M, N), (M, rank), dropout_p
        self.launch = None
        # xa: computed by a shrink launch first (whole, or as partial sums), or by the fused GEMM (stored only when
        # asked), or by the GEMM's own shrinking programs ("inline", xa always new), or not at all
        self.shrink = xa_mode == "shrink"
        # the K ranges asked of the shrink, and the number it gives (which the kernel is compiled for)
        self.xa_splits = XA_SPLITS
        self.splits = shrink_splits(M, K, x.dtype, self.xa_splits)[0] if xa_mode == "split" else 0
        self.producer = xa_mode == "producer"
        self.inline = xa_mode == "inline" or self.producer  # xa computed by this launch, published by flags
        self.new_xa = (store_xa or self.inline) and not self.shrink
        self.store_xa = store_xa
        self.pdl = False
        if M == 0 or N == 0:
            self.shrink, self.splits, self.new_xa, self.inline, self.producer = False, 0, store_xa, False, False
            return
        compute_xa = xa_mode == "fused"
        # the GEMM starts while the shrink runs (programmatic dependent launch)
        self.pdl = pdl and not compute_xa
        block_r = next_pow2_rank(rank) if compute_xa else min(EPILOGUE_RANK_BLOCK, next_pow2_rank(rank))
        if compute_xa and M <= DECODE_ROWS:
            block_r = max(block_r, DECODE_RANK_BLOCK)
        cfg = gemm_config("fwd_split" if self.splits else "fwd", M, x.dtype, block_r if compute_xa else 0, N, sms)
        if self.inline:  # the shrinking programs need the persistent walk (a grid of at most one program per SM)
            cfg = replace(cfg, persistent=True)
        has_xa = self.shrink or self.new_xa or self.splits
        # xa is a new contiguous [M, r] tensor (or [splits, M, r]); without one, y stands in (never dereferenced)
        xa_strides = (rank, 1) if has_xa else y_strides
        pdl_options = {"launch_pdl": True} if self.pdl else {}
        self.use_tma = tma_enabled(tma if tma != "auto" else ("auto" if cfg.tma else False), x, weight)
        self.x_block, self.w_block = [cfg.block_m, cfg.block_k], [cfg.block_n, cfg.block_k]
        # y through a descriptor too: a new y needs 16-byte rows, a given one TMA's stride and alignment rules
        # (not with producer tiles: two K loops and two epilogues leave no room for the store's 64 KB tile buffer)
        self.y_tma = self.use_tma and cfg.tma_store and not self.producer and (
            tma_enabled(True, out) if out is not None else (N * x.element_size()) % 16 == 0)
        self.y_block = [cfg.block_m, cfg.block_n]
        # producer tiles load A through a descriptor too, where it allows one (rows past the rank read as zero)
        self.a_tma = self.producer and self.use_tma and tma_enabled(True, lora_A)
        self.a_block = [block_r, cfg.block_k]
        tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
        grid, shrink_progs = min(tiles, num_sms(x.device)) if cfg.persistent else tiles, 0
        self.row_blocks = cdiv(M, cfg.block_m)
        if self.producer:  # under the interpreter (programs run in id order) one program walks every tile
            grid = 1 if is_interpret() else grid
        elif self.inline:
            grid, shrink_progs = inline_shrink_grid(tiles, self.row_blocks, num_sms(x.device),
                                                    DROPOUT_SHRINK_AHEAD if dropout else 2)
        self.launch = Launch(
            _lora_fwd_kernel, (grid,),
            ("X", "W", "A", "B", "BIAS", "XA", "Y", "scaling", "seed", "OUT_SCALE", "XA_OUT", "FLAGS"),
            None, None, None, None, None, None, None,
            M, N, K, rank,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), *xa_strides, *y_strides,
            None, None, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), cdiv(K, 8),
            HAS_BIAS=bias is not None, DROPOUT=dropout and (compute_xa or self.producer), COMPUTE_XA=compute_xa,
            STORE_XA=store_xa and (compute_xa or self.splits > 0), USE_TMA=self.use_tma,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=block_r,
            NUM_R_CHUNKS=1 if compute_xa else cdiv(rank, block_r), GROUP_M=cfg.group_m,
            PRECISION=dot_precision(x.dtype), ACC=acc_dtype(x.dtype),
            # A placeholder pointer when absent (never read), as for BIAS: no None pointer arguments.
            OUT_SCALE=None, HAS_OUT_SCALE=out_scale is not None, PERSISTENT=cfg.persistent, Y_TMA=self.y_tma,
            XA_OUT=None, stride_xas=M * rank, XA_SPLITS=self.splits, GDC_WAIT=self.pdl,
            FLAGS=None, SHRINK_PROGS=shrink_progs, INLINE_XA=self.inline and not self.producer,
            SHRINK_STAGES=cfg.shrink_stages or cfg.num_stages, PRODUCER_XA=self.producer, A_TMA=self.a_tma,
            SHRINK_DROPOUT=dropout and self.inline and not self.producer, **cfg.launch(), **pdl_options,
        )

    def __call__(self, x, weight, bias, lora_A, lora_B, scaling, seed, out, out_scale):
        y = out if out is not None else torch.empty(self.y_shape, device=x.device, dtype=x.dtype)
        if self.shrink:
            xa = lora_shrink(x, lora_A, self.dropout_p, seed, trigger=self.pdl)
        elif self.splits:
            xa = lora_shrink_partials(x, lora_A, self.xa_splits, self.dropout_p, seed, trigger=self.pdl)
        elif self.new_xa:
            xa = torch.empty(self.xa_shape, device=x.device, dtype=x.dtype)
        else:
            xa = None
        xa_out = torch.empty(self.xa_shape, device=x.device, dtype=x.dtype) if self.splits and self.new_xa else None
        # the inline shrink's row-block flags, zero at launch
        flags = torch.zeros(self.row_blocks, device=x.device, dtype=torch.int32) if self.inline else None
        if self.launch is not None:
            if self.use_tma:
                x, weight = tensor_descriptor(x, self.x_block), tensor_descriptor(weight, self.w_block)
            if self.a_tma:
                lora_A = tensor_descriptor(lora_A, self.a_block)
            # y itself stands in for the absent optional pointers (never dereferenced)
            self.launch(x, weight, lora_A, lora_B, bias if bias is not None else y, xa if xa is not None else y,
                        tensor_descriptor(y, self.y_block) if self.y_tma else y, float(scaling), seed_arg(seed),
                        out_scale if out_scale is not None else y, xa_out if xa_out is not None else y,
                        flags if flags is not None else y)
        if self.inline and not self.store_xa:
            xa = None
        return y, (xa_out if self.splits else xa)
