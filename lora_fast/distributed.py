"""Multi-GPU LoRA: tensor parallelism (Megatron / S-LoRA scheme), and notes for data parallelism.

Data parallel (DDP, FSDP2) needs no helper: `DistributedDataParallel(model)` and `fully_shard` work on models made
by `lora_fast.apply_lora` as they are (frozen base weights get no gradient hooks; FSDP2 all-gathers the sharded base
weight before each forward, so the kernels see full tensors). `tests/test_distributed.py` checks both against the
single-process gradients; docs/distributed.md shows the calls.

Tensor parallel, P ranks of a process group (`group`, default the world), with W [N, K], A [r, K], B [N, r]:

- `ColumnParallelLoRALinear`: W and B split by output rows (W_p [N/P, K], B_p [N/P, r]), A replicated.
  Rank p computes y_p = x·W_pᵀ + b_p + s·(drop(x)·Aᵀ)·B_pᵀ, its [M, N/P] slice of y (`gather_output` all-gathers
  it). Backward: dx is summed over ranks (the all-reduce a TP base layer does anyway, since the LoRA term of dx is
  part of each rank's partial dx), and dA is a partial sum over the N-shards, all-reduced as one [r, K] tensor.
- `RowParallelLoRALinear`: W and A split by input columns (W_p [N, K/P], A_p [r, K/P]), B replicated.
  y = Σ_p (x_p·W_pᵀ + s·(drop(x_p)·A_pᵀ)·Bᵀ) + b: every rank runs the fused kernel on its shard (bias on rank 0
  only) and ONE all-reduce of [M, N] sums base and LoRA partials together. Backward: dy is replicated, so dx_p and
  dA_p are local; dB = s·dyᵀ·Σ_p xa_p is a sum of per-rank [N, r] partials, all-reduced as one [N, r] tensor.

So LoRA adds no collective in the forward and one rank-sized all-reduce per layer in the backward
(r·K or N·r elements, against M·K or M·N for the activations the base layer reduces).

Dropout: the kernels' Philox mask is indexed by (row, column) of the input they see. Column-parallel ranks see the
same x and the same seed, so the mask (and the result) is exactly single-device's, provided every TP rank has the
same torch RNG state (call `torch.manual_seed` with one seed on every rank, as Megatron does; `check_rng_in_sync`
checks it): the seed is drawn from the CPU generator eagerly, from the CUDA generator under torch.compile and in
CUDA-graph captures. Row-parallel ranks see x's column shards; each shard adds a rank-dependent offset to the drawn
seed, so the shards' masks are independent Bernoulli(1-p) draws with the right statistics, but not bit-identical to
the single-device mask (the launcher indexes columns from 0 within its shard). With dropout 0 both layers equal
single-device.

Multi-adapter serving (inference): `ShardedAdapterPool` shards every adapter it loads the way each layer is split
(column: B by output, per slice; row: A by input); `ColumnParallelMultiLoRALinear` / `RowParallelMultiLoRALinear`
are the TP forms of `MultiLoRALinear`. `tensor_parallel(model, plan)` swaps a model's linears for TP layers;
`LLAMA_TP_PLAN` is the Llama plan (column: q, k, v, gate, up; row: o, down).

>>> dist.init_process_group("nccl")
>>> q = ColumnParallelLoRALinear.from_lora_linear(full_q)        # each rank keeps its shard of a full layer
>>> model = tensor_parallel(model, LLAMA_TP_PLAN)                  # or swap a whole Llama-style model
"""
from __future__ import annotations

import hashlib
import itertools
import math
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layers import LoRALinear
from .multi_lora import AdapterPool, BatchMetadata, adapter_pairs, make_batch_metadata, multi_lora_linear
from .validation import check_rank

COLUMN, ROW = "column", "row"

# Odd 64-bit constant (the golden ratio's): row-parallel shard p uses seed + p * this (mod 2**62) as its Philox key,
# so the shards' dropout streams are distinct for any seed.
_SHARD_SEED_STRIDE = 0x9E3779B97F4A7C15

LLAMA_TP_PLAN = {"q_proj": COLUMN, "k_proj": COLUMN, "v_proj": COLUMN, "o_proj": ROW,
                 "gate_proj": COLUMN, "up_proj": COLUMN, "down_proj": ROW}


