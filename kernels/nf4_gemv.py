"""NF4 LoRA forward for decode (M <= 16 rows): a split-K GEMV that reads the 4-bit weights directly.

    Y = X @ deq(Wq)^T + b + s * (drop(X) @ A^T) @ B^T

At one to sixteen rows the time is the read of W: 4.5 bits per weight here against 16 for bf16. Reading it at
full bandwidth needs several CTAs per SM, far more than N / BLOCK_N output tiles, so K is split too: program
(n, s) decodes its [BLOCK_N, K / splits] slab of W in registers and writes an fp32 partial [M, BLOCK_N]; one
more program per split accumulates the partial rank-r product drop(X) @ A^T of its K slab (kept out of the W
programs, whose registers bound how many fit on an SM). A second small kernel sums the partials in a fixed order (deterministic),
adds the bias and s * xa @ B^T, and writes Y (and xa for the backward).

The tensor cores take W's tile as the A operand and the rows of X, padded to BLOCK_M = 16, as B: decoding is the
work here, and it stays in registers (bench/NOTES.md compares this with X as A and with FMA products at M = 1).
"""
import torch
import triton
import triton.language as tl

from .config import nf4_config, num_sms
from .helpers import (
    acc_dtype, apply_dropout, cdiv, check_dropout, check_flag, check_scaling, dot, dot_precision, dot_precision_key,
    dropout_keep, dropout_threshold, next_pow2_rank, seed_arg,
)
from .launch import Launch, PlanCache, plan_key, seed_key
from .nf4_dequant import (
    NF4_BLOCK, check_nf4_operands, nf4_absmax, nf4_call_args, nf4_decode, nf4_kernel_args, nf4_key_parts,
    nf4_pairs, nf4_prmt_words,
)

# Programs per SM the split over K aims for: enough loads in flight to reach the memory bandwidth. On the H200 at
# M = 1: N = 14336 ran 1.37x the base with 5 splits (4 per SM) and 1.18x with 8 (6.8 per SM); N = 4096 ran best
# with 17 splits and worse with 33, where the finishing kernel sums twice as many partials: hence the cap.
TARGET_CTAS_PER_SM = 6
# At most this many K splits. The finishing kernel sums them a chunk of up to FINISH_CHUNK splits at a time, one
# load of [chunk, rows, block_n] (and [chunk, rows, padded rank] of xa partials) with at most FINISH_ELEMS
# elements in flight per program: block_n shrinks as the rows grow (64 columns for one row, 16 for sixteen), which
# keeps every split in one load and gives more programs (H200, sixteen rows: 6.2 -> 5.2 us). Before, with 64
# columns throughout: one row, 8 splits per chunk 3.0 us, 16 per chunk 2.5 us; sixteen rows, 1 split per chunk
# 6.2 us, 2 splits 10.8 us, 8 splits 9.4 us.
MAX_SPLITS = 16
FINISH_CHUNK = 16
FINISH_ELEMS = 4096


