"""`SavesUnmerged`: the state dict of a mergeable adapter module always holds its unmerged form.

merge() folds the adapter into the base weight in place, and `merged` is not part of the state dict (whose keys
the modules pin: `weight`, `lora_A`, ...). A state dict taken from a merged layer therefore held base + adapter
as `weight` next to the adapter itself, and loading it into a fresh (unmerged) layer applied the adapter twice.
Now a merged layer saves the base weight as unmerge() would restore it (the same keys, no extra state), and
loading into a merged layer unmerges it first and merges again after: a state dict means the same function
whatever the merged state of the layer that saved it or loads it.
"""
from __future__ import annotations

import torch


class SavesUnmerged:
    """Mixin (before nn.Module in the bases) of the modules with merge() / unmerge() / `merged`. The module
    defines `_unmerged_state() -> {state-dict key: tensor}`: the tensors that merge() changed, as unmerge() would
    restore them, computed without changing the module; and, if needed, `_after_state_load()`.

    Saving a merged layer costs one unmerged copy of its base weight per layer in the returned state dict (what
    an unmerged layer's state dict references without copying). Loading into a merged layer unmerges it, loads,
    and merges it again (a load_state_dict post hook, after its children); with load_state_dict(assign=True)
    that merge writes into the assigned tensors (the state dict's own)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            with torch.no_grad():
                for key, tensor in self._unmerged_state().items():
                    if prefix + key in destination:
                        destination[prefix + key] = tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Only when the state dict holds some of this module's tensors: an unmerge / merge round trip rounds W.
        if self.merged and any(prefix + k in state_dict for k in (*self._parameters, *self._buffers)):
            self.unmerge()
            self._remerge_after_load = True
            if getattr(self, "_remerge_hook", None) is None:  # once per module; it runs after the children loaded
                self._remerge_hook = self.register_load_state_dict_post_hook(_remerge)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _after_state_load(self) -> None:
        """What the module must refresh from its loaded tensors before merge() (LoRALinear4bit: its cached
        double-quantization scalars)."""


def _remerge(module, _incompatible_keys) -> None:
    """load_state_dict post hook of a SavesUnmerged module: merge again a layer that was merged before the load,
    once its own tensors and its children's (VeRA's projections) are loaded."""
    if getattr(module, "_remerge_after_load", False):
        module._remerge_after_load = False
        module._after_state_load()
        module.merge()