# ----------------------------------------------------------------------------------------------- data parallel


def import_fully_shard():
    """FSDP2's `fully_shard`: `torch.distributed.fsdp` (torch >= 2.6) or `torch.distributed._composable.fsdp`
    (2.4, 2.5); None where this torch has neither."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            return None
    return fully_shard


# ----------------------------------------------------------------------------------------------- process group


def tp_rank_and_size(group=None) -> tuple[int, int]:
    """(rank in `group`, size of `group`); raises RuntimeError when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tensor parallel layers need torch.distributed initialised "
                           "(torch.distributed.init_process_group) before they are built")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the given group")
    return rank, dist.get_world_size(group)


def shard_range(n: int, rank: int, size: int, name: str) -> slice:
    """Rows [n/size * rank, n/size * (rank+1)) of a dimension of length n split evenly over `size` ranks."""
    if n % size:
        raise ValueError(f"{name}={n} must be divisible by the tensor-parallel size {size}")
    step = n // size
    return slice(step * rank, step * (rank + 1))


def broadcast_from_first(tensors: Sequence[torch.Tensor], group=None) -> None:
    """Overwrite `tensors` on every rank of `group` with group rank 0's values (in place)."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=src, group=group)


def check_rng_in_sync(group=None) -> None:
    """Raise RuntimeError if the ranks of `group` have different torch RNG states: the CPU generator's, and the
    current CUDA device's when CUDA is initialised (one all-gather; call it once after seeding). Column-parallel
    dropout needs the same state on every TP rank: the seed of each mask is drawn from it (CPU eagerly, CUDA under
    torch.compile and in CUDA graphs), and different seeds would give each output slice a different mask.

    >>> torch.manual_seed(1234)                 # the same seed on every rank
    >>> lora_fast.distributed.check_rng_in_sync()
    """
    tp_rank_and_size(group)
    state = torch.get_rng_state().numpy().tobytes()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state += torch.cuda.get_rng_state().numpy().tobytes()
    # 8 bytes of a hash of the states, as an int64 (a tensor on the backend's device: NCCL takes CUDA tensors)
    digest = int.from_bytes(hashlib.sha256(state).digest()[:8], "little", signed=True)
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    if any(int(d) != digest for d in every):
        raise RuntimeError("the ranks' torch RNG states differ (the CPU generator's, or the current CUDA device's): "
                           "call torch.manual_seed with the same seed on every rank of the tensor-parallel group "
                           "(column-parallel dropout draws its seed there)")


def _all_reduce_(t: torch.Tensor, group) -> torch.Tensor:
    """Sum `t` over `group` in place (a contiguous copy first if needed) and return the summed tensor."""
    t = t if t.is_contiguous() else t.contiguous()
    dist.all_reduce(t, group=group)
    return t


class _CopyToParallel(torch.autograd.Function):
    """Megatron's f: identity forward; backward sums the gradient over the group.

    Used on a replicated input (x of a column layer) and on a replicated LoRA factor (A of a column layer, B of a
    row layer), whose gradients are per-rank partial sums. The gradient arriving here is a fresh kernel output
    consumed by nothing else, so it is reduced in place."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce_(grad, ctx.group), None


