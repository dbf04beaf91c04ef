"""LoRA+ (Hayou, Ghosh & Yu 2024): train B with a learning rate `ratio` times A's, with any torch optimizer.

`loraplus_param_groups` groups parameters the way PEFT's `create_loraplus_optimizer` does, so the same model gets
the same groups, learning rates and weight decays (tested against PEFT):

| group | which trainable parameters | lr | weight_decay |
|---|---|---|---|
| A | everything else (lora_A, ...) | lr | weight_decay |
| embedding | every parameter of an embedding adapter (A and B of `LoRAEmbedding` / PEFT `lora.Embedding`) | lr_embedding | weight_decay |
| B | `lora_B` and 1-D parameters, outside LayerNorms and not named "bias" | lr * ratio | weight_decay |
| B, no decay | `lora_B` / 1-D parameters inside a LayerNorm or named "bias" | lr * ratio | 0 |
"""
from __future__ import annotations

from torch import nn

from .embedding import LoRAEmbedding
from .validation import check_scaling


def _is_embedding_adapter(module) -> bool:
    """lora_fast's LoRAEmbedding, or PEFT's lora.Embedding (recognised without importing peft)."""
    if isinstance(module, LoRAEmbedding):
        return True
    cls = type(module)
    return cls.__name__ == "Embedding" and cls.__module__.startswith("peft.tuners.lora")


def _decay_names(model: nn.Module) -> set[str]:
    """Parameter names outside LayerNorm modules and without "bias" in them (transformers' / PEFT's rule)."""
    inside_ln = {f"{m}.{p}" if m else p
                 for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
                 for p, _ in mod.named_parameters()}
    return {n for n, _ in model.named_parameters() if n not in inside_ln and "bias" not in n}


def _owner(model: nn.Module, name: str, drop: int):
    module_name = ".".join(name.split(".")[:-drop])
    return model.get_submodule(module_name) if module_name else None


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                          lr_embedding: float = 1e-6) -> list[dict]:
    """Four optimizer parameter groups for LoRA+: A at `lr`, B at `lr * ratio`, embedding adapters at
    `lr_embedding` (see the module docstring). Only parameters with requires_grad are included; works on
    lora_fast models (apply_lora) and on PEFT models. Each group has "params", "lr", "weight_decay" and "name".

    >>> groups = loraplus_param_groups(model, lr=2e-4, ratio=16, weight_decay=0.01)
    >>> opt = torch.optim.AdamW(groups)
    >>> [g["lr"] for g in groups]   # [2e-4, 1e-6, 3.2e-3, 3.2e-3]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    lr = check_scaling(lr, "lr")
    ratio = check_scaling(ratio, "ratio")
    weight_decay = check_scaling(weight_decay, "weight_decay")
    lr_embedding = check_scaling(lr_embedding, "lr_embedding")
    for name, value in (("lr", lr), ("ratio", ratio), ("lr_embedding", lr_embedding)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay = _decay_names(model)
    groups = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # lora_fast keeps an adapter's tensors on the module itself (`emb.lora_A`); PEFT one level below it
        # (`emb.lora_embedding_A.default`), hence both owners are looked at.
        if any(_is_embedding_adapter(_owner(model, name, k)) for k in (1, 2)):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decay else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    return [
        {"name": "A", "params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {"name": "embedding", "params": groups["embedding"], "lr": lr_embedding, "weight_decay": weight_decay},
        {"name": "B", "params": groups["B"], "lr": lr * ratio, "weight_decay": weight_decay},
        {"name": "B_no_decay", "params": groups["B_no_decay"], "lr": lr * ratio, "weight_decay": 0.0},
    ]
