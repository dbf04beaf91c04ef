"""VeRA (vector-based random matrix adaptation) on the fused kernels: `vera_linear`, `VeRALinear`, `apply_vera`.

    y = x @ W^T + b + lambda_b * (B @ (lambda_d * (A @ drop(x))))

A [r, K] and B [N, r] are frozen random projections, drawn once from a seed and shared by every adapted layer
(`VeRAProjections`, PEFT's `vera_A` / `vera_B` with its `projection_prng_key` and kaiming-uniform init: the same
seed gives PEFT's values); each layer trains only lambda_d [r] and lambda_b [N] (PEFT's init: lambda_d = 0.1,
lambda_b = 0, so the output at init is the base's).

Fused path: the two vectors are folded into the rank-sized factors, A_d = lambda_d * A [r, K] and
B_b = lambda_b * B [N, r] (r * (K + N) elements, tiny next to x), and the LoRA kernels run unchanged with s = 1:
one forward launch, one dX launch, one dA/dB launch. Their gradients come from the factor gradients:

    d lambda_d[j] = rowdot(dA_d, A)[j],   dA_d = (dY @ B_b)^T @ drop(x)          [r, K]
    d lambda_b[n] = rowdot(dB_b, B)[n],   dB_b = dY^T @ (drop(x) @ A_d^T)         [N, r]

so d lambda_b = sum_m dY * (xa_d @ B^T) never needs an [M, N] temporary: it is a rowdot of the [N, r] product
that LoRA's dB computes anyway (taken in fp32).
"""
from __future__ import annotations

import math
import numbers
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import naive
from .functional import _ops, _term_in_ab, autocast_inputs, compile_dispatch, draw_seed, is_compiling, lora_linear
from .layers import adopt_frozen_base
from .merging import SavesUnmerged
from .targeting import matching_linears, replace_linears
from .validation import (check_dropout, check_dtype, check_lora_linear_args, check_rank, check_scaling, check_tensor,
                         check_vector_param)


