"""Experiment: the one-row NF4 GEMV engines (`nf4_gemv(..., engine=...)`: "fma" on the FMA units, "lanes" and
"wide" on mma.sync, "padded" with rows padded to 16) against the bf16 base linear, on the GPU.

1. Checks: the one-row engines against the fp64 reference (outputs NaN-primed, so unwritten elements show) over
   shapes, dtypes, double quantization, bias, ranks 1 / 3 / 16 / 64; with dropout, y and xa against the "padded"
   engine with the same seed; "prmt" bitwise equal to "select"; 20 bitwise-equal repeats (the split sum is in a
   fixed order whoever finishes, and each call's counters, taken from the allocator, are zeroed by its shrink);
   CUDA-graph replays with new inputs; two streams at once; PDL off bitwise equal to on.
2. Decode timings under CUDA graphs over 8 rotated weight sets, ratio to the bf16 `F.linear` in the same setup:
   each engine's default, and a sweep of tiles (BLOCK_N, BLOCK_K, warps) and K splits (--configs picks them).
3. Per-kernel GPU time (torch.profiler over graph replays) and one call's kernel timeline per engine, and the
   base's.

    python bench/exp_nf4_rows.py --out /tmp/exp [--no-sweep] [--no-checks] [--rounds 3] [--configs ...]
"""
import argparse
import contextlib
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import (  # noqa: E402
    bench_graph_us, capture_graph, graph_kernel_timeline, graph_kernel_times, rel_err,
)
from bench.exp_nf4_decode import weight_sets  # noqa: E402
from lora_fast.kernels import config as kconfig  # noqa: E402
from lora_fast.kernels import helpers as khelpers  # noqa: E402
from lora_fast.kernels import nf4_gemv  # noqa: E402
from lora_fast.kernels.launch import clear_plans  # noqa: E402
from lora_fast.nf4 import quantize_nf4  # noqa: E402


def nan_primed(shape, dtype, dev):
    """Leave a NaN-filled block of this size in the caching allocator: the next allocation of it gets it."""
    t = torch.full(shape, float("nan"), device=dev, dtype=dtype)
    del t


def reference(x, q, bias, A, B, s):
    W = q.dequantize(torch.float32).double()
    ref = x.double() @ W.t() + s * (x.double() @ A.double().t()) @ B.double().t()
    return ref + bias.double() if bias is not None else ref


def checks(dev, only=""):
    """only: keep the VARIANTS whose label contains it (all by default); "auto" is always checked."""
    rows = []
    variants = [v for v in VARIANTS if only in v[0]]

    def add(name, err, passed):
        rows.append({"check": name, "rel_err": err, "passed": bool(passed)})

    torch.manual_seed(2)
    cases = [(4096, 4096, 16), (333, 640, 3), (14336, 4096, 64), (4096, 14336, 1), (100, 192, 16)]
    for (N, K, r), dq in itertools.product(cases, (False, True)):
        q = quantize_nf4(torch.randn(N, K, device=dev) / K ** 0.5, double_quant=dq, report_error=False)
        for dtype, has_bias in itertools.product((torch.bfloat16, torch.float16, torch.float32), (False, True)):
            x = torch.randn(1, K, device=dev, dtype=dtype)
            A = (torch.randn(r, K, device=dev) / K ** 0.5).to(dtype)
            B = (torch.randn(N, r, device=dev) * 0.1).to(dtype)
            bias = torch.randn(N, device=dev, dtype=dtype) if has_bias else None
            ref = reference(x, q, bias, A, B, 2.0)
            for label, engine, stages, xa_mode in variants:
                if dtype == torch.float32 and engine != "fma":
                    continue
                nan_primed((1, N), dtype, dev)
                with wide_stages(stages):
                    y, xa = nf4_gemv(x, q, bias, A, B, 2.0, store_xa=True, engine=engine, xa_mode=xa_mode)
                xa_ref = x.double() @ A.double().t()
                err, xa_err = rel_err(y, ref), rel_err(xa, xa_ref)
                tol = 5e-3 if dtype == torch.float32 else 2e-2
                ok = bool(torch.isfinite(y).all()) and err < tol and xa_err < tol
                if engine == "fma" and dtype != torch.float32:
                    y_sel, _ = nf4_gemv(x, q, bias, A, B, 2.0, engine="fma", decode="select", xa_mode=xa_mode)
                    ok = ok and torch.equal(y, y_sel)
                add(f"{label} {N}x{K} r{r} dq={dq} {str(dtype)[6:]} bias={has_bias}", err, ok)
    # dropout: the same mask as the "mma" engine (both draw it from (seed, row, column))
    N, K, r = 4096, 4096, 16
    q = quantize_nf4(torch.randn(N, K, device=dev) / K ** 0.5, report_error=False)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(1, K, device=dev, dtype=dtype)
        A = (torch.randn(r, K, device=dev) / K ** 0.5).to(dtype)
        B = (torch.randn(N, r, device=dev) * 0.1).to(dtype)
        y2, xa2 = nf4_gemv(x, q, None, A, B, 2.0, dropout_p=0.1, seed=123, store_xa=True, engine="padded")
        for engine in ("fma", "lanes", "wide") if dtype != torch.float32 else ("fma",):
            # xa_mode "auto" takes the shrink with dropout ("fused" has no mask)
            y, xa = nf4_gemv(x, q, None, A, B, 2.0, dropout_p=0.1, seed=123, store_xa=True, engine=engine)
            add(f"{engine} dropout vs padded {str(dtype)[6:]} (xa)", rel_err(xa, xa2), rel_err(xa, xa2) < 1e-2)
            add(f"{engine} dropout vs padded {str(dtype)[6:]} (y)", rel_err(y, y2), rel_err(y, y2) < 1e-2)
    # repeats, graphs, streams, PDL off: each one-row engine
    dtype = torch.bfloat16
    x = torch.randn(1, K, device=dev, dtype=dtype)
    A = (torch.randn(r, K, device=dev) / K ** 0.5).to(dtype)
    B = (torch.randn(N, r, device=dev) * 0.1).to(dtype)
    bias = torch.randn(N, device=dev, dtype=dtype)
    rows += call_checks(dev, q, x, A, B, bias, "auto", None, "auto", "auto")  # "auto" is "wide" here
    for label, engine, stages, xa_mode in variants:
        rows += call_checks(dev, q, x, A, B, bias, label, stages, engine, xa_mode)
    return rows


