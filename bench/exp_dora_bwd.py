"""Experiment: two ways DoRA's backward applies g = m / norm to the gradient, A/B in one run.

    scale_w  (default): one launch scales W's and B's rows by g (a pass over W: N x K read and written), dX is
                        LoRA's on (g * W, A, g * B) with dY unscaled, and dA/dB's pass over dY also sums dm's columns
                        (one more read, of the saved y) and scales dB's rows by g;
    scale_dy (before):  one pass writes g * dY (M x N read, written, plus y read for dm's sums), then LoRA's
                        backward on g * dY.
Predicted (bytes): at M=8192, K=4096: N=4096 scale_w moves 64 MB + 64 MB (W pass, y read) against 192 MB for the dY
pass (~30 µs of ~900 per step); N=14336 235 + 235 MB against 705 MB (~75 µs of ~2900).

Per shape: each provider's fwd+bwd ratio to the base (F.linear fwd+bwd) from `common.paired_ratios` (interleaved
rounds), do_bench medians, and the profiler's GPU time per kernel per step for both DoRA modes. bf16, r=16.
Writes OUT/exp_dora_bwd.json; prints a table last.

    PYTHONPATH=$PWD python3 bench/exp_dora_bwd.py --out $OUT [--rounds 9]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import common  # noqa: E402
from bench.gpu_variants import Holder, fwd_bwd, make_inputs, ours_dora, trainable  # noqa: E402
import lora_fast  # noqa: E402
import lora_fast.dora as dora_mod  # noqa: E402


def with_mode(fn, scale_dy):
    def run():
        dora_mod.SCALE_DY_PASS = scale_dy
        try:
            return fn()
        finally:
            dora_mod.SCALE_DY_PASS = False
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("exp_dora_bwd: no CUDA, nothing to measure")
        return 0
    t0 = time.time()
    rows, meta = [], {"kernels": {}}
    for M, K, N in ((8192, 4096, 4096), (8192, 4096, 14336)):
        x, lin, dy = make_inputs(M, K, N, seed=2)
        xg = x.clone().requires_grad_()
        layer = ours_dora(lin)
        lora = lora_fast.LoRALinear.from_linear(lin, rank=16, alpha=32)
        with torch.no_grad():
            lora.lora_B.normal_(0, 0.02)
        step = fwd_bwd(layer, xg, dy, trainable(layer))
        fns = {"base": fwd_bwd(Holder(lin), xg, dy, []), "lora": fwd_bwd(lora, xg, dy, trainable(lora)),
               "dora_scale_w": with_mode(step, False), "dora_scale_dy": with_mode(step, True)}
        # the two modes agree (same inputs, fresh grads)
        grads = {}
        for mode in (False, True):
            for p in (xg, *trainable(layer)):
                p.grad = None
            dora_mod.SCALE_DY_PASS = mode
            layer(xg).backward(dy)
            dora_mod.SCALE_DY_PASS = False
            grads[mode] = [p.grad.float().clone() for p in (xg, *trainable(layer))]
        agree = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(grads[False], grads[True]))
        paired = common.paired_ratios(fns, "base", rounds=args.rounds)
        case = f"{M}x{K}x{N}"
        for name, fn in fns.items():
            us = common.bench_us(fn)[0]
            rows.append({"case": case, "provider": name, "paired_ratio": paired[name], "do_bench_us": us})
        base_us = next(r["do_bench_us"] for r in rows if r["case"] == case and r["provider"] == "base")
        for r in rows:
            if r["case"] == case:
                r["do_bench_ratio"] = r["do_bench_us"] / base_us
        for name in ("dora_scale_w", "dora_scale_dy"):
            kt = common.kernel_times_us([fns[name]], rounds=5)
            meta["kernels"][f"{case} {name}"] = sorted(((k[:70], round(v, 1)) for k, v in kt), key=lambda t: -t[1])
        meta[f"{case} modes_max_rel_diff"] = agree
        print(f"[{time.time() - t0:.0f}s] {case}: modes agree to {agree:.2e}", flush=True)
        del x, xg, dy, lin, layer, lora, fns, step
        torch.cuda.empty_cache()
    path = common.write_json("exp_dora_bwd", rows, meta, args.out)
    for key, kt in meta["kernels"].items():
        print(key, "total", round(sum(v for _, v in kt), 1), "us:", kt[:8])
    print(common.format_table(rows, ["case", "provider", "paired_ratio", "do_bench_ratio", "do_bench_us"]))
    print(f"wrote {path} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