def check_seed(seed, name: str = "seed") -> int:
    """An int seed (projection_prng_key): a float would be truncated and a string refused by int() without a name."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__} {seed!r}")
    return int(seed)


def kaiming_uniform_projection(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(6 / fan_in), fan_in = shape[1] (kaiming-uniform, gain sqrt(2)), fp32 on the CPU,
    drawn from `generator`: PEFT's `_kaiming_init` for vera_A and vera_B."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen shared projections: buffers vera_A [rank, in_features] and vera_B [out_features, rank].

    Drawn from `seed` on the CPU (A first, then B, as PEFT does), so the seed alone reproduces them. A layer of
    shape (K, N) with K <= in_features and N <= out_features uses vera_A[:, :K] and vera_B[:N] (PEFT slices the
    projections of the largest shape the same way).

    >>> proj = VeRAProjections(4096, 14336, rank=256, seed=0)
    >>> A, B = proj.sliced(4096, 4096, x.device, x.dtype)
    """

    def __init__(self, in_features: int, out_features: int, rank: int, seed: int = 0):
        super().__init__()
        self.rank, self.seed = check_rank(rank), check_seed(seed)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.register_buffer("vera_A", kaiming_uniform_projection((self.rank, check_rank(in_features, "in_features")), gen))
        self.register_buffer("vera_B", kaiming_uniform_projection((check_rank(out_features, "out_features"), self.rank), gen))
        self._cache: dict = {}

    def sliced(self, in_features: int, out_features: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [rank, in_features], B [out_features, rank]) on `device` in `dtype`, contiguous; cached until the
        buffers change (moved, loaded or edited in place). Under torch.compile the slices are graph ops instead
        (the cache key reads storage addresses, which dynamo cannot trace)."""
        if type(in_features) is not int or type(out_features) is not int or in_features < 1 or out_features < 1:
            check_rank(in_features, "in_features")  # a 0 or negative width would slice the wrong columns
            check_rank(out_features, "out_features")
        if in_features > self.vera_A.shape[1] or out_features > self.vera_B.shape[0]:
            raise ValueError(f"a layer of in_features={in_features}, out_features={out_features} does not fit "
                             f"the projections [{self.rank}, {self.vera_A.shape[1]}] and "
                             f"[{self.vera_B.shape[0]}, {self.rank}]")
        if is_compiling():
            return (self.vera_A[:, :in_features].to(device=device, dtype=dtype).contiguous(),
                    self.vera_B[:out_features].to(device=device, dtype=dtype).contiguous())
        key = (in_features, out_features, torch.device(device), dtype, self.vera_A.data_ptr(),
               self.vera_A._version, self.vera_B.data_ptr(), self.vera_B._version)
        hit = self._cache.get(key)
        if hit is None:
            check_dtype(dtype, "dtype", none_ok=False)  # a cached key was checked when it was first seen
            hit = (self.vera_A[:, :in_features].to(device=device, dtype=dtype).contiguous(),
                   self.vera_B[:out_features].to(device=device, dtype=dtype).contiguous())
            self._cache = {k: v for k, v in self._cache.items() if k[:4] != key[:4]}
            self._cache[key] = hit
        return hit

    def extra_repr(self) -> str:
        return f"rank={self.rank}, in_features={self.vera_A.shape[1]}, out_features={self.vera_B.shape[0]}, seed={self.seed}"


_SHARED: "weakref.WeakValueDictionary[tuple, VeRAProjections]" = weakref.WeakValueDictionary()


def shared_projections(in_features: int, out_features: int, rank: int, seed: int = 0) -> VeRAProjections:
    """The one VeRAProjections of this shape and seed in the process (created on first use, freed when no layer
    holds it): every VeRALinear of the same shape built without explicit projections shares it."""
    check_seed(seed)
    key = (int(in_features), int(out_features), int(rank), int(seed))
    proj = _SHARED.get(key)
    if proj is None:
        proj = VeRAProjections(in_features, out_features, rank, seed)
        _SHARED[key] = proj
    return proj


class VeRALinearFunction(torch.autograd.Function):
    """y = x @ W^T + b + (drop(x) @ A_d^T) @ B_b^T with A_d = d * A, B_b = lambda_b * B; see the module docstring.

    Saves x, W, the folded factors, A, B (no copies of x) and xa_d = drop(x) @ A_d^T [M, r] when lambda_b needs
    a gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, dropout_p, seed):
        ops = _ops(x)
        a_d, b_b = _fold(ops, vera_A, lambda_d, vera_B, lambda_b, x.dtype)
        flat = x.dim() != 2  # reshapes only where needed: each torch call costs host time (bench/NOTES.md)
        y2d, xa = ops.lora_forward(x.reshape(-1, x.shape[-1]) if flat else x, weight, bias, a_d, b_b, 1.0, dropout_p,
                                   seed, store_xa=ctx.needs_input_grad[6])
        ctx.save_for_backward(x, weight, vera_A, vera_B, a_d, b_b, xa)
        ctx.dropout_p, ctx.seed, ctx.has_bias = dropout_p, seed, bias is not None
        ctx.dtypes = (lambda_d.dtype, lambda_b.dtype)
        return y2d.reshape(*x.shape[:-1], weight.shape[0]) if flat else y2d

    @staticmethod
    def backward(ctx, dy):
        x, weight, vera_A, vera_B, a_d, b_b, xa = ctx.saved_tensors
        need_x, need_w, need_bias, _, _, need_d, need_lb = ctx.needs_input_grad[:7]
        ops, p, seed = _ops(x), ctx.dropout_p, ctx.seed
        acc = torch.promote_types(x.dtype, torch.float32)
        flat = x.dim() != 2
        x2d = x.reshape(-1, x.shape[-1]) if flat else x
        dy2d = dy.reshape(-1, weight.shape[0]) if dy.dim() != 2 else dy
        if dy2d.dtype != x.dtype:
            dy2d = dy2d.to(x.dtype)
        dx = dw = dbias = dd = dlb = None
        dyb = None  # dY @ B_b
        term_in_ab = need_x and need_d and _term_in_ab(ops, x2d.shape[0], a_d.shape[0], p)  # as lora_backward
        if need_x:
            dx2d, dyb = ops.lora_backward_dx(dy2d, weight, a_d, b_b, 1.0, p, seed, store_dyb=need_d,
                                             **({"dropout_term": False} if term_in_ab else {}))
            dx = dx2d.reshape(x.shape) if flat else dx2d
        elif need_d:
            dyb = ops.lora_shrink(dy2d, b_b.t())
        if need_d or need_lb:
            d_ad, d_bb = ops.lora_grad_ab(x2d, dy2d, xa, dyb, 1.0, acc, acc, p, seed, need_a=need_d, need_b=need_lb,
                                          **({"dx": dx2d, "lora_A": a_d} if term_in_ab else {}))
            dd, dlb = _lambda_grads(ops, d_ad, vera_A, d_bb, vera_B, *ctx.dtypes)
        if need_w:
            dw = (dy2d.t() @ x2d).to(weight.dtype)
        if need_bias and ctx.has_bias:
            dbias = dy2d.sum(0, dtype=acc).to(dy2d.dtype)
        return dx, dw, dbias, None, None, dd, dlb, None, None


