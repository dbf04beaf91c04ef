"""Experiment: what the forward's LoRA epilogue and its inline shrink cost over the same persistent GEMM without
them, against cuBLAS, at 8192 x 4096 x 4096 (bf16, r = 16). Interleaved do_bench rounds; also each kernel's
own time from the profiler. Prints a table; JSON to --out.

    python bench/exp_fwd_epilogue.py --out /tmp/exp
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import kernel_times_us  # noqa: E402
from lora_fast.kernels import lora_fwd  # noqa: E402
from lora_fast.kernels.helpers import tensor_descriptor  # noqa: E402
from lora_fast.kernels.launch import Launch  # noqa: E402


def variant(plan, **changes):
    """A copy of `plan`'s GEMM launch with some constexprs changed (launch options kept, PDL dropped)."""
    L = plan.launch
    params = dict(zip(L.fn.arg_names, L.args))
    params.update(changes)
    options = {k: v for k, v in L.options.items() if k != "launch_pdl"}
    return Launch(L.fn, L.grid, [L.fn.arg_names[i] for i in L.slots], **params, **options)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/exp")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    M, K, N, r, dt = 8192, 4096, 4096, 16, torch.bfloat16
    x = torch.randn(M, K, device="cuda", dtype=dt)
    W = torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5
    b = torch.randn(N, device="cuda", dtype=dt)
    A = (torch.randn(r, K, device="cuda", dtype=dt) / K ** 0.5).to(dt)
    B = torch.randn(N, r, device="cuda", dtype=dt)
    xa = x @ A.t()
    y = torch.empty(M, N, device="cuda", dtype=dt)
    flags = torch.zeros(M // 128, device="cuda", dtype=torch.int32)
    shrink = lora_fwd._ForwardPlan(x, W, None, A, B, 0.0, False, "shrink", None, "auto", None)
    inline = lora_fwd._ForwardPlan(x, W, None, A, B, 0.0, False, "inline", None, "auto", None)
    xd, wd, yd = (tensor_descriptor(x, shrink.x_block), tensor_descriptor(W, shrink.w_block),
                  tensor_descriptor(y, shrink.y_block))
    plain = variant(shrink, NUM_R_CHUNKS=0, GDC_WAIT=False)  # the same persistent GEMM, no LoRA term
    epi = variant(shrink, GDC_WAIT=False)  # the LoRA epilogue with xa given (no shrink at all)
    epi_bias = variant(shrink, GDC_WAIT=False, HAS_BIAS=True)

    def call(launch, bias=None):
        return lambda: launch(xd, wd, A, B, bias if bias is not None else y, xa, yd, 2.0, 0, y, y, flags)

    cands = {
        "cublas": lambda: F.linear(x, W),
        "cublas_bias": lambda: F.linear(x, W, b),
        "gemm_plain": call(plain),
        "gemm_lora_epilogue": call(epi),
        "gemm_lora_epilogue_bias": call(epi_bias, b),
        "fwd_inline": lambda: inline(x, W, None, A, B, 2.0, 0, None, None),
        "fwd_shrink": lambda: shrink(x, W, None, A, B, 2.0, 0, None, None),
    }
    times = {n: [] for n in cands}
    for _ in range(args.rounds):
        for n, fn in cands.items():
            times[n].append(do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3)
    med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
    kern = kernel_times_us(list(cands.values()), rounds=3)
    with open(os.path.join(args.out, "exp_fwd_epilogue.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "median_us": med, "rounds_us": times,
                   "kernels_us_per_candidate_avg": kern}, f, indent=1)
    print("kernel times (averaged over all candidates):", [(k[:30], round(v, 1)) for k, v in kern])
    for n, t in med.items():
        print(f"{n:>26} {t:8.1f} us  {t / med['cublas']:.3f}x cuBLAS")


if __name__ == "__main__":
    main()
