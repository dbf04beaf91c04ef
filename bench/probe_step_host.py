"""Where the host time of one eager training step goes on the device (8192 x 4096 x 4096, bf16, r = 16).

`profile_variants.py` showed the LoRA layer's fwd+bwd host-bound on the H200's host (host 1057 µs per step against
779 µs of kernels; the frozen base 172 µs of host). This splits that host time:
  * the step (autograd.grad of x and the trainable parameters), the forward alone with and without grad;
  * each launcher alone, called with the arguments the step passed it (recorded on a first step);
  * the autograd engine's own cost: a custom Function that launches nothing, on CUDA and on CPU tensors (the engine
    runs a CUDA backward on its device thread, a CPU one on the caller's);
  * cProfile of a few steps, by own time and by cumulative time.
Prints one line per measure; --out writes the JSON.

    PYTHONPATH=$PWD python3 bench/probe_step_host.py [--out DIR] [--which lora,dora,vera]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import cprofile_text, host_and_wall_us  # noqa: E402
from bench.gpu_variants import fwd_bwd, make_inputs, ours_dora, ours_vera, trainable  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import kernels as K_  # noqa: E402

LAUNCHERS = ("lora_forward", "lora_backward_dx", "lora_grad_ab", "lora_shrink", "dora_norm", "scale_columns",
             "magnitude_grad", "scale_rows", "row_dots")


class _NoLaunch(torch.autograd.Function):
    """Launches nothing: y is a fresh uninitialised tensor, dx the incoming gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return dy


