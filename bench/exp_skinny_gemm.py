"""Can a Triton GEMM stream W as fast as cuBLAS at 16-256 rows? (the multi-LoRA decode question, issue 3)

Issue 3's 64-token / 64-adapter target (1.15x the base) leaves ~2 µs for 16 MiB of adapters beside W's 32 MiB, so
only one kernel that streams W and the adapters together could meet it; our W-stream GEMM (`_fused_kernel`, pointer
loads, X as the MMA's A operand) ran 1.23-1.8x cuBLAS alone at 32-128 rows (bench/NOTES.md). This script times the
plain GEMM y [T, N] = x [T, K] · W [N, K]ᵀ (bf16, fp32 accumulate, no LoRA) in variants that cuBLAS's own choice
suggests (nvjet 64x32 tiles, K step 64, 16 stages): tensor descriptors (TMA) for both operands, deep pipelines,
small N tiles, W as the MMA's A operand ("swap": acc [BLOCK_N, BLOCK_T] = W · xᵀ), and split K with fp32 atomics.

    PYTHONPATH=$PWD python3 bench/exp_skinny_gemm.py [--out DIR] [--tokens 16,32,64,128,256] [--rounds 3]

From 256 rows the variants tile the rows too (`tiled_variants`: 64-128-row tiles, 4-8 warps, pointer / TMA /
gathered-row loads), the multi-LoRA prefill question: can one Triton GEMM match cuBLAS at 256-4096 rows, so that
its epilogue could add the LoRA term?

CUDA graphs over 8 weight sets, each variant's time as a ratio to F.linear in the same round (interleaved rounds,
the median ratio). Every variant is checked against torch (fp32 reference, relative error) on fresh inputs.
Writes DIR/exp_skinny_gemm.json and prints a table last.
"""
from __future__ import annotations

