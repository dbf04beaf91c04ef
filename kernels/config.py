"""Block sizes for every single-adapter LoRA kernel, in one place.

Configs are looked up by shape class (not autotuned at run time): M changes with every batch in training and
serving, and an autotuner keyed on M would re-tune at each new sequence length. The table was picked by
sweeping candidates on the H100 (`bench/gpu_check.py --tune`; see bench/NOTES.md). Under the interpreter the
blocks are small so that tests stay fast and still cover several tiles and every mask.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from .helpers import is_interpret


@dataclass(frozen=True)
class GemmConfig:
    """Tile of a GEMM-shaped kernel: BLOCK_M x BLOCK_N outputs, BLOCK_K reduction step."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # load the GEMM operands through tensor descriptors where the GPU and strides allow
    # a grid of at most one program per SM, each walking output tiles in grouped order; fwd and dx only
    persistent: bool = False
    tma_store: bool = False  # with tma: store the output tile through a tensor descriptor too (fwd only)
    # persistent walks with the shrink inside ("inline"): the pipeline depth of the shrink's K loop (0: num_stages);
    # its tiles reuse the GEMM's shared memory, idle while the shrinking programs run it
    shrink_stages: int = 0

    def launch(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


# Overrides set by the tuning script: {(kernel, shape class): GemmConfig}.
_OVERRIDES: dict = {}


def set_override(kernel: str, shape_class: str, config: GemmConfig | None) -> None:
    """Force `config` for (kernel, shape_class); None removes the override. For tuning sweeps and tests.
    Cached configs and launch plans are dropped, so the next call of any launcher uses it."""
    from .launch import clear_plans

    if config is None:
        _OVERRIDES.pop((kernel, shape_class), None)
    else:
        _OVERRIDES[(kernel, shape_class)] = config
    gemm_config.cache_clear()
    shrink_config.cache_clear()
    nf4_config.cache_clear()
    clear_plans()


def shape_class(m: int) -> str:
    """Bucket of the row count: the tile shape depends on M far more than on N or K."""
    if m <= 16:
        return "m16"
    if m <= 64:
        return "m64"
    if m <= 256:
        return "m256"
    return "large"


_INTERPRET_CONFIG = GemmConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=1)

# bf16 / fp16 tables (H100). "fwd": Y tile over (M, N), reduce K. "dx": dX tile over (M, K), reduce N.
# H100 sweeps (bench/NOTES.md): at M=8192, K=N=4096 tensor descriptors took the forward from 1.17x to 1.11x the
# base linear and dX from 1.05x to 1.07x (1.16x to 1.07x at N=14336); at decode sizes the host-side
# descriptors cost more than they save, so only the large class uses them.
# At M=8192 the persistent forward with a descriptor store ran at 1.01x cuBLAS (plain GEMM) on the H200 against
# 1.12x for the one-tile-per-program kernel with its shrink (bench/exp_persistent.py, bench/NOTES.md).
_HALF = {
    "m16": GemmConfig(16, 32, 256, group_m=1, num_warps=4, num_stages=4),
    "m64": GemmConfig(32, 64, 128, group_m=1, num_warps=4, num_stages=4),
    "m256": GemmConfig(64, 32, 128, group_m=8, num_warps=4, num_stages=4),
    "large": GemmConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3, tma=True, persistent=True,
                        tma_store=True),
}
# The "split" forward (xa from a PDL-overlapped shrink, no rank block in the loop) at 17-64 rows: one row block of
# 64 and 128 programs at N=4096. H200, graphs, K=N=4096, r=16 (bench/results/exp_pdl_m64.json): M=32 1.18x and
# M=64 1.38x the base, against 1.44x / 1.68x with the "m64" tile below (64 programs at M=32).
# At 1-16 rows (with the bias and B's first chunk loaded before the K loop), with a bias on both sides:
# 16x32x128, 6 stages 1.07x / 1.01x at M = 1 / 16 against 1.14x / 1.07x for the "m16" tile (exp_pdl_m16_hoist.json).
_HALF_FWD_SPLIT = {"m16": GemmConfig(16, 32, 128, group_m=1, num_warps=4, num_stages=6),
                   "m64": GemmConfig(64, 32, 256, group_m=1, num_warps=4, num_stages=3)}
