"""LoRA initialisation schemes: `init_lora(weight, rank, scheme, scaling, ...) -> LoRAInit(A, B, weight, error)`.

A LoRA adapter adds `s * B @ A` to a frozen `W [N, K]` (A `[r, K]`, B `[N, r]`, s the scaling). The scheme picks
A and B, and for some schemes a new W:

| scheme | A | B | W | output at init |
|---|---|---|---|---|
| "default" | kaiming-uniform (a=sqrt(5)): U(-1/sqrt(K), 1/sqrt(K)) | 0 | unchanged | = base |
| "gaussian" | N(0, std=1/r) (PEFT's `init_lora_weights="gaussian"`) | 0 | unchanged | = base |
| "nonzero" | kaiming-uniform (a=sqrt(5)) on fan-in K | the same law: U(-1/sqrt(K), 1/sqrt(K)) | W - s*B@A | = base within W's rounding |
| "pissa" | sqrt(S_r/s) * Vh_r | U_r * sqrt(S_r/s) | W - s*B@A (residual) | = base within W's rounding |
| "from_delta" | sqrt(S_r/s) * Vh_r of dW | U_r * sqrt(S_r/s) of dW | unchanged | base + best rank-r dW |

"nonzero" draws both factors small, so that s*B@A is a small change of a kaiming-initialised W (||s*B@A|| / ||W||
~0.07-0.15 at K = N = 2048-4096, r = 16, s = 2): the compensated W stays near W, and the adapter does not have to
undo a large start. (Until 2026-12-02 B was drawn on fan-in r, U(-1/sqrt(r), 1/sqrt(r)): ||s*B@A|| ~1.15 ||W||.)

"zeros" (A = B = 0) is refused: dL/dA = s * B^T (...) and dL/dB = s * (...) A^T are both zero when A = B = 0, so
neither factor ever moves: the adapter never learns.

The SVD of "pissa" / "from_delta" runs in fp32 (fp64 for fp64 weights); `niter=` switches to a randomized SVD
(`torch.svd_lowrank`, Halko et al.) for big matrices. The scaling split (S divided by s before the square root)
is PEFT's, so s*B@A is exactly the top-r part of the SVD whatever alpha is, with or without rsLoRA.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import NamedTuple

import torch
from torch import nn

from .validation import check_flag, check_rank, check_scaling, check_tensor

logger = logging.getLogger("lora_fast")

INIT_SCHEMES = ("default", "gaussian", "nonzero", "pissa", "from_delta")

# Extra columns the randomized SVD samples beyond the rank: 5-10 makes the top-r subspace accurate for matrices
# whose spectrum decays slowly (Halko, Martinsson & Tropp 2011, section 4.2). PEFT's pissa_niter samples none.
SVD_OVERSAMPLE = 8

ZEROS_MESSAGE = ("init='zeros' is refused: with A = 0 and B = 0 the gradients dL/dA = s * B^T (dY^T X) and "
                 "dL/dB = s * dY^T (X A^T) are both exactly zero, so neither factor ever changes and the adapter "
                 "never learns. Use 'default' (A random, B zero) or 'gaussian'.")


class LoRAInit(NamedTuple):
    """What `init_lora` returns.

    A: [r, K]; B: [N, r]; weight: the new base weight [N, K] to copy into W, or None when W stays as it is;
    error: for "from_delta", ||dW - s*B@A||_F / ||dW||_F (computed with A and B as rounded to their dtype),
    for "pissa" and "nonzero", ||W_new + s*B@A - W||_F / ||W||_F (the rounding of the new W); else None.
    """
    A: torch.Tensor
    B: torch.Tensor
    weight: torch.Tensor | None
    error: float | None


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """The adapter's s: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023), as PEFT's use_rslora."""
    alpha, rank = check_scaling(alpha, "alpha"), check_rank(rank)
    return _lora_scaling(alpha, rank, check_flag(use_rslora, "use_rslora"))


def _lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """`lora_scaling` without the checks, for the layers' `scaling` property (read on every forward; the layer
    checked alpha, rank and use_rslora when it was built)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


_DEFERRAL = threading.local()


@contextlib.contextmanager
def deferred_base_writes():
    """While active (in this thread), an init that rewrites the base weight ("pissa", "nonzero") loads A and B into
    the layer but leaves the (shared) base weight as it is, and marks the layer: `write_deferred_base(module)`
    then writes W - s*B@A into it (the same values, recomputed from A and B). The model helpers build every
    layer under it and write only once all were built, so that an error on a later layer leaves the weights
    of the earlier ones (still the model's) unchanged."""
    previous = getattr(_DEFERRAL, "on", False)
    _DEFERRAL.on = True
    try:
        yield
    finally:
        _DEFERRAL.on = previous


def write_deferred_base(module: nn.Module) -> None:
    """Write the base weights whose rewrite `deferred_base_writes` held back, in every submodule of `module`."""
    for m in module.modules():
        if callable(getattr(m, "_write_deferred_base", None)):
            m._write_deferred_base()


