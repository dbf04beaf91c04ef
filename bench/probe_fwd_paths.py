"""Probe: does the issue-2 forward's ratio depend on the way it is called or on the way it is timed?

At M=8192, K=N=4096, r=16 (bf16, no bias) `exp_fwd_epilogue` measured the producer forward at 1.074-1.084x cuBLAS
(interleaved do_bench rounds, medians) while `bench_lora_linear --quick` gave 1.12-1.13x (`common.paired_ratios`).
This times, in one process and against the same `F.linear`:
  - the launcher `kernels.lora_forward` (xa_mode "auto", i.e. producer tiles) and with xa_mode "shrink";
  - the public `lora_fast.lora_linear` under no_grad (what the bench's "fused" forward runs);
  - `LoRALinear.forward` under no_grad;
by both methods: paired ratios (`common.paired_ratios`, 6 calls a round, L2 flushed before each) and the ratio of
do_bench medians over interleaved rounds; and the clock the base ran at (its TFLOP/s). Prints a table; JSON to --out.

    PYTHONPATH=$PWD python bench/probe_fwd_paths.py --out /tmp/probe
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import bench_us, paired_ratios  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast.kernels import lora_forward  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", default="8192,4096,4096")
    args = ap.parse_args()
    M, K, N = (int(v) for v in args.shape.split(","))
    r, s = 16, 2.0
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(M, K, device=dev).to(dt)
    W = (torch.randn(N, K, device=dev) * K ** -0.5).to(dt)
    A = (torch.randn(r, K, device=dev) * K ** -0.5).to(dt)
    B = (torch.randn(N, r, device=dev) * r ** -0.5).to(dt)
    layer = lora_fast.LoRALinear(K, N, rank=r, alpha=2 * r, bias=False, device=dev, dtype=dt)
    with torch.no_grad():
        layer.weight.copy_(W), layer.lora_A.copy_(A), layer.lora_B.copy_(B)
    fns = {
        "base": lambda: F.linear(x, W),
        "launcher_auto": lambda: lora_forward(x, W, None, A, B, s),
        "launcher_shrink": lambda: lora_forward(x, W, None, A, B, s, xa_mode="shrink"),
        "lora_linear": lambda: lora_fast.lora_linear(x, W, None, A, B, s),
        "module": lambda: layer(x),
    }
    out = {"shape": [M, K, N, r], "device": torch.cuda.get_device_name(), "paired": [], "do_bench_rounds": {}}
    with torch.no_grad():
        ref = F.linear(x.float(), W.float()) + s * (x.float() @ A.float().t()) @ B.float().t()
        for name, fn in fns.items():
            if name != "base":
                y = fn()
                y = y[0] if isinstance(y, tuple) else y
                err = ((y.float() - ref).norm() / ref.norm()).item()
                out.setdefault("rel_err", {})[name] = err
        for _ in range(2):
            out["paired"].append(paired_ratios(fns, "base", rounds=9))
        for i in range(args.rounds):
            for name in (fns if i % 2 == 0 else reversed(list(fns))):
                out["do_bench_rounds"].setdefault(name, []).append(bench_us(fns[name])[0])
    med = {n: sorted(v)[len(v) // 2] for n, v in out["do_bench_rounds"].items()}
    out["do_bench_median_us"] = med
    out["base_tflops"] = 2 * M * K * N / med["base"] / 1e6
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_fwd_paths.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"base {med['base']:.1f} us ({out['base_tflops']:.0f} TFLOP/s); rel errors {out['rel_err']}")
    print("| path | paired (run 1) | paired (run 2) | do_bench median ratio |\n|---|---|---|---|")
    for n in fns:
        print(f"| {n} | {out['paired'][0][n]:.3f} | {out['paired'][1][n]:.3f} | {med[n] / med['base']:.3f} |")


if __name__ == "__main__":
    main()
