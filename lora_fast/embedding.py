"""`LoRAEmbedding`: LoRA on an nn.Embedding, PEFT's convention.

    y = E[ids] + s * (A[:, ids]^T @ B^T)        E [vocab, dim] frozen, A [r, vocab], B [dim, r]

A and B have the shapes of PEFT's `lora_embedding_A` / `lora_embedding_B` (state-dict keys here: `weight`,
`lora_A`, `lora_B`). As in PEFT, there is no dropout on the embedding's LoRA branch, the A lookup passes the base
layer's padding_idx / max_norm / norm_type / scale_grad_by_freq to `F.embedding` (A's gradient is always dense:
`sparse=True` only concerns the frozen table), and the default init is
A = 0, B ~ N(0, 1) (the original LoRA code's for embeddings).

Why no Triton kernel: the op is a row gather of E, a gather of r columns of A and a [T, r] x [r, dim] product.
A fused kernel would write y once instead of the ~3 passes over [T, dim] that `F.embedding` + `addmm` make
(gather, then addmm reads it and writes y): for T = 8192 tokens, dim = 4096, bf16 that is ~130 MB of extra
traffic, ~40 us on an H100, once per step for the whole model, against the hundreds of ms of one training step
of a model with such an embedding. The backward (a scatter-add of dY @ B into A's columns) is what torch's
embedding backward already does, deterministically. So the plain torch path is kept: it costs no measurable time
and no kernel to maintain.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .init import LoRAFactors, check_init, init_lora
from .merging import SavesUnmerged
from .validation import check_dtype, check_flag, check_rank, check_scaling


def _check_ids(ids, num_embeddings: int, device: torch.device) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be int64 or int32 token ids, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"ids are on {ids.device} but the embedding weight is on {device}")
    # One reduction (a host sync on CUDA) instead of a device-side assert that poisons the CUDA context.
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_embeddings):
        raise ValueError(f"ids must be in [0, {num_embeddings}), got values in [{int(ids.min())}, {int(ids.max())}]")
    return ids


class LoRAEmbedding(SavesUnmerged, LoRAFactors, nn.Module):
    """nn.Embedding with a LoRA adapter: y = E[ids] + s * A[:, ids]^T @ B^T; ids [...] -> y [..., dim].

    Args: num_embeddings (vocab), embedding_dim (dim); rank r >= 1; alpha (s = alpha / r, or alpha / sqrt(r) with
    use_rslora); padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse as nn.Embedding; device; dtype;
    init: "default" (= "gaussian", as PEFT: A = 0, B ~ N(0, 1)), "nonzero", "pissa" or "from_delta" with
    delta=dE [vocab, dim]; these see the layer as the linear map E^T [dim, vocab] (lora_fast.init).

    >>> emb = LoRAEmbedding.from_embedding(nn.Embedding(32000, 4096), rank=8, alpha=16)
    >>> y = emb(torch.tensor([[1, 5, 7]]))       # [1, 3, 4096]
    >>> emb.merge(); emb.unmerge()
    """

    adapter_variant = "lora_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int = 8, alpha: float = 16,
                 padding_idx: int | None = None, max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False, use_rslora: bool = False, device=None,
                 dtype=None, init: str = "default", delta: torch.Tensor | None = None,
                 pissa_niter: int | None = None):
        super().__init__()
        check_rank(num_embeddings, "num_embeddings")
        check_rank(embedding_dim, "embedding_dim")
        check_dtype(dtype, "dtype")
        if padding_idx is not None:  # nn.Embedding only asserts this
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral):
                raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}) (a row of the "
                                 f"table), got {padding_idx}")
        base = nn.Embedding(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                            sparse, device=device, dtype=dtype)
        self._init(base, rank, alpha, use_rslora, init, delta, pissa_niter)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, rank: int = 8, alpha: float = 16, use_rslora: bool = False,
                       init: str = "default", delta: torch.Tensor | None = None,
                       pissa_niter: int | None = None) -> "LoRAEmbedding":
        """Wrap `embedding`, sharing (not copying) its frozen weight and its lookup options.

        A scalar `embed_scale` attribute (Gemma-style scaled embeddings) scales the whole output, as PEFT does.
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init(embedding, rank, alpha, use_rslora, init, delta, pissa_niter)
        return layer

    def _init(self, base: nn.Embedding, rank, alpha, use_rslora, init, delta, pissa_niter) -> None:
        self.rank = check_rank(rank)
        self.alpha = check_scaling(alpha, "alpha")
        self.use_rslora = check_flag(use_rslora, "use_rslora")
        self.num_embeddings, self.embedding_dim = base.weight.shape
        for name in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, name, getattr(base, name))
        self.embed_scale = getattr(base, "embed_scale", None)
        base.weight.requires_grad_(False)
        self.weight = base.weight
        self._make_factors(self.num_embeddings, self.embedding_dim, self.weight, init, delta, pissa_niter)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default", delta: torch.Tensor | None = None,
                              pissa_niter: int | None = None, generator: torch.Generator | None = None) -> None:
        """(Re)initialise A and B; "pissa" / "nonzero" rewrite the embedding weight in place (E <- E - s*(B@A)^T)."""
        check_init(init)
        if self.merged:
            raise ValueError("reset_lora_parameters on a merged layer: unmerge() first")
        if init in ("default", "gaussian"):
            if delta is not None or pissa_niter is not None:
                raise ValueError(f"delta and pissa_niter are not used by init={init!r}")
            self.lora_A.zero_()
            nn.init.normal_(self.lora_B, generator=generator)
            self.init, self.init_error = init, None
            return
        if delta is not None and (not isinstance(delta, torch.Tensor) or delta.dim() != 2):
            raise ValueError("delta must be a 2-D tensor dE [vocab, dim]")
        res = init_lora(self.weight.T, self.rank, init, self.scaling, None if delta is None else delta.T,
                        pissa_niter, generator)
        self._load_init(res)
        self.init, self.init_error = init, res.error

    def _init_view(self) -> torch.Tensor:
        return self.weight.T

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds for this layer (count_parameters sizes the adapter from these)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def delta_weight(self) -> torch.Tensor:
        """s * (B @ A)^T [vocab, dim], computed in fp32 and returned in the weight's dtype."""
        return self._delta_fp32().to(self.weight.dtype)

    def _delta_fp32(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()).T * self.scaling

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        self.weight.copy_((self.weight.float() + sign * self._delta_fp32()).to(self.weight.dtype))

    def _unmerged_state(self) -> dict[str, torch.Tensor]:
        """E as unmerge() restores it (the state dict of a merged layer holds it: lora_fast.merging)."""
        return {"weight": (self.weight.float() - self._delta_fp32()).to(self.weight.dtype)}

    def merge(self) -> None:
        """Fold the adapter into the embedding weight (a plain lookup afterwards). Rounds in the weight's dtype."""
        if not self.merged:
            self._fold(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Undo merge(): E is restored within the rounding of its dtype."""
        if self.merged:
            self._fold(-1.0)
            self.merged = False

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor, sparse: bool) -> torch.Tensor:
        return F.embedding(ids, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           sparse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _check_ids(ids, self.num_embeddings, self.weight.device)
        y = self._lookup(ids, self.weight, self.sparse)
        if not self.merged:
            # [..., r]: A's columns for the ids. Always a dense gradient: A is only [r, vocab], and a sparse one
            # cannot flow back through the transpose (PEFT passes `sparse` here and fails in the backward).
            after_a = self._lookup(ids, self.lora_A.T, False)
            y = torch.addmm(y.reshape(-1, self.embedding_dim), after_a.reshape(-1, self.rank), self.lora_B.T,
                            alpha=self.scaling).reshape(y.shape)
        if self.embed_scale is not None:
            y = y * torch.as_tensor(self.embed_scale, dtype=y.dtype, device=y.device)
        return y

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, padding_idx={self.padding_idx}, "
                f"use_rslora={self.use_rslora}, init={self.init}, merged={self.merged}")
