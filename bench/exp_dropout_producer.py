"""The forward's rank product with dropout at 8192 x 4096 x 4096 (bf16, r = 16, p = 0.1): a shrink launch that
draws the mask first ("shrink", the default since the 16-bit mask) against the persistent GEMM's producer tiles
drawing it in their K loop ("producer", the default without dropout). Checks y and xa of both against each other
and against the reference on a slice of rows, then times the forward and a training step (lora_linear fwd+bwd,
"auto" with kernels.lora_fwd.PRODUCER_DROPOUT off and on) by interleaved do_bench medians against F.linear.

Predicted: the shrink costs ~45-49 µs a forward (X read again plus the mask); the producers read no X twice and
their mask work (~20 µs of the GPU's issue time) lands on 64 of the 132 programs of the first wave, where the
other tiles wait for their row block's xa: a gain only if that wait stays under the shrink's time.

    PYTHONPATH=$PWD python3 bench/exp_dropout_producer.py [--out DIR]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import interleaved_ratios, random_lora_inputs  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import kernels  # noqa: E402
from lora_fast.kernels import lora_fwd  # noqa: E402
from lora_fast.kernels.launch import clear_plans  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    M, K, N, r, s, p, seed = 8192, 4096, 4096, 16, 2.0, 0.1, 1234
    x, W, b, A, B, dy = random_lora_inputs(M, K, N, r, torch.bfloat16, seed=3)
    report = {"shape": [M, K, N, r], "p": p}
    ys = {}
    for mode in ("shrink", "producer"):
        y = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        _, xa = kernels.lora_forward(x, W, None, A, B, s, p, seed, store_xa=True, xa_mode=mode, out=y)
        ys[mode] = (y, xa)
    rows = slice(M - 256, M)
    keep = kernels.dropout_mask(seed, M, K, p, "cuda")[rows]
    xd = x[rows].float() * keep / (1 - p)
    xa_ref = xd @ A.float().t()
    y_ref = x[rows].float() @ W.float().t() + s * xa_ref.bfloat16().float() @ B.float().t()
    for mode, (y, xa) in ys.items():
        report[f"{mode}_y_tail_rel_err"] = rel(y[rows], y_ref)
        report[f"{mode}_xa_tail_rel_err"] = rel(xa[rows], xa_ref)
        report[f"{mode}_nan"] = int(torch.isnan(y).sum())
    report["y_producer_vs_shrink"] = rel(ys["producer"][0], ys["shrink"][0])
    report["xa_producer_vs_shrink"] = rel(ys["producer"][1], ys["shrink"][1])
    report["checks_ok"] = (max(report[f"{m}_{w}_tail_rel_err"] for m in ys for w in ("y", "xa")) < 1e-2
                           and report["y_producer_vs_shrink"] < 1e-2 and not any(report[f"{m}_nan"] for m in ys))
    print(report, flush=True)
    fwd = {"base": lambda: F.linear(x, W),
           "shrink": lambda: kernels.lora_forward(x, W, None, A, B, s, p, seed, store_xa=True, xa_mode="shrink"),
           "producer": lambda: kernels.lora_forward(x, W, None, A, B, s, p, seed, store_xa=True,
                                                    xa_mode="producer")}
    report["fwd_ratio"] = interleaved_ratios(fwd, "base", rounds=5)
    print("fwd", report["fwd_ratio"], flush=True)
    xg = x.clone().requires_grad_()
    Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()

    def step():
        y = lora_fast.lora_linear(xg, W, None, Ag, Bg, s, p, True)
        torch.autograd.grad(y, [xg, Ag, Bg], dy)

    def with_switch(on):
        def run():
            if lora_fwd.PRODUCER_DROPOUT != on:
                lora_fwd.PRODUCER_DROPOUT = on
            step()
        return run
    base_step = (lambda: torch.autograd.grad(F.linear(xg, W), [xg], dy))
    report["fwd_bwd_ratio"] = interleaved_ratios({"base": base_step, "shrink": with_switch(False),
                                                  "producer": with_switch(True)}, "base", rounds=5)
    lora_fwd.PRODUCER_DROPOUT = False
    clear_plans()
    print("fwd+bwd", report["fwd_bwd_ratio"], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "exp_dropout_producer.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(f"summary: checks {'ok' if report['checks_ok'] else 'FAILED'}; fwd shrink "
          f"{report['fwd_ratio']['shrink']:.3f} producer {report['fwd_ratio']['producer']:.3f}; fwd+bwd shrink "
          f"{report['fwd_bwd_ratio']['shrink']:.3f} producer {report['fwd_bwd_ratio']['producer']:.3f}")


if __name__ == "__main__":
    main()
