"""Experiment: the NF4 decodes ("prmt" byte permutes, "select" tree, "table" lookup) on the GPU.

1. Checks: `nf4_dequantize` gives exactly `NF4Tensor.dequantize` for every decode, dtype and double
   quantization; the GEMV and the fused GEMM give the same bits with "prmt" as with "select" (both round the
   same code values), and both match the fp64 reference.
2. Decode GEMV (M = 1 and 16) under a CUDA graph over 8 rotated weight sets, against the bf16 F.linear in the same
   setup: "select" vs "prmt", and a sweep of GEMV tiles and K splits for "prmt".
3. `nf4_dequantize` alone (do_bench): each decode, 4096 x 4096 and 14336 x 4096.

    python bench/exp_nf4_decode.py --out /tmp/exp
"""
import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import bench_graph_us, bench_us, rel_err  # noqa: E402
from lora_fast.kernels import config as kconfig  # noqa: E402
from lora_fast.kernels import nf4_dequantize, nf4_gemv  # noqa: E402
from lora_fast.kernels.nf4_gemv import nf4_gemv_splits  # noqa: E402

gemv_mod = sys.modules["lora_fast.kernels.nf4_gemv"]
from lora_fast.nf4 import quantize_nf4  # noqa: E402

DECODES = ("prmt", "select", "table")


def checks(dev):
    rows = []
    torch.manual_seed(1)
    for (N, K), dq in itertools.product(((4096, 4096), (333, 640)), (False, True)):
        q = quantize_nf4(torch.randn(N, K, device=dev) / K ** 0.5, double_quant=dq, report_error=False)
        ref32 = q.dequantize(torch.float32)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            outs = {}
            for decode in DECODES:
                outs[decode] = torch.full((N, K), float("nan"), device=dev, dtype=dtype)
                nf4_dequantize(q, dtype, out=outs[decode], decode=decode)
            # Every decode gives the same bits. Against PyTorch's dequantize: exact without double quantization;
            # with it, the kernel's absmax (code * scale + offset) may be one fused multiply-add where PyTorch
            # rounds twice, so only closeness is asked there.
            same = all(torch.equal(outs[d], outs["select"]) for d in DECODES)
            err = rel_err(outs["prmt"], ref32)
            exact = bool(torch.equal(outs["prmt"], ref32.to(dtype)))
            rows.append({"check": f"dequant {N}x{K} dq={dq} {str(dtype)[6:]}", "rel_err": err, "exact": exact,
                         "passed": bool(same and (exact if not dq else err < 1e-2))})
        for M, dtype in itertools.product((1, 7, 16), (torch.bfloat16, torch.float16, torch.float32)):
            r = 16
            x = torch.randn(M, K, device=dev, dtype=dtype)
            A = (torch.randn(r, K, device=dev) / K ** 0.5).to(dtype)
            B = (torch.randn(N, r, device=dev) * 0.1).to(dtype)
            bias = torch.randn(N, device=dev, dtype=dtype)
            W = ref32.double()
            ref = x.double() @ W.t() + bias.double() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
            outs = {}
            for decode in ("prmt", "select"):
                y, xa = nf4_gemv(x, q, bias, A, B, 2.0, store_xa=True, decode=decode)
                outs[decode] = y
            err = rel_err(outs["prmt"], ref)
            tol = 2e-2 if dtype != torch.float32 else 5e-3
            rows.append({"check": f"gemv M={M} {N}x{K} dq={dq} {str(dtype)[6:]}", "rel_err": err,
                         "passed": bool(err < tol and torch.equal(outs["prmt"], outs["select"]))})
    return rows


