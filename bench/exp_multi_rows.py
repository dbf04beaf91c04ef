"""Multi-LoRA decode: the "rows" kernels against the segment-tile shrink and expand.

At 64 tokens with 64 adapters the default path's LoRA kernels moved 16 MiB in ~17 µs (shrink 7, expand 10-11:
about 1 TB/s, `results/exp_multi_shrink_split.json`): each program walks K or N in steps after a chain of
dependent metadata loads. The rows kernels (`EXPAND="rows"`: `_shrink_rows_kernel`, `_expand_rows_kernel`) give
each program one token and a whole chunk (8-16K elements of A or B) loaded at once, on the FMA units; the expand
loads its B tile before the PDL wait. Since the first sweep they are the default at 32-64 tokens ("default"
there; "segment" is the path before them). This script, per shape and config: graph time over 8 weight sets as a ratio to F.linear (interleaved
rounds, medians), the relative error against the fp64 reference with NaN-filled workspace and output, a CUDA-graph
replay after the batch metadata is refilled with a new adapter mix (against an eager call), and the kernels' GPU
time per call (torch.profiler over graph replays).

    PYTHONPATH=$PWD python3 bench/exp_multi_rows.py [--out DIR] [--rounds 3] [--shapes 64x64,...]

Shapes are TxADAPTERS[xR][nN]. Writes DIR/exp_multi_rows.json and prints a table last.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import bench_multi_lora as bml  # noqa: E402
from bench.common import (  # noqa: E402
    bench_graph_us, capture_graph, format_table, graph_kernel_timeline, graph_kernel_times, rel_err, write_json,
)
from lora_fast.kernels import multi_lora as kml  # noqa: E402
from lora_fast.multi_lora import _multi_lora_torch, make_batch_metadata, multi_lora_linear  # noqa: E402

DEV = "cuda"
ROWS = dict(BASE="addmm", EXPAND="rows")
CONFIGS = {
    "default": None,
    "segment": dict(BASE="addmm", EXPAND="segment"),  # the 32-1024-token path before the rows kernels
    "rows": dict(ROWS, R_S_ELEMS=8192, R_E_ELEMS=8192),  # the first sweep's rows config
    "rows_s4k": dict(ROWS, R_S_ELEMS=4096),
    "rows_s8k": dict(ROWS, R_S_ELEMS=8192),
    "rows_s16k": dict(ROWS, R_S_ELEMS=16384),
    "rows_e4k": dict(ROWS, R_E_ELEMS=4096),
    "rows_e8k": dict(ROWS, R_E_ELEMS=8192),
    "rows_e16k": dict(ROWS, R_E_ELEMS=16384),
    "rows_w8": dict(ROWS, r_s_num_warps=8, r_e_num_warps=8),
    "rows_nopdl": dict(ROWS, E_PDL=False),
    "rows_s16k_e16k": dict(ROWS, R_S_ELEMS=16384, R_E_ELEMS=16384),
    "rows_e32k": dict(ROWS, R_E_ELEMS=32768),
    "rows_s16k_e32k": dict(ROWS, R_S_ELEMS=16384, R_E_ELEMS=32768),
    "rows_e16k_w8": dict(ROWS, R_E_ELEMS=16384, r_e_num_warps=8),
    # the segment kernels (128-1024 tokens) without their loops: the shrink's K split in one step, the expand one
    # N tile per program (N = 4096)
    "seg_k1": dict(BASE="addmm", EXPAND="segment", SPLIT_K=8, S_BLOCK_K=512, s_num_stages=1),
    "seg_n1": dict(BASE="addmm", EXPAND="segment", E_BLOCK_N=256, E_CHUNKS=16),
    "seg_n1x128": dict(BASE="addmm", EXPAND="segment", E_BLOCK_N=128, E_CHUNKS=32),
    "seg_k1_n1": dict(BASE="addmm", EXPAND="segment", SPLIT_K=8, S_BLOCK_K=512, s_num_stages=1, E_BLOCK_N=256,
                      E_CHUNKS=16),
    "seg_k2s2_n1": dict(BASE="addmm", EXPAND="segment", SPLIT_K=8, S_BLOCK_K=256, s_num_stages=2, E_BLOCK_N=256,
                        E_CHUNKS=16),
    # 2026-12-01 (twelfth session): the expand kernels' 16-byte accesses (slice-table divisibility, rank masks
    # rounded to 8) switched off, i.e. the kernels' loads and stores as before, for an A/B in one run
    "novec": dict(VEC_HINTS=False),
    "rows_all": dict(ROWS),  # the rows kernels at any T (the default keeps them to 32-64 tokens)
    "rows_all_e32k": dict(ROWS, R_E_ELEMS=32768),
    "rows_e32k_w8": dict(ROWS, R_E_ELEMS=32768, r_e_num_warps=8),
    "seg_e256": dict(BASE="addmm", EXPAND="segment", E_BLOCK_N=256),
    "seg_m64": dict(BASE="addmm", EXPAND="segment", E_BLOCK_M=64),
    # prefill expand tiles with the 16-byte stores (the sweep before them: 32 x 128, 4 chunks at 4096 tokens)
    "seg_m64_n128": dict(BASE="addmm", EXPAND="segment", E_BLOCK_M=64, E_BLOCK_N=128),
    "seg_m64_n256_c8": dict(BASE="addmm", EXPAND="segment", E_BLOCK_M=64, E_BLOCK_N=256, E_CHUNKS=8),
    "seg_m32_n256_c8": dict(BASE="addmm", EXPAND="segment", E_BLOCK_M=32, E_BLOCK_N=256, E_CHUNKS=8),
    "seg_m128_n128_c8": dict(BASE="addmm", EXPAND="segment", E_BLOCK_M=128, E_BLOCK_N=128, E_CHUNKS=8,
                             e_num_warps=8),
    "seg_m64_n128_c16": dict(BASE="addmm", EXPAND="segment", E_BLOCK_M=64, E_BLOCK_N=128, E_CHUNKS=16),
    "seg_m32_n128_c16": dict(BASE="addmm", EXPAND="segment", E_BLOCK_M=32, E_BLOCK_N=128, E_CHUNKS=16),
    # our W-streaming GEMM with the per-row gather epilogue (the <= 16-token path) at 32-64 tokens, now that its
    # epilogue's loads are 16 bytes wide (16/16 1.25x -> 1.07x)
    "fused16": dict(BASE="triton", EXPAND="fused", GATHER=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1,
                    num_warps=4, num_stages=4),
    "fused32": dict(BASE="triton", EXPAND="fused", GATHER=True, BLOCK_M=32, BLOCK_N=32, BLOCK_K=256, GROUP_M=1,
                    num_warps=4, num_stages=4),
    "fused64": dict(BASE="triton", EXPAND="fused", GATHER=True, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=1,
                    num_warps=4, num_stages=4),
    "fused64w8": dict(BASE="triton", EXPAND="fused", GATHER=True, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=1,
                      num_warps=8, num_stages=4),
    # 2026-12-01 (thirteenth session): our W-stream GEMM (kernels/wstream.py) instead of cuBLAS's addmm, a PDL
    # consumer of the expand: W streams while the shrink and the expand run (exp_skinny_gemm: the plain GEMM
    # 1.02-1.03x cuBLAS at 64 rows with these tiles)
    "ws": dict(GEMM="triton"),
    "ws_nopdl": dict(GEMM="triton", G_PDL=False),
    "ws_k64s8": dict(GEMM="triton", W_BLOCK_K=64, W_num_stages=8),
    "ws_s4": dict(GEMM="triton", W_num_stages=4),
    "ws_n64s4": dict(GEMM="triton", W_BLOCK_N=64, W_num_stages=4),
    "ws_t32": dict(GEMM="triton", W_BLOCK_T=32),
    "ws_rows": dict(ROWS, GEMM="triton"),
    "ws_seg": dict(BASE="addmm", EXPAND="segment", GEMM="triton"),
    # the W-stream GEMM first (y = X·Wᵀ + b, a PDL consumer of the shrink, starting at once), then the expand adds
    # the term (a PDL consumer of the GEMM, loading B meanwhile)
    "wf": dict(GEMM="first"),
    "wf_nopdl": dict(GEMM="first", G_PDL=False),
    "wf_e32k": dict(GEMM="first", R_E_ELEMS=32768),
    "wf_n64s4": dict(GEMM="first", W_BLOCK_N=64, W_num_stages=4),
    "wf_s4": dict(GEMM="first", W_num_stages=4),
    "wf_rows": dict(ROWS, GEMM="first"),
    "wf_seg": dict(BASE="addmm", EXPAND="segment", GEMM="first"),
    # 2026-12-01 (fourteenth session): the W-stream GEMM first in launch order (y = X·Wᵀ + b from the call's
    # start, letting the shrink start at once); the shrink's programs wait for it as they exit, and the expand
    # (loading B before its wait) adds the term. R_S_STEPS: K slices per shrink program (fewer, lighter programs,
    # which stay resident beside the GEMM until it ends); R_E_ELEMS: the expand's B tile
    "wl": dict(GEMM="lead"),
    "wl_s2": dict(GEMM="lead", R_S_STEPS=2),
    "wl_s4": dict(GEMM="lead", R_S_STEPS=4),
    "wl_k256s8": dict(GEMM="lead", R_S_ELEMS=4096, R_S_STEPS=8),
    "wl_e8k": dict(GEMM="lead", R_E_ELEMS=8192),
    "wl_s4_e8k": dict(GEMM="lead", R_S_STEPS=4, R_E_ELEMS=8192),
    "wl_nopdl": dict(GEMM="lead", G_PDL=False),
    "wl_seg": dict(BASE="addmm", EXPAND="segment", GEMM="lead"),
    "wl_k256s8_e8k": dict(GEMM="lead", R_S_ELEMS=4096, R_S_STEPS=8, R_E_ELEMS=8192),
    "wl_k128s16": dict(GEMM="lead", R_S_ELEMS=2048, R_S_STEPS=16),
    "wl_k256s16": dict(GEMM="lead", R_S_ELEMS=4096, R_S_STEPS=16),
    "wl_k512s4": dict(GEMM="lead", R_S_ELEMS=8192, R_S_STEPS=4),
    "wl_k256s8_n64s4": dict(GEMM="lead", R_S_ELEMS=4096, R_S_STEPS=8, W_BLOCK_N=64, W_num_stages=4),
    "wl_k256s8_s5": dict(GEMM="lead", R_S_ELEMS=4096, R_S_STEPS=8, W_num_stages=5),
    # "lead" at 128-256 tokens with the segment kernels, and W-stream tiles of more rows
    "wl_seg_t128": dict(BASE="addmm", EXPAND="segment", GEMM="lead", W_BLOCK_T=128, W_num_stages=4),
    "wl_seg_t128w8": dict(BASE="addmm", EXPAND="segment", GEMM="lead", W_BLOCK_T=128, W_num_stages=4,
                          W_num_warps=8),
    "wl_seg_t128n64": dict(BASE="addmm", EXPAND="segment", GEMM="lead", W_BLOCK_T=128, W_BLOCK_N=64,
                           W_BLOCK_K=64, W_num_stages=5, W_num_warps=8),
    "wl_seg_t256k64": dict(BASE="addmm", EXPAND="segment", GEMM="lead", W_BLOCK_T=256, W_BLOCK_N=32,
                           W_BLOCK_K=64, W_num_stages=4, W_num_warps=8),
    "wl_rows_k256s8": dict(ROWS, GEMM="lead", R_S_ELEMS=4096, R_S_STEPS=8, R_E_ELEMS=8192),
    # "first" (shrink -> GEMM -> expand, the GEMM waiting for the shrink before its epilogue) with the light shrink
    # of "lead": one grid completion fewer on the tail; and the lead GEMM's K step
    "wf_k256s8_e8k": dict(GEMM="first", R_S_ELEMS=4096, R_S_STEPS=8, R_E_ELEMS=8192),
    "wl_wk256s3": dict(GEMM="lead", W_BLOCK_K=256, W_num_stages=3),
    # 2026-12-02 (fifteenth session): the prefill shrink and expand tiles at 4096 tokens (shrink 12.3 µs and expand
    # 16.5 µs against ~9 µs each at the copy rate)
    "p_s128": dict(S_BLOCK_M=128),
    "p_sk2": dict(SPLIT_K=2),
    "p_sk8": dict(SPLIT_K=8),
    "p_sw8": dict(s_num_warps=8),
    "p_sk256": dict(S_BLOCK_K=256, s_num_stages=2),
    "p_en256": dict(E_BLOCK_N=256, E_CHUNKS=2),
    "p_ew8": dict(e_num_warps=8),
    "p_es3": dict(e_num_stages=3),
    "p_ec8": dict(E_CHUNKS=8),
    "p_ec1": dict(E_CHUNKS=1),
    "p_epdl": dict(E_PDL=True),
    "wl_wk64s12": dict(GEMM="lead", W_BLOCK_K=64, W_num_stages=12),
    "wl_wk128s7": dict(GEMM="lead", W_num_stages=7),
    # "lead" where W's N tiles outnumber the SMs (N = 14336: 448 tiles): the W-stream GEMM persistent, at most
    # W_programs programs walking the tiles
    "wl_p132": dict(GEMM="lead", W_programs=132, R_S_ELEMS=4096, R_S_STEPS=8, R_E_ELEMS=8192),
    "wl_p128": dict(GEMM="lead", W_programs=128, R_S_ELEMS=4096, R_S_STEPS=8, R_E_ELEMS=8192),
    "wl_p132_s4": dict(GEMM="lead", W_programs=132, W_num_stages=4, R_S_ELEMS=4096, R_S_STEPS=8, R_E_ELEMS=8192),
    "wl_np": dict(GEMM="lead", R_S_ELEMS=4096, R_S_STEPS=8, R_E_ELEMS=8192),
    # the fused W-stream GEMM with the per-row gather epilogue (the <= 16-token path) with the skinny GEMM's
    # tile (all rows in one tile, BLOCK_K 128, 6 stages: 1.02x cuBLAS alone at 64 rows, exp_skinny_gemm)
    "fused64s6": dict(BASE="triton", EXPAND="fused", GATHER=True, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, GROUP_M=1,
                      num_warps=4, num_stages=6),
    "fused64s6w8": dict(BASE="triton", EXPAND="fused", GATHER=True, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128,
                        GROUP_M=1, num_warps=8, num_stages=6),
    "fused32s6": dict(BASE="triton", EXPAND="fused", GATHER=True, BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, GROUP_M=1,
                      num_warps=4, num_stages=6),
    "fused64s6_seg": dict(BASE="triton", EXPAND="fused", GATHER=False, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128,
                          GROUP_M=1, num_warps=4, num_stages=6),
    # 2026-12-02 (seventeenth session): the W-stream GEMM adds the LoRA term itself (GEMM="lora": the rows shrink,
    # then the GEMM as its PDL consumer, each token's term as extra K steps after W's; no expand launch, no tail
    # after W's stream). "lora" keeps the default's rows tiles at 32-64 tokens (the light K-stepping shrink);
    # "lora_rows" forces the rows kernels at any T (1-16 and 128 tokens)
    "lora": dict(GEMM="lora"),
    "lora_s1": dict(GEMM="lora", R_S_ELEMS=8192, R_S_STEPS=1),
    "lora_s4": dict(GEMM="lora", R_S_ELEMS=4096, R_S_STEPS=4),
    "lora_s5": dict(GEMM="lora", W_num_stages=5),
    "lora_rows": dict(ROWS, GEMM="lora", R_S_ELEMS=4096, R_S_STEPS=8),
    "lora_rows_s1": dict(ROWS, GEMM="lora", R_S_ELEMS=8192, R_S_STEPS=1),
    # the rows expand's tile on the pool's B layout as before (R_E_ELEMS / BLOCK_R columns, not >= 256 per warp)
    "pool_cols_off": dict(R_POOL_COLS_PER_WARP=0),
}
SHAPES = "1x1,16x16,32x32,64x64,128x32,256x32,64x64x64,256x32x64,64x64n14336"
FAILURES: list[str] = []


def parse_shape(text):
    """"TxA", "TxAxR", "TxAnN" or "TxAxRnN" -> (T, adapters, r, N); r 16 and N 4096 unless given."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:x(\d+))?(?:n(\d+))?", text)
    if m is None:
        raise ValueError(f"shape {text!r}: expected TxA[xR][nN]")
    t, a, r, n = m.groups()
    return int(t), int(a), int(r or 16), int(n or 4096)