# 65 rows up to where the large tile fills the GPU (half precision, Hopper): the "m256" tile (pointer loads, 512
# programs of 64 x 32 at 256 x 4096) and the large class's 128 x 256 tile (64 tiles for 132 SMs at 512 rows) ran the
# forward at 1.9-2.0x the base at 256 and 512 rows, dX at 2.5x / 1.9x (bench/exp_mid_rows.py, H200, K = N = 4096,
# r = 16, graphs). `mid_tile` takes the first tile of its kernel's list whose grid has at least its share of the
# SMs in tiles (else the last): forward at 96-128 rows 64 x 64 (1.22-1.26x), at 256 64 x 128 (1.35x), at 512
# 128 x 128 (1.28x); dX 64 x 64 (1.10-1.20x), 64 x 128 (1.16x at 256, 1.31x at 512), 128 x 128 only from 1.5 waves of
# it (256 x 14336: 1.16x), where its one-tile-per-SM grids ran slower (1.41-1.48x at 512). The Unsloth-style addmm
# measured 1.48-1.75x in the same rounds (bench/NOTES.md, nineteenth session).
_HALF_MID = {
    "fwd": ((GemmConfig(128, 128, 64, group_m=8, num_warps=4, num_stages=4, tma=True), 0.7),
            (GemmConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=6, tma=True), 0.7),
            (GemmConfig(64, 64, 64, group_m=8, num_warps=4, num_stages=6, tma=True), 0.0)),
    "dx": ((GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3, tma=True), 1.5),
           (GemmConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=6, tma=True), 0.7),
           (GemmConfig(64, 64, 64, group_m=8, num_warps=4, num_stages=6, tma=True), 0.0)),
}
# The large tile is kept where its grid alone has MID_FILL of the SMs in tiles.
MID_FILL = 0.7
# A 6-stage 64 x 128 tile takes 144 KiB of shared memory (one program per SM); where its grid has more tiles than
# SMs it takes MID_SHARED_STAGES stages (96 KiB, two programs per SM): dX at 512 x 4096 1.31x with 4 stages
# against 1.48x with 6, at 256 x 4096 (128 tiles) 1.16x with 6 against 1.54x with 4.
MID_SHARED_STAGES = 4
# dX: persistent too (1.04-1.06x cuBLAS's dY @ W against 1.07-1.08x one tile per program at M=8192); with its
# rank-r epilogue 3 stages beat 4 (1.04-1.06x against 1.05-1.08x), though a plain GEMM of dX's layout preferred 4.
# dX is stored through a descriptor too: with pointers, the int64 addresses of the 128 x 256 tile spilled ~1 KB
# of registers per thread (ptxas for sm_90, Triton 3.6).
# Its inline shrink (dY @ B by the programs with a tile fewer, "inline") pipelines 4 deep: dX alone at 8192 x 4096 x
# 4096 was 1.07-1.08x cuBLAS with 4 or 5 stages against 1.17-1.20x with the GEMM's 3 in three H200 runs
# (bench/exp_inline_stages.py, results/exp_inline_stages_run*.json; smaller gains at N or K = 14336).
_HALF_DX_LARGE = replace(_HALF["large"], shrink_stages=4)
_FULL = {  # fp32 / fp64: twice the bytes per element, so half the K step
    "m16": GemmConfig(16, 32, 64, group_m=1, num_warps=4, num_stages=3),
    "m64": GemmConfig(64, 64, 32, group_m=1, num_warps=4, num_stages=3),
    "m256": GemmConfig(64, 128, 32, group_m=8, num_warps=4, num_stages=3),
    "large": GemmConfig(128, 128, 32, group_m=8, num_warps=8, num_stages=3, tma=True),
}


# dX with dropout: the epilogue's Philox mask and the separate rank-r accumulator on top of a 128 x 256 fp32
# tile spilled registers on the H100 (dX took 2.96 ms instead of 0.37 ms at M=8192, K=N=4096); half the tile fits.
_DX_DROPOUT_LARGE = GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3, tma=True)


# dX's dropout term as its own pass over dX (read, add, write), used with a precomputed dY @ B: memory-bound,
# 64 x 128 tiles of dX per program (see lora_bwd._DxPlan).
_DX_DROPOUT_TERM = GemmConfig(64, 128, 0, group_m=1, num_warps=4, num_stages=1)


def dx_dropout_term_config() -> GemmConfig:
    """Tile of the kernel adding s * drop'(dY B A) into dX: block_m rows x block_n columns of dX."""
    if ("dx_term", "large") in _OVERRIDES:
        return _OVERRIDES[("dx_term", "large")]
    return _INTERPRET_CONFIG if is_interpret() else _DX_DROPOUT_TERM


