"""DoRA (weight-decomposed LoRA) on the fused kernels: `dora_linear`, `DoRALinear`, `apply_dora`.

    y = g * (x @ W^T + s * (x @ A^T) @ B^T) + b,    g = m / ||W + s * B @ A||_row    (no dropout, or eval)

with PEFT's conventions (peft/tuners/lora/dora.py): the weight norm is detached (a constant in the backward, DoRA
paper section 4.3), the bias is added after the scaling, and with dropout p > 0 in training the base output keeps
the undropped x while the DoRA correction uses the dropped one:

    y = x @ W^T + b + (g - 1) * (drop(x) @ W^T) + g * s * (drop(x) @ A^T) @ B^T

Fused path (no dropout): the forward is one `lora_forward` launch with g applied in its epilogue (`out_scale`);
the backward scales dY by g once (`scale_columns`, the pass that also sums dm's columns), then runs LoRA's own
backward on g * dY: one `lora_backward_dx` and one `lora_grad_ab`. (Scaling every dY tile inside the dX GEMM's
loop, `dy_scale`, took 1.55x cuBLAS's dX time at N = 14336 on the H200 against 1.19x with the pass: NOTES.md.)
The norm and g come from one kernel pass over W that forms W + s * B @ A tile by tile in registers
(`kernels/dora.py`): the [N, K] merged weight is never written.
With dropout, the extra `(x - drop(x)) @ W^T` term is a second cuBLAS GEMM and drop(x) is materialised (what
PEFT's own forward does too); the DoRA part still runs fused.

The magnitude gradient dm[n] = sum_m dY[m, n] * (y[m, n] - b[n]) / m[n] reads the saved output y (one [M, N]
tensor kept alive for the backward when m requires grad; PEFT keeps several). Columns with m[n] == 0 (where y
holds no information) are recomputed exactly, on the device (`kernels.magnitude_grad`): the backward never waits
for the GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import naive
from .functional import _ops, autocast_inputs, compile_dispatch, draw_seed, lora_linear, use_triton
from .layers import LoRALinear, check_targets
from .philox import dropout_mask_torch
from .targeting import matching_linears, replace_linears
from .validation import (check_dropout, check_lora_linear_args, check_rank, check_same, check_scaling, check_tensor,
                         check_vector_param)


def _stats_ops(t: torch.Tensor):
    # The helper kernels accumulate in fp32; fp64 takes the PyTorch path for them.
    return naive if t.dtype == torch.float64 else _ops(t)


def _check_norm_args(weight, lora_A, lora_B, scaling) -> float:
    """Checks of `dora_scale` / `dora_weight_norm`: W [N, K], A [r, K], B [N, r] in one float dtype on one device
    (the norm kernel reads all three with W's dtype); returns the scaling as a float."""
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    check_same("lora_A", lora_A, weight, "weight")
    check_same("lora_B", lora_B, weight, "weight")
    N, K = weight.shape
    rank = lora_A.shape[0]
    if rank < 1 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be [r, K] = [r >= 1, {K}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, rank):
        raise ValueError(f"lora_B must be [N, r] = [{N}, {rank}], got {tuple(lora_B.shape)}")
    return check_scaling(scaling)


@torch.no_grad()
def dora_scale(weight, lora_A, lora_B, scaling, magnitude) -> tuple[torch.Tensor, torch.Tensor]:
    """(||W + s * B @ A||_row, g = magnitude / norm), both [N] fp32 (fp64 for fp64), detached, in one pass over W.

    weight: [N, K], lora_A: [r, K], lora_B: [N, r] (one dtype); magnitude: [N]. The kernel forms W + s * B @ A one
    tile at a time in registers; the [N, K] merged weight is never written.

    >>> norm, g = dora_scale(layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.lora_magnitude)
    """
    scaling = _check_norm_args(weight, lora_A, lora_B, scaling)
    check_vector_param("magnitude", magnitude, weight.shape[0], weight)
    return _dora_scale(weight, lora_A, lora_B, scaling, magnitude)


def _dora_scale(weight, lora_A, lora_B, scaling, magnitude) -> tuple[torch.Tensor, torch.Tensor]:
    """`dora_scale` on checked arguments (dora_linear's forward checks them once, with x). The kernel records no
    autograd graph and ignores autocast; the plain-PyTorch path runs without both (fp32 math, detached)."""
    ops = _stats_ops(weight)
    if ops is naive:
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            return ops.dora_norm(weight, lora_A, lora_B, scaling, magnitude)
    return ops.dora_norm(weight, lora_A, lora_B, scaling, magnitude.detach().contiguous())


def dora_weight_norm(weight, lora_A, lora_B, scaling) -> torch.Tensor:
    """||W + s * B @ A|| per output row, [N] fp32 (fp64 for fp64), detached; see dora_scale.

    >>> m0 = dora_weight_norm(W, A, B, 2.0)           # DoRA's initial magnitude: g = 1
    """
    scaling = _check_norm_args(weight, lora_A, lora_B, scaling)
    return _dora_scale(weight, lora_A, lora_B, scaling, weight.new_ones(weight.shape[0]))[0]


class DoRALinearFunction(torch.autograd.Function):
    """y = g * (x @ W^T + s * (x @ A^T) @ B^T) + b, g = magnitude / weight_norm (weight_norm constant).

    Saves x, W, A, B, xa = x @ A^T (when B needs a gradient), and y (when the magnitude does).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, g, weight_norm, scaling):
        ops = _ops(x)
        flat = x.dim() != 2  # reshapes only where needed: each torch call costs host time (bench/NOTES.md)
        need_b, need_m = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        y2d, xa = ops.lora_forward(x.reshape(-1, x.shape[-1]) if flat else x, weight, bias, lora_A, lora_B, scaling,
                                   store_xa=need_b, out_scale=g)
        ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, g, xa,
                              y2d if need_m else None)
        ctx.scaling = scaling
        return y2d.reshape(*x.shape[:-1], weight.shape[0]) if flat else y2d

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm, g, xa, y2d = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        ops, s = _ops(x), ctx.scaling
        flat = x.dim() != 2
        x2d = x.reshape(-1, x.shape[-1]) if flat else x
        dy2d = dy.reshape(-1, weight.shape[0]) if dy.dim() != 2 else dy
        if dy2d.dtype != x.dtype:
            dy2d = dy2d.to(x.dtype)
        dx = dw = dbias = dA = dB = dm = dot = None
        dyb = None  # dY' @ B
        stats = _stats_ops(dy2d)
        dy_g = None  # dY' = g * dY, in dY's dtype: what the DoRA output's backward hands the LoRA linear
        if need_x or need_a or need_b or need_w:
            dy_g, dot = stats.scale_columns(dy2d, g, y2d if need_m else None, bias, partials=True)
        elif need_m:
            dot = stats.column_dot(dy2d, y2d, bias, partials=True)
        if need_x:
            dx2d, dyb = ops.lora_backward_dx(dy_g, weight, lora_A, lora_B, s, store_dyb=need_a)
            dx = dx2d.reshape(x.shape) if flat else dx2d
        elif need_a:
            dyb = ops.lora_shrink(dy_g, lora_B.t())
        if need_a or need_b:
            dA, dB = ops.lora_grad_ab(x2d, dy_g, xa, dyb, s, lora_A.dtype, lora_B.dtype, need_a=need_a,
                                      need_b=need_b)
        if need_m:  # dot / m, with z recomputed where m == 0 (y holds none there), on the device
            dm = stats.magnitude_grad(dot, magnitude, weight_norm, dy2d, x2d, weight, lora_A, lora_B, s)
        if need_w:
            dw = (dy_g.t() @ x2d).to(weight.dtype)
        if need_bias and bias is not None:
            dbias = dy2d.sum(0, dtype=torch.promote_types(dy2d.dtype, torch.float32)).to(bias.dtype)
        return dx, dw, dbias, dA, dB, dm, None, None, None


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p=0.0, training=False):
    """Fused DoRA linear with PEFT's semantics (module docstring): differentiable in x, A, B, magnitude, bias.

    x: [..., K]; weight: [N, K]; bias: [N] or None; lora_A: [r, K]; lora_B: [N, r] (x's dtype, or fp32 on a half
    x; one device); magnitude: [N] (any float dtype, x's device); scaling: float; dropout_p in [0, 1), used when `training`.
    The weight norm ||W + s * B @ A||_row is recomputed from the current A and B on every call, and detached.
    Under torch.autocast, x, weight, bias, A and B are cast as lora_linear casts them (magnitude keeps its dtype).
    Returns y: [..., N].

    Under torch.compile it is traced without a graph break: the norm is the `lora_fast::dora_norm` op, g = m / norm
    and g * z + b are graph ops around `lora_linear`'s op for z = x @ W^T + s * (x @ A^T) @ B^T. That saves z
    ([M, N], one tensor more than the eager path, which recovers it from y) for the magnitude's gradient, rounds z
    to x's dtype before the scale, and needs no host read for zero magnitudes. With dropout in training, as in the
    eager path, y = (x - drop(x)) @ W^T + b + g * z(drop(x)), drop being torch's own dropout in the graph (its
    mask comes from torch's generator, not from the kernels' Philox stream as eagerly).

    >>> m = dora_weight_norm(W, A, B, 2.0).requires_grad_()          # DoRA's init: g = 1
    >>> y = dora_linear(x, W, b, A, B, m, scaling=2.0, dropout_p=0.05, training=True)
    >>> y.sum().backward()                                          # grads in x, A, B, m
    """
    return compile_dispatch(_dora_linear_traced, _dora_linear_eager, x, weight, bias, lora_A, lora_B, magnitude,
                            scaling, dropout_p, training)


def _dora_checked(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training):
    """dora_linear's operands after autocast and its checks: (x, weight, bias, A, B in x's dtype, scaling, p)."""
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    scaling, dropout_p = check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    check_vector_param("magnitude", magnitude, weight.shape[0], x)
    # fp32 adapters on a half x (PEFT's habit) run in x's dtype; their gradients come back in fp32.
    return x, weight, bias, lora_A.to(x.dtype), lora_B.to(x.dtype), scaling, (dropout_p if training else 0.0)


def _dora_linear_traced(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training):
    """dora_linear under torch.compile (its docstring)."""
    x, weight, bias, lora_A, lora_B, scaling, p = _dora_checked(x, weight, bias, lora_A, lora_B, magnitude,
                                                                scaling, dropout_p, training)
    norm = torch.ops.lora_fast.dora_norm(weight.detach(), lora_A.detach(), lora_B.detach(), scaling)
    g = magnitude.to(norm.dtype) / norm
    xd = F.dropout(x, p, training=True) if p > 0.0 else x
    y = lora_linear(xd, weight, None, lora_A, lora_B, scaling).to(norm.dtype) * g
    if p > 0.0:  # the base path keeps the undropped x (PEFT's DoRA): add (x - drop(x)) @ W^T
        y = y + F.linear(x - xd, weight).to(norm.dtype)
    if bias is not None:
        y = y + bias.to(norm.dtype)
    return y.to(x.dtype)


def _dora_linear_eager(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training):
    x, weight, bias, lora_A, lora_B, scaling, p = _dora_checked(x, weight, bias, lora_A, lora_B, magnitude,
                                                                scaling, dropout_p, training)
    norm, g = _dora_scale(weight, lora_A, lora_B, scaling, magnitude)
    if p == 0.0:
        return DoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, magnitude, g, norm, scaling)
    x2d = x.reshape(-1, x.shape[-1])
    seed = draw_seed(x)
    if use_triton(x):
        from .kernels import dropout_mask

        keep = dropout_mask(seed, x2d.shape[0], x2d.shape[1], p, x.device)
    else:
        keep = dropout_mask_torch(seed, x2d.shape[0], x2d.shape[1], p, x.device)
    xd = torch.where(keep, x2d * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))
    y2d = F.linear(x2d - xd, weight, bias) + DoRALinearFunction.apply(xd, weight, None, lora_A, lora_B, magnitude,
                                                                       g, norm, scaling)
    return y2d.reshape(*x.shape[:-1], weight.shape[0])



class DoRALinear(LoRALinear):
    """DoRA on a frozen linear: LoRALinear's A, B, scaling, dropout and init, plus a trained magnitude
    `lora_magnitude` [out] initialised to ||W + s * B @ A||_row (so the output at init equals LoRA's).

    Same constructor and `from_linear` as LoRALinear. State-dict keys: weight, bias, lora_A, lora_B, lora_magnitude.
    merge() writes g * (W + s * B @ A) into `weight`; unmerge() restores W (within the dtype's rounding).

    >>> layer = DoRALinear.from_linear(linear, rank=16, alpha=32, dropout=0.05)
    >>> layer(x).sum().backward()           # grads in layer.lora_A, lora_B, lora_magnitude
    >>> layer.merge()
    """

    @torch.no_grad()
    def reset_lora_parameters(self, *args, **kwargs) -> None:
        """LoRALinear's (re)initialisation of A and B, then the magnitude set to the new ||W + s * B @ A||_row."""
        super().reset_lora_parameters(*args, **kwargs)
        self._reset_magnitude()  # again once a base rewrite held back by deferred_base_writes is written

    @torch.no_grad()
    def _reset_magnitude(self) -> None:
        norm = dora_weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling).to(self.weight.dtype)
        if "lora_magnitude" in self._parameters:
            self.lora_magnitude.copy_(norm)
        else:
            self.lora_magnitude = nn.Parameter(norm)

    def _write_deferred_base(self) -> None:
        """The base rewrite of "pissa" / "nonzero" (lora_fast.init.deferred_base_writes), then the magnitude from
        the rewritten W, as reset_lora_parameters computes it without deferral."""
        if self._base_pending:
            super()._write_deferred_base()
            self._reset_magnitude()

    adapter_variant = "dora"  # count_parameters' variant name

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().adapter_state_dict(), "lora_magnitude": self.lora_magnitude}

    def _merged_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(g * (W + s * B @ A) in fp32, g [N] fp32) from the unmerged weight."""
        w = self.weight.float() + self.lora_B.float() @ self.lora_A.float() * self.scaling
        g = self.lora_magnitude.float() / w.norm(dim=1)
        return w * g[:, None], g

    def delta_weight(self) -> torch.Tensor:
        """merged - W = g * (W + s * B @ A) - W [out, in], in the weight's dtype (computed from the unmerged W)."""
        if self.merged:
            raise ValueError("delta_weight of a merged DoRALinear: unmerge() first")
        return (self._merged_weight()[0] - self.weight.float()).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """weight <- g * (W + s * B @ A), g from the current magnitude and norm (kept for unmerge)."""
        if self.merged:
            return
        merged, g = self._merged_weight()
        self._merge_scale = g
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """weight <- merged / g - s * B @ A with merge()'s g (the norm of the merged weight differs)."""
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight())
        self.merged = False

    def _unmerged_weight(self) -> torch.Tensor:
        w = self.weight.float() / self._merge_scale[:, None] - self.lora_B.float() @ self.lora_A.float() * self.scaling
        return w.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return dora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_magnitude, self.scaling,
                           self.dropout, self.training)