class LoRAFactors:
    """Mixin of the LoRA modules (LoRALinear, LoRAEmbedding): the factors A [r, a_cols] and B [b_rows, r] as
    parameters, filled by the module's `reset_lora_parameters`, and `scaling` from alpha, rank and use_rslora.
    The module defines `_init_view()`: its base weight as the [b_rows, a_cols] matrix the init schemes see."""

    _base_pending = False  # a rewrite of the base weight held back by deferred_base_writes

    def _make_factors(self, a_cols: int, b_rows: int, like: torch.Tensor, init, delta, pissa_niter) -> None:
        kw = {"device": like.device, "dtype": like.dtype}
        self.lora_A = nn.Parameter(torch.zeros(self.rank, a_cols, **kw))
        self.lora_B = nn.Parameter(torch.zeros(b_rows, self.rank, **kw))
        self.merged = False
        self.reset_lora_parameters(init, delta, pissa_niter)

    def _load_init(self, res: LoRAInit) -> None:
        """Copy an init_lora result into A, B and (unless deferred_base_writes holds it back) the base weight."""
        if res.weight is not None and getattr(_DEFERRAL, "on", False):
            load_init(self.lora_A, self.lora_B, self._init_view(), res._replace(weight=None))
            self._base_pending = True
        else:
            load_init(self.lora_A, self.lora_B, self._init_view(), res)
            self._base_pending = False

    @torch.no_grad()
    def _write_deferred_base(self) -> None:
        """W <- W - s*B@A (what the init computed: the same expression on the same A, B and W) if held back."""
        if self._base_pending:
            view = self._init_view()
            view.copy_(_compensate(view, self.lora_A, self.lora_B, self.scaling)[0])
            self._base_pending = False

    @property
    def scaling(self) -> float:
        return _lora_scaling(self.alpha, self.rank, self.use_rslora)


def check_init(init) -> str:
    """`init` is one of INIT_SCHEMES; "zeros" gets an explanation."""
    if not isinstance(init, str):
        raise TypeError(f"init must be a string, one of {INIT_SCHEMES}, got {type(init).__name__}")
    if init == "zeros":
        raise ValueError(ZEROS_MESSAGE)
    if init not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {INIT_SCHEMES}, got {init!r}")
    return init


def _check_niter(niter) -> int | None:
    if niter is None:
        return None
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"pissa_niter must be None (exact SVD) or an int >= 0 (randomized SVD), got {niter!r}")
    return niter


def _check_values(name: str, t: torch.Tensor) -> None:
    """`t` holds real, finite values: not a meta tensor (no data), no NaN or inf (torch's exact and randomized SVDs
    raise a LinAlgError on them that names no argument; "nonzero" would carry them into W). One reduction and host
    read, in an init that runs an SVD or rewrites W."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: this init needs its values (materialize it first)")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite: it holds NaN or inf values")


def _svd_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def truncated_svd(matrix: torch.Tensor, rank: int, niter: int | None = None, name: str = "matrix"):
    """Top-`rank` singular triplets of `matrix` [N, K]: (U [N, r], S [r], Vh [r, K]) in fp32 (fp64 for fp64).

    niter=None: exact `torch.linalg.svd`. niter >= 0: randomized SVD (`torch.svd_lowrank` with `niter` power
    iterations and SVD_OVERSAMPLE extra columns), O(N K r) instead of O(N K min(N, K)); draws from torch's RNG.

    >>> U, S, Vh = truncated_svd(torch.randn(64, 32), 4)
    >>> U.shape, S.shape, Vh.shape
    (torch.Size([64, 4]), torch.Size([4]), torch.Size([4, 32]))
    """
    check_tensor(name, matrix, ndim=2)
    rank = check_rank(rank)
    niter = _check_niter(niter)
    if rank > min(matrix.shape):
        raise ValueError(f"rank={rank} exceeds min(N, K) = {min(matrix.shape)} of the {tuple(matrix.shape)} {name}: "
                         "an SVD-based init needs rank <= min(N, K)")
    _check_values(name, matrix)
    m = matrix.detach().to(_svd_dtype(matrix))
    if niter is None:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(m, q=min(rank + SVD_OVERSAMPLE, *m.shape), niter=niter)
        Vh = V.mT
    return U[:, :rank], S[:rank], Vh[:rank]


def _svd_factors(matrix: torch.Tensor, rank: int, scaling: float, niter: int | None, dtype: torch.dtype,
                 name: str = "weight"):
    """PEFT's split: A = sqrt(S/s) Vh, B = U sqrt(S/s), so that s * B @ A = U S Vh (the top-r part)."""
    U, S, Vh = truncated_svd(matrix, rank, niter, name)
    root = (S / scaling).sqrt()
    return (root[:, None] * Vh).to(dtype).contiguous(), (U * root[None, :]).to(dtype).contiguous()


