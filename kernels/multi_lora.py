"""Batched multi-adapter LoRA forward (multi-tenant inference): `Y = X·Wᵀ + b + s[id]·(X·A[id]ᵀ)·B[id]ᵀ` per token.

Token t uses adapter slot `ids[t]`; -1 means base only. Tokens are visited in *sorted order*: the batch metadata
(`lora_fast.multi_lora.make_batch_metadata`) sorts them by adapter once per batch, so that sorted position p holds
token `perm[p]` and the tokens of one adapter form one contiguous segment `[seg_start[s], seg_start[s+1])`.
Kernels gather X rows and scatter Y rows through `perm`; nothing is copied.

Paths (no host sync in any of them; `_config` picks one per token bucket, measured on the H200):
* Up to 16 tokens, our GEMM reads W once ("triton"):
  1. `_shrink_kernel`: per (segment tile, slice, rank chunk, K split), `xa_part = X[seg rows] @ A[a, slice, chunk]ᵀ`
     in fp32 into a small workspace `[SPLIT_K, slices, T, R_PAD]`. A program whose rank chunk starts at or beyond
     the adapter's true rank exits, so an adapter of rank 8 in a pool of rank 64 reads and computes only 8 rows of
     A. Each adapter's A is read once per segment tile (not once per token), and split-K gives decode enough
     programs.
  2. `_fused_kernel`: the base GEMM `X @ Wᵀ (+ b)` over (sorted-row tile, N tile), walking K once, then an epilogue
     that sums the split-K partials of xa, scales them in fp32, rounds them to the input dtype (as PEFT does), and
     adds `xa @ B[a]ᵀ` (per row, or one tensor-core dot per segment and rank chunk up to the true rank).
     On Hopper it is a programmatic dependent launch: it streams W while the shrink runs and waits for the
     workspace only before its epilogue (kernels/helpers.pdl_enabled).
* From 32 tokens ("addmm"): the LoRA term and the bias are written into every row of y first, then cuBLAS adds
  X·Wᵀ with y as its C operand (beta = 1). y is written once and read once, by the GEMM's epilogue; no fp32
  delta, no second pass. Two pairs of kernels write the LoRA term:
  - 32-64 tokens ("rows", decode): `_shrink_rows_kernel` and `_expand_rows_kernel`, one token per program and a
    whole chunk of A (over K) or B (over N) loaded at once, on the FMA units; the expand loads its B tile before
    the PDL wait. Tokens of one adapter each read its A and B (from L2 after the first).
  - from 128 tokens: `_shrink_kernel`, then `_expand_kernel` (one adapter per segment tile, B read once per tile,
    a loop over N tiles), where an adapter's many tokens share each read.
  At 17-64 tokens (N <= 4096, 16-bit, with PDL) our W-stream GEMM (kernels/wstream.py) computes X·Wᵀ + b
  instead of cuBLAS, launched *first* (config GEMM="lead"): W streams from the call's start while the rows
  kernels run beside it as PDL consumers; each shrink program waits for the GEMM as it exits, so the expand,
  which waits for the shrink, adds the term to a finished y. (GEMM="triton": the GEMM after the expand, adding
  X·Wᵀ to y, still the default with the segment kernels at 64 tokens; GEMM="first": between the shrink and the
  expand; GEMM="lora": after the rows shrink, adding each token's term itself, no expand launch. All measured
  slower than "lead" with the rows kernels.)
  (`EXPAND="delta"` computes xa inside the expand kernel instead of the shrink: one launch, measured slower.)
* An older path kept as a config option and tested: cuBLAS, then the LoRA term added in place ("cublas"). (A
  side-stream variant, the LoRA term into an fp32 delta under cuBLAS's W stream then one add, was removed on
  2026-12-01: the streams did not overlap and "addmm" beat it at every measured size; bench/NOTES.md.)

Why not one launch: the shrink needs a full K reduction before the expand, and recomputing it in every N-tile program
would read A[ids] N / BLOCK_N times (128× at N=4096), which costs more than the second launch.

Multi-slice: several projections sharing X (q/k/v, gate/up) go in one launch: W and B are concatenated along N,
A is stacked `[S, slices, R, K]`; a small int32 table gives each slice's column offset, width and first N tile.
"""
import functools

import torch
import triton
import triton.language as tl

from .helpers import (
    acc_dtype, adapter_slot, cached_device_tensor, cdiv, dot, gdc_launch_dependents_if, gdc_wait_if, grouped_tile,
    next_pow2, pdl_enabled, rank_bound,
)
from .launch import Launch, PlanCache, plan_key
from .wstream import wstream_config, wstream_fits, wstream_launch

# Rank chunk: the granularity at which an adapter's true rank is honoured, and tl.dot's minimum inner size.
RANK_CHUNK = 16


