"""Probe: where one decode call's time goes, kernel by kernel, under a CUDA graph.

For the single-adapter forward (`lora_fast.lora_linear`, no grad) at M = 1 and 16, K = N = 4096, r = 16, bf16,
and the base `F.linear`: the graph time per call over 8 rotated weight sets (ratio to the base), the kernels' GPU
time, and one call's timeline (each kernel's start and end from the call's first kernel, medians over replays),
which shows whether a PDL consumer starts at once or waits for SMs held by the kernel before it, and the idle gap
between calls in the graph. Also with PDL off, and two F.linear calls per call (a two-kernel call of cuBLAS's);
and each graph with its calls repeated 4 times (32 a replay), which separates a cost per replay from one per call.
`--rows` takes other row counts: above 16 rows each of the forward's xa modes "split" and "shrink" is timed too
(at 65-4096 rows "auto" takes one of them with `config.mid_tile`'s tiles; bench/NOTES.md, nineteenth session: the
forward at 256 rows ran 1.35x the base where a plain TMA GEMM of its tile ran 1.03-1.07x).

    PYTHONPATH=$PWD python3 bench/probe_decode_timeline.py [--out DIR] [--rows 1,16]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import bench_graph_us, graph_kernel_timeline, graph_kernel_times  # noqa: E402
import lora_fast  # noqa: E402
from lora_fast import kernels  # noqa: E402
from lora_fast.kernels import helpers  # noqa: E402
from lora_fast.kernels.launch import clear_plans  # noqa: E402

SETS = 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/probe")
    ap.add_argument("--rows", default="1,16", help="comma-separated row counts")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    dt, K, N, r = torch.bfloat16, 4096, 4096, 16
    sets = [(torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5,
             torch.randn(r, K, device="cuda", dtype=dt) / K ** 0.5,
             torch.randn(N, r, device="cuda", dtype=dt) / r ** 0.5) for _ in range(SETS)]
    rows = []
    with torch.no_grad():
        for M in (int(v) for v in args.rows.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=dt)
            lora = [lambda W=W, A=A, B=B: lora_fast.lora_linear(x, W, None, A, B, 2.0) for W, A, B in sets]
            provs = {"base": [lambda W=W: F.linear(x, W) for W, _, _ in sets], "lora_linear": lora,
                     "lora_linear_nopdl": lora,  # the same calls with PDL off (the kernels in stream order)
                     "base_x2": [lambda W=W: (F.linear(x, W), F.linear(x, W)) for W, _, _ in sets]}
            for mode in (("split", "shrink") if M > 16 else ()):
                provs[mode] = [lambda W=W, A=A, B=B, mode=mode: kernels.lora_forward(x, W, None, A, B, 2.0,
                                                                                   xa_mode=mode)
                               for W, A, B in sets]
            base = None
            for name, fns in provs.items():
                helpers.PDL_ENV = name != "lora_linear_nopdl"
                clear_plans()
                us = bench_graph_us(fns)
                base = base or us
                # the same calls 4 times over in one graph (32 calls a replay): a fixed cost per replay (the graph's
                # launch) shrinks per call, a cost per call does not
                us32 = bench_graph_us(list(fns) * 4)
                row = {"M": M, "provider": name, "graph_us": us, "ratio": us / base, "graph_us_32_calls": us32,
                       "kernels": {k[:50]: round(t, 2) for k, _, t in graph_kernel_times(fns)},
                       "timeline": [(k[:50], round(a, 2), round(b, 2)) for k, a, b in graph_kernel_timeline(fns)]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "probe_decode_timeline.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    for row in rows:
        print(f"M={row['M']:<3} {row['provider']:<12} {row['graph_us']:6.2f} us {row['ratio']:.3f}x "
              f"(32 calls a replay: {row['graph_us_32_calls']:6.2f} us)  {row['timeline']}")


if __name__ == "__main__":
    main()
