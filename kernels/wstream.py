"""A skinny GEMM that streams W: `Y (+)= X·Wᵀ (+ b)` for a few rows (16 to 256), beside the multi-LoRA kernels.

Why it exists: at decode sizes W's stream (32 MiB at K = N = 4096, the whole cost of the base) and the adapters'
reads (16 MiB at 64 tokens / 64 adapters) should overlap, and cuBLAS can neither start early (programmatic
dependent launch) nor let later kernels start beside it. The multi-LoRA forward (kernels/multi_lora.py) uses it
two ways: launched first (GEMM="lead", the default at 17-64 tokens), writing X·Wᵀ + b from the call's start and
letting the LoRA kernels start at once beside it (TRIGGER); or launched with PDL after the LoRA expand (GEMM="triton"),
streaming W while the shrink and the expand run and waiting for them (`gdc_wait`) only before it adds y.

H200, bf16, K = N = 4096, CUDA graphs over 8 weight sets (`bench/exp_skinny_gemm.py`,
`results/exp_skinny_gemm.json`): the plain GEMM with all rows in one tile, BLOCK_N 32, BLOCK_K 128 and 6 stages
ran 0.92x / 1.06x / 1.03x cuBLAS at 16 / 32 / 64 rows (pointer loads; tensor descriptors 0.96-1.02x).
"""
import torch
import triton
import triton.language as tl

from .helpers import acc_dtype, cdiv, dot, gdc_launch_dependents_if, gdc_wait_if, next_pow2
from .launch import Launch


@triton.jit
def _wstream_tile(x_ptr, w_ptr, bias_ptr, y_ptr, tile, T, N, K, stride_xt, stride_xk, stride_wn, stride_wk,
                  stride_yt, stride_yn, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, GDC_WAIT: tl.constexpr,
                  EVEN_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr, ACC: tl.constexpr):
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
    y = y_ptr + rows.to(tl.int64)[:, None] * stride_yt + cols.to(tl.int64)[None, :] * stride_yn
    out_mask = row_mask[:, None] & col_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(y, mask=out_mask, other=0.0).to(ACC)
    elif HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["T"])
def _wstream_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    T, N, K,
    stride_xt, stride_xk, stride_wn, stride_wk, stride_yt, stride_yn,
    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, GDC_WAIT: tl.constexpr, TRIGGER: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, PERSISTENT: tl.constexpr,
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
    """
    gdc_launch_dependents_if(TRIGGER)
    pid = tl.program_id(0)
    if PERSISTENT:
        num_tiles = tl.cdiv(T, BLOCK_T) * tl.cdiv(N, BLOCK_N)
        for tile in range(pid, num_tiles, tl.num_programs(0)):
            _wstream_tile(x_ptr, w_ptr, bias_ptr, y_ptr, tile, T, N, K, stride_xt, stride_xk, stride_wn, stride_wk,
                          stride_yt, stride_yn, ACCUMULATE, HAS_BIAS, GDC_WAIT, EVEN_K, BLOCK_T, BLOCK_N, BLOCK_K,
                          PRECISION, ACC)
    else:
        _wstream_tile(x_ptr, w_ptr, bias_ptr, y_ptr, pid, T, N, K, stride_xt, stride_xk, stride_wn, stride_wk,
                      stride_yt, stride_yn, ACCUMULATE, HAS_BIAS, GDC_WAIT, EVEN_K, BLOCK_T, BLOCK_N, BLOCK_K,
                      PRECISION, ACC)


_SLOTS = ("x_ptr", "w_ptr", "bias_ptr", "y_ptr")


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
                   has_bias: bool = False, trigger: bool = False) -> Launch:
    """The `_wstream_kernel` Launch for y [T, N] (+)= x2d [T, K] · weight [N, K]ᵀ (+ bias); called with
    (x2d, weight, bias, y), bias any tensor unless has_bias (which needs accumulate False).
    cfg: `wstream_config`'s keys (BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages; optional `programs`: at most
    that many programs, each walking several tiles, where the tiles outnumber it). pdl: launched as a PDL
    consumer of the kernel before it (which must let it start early, `gdc_launch_dependents`, for any overlap);
    trigger: a PDL producer for the kernel after it. The tensors give shapes and strides only."""
    T, K = x2d.shape
    N = weight.shape[0]
    tiles = cdiv(T, cfg["BLOCK_T"]) * cdiv(N, cfg["BLOCK_N"])
    programs = cfg.get("programs", 0)  # 0: one program per tile; else at most this many, each walking tiles
    persistent = 0 < programs < tiles
    grid = (programs if persistent else tiles,)
    return Launch(
        _wstream_kernel, grid, _SLOTS,
        None, None, None, None, T, N, K,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        ACCUMULATE=accumulate, HAS_BIAS=has_bias and not accumulate, GDC_WAIT=pdl, TRIGGER=trigger,
        EVEN_K=K % cfg["BLOCK_K"] == 0,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PRECISION=precision,
        ACC=acc_dtype(x2d.dtype), PERSISTENT=persistent, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **({"launch_pdl": True} if pdl else {}),
    )


__all__ = ["wstream_config", "wstream_fits", "wstream_launch"]