@triton.jit
def _segment_tile(pid_tile, seg_start_ptr, MAX_SEGS, SEGS_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(segment, first row, row end) of segment-aligned tile `pid_tile`: segment s holds cdiv(len_s, BLOCK_M) tiles,
    numbered segment after segment, so a tile never mixes adapters. segment >= MAX_SEGS: a spare tile (exit)."""
    s = tl.arange(0, SEGS_P2)
    starts = tl.load(seg_start_ptr + s, mask=s < MAX_SEGS, other=0)
    ends = tl.load(seg_start_ptr + s + 1, mask=s < MAX_SEGS, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    incl = tl.cumsum(tiles, 0)  # inclusive prefix sum (a scan: O(SEGS_P2), not a [SEGS_P2, SEGS_P2] mask)
    seg = tl.sum((incl <= pid_tile).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(s == seg, incl - tiles, 0), 0)
    row0 = tl.sum(tl.where(s == seg, starts, 0), 0) + (pid_tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(s == seg, ends, 0), 0)
    return seg, row0, row_end


@triton.jit
def _slice_span(slices_ptr, slice_id, COL_ALIGN: tl.constexpr):
    """(column offset, width) of one slice in the slice table, with the divisibility the host found for every
    slice (`_col_align`): values loaded from memory carry none, and without it each thread reads and writes y, B
    and the bias one element at a time (2-byte accesses); with it, 16-byte vectors."""
    n_off = tl.load(slices_ptr + 3 * slice_id)
    n_size = tl.load(slices_ptr + 3 * slice_id + 1)
    if COL_ALIGN > 1:
        n_off = tl.multiple_of(n_off, COL_ALIGN)
        n_size = tl.multiple_of(n_size, COL_ALIGN)
    return n_off, n_size


@triton.jit
def _tile_columns(pid_n, slices_ptr, NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr, COL_ALIGN: tl.constexpr):
    """(slice, global columns int64 [BLOCK_N], column mask) of output column tile `pid_n` in the slice table."""
    slice_id = pid_n * 0
    for i in tl.static_range(1, NUM_SLICES):
        slice_id = tl.where(pid_n >= tl.load(slices_ptr + 3 * i + 2), i, slice_id)
    n_off, n_size = _slice_span(slices_ptr, slice_id, COL_ALIGN)
    local_n = (pid_n - tl.load(slices_ptr + 3 * slice_id + 2)) * BLOCK_N + tl.arange(0, BLOCK_N)
    return slice_id, (n_off + local_n).to(tl.int64), local_n < n_size


@triton.jit
def _rows_dot(acc, x_rows, op_cols, k_start, k_end, row_mask, col_mask, stride_xk, stride_ok,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_P] + X[rows, k_start:k_end] · OP[k_start:k_end, cols]: x_rows [BLOCK_M, 1] pointers to
    the (gathered) rows of X, op_cols [1, BLOCK_P] pointers to the operand's columns (W's rows, or A's ranks),
    stepped along K by stride_xk / stride_ok; row_mask [BLOCK_M], col_mask [BLOCK_P]."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < k_end
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        o = tl.load(op_cols + ks[:, None] * stride_ok, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = dot(x, o, acc, PRECISION)
    return acc


@triton.jit
def _adapter_rows(adapter, ranks_ptr, scalings_ptr, BLOCK_R: tl.constexpr, R_ALIGNED: tl.constexpr,
                  ACC: tl.constexpr):
    """An expand's view of one adapter slot (-1: base only): (slot clamped to >= 0 for addressing, true rank (0 when
    base only), scaling, rank rows [BLOCK_R], the exact mask `r < rank`, the load mask of `helpers.rank_bound`)."""
    safe, rank, scale = adapter_slot(adapter, ranks_ptr, scalings_ptr, ACC)
    offs_r = tl.arange(0, BLOCK_R)
    return safe, rank, scale, offs_r, offs_r < rank, offs_r < rank_bound(rank, R_ALIGNED)


@triton.jit
def _rank_chunk(adapter, pid_sr, ranks_ptr, NUM_RCHUNKS: tl.constexpr, BLOCK_R: tl.constexpr):
    """(slice, first rank row, the adapter's true rank) of a shrink program's (slice, rank chunk) index pid_sr; the
    rank is 0 for a base-only adapter (< 0), so `r0 >= rank` is every shrink program's exit test."""
    rank = tl.where(adapter >= 0, tl.load(ranks_ptr + tl.maximum(adapter, 0)), 0)
    return pid_sr // NUM_RCHUNKS, (pid_sr % NUM_RCHUNKS) * BLOCK_R, rank


@triton.jit(do_not_specialize=["T", "MAX_SEGS"])
def _shrink_kernel(
    x_ptr, a_ptr, ws_ptr, perm_ptr, seg_start_ptr, seg_adapter_ptr, ranks_ptr,
    T, K, K_PER_SPLIT, MAX_SEGS,
    stride_xt, stride_xk,
    stride_as, stride_ai, stride_ar, stride_ak,
    stride_wsk, stride_wsi, stride_wst,
    SEGS_P2: tl.constexpr, NUM_RCHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    ACC: tl.constexpr, TRIGGER: tl.constexpr, WAIT_END: tl.constexpr,
):
    """xa_part[split, slice, p, r] = sum_{k in split} X[perm[p], k] * A[a, slice, r, k] for the rows p of one segment.

    Pointers: x [T, K] (any strides); a [S, slices, R, K] (any strides); ws fp32 (fp64 for fp64) [SPLIT_K, slices, T, R_PAD]
    (last dim contiguous); perm int32 [T] (sorted position -> token); seg_start int32 [MAX_SEGS + 1];
    seg_adapter int32 [MAX_SEGS] (-1 = base only); ranks int32 [S] (true rank of each slot).
    Grid: (segment tiles = cdiv(T, BLOCK_M) + MAX_SEGS, slices * NUM_RCHUNKS, SPLIT_K).
    T: tokens (not specialised); K_PER_SPLIT: multiple of BLOCK_K; MAX_SEGS: length of seg_adapter, min(T, slots +
    1), not specialised either (it changes with the batch; SEGS_P2 only with T's power-of-two bucket, as the config).
    SEGS_P2: next_pow2(MAX_SEGS); NUM_RCHUNKS: R_PAD // BLOCK_R; BLOCK_M: rows per tile; BLOCK_R: rank chunk (16);
    BLOCK_K: K step; PRECISION: tl.dot input precision for fp32; ACC: accumulator dtype (fp32, fp64 for fp64).
    TRIGGER: let the PDL-launched `_fused_kernel` start now (it waits for ws before its epilogue).
    WAIT_END: a PDL consumer of the W-stream GEMM launched before it (GEMM="lead"): every program waits for it
    before exiting (see `_shrink_rows_kernel`).
    """
    gdc_launch_dependents_if(TRIGGER)
    pid_tile = tl.program_id(0)
    pid_sr = tl.program_id(1)
    pid_k = tl.program_id(2).to(tl.int64)
    seg, row0, row_end = _segment_tile(pid_tile, seg_start_ptr, MAX_SEGS, SEGS_P2, BLOCK_M)
    if seg >= MAX_SEGS:
        gdc_wait_if(WAIT_END)
        return
    adapter = tl.load(seg_adapter_ptr + seg)
    slice_id, r0, rank = _rank_chunk(adapter, pid_sr, ranks_ptr, NUM_RCHUNKS, BLOCK_R)
    if r0 >= rank:  # past the adapter's true rank, or a base-only segment
        gdc_wait_if(WAIT_END)
        return

    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(perm_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    x_rows = x_ptr + tokens[:, None] * stride_xt
    a_base = a_ptr + adapter.to(tl.int64) * stride_as + slice_id.to(tl.int64) * stride_ai \
        + offs_r.to(tl.int64)[None, :] * stride_ar

    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = _rows_dot(tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC), x_rows, a_base, k_start, k_end, row_mask, r_mask,
                    stride_xk, stride_ak, BLOCK_K, PRECISION)

    ws = ws_ptr + pid_k * stride_wsk + slice_id.to(tl.int64) * stride_wsi \
        + rows.to(tl.int64)[:, None] * stride_wst + offs_r[None, :]
    tl.store(ws, acc, mask=row_mask[:, None] & r_mask[None, :])
    gdc_wait_if(WAIT_END)


@triton.jit(do_not_specialize=["T"])
def _fused_kernel(
    x_ptr, w_ptr, bias_ptr, b_ptr, ws_ptr, y_ptr,
    perm_ptr, seg_of_ptr, seg_start_ptr, seg_adapter_ptr, ranks_ptr, scalings_ptr, slices_ptr,
    T, K, NUM_N_TILES,
    stride_xt, stride_xk, stride_wn, stride_wk,
    stride_bs, stride_bn, stride_br,
    stride_wsk, stride_wsi, stride_wst,
    stride_yt, stride_yn,
    HAS_BIAS: tl.constexpr, NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    GATHER: tl.constexpr, GATHER_R: tl.constexpr, BASE_MODE: tl.constexpr, GDC_WAIT: tl.constexpr,
    COL_ALIGN: tl.constexpr, R_ALIGNED: tl.constexpr,
):
    """Y[perm[p], n] = X[perm[p]] · W[n] + b[n] + s[a] · round(sum_split xa_part[., slice(n), p]) · B[a, n] (a = adapter of p).

    Pointers: x [T, K]; w [N, K]; bias [N] (unused unless HAS_BIAS); b [S, N, R] (any strides: the pool stores it
    as Bᵀ [S, R, N]); ws fp32 (fp64 for fp64) [SPLIT_K, slices, T, R_PAD] from `_shrink_kernel`; y [T, N];
    perm, seg_of int32 [T] (sorted position -> token / segment); seg_start int32 [MAX_SEGS + 1];
    seg_adapter int32 [MAX_SEGS]; ranks int32 [S]; scalings fp32 [S];
    slices int32 [NUM_SLICES, 3] = (column offset, width, first N tile) of each projection.
    Grid: (cdiv(T, BLOCK_M) * NUM_N_TILES,) in GROUP_M-grouped order. T: tokens (not specialised).
    BLOCK_M x BLOCK_N: output tile (rows in sorted order); BLOCK_K: K step; BLOCK_R: rank chunk (16);
    GROUP_M: grouped tile order; PRECISION: tl.dot precision for fp32; ACC: accumulator dtype.
    GATHER: epilogue per row (each row gathers its adapter's B, GATHER_R rank rows at a time, all rows' loads in
    flight together) instead of per segment (one tensor-core dot per segment; its loads form a dependent chain, so
    it suits tiles that meet few segments). BASE_MODE: 0 computes X·Wᵀ + b here; 1: y already holds X·Wᵀ + b
    (cuBLAS), add the LoRA term to it.
    GDC_WAIT: launched with PDL right after `_shrink_kernel`: the base GEMM runs while the shrink does, and the
    epilogue waits for ws. COL_ALIGN, R_ALIGNED: as in `_expand_rows_kernel`.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(T, BLOCK_M)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, NUM_N_TILES, GROUP_M)

    slice_id, cols, col_mask = _tile_columns(pid_n, slices_ptr, NUM_SLICES, BLOCK_N, COL_ALIGN)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < T
    tokens = tl.load(perm_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    x_rows = x_ptr + tokens[:, None] * stride_xt
    w_cols = w_ptr + cols[None, :] * stride_wn

    y = y_ptr + tokens[:, None] * stride_yt + cols[None, :] * stride_yn
    out_mask = row_mask[:, None] & col_mask[None, :]
    if GATHER:
        # adapter, rank and scale of every row, before the K loop: a chain of dependent loads (segment, adapter,
        # rank) that would otherwise sit between the GEMM and the epilogue
        adapter = tl.load(seg_adapter_ptr + tl.load(seg_of_ptr + rows, mask=row_mask, other=0), mask=row_mask,
                          other=-1)
        safe, rank, scale = adapter_slot(adapter, ranks_ptr, scalings_ptr, ACC)
    if BASE_MODE == 1:
        acc = tl.load(y, mask=out_mask, other=0.0).to(ACC)
    else:
        if HAS_BIAS:  # loaded before the K loop: after it, its DRAM latency would add to every program's tail
            bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        acc = _rows_dot(tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), x_rows, w_cols, 0, K, row_mask, col_mask,
                        stride_xk, stride_wk, BLOCK_K, PRECISION)
        if HAS_BIAS:
            acc += bias[None, :]

    ws_rows = ws_ptr + slice_id.to(tl.int64) * stride_wsi + rows.to(tl.int64)[:, None] * stride_wst
    if GATHER:
        # LoRA epilogue per row, GATHER_R rank rows per step; B (not the shrink's output) is loaded before the wait.
        # (B's first step loaded before the K loop instead measured no faster, and slowed the GEMM alone.)
        offs_g = tl.arange(0, GATHER_R)
        b_rows = b_ptr + safe.to(tl.int64)[:, None, None] * stride_bs + cols[None, None, :] * stride_bn
        rank_load = rank_bound(rank, R_ALIGNED)
        for r0 in range(0, tl.max(rank, 0), GATHER_R):
            rs = r0 + offs_g
            r_mask = rs[None, :] < rank[:, None]
            r_load = rs[None, :] < rank_load[:, None]
            b = tl.load(b_rows + rs.to(tl.int64)[None, :, None] * stride_br,
                        mask=r_load[:, :, None] & col_mask[None, None, :], other=0.0)
            gdc_wait_if(GDC_WAIT)
            xa = tl.zeros((BLOCK_M, GATHER_R), dtype=ACC)
            for split in tl.static_range(SPLIT_K):
                xa += tl.load(ws_rows + split * stride_wsk + rs[None, :], mask=r_load, other=0.0)
            # rows past the true rank zeroed in both factors (they may hold anything)
            xa = tl.where(r_mask, (xa * scale[:, None]).to(x_ptr.dtype.element_ty).to(ACC), 0.0)
            b = tl.where(r_mask[:, :, None], b.to(ACC), 0.0)
            acc += tl.sum(xa[:, :, None] * b, 1)
    else:
        gdc_wait_if(GDC_WAIT)
        acc = _segment_epilogue(acc, ws_rows, b_ptr, x_ptr, rows, row_mask, cols, col_mask, pid_m, T,
                                seg_of_ptr, seg_start_ptr, seg_adapter_ptr, ranks_ptr, scalings_ptr,
                                stride_bs, stride_bn, stride_br, stride_wsk,
                                SPLIT_K, BLOCK_M, BLOCK_R, PRECISION, ACC)
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _segment_epilogue(acc, ws_rows, b_ptr, x_ptr, rows, row_mask, cols, col_mask, pid_m, T,
                      seg_of_ptr, seg_start_ptr, seg_adapter_ptr, ranks_ptr, scalings_ptr,
                      stride_bs, stride_bn, stride_br, stride_wsk,
                      SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                      PRECISION: tl.constexpr, ACC: tl.constexpr):
    """acc + the LoRA term of the segments that meet this row tile, one tensor-core dot per segment and rank chunk
    of BLOCK_R up to the adapter's true rank."""
    last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, T) - 1
    seg_first = tl.load(seg_of_ptr + pid_m * BLOCK_M)
    seg_last = tl.load(seg_of_ptr + last_row)
    offs_r = tl.arange(0, BLOCK_R)
    for seg in range(seg_first, seg_last + 1):
        adapter = tl.load(seg_adapter_ptr + seg)
        safe, rank, scale = adapter_slot(adapter, ranks_ptr, scalings_ptr, ACC)
        in_seg = row_mask & (rows >= tl.load(seg_start_ptr + seg)) & (rows < tl.load(seg_start_ptr + seg + 1))
        b_base = b_ptr + safe.to(tl.int64) * stride_bs + cols[None, :] * stride_bn
        for r0 in range(0, rank, BLOCK_R):
            rs = r0 + offs_r
            r_mask = rs < rank
            xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
            for split in tl.static_range(SPLIT_K):
                xa += tl.load(ws_rows + split * stride_wsk + rs[None, :],
                              mask=in_seg[:, None] & r_mask[None, :], other=0.0)
            xa = (xa * scale).to(x_ptr.dtype.element_ty)
            b = tl.load(b_base + rs.to(tl.int64)[:, None] * stride_br,
                        mask=r_mask[:, None] & col_mask[None, :], other=0.0)
            acc = dot(xa, b, acc, PRECISION)
    return acc


