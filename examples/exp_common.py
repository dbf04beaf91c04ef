"""Shared plumbing of the experiment scripts (exp_init.py, exp_rank.py): arguments, results files, plots."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import math  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(doc: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["small", "large"], default="small",
                   help="small: CPU, under a minute; large: GPU sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: by --size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out", help="folder for the .json, .md and .png results")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    args.dtype = DTYPES[args.dtype]
    os.makedirs(args.out, exist_ok=True)
    return args


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(args, name: str, header: list[str], rows: list[list], payload: dict, started: float) -> str:
    """Write <out>/<name>.json and <name>.md; return the markdown table (also printed)."""
    table = markdown_table(header, rows)
    meta = {"size": args.size, "device": str(args.device), "dtype": str(args.dtype).replace("torch.", ""),
            "seed": args.seed, "seconds": round(time.time() - started, 2),
            "gpu": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else None}
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({**meta, **payload, "table": {"header": header, "rows": rows}}, f, indent=1)
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(f"{name} ({args.size}, {meta['device']}, {meta['dtype']}, {meta['seconds']} s)\n\n{table}\n")
    return table


def pyplot():
    """matplotlib.pyplot with a file backend, or None when matplotlib is missing (the plot is then skipped)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return None
    return plt


def save_plot(fig, ax, args, name: str) -> None:
    """Legend, layout, and <out>/<name>.png."""
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=120)


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def setup(args, sizes: dict) -> tuple[dict, int, nn.Linear]:
    """The size preset, the step count, and a frozen base nn.Linear(K, N) without bias, seeded."""
    cfg = sizes[args.size]
    torch.manual_seed(args.seed)
    base = nn.Linear(cfg["K"], cfg["N"], bias=False, device=args.device, dtype=args.dtype).requires_grad_(False)
    return cfg, args.steps or cfg["steps"], base


def train(layer, target_weight: torch.Tensor, steps: int, batch: int, lr: float, seed: int):
    """Adam on the layer's lora_A / lora_B towards y = x @ target_weight^T, on fresh x ~ N(0, I) batches drawn
    from `seed` (the same batches for every layer). Loss: MSE relative to the target's mean square.
    Returns (losses, gradient norms ||(dA, dB)||), one per step."""
    dev, dt = layer.weight.device, layer.weight.dtype
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr)
    gen = torch.Generator(dev).manual_seed(seed)
    losses, grad_norms = [], []
    layer.train()
    for _ in range(steps):
        x = torch.randn(batch, layer.in_features, device=dev, dtype=dt, generator=gen)
        y_t = x.float() @ target_weight.float().T
        loss = (layer(x).float() - y_t).square().mean() / y_t.square().mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        grad_norms.append(math.hypot(layer.lora_A.grad.float().norm().item(), layer.lora_B.grad.float().norm().item()))
        losses.append(loss.item())
        opt.step()
    sync(dev)
    return losses, grad_norms
