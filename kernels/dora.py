"""DoRA helper kernels: the norm ||W + s * B @ A||_row with the scale g = m / norm, and the column dot behind dm.

DoRA scales each output n by g[n] = m[n] / ||W[n] + s * (B @ A)[n]||. `dora_norm` reads W once and forms
W + s * B @ A one [BLOCK_N, BLOCK_K] tile at a time in registers (a rank-deep MMA per tile), summing its squares
in fp32: the merged [N, K] weight is never written. The magnitude gradient is dm[n] = sum_m dY[m, n] * z[m, n] / norm_n
with z the unscaled output; `column_dot` reduces dY * (Y - bias) over M, tile by tile, without an [M, N] temporary,
and `scale_columns` does it in the same pass that writes g * dY, the scaled gradient the backward's products take.
`magnitude_grad` turns those partial sums into dm on the device: dot / m, and for columns with m == 0 (where the
saved output holds no z) z itself, recomputed by the programs that own such a column, so the backward never reads
a flag on the host (a host read there stalled every DoRA step until the forward had finished: bench/NOTES.md).
"""
import torch
import triton
import triton.language as tl

from .config import dora_config, num_sms
from .helpers import (
    cdiv, check_scaling, check_shapes, check_vector, dot, dot_precision, dot_precision_key, matrix_shape,
    next_pow2_rank, upcast,
)
from .launch import Launch, PlanCache, plan_key


# Programs per SM that `scale_columns` / `column_dot` aim for when they split M (a module switch for
# bench/exp_dora_kernels.py; plans built before a change keep their split count).
SPLIT_WAVES = 2


