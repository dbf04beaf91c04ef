"""lora-fast: fused Triton kernels for LoRA fine-tuning and multi-tenant serving.

>>> import lora_fast
>>> layer = lora_fast.LoRALinear.from_linear(linear, rank=16, alpha=32)
>>> y = lora_fast.lora_linear(x, W, b, A, B, scaling=2.0)
"""
__version__ = "0.1.0"

from . import kernels, reference
from .functional import LoRALinearFunction, lora_linear, use_triton
from .layers import LoRALinear, ParameterCount, apply_lora, count_parameters

__all__ = [
    "LoRALinear", "LoRALinearFunction", "ParameterCount", "apply_lora", "count_parameters", "kernels",
    "lora_linear", "reference", "use_triton",
]