def record_args(step):
    """Runs `step` once with every launcher wrapped: {name: [(args, kwargs), ...]} of the calls it made."""
    calls, saved = {}, {}
    for name in LAUNCHERS:
        fn = getattr(K_, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrap(*a, _fn=fn, _name=name, **k):
            calls.setdefault(_name, []).append((a, k))
            return _fn(*a, **k)
        setattr(K_, name, wrap)
    try:
        step()
        torch.cuda.synchronize()
    finally:
        for name, fn in saved.items():
            setattr(K_, name, fn)
    return calls


def timed_bodies(step, calls):
    """Host µs per step spent inside the autograd Functions' forward and backward bodies (the backward runs on the
    engine's device thread, which cProfile does not see): {Function name: (forward µs, backward µs)}."""
    import time

    from lora_fast.dora import DoRALinearFunction
    from lora_fast.functional import LoRALinearFunction
    from lora_fast.vera import VeRALinearFunction

    totals, saved = {}, []
    for cls in (LoRALinearFunction, DoRALinearFunction, VeRALinearFunction):
        for kind in ("forward", "backward"):
            fn = cls.__dict__[kind].__func__

            def wrap(*a, _fn=fn, _key=(cls.__name__, kind)):
                t0 = time.perf_counter()
                out = _fn(*a)
                totals[_key] = totals.get(_key, 0.0) + time.perf_counter() - t0
                return out
            saved.append((cls, kind, cls.__dict__[kind]))
            setattr(cls, kind, staticmethod(wrap))
    try:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        totals.clear()
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    finally:
        for cls, kind, orig in saved:
            setattr(cls, kind, orig)
    return {f"{c}.{k}": v / calls * 1e6 for (c, k), v in totals.items()}


def launch_pieces(step, calls):
    """Host µs of the pieces of one launch: each `Launch` call of a step replayed with its recorded values
    (tensor descriptors already built), and the helpers a launcher calls around it."""
    from lora_fast.kernels import helpers, launch as L

    recorded, orig = [], L.Launch.__call__

    def rec(self, *values):
        recorded.append((self, values))
        return orig(self, *values)
    L.Launch.__call__ = rec
    try:
        step()
        torch.cuda.synchronize()
    finally:
        L.Launch.__call__ = orig
    out = {}
    for i, (launch, values) in enumerate(recorded):
        n_desc = sum(type(v).__name__ == "TensorDescriptor" for v in values)
        out[f"Launch #{i} {launch.fn.__name__} ({len(launch.args)} args, {n_desc} descriptors)"] = \
            host_and_wall_us(lambda launch=launch, values=values: launch(*values), calls)[0]
    x = torch.empty(8192, 4096, device="cuda", dtype=torch.bfloat16)
    out["tensor_descriptor(x [8192, 4096], [128, 64])"] = host_and_wall_us(
        lambda: helpers.tensor_descriptor(x, (128, 64)), calls)[0]
    out["torch.zeros(64, int32)"] = host_and_wall_us(
        lambda: torch.zeros(64, device="cuda", dtype=torch.int32), calls)[0]
    out["torch.empty(8192, 4096)"] = host_and_wall_us(
        lambda: torch.empty((8192, 4096), device="cuda", dtype=torch.bfloat16), calls)[0]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--which", default="lora,dora,vera")
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args(argv)
    rows = []

    def put(name, host, wall=None, **extra):
        rows.append(dict(case=name, host_us=host, wall_us=wall, **extra))
        print(f"{name:58s} host {host:8.1f} us" + (f"   wall {wall:8.1f} us" if wall is not None else ""), flush=True)

    x, lin, dy = make_inputs(8192, 4096, 4096, seed=7)
    xg = x.clone().requires_grad_()
    for dev in ("cuda", "cpu"):
        t = torch.randn(64, 64, device=dev, requires_grad=True)
        gt = torch.randn(64, 64, device=dev)
        put(f"engine: no-launch Function fwd+bwd ({dev})",
            *host_and_wall_us(lambda: torch.autograd.grad(_NoLaunch.apply(t), [t], gt), 200))
    put("base F.linear fwd+bwd", *host_and_wall_us(lambda: torch.autograd.grad(F.linear(xg, lin.weight), [xg], dy),
                                                   args.calls))
    mods = {}
    if "lora" in args.which:
        lora = lora_fast.LoRALinear.from_linear(lin, rank=16, alpha=32)
        with torch.no_grad():
            lora.lora_B.normal_(0, 0.02)
        mods["lora"] = lora
    if "dora" in args.which:
        mods["dora"] = ours_dora(lin)
    if "vera" in args.which:
        mods["vera"] = ours_vera(lin)
    for name, mod in mods.items():
        params = trainable(mod)
        step = fwd_bwd(mod, xg, dy, params)
        put(f"{name}: fwd+bwd step", *host_and_wall_us(step, args.calls))

        def fwd_grad(mod=mod):
            mod(xg)
        put(f"{name}: forward with grad (graph dropped)", *host_and_wall_us(fwd_grad, args.calls))

        def fwd_nograd(mod=mod):
            with torch.no_grad():
                mod(xg)
        put(f"{name}: forward under no_grad", *host_and_wall_us(fwd_nograd, args.calls))
        for lname, cl in record_args(step).items():
            for i, (a, k) in enumerate(cl):
                fn = getattr(K_, lname)
                put(f"{name}: launcher {lname} #{i}", *host_and_wall_us(lambda fn=fn, a=a, k=k: fn(*a, **k),
                                                                       args.calls))
        for key, us in timed_bodies(step, args.calls).items():
            put(f"{name}: inside {key}", us)
        torch.autograd.set_multithreading_enabled(False)
        try:
            put(f"{name}: fwd+bwd step, backward on the calling thread", *host_and_wall_us(step, args.calls))
        finally:
            torch.autograd.set_multithreading_enabled(True)
        if name == "lora":
            for key, us in launch_pieces(step, args.calls).items():
                put(f"{name}: {key}", us)
        for sort in ("tottime",):
            text = cprofile_text(step, 10, sort, lines=22, keep=5000)
            rows.append(dict(case=f"{name}: cProfile of 10 steps by {sort}", profile=text))
            print(f"== {name}: cProfile of 10 steps by {sort}\n{text}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "probe_step_host.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("summary: " + "; ".join(f"{r['case']} {r['host_us']:.0f}" for r in rows if r.get("host_us") is not None
                                 and "launcher" not in r["case"]))


if __name__ == "__main__":
    main()