def _fold(ops, vera_A, lambda_d, vera_B, lambda_b, dtype):
    """(lambda_d[:, None] * A, lambda_b[:, None] * B) in `dtype`, each element rounded once from the fp32 product
    (fp64 for fp64): one launch on the kernel path (kernels/rows.py), 4 torch ops otherwise."""
    if ops is not naive:
        return ops.scale_rows(vera_A, lambda_d, vera_B, lambda_b, dtype)
    return (vera_A * lambda_d[:, None]).to(dtype), (vera_B * lambda_b[:, None]).to(dtype)


def _lambda_grads(ops, d_ad, vera_A, d_bb, vera_B, d_dtype, b_dtype):
    """(dlambda_d = rowsum(dA_d * A), dlambda_b = rowsum(dB_b * B)), either None when its d_ad / d_bb is; summed
    in fp32 (fp64 for fp64): one launch on the kernel path."""
    if ops is not naive:
        return ops.row_dots(d_ad, vera_A, d_bb, vera_B, d_dtype, b_dtype)
    return ((d_ad * vera_A).sum(1).to(d_dtype) if d_ad is not None else None,
            (d_bb * vera_B).sum(1).to(b_dtype) if d_bb is not None else None)


def vera_linear(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, dropout_p=0.0, training=False):
    """Fused VeRA linear: `x @ W^T + b + lambda_b * ((lambda_d * (drop(x) @ A^T)) @ B^T)`.

    x: [..., K]; weight: [N, K]; bias: [N] or None; vera_A: [r, K]; vera_B: [N, r] (one dtype and device; the
    projections are not differentiated); lambda_d: [r]; lambda_b: [N] (any float dtype, x's device).
    dropout_p in [0, 1), on the VeRA branch's input, used when `training`. Under torch.autocast, x, weight, bias
    and the projections are cast as lora_linear casts them (the lambdas keep their dtype). Returns y: [..., N].

    Under torch.compile it is traced without a graph break: the scaled factors d * A and lambda_b * B are graph
    ops and the product goes through `lora_linear` (the `lora_fast::lora_forward` op), whose gradients of the
    factors autograd carries to the lambdas (in x's dtype before that last reduction, where the eager path keeps
    them in fp32; with dropout the mask comes from the in-graph seed, as for `lora_linear`).

    >>> A, B = shared_projections(4096, 4096, rank=256).sliced(4096, 4096, x.device, x.dtype)
    >>> y = vera_linear(x, W, b, A, B, lambda_d, lambda_b, dropout_p=0.1, training=True)
    >>> y.sum().backward()                                       # grads in x, lambda_d, lambda_b
    """
    return compile_dispatch(_vera_linear_traced, _vera_linear_eager, x, weight, bias, vera_A, vera_B, lambda_d,
                            lambda_b, dropout_p, training)


