"""Multi-tenant LoRA serving: one batch mixes tokens of many adapters.

Per token t with adapter slot `ids[t]` (-1: base only):
    Y[t] = X[t]·Wᵀ + b + s[ids[t]] · (X[t]·A[ids[t]]ᵀ) · B[ids[t]]ᵀ

Pieces:
- `AdapterPool`: name -> slot, load/unload of adapters (A, B, alpha, rank) into fixed buffers shared by every layer
  of a model; mixed ranks share one pool (each slot's true rank lives in a device tensor).
- `make_batch_metadata(ids, pool_or_slots)` -> `BatchMetadata`: built once per batch and reused by every layer.
  It sorts the tokens by adapter (sort order and segments, in fixed-size device buffers) and validates the ids.
- `MultiLoRALinear(base_linear, pool, key, slice_sizes)`: `forward(x, batch)`; several projections sharing X
  (q/k/v, gate/up) can live in one module and one launch (`slice_sizes`).
- `multi_lora_linear(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids)`: the functional form.

Validation and CUDA graphs: `make_batch_metadata(..., validate=True)` (the default) checks the ids on the host (one
sync) and raises `ValueError` naming `adapter_ids` for an id outside [-1, slots) or a slot with no adapter. The layer
call itself never syncs, so it can be captured in a CUDA graph: build the metadata once for a fixed T before the
capture, and before each replay refill its buffers in place with `meta.update_(new_ids)` (validates, outside the
graph), or capture `meta.update_(ids, validate=False)` itself inside the graph. With validation skipped, an invalid
id is computed as base only (-1): the kernels never read out of bounds whatever the ids hold.
Metadata built from a pool records the pool's `generation` (bumped by every load / unload, a host int): a call with
that pool's tensors raises `ValueError` for metadata older than the pool's last load / unload (its slots may hold
other tenants now); rebuild it, or `update_` it. Not checked while torch.compile traces.

Autograd: the Triton path is for inference; with x requiring grad (or under torch.compile) the call goes through
the `lora_fast::multi_lora_forward` op, which returns dx (the pool and the base weight are frozen: no gradients).

Example:
    pool = AdapterPool(max_adapters=64, max_rank=16, device="cuda", dtype=torch.bfloat16)
    layer = MultiLoRALinear(torch.nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16), pool, key="proj")
    pool.load("tenant-a", {"proj": (A, B)}, alpha=32)          # A [r, 4096], B [4096, r]
    meta = pool.batch_metadata(["tenant-a", None, "tenant-a"])   # one entry per token; None = base only
    y = layer(x, meta)                                           # x [3, 4096]
"""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .functional import _CASTABLE, autocast_dtype, autocast_inputs, eager_only, is_compiling, use_triton
from .validation import check_dtype, check_flag, check_rank, check_same, check_scaling, check_tensor


def _is_int(v) -> bool:
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


_INT_DTYPES = frozenset((torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64))


def _is_int_tensor(t: torch.Tensor) -> bool:
    return t.dtype in _INT_DTYPES or not (t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex())


def _check_host_or_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    """`t` is on `device`, or on the CPU (host values the call copies over); a meta tensor has no values to copy."""
    if t.device != device and t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device} but x is on {device}: pass it on x's device (or the CPU)")


def _check_slot_vector(name: str, t: torch.Tensor, S: int, device: torch.device) -> None:
    """A per-slot tensor (ranks, scalings): [S], on x's device or the CPU. O(1): its values are not read."""
    if t.shape != (S,):
        raise ValueError(f"{name}: must be [S={S}], got {tuple(t.shape)}")
    _check_host_or_device(name, t, device)


# ----------------------------------------------------------------------------------------------- batch metadata


@dataclass
class BatchMetadata:
    """Per-batch adapter layout, in fixed-size int32 device buffers (safe to reuse across CUDA-graph replays).

    adapter_ids [T]: the ids as used (an invalid id is -1 when validation was skipped);
    perm [T]: sorted position -> token, tokens sorted by adapter (stable);
    seg_of [T]: sorted position -> segment; seg_start [max_segs + 1]: first sorted position of each segment
    (unused segments start and end at T); seg_adapter [max_segs]: each segment's slot (-1: base only).
    num_slots: size of the pool the ids index. max_segs = min(T, num_slots + 1).
    pool, generation: the `AdapterPool` it was built from (None when built from a slot count) and that pool's
    `generation` then: a call with the pool's tensors raises ValueError if the pool has loaded or unloaded an
    adapter since (a slot the ids name may hold another tenant now); `update_` refreshes it.
    """

    adapter_ids: torch.Tensor
    perm: torch.Tensor
    seg_of: torch.Tensor
    seg_start: torch.Tensor
    seg_adapter: torch.Tensor
    num_slots: int
    ranks: torch.Tensor | None = None
    pool: "AdapterPool | None" = field(default=None, repr=False, compare=False)
    generation: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.adapter_ids.shape[0]

    @property
    def max_segs(self) -> int:
        return self.seg_adapter.shape[0]

    def update_(self, adapter_ids: torch.Tensor, validate: bool = True) -> "BatchMetadata":
        """Refill these buffers in place for a new adapter mix of the same T (for CUDA-graph replay). The new ids
        name the pool's current slots: metadata built from a pool is current again (its `generation` refreshed)."""
        fresh = make_batch_metadata(adapter_ids, self.num_slots, ranks=self.ranks, validate=validate)
        if fresh.num_tokens != self.num_tokens:
            raise ValueError(f"adapter_ids: update_ needs {self.num_tokens} tokens, got {fresh.num_tokens}")
        for name in ("adapter_ids", "perm", "seg_of", "seg_start", "seg_adapter"):
            getattr(self, name).copy_(getattr(fresh, name))
        if self.pool is not None:
            self.generation = self.pool.generation
        return self