def apply_dora(model: nn.Module, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), rank: int = 8,
               alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False, init: str = "default",
               pissa_niter: int | None = None, deltas=None) -> nn.Module:
    """Replace the matching nn.Linear modules of `model` by DoRALinear (sharing their weights), train lora_A,
    lora_B and lora_magnitude (other variants' adapters keep their requires_grad; every base parameter is frozen:
    lora_fast.layers.freeze_base), and return `model` (changed in place). target_modules as in apply_lora;
    init, pissa_niter and deltas ({module name: dW} for init="from_delta") as in apply_lora (the magnitude then
    starts at the row norms of W + s * B @ A, so that the output at init is LoRA's under that init).

    >>> model = apply_dora(model, ["q_proj", "v_proj"], rank=16, alpha=32)
    """
    from collections import abc

    from .init import check_init

    check_rank(rank)  # before any layer is swapped: a bad option leaves the model unchanged
    check_scaling(alpha, "alpha")
    check_dropout(dropout, "dropout")
    check_init(init)
    if (deltas is not None) != (init == "from_delta"):
        raise ValueError("deltas={module name: dW} goes with init='from_delta' and only with it")
    if deltas is not None and not isinstance(deltas, abc.Mapping):
        raise TypeError(f"deltas must be a mapping {{module name: dW}}, got {type(deltas).__name__}")

    found = matching_linears(model, target_modules)
    check_targets(found, rank, init, deltas)  # every layer, before any is built (replace_linears: all or nothing)

    def make(name, lin):
        return DoRALinear.from_linear(lin, rank, alpha, dropout, use_rslora, init,
                                      None if deltas is None else deltas[name], pissa_niter)

    return replace_linears(model, target_modules, make, trainable=("lora_A", "lora_B", "lora_magnitude"),
                           found=found)