def _vera_checked(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, dropout_p, training):
    """vera_linear's operands after autocast and its checks: (x, weight, bias, vera_A, vera_B, p) with vera_A and
    vera_B detached in x's dtype and p the dropout probability in effect."""
    x, weight, bias, vera_A, vera_B = autocast_inputs(x, weight, bias, vera_A, vera_B)
    try:  # the LoRA checks, with the errors naming VeRA's arguments
        _, dropout_p = check_lora_linear_args(x, weight, bias, vera_A, vera_B, 1.0, dropout_p, training)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("lora_A", "vera_A").replace("lora_B", "vera_B")) from None
    check_vector_param("lambda_d", lambda_d, vera_A.shape[0], x)
    check_vector_param("lambda_b", lambda_b, weight.shape[0], x)
    return (x, weight, bias, vera_A.detach().to(x.dtype), vera_B.detach().to(x.dtype),
            dropout_p if training else 0.0)


def _vera_linear_eager(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, dropout_p, training):
    x, weight, bias, vera_A, vera_B, p = _vera_checked(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b,
                                                       dropout_p, training)
    seed = draw_seed(x) if p > 0.0 else 0
    return VeRALinearFunction.apply(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, p, seed)


def _vera_linear_traced(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, dropout_p, training):
    """vera_linear under torch.compile: the factors folded by graph ops, the product by the lora_forward op."""
    x, weight, bias, vera_A, vera_B, p = _vera_checked(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b,
                                                       dropout_p, training)
    a_d = (vera_A * lambda_d[:, None]).to(x.dtype)  # rounded once to x's dtype, as VeRALinearFunction does
    b_b = (vera_B * lambda_b[:, None]).to(x.dtype)
    return lora_linear(x, weight, bias, a_d, b_b, 1.0, p, True)



