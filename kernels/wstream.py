"""A skinny GEMM that streams W: `Y (+)= X·Wᵀ (+ b)` for a few rows (16 to 256), beside the multi-LoRA kernels.

Why it exists: at decode sizes W's stream (32 MiB at K = N = 4096, the whole cost of the base) and the adapters'
reads (16 MiB at 64 tokens / 64 adapters) should overlap, and cuBLAS can neither start early (programmatic
dependent launch) nor let later kernels start beside it. The multi-LoRA forward (kernels/multi_lora.py) uses it
two ways: launched first (GEMM="lead", the default at 17-64 tokens), writing X·Wᵀ + b from the call's start and
letting the LoRA kernels start at once beside it (TRIGGER); or launched with PDL after the LoRA expand (GEMM="triton"),
streaming W while the shrink and the expand run and waiting for them (`gdc_wait`) only before it adds y; or adding
the LoRA term itself (GEMM="lora", `LORA`): launched with PDL after the rows shrink, it streams W while the shrink
runs, waits for the shrink's xa partials after its K loop, then adds each row's term on the FMA units from B rows
gathered by token (no expand launch, and y is written once). Measured slower than "lead" (bench/NOTES.md,
seventeenth session); kept as a tested option.

H200, bf16, K = N = 4096, CUDA graphs over 8 weight sets (`bench/exp_skinny_gemm.py`,
`results/exp_skinny_gemm.json`): the plain GEMM with all rows in one tile, BLOCK_N 32, BLOCK_K 128 and 6 stages
ran 0.92x / 1.06x / 1.03x cuBLAS at 16 / 32 / 64 rows (pointer loads; tensor descriptors 0.96-1.02x).
"""
import torch
import triton
import triton.language as tl

from .helpers import (
    acc_dtype, adapter_slot, cdiv, dot, gdc_launch_dependents_if, gdc_wait_if, next_pow2, rank_bound,
)
from .launch import Launch


@triton.jit
def _tile_adapters(ids_ptr, ranks_ptr, scalings_ptr, t_start, t_end, BLOCK_T: tl.constexpr, ACC: tl.constexpr):
    """(slot clamped to >= 0, true rank (0 for base-only tokens), scaling) of the tile's tokens t_start + [0,
    BLOCK_T), each [BLOCK_T]: loaded before the W loop, so that `_lora_term`'s steps read no metadata from memory
    (a chain of dependent loads per step, ids -> rank -> B, that the pipeliner cannot hide)."""
    tok = t_start + tl.arange(0, BLOCK_T)
    return adapter_slot(tl.load(ids_ptr + tok, mask=tok < t_end, other=-1), ranks_ptr, scalings_ptr, ACC)


