"""`LoRALinear`, the drop-in module, and model-level helpers (`apply_lora`, `count_parameters`).

State-dict keys of a LoRALinear: `weight` [out, in] and `bias` [out] (the frozen base, as nn.Linear names them),
`lora_A` [r, in] and `lora_B` [out, r]. `scaling` and `dropout` are constructor arguments, not state.
merge() folds s * B @ A into `weight` in place, so save the state dict unmerged (or unmerge first).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .functional import lora_linear
from .validation import check_dropout, check_rank, check_scaling


class LoRALinear(nn.Module):
    """y = x @ W^T + b + scaling * (dropout(x) @ A^T) @ B^T, with W and b frozen and A, B trained.

    Args: in_features, out_features; rank r >= 1; alpha (scaling = alpha / r, or alpha / sqrt(r) with
    use_rslora); dropout in [0, 1) on the LoRA branch's input during training; bias; device; dtype.
    Initialisation follows PEFT: W and b as nn.Linear, A kaiming-uniform (a = sqrt(5)), B zero, so that at
    init the output equals the base linear's.

    >>> layer = LoRALinear(4096, 4096, rank=16, alpha=32, dropout=0.05, device="cuda", dtype=torch.bfloat16)
    >>> y = layer(torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16))
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, device=None, dtype=None):
        super().__init__()
        check_rank(in_features, "in_features")
        check_rank(out_features, "out_features")
        kw = {"device": device, "dtype": dtype}
        base = nn.Linear(in_features, out_features, bias=bias, **kw)
        self._init(base.weight, base.bias, rank, alpha, dropout, use_rslora)

    def _init(self, weight: nn.Parameter, bias: nn.Parameter | None, rank, alpha, dropout, use_rslora) -> None:
        self.rank = check_rank(rank)
        self.alpha = check_scaling(alpha, "alpha")
        self.dropout = check_dropout(dropout, "dropout")
        self.use_rslora = bool(use_rslora)
        self.out_features, self.in_features = weight.shape
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, **kw))
        self.merged = False
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def reset_lora_parameters(self) -> None:
        """PEFT's default: A ~ kaiming-uniform(a = sqrt(5)), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False) -> "LoRALinear":
        """Wrap `linear`, sharing (not copying) its weight and bias, which are frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init(linear.weight, linear.bias, rank, alpha, dropout, use_rslora)
        return layer

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A [out, in], computed in fp32 and returned in the weight's dtype."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight`: forward then costs a plain linear. Rounds in the weight's dtype."""
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self.lora_B.float() @ self.lora_A.float() * self.scaling)
                          .to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W is restored within the rounding of its dtype (fp32: ~1e-7 relative)."""
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.lora_B.float() @ self.lora_A.float() * self.scaling)
                          .to(self.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           self.dropout, self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"bias={self.bias is not None}, use_rslora={self.use_rslora}, merged={self.merged}")


def _matches(name: str, targets: Iterable[str] | str) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, target_modules: Iterable[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
               rank: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """Replace every nn.Linear of `model` whose name matches `target_modules` by a LoRALinear sharing its
    weights, freeze every other parameter, and return `model` (changed in place).

    target_modules: names or name suffixes (["q_proj", "mlp.up_proj"]), or one regex string (full match).

    >>> model = apply_lora(model, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], rank=16, alpha=32)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules is not a valid regex: {e}") from None
    elif not (isinstance(target_modules, Iterable) and all(isinstance(t, str) for t in target_modules)):
        raise TypeError(f"target_modules must be a regex string or a list of module names, got {target_modules!r}")
    check_rank(rank)
    check_dropout(dropout, "dropout")
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and _matches(name, target_modules):
            replaced.append(name)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear.from_linear(module, rank, alpha, dropout, use_rslora))
    if not replaced:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in the model")
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("lora_A") or name.endswith("lora_B"))
    return model


@dataclass
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters of `model` (shared tensors counted once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParameterCount(trainable, total)