class VeRALinear(SavesUnmerged, nn.Module):
    """y = x @ W^T + b + lambda_b * (B @ (lambda_d * (A @ drop(x)))), W and b frozen, A and B frozen and shared.

    Args: in_features, out_features; rank r (PEFT's default 256); dropout in [0, 1); bias; seed (PEFT's
    projection_prng_key); d_initial (lambda_d's initial value, PEFT's 0.1); projections: a VeRAProjections to
    use (default: the process-wide one of this shape and seed, `shared_projections`); device; dtype.
    State-dict keys: weight, bias, vera_lambda_d [r], vera_lambda_b [out]; the projections are not in it (the
    seed regenerates them) unless `own_projections()` registered them (apply_vera does, on one layer per model).

    >>> layer = VeRALinear.from_linear(linear, rank=256, dropout=0.05, seed=0)
    >>> layer(x).sum().backward()          # grads in layer.vera_lambda_d and layer.vera_lambda_b
    >>> layer.merge()
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 256, dropout: float = 0.0, bias: bool = True,
                 seed: int = 0, d_initial: float = 0.1, projections: VeRAProjections | None = None,
                 device=None, dtype=None):
        super().__init__()
        check_rank(in_features, "in_features")
        check_rank(out_features, "out_features")
        check_dtype(dtype, "dtype")
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init(base.weight, base.bias, rank, dropout, seed, d_initial, projections)

    def _init(self, weight, bias, rank, dropout, seed, d_initial, projections) -> None:
        self.rank = check_rank(rank)
        self.dropout = check_dropout(dropout, "dropout")
        d_initial = check_scaling(d_initial, "d_initial")  # a NaN lambda_d would make every output NaN
        check_seed(seed)
        out_features, in_features = weight.shape
        if projections is None:
            projections = shared_projections(in_features, out_features, self.rank, seed)
        elif not isinstance(projections, VeRAProjections):
            raise TypeError(f"projections must be a VeRAProjections, got {type(projections).__name__}")
        if projections.rank != self.rank:
            raise ValueError(f"projections have rank {projections.rank} but rank={self.rank}")
        projections.sliced(in_features, out_features, "cpu", torch.float32)  # shape check, named error
        # Held outside the module tree, so that a model stores the shared projections once: apply_vera registers
        # them as a submodule (`vera_projections`) of the first adapted layer only (`own_projections`).
        object.__setattr__(self, "projections", projections)
        self.seed = projections.seed
        adopt_frozen_base(self, weight, bias)
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.vera_lambda_d = nn.Parameter(torch.full((self.rank,), d_initial, **kw))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **kw))
        self.merged = False

    def own_projections(self) -> None:
        """Register the shared projections as this layer's submodule `vera_projections`: they then appear in its
        state dict (vera_projections.vera_A / vera_B) and move with it under .to(); do it on one layer per model."""
        self.add_module("vera_projections", self.projections)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 256, dropout: float = 0.0, seed: int = 0,
                    d_initial: float = 0.1, projections: VeRAProjections | None = None) -> "VeRALinear":
        """Wrap `linear`, sharing (not copying) its weight and bias, which are frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init(linear.weight, linear.bias, rank, dropout, seed, d_initial, projections)
        return layer

    def factors(self, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (A [r, in], B [out, r]) slices of the shared projections (default: the weight's device, dtype)."""
        return self.projections.sliced(self.in_features, self.out_features, device or self.weight.device,
                                       dtype or self.weight.dtype)

    adapter_variant = "vera"  # count_parameters' variant name

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The lambdas and the shared projections (PEFT's save_projection=True; shared storage counts once)."""
        return {"vera_lambda_d": self.vera_lambda_d, "vera_lambda_b": self.vera_lambda_b,
                "vera_A": self.projections.vera_A, "vera_B": self.projections.vera_B}

    def delta_weight(self) -> torch.Tensor:
        """(lambda_b * B) @ (lambda_d * A) [out, in], computed in fp32, returned in the weight's dtype."""
        A, B = self.factors(dtype=torch.float32)
        return ((self.vera_lambda_b.float()[:, None] * B) @ (self.vera_lambda_d.float()[:, None] * A)).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight` (rounded in its dtype): forward then costs a plain linear."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight().float()).to(self.weight.dtype))
            self.merged = True

    def _unmerged_state(self) -> dict[str, torch.Tensor]:
        """W as unmerge() restores it (the state dict of a merged layer holds it: lora_fast.merging)."""
        return {"weight": (self.weight.float() - self.delta_weight().float()).to(self.weight.dtype)}

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W is restored within the rounding of its dtype."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight().float()).to(self.weight.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        check_tensor("x", x, min_ndim=1)  # before x.device / x.dtype pick the projections' copy
        A, B = self.factors(x.device, x.dtype)
        return vera_linear(x, self.weight, self.bias, A, B, self.vera_lambda_d, self.vera_lambda_b,
                           self.dropout, self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"dropout={self.dropout:g}, bias={self.bias is not None}, seed={self.seed}, merged={self.merged}")


def apply_vera(model: nn.Module, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), rank: int = 256,
               dropout: float = 0.0, seed: int = 0, d_initial: float = 0.1) -> nn.Module:
    """Replace the matching nn.Linear modules of `model` by VeRALinear sharing one VeRAProjections of the
    largest matched shape (PEFT's rule), stored once: as `vera_projections` of the first adapted layer. The
    lambdas train, other variants' adapters keep their requires_grad, every base parameter is frozen
    (lora_fast.layers.freeze_base). target_modules as in apply_lora. Returns `model` (changed in place).

    >>> model = apply_vera(model, ["q_proj", "v_proj"], rank=256, seed=0)
    >>> [k for k in model.state_dict() if "vera_projections" in k]   # [...q_proj.vera_projections.vera_A, ..._B]
    """
    check_rank(rank)
    check_dropout(dropout, "dropout")
    check_seed(seed)
    check_scaling(d_initial, "d_initial")
    found = matching_linears(model, target_modules)
    proj = VeRAProjections(max(m.in_features for _, m in found), max(m.out_features for _, m in found), rank, seed)
    proj = proj.to(found[0][1].weight.device)

    def make(name, lin):
        layer = VeRALinear.from_linear(lin, rank, dropout, seed, d_initial, proj)
        if name == found[0][0]:
            layer.own_projections()
        return layer

    return replace_linears(model, target_modules, make, trainable=("vera_lambda_d", "vera_lambda_b"), found=found)
