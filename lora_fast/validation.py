"""Argument checks shared by every public entry point.

Each failure names the argument and says what was expected: TypeError for a wrong type or dtype, ValueError
for a wrong shape, device or value. Nothing reaches a kernel unchecked.
"""
import numbers

import torch

# the scalar, flag and dtype checks live with the launchers, which run them too
from .kernels.helpers import FLOAT_DTYPES, check_dtype, check_flag, check_scaling  # noqa: F401
from .kernels.helpers import check_dropout_p as check_dropout  # noqa: F401


def check_tensor(name: str, t, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_same(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """`t` has `ref`'s dtype and device."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: all operands must share one dtype")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: all operands must share one device")


def check_adapter_dtype(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """An adapter matrix has x's dtype, or is fp32 on an fp16/bf16 x (PEFT keeps adapters in fp32 on a half
    base; the callers cast the small adapter down to x's dtype rather than x up), on x's device."""
    if t.dtype != x.dtype and not (t.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: an adapter must have x's dtype, or be "
                        f"float32 on a float16/bfloat16 x")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all operands must share one device")


def check_rank(rank, name: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"{name} must be >= 1, got {rank}")
    return int(rank)


def check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training):
    """Checks of `lora_fast.lora_linear`; returns (scaling, dropout_p) as floats."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    check_same("weight", weight, x, "x")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        check_adapter_dtype(name, t, x)
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight [N, K] has K={in_features}")
    rank = lora_A.shape[0]
    if rank < 1:
        raise ValueError("lora_A [r, K] has rank r=0: the rank must be >= 1")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must be [r, K] = [{rank}, {in_features}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must be [N, r] = [{out_features}, {rank}], got {tuple(lora_B.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("bias", bias, x, "x")
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must be [N] = [{out_features}], got {tuple(bias.shape)}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    return check_scaling(scaling), check_dropout(dropout_p)


def check_vector_param(name: str, v, length: int, x: torch.Tensor) -> torch.Tensor:
    """A per-row or per-output vector (DoRA's magnitude, VeRA's lambdas): 1-D [length], float, on x's device.
    Its dtype may differ from x's (kernels upcast it), e.g. fp32 trainable vectors on a bf16 model."""
    check_tensor(name, v, ndim=1)
    if v.shape[0] != length:
        raise ValueError(f"{name} must be [{length}], got {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{name} is on {v.device} but x is on {x.device}: all operands must share one device")
    return v


def check_target_modules(model, target_modules) -> None:
    """`model` an nn.Module and `target_modules` a list of module names/suffixes or one valid regex string."""
    import re
    from collections.abc import Iterable

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules is not a valid regex: {e}") from None
    elif not isinstance(target_modules, Iterable) or iter(target_modules) is target_modules:
        # A one-shot iterator (a generator) would be used up by this check and then match nothing.
        raise TypeError(f"target_modules must be a regex string or a list of module names, got {target_modules!r}")
    elif not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be a regex string or a list of module names, got {target_modules!r}")