# The one-row variants the checks cover: (label, engine, the wide engine's stages or None, xa_mode)
VARIANTS = [(f"{e}{'' if s is None else f' s{s}'} {m}", e, s, m)
            for e, s in (("fma", None), ("lanes", None), ("wide", 1), ("wide", 2)) for m in ("shrink", "fused")]


@contextlib.contextmanager
def wide_stages(stages):
    """The wide engine's prefetch depth (its config's num_stages) inside the block; None: the default."""
    if stages is None:
        yield
        return
    kconfig.set_override("nf4_gemv_wide", "m16", kconfig.GemmConfig(1, 32, 128, num_warps=1, num_stages=stages))
    try:
        yield
    finally:
        kconfig.set_override("nf4_gemv_wide", "m16", None)


def call_checks(dev, q, x, A, B, bias, label, stages, engine, xa_mode):
    """20 bitwise-equal repeats (xa_mode "shrink": each call's counters come from the allocator, zeroed by its
    shrink; "fused": the stream's counters, reset by the kernel), CUDA-graph replays with new x equal to eager
    calls, two streams at once, PDL off bitwise equal to on."""
    with wide_stages(stages):
        return _call_checks(dev, q, x, A, B, bias, label, engine, xa_mode)


def _call_checks(dev, q, x, A, B, bias, label, engine, xa_mode):
    rows = []
    K = x.shape[1]

    def call(xi):
        return nf4_gemv(xi, q, bias, A, B, 2.0, engine=engine, xa_mode=xa_mode)[0]

    def add(name, err, passed):
        rows.append({"check": f"{label} {name}", "rel_err": err, "passed": bool(passed)})

    y0 = call(x)
    add("20 repeats bitwise equal", 0.0, all(torch.equal(call(x), y0) for _ in range(20)))
    xs = torch.randn(1, K, device=dev, dtype=x.dtype)
    capture_graph([lambda: call(xs)])  # warm-up on a side stream, as capture_graph does
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(xs)
    worst = 0.0
    for _ in range(5):
        xs.copy_(torch.randn(1, K, device=dev, dtype=x.dtype))
        graph.replay()
        worst = max(worst, (out.float() - call(xs).float()).abs().max().item())
    add("CUDA graph replays with new x equal eager", worst, worst == 0.0)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    inputs = [torch.randn(1, K, device=dev, dtype=x.dtype) for _ in streams]
    expect = [call(xi) for xi in inputs]
    torch.cuda.synchronize()
    results = [[] for _ in streams]
    for _ in range(50):
        for st, xi, res in zip(streams, inputs, results):
            with torch.cuda.stream(st):
                res.append(call(xi))
    torch.cuda.synchronize()
    add("two streams at once", 0.0, all(torch.equal(t, e) for res, e in zip(results, expect) for t in res))
    saved = khelpers.PDL_ENV
    khelpers.PDL_ENV = False
    clear_plans()
    y_nopdl = call(x)
    khelpers.PDL_ENV = saved
    clear_plans()
    add("PDL off bitwise equal", 0.0, torch.equal(y_nopdl, y0))
    return rows


