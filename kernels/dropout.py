"""The dropout mask the LoRA kernels draw, materialised: for tests, benchmarks and debugging only.

The kernels never store it; they regenerate it from (seed, m, k) with helpers.dropout_keep.
"""
import torch
import triton
import triton.language as tl

from .helpers import cdiv, check_dropout, dropout_keep, dropout_threshold, seed_arg


@triton.jit(do_not_specialize=["M", "seed", "keep_thr"])
def _dropout_mask_kernel(OUT, M, K, seed, keep_thr, K8, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT: [M, K] int8, 1 where kept. grid = (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K))."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, offs_m, k0, K8, keep_thr, BLOCK_M, BLOCK_K)
    tl.store(OUT + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def dropout_mask(seed, M: int, K: int, p: float, device) -> torch.Tensor:
    """Bool keep-mask [M, K] that the kernels use for `seed` (an int, or a one-element int64 tensor on `device`)
    and dropout probability `p`.

    >>> keep = dropout_mask(1234, 8, 64, 0.1, "cuda")
    """
    check_dropout(p, seed, device)
    for name, n in (("M", M), ("K", K)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    out = torch.empty((M, K), device=device, dtype=torch.int8)
    if M and K:
        grid = (cdiv(M, 16), cdiv(K, 64))
        _dropout_mask_kernel[grid](out, M, K, seed_arg(seed), dropout_threshold(p), cdiv(K, 8),
                                   BLOCK_M=16, BLOCK_K=64)
    return out.bool()
