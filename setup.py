"""lora-fast: fused Triton kernels for LoRA training and multi-tenant serving.

`kernels/` is installed as `lora_fast.kernels` through `package_dir`, so the
project has a single import name and nothing called plain `kernels` lands in
site-packages.
"""
from setuptools import setup

setup(
    name="lora-fast",
    version="0.1.0",
    description="Fused Triton kernels for LoRA: single-pass forward, fused backward, multi-adapter serving",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["lora_fast", "lora_fast.kernels"],
    package_dir={"lora_fast": "lora_fast", "lora_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        # The PEFT parity tests run against the real PEFT on tiny transformers models (nothing is downloaded).
        "test": ["pytest", "peft", "transformers", "safetensors", "accelerate"],
        "bench": ["matplotlib"],
        "peft": ["peft", "transformers", "safetensors", "accelerate"],
        # QLoRA: import bitsandbytes Linear4bit weights and benchmark against bitsandbytes + PEFT.
        "qlora": ["bitsandbytes", "peft", "transformers"],
    },
)
