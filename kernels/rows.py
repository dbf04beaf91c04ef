"""Row-wise helpers on a pair of small matrices, each pair in one launch: rows scaled by a vector, and row dots.

VeRA runs the LoRA kernels on the folded factors A_d = lambda_d[:, None] * A [r, K] and B_b = lambda_b[:, None] * B
[N, r] (`scale_rows`), and its trained vectors' gradients are row dots with the frozen projections:
dlambda_d[i] = sum_k dA_d[i, k] * A[i, k] and dlambda_b[n] = sum_j dB_b[n, j] * B[n, j] (`row_dots`).
In plain torch each of those is 2 to 3 small ops per matrix (a broadcast multiply, a cast, a sum): ~12 launches
per VeRA training step, whose host time made its eager step host-bound on the H200's host at K = N = 4096
(bench/NOTES.md).
"""
import torch
import triton
import triton.language as tl

from .helpers import cdiv, check_dtype, matrix_shape, next_pow2
from .launch import Launch, PlanCache, plan_key

# Elements of one operand tile per program. A program loads its tile in one step when a row fits (K <= 4096 for
# VeRA's A [r, K]); it loops over column blocks only past that. The first version took 16 rows per program and
# walked the columns 256 at a time: A [16, 4096] was one program with 16 dependent load steps, ~18 µs a launch on
# the H200 (bench/NOTES.md, ninth session).
_TILE_ELEMS = 4096
# Row blocks are made narrow enough that a side of many short rows (B [N, r]) still spreads over this many programs.
_MIN_PROGRAMS = 64


