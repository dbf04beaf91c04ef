"""Multi-LoRA experiment: each memory-bound LoRA kernel alone (shrink, segment expand into y, the fused kernel's
read-modify-write epilogue after cuBLAS), per tile config, under CUDA graphs over 8 weight sets, with the bytes it
must move and the bandwidth that makes.

    python bench/exp_multi_kernels.py --out OUT_DIR [--shapes 64x64,256x32,1024x32,4096x32]

Writes OUT_DIR/exp_multi_kernels.json; prints the best config per kernel and shape last.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import bench_multi_lora as bml  # noqa: E402
from bench.common import bench_graph_us, environment, format_table, write_json  # noqa: E402
from lora_fast.kernels import multi_lora as kml  # noqa: E402

DEV = os.environ.get("EXP_DEV", "cuda")


def variants(kind, T):
    decode = T <= 256
    if kind == "shrink":
        ms = (16,) if decode else (32, 64)
        for m, sk, bk, st in itertools.product(ms, (1, 2, 4, 8, 16), (128, 256), (3, 4)):
            if (decode and sk == 1) or (not decode and (sk == 16 or st == 4)):
                continue
            yield dict(S_BLOCK_M=m, SPLIT_K=sk, S_BLOCK_K=bk, s_num_stages=st, s_num_warps=4)
    elif kind == "expand":
        ms, cs = ((16,), (2, 4, 8, 16, 32)) if decode else ((32, 64), (2, 4, 8, 16))
        for m, n, c, st in itertools.product(ms, (64, 128), cs, (2, 3)):
            yield dict(E_BLOCK_M=m, E_BLOCK_N=n, E_CHUNKS=c, e_num_stages=st, e_num_warps=4)
        if not decode:
            for c in (4, 8, 16):
                yield dict(E_BLOCK_M=64, E_BLOCK_N=128, E_CHUNKS=c, e_num_stages=2, e_num_warps=8)
    elif kind == "delta":
        if decode and os.environ.get("EXP_DELTA"):
            for n, c, bk in itertools.product((64, 128), (4, 8, 16), (128, 256)):
                yield dict(D_BLOCK_M=16, D_BLOCK_N=n, D_CHUNKS=c, D_BLOCK_K=bk, d_num_stages=3, d_num_warps=4)
    elif kind == "rmw":
        yield dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, GATHER=False, GROUP_M=1)
        if decode:
            yield dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, GATHER=True, GROUP_M=1)


def run_shape(T, n_ad, r=16, K=4096, N=4096):
    prob = bml.Problem(T, n_ad, r, K, N, torch.bfloat16, DEV, sets=bml.WEIGHT_SETS)
    m = prob.meta
    sets = prob.sets
    sc, ranks = prob.scalings, prob.ranks
    x = prob.x
    R_PAD = kml.rank_pad(r)
    base_cfg = kml.get_config(T, K, N, R_PAD, x.dtype, x.device)
    ys = [torch.randn(T, N, device=DEV, dtype=x.dtype) for _ in sets]
    rows = []
    itemsize = x.element_size()
    a_bytes = n_ad * r * K * itemsize
    bytes_of = {"shrink": T * K * itemsize + a_bytes, "expand": T * N * itemsize + a_bytes,
                "rmw": 2 * T * N * itemsize + a_bytes, "delta": T * (K + N) * itemsize + 2 * a_bytes}
    for kind in ("shrink", "expand", "delta", "rmw"):
        for v in variants(kind, T):
            cfg = dict(base_cfg, **v)
            try:
                wss = [torch.zeros((cfg["SPLIT_K"], 1, T, R_PAD), device=DEV, dtype=torch.float32) for _ in sets]
                shrink = [lambda ws=ws, A=st[2]: kml._launch_shrink(x, A[:, None], ws, m.perm, m.seg_start,
                                                                   m.seg_adapter, ranks, cfg, "ieee")
                          for ws, st in zip(wss, sets)]
                for f in shrink:
                    f()
                if kind == "shrink":
                    fns = shrink
                elif kind in ("expand", "delta"):
                    fns = [lambda ws=ws, y=y, st=st: kml._launch_expand(
                        x, st[2][:, None], st[3], st[1], None if kind == "delta" else ws, y, m.perm, m.seg_start,
                        m.seg_adapter, ranks, sc, (N,), cfg, "ieee", accumulate=False)
                           for ws, y, st in zip(wss, ys, sets)]
                else:
                    fns = [lambda ws=ws, y=y, st=st: kml._launch_fused(x, st[0], st[1], st[3], ws, y, m.perm,
                                                                      m.seg_of, m.seg_start, m.seg_adapter, ranks,
                                                                      sc, (N,), cfg, "ieee", 1)
                           for ws, y, st in zip(wss, ys, sets)]
                us = bench_graph_us(fns)
                row = dict(T=T, adapters=n_ad, kernel=kind, cfg=v, us=us, GBps=bytes_of[kind] / us / 1e3)
            except Exception:  # noqa: BLE001 - a config that does not compile is skipped
                row = dict(T=T, adapters=n_ad, kernel=kind, cfg=v, error=traceback.format_exc()[-200:])
            rows.append(row)
            print(row, flush=True)
    base = bench_graph_us([prob.provider("base", s) for s in range(len(sets))])
    rows.append(dict(T=T, adapters=n_ad, kernel="base F.linear", us=base))

    def best(kind):
        ok = sorted((r for r in rows if r["kernel"] == kind and "us" in r), key=lambda r: r["us"])
        return dict(ok[0]["cfg"]) if ok else {}

    sh, ex, de = best("shrink"), best("expand"), best("delta")
    cands = {"default": {}, "cublas+seg": dict(sh, **ex, BASE="cublas", EXPAND="segment"),
             "addmm+seg": dict(sh, **ex, BASE="addmm", EXPAND="segment"),
             "cublas+fused_rmw": dict(sh, BASE="cublas", EXPAND="fused")}
    if T <= 256:
        cands["addmm+delta"] = dict(de, BASE="addmm", EXPAND="delta")
    fns = [prob.provider("ours", s) for s in range(len(sets))]
    W, b, A, B = sets[0]
    from lora_fast.multi_lora import _multi_lora_torch
    ref = _multi_lora_torch(x.double(), W.double(), b.double(), A[:, None].double(), B.double(), sc.double(),
                            ranks, prob.ids, (N,))
    for name, cfg in cands.items():
        kml.set_config_override(cfg)
        try:
            us = bench_graph_us(fns)
            err = float((fns[0]().double() - ref).norm() / ref.norm())
            rows.append(dict(T=T, adapters=n_ad, kernel="e2e " + name, cfg=cfg, us=us, ratio=us / base, err=err))
        except Exception:  # noqa: BLE001
            rows.append(dict(T=T, adapters=n_ad, kernel="e2e " + name, cfg=cfg,
                             error=traceback.format_exc()[-300:]))
        finally:
            kml.set_config_override(None)
        print(rows[-1], flush=True)
    return rows, base_cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--shapes", default="64x64,256x32,1024x32,4096x32")
    args = ap.parse_args()
    rows, defaults = [], {}
    for shape in args.shapes.split(","):
        T, n_ad = (int(v) for v in shape.split("x"))
        r, cfg = run_shape(T, n_ad)
        rows += r
        defaults[shape] = {k: v for k, v in cfg.items()}
        write_json("exp_multi_kernels", rows, {"env": environment(), "defaults": defaults}, out_dir=args.out)
    best = []
    for (T, kind), group in itertools.groupby(rows, key=lambda r: (r["T"], r["kernel"])):
        group = sorted((g for g in group if "us" in g), key=lambda g: g["us"])
        best += group[:1 if kind.startswith("e2e") else 2]
    print(format_table(best, ["T", "adapters", "kernel", "cfg", "us", "GBps", "ratio", "err"]))


if __name__ == "__main__":
    main()
