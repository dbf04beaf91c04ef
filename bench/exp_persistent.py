"""Experiment: how close can a persistent TMA GEMM get to cuBLAS on this GPU, and what does the LoRA epilogue and
an in-loop rank product cost on top? Prints one table; writes JSON to --out.

    python bench/exp_persistent.py --out /tmp/exp
"""
import argparse
import json
import os
import sys
from dataclasses import replace

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lora_fast.kernels.helpers import grouped_tile, tensor_descriptor  # noqa: E402
from lora_fast.kernels.lora_fwd import lora_forward  # noqa: E402
from lora_fast.kernels.lora_shrink import lora_shrink  # noqa: E402


@triton.jit
def _pgemm(X, W, A, B, XA, Y, M, N, K, RANK, scaling,
           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
           NUM_PROGS: tl.constexpr, FLATTEN: tl.constexpr, SUBTILE: tl.constexpr, LORA: tl.constexpr,
           INLOOP: tl.constexpr, TRANS_W: tl.constexpr):
    """Persistent Y[M, N] = X[M, K] @ W^T (+ s * xa @ B^T). X, W, Y (and A when INLOOP) are descriptors.
    TRANS_W: W is [N, K] (forward); else W is [K, N] (dX's layout)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BK)
    offs_r = tl.arange(0, BR)
    for tile in tl.range(pid, num_tiles, NUM_PROGS, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BM, BN), tl.float32)
        xa = tl.zeros((BM, BR), tl.float32)
        for ki in range(k_tiles):
            x = X.load([pid_m * BM, ki * BK])
            if TRANS_W:
                w = W.load([pid_n * BN, ki * BK]).T
            else:
                w = W.load([ki * BK, pid_n * BN])
            acc = tl.dot(x, w, acc)
            if INLOOP:
                a = A.load([0, ki * BK])
                xa = tl.dot(x, a.T, xa)
        if LORA:
            offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
            offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
            if not INLOOP:
                xa = tl.load(XA + offs_m[:, None] * RANK + offs_r[None, :],
                             mask=(offs_m[:, None] < M) & (offs_r[None, :] < RANK), other=0.0).to(tl.float32)
            b = tl.load(B + offs_n[None, :] * RANK + offs_r[:, None],
                        mask=(offs_r[:, None] < RANK) & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot((xa * scaling).to(b.dtype), b, acc)
        if SUBTILE:
            acc3 = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1))
            c0, c1 = tl.split(acc3)
            Y.store([pid_m * BM, pid_n * BN], c0.to(Y.dtype))
            Y.store([pid_m * BM, pid_n * BN + BN // 2], c1.to(Y.dtype))
        else:
            Y.store([pid_m * BM, pid_n * BN], acc.to(Y.dtype))


def run_pgemm(x, w, y, cfg, lora=None, trans_w=True, nprogs=None):
    BM, BN, BK, stages, warps, group_m, flatten, subtile, inloop = cfg
    M, K = x.shape
    N = w.shape[0] if trans_w else w.shape[1]
    nprogs = nprogs or torch.cuda.get_device_properties(x.device).multi_processor_count
    xd = tensor_descriptor(x, [BM, BK])
    wd = tensor_descriptor(w, [BN, BK] if trans_w else [BK, BN])
    yd = tensor_descriptor(y, [BM, BN // 2 if subtile else BN])
    if lora is None:
        A = B = XA = y
        rank, s, br = 16, 1.0, 16
    else:
        A, B, XA, s = lora
        rank = A.shape[0]
        br = max(16, triton.next_power_of_2(rank))
    ad = tensor_descriptor(A, [br, BK]) if inloop else A
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    grid = (min(nprogs, tiles),)
    _pgemm[grid](xd, wd, ad, B, XA, yd, M, N, K, rank, s, BM=BM, BN=BN, BK=BK, BR=br, GROUP_M=group_m,
                 NUM_PROGS=grid[0], FLATTEN=flatten, SUBTILE=subtile, LORA=lora is not None, INLOOP=inloop,
                 TRANS_W=trans_w, num_warps=warps, num_stages=stages)
    return y


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed(cands, rounds):
    """Median of `rounds` do_bench medians per candidate, candidates interleaved (clock drift hits all alike)."""
    times = {n: [] for n in cands}
    for _ in range(rounds):
        for name, fn in cands.items():
            times[name].append(do_bench(fn, warmup=25, rep=150, return_mode="median") * 1e3)
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/exp")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", type=int, default=3, help="how many of the three shapes to time")
    p.add_argument("--no-shrink-sweep", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from lora_fast.kernels import config as kconfig
    from lora_fast.kernels.lora_bwd import lora_backward_dx
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    results = []
    big = kconfig.gemm_config("fwd", 8192, dt, 0)
    shrink_cfgs = [kconfig.GemmConfig(bm, 0, bk, num_warps=w, num_stages=st)
                   for bm, bk, w, st in [(32, 128, 4, 5), (32, 128, 8, 5), (32, 256, 4, 4), (16, 128, 4, 6)]]
    for (M, K, N) in [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096)][:args.shapes]:
        x = torch.randn(M, K, device=dev, dtype=dt)
        w = torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5
        A = torch.randn(16, K, device=dev, dtype=dt) / K ** 0.5
        B = torch.randn(N, 16, device=dev, dtype=dt)
        dy = torch.randn(M, N, device=dev, dtype=dt)
        ref = torch.nn.functional.linear(x, w)
        ref_lora = (ref.float() + 2.0 * ((x @ A.t()).float() @ B.float().t())).to(dt)
        ref_dx = ((dy.float() @ w.float()) + 2.0 * ((dy @ B).float() @ A.float())).to(dt)
        ystore = torch.empty(M, N, device=dev, dtype=dt)
        cands = {
            "base": (lambda: torch.nn.functional.linear(x, w), ref),
            "ours_fwd": (lambda: lora_forward(x, w, None, A, B, 2.0)[0], ref_lora),
            "ours_fwd_p0.1": (lambda: lora_forward(x, w, None, A, B, 2.0, dropout_p=0.1, seed=3)[0], None),
            "triton_best_plain": (lambda: run_pgemm(x, w, ystore, (128, 256, 64, 3, 8, 8, False, False, False)), ref),
            "base_dx": (lambda: torch.mm(dy, w), None),
            "ours_dx": (lambda: lora_backward_dx(dy, w, A, B, 2.0)[0], ref_dx),
            "ours_dx_p0.1": (lambda: lora_backward_dx(dy, w, A, B, 2.0, dropout_p=0.1, seed=3)[0], None),
        }
        # the forward with pointer stores, and the one-tile-per-program kernel, through config overrides
        variants = {"ours_fwd_ptrstore": ("fwd", replace(big, tma_store=False)),
                    "ours_fwd_nonpersistent": ("fwd", replace(big, persistent=False, tma_store=False)),
                    "ours_dx_s3": ("dx", replace(kconfig.gemm_config("dx", 8192, dt, 0), num_stages=3)),
                    "ours_dx_nonpersistent": ("dx", replace(kconfig.gemm_config("dx", 8192, dt, 0),
                                                            persistent=False, num_stages=3))}
        errs = {}
        for name, (fn, r) in cands.items():
            out = fn()
            torch.cuda.synchronize()
            errs[name] = rel(out, r) if r is not None else float("nan")
        times = timed({n: f for n, (f, _) in cands.items()}, args.rounds)
        for name, (kernel, cfg) in variants.items():
            kconfig.set_override(kernel, "large", cfg)
            fn = (lambda: lora_forward(x, w, None, A, B, 2.0)[0]) if kernel == "fwd" else \
                (lambda: lora_backward_dx(dy, w, A, B, 2.0)[0])
            out = fn()
            errs[name] = rel(out, ref_lora if kernel == "fwd" else ref_dx)
            times.update(timed({name: fn}, args.rounds))
            kconfig.set_override(kernel, "large", None)
        if (M, K, N) == (8192, 4096, 4096) and not args.no_shrink_sweep:
            for cfg in shrink_cfgs[:4]:
                kconfig.set_override("shrink", "large", cfg)
                tag = f"shrink_{cfg.block_m}x{cfg.block_k}_w{cfg.num_warps}_s{cfg.num_stages}"
                errs[tag] = rel(lora_shrink(x, A), x @ A.t())
                errs[tag + "_p0.1"] = float("nan")
                times.update(timed({tag: lambda: lora_shrink(x, A),
                                    tag + "_p0.1": lambda: lora_shrink(x, A, 0.1, 5)}, args.rounds))
            kconfig.set_override("shrink", "large", None)
        if (M, K, N) == (8192, 4096, 4096) and not args.no_shrink_sweep:
            from lora_fast.kernels.lora_bwd import lora_grad_ab
            xa, dyb = x @ A.t(), dy @ B
            for pp in (0.0, 0.1):
                tag = f"grad_ab_p{pp}"
                errs[tag] = float("nan")
                times.update(timed({tag: lambda pp=pp: lora_grad_ab(x, dy, xa, dyb, 2.0, dt, dt, pp, 5)},
                                   args.rounds))
            for bm, bn, wp in [(64, 128, 4), (32, 128, 4), (64, 128, 8), (128, 128, 8), (32, 256, 4), (64, 64, 4)]:
                kconfig.set_override("dx_term", "large", kconfig.GemmConfig(bm, bn, 0, group_m=1, num_warps=wp,
                                                                             num_stages=1))
                tag = f"dx_p0.1_term{bm}x{bn}_w{wp}"
                errs[tag] = float("nan")
                times.update(timed({tag: lambda: lora_backward_dx(dy, w, A, B, 2.0, dropout_p=0.1, seed=3)[0]},
                                   args.rounds))
            kconfig.set_override("dx_term", "large", None)
        med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
        for name, t in med.items():
            basis = med["base_dx"] if "dx" in name else med["base"]
            results.append({"shape": [M, K, N], "name": name, "us": t, "ratio": t / basis,
                            "tflops": 2 * M * N * K / (t * 1e-6) / 1e12, "rel_err": errs.get(name, float("nan")),
                            "all_us": times[name]})
    with open(os.path.join(args.out, "exp_persistent.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
                   "results": results}, f, indent=1)
    print(f"{'shape':>18} {'name':<34} {'us':>8} {'ratio':>6} {'TF/s':>6} {'err':>8}  spread")
    for r in results:
        sp = max(r["all_us"]) - min(r["all_us"])
        print(f"{'x'.join(map(str, r['shape'])):>18} {r['name']:<34} {r['us']:8.1f} {r['ratio']:6.3f} "
              f"{r['tflops']:6.0f} {r['rel_err']:8.1e}  {sp:.1f}")


if __name__ == "__main__":
    main()
