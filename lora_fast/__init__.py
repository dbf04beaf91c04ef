"""lora-fast: fused Triton kernels for LoRA."""
__version__ = "0.1.0"
