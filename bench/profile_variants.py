"""Where a DoRA / VeRA / LoRA training step's time goes at 8192 x 4096 x 4096 (bf16, r = 16): the GPU kernels'
time per step (torch.profiler) against the host's time per step without a sync and the wall time, so that a step
that is host-bound (host ~ wall > kernels) is told apart from one that is GPU-bound (wall ~ kernels).
Prints one line per provider and the kernel table of DoRA's step.

    PYTHONPATH=$PWD python bench/profile_variants.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import host_and_wall_us  # noqa: E402
from bench.gpu_variants import Holder, fwd_bwd, make_inputs, ours_dora, ours_vera, trainable  # noqa: E402

import lora_fast  # noqa: E402


def kernel_us_per_step(step, steps=5):
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / steps
    return total, prof


def main():
    x, lin, dy = make_inputs(8192, 4096, 4096, seed=7)
    xg = x.clone().requires_grad_()
    lora = lora_fast.LoRALinear.from_linear(lin, rank=16, alpha=32)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.02)
    profs = {}
    for name, mod in (("base", Holder(lin)), ("lora", lora), ("dora", ours_dora(lin)), ("vera", ours_vera(lin))):
        step = fwd_bwd(mod, xg, dy, trainable(mod))
        kern, prof = kernel_us_per_step(step)
        host, wall = host_and_wall_us(step, 30)
        profs[name] = prof
        print(f"{name:5s} kernels {kern:7.0f} us/step   host {host:7.0f} us/step   wall {wall:7.0f} us/step", flush=True)
    for name in ("dora", "vera"):
        print(f"== {name}: kernels of 5 steps")
        try:
            table = profs[name].key_averages().table(sort_by="self_device_time_total", row_limit=14,
                                                     max_name_column_width=60)
        except (KeyError, AttributeError, ValueError):
            table = profs[name].key_averages().table(sort_by="self_cuda_time_total", row_limit=14,
                                                     max_name_column_width=60)
        print(table)


if __name__ == "__main__":
    main()
