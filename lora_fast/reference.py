"""The textbook LoRA linear in plain PyTorch, unfused: what tests and benchmarks compare against.

    y = base(x) + lora_B(lora_A(dropout(x))) * scaling

This is how PEFT's `lora.Linear` computes it: it allocates x@A^T, the [M, N] LoRA output, its scaled copy and,
with dropout, a dropped copy of x.
"""
import math

import torch.nn.functional as F
from torch import nn


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False,
                          dropout_mask=None):
    """x: [..., K], weight: [N, K], bias: [N] or None, lora_A: [r, K], lora_B: [N, r] -> [..., N].

    dropout_mask: optional bool keep-mask of x's shape (flattened to [M, K] is accepted too); when given it
    replaces torch's own dropout, so the result can be compared with the kernels' for the same mask.

    >>> y = lora_linear_reference(x, W, b, A, B, 2.0)
    """
    dropped = x
    if training and dropout_p > 0.0:
        if dropout_mask is None:
            dropped = F.dropout(x, dropout_p, training=True)
        else:
            keep = dropout_mask.reshape(x.shape)
            dropped = x * keep.to(x.dtype) / (1.0 - dropout_p)
    return F.linear(x, weight, bias) + F.linear(F.linear(dropped, lora_A), lora_B) * scaling


class ReferenceLoRALinear(nn.Module):
    """PEFT-style unfused LoRA layer: `base`, `lora_A`, `lora_B` are nn.Linear, `lora_dropout` an nn.Dropout."""

    def __init__(self, in_features, out_features, rank=8, alpha=16, dropout=0.0, bias=True, use_rslora=False,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.base = nn.Linear(in_features, out_features, bias=bias, **kw)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
