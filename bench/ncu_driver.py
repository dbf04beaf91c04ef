"""A few plain calls of one path, for Nsight Compute to profile (no timing of its own).

    ncu --clock-control none -k regex:_nf4_gemv -c 4 --section SpeedOfLight ... python3 bench/ncu_driver.py nf4
    python3 bench/ncu_driver.py multi16

nf4: the NF4 decode GEMV and its finishing kernel at M = 1 and 16, K = N = 4096, r = 16, over 4 weight sets.
nf4lanes: the one-row GEMV's "lanes" engine (M = 1 only), the same weights; nf4wide: its "wide" engine
(NCU_WIDE="warps,splits[,stages[,xa_mode]]" picks the tile, e.g. 1,16 or 1,16,2,fused).
multi16: multi-LoRA decode with 16 tokens and 16 adapters (shrink and fused GEMM), K = N = 4096, r = 16.
multi64: multi-LoRA decode with 64 tokens and 64 adapters (the default path; MULTI_CFG='{"GEMM": "lora"}' overrides
its config).
multi4096: multi-LoRA prefill, 4096 tokens and 32 adapters: the default path (shrink, cuBLAS, the fused kernel's
read-modify-write epilogue), then the segment expand adding into y (32 x 256 tiles), twice each.
base: F.linear at M = 1 and 16 (cuBLAS), for the same counters on the bf16 base.
train: the memory-bound training kernels at M = 8192, K = N = 4096, r = 16: the shrink x @ A^T (dropout 0 and
0.1), and dA/dB (dropout 0 and 0.1), twice each.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import bench_multi_lora as bml  # noqa: E402
from lora_fast.kernels import lora_grad_ab, lora_shrink, nf4_gemv  # noqa: E402
from lora_fast.nf4 import quantize_nf4  # noqa: E402

DEV, DT, K, N, R = "cuda", torch.bfloat16, 4096, 4096, 16


def main(what: str) -> None:
    torch.manual_seed(0)
    if what in ("nf4", "base", "nf4lanes", "nf4wide"):
        ws = [torch.randn(N, K, device=DEV, dtype=DT) / K ** 0.5 for _ in range(4)]
        qs = [quantize_nf4(w, report_error=False) for w in ws]
        A, B = torch.randn(R, K, device=DEV, dtype=DT) / K ** 0.5, torch.randn(N, R, device=DEV, dtype=DT)
        splits, xa_mode = None, "auto"
        if what == "nf4wide" and os.environ.get("NCU_WIDE"):
            from lora_fast.kernels import config as kconfig

            fields = os.environ["NCU_WIDE"].split(",")
            warps, splits = int(fields[0]), int(fields[1])
            stages = int(fields[2]) if len(fields) > 2 else 1
            xa_mode = fields[3] if len(fields) > 3 else "auto"
            kconfig.set_override("nf4_gemv_wide", "m16", kconfig.GemmConfig(1, 32, 64, num_warps=warps,
                                                                             num_stages=stages))
        for M in (1,) if what in ("nf4lanes", "nf4wide") else (1, 16):
            x = torch.randn(M, K, device=DEV, dtype=DT)
            for w, q in zip(ws, qs):
                if what == "nf4lanes":
                    nf4_gemv(x, q, None, A, B, 2.0, engine="lanes")
                elif what == "nf4wide":
                    nf4_gemv(x, q, None, A, B, 2.0, engine="wide", splits=splits, xa_mode=xa_mode)
                elif what == "nf4":
                    nf4_gemv(x, q, None, A, B, 2.0)
                else:
                    F.linear(x, w)
    elif what == "multi16":
        prob = bml.Problem(16, 16, R, K, N, DT, DEV, sets=4)
        for s in range(4):
            prob.provider("ours", s)()
    elif what == "multi64":  # the default decode path (MULTI_CFG: a JSON dict of config overrides, e.g. GEMM)
        import json

        from lora_fast.kernels import multi_lora as kml

        kml.set_config_override(json.loads(os.environ.get("MULTI_CFG", "{}")) or None)
        prob = bml.Problem(64, 64, R, K, N, DT, DEV, sets=2)
        for s in range(2):
            prob.provider("ours", s)()
    elif what == "multi4096":
        from lora_fast.kernels import multi_lora as kml

        prob = bml.Problem(4096, 32, R, K, N, DT, DEV, sets=2)
        m = prob.meta
        for s in range(2):
            prob.provider("ours", s)()
        cfg = dict(kml.get_config(4096, K, N, R, DT, prob.x.device), E_BLOCK_M=32, E_BLOCK_N=256)
        ws = torch.zeros((cfg["SPLIT_K"], 1, 4096, R), device=DEV, dtype=torch.float32)
        y = torch.randn(4096, N, device=DEV, dtype=DT)
        for s in range(2):
            kml._launch_expand(prob.sets[s][3], ws, y, m.perm, m.seg_start, m.seg_adapter, prob.ranks,
                               prob.scalings, (N,), cfg, "ieee", accumulate=True)
    elif what == "train":
        M = 8192
        x, dy = torch.randn(M, K, device=DEV, dtype=DT), torch.randn(M, N, device=DEV, dtype=DT)
        A, B = torch.randn(R, K, device=DEV, dtype=DT) / K ** 0.5, torch.randn(N, R, device=DEV, dtype=DT)
        for p in (0.0, 0.1):
            for _ in range(2):
                xa = lora_shrink(x, A, p, 1234)
                dyb = lora_shrink(dy, B.t())
                lora_grad_ab(x, dy, xa, dyb, 2.0, DT, DT, p, 1234)
    else:
        raise SystemExit(f"unknown driver {what!r}: nf4, base, multi16, multi64, multi4096 or train")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nf4")
