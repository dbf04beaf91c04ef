"""Experiment: the tile of `nf4_dequantize` (QLoRA's large-M path writes deq(W) in bf16 twice per training step).

The dequantize reads N*K/2 bytes of codes and N*K/64 fp32 absmax and writes N*K bf16: 42 MB at 4096 x 4096, about
10 µs at the H200's copy rate, but it measured 18-19.5 µs (bench/NOTES.md). This times the fp32 decode + multiply
against the per-block scaled words (nf4_dequant.SCALED_WORDS), sweeps BLOCK_N x BLOCK_K x warps with the latter
(config override "nf4_dequant"), checks every output bit for bit against the default's (and the default's against
`NF4Tensor.dequantize`), times each by do_bench (L2 flushed), and reports the bytes floor from a measured device
copy. Prints a table; JSON to --out.

    PYTHONPATH=$PWD python bench/exp_nf4_dequant.py --out /tmp/exp
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import bench_us  # noqa: E402
from lora_fast.kernels import config as kcfg  # noqa: E402
from lora_fast.kernels import nf4_dequant  # noqa: E402
from lora_fast.kernels.launch import clear_plans  # noqa: E402
from lora_fast.kernels import nf4_dequantize  # noqa: E402
from lora_fast.nf4 import quantize_nf4  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
SWEEP = [kcfg.GemmConfig(0, bn, bk, num_warps=w, num_stages=2)
         for bn, bk, w in itertools.product((16, 32, 64), (256, 512, 1024), (4, 8))]


def copy_tbps() -> float:
    """Device copy rate in TB/s (read + write bytes over time) on a 1 GiB buffer."""
    src = torch.empty(1 << 29, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src))[0]
    return 2 * src.numel() * 2 / us / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--top", type=int, default=4, help="configs re-timed at the other shapes")
    args = ap.parse_args()
    torch.manual_seed(0)
    tbps = copy_tbps()
    out = {"device": torch.cuda.get_device_name(), "copy_tbps": tbps, "rows": [], "checks": []}
    default = kcfg.nf4_config("dequant", 4096)
    weights = {}
    for N, K in SHAPES:
        for dq in (False, True):
            w = torch.randn(N, K, device="cuda") * K ** -0.5
            weights[(N, K, dq)] = quantize_nf4(w, double_quant=dq, dtype=torch.bfloat16)
    refs = {}
    for key, w4 in weights.items():
        refs[key] = nf4_dequantize(w4, torch.bfloat16)
        ok = torch.equal(refs[key], w4.dequantize(torch.bfloat16))
        out["checks"].append({"shape": list(key), "config": "default", "vs NF4Tensor.dequantize": ok})

    def time_config(cfg, keys, scaled=True):
        nf4_dequant.SCALED_WORDS = scaled
        kcfg.set_override("nf4_dequant", "large", cfg)  # (drops the cached plans)
        try:
            res = {}
            for key in keys:
                w4 = weights[key]
                got = nf4_dequantize(w4, torch.bfloat16)
                same = torch.equal(got, refs[key])
                out["checks"].append({"shape": list(key), "config": str(cfg), "scaled_words": scaled,
                                      "bitwise equal to default": same})
                us = bench_us(lambda: nf4_dequantize(w4, torch.bfloat16))[0]
                N, K, dq = key
                nbytes = N * K // 2 + N * K // 64 * (1 if dq else 4) + N * K * 2
                res[key] = (us, nbytes / us / 1e6, same)
            return res
        finally:
            nf4_dequant.SCALED_WORDS = True
            kcfg.set_override("nf4_dequant", "large", None)

    first = [(4096, 4096, False)]
    results = {}  # (config, scaled words) -> {shape key: (us, TB/s, bitwise equal)}
    for cfg, scaled in [(default, False)] + [(c, True) for c in [default] + SWEEP]:
        try:
            results[(cfg, scaled)] = time_config(cfg, first, scaled)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
            print(f"{cfg} scaled={scaled}: {type(e).__name__}: {str(e)[:200]}")
    ranked = sorted((k for k in results if k[1]), key=lambda k: results[k][first[0]][0])
    for key in [(default, False), (default, True)] + [k for k in ranked[: args.top] if k[0] != default]:
        results[key].update(time_config(key[0], [k for k in weights if k not in first], key[1]))
    for (cfg, scaled), res in results.items():
        for key, (us, rate, same) in res.items():
            N, K, dq = key
            nbytes = N * K // 2 + N * K // 64 * (1 if dq else 4) + N * K * 2
            out["rows"].append({"config": [cfg.block_n, cfg.block_k, cfg.num_warps], "default": cfg == default,
                                "scaled_words": scaled, "shape": [N, K], "double_quant": dq, "us": us,
                                "tbps": rate, "floor_us": nbytes / tbps / 1e6, "bitwise_equal": same})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "exp_nf4_dequant.json"), "w") as f:
        json.dump(out, f, indent=1)
    fails = [c for c in out["checks"] if not all(v for k, v in c.items() if isinstance(v, bool) and k != "scaled_words")]
    print(f"copy {tbps:.2f} TB/s; checks {len(out['checks']) - len(fails)}/{len(out['checks'])} passed")
    print("| block_n x block_k, warps | decode | shape | dq | us | TB/s | floor us |\n|---|---|---|---|---|---|---|")
    for r in sorted(out["rows"], key=lambda r: (r["shape"], r["double_quant"], r["us"])):
        tag = " (default)" if r["default"] else ""
        print(f"| {r['config'][0]}x{r['config'][1]}, {r['config'][2]}{tag} | "
              f"{'scaled words' if r['scaled_words'] else 'fp32 + multiply'} | {r['shape'][0]}x{r['shape'][1]} | "
              f"{int(r['double_quant'])} | {r['us']:.1f} | {r['tbps']:.2f} | {r['floor_us']:.1f} |")
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.exit(main())