def parse_configs(text):
    """--configs "fma:4,4096,4,1;wide:32,64,1,8,2,fused" -> [(engine, BLOCK_N, BLOCK_K, warps, splits, stages,
    xa_mode)]; stages (the config's num_stages: the wide engine's prefetch depth) and xa_mode are optional (1,
    "auto")."""
    out = []
    for item in filter(None, text.split(";")):
        engine, nums = item.split(":")
        fields = nums.split(",")
        bn, bk, w, sp = (int(v) for v in fields[:4])
        stages = int(fields[4]) if len(fields) > 4 else 1
        out.append((engine, bn, bk, w, sp, stages, fields[5] if len(fields) > 5 else "auto"))
    return out


# The variants of every alternated round: (label, engine, the wide engine's stages or None, xa_mode)
# (the prefetch "wide s2" and "fma fused" were measured slower: bench/NOTES.md, sixteenth session; --configs
# still times them, e.g. "wide:32,64,1,16,2,fused;fma:16,256,1,8,1,fused")
ROUND_VARIANTS = [(f"{e} default", e, None, "auto") for e in ("padded", "fma", "lanes", "wide")]
ROUND_VARIANTS += [(f"wide {m}", "wide", None, m) for m in ("shrink", "fused")]


def timings(dev, sweep, rounds=1, configs=None):
    rows = []
    torch.manual_seed(0)
    dt, r = torch.bfloat16, 16
    best = None
    configs_given = configs
    for N, K in ((4096, 4096), (14336, 4096), (4096, 14336)):
        sets = weight_sets(dev, N, K, r, dt)
        x = torch.randn(1, K, device=dev, dtype=dt)
        shape = f"1x{K}x{N}"

        def rec(variant, us, base):
            rows.append({"shape": shape, "variant": variant, "us": us, "ratio": us / base})

        for rnd in range(rounds):  # alternated rounds: the device's drift shows as the spread between them
            base = bench_graph_us([lambda W=W: F.linear(x, W) for W, _, _, _ in sets])
            rec(f"base bf16 F.linear (round {rnd})", base, base)
            for label, engine, stages, xa_mode in ROUND_VARIANTS:
                with wide_stages(stages):
                    rec(f"{label} (round {rnd})", bench_graph_us(
                        [lambda q=q, A=A, B=B: nf4_gemv(x, q, None, A, B, 2.0, engine=engine, xa_mode=xa_mode)
                         for _, q, A, B in sets]), base)
        if not sweep:
            continue
        if configs_given:
            configs = configs_given
        elif N == 4096 and K == 4096:
            configs = [("fma", bn, bk, w, sp, 1, "auto") for bn, bk, w, sp in
                       itertools.product((16, 32), (128, 256), (1, 2), (1, 2, 4, 8))]
            configs += [("fma", 16, 512, w, sp, 1, "auto") for w, sp in itertools.product((1, 2), (2, 4))]
            configs += [("lanes", 16 * w, 64, w, sp, 1, "auto") for w, sp in ((1, 8), (4, 16))]
        else:
            configs = best or []
        results = []
        for engine, bn, bk, w, splits, stages, xa_mode in configs:
            kconfig.set_override(f"nf4_gemv_{'rows' if engine == 'fma' else engine}", "m16",
                                 kconfig.GemmConfig(1, bn, bk, num_warps=w, num_stages=stages))
            name = f"{engine} BN{bn} BK{bk} w{w} splits{splits} s{stages} xa={xa_mode}"
            try:
                # each config's output against the default engine's on the first weight set (bitwise equal
                # is not expected: the block sums are added in another order)
                _, q0, A0, B0 = sets[0]
                got, _ = nf4_gemv(x, q0, None, A0, B0, 2.0, engine=engine, splits=splits, xa_mode=xa_mode)
                want, _ = nf4_gemv(x, q0, None, A0, B0, 2.0, engine="padded")
                err = rel_err(got, want)
                if not (bool(torch.isfinite(got).all()) and err < 1e-2):
                    raise RuntimeError(f"wrong output: rel_err {err:.3g} against the padded engine")
                us = bench_graph_us([lambda q=q, A=A, B=B: nf4_gemv(x, q, None, A, B, 2.0, engine=engine,
                                                                     splits=splits, xa_mode=xa_mode)
                                     for _, q, A, B in sets])
            except Exception as e:  # noqa: BLE001 - a config that does not compile is recorded, not fatal
                rows.append({"shape": shape, "variant": name, "error": str(e)[:160]})
                continue
            rec(name, us, base)
            results.append((us, (engine, bn, bk, w, splits, stages, xa_mode)))
        for kernel in ("nf4_gemv_lanes", "nf4_gemv_rows", "nf4_gemv_wide"):
            kconfig.set_override(kernel, "m16", None)
        if best is None:
            best = [c for _, c in sorted(results)[:6]]
    return rows


