"""Where a compiled LoRA training step spends its time, against the eager step: host time per step (no sync), GPU
time per step, and the host-side and kernel tables of torch.profiler. The MLP block of bench/gpu_compile.py.

    python bench/profile_compile.py --p 0.1
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import host_and_wall_us  # noqa: E402
from bench.gpu_compile import MLPBlock, _train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", type=float, default=0.0)
    ap.add_argument("--M", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.M, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    model = MLPBlock(args.dim, args.dim, 16, args.p)
    compiled = torch.compile(model, fullgraph=True)
    steps = {"eager": _train_step(model, x, g), "compiled": _train_step(compiled, x, g)}
    for name, step in steps.items():
        host, wall = host_and_wall_us(step, 20, warmup=3)
        print(f"p={args.p} {name}: host {host:.0f} us/step (no sync), wall {wall:.0f} us/step")
    for name, step in steps.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"== p={args.p} {name}: 5 steps, by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=55))
        print(f"== p={args.p} {name}: 5 steps, by GPU time")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=55))


if __name__ == "__main__":
    main()
