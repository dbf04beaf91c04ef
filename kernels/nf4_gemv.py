"""NF4 LoRA forward for decode (M <= 16 rows): a split-K GEMV that reads the 4-bit weights directly.

    Y = X @ deq(Wq)^T + b + s * (drop(X) @ A^T) @ B^T

At one to sixteen rows the time is the read of W: 4.5 bits per weight here against 16 for bf16. Reading it at
full bandwidth needs several CTAs per SM, far more than N / BLOCK_N output tiles, so K is split too: program
(n, s) decodes its [BLOCK_N, K / splits] slab of W in registers and writes an fp32 partial. Four engines:

  * "padded" (2 to 16 rows, and M = 1 on request): the tensor cores take W's tile as the A operand and the rows
    of X, padded to BLOCK_M = 16, as B. One more program per split accumulates the split's share of
    drop(X) @ A^T (kept out of the W programs, whose registers bound how many fit on an SM); a second small
    kernel sums the partials in a fixed order, adds the bias and s * xa @ B^T, and writes Y (and xa).
  * "fma" (one row, the default where "wide" cannot run): products and sums on the FMA units, no padded rows.
    xa comes from `lora_shrink_partials` launched just before (with PDL this kernel starts while it runs); the
    last program of each output tile to finish (a counter per tile, which the shrink zeroes) adds the splits'
    partials, the rank term and the bias: no second kernel.
  * "lanes" (one row, bf16 / fp16 on an NVIDIA GPU, on request): as "fma", but each lane feeds its own decoded
    weights to mma.sync as A fragments, with x's values at the same (permuted) columns as B: fewer instructions
    per weight, measured slower (bench/NOTES.md).
  * "wide" (one row, bf16 / fp16 on an NVIDIA GPU: the default there): mma.sync as "lanes", but each lane loads
    16 bytes of 4 rows per step and B's columns keep the step's two quantization blocks apart, so x's loads
    serve 4 rows and the absmax scales D once per block (~3.7 SASS instructions per weight against ~7.4 for
    "fma"); a few percent faster than "fma" on the H200.

The one-row engines take xa either from the split shrink (xa_mode "shrink", above) or add it themselves
("fused"): each program sums its own K range's share of x @ A^T into a [tiles, splits, BLOCK_R] workspace, so a
tile's own splits cover all of K and no kernel runs before the GEMV; the tiles' counters then live per device
and stream (`tile_counters`), zero between kernels.
"""
import torch
import triton
import triton.language as tl

