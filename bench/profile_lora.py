"""Per-kernel GPU time of one fused LoRA forward+backward (torch.profiler), to see where time goes.

    python bench/profile_lora.py --M 8192 --K 4096 --N 4096 --r 16 --p 0.1
"""
import argparse

import torch

import lora_fast


def main():
    ap = argparse.ArgumentParser()
    for name, default in (("M", 8192), ("K", 4096), ("N", 4096), ("r", 16)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--p", type=float, default=0.0)
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(args.M, args.K, device=dev, dtype=dt, requires_grad=True)
    W = torch.randn(args.N, args.K, device=dev, dtype=dt) / args.K**0.5
    A = (torch.randn(args.r, args.K, device=dev, dtype=dt) / args.K**0.5).requires_grad_()
    B = torch.randn(args.N, args.r, device=dev, dtype=dt).requires_grad_()
    dy = torch.randn(args.M, args.N, device=dev, dtype=dt)

    def step():
        lora_fast.lora_linear(x, W, None, A, B, 2.0, args.p, training=True).backward(dy)

    import triton.testing

    inputs = [x, A, B]

    def grad_only():  # what bench_lora_linear times: gradients returned, not accumulated
        return torch.autograd.grad(lora_fast.lora_linear(x, W, None, A, B, 2.0, args.p, training=True), inputs, dy)

    base = triton.testing.do_bench(lambda: torch.autograd.grad(
        torch.nn.functional.linear(x, W), [x], dy))
    for name, fn in (("backward()", step), ("autograd.grad", grad_only)):
        t = triton.testing.do_bench(fn)
        print(f"do_bench fwd+bwd via {name}: {t * 1e3:.1f} us = {t / base:.2f}x base ({base * 1e3:.1f} us)")
    import time

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):  # host time per step, not synchronised: if it exceeds the GPU time, launches bound us
        grad_only()
    host = (time.perf_counter() - t0) / 20
    torch.cuda.synchronize()
    print(f"host time per fwd+bwd call (no sync): {host * 1e6:.0f} us")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"== M={args.M} K={args.K} N={args.N} r={args.r} p={args.p}: GPU time per step by kernel")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