def check(prob, name) -> dict:
    """Relative error with NaN-filled workspace and output, and a graph replay after a new adapter mix."""
    W, b, A, B = prob.sets[0]
    kml.DEBUG_FILL_WORKSPACE = True
    try:
        out = torch.full((prob.T, prob.N), float("nan"), device=DEV, dtype=prob.x.dtype)
        y = multi_lora_linear(prob.x, W, b, A, B, prob.scalings, prob.meta, ranks=prob.ranks, out=out)
    finally:
        kml.DEBUG_FILL_WORKSPACE = False
    ref = _multi_lora_torch(prob.x.double(), W.double(), b.double(), A[:, None].double(), B.double(),
                            prob.scalings.double(), prob.ranks, prob.ids, (prob.N,))
    err = rel_err(y, ref)
    nan = bool(torch.isnan(y).any().item())
    # graph replay with a new mix: capture on one metadata object, refill it in place, replay
    meta = make_batch_metadata(prob.ids.clone(), prob.S)
    static_out = torch.empty(prob.T, prob.N, device=DEV, dtype=prob.x.dtype)
    fn = lambda: multi_lora_linear(prob.x, W, b, A, B, prob.scalings, meta, ranks=prob.ranks, out=static_out)  # noqa: E731
    graph = capture_graph([fn])
    g = torch.Generator(device="cpu").manual_seed(prob.T * 31 + prob.S)
    new_ids = torch.randint(-1, prob.S, (prob.T,), generator=g).to(DEV, torch.int32)
    meta.update_(new_ids, validate=False)
    graph.replay()
    torch.cuda.synchronize()
    eager = multi_lora_linear(prob.x, W, b, A, B, prob.scalings, make_batch_metadata(new_ids, prob.S),
                              ranks=prob.ranks)
    replay_diff = float((static_out.float() - eager.float()).abs().max())
    tol = 1e-2
    ok = err <= tol and not nan and replay_diff == 0.0
    if not ok:
        FAILURES.append(f"{name} T={prob.T} S={prob.S} r={prob.r} N={prob.N}: err {err:.3g} nan {nan} "
                        f"replay {replay_diff:.3g}")
    return dict(rel_err=err, nan=nan, replay_max_diff=replay_diff, ok=ok)