@triton.jit
def _row_block(U, V, OUT, ROWS, COLS, stride_ur, stride_uc, stride_vr, stride_vc, stride_or, stride_oc, block,
               DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """BLOCK_R rows of U [ROWS, COLS], in ACC (fp32, fp64 when an operand is fp64).

    DOT: OUT[i] = sum_c U[i, c] * V[i, c] (V [ROWS, COLS], OUT [ROWS]); else OUT[i, c] = U[i, c] * V[i]
    (V a [ROWS] vector with stride stride_vr, OUT [ROWS, COLS]), each element rounded once to OUT's dtype.
    """
    rows = block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < ROWS
    acc = tl.zeros((BLOCK_R,), dtype=ACC)
    if not DOT:
        v = tl.load(V + rows * stride_vr, mask=mask_r, other=0.0).to(ACC)
    for c0 in range(0, COLS, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = mask_r[:, None] & (cols < COLS)[None, :]
        u = tl.load(U + rows[:, None] * stride_ur + cols[None, :] * stride_uc, mask=mask, other=0.0).to(ACC)
        if DOT:
            w = tl.load(V + rows[:, None] * stride_vr + cols[None, :] * stride_vc, mask=mask, other=0.0)
            acc += tl.sum(u * w.to(ACC), axis=1)
        else:
            tl.store(OUT + rows[:, None] * stride_or + cols[None, :] * stride_oc,
                     (u * v[:, None]).to(OUT.dtype.element_ty), mask=mask)
    if DOT:
        tl.store(OUT + rows * stride_or, acc.to(OUT.dtype.element_ty), mask=mask_r)


@triton.jit
def _rows_pair_kernel(
    UA, VA, OA, UB, VB, OB,
    RA, CA, RB, CB, BLOCKS_A,
    s_uar, s_uac, s_var, s_vac, s_oar, s_oac, s_ubr, s_ubc, s_vbr, s_vbc, s_obr, s_obc,
    DOT: tl.constexpr, BLOCK_RA: tl.constexpr, BLOCK_RB: tl.constexpr, BLOCK_CA: tl.constexpr,
    BLOCK_CB: tl.constexpr, ACC: tl.constexpr,
):
    """`_row_block` on two matrices in one launch: programs [0, BLOCKS_A) take UA's row blocks, the rest UB's.

    Scale (DOT False): OA = UA * VA[:, None], OB = UB * VB[:, None] (VA, VB vectors), each [rows, cols].
    Dots (DOT): OA = rowsum(UA * VA), OB = rowsum(UB * VB), each [rows].
    A side with no rows (RA or RB == 0) gets no programs.
    """
    pid = tl.program_id(0)
    if pid < BLOCKS_A:
        _row_block(UA, VA, OA, RA, CA, s_uar, s_uac, s_var, s_vac, s_oar, s_oac, pid, DOT, BLOCK_RA, BLOCK_CA, ACC)
    else:
        _row_block(UB, VB, OB, RB, CB, s_ubr, s_ubc, s_vbr, s_vbc, s_obr, s_obc, pid - BLOCKS_A, DOT, BLOCK_RB,
                   BLOCK_CB, ACC)


def _tile(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of one side: a whole row per column block up to _TILE_ELEMS elements, as many rows as fill
    the tile, but no more than leaves _MIN_PROGRAMS row blocks (both powers of two)."""
    block_c = max(16, min(_TILE_ELEMS, next_pow2(max(1, cols))))
    block_r = max(1, min(_TILE_ELEMS // block_c, next_pow2(max(1, rows)), next_pow2(cdiv(rows, _MIN_PROGRAMS))))
    return block_r, block_c


def scale_rows(ua, va, ub, vb, dtype):
    """(va[:, None] * ua, vb[:, None] * ub) in `dtype`, new contiguous tensors, each element rounded once from the
    fp32 product (fp64 when an operand is fp64); one launch.

    ua: [Ra, Ca], ub: [Rb, Cb] (one device, any float dtypes and strides); va: [Ra], vb: [Rb] (1-D, any float
    dtype and stride). Checks and launch set-up are done once per call signature (kernels/launch.py).

    >>> a_d, b_b = scale_rows(A, lambda_d, B, lambda_b, torch.bfloat16)       # VeRA's folded factors
    """
    key = plan_key((ua, va, ub, vb), dtype)
    plan = _SCALE_PLANS.find(key)
    if plan is None:
        plan = _SCALE_PLANS.put(key, _RowsPlan(ua, va, ub, vb, dtype, dtype, dot=False))
    return plan(ua, va, ub, vb)


def row_dots(ua, va, ub, vb, dtype_a, dtype_b):
    """(rowsum(ua * va) [Ra] in dtype_a, rowsum(ub * vb) [Rb] in dtype_b), summed in fp32 (fp64 when an operand
    is fp64); one launch. ua, va: [Ra, Ca]; ub, vb: [Rb, Cb] (any float dtypes and strides, one device); a side
    whose ua / ub is None is skipped (its result is None).

    >>> dd, dlb = row_dots(dA_d, A, dB_b, B, torch.float32, torch.float32)   # VeRA's lambda gradients
    """
    key = plan_key((ua, va, ub, vb), dtype_a, dtype_b)
    plan = _DOT_PLANS.find(key)
    if plan is None:
        plan = _DOT_PLANS.put(key, _RowsPlan(ua, va, ub, vb, dtype_a, dtype_b, dot=True))
    return plan(ua, va, ub, vb)


class _RowsPlan:
    """One `_rows_pair_kernel` launch for one call signature: (ua, va) and (ub, vb) as in the kernel's docstring;
    a side whose ua / ub is None is skipped."""

    def __init__(self, ua, va, ub, vb, dtype_a, dtype_b, dot):
        check_dtype(dtype_a, "dtype", none_ok=False)
        check_dtype(dtype_b, "dtype", none_ok=False)
        self.outs = []
        args, blocks, tiles, device, wide = [], [], [], None, torch.float64 in (dtype_a, dtype_b)
        for side, (u, v, dtype) in enumerate(((ua, va, dtype_a), (ub, vb, dtype_b))):
            uname, vname = ("ua", "va") if side == 0 else ("ub", "vb")
            if u is None:
                self.outs.append(None)
                args.append((0, 0, (0, 0), (0, 0), (0, 0)))
                blocks.append(0)
                tiles.append((1, 16))
                continue
            rows, cols = matrix_shape(u, uname)
            if not u.is_floating_point():
                raise ValueError(f"{uname} must be a float tensor, got {u.dtype}")
            want = (rows, cols) if dot else (rows,)
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != want or not v.is_floating_point():
                got = (v.dtype, list(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{vname} must be a float tensor of shape {list(want)}, got {got}")
            vstr = tuple(v.stride()) if dot else (v.stride(0), 0)
            wide = wide or torch.float64 in (u.dtype, v.dtype)
            for name, t in ((uname, u), (vname, v)):
                if device is None:
                    device = t.device
                elif t.device != device:
                    raise ValueError(f"{name} is on {t.device} but the other operands are on {device}")
            shape = (rows,) if dot else (rows, cols)
            self.outs.append((shape, dtype))
            ostr = (1, 0) if dot else (cols, 1)
            args.append((rows, cols, tuple(u.stride()), vstr, ostr))
            tiles.append(_tile(rows, cols))
            blocks.append(cdiv(rows, tiles[-1][0]))
        self.device, self.launch = device, None
        if sum(blocks) == 0:
            return
        (ra, ca, sua, sva, soa), (rb, cb, sub, svb, sob) = args
        self.launch = Launch(
            _rows_pair_kernel, (sum(blocks),), ("UA", "VA", "OA", "UB", "VB", "OB"),
            None, None, None, None, None, None, ra, ca, rb, cb, blocks[0],
            *sua, *sva, *soa, *sub, *svb, *sob,
            DOT=dot, BLOCK_RA=tiles[0][0], BLOCK_RB=tiles[1][0], BLOCK_CA=tiles[0][1], BLOCK_CB=tiles[1][1],
            ACC=tl.float64 if wide else tl.float32, num_warps=4,
        )

    def __call__(self, ua, va, ub, vb):
        outs = [torch.empty(o[0], device=self.device, dtype=o[1]) if o is not None else None for o in self.outs]
        if self.launch is not None:
            oa = outs[0] if outs[0] is not None else outs[1]
            ob = outs[1] if outs[1] is not None else outs[0]
            ua_, va_ = (ua, va) if ua is not None else (ub, vb)
            ub_, vb_ = (ub, vb) if ub is not None else (ua, va)
            self.launch(ua_, va_, oa, ub_, vb_, ob)
        return outs[0], outs[1]


_SCALE_PLANS = PlanCache()
_DOT_PLANS = PlanCache()