@triton.jit(do_not_specialize=["T", "MAX_SEGS"])
def _expand_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, ws_ptr, y_ptr, perm_ptr, seg_start_ptr, seg_adapter_ptr, ranks_ptr, scalings_ptr,
    slices_ptr, T, K, MAX_SEGS,
    stride_xt, stride_xk,
    stride_as, stride_ai, stride_ar, stride_ak,
    stride_bs, stride_bn, stride_br,
    stride_wsk, stride_wsi, stride_wst,
    stride_yt, stride_yn,
    SHRINK: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, SEGS_P2: tl.constexpr,
    CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, GDC_WAIT: tl.constexpr, COL_ALIGN: tl.constexpr,
    R_ALIGNED: tl.constexpr, TRIGGER: tl.constexpr,
):
    """Y[perm[p], n] (+)= s[a] · round(xa[p, :rank]) · B[a, n, :rank] over one segment tile (one adapter a).

    xa comes from the shrink's split-K partials in ws, or, with SHRINK, from X · A[a, slice]ᵀ computed here over
    all of K (shrink and expand in one launch, no workspace: A read once per segment tile and chunk, up to the
    true rank; masked rows and ranks cost no bytes).
    ACCUMULATE: add to y (it holds X·Wᵀ + b; base-only tiles exit). Else write the term alone, plus the bias where
    HAS_BIAS, for every row (base-only rows get the bias or zeros), so that a cuBLAS `addmm_` can add X·Wᵀ after.

    Pointers: x [T, K] and a [S, slices, R, K] (read with SHRINK); b [S, N, R] (any strides); bias [N];
    ws fp32 (fp64 for fp64) [SPLIT_K, slices, T, R_PAD] (read without SHRINK); y [T, N] (token rows);
    perm int32 [T]; seg_start int32 [MAX_SEGS + 1]; seg_adapter int32 [MAX_SEGS]; ranks int32 [S];
    scalings fp32 [S]; slices int32 [slices, 3] as in `_fused_kernel` (its first-tile column is unused here).
    Grid: (segment tiles = cdiv(T, BLOCK_M) + MAX_SEGS, slices * CHUNKS). Program (tile, slice, chunk) gets xa
    [BLOCK_M, BLOCK_R] once, then walks the N tiles chunk, chunk + CHUNKS, ... of its slice, BLOCK_N columns at a
    time: a small tile per step keeps the 64-bit row pointers and the accumulator in registers (a whole
    [64, 256] tile per program spilled), and the loop keeps several tiles' loads in flight.
    BLOCK_R: the padded rank (a power of two >= 16); BLOCK_K: K step of the SHRINK loop.
    GDC_WAIT: launched with PDL right after the kernel it depends on (`_shrink_kernel`, or with ACCUMULATE the
    W-stream GEMM that writes X·Wᵀ + b into y: kernels/wstream.py); the metadata and the first N tile's B (neither
    is their output) load while it runs, ws, x and y only after the wait.
    COL_ALIGN, R_ALIGNED: as in `_expand_rows_kernel` (16-byte accesses to y, B and the workspace). TRIGGER: the
    W-stream GEMM after it is a PDL consumer (kernels/wstream.py): let it start now.
    """
    gdc_launch_dependents_if(TRIGGER)
    pid_tile = tl.program_id(0)
    pid_sc = tl.program_id(1)
    seg, row0, row_end = _segment_tile(pid_tile, seg_start_ptr, MAX_SEGS, SEGS_P2, BLOCK_M)
    if seg >= MAX_SEGS:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(perm_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # in flight with the adapter's loads
    adapter = tl.load(seg_adapter_ptr + seg)
    if ACCUMULATE:
        if adapter < 0:
            return
    slice_id = pid_sc // CHUNKS
    chunk = pid_sc % CHUNKS
    safe, rank, scale, offs_r, r_mask, r_load = _adapter_rows(adapter, ranks_ptr, scalings_ptr, BLOCK_R, R_ALIGNED,
                                                              ACC)

    n_off, n_size = _slice_span(slices_ptr, slice_id, COL_ALIGN)
    b_rows = b_ptr + safe.to(tl.int64) * stride_bs + offs_r.to(tl.int64)[:, None] * stride_br
    y_rows = y_ptr + tokens[:, None] * stride_yt
    offs_n = tl.arange(0, BLOCK_N)
    first = chunk * BLOCK_N
    if GDC_WAIT:
        b_first = tl.load(b_rows + (n_off + first + offs_n).to(tl.int64)[None, :] * stride_bn,
                          mask=r_load[:, None] & (first + offs_n < n_size)[None, :], other=0.0)
    gdc_wait_if(GDC_WAIT)

    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    if SHRINK:
        if rank > 0:
            a_base = a_ptr + safe.to(tl.int64) * stride_as + slice_id.to(tl.int64) * stride_ai \
                + offs_r.to(tl.int64)[None, :] * stride_ar
            xa = _rows_dot(xa, x_ptr + tokens[:, None] * stride_xt, a_base, 0, K, row_mask, r_mask, stride_xk,
                           stride_ak, BLOCK_K, PRECISION)
    else:
        ws_rows = ws_ptr + slice_id.to(tl.int64) * stride_wsi + rows.to(tl.int64)[:, None] * stride_wst \
            + offs_r[None, :]
        for split in tl.static_range(SPLIT_K):
            xa += tl.load(ws_rows + split * stride_wsk, mask=row_mask[:, None] & r_load[None, :], other=0.0)
    # scaled in fp32, rounded to the operands' dtype (as PEFT); columns past the true rank zeroed (B's rows there
    # are zeroed below: either may hold anything)
    xa = tl.where(r_mask[None, :], xa * scale, 0.0).to(b_ptr.dtype.element_ty)

    for n0 in range(first, n_size, CHUNKS * BLOCK_N):
        local = n0 + offs_n
        col_mask = local < n_size
        cols = (n_off + local).to(tl.int64)
        out_mask = row_mask[:, None] & col_mask[None, :]
        y = y_rows + cols[None, :] * stride_yn
        if ACCUMULATE:
            y_old = tl.load(y, mask=out_mask, other=0.0)
        b_mask = r_load[:, None] & col_mask[None, :]
        if GDC_WAIT:  # the first tile's B is already in registers: its load here is masked off (no traffic)
            b = tl.load(b_rows + cols[None, :] * stride_bn, mask=b_mask & (n0 != first), other=0.0)
            b = tl.where(n0 == first, b_first, b)
        else:
            b = tl.load(b_rows + cols[None, :] * stride_bn, mask=b_mask, other=0.0)
        b = tl.where(r_mask[:, None], b, 0.0)
        acc = dot(xa, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), PRECISION)
        if ACCUMULATE:
            acc += y_old.to(ACC)
        elif HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["T"])
def _shrink_rows_kernel(
    x_ptr, a_ptr, ws_ptr, ids_ptr, ranks_ptr,
    T, K,
    stride_xt, stride_xk,
    stride_as, stride_ai, stride_ar, stride_ak,
    stride_wsk, stride_wsi, stride_wst,
    NUM_RCHUNKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    ACC: tl.constexpr, TRIGGER: tl.constexpr, WAIT_END: tl.constexpr,
):
    """xa_part[split, slice, t, r] = sum_{k in split} X[t, k] * A[ids[t], slice, r, k], one token t per program, on
    the FMA units: the decode shrink ("rows").

    Each program loads its whole [BLOCK_R, BLOCK_K] slice of A and BLOCK_K columns of X's row at once (K_STEPS 1,
    no K loop: every byte of the program is in flight together) after a two-load chain (ids -> rank); with K_STEPS
    > 1 it walks K_STEPS such slices in turn (fewer programs and registers, for GEMM="lead", where the shrink's
    programs stay on the SMs beside the W-stream GEMM until it ends). Tokens of one adapter
    each read its A slice (from L2 after the first): meant for decode, where adapters are many and segments short.
    Pointers and strides as in `_shrink_kernel`, but the workspace rows are tokens, not sorted positions; ids int32
    [T] (the batch metadata's `adapter_ids`: -1 = base only). Grid: (T, slices * NUM_RCHUNKS,
    cdiv(K, BLOCK_K * K_STEPS)); split = program_id(2). BLOCK_R: rank chunk (RANK_CHUNK); a chunk at or past the
    adapter's true rank exits, as do base-only tokens. WAIT_END: a PDL consumer of the W-stream GEMM
    (GEMM="lead"), which it does not read: every program waits for that GEMM before it exits, so that this grid's
    end implies the GEMM's, and the expand after it (which waits for this grid) sees y.
    """
    gdc_launch_dependents_if(TRIGGER)
    token = tl.program_id(0).to(tl.int64)
    pid_sr = tl.program_id(1)
    pid_k = tl.program_id(2)
    adapter = tl.load(ids_ptr + token)
    slice_id, r0, rank = _rank_chunk(adapter, pid_sr, ranks_ptr, NUM_RCHUNKS, BLOCK_R)
    if r0 >= rank:  # past the adapter's true rank, or a base-only token
        gdc_wait_if(WAIT_END)
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_rows = a_ptr + adapter.to(tl.int64) * stride_as + slice_id.to(tl.int64) * stride_ai \
        + offs_r.to(tl.int64)[:, None] * stride_ar
    xa = tl.zeros((BLOCK_R,), dtype=ACC)
    for step in range(K_STEPS):
        offs_k = (pid_k * K_STEPS + step) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + token * stride_xt + offs_k.to(tl.int64) * stride_xk, mask=k_mask, other=0.0)
        a = tl.load(a_rows + offs_k.to(tl.int64)[None, :] * stride_ak, mask=r_mask[:, None] & k_mask[None, :],
                    other=0.0)
        xa += tl.sum(a.to(ACC) * x.to(ACC)[None, :], 1)
    ws = ws_ptr + pid_k.to(tl.int64) * stride_wsk + slice_id.to(tl.int64) * stride_wsi + token * stride_wst
    tl.store(ws + offs_r, xa, mask=r_mask)
    gdc_wait_if(WAIT_END)