def _tiles(m: int, cols: int, cfg: GemmConfig) -> int:
    return -(-m // cfg.block_m) * -(-cols // cfg.block_n)


def mid_tile(kernel: str, m: int, dtype: torch.dtype, cols: int, sms: int) -> GemmConfig | None:
    """The tile of `_HALF_MID` that "fwd" / "fwd_split" / "dx" / "dx_dropout" take for m rows and `cols` output
    columns (N for the forward, K for dX) on a GPU of `sms` SMs, or None where the class table applies: below 65
    rows, outside half precision, without `sms` (0: not a Hopper GPU, where these tiles were not measured), under
    the interpreter or an override of the class, and where the large tile alone fills MID_FILL of the SMs."""
    cls = shape_class(m)
    base = "fwd" if kernel == "fwd_split" else kernel
    if (not sms or cls not in ("m256", "large") or dtype not in (torch.float16, torch.bfloat16) or is_interpret()
            or (base, cls) in _OVERRIDES or base not in ("fwd", "dx", "dx_dropout")):
        return None
    if cls == "large" and _tiles(m, cols, _HALF["large"]) >= MID_FILL * sms:
        return None
    for cfg, fill in _HALF_MID["fwd" if base == "fwd" else "dx"]:
        if _tiles(m, cols, cfg) >= fill * sms:
            break
    if cfg.num_stages > MID_SHARED_STAGES and (cfg.block_m, cfg.block_n) == (64, 128) and _tiles(m, cols, cfg) > sms:
        cfg = replace(cfg, num_stages=MID_SHARED_STAGES)
    return cfg


# The mid tiles' shared memory (a 6-stage 64 x 128 x 64 tile: 144 KiB, plus the epilogue's) asks for a GPU with at
# least this much per SM (the H100 / H200's 228 KiB; consumer Blackwell parts have ~100 KiB).
MID_MIN_SHARED = 200 * 1024


def fill_sms(device: torch.device) -> int:
    """The SM count `mid_tile` plans for: that of a CUDA device of compute capability 9 or more (TMA) with
    MID_MIN_SHARED bytes of shared memory per SM, else 0 (the class table applies)."""
    if device.type != "cuda" or is_interpret():
        return 0
    if capability_major(device) < 9 or shared_memory_per_sm(device) < MID_MIN_SHARED:
        return 0
    return num_sms(device)


@lru_cache(maxsize=None)
def gemm_config(kernel: str, m: int, dtype: torch.dtype, rank_block: int, cols: int = 0,
                sms: int = 0) -> GemmConfig:
    """Config of the GEMM-shaped kernels `kernel` in {"fwd", "fwd_split", "dx", "dx_dropout"} for M = m rows
    ("fwd_split": the forward in "split" mode; overrides of "fwd" apply to it).

    rank_block is the padded rank carried in registers alongside the tile (0 when the rank-r product is loaded
    precomputed); a wide one shrinks BLOCK_N so that the two accumulators fit the register file.
    cols and sms (`fill_sms`), where given, pick a tile that fills the GPU at 65 rows and more (`mid_tile`).
    """
    mid = mid_tile(kernel, m, dtype, cols, sms)
    if mid is not None:
        return mid
    split = kernel == "fwd_split"  # the forward with xa precomputed as partial sums ("split" mode)
    if split:
        kernel = "fwd"
    cls = shape_class(m)
    if (kernel, cls) in _OVERRIDES:  # before the interpreter's config, so that tests can force a config
        return _OVERRIDES[(kernel, cls)]
    if is_interpret():
        return _INTERPRET_CONFIG
    half = dtype in (torch.float16, torch.bfloat16)
    if split and half and cls in _HALF_FWD_SPLIT:
        return _HALF_FWD_SPLIT[cls]
    if kernel == "dx" and half and cls == "large":
        return _HALF_DX_LARGE if rank_block <= 64 else replace(_HALF_DX_LARGE, block_n=128)
    cfg = (_HALF if half else _FULL)[cls]
    if kernel == "dx_dropout" and cfg.block_m * cfg.block_n > 128 * 128:
        cfg = _DX_DROPOUT_LARGE
    if rank_block > 64 and cfg.block_m * cfg.block_n > 128 * 128:
        cfg = replace(cfg, block_n=128)
    return cfg


@lru_cache(maxsize=None)
def shrink_config(m: int, dtype: torch.dtype) -> GemmConfig:
    """Config of the shrink kernel `xa = drop(x) @ A^T`: block_n is unused (the rank block is the tile)."""
    if ("shrink", shape_class(m)) in _OVERRIDES:
        return _OVERRIDES[("shrink", shape_class(m))]
    if is_interpret():
        return _INTERPRET_CONFIG
    half = dtype in (torch.float16, torch.bfloat16)
    if m <= 64:
        return GemmConfig(16, 0, 256 if half else 128, num_warps=4, num_stages=3)
    if half:  # H200 sweep at M=8192, K=4096, r=16: 27.7 µs (61.7 with dropout) against 31.4 (87.6) for 64x128x3
        return GemmConfig(32, 0, 128, num_warps=4, num_stages=5)
    return GemmConfig(64, 0, 64, num_warps=4, num_stages=3)


@lru_cache(maxsize=None)
def reduce_m_config(p_rows: int, q_cols: int, dtype: torch.dtype) -> GemmConfig:
    """Config of the reduce-over-M kernel `out[P, Q] = s * U^T V` (dA and dB): block_m x block_n tiles of the
    [P, Q] output, block_k rows of M per step (M is the reduction axis here)."""
    if is_interpret():
        return _INTERPRET_CONFIG
    half = dtype in (torch.float16, torch.bfloat16)
    block_p = min(128, max(16, _pow2(p_rows)))
    block_q = min(128, max(16, _pow2(q_cols)))
    return GemmConfig(block_p, block_q, 64 if half else 32, num_warps=4, num_stages=3)


@lru_cache(maxsize=None)
def dora_config(kernel: str, dtype: torch.dtype) -> GemmConfig:
    """Configs of the DoRA helper kernels (kernels/dora.py), both bound by reading one operand once.
    "norm": block_m rows of W [N, K] per program (16: at N=4096 that is 256 programs for 132 SMs), block_k
    columns per step, block_n unused (the rank block is the MMA depth). "column_dot": block_n columns of [M, N],
    block_m rows per step; block_k unused. "magnitude": block_n columns per program; block_m x block_k the tiles
    of x in the (rare) recompute of z for zero magnitudes."""
    if is_interpret():
        return _INTERPRET_CONFIG
    half = dtype in (torch.float16, torch.bfloat16)
    # Tiles from bench/exp_dora_kernels.py at 8192 x 4096 x 4096 bf16 on the H200 (ninth session): norm [16, 512]
    # 21.7 µs against 25.9 for [16, 256]; column_dot [32, 256] 60.4 µs against 69.0 for [64, 128].
    if kernel == "norm":
        return GemmConfig(16, 0, 512 if half else 128, num_warps=4, num_stages=3)
    if kernel == "magnitude":
        return GemmConfig(64, 64, 64 if half else 32, num_warps=4, num_stages=2)
    return GemmConfig(32, 256, 0, num_warps=4, num_stages=1)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (4 for the interpreter), cached: the property query costs
    tens of µs of host time, paid on every launch otherwise."""
    if device.type != "cuda":
        return 4
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())[0]


@lru_cache(maxsize=None)
def _device_facts(index: int) -> tuple[int, int]:
    """(multiprocessor count, compute capability major) of CUDA device `index`."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major


def capability_major(device: torch.device) -> int:
    """Compute capability major of a CUDA `device` (9 for Hopper), cached."""
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())[1]


