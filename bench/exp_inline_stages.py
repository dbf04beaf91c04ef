"""Experiment: the pipeline depth of the shrink inside the persistent forward and dX ("inline" mode,
`GemmConfig.shrink_stages`), and dA / dB's partial sums added by one Triton launch instead of torch's sums.

Variants (--variants): "d" the shipped configs, "sN" the shrink N stages deep in both kernels (0: the GEMM's
num_stages). A variant that cannot run (say, out of shared memory) is reported and left out.

The shrinking programs of the inline mode read whole 128-row blocks of X (or dY) alone, 64-wide steps with the
GEMM's 3 stages: about 32 KiB in flight per SM, so a 1 MiB row block takes tens of µs, and the first wave's
epilogues wait for it. Deeper pipelines (their tiles reuse the GEMM's shared memory, idle meanwhile) should
finish the blocks sooner.

Checks first, on the GPU: every output of the inline forward and dX at each depth against an fp64 reference,
NaN-filled, repeated REPEATS times with fresh outputs, each bitwise equal to the first; dA and dB against fp64.
Then interleaved timing rounds, ratios to cuBLAS in the same run, and each kernel's time in one autograd step.
Prints a table last; JSON to --out.

    python bench/exp_inline_stages.py --out /tmp/exp --variants d,s0,s4
"""
import argparse
import json
import os
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lora_fast  # noqa: E402
from bench.common import (  # noqa: E402
    kernel_times_us, lora_references, paired_ratios, print_shape_report, random_lora_inputs,
)
from lora_fast.kernels import config as kconfig, lora_bwd, lora_fwd  # noqa: E402

REPEATS = 10
VARIANTS = ("s0", "s5", "s8")
CHECKS = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 16), (4096, 4096, 4096, 64),
          (300, 4000, 3000, 3), (1000, 1000, 777, 1), (2500, 1032, 4100, 33), (513, 256, 64, 16)]
TIMED = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 16), (4096, 4096, 4096, 16)]


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def set_variant(M, dt, spec):
    """Force variant `spec` (module docstring) on the persistent forward and dX at M rows (None: shipped)."""
    cls = kconfig.shape_class(M)
    for kernel in ("fwd", "dx"):
        kconfig.set_override(kernel, cls, None)
    if spec is not None:
        cfgs = {k: kconfig.gemm_config(k, M, dt, 0) for k in ("fwd", "dx")}
        for kernel, cfg in cfgs.items():
            kconfig.set_override(kernel, cls, cfg if spec == "d" else replace(cfg, shrink_stages=int(spec[1:])))


def plans(x, W, b, A, B, dy, spec):
    """(forward plan, dX plan) in the inline mode with variant `spec` forced."""
    set_variant(x.shape[0], x.dtype, spec)
    try:
        fwd = lora_fwd._ForwardPlan(x, W, b, A, B, 0.0, True, "inline", None, "auto", None)
        dx = lora_bwd._DxPlan(dy, W, A, B, 0.0, True, "inline", None, "auto", None)
    finally:
        set_variant(x.shape[0], x.dtype, None)
    return fwd, dx


