"""Experiment: tile configs of the fused LoRA forward at decode sizes (M = 1 and 16, K = N = 4096, r = 16, bf16),
timed under a CUDA graph over 8 rotated weight sets against F.linear in the same graph setup. Each config's output
is checked against the fp32 reference. Prints a table; writes JSON to --out.

    python bench/exp_decode.py --out /tmp/exp
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import bench_graph_us, rel_err  # noqa: E402
from lora_fast.kernels import config as kconfig  # noqa: E402
from lora_fast.kernels import lora_fwd  # noqa: E402

# (BLOCK_N, BLOCK_K, num_warps, num_stages, padded rank block)
CONFIGS = [(32, 256, 4, 4, 64), (32, 256, 4, 4, 16), (64, 256, 4, 4, 64), (16, 256, 4, 4, 64),
           (32, 128, 4, 6, 64), (32, 512, 8, 3, 64), (64, 128, 4, 6, 16), (16, 512, 4, 3, 16)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/exp")
    ap.add_argument("--configs", default=None, help="JSON list of [BLOCK_N, BLOCK_K, warps, stages, rank block]")
    args = ap.parse_args()
    configs = [tuple(c) for c in json.loads(args.configs)] if args.configs else CONFIGS
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    dev, dt, K, N, r = "cuda", torch.bfloat16, 4096, 4096, 16
    sets = [(torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5, torch.randn(r, K, device=dev, dtype=dt) / K ** 0.5,
             torch.randn(N, r, device=dev, dtype=dt) * 0.1) for _ in range(8)]
    rows = []
    default_rank_block = lora_fwd.DECODE_RANK_BLOCK
    for M in (1, 16):
        x = torch.randn(M, K, device=dev, dtype=dt)
        base = bench_graph_us([lambda W=W: F.linear(x, W) for W, _, _ in sets])
        rows.append({"M": M, "config": "base F.linear", "us": base, "ratio": 1.0, "rel_err": 0.0})
        for bn, bk, warps, stages, rank_block in configs:
            kconfig.set_override("fwd", kconfig.shape_class(M), kconfig.GemmConfig(
                16, bn, bk, group_m=1, num_warps=warps, num_stages=stages))
            lora_fwd.DECODE_RANK_BLOCK = rank_block
            W, A, B = sets[0]
            y = lora_fwd.lora_forward(x, W, None, A, B, 2.0)[0]
            ref = x.float() @ W.float().t() + 2.0 * (x @ A.t()).to(dt).float() @ B.float().t()
            err = rel_err(y, ref)
            us = bench_graph_us([lambda W=W, A=A, B=B: lora_fwd.lora_forward(x, W, None, A, B, 2.0)
                                 for W, A, B in sets])
            rows.append({"M": M, "config": f"BN{bn} BK{bk} w{warps} s{stages} R{rank_block}", "us": us,
                         "ratio": us / base, "rel_err": err})
        kconfig.set_override("fwd", kconfig.shape_class(M), None)
        lora_fwd.DECODE_RANK_BLOCK = default_rank_block
    with open(os.path.join(args.out, "exp_decode.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    for row in rows:
        print(f"M={row['M']:>2} {row['config']:<26} {row['us']:7.2f} us {row['ratio']:5.3f}x  err {row['rel_err']:.1e}")


if __name__ == "__main__":
    main()