class _ReduceFromParallel(torch.autograd.Function):
    """Megatron's g: forward sums the partial outputs over the group; backward is the identity, since every rank
    receives the same dy.

    The sum is taken in place, with no [M, N] copy: the partial output is a temporary that nothing else holds and
    that no backward saved (the LoRA Function saves x, W, A, B, xa, never y). It is reduced through a detached
    alias because the LoRA Function's output is a view, which autograd forbids modifying in place."""

    @staticmethod
    def forward(ctx, t, group):
        return _all_reduce_(t.detach(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _all_gather_dim(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's `t` along `dim`, in rank order (the inverse of sharding `dim` evenly)."""
    parts = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _all_gather_last(t: torch.Tensor, group) -> torch.Tensor:
    """[..., n] on each rank -> [..., n * P], the ranks' parts in rank order."""
    return _all_gather_dim(t, -1, group)


def _local_part(t: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of the last dimension (contiguous)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return t[..., shard_range(t.shape[-1], rank, size, "x.shape[-1]")].contiguous()


class _GatherOrSplit(torch.autograd.Function):
    """gather=True: all-gather the last dimension ([..., n] per rank -> [..., n * P]), backward keeps this rank's
    slice of the gradient; gather=False: the reverse (keep this rank's slice, all-gather the gradient)."""

    @staticmethod
    def forward(ctx, t, group, gather):
        ctx.group, ctx.gather = group, gather
        return _all_gather_last(t, group) if gather else _local_part(t, group)

    @staticmethod
    def backward(ctx, grad):
        return (_local_part(grad, ctx.group) if ctx.gather else _all_gather_last(grad, ctx.group)), None, None


def copy_to_parallel(t, group=None):
    """Identity forward, gradient summed over `group` in the backward (Megatron's f)."""
    return _CopyToParallel.apply(t, group)


def reduce_from_parallel(t, group=None):
    """Sum over `group` in the forward (in place on `t`), identity backward (Megatron's g)."""
    return _ReduceFromParallel.apply(t, group)


def gather_from_parallel(t, group=None):
    """All-gather the last dimension over `group`; backward keeps this rank's slice."""
    return _GatherOrSplit.apply(t, group, True)


def split_to_parallel(t, group=None):
    """This rank's slice of the last dimension; backward all-gathers the gradient."""
    return _GatherOrSplit.apply(t, group, False)


# ----------------------------------------------------------------------------------------------- TP linear layers


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)


def _check_x(x, in_features: int, layer: nn.Module) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must be [..., {in_features}] for {type(layer).__name__} (tp rank {layer.tp_rank} of "
                         f"{layer.tp_size}), got shape {tuple(x.shape)}")


class _ParallelLinear(nn.Module):
    """Shared parts of the TP layers: the process group, the frozen shard of the base linear and its sizes.

    Subclasses say how a full [N, K] weight is split (`style`) and what the local product is (`_local`)."""

    style = ""

    def _setup(self, weight: torch.Tensor, bias: torch.Tensor | None, group,
               slice_sizes: Sequence[int] | None = None) -> None:
        self.group = group
        self.tp_rank, self.tp_size = tp_rank_and_size(group)
        self.out_features, self.in_features = weight.shape
        self.slice_sizes = tuple(slice_sizes or (self.out_features,))
        rows, cols = self._shard_slices(self.out_features, self.in_features)
        self.weight = _frozen(weight[rows, cols])
        # Column: bias split like the output. Row: the full bias, added by rank 0 only (inside its fused kernel).
        self.bias = _frozen(None if bias is None else bias[rows] if self.style == COLUMN else bias)

    def _shard_slices(self, out_features: int, in_features: int):
        """(rows, cols) of this rank's shard of a full [out_features, in_features] weight. Column layers with
        several slices (fused q/k/v) split each slice: rank p keeps [q_p | k_p | v_p] (an index tensor)."""
        everything = slice(None)
        if self.style == ROW:
            return everything, shard_range(in_features, self.tp_rank, self.tp_size, "in_features")
        if len(self.slice_sizes) == 1:
            return shard_range(out_features, self.tp_rank, self.tp_size, "out_features"), everything
        starts = [sum(self.slice_sizes[:i]) for i in range(len(self.slice_sizes))]
        rows = [torch.arange(lo, lo + n)[shard_range(n, self.tp_rank, self.tp_size, "slice_sizes")]
                for lo, n in zip(starts, self.slice_sizes)]
        return torch.cat(rows), everything

    def _local_bias(self):
        """The bias the local product adds: a row layer adds its (frozen) full bias on rank 0 only, fused into the
        kernel; a trainable bias is added after the all-reduce instead (`_bias_after_reduce`), so that every
        rank gets its gradient."""
        if self.style == ROW and (self.tp_rank != 0 or self._bias_after_reduce()):
            return None
        return self.bias

    def _bias_after_reduce(self) -> bool:
        return self.style == ROW and self.bias is not None and self.bias.requires_grad

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"local weight={tuple(self.weight.shape)}, tp_rank={self.tp_rank}, tp_size={self.tp_size}, "
                f"bias={self.bias is not None}")


class _ColumnForward:
    def _set_options(self, gather_output: bool = False) -> None:
        self.gather_output = bool(gather_output)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        """x [..., K] (replicated) -> [..., N / P] (this rank's output slice), or [..., N] with gather_output."""
        _check_x(x, self.in_features, self)
        y = self._local(copy_to_parallel(x, self.group), *args)
        return gather_from_parallel(y, self.group) if self.gather_output else y


class _RowForward:
    def _set_options(self, input_is_parallel: bool = True) -> None:
        self.input_is_parallel = bool(input_is_parallel)

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        """x [..., K / P] (this rank's input slice; [..., K] without input_is_parallel) -> [..., N] (replicated)."""
        if not self.input_is_parallel:
            _check_x(x, self.in_features, self)
            x = split_to_parallel(x, self.group)
        _check_x(x, self.weight.shape[1], self)
        y = reduce_from_parallel(self._local(x, *args), self.group)
        return y + self.bias if self._bias_after_reduce() else y


class _ParallelBaseLinear(_ParallelLinear):
    def __init__(self, linear: nn.Linear, group=None, **options):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self._setup(linear.weight, linear.bias, group)
        self._set_options(**options)

    def _local(self, x):
        return F.linear(x, self.weight, self._local_bias())


class ColumnParallelLinear(_ColumnForward, _ParallelBaseLinear):
    """Frozen base linear split by output rows (the TP base layer, for models and benchmarks).

    linear: the full nn.Linear [N, K] (identical on every rank); group: the TP process group (default world);
    gather_output: all-gather the [..., N/P] slices into [..., N].

    >>> layer = ColumnParallelLinear(torch.nn.Linear(4096, 14336, device="cuda"))
    >>> y_local = layer(x)            # x [M, 4096] -> [M, 14336 / P]
    """

    style = COLUMN

    def __init__(self, linear: nn.Linear, group=None, gather_output: bool = False):
        super().__init__(linear, group, gather_output=gather_output)


class RowParallelLinear(_RowForward, _ParallelBaseLinear):
    """Frozen base linear split by input columns; one all-reduce of the [..., N] output.

    linear: the full nn.Linear [N, K]; input_is_parallel: x is already this rank's [..., K/P] slice (the output
    of a ColumnParallel layer), else x [..., K] is split here.

    >>> layer = RowParallelLinear(torch.nn.Linear(14336, 4096, device="cuda"))
    >>> y = layer(h_local)            # h_local [M, 14336 / P] -> [M, 4096] on every rank
    """

    style = ROW

    def __init__(self, linear: nn.Linear, group=None, input_is_parallel: bool = True):
        super().__init__(linear, group, input_is_parallel=input_is_parallel)


class _ParallelLoRA(_ParallelLinear):
    """A TP base linear plus its LoRA factors, split per `style` (column: B by rows; row: A by columns)."""

    def _setup_lora(self, layer: LoRALinear, group) -> None:
        if type(layer) is not LoRALinear:  # a subclass (DoRALinear) would lose what it adds (its magnitude)
            raise TypeError(f"layer must be a lora_fast.LoRALinear, got {type(layer).__name__}: {_TP_SUPPORTED}")
        if layer.merged:
            raise ValueError("layer is merged: call layer.unmerge() before sharding it")
        self._setup(layer.weight, layer.bias, group)
        self.rank, self.alpha, self.dropout, self.use_rslora = layer.rank, layer.alpha, layer.dropout, layer.use_rslora
        rows, cols = self._shard_slices(self.out_features, self.in_features)
        self.lora_A = nn.Parameter(layer.lora_A.detach()[:, cols].clone(), requires_grad=layer.lora_A.requires_grad)
        self.lora_B = nn.Parameter(layer.lora_B.detach()[rows].clone(), requires_grad=layer.lora_B.requires_grad)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's adapter tensors (its shards of A or B): what marks the module as an adapter for the model
        helpers' freezing rule (`layers.freeze_base`: a later apply_vera keeps them training) and for
        count_parameters."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    @torch.no_grad()
    def to_lora_linear(self) -> LoRALinear:
        """The full LoRALinear, gathered from every rank's shard (the same on every rank; a collective call).
        For saving the adapter (e.g. `lora_fast.peft.save_peft_adapter`) or checking against one device."""
        dim = 0 if self.style == COLUMN else 1  # the split dimension of W [N, K]
        weight = _all_gather_dim(self.weight, dim, self.group)
        bias = self.bias
        if bias is not None and self.style == COLUMN:
            bias = _all_gather_dim(bias, 0, self.group)
        A = self.lora_A if self.style == COLUMN else _all_gather_dim(self.lora_A, 1, self.group)
        B = _all_gather_dim(self.lora_B, 0, self.group) if self.style == COLUMN else self.lora_B
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        with torch.random.fork_rng(devices=[weight.device.index] if weight.is_cuda else []):  # its A init: unused
            full = LoRALinear.from_linear(linear, self.rank, self.alpha, self.dropout, self.use_rslora)
        full.lora_A = nn.Parameter(A.clone())
        full.lora_B = nn.Parameter(B.clone())
        return full

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False, group=None, **kw):
        """Shard `linear` (identical on every rank) and a fresh adapter (PEFT init, drawn on group rank 0 and
        broadcast so every rank starts from the same A and B)."""
        full = LoRALinear.from_linear(linear, rank, alpha, dropout, use_rslora)
        tp_rank_and_size(group)
        broadcast_from_first([full.lora_A, full.lora_B], group)
        return cls.from_lora_linear(full, group=group, **kw)

    @classmethod
    def from_lora_linear(cls, layer: LoRALinear, group=None, **kw):
        """Keep this rank's shard of a full LoRALinear (which must be identical on every rank; it is not changed)."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._setup_lora(layer, group)
        obj._set_options(**kw)
        return obj

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, group=None, device=None, dtype=None, **kw):
        super().__init__()
        check_rank(in_features, "in_features")
        check_rank(out_features, "out_features")
        full = LoRALinear(in_features, out_features, rank, alpha, dropout, bias, use_rslora, device=device,
                          dtype=dtype)
        tp_rank_and_size(group)
        broadcast_from_first([t for t in full.parameters()], group)  # one initial draw for all ranks
        self._setup_lora(full, group)
        self._set_options(**kw)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
                f"dropout={self.dropout:g}")


class ColumnParallelLoRALinear(_ColumnForward, _ParallelLoRA):
    """LoRALinear split by output: W_p [N/P, K], b_p [N/P], B_p [N/P, r] on rank p; A [r, K] replicated.

    Forward runs the fused kernel on the local shard and adds no collective (all-gather only with
    gather_output); backward all-reduces dx (as the TP base layer does) and dA [r, K] (rank-sized).
    Build with `from_lora_linear(layer, group=None, gather_output=False)`, `from_linear(linear, rank, alpha,
    dropout, use_rslora, group=None, gather_output=False)`, or like LoRALinear(in, out, rank, ..., group=None).

    >>> q = ColumnParallelLoRALinear.from_lora_linear(full_q)   # full_q: a LoRALinear, same on every rank
    >>> y_local = q(x)                                           # x [M, K] -> [M, N / P]
    >>> y_local.sum().backward()                                 # q.lora_A.grad: the full dA on every rank
    """

    style = COLUMN
    adapter_variant = "lora"  # count_parameters' variant (looked up on the module's own class)

    def _local(self, x):
        from .functional import lora_linear

        return lora_linear(x, self.weight, self.bias, copy_to_parallel(self.lora_A, self.group), self.lora_B,
                           self.scaling, self.dropout, self.training)


class RowParallelLoRALinear(_RowForward, _ParallelLoRA):
    """LoRALinear split by input: W_p [N, K/P], A_p [r, K/P] on rank p; B [N, r] and b [N] replicated.

    Forward: the fused kernel on the shard (bias on rank 0) and one all-reduce of [..., N] carrying base and LoRA
    partials together. Backward: dx_p, dA_p local; dB all-reduced as one [N, r] tensor (rank-sized).
    Dropout: per-shard masks (the seed plus a TP-rank offset), statistically but not bitwise single-device's.

    >>> o = RowParallelLoRALinear.from_lora_linear(full_o)       # input_is_parallel=True by default
    >>> y = o(h_local)                                           # h_local [M, K / P] -> [M, N], replicated
    """

    style = ROW
    adapter_variant = "lora"

    def _local(self, x):
        from .functional import lora_linear_shifted

        B = copy_to_parallel(self.lora_B, self.group)
        # One draw on every rank (the same generator state; replayed by checkpointing), then a distinct Philox
        # key per shard: the drawn seed plus a multiple of an odd constant, eagerly, compiled and in CUDA graphs.
        return lora_linear_shifted(x, self.weight, self._local_bias(), self.lora_A, B, self.scaling, self.dropout,
                                   self.training, (self.tp_rank * _SHARD_SEED_STRIDE) % 2**62)


# ----------------------------------------------------------------------------------------------- model surgery


_TP_SUPPORTED = ("tensor parallelism shards plain nn.Linear and lora_fast.LoRALinear layers only; DoRA, VeRA, "
                 "QLoRA 4-bit and other subclasses or adapter layers are not supported (sharded as a LoRALinear or a "
                 "linear they would silently lose their magnitude, lambdas or quantized base)")


def _check_tp_target(name: str, module: nn.Module) -> bool:
    """Whether tensor_parallel shards `module` (a plan-matched module): True for exactly nn.Linear / LoRALinear,
    False for a TP layer already or a module without a weight (a container); anything else that holds a weight
    (a subclass, another adapter variant) is refused, named: skipping it would leave a full layer among shards."""
    if type(module) in (nn.Linear, LoRALinear):
        return True
    if isinstance(module, _ParallelLinear):
        return False
    if isinstance(module, (nn.Linear, LoRALinear)) or callable(getattr(module, "adapter_state_dict", None)) \
            or isinstance(getattr(module, "weight", None), torch.Tensor):
        raise TypeError(f"tensor_parallel: module {name!r} is a {type(module).__module__}.{type(module).__name__}: "
                        f"{_TP_SUPPORTED}")
    return False


def _plan_style(name: str, plan: Mapping[str, str]) -> str | None:
    for suffix, style in plan.items():
        if name == suffix or name.endswith("." + suffix):
            return style
    return None


def tensor_parallel(model: nn.Module, plan: Mapping[str, str] = LLAMA_TP_PLAN, group=None) -> nn.Module:
    """Replace, in place, each LoRALinear / nn.Linear of `model` whose name ends with a key of `plan` by its TP
    form (plan value "column" or "row"); column outputs stay sharded and row layers take sharded inputs, so a
    column -> row pair (q/k/v -> o, gate/up -> down) runs with one all-reduce in the forward.
    Only exactly nn.Linear and LoRALinear are sharded: a plan-matched DoRALinear, VeRALinear, LoRALinear4bit,
    subclass or other layer with a weight raises a TypeError naming it (before the model changes).

    The model must be identical on every rank. Attention must reshape heads with -1 (as transformers' Llama does),
    so that each rank runs its num_heads / P local heads; heads and the MLP width must divide by P.

    >>> model = apply_lora(model, ["q_proj", "v_proj"], rank=16)
    >>> tensor_parallel(model, LLAMA_TP_PLAN)          # every rank now holds 1/P of each attention and MLP weight
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Mapping) or any(v not in (COLUMN, ROW) for v in plan.values()):
        raise ValueError(f"plan must map module-name suffixes to 'column' or 'row', got {plan!r}")
    tp_rank_and_size(group)
    targets = [(name, module, _plan_style(name, plan)) for name, module in model.named_modules()
               if _plan_style(name, plan) is not None and _check_tp_target(name, module)]
    if not targets:
        raise ValueError(f"plan={dict(plan)!r} matched no nn.Linear or LoRALinear in the model")
    # Build every shard first (this checks sizes and merged layers), so a bad layer leaves the model unchanged.
    new_modules = []
    for name, module, style in targets:
        if isinstance(module, LoRALinear):
            cls = ColumnParallelLoRALinear if style == COLUMN else RowParallelLoRALinear
            new_modules.append(cls.from_lora_linear(module, group=group))
        else:
            cls = ColumnParallelLinear if style == COLUMN else RowParallelLinear
            new_modules.append(cls(module, group))
    for (name, _, _), new in zip(targets, new_modules):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


# ----------------------------------------------------------------------------------------------- multi-adapter TP


class ShardedAdapterPool(AdapterPool):
    """An AdapterPool whose TP layers hold this rank's shard of every adapter.

    Layers register with `add_sharded_layer` (the TP multi-LoRA modules do it); `load(name, weights, alpha, ...)`
    takes the FULL (A [r, K], B [N, r]) pairs, the same on every rank, and keeps this rank's shard: column layers
    split B by output within each slice (fused q/k/v stay q/k/v per rank), row layers split A by input.

    >>> pool = ShardedAdapterPool(max_adapters=64, max_rank=16, device="cuda", dtype=torch.bfloat16)
    >>> qkv = ColumnParallelMultiLoRALinear(full_qkv_linear, pool, key="qkv", slice_sizes=(4096, 1024, 1024))
    >>> pool.load("tenant-a", {"qkv": [(Aq, Bq), (Ak, Bk), (Av, Bv)]}, alpha=32)
    """

    def __init__(self, max_adapters: int, max_rank: int, device=None, dtype=torch.bfloat16, group=None):
        super().__init__(max_adapters, max_rank, device=device, dtype=dtype)
        self.group = group
        self.tp_rank, self.tp_size = tp_rank_and_size(group)
        self._sharding: dict[str, tuple[str, int, tuple[int, ...]]] = {}

    def add_sharded_layer(self, key: str, in_features: int, slice_sizes: Sequence[int], style: str) -> None:
        """Register a TP layer by its FULL in_features and slice widths; the pool stores this rank's shard."""
        if style not in (COLUMN, ROW):
            raise ValueError(f"style must be 'column' or 'row', got {style!r}")
        sizes = tuple(int(s) for s in slice_sizes)
        if style == COLUMN:
            for s in sizes:
                shard_range(s, 0, self.tp_size, "slice_sizes")
            local_k, local_sizes = in_features, tuple(s // self.tp_size for s in sizes)
        else:
            shard_range(in_features, 0, self.tp_size, "in_features")
            local_k, local_sizes = in_features // self.tp_size, sizes
        self.add_layer(key, local_k, local_sizes)
        self._sharding[key] = (style, in_features, sizes)

    def _shard_pairs(self, key: str, value) -> list:
        style, in_features, sizes = self._sharding[key]
        pairs = adapter_pairs(key, value)  # (A, B) tensors, 2-D float, named when not
        if len(pairs) != len(sizes):
            raise ValueError(f"weights[{key!r}]: {len(sizes)} (A, B) pairs expected, got {len(pairs)}")
        out = []
        for i, (a, b) in enumerate(pairs):
            if a.dim() != 2 or a.shape[1] != in_features or b.dim() != 2 or tuple(b.shape) != (sizes[i], a.shape[0]):
                raise ValueError(f"weights[{key!r}][{i}]: the full A must be [r, {in_features}] and B "
                                 f"[{sizes[i]}, r], got {tuple(a.shape)}, {tuple(b.shape)}")
            if style == COLUMN:
                out.append((a, b[shard_range(sizes[i], self.tp_rank, self.tp_size, "slice_sizes")]))
            else:
                out.append((a[:, shard_range(in_features, self.tp_rank, self.tp_size, "in_features")], b))
        return out

    def load(self, name: str, weights: Mapping[str, object], alpha: float, rank: int | None = None,
             use_rslora: bool = False) -> int:
        """Load the full adapter `weights` (layer key -> (A, B) or a list per slice); keeps this rank's shards."""
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a dict {{layer key: (A, B)}}, got {type(weights).__name__}")
        local = {k: (self._shard_pairs(k, v) if k in self._sharding else v) for k, v in weights.items()}
        return super().load(name, local, alpha, rank=rank, use_rslora=use_rslora)


_auto_key = itertools.count()


def _check_pool(pool) -> None:
    if not isinstance(pool, ShardedAdapterPool):
        raise TypeError(f"pool must be a lora_fast.distributed.ShardedAdapterPool, got {type(pool).__name__}")


class _ParallelMultiLoRA(_ParallelLinear):
    """A TP base linear serving every adapter of a ShardedAdapterPool (inference)."""

    def _setup_multi(self, base_linear: nn.Linear, pool: ShardedAdapterPool, key, slice_sizes) -> None:
        if not isinstance(base_linear, nn.Linear):
            raise TypeError(f"base_linear must be an nn.Linear, got {type(base_linear).__name__}")
        _check_pool(pool)
        sizes = tuple(int(s) for s in (slice_sizes or (base_linear.out_features,)))
        if sum(sizes) != base_linear.out_features or min(sizes) < 1:
            raise ValueError(f"slice_sizes: {sizes} must be positive and sum to out_features="
                             f"{base_linear.out_features}")
        self._setup(base_linear.weight, base_linear.bias, pool.group, sizes)
        self.pool = pool
        # the same default key on every rank when layers are built in the same order
        self.key = key if key is not None else f"tp_multi_lora_linear_{next(_auto_key)}"
        pool.add_sharded_layer(self.key, base_linear.in_features, sizes, self.style)

    def _local(self, x, batch):
        A, B, sizes = self.pool.layer_stacks(self.key)
        if not isinstance(batch, BatchMetadata):
            if not isinstance(batch, torch.Tensor):
                raise TypeError(f"batch must be a BatchMetadata or an integer tensor of adapter ids, "
                                f"got {type(batch).__name__}")
            batch = make_batch_metadata(batch.to(x.device), self.pool)
        return multi_lora_linear(x, self.weight, self._local_bias(), A, B, self.pool.scalings, batch,
                                 ranks=self.pool.ranks, slice_sizes=sizes)


class ColumnParallelMultiLoRALinear(_ColumnForward, _ParallelMultiLoRA):
    """MultiLoRALinear split by output: this rank's rows of W (per slice) and of every adapter's B.

    base_linear: the full nn.Linear [N, K] (fused projections: slice_sizes, e.g. (q, k, v) widths, each divisible
    by P); pool: a ShardedAdapterPool; forward(x [..., K], batch) -> [..., N/P] (per slice, this rank's part of
    each: [q_p | k_p | v_p]), or [..., N] in the full layout's rank-major order with gather_output.

    >>> layer = ColumnParallelMultiLoRALinear(full_linear, pool, key="up")
    >>> y_local = layer(x, pool.batch_metadata(["tenant-a", None]))
    """

    style = COLUMN

    def __init__(self, base_linear: nn.Linear, pool: ShardedAdapterPool, key: str | None = None,
                 slice_sizes: Sequence[int] | None = None, gather_output: bool = False):
        super().__init__()
        self._setup_multi(base_linear, pool, key, slice_sizes)
        self._set_options(gather_output)


class RowParallelMultiLoRALinear(_RowForward, _ParallelMultiLoRA):
    """MultiLoRALinear split by input: this rank's columns of W and of every adapter's A; B replicated.
    One all-reduce of [..., N] sums base and LoRA partials.

    >>> layer = RowParallelMultiLoRALinear(full_down_linear, pool, key="down")
    >>> y = layer(h_local, batch)      # h_local [T, K / P] -> [T, N] on every rank
    """

    style = ROW

    def __init__(self, base_linear: nn.Linear, pool: ShardedAdapterPool, key: str | None = None,
                 input_is_parallel: bool = True):
        super().__init__()
        self._setup_multi(base_linear, pool, key, None)
        self._set_options(input_is_parallel)


__all__ = [
    "COLUMN", "ColumnParallelLinear", "ColumnParallelLoRALinear", "ColumnParallelMultiLoRALinear", "LLAMA_TP_PLAN",
    "ROW", "RowParallelLinear", "RowParallelLoRALinear", "RowParallelMultiLoRALinear", "ShardedAdapterPool",
    "broadcast_from_first", "check_rng_in_sync", "copy_to_parallel", "gather_from_parallel", "import_fully_shard",
    "reduce_from_parallel", "shard_range",
    "split_to_parallel", "tensor_parallel", "tp_rank_and_size",
]
