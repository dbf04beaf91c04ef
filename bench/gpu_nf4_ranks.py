"""GPU check of the NF4 decode GEMV at large ranks and many K splits (the finishing kernel's chunking of the
fp32 partials and of the xa partials), with and without dropout, against the fp64 reference.

    PYTHONPATH=$PWD python3 bench/gpu_nf4_ranks.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lora_fast.kernels import nf4_gemv  # noqa: E402
from lora_fast.nf4 import quantize_nf4  # noqa: E402
from lora_fast.philox import dropout_mask_torch  # noqa: E402


def main() -> bool:
    torch.manual_seed(3)
    ok = True
    cases = ((16, 64, 4096, 4096, None), (16, 256, 1000, 2048, 18), (1, 256, 4096, 4096, None), (7, 40, 333, 1152, 18))
    for M, r, N, K, splits in cases:
        for p in (0.0, 0.1):
            W = torch.randn(N, K, device="cuda") / K ** 0.5
            q = quantize_nf4(W, report_error=False)
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            A = (torch.randn(r, K, device="cuda") / K ** 0.5).bfloat16()
            B = (torch.randn(N, r, device="cuda") * 0.1).bfloat16()
            b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
            keep = dropout_mask_torch(5, M, K, p, "cuda") if p else torch.ones(M, K, dtype=torch.bool, device="cuda")
            xd = torch.where(keep, x.double() / (1 - p), 0.0)
            xa_ref = xd @ A.double().t()
            ref = x.double() @ q.dequantize(torch.float32).double().t() + b.double() + 2.0 * xa_ref @ B.double().t()
            y, xa = nf4_gemv(x, q, b, A, B, 2.0, dropout_p=p, seed=5, store_xa=True, splits=splits)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            xerr = ((xa.double() - xa_ref).norm() / xa_ref.norm()).item()
            good = err < 2e-2 and xerr < 2e-2 and not torch.isnan(y).any().item()
            ok &= good
            verdict = "ok" if good else "FAIL"
            print(f"M={M} r={r} N={N} K={K} splits={splits} p={p}: y {err:.2e} xa {xerr:.2e} {verdict}")
    print("ALL OK" if ok else "FAILURES")
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
