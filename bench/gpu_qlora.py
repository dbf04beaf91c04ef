"""GPU check and timing of QLoRA (issue 7) on one H100, in about two minutes.

1. Correctness at real sizes, bf16: every NF4 path (gemv M=1 and 16, fused M=512, dequant M=8192, both decodes,
   double quantization, dropout 0.1) against dequantize-then-reference in fp32 math (same W bytes, same dropout
   mask): the output and dX, dA, dB; and, when bitsandbytes imports, that `from_bnb` dequantizes a real
   Params4bit exactly as bitsandbytes does.
2. Timings (bench/bench_qlora.py): ours vs bitsandbytes + PEFT vs dequantize-then-cuBLAS vs the bf16 base
   linear, training shapes, the fused/dequant crossover, decode (with CUDA graphs), and the 1B Llama memory.
Writes <out>/qlora_gpu.json and prints the tables last.

    PYTHONPATH=$PWD python3 bench/gpu_qlora.py --out $OUT       # bitsandbytes optional (PYTHONPATH /tmp/site)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TOL = 2e-2
DEVICE = "cuda"  # tests of this script may point it at the CPU interpreter
# (M, K, N, r, path, table, double_quant, dropout)
CHECKS = [  # (M, K, N, r, path, decode of the explicit forward / dX, double quant, dropout)
    (1, 4096, 4096, 16, "gemv", "table", False, 0.0),
    (16, 4096, 14336, 16, "gemv", "select", True, 0.0),
    (7, 4096, 4096, 16, "gemv", "prmt", False, 0.1),
    (512, 4096, 4096, 16, "fused", "table", False, 0.0),
    (300, 4096, 4160, 3, "fused", "select", True, 0.1),
    (8192, 4096, 4096, 16, "dequant", "table", False, 0.0),
    (2048, 14336, 4096, 16, "dequant", "select", True, 0.1),
]


def check_case(M, K, N, r, path, decode, dq, p) -> dict:
    """The autograd path (default decode: "prmt" on the GPU) for y and every gradient, and the explicit `decode`
    for y and (except the GEMV) dX."""
    import lora_fast
    from lora_fast.kernels import config as kcfg
    from lora_fast.kernels import dropout_mask
    from lora_fast.qlora import QLoRALinearFunction

    g = {"device": DEVICE, "dtype": torch.bfloat16}
    w4 = lora_fast.quantize_nf4(torch.randn(N, K, **g) / math.sqrt(K), double_quant=dq)
    W = w4.dequantize(torch.float32)
    x = torch.randn(M, K, **g).requires_grad_()
    A = (torch.randn(r, K, **g) / math.sqrt(K)).requires_grad_()
    B = (torch.randn(N, r, **g) / math.sqrt(r)).requires_grad_()
    bias = torch.randn(N, **g).requires_grad_()
    dy = torch.randn(M, N, **g)
    s, seed = 2.0, 4242
    old = kcfg.NF4_FUSED_ROWS
    kcfg.NF4_FUSED_ROWS = {"fused": 1 << 40, "dequant": 0}.get(path, old)
    try:
        y, _ = lora_fast.kernels.lora_nf4_forward(x.detach(), w4, bias.detach(), A.detach(), B.detach(), s, p,
                                                  seed, path="auto", decode=decode)
        y_auto = QLoRALinearFunction.apply(x, bias, A, B, w4, s, p, seed)
        y_auto.backward(dy)
        if path != "gemv":
            dx_dec, _ = lora_fast.kernels.lora_nf4_backward_dx(dy, w4, A.detach(), B.detach(), s, p, seed,
                                                               path=path, decode=decode)
    finally:
        kcfg.NF4_FUSED_ROWS = old
    xf, Af, Bf = (t.detach().float().requires_grad_() for t in (x, A, B))
    keep = dropout_mask(seed, M, K, p, DEVICE) if p > 0 else torch.ones(M, K, device=DEVICE, dtype=torch.bool)
    xd = torch.where(keep, xf / (1 - p), 0.0)
    ref = xf @ W.t() + bias.detach().float() + s * (xd @ Af.t()) @ Bf.t()
    ref.backward(dy.float())
    errs = {"rel_err_out": common.rel_err(y, ref), "rel_err_out_auto": common.rel_err(y_auto, ref),
            "rel_err_dx": common.rel_err(x.grad, xf.grad),
            "rel_err_dA": common.rel_err(A.grad, Af.grad), "rel_err_dB": common.rel_err(B.grad, Bf.grad)}
    if path != "gemv":
        errs[f"rel_err_dx_{decode}"] = common.rel_err(dx_dec, xf.grad)
    return errs


def check_bnb() -> dict:
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except Exception as e:  # noqa: BLE001
        return {"skipped": f"bitsandbytes not importable: {type(e).__name__}"}
    from lora_fast.nf4 import from_bnb

    out = {}
    w = torch.randn(4096, 4096, dtype=torch.bfloat16) / 64
    for compress in (False, True):
        p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64,
                              compress_statistics=compress).cuda()
        theirs = bnbF.dequantize_4bit(p.data, p.quant_state)
        ours = from_bnb(p).dequantize(theirs.dtype)
        out[f"compress={compress}"] = {"max_abs_diff": (ours.float() - theirs.float()).abs().max().item(),
                                       "equal": bool(torch.equal(ours, theirs))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--quick", action="store_true", help="fewer timing cases")
    ap.add_argument("--dry", action="store_true", help="parse arguments and import, then stop")
    args = ap.parse_args(argv)
    if args.dry or not torch.cuda.is_available():
        print("no CUDA (or --dry): nothing to check or time; run on the GPU machine")
        return 0
    import bench_qlora

    start = time.time()
    torch.manual_seed(0)
    checks = []
    for case in CHECKS:
        row = {"case": "M={} K={} N={} r={} path={} decode={} dq={} p={}".format(*case)}
        try:
            row.update(check_case(*case))
            row["check_passed"] = all(v < TOL for k, v in row.items() if k.startswith("rel_err"))
        except Exception as e:  # noqa: BLE001
            row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:],
                       check_passed=False)
        checks.append(row)
        torch.cuda.empty_cache()
    bnb_check = check_bnb()
    check_s = time.time() - start
    try:
        rows, extra = bench_qlora.run(quick=args.quick, memory=True)
    except Exception as e:  # noqa: BLE001
        rows, extra = [], {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    path = common.write_json("qlora_gpu", rows, {**extra, "checks": checks, "bnb_layout": bnb_check,
                                                 "check_seconds": check_s, "seconds": time.time() - start},
                             args.out)
    print(common.format_table(checks, ["case", "rel_err_out", "rel_err_dx", "rel_err_dA", "rel_err_dB",
                                       "check_passed"]))
    for r in checks:
        if "error" in r:
            print(f"ERROR {r['case']}: {r['error']}")
    print(f"bitsandbytes layout: {bnb_check}")
    bench_qlora.print_summary(rows, extra)
    print(f"results: {path} ({time.time() - start:.0f} s)")
    ok = all(r["check_passed"] for r in checks) and all(r.get("check_passed", True) and "error" not in r
                                                        for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
