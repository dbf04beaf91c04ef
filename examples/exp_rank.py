"""Experiment 7B: rank against capacity, and the "intrinsic rank" of an update.

A frozen base linear W must learn W + dW*, where dW* has a known rank k (singular values 1/sqrt(i), i = 1..k,
scaled to ||dW*|| = ||W|| / 2). LoRA adapters of rank r in {1, 2, 4, 8, 16, 64} (default init, s = 1 so that
every rank sees the same learning dynamics per component) are trained on the same fresh batches with Adam.
Reported per r: ||s*B@A - dW*|| / ||dW*|| after training, next to the best any rank-r matrix can do
(Eckart-Young: sqrt(sum_{i>r} sigma_i^2) / ||sigma||). Below r = k the error follows that bound; from r = k on it
drops to the optimiser's noise floor: more rank than the update's intrinsic rank buys nothing but parameters.

    python examples/exp_rank.py --size small                      # CPU, about ten seconds
    python examples/exp_rank.py --size large --device cuda --dtype bf16

Writes <out>/exp_rank.json, exp_rank.md (the table) and exp_rank.png (error against r; needs matplotlib).
"""
from __future__ import annotations

import time

from exp_common import parse_args, pyplot, save_plot, setup, train, write_results

import torch  # noqa: E402  (exp_common puts the checkout on sys.path)
from lora_fast import LoRALinear, count_parameters  # noqa: E402

RANKS = (1, 2, 4, 8, 16, 64)
SIZES = {"small": dict(K=96, N=80, M=128, k=8, steps=200, lr=1e-2),
         "large": dict(K=2048, N=2048, M=4096, k=8, steps=300, lr=3e-3)}


def target_delta(N: int, K: int, k: int, scale: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """dW* = U diag(sigma) V^T of rank k with sigma_i ~ 1/sqrt(i); returns (dW* [N, K], sigma [k])."""
    U, _ = torch.linalg.qr(torch.randn(N, k, device=device))
    V, _ = torch.linalg.qr(torch.randn(K, k, device=device))
    sigma = torch.arange(1, k + 1, device=device, dtype=torch.float32).rsqrt()
    sigma *= scale / sigma.norm()
    return U @ torch.diag(sigma) @ V.T, sigma


def run(args) -> None:
    started = time.time()
    cfg, steps, base = setup(args, SIZES)
    dev, dt = args.device, args.dtype
    K, N, M, k = cfg["K"], cfg["N"], cfg["M"], cfg["k"]
    delta, sigma = target_delta(N, K, k, 0.5 * base.weight.float().norm().item(), dev)
    target_weight = (base.weight.float() + delta).to(dt)
    rows, errors, bounds = [], [], []
    for r in RANKS:
        layer = LoRALinear.from_linear(base, rank=r, alpha=r)     # s = 1 at every rank; shares W (frozen)
        losses, _ = train(layer, target_weight, steps, M, cfg["lr"], args.seed + 1)
        with torch.no_grad():
            err = ((layer.delta_weight().float() - delta).norm() / delta.norm()).item()
        bound = (sigma[r:].square().sum().sqrt() / sigma.norm()).item()
        errors.append(err)
        bounds.append(bound)
        adapter = count_parameters(layer).adapter
        rows.append([r, err, bound, losses[-1], adapter])
        print(f"r={r:3d}: ||sBA - dW*||/||dW*|| = {err:.3e} (rank-r optimum {bound:.3e}), {adapter:,} params")
    header = ["r", "‖sBA−ΔW*‖/‖ΔW*‖", "rank-r optimum", "final loss", "adapter params"]
    table = write_results(args, "exp_rank", header, rows,
                          {"config": {**cfg, "steps": steps, "ranks": list(RANKS)}, "sigma": sigma.tolist()},
                          started)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.plot(RANKS, [max(e, 1e-9) for e in errors], "o-", label="LoRA after training")
        ax.plot(RANKS, [max(b, 1e-9) for b in bounds], "s--", label="best rank-r (Eckart-Young)")
        ax.axvline(k, color="gray", linestyle=":", label=f"intrinsic rank k={k}")
        ax.set(xscale="log", yscale="log", xlabel="LoRA rank r", ylabel="‖sBA − ΔW*‖ / ‖ΔW*‖",
               title=f"Learning a rank-{k} update ({args.size}: K={K}, N={N}, {steps} steps)")
        ax.set_xticks(RANKS, [str(r) for r in RANKS])
        save_plot(fig, ax, args, "exp_rank")
    print(table)


if __name__ == "__main__":
    run(parse_args(__doc__))
