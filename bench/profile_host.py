"""Host (CPU) time per eager call of the fused LoRA linear, and where it goes (cProfile).

Small M makes the GPU work negligible, so wall time per call is the Python + launch cost that bounds an eager
training step when layers are small (bench/NOTES.md, "host overhead"). Prints, per case, microseconds per call
(no sync inside the loop) and the top functions by own time; a bare Triton launch of a trivial kernel with as many
arguments as the forward kernel gives the floor that Triton's launcher alone costs.

    PYTHONPATH=$PWD python3 bench/profile_host.py [--out DIR] [--calls 300]
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import cprofile_text, host_and_wall_us  # noqa: E402
from lora_fast import LoRALinear  # noqa: E402


@triton.jit
def _noop_kernel(p0, p1, p2, p3, p4, p5, p6, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13, i14, i15,
                 i16, i17, i18, f0, f1, f2, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr):
    if C0 == 12345:
        tl.store(p0, tl.load(p1))


def host_us(fn, calls: int) -> float:
    """Host µs per call of `fn` (10 warm-up calls, no sync inside the timed loop)."""
    return host_and_wall_us(fn, calls)[0]


def bare_launch_us(calls: int) -> float:
    t = torch.empty(16, device="cuda")
    ints = list(range(1, 20))
    return host_us(lambda: _noop_kernel[(1,)](t, t, t, t, t, t, t, *ints, 1.0, 2.0, 3.0, C0=1, C1=2, C2=3), calls)


def launch_breakdown(calls: int) -> list:
    """Where one launch of the forward kernel (M=16, fused) spends host time: the whole launcher (a cached plan),
    Triton's full `kernel[grid](...)` path with the same arguments, its binder alone, the direct launch of the
    compiled kernel (what the plan pays, kernels/launch.py), and the torch ops around it."""
    from triton.runtime import driver

    from lora_fast.kernels import lora_fwd as F_

    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(1024, 16, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        F_.lora_forward(x, W, None, A, B, 2.0)
    launch = next(p for p in reversed(F_._PLANS.values()) if p.launch is not None).launch
    args = list(launch.args)
    for i, v in zip(launch.slots, (x, W, A, B, x, x, x, 2.0, 0, x)):
        args[i] = v
    dev = driver.active.get_current_device()
    binder = launch.fn.device_caches[dev][4]
    names = launch.fn.arg_names
    shapes = [x, W, A, B, x]

    def key():
        return tuple((t.shape, t.stride(), t.dtype, t.data_ptr() % 16) for t in shapes)

    cases = {"launcher lora_forward (M=16, fused, cached plan)": lambda: F_.lora_forward(x, W, None, A, B, 2.0),
             "kernel[grid](*args) (Triton's full path)": lambda: launch.fn[launch.grid](*args, **launch.options),
             "binder alone": lambda: binder(**dict(zip(names, args)), **launch.options),
             "Launch direct (compiled.run)": lambda: launch(x, W, A, B, x, x, x, 2.0, 0, x),
             "get_current_stream": lambda: driver.active.get_current_stream(dev),
             "torch.empty 16x1024": lambda: torch.empty((16, 1024), device=x.device, dtype=x.dtype),
             "plan key over 5 tensors": key,
             "x.stride(0)": lambda: x.stride(0)}
    return [dict(case="breakdown: " + n, us_per_call=host_us(fn, calls)) for n, fn in cases.items()]


def case(name, fn, calls):
    return dict(case=name, us_per_call=host_us(fn, calls), profile=cprofile_text(fn, calls))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("bench", "out"))
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args(argv)
    rows = [dict(case="bare triton launch, 32 args", us_per_call=bare_launch_us(args.calls))]
    try:
        rows += launch_breakdown(args.calls)
    except Exception as e:  # diagnostics only: never lose the rest of the run
        rows.append(dict(case=f"breakdown failed: {e!r}"[:200], us_per_call=float("nan")))
    for p in (0.0, 0.1):
        layer = LoRALinear(1024, 1024, rank=16, alpha=32, dropout=p, device="cuda", dtype=torch.bfloat16)
        layer.train()
        x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
        lin = torch.nn.Linear(1024, 1024, device="cuda", dtype=torch.bfloat16)
        rows.append(case("nn.Linear fwd+bwd M=16", lambda: lin(x).backward(g), args.calls))
        rows.append(case(f"LoRALinear fwd p={p} M=16", lambda: layer(x), args.calls))
        rows.append(case(f"LoRALinear fwd+bwd p={p} M=16", lambda: layer(x).backward(g), args.calls))
    # host µs per launcher call (no autograd, no sync): where an eager fwd+bwd's host time goes
    from lora_fast import kernels as K_

    for M in (16, 4096):
        x2 = torch.randn(M, 2048, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(5632, 2048, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
        B = torch.randn(5632, 16, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(M, 5632, device="cuda", dtype=torch.bfloat16)
        xa = torch.randn(M, 16, device="cuda", dtype=torch.bfloat16)
        launchers = {"lora_forward": lambda: K_.lora_forward(x2, W, None, A, B, 2.0, store_xa=True),
                     "lora_shrink": lambda: K_.lora_shrink(x2, A),
                     "lora_backward_dx": lambda: K_.lora_backward_dx(dy, W, A, B, 2.0),
                     "lora_grad_ab": lambda: K_.lora_grad_ab(x2, dy, xa, xa, 2.0, A.dtype, B.dtype)}
        for name, fn in launchers.items():
            rows.append(dict(case=f"launcher {name} M={M}", us_per_call=case(name, fn, args.calls)["us_per_call"]))
    # a 1B Llama MLP-sized layer at a training batch (2 x 2048 tokens): the TMA / split paths of large M
    layer = LoRALinear(2048, 5632, rank=16, alpha=32, dropout=0.0, device="cuda", dtype=torch.bfloat16).train()
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4096, 5632, device="cuda", dtype=torch.bfloat16)
    rows.append(case("LoRALinear fwd+bwd p=0 M=4096 K=2048 N=5632", lambda: layer(x).backward(g), 50))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_host.json"), "w") as f:
        json.dump(rows, f, indent=1)
    for r in rows:
        if "profile" in r:
            print(f"==== {r['case']}\n{r['profile']}")
    for r in rows:
        print(f"{r['case']:40s} {r['us_per_call']:8.1f} us/call")


if __name__ == "__main__":
    main()
