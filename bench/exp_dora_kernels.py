"""DoRA's helper kernels at 8192 x 4096 x 4096 (bf16, r = 16) by tile: `dora_norm` (one pass over W) and
`scale_columns` with dm's column sums (one pass over dY and y, writing g * dY), each checked against the default
config's output and timed by do_bench (median µs, GB/s over the bytes each must move).

`profile_variants.py` put them at 19 µs (norm: 32 MiB, ~1.7 TB/s) and 62 µs (192 MiB, ~3.1 TB/s) on the H200,
whose copy runs at ~4.2 TB/s. Writes OUT/exp_dora_kernels.json; prints a table per kernel.

    PYTHONPATH=$PWD python3 bench/exp_dora_kernels.py [--out DIR]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import bench_us  # noqa: E402

from lora_fast.kernels import dora as D  # noqa: E402
from lora_fast.kernels.config import GemmConfig  # noqa: E402
from lora_fast.kernels.launch import clear_plans  # noqa: E402

NORM_TILES = [(16, 256, 4, 3), (16, 512, 4, 3), (16, 512, 8, 3), (16, 1024, 8, 2), (32, 256, 4, 3),
              (32, 512, 8, 3), (16, 128, 4, 4), (16, 256, 8, 4)]
DOT_TILES = [(64, 128, 4, 2), (32, 128, 4, 4), (32, 256, 4, 4), (64, 256, 8, 4), (128, 128, 8, 8),
             (16, 256, 4, 8), (32, 64, 4, 8), (128, 64, 4, 4)]
WAVES = (2, 4, 8)


def with_config(kernel, cfg):
    orig = D.dora_config

    def patched(k, dtype):
        return cfg if k == kernel else orig(k, dtype)
    return orig, patched


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    M, K, N, r = 8192, 4096, 4096, 16
    g0 = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(N, K, device="cuda", generator=g0).div_(K**0.5).bfloat16()
    A = torch.randn(r, K, device="cuda", generator=g0).div_(K**0.5).bfloat16()
    B = torch.randn(N, r, device="cuda", generator=g0).mul_(0.02).bfloat16()
    mag = torch.rand(N, device="cuda", generator=g0) + 0.5
    dy = torch.randn(M, N, device="cuda", generator=g0).bfloat16()
    y = torch.randn(M, N, device="cuda", generator=g0).bfloat16()
    gvec = torch.rand(N, device="cuda", generator=g0) + 0.5
    rows = []
    ref_norm = D.dora_norm(W, A, B, 2.0, mag)[0].clone()
    ref_scaled, ref_parts = D.scale_columns(dy, gvec, y, None, partials=True)
    ref_scaled, ref_dot = ref_scaled.clone(), ref_parts.sum(0)
    for bm, bk, w, st in NORM_TILES:
        orig, patched = with_config("norm", GemmConfig(bm, 0, bk, num_warps=w, num_stages=st))
        D.dora_config = patched
        clear_plans()
        try:
            norm = D.dora_norm(W, A, B, 2.0, mag)[0]
            err = float(((norm - ref_norm).abs() / ref_norm.abs()).max())
            us = bench_us(lambda: D.dora_norm(W, A, B, 2.0, mag))[0]
            rows.append(dict(kernel="norm", tile=[bm, bk, w, st], us=us, gbps=W.numel() * 2 / us / 1e3,
                             max_rel_diff=err, ok=err < 1e-5))
        except Exception as e:  # a tile that does not compile or fit is a row, not the end of the sweep
            rows.append(dict(kernel="norm", tile=[bm, bk, w, st], error=repr(e)[:200], ok=False))
        finally:
            D.dora_config = orig
        print(rows[-1], flush=True)
    for bm, bn, w, st in DOT_TILES:
        for waves in WAVES:
            orig, patched = with_config("column_dot", GemmConfig(bm, bn, 0, num_warps=w, num_stages=st))
            D.dora_config, D.SPLIT_WAVES = patched, waves
            clear_plans()
            try:
                scaled, parts = D.scale_columns(dy, gvec, y, None, partials=True)
                same = bool(torch.equal(scaled, ref_scaled))
                err = float((parts.sum(0) - ref_dot).norm() / ref_dot.norm())
                us = bench_us(lambda: D.scale_columns(dy, gvec, y, None, partials=True))[0]
                rows.append(dict(kernel="scale_dot", tile=[bm, bn, w, st], waves=waves, splits=parts.shape[0],
                                 us=us, gbps=3 * dy.numel() * 2 / us / 1e3, scaled_equal=same, dot_rel_err=err,
                                 ok=same and err < 1e-5))
            except Exception as e:
                rows.append(dict(kernel="scale_dot", tile=[bm, bn, w, st], waves=waves, error=repr(e)[:200],
                                 ok=False))
            finally:
                D.dora_config, D.SPLIT_WAVES = orig, 2
            print(rows[-1], flush=True)
    clear_plans()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "exp_dora_kernels.json"), "w") as f:
            json.dump(rows, f, indent=1)
    for kernel in ("norm", "scale_dot"):
        good = sorted((r for r in rows if r["kernel"] == kernel and r.get("ok")), key=lambda r: r["us"])
        print(f"== {kernel}: best of {len(good)} correct tiles")
        for r in good[:5]:
            print(f"  {r['tile']} waves={r.get('waves', '-')}: {r['us']:.1f} us, {r['gbps']:.0f} GB/s")
    bad = [r for r in rows if not r.get("ok")]
    print(f"summary: {len(rows) - len(bad)}/{len(rows)} tiles correct")


if __name__ == "__main__":
    main()
