"""Textbook multi-adapter LoRA, one token at a time, in float64: what every kernel and test compares against.

    Y[t] = X[t]·Wᵀ + b + s[a]·(X[t]·A[a, :r_a]ᵀ)·B[a, :, :r_a]ᵀ,  a = adapter_ids[t] (skipped when a == -1)
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch


def multi_lora_linear_reference(x, weight, bias, lora_A_stack, lora_B_stack, scalings, adapter_ids, ranks=None,
                                slice_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Per-token reference in float64 (returns float64).

    x: [..., K]; weight: [N, K]; bias: [N] or None; lora_A_stack: [S, R, K] or [S, slices, R, K];
    lora_B_stack: [S, N, R]; scalings: [S] (tensor or list); adapter_ids: ints with x's leading shape (-1 = base);
    ranks: [S] true ranks (default R); slice_sizes: output widths of the slices (default (N,)).
    """
    A = lora_A_stack if lora_A_stack.dim() == 4 else lora_A_stack.unsqueeze(1)
    A, B, W = A.double().cpu(), lora_B_stack.double().cpu(), weight.double().cpu()
    N, R = W.shape[0], A.shape[2]
    scal = torch.as_tensor(scalings, dtype=torch.float64).cpu().reshape(-1)
    ranks = [R] * A.shape[0] if ranks is None else [int(r) for r in torch.as_tensor(ranks).reshape(-1)]
    offsets = [0, *itertools.accumulate(slice_sizes or (N,))]
    x2d = x.reshape(-1, x.shape[-1]).double().cpu()
    ids = [int(i) for i in torch.as_tensor(adapter_ids).reshape(-1)]
    y = x2d @ W.T
    if bias is not None:
        y = y + bias.double().cpu()
    for t, a in enumerate(ids):
        if a < 0:
            continue
        r = ranks[a]
        for i in range(len(offsets) - 1):
            xa = (x2d[t] @ A[a, i, :r].T) * scal[a]
            y[t, offsets[i]:offsets[i + 1]] += B[a, offsets[i]:offsets[i + 1], :r] @ xa
    return y.reshape(*x.shape[:-1], N)