import argparse
import os
import re
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
def _gemm_kernel(x_ptr, w_ptr, y_ptr, x_desc, w_desc, perm_ptr, T, N, K, stride_xt, stride_wn, stride_yt,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                 SWAP: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr, GATHER: tl.constexpr):
    """y[T, N] (+)= x[T, K] · w[N, K]ᵀ over one (T tile, N tile, K split) per program (T tiles vary fastest, so
    the programs that share an N tile of W run together and read it from L2).
    SWAP: acc [BLOCK_N, BLOCK_T] = w_tile · x_tileᵀ (W as the MMA's A operand). TMA: operands through the host
    descriptors (x_desc block [BLOCK_T, BLOCK_K], w_desc [BLOCK_N, BLOCK_K]). SPLIT > 1: fp32 atomics into y.
    GATHER: the tile's x rows are perm[rows] (the multi-LoRA sorted order), y's rows too; x through pointer loads
    (a TMA tile is a block of consecutive rows), W through its descriptor when TMA."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    t0 = pid_t * BLOCK_T
    k_per = tl.cdiv(K, SPLIT * BLOCK_K) * BLOCK_K
    k_lo = pid_s * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    if GATHER:
        rows = tl.load(perm_ptr + offs_t, mask=offs_t < T, other=0)
    else:
        rows = offs_t
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        if TMA and not GATHER:
            xt = x_desc.load([t0, k])
        else:
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + (k + offs_k)[None, :],
                         mask=(offs_t[:, None] < T) & ((k + offs_k)[None, :] < K), other=0.0)
        if TMA:
            wt = w_desc.load([n0, k])
        else:
            wt = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k + offs_k)[None, :],
                         mask=(offs_n[:, None] < N) & ((k + offs_k)[None, :] < K), other=0.0)
        if SWAP:
            acc = tl.dot(wt, tl.trans(xt), acc)
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
    if SWAP:
        acc = tl.trans(acc)
    y = y_ptr + rows[:, None].to(tl.int64) * stride_yt + offs_n[None, :]
    mask = (offs_t[:, None] < T) & (offs_n[None, :] < N)
    if SPLIT == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y, acc, mask=mask, sem="relaxed")


def variants(T: int) -> dict:
    if T > 128:
        return tiled_variants()
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
    out = {k: dict(v, WARPS=4, GATHER=False) for k, v in out.items()}
    return {k: v for k, v in out.items() if v["BLOCK_T"] <= 128 or not v["SWAP"] or v["BLOCK_N"] <= 64}


def tiled_variants() -> dict:
    """Row tiles below T (from 256 rows): the tile shapes of the multi-LoRA prefill question (can a Triton GEMM
    match cuBLAS there, so that one kernel could add the LoRA term in its epilogue?)."""
    out = {}
    for bt, bn, bk, stages, warps in ((64, 128, 64, 4, 4), (64, 128, 64, 6, 4), (128, 64, 64, 4, 4),
                                      (128, 64, 64, 6, 4), (128, 128, 64, 4, 8), (128, 128, 64, 3, 4),
                                      (64, 256, 64, 3, 8), (128, 256, 64, 3, 8), (64, 64, 128, 4, 4),
                                      (64, 128, 128, 3, 4), (128, 128, 128, 3, 8)):
        for tma in (False, True):
            out[f"{'tma' if tma else 'ptr'}_t{bt}n{bn}k{bk}s{stages}w{warps}"] = dict(
                BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, SPLIT=1, SWAP=False, TMA=tma, WARPS=warps,
                GATHER=False)
        for tma in (False, True):
            out[f"{'gtma' if tma else 'gather'}_t{bt}n{bn}k{bk}s{stages}w{warps}"] = dict(
                BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, SPLIT=1, SWAP=False, TMA=tma, WARPS=warps,
                GATHER=True)
    return out


def smem_bytes(cfg: dict) -> int:
    return (cfg["BLOCK_T"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * 2 * cfg["STAGES"]


def make_call(cfg: dict, x, w, T: int, perm):
    split = cfg["SPLIT"]
    y = torch.empty((T, N), device=x.device, dtype=torch.float32 if split > 1 else x.dtype)
    if cfg["TMA"]:
        x_desc = TensorDescriptor.from_tensor(x, [cfg["BLOCK_T"], cfg["BLOCK_K"]])
        w_desc = TensorDescriptor.from_tensor(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    else:
        x_desc = w_desc = x
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(N, cfg["BLOCK_N"]), split)
    meta = {k: cfg[k] for k in ("BLOCK_T", "BLOCK_N", "BLOCK_K", "SPLIT", "SWAP", "TMA", "GATHER")}

    def call():
        if split > 1:
            y.zero_()
        _gemm_kernel[grid](x, w, y, x_desc, w_desc, perm, T, N, K, x.stride(0), w.stride(0), y.stride(0), **meta,
                           STAGES=cfg["STAGES"], num_warps=cfg["WARPS"], num_stages=1)
        return y
    return call


def run_tokens(T: int, rounds: int, only: str = "") -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, generator=g)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / 64 for _ in range(SETS)]
    ref = x.float() @ ws[0].float().t()
    perm = torch.randperm(T, device="cuda", generator=g).to(torch.int32)
    fn_sets = {"base": [(lambda w=w: torch.nn.functional.linear(x, w)) for w in ws]}
    info = {}
    for name, cfg in variants(T).items():
        if only and not re.search(only, name):
            continue
        if smem_bytes(cfg) > 220 * 1024 or (cfg["TMA"] and TensorDescriptor is None):
            continue
        try:
            calls = [make_call(cfg, x, w, T, perm) for w in ws]
            err = rel_err(calls[0]().float(), ref)
            info[name] = dict(rel_err=err, ok=err < 1e-2, **{k: cfg[k] for k in ("BLOCK_T", "BLOCK_N", "BLOCK_K",
                                                                                    "STAGES", "WARPS")})
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
    ap.add_argument("--only", default="", help="regular expression: time only the variants it matches")
    args = ap.parse_args(argv)
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        rows += run_tokens(T, args.rounds, args.only)
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
