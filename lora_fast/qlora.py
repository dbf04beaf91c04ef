"""QLoRA: LoRA on a frozen base weight stored in NF4 (`lora_fast.nf4`), with the 4-bit decode fused into the kernels.

    y = x @ deq(Wq)^T + b + s * (drop(x) @ A^T) @ B^T

`qlora_linear` is the autograd Function's entry point; `LoRALinear4bit` is the module (`apply_lora(...,
quantize="nf4")` builds it). Dispatch follows `lora_fast.functional`: CUDA (and CPU under TRITON_INTERPRET=1)
runs the NF4 kernels (`kernels.lora_nf4_forward` / `lora_nf4_backward_dx`, dA and dB by `lora_grad_ab`);
other CPU tensors dequantize W and run the plain-PyTorch path (`lora_fast.naive`), with the same dropout mask.
Under torch.compile the call goes through the `lora_fast::qlora_forward` op (`lora_fast.ops`): no graph break.

State-dict keys of a LoRALinear4bit: `qweight` [N, K // 2] uint8, `absmax` [N, K // 64] (fp32, or uint8 with
`absmax_code` [256], `absmax_scale`, `absmax_offset`, `absmax_group` when double-quantized), `bias` [N],
`lora_A` [r, K], `lora_B` [N, r]. A merged layer's state dict holds the NF4 base from before merge() (loading it
into a fresh layer does not apply the adapter twice; `lora_fast.merging`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import naive
from .functional import autocast_inputs, compile_dispatch, draw_seed, lora_backward, use_triton
from .merging import SavesUnmerged
from .nf4 import (ABSMAX_GROUP, NF4_BLOCK, NF4Tensor, check_nf4_shape, check_nf4_tensor, from_bnb, quantize_nf4,
                  roundtrip_error)
from .validation import check_adapter_dtype, check_dropout, check_flag, check_rank, check_scaling, check_tensor

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _NaiveNF4:
    """The NF4 launchers' signatures on the plain-PyTorch path: dequantize W, then `lora_fast.naive`."""

    @staticmethod
    def lora_nf4_forward(x, w4, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, store_xa=False):
        return naive.lora_forward(x, w4.dequantize(x.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed,
                                  store_xa=store_xa)

    @staticmethod
    def lora_nf4_backward_dx(dy, w4, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, store_dyb=True):
        return naive.lora_backward_dx(dy, w4.dequantize(dy.dtype), lora_A, lora_B, scaling, dropout_p, seed,
                                      store_dyb=store_dyb)

    lora_shrink = staticmethod(naive.lora_shrink)
    lora_grad_ab = staticmethod(naive.lora_grad_ab)


def _nf4_ops(x: torch.Tensor):
    """The launchers for x's device: `lora_fast.kernels` (Triton) or `_NaiveNF4` (plain PyTorch)."""
    if use_triton(x):
        from . import kernels

        return kernels
    return _NaiveNF4


class QLoRALinearFunction(torch.autograd.Function):
    """y = x @ deq(Wq)^T + b + s * (drop(x) @ A^T) @ B^T; W frozen (no gradient), see `qlora_linear`.

    Saves x, A, B, xa = drop(x) @ A^T (when B needs a gradient) and a reference to the NF4 weight (no copy).
    """

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, w4, scaling, dropout_p, seed):
        x2d = x.reshape(-1, x.shape[-1])
        y2d, xa = _nf4_ops(x).lora_nf4_forward(x2d, w4, bias, lora_A, lora_B, scaling, dropout_p, seed,
                                               store_xa=ctx.needs_input_grad[3])
        ctx.save_for_backward(x, lora_A, lora_B, xa)
        ctx.w4, ctx.scaling, ctx.dropout_p, ctx.seed = w4, scaling, dropout_p, seed
        ctx.has_bias = bias is not None
        return y2d.reshape(*x.shape[:-1], w4.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, xa = ctx.saved_tensors
        need_x, need_bias, need_a, need_b = ctx.needs_input_grad[:4]
        dx, _, dbias, dA, dB = lora_backward(_NF4Backward(_nf4_ops(x)), dy, x, ctx.w4, lora_A, lora_B, xa,
                                             ctx.scaling, ctx.dropout_p, ctx.seed, ctx.has_bias,
                                             (need_x, False, need_bias, need_a, need_b))
        return dx, dbias, dA, dB, None, None, None, None


class _NF4Backward:
    """`functional.lora_backward`'s launchers with the NF4 weight in W's place (W is frozen: no dW)."""

    def __init__(self, ops):
        self.ops = ops

    def lora_backward_dx(self, dy, w4, *args, **kwargs):
        return self.ops.lora_nf4_backward_dx(dy, w4, *args, **kwargs)

    @staticmethod
    def dx_term_in_grad_ab(m, rank, dropout_p):
        return False  # the NF4 dX adds its dropout term itself (kernels.lora_nf4_backward_dx has no dropout_term)

    def __getattr__(self, name):
        return getattr(self.ops, name)


def check_qlora_args(x, w4, bias, lora_A, lora_B, scaling, dropout_p, training):
    """Checks of `qlora_linear`, each naming its argument; returns (scaling, dropout_p)."""
    check_nf4_tensor(w4, "weight")  # O(1): the fields' dtypes, shapes and devices, no tensor read
    check_tensor("x", x, min_ndim=1)
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32 for the NF4 kernels, got {x.dtype}")
    N, K = w4.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but the NF4 weight [N, K] has K={K}")
    if x.device != w4.device:
        raise ValueError(f"x is on {x.device} but the NF4 weight is on {w4.device}: move the module first")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        check_tensor(name, t, ndim=2)
        check_adapter_dtype(name, t, x)
    rank = lora_A.shape[0]
    if rank < 1 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be [r, K] = [r >= 1, {K}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, rank):
        raise ValueError(f"lora_B must be [N, r] = [{N}, {rank}], got {tuple(lora_B.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.dtype != x.dtype or bias.device != x.device or bias.shape[0] != N:
            raise ValueError(f"bias must be [{N}] {x.dtype} on {x.device}, got {tuple(bias.shape)} {bias.dtype} "
                             f"on {bias.device}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    return check_scaling(scaling), check_dropout(dropout_p)


def qlora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False):
    """QLoRA linear: `x @ deq(weight)^T + bias + scaling * (dropout(x) @ lora_A^T) @ lora_B^T`.

    x: [..., K] fp16/bf16/fp32; weight: `NF4Tensor` of shape (N, K) on x's device (frozen: no gradient);
    bias: [N] in x's dtype or None; lora_A: [r, K], lora_B: [N, r] in x's dtype (or fp32 on a half x).
    Returns y: [..., N] in x's dtype; differentiable in x, bias, lora_A and lora_B.

    >>> w4 = quantize_nf4(linear.weight)
    >>> y = qlora_linear(x, w4, linear.bias, A, B, scaling=2.0, dropout_p=0.05, training=True)
    """
    x, bias, lora_A, lora_B = autocast_inputs(x, bias, lora_A, lora_B)
    scaling, dropout_p = check_qlora_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    p = dropout_p if training else 0.0
    return compile_dispatch(_qlora_linear_traced, _qlora_linear_eager, x, weight, bias, lora_A, lora_B, scaling, p)


def _qlora_linear_eager(x, weight, bias, lora_A, lora_B, scaling, p):
    seed = draw_seed(x) if p > 0.0 else 0
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B)):
        return QLoRALinearFunction.apply(x, bias, lora_A, lora_B, weight, scaling, p, seed)
    y2d, _ = _nf4_ops(x).lora_nf4_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling, p,
                                          seed)
    return y2d.reshape(*x.shape[:-1], weight.shape[0])