@triton.jit
def _dora_norm_kernel(
    W, A, B, MAG, NORM, G,
    N, K, RANK,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """NORM[n] = ||W[n, :] + s * B[n, :] @ A|| and G[n] = MAG[n] / NORM[n] for BLOCK_N rows, in fp32.

    W: [N, K], A: [RANK, K], B: [N, RANK] (one dtype); MAG: [N] (any float dtype); NORM, G: [N] fp32.
    Each step forms one [BLOCK_N, BLOCK_K] tile of W + s * B @ A in registers (a BLOCK_R-deep MMA) and adds its
    squares: the merged weight never exists in memory. BLOCK_R: padded rank (>= 16).
    """
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    b = tl.load(B + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & (offs_r[None, :] < RANK), other=0.0)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        w = tl.load(W + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(A + offs_r[:, None] * stride_ar + (k0 + offs_k)[None, :] * stride_ak,
                    mask=(offs_r[:, None] < RANK) & mask_k[None, :], other=0.0)
        ba = dot(b, a, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), PRECISION)
        v = w.to(tl.float32) + scaling * ba
        sq += tl.sum(v * v, axis=1)
    norm = tl.sqrt(sq)
    tl.store(NORM + offs_n, norm, mask=mask_n)
    mag = tl.load(MAG + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(G + offs_n, mag / tl.where(mask_n, norm, 1.0), mask=mask_n)  # rows past N: no 0 / 0


@triton.jit(do_not_specialize=["M", "ROWS_PER_SPLIT"])
def _column_scale_dot_kernel(
    U, G, U_OUT, V, BIAS, OUT,
    M, N, ROWS_PER_SPLIT,
    stride_um, stride_un, stride_uom, stride_uon, stride_vm, stride_vn, stride_os,
    SCALE: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One pass over U [M, N]: U_OUT = U * G[None, :] (SCALE) and OUT[s, n] = sum over split s's rows m of
    U[m, n] * (V[m, n] - BIAS[n]) in fp32 (DOT).

    U, V, U_OUT: [M, N] (any strides; U_OUT in U's dtype, each element rounded once from fp32); G: [N] (any float
    dtype); BIAS: [N] (if HAS_BIAS); OUT: [splits, N] fp32. Axis 0: column tiles, axis 1: splits of M,
    ROWS_PER_SPLIT rows each (a multiple of BLOCK_M).
    """
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row_start = tl.program_id(1).to(tl.int64) * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)
    if SCALE:
        g = upcast(tl.load(G + offs_n, mask=mask_n, other=0.0))
    if HAS_BIAS:
        bias = upcast(tl.load(BIAS + offs_n, mask=mask_n, other=0.0))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < row_end)[:, None] & mask_n[None, :]
        u_raw = tl.load(U + offs_m[:, None] * stride_um + offs_n[None, :] * stride_un, mask=mask, other=0.0)
        u = upcast(u_raw)
        if SCALE:
            tl.store(U_OUT + offs_m[:, None] * stride_uom + offs_n[None, :] * stride_uon,
                     (u * g[None, :]).to(u_raw.dtype), mask=mask)
        if DOT:
            v = upcast(tl.load(V + offs_m[:, None] * stride_vm + offs_n[None, :] * stride_vn, mask=mask, other=0.0))
            if HAS_BIAS:
                v = tl.where(mask, v - bias[None, :], 0.0)
            acc += u * v
    if DOT:
        tl.store(OUT + tl.program_id(1) * stride_os + offs_n, tl.sum(acc, axis=0), mask=mask_n)


@triton.jit(do_not_specialize=["M", "SPLITS"])
def _magnitude_grad_kernel(
    PART, MAG, NORM, DM, X, DY, W, A, B,
    M, N, K, RANK, SPLITS,
    stride_ps, stride_xm, stride_xk, stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br,
    scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """DM[n] = sum_s PART[s, n] / MAG[n] for BLOCK_N columns; where MAG[n] == 0,
    DM[n] = sum_m DY[m, n] * z[m, n] / NORM[n] with z = X @ W^T + s * (X @ A^T) @ B^T recomputed here.

    PART: [SPLITS, N] fp32 partial sums of DY * (Y - bias) over M; MAG: [N] (any float dtype); NORM: [N] fp32;
    DM: [N] in MAG's dtype; X: [M, K], DY: [M, N], W: [N, K], A: [RANK, K], B: [N, RANK] (X's dtype).
    Only a program whose columns include a zero magnitude runs the recompute (one [M, K] x [K, BLOCK_N] GEMM with
    the rank-r term, rounded like the forward's: xa in X's dtype); every other program reads SPLITS x BLOCK_N
    floats. BLOCK_R: padded rank (>= 16).
    """
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mag = tl.load(MAG + offs_n, mask=mask_n, other=1.0).to(tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(0, SPLITS):
        total += tl.load(PART + s * stride_ps + offs_n, mask=mask_n, other=0.0)
    zero = mag == 0.0  # columns past N load 1.0
    dm = total / tl.where(zero, 1.0, mag)
    if tl.sum(zero.to(tl.int32), axis=0) > 0:
        offs_r = tl.arange(0, BLOCK_R)
        b = tl.load(B + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & (offs_r[None, :] < RANK), other=0.0)  # [BLOCK_N, BLOCK_R]
        zdot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            mask_m = offs_m < M
            z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w_t = tl.load(W + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                              mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                a_t = tl.load(A + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                              mask=mask_k[:, None] & (offs_r[None, :] < RANK), other=0.0)
                z = dot(x, w_t, z, PRECISION)
                xa = dot(x, a_t, xa, PRECISION)
            lora = dot(xa.to(X.dtype.element_ty), tl.trans(b), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                       PRECISION)
            dy = upcast(tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                                mask=mask_m[:, None] & mask_n[None, :], other=0.0))
            zdot += tl.sum(dy * (z + scaling * lora), axis=0)
        norm = tl.load(NORM + offs_n, mask=mask_n, other=1.0)
        dm = tl.where(zero, zdot / norm, dm)
    tl.store(DM + offs_n, dm.to(DM.dtype.element_ty), mask=mask_n)


def dora_norm(weight, lora_A, lora_B, scaling, magnitude):
    """(||W + s * B @ A||_row [N], g = magnitude / that norm [N]), both fp32, in one pass over W.

    weight: [N, K], lora_A: [r, K], lora_B: [N, r] (one dtype and device, any strides); scaling: float;
    magnitude: [N] contiguous, any float dtype. Checks and launch set-up are done once per call signature
    (kernels/launch.py).

    >>> norm, g = dora_norm(W, A, B, 2.0, m)
    """
    scaling = check_scaling(scaling)
    key = plan_key((weight, lora_A, lora_B, magnitude), dot_precision_key(weight))
    plan = _NORM_PLANS.find(key)
    if plan is None:
        plan = _NORM_PLANS.put(key, _NormPlan(weight, lora_A, lora_B, magnitude))
    return plan(weight, lora_A, lora_B, scaling, magnitude)


class _NormPlan:
    """`dora_norm` for one call signature: checks, config and grid done once."""

    def __init__(self, weight, lora_A, lora_B, magnitude):
        N, K = matrix_shape(weight, "weight")
        rank = lora_A.shape[0]
        check_shapes(weight=(weight, (N, K)), lora_A=(lora_A, (rank, K)), lora_B=(lora_B, (N, rank)))
        check_vector("magnitude", magnitude, N, weight)
        self.n, self.launch = N, None
        if N == 0:
            return
        cfg = dora_config("norm", weight.dtype)
        self.launch = Launch(
            _dora_norm_kernel, (cdiv(N, cfg.block_m),), ("W", "A", "B", "MAG", "NORM", "G", "scaling"),
            None, None, None, None, None, None, N, K, rank,
            weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0),
            lora_B.stride(1), None,
            BLOCK_N=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_R=next_pow2_rank(rank),
            PRECISION=dot_precision(weight.dtype), **cfg.launch(),
        )

    def __call__(self, weight, lora_A, lora_B, scaling, magnitude):
        norm = torch.empty(self.n, device=weight.device, dtype=torch.float32)
        g = torch.empty_like(norm)
        if self.launch is not None:
            self.launch(weight, lora_A, lora_B, magnitude, norm, g, float(scaling))
        return norm, g


def column_dot(u, v, bias=None, partials=False):
    """out[n] = sum_m u[m, n] * (v[m, n] - bias[n]) in fp32: [N]. Deterministic (fixed-order partial sums).

    u, v: [M, N] (one dtype and device, any strides); bias: [N] or None. partials=True returns the [S, N] fp32
    partial sums over S splits of M instead (what `magnitude_grad` takes; no sum kernel).

    >>> dm = column_dot(dy, y, bias) / magnitude     # DoRA's magnitude gradient
    """
    return _scale_dot(u, None, v, bias, partials)[1]


def scale_columns(u, g, v=None, bias=None, partials=False):
    """(u * g[None, :] in u's dtype [M, N], and column_dot(u, v, bias) [N] fp32 or None when v is None), in one
    pass over u: DoRA's backward scales dY by g once for every product that follows (instead of inside the dX
    GEMM's loop, which cost 1.55x cuBLAS's time at N=14336 on the H200: bench/NOTES.md) and reads it once more for
    the magnitude gradient.

    u: [M, N] (fp16, bf16, fp32 or fp64; any strides); g: [N] float, contiguous; v: [M, N] like u, or None;
    bias: [N] or None; partials as in column_dot. The scaled copy is contiguous, each element rounded once from
    fp32 (fp64 for fp64). Checks and launch set-up are done once per call signature (kernels/launch.py).

    >>> dy_g, dot = scale_columns(dy, g, y, bias)     # dY' = g * dY for dX, dA, dB; dm = dot / magnitude
    """
    if g is None:
        raise TypeError(f"g must be a [{u.shape[-1]}] float tensor, got None")
    return _scale_dot(u, g, v, bias, partials)


def _scale_dot(u, g, v, bias, partials):
    key = plan_key((u, g, v, bias))
    plan = _SCALE_DOT_PLANS.find(key)
    if plan is None:
        plan = _SCALE_DOT_PLANS.put(key, _ScaleDotPlan(u, g, v, bias))
    return plan(u, g, v, bias, bool(partials))


class _ScaleDotPlan:
    """`scale_columns` / `column_dot` for one call signature: checks, config, split count and grid done once."""

    def __init__(self, u, g, v, bias):
        M, N = matrix_shape(u, "u")
        check_shapes(u=(u, (M, N)), v=(v, (M, N)), bias=(bias, (N,)))
        check_vector("g", g, N, u)
        self.shape, self.scale, self.dot, self.launch = (M, N), g is not None, v is not None, None
        if M == 0 or N == 0:
            return
        cfg = dora_config("column_dot", u.dtype)
        col_tiles = cdiv(N, cfg.block_n)
        m_blocks = cdiv(M, cfg.block_m)
        # Enough splits of M to fill the GPU SPLIT_WAVES times over; the [splits, N] fp32 partials are summed
        # by magnitude_grad (or by torch when partials=False).
        splits = max(1, min(m_blocks, cdiv(SPLIT_WAVES * num_sms(u.device), col_tiles)))
        rows_per_split = cdiv(m_blocks, splits) * cfg.block_m
        self.splits = cdiv(M, rows_per_split)
        self.launch = Launch(
            _column_scale_dot_kernel, (col_tiles, self.splits), ("U", "G", "U_OUT", "V", "BIAS", "OUT"),
            None, None, None, None, None, None, M, N, rows_per_split,
            u.stride(0), u.stride(1), *((N, 1) if self.scale else (0, 0)),  # a new contiguous scaled copy
            *(v.stride() if self.dot else (0, 0)), N if self.dot else 0,  # [splits, N] contiguous partials
            SCALE=self.scale, DOT=self.dot, HAS_BIAS=bias is not None and self.dot,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **cfg.launch(),
        )

    def __call__(self, u, g, v, bias, partials):
        out = torch.empty(self.shape, device=u.device, dtype=u.dtype) if self.scale else None
        if self.launch is None:
            zeros = torch.zeros(self.shape[1], device=u.device, dtype=torch.float32) if self.dot else None
            return out, (zeros[None] if partials and zeros is not None else zeros)
        partial = torch.empty((self.splits, self.shape[1]), device=u.device, dtype=torch.float32) if self.dot else None
        self.launch(u, g if g is not None else u, out if out is not None else u, v if v is not None else u,
                    bias if bias is not None else u, partial if partial is not None else u)
        if partial is None or partials:
            return out, partial
        return out, (partial[0] if self.splits == 1 else partial.sum(0))


def magnitude_grad(partials, magnitude, norm, dy, x, weight, lora_A, lora_B, scaling):
    """DoRA's magnitude gradient dm [N] in magnitude's dtype, on the device with no host read:
    dm[n] = sum_s partials[s, n] / magnitude[n], and where magnitude[n] == 0 (the saved output y = g * z + b holds
    no z there) dm[n] = sum_m dy[m, n] * z[m, n] / norm[n], z = x @ W^T + s * (x @ A^T) @ B^T recomputed by the
    programs that own such a column (a GEMM over all of x per block of BLOCK_N columns: exact, and slow only when
    a magnitude is exactly zero).

    partials: [S, N] fp32 (column_dot / scale_columns with partials=True); magnitude: [N] contiguous, any float
    dtype; norm: [N] fp32 contiguous (dora_norm's); dy: [M, N]; x: [M, K]; weight: [N, K]; lora_A: [r, K];
    lora_B: [N, r] (one dtype and device, any strides); scaling: float.

    >>> dy_g, parts = scale_columns(dy, g, y, bias, partials=True)
    >>> dm = magnitude_grad(parts, m, norm, dy, x, W, A, B, 2.0)
    """
    scaling = check_scaling(scaling)
    key = plan_key((partials, magnitude, norm, dy, x, weight, lora_A, lora_B), dot_precision_key(x))
    plan = _MAG_PLANS.find(key)
    if plan is None:
        plan = _MAG_PLANS.put(key, _MagnitudePlan(partials, magnitude, norm, dy, x, weight, lora_A, lora_B))
    return plan(partials, magnitude, norm, dy, x, weight, lora_A, lora_B, scaling)


class _MagnitudePlan:
    """`magnitude_grad` for one call signature: checks, config and grid done once."""

    def __init__(self, partials, magnitude, norm, dy, x, weight, lora_A, lora_B):
        (M, K), N = matrix_shape(x, "x"), matrix_shape(weight, "weight")[0]
        rank = matrix_shape(lora_A, "lora_A")[0]
        splits = matrix_shape(partials, "partials")[0]
        check_shapes(x=(x, (M, K)), dy=(dy, (M, N)), weight=(weight, (N, K)), lora_A=(lora_A, (rank, K)),
                     lora_B=(lora_B, (N, rank)))
        if (partials.shape[1] != N or partials.dtype != torch.float32 or partials.stride(1) != 1
                or partials.device != x.device):
            raise ValueError(f"partials must be [splits, {N}] fp32 with contiguous rows on {x.device}, got "
                             f"{list(partials.shape)} {partials.dtype} strides {tuple(partials.stride())} on "
                             f"{partials.device}")
        check_vector("magnitude", magnitude, N, x)
        check_vector("norm", norm, N, x)
        if norm.dtype != torch.float32:
            raise ValueError(f"norm must be fp32 (dora_norm's), got {norm.dtype}")
        self.n, self.dtype, self.launch = N, magnitude.dtype, None
        if N == 0:
            return
        cfg = dora_config("magnitude", x.dtype)
        self.launch = Launch(
            _magnitude_grad_kernel, (cdiv(N, cfg.block_n),),
            ("PART", "MAG", "NORM", "DM", "X", "DY", "W", "A", "B", "scaling"),
            None, None, None, None, None, None, None, None, None, M, N, K, rank, splits,
            partials.stride(0), x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), weight.stride(0),
            weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=next_pow2_rank(rank),
            PRECISION=dot_precision(x.dtype), **cfg.launch(),
        )

    def __call__(self, partials, magnitude, norm, dy, x, weight, lora_A, lora_B, scaling):
        dm = torch.empty(self.n, device=x.device, dtype=self.dtype)
        if self.launch is not None:
            self.launch(partials, magnitude, norm, dm, x, dy, weight, lora_A, lora_B, float(scaling))
        return dm


_NORM_PLANS = PlanCache()
_SCALE_DOT_PLANS = PlanCache()
_MAG_PLANS = PlanCache()