@triton.jit(do_not_specialize=["T"])
def _expand_rows_kernel(
    b_ptr, bias_ptr, ws_ptr, y_ptr, ids_ptr, ranks_ptr, scalings_ptr, slices_ptr,
    T,
    stride_bs, stride_bn, stride_br,
    stride_wsk, stride_wsi, stride_wst,
    stride_yt, stride_yn,
    HAS_BIAS: tl.constexpr, NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr, GDC_WAIT: tl.constexpr,
    COL_ALIGN: tl.constexpr, R_ALIGNED: tl.constexpr, TRIGGER: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """Y[t, n] = b[n] + s[a] · round(sum_split xa_part[., slice(n), t, :rank]) · B[a, n, :rank] (a = ids[t]) for one
    token t and BLOCK_N columns per program, on the FMA units: the decode expand ("rows"). Every row is written
    (base-only tokens get the bias, or zeros), so that cuBLAS adds X·Wᵀ to y afterwards ("addmm").

    B's [BLOCK_R, BLOCK_N] tile and the bias load before the PDL wait (neither is the shrink's output), so they are
    in flight while the shrink runs; after the wait only the token's SPLIT_K partials of xa are read.
    Pointers and strides as in `_expand_kernel`, the workspace written by `_shrink_rows_kernel` (rows are tokens);
    ids int32 [T]. Grid: (T, column tiles of all slices) with the slice table of `_fused_kernel`.
    BLOCK_R: the padded rank (a power of two >= RANK_CHUNK). COL_ALIGN: a power of two dividing every slice's
    offset and width (`_col_align`); R_ALIGNED: B's rank R is a multiple of 8 (`helpers.rank_bound`). TRIGGER: the
    W-stream GEMM after it is a PDL consumer (kernels/wstream.py): let it start now. ACCUMULATE: add the term to
    y (which holds X·Wᵀ + b: no bias here; base-only tokens exit) instead of writing it.
    """
    gdc_launch_dependents_if(TRIGGER)
    token = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    adapter = tl.load(ids_ptr + token)
    if ACCUMULATE:
        if adapter < 0:
            return
    slice_id, cols, col_mask = _tile_columns(pid_n, slices_ptr, NUM_SLICES, BLOCK_N, COL_ALIGN)
    safe, rank, scale, offs_r, r_mask, r_load = _adapter_rows(adapter, ranks_ptr, scalings_ptr, BLOCK_R, R_ALIGNED,
                                                              ACC)
    b = tl.load(b_ptr + safe.to(tl.int64) * stride_bs + offs_r.to(tl.int64)[:, None] * stride_br
                + cols[None, :] * stride_bn, mask=r_load[:, None] & col_mask[None, :], other=0.0)
    if HAS_BIAS and not ACCUMULATE:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    gdc_wait_if(GDC_WAIT)
    ws = ws_ptr + slice_id.to(tl.int64) * stride_wsi + token * stride_wst + offs_r
    xa = tl.zeros((BLOCK_R,), dtype=ACC)
    for split in tl.static_range(SPLIT_K):
        xa += tl.load(ws + split * stride_wsk, mask=r_load, other=0.0)
    # scaled in fp32, rounded to the operands' dtype; rows past the true rank zeroed (in xa and in B: they may
    # hold anything, and 0 * inf is nan)
    xa = tl.where(r_mask, (xa * scale).to(b_ptr.dtype.element_ty).to(ACC), 0.0)
    b = tl.where(r_mask[:, None], b.to(ACC), 0.0)
    out = tl.sum(xa[:, None] * b, 0)
    y = y_ptr + token * stride_yt + cols * stride_yn
    if ACCUMULATE:
        out += tl.load(y, mask=col_mask, other=0.0).to(ACC)
    elif HAS_BIAS:
        out += bias
    tl.store(y, out.to(y_ptr.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------- configs


def _rows_tiles(R_PAD: int) -> dict:
    """The rows kernels' chunks where their shrink is on the critical path (before cuBLAS or the GEMM after the
    expand): a whole [16, K chunk] slice of A per program (8K elements at r <= 16, 16K above), 16K-element B tiles.
    (Beside the GEMM, "lead", the table gives the shrink K steps instead.)"""
    return dict(R_S_ELEMS=8192 if R_PAD <= RANK_CHUNK else 16384, R_S_STEPS=1, R_E_ELEMS=16384)


def _bucket(t: int) -> int:
    return next_pow2(max(int(t), 1))


@functools.lru_cache(maxsize=None)
def _config(t_bucket: int, K: int, N: int, R_PAD: int, dtype: torch.dtype, is_cuda: bool) -> dict:
    if not is_cuda:  # interpreter: small blocks keep numpy fast; SPLIT_K 2 still exercises the split path
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1, GATHER=False,
                    BASE="triton", S_BLOCK_M=16, S_BLOCK_K=32, SPLIT_K=2 if K > 32 else 1, s_num_warps=4,
                    s_num_stages=1, EXPAND="fused", E_BLOCK_M=16, E_BLOCK_N=16, E_CHUNKS=2, e_num_warps=4,
                    e_num_stages=1,
                    D_BLOCK_M=16, D_BLOCK_N=16, D_BLOCK_K=32, D_CHUNKS=2, d_num_warps=4, d_num_stages=1)
    big = dtype.itemsize >= 4  # 4- and 8-byte operands: halve the K step to keep shared memory in budget
    # Measured on H100 (bench/NOTES.md, "multi-LoRA"): up to 64 tokens our GEMM reads W once (1.04x cuBLAS at
    # T <= 16) and the LoRA term is gathered per row in its epilogue. From 128 tokens our gathered-row GEMM falls
    # behind cuBLAS (1.9x at 256), so cuBLAS writes X·Wᵀ + b and the epilogue kernel adds the LoRA term in place:
    # per row up to 256 tokens, per segment (tensor cores) beyond.
    if t_bucket <= 16:
        # H200, graphs, PDL: BLOCK_K 128 with 6 stages measured 1.08-1.09x / 1.21-1.56x at 1/1 and 16/16
        # tokens/adapters against 1.09-1.10x / 1.26x for this tile, in two runs (`results/exp_pdl_multi_tiles.json`,
        # `exp_pdl_multi_prefetch_l2.json`): within the spread, not switched
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128 if big else 256, GROUP_M=1, num_warps=4, num_stages=4)
    elif t_bucket <= 64:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128 if big else 256, GROUP_M=1, num_warps=4, num_stages=4)
    elif t_bucket <= 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64 if big else 128, GROUP_M=4, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=1)
    cfg.update(GATHER=t_bucket <= 256, BASE="triton" if t_bucket <= 64 else "cublas")
    # Shrink: segment tiles of 16 rows at decode (one token per adapter is common), 64 in prefill; split K until
    # there are about two programs per SM.
    s_block_m = 16 if t_bucket <= 256 else 64
    tiles = cdiv(t_bucket, s_block_m) + min(t_bucket, 64)
    split_k = 1
    while tiles * (R_PAD // RANK_CHUNK) * split_k < 256 and split_k < 16 and K // (split_k * 2) >= 256:
        split_k *= 2
    # H200, 1 token, measured with PDL (the default there): 4 splits 15.7 µs against 20.5 with 16 (16 tokens: 16
    # splits best); without PDL only 16 splits was measured (18.3 µs)
    if t_bucket == 1:
        split_k = min(split_k, 4)
    cfg.update(S_BLOCK_M=s_block_m, S_BLOCK_K=128 if big else 256, SPLIT_K=split_k, s_num_warps=4, s_num_stages=3)
    cfg.update(EXPAND="fused", E_BLOCK_M=16 if t_bucket <= 256 else 64, E_BLOCK_N=64, E_CHUNKS=4, e_num_warps=4,
               e_num_stages=2)
    # "delta" (BASE="addmm"): one program per (segment tile, slice, chunk of N tiles) does shrink and expand
    cfg.update(D_BLOCK_M=16 if t_bucket <= 256 else 64, D_BLOCK_N=128, D_BLOCK_K=128 if big else 256,
               D_CHUNKS=4 if t_bucket <= 256 else 1, d_num_warps=4, d_num_stages=3)
    # From 32 tokens: the LoRA term (+ bias) first, written once into y by the shrink and the segment expand, then
    # cuBLAS adds X·Wᵀ as its C operand ("addmm"). H200, graphs, 8 weight sets, K = N = 4096, r = 16
    # (`results/exp_multi_kernels*.json`, bench/NOTES.md 2026-12-01): 64/64 2.75x -> 2.44x the base, 256/32
    # 2.29x -> 1.84x, 1024/32 1.69x -> 1.56x, 4096/32 1.32x -> 1.18x against the previous defaults in the same run
    # (side-stream overlap; cuBLAS + in-place expand; cuBLAS + the fused kernel's read-modify-write epilogue, which
    # spilled at 255 registers). Tiles below are the sweep's best for each kernel alone; split K is for one rank
    # chunk and shrinks as the pool's rank adds programs.
    if t_bucket >= 32:
        chunks = R_PAD // RANK_CHUNK
        if t_bucket <= 64:
            shrink, expand = (16, 2, 256 if not big else 128, 4), (16, 128, 8, 3)
        elif t_bucket <= 128 and R_PAD <= RANK_CHUNK:
            # one 256-column tile per expand program at N = 4096 (`results/exp_multi_rows_expand_n1.json`, three
            # rounds): 128/8 1.63x -> 1.52x, 100/25 1.82x -> 1.72x, 128/64 2.23x -> 2.18x, 128/32 at N = 14336
            # 1.69x -> 1.52x, 128/32 1.80x -> 1.81x; at r = 64 its [64, 256] B tile lost (2.50x -> 2.88x)
            shrink, expand = (16, 8, 128, 3), (16, 256, 16, 2)
        elif t_bucket <= 256:
            # 32 x 128 expand tiles at r <= 16 once its stores were 16 bytes wide (`exp_multi_rows_prefill_tiles.json`,
            # expand alone 9.09 -> 8.34 µs at 256/32, 11.5 -> 10.75 at 1024/32; graph 1.68x -> 1.64x, 1.34x -> 1.32x)
            shrink, expand = (16, 8, 128, 3), (32, 128, 16, 2) if R_PAD <= RANK_CHUNK else (16, 64, 16, 2)
        elif t_bucket <= 1024:
            shrink, expand = (64, 8, 128, 3), (32, 128, 16, 3) if R_PAD <= RANK_CHUNK else (32, 64, 16, 3)
        else:
            shrink, expand = (64, 4, 128, 3), (32, 128, 4, 2)
        # The expand is a PDL consumer of the shrink up to 1024 tokens (graphs, two runs: 32/32 2.44-2.49x ->
        # 2.17-2.22x, 64/64 2.38-2.47x -> 2.25-2.30x, 256/32 1.72-1.81x -> 1.62-1.71x; 1024/32 equal), not at
        # 4096/32, where its waiting programs slowed the shrink (1.23-1.24x -> 1.28-1.35x).
        cfg.update(E_PDL=t_bucket <= 1024)
        split_k = max(1, min(shrink[1] // chunks, K // 256))
        cfg.update(BASE="addmm", EXPAND="segment", S_BLOCK_M=shrink[0], SPLIT_K=split_k, S_BLOCK_K=shrink[2],
                   s_num_stages=shrink[3], E_BLOCK_M=expand[0], E_BLOCK_N=expand[1], E_CHUNKS=expand[2],
                   e_num_stages=expand[3])
    # 32-64 tokens: the "rows" kernels (one token per program, whole chunks of A and B at once). H200, graphs over
    # 8 weight sets (`results/exp_multi_rows*.json`): 32/32 2.22-2.24x -> 1.77-1.79x, 64/64 2.24-2.38x -> 1.75x,
    # 64/1 1.80x -> 1.57x, 64/64 at r = 64 3.93x -> 2.97x, 64/64 at N = 14336 1.92x -> 1.59x; from 128 tokens,
    # where an adapter's tokens re-read its A and B (from L2), the segment kernels stay ahead (128/32 1.80x vs
    # 1.90x, 256/32 1.68x vs 2.26x). A shrink chunk of 8K elements at r <= 16 (16K: 1.97x at 64/64), 16K above
    # (64/64 at r = 64: 2.97x vs 3.12x); an expand tile of 16K (8K: 1.84-1.87x, 32K: 2.17x at 64/64).
    # The re-reads grow with rank x (K + N): at r = 64 and N = 14336 the rows kernels lost to the segment ones
    # with 1-32 adapters (64/1 2.36x vs 1.99x, 64/8 2.36x vs 2.01x, 64/32 2.39x vs 2.25x) and won only at 64
    # (2.49x vs 3.21x) (`multi_lora_full_T64.json` against the full grid's earlier run), so they are kept to
    # pools with R_PAD x (K + N) <= 2**19 (r <= 64 at K = N = 4096, r <= 16 at N = 14336).
    if t_bucket in (32, 64) and R_PAD * (K + N) <= 1 << 19:
        cfg.update(EXPAND="rows", **_rows_tiles(R_PAD), r_s_num_warps=4, r_e_num_warps=4)
    # 17-64 tokens, N <= 4096, 16-bit operands: our W-stream GEMM (kernels/wstream.py) computes X·Wᵀ + b first,
    # from the call's start, and the rows kernels run beside it as PDL consumers ("lead"; with PDL only). The
    # shrink walks K in 8 steps of 256 columns (2 splits at K = 4096: 128 light programs that stay resident next
    # to the GEMM until it ends) and the expand's B tiles are 8K elements. H200, graphs over 8 weight sets, two
    # runs (`results/exp_multi_rows_lead*.json`, bench/NOTES.md fourteenth session), against the earlier default
    # (the GEMM after the expand at 64 tokens, cuBLAS at 32): 64/64 1.59-1.60x -> 1.52x, 32/32 1.68-1.75x ->
    # 1.35x, 64/8 1.47x -> 1.36x, 64/64 at r = 64 2.67-2.70x -> 2.36x. Timeline at 64/64: the GEMM runs 0-15.9 µs
    # (12.2 alone; the mix moves 48 MiB at ~3 TB/s), the expand ends 2.2 µs after it. It lost at N = 14336
    # (1.41x -> 1.65x, where cuBLAS stays).
    # Where the segment kernels serve 64 tokens (large rank x (K + N)), the GEMM after the expand ("triton", the
    # thirteenth session's default: 64/64 1.67-1.68x -> 1.60-1.61x against cuBLAS) stays: "lead" with the
    # segment kernels measured 1.78x at 64/64.
    if t_bucket in (32, 64) and N <= 4096 and not big:
        wtiles = {f"W_{k}": v for k, v in wstream_config(t_bucket, dtype, is_cuda).items()}
        if cfg.get("EXPAND") == "rows":
            cfg.update(GEMM="lead", G_ONLY_PDL=True, R_S_ELEMS=4096, R_S_STEPS=8, R_E_ELEMS=8192, **wtiles)
        elif t_bucket == 64:
            cfg.update(GEMM="triton", G_ONLY_PDL=True, **wtiles)
    return cfg


def get_config(T: int, K: int, N: int, R_PAD: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes for one call: one lru_cached table keyed on the power-of-two bucket of T and the layer shape.

    `set_config_override(cfg)` replaces entries (used by the GPU script to compare configs)."""
    cfg = dict(_config(_bucket(T), int(K), int(N), int(R_PAD), dtype, torch.device(device).type == "cuda"))
    cfg.update(_OVERRIDE)
    return cfg


_OVERRIDE: dict = {}


def set_config_override(cfg: dict | None) -> None:
    """Force some config entries for every later call (None clears). For tuning experiments only."""
    _OVERRIDE.clear()
    _OVERRIDE.update(cfg or {})
    _PLANS.clear()  # a plan holds the config it was built with


# When True, the xa workspace is filled with NaN before the shrink, so a test sees any element read unwritten.
DEBUG_FILL_WORKSPACE = False


def rank_pad(R: int) -> int:
    """Width of the xa workspace for a pool of rank R: a multiple of the rank chunk."""
    return cdiv(int(R), RANK_CHUNK) * RANK_CHUNK


# ----------------------------------------------------------------------------------------------- launcher


def multi_lora_forward(x2d, weight, bias, lora_A, lora_B, scalings, ranks, perm, seg_of, seg_start, seg_adapter,
                       slice_sizes, out=None, precision="ieee", adapter_ids=None):
    """Launch the LoRA kernels and the base GEMM (see the module docstring for the paths).

    x2d: [T, K]; weight: [N, K] with N = sum(slice_sizes); bias: [N] or None;
    lora_A: [S, slices, R, K]; lora_B: [S, N, R] (any strides); scalings: fp32 [S]; ranks: int32 [S];
    perm, seg_of: int32 [T]; seg_start: int32 [MAX_SEGS + 1]; seg_adapter: int32 [MAX_SEGS];
    slice_sizes: tuple of ints; out: optional [T, N] to write into; adapter_ids: int32 [T], each token's slot as
    the metadata holds it (-1: base only), which the decode "rows" kernels read (without it that path falls back
    to the segment expand). Returns y [T, N] in x2d's dtype.
    No host sync: every per-batch quantity is read by the kernels from device memory. The checks, the config and
    each kernel's argument list are worked out once per call signature (a `_Plan`, kernels/launch.py).
    """
    slice_sizes = tuple(int(s) for s in slice_sizes)
    tensors = (x2d, weight, bias, lora_A, lora_B, scalings, ranks, perm, seg_of, seg_start, seg_adapter, out,
               adapter_ids)
    key = plan_key(tensors, precision, *slice_sizes)
    plan = _PLANS.find(key)
    if plan is None:
        plan = _PLANS.put(key, _Plan(x2d, weight, bias, lora_A, lora_B, scalings, ranks, perm, seg_of, seg_start,
                                     seg_adapter, slice_sizes, out, precision, adapter_ids))
    return plan.run(*tensors)


_PLANS = PlanCache()


class _Plan:
    """One call signature of `multi_lora_forward`: its checks (run once, at construction), config and path, and
    the kernels' `Launch`es, built at the first `run` from that call's tensors and reused by every later call."""

    def __init__(self, x2d, weight, bias, lora_A, lora_B, scalings, ranks, perm, seg_of, seg_start, seg_adapter,
                 slice_sizes, out, precision, adapter_ids=None):
        T, K = x2d.shape
        N = weight.shape[0]
        S, n_slices, R, Ka = lora_A.shape
        if weight.shape[1] != K or Ka != K:
            raise ValueError(f"weight {tuple(weight.shape)} / lora_A {tuple(lora_A.shape)} do not match x's K={K}")
        if tuple(lora_B.shape) != (S, N, R):
            raise ValueError(f"lora_B must be [S={S}, N={N}, R={R}], got {tuple(lora_B.shape)}")
        if n_slices != len(slice_sizes) or sum(slice_sizes) != N:
            raise ValueError(f"slice_sizes {slice_sizes} must have {n_slices} entries summing to N={N}")
        if bias is not None and tuple(bias.shape) != (N,):
            raise ValueError(f"bias must be [N={N}], got {tuple(bias.shape)}")
        if tuple(scalings.shape) != (S,) or tuple(ranks.shape) != (S,):
            raise ValueError(f"scalings and ranks must be [S={S}], got {tuple(scalings.shape)}, "
                             f"{tuple(ranks.shape)}")
        if perm.shape[0] != T or seg_of.shape[0] != T or seg_start.shape[0] != seg_adapter.shape[0] + 1:
            raise ValueError("batch metadata does not match x: build it for these tokens")
        if adapter_ids is not None and (tuple(adapter_ids.shape) != (T,) or adapter_ids.dtype != torch.int32):
            raise ValueError(f"adapter_ids must be int32 [T={T}], got {tuple(adapter_ids.shape)} {adapter_ids.dtype}")
        if out is not None and (tuple(out.shape) != (T, N) or out.dtype != x2d.dtype):
            raise ValueError(f"out must be [T={T}, N={N}] of {x2d.dtype}, got {tuple(out.shape)} {out.dtype}")
        self.T, self.N, self.n_slices, self.R_PAD = T, N, n_slices, rank_pad(R)
        self.slice_sizes, self.precision = slice_sizes, precision
        self.cfg = cfg = dict(get_config(T, K, N, self.R_PAD, x2d.dtype, x2d.device), _max_segs=seg_adapter.shape[0])
        self.base = base = cfg["BASE"]
        if base not in ("triton", "cublas", "addmm"):
            raise ValueError(f"config BASE must be 'triton', 'cublas' or 'addmm', got {base!r}")
        if base == "addmm":
            self.expand = cfg.get("EXPAND") if cfg.get("EXPAND") in ("delta", "rows") else "segment"
            if self.expand == "rows" and (adapter_ids is None or adapter_ids.stride(0) != 1):
                self.expand = "segment"  # the rows kernels index the ids by token
        else:
            self.expand = "segment" if base != "triton" and cfg.get("EXPAND") == "segment" else "fused"
        self._choose_gemm(x2d, base)
        if self.expand == "rows":
            # the decode kernels: one token per program, whole chunks of A and B at once; the workspace rows are
            # tokens, and its split count is set by the shrink's K chunk
            cfg["R_BLOCK_K"] = _rows_block_k(K, cfg.get("R_S_ELEMS", 8192))
            cfg["SPLIT_K"] = cdiv(K, cfg["R_BLOCK_K"] * cfg.get("R_S_STEPS", 1))
        # PDL pairs: our GEMM after the shrink (it streams W while the shrink runs and waits for ws only in its
        # epilogue); the addmm path's expand after the shrink (its metadata and first B tile load meanwhile)
        if base == "addmm":
            self.pdl = self.expand != "delta" and cfg.get("E_PDL", True) and pdl_enabled(x2d.device)
        else:
            self.pdl = base == "triton" and pdl_enabled(x2d.device)
        self.launches = None

    def _choose_gemm(self, x2d, base):
        """self.gemm and self.gemm_pdl: who computes the addmm path's X·Wᵀ, and whether with PDL."""
        cfg = self.cfg
        # addmm's X·Wᵀ: cuBLAS after the LoRA kernels (GEMM="cublas"), or our W-stream GEMM (kernels/wstream.py):
        # "triton", after them, a PDL consumer of the expand that streams W while they run and reads y only after
        # them; "first", between the shrink and the expand: y = X·Wᵀ + b, launched with PDL right after the shrink
        # (which lets it start at once) and letting the expand start at once too, which loads B meanwhile and adds
        # the term to y once the GEMM is done. The GEMM waits for the shrink before its epilogue, so that the
        # expand's wait (for the GEMM) covers the shrink's workspace too. "lead": the GEMM first (y = X·Wᵀ + b),
        # letting the shrink start at once; the shrink's programs wait for the GEMM only as they exit, so that the
        # expand (which loads B before its wait) sees y once the shrink is done. W's stream starts at the call's
        # start and no LoRA kernel holds the SMs it needs.
        # "lora": the rows shrink, then the GEMM as its PDL consumer, adding each token's LoRA term after W's K loop
        # (kernels/wstream.py, LORA): no expand launch; needs the rows shrink and every slice's width a multiple of
        # the GEMM's BLOCK_N (a tile in one slice), else "lead" is taken. Measured slower than "lead".
        self.gemm = cfg.get("GEMM", "cublas") if base == "addmm" else None
        if self.gemm not in (None, "cublas", "triton", "first", "lead", "lora"):
            raise ValueError(f"config GEMM must be 'cublas', 'triton', 'first', 'lead' or 'lora', got {self.gemm!r}")
        if self.gemm == "lora" and (self.expand != "rows" or any(
                size % self._wstream_tiles(x2d)["BLOCK_N"] for size in self.slice_sizes)):
            self.gemm = "lead"
        if self.gemm == "lead" and self.expand == "delta":
            raise ValueError("config GEMM='lead' needs a shrink kernel: EXPAND 'rows' or 'segment', not 'delta'")
        self.gemm_pdl = (self.gemm in ("triton", "first", "lead", "lora") and cfg.get("G_PDL", True)
                         and pdl_enabled(x2d.device))
        if self.gemm in ("triton", "lead", "lora") and cfg.get("G_ONLY_PDL") and not (
                self.gemm_pdl and wstream_fits(self._wstream_tiles(x2d), x2d.dtype, x2d.device)
                and (self.gemm not in ("lead", "lora") or self.expand == "rows")):
            # the default's choice: without PDL cuBLAS is faster; its 6-stage pipeline (144 KiB at bf16) does not
            # fit a GPU with less shared memory per SM than Hopper's; and "lead" was measured with the rows kernels
            # only (the segment ones, taken when the ids are not given, lost). The rows kernels then get their
            # tiles for a shrink on the critical path.
            if self.gemm in ("lead", "lora") and self.expand == "rows":
                cfg.update(_rows_tiles(self.R_PAD))
            self.gemm, self.gemm_pdl = "cublas", False

    def run(self, x2d, weight, bias, lora_A, lora_B, scalings, ranks, perm, seg_of, seg_start, seg_adapter, out,
            adapter_ids=None):
        T, N, base = self.T, self.N, self.base
        if out is None:
            out = torch.empty((T, N), device=x2d.device, dtype=x2d.dtype)
        if T == 0:
            return out
        ws = None if self.expand == "delta" else _shrink_workspace(self.cfg["SPLIT_K"], self.n_slices, T,
                                                                   self.R_PAD, x2d)
        if self.launches is None:
            self.launches = self._build(x2d, weight, lora_A, lora_B, bias, ws, out)
        shrink, second, gemm = self.launches
        if self.gemm == "lora":  # the rows shrink, then y = X·Wᵀ + b + the LoRA term in one GEMM
            shrink(x2d, lora_A, ws, adapter_ids, ranks)
            gemm(x2d, weight, bias if bias is not None else weight, out, lora_B, ws, adapter_ids, ranks, scalings)
            return out
        if self.gemm == "lead":  # y = X·Wᵀ + b first, then the LoRA kernels (the expand adds the term to y)
            gemm(x2d, weight, bias if bias is not None else weight, out)
        if self.expand == "rows":
            shrink(x2d, lora_A, ws, adapter_ids, ranks)
        elif shrink is not None:
            shrink(x2d, lora_A, ws, perm, seg_start, seg_adapter, ranks)
        if self.gemm in ("first", "lead"):  # ("first": y = X·Wᵀ + b now) the expand adds the LoRA term to y
            if self.gemm == "first":
                gemm(x2d, weight, bias if bias is not None else weight, out)
            if self.expand == "rows":
                second(lora_B, lora_B, ws, out, adapter_ids, ranks, scalings)
            else:
                second(x2d, lora_A, lora_B, lora_B, lora_B if ws is None else ws, out, perm, seg_start,
                       seg_adapter, ranks, scalings)
            return out
        if base == "cublas":  # y = X·Wᵀ + b by cuBLAS (no_grad: a frozen base may still require grad)
            with torch.no_grad():
                _base_gemm(x2d, weight, bias, out)
        if self.expand == "fused":
            second(x2d, weight, bias if bias is not None else weight, lora_B, ws, out, perm, seg_of, seg_start,
                   seg_adapter, ranks, scalings)
        elif self.expand == "rows":
            second(lora_B, bias if bias is not None else lora_B, ws, out, adapter_ids, ranks, scalings)
        else:
            expand_bias = bias if base == "addmm" and bias is not None else lora_B
            second(x2d, lora_A, lora_B, expand_bias, lora_B if ws is None else ws, out, perm, seg_start,
                   seg_adapter, ranks, scalings)
        if gemm is not None:  # our W-stream GEMM adds X·Wᵀ to `out` (below, cuBLAS does)
            gemm(x2d, weight, weight, out)
        elif base == "addmm":
            # the LoRA term and the bias are in every row of `out`: cuBLAS adds X·Wᵀ to it as its C operand
            # (beta = 1), which a GEMM reads almost for free
            with torch.no_grad():
                out.addmm_(x2d, weight.t())
        return out

    def _wstream_tiles(self, x2d) -> dict:
        """The W-stream GEMM's tiles: the CUDA table's come in the config (W_BLOCK_T, ...); a config without them
        (the interpreter's, or an override asking for the GEMM) takes wstream_config's for this device."""
        wcfg = dict(wstream_config(self.T, x2d.dtype, x2d.is_cuda))
        wcfg.update({k[2:]: v for k, v in self.cfg.items() if k.startswith("W_")})
        return wcfg

    def _build(self, x2d, weight, lora_A, lora_B, bias, ws, target):
        """(shrink Launch or None, expand or fused Launch, W-stream GEMM Launch or None) for this signature, from
        one call's tensors."""
        cfg, precision, base = self.cfg, self.precision, self.base
        if self.gemm == "lora":  # shrink -> GEMM (PDL: W streams while the shrink runs)
            shrink = _shrink_rows_launch(x2d, lora_A, ws, cfg, trigger=self.gemm_pdl)
            wcfg = self._wstream_tiles(x2d)
            slices, _ = _slice_table(self.slice_sizes, wcfg["BLOCK_N"], x2d.device)
            gemm = wstream_launch(x2d, weight, target, wcfg, precision, accumulate=False, pdl=self.gemm_pdl,
                                  has_bias=bias is not None,
                                  lora=dict(lora_B=lora_B, ws=ws, slices=slices))
            return shrink, None, gemm
        first, lead = self.gemm == "first", self.gemm == "lead"
        # who lets whom start early (PDL): shrink -> expand -> GEMM, shrink -> GEMM -> expand ("first"), or
        # GEMM -> shrink -> expand ("lead")
        shrink_trigger = self.gemm_pdl if first or lead else self.pdl
        expand_pdl, expand_trigger = (self.gemm_pdl, False) if first or lead else (self.pdl, self.gemm_pdl)
        after_gemm = first or lead  # the expand adds the term to y = X·Wᵀ + b
        expand_bias = None if after_gemm or base != "addmm" else bias
        wait_end = lead and self.gemm_pdl
        if ws is None:
            shrink = None
        elif self.expand == "rows":
            shrink = _shrink_rows_launch(x2d, lora_A, ws, cfg, trigger=shrink_trigger, wait_end=wait_end)
        else:
            shrink = _shrink_launch(x2d, lora_A, ws, cfg, precision, trigger=shrink_trigger, wait_end=wait_end)
        if self.expand == "rows":
            second = _expand_rows_launch(x2d, lora_B, expand_bias, ws, target, self.slice_sizes, cfg,
                                         pdl=expand_pdl, trigger=expand_trigger, accumulate=after_gemm)
        elif self.expand == "fused":
            second = _fused_launch(x2d, weight, bias, lora_B, ws, target, self.slice_sizes, cfg, precision,
                                   int(base == "cublas"), pdl=self.pdl)
        else:
            second = _expand_launch(x2d, lora_A, lora_B, expand_bias, ws, target, self.slice_sizes, cfg, precision,
                                    accumulate=base == "cublas" or after_gemm, pdl=expand_pdl,
                                    trigger=expand_trigger)
        gemm = None
        if self.gemm in ("triton", "first", "lead"):
            wcfg = self._wstream_tiles(x2d)
            if lead:
                gemm = wstream_launch(x2d, weight, target, wcfg, precision, accumulate=False, pdl=False,
                                      has_bias=bias is not None, trigger=self.gemm_pdl)
            elif first:
                gemm = wstream_launch(x2d, weight, target, wcfg, precision, accumulate=False,
                                      pdl=self.gemm_pdl and shrink is not None, has_bias=bias is not None,
                                      trigger=self.gemm_pdl)
            else:
                gemm = wstream_launch(x2d, weight, target, wcfg, precision, accumulate=True, pdl=self.gemm_pdl)
        return shrink, second, gemm


def _shrink_workspace(split_k, n_slices, T, R_PAD, x2d):
    """The shrink's fp32 (fp64 for fp64) partial sums [SPLIT_K, slices, T, R_PAD]; NaN-filled under
    DEBUG_FILL_WORKSPACE, so that a test sees any element read unwritten."""
    acc = torch.float64 if x2d.dtype == torch.float64 else torch.float32
    ws = torch.empty((split_k, n_slices, T, R_PAD), device=x2d.device, dtype=acc)
    if DEBUG_FILL_WORKSPACE:
        ws.fill_(float("nan"))
    return ws


def _base_gemm(x2d, weight, bias, out):
    """out [T, N] = x2d @ weightᵀ (+ bias) by cuBLAS."""
    if bias is not None:
        torch.addmm(bias, x2d, weight.t(), out=out)
    else:
        torch.mm(x2d, weight.t(), out=out)


_FUSED_SLOTS = ("x_ptr", "w_ptr", "bias_ptr", "b_ptr", "ws_ptr", "y_ptr", "perm_ptr", "seg_of_ptr", "seg_start_ptr",
                "seg_adapter_ptr", "ranks_ptr", "scalings_ptr")
_EXPAND_SLOTS = ("x_ptr", "a_ptr", "b_ptr", "bias_ptr", "ws_ptr", "y_ptr", "perm_ptr", "seg_start_ptr",
                 "seg_adapter_ptr", "ranks_ptr", "scalings_ptr")
_SHRINK_SLOTS = ("x_ptr", "a_ptr", "ws_ptr", "perm_ptr", "seg_start_ptr", "seg_adapter_ptr", "ranks_ptr")
_SHRINK_ROWS_SLOTS = ("x_ptr", "a_ptr", "ws_ptr", "ids_ptr", "ranks_ptr")
_EXPAND_ROWS_SLOTS = ("b_ptr", "bias_ptr", "ws_ptr", "y_ptr", "ids_ptr", "ranks_ptr", "scalings_ptr")


def _rows_block_k(K: int, elems: int) -> int:
    """K columns per program of the rows shrink: a [RANK_CHUNK, BLOCK_K] slice of A of about `elems` elements."""
    return max(16, min(next_pow2(K), next_pow2(max(1, elems // RANK_CHUNK))))


def _shrink_rows_launch(x2d, lora_A, ws, cfg, trigger=False, wait_end=False):
    """The `_shrink_rows_kernel` Launch: ws[split, slice, t, :rank] over one K chunk of R_BLOCK_K columns per
    program; called with the `_SHRINK_ROWS_SLOTS` tensors. trigger: the next launch is a PDL consumer; wait_end: a
    PDL consumer of the kernel before it, waited for only at each program's end. The tensors give shapes and
    strides only."""
    T, K = x2d.shape
    split_k, n_slices, _, R_PAD = ws.shape
    num_rchunks = R_PAD // RANK_CHUNK
    return Launch(
        _shrink_rows_kernel, (T, n_slices * num_rchunks, split_k), _SHRINK_ROWS_SLOTS,
        *(None,) * 5,
        T, K,
        x2d.stride(0), x2d.stride(1),
        *lora_A.stride(),
        ws.stride(0), ws.stride(1), ws.stride(2),
        NUM_RCHUNKS=num_rchunks, BLOCK_R=RANK_CHUNK, BLOCK_K=cfg["R_BLOCK_K"], K_STEPS=cfg.get("R_S_STEPS", 1),
        ACC=acc_dtype(x2d.dtype), TRIGGER=trigger, WAIT_END=wait_end, num_warps=cfg.get("r_s_num_warps", 4),
        num_stages=1, **({"launch_pdl": True} if wait_end else {}),
    )


# The rows expand on the pool's B layout (N contiguous): 16-byte vectors along N put 8 columns in a thread, 256 in a
# warp; with fewer than 256 columns per warp the warps split the rank rows and the sum over them goes through
# shared memory (and xa's loads turn scalar). H200, graphs, the pool's layout (`exp_multi_rows_pool_expand_tiles.json`,
# bench/NOTES.md seventeenth session): 1024 columns at r <= 16 against 512: 64/64 1.68x -> 1.50x, 48/48 1.65x ->
# 1.46x, 64/8 1.54x -> 1.37x, 32/32 1.50x -> 1.40x, 20/20 1.21x -> 1.12x.
ROWS_POOL_COLS_PER_WARP = 256


def _rows_block_n(lora_B, slice_sizes, cfg, block_r: int) -> int:
    """Columns per program of the rows expand: R_E_ELEMS / BLOCK_R (a power of two, at least 16, at most the widest
    slice's power of two), raised to ROWS_POOL_COLS_PER_WARP per warp where B's N is contiguous and BLOCK_R is one
    rank chunk, so that each thread sums its columns over every rank row itself."""
    block_n = next_pow2(max(1, cfg.get("R_E_ELEMS", 8192) // block_r))
    if lora_B.stride(1) == 1 and block_r <= RANK_CHUNK:  # config R_POOL_COLS_PER_WARP 0: off (A/B timing)
        block_n = max(block_n, cfg.get("R_POOL_COLS_PER_WARP", ROWS_POOL_COLS_PER_WARP) * cfg.get("r_e_num_warps", 4))
    return max(16, min(next_pow2(max(slice_sizes)), block_n))


def _expand_rows_launch(x2d, lora_B, bias, ws, target, slice_sizes, cfg, pdl=False, trigger=False,
                        accumulate=False):
    """The `_expand_rows_kernel` Launch: target = bias + the LoRA term, one token and R_E_ELEMS / BLOCK_R
    columns per program; called with the `_EXPAND_ROWS_SLOTS` tensors (bias: any tensor when None). pdl: a PDL
    consumer of the kernel before it; trigger: a PDL producer for the W-stream GEMM; accumulate: target += the
    term (it holds X·Wᵀ + b). The tensors give shapes and strides only.
    With B's N contiguous (the pool's Bᵀ [S, R, N] viewed) and a rank block of RANK_CHUNK, the tile is at least
    ROWS_POOL_COLS_PER_WARP columns per warp (`_rows_block_n`)."""
    T = x2d.shape[0]
    block_r = max(RANK_CHUNK, next_pow2(lora_B.shape[2]))
    block_n = _rows_block_n(lora_B, slice_sizes, cfg, block_r)
    slices, n_tiles = _slice_table(slice_sizes, block_n, x2d.device)
    return Launch(
        _expand_rows_kernel, (T, n_tiles), _EXPAND_ROWS_SLOTS,
        *(None,) * 7, slices, T,
        *lora_B.stride(),
        ws.stride(0), ws.stride(1), ws.stride(2),
        target.stride(0), target.stride(1),
        HAS_BIAS=bias is not None and not accumulate, NUM_SLICES=len(slice_sizes), SPLIT_K=ws.shape[0],
        BLOCK_R=block_r, BLOCK_N=block_n, ACC=acc_dtype(x2d.dtype), GDC_WAIT=pdl, COL_ALIGN=_col_align(slice_sizes, cfg),
        R_ALIGNED=_r_aligned(lora_B, cfg), TRIGGER=trigger, ACCUMULATE=accumulate,
        num_warps=cfg.get("r_e_num_warps", 4), num_stages=1, **({"launch_pdl": True} if pdl else {}),
    )


def _fused_launch(x2d, weight, bias, lora_B, ws, target, slice_sizes, cfg, precision, base_mode, pdl=False):
    """The `_fused_kernel` Launch: target [T, N] = base GEMM and/or LoRA epilogue over (row tile, N tile)
    programs; called with the `_FUSED_SLOTS` tensors (bias: any tensor when None). pdl: a PDL consumer of the
    shrink. The tensors give shapes and strides only."""
    T, K = x2d.shape
    slices, n_tiles = _slice_table(slice_sizes, cfg["BLOCK_N"], x2d.device)
    grid = (cdiv(T, cfg["BLOCK_M"]) * n_tiles,)
    return Launch(
        _fused_kernel, grid, _FUSED_SLOTS,
        *(None,) * 12, slices,
        T, K, n_tiles,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        *lora_B.stride(),
        ws.stride(0), ws.stride(1), ws.stride(2),
        target.stride(0), target.stride(1),
        HAS_BIAS=bias is not None, NUM_SLICES=len(slice_sizes), SPLIT_K=ws.shape[0],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=RANK_CHUNK,
        GROUP_M=cfg["GROUP_M"], PRECISION=precision, ACC=acc_dtype(x2d.dtype),
        GATHER=bool(cfg["GATHER"]), GATHER_R=_gather_r(cfg["BLOCK_M"], cfg["BLOCK_N"]),
        BASE_MODE=base_mode, GDC_WAIT=pdl, COL_ALIGN=_col_align(slice_sizes, cfg), R_ALIGNED=_r_aligned(lora_B, cfg),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **({"launch_pdl": True} if pdl else {}),
    )


def _expand_launch(x2d, lora_A, lora_B, bias, ws, target, slice_sizes, cfg, precision, accumulate, pdl=False,
                   trigger=False):
    """The `_expand_kernel` Launch: target (+)= the LoRA term over (segment tile, slice, N chunk) programs; called
    with the `_EXPAND_SLOTS` tensors (bias and ws: any tensor when None). bias: written with the term when not
    accumulating; ws None: xa computed in the same launch (SHRINK; config keys D_*, else E_*). pdl: a PDL consumer
    of the shrink; trigger: a PDL producer for the W-stream GEMM. The tensors give shapes and strides only."""
    T, K = x2d.shape
    shrink = ws is None
    key = "D" if shrink else "E"
    max_segs = cfg["_max_segs"]
    slices, _ = _slice_table(slice_sizes, cfg[f"{key}_BLOCK_N"], x2d.device)
    block_r = max(RANK_CHUNK, next_pow2(lora_A.shape[2]))
    block_m = min(cfg[f"{key}_BLOCK_M"], max(16, 4096 // block_r))  # xa [BLOCK_M, BLOCK_R] stays in registers
    chunks = cfg[f"{key}_CHUNKS"]
    grid = (cdiv(T, block_m) + max_segs, len(slice_sizes) * chunks)
    return Launch(
        _expand_kernel, grid, _EXPAND_SLOTS,
        *(None,) * 11, slices, T, K, max_segs,
        x2d.stride(0), x2d.stride(1),
        *lora_A.stride(),
        *lora_B.stride(),
        *((0, 0, 0) if shrink else ws.stride()[:3]),
        target.stride(0), target.stride(1),
        SHRINK=shrink, ACCUMULATE=accumulate, HAS_BIAS=bias is not None and not accumulate,
        SEGS_P2=next_pow2(max_segs), CHUNKS=chunks, SPLIT_K=1 if shrink else ws.shape[0],
        BLOCK_M=block_m, BLOCK_N=cfg[f"{key}_BLOCK_N"], BLOCK_K=cfg.get("D_BLOCK_K", 64), BLOCK_R=block_r,
        PRECISION=precision, ACC=acc_dtype(x2d.dtype), GDC_WAIT=pdl, COL_ALIGN=_col_align(slice_sizes, cfg),
        R_ALIGNED=_r_aligned(lora_B, cfg), TRIGGER=trigger,
        num_warps=cfg[f"{key.lower()}_num_warps"], num_stages=cfg[f"{key.lower()}_num_stages"],
        **({"launch_pdl": True} if pdl else {}),
    )


def _shrink_launch(x2d, lora_A, ws, cfg, precision, trigger=False, wait_end=False):
    """The `_shrink_kernel` Launch: ws[split, slice, p, :rank] = X[perm[p]] @ A[a, slice, :rank]ᵀ over one K split;
    called with the `_SHRINK_SLOTS` tensors. trigger: the next launch is a PDL consumer; wait_end: a PDL consumer
    of the kernel before it, waited for only at each program's end. The tensors give shapes and strides only."""
    T, K = x2d.shape
    split_k, n_slices, _, R_PAD = ws.shape
    max_segs = cfg["_max_segs"]
    k_per_split = cdiv(cdiv(K, split_k), cfg["S_BLOCK_K"]) * cfg["S_BLOCK_K"]
    num_rchunks = R_PAD // RANK_CHUNK
    grid = (cdiv(T, cfg["S_BLOCK_M"]) + max_segs, n_slices * num_rchunks, split_k)
    return Launch(
        _shrink_kernel, grid, _SHRINK_SLOTS,
        *(None,) * 7,
        T, K, k_per_split, max_segs,
        x2d.stride(0), x2d.stride(1),
        *lora_A.stride(),
        ws.stride(0), ws.stride(1), ws.stride(2),
        SEGS_P2=next_pow2(max_segs), NUM_RCHUNKS=num_rchunks,
        BLOCK_M=cfg["S_BLOCK_M"], BLOCK_R=RANK_CHUNK, BLOCK_K=cfg["S_BLOCK_K"], PRECISION=precision,
        ACC=acc_dtype(x2d.dtype), TRIGGER=trigger, WAIT_END=wait_end,
        num_warps=cfg["s_num_warps"], num_stages=cfg["s_num_stages"], **({"launch_pdl": True} if wait_end else {}),
    )


# One uncached launch of each kernel (tuning scripts time the kernels alone with these).
def _launch_shrink(x2d, lora_A, ws, perm, seg_start, seg_adapter, ranks, cfg, precision, trigger=False):
    cfg = dict(cfg, _max_segs=seg_adapter.shape[0])
    _shrink_launch(x2d, lora_A, ws, cfg, precision, trigger)(x2d, lora_A, ws, perm, seg_start, seg_adapter, ranks)


def _launch_expand(x2d, lora_A, lora_B, bias, ws, target, perm, seg_start, seg_adapter, ranks, scalings, slice_sizes,
                   cfg, precision, accumulate, pdl=False):
    cfg = dict(cfg, _max_segs=seg_adapter.shape[0])
    launch = _expand_launch(x2d, lora_A, lora_B, bias, ws, target, tuple(slice_sizes), cfg, precision, accumulate,
                            pdl)
    launch(x2d, lora_A, lora_B, lora_B if bias is None else bias, lora_B if ws is None else ws, target, perm,
           seg_start, seg_adapter, ranks, scalings)


def _launch_fused(x2d, weight, bias, lora_B, ws, target, perm, seg_of, seg_start, seg_adapter, ranks, scalings,
                  slice_sizes, cfg, precision, base_mode, pdl=False):
    launch = _fused_launch(x2d, weight, bias, lora_B, ws, target, tuple(slice_sizes), cfg, precision, base_mode, pdl)
    launch(x2d, weight, weight if bias is None else bias, lora_B, ws, target, perm, seg_of, seg_start, seg_adapter,
           ranks, scalings)


def _gather_r(block_m: int, block_n: int) -> int:
    """Rank rows per step of the gather epilogue: its [BLOCK_M, GATHER_R, BLOCK_N] B tile stays near 8K elements."""
    return max(1, min(16, 8192 // (block_m * block_n)))


def _col_align(slice_sizes: tuple, cfg: dict) -> int:
    """The largest power of two up to 16 that divides every slice's width (and so every slice's column offset):
    the divisibility the kernels assert for the values they read from the slice table (`_slice_span`).
    1 when the config sets VEC_HINTS False (the kernels as they were before these hints, for A/B timing)."""
    align = 16 if cfg.get("VEC_HINTS", True) else 1
    while any(size % align for size in slice_sizes):
        align //= 2
    return align


def _r_aligned(lora_B, cfg: dict) -> bool:
    """R_ALIGNED of the expand kernels (`helpers.rank_bound`): B's rank R a multiple of 8 (the workspace's width, a
    multiple of RANK_CHUNK, always is), unless the config sets VEC_HINTS False."""
    return lora_B.shape[2] % 8 == 0 and cfg.get("VEC_HINTS", True)


_SLICE_TABLES: dict = {}


def _slice_table(slice_sizes: tuple, block_n: int, device) -> tuple:
    """int32 [slices, 3] = (column offset, width, first N tile) on `device`, cached so that a graphed call allocates
    nothing new; and the total number of N tiles."""
    key = (slice_sizes, block_n, str(device))
    if key not in _SLICE_TABLES:
        rows, offset, tile = [], 0, 0
        for size in slice_sizes:
            rows.append((offset, size, tile))
            offset += size
            tile += cdiv(size, block_n)
        _SLICE_TABLES[key] = (cached_device_tensor(torch.tensor(rows, dtype=torch.int32), device), tile)
    return _SLICE_TABLES[key]


__all__ = ["multi_lora_forward", "get_config", "set_config_override", "rank_pad", "RANK_CHUNK"]
