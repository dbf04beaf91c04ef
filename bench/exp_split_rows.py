"""The single-adapter forward at 65-512 rows: which xa_mode under CUDA graphs.

The full grid of bench_lora_linear (2026-12-02, H200) showed the forward at M = 128 (K = N = 4096) at 1.45x the
base with r = 16 and 2.7-3.6x with dropout or r = 64 under graphs, behind the Unsloth-style addmm (1.7-2.1x).
"auto" takes "fused" there (xa recomputed by every N tile) or "shrink" (a shrink of 4 programs walking all of K
before the GEMM); "split" (xa as K-range partials, the GEMM a PDL consumer summing them in its epilogue) is
taken only up to 64 rows. This script times each mode per shape: one call under a CUDA graph over 8 weight
sets, as a ratio to F.linear in the same round (interleaved rounds, medians), each mode checked against the fp32
reference with the kernels' own dropout mask (NaN-filled output).

    PYTHONPATH=$PWD python3 bench/exp_split_rows.py [--out DIR] [--rounds 3] [--rows 96,128,256,512]

Writes DIR/exp_split_rows.json and prints a table last.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import format_table, interleaved_graph_ratios, rel_err, write_json  # noqa: E402
from lora_fast import kernels  # noqa: E402
from lora_fast.reference import lora_linear_reference  # noqa: E402

K = N = 4096
SETS = 8
SEED = 1234


def modes_for(rank: int, p: float) -> list[str]:
    out = ["auto", "split", "shrink"]
    if p == 0.0 and rank <= 64:
        out.append("fused")
    return out


def run_shape(M: int, r: int, p: float, rounds: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(M * 131 + r)
    dt = torch.bfloat16
    x = torch.randn(M, K, device="cuda", dtype=dt, generator=g)
    sets = [((torch.randn(N, K, device="cuda", dtype=dt, generator=g) / K**0.5),
             (torch.randn(r, K, device="cuda", dtype=dt, generator=g) / K**0.5),
             (torch.randn(N, r, device="cuda", dtype=dt, generator=g) / r**0.5)) for _ in range(SETS)]
    W0, A0, B0 = sets[0]
    mask = kernels.dropout_mask(SEED, M, K, p, "cuda") if p else None
    ref = lora_linear_reference(x.float(), W0.float(), None, A0.float(), B0.float(), 2.0, p, p > 0, mask)
    fn_sets = {"base": [(lambda W=W: F.linear(x, W)) for W, _, _ in sets]}
    checks = {}
    errors = {}
    for mode in modes_for(r, p):
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
        try:
            y, _ = kernels.lora_forward(x, W0, None, A0, B0, 2.0, p, SEED, xa_mode=mode, out=out)
        except Exception as e:  # noqa: BLE001 - a mode that cannot run here is recorded, the rest still run
            errors[mode] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        checks[mode] = rel_err(y.float(), ref)
        fn_sets[mode] = [(lambda W=W, A=A, B=B, mode=mode: kernels.lora_forward(x, W, None, A, B, 2.0, p, SEED,
                                                                               xa_mode=mode))
                         for W, A, B in sets]
    ratios = interleaved_graph_ratios(fn_sets, "base", rounds=rounds)
    rows = [dict(M=M, r=r, p=p, mode=mode, error=why, ok=True) for mode, why in errors.items()]
    for mode, res in ratios.items():
        rows.append(dict(M=M, r=r, p=p, mode=mode, base_us=ratios["base"]["us"], **res,
                         rel_err=checks.get(mode), ok=mode == "base" or checks[mode] < 1e-2))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default="96,128,256,512")
    ap.add_argument("--ranks", default="16,64")
    args = ap.parse_args(argv)
    rows = []
    for M in (int(v) for v in args.rows.split(",")):
        for r in (int(v) for v in args.ranks.split(",")):
            for p in (0.0, 0.1):
                rows += run_shape(M, r, p, args.rounds)
                write_json("exp_split_rows", rows, out_dir=args.out)
    print(format_table([row for row in rows if row["mode"] != "base"],
                       ["M", "r", "p", "mode", "base_us", "us", "ratio", "rel_err", "ok"]))
    bad = [row for row in rows if not row["ok"]]
    print(f"exp_split_rows: {len(bad)} failed checks")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