def kernel_profile(dev):
    """Per-kernel device time (torch.profiler over CUDA-graph replays) of each engine and the bf16 F.linear, M = 1,
    K = N = 4096."""
    rows = []
    dt, r, N, K = torch.bfloat16, 16, 4096, 4096
    sets = weight_sets(dev, N, K, r, dt)
    x = torch.randn(1, K, device=dev, dtype=dt)
    providers = [("base", [lambda W=W: F.linear(x, W) for W, _, _, _ in sets])]
    providers += [(engine, [lambda q=q, A=A, B=B, e=engine: nf4_gemv(x, q, None, A, B, 2.0, engine=e)
                            for _, q, A, B in sets]) for engine in ("fma", "wide", "lanes", "padded")]
    providers += [(f"wide s{st} {m}", [lambda q=q, A=A, B=B, m=m: nf4_gemv(x, q, None, A, B, 2.0, engine="wide",
                                                                          xa_mode=m) for _, q, A, B in sets], st)
                  for st, m in ((1, "shrink"), (1, "fused"))]
    for name, fns, *stages in providers:
        with wide_stages(stages[0] if stages else None):
            kernels = graph_kernel_times(fns)
            line = graph_kernel_timeline(fns)
        for kernel, calls, us in kernels:
            rows.append({"provider": name, "kernel": kernel[:70], "calls_per_op": calls, "us_per_call": us})
        # one call's kernels as (start, end) µs from its first kernel's start: does the GEMV wait for the shrink?
        rows.append({"provider": name, "timeline": [(k[:40], round(a, 2), round(b, 2)) for k, a, b in line]})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/exp")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-checks", action="store_true", help="timings only")
    ap.add_argument("--rounds", type=int, default=1, help="alternated rounds of the default engines")
    ap.add_argument("--configs", default="", help='tiles to sweep instead of the built-in list, e.g. '
                    '"fma:4,4096,4,1;wide:32,64,1,8,2,fused" (engine:BLOCK_N,BLOCK_K,warps,splits[,stages[,xa_mode]])')
    ap.add_argument("--variants", default="", help="check only the one-row variants whose label contains this "
                    '(e.g. "fused"), and "auto"')
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda"
    check_rows = [] if args.no_checks else checks(dev, args.variants)
    bad = [r for r in check_rows if not r["passed"]]
    print(f"checks: {len(check_rows) - len(bad)}/{len(check_rows)} passed", flush=True)
    for r in bad:
        print("FAILED", r, flush=True)
    time_rows = timings(dev, not args.no_sweep, args.rounds, parse_configs(args.configs) or None)
    prof_rows = [] if args.no_profile else kernel_profile(dev)
    with open(os.path.join(args.out, "exp_nf4_rows.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": check_rows,
                   "decode": time_rows, "profile": prof_rows}, f, indent=1)
    for r in prof_rows:
        if "timeline" in r:
            print(f"{r['provider']:<6} timeline (start, end µs): {r['timeline']}")
        else:
            print(f"{r['provider']:<6} {r['kernel']:<70} x{r['calls_per_op']:.1f} {r['us_per_call']:7.2f} us")
    for r in time_rows:
        if "error" in r:
            print(f"{r['shape']:>12} {r['variant']:<40} ERROR {r['error']}")
        else:
            print(f"{r['shape']:>12} {r['variant']:<40} {r['us']:8.2f} us {r['ratio']:6.3f}x")
    print(f"checks: {len(check_rows) - len(bad)}/{len(check_rows)} passed")


if __name__ == "__main__":
    main()