from .config import capability_major, nf4_config, num_sms
from .helpers import (
    acc_dtype, apply_dropout, cdiv, check_dropout, check_flag, check_scaling, dot, dot_precision, dot_precision_key,
    driver_copy, dropout_keep, dropout_threshold, gdc_wait_if, is_interpret, next_pow2_rank, pdl_enabled, seed_arg,
)
from .launch import Launch, PlanCache, plan_key, seed_key
from .lora_shrink import lora_shrink_partials, shrink_splits
from .nf4_dequant import (
    DECODE16_SCRATCH, NF4_BLOCK, check_nf4_operands, decode16_ptx, nf4_absmax, nf4_call_args, nf4_decode, nf4_kernel_args, nf4_key_parts,
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
        q_ptrs = QW + offs_n[:, None] * stride_qn + (tl.multiple_of(k_start // 2, 32) + offs_h)[None, :]
        # loaded once: the decode keeps them in registers
        words = nf4_prmt_words(CODE, X.dtype.element_ty, tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.uint8),
                               DECODE)
        for k0 in range(k_start, k_end, BLOCK_K):
            byte = tl.load(q_ptrs, mask=mask_n[:, None], other=0)
            q_ptrs += BLOCK_K // 2
            even, odd = nf4_pairs(byte, CODE, words, X.dtype.element_ty, DECODE)
            # x's [BLOCK_K, BLOCK_M] tile in one load, contiguous along K, then split into its even and odd columns
            # (two loads of every other column were 2-byte loads)
            x_t = tl.load(X + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None] * stride_xk,
                          mask=mask_m[None, :], other=0.0)
            x_even_t, x_odd_t = tl.split(tl.permute(tl.reshape(x_t, (BLOCK_K // 2, 2, BLOCK_M)), (0, 2, 1)))
            part = dot(even, x_even_t, tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC), PRECISION)
            part = dot(odd, x_odd_t, part, PRECISION)
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


@triton.jit
def finish_row_tile(PART, COUNT, XA_PART, B, BIAS, Y, XA, pid_n, N, RANK, XA_SPLITS, stride_bn, stride_br,
                    stride_yn, stride_xar, scaling, HAS_BIAS: tl.constexpr, STORE_XA: tl.constexpr,
                    PDL: tl.constexpr, SPLITS_P2: tl.constexpr, XA_SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_R: tl.constexpr, ACC: tl.constexpr, FUSED_XA: tl.constexpr = False):
    """After this program stored its split's partial of output tile pid_n (PART [splits, N] fp32, splits = the
    grid's second dimension, at most SPLITS_P2): count it in COUNT[pid_n] (release / acquire at GPU scope). The
    program that counts last adds the splits' partials (one load, summed in a fixed order: the same sum whichever
    program is last),
    adds s * xa @ B^T (xa = the sum of XA_PART [XA_SPLITS, 1, RANK], XA_SPLITS <= XA_SPLITS_P2, rounded to Y's
    dtype; written to XA by tile 0 when STORE_XA) and the bias, and writes Y [1, N].

    COUNT and XA_PART come from the kernel launched just before this one (lora_shrink_partials, which zeroes
    COUNT): with PDL every program waits for it here, before it counts (by then it has long finished). Every
    load of the finishing program is issued before the first of them is used: one round trip, not one per split.
    With one split (SPLITS_P2 == 1) the program finishes its tile without counting: a CTA barrier makes its
    threads' partials visible to each other, and no GPU-scope fence or atomic is paid (under Nsight Compute the
    fence, the atomic and the acquire took a third of the "wide" engine's warp time).

    FUSED_XA (xa_mode "fused"): there is no shrink before this kernel. Every program stored its own K range's
    share of xa in XA_PART [tiles, splits, BLOCK_R] (row_xa_partial), so the tile's partials cover all of K and
    the finishing program sums the tile's own splits' shares. COUNT is then kept between calls (zeroed once, by
    whoever allocates it) and the finishing program sets its tile's counter back to zero: all the tile's
    programs have counted by then, and the next kernel in the stream sees the zero.
    """
    splits = tl.num_programs(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    gdc_wait_if(PDL)
    tl.debug_barrier()  # every thread's partial is stored (bar.sync) before one release add counts the program
    if SPLITS_P2 == 1:
        arrived = 0
    else:
        arrived = tl.atomic_add(COUNT + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == splits - 1:
        tl.debug_barrier()
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < RANK
        b = tl.load(B + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        offs_s = tl.arange(0, SPLITS_P2)
        parts = tl.load(PART + offs_s[:, None] * N + offs_n[None, :],
                        mask=(offs_s < splits)[:, None] & mask_n[None, :], other=0.0, cache_modifier=".cg")
        if FUSED_XA:
            xa_ptrs = XA_PART + (pid_n.to(tl.int64) * splits + offs_s[:, None]) * BLOCK_R + offs_r[None, :]
            xa = tl.sum(tl.load(xa_ptrs, mask=(offs_s < splits)[:, None] & mask_r[None, :], other=0.0,
                                cache_modifier=".cg"), axis=0)
            if SPLITS_P2 > 1:
                tl.store(COUNT + pid_n, 0)
        else:
            offs_xs = tl.arange(0, XA_SPLITS_P2)
            xa = tl.sum(tl.load(XA_PART + offs_xs[:, None] * RANK + offs_r[None, :],
                                mask=(offs_xs < XA_SPLITS)[:, None] & mask_r[None, :], other=0.0,
                                cache_modifier=".cg"), axis=0)
        xa_in = xa.to(Y.dtype.element_ty)  # rounded to the input dtype before it meets B, as PEFT does
        if STORE_XA:
            if pid_n == 0:
                tl.store(XA + offs_r * stride_xar, xa_in, mask=mask_r)
        total = tl.sum(parts, axis=0) + tl.sum(b.to(ACC) * (xa_in.to(ACC) * scaling)[None, :], axis=1)
        if HAS_BIAS:
            total += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(ACC)
        tl.store(Y + offs_n * stride_yn, total.to(Y.dtype.element_ty), mask=mask_n)


@triton.jit
def row_xa_partial(X, A, XA_PART, pid_n, pid_s, k_start, k_end, RANK, stride_xk, stride_ar, stride_ak,
                   BLOCK_R: tl.constexpr, XA_K: tl.constexpr, ACC: tl.constexpr):
    """xa_mode "fused": XA_PART[pid_n, pid_s, :] = sum over k in [k_start, k_end) of x[k] * A[r, k] (fp32; fp64
    for fp64), the program's own K range's share of xa = x @ A^T, zeros past RANK (finish_row_tile adds the
    tile's shares). X: [1, K] (column stride stride_xk), A: [RANK, K]; XA_PART: [tiles, splits, BLOCK_R] with
    splits = the grid's second dimension. Steps of XA_K columns, [BLOCK_R, XA_K] products per step."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, XA_K)
    mask_r = offs_r < RANK
    acc = tl.zeros((BLOCK_R, XA_K), dtype=ACC)
    for k0 in range(k_start, k_end, XA_K):
        mask_k = offs_k < k_end - k0
        x = tl.load(X + (k0 + offs_k) * stride_xk, mask=mask_k, other=0.0).to(ACC)
        a = tl.load(A + offs_r[:, None] * stride_ar + (k0 + offs_k)[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(ACC)
        acc += a * x[None, :]
    slot = pid_n.to(tl.int64) * tl.num_programs(1) + pid_s
    tl.store(XA_PART + slot * BLOCK_R + offs_r, tl.sum(acc, axis=1))


@triton.jit
def _row_step_loads(QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, offs_n, mask_n, offs_h, offs_g, h0, h_end, K,
                    stride_qn, DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr):
    """The [BLOCK_N, BLOCK_K / 2] weight bytes at byte columns h0 + offs_h and their [BLOCK_N, BLOCK_K / 64]
    absmax, masked to columns below h_end."""
    left = h_end - h0
    byte = tl.load(QW + offs_n[:, None] * stride_qn + (h0 + offs_h)[None, :],
                   mask=mask_n[:, None] & (offs_h < left)[None, :], other=0)
    scale = nf4_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset,
                       offs_n[:, None] * (K // 64) + (h0 // 32 + offs_g)[None, :],
                       mask_n[:, None] & (offs_g < left // 32)[None, :], DOUBLE_QUANT, ABS_GROUP)
    return byte, scale


@triton.jit
def _nf4_gemv_row_kernel(
    X, QW, ABSMAX, ABS_CODE, ABS_SCALE, CODE, PART, COUNT, XA_PART, A, B, BIAS, Y, XA,
    N, K, RANK, XA_SPLITS, BYTES_PER_SPLIT,
    stride_xk, stride_qn, abs_offset, stride_ar, stride_ak, stride_bn, stride_br, stride_yn, stride_xar, scaling,
    HAS_BIAS: tl.constexpr, STORE_XA: tl.constexpr, PDL: tl.constexpr, SPLITS_P2: tl.constexpr,
    XA_SPLITS_P2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr, DECODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
    FUSED_XA: tl.constexpr, XA_K: tl.constexpr, STAGES: tl.constexpr = 1,
):
    """One row (M = 1) of Y = x @ deq(Wq)^T + b + s * xa @ B^T on the FMA units, with the K splits summed by the
    last program of each N tile (no second kernel). STAGES > 1: the K loop's loads go through Triton's software
    pipeline (cp.async into shared memory, STAGES - 1 steps ahead; Triton pipelines loads that feed no dot only
    in a `tl.range` loop that names its stages, not through the launch's num_stages).

    X: [1, K] (column stride stride_xk); QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, CODE: the NF4 weight
    (nf4_dequant.nf4_tile); XA_PART: [XA_SPLITS, 1, RANK] fp32 partials of xa = drop(x) @ A^T from
    lora_shrink_partials, which runs just before (with PDL this kernel may start before it ends; each program
    waits for it once its own partial is stored, finish_row_tile); B: [N, RANK]; BIAS: [N]; Y: [1, N]; XA: [1, RANK] (written when
    STORE_XA). PART: [splits, N] fp32 workspace (splits <= SPLITS_P2, XA_SPLITS <= XA_SPLITS_P2); COUNT:
    [cdiv(N, BLOCK_N)] int32, zeroed by lora_shrink_partials (finish_row_tile).
    FUSED_XA (xa_mode "fused", no dropout): no shrink runs before; each program adds its own K range's share of
    x @ A^T (A: [RANK, K], strides stride_ar, stride_ak; row_xa_partial, XA_K columns a step) into XA_PART
    [tiles, splits, BLOCK_R], and COUNT is kept zero between calls (finish_row_tile).
    grid = (cdiv(N, BLOCK_N), splits); BYTES_PER_SPLIT: the split's K range in bytes of QW (half its weights), a
    multiple of BLOCK_K / 2; BLOCK_K is a multiple of 64. The loop steps in bytes, so that the byte offsets keep
    the divisibility that lets each thread load 16 bytes at once.

    Program (n, s) decodes its [BLOCK_N, 2 * BYTES_PER_SPLIT] slab in registers (one load of BLOCK_K / 2 bytes per row per
    step), multiplies the high and low nibbles' values by x's even and odd columns, sums each 64-weight block,
    scales the block sums by their absmax, and stores a [BLOCK_N] fp32 partial; the last program of the tile to
    finish adds the partials, s * xa @ B^T and the bias (finish_row_tile).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    G: tl.constexpr = BLOCK_K // 64
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, G)
    mask_n = offs_n < N
    h_start = pid_s.to(tl.int64) * BYTES_PER_SPLIT
    # K is a multiple of 64 (whole blocks only); saying so keeps the byte loads 16 bytes wide (the mask below
    # compares with h_end)
    h_end = tl.minimum(h_start + BYTES_PER_SPLIT, tl.multiple_of(K // 2, 32))
    if FUSED_XA:
        row_xa_partial(X, A, XA_PART, pid_n, pid_s, 2 * h_start, 2 * h_end, RANK, stride_xk, stride_ar, stride_ak,
                       BLOCK_R, XA_K, ACC)
    words = nf4_prmt_words(CODE, X.dtype.element_ty, tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.uint8), DECODE)
    acc = tl.zeros((BLOCK_N,), dtype=ACC)
    for h0 in tl.range(h_start, h_end, BLOCK_K // 2, num_stages=STAGES):
        left = h_end - h0  # bytes of this row left in the split
        byte, scale = _row_step_loads(QW, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, offs_n, mask_n, offs_h, offs_g,
                                      h0, h_end, K, stride_qn, DOUBLE_QUANT, ABS_GROUP)
        x = tl.load(X + (2 * h0 + offs_k) * stride_xk, mask=offs_k < 2 * left, other=0.0).to(ACC)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_K // 2, 2)))
        even, odd = nf4_pairs(byte, CODE, words, X.dtype.element_ty, DECODE)
        prod = even.to(ACC) * x_even[None, :] + odd.to(ACC) * x_odd[None, :]  # [BLOCK_N, BLOCK_K / 2]
        block_sums = tl.sum(tl.reshape(prod, (BLOCK_N, G, 32)), axis=2)  # one per 64-weight block
        acc += tl.sum(block_sums * scale, axis=1)
    tl.store(PART + pid_s.to(tl.int64) * N + offs_n, acc, mask=mask_n)
    finish_row_tile(PART, COUNT, XA_PART, B, BIAS, Y, XA, pid_n, N, RANK, XA_SPLITS, stride_bn, stride_br,
                    stride_yn, stride_xar, scaling, HAS_BIAS, STORE_XA, PDL, SPLITS_P2, XA_SPLITS_P2, BLOCK_N,
                    BLOCK_R, ACC, FUSED_XA)



def lanes_block_ptx(mma_type: str) -> str:
    """PTX of one 64-weight quantization block of two rows for one lane of the "lanes" GEMV (its docstring has the
    fragment layout). Operands: $0, $1 = the two rows' running sums (out); $2, $3 = row a's 8 bytes, $4, $5 = row
    b's; $6 - $13 = the 8 pairs (x[2h], x[2h + 1]) of those bytes' columns h; $14, $15 = the rows' absmax;
    $16, $17 = the running sums (in); $18 - $25 = the 8 table words of the 16-bit decode. mma_type: "bf16" or
    "f16" (x's dtype)."""
    words = [f"${18 + i}" for i in range(8)]
    body = ["{", DECODE16_SCRATCH, ".reg .b32 ea0, ea1, oa0, oa1, eb0, eb1, ob0, ob1, xe, xo;",
            ".reg .f32 d0, d1, d2, d3;", "mov.f32 d0, 0f00000000;", "mov.f32 d1, 0f00000000;",
            "mov.f32 d2, 0f00000000;", "mov.f32 d3, 0f00000000;"]
    for word in (0, 1):  # bytes 4 * word .. 4 * word + 3 of each row
        body += decode16_ptx(f"${2 + word}", ("ea0", "ea1"), ("oa0", "oa1"), words)
        body += decode16_ptx(f"${4 + word}", ("eb0", "eb1"), ("ob0", "ob1"), words)
        for half in (0, 1):  # bytes j, j + 1 with j = 4 * word + 2 * half
            x0, x1 = f"${6 + 4 * word + 2 * half}", f"${7 + 4 * word + 2 * half}"
            body += [f"prmt.b32 xe, {x0}, {x1}, 0x5410;", f"prmt.b32 xo, {x0}, {x1}, 0x7632;",
                     f"mma.sync.aligned.m16n8k16.row.col.f32.{mma_type}.{mma_type}.f32 {{d0, d1, d2, d3}}, "
                     f"{{ea{half}, eb{half}, oa{half}, ob{half}}}, {{xe, xo}}, {{d0, d1, d2, d3}};"]
    body += ["fma.rn.f32 $0, d0, $14, $16;", "fma.rn.f32 $1, d2, $15, $17;", "}"]
    return "\n".join(body)


_LANES_ASM = {torch.bfloat16: lanes_block_ptx("bf16"), torch.float16: lanes_block_ptx("f16")}
_LANES_CONSTRAINTS = tl.constexpr("=f,=f," + "r," * 12 + "f,f,f,f," + ",".join(["r"] * 8))


@triton.jit
def _lanes_step(Q32, X32, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, row_a, row_b, mask_a, mask_b, c, h0, K,
                stride_q32, DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr, live):
    """The loads of one lane's share of quantization block h0 // 32 (h0: its first byte): rows row_a and row_b's
    8 bytes at columns h0 + 8c .. h0 + 8c + 7 (2 int32 each), x's 8 pairs at those columns (int32), and the two
    rows' absmax; all masked off (zeros, no traffic) unless `live`."""
    qa = Q32 + row_a * stride_q32 + (h0 // 4 + 2 * c)
    qb = Q32 + row_b * stride_q32 + (h0 // 4 + 2 * c)
    xp = X32 + h0 + 8 * c
    blk = h0 // 32
    mask_a = mask_a & live
    mask_b = mask_b & live
    mask_x = (c >= 0) & live
    return (tl.load(qa, mask=mask_a, other=0), tl.load(qa + 1, mask=mask_a, other=0),
            tl.load(qb, mask=mask_b, other=0), tl.load(qb + 1, mask=mask_b, other=0),
            tl.load(xp, mask=mask_x, other=0), tl.load(xp + 1, mask=mask_x, other=0),
            tl.load(xp + 2, mask=mask_x, other=0), tl.load(xp + 3, mask=mask_x, other=0),
            tl.load(xp + 4, mask=mask_x, other=0), tl.load(xp + 5, mask=mask_x, other=0),
            tl.load(xp + 6, mask=mask_x, other=0), tl.load(xp + 7, mask=mask_x, other=0),
            nf4_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, row_a * (K // 64) + blk, mask_a, DOUBLE_QUANT,
                       ABS_GROUP),
            nf4_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, row_b * (K // 64) + blk, mask_b, DOUBLE_QUANT,
                       ABS_GROUP))


@triton.jit
def _nf4_gemv_lanes_kernel(
    X, QW, ABSMAX, ABS_CODE, ABS_SCALE, CODE, PART, COUNT, XA_PART, A, B, BIAS, Y, XA,
    N, K, RANK, XA_SPLITS, BYTES_PER_SPLIT,
    stride_qn, abs_offset, stride_ar, stride_ak, stride_bn, stride_br, stride_yn, stride_xar, scaling,
    HAS_BIAS: tl.constexpr, STORE_XA: tl.constexpr, PDL: tl.constexpr, SPLITS_P2: tl.constexpr,
    XA_SPLITS_P2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr, MMA_ASM: tl.constexpr,
    WARPS: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr, FUSED_XA: tl.constexpr, XA_K: tl.constexpr,
):
    """One row (M = 1) of Y = x @ deq(Wq)^T + b + s * xa @ B^T on the tensor cores, each lane holding its own
    mma fragments (no shared memory, no padded rows of x); the last program of each tile finishes it as in
    _nf4_gemv_row_kernel (finish_row_tile).

    X: [1, K] bf16 or fp16, contiguous and 4-byte aligned (read as K / 2 int32 pairs); QW [N, K / 2] with
    stride_qn a multiple of 4, 4-byte aligned; MMA_ASM: lanes_block_ptx of x's dtype; the other arguments (A,
    FUSED_XA, XA_K included) as in _nf4_gemv_row_kernel. Each warp owns 16 output rows,
    each program WARPS warps (BLOCK_N = 16 * WARPS rows); grid = (cdiv(N, BLOCK_N), splits).

    Lane l = 4g + c of warp w takes rows a = 16w + g and b = a + 8 of the tile, and in every 64-weight block the 8
    bytes (16 weights) at byte columns 8c .. 8c + 7 of both rows. It decodes them into bf16 pairs (the even
    columns of two neighbouring bytes in one register, their odd columns in another) and feeds them to
    mma.sync m16n8k16 as the A fragment: rows g and g + 8 of the fragment are rows a and b, and the fragment's
    columns 2c, 2c + 1, 2c + 8, 2c + 9 are a permutation of the lane's K columns. The sum over K does not care
    about the order, provided the B fragment holds x at the same columns: B is x's 16 values of the fragment's
    columns, the same in all 8 columns of B (so every column of D holds the row sums), and each lane supplies
    the x values of its own bytes, which are the B fragment rows it owns. Four mma per block give both rows'
    block sums; the absmax scales them into the running sums.
    """
    BLOCK_N: tl.constexpr = 16 * WARPS
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    lane = tl.arange(0, 32 * WARPS)  # one element per thread: element i sits in thread i
    g = (lane % 32) // 4
    c = lane % 4
    row_a = pid_n.to(tl.int64) * BLOCK_N + (lane // 32) * 16 + g
    row_b = row_a + 8
    mask_a = row_a < N
    mask_b = row_b < N
    Q32 = QW.to(tl.pointer_type(tl.int32), bitcast=True)
    X32 = X.to(tl.pointer_type(tl.int32), bitcast=True)
    stride_q32 = stride_qn // 4
    h_start = pid_s.to(tl.int64) * BYTES_PER_SPLIT
    h_end = tl.minimum(h_start + BYTES_PER_SPLIT, K // 2)
    if FUSED_XA:
        row_xa_partial(X, A, XA_PART, pid_n, pid_s, 2 * h_start, 2 * h_end, RANK, 1, stride_ar, stride_ak, BLOCK_R,
                       XA_K, ACC)
    words = nf4_prmt_words(CODE, X.dtype.element_ty, lane, "prmt")
    sum_a = tl.zeros((32 * WARPS,), dtype=ACC)
    sum_b = tl.zeros((32 * WARPS,), dtype=ACC)
    # one block ahead: the loads of block h0 + 32 are in flight while block h0 is decoded (the last step loads
    # its own block again, masked off: no traffic)
    nxt = _lanes_step(Q32, X32, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, row_a, row_b, mask_a, mask_b, c, h_start,
                      K, stride_q32, DOUBLE_QUANT, ABS_GROUP, True)
    for h0 in range(h_start, h_end, 32):
        qa0, qa1, qb0, qb1, x0, x1, x2, x3, x4, x5, x6, x7, abs_a, abs_b = nxt
        more = h0 + 32 < h_end
        nxt = _lanes_step(Q32, X32, ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, row_a, row_b, mask_a, mask_b, c,
                          tl.where(more, h0 + 32, h0), K, stride_q32, DOUBLE_QUANT, ABS_GROUP, more)
        sum_a, sum_b = tl.inline_asm_elementwise(
            MMA_ASM, _LANES_CONSTRAINTS,
            [qa0, qa1, qb0, qb1, x0, x1, x2, x3, x4, x5, x6, x7, abs_a, abs_b, sum_a, sum_b,
             words[0], words[1], words[2], words[3], words[4], words[5], words[6], words[7]],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    part = PART + pid_s.to(tl.int64) * N
    tl.store(part + row_a, sum_a, mask=mask_a & (c == 0))  # the 4 lanes of a row hold the same sums
    tl.store(part + row_b, sum_b, mask=mask_b & (c == 0))
    finish_row_tile(PART, COUNT, XA_PART, B, BIAS, Y, XA, pid_n, N, RANK, XA_SPLITS, stride_bn, stride_br,
                    stride_yn, stride_xar, scaling, HAS_BIAS, STORE_XA, PDL, SPLITS_P2, XA_SPLITS_P2, BLOCK_N,
                    BLOCK_R, ACC, FUSED_XA)


def wide_step_ptx(mma_type: str, tiles: int) -> str:
    """PTX of one step of the "wide" GEMV (its docstring has the layout) for one lane: `tiles` row tiles of the
    mma, 2 rows each (a = 16j + g, b = a + 8), of which the lane holds 16 bytes (32 weights) at the same columns.

    Operands, with T = tiles: $0 .. $(2T - 1) the rows' running sums (out, row a of tile j at 2j, row b at
    2j + 1); then 8T words of bytes (row r's 4 at 2T + 4r); 16 words of x pairs (x[2m], x[2m + 1]) at the
    lane's 32 columns; 4T fp32 absmax (row r's two blocks of the span at 10T + 16 + 2r, + 1); the 2T running
    sums (in); the 8 table words of the 16-bit decode. mma_type: "bf16" or "f16"."""
    rows = 2 * tiles
    q0, x0, a0, s0 = rows, 10 * tiles, 10 * tiles + 16, 14 * tiles + 16
    words = [f"${s0 + rows + i}" for i in range(8)]
    regs = [f"e{j}{r}{h}, o{j}{r}{h}" for j in range(tiles) for r in "ab" for h in (0, 1)]
    body = ["{", DECODE16_SCRATCH, ".reg .b32 xe, xo, " + ", ".join(regs) + ";",
            ".reg .f32 " + ", ".join(f"d{j}_{i}" for j in range(tiles) for i in range(4)) + ";"]
    body += [f"mov.f32 d{j}_{i}, 0f00000000;" for j in range(tiles) for i in range(4)]
    for word in range(4):  # bytes 4 * word .. 4 * word + 3 of every row: weights 8 * word .. 8 * word + 7
        for j in range(tiles):
            for r in "ab":
                row = 2 * j + (r == "b")
                body += decode16_ptx(f"${q0 + 4 * row + word}", (f"e{j}{r}0", f"e{j}{r}1"),
                                     (f"o{j}{r}0", f"o{j}{r}1"), words)
        for half in (0, 1):  # weights 8 * word + 4 * half + (0, 2) (even nibbles) and + (1, 3) (odd)
            pair = 4 * word + 2 * half
            body += [f"prmt.b32 xe, ${x0 + pair}, ${x0 + pair + 1}, 0x5410;",
                     f"prmt.b32 xo, ${x0 + pair}, ${x0 + pair + 1}, 0x7632;"]
            for j in range(tiles):
                body.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{mma_type}.{mma_type}.f32 "
                            f"{{d{j}_0, d{j}_1, d{j}_2, d{j}_3}}, "
                            f"{{e{j}a{half}, e{j}b{half}, o{j}a{half}, o{j}b{half}}}, "
                            f"{{xe, xo}}, {{d{j}_0, d{j}_1, d{j}_2, d{j}_3}};")
    for j in range(tiles):  # D columns 0 and 1 are the span's two blocks (only lanes c = 0 hold them)
        for r, (lo, hi) in ((2 * j, (0, 1)), (2 * j + 1, (2, 3))):
            body += [f"fma.rn.f32 ${r}, d{j}_{lo}, ${a0 + 2 * r}, ${s0 + r};",
                     f"fma.rn.f32 ${r}, d{j}_{hi}, ${a0 + 2 * r + 1}, ${r};"]
    body.append("}")
    return "\n".join(body)


def wide_constraints(tiles: int) -> str:
    """The inline-asm constraints of wide_step_ptx(_, tiles), operand for operand."""
    return ",".join(["=f"] * (2 * tiles) + ["r"] * (8 * tiles + 16) + ["f"] * (6 * tiles) + ["r"] * 8)


def wide_xa_ptx(mma_type: str) -> str:
    """PTX of one span's share of xa = x @ A^T in the "wide" GEMV (xa_mode "fused"), for one lane (g, c) and one
    16-rank tile of A: rows g and g + 8 of the tile at the lane's 32 columns of the span (the columns of its
    weight bytes) are the A fragments of 8 mma.sync m16n8k16 (each 16-byte load holds column pairs, as the
    fragment wants), x's pairs at the same columns are B in every lane, so every column of D is the tile's xa
    and d0, d2 are ranks g and g + 8.

    Operands: $0, $1 the two ranks' running sums (out); $2 .. $17 row g's 16 words; $18 .. $33 row g + 8's;
    $34 .. $49 x's 16 pairs; $50, $51 the running sums (in). mma_type: "bf16" or "f16"."""
    body = ["{", ".reg .f32 d0, d1, d2, d3;"]
    acc = "{$50, $50, $51, $51}"
    for i in range(8):  # words 2i, 2i + 1: columns 4i .. 4i + 3 of the lane's 32
        body.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{mma_type}.{mma_type}.f32 {{d0, d1, d2, d3}}, "
                    f"{{${2 + 2 * i}, ${18 + 2 * i}, ${3 + 2 * i}, ${19 + 2 * i}}}, {{${34 + 2 * i}, ${35 + 2 * i}}}, "
                    f"{acc};")
        acc = "{d0, d1, d2, d3}"
    body += ["mov.f32 $0, d0;", "mov.f32 $1, d2;", "}"]
    return "\n".join(body)


_WIDE_TILES = 2  # row tiles of the mma per lane (4 rows): x's 16 words serve 4 rows' bytes
_WIDE_ASM = {torch.bfloat16: wide_step_ptx("bf16", _WIDE_TILES), torch.float16: wide_step_ptx("f16", _WIDE_TILES)}
_WIDE_CONSTRAINTS = tl.constexpr(wide_constraints(_WIDE_TILES))
_WIDE_XA_ASM = {torch.bfloat16: wide_xa_ptx("bf16"), torch.float16: wide_xa_ptx("f16")}
_WIDE_XA_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 2 + ["r"] * 48 + ["f"] * 2))
# The "wide" kernel's fused xa handles at most this many 16-rank tiles of A (rank <= 64); larger ranks use the
# shrink.
WIDE_XA_MAX_TILES = 4
# 16 bytes from a global address, or zeros where the predicate is 0 (no access)
_LOAD16 = tl.constexpr("{.reg .pred p; setp.ne.b32 p, $4, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; "
                       "mov.b32 $3, 0; @p ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$5];}")


@triton.jit
def _load16(addr, live):
    """4 int32 words (16 bytes) at the int64 global address `addr` per thread, zeros where `live` is 0."""
    return tl.inline_asm_elementwise(_LOAD16, "=r,=r,=r,=r,r,l", [live, addr], dtype=(tl.int32,) * 4,
                                     is_pure=True, pack=1)


@triton.jit
def _span_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, flat, live0, live1, DOUBLE_QUANT: tl.constexpr,
                 ABS_GROUP: tl.constexpr):
    """The absmax of a span's two blocks (flat indices flat and flat + 1), 0 where not live0 / live1."""
    return (nf4_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, flat, live0, DOUBLE_QUANT, ABS_GROUP),
            nf4_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, flat + 1, live1, DOUBLE_QUANT, ABS_GROUP))


@triton.jit
def _wide_loads(q0, q1, q2, q3, xp, h, h_end, c, x_lanes, first, a0, a1, a2, a3, ABSMAX, ABS_CODE, ABS_SCALE,
                abs_offset, go, DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr):
    """The loads of one lane's share of span h (its first byte) of the "wide" GEMV: 16 bytes of each of its 4
    rows (q0 .. q3: the rows' addresses at the lane's 16 bytes), x's 16 pairs at those columns where x_lanes
    (int32 1 / 0), and the 4 rows' absmax of the span's two blocks where `first`; 40 values, all zeros and no
    traffic unless `go` (a later span than the range has) and inside h_end."""
    live = ((h + 16 * c < h_end) & go).to(tl.int32)  # a span with one block left: lanes c = 2, 3 read nothing
    w0a, w0b, w0c, w0d = _load16(q0 + h, live)
    w1a, w1b, w1c, w1d = _load16(q1 + h, live)
    w2a, w2b, w2c, w2d = _load16(q2 + h, live)
    w3a, w3b, w3c, w3d = _load16(q3 + h, live)
    lx = live * x_lanes
    xa0, xa1, xa2, xa3 = _load16(xp + 4 * h, lx)
    xb0, xb1, xb2, xb3 = _load16(xp + 4 * h + 16, lx)
    xc0, xc1, xc2, xc3 = _load16(xp + 4 * h + 32, lx)
    xd0, xd1, xd2, xd3 = _load16(xp + 4 * h + 48, lx)
    blk = h // 32
    m0 = first & (h < h_end) & go
    m1 = first & (h + 32 < h_end) & go
    s00, s01 = _span_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, a0 + blk, m0, m1, DOUBLE_QUANT, ABS_GROUP)
    s10, s11 = _span_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, a1 + blk, m0, m1, DOUBLE_QUANT, ABS_GROUP)
    s20, s21 = _span_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, a2 + blk, m0, m1, DOUBLE_QUANT, ABS_GROUP)
    s30, s31 = _span_absmax(ABSMAX, ABS_CODE, ABS_SCALE, abs_offset, a3 + blk, m0, m1, DOUBLE_QUANT, ABS_GROUP)
    return (w0a, w0b, w0c, w0d, w1a, w1b, w1c, w1d, w2a, w2b, w2c, w2d, w3a, w3b, w3c, w3d,
            xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3, xc0, xc1, xc2, xc3, xd0, xd1, xd2, xd3,
            s00, s01, s10, s11, s20, s21, s30, s31)


@triton.jit
def _wide_xa_tile(ld, a_row, h, live, g8, s0, s1, XA_ASM: tl.constexpr):
    """One span's share of a 16-rank tile of xa (wide_xa_ptx): a_row is the address of A's row g of the tile at
    the lane's first column of span 0, g8 the byte distance to row g + 8, live (int32 per row pair: bit 0 row g,
    bit 1 row g + 8) masks the loads; ld: the span's _wide_loads (x's pairs at 16 .. 31)."""
    p = a_row + 4 * h
    la = live & 1
    lb = live >> 1
    r0, r1, r2, r3 = _load16(p, la)
    r4, r5, r6, r7 = _load16(p + 16, la)
    r8, r9, r10, r11 = _load16(p + 32, la)
    r12, r13, r14, r15 = _load16(p + 48, la)
    t0, t1, t2, t3 = _load16(p + g8, lb)
    t4, t5, t6, t7 = _load16(p + g8 + 16, lb)
    t8, t9, t10, t11 = _load16(p + g8 + 32, lb)
    t12, t13, t14, t15 = _load16(p + g8 + 48, lb)
    return tl.inline_asm_elementwise(
        XA_ASM, _WIDE_XA_CONSTRAINTS,
        [r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15,
         t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15,
         ld[16], ld[17], ld[18], ld[19], ld[20], ld[21], ld[22], ld[23],
         ld[24], ld[25], ld[26], ld[27], ld[28], ld[29], ld[30], ld[31], s0, s1],
        dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _wide_xa_live(g, c, h, h_end, t: tl.constexpr, RANK):
    """_wide_xa_tile's `live` for rank tile t: bit 0 rank 16t + g, bit 1 rank 16t + g + 8, both only where the
    lane's columns of span h are inside the range."""
    inside = (h + 16 * c < h_end).to(tl.int32)
    return inside * ((16 * t + g < RANK).to(tl.int32) + 2 * (16 * t + g + 8 < RANK).to(tl.int32))


@triton.jit
def _nf4_gemv_wide_kernel(
    X, QW, ABSMAX, ABS_CODE, ABS_SCALE, CODE, PART, COUNT, XA_PART, A, B, BIAS, Y, XA,
    N, K, RANK, XA_SPLITS, BYTES_PER_RANGE,
    stride_qn, abs_offset, stride_ar, stride_ak, stride_bn, stride_br, stride_yn, stride_xar, scaling,
    HAS_BIAS: tl.constexpr, STORE_XA: tl.constexpr, PDL: tl.constexpr, SPLITS_P2: tl.constexpr,
    XA_SPLITS_P2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ABS_GROUP: tl.constexpr, STEP_ASM: tl.constexpr,
    STEP_CONSTRAINTS: tl.constexpr, WARPS: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
    FUSED_XA: tl.constexpr, XA_ASM: tl.constexpr, STAGES: tl.constexpr,
):
    """One row (M = 1) of Y = x @ deq(Wq)^T + b + s * xa @ B^T on mma.sync, 16-byte loads, each lane holding
    the weights of 4 rows; the last program of each output tile finishes it as in _nf4_gemv_row_kernel
    (finish_row_tile).

    X: [1, K] bf16 or fp16, contiguous, 16-byte aligned; QW [N, K / 2] with 16-byte aligned rows; the other
    arguments as in _nf4_gemv_row_kernel. A program's WARPS warps share its 32 output rows (BLOCK_N) and split
    its K range (BYTES_PER_RANGE bytes of QW per warp, a multiple of 64); their sums are added in the program
    before its partial is stored. grid = (cdiv(N, 32), splits); warp w of program (n, s) takes byte range
    s * WARPS + w. STAGES = 2: the loads of a warp's next span are issued before its current span is decoded
    (1: each span's loads at its own step).

    Each step covers a 64-byte span of every row (128 weights, two quantization blocks). Lane l = 4g + c takes,
    in rows 16j + g and 16j + g + 8 (j = 0, 1: two mma row tiles), the 16 bytes at 16c .. 16c + 15 of the span,
    so lanes c = 0, 1 hold the span's first block and c = 2, 3 its second. Decoded (even and odd nibbles'
    values paired as in "lanes"), they are the A fragments of 8 mma.sync m16n8k16 per tile: any order of a
    lane's K columns works, provided B holds x at the same columns. B's column n is x where the A columns
    belong to block n of the span and zero elsewhere: lane (g, c) supplies B[its columns, g], which is x when
    g == c // 2 (only those 4 lanes need x) and zero otherwise. So D[row, 0] and D[row, 1] are the row's two
    block sums, in lane c = 0, which scales them by the blocks' absmax into its running sums.

    FUSED_XA (xa_mode "fused", no dropout; A [RANK, K] contiguous along K with 16-byte aligned rows): every lane
    loads x, the step's B keeps it only where g == c // 2, and per span each 16-rank tile of A (BLOCK_R / 16 of
    them, at most WIDE_XA_MAX_TILES) adds its share of x @ A^T on 8 more mma.sync (wide_xa_ptx); the program
    stores its share into XA_PART [tiles, splits, BLOCK_R] (finish_row_tile).
    """
    BLOCK_N: tl.constexpr = 32
    RT: tl.constexpr = BLOCK_R // 16
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    t = tl.arange(0, 32 * WARPS)  # thread t holds element t
    lane = t % 32
    g = lane // 4
    c = lane % 4
    k_range = pid_s * WARPS + t // 32
    h_start = k_range.to(tl.int64) * BYTES_PER_RANGE
    h_end = tl.minimum(h_start + BYTES_PER_RANGE, K // 2)
    # the lane's rows g, g + 8, g + 16, g + 24 of the tile, clamped below N: rows past N read row N - 1 (their
    # sums are never stored), so the loop needs no row masks
    row0 = tl.minimum(pid_n.to(tl.int64) * BLOCK_N + g, N - 1)
    row1 = tl.minimum(pid_n.to(tl.int64) * BLOCK_N + g + 8, N - 1)
    row2 = tl.minimum(pid_n.to(tl.int64) * BLOCK_N + g + 16, N - 1)
    row3 = tl.minimum(pid_n.to(tl.int64) * BLOCK_N + g + 24, N - 1)
    q0 = QW.to(tl.int64) + row0 * stride_qn + 16 * c
    q1 = QW.to(tl.int64) + row1 * stride_qn + 16 * c
    q2 = QW.to(tl.int64) + row2 * stride_qn + 16 * c
    q3 = QW.to(tl.int64) + row3 * stride_qn + 16 * c
    xp = X.to(tl.int64) + 64 * c  # 2 bytes per x value, 32 values per lane: byte 4 * h0 + 64c for span h0
    tl.static_assert(X.dtype.element_ty.primitive_bitwidth == 16)
    use_x = g == c // 2
    if FUSED_XA:
        tl.static_assert(RT <= 4)
        x_lanes = (c >= 0).to(tl.int32)  # every lane: the xa mma needs x at all columns
        x_keep = -(use_x.to(tl.int32))  # all ones where the step's B takes x
        a_row = A.to(tl.int64) + (g * stride_ar).to(tl.int64) * 2 + 64 * c  # rank g of tile 0, the lane's columns
        g8 = 16 * stride_ar.to(tl.int64)  # 8 ranks, in bytes
        t16 = 32 * stride_ar.to(tl.int64)  # 16 ranks
    else:
        x_lanes = use_x.to(tl.int32)
    first = c == 0  # the lanes whose D columns hold the block sums: only they read the absmax
    blocks = K // 64
    a0 = row0 * blocks  # each row's first absmax (flat index)
    a1 = row1 * blocks
    a2 = row2 * blocks
    a3 = row3 * blocks
    words = nf4_prmt_words(CODE, X.dtype.element_ty, t, "prmt")
    acc0 = tl.zeros((32 * WARPS,), dtype=ACC)
    acc1 = tl.zeros((32 * WARPS,), dtype=ACC)
    acc2 = tl.zeros((32 * WARPS,), dtype=ACC)
    acc3 = tl.zeros((32 * WARPS,), dtype=ACC)
    xs00 = tl.zeros((32 * WARPS,), dtype=ACC)  # xa: ranks 16j + g (xsj0) and 16j + g + 8 (xsj1) of tile j
    xs01 = tl.zeros((32 * WARPS,), dtype=ACC)
    xs10 = tl.zeros((32 * WARPS,), dtype=ACC)
    xs11 = tl.zeros((32 * WARPS,), dtype=ACC)
    xs20 = tl.zeros((32 * WARPS,), dtype=ACC)
    xs21 = tl.zeros((32 * WARPS,), dtype=ACC)
    xs30 = tl.zeros((32 * WARPS,), dtype=ACC)
    xs31 = tl.zeros((32 * WARPS,), dtype=ACC)
    if STAGES > 1:
        nxt = _wide_loads(q0, q1, q2, q3, xp, h_start, h_end, c, x_lanes, first, a0, a1, a2, a3, ABSMAX, ABS_CODE,
                          ABS_SCALE, abs_offset, True, DOUBLE_QUANT, ABS_GROUP)
    for h0 in range(0, BYTES_PER_RANGE, 64):
        h = h_start + h0
        if STAGES > 1:
            ld = nxt
            nxt = _wide_loads(q0, q1, q2, q3, xp, h + 64, h_end, c, x_lanes, first, a0, a1, a2, a3, ABSMAX,
                              ABS_CODE, ABS_SCALE, abs_offset, h0 + 64 < BYTES_PER_RANGE, DOUBLE_QUANT, ABS_GROUP)
        else:
            ld = _wide_loads(q0, q1, q2, q3, xp, h, h_end, c, x_lanes, first, a0, a1, a2, a3, ABSMAX, ABS_CODE,
                             ABS_SCALE, abs_offset, True, DOUBLE_QUANT, ABS_GROUP)
        if FUSED_XA:
            xs00, xs01 = _wide_xa_tile(ld, a_row, h, _wide_xa_live(g, c, h, h_end, 0, RANK), g8, xs00, xs01, XA_ASM)
            if RT > 1:
                xs10, xs11 = _wide_xa_tile(ld, a_row + t16, h, _wide_xa_live(g, c, h, h_end, 1, RANK), g8, xs10,
                                           xs11, XA_ASM)
            if RT > 2:
                xs20, xs21 = _wide_xa_tile(ld, a_row + 2 * t16, h, _wide_xa_live(g, c, h, h_end, 2, RANK), g8,
                                           xs20, xs21, XA_ASM)
                xs30, xs31 = _wide_xa_tile(ld, a_row + 3 * t16, h, _wide_xa_live(g, c, h, h_end, 3, RANK), g8,
                                           xs30, xs31, XA_ASM)
            xm = x_keep
        else:
            xm = -1
        acc0, acc1, acc2, acc3 = tl.inline_asm_elementwise(
            STEP_ASM, STEP_CONSTRAINTS,
            [ld[0], ld[1], ld[2], ld[3], ld[4], ld[5], ld[6], ld[7],
             ld[8], ld[9], ld[10], ld[11], ld[12], ld[13], ld[14], ld[15],
             ld[16] & xm, ld[17] & xm, ld[18] & xm, ld[19] & xm, ld[20] & xm, ld[21] & xm, ld[22] & xm,
             ld[23] & xm, ld[24] & xm, ld[25] & xm, ld[26] & xm, ld[27] & xm, ld[28] & xm, ld[29] & xm,
             ld[30] & xm, ld[31] & xm,
             ld[32], ld[33], ld[34], ld[35], ld[36], ld[37], ld[38], ld[39], acc0, acc1, acc2, acc3,
             words[0], words[1], words[2], words[3], words[4], words[5], words[6], words[7]],
            dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    # the warps' sums of the same rows, added in the program (a fixed order)
    acc0 = tl.sum(tl.reshape(acc0, (WARPS, 32)), axis=0)
    acc1 = tl.sum(tl.reshape(acc1, (WARPS, 32)), axis=0)
    acc2 = tl.sum(tl.reshape(acc2, (WARPS, 32)), axis=0)
    acc3 = tl.sum(tl.reshape(acc3, (WARPS, 32)), axis=0)
    l32 = tl.arange(0, 32)
    r0 = pid_n.to(tl.int64) * BLOCK_N + l32 // 4
    keep = (l32 % 4) == 0
    part = PART + pid_s.to(tl.int64) * N
    tl.store(part + r0, acc0, mask=keep & (r0 < N))
    tl.store(part + r0 + 8, acc1, mask=keep & (r0 + 8 < N))
    tl.store(part + r0 + 16, acc2, mask=keep & (r0 + 16 < N))
    tl.store(part + r0 + 24, acc3, mask=keep & (r0 + 24 < N))
    if FUSED_XA:  # lane 4g of tile j holds ranks 16j + g and 16j + g + 8 (the 4 lanes of g hold the same sums)
        xa_slot = XA_PART + (pid_n.to(tl.int64) * tl.num_programs(1) + pid_s) * BLOCK_R + l32 // 4
        tl.store(xa_slot, tl.sum(tl.reshape(xs00, (WARPS, 32)), axis=0), mask=keep)
        tl.store(xa_slot + 8, tl.sum(tl.reshape(xs01, (WARPS, 32)), axis=0), mask=keep)
        if RT > 1:
            tl.store(xa_slot + 16, tl.sum(tl.reshape(xs10, (WARPS, 32)), axis=0), mask=keep)
            tl.store(xa_slot + 24, tl.sum(tl.reshape(xs11, (WARPS, 32)), axis=0), mask=keep)
        if RT > 2:
            tl.store(xa_slot + 32, tl.sum(tl.reshape(xs20, (WARPS, 32)), axis=0), mask=keep)
            tl.store(xa_slot + 40, tl.sum(tl.reshape(xs21, (WARPS, 32)), axis=0), mask=keep)
            tl.store(xa_slot + 48, tl.sum(tl.reshape(xs30, (WARPS, 32)), axis=0), mask=keep)
            tl.store(xa_slot + 56, tl.sum(tl.reshape(xs31, (WARPS, 32)), axis=0), mask=keep)
    finish_row_tile(PART, COUNT, XA_PART, B, BIAS, Y, XA, pid_n, N, RANK, XA_SPLITS, stride_bn, stride_br,
                    stride_yn, stride_xar, scaling, HAS_BIAS, STORE_XA, PDL, SPLITS_P2, XA_SPLITS_P2, BLOCK_N,
                    BLOCK_R, ACC, FUSED_XA)


NF4_GEMV_ENGINES = ("auto", "padded", "fma", "lanes", "wide")
XA_MODES = ("auto", "shrink", "fused")


def nf4_gemv_splits(n_tiles: int, k_steps: int, device) -> int:
    """K splits: about TARGET_CTAS_PER_SM programs per SM in all, at most one BLOCK_K step per split and at most
    MAX_SPLITS."""
    return max(1, min(k_steps, MAX_SPLITS, cdiv(TARGET_CTAS_PER_SM * num_sms(device), n_tiles)))


def nf4_gemv(x, w4, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, store_xa=False, decode="auto",
             splits=None, engine="auto", xa_mode="auto"):
    """NF4 LoRA forward for M <= 16 rows, reading the 4-bit weight directly.

    x: [M, K] (M <= 16), w4: NF4 weight of shape (N, K) (kernels.nf4_dequant.nf4_kernel_args), bias: [N] or
    None, lora_A: [r, K], lora_B: [N, r] (x's dtype and device); scaling, dropout_p, seed as in lora_forward.
    decode: the NF4 decode (nf4_dequant.NF4_DECODES, "auto": "prmt" on a GPU); the code values are rounded to
    x's dtype, and each block's absmax multiplies the fp32 partial sums. splits: override the K split (tests).
    engine: "padded" (tensor cores, rows padded to 16, a second kernel sums the splits); for one row, after a
    split shrink for xa and with the splits summed by the last program of each output tile: "fma" (products on
    the FMA units), "lanes" (each lane feeds its own decoded weights to mma.sync: bf16 / fp16 on a CUDA GPU,
    x contiguous and 4-byte aligned; measured slower than "fma") or "wide" (mma.sync with 16-byte loads, 4 rows
    per lane: bf16 / fp16 on a CUDA GPU, x and qweight's rows 16-byte aligned); "auto": for one row "wide" where
    it can run, else "fma"; "padded" for more rows.
    xa_mode (one-row engines): "shrink" (xa's split shrink runs first, `lora_shrink_partials`, and zeroes the
    tiles' counters) or "fused" (no dropout: each program of the GEMV adds its own K range's share of x @ A^T,
    so one kernel per call; the tiles' counters are kept per device and stream, zero between kernels, so two
    CUDA graphs captured on the same stream must not be replayed at once on different streams); "auto": "fused"
    for "wide" where it measured faster (WIDE_FUSED_CTAS_PER_SM, WIDE_FUSED_MAX_SPANS) and can run (dropout_p
    == 0, lora_A contiguous along K with 16-byte aligned rows, rank <= 64), else "shrink".
    Returns (y [M, N], xa [M, r] or None). Checks and launch set-up are done once per call signature
    (kernels/launch.py).

    >>> y, _ = nf4_gemv(x, w4, None, A, B, 2.0)
    """
    scaling = check_scaling(scaling)
    check_dropout(dropout_p, seed, x)
    tensors, flags = nf4_key_parts(w4)
    key = plan_key((x, bias, lora_A, lora_B) + tensors, *flags, dropout_p, store_xa, decode, splits, engine,
                   xa_mode, dot_precision_key(x), seed_key(seed))
    plan = _PLANS.find(key)
    if plan is None:
        if engine not in NF4_GEMV_ENGINES:
            raise ValueError(f"engine must be one of {NF4_GEMV_ENGINES}, got {engine!r}")
        if xa_mode not in XA_MODES:
            raise ValueError(f"xa_mode must be one of {XA_MODES}, got {xa_mode!r}")
        if engine == "padded" or (engine == "auto" and not (x.dim() == 2 and x.shape[0] == 1)):
            if xa_mode == "fused":
                raise ValueError("xa_mode='fused' is for the one-row engines ('fma', 'lanes', 'wide'); the "
                                 f"'padded' engine (M = {x.shape[0] if x.dim() == 2 else '?'}) sums xa in its own programs")
            plan = _GemvPlan(x, w4, bias, lora_A, lora_B, dropout_p, store_xa, decode, splits)
        else:
            plan = _RowPlan(x, w4, bias, lora_A, lora_B, dropout_p, store_xa, decode, splits, engine, xa_mode)
        plan = _PLANS.put(key, plan)
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


# The one-row engines: K ranges of xa's split shrink (lora_shrink_partials), as the bf16 decode forward's "split" mode.
ROW_XA_SPLITS = 8
# K splits of W (fewer when K has fewer steps), at most MAX_ROW_SPLITS: the program that finishes a tile adds one
# [BLOCK_N] partial per split. On the H200 at K = N = 4096 with 16 x 256 tiles of one warp, 8 splits (2 steps
# each) ran 12.6 us per call against 12.8 with 4; one step per program (16 splits) was slower than both.
ROW_SPLITS = 8
MAX_ROW_SPLITS = 32
# The "wide" engine's K splits (programs of one warp and 32 rows): on the H200 at K = N = 4096, 16 splits
# (2 spans per warp) ran 11.2-11.4 us per call against 11.6 with 8 and 13.0 with 32; programs of 4-16 warps
# splitting K among themselves, with one split or two, were slower (12.2-16.5 us).
WIDE_SPLITS = 16
def lanes_unsupported(x, w4, align: int = 4) -> str | None:
    """Why the "lanes" engine (align 4) or the "wide" one (align 16) cannot run this call (None: it can)."""
    if x.device.type != "cuda" or is_interpret() or torch.version.hip is not None:
        return "it runs PTX (mma.sync) on an NVIDIA GPU"
    if x.dtype not in _LANES_ASM:
        return f"it takes bf16 or fp16 x, got {x.dtype}"
    if capability_major(x.device) < 8:
        return "it needs compute capability 8.0 or newer"
    if x.shape[1] > 1 and x.stride(1) != 1 or x.data_ptr() % align:
        return f"it reads x {align} bytes at a time: x must be contiguous along K and {align}-byte aligned"
    if w4.qweight.stride(0) % align or w4.qweight.data_ptr() % align:
        return f"it reads {align} bytes of the weight at a time: qweight rows must be {align}-byte aligned"
    return None


# xa_mode "auto" takes "fused" for the "wide" engine when its grid fits on the GPU at once (at most this many of
# its one-warp programs per SM: the fused kernel holds 128 registers a thread) and each warp walks at most
# WIDE_FUSED_MAX_SPANS 64-byte spans: there the shrink's launch ahead of the GEMV (~1 us) costs more than the
# programs' redundant share of xa. H200, r = 16 (bench/NOTES.md): K = N = 4096 0.773-0.775x the bf16 base against
# 0.811-0.818x with the shrink; N = 14336 (3.4 waves) 0.887x against 0.785x, K = 14336 (7 spans a warp) 0.77x
# against 0.75x. "fma" and "lanes" never take it on "auto" (their xa on the FMA units: "fma" 1.31x).
WIDE_FUSED_CTAS_PER_SM = 16
WIDE_FUSED_MAX_SPANS = 2
# xa_mode "fused": the tiles' split counters, a slot of COUNTER_SLOT int32 per (device, stream), zero between
# kernels (the finishing program of each tile resets its own), so the kernels of one stream share a slot. They
# must belong to no allocator pool and outlive every graph that captured their address: torch.compile's CUDA-graph
# trees route every allocation of the thread to their pool while they warm up and may roll that pool back to a
# checkpoint, which would hand a counter allocated there to another tensor. So on CUDA they come from the driver
# (cuMemAlloc, never freed), COUNTER_SLOTS_PER_CHUNK slots at a time, allocated only outside stream capture.
COUNTER_SLOT = 8192
COUNTER_SLOTS_PER_CHUNK = 16
_COUNTER_SLOTS: dict = {}  # (device type, index, stream handle) -> int32 tensor [COUNTER_SLOT]
_FREE_SLOTS: dict = {}  # (device type, index) -> unassigned slots (views: they keep their chunk alive)


def _add_counter_chunk(device: torch.device) -> bool:
    """Allocate COUNTER_SLOTS_PER_CHUNK more zeroed slots for `device`; False where that cannot be done now (a
    stream capture is under way, or no driver allocation: helpers.driver_copy)."""
    zeros = torch.zeros(COUNTER_SLOT * COUNTER_SLOTS_PER_CHUNK, dtype=torch.int32)
    chunk = driver_copy(zeros, device) if device.type == "cuda" else zeros.to(device)
    if chunk is None:
        return False
    _FREE_SLOTS.setdefault((device.type, device.index), []).extend(chunk.split(COUNTER_SLOT))
    return True


def counters_unavailable(device: torch.device) -> str | None:
    """Why xa_mode "fused" has no counters on `device` now (None: it has, or can allocate them)."""
    key = (device.type, device.index)
    if _FREE_SLOTS.get(key) or any(k[:2] == key for k in _COUNTER_SLOTS) or _add_counter_chunk(device):
        return None
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "its counters are allocated outside CUDA-graph capture: call it once before capturing"
    return "its counters need the CUDA driver's cuMemAlloc (libcuda), which is not available here"


def tile_counters(device: torch.device) -> torch.Tensor:
    """The zeroed slot of COUNTER_SLOT int32 counters of the current stream of `device` (xa_mode "fused")."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    slot = _COUNTER_SLOTS.get(key)
    if slot is None:
        free = _FREE_SLOTS.get(key[:2])
        if not free and not _add_counter_chunk(device):
            raise RuntimeError(
                f"nf4_gemv xa_mode='fused': no free counter slot for a new stream of {device} during CUDA-graph "
                f"capture ({len(_COUNTER_SLOTS)} streams hold one); call it once on this stream before capturing, "
                "or use xa_mode='shrink'")
        slot = _COUNTER_SLOTS[key] = _FREE_SLOTS[key[:2]].pop()
    return slot


def fused_xa_unsupported(engine: str, lora_A, rank: int, dropout_p: float) -> str | None:
    """Why xa_mode "fused" cannot run for this one-row engine and call (None: it can)."""
    if dropout_p > 0.0:
        return "it has no dropout (the shrink draws the mask)"
    if engine == "wide":
        if rank > 16 * WIDE_XA_MAX_TILES:
            return f"the 'wide' engine's fused xa takes rank <= {16 * WIDE_XA_MAX_TILES}, got {rank}"
        if lora_A.stride(1) != 1 or (lora_A.stride(0) * lora_A.element_size()) % 16 or lora_A.data_ptr() % 16:
            return "the 'wide' engine reads lora_A 16 bytes at a time: it must be contiguous along K, 16-byte aligned"
    return None


class _RowPlan:
    """`nf4_gemv` with engine "fma", "lanes" or "wide" (one row) for one call signature: with xa_mode "shrink",
    xa's split shrink (lora_shrink_partials) and the row kernel, launched with PDL where the GPU has it; with
    "fused", the row kernel alone."""

    def __init__(self, x, w4, bias, lora_A, lora_B, dropout_p, store_xa, decode, splits, engine, xa_mode):
        check_flag(store_xa, "store_xa")
        if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
            raise ValueError(f"splits must be None (automatic) or an int >= 1, got {splits!r}")
        M, K, N, rank = check_nf4_operands(w4, lora_A, lora_B, x=x, bias=bias)
        if M != 1:
            raise ValueError(f"nf4_gemv with engine={engine!r} takes one row, got M={M}")
        _, meta = nf4_kernel_args(w4)  # checks the weight's layout
        decode = nf4_decode(decode, x.device)
        if engine in ("lanes", "wide"):
            why_not = (lanes_unsupported(x, w4, 4 if engine == "lanes" else 16)
                       or (None if decode == "prmt" else "it decodes with 'prmt' only"))
            if why_not:
                raise ValueError(f"nf4_gemv engine={engine!r} cannot run here: {why_not}")
        if engine == "auto":  # "wide" where it can run (measured the faster, bench/NOTES.md), else "fma"
            engine = "wide" if decode == "prmt" and lanes_unsupported(x, w4, 16) is None else "fma"
        why_not = fused_xa_unsupported(engine, lora_A, rank, dropout_p)
        if xa_mode == "fused" and why_not:
            raise ValueError(f"nf4_gemv xa_mode='fused' cannot run here: {why_not}")
        self.engine = engine
        self.N, self.rank, self.store_xa, self.dropout_p = N, rank, store_xa, dropout_p
        self.xa_splits = ROW_XA_SPLITS
        self.fused, self.pdl, self.launch = xa_mode == "fused", False, None
        if N == 0:
            return
        block_r = next_pow2_rank(rank)
        xa_k = max(16, min(128, 4096 // block_r))  # row_xa_partial's step: [block_r, xa_k] products
        slots = ("X", "QW", "ABSMAX", "ABS_CODE", "ABS_SCALE", "CODE", "PART", "COUNT", "XA_PART", "A", "B", "BIAS",
                 "Y", "XA", "abs_offset", "scaling")
        if self.engine == "wide":  # 32 rows per program; its warps split the program's K range among them
            cfg = nf4_config("gemv_wide", M, x.dtype)
            stages = max(1, min(2, cfg.num_stages))
            ranges = (splits or WIDE_SPLITS) * cfg.num_warps
            bytes_per_split = cdiv(cdiv(K // 2, ranges), 64) * 64  # per warp
            splits = cdiv(K // 2, bytes_per_split * cfg.num_warps)
            block_n, kernel = 32, _nf4_gemv_wide_kernel
            extra = dict(STEP_ASM=_WIDE_ASM[x.dtype], STEP_CONSTRAINTS=_WIDE_CONSTRAINTS, WARPS=cfg.num_warps,
                         XA_ASM=_WIDE_XA_ASM[x.dtype], STAGES=stages, num_warps=cfg.num_warps, num_stages=1)
        else:
            if self.engine == "lanes":
                cfg = nf4_config("gemv_lanes", M, x.dtype)
                block_n, block_k, kernel = 16 * cfg.num_warps, NF4_BLOCK, _nf4_gemv_lanes_kernel
                extra = dict(MMA_ASM=_LANES_ASM[x.dtype], WARPS=cfg.num_warps, XA_K=xa_k,
                             num_warps=cfg.num_warps, num_stages=1)
            else:
                cfg = nf4_config("gemv_rows", M, x.dtype)
                block_n, block_k, kernel = cfg.block_n, cfg.block_k, _nf4_gemv_row_kernel
                extra = dict(DECODE=decode, BLOCK_N=block_n, BLOCK_K=block_k, XA_K=xa_k, STAGES=cfg.num_stages,
                             num_warps=cfg.num_warps, num_stages=1)
            steps = cdiv(K, block_k)
            splits = min(splits or ROW_SPLITS, steps, MAX_ROW_SPLITS)
            k_per_split = cdiv(steps, splits) * block_k
            splits = cdiv(K, k_per_split)
            bytes_per_split = k_per_split // 2
        self.tiles = cdiv(N, block_n)
        if self.tiles > COUNTER_SLOT:
            why_not = why_not or f"it takes at most {COUNTER_SLOT} output tiles, got {self.tiles}"
        if xa_mode == "fused":
            why_not = why_not or counters_unavailable(x.device)
            if why_not:
                raise ValueError(f"nf4_gemv xa_mode='fused' cannot run here: {why_not}")
        if xa_mode == "auto" and why_not is None and engine == "wide":
            # the counters are looked up (allocated on first use) only where "auto" would take fused
            self.fused = (self.tiles * splits <= WIDE_FUSED_CTAS_PER_SM * num_sms(x.device)
                          and bytes_per_split <= 64 * WIDE_FUSED_MAX_SPANS
                          and counters_unavailable(x.device) is None)
        self.pdl = pdl_enabled(x.device) and not self.fused  # fused: no kernel before it to overlap
        xa_ranges = shrink_splits(M, K, x.dtype, self.xa_splits)[0]
        tail = dict(HAS_BIAS=bias is not None, STORE_XA=store_xa, PDL=self.pdl, BLOCK_R=block_r,
                    XA_SPLITS_P2=triton.next_power_of_2(xa_ranges), ACC=acc_dtype(x.dtype), FUSED_XA=self.fused,
                    **meta, **({"launch_pdl": True} if self.pdl else {}))
        self.part_shape = (splits, N)
        part_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.xa_part_shape, self.xa_part_dtype = (self.tiles, splits, block_r), part_dtype
        tail["SPLITS_P2"] = triton.next_power_of_2(splits)
        # the fma kernel takes x's column stride; the PTX engines read x contiguous
        strides = (x.stride(1), w4.qweight.stride(0)) if self.engine == "fma" else (w4.qweight.stride(0),)
        self.launch = Launch(
            kernel, (self.tiles, splits), slots, *([None] * 14), N, K, rank, xa_ranges, bytes_per_split, *strides,
            None, lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), 1, 1, None, **extra,
            **tail)

    def __call__(self, x, w4, bias, lora_A, lora_B, scaling, seed):
        y = torch.empty((1, self.N), device=x.device, dtype=x.dtype)
        xa = torch.empty((1, self.rank), device=x.device, dtype=x.dtype) if self.store_xa else None
        if self.launch is None:
            return y, xa
        if self.fused:
            count = tile_counters(x.device)
            xa_part = torch.empty(self.xa_part_shape, device=x.device, dtype=self.xa_part_dtype)
        else:
            count = torch.empty(self.tiles, device=x.device, dtype=torch.int32)  # zeroed by the shrink
            xa_part = lora_shrink_partials(x, lora_A, self.xa_splits, self.dropout_p, seed, trigger=self.pdl,
                                           zero=count)
        qw, absmax, abs_code, abs_scale, abs_offset, code = nf4_call_args(w4)
        part = torch.empty(self.part_shape, device=x.device, dtype=torch.float32)
        self.launch(x, qw, absmax, abs_code, abs_scale, code, part, count, xa_part, lora_A, lora_B,
                    bias if bias is not None else y, y, xa if xa is not None else y, abs_offset, float(scaling))
        return y, xa