def _qlora_linear_traced(x, weight, bias, lora_A, lora_B, scaling, p):
    """While torch.compile traces: the `lora_fast::qlora_forward` op (no graph break; `lora_fast.ops`)."""
    from .ops import qlora_linear_op

    return qlora_linear_op(x, weight, bias, lora_A, lora_B, scaling, p)



def _check_options(rank, alpha, dropout, compute_dtype, use_rslora, double_quant) -> None:
    """LoRALinear4bit's scalar options, each named when wrong."""
    check_rank(rank)
    check_scaling(alpha, "alpha")
    check_dropout(dropout, "dropout")
    if compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be float16, bfloat16 or float32, got {compute_dtype}")
    check_flag(use_rslora, "use_rslora")
    check_flag(double_quant, "double_quant")


# Buffers whose dtype is part of the format: module.to(dtype) must move them but never cast them.
_FIXED_DTYPE_BUFFERS = ("qweight", "absmax", "absmax_code", "absmax_scale", "absmax_offset", "absmax_group")


class LoRALinear4bit(SavesUnmerged, nn.Module):
    """LoRA on a frozen NF4 base: y = x @ deq(Wq)^T + b + scaling * (dropout(x) @ A^T) @ B^T.

    Args: in_features (a multiple of 64), out_features, rank, alpha (scaling = alpha / r, or alpha / sqrt(r)
    with use_rslora), dropout, bias, double_quant (quantize the absmax too), compute_dtype (x, the bias and the
    adapters' working dtype: inputs are cast to it and outputs cast back), device.
    The base starts at zero: build it with `from_linear` (or `load_state_dict`). `quant_error` holds the
    round-trip error ||W - deq(Wq)|| / ||W|| of the quantization, `merge_error` that of the last merge().

    >>> layer = LoRALinear4bit.from_linear(linear, rank=16, alpha=32, dropout=0.05)   # linear: nn.Linear
    >>> y = layer(x)                                 # x: [..., in_features]
    >>> torch.save(layer.state_dict(), "layer.pt")   # 4.5 bits per base weight
    """

    adapter_variant = "lora"

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, double_quant: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        check_rank(in_features, "in_features")
        check_rank(out_features, "out_features")
        check_nf4_shape((out_features, in_features), "in_features")
        _check_options(rank, alpha, dropout, compute_dtype, use_rslora, double_quant)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.rank = check_rank(rank)
        self.alpha = check_scaling(alpha, "alpha")
        self.dropout = check_dropout(dropout, "dropout")
        self.use_rslora = use_rslora
        self.compute_dtype = compute_dtype
        self.merged, self.quant_error, self.merge_error = False, None, None
        self._unmerged = None
        N, K = self.out_features, self.in_features
        blocks = N * K // NF4_BLOCK
        self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(N, K // NF4_BLOCK, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_code", torch.zeros(256, device=device))
            self.register_buffer("absmax_scale", torch.zeros(math.ceil(blocks / ABSMAX_GROUP), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
            self.register_buffer("absmax_group", torch.tensor(ABSMAX_GROUP, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(N, K // NF4_BLOCK, device=device))
        kw = {"device": device, "dtype": compute_dtype}
        self.bias = nn.Parameter(torch.zeros(N, **kw), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(self.rank, K, **kw))
        self.lora_B = nn.Parameter(torch.zeros(N, self.rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default: B = 0, the output starts at base
        self._refresh_scalars()
        self.register_load_state_dict_post_hook(self._refresh_scalars)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @property
    def double_quant(self) -> bool:
        return getattr(self, "absmax_code", None) is not None

    @property
    def weight4(self) -> NF4Tensor:
        """The base weight as an NF4Tensor view of this module's buffers (no copy)."""
        dq = self.double_quant
        return NF4Tensor(self.qweight, self.absmax, (self.out_features, self.in_features), self.compute_dtype,
                         self.absmax_code if dq else None, self.absmax_scale if dq else None,
                         *self._dq_scalars)

    def _refresh_scalars(self, *_) -> None:
        """Cache absmax_offset and absmax_group as Python numbers: reading the 0-d buffers on every forward
        would sync the GPU (and break CUDA-graph capture). Called after set_base and load_state_dict."""
        dq = self.double_quant
        self._dq_scalars = (float(self.absmax_offset) if dq else 0.0, int(self.absmax_group) if dq else ABSMAX_GROUP)

    @torch.no_grad()
    def set_base(self, w4: NF4Tensor) -> None:
        """Copy an NF4 weight into the buffers (its shape and double-quantization must match this module's)."""
        check_nf4_tensor(w4, "w4")
        if tuple(w4.shape) != (self.out_features, self.in_features) or w4.double_quant != self.double_quant:
            raise ValueError(f"NF4 weight {tuple(w4.shape)} (double_quant={w4.double_quant}) does not fit this "
                             f"layer ({self.out_features}, {self.in_features}) (double_quant={self.double_quant})")
        for name, t in w4.state_dict().items():
            buf = getattr(self, name)
            if buf.shape != t.shape:
                raise ValueError(f"{name} must have shape {list(buf.shape)}, got {list(t.shape)}")
            buf.copy_(t)
        self._refresh_scalars()

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                    compute_dtype: torch.dtype = torch.bfloat16, use_rslora: bool = False,
                    double_quant: bool = False) -> "LoRALinear4bit":
        """Quantize `linear`'s weight to NF4 (an nn.Linear), or import a bitsandbytes Linear4bit as it is.

        The bias is copied in compute_dtype; `quant_error` reports the quantization's round-trip error.
        """
        is_bnb = getattr(getattr(linear, "weight", None), "quant_state", None) is not None
        if not is_bnb and not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear or a bitsandbytes Linear4bit, got {type(linear).__name__}")
        _check_options(rank, alpha, dropout, compute_dtype, use_rslora, double_quant)  # before quantizing W
        w = linear.weight
        out_features, in_features = (int(d) for d in (w.quant_state.shape if is_bnb else w.shape))
        w4 = from_bnb(linear, compute_dtype) if is_bnb else quantize_nf4(w, double_quant, compute_dtype)
        layer = cls(in_features, out_features, rank, alpha, dropout, linear.bias is not None, use_rslora,
                    w4.double_quant, compute_dtype, device=w.device)
        layer.set_base(w4)
        layer.quant_error = w4.error
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def quantized_numel(self) -> int:
        """Elements of the frozen base weight, which this module holds quantized in buffers rather than as a
        parameter (`count_parameters` adds them to the total)."""
        return self.out_features * self.in_features

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A [out, in] in fp32."""
        return self.lora_B.float() @ self.lora_A.float() * self.scaling

    @torch.no_grad()
    def merge(self) -> float:
        """Fold the adapter into the NF4 base by re-quantizing deq(Wq) + s * B @ A. Returns (and keeps in
        `merge_error`) the error this adds, ||deq(Wq') - (deq(Wq) + s B A)|| / ||deq(Wq) + s B A||. The
        unmerged base is kept, so `unmerge()` restores it bit for bit."""
        if self.merged:
            return self.merge_error
        w4 = self.weight4
        target = w4.dequantize(torch.float32) + self.delta_weight()
        merged = quantize_nf4(target, w4.double_quant, self.compute_dtype, report_error=False)
        self._unmerged = {k: v.clone() for k, v in w4.state_dict().items()}
        self.set_base(merged)
        self.merge_error = roundtrip_error(target, merged)
        self.merged = True
        return self.merge_error

    def _after_state_load(self) -> None:
        self._refresh_scalars()  # the loaded absmax_offset / absmax_group, before a merge re-reads the base

    def _unmerged_state(self) -> dict[str, torch.Tensor]:
        """The NF4 buffers from before merge() (the state dict of a merged layer holds them: lora_fast.merging)."""
        return {k: v.to(getattr(self, k).device) for k, v in self._unmerged.items()}

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): the NF4 base from before the merge comes back exactly."""
        if not self.merged:
            return
        for name, t in self._unmerged.items():
            getattr(self, name).copy_(t)
        self._refresh_scalars()
        self._unmerged, self.merged = None, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, min_ndim=1)
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if self.merged:  # the adapter lives in the base now: a zero scaling adds nothing for it; gradients still
            # reach x (and a trainable bias), as through a merged LoRALinear, and none reach the adapter (detached)
            y = qlora_linear(x, self.weight4, bias, self.lora_A.detach(), self.lora_B.detach(), 0.0)
        else:
            y = qlora_linear(x, self.weight4, bias, self.lora_A, self.lora_B, self.scaling, self.dropout,
                             self.training)
        return y.to(in_dtype)

    def _apply(self, fn, recurse=True):
        # module.to(dtype) / .half() would cast the fp32 absmax and code tables: move those, never cast them.
        fixed = {id(b) for n, b in self._buffers.items() if n in _FIXED_DTYPE_BUFFERS and b is not None}

        def move_only(t):
            return t.to(fn(t.reshape(-1)[:0]).device) if id(t) in fixed else fn(t)

        return super()._apply(move_only, recurse)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"bias={self.bias is not None}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}, merged={self.merged}")
