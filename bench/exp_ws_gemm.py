"""Does Triton's warp specialization (tl.range(..., warp_specialize=True), Hopper support since mid-2025) close the
gap of our persistent TMA GEMM to cuBLAS? A plain Y = X @ W^T at 8192 x 4096 x 4096 (bf16) with in-kernel tensor
descriptors, one persistent walk, by tile / warps / stages, with and without warp specialization, against
F.linear timed in the same run (do_bench medians over interleaved rounds). Every config is checked against
cuBLAS's output first.

bench/NOTES.md: our GEMMs run 1.06-1.08x cuBLAS's time (exp_persistent); the forward's epilogue and the
inline shrink were left for "a warp-specialized kernel once Triton supports it on Hopper".

    PYTHONPATH=$PWD python3 bench/exp_ws_gemm.py [--out DIR] [--quick]
"""
import argparse
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import interleaved_ratios  # noqa: E402


@triton.jit
def _ws_gemm_kernel(X, W, Y, M, N, K, NUM_PROGS,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    WS: tl.constexpr, STAGES: tl.constexpr):
    """Y [M, N] = X [M, K] @ W [N, K]^T, persistent: program p takes tiles p, p + NUM_PROGS, ... in grouped
    order. Descriptors are built on the device (triton.set_allocator gives their scratch)."""
    x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(Y, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * tiles_n
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGS, num_stages=STAGES,
                         warp_specialize=WS):
        group = tile // per_group
        first_m = group * GROUP_M
        rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % rows
        pid_n = (tile % per_group) // rows
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_steps):
            a = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(Y.dtype.element_ty))


def ws_gemm(x, w, cfg, out=None):
    bm, bn, bk, warps, stages, ws = cfg
    M, K = x.shape
    N = w.shape[0]
    y = out if out is not None else torch.empty((M, N), device=x.device, dtype=x.dtype)
    progs = min(torch.cuda.get_device_properties(x.device).multi_processor_count,
                triton.cdiv(M, bm) * triton.cdiv(N, bn))
    _ws_gemm_kernel[(progs,)](x, w, y, M, N, K, progs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, WS=ws,
                              STAGES=stages, num_warps=warps, num_stages=stages)
    return y


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, stages, warp_specialize). Compiled for sm_90 by Triton 3.9 on the CPU:
# warp specialization applies with num_warps=4 (12 warps in all, setmaxnreg), not with 8.
CONFIGS = [(128, 256, 64, 8, 3, False), (128, 256, 64, 4, 3, True), (128, 256, 64, 4, 2, True),
           (128, 128, 64, 4, 4, False), (128, 128, 64, 4, 4, True), (128, 128, 64, 4, 5, True),
           (128, 128, 128, 4, 3, True), (64, 256, 64, 4, 4, True), (256, 128, 64, 8, 3, True),
           (128, 256, 64, 8, 3, True)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    rows = []
    shapes = [(8192, 4096, 4096)] if args.quick else [(8192, 4096, 4096), (8192, 4096, 14336)]
    for M, K, N in shapes:
        g = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
        w = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).bfloat16()
        ref = F.linear(x, w)
        from lora_fast import kernels

        A = (torch.randn(16, K, device="cuda", generator=g) / K**0.5).bfloat16()
        B = torch.randn(N, 16, device="cuda", generator=g).bfloat16()
        fns, ok = {"cublas": lambda: F.linear(x, w), "ours_lora_fwd_r16": lambda: kernels.lora_forward(
            x, w, None, A, B, 2.0)}, {}
        for cfg in CONFIGS:
            name = "x".join(map(str, cfg[:3])) + f"_w{cfg[3]}_s{cfg[4]}" + ("_ws" if cfg[5] else "")
            try:
                y = ws_gemm(x, w, cfg, out=torch.full_like(ref, float("nan")))
                err = float((y.float() - ref.float()).norm() / ref.float().norm())
                ok[name] = err < 1e-2 and not torch.isnan(y).any().item()
                rows.append(dict(shape=[M, K, N], config=name, rel_err=err, ok=ok[name]))
                if ok[name]:
                    fns[name] = (lambda cfg=cfg: ws_gemm(x, w, cfg))
            except Exception:  # a config that does not compile is a row, not the end of the run
                rows.append(dict(shape=[M, K, N], config=name, error=traceback.format_exc()[-600:], ok=False))
            print(rows[-1], flush=True)
        ratios = interleaved_ratios(fns, "cublas", rounds=3)
        for r in rows:
            if r["shape"] == [M, K, N] and r["config"] in ratios:
                r["ratio_to_cublas"] = ratios[r["config"]]
        print(f"== {M}x{K}x{N}: ratio to cuBLAS (interleaved do_bench medians)")
        for name, v in sorted(ratios.items(), key=lambda kv: kv[1]):
            print(f"  {name:28s} {v:.3f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "exp_ws_gemm.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print(f"summary: {sum(r.get('ok', False) for r in rows)}/{len(rows)} configs correct")


if __name__ == "__main__":
    main()
