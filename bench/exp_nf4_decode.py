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
from bench.common import bench_graph_us, bench_us, graph_kernel_times, rel_err  # noqa: E402
from lora_fast.kernels import config as kconfig  # noqa: E402
from lora_fast.kernels import nf4_dequantize, nf4_gemv  # noqa: E402
from lora_fast.kernels.nf4_gemv import nf4_gemv_splits  # noqa: E402
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


def weight_sets(dev, N, K, r, dt, count=8):
    """`count` rotated weight sets (W [N, K], its NF4 form, A [r, K], B [N, r]) for CUDA-graph timing."""
    sets = []
    for _ in range(count):
        W = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
        sets.append((W, quantize_nf4(W, report_error=False), torch.randn(r, K, device=dev, dtype=dt) / K ** 0.5,
                     torch.randn(N, r, device=dev, dtype=dt) * 0.1))
    return sets


def decode_times(dev, sweep):
    rows = []
    torch.manual_seed(0)
    dt, r = torch.bfloat16, 16
    for N, K in ((4096, 4096), (14336, 4096), (4096, 14336)):
        sets = weight_sets(dev, N, K, r, dt)
        for M in (1, 16):
            x = torch.randn(M, K, device=dev, dtype=dt)
            base = bench_graph_us([lambda W=W: F.linear(x, W) for W, _, _, _ in sets])
            rows.append({"shape": f"{M}x{K}x{N}", "variant": "base bf16 F.linear", "us": base, "ratio": 1.0})
            default = kconfig.nf4_config("gemv", M)
            # (decode, BLOCK_N, warps, stages, target programs per SM or None)
            configs = [(d, default.block_n, default.num_warps, default.num_stages, None) for d in ("select", "prmt")]
            if sweep and N == 4096 and K == 4096:
                configs += [("prmt", bn, w, s, c) for bn, w, s, c in itertools.product((64, 128), (4,), (3, 4), (4, 8))]
                configs += [("prmt", 256, 8, 3, c) for c in (2, 4)] + [("prmt", 128, 8, 4, 4)]
            elif sweep:
                configs += [("prmt", bn, 4, 3, c) for bn, c in itertools.product((64, 128), (4, 6, 8))]
            for decode, bn, warps, stages, ctas in configs:
                kconfig.set_override("nf4_gemv", "m16", kconfig.GemmConfig(16, bn, 64, num_warps=warps,
                                                                            num_stages=stages))
                splits = None
                if ctas is not None:
                    n_tiles = -(-N // bn)
                    splits = max(1, min(K // 64, -(-ctas * torch.cuda.get_device_properties(0).multi_processor_count
                                                    // n_tiles)))
                name = f"{decode} BN{bn} w{warps} s{stages}"
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
            kconfig.set_override("nf4_gemv", "m16", None)
    return rows


def kernel_profile(dev):
    """Per-kernel device time (torch.profiler over CUDA-graph replays) of the default decode GEMV and of the
    bf16 F.linear, M = 1 and 16, K = N = 4096."""
    rows = []
    dt, r, N, K = torch.bfloat16, 16, 4096, 4096
    sets = weight_sets(dev, N, K, r, dt)
    for M in (1, 16):
        x = torch.randn(M, K, device=dev, dtype=dt)
        for name, fns in (("base", [lambda W=W: F.linear(x, W) for W, _, _, _ in sets]),
                          ("prmt", [lambda q=q, A=A, B=B: nf4_gemv(x, q, None, A, B, 2.0) for _, q, A, B in sets])):
            for kernel, calls, us in graph_kernel_times(fns):
                rows.append({"M": M, "provider": name, "kernel": kernel[:80], "calls_per_op": calls,
                             "us_per_call": us})
    return rows


def train_profile(dev):
    """Per-kernel device time of one QLoRA training step (forward + backward, x, A and B needing gradients) at
    M = 8192, K = N = 4096, r = 16, bf16, against dequantize + cuBLAS under autograd, over 5 steps."""
    import lora_fast
    from torch.profiler import ProfilerActivity, profile

    M, K, N, r, dt = 8192, 4096, 4096, 16, torch.bfloat16
    q = quantize_nf4(torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5, report_error=False)
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    A = (torch.randn(r, K, device=dev, dtype=dt) / K ** 0.5).requires_grad_()
    B = (torch.randn(N, r, device=dev, dtype=dt) * 0.1).requires_grad_()
    dy = torch.randn(M, N, device=dev, dtype=dt)
    steps = {"ours": lambda: lora_fast.qlora_linear(x, q, None, A, B, 2.0),
             "deq+cublas": lambda: F.linear(x, nf4_dequantize(q, dt)) + 2.0 * (x @ A.t()) @ B.t()}
    rows = []
    for name, fwd in steps.items():
        for _ in range(3):
            fwd().backward(dy)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fwd().backward(dy)
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
            if total:
                rows.append({"provider": name, "kernel": ev.key[:70], "calls_per_step": ev.count / 5,
                             "us_per_step": total / 5})
        # host time to submit one step (no synchronisation inside), wall time per step, and any synchronising op
        import time
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fwd().backward(dy)
        host = (time.perf_counter() - t0) / 20 * 1e6
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 20 * 1e6
        torch.cuda.set_sync_debug_mode("error")
        try:
            fwd().backward(dy)
            sync = "none"
        except RuntimeError as e:
            sync = str(e)[:200]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        rows.append({"provider": name, "kernel": "HOST submit per step", "calls_per_step": 1, "us_per_step": host})
        rows.append({"provider": name, "kernel": "WALL per step", "calls_per_step": 1, "us_per_step": wall})
        rows.append({"provider": name, "kernel": f"SYNC: {sync}", "calls_per_step": 0, "us_per_step": 0.0})
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
    ap.add_argument("--train-only", action="store_true", help="only the training-step profile")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda"
    if args.train_only:
        for r in train_profile(dev):
            print(f"train {r['provider']:<10} {r['kernel']:<70} x{r['calls_per_step']:.1f} {r['us_per_step']:8.1f} us")
        return
    check_rows = checks(dev)
    bad = [r for r in check_rows if not r["passed"]]
    dq_rows = dequant_times(dev)
    prof_rows = kernel_profile(dev)
    train_rows = train_profile(dev)
    dec_rows = decode_times(dev, not args.no_sweep)
    with open(os.path.join(args.out, "exp_nf4_decode.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "checks": check_rows, "dequant": dq_rows,
                   "decode": dec_rows, "profile": prof_rows, "train_profile": train_rows}, f, indent=1)
    print(f"checks: {len(check_rows) - len(bad)}/{len(check_rows)} passed")
    for r in bad:
        print("FAILED", r)
    for r in prof_rows:
        print(f"M={r['M']:>2} {r['provider']:<5} {r['kernel']:<60} x{r['calls_per_op']:.1f} {r['us_per_call']:7.2f} us")
    for r in sorted(train_rows, key=lambda r: (r["provider"], -r["us_per_step"])):
        print(f"train {r['provider']:<10} {r['kernel']:<70} x{r['calls_per_step']:.1f} {r['us_per_step']:8.1f} us")
    for r in dq_rows:
        print(f"{r['shape']:>12} {r['variant']:<18} {r['us']:8.2f} us (bytes floor {r['bytes_floor_us_at_3TBps']:.1f})")
    for r in dec_rows:
        if "error" in r:
            print(f"{r['shape']:>12} {r['variant']:<36} ERROR {r['error']}")
        else:
            print(f"{r['shape']:>12} {r['variant']:<36} {r['us']:8.2f} us {r['ratio']:6.3f}x")


if __name__ == "__main__":
    main()
