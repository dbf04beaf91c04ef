"""GPU check of the fused LoRA linear: correctness at real sizes, one > 2**31-element case, and a config sweep.

    python bench/gpu_check.py --out $OUT            # correctness grid + big case
    python bench/gpu_check.py --out $OUT --tune     # + config sweep of the GEMM-shaped kernels
    python bench/gpu_check.py --out $OUT --only big # the > 2**31-element case alone (y, dx tails; dA, dB whole)

Every check compares against the textbook reference in fp32 on the same inputs and the kernels' own dropout
mask, by relative error ||out - ref|| / ||ref||, for y, dx, dA and dB. Outputs are preallocated NaN-filled
where the launcher allows it, and the caching allocator is poisoned with NaN first everywhere else, so an
unwritten element fails the check. Writes gpu_check.json (and tune.json) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import kernels  # noqa: E402
from lora_fast.kernels import config as kconfig  # noqa: E402
from lora_fast.reference import lora_linear_reference  # noqa: E402

TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4, torch.float64: 1e-10}


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def cancellation(u, v) -> float:
    """|| sqrt((u*u)^T (v*v)) || / || u^T v || (at least 1): the rounding error of a sum over rows grows like the
    root of its squared terms; near 1 for random-sign terms, large only where the sum cancels atypically."""
    ref = (u.t() @ v).norm()
    spread = ((u * u).t() @ (v * v)).sqrt().norm()
    return max(1.0, (spread / ref.clamp_min(1e-30)).item())


def poison(nbytes: int) -> None:
    """Fill `nbytes` of the caching allocator's free memory with NaN, so torch.empty hands back NaNs."""
    t = torch.empty(nbytes // 2 + 1024, dtype=torch.float16, device="cuda").fill_(float("nan"))
    del t


def check_case(M, K, N, r, dtype, p, bias=True, xa_mode="auto", scaling=1.7):
    """One shape through the launchers, checked against the fp32 reference. The launchers run twice, on fresh
    inputs each time: the first call builds their plans and compiles, the second (the one checked) takes the
    cached launch (kernels/launch.py), as every call of a training loop after its first does."""
    dev = "cuda"

    def draw():
        x = torch.randn(M, K, device=dev, dtype=dtype)
        W = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
        b = torch.randn(N, device=dev, dtype=dtype) if bias else None
        A = torch.randn(r, K, device=dev, dtype=dtype) / K**0.5
        B = torch.randn(N, r, device=dev, dtype=dtype) / r**0.5
        dy = torch.randn(M, N, device=dev, dtype=dtype)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return x, W, b, A, B, dy, seed

    def run(x, W, b, A, B, dy, seed):
        y = torch.full((M, N), float("nan"), device=dev, dtype=dtype)
        dx = torch.full((M, K), float("nan"), device=dev, dtype=dtype)
        poison(4 * M * max(K, N) * x.element_size())
        kernels.lora_forward(x, W, b, A, B, scaling, p, seed, store_xa=True, xa_mode=xa_mode, out=y)
        _, xa = kernels.lora_forward(x, W, b, A, B, scaling, p, seed, store_xa=True, xa_mode=xa_mode)
        _, dyb = kernels.lora_backward_dx(dy, W, A, B, scaling, p, seed, out=dx,
                                          dyb_mode="inline" if xa_mode == "producer" else xa_mode)
        dA, dB = kernels.lora_grad_ab(x, dy, xa, dyb, scaling, dtype, dtype, p, seed)
        return y, dx, dA, dB

    run(*draw())
    x, W, b, A, B, dy, seed = inputs = draw()
    y, dx, dA, dB = run(*inputs)
    mask = kernels.dropout_mask(seed, M, K, p, dev) if p > 0 else None
    f32 = torch.float64 if dtype == torch.float64 else torch.float32
    xr = x.to(f32).requires_grad_()
    Ar = A.to(f32).requires_grad_()
    Br = B.to(f32).requires_grad_()
    yr = lora_linear_reference(xr, W.to(f32), b.to(f32) if bias else None, Ar, Br, scaling, p, p > 0, mask)
    yr.backward(dy.to(f32))
    errs = {"y": rel_err(y, yr), "dx": rel_err(dx, xr.grad), "dA": rel_err(dA, Ar.grad), "dB": rel_err(dB, Br.grad)}
    # dA and dB are sums over M: where the terms cancel (tiny outputs such as r = K = 1), ||ref|| is small against
    # the terms' own size and bf16 rounding alone exceeds the bound (6.7 % of random draws at M=77, K=r=1, in a
    # numpy model of the kernel's roundings). Scale their bound by `cancellation`, ~1 for well-conditioned sums.
    xd = xr.detach() * (mask / (1 - p) if mask is not None else 1.0)
    dyb_ref = dy.to(f32) @ Br.detach()
    xa_ref = xd @ Ar.detach().t()
    cond = {"dA": cancellation(dyb_ref, xd), "dB": cancellation(dy.to(f32), xa_ref)}
    if p > 0:
        errs["keep_rate"] = mask.float().mean().item() if mask.numel() else 1 - p
    ok = all(v == v and v < TOL[dtype] * cond.get(k, 1.0) for k, v in errs.items() if k != "keep_rate")
    if p > 0 and M * K >= 100_000:
        ok = ok and abs(errs["keep_rate"] - (1 - p)) < 0.01
    return {"M": M, "K": K, "N": N, "r": r, "dtype": str(dtype).split(".")[-1], "p": p, "bias": bias,
            "xa_mode": xa_mode, **errs, "ok": bool(ok)}


def check_fp64():
    """fp64 CUDA tensors take the PyTorch path (lora_fast.functional._ops): gradcheck the public function."""
    x = torch.randn(6, 9, device="cuda", dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 9, device="cuda", dtype=torch.float64)
    A = torch.randn(3, 9, device="cuda", dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    ok = torch.autograd.gradcheck(lambda x, A, B: lora_fast.lora_linear(x, W, None, A, B, 1.5), (x, A, B))
    return {"case": "fp64 gradcheck (CUDA -> torch path)", "ok": bool(ok)}


def check_autograd(dtype=torch.bfloat16):
    """The module path end to end: LoRALinear on a 3-D input, grads of x, A, B vs the reference module."""
    layer = lora_fast.LoRALinear(1000, 777, rank=12, alpha=24, dropout=0.0, device="cuda", dtype=dtype)
    torch.nn.init.normal_(layer.lora_B, std=0.02)
    for _ in range(2):  # the second step, on fresh inputs, takes the cached launches
        layer.lora_A.grad = layer.lora_B.grad = None
        x = torch.randn(3, 129, 1000, device="cuda", dtype=dtype, requires_grad=True)
        y = layer(x)
        dy = torch.randn_like(y)
        y.backward(dy)
    xr = x.detach().float().requires_grad_()
    Ar = layer.lora_A.detach().float().requires_grad_()
    Br = layer.lora_B.detach().float().requires_grad_()
    yr = lora_linear_reference(xr, layer.weight.float(), layer.bias.float(), Ar, Br, layer.scaling)
    yr.backward(dy.float())
    errs = {"y": rel_err(y, yr), "dx": rel_err(x.grad, xr.grad), "dA": rel_err(layer.lora_A.grad, Ar.grad),
            "dB": rel_err(layer.lora_B.grad, Br.grad)}
    return {"case": "LoRALinear 3-D bf16", **errs, "ok": all(v < 2e-2 for v in errs.values())}


def check_big():
    """M*K and M*N above 2**31 elements: the last rows must still be right (int64 addressing)."""
    K = N = 4096
    M = 2**31 // K + 1000
    r, dtype, s = 16, torch.bfloat16, 2.0
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    W = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
    A = torch.randn(r, K, device="cuda", dtype=dtype) / K**0.5
    B = torch.randn(N, r, device="cuda", dtype=dtype) / r**0.5
    y, xa = kernels.lora_forward(x, W, None, A, B, s, 0.1, 99, store_xa=True)
    tail = slice(M - 300, M)
    mask = kernels.dropout_mask(99, M, K, 0.1, "cuda")[tail]
    ref = lora_linear_reference(x[tail].float(), W.float(), None, A.float(), B.float(), s, 0.1, True, mask)
    err_y = rel_err(y[tail], ref)
    del y
    dy = torch.randn(M, N, device="cuda", dtype=dtype)
    dx, dyb = kernels.lora_backward_dx(dy, W, A, B, s, 0.1, 99)
    dyb_ref = dy[tail].float() @ B.float()
    dx_ref = dy[tail].float() @ W.float() + ((dyb_ref * s) @ A.float()) * mask / 0.9
    err_dx = rel_err(dx[tail], dx_ref)
    del dx
    dA, dB = kernels.lora_grad_ab(x, dy, xa, dyb, s, dtype, dtype, 0.1, 99)
    # dB over the tail rows alone differs from the full sum: compare the full dB with a chunked fp32 reference.
    dB_ref = torch.zeros(N, r, device="cuda")
    for i in range(0, M, 65536):
        dB_ref += dy[i:i + 65536].float().t() @ xa[i:i + 65536].float()
    err_db = rel_err(dB, dB_ref * s)
    # dA = s * (dy · B)ᵀ · drop(x) over every row, chunked the same way
    keep = kernels.dropout_mask(99, M, K, 0.1, "cuda")
    dA_ref = torch.zeros(r, K, device="cuda")
    for i in range(0, M, 65536):
        dA_ref += (dy[i:i + 65536].float() @ B.float()).t() @ (x[i:i + 65536].float() * keep[i:i + 65536] / 0.9)
    err_da = rel_err(dA, dA_ref * s)
    return {"case": f"big M={M} K={K} N={N} ({M * K / 2**31:.2f} x 2^31 elements)", "y_tail": err_y,
            "dx_tail": err_dx, "dA": err_da, "dB": err_db,
            "ok": all(v < 2e-2 for v in (err_y, err_dx, err_da, err_db))}


def persistent_cases() -> list[dict]:
    """The large-M shapes, where auto computes the rank-r product inside the persistent GEMMs (the forward's
    producer tiles, dX's inline shrink), and both modes forced at odd shapes: a quick check of those paths alone
    (`--only persistent`)."""
    rows = [check_case(M, K, N, r, torch.bfloat16, p)
            for (M, K, N, r) in [(8192, 4096, 4096, 16), (16384, 4096, 4096, 16), (8192, 4096, 14336, 64)]
            for p in (0.0, 0.1)]
    for (M, K, N, r) in [(5, 1000, 777, 3), (200, 1000, 777, 3), (1000, 4095, 4097, 12), (4097, 4096, 4096, 64)]:
        for mode in ("inline", "producer"):
            rows.append(check_case(M, K, N, r, torch.bfloat16, 0.0, xa_mode=mode))
    return rows


def correctness() -> list[dict]:
    rows = []
    grid = [
        (16384, 4096, 4096, 16), (8192, 4096, 14336, 64), (4096, 14336, 4096, 128), (8192, 4096, 4096, 256),
        (1, 4096, 4096, 16), (16, 4096, 4096, 16), (128, 4096, 4096, 64), (1000, 4095, 4097, 3),
        (77, 1, 33, 1), (0, 64, 64, 8), (300, 17, 33, 200),
        # 65-1024 rows: config.mid_tile's TMA tiles (64 x 64, 64 x 128, 128 x 128) and modes, odd K / N / ranks
        (96, 4096, 4096, 256), (256, 4096, 14336, 16), (384, 1000, 777, 3), (512, 4095, 4097, 12),
        (256, 4096, 4096, 32), (512, 4096, 4096, 64),
        # "split" with the large tile up to 4096 rows (rank block 16), the producer tiles above it or at r = 32
        (1024, 4096, 4096, 16), (2048, 4096, 4096, 32),
    ]
    for (M, K, N, r) in grid:
        for p in (0.0, 0.1):
            rows.append(check_case(M, K, N, r, torch.bfloat16, p))
    for mode in ("fused", "shrink"):
        rows.append(check_case(4096, 4096, 4096, 16, torch.bfloat16, 0.0, xa_mode=mode))
        for M in (5, 60, 200, 1000):  # every shape class with odd ranks and odd K, N
            rows.append(check_case(M, 1000, 777, 3, torch.bfloat16, 0.0, xa_mode=mode))
            rows.append(check_case(M, 4095, 4097, 12, torch.bfloat16, 0.1, xa_mode=mode, bias=False))
    # the shrink inside the persistent GEMM, forced at every shape class (auto picks it above 256 rows only), with
    # odd K, N and ranks: 5 rows is one row block and two programs, 4097 rows a ragged last block
    # (and the forward's producer tiles, what auto picks above 256 rows: xa inside the first N tile of each row block)
    for (M, K, N, r) in [(5, 1000, 777, 3), (200, 1000, 777, 3), (1000, 4095, 4097, 12), (4097, 4096, 4096, 64)]:
        rows.append(check_case(M, K, N, r, torch.bfloat16, 0.0, xa_mode="inline"))
        rows.append(check_case(M, K, N, r, torch.bfloat16, 0.0, xa_mode="producer"))
    for dtype in (torch.float16, torch.float32):
        for (M, K, N, r) in [(2048, 4096, 4096, 16), (33, 1000, 517, 64)]:
            rows.append(check_case(M, K, N, r, dtype, 0.1, bias=False))
    rows.append(check_fp64())
    rows.append(check_autograd())
    rows.append(check_launch_cache())
    return rows


def check_launch_cache():
    """Every cached plan that launches a kernel has taken the direct launch of the compiled kernel (its first
    call compiled it), so the checks above ran the fast path of kernels/launch.py."""
    import importlib

    mods = {m: importlib.import_module(f"lora_fast.kernels.{m}") for m in ("lora_bwd", "lora_fwd", "lora_shrink")}
    launches = []
    for plans in (mods["lora_fwd"]._PLANS, mods["lora_bwd"]._DX_PLANS, mods["lora_bwd"]._AB_PLANS,
                  mods["lora_shrink"]._PLANS):
        for plan in plans.values():
            launches += [x for x in (plan.launch, getattr(plan, "term", None)) if x is not None]
    direct = sum(launch.compiled is not None for launch in launches)
    return {"case": "launch cache", "plans": len(launches), "direct": direct,
            "ok": bool(launches) and direct == len(launches)}


# ---------------------------------------------------------------------------------------------- tuning
CANDIDATES = {
    "m16": [(16, 32, 128, 1, 4, 4), (16, 32, 256, 1, 4, 4), (16, 64, 128, 1, 4, 4), (16, 16, 256, 1, 4, 6),
            (16, 32, 128, 1, 4, 6), (16, 64, 256, 1, 4, 3)],
    "m64": [(32, 64, 128, 1, 4, 4), (64, 64, 128, 1, 4, 4), (64, 32, 128, 1, 4, 4), (32, 32, 256, 1, 4, 4),
            (64, 64, 64, 1, 4, 5), (16, 64, 256, 1, 4, 4)],
    "m256": [(64, 64, 128, 8, 4, 4), (32, 64, 128, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4),
             (64, 32, 128, 8, 4, 4), (128, 128, 64, 8, 8, 3)],
    "large": [(128, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 64, 8, 8, 4), (256, 128, 64, 8, 8, 3),
              (128, 256, 32, 8, 8, 4), (128, 128, 64, 8, 4, 4)],
}
TUNE_SHAPES = {"m16": [(1, 4096, 4096), (16, 4096, 4096)], "m64": [(64, 4096, 4096)], "m256": [(128, 4096, 4096)],
               "large": [(8192, 4096, 4096), (8192, 4096, 14336)]}


def tune(out_rows: list[dict]):
    """Time every candidate config of the fwd and dx kernels, in the xa mode `auto` picks for the class,
    with and without tensor descriptors (TMA) at large M; r = 16."""
    dtype, r = torch.bfloat16, 16
    for cls, cands in CANDIDATES.items():
        for (M, K, N) in TUNE_SHAPES[cls]:
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            W = torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5
            dy = torch.randn(M, N, device="cuda", dtype=dtype)
            A = torch.randn(r, K, device="cuda", dtype=dtype) / K**0.5
            B = torch.randn(N, r, device="cuda", dtype=dtype)
            base = {"fwd": common.bench_us(lambda: torch.nn.functional.linear(x, W))[0],
                    "dx": common.bench_us(lambda: dy @ W)[0]}
            mode = kernels.choose_xa_mode(M, r, False)
            for c in cands:
                cfg = kconfig.GemmConfig(*c)
                for kernel in ("fwd", "dx"):
                    if kernel == "dx" and cls == "m16":
                        continue
                    kconfig.set_override(kernel, cls, cfg)
                    for tma in ((True, False) if cls == "large" else ("auto",)):
                        if kernel == "fwd":
                            fn = lambda: kernels.lora_forward(x, W, None, A, B, 2.0, xa_mode=mode, tma=tma)  # noqa: E731
                        else:
                            fn = lambda: kernels.lora_backward_dx(dy, W, A, B, 2.0, dyb_mode=mode, tma=tma)  # noqa: E731
                        row = {"kernel": kernel, "class": cls, "M": M, "K": K, "N": N, "r": r, "mode": mode,
                               "tma": tma, "config": list(c)}
                        try:
                            t = common.bench_us(fn)[0]
                            row.update(us=t, base_us=base[kernel], ratio=t / base[kernel])
                        except Exception as e:  # noqa: BLE001
                            row["error"] = repr(e)[-300:]
                        out_rows.append(row)
                    kconfig.set_override(kernel, cls, None)
    best = {}
    for row in out_rows:
        if "ratio" not in row:
            continue
        key = (row["kernel"], row["class"], row["M"], row["N"], row["tma"])
        if key not in best or row["ratio"] < best[key]["ratio"]:
            best[key] = row
    return sorted(best.values(), key=lambda r: (r["kernel"], r["class"], r["M"], r["N"], str(r["tma"])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=common.RESULTS_DIR)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--only", choices=["persistent", "big"],
                    help="run only these cases (persistent_cases, or the > 2**31-element case)")
    args = ap.parse_args()
    if not common.have_gpu():
        print("gpu_check needs a CUDA GPU; the CPU tests cover the interpreter path.")
        return 0
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    result = {"env": common.environment(), "peaks": common.measure_peaks() if hasattr(common, "measure_peaks") else None}
    rows = persistent_cases() if args.only == "persistent" else [] if args.only == "big" else correctness()
    if not args.skip_big and args.only in (None, "big"):
        try:
            rows.append(check_big())
        except Exception as e:  # noqa: BLE001
            rows.append({"case": "big", "error": repr(e)[:300], "ok": False})
        torch.cuda.empty_cache()
    result["correctness"] = rows
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    tuned = []
    if args.tune:
        tune_rows: list[dict] = []
        tuned = tune(tune_rows)
        with open(os.path.join(args.out, "tune.json"), "w") as f:
            json.dump({"env": result["env"], "rows": tune_rows, "best": tuned}, f, indent=1)
    print(f"\n== gpu_check ({time.time() - t0:.0f} s) on {result['env']['device']}")
    bad = [r for r in rows if not r.get("ok")]
    for r in rows:
        if "M" in r:
            print(f"{'ok ' if r['ok'] else 'BAD'} {r['dtype']:8s} M={r['M']:5d} K={r['K']:5d} N={r['N']:5d} r={r['r']:3d} "
                  f"p={r['p']} {r['xa_mode']:6s} y={r['y']:.1e} dx={r['dx']:.1e} dA={r['dA']:.1e} dB={r['dB']:.1e}")
        else:
            print(("ok  " if r.get("ok") else "BAD ") + json.dumps(r)[:300])
    if tuned:
        print("\n== best configs (kernel class M N r mode: config ratio-to-base)")
        for r in tuned:
            print(f"{r['kernel']:3s} {r['class']:5s} M={r['M']:5d} N={r['N']:5d} {r['mode']:6s} "
                  f"tma={r['tma']} {r['config']} {r['ratio']:.3f} ({r['us']:.1f} us vs {r['base_us']:.1f})")
    print(f"\ngpu_check: {len(rows) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
