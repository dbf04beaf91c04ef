"""dX's dropout term in the dX GEMM's epilogue, column slice by column slice (`term_epilogue=True`,
`_dx_dropout_epilogue`), against its own pass (`_lora_dx_dropout_term_kernel`) and against dA's programs adding it
(`dx_term_in_grad_ab`, the default before), at 8192 x 4096 x 4096 (bf16, p = 0.1), r = 16 and 64.

Prediction: the own pass costs ~58 µs (a read-modify-write of dX, 128 MiB, plus the mask); in the epilogue the
mask is drawn by the GEMM's programs between tiles (~14 µs of issue over the whole dX at 8 elements per Philox
call, not overlapped with the next tile's loads), so dX with its term ~40 µs faster than GEMM + pass, and the step
~30-40 µs (~4 %) faster than either earlier path.

Checks first: dx of each path against an fp32 reference (dY @ W + s * keep * ((dY @ B) @ A) / (1 - p), the keep
mask from kernels.dropout_mask), into a NaN-filled output, at the full size and at odd shapes (M = 777, N = 4000,
K = 4104, r = 3; M = 300, r = 64); then the kernel time of dX alone, then one training step (lora_linear fwd+bwd)
per path by interleaved do_bench medians against F.linear's step, for two column slice widths.

    PYTHONPATH=$PWD python3 bench/exp_dx_dropout_epilogue.py [--out DIR]

Outcome on the H200 (2026-12-01, results/exp_dx_dropout_epilogue.json): every check passes, but the epilogue saves
nothing. dX with its term in 64-column slices took 405 µs against the dropout-free GEMM's 360 + the pass's 59 (the
epilogue's mask draw, ~5 µs per tile, runs between two tiles' main loops); the backward kernels per step, medians
of 5 interleaved rounds: r = 16 own pass 473, dA's programs 480, epilogue 470 (32-column slices 500); r = 64
514 / 503 / 525 (563). So the option stays off ("auto" = kernels.lora_bwd.DX_DROPOUT_EPILOGUE).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import (  # noqa: E402
    finish_report, interleaved_ratios, kernel_times_us, lora_training_step, random_lora_inputs, rel_err,
    training_problem,
)

from lora_fast import kernels  # noqa: E402
from lora_fast.kernels import lora_bwd  # noqa: E402
from lora_fast.kernels.launch import clear_plans  # noqa: E402

# path name -> (DX_DROPOUT_EPILOGUE, DX_TERM_IN_AB, DX_EPILOGUE_COLUMNS)
PATHS = {"own_pass": (False, False, 64), "in_grad_ab": (False, True, 64), "epilogue_32": (True, True, 32),
         "epilogue_64": (True, True, 64)}


def use(path):
    """Switch the kernels to `path` (plans rebuilt only on a change)."""
    if (lora_bwd.DX_DROPOUT_EPILOGUE, lora_bwd.DX_TERM_IN_AB, lora_bwd.DX_EPILOGUE_COLUMNS) != PATHS[path]:
        lora_bwd.DX_DROPOUT_EPILOGUE, lora_bwd.DX_TERM_IN_AB, lora_bwd.DX_EPILOGUE_COLUMNS = PATHS[path]
        clear_plans()


def dx_reference(dy, W, A, B, s, p, seed):
    keep = kernels.dropout_mask(seed, dy.shape[0], W.shape[1], p, dy.device)
    f = (lambda t: t.float())
    return f(dy) @ f(W) + s * ((f(dy) @ f(B)) @ f(A)) * keep / (1 - p)


def check_dx(M, K, N, r, checks, seed=7, p=0.1, s=2.0):
    x, W, b, A, B, dy = random_lora_inputs(M, K, N, r, torch.bfloat16, seed=seed + r)
    ref = dx_reference(dy, W, A, B, s, p, 1234)
    for te in (False, True):
        out = torch.full((M, K), float("nan"), device="cuda", dtype=torch.bfloat16)
        dx, _ = kernels.lora_backward_dx(dy, W, A, B, s, p, 1234, out=out, term_epilogue=te)
        err = rel_err(dx, ref)
        ok = err < 1e-2 and not torch.isnan(dx).any().item()
        checks.append({"check": f"dx {M}x{K}x{N} r={r} term_epilogue={te}", "rel_err": err, "ok": ok})
        print(checks[-1], flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    checks, report = [], {}
    for path in ("epilogue_32", "epilogue_64"):
        use(path)
        for shape in ((8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (777, 4104, 4000, 3), (300, 1024, 2048, 64)):
            check_dx(*shape, checks)
    for r in (16, 64):
        s, p = 2.0, 0.1
        x, W, A, B, dy, xg, Ag, Bg = training_problem(r, seed=5 + r)

        def step(path):  # one training step, the same dropout seed every time
            return lora_training_step(xg, W, Ag, Bg, s, p, dy, before=lambda: use(path))
        grads = {path: step(path)() for path in PATHS}
        row = {"r": r}
        for path, g in grads.items():
            errs = {n: rel_err(a, b) for n, a, b in zip(("dx", "dA", "dB"), g, grads["own_pass"])}
            ok = all(v < 2e-2 for v in errs.values()) and not any(torch.isnan(t).any().item() for t in g)
            checks.append({"check": f"step r={r} {path} vs own_pass", **errs, "ok": ok})
            print(checks[-1], flush=True)

        # backward kernel time per step (dX, its term, dA / dB and their sum), by path, over interleaved rounds
        # (the same kernel's time moved by up to 8 % between two profiles of one run: clocks)
        bwd = {path: [] for path in PATHS}
        for i in range(5):
            for path in (list(PATHS) if i % 2 == 0 else list(PATHS)[::-1]):
                use(path)
                ks = kernel_times_us([step(path)], rounds=3)
                bwd[path].append(sum(t for n, t in ks if any(k in n for k in ("bwd_dx", "dropout_term", "grad_ab",
                                                                                "sum_splits"))))
        row["bwd_kernels_us_median"] = {path: sorted(v)[len(v) // 2] for path, v in bwd.items()}
        row["bwd_kernels_us_all"] = bwd
        print(r, "backward kernels (median µs)", row["bwd_kernels_us_median"], flush=True)
        base = (lambda: torch.autograd.grad(F.linear(xg, W), [xg], dy))
        fns = {"base": base, **{path: step(path) for path in PATHS}}
        row["fwd_bwd_ratio"] = interleaved_ratios(fns, "base", rounds=5)
        print(r, row["fwd_bwd_ratio"], flush=True)
        report[f"r{r}"] = row
    use("in_grad_ab")  # the default
    ok = finish_report(report, checks, args.out, "exp_dx_dropout_epilogue.json")
    for r in (16, 64):
        print(f"r={r} backward kernels µs:", {k: round(v, 1) for k, v in report[f"r{r}"]["bwd_kernels_us_median"].items()})
        print(f"r={r} fwd+bwd / base:", {k: round(v, 3) for k, v in report[f"r{r}"]["fwd_bwd_ratio"].items()})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
