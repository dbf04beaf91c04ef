"""lora-fast: fused Triton kernels for LoRA fine-tuning and multi-tenant serving.

>>> import lora_fast
>>> layer = lora_fast.LoRALinear.from_linear(linear, rank=16, alpha=32)
>>> y = lora_fast.lora_linear(x, W, b, A, B, scaling=2.0)
"""
__version__ = "0.1.0"

import importlib.util as _util
import os as _os

if _util.find_spec(".kernels", __name__) is None:
    # A source checkout on sys.path, not installed: `kernels/` sits beside `lora_fast/` (setup.py maps it to
    # lora_fast.kernels on install), so look for subpackages in the checkout's root too.
    __path__.append(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

from . import kernels, reference  # noqa: E402
from . import ops  # noqa: E402,F401  (registers the lora_fast:: torch ops at import; see docs/compile_graphs.md)
from .functional import LoRALinearFunction, lora_linear, use_triton
from .nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from .qlora import LoRALinear4bit, qlora_linear
from .layers import LoRALinear, ParameterCount, VariantCount, apply_lora, count_parameters
from .embedding import LoRAEmbedding
from .optim import loraplus_param_groups
from .dora import DoRALinear, apply_dora, dora_linear, dora_weight_norm
from .vera import VeRALinear, VeRAProjections, apply_vera, shared_projections, vera_linear
from .multi_lora import (
    AdapterPool, BatchMetadata, MultiLoRALinear, make_batch_metadata, multi_lora_linear, validate_adapter_ids,
)

__all__ = [
    "LoRALinear4bit", "NF4Tensor", "dequantize_nf4", "qlora_linear", "quantize_nf4",
    "AdapterPool", "BatchMetadata", "LoRALinear", "LoRALinearFunction", "MultiLoRALinear", "ParameterCount",
    "apply_lora", "count_parameters", "kernels", "lora_linear", "make_batch_metadata", "multi_lora_linear",
    "reference", "use_triton", "validate_adapter_ids",
    "DoRALinear", "apply_dora", "dora_linear", "dora_weight_norm",
    "VeRALinear", "VeRAProjections", "apply_vera", "shared_projections", "vera_linear",
    "LoRAEmbedding", "VariantCount", "loraplus_param_groups",
]