@triton.jit
def _lora_term(acc, rows, cols, col_mask, slice_id, t_end, safe_t, rank_t, scale_t, b_ptr, ws_ptr, stride_bn,
               stride_bs, stride_br, stride_wsk, stride_wsi, stride_wst, SPLIT_K: tl.constexpr,
               BLOCK_R: tl.constexpr, RANK_VEC: tl.constexpr, ACC: tl.constexpr, DTYPE: tl.constexpr):
    """acc [BLOCK_T, BLOCK_N] + the LoRA term of the tile's rows (tokens) below t_end, on the FMA units:
    term[t, n] = sum_j round(s[a] · sum_split xa_part[split, slice_id, t, j]) · B[a, n, j] (a = ids[t]) over the
    rank rows j < BLOCK_R, RANK_VEC of them per step: one [BLOCK_T, BLOCK_N, RANK_VEC] tile of B gathered by row
    (RANK_VEC 8 where B's rank is its contiguous dimension, B [S, N, R]: 16-byte vectors along the rank, summed in
    each thread; 1 where N is, the pool's Bᵀ [S, R, N] viewed: 16-byte vectors along N). Rank rows at or past a
    token's true rank, and base-only tokens (rank 0), are masked off (never read: they may hold anything).
    safe_t, rank_t, scale_t: `_tile_adapters` of the rows; ws [SPLIT_K, slices, T, >= BLOCK_R] from
    `_shrink_rows_kernel` (rows are tokens); b [S, N, R] (any strides). DTYPE: the operands' dtype (xa is rounded
    to it, as the other paths do). Unrolled over the rank, so that every step's loads can be in flight together."""
    row_ok = rows < t_end
    offs_v = tl.arange(0, RANK_VEC)
    b_rows = b_ptr + safe_t.to(tl.int64)[:, None, None] * stride_bs + cols[None, :, None] * stride_bn
    ws_rows = ws_ptr + slice_id.to(tl.int64) * stride_wsi + rows.to(tl.int64)[:, None] * stride_wst
    term = tl.zeros(acc.shape, dtype=ACC)
    # loads up to the rank rounded up to RANK_VEC (a mask constant over each vector; B's R and the workspace's
    # width are multiples of it), the rows past the true rank zeroed after the load
    rank_load = rank_bound(rank_t, RANK_VEC > 1)
    for j0 in tl.static_range(0, BLOCK_R, RANK_VEC):
        live = row_ok[:, None] & (j0 + offs_v[None, :] < rank_t[:, None])  # [BLOCK_T, RANK_VEC]
        load = row_ok[:, None] & (j0 + offs_v[None, :] < rank_load[:, None])
        b = tl.load(b_rows + (j0 + offs_v)[None, None, :] * stride_br,
                    mask=load[:, None, :] & col_mask[None, :, None], other=0.0)
        b = tl.where(live[:, None, :], b.to(ACC), 0.0)
        xa = tl.zeros(live.shape, dtype=ACC)
        for split in tl.static_range(SPLIT_K):
            xa += tl.load(ws_rows + split * stride_wsk + j0 + offs_v[None, :], mask=load, other=0.0)
        xa = tl.where(live, (xa * scale_t[:, None]).to(DTYPE).to(ACC), 0.0)
        term += tl.sum(xa[:, None, :] * b, axis=2)
    return acc + term


@triton.jit
def _wstream_tile(x_ptr, w_ptr, bias_ptr, y_ptr, b_ptr, ws_ptr, ids_ptr, ranks_ptr, scalings_ptr, slices_ptr, tile,
                  T, N, K, stride_xt, stride_xk, stride_wn, stride_wk, stride_yt, stride_yn, stride_bs, stride_bn,
                  stride_br, stride_wsk, stride_wsi, stride_wst, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  GDC_WAIT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, LORA: tl.constexpr,
                  NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr,
                  RANK_VEC: tl.constexpr):
    """One [BLOCK_T, BLOCK_N] tile of `_wstream_kernel` (tile: its index, row tiles of one N tile adjacent)."""
    num_t = tl.cdiv(T, BLOCK_T)
    pid_t = tile % num_t
    pid_n = tile // num_t
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = rows < T
    col_mask = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xt
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC)
    if LORA:
        t_end = tl.minimum(pid_t * BLOCK_T + BLOCK_T, T)
        safe_t, rank_t, scale_t = _tile_adapters(ids_ptr, ranks_ptr, scalings_ptr, pid_t * BLOCK_T, t_end, BLOCK_T,
                                                 ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + offs_k).to(tl.int64)
        if EVEN_K:
            x_mask = row_mask[:, None]
            w_mask = col_mask[:, None]
        else:
            x_mask = row_mask[:, None] & (ks < K)[None, :]
            w_mask = col_mask[:, None] & (ks < K)[None, :]
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=x_mask, other=0.0)
        w = tl.load(w_rows + ks[None, :] * stride_wk, mask=w_mask, other=0.0)
        acc = dot(x, tl.trans(w), acc, PRECISION)
    gdc_wait_if(GDC_WAIT)
    if LORA:  # the tile lies in one slice (every slice's width is a multiple of BLOCK_N: the host checks)
        slice_id = pid_n * 0
        for i in tl.static_range(1, NUM_SLICES):
            slice_id = tl.where(pid_n * BLOCK_N >= tl.load(slices_ptr + 3 * i), i, slice_id)
        acc = _lora_term(acc, rows, cols.to(tl.int64), col_mask, slice_id, t_end, safe_t, rank_t, scale_t, b_ptr,
                         ws_ptr, stride_bn, stride_bs, stride_br, stride_wsk, stride_wsi, stride_wst, SPLIT_K, BLOCK_R,
                         RANK_VEC, ACC, x_ptr.dtype.element_ty)
    y = y_ptr + rows.to(tl.int64)[:, None] * stride_yt + cols.to(tl.int64)[None, :] * stride_yn
    out_mask = row_mask[:, None] & col_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(y, mask=out_mask, other=0.0).to(ACC)
    elif HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["T"])
