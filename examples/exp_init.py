"""Experiment 7A: what LoRA's initialisation does.

A frozen base linear W learns a target W + dW* (dW* of rank 4) through a LoRA adapter, from several inits, with
the same Adam settings and the same fresh batches:

- zeros (forced): A = B = 0, which lora_fast refuses (init="zeros" raises); forced here past the check. Both
  gradients are exactly zero at every step, so the adapter never moves and the loss never drops.
- default (A kaiming-uniform, B = 0) and gaussian (A ~ N(0, 1/r^2), B = 0): the output at init is the base's
  exactly, and the loss falls from the base's loss.
- nonzero, uncompensated: A and B both random, W left as it is: the model starts off the base output (a random
  perturbation of size s*||B A||), so the loss starts above the base's.
- nonzero (init="nonzero"): the same A and B, with W <- W - s*B@A: back on the base output (up to W's rounding).
- pissa: A, B = top-r SVD part of W, W <- residual: also on the base output at init.

The compensated inits pay in capacity: the frozen W no longer holds s*B0@A0, so the adapter must keep it while it
learns dW*: a rank-r adapter then reaches only the best rank-r approximation of s*B0@A0 + dW* ("rank-r floor").
PiSSA's premise is that the fine-tuning update lies along W's principal directions; a random dW* does not.

    python examples/exp_init.py --size small                      # CPU, a few seconds
    python examples/exp_init.py --size large --device cuda --dtype bf16

Writes <out>/exp_init.json, exp_init.md (the table) and exp_init.png (loss curves; needs matplotlib).
"""
from __future__ import annotations

import copy
import time

from exp_common import parse_args, pyplot, save_plot, setup, train, write_results

import torch  # noqa: E402  (exp_common puts the checkout on sys.path)
from torch import nn  # noqa: E402

from lora_fast import LoRALinear  # noqa: E402
from lora_fast.init import init_lora  # noqa: E402

# The adapter must reach target - W_frozen: dW* (rank TARGET_RANK) from the zero-B inits, but s*B0@A0 + dW* (rank
# up to r + TARGET_RANK) from the compensated ones, whose frozen W lost s*B0@A0. Its best rank-r approximation
# leaves a floor (column "rank-r floor"); r = 2 * TARGET_RANK keeps the zero-B rows well inside capacity.
SIZES = {"small": dict(K=48, N=40, M=64, rank=8, steps=150, lr=1e-2),
         "large": dict(K=2048, N=2048, M=4096, rank=16, steps=200, lr=2e-3)}
TARGET_RANK = 4


def make_layer(base: nn.Linear, rank: int, variant: str) -> LoRALinear:
    """A LoRALinear on a private copy of `base` for one row of the experiment."""
    base = copy.deepcopy(base)
    alpha = 2 * rank
    if variant in ("default", "gaussian", "pissa"):
        return LoRALinear.from_linear(base, rank, alpha, init=variant)
    layer = LoRALinear.from_linear(base, rank, alpha)
    same_draw = torch.Generator(layer.weight.device).manual_seed(7)   # both nonzero rows get the same A, B
    if variant == "nonzero":
        layer.reset_lora_parameters("nonzero", generator=same_draw)
    with torch.no_grad():
        if variant == "zeros (forced)":        # what init="zeros" would give; lora_fast refuses it
            layer.lora_A.zero_()
            layer.lora_B.zero_()
        elif variant == "nonzero, uncompensated":  # init="nonzero"'s A and B, without W <- W - s*B@A
            res = init_lora(layer.weight, rank, "nonzero", layer.scaling, generator=same_draw)
            layer.lora_A.copy_(res.A)
            layer.lora_B.copy_(res.B)
    return layer


def run(args) -> None:
    started = time.time()
    cfg, steps, base = setup(args, SIZES)
    dev, dt = args.device, args.dtype
    K, N, M, r = cfg["K"], cfg["N"], cfg["M"], cfg["rank"]
    u, v = torch.randn(N, TARGET_RANK, device=dev), torch.randn(TARGET_RANK, K, device=dev)
    target_delta = u @ v
    target_delta *= 0.5 * base.weight.float().norm() / target_delta.norm()   # ||dW*|| = ||W|| / 2
    target_weight = (base.weight.float() + target_delta).to(dt)
    probe = torch.randn(M, K, device=dev, dtype=dt)
    variants = ["zeros (forced)", "default", "gaussian", "nonzero, uncompensated", "nonzero", "pissa"]
    rows, curves = [], {}
    for variant in variants:
        layer = make_layer(base, r, variant)
        a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        tail = torch.linalg.svdvals(target_weight.float() - layer.weight.float())[r:]   # on the device: fast
        floor = (tail.square().sum() / target_weight.float().norm().square()).item()
        with torch.no_grad():
            y_base = probe.float() @ base.weight.float().T
            off_base = ((layer.eval()(probe).float() - y_base).norm() / y_base.norm()).item()
        losses, grad_norms = train(layer, target_weight, steps, M, cfg["lr"], args.seed + 1)
        moved = max((layer.lora_A - a0).abs().max().item(), (layer.lora_B - b0).abs().max().item())
        curves[variant] = losses
        rows.append([variant, off_base, losses[0], losses[-1], floor, grad_norms[0], max(grad_norms), moved])
        print(f"{variant:>24}: off base {off_base:.2e}, loss {losses[0]:.3g} -> {losses[-1]:.3g}, "
              f"max |grad| {max(grad_norms):.3g}")
    header = ["init", "‖y₀−base‖/‖base‖", "loss at step 0", f"loss after {steps}", "rank-r floor", "‖∇‖ step 0",
              "max ‖∇‖", "max |Δ(A,B)|"]
    table = write_results(args, "exp_init", header, rows,
                          {"config": {**cfg, "steps": steps, "target_rank": TARGET_RANK}, "curves": curves},
                          started)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for variant, losses in curves.items():
            ax.plot(range(len(losses)), [max(v, 1e-12) for v in losses], label=variant)
        ax.set(yscale="log", xlabel="step", ylabel="relative MSE to target",
               title=f"LoRA init ({args.size}: K={K}, N={N}, r={r}, target rank {TARGET_RANK})")
        save_plot(fig, ax, args, "exp_init")
    print(table)


if __name__ == "__main__":
    run(parse_args(__doc__))