@lru_cache(maxsize=None)
def _shared_memory_per_sm(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_multiprocessor", 0))


def shared_memory_per_sm(device: torch.device) -> int:
    """Shared memory per multiprocessor of a CUDA `device` in bytes (228 KiB on the H100 / H200, ~100 KiB on
    consumer Blackwell), cached; 0 where torch does not report it."""
    return _shared_memory_per_sm(device.index if device.index is not None else torch.cuda.current_device())


# ---- NF4 (QLoRA) kernels: kernels/nf4_dequant.py, nf4_gemv.py, lora_nf4_fwd.py, lora_nf4_bwd.py ----
# Up to NF4_GEMV_ROWS rows the forward is a split-K GEMV over the 4-bit bytes (decode). Up to NF4_FUSED_ROWS
# rows the fused GEMM decodes W tile by tile in registers: it re-decodes each W tile once per BLOCK_M rows, so
# at large M the decode work (about 7 ALU ops and one L1 lookup per weight per row tile) outgrows the MMA work,
# and writing deq(W) once (a 4 + 16 bit per weight round trip) then running the bf16 LoRA kernels wins.
# Measured on the H200 (bench/results/qlora_gpu.json, bench/NOTES.md): the fused GEMM, with these untuned tiles,
# took 19-32x the bf16 base from 128 to 8192 rows against 1.2-6.5x for the dequant path, so it is off
# (NF4_FUSED_ROWS = NF4_GEMV_ROWS) until it is tuned; path="fused" still runs it.
NF4_GEMV_ROWS = 16
NF4_FUSED_ROWS = NF4_GEMV_ROWS
_NF4_INTERPRET = {"gemm": GemmConfig(16, 16, 64, group_m=2, num_warps=1, num_stages=1),
                  "gemv": GemmConfig(16, 16, 64, num_warps=1, num_stages=1),
                  "gemv_rows": GemmConfig(1, 16, 128, num_warps=1, num_stages=1),
                  "gemv_lanes": GemmConfig(1, 16, 64, num_warps=1, num_stages=1),  # (PTX: never interpreted)
                  "gemv_wide": GemmConfig(1, 32, 64, num_warps=1, num_stages=1),  # (PTX: never interpreted)
                  "dequant": GemmConfig(0, 16, 64, num_warps=1, num_stages=1)}
_NF4_GEMM = {  # bf16/fp16, by shape class; BLOCK_K a multiple of the 64-weight quantization block
    "m64": GemmConfig(32, 64, 128, group_m=1, num_warps=4, num_stages=4),
    "m256": GemmConfig(64, 64, 128, group_m=8, num_warps=4, num_stages=4),
    "large": GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3),
}


