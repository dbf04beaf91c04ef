"""The single-adapter forward and dX at 65-2048 rows: which tile, under CUDA graphs.

`bench/exp_split_rows.py` (nineteenth session, H200) measured the forward at 96-512 rows, K = N = 4096, at
1.3-4.4x the base: the "m256" class (65-256 rows) runs a 64 x 32 tile on pointer loads, and from 257 rows the
"large" class's persistent 128 x 256 tile leaves most SMs idle (64 tiles at 512 rows for 132 SMs). A plain Triton
GEMM with both operands on TMA ran at 1.03-1.07x cuBLAS at 256 rows (64 x 128 x 64, 6 stages) and 1.04-1.09x at
1024 (128 x 128 x 64), bench/exp_skinny_gemm.py. This script times candidate tiles for the forward (xa as K-range
partials, "split", or a shrink launch first, "shrink"; both PDL consumers) and for dX ("shrink": dY @ B first,
"fused": in the GEMM's loop), one call per weight set under a CUDA graph over 8 weight sets, as ratios to the base
(F.linear, torch.mm(dy, W)) in the same interleaved rounds, beside the Unsloth-style cuBLAS addmm. Every variant is
checked against the fp32 reference (NaN-filled outputs).

    PYTHONPATH=$PWD python3 bench/exp_mid_rows.py [--out DIR] [--rows 96,128,256,512,1024,2048] [--wide 256,1024]

Writes DIR/exp_mid_rows.json and prints a table last.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import (  # noqa: E402
    capture_graph, format_table, graph_replay_us, interleaved_times, rel_err, round_ratios, write_json,
)
from lora_fast import kernels  # noqa: E402
from lora_fast.kernels import config as kconfig  # noqa: E402
from lora_fast.reference import lora_linear_reference  # noqa: E402

GC = kconfig.GemmConfig
SETS = 8
SEED = 1234
SCALE = 2.0
# name -> tile (None: the shipped default)
CANDIDATES = {
    "default": None,
    "64x64x64_s6": GC(64, 64, 64, group_m=8, num_warps=4, num_stages=6, tma=True),
    "64x128x64_s6": GC(64, 128, 64, group_m=8, num_warps=4, num_stages=6, tma=True),
    "64x128x64_s4": GC(64, 128, 64, group_m=8, num_warps=4, num_stages=4, tma=True),
    "64x128x64_s6_st": GC(64, 128, 64, group_m=8, num_warps=4, num_stages=6, tma=True, tma_store=True),
    "128x64x64_s6": GC(128, 64, 64, group_m=8, num_warps=4, num_stages=6, tma=True),
    "128x128x64_s3w8": GC(128, 128, 64, group_m=8, num_warps=8, num_stages=3, tma=True),
    "128x128x64_s4w4": GC(128, 128, 64, group_m=8, num_warps=4, num_stages=4, tma=True),
    "64x256x64_s4w8": GC(64, 256, 64, group_m=8, num_warps=8, num_stages=4, tma=True),
    "128x128x64_p": GC(128, 128, 64, group_m=8, num_warps=8, num_stages=3, tma=True, persistent=True,
                       tma_store=True),
}


def _graph_of(fns, kernel: str, cls: str, cfg):
    """A CUDA graph of `fns` captured with `cfg` forced for (kernel, cls) (None: the default); the override is
    dropped afterwards (the captured launches keep their kernels)."""
    if cfg is not None:
        kconfig.set_override(kernel, cls, cfg)
    try:
        return capture_graph(fns)
    finally:
        if cfg is not None:
            kconfig.set_override(kernel, cls, None)


def _check(fn, ref, kernel, cls, cfg) -> float:
    if cfg is not None:
        kconfig.set_override(kernel, cls, cfg)
    try:
        out = fn()
    finally:
        if cfg is not None:
            kconfig.set_override(kernel, cls, None)
    return rel_err(out.float(), ref)


def _time_variants(op: str, modes, call, out_shape, ref, sets, graphs: dict, rows: list, meta: dict) -> None:
    """For each tile of CANDIDATES and each of `modes` ("auto" too for the default tile): check
    `call(W, A, B, mode, out=NaN-filled)` of the first weight set against `ref`, then capture a graph of one call
    per weight set into graphs["op/tile/mode"]; a row per variant (with its error if it cannot run here)."""
    W0, A0, B0 = sets[0]
    cls = kconfig.shape_class(meta["M"])
    for name, cfg in CANDIDATES.items():
        for mode in (("auto",) if name == "default" else ()) + tuple(modes):
            row = dict(meta, tile=name, mode=mode, ok=True)
            try:
                out = torch.full(out_shape, float("nan"), device="cuda", dtype=W0.dtype)
                err = _check(lambda: call(W0, A0, B0, mode, out=out), ref, op, cls, cfg)
                graphs[f"{op}/{name}/{mode}"] = _graph_of(
                    [(lambda W=W, A=A, B=B, mode=mode: call(W, A, B, mode)) for W, A, B in sets], op, cls, cfg)
                row.update(rel_err=err, ok=err < 1e-2)
            except Exception as e:  # noqa: BLE001 - a tile that cannot run here is recorded; the rest run
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            rows.append(row)


def run_shape(M: int, K: int, N: int, r: int, p: float, rounds: int, which: str) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(M * 131 + N + r)
    dt = torch.bfloat16
    x = torch.randn(M, K, device="cuda", dtype=dt, generator=g)
    dy = torch.randn(M, N, device="cuda", dtype=dt, generator=g)
    sets = [((torch.randn(N, K, device="cuda", dtype=dt, generator=g) / K**0.5),
             (torch.randn(r, K, device="cuda", dtype=dt, generator=g) / K**0.5),
             (torch.randn(N, r, device="cuda", dtype=dt, generator=g) / r**0.5)) for _ in range(SETS)]
    W0, A0, B0 = sets[0]
    graphs, rows = {}, []
    if which in ("fwd", "both"):
        mask = kernels.dropout_mask(SEED, M, K, p, "cuda") if p else None
        ref = lora_linear_reference(x.float(), W0.float(), None, A0.float(), B0.float(), SCALE, p, p > 0, mask)
        graphs["fwd/base"] = capture_graph([(lambda W=W: F.linear(x, W)) for W, _, _ in sets])
        if p == 0:
            def addmm(W, A, B):
                y = F.linear(x, W)
                return y.addmm_(x @ A.t(), B.t(), alpha=SCALE)
            graphs["fwd/addmm"] = capture_graph([(lambda W=W, A=A, B=B: addmm(W, A, B)) for W, A, B in sets])
        _time_variants("fwd", ("split", "shrink"), lambda W, A, B, mode, out=None: kernels.lora_forward(
            x, W, None, A, B, SCALE, p, SEED, xa_mode=mode, out=out)[0], (M, N), ref, sets, graphs, rows,
                       dict(op="fwd", M=M, K=K, N=N, r=r, p=p))
    if which in ("dx", "both") and p == 0:
        ref = dy.float() @ W0.float() + SCALE * (dy.float() @ B0.float()) @ A0.float()
        graphs["dx/base"] = capture_graph([(lambda W=W: torch.mm(dy, W)) for W, _, _ in sets])

        def addmm_dx(W, A, B):
            return torch.mm(dy, W).addmm_(dy @ B, A, alpha=SCALE)
        graphs["dx/addmm"] = capture_graph([(lambda W=W, A=A, B=B: addmm_dx(W, A, B)) for W, A, B in sets])
        _time_variants("dx", ("shrink", "fused"), lambda W, A, B, mode, out=None: kernels.lora_backward_dx(
            dy, W, A, B, SCALE, dyb_mode=mode, out=out)[0], (M, K), ref, sets, graphs, rows,
                       dict(op="dx", M=M, K=K, N=N, r=r, p=p))
    timers = {tag: (lambda gr=gr: graph_replay_us(gr, SETS)) for tag, gr in graphs.items()}
    times = interleaved_times(timers, rounds)
    for op in ("fwd", "dx"):
        sub = {t: v for t, v in times.items() if t.startswith(op + "/")}
        if not sub:
            continue
        res = round_ratios(sub, f"{op}/base")
        for row in rows:
            tag = f"{op}/{row.get('tile')}/{row.get('mode')}"
            if row["op"] == op and tag in res:
                row.update(us=res[tag]["us"], ratio=res[tag]["ratio"], base_us=res[f"{op}/base"]["us"])
        peer = res.get(f"{op}/addmm")
        if peer:
            rows.append(dict(op=op, M=M, K=K, N=N, r=r, p=p, tile="addmm", mode="cublas", us=peer["us"],
                             ratio=peer["ratio"], base_us=res[f"{op}/base"]["us"], ok=True))
    del graphs
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default="96,128,256,512,1024,2048")
    ap.add_argument("--wide", default="256,1024", help="rows also timed at N = 14336 and at K = 14336")
    ap.add_argument("--dropout-rows", default="128,512", help="rows also timed with dropout 0.1 (forward)")
    ap.add_argument("--which", default="both", choices=("fwd", "dx", "both"))
    ap.add_argument("--tiles", default="", help="comma-separated names of CANDIDATES to time (default all)")
    args = ap.parse_args(argv)
    if args.tiles:
        for name in [n for n in CANDIDATES if n not in args.tiles.split(",")]:
            del CANDIDATES[name]
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    shapes = [(M, 4096, 4096, 0.0) for M in ints(args.rows)]
    shapes += [(M, 4096, 14336, 0.0) for M in ints(args.wide)] + [(M, 14336, 4096, 0.0) for M in ints(args.wide)]
    shapes += [(M, 4096, 4096, 0.1) for M in ints(args.dropout_rows)]
    rows = []
    for M, K, N, p in shapes:
        rows += run_shape(M, K, N, 16, p, args.rounds, args.which if p == 0 else "fwd")
        write_json("exp_mid_rows", rows, out_dir=args.out)
        best = {}
        for row in rows:
            if (row["M"], row["K"], row["N"], row["p"]) == (M, K, N, p) and "ratio" in row:
                key = row["op"]
                if row["tile"] not in ("addmm",) and (key not in best or row["ratio"] < best[key]["ratio"]):
                    best[key] = row
        print(f"M={M} K={K} N={N} p={p}: " + ", ".join(
            f"{op} best {b['tile']}/{b['mode']} {b['ratio']:.3f}" for op, b in best.items()), flush=True)
    print(format_table([row for row in rows if "ratio" in row and (row["tile"] == "addmm" or row["mode"] == "auto")],
                       ["op", "M", "K", "N", "p", "tile", "mode", "base_us", "us", "ratio"]))
    summary = []
    for key in sorted({(r["op"], r["M"], r["K"], r["N"], r["p"]) for r in rows}):
        cands = [r for r in rows if (r["op"], r["M"], r["K"], r["N"], r["p"]) == key and "ratio" in r
                 and r["tile"] != "addmm"]
        if cands:
            b = min(cands, key=lambda r: r["ratio"])
            d = [r for r in cands if r["tile"] == "default"]
            summary.append(dict(op=key[0], M=key[1], K=key[2], N=key[3], p=key[4], best=f"{b['tile']}/{b['mode']}",
                                best_ratio=b["ratio"], default=min(r["ratio"] for r in d) if d else None))
    print(format_table(summary, ["op", "M", "K", "N", "p", "best", "best_ratio", "default"]))
    bad = [row for row in rows if not row["ok"]]
    print(f"exp_mid_rows: {len(bad)} failed checks, {sum('error' in r for r in rows)} variants could not run")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