def _delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * B @ A in fp32 (fp64 for fp64)."""
    t = _svd_dtype(A)
    return B.to(t) @ A.to(t) * scaling


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> float:
    return (diff.norm() / ref.norm().clamp_min(1e-30)).item()


def _compensate(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """W - s*B@A rounded to W's dtype, and how far W_new + s*B@A lands from W (relative Frobenius)."""
    w = weight.detach().to(_svd_dtype(weight))
    new = (w - _delta(A, B, scaling)).to(weight.dtype)
    return new, _rel(new.to(w.dtype) + _delta(A, B, scaling) - w, w)


@torch.no_grad()
def load_init(lora_A: torch.Tensor, lora_B: torch.Tensor, weight: torch.Tensor, res: LoRAInit) -> None:
    """Copy an init_lora result into a layer's factors, and into its weight (a view, e.g. E^T) when it changed."""
    lora_A.copy_(res.A)
    lora_B.copy_(res.B)
    if res.weight is not None:
        weight.copy_(res.weight)


def init_lora(weight: torch.Tensor, rank: int, scheme: str = "default", scaling: float = 1.0,
              delta: torch.Tensor | None = None, pissa_niter: int | None = None,
              generator: torch.Generator | None = None) -> LoRAInit:
    """A [r, K] and B [N, r] for `weight` [N, K] by `scheme` (see the module docstring), in weight's dtype/device.

    scaling: the adapter's s (alpha/r, or alpha/sqrt(r) with rsLoRA): "pissa" and "from_delta" divide S by it
    and "nonzero" / "pissa" subtract s*B@A from W. delta: dW [N, K], required by "from_delta" only.
    pissa_niter: None for the exact SVD, else power iterations of a randomized SVD ("pissa" and "from_delta").
    generator: for the random schemes. The caller copies `.weight` (when not None) into the base weight.

    >>> W = torch.randn(32, 48)
    >>> A, B, W_res, _ = init_lora(W, 4, "pissa", scaling=2.0)
    >>> torch.allclose(W_res + 2.0 * B @ A, W, atol=1e-5)
    True
    """
    check_tensor("weight", weight, ndim=2)
    rank = check_rank(rank)
    scheme = check_init(scheme)
    scaling = check_scaling(scaling)
    if scaling <= 0.0 and scheme in ("pissa", "from_delta"):
        # A = sqrt(S / s) Vh: s = 0 divides by zero, s < 0 takes the root of negative numbers (NaN factors).
        which = "which is 0 (alpha=0)" if scaling == 0.0 else f"which is negative ({scaling}): the root of S / s is NaN"
        raise ValueError(f"init={scheme!r} divides the singular values by scaling, {which}; scaling must be > 0")
    if delta is not None and scheme != "from_delta":
        raise ValueError(f"delta is only used by init='from_delta', got init={scheme!r}")
    if pissa_niter is not None and scheme not in ("pissa", "from_delta"):
        raise ValueError(f"pissa_niter is only used by init='pissa' or 'from_delta', got init={scheme!r}")
    N, K = weight.shape
    kw = {"device": weight.device, "dtype": weight.dtype}
    if scheme == "nonzero":  # W - s*B@A and its rounding error are computed from W's values
        _check_values("weight", weight)
    elif scheme == "from_delta" and weight.device.type == "meta":  # A, B land on W's device; the error is read
        raise ValueError("weight is on the meta device: init='from_delta' needs a materialized weight")
    if scheme == "pissa":
        A, B = _svd_factors(weight, rank, scaling, pissa_niter, weight.dtype)
        new, err = _compensate(weight, A, B, scaling)
        return LoRAInit(A, B, new, err)
    if scheme == "from_delta":
        if delta is None:
            raise ValueError("init='from_delta' needs delta=dW [N, K] (for example W_finetuned - W_0)")
        check_tensor("delta", delta, ndim=2)
        if tuple(delta.shape) != (N, K):
            raise ValueError(f"delta must be [N, K] = [{N}, {K}] like the weight, got {tuple(delta.shape)}")
        _check_values("delta", delta)  # before the copy to W's device
        A, B = _svd_factors(delta.to(weight.device), rank, scaling, pissa_niter, weight.dtype, "delta")
        d = delta.detach().to(device=weight.device, dtype=_svd_dtype(weight))
        err = _rel(_delta(A, B, scaling) - d, d)
        logger.info("lora_fast init='from_delta': rank-%d approximation of dW %s, relative error %.3e",
                    rank, tuple(delta.shape), err)
        return LoRAInit(A, B, None, err)
    A = torch.empty(rank, K, **kw)
    B = torch.zeros(N, rank, **kw)
    if scheme == "gaussian":
        nn.init.normal_(A, std=1.0 / rank, generator=generator)
    else:  # default and nonzero
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    if scheme != "nonzero":
        return LoRAInit(A, B, None, None)
    bound = 1.0 / math.sqrt(K)  # A's law (kaiming-uniform, a = sqrt(5), fan-in K): both factors small
    nn.init.uniform_(B, -bound, bound, generator=generator)
    new, err = _compensate(weight, A, B, scaling)
    return LoRAInit(A, B, new, err)