def check(M, K, N, r, dt=torch.bfloat16):
    x, W, b, A, B, dy = random_lora_inputs(M, K, N, r, dt, M * 7 + N + r + 3)
    s = 2.0
    y_ref, xa_ref, dx_ref, dyb_ref = lora_references(x, W, b, A, B, dy, s)
    row, ok = {"shape": [M, K, N, r]}, True
    for spec in VARIANTS:
        fwd, dxp = plans(x, W, b, A, B, dy, spec)
        first = None
        try:
            fwd(x, W, b, A, B, s, 0, None, None)
            dxp(dy, W, A, B, s, 0, None, None)
        except Exception as exc:  # noqa: BLE001 - reported, and the variant left out
            row[f"v_{spec}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            ok = False
            continue
        row[f"v_{spec}_shared_bytes"] = [getattr(getattr(p.launch.compiled, "metadata", None), "shared", None)
                                         for p in (fwd, dxp)]
        for i in range(REPEATS):
            y = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
            _, xa = fwd(x, W, b, A, B, s, 0, y, None)
            dx = torch.full((M, K), float("nan"), device="cuda", dtype=dt)
            _, dyb = dxp(dy, W, A, B, s, 0, dx, None)
            if first is None:
                first = (y, dx)
                errs = {"y": rel(y, y_ref), "xa": rel(xa, xa_ref), "dx": rel(dx, dx_ref), "dyb": rel(dyb, dyb_ref)}
                row[f"v_{spec}"] = errs
                ok &= all(e < 2e-2 for e in errs.values())
            elif not (torch.equal(y, first[0]) and torch.equal(dx, first[1])):
                row[f"v_{spec}_repeat_differs"] = i
                ok = False
    # dA and dB (several splits, partial sums added by _sum_splits_kernel) against fp64
    dA, dB = lora_bwd.lora_grad_ab(x, dy, xa, dyb, s, dt, dt)
    row["dA"] = rel(dA, s * dyb.double().t() @ x.double())
    row["dB"] = rel(dB, s * dy.double().t() @ xa.double())
    row["ok"] = ok and row["dA"] < 1e-2 and row["dB"] < 1e-2
    return row


def median(v):
    return sorted(v)[len(v) // 2]


def gpu_us(fn, calls=3):
    """GPU µs per call of `fn`, all its kernels together (torch.profiler; no host time, no L2 flush)."""
    return sum(us for _, us in kernel_times_us([fn], rounds=calls))


def timed(cands, rounds, base_of):
    """Per candidate, interleaved rounds: the median do_bench median, and the medians over rounds of its ratio to
    its base (`base_of(name)`) by do_bench and by GPU kernel time, each ratio taken within one round."""
    times = {n: [] for n in cands}
    gpu = {n: [] for n in cands}
    for _ in range(rounds):
        for name, fn in cands.items():
            times[name].append(do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3)
            gpu[name].append(gpu_us(fn))
    ratio = {n: median([t / b for t, b in zip(times[n], times[base_of(n)])]) for n in cands}
    gpu_ratio = {n: median([t / b for t, b in zip(gpu[n], gpu[base_of(n)])]) for n in cands}
    return {n: median(v) for n, v in times.items()}, ratio, gpu_ratio


def timings(M, K, N, r, rounds, dt=torch.bfloat16):
    """do_bench and GPU-time ratios of the inline forward and dX in each of VARIANTS (those that run), dA / dB
    with either final sum, and the autograd step in each variant."""
    x, W, _, A, B, dy = random_lora_inputs(M, K, N, r, dt, 0)
    cands = {"base_fwd": lambda: F.linear(x, W), "base_dx": lambda: torch.mm(dy, W)}
    variants = []
    for spec in VARIANTS:
        fwd, dxp = plans(x, W, None, A, B, dy, spec)
        try:
            fwd(x, W, None, A, B, 2.0, 0, None, None)
            dxp(dy, W, A, B, 2.0, 0, None, None)
        except Exception:  # noqa: BLE001 - the checks report it
            continue
        variants.append(spec)
        cands[f"fwd_{spec}"] = lambda p=fwd: p(x, W, None, A, B, 2.0, 0, None, None)
        cands[f"dx_{spec}"] = lambda p=dxp: p(dy, W, A, B, 2.0, 0, None, None)
    xa, dyb = x @ A.t(), dy @ B
    ab = lora_bwd._GradABPlan(x, dy, xa, dyb, dt, dt, 0.0, True, True)

    def ab_torch_sums():  # the partial sums added as before: torch's sum(0, dtype), a copy and a reduce each
        oa = torch.empty(ab.out_a[0], device="cuda", dtype=ab.out_a[1])
        ob = torch.empty(ab.out_b[0], device="cuda", dtype=ab.out_b[1])
        ab.launch(dyb, x, dy, xa, oa, ob, 2.0, 0, x, x)  # DX, A: placeholders (no dX term)
        return oa.sum(0, dtype=dt), ob.sum(0, dtype=dt)

    cands["grad_ab"] = lambda: ab(x, dy, xa, dyb, 2.0, 0)
    cands["grad_ab_torch_sums"] = ab_torch_sums
    xg = x.clone().requires_grad_()
    Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()

    def base_step():
        torch.autograd.grad(F.linear(xg, W), (xg,), dy)

    def lora_step():
        torch.autograd.grad(lora_fast.lora_linear(xg, W, None, Ag, Bg, 2.0), (xg, Ag, Bg), dy)

    t, ratio, gpu_ratio = timed(cands, rounds, lambda n: "base_fwd" if n.startswith("fwd") else "base_dx")
    steps = {"base_step": [], **{f"step_{v}": [] for v in variants}}
    for _ in range(rounds):
        steps["base_step"].append(do_bench(base_step, warmup=25, rep=200, return_mode="median") * 1e3)
        for spec in variants:
            set_variant(M, dt, spec)
            steps[f"step_{spec}"].append(do_bench(lora_step, warmup=25, rep=200, return_mode="median") * 1e3)
    set_variant(M, dt, None)
    paired = {}
    for base in ("base_fwd", "base_dx"):
        group = {n: f for n, f in cands.items() if n == base or n.startswith(base[5:] + "_")}
        paired.update({f"paired_{n}": v for n, v in paired_ratios(group, base).items() if n != base})
    step_plans = {}
    for spec in variants:  # each step's plans built under its variant, then called with the override gone
        set_variant(M, dt, spec)
        lora_step()
        step_plans[spec] = (dict(lora_fwd._PLANS.items()), dict(lora_bwd._DX_PLANS.items()))
    set_variant(M, dt, None)

    def step_with(spec):
        def run():
            lora_fwd._PLANS.clear()
            lora_bwd._DX_PLANS.clear()
            lora_fwd._PLANS.update(step_plans[spec][0])
            lora_bwd._DX_PLANS.update(step_plans[spec][1])
            lora_step()
        return run

    paired.update({f"paired_step_{s}": v for s, v in paired_ratios(
        {"base_step": base_step, **{s: step_with(s) for s in variants}}, "base_step").items() if s != "base_step"})
    set_variant(M, dt, None)
    kernels = kernel_times_us([lora_step, base_step], rounds=3)
    ratios = {k: v for k, v in ratio.items() if k.startswith(("fwd_", "dx_"))}
    ratios.update({f"gpu_{k}": v for k, v in gpu_ratio.items() if k.startswith(("fwd_", "dx_"))})
    ratios.update({k: median([a / b for a, b in zip(v, steps["base_step"])]) for k, v in steps.items()
                   if k.startswith("step_")})
    t.update({k: median(v) for k, v in steps.items()})
    ratios.update({k: t[k] / t["base_step"] for k in ("grad_ab", "grad_ab_torch_sums")})
    ratios.update(paired)
    return {"shape": [M, K, N, r], "us": t, "ratios": ratios, "step_kernels_us": kernels}


def main():
    global VARIANTS
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/exp")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--variants", default=",".join(VARIANTS), help="d or sN (module docstring)")
    p.add_argument("--shapes", type=int, default=len(TIMED), help="time the first this many shapes")
    args = p.parse_args()
    VARIANTS = tuple(args.variants.split(","))
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    checks = []
    for s in ([] if args.no_check else CHECKS):
        checks.append(check(*s))
        print("check", json.dumps(checks[-1]), flush=True)
    rows = []
    for s in TIMED[:args.shapes]:
        rows.append(timings(*s, args.rounds))
        with open(os.path.join(args.out, "exp_inline_stages.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "checks": checks, "timings": rows}, f, indent=1)
    print_shape_report(rows, checks)


if __name__ == "__main__":
    main()
