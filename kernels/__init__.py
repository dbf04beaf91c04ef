"""Triton kernels and their launchers, installed as `lora_fast.kernels`."""
