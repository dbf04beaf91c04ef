"""A compiled training step against the eager one (issue: "a compiled training step is at least as fast as eager"),
after the compiled backward became one `lora_fast::lora_backward` op per layer.

The MLP block of bench/gpu_compile.py (down(silu(gate(x)) * up(x)) + x, three LoRALinear, d = h = 4096, r = 16,
bf16) at M = 4096 and 8192 tokens, without dropout and with p = 0.1 at 8192, and four blocks stacked at M = 4096:
per case the frozen base's eager step, ours eagerly and ours under torch.compile(fullgraph=True, dynamic=False),
timed by interleaved do_bench medians (ratios to the base's step) and by host time per step without a sync
(`host_and_wall_us`: whether the step is host-bound). Checks that the compiled step's output and gradients equal
eager's (p = 0).

    PYTHONPATH=$PWD python3 bench/exp_compile_step.py [--out DIR]
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import host_and_wall_us, interleaved_ratios, rel_err  # noqa: E402
from bench.gpu_compile import MLPBlock, _train_step  # noqa: E402


def model(blocks, dim, p, lora, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[MLPBlock(dim, dim, 16, p, lora=lora) for _ in range(blocks)])


def grads(fn, net, x, g):
    x.grad = None
    for q in net.parameters():
        q.grad = None
    y = fn(x)
    y.backward(g)
    return [y.detach(), x.grad.clone()] + [q.grad.clone() for q in net.parameters() if q.requires_grad]


def run_case(name, M, blocks, p, dim=4096):
    t0 = time.perf_counter()
    x = torch.randn(M, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(M, dim, device="cuda", dtype=torch.bfloat16)
    base, lora = model(blocks, dim, 0.0, False), model(blocks, dim, p, True)
    compiled = torch.compile(lora, fullgraph=True, dynamic=False)
    row = {"case": name, "M": M, "blocks": blocks, "p": p}
    if p == 0.0:
        eager_g, comp_g = grads(lora, lora, x, g), grads(compiled, lora, x, g)
        row["compiled_vs_eager_rel_err_max"] = max(rel_err(c, e) for c, e in zip(comp_g, eager_g))
        row["ok"] = row["compiled_vs_eager_rel_err_max"] < 2e-2
    else:
        grads(compiled, lora, x, g)  # compile the dropout graph
        row["ok"] = True
    steps = {"base": _train_step(base, x, g), "eager": _train_step(lora, x, g),
             "compiled": _train_step(compiled, x, g)}
    row["ratio_to_base"] = interleaved_ratios(steps, "base", rounds=5)
    row["host_wall_us"] = {k: host_and_wall_us(f, 20, warmup=3) for k, f in steps.items()}
    row["seconds"] = time.perf_counter() - t0
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rows = [run_case("MLP block M=4096", 4096, 1, 0.0), run_case("MLP block M=8192", 8192, 1, 0.0),
            run_case("MLP block M=8192 p=0.1", 8192, 1, 0.1), run_case("4 MLP blocks M=4096", 4096, 4, 0.0)]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "exp_compile_step.json"), "w") as f:
            json.dump(rows, f, indent=1)
    for r in rows:
        hw = {k: f"{h:.0f}/{w:.0f}" for k, (h, w) in r["host_wall_us"].items()}
        print(f"{r['case']:24s} ok={r['ok']} eager {r['ratio_to_base']['eager']:.3f}x compiled "
              f"{r['ratio_to_base']['compiled']:.3f}x  host/wall µs {hw}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