def _token_ids(ids, lead: torch.Size, name: str) -> torch.Tensor:
    """One adapter id per token, flat [T], from raw ids for x of leading shape `lead`: ids of that shape (one per
    token), flat [T] ids (the tokens in x's row-major order), or, for x [B, L, ..., K], [B] ids (one per request,
    every token of request b takes ids[b], as PEFT's `adapter_names` per sample). Anything else raises ValueError
    naming `name` (a [1, T] or [L, B] tensor is a mistake, not a layout)."""
    T = math.prod(lead)
    if isinstance(ids, torch.Tensor):
        if ids.shape == lead or (ids.dim() == 1 and ids.shape[0] == T):
            return ids.reshape(-1)
        if len(lead) >= 2 and ids.dim() == 1 and ids.shape[0] == lead[0]:
            return ids[:, None].expand(lead[0], T // max(lead[0], 1)).reshape(-1)
    got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
    per_request = f", or [{lead[0]}] (one per request)" if len(lead) >= 2 else ""
    raise ValueError(f"{name}: adapter ids must be an integer tensor of x's leading shape {tuple(lead)} (one id per "
                     f"token), flat [{T}]{per_request}, got {got}")


def _check_metadata_current(meta: BatchMetadata, ranks) -> None:
    """Metadata built from an AdapterPool, used with that pool's tensors (`ranks` is the pool's own), must not
    predate a load / unload: its ids may name a slot that is now empty or holds another tenant. Host ints only (no
    sync: fine inside a CUDA-graph capture); skipped while torch.compile traces (a guard on the counter would
    recompile the graph after every load)."""
    pool = meta.pool
    if pool is None or ranks is not pool.ranks or is_compiling():
        return
    if meta.generation != pool.generation:
        raise ValueError(f"adapter_ids: this BatchMetadata was built before the AdapterPool last loaded or unloaded "
                         f"an adapter (pool generation {meta.generation}, now {pool.generation}), so its slot ids "
                         f"may name an empty slot or another tenant's adapter; rebuild it after changing the pool "
                         f"(pool.batch_metadata(names) or make_batch_metadata(ids, pool)), or refill it with "
                         f"meta.update_(ids)")


def validate_adapter_ids(adapter_ids: torch.Tensor, num_slots: int, ranks: torch.Tensor | None = None) -> None:
    """Raise ValueError naming `adapter_ids` if an id is outside [-1, num_slots) or points at an empty slot
    (`ranks[slot] == 0`). Syncs with the device once."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise ValueError(f"adapter_ids must be an integer tensor, got {type(adapter_ids).__name__}")
    if not _is_int_tensor(adapter_ids):
        raise ValueError(f"adapter_ids must be an integer tensor, got {adapter_ids.dtype}")
    if adapter_ids.device.type == "meta":
        raise ValueError("adapter_ids is on the meta device: the ids need values")
    num_slots = check_rank(num_slots, "num_slots")
    if ranks is not None:
        _check_ranks_tensor(ranks, num_slots)
    ids = adapter_ids.reshape(-1).to(torch.int64)
    out_of_range = (ids < -1) | (ids >= num_slots)
    if ranks is not None:
        empty = (ids >= 0) & ~out_of_range & (ranks.to(ids.device)[ids.clamp(0, max(num_slots - 1, 0))] == 0)
    else:
        empty = torch.zeros_like(out_of_range)
    bad = out_of_range | empty
    if ids.numel() and bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        value = int(ids[pos])
        if out_of_range[pos]:
            raise ValueError(f"adapter_ids[{pos}] = {value} is outside [-1, {num_slots}) (the pool has {num_slots} "
                             f"slots; -1 means base model only)")
        raise ValueError(f"adapter_ids[{pos}] = {value} points at an empty slot (no adapter loaded there)")


def make_batch_metadata(adapter_ids, pool_or_slots, *, ranks: torch.Tensor | None = None,
                        validate: bool = True) -> BatchMetadata:
    """Sort order and segments of one batch, built once and shared by every layer.

    adapter_ids: integer tensor [T] (any leading shape is flattened), -1 = base only, on the device of the model.
    pool_or_slots: an `AdapterPool` (its ranks are used to reject empty slots; the metadata records the pool's
    `generation`, and a layer of that pool refuses it after a later load / unload) or the number of slots (with
    `ranks`, the slots' true ranks, ids naming a rank-0 slot are rejected too).
    validate: check the ids (one host sync; raises ValueError). With False nothing syncs, so the call can be
    captured in a CUDA graph, and invalid ids are computed as base only.
    """
    pool = None
    if isinstance(pool_or_slots, AdapterPool):
        pool = pool_or_slots
        num_slots, ranks = pool.max_adapters, pool.ranks
    elif _is_int(pool_or_slots):
        num_slots = check_rank(pool_or_slots, "pool_or_slots")
    else:
        raise TypeError(f"pool_or_slots must be an AdapterPool or the number of slots (an int >= 1), "
                        f"got {type(pool_or_slots).__name__}")
    if not isinstance(adapter_ids, torch.Tensor):
        raise ValueError(f"adapter_ids must be an integer tensor, got {type(adapter_ids).__name__}")
    if not _is_int_tensor(adapter_ids):
        raise ValueError(f"adapter_ids must be an integer tensor, got {adapter_ids.dtype}")
    check_flag(validate, "validate")
    if ranks is not None:
        _check_ranks_tensor(ranks, num_slots)
    if validate:
        validate_adapter_ids(adapter_ids, num_slots, ranks)
    ids = adapter_ids.reshape(-1)
    # Invalid ids become -1 (no-op once validated; base only otherwise), in the ids' own integer type: an int64 id
    # such as 2**32 would wrap to a valid slot if it were cast to int32 first.
    ids = torch.where((ids >= -1) & (ids < num_slots), ids, -1).to(torch.int32)
    T = ids.shape[0]
    max_segs = max(1, min(T, num_slots + 1))
    device = ids.device
    sorted_ids, perm = torch.sort(ids, stable=True)
    is_start = torch.ones(T, dtype=torch.bool, device=device)
    is_start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    seg_of = torch.cumsum(is_start, 0, dtype=torch.int32) - 1
    # Scatter each segment's first position and adapter; positions that start nothing go to a spare last cell.
    target = torch.where(is_start, seg_of, max_segs + 1).to(torch.int64)
    seg_start = torch.full((max_segs + 2,), T, dtype=torch.int32, device=device)
    seg_start.scatter_(0, target, torch.arange(T, dtype=torch.int32, device=device))
    seg_adapter = torch.full((max_segs + 2,), -1, dtype=torch.int32, device=device)
    seg_adapter.scatter_(0, target, sorted_ids)
    return BatchMetadata(ids, perm.to(torch.int32), seg_of, seg_start[: max_segs + 1].clone(),
                         seg_adapter[:max_segs].clone(), num_slots, ranks, pool,
                         None if pool is None else pool.generation)


def _check_ranks_tensor(ranks, num_slots: int) -> None:
    """Per-slot true ranks: an integer tensor [num_slots] (its values are checked where they are used)."""
    if not isinstance(ranks, torch.Tensor) or not _is_int_tensor(ranks):
        got = ranks.dtype if isinstance(ranks, torch.Tensor) else type(ranks).__name__
        raise TypeError(f"ranks must be an integer tensor [{num_slots}] of per-slot ranks, got {got}")
    if tuple(ranks.shape) != (num_slots,):
        raise ValueError(f"ranks must be [{num_slots}] (one rank per slot), got {tuple(ranks.shape)}")
    if ranks.device.type == "meta":
        raise ValueError("ranks is on the meta device: the ranks need values")


# Set on a ranks tensor whose values are known to lie in [0, max_rank]: (its version counter, max_rank) once
# checked (an in-place write bumps the version, so a changed tensor is checked again), or (_POOL, max_rank) on an
# AdapterPool's own `ranks`, which only load / unload write (always within [0, max_rank]).
_RANKS_CHECKED = "_lora_fast_ranks_checked"
_POOL = "pool"


def _check_rank_values(ranks: torch.Tensor, R: int) -> None:
    """Every slot's true rank lies in [0, R]: a larger one would make the kernels read A and B rows past R (out of
    bounds), a negative one is no rank. One host read the first time a tensor (at its current version) meets a
    given R, none afterwards; none for an AdapterPool's ranks, and none while torch.compile traces or a CUDA graph
    is being captured (no sync is allowed there: the eager warm-up call before a capture checks). A tensor made
    under torch.inference_mode has no version counter: it is checked on every call (pass the pool's ranks)."""
    if is_compiling():
        return
    mark = getattr(ranks, _RANKS_CHECKED, None)
    if mark is not None and mark[0] == _POOL and mark[1] <= R:
        return
    version = None if ranks.is_inference() else ranks._version
    if version is not None and mark == (version, R):
        return
    if ranks.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = (ranks < 0) | (ranks > R)
    if bool(bad.any()):
        slot = int(bad.nonzero()[0, 0])
        raise ValueError(f"ranks[{slot}] = {int(ranks[slot])} is outside [0, R={R}]: a slot's rank cannot exceed the "
                         f"R rank rows the stacks hold (0 = empty slot)")
    if version is not None:
        setattr(ranks, _RANKS_CHECKED, (version, R))


def _host_vector(name: str, values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (Python numbers) as a tensor on `device`: a host-to-device copy, which a CUDA graph cannot capture;
    say so by name (the capture would fail with an opaque CUDA error)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"{name}: Python numbers cannot be copied to the GPU inside a CUDA graph capture; pass a "
                         f"tensor on {device} (e.g. the pool's `scalings` / `ranks`)")
    return torch.tensor(values, dtype=dtype, device=device)


def _checked_ranks(ranks, S: int, R: int, device: torch.device) -> torch.Tensor:
    """multi_lora_linear's `ranks` as an int32 [S] tensor on `device`, its values in [0, R]."""
    if ranks is None:
        return torch.full((S,), R, dtype=torch.int32, device=device)
    if isinstance(ranks, (list, tuple)):
        if len(ranks) != S or not all(_is_int(r) and 0 <= r <= R for r in ranks):
            raise ValueError(f"ranks: must be {S} ints in [0, R={R}] (0 = empty slot), got {list(ranks)}")
        return _host_vector("ranks", list(ranks), torch.int32, device)
    if not isinstance(ranks, torch.Tensor) or not _is_int_tensor(ranks):
        got = ranks.dtype if isinstance(ranks, torch.Tensor) else type(ranks).__name__
        raise TypeError(f"ranks must be None, an integer tensor [S={S}] or a list of S ints, got {got}")
    _check_slot_vector("ranks", ranks, S, device)
    _check_rank_values(ranks, R)
    return ranks.to(device=device, dtype=torch.int32)


def _checked_scalings(scalings, S: int, device: torch.device) -> torch.Tensor:
    """multi_lora_linear's `scalings` as an fp32 [S] tensor on `device`. A Python number or list is checked to be
    finite; a tensor's values are not read (that would sync on every call): AdapterPool.load checks each alpha."""
    if isinstance(scalings, torch.Tensor):
        if scalings.dtype == torch.bool or scalings.is_complex():
            raise TypeError(f"scalings must be a real tensor [S={S}], got {scalings.dtype}")
        _check_slot_vector("scalings", scalings, S, device)
        return scalings.to(device=device, dtype=torch.float32)
    if isinstance(scalings, (list, tuple)):
        values = [check_scaling(v, f"scalings[{i}]") for i, v in enumerate(scalings)]
        if len(values) != S:
            raise ValueError(f"scalings: must be [S={S}], got {len(values)} values")
    else:
        values = [check_scaling(scalings, "scalings")] * S
    return _host_vector("scalings", values, torch.float32, device)


# ----------------------------------------------------------------------------------------------- functional


def _bad(name: str, msg: str) -> ValueError:
    """The ValueError of a failed check (the checks build their message only when they fail: formatting shapes
    and devices on every call would cost more host time than the checks themselves)."""
    return ValueError(f"{name}: {msg}")


_RAW_IDS_REASON = ("raw adapter ids under torch.compile: checking and sorting them needs their values, so this "
                   "call builds its BatchMetadata outside the graph (a graph break; an error with fullgraph=True). "
                   "Build it once per batch outside the compiled region instead: pool.batch_metadata(names) or "
                   "make_batch_metadata(ids, pool)")


_metadata_outside_graph = eager_only(make_batch_metadata, _RAW_IDS_REASON)


def _metadata_of_raw_ids(ids, pool_or_slots, **kwargs) -> "BatchMetadata":
    """make_batch_metadata, run outside the graph under torch.compile: the ids' validation and sort depend on their
    values, which dynamo cannot trace (its own error would name a symbolic shape, not the cause)."""
    build = _metadata_outside_graph if is_compiling() else make_batch_metadata
    return build(ids, pool_or_slots, **kwargs)


def multi_lora_linear(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, *, ranks=None,
                      slice_sizes: Sequence[int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Batched multi-adapter LoRA linear (inference).

    x: [..., K]; weight: [N, K]; bias: [N] or None;
    lora_A_stack: [S, R, K], or [S, slices, R, K] for several projections sharing x;
    lora_B_stack: [S, N, R] (per-slice B concatenated along N); scalings: [S] tensor, a float or a list;
    adapter_ids: integer tensor with x's leading shape, or flat [T], or [B] for x [B, L, K] (one id per request)
    (-1 = base only), or a `BatchMetadata` for these tokens;
    ranks: int [S] true rank of each slot (default R for all; 0 = empty slot); slice_sizes: widths summing to N.
    Returns [..., N] in x's dtype. Under torch.autocast, x, weight, bias and the stacks are cast to the autocast
    dtype first, as nn.Linear's operands are (keep the pool in that dtype to avoid copying it on every call).
    Example:
        y = multi_lora_linear(x, W, None, A, B, torch.full((4,), 2.0), torch.tensor([0, 3, -1]))
    """
    x, weight, bias, lora_A_stack, lora_B_stack = autocast_inputs(x, weight, bias, lora_A_stack, lora_B_stack)
    check_tensor("x", x, min_ndim=1)
    K = x.shape[-1]
    check_tensor("weight", weight, ndim=2)
    if weight.shape[1] != K:
        raise _bad("weight", f"must be [N, K={K}] for x of shape {tuple(x.shape)} (x and weight disagree on K), "
                             f"got {tuple(weight.shape)}")
    check_same("weight", weight, x, "x")
    N = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != N:
            raise _bad("bias", f"must be [N={N}] or None, got {tuple(bias.shape)}")
        check_same("bias", bias, x, "x")
    check_tensor("lora_A_stack", lora_A_stack)
    check_tensor("lora_B_stack", lora_B_stack)
    if lora_A_stack.dim() not in (3, 4):
        raise _bad("lora_A_stack", f"must be [S, R, K] or [S, slices, R, K], got {tuple(lora_A_stack.shape)}")
    A = lora_A_stack if lora_A_stack.dim() == 4 else lora_A_stack.unsqueeze(1)
    S, n_slices, R, Ka = A.shape
    if not (S >= 1 and R >= 1 and Ka == K):
        raise _bad("lora_A_stack", f"must have S >= 1, R >= 1 and K={K}, got {tuple(A.shape)}")
    if lora_B_stack.shape != (S, N, R):
        raise _bad("lora_B_stack", f"must be [S={S}, N={N}, R={R}], got {tuple(lora_B_stack.shape)}")
    check_same("lora_A_stack", A, x, "x")
    check_same("lora_B_stack", lora_B_stack, x, "x")
    sizes = slice_sizes or (N,)
    if not (isinstance(sizes, (list, tuple)) and all(_is_int(s) for s in sizes)):
        raise _bad("slice_sizes", f"must be a list of ints, got {slice_sizes!r}")
    slice_sizes = tuple(int(s) for s in sizes)
    if not (len(slice_sizes) == n_slices and sum(slice_sizes) == N and min(slice_sizes) > 0):
        raise _bad("slice_sizes", f"must be {n_slices} positive widths summing to N={N}, got {slice_sizes}")
    scalings = _checked_scalings(scalings, S, x.device)
    ranks_arg, ranks = ranks, _checked_ranks(ranks, S, R, x.device)

    lead = x.shape[:-1]
    x2d = x.reshape(-1, K)
    T = x2d.shape[0]
    if isinstance(adapter_ids, BatchMetadata):
        meta = adapter_ids
        if meta.num_tokens != T:
            raise _bad("adapter_ids", f"metadata is for {meta.num_tokens} tokens, x has {T}")
        if meta.num_slots != S:
            raise _bad("adapter_ids", f"metadata is for {meta.num_slots} slots, the stacks have {S}")
        if meta.perm.device != x.device:
            raise _bad("adapter_ids", f"metadata is on {meta.perm.device} but x is on {x.device}: build it from "
                                      f"ids on x's device")
        _check_metadata_current(meta, ranks_arg)
    else:
        adapter_ids = _token_ids(adapter_ids, lead, "adapter_ids")
        _check_host_or_device("adapter_ids", adapter_ids, x.device)
        meta = _metadata_of_raw_ids(adapter_ids.to(x.device), S, ranks=ranks, validate=True)
    if out is not None:
        check_tensor("out", out)
        if not (out.shape == (*lead, N) and out.dtype == x.dtype and out.is_contiguous() and out.device == x.device):
            raise _bad("out", f"must be a contiguous {(*lead, N)} tensor of {x.dtype} on {x.device}")

    tensors = (x2d, weight, bias, A, lora_B_stack, scalings, ranks, meta.adapter_ids, meta.perm, meta.seg_of,
               meta.seg_start, meta.seg_adapter)
    if is_compiling() or (torch.is_grad_enabled() and x.requires_grad and use_triton(x)):
        # The `lora_fast::multi_lora_forward` op: traced by torch.compile without a break, and differentiable in x
        # (the kernels' own launch has no autograd). Eager inference keeps the direct launch below.
        from . import ops

        if ops.HAS_CUSTOM_OPS:
            y = torch.ops.lora_fast.multi_lora_forward(*tensors, list(slice_sizes))
            if out is not None:
                y = out.view(T, N).copy_(y)
            return y.view(*lead, N)
    compute = eager_only(multi_lora_compute) if is_compiling() else multi_lora_compute
    y = compute(*tensors, slice_sizes, out=None if out is None else out.view(T, N))
    return y.view(*lead, N)


def multi_lora_compute(x2d, weight, bias, A, B, scalings, ranks, adapter_ids, perm, seg_of, seg_start, seg_adapter,
                       slice_sizes, out=None) -> torch.Tensor:
    """The checked call's work: the kernels (CUDA, or CPU under the interpreter), else `_multi_lora_torch`.

    x2d: [T, K]; A: [S, slices, R, K]; B: [S, N, R]; scalings fp32 [S]; ranks int32 [S]; the rest is a
    `BatchMetadata`'s buffers; out: optional [T, N]. Returns y [T, N] (out when given).
    """
    if use_triton(x2d):
        from .kernels.helpers import dot_precision
        from .kernels.multi_lora import multi_lora_forward

        return multi_lora_forward(x2d, weight, bias, A, B, scalings, ranks, perm, seg_of, seg_start, seg_adapter,
                                  slice_sizes, out=out, precision=dot_precision(x2d.dtype), adapter_ids=adapter_ids)
    y = _multi_lora_torch(x2d, weight, bias, A, B, scalings, ranks, adapter_ids, slice_sizes)
    return y if out is None else out.copy_(y)


def multi_lora_backward_dx(dy, weight, A, B, scalings, ranks, adapter_ids, slice_sizes) -> torch.Tensor:
    """dx = dy @ W + Σ_slices s[id] · (dy_slice @ B[id, slice][:, :rank]) @ A[id, slice][:rank], per token.

    dy: [T, N]; weight: [N, K]; A: [S, slices, R, K]; B: [S, N, R]; scalings [S]; ranks [S]; adapter_ids [T]
    (-1: base only). Returns dx [T, K] in dy's dtype, accumulated in fp32 (fp64 for fp64). Plain PyTorch with no
    data-dependent host control (so it traces and graphs): each token's rank-R product is taken against every slot,
    [T, S, R], and the token's own slot gathered, which costs S times the minimal rank FLOPs (still rank-sized).
    """
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    T, (S, _, R, K) = dy.shape[0], A.shape
    ids = adapter_ids.reshape(-1).to(torch.int64)
    used = ids >= 0
    slot = ids.clamp(0, S - 1)
    keep = (torch.arange(R, device=dy.device)[None, :] < ranks.to(dy.device)[slot][:, None]) & used[:, None]
    scale = torch.where(used, scalings.to(dy.device, acc)[slot], torch.zeros((), device=dy.device, dtype=acc))
    index = slot[:, None, None].expand(T, 1, R)
    dyf = dy.to(acc)
    dx = dyf @ weight.to(acc)
    offsets = [0, *itertools.accumulate(slice_sizes)]
    for i in range(len(slice_sizes)):
        lo, hi = offsets[i], offsets[i + 1]
        dyb = torch.einsum("tn,snr->tsr", dyf[:, lo:hi], B[:, lo:hi].to(acc)).gather(1, index)[:, 0]
        dyb = dyb * keep * scale[:, None]
        spread = torch.zeros(T, S, R, device=dy.device, dtype=acc).scatter_(1, index, dyb[:, None])
        dx = dx + spread.reshape(T, S * R) @ A[:, i].reshape(S * R, K).to(acc)
    return dx.to(dy.dtype)


def _multi_lora_torch(x2d, weight, bias, A, B, scalings, ranks, ids, slice_sizes):
    """The plain-PyTorch path for CPU tensors: same numerics as the kernels (fp32 accumulation, xa scaled in fp32
    and rounded to x's dtype before it meets B; fp64 throughout for fp64), one matmul pair per adapter present."""
    acc = torch.float64 if x2d.dtype == torch.float64 else torch.float32
    y = F.linear(x2d.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    offsets = [0, *itertools.accumulate(slice_sizes)]
    for a in ids.unique().tolist():
        r = int(ranks[a]) if a >= 0 else 0
        if r == 0:
            continue
        rows = (ids == a).nonzero()[:, 0]
        xs = x2d[rows].to(acc)
        for i in range(len(slice_sizes)):
            xa = (xs @ A[a, i, :r].to(acc).T) * scalings[a]
            lo, hi = offsets[i], offsets[i + 1]
            y[rows, lo:hi] += xa.to(x2d.dtype).to(acc) @ B[a, lo:hi, :r].to(acc).T
    return y.to(x2d.dtype)


# ----------------------------------------------------------------------------------------------- adapter pool


def adapter_pairs(key, value) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An adapter weights entry as a list of (A [r, K], B [N, r]) pairs: one (A, B) pair (a tuple or list of two
    tensors) or a list of pairs, one per slice. Each A and B is a 2-D float tensor with values (not meta); any
    float dtype and device (the pool copies them into its own)."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(t, torch.Tensor) for t in value):
        value = [value]
    if not (isinstance(value, (tuple, list)) and value
            and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in value)):
        got = type(value).__name__
        if isinstance(value, (tuple, list)):
            got += " of (" + ", ".join(type(v).__name__ for v in value) + ")"
        raise TypeError(f"weights[{key!r}] must be an (A, B) pair of tensors or a list of such pairs, one per "
                        f"slice, got {got}")
    pairs = []
    for i, (a, b) in enumerate(value):
        for part, t in (("A", a), ("B", b)):
            check_tensor(f"weights[{key!r}][{i}] {part}", t, ndim=2)
            if t.device.type == "meta":
                raise ValueError(f"weights[{key!r}][{i}] {part} is on the meta device: it holds no values to load")
        pairs.append((a, b))
    return pairs


class AdapterPool:
    """Fixed-size adapter storage shared by every layer of a model: name -> slot, load and unload in place.

    max_adapters: slots S; max_rank: R, the largest rank a slot can hold (each slot keeps its true rank in
    `ranks`, int32 [S] on the device, 0 = empty); `scalings` fp32 [S] = alpha / rank (alpha / sqrt(rank) for rsLoRA).
    Layers register with `add_layer(key, in_features, slice_sizes)`; per layer the pool holds
    A [S, slices, R, K] and Bᵀ [S, R, N] (B is exposed as the [S, N, R] view, so a B tile of one rank row is
    contiguous along N). Nothing is reallocated by `load` / `unload`, so CUDA graphs captured earlier stay valid.
    """

    def __init__(self, max_adapters: int, max_rank: int, device=None, dtype=torch.bfloat16):
        check_rank(max_adapters, "max_adapters")
        check_rank(max_rank, "max_rank")
        check_dtype(dtype, "dtype", none_ok=False)  # an integer pool would truncate every adapter it loads
        self.max_adapters, self.max_rank = int(max_adapters), int(max_rank)
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self.ranks = torch.zeros(max_adapters, dtype=torch.int32, device=self.device)
        setattr(self.ranks, _RANKS_CHECKED, (_POOL, self.max_rank))  # only load / unload write it, within range
        self.scalings = torch.zeros(max_adapters, dtype=torch.float32, device=self.device)
        self._slots: dict[str, int] = {}
        self._layers: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
        # Bumped by every load / unload (a host int): BatchMetadata built from this pool records it, and a call
        # with this pool's tensors refuses metadata from an older generation.
        self.generation = 0

    # layers
    def add_layer(self, key: str, in_features: int, slice_sizes: Sequence[int]) -> None:
        if not isinstance(key, str):
            raise TypeError(f"key must be a str (the layer's name in adapter weight dicts), got {type(key).__name__}")
        if key in self._layers:
            raise ValueError(f"key: layer {key!r} is already registered with this pool")
        check_rank(in_features, "in_features")
        if not (isinstance(slice_sizes, (list, tuple)) and slice_sizes and all(_is_int(s) and s >= 1
                                                                               for s in slice_sizes)):
            raise ValueError(f"slice_sizes: must be a non-empty list of positive ints, got {slice_sizes!r}")
        slice_sizes = tuple(int(s) for s in slice_sizes)
        S, R = self.max_adapters, self.max_rank
        A = torch.zeros(S, len(slice_sizes), R, in_features, device=self.device, dtype=self.dtype)
        Bt = torch.zeros(S, R, sum(slice_sizes), device=self.device, dtype=self.dtype)
        self._layers[key] = (A, Bt, slice_sizes)

    def layer_stacks(self, key: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(lora_A_stack [S, slices, R, K], lora_B_stack [S, N, R] view, slice_sizes) of one layer."""
        A, Bt, sizes = self._layers[key]
        return A, Bt.transpose(1, 2), sizes

    # adapters
    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def slot(self, name: str) -> int:
        if name not in self._slots:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {self.names})")
        return self._slots[name]

    def load(self, name: str, weights: Mapping[str, object], alpha: float, rank: int | None = None,
             use_rslora: bool = False) -> int:
        """Copy an adapter into a free slot and return the slot.

        weights: layer key -> (A [r, K], B [N, r]) for a one-slice layer, or a list of such pairs, one per slice.
        Layers not named get a zero update; an empty dict (an all-zero adapter) needs `rank`.
        rank: r (default: read from the first A).
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__} (None in `ids` means base only)")
        if name in self._slots:
            raise ValueError(f"name: adapter {name!r} is already loaded in slot {self._slots[name]}")
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a dict {{layer key: (A, B)}}, got {type(weights).__name__}")
        unknown = set(weights) - set(self._layers)
        if unknown:
            raise ValueError(f"weights: unknown layer keys {sorted(unknown, key=repr)}")
        alpha = check_scaling(alpha, "alpha")  # a NaN / inf alpha would make this adapter's every output NaN
        check_flag(use_rslora, "use_rslora")
        if rank is not None:
            check_rank(rank)
        pairs = {k: adapter_pairs(k, v) for k, v in weights.items()}
        if not pairs and rank is None:
            raise ValueError(f"weights: no (A, B) pair for adapter {name!r} (an empty dict): pass "
                             f"{{layer key: (A, B)}} for its layers (registered: {sorted(self._layers)}); an "
                             f"all-zero placeholder adapter needs an explicit rank=")
        free = sorted(set(range(self.max_adapters)) - set(self._slots.values()))
        if not free:
            raise RuntimeError(f"the pool is full ({self.max_adapters} adapters); unload one first")
        if rank is None:
            rank = next(iter(pairs.values()))[0][0].shape[0] if pairs else 1
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"rank: {rank} is outside [1, {self.max_rank}]")
        for key, plist in pairs.items():
            A, Bt, sizes = self._layers[key]
            if len(plist) != len(sizes):
                raise ValueError(f"weights[{key!r}]: {len(sizes)} (A, B) pairs expected, got {len(plist)}")
            for i, (a, b) in enumerate(plist):
                if tuple(a.shape) != (rank, A.shape[-1]) or tuple(b.shape) != (sizes[i], rank):
                    raise ValueError(f"weights[{key!r}][{i}]: A must be [{rank}, {A.shape[-1]}] and B "
                                     f"[{sizes[i]}, {rank}], got {tuple(a.shape)}, {tuple(b.shape)}")
        slot = free[0]
        for key, (A, Bt, sizes) in self._layers.items():
            A[slot].zero_()
            Bt[slot].zero_()
            for i, (a, b) in enumerate(pairs.get(key, [])):
                lo = sum(sizes[:i])
                A[slot, i, :rank].copy_(a)
                Bt[slot, :rank, lo:lo + sizes[i]].copy_(b.T)
        self.ranks[slot] = rank
        self.scalings[slot] = alpha / (math.sqrt(rank) if use_rslora else rank)
        self._slots[name] = slot
        self.generation += 1
        return slot

    def unload(self, name: str) -> None:
        """Free the slot; ids that still point at it are rejected by validation (and computed as base if not)."""
        slot = self.slot(name)
        del self._slots[name]
        self.ranks[slot] = 0
        self.scalings[slot] = 0.0
        self.generation += 1

    def ids(self, names: Sequence[str | None]) -> torch.Tensor:
        """int32 [len(names)] slot per entry on the pool's device; None -> -1 (base only)."""
        # A lone string would be read as one name per character.
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise TypeError(f"names must be a list of adapter names (None = base only), one per token, "
                            f"got {type(names).__name__}")
        return torch.tensor([-1 if n is None else self.slot(n) for n in names], dtype=torch.int32,
                            device=self.device)

    def batch_metadata(self, adapters, validate: bool = True) -> BatchMetadata:
        """Metadata for one batch, from a list of names (None = base) or an id tensor; one entry per token."""
        if isinstance(adapters, str):
            raise TypeError("adapters must be a list of adapter names (None = base only) or an id tensor, one per "
                            "token, got a str")
        ids = adapters if isinstance(adapters, torch.Tensor) else self.ids(adapters)
        return make_batch_metadata(ids, self, validate=validate)


# ----------------------------------------------------------------------------------------------- module


def _check_pool_matches_base(pool: AdapterPool, weight: torch.Tensor, x: torch.Tensor | None = None) -> None:
    """The pool's stacks live on the base weight's device, in its dtype; a float16 / bfloat16 / float32 mix is
    allowed where torch.autocast casts both (at construction: always; at a call: only with autocast on for x)."""
    if pool.ranks.device != weight.device:
        raise ValueError(f"pool: the AdapterPool is on {pool.ranks.device} but the base layer's weight is on "
                         f"{weight.device}: create the pool on the base layer's device (AdapterPool(..., "
                         f"device={str(weight.device)!r}))")
    if pool.dtype == weight.dtype:
        return
    if pool.dtype in _CASTABLE and weight.dtype in _CASTABLE:
        if x is None or autocast_dtype("cuda" if x.is_cuda else "cpu") is not None:
            return
        raise TypeError(f"pool: the AdapterPool holds {pool.dtype} adapters but the base layer's weight is "
                        f"{weight.dtype}: outside torch.autocast they must match (create the pool with "
                        f"dtype={weight.dtype}, or call the layer under torch.autocast)")
    raise TypeError(f"pool: the AdapterPool holds {pool.dtype} adapters but the base layer's weight is "
                    f"{weight.dtype}: create the pool with dtype={weight.dtype} (only float16 / bfloat16 / float32 "
                    f"may differ, and only for calls under torch.autocast)")


class MultiLoRALinear(nn.Module):
    """A frozen base linear plus the pool's adapters; `forward(x, batch)` serves every token with its own adapter.

    base_linear: nn.Linear [N, K] (for several projections sharing x, the concatenated weight, e.g. fused qkv);
    pool: the model's `AdapterPool`, on base_linear's device and in its dtype (a float16 / bfloat16 / float32 pool
    under a base of another of these works only under torch.autocast); key: this layer's name in adapter weight dicts;
    slice_sizes: output widths of the projections (default one slice of N).
    forward(x [..., K], batch: BatchMetadata or integer ids: x's leading shape, flat [T], or [B] for x [B, L, K]
    (one per request)) -> [..., N].
    """

    _auto_key = itertools.count()

    def __init__(self, base_linear: nn.Linear, pool: AdapterPool, key: str | None = None,
                 slice_sizes: Sequence[int] | None = None):
        super().__init__()
        if not isinstance(base_linear, nn.Linear):
            raise TypeError(f"base_linear must be an nn.Linear, got {type(base_linear).__name__}")
        if not isinstance(pool, AdapterPool):
            raise TypeError(f"pool must be a lora_fast.AdapterPool, got {type(pool).__name__}")
        if slice_sizes is not None and not (isinstance(slice_sizes, (list, tuple)) and slice_sizes
                                            and all(_is_int(s) and s >= 1 for s in slice_sizes)):
            raise ValueError(f"slice_sizes: must be a non-empty list of positive ints, got {slice_sizes!r}")
        _check_pool_matches_base(pool, base_linear.weight)
        self.weight = base_linear.weight
        self.bias = base_linear.bias
        self.in_features, self.out_features = base_linear.in_features, base_linear.out_features
        self.slice_sizes = tuple(slice_sizes or (self.out_features,))
        if sum(self.slice_sizes) != self.out_features:
            raise ValueError(f"slice_sizes: {self.slice_sizes} must sum to out_features={self.out_features}")
        self.pool = pool
        self.key = key if key is not None else f"multi_lora_linear_{next(self._auto_key)}"
        pool.add_layer(self.key, self.in_features, self.slice_sizes)

    def forward(self, x: torch.Tensor, batch) -> torch.Tensor:
        # (anything else wrong with x, multi_lora_linear's checks name; this one would otherwise blame the weight)
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != self.in_features:
            raise ValueError(f"x: must be [..., in_features={self.in_features}], got {tuple(x.shape)}")
        A, B, sizes = self.pool.layer_stacks(self.key)
        if (A.dtype != self.weight.dtype or A.is_cuda != self.weight.is_cuda) and isinstance(x, torch.Tensor):
            _check_pool_matches_base(self.pool, self.weight, x)  # (moved or cast since; else the stacks get blamed)
        if not isinstance(batch, BatchMetadata):
            check_tensor("x", x, min_ndim=1)  # x.device is read below
            if not isinstance(batch, torch.Tensor):
                raise TypeError(f"batch must be a BatchMetadata or an integer tensor of adapter ids (for names: "
                                f"pool.batch_metadata(names) or pool.ids(names)), got {type(batch).__name__}")
            batch = _token_ids(batch, x.shape[:-1], "batch")
            _check_host_or_device("batch", batch, x.device)
            batch = _metadata_of_raw_ids(batch.to(x.device), self.pool)
        return multi_lora_linear(x, self.weight, self.bias, A, B, self.pool.scalings, batch,
                                 ranks=self.pool.ranks, slice_sizes=sizes)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, key={self.key!r}, "
                f"slices={self.slice_sizes}, slots={self.pool.max_adapters}, max_rank={self.pool.max_rank}")


__all__ = ["AdapterPool", "BatchMetadata", "MultiLoRALinear", "make_batch_metadata", "multi_lora_linear",
           "validate_adapter_ids"]
