"""Experiment: the rank-r shrink inside the persistent GEMM (by its shrinking programs, "inline", or by its producer
tiles, "producer") against a shrink launch before it ("shrink"), for the forward (xa = X @ A^T) and dX (dY @ B),
and a whole fwd+bwd step through `lora_linear` with auto's choice (producer) against the shrink.

Checks first, on the GPU (where races show): every output of each mode against an fp64 reference, outputs
NaN-filled, and the inline and producer modes repeated REPEATS times with fresh outputs, each bitwise equal to the
first (a tile that read xa before its row block was published would differ). Then interleaved timing rounds, ratios to cuBLAS
(`F.linear` / `torch.mm(dy, W)` / its fwd+bwd) in the same run. Prints a table last; JSON to --out.

    python bench/exp_inline_shrink.py --out /tmp/exp
"""
import argparse
import json
import os
import sys


import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lora_fast  # noqa: E402
from bench.common import (  # noqa: E402
    kernel_times_us, lora_references, print_shape_report, random_lora_inputs,
)
from lora_fast.kernels import lora_fwd  # noqa: E402
from lora_fast.kernels.launch import clear_plans  # noqa: E402
from lora_fast.kernels.lora_bwd import lora_backward_dx  # noqa: E402
from lora_fast.kernels.lora_fwd import lora_forward  # noqa: E402

REPEATS = 20
# the rank-r product by a shrink launch, by the GEMM's shrinking programs, by its producer tiles (auto's choice)
MODES = ("shrink", "inline", "producer")
# (M, K, N, r): the shapes, then smaller and odd ones (fewer tiles than SMs, ragged blocks, odd ranks)
CHECKS = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 16), (4096, 4096, 4096, 64),
          (16384, 4096, 4096, 16), (300, 4000, 3000, 3), (1000, 1000, 777, 1), (2500, 1032, 4100, 33), (513, 256, 64, 16)]
TIMED = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 16), (4096, 4096, 4096, 16)]


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(M, K, N, r, dt=torch.bfloat16):
    """Max relative errors of y, xa, dX and dY @ B in both modes, and whether REPEATS inline runs were identical."""
    x, W, b, A, B, dy = random_lora_inputs(M, K, N, r, dt, M * 7 + N + r)
    s = 2.0
    y_ref, xa_ref, dx_ref, dyb_ref = lora_references(x, W, b, A, B, dy, s)
    row = {"shape": [M, K, N, r]}
    for mode in MODES:
        y = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
        _, xa = lora_forward(x, W, b, A, B, s, store_xa=True, xa_mode=mode, out=y)
        dx = torch.full((M, K), float("nan"), device="cuda", dtype=dt)
        _, dyb = lora_backward_dx(dy, W, A, B, s, dyb_mode=mode, out=dx)
        row[mode] = {"y": rel(y, y_ref), "xa": rel(xa, xa_ref), "dx": rel(dx, dx_ref), "dyb": rel(dyb, dyb_ref)}
        if mode != "shrink":
            same = True
            for _ in range(REPEATS):
                y2 = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
                lora_forward(x, W, b, A, B, s, xa_mode=mode, out=y2)
                dx2 = torch.full((M, K), float("nan"), device="cuda", dtype=dt)
                lora_backward_dx(dy, W, A, B, s, dyb_mode=mode, out=dx2)
                same &= bool(torch.equal(y2, y)) and bool(torch.equal(dx2, dx))
            row[f"{mode}_repeats_identical"] = same
    errs = [v for mode in MODES for v in row[mode].values()]
    row["ok"] = all(row[f"{m}_repeats_identical"] for m in MODES[1:]) and all(e < 2e-2 for e in errs)
    return row


def timed(cands, rounds):
    """Median of `rounds` do_bench medians per candidate, candidates interleaved."""
    times = {n: [] for n in cands}
    for _ in range(rounds):
        for name, fn in cands.items():
            times[name].append(do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3)
    return {n: sorted(v)[len(v) // 2] for n, v in times.items()}


def set_auto_inline(on):
    lora_fwd.INLINE_SHRINK = on
    clear_plans()


def timings(M, K, N, r, rounds, dt=torch.bfloat16):
    x = torch.randn(M, K, device="cuda", dtype=dt)
    W = torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5
    A = (torch.randn(r, K, device="cuda", dtype=dt) / K ** 0.5).to(dt)
    B = torch.randn(N, r, device="cuda", dtype=dt)
    dy = torch.randn(M, N, device="cuda", dtype=dt)
    xg = x.clone().requires_grad_()
    Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()

    def base_step():  # gradients returned, not accumulated into .grad (no extra add kernels)
        torch.autograd.grad(F.linear(xg, W), (xg,), dy)

    def lora_step():
        torch.autograd.grad(lora_fast.lora_linear(xg, W, None, Ag, Bg, 2.0), (xg, Ag, Bg), dy)

    t = timed({
        "base_fwd": lambda: F.linear(x, W),
        "fwd_shrink": lambda: lora_forward(x, W, None, A, B, 2.0, xa_mode="shrink"),
        "fwd_inline": lambda: lora_forward(x, W, None, A, B, 2.0, xa_mode="inline"),
        "fwd_producer": lambda: lora_forward(x, W, None, A, B, 2.0, xa_mode="producer"),
        "base_dx": lambda: torch.mm(dy, W),
        "dx_shrink": lambda: lora_backward_dx(dy, W, A, B, 2.0, dyb_mode="shrink"),
        "dx_inline": lambda: lora_backward_dx(dy, W, A, B, 2.0, dyb_mode="inline"),
        "dx_producer": lambda: lora_backward_dx(dy, W, A, B, 2.0, dyb_mode="producer"),
        "base_step": base_step,
    }, rounds)
    steps = {}
    for _ in range(rounds):  # the autograd step with auto picking producer tiles, then a shrink, alternated
        for on in (True, False):
            set_auto_inline(on)
            steps.setdefault(on, []).append(do_bench(lora_step, warmup=25, rep=200, return_mode="median") * 1e3)
    set_auto_inline(True)
    t["step_producer"] = sorted(steps[True])[rounds // 2]
    t["step_shrink"] = sorted(steps[False])[rounds // 2]
    row = {"shape": [M, K, N, r], "us": t, "step_kernels_us": kernel_times_us([lora_step, base_step], rounds=3)}
    row["ratios"] = {k: t[k] / t["base_fwd"] for k in ("fwd_shrink", "fwd_inline", "fwd_producer")}
    row["ratios"].update({k: t[k] / t["base_dx"] for k in ("dx_shrink", "dx_inline", "dx_producer")})
    row["ratios"].update({k: t[k] / t["base_step"] for k in ("step_shrink", "step_producer")})
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/exp")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    checks = [] if args.no_check else [check(*s) for s in CHECKS]
    for c in checks:
        print("check", c["shape"], "ok" if c["ok"] else "FAILED", json.dumps({k: c[k] for k in MODES}), flush=True)
    rows = [timings(*s, args.rounds) for s in TIMED]
    with open(os.path.join(args.out, "exp_inline_shrink.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "checks": checks, "timings": rows}, f, indent=1)
    print_shape_report(rows, checks)


if __name__ == "__main__":
    main()
