"""`replace_linears`: the module-swapping walk shared by the variant helpers (`apply_vera`, `apply_dora`)."""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from .layers import _matches, build_all, freeze_base, swap_in
from .validation import check_target_modules


def matching_linears(model: nn.Module, target_modules) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every plain nn.Linear whose name matches `target_modules` (PEFT's rule, as apply_lora)."""
    check_target_modules(model, target_modules)
    found = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and _matches(n, target_modules)]
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in the model")
    return found


def replace_linears(model: nn.Module, target_modules, make: Callable[[str, nn.Linear], nn.Module],
                    trainable: Iterable[str], found=None) -> nn.Module:
    """Swap each matching nn.Linear for `make(name, linear)`; then a parameter requires grad iff its name ends
    with one of `trainable`, or it is an adapter parameter of a lora-fast adapter module (another variant's, e.g.
    apply_dora's magnitude under apply_vera) that already did (`lora_fast.layers.freeze_base`): every base
    parameter is frozen. Returns `model`, changed in place.

    All or nothing: every replacement is built before any is set, with the in-place base rewrites of
    init="pissa" / "nonzero" held back until all were built (lora_fast.init.deferred_base_writes); an error on any
    layer leaves the model unchanged (modules, weights, requires_grad).

    >>> replace_linears(model, ["q_proj"], lambda name, lin: DoRALinear.from_linear(lin, 8), ("lora_A", "lora_B"))
    """
    if not callable(make):
        raise TypeError(f"make must be a callable (name, linear) -> nn.Module, got {type(make).__name__}")
    # A lone string would be split into characters, each one a suffix that nearly every parameter name ends with.
    names = tuple(trainable) if isinstance(trainable, Iterable) and not isinstance(trainable, str) else None
    if names is None or not all(isinstance(t, str) for t in names):
        raise TypeError(f"trainable must be a list of parameter-name suffixes, got {trainable!r}")
    targets = found if found is not None else matching_linears(model, target_modules)
    swap_in(model, targets, build_all(model, targets, make))
    freeze_base(model, names)
    return model
