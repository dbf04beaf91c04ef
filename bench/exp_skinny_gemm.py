"""Can a Triton GEMM stream W as fast as cuBLAS at 16-256 rows? (the multi-LoRA decode question, issue 3)

Issue 3's 64-token / 64-adapter target (1.15x the base) leaves ~2 µs for 16 MiB of adapters beside W's 32 MiB, so
only one kernel that streams W and the adapters together could meet it; our W-stream GEMM (`_fused_kernel`, pointer
loads, X as the MMA's A operand) ran 1.23-1.8x cuBLAS alone at 32-128 rows (bench/NOTES.md). This script times the
plain GEMM y [T, N] = x [T, K] · W [N, K]ᵀ (bf16, fp32 accumulate, no LoRA) in variants that cuBLAS's own choice
suggests (nvjet 64x32 tiles, K step 64, 16 stages): tensor descriptors (TMA) for both operands, deep pipelines,
small N tiles, W as the MMA's A operand ("swap": acc [BLOCK_N, BLOCK_T] = W · xᵀ), and split K with fp32 atomics.

    PYTHONPATH=$PWD python3 bench/exp_skinny_gemm.py [--out DIR] [--tokens 16,32,64,128,256] [--rounds 3]

CUDA graphs over 8 weight sets, each variant's time as a ratio to F.linear in the same round (interleaved rounds,
the median ratio). Every variant is checked against torch (fp32 reference, relative error) on fresh inputs.
Writes DIR/exp_skinny_gemm.json and prints a table last.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.common import format_table, interleaved_graph_ratios, rel_err, write_json  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton < 3.3
    TensorDescriptor = None

SETS = 8
K = N = 4096


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, y_ptr, x_desc, w_desc, T, N, K, stride_xt, stride_wn, stride_yt,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                 SWAP: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr):
    """y[T, N] (+)= x[T, K] · w[N, K]ᵀ over one (N tile, K split) per program; all T rows in one tile (T <= BLOCK_T).
    SWAP: acc [BLOCK_N, BLOCK_T] = w_tile · x_tileᵀ (W as the MMA's A operand). TMA: operands through the host
    descriptors (x_desc block [BLOCK_T, BLOCK_K], w_desc [BLOCK_N, BLOCK_K]). SPLIT > 1: fp32 atomics into y."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    k_per = tl.cdiv(K, SPLIT * BLOCK_K) * BLOCK_K
    k_lo = pid_s * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        if TMA:
            xt = x_desc.load([0, k])
            wt = w_desc.load([n0, k])
        else:
            xt = tl.load(x_ptr + offs_t[:, None].to(tl.int64) * stride_xt + (k + offs_k)[None, :],
                         mask=(offs_t[:, None] < T) & ((k + offs_k)[None, :] < K), other=0.0)
            wt = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k + offs_k)[None, :],
                         mask=(offs_n[:, None] < N) & ((k + offs_k)[None, :] < K), other=0.0)
        if SWAP:
            acc = tl.dot(wt, tl.trans(xt), acc)
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
    if SWAP:
        acc = tl.trans(acc)
    y = y_ptr + offs_t[:, None].to(tl.int64) * stride_yt + offs_n[None, :]
    mask = (offs_t[:, None] < T) & (offs_n[None, :] < N)
    if SPLIT == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y, acc, mask=mask, sem="relaxed")


def variants(T: int) -> dict:
    bt = max(16, triton.next_power_of_2(T))
    out = {}
    for tma in (False, True):
        for bn, bk, stages, split in ((32, 64, 8, 1), (32, 64, 12, 1), (32, 128, 6, 1), (64, 64, 8, 2),
                                      (64, 128, 4, 2), (32, 128, 4, 2)):
            out[f"{'tma' if tma else 'ptr'}_n{bn}k{bk}s{stages}x{split}"] = dict(
                BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, SPLIT=split, SWAP=False, TMA=tma)
        for bn, bk, stages, split in ((64, 64, 8, 2), (64, 128, 4, 2), (128, 64, 6, 4), (64, 64, 12, 2),
                                      (128, 128, 3, 4), (64, 64, 8, 1)):
            out[f"{'tma' if tma else 'ptr'}_swap_n{bn}k{bk}s{stages}x{split}"] = dict(
                BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, SPLIT=split, SWAP=True, TMA=tma)
    return {k: v for k, v in out.items() if v["BLOCK_T"] <= 128 or not v["SWAP"] or v["BLOCK_N"] <= 64}


def smem_bytes(cfg: dict) -> int:
    return (cfg["BLOCK_T"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * 2 * cfg["STAGES"]


def make_call(cfg: dict, x, w, T: int):
    split = cfg["SPLIT"]
    y = torch.empty((T, N), device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
    if cfg["TMA"]:
        x_desc = TensorDescriptor.from_tensor(x, [cfg["BLOCK_T"], cfg["BLOCK_K"]])
        w_desc = TensorDescriptor.from_tensor(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    else:
        x_desc = w_desc = x
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split)
    meta = {k: cfg[k] for k in ("BLOCK_T", "BLOCK_N", "BLOCK_K", "SPLIT", "SWAP", "TMA")}

    def call():
        if split > 1:
            y.zero_()
        _gemm_kernel[grid](x, w, y, x_desc, w_desc, T, N, K, x.stride(0), w.stride(0), y.stride(0), **meta,
                           STAGES=cfg["STAGES"], num_warps=4, num_stages=1)
        return y
    return call


def run_tokens(T: int, rounds: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, generator=g)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / 64 for _ in range(SETS)]
    ref = x.float() @ ws[0].float().t()
    fn_sets = {"base": [(lambda w=w: torch.nn.functional.linear(x, w)) for w in ws]}
    info = {}
    for name, cfg in variants(T).items():
        if smem_bytes(cfg) > 200 * 1024 or (cfg["TMA"] and TensorDescriptor is None):
            continue
        try:
            calls = [make_call(cfg, x, w, T) for w in ws]
            err = rel_err(calls[0]().float(), ref)
            info[name] = dict(rel_err=err, ok=err < 1e-2)
            fn_sets[name] = calls
        except Exception:  # noqa: BLE001 - a variant that fails to compile is reported, the rest still run
            info[name] = dict(error=traceback.format_exc()[-300:], ok=False)
    ratios = interleaved_graph_ratios(fn_sets, "base", rounds=rounds)
    rows = []
    for name, r in ratios.items():
        rows.append(dict(T=T, variant=name, base_us=ratios["base"]["us"], **r, **info.get(name, {})))
    for name, i in info.items():
        if name not in ratios:
            rows.append(dict(T=T, variant=name, **i))
    rows.sort(key=lambda row: row.get("ratio", 99.0))
    for row in rows[:6]:
        print(row, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--tokens", default="64,16,32,128,256")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        rows += run_tokens(T, args.rounds)
        write_json("exp_skinny_gemm", rows, out_dir=args.out)
    best = {}
    for row in rows:
        if "ratio" in row and row["variant"] != "base" and row.get("ok"):
            if row["T"] not in best or row["ratio"] < best[row["T"]]["ratio"]:
                best[row["T"]] = row
    bad = [r for r in rows if not r.get("ok", True) and r["variant"] != "base"]
    print(format_table(sorted(best.values(), key=lambda r: r["T"]),
                       ["T", "variant", "ratio", "rel_err", "base_us", "us"]))
    print(f"exp_skinny_gemm: {len(bad)} variants failed or wrong" + (f": {[r['variant'] for r in bad]}" if bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
