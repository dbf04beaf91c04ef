"""Device helpers shared by every lora-fast kernel.

Nothing here launches anything: these are `@triton.jit` building blocks (the dot wrapper, the Philox dropout
mask, the grouped tile order) and a few host-side facts about the running Triton.
"""
import math
import numbers
import os

import torch
import triton
import triton.language as tl

# Triton's interpreter (TRITON_INTERPRET=1) computes bf16 arithmetic on the raw 16-bit storage and returns
# garbage (seen with triton 3.9 and numpy 2.4), while loads, stores and casts are exact. Kernels therefore do
# elementwise math in fp32 and call `dot`, which upcasts its operands when interpreting.
INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def is_interpret() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return bool(INTERPRET)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for fp32 operands: follow torch's own matmul setting, so results match nn.Linear's."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def dot_precision_key(t) -> bool:
    """What `dot_precision(t.dtype)` depends on besides the dtype, for a launch plan's key (kernels/launch.py):
    torch's TF32 switch, which may change between calls, matters for fp32 only."""
    return getattr(t, "dtype", None) is torch.float32 and torch.backends.cuda.matmul.allow_tf32


try:  # host-side tensor descriptors (Triton >= 3.3): TMA loads on Hopper, zero-filled out of range
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None


def tma_enabled(mode, *tensors) -> bool:
    """Whether to load `tensors` (2-D) through tensor descriptors: mode True/False forces it (if possible);
    "auto" uses them on Hopper and newer GPUs. TMA needs a unit last stride, 16-byte aligned rows and base."""
    if mode is False or TensorDescriptor is None:
        return False
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False
    if mode is True:
        return True
    t = tensors[0]
    if not t.is_cuda:
        return False
    from .config import capability_major  # config imports this module

    return capability_major(t.device) >= 9


# Programmatic dependent launch (PDL, Hopper and newer): a kernel launched with `launch_pdl=True` may start while
# the kernel before it in the stream is still running, once every program of that one has called
# `gdc_launch_dependents` (or exited); it must call `gdc_wait` before it reads what that kernel writes. lora-fast
# pairs a small producer (the rank-r shrink) with the GEMM that consumes its output in the epilogue: the GEMM
# streams W while the shrink runs. LORA_FAST_PDL=0 turns it off (both kernels then run one after the other).
PDL_ENV = os.environ.get("LORA_FAST_PDL", "1") != "0"


def _triton_has_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        import triton.language.extra.cuda as _cuda_extra
    except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend
        return False
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return "launch_pdl" in fields and hasattr(_cuda_extra, "gdc_wait")


TRITON_HAS_PDL = _triton_has_pdl()


def pdl_enabled(device) -> bool:
    """Whether a producer/consumer kernel pair on `device` launches the consumer with PDL: a CUDA device of compute
    capability 9 or more, a Triton that knows `launch_pdl` and `gdc_wait`, not the interpreter, and LORA_FAST_PDL
    not 0. Off, the same kernels run in stream order, with the same results."""
    if not (PDL_ENV and TRITON_HAS_PDL) or is_interpret() or torch.device(device).type != "cuda":
        return False
    from .config import capability_major  # config imports this module

    return capability_major(torch.device(device)) >= 9


@triton.jit
def gdc_launch_dependents_if(ENABLED: tl.constexpr):
    """A PDL producer's signal that the next kernel may start (no-op unless ENABLED)."""
    if ENABLED:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def gdc_wait_if(ENABLED: tl.constexpr):
    """A PDL consumer's wait until the kernel before it has finished and its writes are visible (no-op unless
    ENABLED)."""
    if ENABLED:
        tl.extra.cuda.gdc_wait()


_TYPESTR = {torch.int32: "<i4", torch.float32: "<f4", torch.int64: "<i8", torch.uint8: "|u1"}
_DRIVER_TENSORS: list = []  # every driver allocation made (never freed: graphs keep the addresses they captured)