def nf4_path(m: int) -> str:
    """How the NF4 forward/dX runs for m rows: "gemv" (forward only, m <= NF4_GEMV_ROWS), "fused" (dequantize
    in registers) or "dequant" (write deq(W) once, then the bf16 LoRA kernels)."""
    if m <= NF4_GEMV_ROWS:
        return "gemv"
    return "fused" if m <= NF4_FUSED_ROWS else "dequant"


@lru_cache(maxsize=None)
def nf4_config(kernel: str, m: int, dtype: torch.dtype = torch.bfloat16) -> GemmConfig:
    """Config of the NF4 kernels: "gemm" (fused forward and dX, tile BLOCK_M x BLOCK_N, K step BLOCK_K),
    "gemv" (rows padded to block_m = 16, block_n outputs per program, split over K; it steps one 64-weight
    quantization block along K whatever block_k says), "gemv_rows" (the one-row GEMV: block_n outputs, K steps of
    block_k, a multiple of 64), "gemv_lanes" (its mma.sync sibling: num_warps warps of 16 rows), "gemv_wide"
    (mma.sync with 16-byte loads: 32 rows per program, num_warps warps splitting its K range; block_n and block_k
    unused), and
    "dequant" (block_n x block_k tiles of W; m is unused)."""
    if is_interpret():
        return _NF4_INTERPRET[kernel]
    if ("nf4_" + kernel, shape_class(m)) in _OVERRIDES:
        return _OVERRIDES[("nf4_" + kernel, shape_class(m))]
    if kernel == "gemv":
        return GemmConfig(16, 128, 64, num_warps=4, num_stages=3)
    if kernel == "gemv_wide":  # one row on mma.sync, 16-byte loads: 32 rows per program, its warps split K
        return GemmConfig(1, 32, 128, num_warps=1, num_stages=1)
    if kernel == "gemv_lanes":  # one row on mma.sync: 16 output rows per warp, one 64-weight block per K step
        return GemmConfig(1, 64, 64, num_warps=4, num_stages=1)
    if kernel == "gemv_rows":  # one row: block_n outputs x block_k weights per program and K step (H200 sweep,
        return GemmConfig(1, 16, 256, num_warps=1, num_stages=1)  # bench/NOTES.md)
    if kernel == "dequant":
        return GemmConfig(0, 32, 256, num_warps=4, num_stages=2)
    cls = "m64" if shape_class(m) in ("m16", "m64") else shape_class(m)
    cfg = _NF4_GEMM[cls]
    return cfg if dtype in (torch.float16, torch.bfloat16) else replace(cfg, block_k=64)
