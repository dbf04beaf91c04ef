"""Experiment: what DoRA's column scale costs in the dX GEMM, against scaling dY once beforehand; and the persistent
tile walk against one tile per program for the forward and dX GEMMs at three shapes.

DoRA's backward needs dX = (g * dY) @ W + ... with g = magnitude / ||W + sBA|| per column of dY. The launcher can
scale each dY tile inside the GEMM's loop (`dy_scale`, the persistent walk off: wrong results on the H200 with it,
bench/NOTES.md), or one pass `scale_columns` writes dY' = g * dY (and sums the magnitude gradient's columns) before
the plain dX. Every case is timed with do_bench (L2 flushed) in 3 interleaved rounds; the median is reported, as a
ratio to cuBLAS's GEMM of the same shape. bf16, r = 16, M = 8192. Prints one table; writes JSON to --out.

    PYTHONPATH=$PWD python3 bench/exp_dora_dx.py --out $OUT
"""
import argparse
import json
import os
import statistics
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lora_fast.kernels import config  # noqa: E402
from lora_fast.kernels.dora import column_dot, scale_columns  # noqa: E402
from lora_fast.kernels.lora_bwd import lora_backward_dx  # noqa: E402
from lora_fast.kernels.lora_fwd import lora_forward  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def with_config(kernel, persistent, fn):
    """fn under the "large" config of `kernel` with persistent set as asked (plans rebuilt; the override is
    removed again by `fn.restore()`). Apply it with `fn.apply()` outside any timed region."""
    class Run:
        def apply(self):
            cfg = config.gemm_config(kernel, 8192, torch.bfloat16, 0)
            config.set_override(kernel, "large", replace(cfg, persistent=persistent))

        def restore(self):
            config.set_override(kernel, "large", None)

        def __call__(self):
            return fn()
    return Run()


def under(run):
    """run() under its config, if it has one."""
    if hasattr(run, "apply"):
        run.apply()
        try:
            return run()
        finally:
            run.restore()
    return run()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dev, dt, M, r = "cuda", torch.bfloat16, 8192, 16
    rows, checks = [], []
    for K, N in ((4096, 4096), (4096, 14336), (14336, 4096)):
        torch.manual_seed(0)
        x, dy = torch.randn(M, K, device=dev, dtype=dt), torch.randn(M, N, device=dev, dtype=dt)
        y = torch.randn(M, N, device=dev, dtype=dt)
        W = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
        A, B = torch.randn(r, K, device=dev, dtype=dt) / K ** 0.5, torch.randn(N, r, device=dev, dtype=dt)
        g = torch.rand(N, device=dev) + 0.5
        dyg = (dy.float() * g).to(dt)
        ref_dx = lora_backward_dx(dyg, W, A, B, 2.0)[0]
        ref_y = lora_forward(x, W, None, A, B, 2.0)[0]
        checks += [
            {"K": K, "N": N, "check": "dX in-loop scale vs prescaled", "rel_err": rel(
                lora_backward_dx(dy, W, A, B, 2.0, dy_scale=g)[0], ref_dx)},
            {"K": K, "N": N, "check": "scale_columns vs torch", "rel_err": rel(scale_columns(dy, g)[0], dyg)},
            {"K": K, "N": N, "check": "scale_columns dot vs column_dot", "rel_err": rel(
                scale_columns(dy, g, y)[1], column_dot(dy, y))},
            {"K": K, "N": N, "check": "dX not persistent vs persistent", "rel_err": rel(
                under(with_config("dx", False, lambda: lora_backward_dx(dyg, W, A, B, 2.0)[0])), ref_dx)},
            {"K": K, "N": N, "check": "fwd not persistent vs persistent", "rel_err": rel(
                under(with_config("fwd", False, lambda: lora_forward(x, W, None, A, B, 2.0)[0])), ref_y)},
        ]
        cases = {
            "cuBLAS dY @ W": lambda: torch.mm(dy, W),
            "cuBLAS F.linear": lambda: F.linear(x, W),
            "dX persistent": with_config("dx", True, lambda: lora_backward_dx(dy, W, A, B, 2.0)),
            "dX one tile per program": with_config("dx", False, lambda: lora_backward_dx(dy, W, A, B, 2.0)),
            "fwd persistent": with_config("fwd", True, lambda: lora_forward(x, W, None, A, B, 2.0)),
            "fwd one tile per program": with_config("fwd", False, lambda: lora_forward(x, W, None, A, B, 2.0)),
            "DoRA dX, in-loop dy_scale": lambda: lora_backward_dx(dy, W, A, B, 2.0, dy_scale=g),
            "scale_columns(dy, g)": lambda: scale_columns(dy, g),
            "scale_columns(dy, g, y) (+ dm sums)": lambda: scale_columns(dy, g, y),
            "column_dot(dy, y)": lambda: column_dot(dy, y),
            "DoRA dX, scale_columns + dX": lambda: lora_backward_dx(scale_columns(dy, g, y)[0], W, A, B, 2.0),
        }
        times = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                if hasattr(fn, "apply"):
                    fn.apply()
                times[name].append(1e3 * do_bench(fn, warmup=5, rep=40))
                if hasattr(fn, "restore"):
                    fn.restore()
        for name, ts in times.items():
            rows.append({"K": K, "N": N, "case": name, "us": statistics.median(ts), "all_us": ts})
        base = {"dX": statistics.median(times["cuBLAS dY @ W"]), "fwd": statistics.median(times["cuBLAS F.linear"])}
        for row in rows[-len(cases):]:
            row["ratio"] = row["us"] / (base["fwd"] if row["case"].startswith(("fwd", "cuBLAS F")) else base["dX"])
    for row in rows:
        print(f"K={row['K']:6d} N={row['N']:6d}  {row['case']:40s} {row['us']:9.1f} us  {row['ratio']:.3f}")
    for c in checks:
        print(f"K={c['K']:6d} N={c['N']:6d}  check {c['check']:40s} rel err {c['rel_err']:.2e}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "exp_dora_dx.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                   "checks": checks}, f, indent=1)


if __name__ == "__main__":
    main()
