"""Triton kernels and their launchers, installed as `lora_fast.kernels`.

No autograd and no modules here: see `lora_fast.functional` for those.
"""
from .dora import column_dot, dora_norm, magnitude_grad, scale_columns
from .dropout import dropout_mask
from .helpers import is_interpret
from .lora_bwd import dx_term_in_grad_ab, lora_backward_dx, lora_grad_ab
from .lora_fwd import choose_xa_mode, lora_forward
from .lora_nf4_bwd import lora_nf4_backward_dx
from .lora_nf4_fwd import lora_nf4_forward
from .lora_shrink import lora_shrink
from .nf4_dequant import nf4_dequantize
from .nf4_gemv import nf4_gemv
from .rows import row_dots, scale_rows

__all__ = [
    "dropout_mask", "dx_term_in_grad_ab", "is_interpret", "lora_backward_dx", "lora_forward", "lora_grad_ab",
    "lora_shrink",
    "choose_xa_mode", "column_dot", "dora_norm", "magnitude_grad", "scale_columns",
    "lora_nf4_backward_dx", "lora_nf4_forward", "nf4_dequantize", "nf4_gemv", "row_dots", "scale_rows",
]
