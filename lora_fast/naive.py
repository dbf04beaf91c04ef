"""Plain-PyTorch implementations with the kernels' signatures and numerics: the CPU path.

Each function mirrors its launcher in `lora_fast.kernels` (same arguments, same outputs, the same Philox
dropout mask), so the autograd Function runs the same code on either. The textbook module that tests and
benchmarks compare against is `lora_fast.reference`, not this.
"""
import torch

from .philox import dropout_mask_torch


def _drop(x, dropout_p, seed):
    if dropout_p <= 0.0:
        return x
    keep = dropout_mask_torch(seed, x.shape[0], x.shape[1], dropout_p, x.device)
    return torch.where(keep, x * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=x.dtype))


def lora_shrink(x, lora_A, dropout_p=0.0, seed=0):
    """xa = drop(x) @ A^T; x: [M, K], lora_A: [r, K] -> [M, r]."""
    return _drop(x, dropout_p, seed) @ lora_A.t()


def lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, store_xa=False, xa_mode="auto",
                 out=None, out_scale=None):
    """(y [M, N], xa [M, r] or None) = (g * (x @ W^T + s * xa @ B^T) + b, drop(x) @ A^T); g = out_scale or 1."""
    xa = lora_shrink(x, lora_A, dropout_p, seed)
    if out_scale is None:
        y = torch.nn.functional.linear(x, weight, bias) + (xa * scaling) @ lora_B.t()
    else:
        y = ((torch.nn.functional.linear(x, weight) + (xa * scaling) @ lora_B.t()) * out_scale).to(x.dtype)
        y = y if bias is None else y + bias
    if out is not None:
        y = out.copy_(y)
    return y, (xa if store_xa else None)


def lora_backward_dx(dy, weight, lora_A, lora_B, scaling, dropout_p=0.0, seed=0, store_dyb=True, dyb_mode="auto",
                     out=None, dy_scale=None):
    """(dx [M, K], dyb [M, r]) = (dy @ W + s * drop'(dyb @ A), dy @ B), dy first scaled by dy_scale [N] if given."""
    if dy_scale is not None:
        dy = (dy * dy_scale).to(dy.dtype)
    dyb = dy @ lora_B
    low = _drop((dyb * scaling) @ lora_A, dropout_p, seed)
    dx = dy @ weight + low
    if out is not None:
        dx = out.copy_(dx)
    return dx, (dyb if store_dyb else None)


def lora_grad_ab(x, dy, xa, dyb, scaling, a_dtype, b_dtype, dropout_p=0.0, seed=0, need_a=True, need_b=True):
    """(dA [r, K], dB [N, r]) = (s * dyb^T @ drop(x), s * dy^T @ xa)."""
    dA = ((dyb.t() @ _drop(x, dropout_p, seed)) * scaling).to(a_dtype) if need_a else None
    dB = ((dy.t() @ xa) * scaling).to(b_dtype) if need_b else None
    return dA, dB


def dora_norm(weight, lora_A, lora_B, scaling, magnitude):
    """(||W + s * B @ A||_row, magnitude / norm), fp32 (fp64 for fp64): kernels.dora_norm, on the merged weight."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    norm = (weight.to(acc) + scaling * (lora_B.to(acc) @ lora_A.to(acc))).norm(dim=1)
    return norm, magnitude.to(acc) / norm


def column_dot(u, v, bias=None, partials=False):
    """sum_m u[m, n] * (v[m, n] - bias[n]) in fp32 (fp64 for fp64): [N], or [1, N] with partials; kernels.column_dot."""
    acc = torch.promote_types(u.dtype, torch.float32)
    v = v.to(acc) if bias is None else v.to(acc) - bias.to(acc)
    out = (u.to(acc) * v).sum(0)
    return out[None] if partials else out


def scale_columns(u, g, v=None, bias=None, partials=False):
    """(u * g rounded to u's dtype, column_dot(u, v, bias, partials) or None); kernels.scale_columns."""
    acc = torch.promote_types(u.dtype, torch.float32)
    return (u.to(acc) * g.to(acc)).to(u.dtype), (column_dot(u, v, bias, partials) if v is not None else None)


def magnitude_grad(partials, magnitude, norm, dy, x, weight, lora_A, lora_B, scaling):
    """DoRA's dm in magnitude's dtype; kernels.magnitude_grad. The zero-magnitude columns' z is recomputed in
    fp32 (fp64 for fp64) after a host read of which columns they are."""
    acc = torch.promote_types(x.dtype, torch.float32)
    m = magnitude.to(acc)
    dm = partials.to(acc).sum(0) / torch.where(m == 0, 1.0, m)
    zero = (m == 0).nonzero().flatten()
    if zero.numel():
        xc = x.to(acc)
        z = xc @ weight[zero].to(acc).t() + scaling * (xc @ lora_A.to(acc).t()) @ lora_B[zero].to(acc).t()
        dm[zero] = (dy[:, zero].to(acc) * z).sum(0) / norm[zero].to(acc)
    return dm.to(magnitude.dtype)
