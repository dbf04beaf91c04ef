"""Multi-LoRA experiment: where the time goes per shape (kernel profile of the default path), cuBLAS with and
without beta = 1 (the "addmm" path's GEMM), and end-to-end configs against the default: our gathered-row GEMM
with the LoRA epilogue (BASE="triton": prefill tiles, and 64-row decode tiles with the gather epilogue), the
one-launch expand ("delta"), the shrink + segment expand, and the default with the expand's PDL off ("nopdl").

    python bench/exp_multi_prefill.py --out OUT_DIR [--shapes 4096x32,1024x32] [--configs nopdl,...]

For each shape: base F.linear, the default path, then each override in CONFIGS that suits the shape (graph time
over 8 weight sets, ratio to base, relative error against the fp64 reference), and for our own GEMM the same
override with every id -1 (the GEMM alone). Writes OUT_DIR/exp_multi_prefill.json and prints a table last.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import bench_multi_lora as bml  # noqa: E402
from bench.common import bench_graph_us, environment, format_table, kernel_times_us, write_json  # noqa: E402
from lora_fast.kernels import multi_lora as kml  # noqa: E402
from lora_fast.multi_lora import _multi_lora_torch, make_batch_metadata  # noqa: E402

DEV = "cuda"
TRITON = dict(BASE="triton", GATHER=False, EXPAND="fused")
DELTA = dict(BASE="addmm", EXPAND="delta")
SEG = dict(BASE="addmm", EXPAND="segment")
CONFIGS = {
    "t128x128x64w8s4": dict(TRITON, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    "delta_m16c4n128": dict(DELTA, D_BLOCK_M=16, D_CHUNKS=4, D_BLOCK_N=128),
    "delta_m16c8n128": dict(DELTA, D_BLOCK_M=16, D_CHUNKS=8, D_BLOCK_N=128),
    "delta_m16c2n256": dict(DELTA, D_BLOCK_M=16, D_CHUNKS=2, D_BLOCK_N=256),
    "delta_m16c16n64": dict(DELTA, D_BLOCK_M=16, D_CHUNKS=16, D_BLOCK_N=64),
    "delta_m32c4n128": dict(DELTA, D_BLOCK_M=32, D_CHUNKS=4, D_BLOCK_N=128),
    "delta_m64c1n128": dict(DELTA, D_BLOCK_M=64, D_CHUNKS=1, D_BLOCK_N=128),
    "delta_m64c4n128": dict(DELTA, D_BLOCK_M=64, D_CHUNKS=4, D_BLOCK_N=128),
    "delta_m128c2n128w8": dict(DELTA, D_BLOCK_M=128, D_CHUNKS=2, D_BLOCK_N=128, d_num_warps=8),
    "seg_s64k2_e64x128": dict(SEG, S_BLOCK_M=64, SPLIT_K=2, E_BLOCK_M=64, E_BLOCK_N=128),
    "seg_s32k4_e64x128": dict(SEG, S_BLOCK_M=32, SPLIT_K=4, E_BLOCK_M=64, E_BLOCK_N=128),
    "seg_s64k8_e128x128w8": dict(SEG, S_BLOCK_M=64, SPLIT_K=8, E_BLOCK_M=128, E_BLOCK_N=128, e_num_warps=8),
    "seg_s16k8_e16x256": dict(SEG, S_BLOCK_M=16, SPLIT_K=8, E_BLOCK_M=16, E_BLOCK_N=256),
}
GATHER = dict(BASE="triton", GATHER=True, EXPAND="fused", GROUP_M=1)
CONFIGS.update({
    "g64x32x128s4": dict(GATHER, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
    "g64x32x128s5": dict(GATHER, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=5),
    "g64x64x128s4": dict(GATHER, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
    "g32x32x256s4": dict(GATHER, BLOCK_M=32, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4),
    "g32x32x128s6": dict(GATHER, BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=6),
    "g64x32x64s8": dict(GATHER, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=8),
})
CONFIGS["nopdl"] = dict(E_PDL=False)  # the default path with the expand launched in stream order
# the default path with more shrink programs (ncu at 64/64: its 136 programs ran one per SM, 6.5 % occupancy)
for k, bk, st in ((4, 256, 3), (4, 128, 4), (8, 256, 2), (8, 128, 3), (16, 128, 2)):
    CONFIGS[f"shrink_k{k}b{bk}s{st}"] = dict(SPLIT_K=k, S_BLOCK_K=bk, s_num_stages=st)
SHRINK = [c for c in CONFIGS if c.startswith("shrink_")]
DECODE_GEMM = ["g64x32x128s4", "g64x32x128s5", "g64x64x128s4", "g32x32x256s4", "g32x32x128s6", "g64x32x64s8"]
DECODE = ["delta_m16c4n128", "delta_m16c8n128", "delta_m16c2n256", "delta_m16c16n64", "delta_m32c4n128",
          "seg_s16k8_e16x256"]
PREFILL = ["delta_m64c1n128", "delta_m64c4n128", "delta_m32c4n128", "delta_m128c2n128w8", "seg_s64k2_e64x128",
           "seg_s32k4_e64x128", "seg_s64k8_e128x128w8"]


def rel(y, ref) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def error_of(prob) -> float:
    W, b, A, B = prob.sets[0]
    y = prob.provider("ours", 0)()
    ref = _multi_lora_torch(prob.x.double(), W.double(), b.double(), A[:, None].double(), B.double(),
                            prob.scalings.double(), prob.ranks, prob.ids, (prob.N,))
    return rel(y, ref)


def kernel_profile(prob, label) -> list[dict]:
    fns = [prob.provider("ours", s) for s in range(bml.WEIGHT_SETS)]
    return [dict(T=prob.T, adapters=prob.S, config=label, kernel=name[:50], us_per_call=us)
            for name, us in kernel_times_us(fns)]


def run_shape(T, n_ad, names, r=16, K=4096, N=4096):
    prob = bml.Problem(T, n_ad, r, K, N, torch.bfloat16, DEV, sets=bml.WEIGHT_SETS)
    base = bench_graph_us([prob.provider("base", s) for s in range(bml.WEIGHT_SETS)])
    base_only = bml.Problem(T, n_ad, r, K, N, torch.bfloat16, DEV, sets=bml.WEIGHT_SETS)
    base_only.meta = make_batch_metadata(torch.full((T,), -1, device=DEV, dtype=torch.int32), n_ad)
    rows, prof = [], []
    outs = [torch.empty(T, N, device=DEV, dtype=torch.bfloat16) for _ in range(bml.WEIGHT_SETS)]
    for label, fn in (("cublas mm", lambda o, W: torch.mm(prob.x, W.t(), out=o)),
                      ("cublas addmm_ (beta 1)", lambda o, W: o.addmm_(prob.x, W.t()))):
        us = bench_graph_us([(lambda o=o, W=st[0]: fn(o, W)) for o, st in zip(outs, prob.sets)])
        rows.append(dict(T=T, adapters=n_ad, config=label, base_us=base, graph_us=us, ratio=us / base))
    for name in ["default"] + names:
        kml.set_config_override(None if name == "default" else CONFIGS[name])
        row = dict(T=T, adapters=n_ad, config=name, base_us=base)
        try:
            us = bench_graph_us([prob.provider("ours", s) for s in range(bml.WEIGHT_SETS)])
            row.update(graph_us=us, ratio=us / base, rel_err=error_of(prob))
            if CONFIGS.get(name, {}).get("BASE") == "triton" and T <= 1024:
                g = bench_graph_us([base_only.provider("ours", s) for s in range(bml.WEIGHT_SETS)])
                row.update(gemm_alone_us=g, gemm_alone_ratio=g / base)
            if name == "default" or name == names[0] or name == "delta_m16c4n128" or name == "delta_m64c1n128":
                prof += kernel_profile(prob, name)
        except Exception:  # noqa: BLE001 - a config that fails is reported, the others still run
            row["error"] = traceback.format_exc()[-300:]
        kml.set_config_override(None)
        rows.append(row)
        print(row, flush=True)
    return rows, prof


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--shapes", default="16x16,64x64,256x32,1024x32,4096x32")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    names = [c for c in args.configs.split(",") if c]
    rows, prof = [], []
    for shape in args.shapes.split(","):
        T, n_ad = (int(v) for v in shape.split("x"))
        pool = (PREFILL if T >= 512 else DECODE + PREFILL[:2] if T >= 256 else DECODE + DECODE_GEMM) + ["nopdl"]
        pool += SHRINK
        cfgs = [c for c in names if c in pool]
        r, p = run_shape(T, n_ad, cfgs)
        rows += r
        prof += p
        write_json("exp_multi_prefill", rows, {"env": environment(), "profile": prof}, out_dir=args.out)
    print("== kernels per call (default and first config)")
    print(format_table(prof, ["T", "adapters", "config", "kernel", "us_per_call"]))
    print("== graph ratios to F.linear")
    print(format_table(rows, ["T", "adapters", "config", "base_us", "graph_us", "ratio", "gemm_alone_ratio",
                              "rel_err", "error"]))


if __name__ == "__main__":
    main()