class _DriverBuffer:
    """A device allocation seen by torch through __cuda_array_interface__ (torch does not own it)."""

    def __init__(self, ptr: int, shape: tuple, dtype: torch.dtype):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": _TYPESTR[dtype], "data": (ptr, False),
                                         "version": 3, "strides": None}


def driver_copy(src: torch.Tensor, device) -> torch.Tensor | None:
    """A copy of the CPU tensor `src` (int32, fp32, int64 or uint8) on the CUDA `device`, in memory from the driver
    (cuMemAlloc): owned by no allocator pool, never freed. For the device constants and counters that lora-fast
    caches across calls: torch.compile's CUDA-graph trees route every allocation of the thread to their pool while
    they warm up, and may roll that pool back to a checkpoint (or report the tensor as an untracked live
    allocation), so a cache filled there from the caching allocator breaks. None where it cannot be done now
    (no CUDA device, ROCm, no libcuda, a stream capture under way, the allocation failed); the copy is read back
    and compared once."""
    import ctypes

    device = torch.device(device)
    if (device.type != "cuda" or torch.version.hip is not None or src.dtype not in _TYPESTR
            or torch.cuda.is_current_stream_capturing()):
        return None
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    src = src.contiguous()
    torch.cuda.synchronize(device)  # the device's primary context current on this thread; earlier work done
    ptr = ctypes.c_uint64(0)
    with torch.cuda.device(device):
        if libcuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(max(1, src.numel() * src.element_size()))):
            return None
        out = torch.as_tensor(_DriverBuffer(ptr.value, src.shape, src.dtype), device=device)
        out.copy_(src)
    torch.cuda.synchronize(device)  # written before any stream reads it
    _DRIVER_TENSORS.append(out)
    return out if torch.equal(out.cpu(), src) else None


def cached_device_tensor(src: torch.Tensor, device) -> torch.Tensor:
    """`src` on `device` for a cache kept across calls: driver memory on CUDA where it can (driver_copy), else
    `src.to(device)`."""
    out = driver_copy(src, device)
    return out if out is not None else src.to(device)


def tensor_descriptor(t, block_shape):
    """Host tensor descriptor of 2-D `t` with the given block shape."""
    return TensorDescriptor.from_tensor(t, list(block_shape))


def matrix_shape(t, name: str):
    """(rows, cols) of a launcher's 2-D tensor argument `name`, else TypeError / ValueError naming it (unpacking a
    1-D or 3-D tensor's shape would fail without saying which argument)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got shape {list(t.shape)}")
    return t.shape


def check_shapes(**named) -> None:
    """Launcher guard: each keyword maps a tensor (or None) to its expected shape, with one dtype and device.

    The public API (`lora_fast.lora_linear`) validates fully with named errors; this keeps a direct launcher call
    from ever reading out of bounds.
    """
    ref = None
    for name, (t, shape) in named.items():
        if t is None:
            continue
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if ref is None:
            ref = (name, t)
        elif t.dtype != ref[1].dtype or t.device != ref[1].device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but {ref[0]} is {ref[1].dtype} on {ref[1].device}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_dtype(dtype, name: str = "dtype", allowed=FLOAT_DTYPES, none_ok: bool = True):
    """`dtype` is one of `allowed` (a torch.dtype; None too when `none_ok`): a string or an integer dtype is refused."""
    if dtype is None and none_ok:
        return None
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must be a torch.dtype, one of {names}{' (or None)' if none_ok else ''}, got {dtype!r}")
    return dtype


def check_flag(value, name: str) -> bool:
    """A True/False option: a string such as "false" would otherwise count as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_scaling(scaling, name: str = "scaling") -> float:
    """A finite real number (not a bool) as a float, else TypeError / ValueError naming `name`. Shared by the
    launchers and the public API (lora_fast.validation)."""
    if type(scaling) is not float:
        if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
            raise TypeError(f"{name} must be a Python float or int, got {type(scaling).__name__}")
    # Comparisons, not math.isfinite: torch 2.11's dynamo may lift a module's float into a SymFloat (seen under
    # checkpoint of a compiled module), where math.isfinite is a graph break but a comparison traces. NaN fails both.
    if not -math.inf < scaling < math.inf:
        raise ValueError(f"{name} must be finite, got {scaling}")
    return scaling if isinstance(scaling, float) else float(scaling)