def decode_times(dev, sweep):
    rows = []
    torch.manual_seed(0)
    dt, r = torch.bfloat16, 16
    for N, K in ((4096, 4096), (14336, 4096), (4096, 14336)):
        sets = []
        for _ in range(8):
            W = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
            sets.append((W, quantize_nf4(W, report_error=False), torch.randn(r, K, device=dev, dtype=dt) / K ** 0.5,
                         torch.randn(N, r, device=dev, dtype=dt) * 0.1))
        for M in (1, 16):
            x = torch.randn(M, K, device=dev, dtype=dt)
            base = bench_graph_us([lambda W=W: F.linear(x, W) for W, _, _, _ in sets])
            rows.append({"shape": f"{M}x{K}x{N}", "variant": "base bf16 F.linear", "us": base, "ratio": 1.0})
            default = kconfig.nf4_config("gemv", M)
            # (decode, BLOCK_N, warps, stages, target programs per SM or None, rows that take the FMA path)
            configs = [(d, default.block_n, default.num_warps, default.num_stages, None, gemv_mod.FMA_ROWS)
                       for d in ("select", "prmt")]
            if sweep and N == 4096 and K == 4096 and M == 1:
                configs += [("prmt", bn, w, 1, c, 1) for bn, w, c in itertools.product((64, 128, 256), (4, 8), (4, 8))]
                configs += [("prmt", bn, 4, 4, c, 0) for bn, c in itertools.product((64, 128), (4, 8))]
            if sweep and N == 4096 and K == 4096 and M == 16:
                configs += [("prmt", bn, 4, s, c, 1) for bn, s, c in itertools.product((64, 128), (3, 4), (2, 4))]
            for decode, bn, warps, stages, ctas, fma_rows in configs:
                kconfig.set_override("nf4_gemv", "m16", kconfig.GemmConfig(16, bn, 64, num_warps=warps,
                                                                            num_stages=stages))
                gemv_mod.FMA_ROWS = fma_rows
                splits = None
                if ctas is not None:
                    n_tiles = -(-N // bn)
                    splits = max(1, min(K // 64, -(-ctas * torch.cuda.get_device_properties(0).multi_processor_count
                                                    // n_tiles)))
                name = f"{decode} {'fma' if M <= fma_rows else 'mma'} BN{bn} w{warps} s{stages}"
                try:
                    us = bench_graph_us([lambda q=q, A=A, B=B: nf4_gemv(x, q, None, A, B, 2.0, decode=decode,
                                                                         splits=splits)
                                         for _, q, A, B in sets])
                except Exception as e:  # a tile that does not fit shared memory
                    rows.append({"shape": f"{M}x{K}x{N}", "variant": name, "error": str(e)[:120]})
                    continue
                used = splits or nf4_gemv_splits(-(-N // bn), K // 64, x.device)
                rows.append({"shape": f"{M}x{K}x{N}", "variant": f"{name} splits{used}", "us": us,
                             "ratio": us / base})
            gemv_mod.FMA_ROWS = 1
            kconfig.set_override("nf4_gemv", "m16", None)
    return rows


def kernel_profile(dev):
    """Per-kernel device time (torch.profiler over CUDA-graph replays) of the default decode GEMV and of the
    bf16 F.linear, M = 1 and 16, K = N = 4096."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    dt, r, N, K = torch.bfloat16, 16, 4096, 4096
    sets = []
    for _ in range(8):
        W = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
        sets.append((W, quantize_nf4(W, report_error=False), torch.randn(r, K, device=dev, dtype=dt) / K ** 0.5,
                     torch.randn(N, r, device=dev, dtype=dt) * 0.1))
    for M in (1, 16):
        x = torch.randn(M, K, device=dev, dtype=dt)
        for name, fns in (("base", [lambda W=W: F.linear(x, W) for W, _, _, _ in sets]),
                          ("prmt", [lambda q=q, A=A, B=B: nf4_gemv(x, q, None, A, B, 2.0) for _, q, A, B in sets])):
            for fn in fns:
                fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for fn in fns:
                    fn()
            graph.replay()
            torch.cuda.synchronize()
            replays = 20
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(replays):
                    graph.replay()
                torch.cuda.synchronize()
            for ev in prof.key_averages():
                total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
                if total and ev.count:
                    rows.append({"M": M, "provider": name, "kernel": ev.key[:80], "calls_per_op": ev.count /
                                 (replays * len(fns)), "us_per_call": total / ev.count})
    return rows


def dequant_times(dev):
    rows = []
    for N, K in ((4096, 4096), (14336, 4096)):
        q = quantize_nf4(torch.randn(N, K, device=dev) / K ** 0.5, report_error=False)
        out = torch.empty(N, K, device=dev, dtype=torch.bfloat16)
        floor_us = (N * K * 2 + N * K // 2 + N * K // 64 * 4) / 3.0e12 * 1e6
        for decode in DECODES:
            us = bench_us(lambda: nf4_dequantize(q, torch.bfloat16, out=out, decode=decode))[0]
            rows.append({"shape": f"{N}x{K}", "variant": f"dequant {decode}", "us": us,
                         "bytes_floor_us_at_3TBps": floor_us})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/exp")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda"
    check_rows = checks(dev)
    bad = [r for r in check_rows if not r["passed"]]
    dq_rows = dequant_times(dev)
    prof_rows = kernel_profile(dev)
    dec_rows = decode_times(dev, not args.no_sweep)
    with open(os.path.join(args.out, "exp_nf4_decode.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "checks": check_rows, "dequant": dq_rows,
                   "decode": dec_rows, "profile": prof_rows}, f, indent=1)
    print(f"checks: {len(check_rows) - len(bad)}/{len(check_rows)} passed")
    for r in bad:
        print("FAILED", r)
    for r in prof_rows:
        print(f"M={r['M']:>2} {r['provider']:<5} {r['kernel']:<60} x{r['calls_per_op']:.1f} {r['us_per_call']:7.2f} us")
    for r in dq_rows:
        print(f"{r['shape']:>12} {r['variant']:<18} {r['us']:8.2f} us (bytes floor {r['bytes_floor_us_at_3TBps']:.1f})")
    for r in dec_rows:
        if "error" in r:
            print(f"{r['shape']:>12} {r['variant']:<36} ERROR {r['error']}")
        else:
            print(f"{r['shape']:>12} {r['variant']:<36} {r['us']:8.2f} us {r['ratio']:6.3f}x")


if __name__ == "__main__":
    main()