def configs_for(T, wanted=None):
    """The configs to run at T tokens: `wanted` (names) if given, else the first sweep's set."""
    if wanted:
        return ["default"] + [n for n in wanted if n != "default"]
    names = ["default", "segment", "rows", "rows_nopdl"]
    if T in (16, 64, 256):
        names += ["rows_s4k", "rows_s16k", "rows_e4k", "rows_e16k", "rows_w8"]
    return names


def run_shape(T, n_ad, r, N, rounds, wanted=None, K=4096, pool_layout=False):
    prob = bml.Problem(T, n_ad, r, K, N, torch.bfloat16, DEV, sets=bml.WEIGHT_SETS)
    if pool_layout:  # B as AdapterPool keeps it (Bt [S, R, N], viewed [S, N, R] with N contiguous): same values
        prob.sets = [(W, b, A, B.transpose(1, 2).contiguous().transpose(1, 2)) for W, b, A, B in prob.sets]
    names = configs_for(T, wanted)
    times = {n: [] for n in ["base"] + names}
    info = {n: {} for n in names}
    for name in names:  # compile, check, profile
        kml.set_config_override(CONFIGS[name])
        try:
            info[name].update(check(prob, name))
            fns = [prob.provider("ours", s) for s in range(bml.WEIGHT_SETS)]
            info[name]["kernels"] = {k[:40]: round(us, 2) for k, _, us in graph_kernel_times(fns)}
            # one call's kernels as (start, end) µs from its first kernel's start (shows the PDL overlap)
            try:
                info[name]["timeline"] = [(k[:40], round(a, 2), round(b, 2))
                                          for k, a, b in graph_kernel_timeline(fns)]
            except Exception:  # noqa: BLE001 - a diagnostic only
                info[name]["timeline"] = traceback.format_exc()[-300:]
        except Exception:  # noqa: BLE001 - a config that fails is reported; the others still run
            info[name]["error"] = traceback.format_exc()[-400:]
            FAILURES.append(f"{name} T={T}: exception")
        finally:
            kml.set_config_override(None)
    for _ in range(rounds):
        times["base"].append(bench_graph_us([prob.provider("base", s) for s in range(bml.WEIGHT_SETS)]))
        for name in names:
            if "error" in info[name]:
                continue
            kml.set_config_override(CONFIGS[name])
            try:
                times[name].append(bench_graph_us([prob.provider("ours", s) for s in range(bml.WEIGHT_SETS)]))
            finally:
                kml.set_config_override(None)
    base = sorted(times["base"])[len(times["base"]) // 2]
    rows = []
    for name in names:
        t = sorted(times[name])
        row = dict(T=T, adapters=n_ad, r=r, N=N, config=name, base_us=base, pool_layout=pool_layout, **info[name])
        if t:
            row.update(graph_us=t[len(t) // 2], ratio=t[len(t) // 2] / base,
                       ratio_range=[t[0] / base, t[-1] / base])
        rows.append(row)
        print({k: v for k, v in row.items() if k != "kernels"}, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--configs", default="", help="comma-separated names of CONFIGS (default: the first sweep's)")
    ap.add_argument("--pool-layout", action="store_true", help="B as AdapterPool keeps it (N contiguous)")
    args = ap.parse_args(argv)
    rows = []
    for shape in args.shapes.split(","):
        T, n_ad, r, N = parse_shape(shape)
        rows += run_shape(T, n_ad, r, N, args.rounds, [c for c in args.configs.split(",") if c],
                          pool_layout=args.pool_layout)
        write_json("exp_multi_rows", rows, {"failures": FAILURES}, out_dir=args.out)
    print("== kernels per call (graph replays), default and rows")
    for row in rows:
        if row["config"] in ("default", "segment", "rows") or row["config"].startswith(
                ("ws", "wf", "wl", "fused", "lora")):
            print(row["T"], row["adapters"], row["r"], row["N"], row["config"], row.get("kernels"))
            print("    timeline (start, end µs):", row.get("timeline"))
    print("== graph ratios to F.linear")
    print(format_table(rows, ["T", "adapters", "r", "N", "config", "base_us", "graph_us", "ratio", "rel_err",
                              "replay_max_diff", "ok"]))
    print(f"exp_multi_rows: {len(FAILURES)} failures" + (f": {FAILURES}" if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