def check_dropout_p(dropout_p, name: str = "dropout_p") -> float:
    """A real number in [0, 1) as a float, else TypeError / ValueError naming `name`."""
    if type(dropout_p) is not float:
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
            raise TypeError(f"{name} must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1), got {dropout_p}")
    return dropout_p if isinstance(dropout_p, float) else float(dropout_p)


def check_dropout(dropout_p, seed, like=None) -> None:
    """Launcher guard for the dropout arguments: `dropout_p` in [0, 1) (check_dropout_p) and `seed`, the Philox
    key of the mask (unused without dropout): an int in [0, 2**63) (lora_fast draws them in [0, 2**62)), or a
    one-element int64 tensor on the device of `like` (a tensor or a device), which the kernels read through a
    pointer: a seed drawn on the GPU, which a CUDA graph replay draws afresh. Its value is not read here (that
    would sync): any int64 is a valid key, a negative one taken as its two's complement.
    Every launcher call runs it: a float and an int take the fast path (the ABC checks cost ~1.5 µs)."""
    check_dropout_p(dropout_p)
    if type(seed) is not int:
        if isinstance(seed, torch.Tensor):
            if seed.dtype != torch.int64 or seed.numel() != 1:
                raise TypeError(f"seed must be an int or a one-element int64 tensor, got a {seed.dtype} tensor of "
                                f"shape {tuple(seed.shape)}")
            device = torch.device(getattr(like, "device", like)) if like is not None else seed.device
            if seed.device.type != device.type or device.index not in (None, seed.device.index):  # "cuda" ~ cuda:0
                raise ValueError(f"seed tensor must be on {device} (the operands' device), got {seed.device}")
            return
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int (the dropout mask's Philox key), got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def seed_arg(seed):
    """What a kernel's `seed` parameter receives: the int, or the seed tensor itself (read by `load_seed`)."""
    return seed if isinstance(seed, torch.Tensor) else int(seed)


def check_vector(name, v, length, like) -> None:
    """Launcher guard for an optional per-row/per-column scale vector: None, or 1-D [length], contiguous, float,
    on `like`'s device (its dtype may differ: kernels load it and upcast)."""
    if v is None:
        return
    if v.dim() != 1 or v.shape[0] != length or v.stride(0) != 1:
        raise ValueError(f"{name} must be a contiguous [{length}] vector, got shape {list(v.shape)}")
    if not v.is_floating_point() or v.device != like.device:
        raise ValueError(f"{name} must be a float tensor on {like.device}, got {v.dtype} on {v.device}")


def acc_dtype(dtype: torch.dtype):
    """Accumulator dtype of the kernels for operands of `dtype`: fp64 for fp64, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, in plain Python: launchers call it often, and `triton.cdiv` is a constexpr_function
    whose call costs a few microseconds of host time each (bench/NOTES.md, host overhead)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as `triton.next_power_of_2`, in plain Python (see `cdiv`)."""
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0


def next_pow2_rank(r: int) -> int:
    """Padded rank used as a constexpr block size: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(r))


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in fp32 (fp64 for fp64 operands).

    a: [BM, BK], b: [BK, BN] in the operands' dtype; acc: [BM, BN].
    PRECISION: "ieee" or "tf32", used for fp32 operands only.
    """
    if INTERPRET:
        if a.dtype == tl.float64:
            return tl.dot(a, b, acc)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def adapter_slot(adapter, ranks_ptr, scalings_ptr, ACC: tl.constexpr):
    """A multi-LoRA adapter id's (slot clamped to >= 0 for addressing, true rank (0 for -1, base only), scaling in
    ACC) from the pool's ranks int32 [S] and scalings fp32 [S]; adapter: a scalar or a tensor of ids."""
    safe = tl.maximum(adapter, 0)
    rank = tl.where(adapter >= 0, tl.load(ranks_ptr + safe), 0)
    return safe, rank, tl.load(scalings_ptr + safe).to(ACC)


@triton.jit
def rank_bound(rank, R_ALIGNED: tl.constexpr):
    """How far to load an adapter's rank rows (of B, or of the xa workspace) when it has `rank` of them: the
    exact mask `r < rank` varies element by element, so a load under it is split into single elements; rounding
    the rank up to a multiple of 8 keeps 16-byte vectors along the rank. R_ALIGNED: the pool's rank R and the
    workspace width are multiples of 8, so those rows exist. The caller zeroes the rows past the true rank with
    the exact mask (they may hold anything, and 0 * inf is nan). rank: a scalar or a tensor."""
    if R_ALIGNED:
        return tl.multiple_of((rank + 7) // 8 * 8, 8)
    else:
        return rank


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n) in groups of GROUP_M row-tiles, so that programs running
    together share both their X rows and their W columns in L2 (Triton tutorial 03)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def output_tile(ROWS, COLS, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP_M: tl.constexpr, tile):
    """Tile number `tile` of a [ROWS, COLS] output in grouped order: (pid_row, pid_col, row offsets
    [BLOCK_ROWS], column offsets [BLOCK_COLS]), the offsets in int64 so that addresses never overflow."""
    pid_row, pid_col = grouped_tile(tile, tl.cdiv(ROWS, BLOCK_ROWS), tl.cdiv(COLS, BLOCK_COLS), GROUP_M)
    offs_row = pid_row.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_col = pid_col.to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return pid_row, pid_col, offs_row, offs_col


@triton.jit
def walk_tile(ROWS, COLS, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP_M: tl.constexpr, tile,
              TILE_MAP: tl.constexpr):
    """`output_tile` for a persistent walk with producer tiles (lora_fwd's PRODUCER_XA, lora_bwd's PRODUCER_DYB).
    TILE_MAP 0: tile number `tile` in grouped order over all of the output; 1: the first column tile of row block
    `tile` (a producer); 2: tile number `tile` in grouped order over the column tiles after the first."""
    if TILE_MAP == 1:
        pid_row = tile
        pid_col = 0
        offs_row = pid_row.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        offs_col = tl.arange(0, BLOCK_COLS).to(tl.int64)
    elif TILE_MAP == 2:
        pid_row, pid_col, offs_row, offs_col = output_tile(ROWS, COLS - BLOCK_COLS, BLOCK_ROWS, BLOCK_COLS, GROUP_M,
                                                           tile)
        pid_col += 1
        offs_col += BLOCK_COLS
    else:
        pid_row, pid_col, offs_row, offs_col = output_tile(ROWS, COLS, BLOCK_ROWS, BLOCK_COLS, GROUP_M, tile)
    return pid_row, pid_col, offs_row, offs_col


@triton.jit
def load_seed(seed):
    """The dropout seed's value: `seed` itself (an int argument), or the int64 it points to (a seed tensor drawn on
    the device, helpers.check_dropout). Decided when the kernel compiles: Triton specializes the argument's type."""
    if seed.dtype.is_ptr():  # one branch is compiled; both assign (Triton 3.6 refuses two return types)
        value = tl.load(seed)
    else:
        value = seed
    return value


@triton.jit
def dropout_keep(seed, offs_m, k0, K8, keep_thr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Boolean keep-mask of the tile rows `offs_m` [BLOCK_M] x columns `k0 + arange(BLOCK_K)`.

    Philox-4x32-10 keyed by `seed` (an int, or a pointer to one: `load_seed`) at counter `m * K8 + k // 8`
    (K8 = ceil(K / 8)) gives four 32-bit words for eight neighbouring columns: column k takes the low (k even) or
    high (k odd) 16 bits of word (k % 8) // 2 and is kept iff that half is >= `keep_thr` = ceil(p * 2**16)
    (dropout_threshold). So the drop probability is p rounded up to a multiple of 2**-16 (within 1.6e-5 of p;
    FlashAttention's dropout rounds to 2**-8), and one Philox call serves eight elements: half the cost of a 32-bit
    word per element. `k0` must be a multiple of 8 (every BLOCK_K is). lora_fast.philox reproduces the mask in numpy.
    """
    tl.static_assert(BLOCK_K % 8 == 0)
    seed = load_seed(seed)
    cols8 = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    counter = offs_m.to(tl.int64)[:, None] * K8 + cols8[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # join(join(r0, r2), join(r1, r3))[c, t, u] = r_{2t+u}; joining its low and high halves adds the last index h:
    # flattening [c, t, u, h] puts half h of word 2t + u at column 8c + 4t + 2u + h, i.e. word (k % 8) // 2.
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    halves = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (BLOCK_M, BLOCK_K))
    return halves.to(tl.int32, bitcast=True) >= keep_thr


@triton.jit
def upcast(x):
    """x in its accumulation dtype: fp64 stays fp64, everything else goes to fp32."""
    if x.dtype == tl.float64:
        return x
    return x.to(tl.float32)


@triton.jit
def apply_dropout(x, keep, inv_keep):
    """drop(x) = x * keep / (1 - p), computed in fp32 (fp64 for fp64) and returned in x's dtype."""
    return tl.where(keep, upcast(x) * inv_keep, 0.0).to(x.dtype)


def dropout_threshold(p: float) -> int:
    """`keep_thr` for `dropout_keep`: ceil(p * 2**16), at most 2**16 (nothing kept)."""
    import math

    return min(math.ceil(p * 2**16), 2**16)


# Row blocks published inside one launch. A persistent GEMM (lora_fwd, lora_bwd's dX) can compute its rank-r
# product itself: its first SHRINK_PROGS programs (those with one tile fewer to walk, when the tile count is not a
# multiple of the grid) compute XA for whole BLOCK_M row blocks, store it and publish each block through a flag; the
# tiles of a block wait for its flag before their epilogue reads XA. No second launch, and the shrink runs in the
# last wave's idle time. Every program of the grid must be resident at once (the grid is at most one program per
# SM), and the flags must be zero at launch. Under the interpreter, programs run one after the other in id order:
# there one program (id 0) shrinks every block before any tile waits.
@triton.jit
def shrink_row_block(X, F, OUT, FLAGS, mb, M, K, RANK,
                     stride_xm, stride_xk, stride_fr, stride_fk, stride_om, stride_or,
                     USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                     PRECISION: tl.constexpr, ACC: tl.constexpr, STAGES: tl.constexpr,
                     DROPOUT: tl.constexpr, seed, keep_thr, inv_keep, K8):
    """OUT[rows, :RANK] = drop(X)[rows, :] @ F[:RANK, :]^T for the rows of block `mb` (BLOCK_M of them), stored in
    OUT's dtype; then FLAGS[mb] = 1 with release semantics, once every thread of the program has stored.
    drop: with DROPOUT, the mask of dropout_keep(seed, ..., K8, keep_thr) scaled by inv_keep; else the identity.

    X: [M, K] (a tensor descriptor with block [BLOCK_M, BLOCK_K] when USE_TMA, else a pointer with its strides),
    F: [RANK, K] with strides (stride_fr, stride_fk), OUT: [M, RANK]; BLOCK_R >= RANK (one rank block), FLAGS: int32.
    STAGES: software-pipeline depth of the K loop (its X tiles share the GEMM's shared memory, unused meanwhile).
    """
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64) + mb * BLOCK_M
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < RANK
    f_ptrs = F + offs_r[None, :] * stride_fr + offs_k[:, None] * stride_fk
    if not USE_TMA:
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        mask_k = offs_k < K - k0
        if USE_TMA:
            x = X.load([mb * BLOCK_M, k0])
        else:
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            x_ptrs += BLOCK_K * stride_xk
        if DROPOUT:
            x = apply_dropout(x, dropout_keep(seed, offs_m, k0, K8, keep_thr, BLOCK_M, BLOCK_K), inv_keep)
        f = tl.load(f_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = dot(x, f, acc, PRECISION)
        f_ptrs += BLOCK_K * stride_fk
    tl.store(OUT + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or, acc.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_r[None, :])
    publish_row_block(FLAGS, mb)


@triton.jit
def publish_row_block(FLAGS, mb):
    """FLAGS[mb] = 1 once every thread of the program has stored its part of row block `mb` (bar.sync, then a
    gpu-scope release exchange): wait_row_block's acquire then sees those stores."""
    tl.debug_barrier()
    tl.atomic_xchg(FLAGS + mb, 1, sem="release", scope="gpu")


@triton.jit
def wait_row_block(FLAGS, mb):
    """Spin until row block `mb` is published (shrink_row_block); its data must then be loaded with
    cache_modifier=".cg" (from L2: this SM's L1 may hold a line shared with a block read before it was written)."""
    while tl.atomic_add(FLAGS + mb, 0, sem="acquire", scope="gpu") == 0:
        pass
    tl.debug_barrier()


@triton.jit
def persistent_start(INLINE: tl.constexpr, X, F, OUT, FLAGS, M, K, RANK,
                     stride_xm, stride_xk, stride_fr, stride_fk, stride_om, stride_or, SHRINK_PROGS,
                     USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, SHRINK_STAGES: tl.constexpr,
                     DROPOUT: tl.constexpr, seed, keep_thr, inv_keep, K8):
    """The persistent walk's first tile for this program: its id, or (INLINE) its position after its share of the
    row blocks (shrink_row_block, with DROPOUT's mask on X): programs 0 .. SHRINK_PROGS - 1 take blocks pid,
    pid + SHRINK_PROGS, ... and then walk the tiles of the last SHRINK_PROGS positions (those with a tile fewer);
    the others walk positions 0 .. programs - SHRINK_PROGS - 1."""
    pid = tl.program_id(0)
    first = pid
    if INLINE:  # (a static branch; no early return, which Triton 3.6 refuses there)
        first = pid - SHRINK_PROGS
        if pid < SHRINK_PROGS:
            for mb in range(pid, tl.cdiv(M, BLOCK_M), SHRINK_PROGS):
                shrink_row_block(X, F, OUT, FLAGS, mb, M, K, RANK, stride_xm, stride_xk, stride_fr, stride_fk,
                                 stride_om, stride_or, USE_TMA, BLOCK_M, BLOCK_K, BLOCK_R, PRECISION, ACC,
                                 SHRINK_STAGES, DROPOUT, seed, keep_thr, inv_keep, K8)
            first = pid + tl.num_programs(0) - SHRINK_PROGS
    return first


def inline_shrink_grid(tiles: int, row_blocks: int, programs: int, ahead: int = 2) -> tuple[int, int]:
    """(grid, SHRINK_PROGS) of a persistent GEMM with its shrink inside (shrink_row_block): at most `programs` (one
    per SM); with fewer tiles than that, one more program per row block. The shrinking programs are the ones with a
    tile fewer to walk (the last wave's idle positions), but at least 1 / `ahead` as many as row blocks, so that
    none shrinks more than `ahead` blocks before its own tiles. Under the interpreter one program shrinks
    everything (the interpreter runs programs in id order, and no other program may wait on an unwritten block)."""
    grid = min(programs, tiles + row_blocks)
    if is_interpret():
        return grid, 1
    idle = (-tiles) % grid
    return grid, max(1, min(row_blocks, grid, max(idle, cdiv(row_blocks, ahead))))