@triton.jit(do_not_specialize=["M", "seed", "keep_thr"])
def _nf4_gemv_kernel(
    X, QW, ABSMAX, ABS_CODE, ABS_SCALE, CODE, A, PART, XA_PART,
    M, N, K, RANK, K_PER_SPLIT,
    stride_xm, stride_xk, stride_qn, stride_ar, stride_ak, abs_offset,
    seed, keep_thr, inv_keep, K8,
    DROPOUT: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr, DECODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Partial sums of split pid_s over K: output columns pid_n * BLOCK_N + [0, BLOCK_N), or, for the last pid_n
    (the grid has one more than the N tiles), the split's share of xa = drop(X) @ A^T.

    X: [M, K] (M <= BLOCK_M), A: [RANK, K], strided; QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE: the NF4
    weight (nf4_dequant.nf4_tile). PART: [splits, BLOCK_M, N] fp32 contiguous, rows below M written;
    XA_PART: [splits, BLOCK_M, BLOCK_R] fp32 contiguous, rows below M written by the last pid_n.
    K_PER_SPLIT: a multiple of BLOCK_K. seed, keep_thr, inv_keep, K8: the dropout mask (helpers.dropout_keep)
    on X's LoRA branch if DROPOUT.

    Each step covers one 64-weight quantization block. The code values of its high nibbles (even k) and low
    nibbles (odd k) are the tensor cores' A operand, [BLOCK_N, 32] each, against the even and odd columns of X
    as B ([32, BLOCK_M]): the decoded weights stay in the registers they are decoded in, and the few rows of X
    are the small side. The block's absmax scales the [BLOCK_N, BLOCK_M] partial product once, not every weight.
    """
    tl.static_assert(BLOCK_K == 64)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_s.to(tl.int64) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)  # K is a multiple of 64: every step is a whole block
    if pid_n == tl.num_programs(0) - 1:
        # the split's rank-r program: drop(X) @ A^T over its K slab. Apart from the W loop, so that the W programs
        # carry none of its registers.
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        for k0 in range(k_start, k_end, BLOCK_K):
            x = tl.load(X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                        mask=mask_m[:, None], other=0.0)
            a = tl.load(A + offs_r[None, :] * stride_ar + (k0 + offs_k)[:, None] * stride_ak,
                        mask=offs_r[None, :] < RANK, other=0.0)
            if DROPOUT:
                x = apply_dropout(x, dropout_keep(seed, offs_m, k0, K8, keep_thr, BLOCK_M, BLOCK_K), inv_keep)
            xa = dot(x, a, xa, PRECISION)
        xa_part = XA_PART + pid_s.to(tl.int64) * BLOCK_M * BLOCK_R
        tl.store(xa_part + offs_m[:, None] * BLOCK_R + offs_r[None, :], xa, mask=mask_m[:, None])
    else:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
        q_ptrs = QW + offs_n[:, None] * stride_qn + (k_start // 2 + offs_h)[None, :]
        # loaded once: the decode keeps them in registers
        words = nf4_prmt_words(CODE, X.dtype.element_ty, tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.uint8),
                               DECODE)
        for k0 in range(k_start, k_end, BLOCK_K):
            byte = tl.load(q_ptrs, mask=mask_n[:, None], other=0)
            q_ptrs += BLOCK_K // 2
            even, odd = nf4_pairs(byte, CODE, words, X.dtype.element_ty, DECODE)
            x_even_t = X + offs_m[None, :] * stride_xm + (k0 + 2 * offs_h)[:, None] * stride_xk  # [32, BLOCK_M]
            part = dot(even, tl.load(x_even_t, mask=mask_m[None, :], other=0.0),
                       tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC), PRECISION)
            part = dot(odd, tl.load(x_even_t + stride_xk, mask=mask_m[None, :], other=0.0), part, PRECISION)
            scale = nf4_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, offs_n * (K // 64) + k0 // 64, mask_n,
                               DOUBLE_QUANT, ABS_GROUP)
            acc_t += part * scale[:, None]
        part = PART + pid_s.to(tl.int64) * BLOCK_M * N
        tl.store(part + offs_m[None, :] * N + offs_n[:, None], acc_t, mask=mask_m[None, :] & mask_n[:, None])


@triton.jit(do_not_specialize=["M"])
def _nf4_gemv_finish_kernel(
    PART, XA_PART, B, BIAS, Y, XA,
    M, N, RANK, SPLITS,
    stride_bn, stride_br, stride_ym, stride_yn, stride_xam, stride_xar, scaling,
    HAS_BIAS: tl.constexpr, STORE_XA: tl.constexpr, PART_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Y[:, tile] = sum_s PART[s] + BIAS + s * xa @ B^T with xa = sum_s XA_PART[s] rounded to Y's dtype.

    PART: [SPLITS, PART_ROWS, N] fp32; XA_PART: [SPLITS, PART_ROWS, BLOCK_R] fp32 (rows below M read); B: [N, RANK];
    BIAS: [N]; Y: [M, N]; XA: [M, RANK], written by program 0 when STORE_XA. BLOCK_M: M rounded up to a power of
    two (at most PART_ROWS): the rows this kernel touches. The splits are summed CHUNK at a time (one load of
    [CHUNK, BLOCK_M, BLOCK_N] in flight), always in the same order: deterministic.
    """
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, CHUNK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for s0 in range(0, SPLITS, CHUNK):
        mask_s = (s0 + offs_c) < SPLITS
        p = tl.load(PART + (s0 + offs_c)[:, None, None] * PART_ROWS * N + offs_m[None, :, None] * N
                    + offs_n[None, None, :],
                    mask=mask_s[:, None, None] & mask_m[None, :, None] & mask_n[None, None, :], other=0.0)
        acc += tl.sum(p, axis=0)
        q = tl.load(XA_PART + (s0 + offs_c)[:, None, None] * PART_ROWS * BLOCK_R + offs_m[None, :, None] * BLOCK_R
                    + offs_r[None, None, :], mask=mask_s[:, None, None] & mask_m[None, :, None], other=0.0)
        xa += tl.sum(q, axis=0)
    xa_in = xa.to(Y.dtype.element_ty)  # rounded to the input dtype before it meets B, as PEFT does
    if STORE_XA:
        if pid == 0:
            tl.store(XA + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar, xa_in,
                     mask=mask_m[:, None] & (offs_r[None, :] < RANK))
    b = tl.load(B + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                mask=(offs_r[:, None] < RANK) & mask_n[None, :], other=0.0)
    if BLOCK_M >= 16:
        acc = dot((xa_in.to(ACC) * scaling).to(b.dtype), b, acc, PRECISION)
    else:  # too few rows for the tensor cores: products and sums over the rank
        acc += tl.sum((xa_in.to(ACC) * scaling)[:, :, None] * b.to(ACC)[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def nf4_gemv_splits(n_tiles: int, k_steps: int, device) -> int:
    """K splits: about TARGET_CTAS_PER_SM programs per SM in all, at most one BLOCK_K step per split and at most
    MAX_SPLITS."""
    return max(1, min(k_steps, MAX_SPLITS, cdiv(TARGET_CTAS_PER_SM * num_sms(device), n_tiles)))


def nf4_gemv(x, w4, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, store_xa=False, decode="auto",
             splits=None):
    """NF4 LoRA forward for M <= 16 rows, reading the 4-bit weight directly.

    x: [M, K] (M <= 16), w4: NF4 weight of shape (N, K) (kernels.nf4_dequant.nf4_kernel_args), bias: [N] or
    None, lora_A: [r, K], lora_B: [N, r] (x's dtype and device); scaling, dropout_p, seed as in lora_forward.
    decode: the NF4 decode (nf4_dequant.NF4_DECODES, "auto": "prmt" on a GPU); the code values are rounded to
    x's dtype, and each block's absmax multiplies the fp32 partial sums. splits: override the K split (tests).
    Returns (y [M, N], xa [M, r] or None). Checks and launch set-up are done once per call signature
    (kernels/launch.py).

    >>> y, _ = nf4_gemv(x, w4, None, A, B, 2.0)
    """
    scaling = check_scaling(scaling)
    check_dropout(dropout_p, seed, x)
    tensors, flags = nf4_key_parts(w4)
    key = plan_key((x, bias, lora_A, lora_B) + tensors, *flags, dropout_p, store_xa, decode, splits,
                   dot_precision_key(x), seed_key(seed))
    plan = _PLANS.find(key)
    if plan is None:
        plan = _PLANS.put(key, _GemvPlan(x, w4, bias, lora_A, lora_B, dropout_p, store_xa, decode, splits))
    return plan(x, w4, bias, lora_A, lora_B, scaling, seed)


_PLANS = PlanCache()


class _GemvPlan:
    """`nf4_gemv` for one call signature: checks, config, splits and both launches set up once."""

    def __init__(self, x, w4, bias, lora_A, lora_B, dropout_p, store_xa, decode, splits):
        check_flag(store_xa, "store_xa")
        if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
            raise ValueError(f"splits must be None (automatic) or an int >= 1, got {splits!r}")
        M, K, N, rank = check_nf4_operands(w4, lora_A, lora_B, x=x, bias=bias)
        cfg = nf4_config("gemv", M, x.dtype)
        if M > cfg.block_m:
            raise ValueError(f"nf4_gemv takes at most {cfg.block_m} rows, got M={M}")
        _, meta = nf4_kernel_args(w4)  # checks the weight's layout
        decode = nf4_decode(decode, x.device)
        self.M, self.N, self.rank, self.store_xa = M, N, rank, store_xa
        self.gemv = None
        if M == 0 or N == 0:
            return
        block_m = cfg.block_m
        block_r = next_pow2_rank(rank)
        n_tiles = cdiv(N, cfg.block_n)
        k_steps = K // NF4_BLOCK  # one quantization block per step, whatever cfg.block_k says
        splits = min(splits or nf4_gemv_splits(n_tiles, k_steps, x.device), k_steps)
        k_per_split = cdiv(k_steps, splits) * NF4_BLOCK
        splits = cdiv(K, k_per_split)
        self.part_shape, self.xa_part_shape = (splits, block_m, N), (splits, block_m, block_r)
        precision, acc = dot_precision(x.dtype), acc_dtype(x.dtype)
        self.gemv = Launch(
            _nf4_gemv_kernel, (n_tiles + 1, splits),
            ("X", "QW", "ABSMAX", "ABS_CODE", "ABS_SCALE", "CODE", "A", "PART", "XA_PART", "abs_offset", "seed"),
            None, None, None, None, None, None, None, None, None,
            M, N, K, rank, k_per_split,
            x.stride(0), x.stride(1), w4.qweight.stride(0), lora_A.stride(0), lora_A.stride(1), None,
            None, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), cdiv(K, 8),
            DROPOUT=dropout_p > 0.0, DECODE=decode, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=NF4_BLOCK,
            BLOCK_R=block_r, PRECISION=precision, ACC=acc, **meta, **cfg.launch(),
        )
        finish_m = min(block_m, triton.next_power_of_2(M))
        # the xa partials' load, [chunk, rows, block_r], stays within FINISH_ELEMS too (ranks up to 256)
        chunk = min(FINISH_CHUNK, triton.next_power_of_2(splits), max(1, FINISH_ELEMS // (finish_m * block_r)))
        finish_n = max(16, min(64, FINISH_ELEMS // (chunk * finish_m)))
        # xa (when stored) is a new contiguous [M, r]; without it y stands in (never written)
        xa_strides = (rank, 1) if store_xa else (N, 1)
        self.finish = Launch(
            _nf4_gemv_finish_kernel, (cdiv(N, finish_n),), ("PART", "XA_PART", "B", "BIAS", "Y", "XA",
                                                                  "scaling"),
            None, None, None, None, None, None,
            M, N, rank, splits,
            lora_B.stride(0), lora_B.stride(1), N, 1, *xa_strides, None,
            HAS_BIAS=bias is not None, STORE_XA=store_xa, PART_ROWS=block_m, BLOCK_M=finish_m, BLOCK_N=finish_n,
            BLOCK_R=block_r, CHUNK=chunk, PRECISION=precision, ACC=acc, num_warps=4,
        )

    def __call__(self, x, w4, bias, lora_A, lora_B, scaling, seed):
        y = torch.empty((self.M, self.N), device=x.device, dtype=x.dtype)
        xa = torch.empty((self.M, self.rank), device=x.device, dtype=x.dtype) if self.store_xa else None
        if self.gemv is None:
            return y, xa
        qw, absmax, abs_code, abs_scale, abs_offset, code = nf4_call_args(w4)
        part = torch.empty(self.part_shape, device=x.device, dtype=torch.float32)
        xa_part = torch.empty(self.xa_part_shape, device=x.device, dtype=torch.float32)
        self.gemv(x, qw, absmax, abs_code, abs_scale, code, lora_A, part, xa_part, abs_offset, seed_arg(seed))
        self.finish(part, xa_part, lora_B, bias if bias is not None else y, y, xa if xa is not None else y,
                    float(scaling))
        return y, xa
