"""Experiment: programmatic dependent launch (PDL) for lora-fast's producer/consumer kernel pairs, on the GPU.

The pairs: the rank-r shrink and the GEMM that adds (s * xa) @ B^T in its epilogue (forward "shrink" and decode
"split" modes, dX), and multi-LoRA's shrink and fused GEMM (decode). With PDL the consumer starts while the
producer runs and waits (`gdc_wait`) only before it reads the producer's output. (The NF4 GEMV's finishing kernel
as a PDL consumer measured slower, 16.0 against 14.2 µs at M = 1, and was dropped: bench/NOTES.md.)

1. Checks: every pair with PDL against the fp64 reference (NaN-filled outputs), and bitwise against the same
   kernels without PDL; CUDA-graph replays of PDL pairs with new inputs against eager results (races would show).
2. Timings under CUDA graphs over 8 rotated weight sets, PDL on and off in the same run, as ratios to the base
   `F.linear` timed in the same run.

    python bench/exp_pdl.py --out /tmp/exp
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import bench_multi_lora as bml  # noqa: E402
from bench.common import bench_graph_us, capture_graph, format_table, rel_err  # noqa: E402
import lora_fast  # noqa: E402
from lora_fast.kernels import helpers, launch, lora_backward_dx, lora_forward  # noqa: E402
from lora_fast.kernels import lora_fwd  # noqa: E402
from lora_fast.kernels import multi_lora as kml  # noqa: E402
from lora_fast.multi_lora import _multi_lora_torch, make_batch_metadata, multi_lora_linear  # noqa: E402

DEV = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
CHECKS: list[dict] = []


def set_pdl(on: bool) -> None:
    helpers.PDL_ENV = on
    launch.clear_plans()


def check(name, ok, **info):
    CHECKS.append({"check": name, "passed": bool(ok), **info})
    if not ok:
        print("FAILED", name, info, flush=True)


def fwd_reference(x, W, b, A, B, s):
    xa = (x.double() @ A.double().t()).to(x.dtype).double()
    return x.double() @ W.double().t() + (b.double() if b is not None else 0) + s * xa @ B.double().t()


def check_forward():
    torch.manual_seed(0)
    shapes = [(1, 4096, 4096, 16), (7, 4000, 3001, 3), (16, 4096, 4096, 64), (16, 4096, 4096, 128),
              (64, 4096, 4096, 16), (128, 2048, 5632, 16), (256, 4096, 4096, 24), (1000, 1024, 1000, 16)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for M, K, N, r in shapes:
            x = torch.randn(M, K, device=DEV, dtype=dtype)
            W = torch.randn(N, K, device=DEV, dtype=dtype) / K ** 0.5
            b = torch.randn(N, device=DEV, dtype=dtype)
            A = torch.randn(r, K, device=DEV, dtype=dtype) / K ** 0.5
            B = torch.randn(N, r, device=DEV, dtype=dtype) * 0.1
            ref = fwd_reference(x, W, b, A, B, 0.5)
            for mode in ("split", "shrink") if M <= 256 else ("shrink",):
                outs = {}
                for pdl in (True, False):
                    set_pdl(pdl)
                    y = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
                    lora_forward(x, W, b, A, B, 0.5, xa_mode=mode, out=y)
                    outs[pdl] = y
                err = rel_err(outs[True], ref)
                check(f"fwd {mode} {M}x{K}x{N} r{r} {str(dtype)[6:]}", err <= TOL[dtype]
                      and torch.equal(outs[True], outs[False]), rel_err=err)
    set_pdl(True)


def check_split_dropout():
    """"split" with dropout and a stored xa (the training forward at decode sizes) against "shrink" (same mask)."""
    torch.manual_seed(6)
    for M, K, N, r in ((1, 4096, 4096, 16), (16, 4000, 3001, 5), (64, 4096, 4096, 16)):
        dt = torch.bfloat16
        x = torch.randn(M, K, device=DEV, dtype=dt)
        W = torch.randn(N, K, device=DEV, dtype=dt) / K ** 0.5
        A = torch.randn(r, K, device=DEV, dtype=dt) / K ** 0.5
        B = torch.randn(N, r, device=DEV, dtype=dt) * 0.1
        outs = {}
        for mode in ("split", "shrink"):
            y = torch.full((M, N), float("nan"), device=DEV, dtype=dt)
            _, xa = lora_forward(x, W, None, A, B, 2.0, 0.1, 11, store_xa=True, xa_mode=mode, out=y)
            outs[mode] = (y, xa)
        ey, exa = rel_err(outs["split"][0], outs["shrink"][0]), rel_err(outs["split"][1], outs["shrink"][1])
        check(f"split dropout store_xa {M}x{K}x{N} r{r}", ey <= 1e-2 and exa <= 1e-2, y_rel=ey, xa_rel=exa)


def check_training():
    """lora_linear forward + backward at a training shape (shrink -> GEMM pairs in the forward and in dX), with
    and without dropout: PDL against no PDL bitwise, and the reference."""
    torch.manual_seed(1)
    M, K, N, r = 4096, 4096, 4096, 16
    dt = torch.bfloat16
    x0 = torch.randn(M, K, device=DEV, dtype=dt)
    W = torch.randn(N, K, device=DEV, dtype=dt) / K ** 0.5
    A0 = torch.randn(r, K, device=DEV, dtype=dt) / K ** 0.5
    B0 = torch.randn(N, r, device=DEV, dtype=dt) * 0.1
    dy = torch.randn(M, N, device=DEV, dtype=dt)
    for p in (0.0, 0.1):
        res = {}
        for pdl in (True, False):
            set_pdl(pdl)
            x, A, B = (t.clone().requires_grad_() for t in (x0, A0, B0))
            torch.manual_seed(5)
            y = lora_fast.lora_linear(x, W, None, A, B, 2.0, dropout_p=p, training=True)
            y.backward(dy)
            res[pdl] = (y, x.grad, A.grad, B.grad)
        same = all(torch.equal(a, b) for a, b in zip(res[True], res[False]))
        xa_ref = None
        if p == 0.0:
            y_ref = fwd_reference(x0, W, None, A0, B0, 2.0)
            xa_ref = rel_err(res[True][0], y_ref)
        check(f"train fwd+bwd {M}x{K}x{N} r{r} p{p}", same and (xa_ref is None or xa_ref <= TOL[dt]),
              y_rel_err=xa_ref)
    set_pdl(True)


def check_multi():
    torch.manual_seed(2)
    cases = [("T=1", 1, 1, 16, 4096, 4096, False), ("T=16 16 adapters", 16, 16, 16, 4096, 4096, False),
             ("T=7 odd K/N mixed ranks", 7, 5, 16, 4000, 3001, True), ("T=64 64 adapters", 64, 64, 16, 4096, 4096,
                                                                        False)]
    for name, T, S, R, K, N, mixed in cases:
        dt = torch.bfloat16
        x = torch.randn(T, K, device=DEV, dtype=dt)
        W = torch.randn(N, K, device=DEV, dtype=dt) / K ** 0.5
        b = torch.randn(N, device=DEV, dtype=dt) * 0.1
        A = torch.randn(S, 1, R, K, device=DEV, dtype=dt) / K ** 0.5
        B = torch.randn(S, N, R, device=DEV, dtype=dt) / R ** 0.5
        sc = torch.rand(S, device=DEV) + 0.5
        ranks = (torch.randint(1, R + 1, (S,)) if mixed else torch.full((S,), R)).to(DEV, torch.int32)
        ids = torch.randint(-1, S, (T,), device=DEV, dtype=torch.int32)
        ref = _multi_lora_torch(x.double(), W.double(), b.double(), A.double(), B.double(), sc.double(), ranks,
                                ids, (N,))
        outs = {}
        kml.set_config_override({"BASE": "triton"} if T > 16 else None)
        for pdl in (True, False):
            set_pdl(pdl)
            out = torch.full((T, N), float("nan"), device=DEV, dtype=dt)
            outs[pdl] = multi_lora_linear(x, W, b, A, B, sc, ids, ranks=ranks, out=out)
        kml.set_config_override(None)
        err = rel_err(outs[True], ref)
        check(f"multi {name}", err <= 1e-2 and torch.equal(outs[True], outs[False]), rel_err=err)
    set_pdl(True)


def check_graph_replays():
    """Capture PDL pairs once, replay with fresh inputs copied into the captured buffers: each replay must equal
    the eager call without PDL, bitwise."""
    torch.manual_seed(4)
    K = N = 4096
    dt = torch.bfloat16
    W = torch.randn(N, K, device=DEV, dtype=dt) / K ** 0.5
    A = torch.randn(16, K, device=DEV, dtype=dt) / K ** 0.5
    B = torch.randn(N, 16, device=DEV, dtype=dt) * 0.1
    for name, M, fn in (("fwd split", 1, lambda x: lora_forward(x, W, None, A, B, 2.0, xa_mode="split")[0]),
                        ("fwd split", 16, lambda x: lora_forward(x, W, None, A, B, 2.0, xa_mode="split")[0]),
                        ("fwd shrink p0.1", 16, lambda x: lora_forward(x, W, None, A, B, 2.0, 0.1, 9, store_xa=True,
                                                                      xa_mode="shrink")[0])):
        x_static = torch.randn(M, K, device=DEV, dtype=dt)
        set_pdl(True)
        fn(x_static)
        holder = {}
        graph = capture_graph([lambda: holder.__setitem__("y", fn(x_static))])
        worst_same = True
        for _ in range(10):
            x_new = torch.randn(M, K, device=DEV, dtype=dt)
            x_static.copy_(x_new)
            graph.replay()
            set_pdl(False)
            eager = fn(x_new)
            set_pdl(True)
            worst_same &= torch.equal(holder["y"], eager)
        check(f"graph replays {name} M={M}", worst_same)


def train_timings(sets, dt, K, N):
    """The forward's and dX's shrink -> GEMM pairs at a training shape, PDL on and off twice over."""
    rows = []
    M = 8192
    x = torch.randn(M, K, device=DEV, dtype=dt)
    dy = torch.randn(M, N, device=DEV, dtype=dt)
    two = sets[:2]
    base = bench_graph_us([lambda W=W: F.linear(x, W) for W, _, _ in two], replays=20)
    base_dx = bench_graph_us([lambda W=W: dy @ W for W, _, _ in two], replays=20)
    rows.append({"case": f"train fwd M={M}", "variant": "base F.linear", "us": base, "ratio": 1.0})
    rows.append({"case": f"train dX M={M}", "variant": "base dY @ W", "us": base_dx, "ratio": 1.0})
    for pdl in (True, False, True, False):
        set_pdl(pdl)
        tag = "PDL" if pdl else "no PDL"
        us = bench_graph_us([lambda W=W, A=A, B=B: lora_forward(x, W, None, A, B, 2.0, store_xa=True,
                                                                xa_mode="shrink") for W, A, B in two], replays=20)
        rows.append({"case": f"train fwd M={M}", "variant": tag, "us": us, "ratio": us / base})
        us = bench_graph_us([lambda W=W, A=A, B=B: lora_backward_dx(dy, W, A, B, 2.0, store_dyb=True,
                                                                    dyb_mode="shrink") for W, A, B in two],
                            replays=20)
        rows.append({"case": f"train dX M={M}", "variant": tag, "us": us, "ratio": us / base_dx})
    set_pdl(True)
    return rows


def multi_timings(dt, K, N):
    """Multi-LoRA decode: PDL on / off twice over, K splits of the shrink, fused GEMM tiles, and our GEMM alone
    (ids -1)."""
    rows = []
    for T, n_ad in ((1, 1), (16, 16)):
        prob = bml.Problem(T, n_ad, 16, K, N, dt, DEV, sets=bml.WEIGHT_SETS)
        base = bench_graph_us([prob.provider("base", s) for s in range(bml.WEIGHT_SETS)])
        rows.append({"case": f"multi {T}/{n_ad}", "variant": "base F.linear", "us": base, "ratio": 1.0})
        trials = [("PDL", None, True), ("no PDL", None, False)] * 2
        trials += [(f"SPLIT_K {k}, PDL", {"SPLIT_K": k}, True) for k in (2, 4, 8, 16)]
        # fused GEMM tiles, alternated with the default
        trials += [("BLOCK_K 128 stages 6, PDL", {"BLOCK_K": 128, "num_stages": 6}, True), ("PDL", None, True)] * 2
        for label, override, pdl in trials:
            set_pdl(pdl)
            kml.set_config_override(override)
            us = bench_graph_us([prob.provider("ours", s) for s in range(bml.WEIGHT_SETS)])
            rows.append({"case": f"multi {T}/{n_ad}", "variant": label, "us": us, "ratio": us / base})
        kml.set_config_override(None)
        set_pdl(True)
        prob.meta = make_batch_metadata(torch.full((T,), -1, device=DEV, dtype=torch.int32), n_ad)
        us = bench_graph_us([prob.provider("ours", s) for s in range(bml.WEIGHT_SETS)])
        rows.append({"case": f"multi {T}/{n_ad}", "variant": "all ids -1 (shrink exits, GEMM)", "us": us,
                     "ratio": us / base})
        print(rows[-1], flush=True)
    return rows


def tile_timings(sets, dt, K, cls):
    """Tiles of the "split" forward (PDL on) for the "m64" class (17 to 64 rows) or the "m16" class (1 to 16 rows,
    with a bias on both sides, as bench_lora_linear times it)."""
    from lora_fast.kernels import config as kconfig
    rows = []
    G = kconfig.GemmConfig
    if cls == "m64":
        ms, bias = (32, 64), None
        cfgs = [None, G(64, 32, 128, group_m=1, num_warps=4, num_stages=4), G(64, 32, 256, group_m=1, num_warps=4,
                                                                              num_stages=3),
                G(32, 32, 256, group_m=1, num_warps=4, num_stages=4), G(64, 64, 128, group_m=1, num_warps=4,
                                                                        num_stages=4),
                G(16, 32, 256, group_m=1, num_warps=4, num_stages=4)]
    else:
        ms, bias = (1, 16), torch.randn(sets[0][0].shape[0], device=DEV, dtype=dt)
        cfgs = [None] + [G(16, bn, bk, group_m=1, num_warps=w, num_stages=st) for bn, bk, w, st in (
            (32, 128, 4, 6), (32, 256, 4, 5))]
    set_pdl(True)
    for M in ms:
        x = torch.randn(M, K, device=DEV, dtype=dt)
        base = bench_graph_us([lambda W=W: F.linear(x, W, bias) for W, _, _ in sets])
        rows.append({"case": f"lora fwd M={M}" + (" bias" if bias is not None else ""), "variant": "base F.linear",
                     "us": base, "ratio": 1.0})
        for cfg in cfgs:
            kconfig.set_override("fwd", cls, cfg)
            label = "split, default tile" if cfg is None else \
                f"split {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
            case = f"lora fwd M={M}" + (" bias" if bias is not None else "")
            try:
                y = lora_forward(x, sets[0][0], bias, sets[0][1], sets[0][2], 2.0, xa_mode="split")[0]
                err = rel_err(y, fwd_reference(x, sets[0][0], bias, sets[0][1], sets[0][2], 2.0))
                us = bench_graph_us([lambda W=W, A=A, B=B: lora_forward(x, W, bias, A, B, 2.0, xa_mode="split")
                                     for W, A, B in sets])
                rows.append({"case": case, "variant": label, "us": us, "ratio": us / base, "rel_err": err})
            except Exception as e:  # noqa: BLE001 - a tile that does not fit is reported
                rows.append({"case": case, "variant": label, "error": repr(e)[:150]})
            print(rows[-1], flush=True)
        kconfig.set_override("fwd", cls, None)
    return rows


def timings(parts=("lora", "train", "multi")):
    rows = []
    torch.manual_seed(0)
    dt, K, N, r = torch.bfloat16, 4096, 4096, 16
    sets = [(torch.randn(N, K, device=DEV, dtype=dt) / K ** 0.5, torch.randn(r, K, device=DEV, dtype=dt) / K ** 0.5,
             torch.randn(N, r, device=DEV, dtype=dt) * 0.1) for _ in range(8)]
    default_splits = lora_fwd.XA_SPLITS

    def fwd_us(x, mode, pdl, p=0.0, splits=default_splits):
        set_pdl(pdl)
        lora_fwd.XA_SPLITS = splits
        us = bench_graph_us([lambda W=W, A=A, B=B: lora_forward(x, W, None, A, B, 2.0, p, 3, store_xa=p > 0,
                                                                xa_mode=mode) for W, A, B in sets])
        lora_fwd.XA_SPLITS = default_splits
        return us

    for M in (1, 16, 32, 64, 128) if "lora" in parts else ():
        x = torch.randn(M, K, device=DEV, dtype=dt)
        base = bench_graph_us([lambda W=W: F.linear(x, W) for W, _, _ in sets])
        rows.append({"case": f"lora fwd M={M}", "variant": "base F.linear", "us": base, "ratio": 1.0})
        variants = [("fused", "fused", False, 0.0, default_splits), ("split, no PDL", "split", False, 0.0, 8)]
        variants += [(f"split {k}, PDL", "split", True, 0.0, k) for k in (2, 4, 8, 16)]
        if M <= 16:
            variants += [("dropout 0.1 split, PDL", "split", True, 0.1, default_splits),
                         ("dropout 0.1 shrink, PDL", "shrink", True, 0.1, default_splits)]
        for label, mode, pdl, p, k in variants:
            us = fwd_us(x, mode, pdl, p, k)
            rows.append({"case": f"lora fwd M={M}", "variant": label, "us": us, "ratio": us / base})
        print(rows[-1], flush=True)
    set_pdl(True)
    if "train" in parts:
        rows += train_timings(sets, dt, K, N)
    if "multi" in parts:
        rows += multi_timings(dt, K, N)
    for cls in ("m16", "m64"):
        if cls in parts:
            rows += tile_timings(sets, dt, K, cls)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/exp")
    ap.add_argument("--no-timings", action="store_true")
    ap.add_argument("--no-checks", action="store_true", help="timings only (a tile sweep)")
    ap.add_argument("--timings", default="lora,train,multi", help="comma-separated: lora, train, multi, m16, m64")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "triton_has_pdl": helpers.TRITON_HAS_PDL, "pdl_enabled": helpers.pdl_enabled(torch.device(DEV))}
    print(info, flush=True)
    steps = () if args.no_checks else (check_forward, check_split_dropout, check_training, check_multi,
                                       check_graph_replays)
    for step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - reported as a failed check, the other steps still run
            import traceback
            traceback.print_exc()
            check(step.__name__, False, error=repr(e)[:300])
    rows = [] if args.no_timings else timings(tuple(args.timings.split(",")))
    with open(os.path.join(args.out, "exp_pdl.json"), "w") as f:
        json.dump({**info, "checks": CHECKS, "rows": rows}, f, indent=1)
    print(format_table(rows, ["case", "variant", "us", "ratio"]))
    failed = [c["check"] for c in CHECKS if not c["passed"]]
    print(f"checks: {len(CHECKS) - len(failed)}/{len(CHECKS)} passed" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