def _wstream_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, b_ptr, ws_ptr, ids_ptr, ranks_ptr, scalings_ptr, slices_ptr,
    T, N, K,
    stride_xt, stride_xk, stride_wn, stride_wk, stride_yt, stride_yn,
    stride_bs, stride_bn, stride_br, stride_wsk, stride_wsi, stride_wst,
    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, GDC_WAIT: tl.constexpr, TRIGGER: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, PERSISTENT: tl.constexpr,
    LORA: tl.constexpr, NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr,
    RANK_VEC: tl.constexpr,
):
    """Y[t, n] = (Y[t, n] if ACCUMULATE else b[n] if HAS_BIAS else 0) + sum_k X[t, k] · W[n, k], rounded once to
    Y's dtype.

    x [T, K], w [N, K], bias [N], y [T, N] (any strides). Grid: (cdiv(T, BLOCK_T) * cdiv(N, BLOCK_N),), the row
    tiles of one N tile next to each other, so that they read W's tile from L2 after the first; PERSISTENT: fewer
    programs (about one per SM), each walking tiles pid, pid + programs, ... (no wave of late programs where the
    tiles outnumber the SMs). T: rows (not specialised). EVEN_K: K % BLOCK_K == 0 (no column mask in the loop).
    GDC_WAIT: launched with PDL after another kernel: the K loop runs meanwhile, and y is read and written only
    after the wait (so this kernel ends after that one). TRIGGER: let the PDL-launched kernel after this one start
    now. PRECISION: tl.dot precision for fp32 operands; ACC: accumulator dtype.
    LORA (ACCUMULATE off): also add each token's LoRA term (`_lora_term`: b [S, N, R], ws [SPLIT_K, slices, T,
    >= BLOCK_R] written by the rows shrink, which this kernel waits for when GDC_WAIT, ids int32 [T], ranks int32
    [S], scalings fp32 [S], slices int32 [NUM_SLICES, 3] with each slice's column offset first); BLOCK_R: the
    padded rank (a power of two), the rank rows walked, RANK_VEC at a time (`_lora_term`).
    """
    gdc_launch_dependents_if(TRIGGER)
    pid = tl.program_id(0)
    if PERSISTENT:
        num_tiles = tl.cdiv(T, BLOCK_T) * tl.cdiv(N, BLOCK_N)
        for tile in range(pid, num_tiles, tl.num_programs(0)):
            _wstream_tile(x_ptr, w_ptr, bias_ptr, y_ptr, b_ptr, ws_ptr, ids_ptr, ranks_ptr, scalings_ptr, slices_ptr,
                          tile, T, N, K, stride_xt, stride_xk, stride_wn, stride_wk, stride_yt, stride_yn, stride_bs,
                          stride_bn, stride_br, stride_wsk, stride_wsi, stride_wst, ACCUMULATE, HAS_BIAS, GDC_WAIT,
                          EVEN_K, BLOCK_T, BLOCK_N, BLOCK_K, PRECISION, ACC, LORA, NUM_SLICES, SPLIT_K, BLOCK_R,
                          RANK_VEC)
    else:
        _wstream_tile(x_ptr, w_ptr, bias_ptr, y_ptr, b_ptr, ws_ptr, ids_ptr, ranks_ptr, scalings_ptr, slices_ptr, pid,
                      T, N, K, stride_xt, stride_xk, stride_wn, stride_wk, stride_yt, stride_yn, stride_bs, stride_bn,
                      stride_br, stride_wsk, stride_wsi, stride_wst, ACCUMULATE, HAS_BIAS, GDC_WAIT, EVEN_K, BLOCK_T,
                      BLOCK_N, BLOCK_K, PRECISION, ACC, LORA, NUM_SLICES, SPLIT_K, BLOCK_R, RANK_VEC)


_SLOTS = ("x_ptr", "w_ptr", "bias_ptr", "y_ptr")
_LORA_SLOTS = _SLOTS + ("b_ptr", "ws_ptr", "ids_ptr", "ranks_ptr", "scalings_ptr")


