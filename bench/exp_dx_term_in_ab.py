"""dX's dropout term added by dA's programs (lora_grad_ab with dx / lora_A) against its own pass
(`_lora_dx_dropout_term_kernel`), at 8192 x 4096 x 4096 (bf16, r = 16, p = 0.1), and at r = 64.

Both draw the forward's mask: the own pass reads dyb and A and rewrites dX (128 MiB plus the mask, 60-63 µs on the
H200), then dA's programs draw the mask again for drop(X) (dA/dB 58-61 µs with dropout, 36 without). Fused, the
mask is drawn once: predicted ~25-30 µs less per step (~3-4 % of the step). Checks dx, dA and dB of both paths
against each other (and the switch off = the one-launcher dX) on the full size, then times one training step
(lora_linear fwd+bwd, "auto") with kernels.lora_bwd.DX_TERM_IN_AB off and on by interleaved do_bench medians
against F.linear's step.

    PYTHONPATH=$PWD python3 bench/exp_dx_term_in_ab.py [--out DIR]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import interleaved_ratios, kernel_times_us, random_lora_inputs  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast.kernels import lora_bwd  # noqa: E402
from lora_fast.kernels.launch import clear_plans  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    report = {}
    for r in (16, 64):
        M, K, N, s, p = 8192, 4096, 4096, 2.0, 0.1
        x, W, b, A, B, dy = random_lora_inputs(M, K, N, r, torch.bfloat16, seed=5 + r)
        xg = x.clone().requires_grad_()
        Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()

        def step(on):
            def run():
                lora_bwd.DX_TERM_IN_AB = on
                torch.manual_seed(11)  # one dropout seed for both paths
                y = lora_fast.lora_linear(xg, W, None, Ag, Bg, s, p, True)
                return torch.autograd.grad(y, [xg, Ag, Bg], dy)
            return run
        fused, plain = step(True)(), step(False)()
        errs = {name: rel(g1, g2) for name, g1, g2 in zip(("dx", "dA", "dB"), fused, plain)}
        ok = all(v < 2e-2 for v in errs.values()) and not any(torch.isnan(g).any().item() for g in fused)
        row = {"r": r, "fused_vs_own_pass": errs, "checks_ok": ok}
        if r == 16:
            base = (lambda: torch.autograd.grad(F.linear(xg, W), [xg], dy))
            row["fwd_bwd_ratio"] = interleaved_ratios({"base": base, "own_pass": step(False), "in_grad_ab": step(True)},
                                                      "base", rounds=5)
            for name, on in (("own_pass", False), ("in_grad_ab", True)):
                row[f"kernels_{name}"] = kernel_times_us([step(on)], rounds=3)
            # dA's tile with the term: rows per step, K columns, warps (the default first)
            default = lora_bwd.DX_TERM_TILE
            for tile in (default, (64, 128, 8), (32, 128, 8), (64, 64, 8), (32, 64, 8)):
                lora_bwd.DX_TERM_TILE = tile
                clear_plans()
                g = step(True)()
                row[f"tile_{tile}"] = {"rel_err_dx": rel(g[0], plain[0]), "rel_err_dA": rel(g[1], plain[1]),
                                       "kernels": [k for k in kernel_times_us([step(True)], rounds=3)
                                                   if "grad_ab" in k[0] or "sum_splits" in k[0]]}
                print(tile, row[f"tile_{tile}"], flush=True)
            lora_bwd.DX_TERM_TILE = default
            clear_plans()
        lora_bwd.DX_TERM_IN_AB = True
        report[f"r{r}"] = row
        print(row, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "exp_dx_term_in_ab.json"), "w") as f:
            json.dump(report, f, indent=1)
    r16 = report["r16"]
    print(f"summary: checks {'ok' if all(v['checks_ok'] for v in report.values()) else 'FAILED'}; dropout fwd+bwd "
          f"own pass {r16['fwd_bwd_ratio']['own_pass']:.3f}x, in grad_ab {r16['fwd_bwd_ratio']['in_grad_ab']:.3f}x")


if __name__ == "__main__":
    main()