def wstream_config(T: int, dtype: torch.dtype, is_cuda: bool) -> dict:
    """Tiles for `wstream_launch`: all rows in one tile up to 64 (W read once), then 64-row tiles. The interpreter
    gets small blocks."""
    if not is_cuda:
        return dict(BLOCK_T=16, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)
    big = dtype.itemsize >= 4  # 4- and 8-byte operands: halve the K step to stay in shared memory
    block_t = min(64, max(16, next_pow2(T)))
    return dict(BLOCK_T=block_t, BLOCK_N=32, BLOCK_K=64 if big else 128, num_warps=4, num_stages=6 if not big else 4)


def wstream_fits(cfg: dict, dtype: torch.dtype, device) -> bool:
    """Whether `cfg`'s pipeline ((BLOCK_T + BLOCK_N) x BLOCK_K operands per stage) fits a multiprocessor's shared
    memory on `device` (a CUDA device; 1 KiB left for the runtime)."""
    from .config import shared_memory_per_sm  # config imports helpers, which this module imports too

    need = (cfg["BLOCK_T"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * dtype.itemsize * cfg["num_stages"]
    return need + 1024 <= shared_memory_per_sm(torch.device(device))


def wstream_launch(x2d, weight, y, cfg: dict, precision: str, accumulate: bool = True, pdl: bool = False,
                   has_bias: bool = False, trigger: bool = False, lora: dict | None = None) -> Launch:
    """The `_wstream_kernel` Launch for y [T, N] (+)= x2d [T, K] · weight [N, K]ᵀ (+ bias); called with
    (x2d, weight, bias, y), bias any tensor unless has_bias (which needs accumulate False).
    cfg: `wstream_config`'s keys (BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages; optional `programs`: at most
    that many programs, each walking several tiles, where the tiles outnumber it). pdl: launched as a PDL
    consumer of the kernel before it (which must let it start early, `gdc_launch_dependents`, for any overlap);
    trigger: a PDL producer for the kernel after it. The tensors give shapes and strides only.
    lora: also add each token's LoRA term (LORA, accumulate False), a dict of lora_B [S, N, R], ws (the rows
    shrink's [SPLIT_K, slices, T, R_PAD] partials) and slices (the int32 [slices, 3] table, column offsets first;
    every slice's width a multiple of BLOCK_N); then called with (x2d, weight, bias, y, lora_B, ws, ids, ranks,
    scalings)."""
    T, K = x2d.shape
    N = weight.shape[0]
    tiles = cdiv(T, cfg["BLOCK_T"]) * cdiv(N, cfg["BLOCK_N"])
    programs = cfg.get("programs", 0)  # 0: one program per tile; else at most this many, each walking tiles
    persistent = 0 < programs < tiles
    grid = (programs if persistent else tiles,)
    if lora is not None:
        if accumulate:
            raise ValueError("wstream_launch: the LoRA term is written with y = X·Wᵀ + b (accumulate False)")
        ws, lora_B = lora["ws"], lora["lora_B"]
        block_r = next_pow2(max(16, lora_B.shape[2]))
        extra = dict(slices=lora["slices"], strides=(*lora_B.stride(), *ws.stride()[:3]), n_slices=ws.shape[1],
                     split_k=ws.shape[0], block_r=block_r,
                     rank_vec=8 if lora_B.stride(2) == 1 and lora_B.shape[2] % 8 == 0 else 1)
    else:
        extra = dict(slices=None, strides=(0,) * 6, n_slices=1, split_k=1, block_r=16, rank_vec=1)
    return Launch(
        _wstream_kernel, grid, _LORA_SLOTS if lora is not None else _SLOTS,
        *(None,) * 9, extra["slices"], T, N, K,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        *extra["strides"],
        ACCUMULATE=accumulate, HAS_BIAS=has_bias and not accumulate, GDC_WAIT=pdl, TRIGGER=trigger,
        EVEN_K=K % cfg["BLOCK_K"] == 0,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PRECISION=precision,
        ACC=acc_dtype(x2d.dtype), PERSISTENT=persistent, LORA=lora is not None, NUM_SLICES=extra["n_slices"],
        SPLIT_K=extra["split_k"], BLOCK_R=extra["block_r"], RANK_VEC=extra["rank_vec"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **({"launch_pdl": True} if pdl else {}),
    )


__all__ = ["wstream_config", "wstream_fits", "wstream_launch"]
