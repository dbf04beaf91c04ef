"""Experiment 7C: LoRA, LoRA+, VeRA, DoRA and PiSSA on one small fine-tuning task.

A frozen "pretrained" MLP (3 linears, GELU) is fine-tuned towards a teacher whose weights differ from it the way
fine-tuned weights often do: a low-rank change of direction plus a per-output change of scale,
    W*_l = diag(c_l) (W_l + U_l V_l^T),   U_l V_l^T of rank 4,   c_l = 1 + 0.15 * N(0, 1) per row.
Every variant adapts all three linears from the same base, sees the same fresh batches (x ~ N(0, I), y = teacher
output, MSE), and trains with Adam at its best learning rate from a small grid (the rate matters more than the
variant; each is reported at its best so that no variant loses to a bad rate):

- lora: rank 8, alpha 16, default init (A kaiming, B = 0);
- lora+: the same with B's learning rate 16x A's (`lora_fast.optim.loraplus_param_groups`);
- pissa: rank 8 with A, B from the top-8 singular directions of W (`init="pissa"`, W <- residual);
- dora: rank 8 plus a trained magnitude per output (`apply_dora`);
- vera: rank 128 frozen shared random projections, trained lambda_d [128] and lambda_b [out] (`apply_vera`):
  20-60x fewer trainable parameters than rank-8 LoRA here.

Reported per variant: trainable parameters, chosen learning rate, steps until the held-out loss falls below
50 % and 10 % of the base model's, and the final held-out loss relative to the base's.

    python examples/exp_variants.py --size small                       # CPU, well under a minute
    python examples/exp_variants.py --size large --device cuda

Writes <out>/exp_variants.json, exp_variants.md (the table) and exp_variants.png (loss curves; needs matplotlib).
"""
from __future__ import annotations

import copy
import time

from exp_common import parse_args, pyplot, sync, write_results

import torch  # noqa: E402  (exp_common puts the checkout on sys.path)
from torch import nn  # noqa: E402

import lora_fast  # noqa: E402

SIZES = {"small": dict(d_in=32, hidden=64, d_out=16, batch=128, steps=150, eval_every=10, vera_rank=128),
         "large": dict(d_in=1024, hidden=4096, d_out=1024, batch=2048, steps=600, eval_every=20, vera_rank=1024)}
TARGET_RANK = 4
RANK, ALPHA = 8, 16
TARGETS = ["0", "2", "4"]
LR_GRID = {"lora": (3e-3, 1e-2, 3e-2), "lora+": (1e-3, 3e-3, 1e-2), "pissa": (1e-3, 3e-3, 1e-2),
           "dora": (3e-3, 1e-2, 3e-2), "vera": (1e-2, 3e-2, 1e-1)}
# The large size's rates, a decade lower for the rank-8 variants: at the small size's rates every one of them,
# ours and PEFT's alike (bench/probe_dora_train.py: the same trajectories from the same start), blew up within 600
# Adam steps on the 4096-wide layers (DoRA at 3e-3 ended at 1.4x the base's loss after 0.05 at step 200).
LR_GRID_LARGE = {"lora": (3e-4, 1e-3, 3e-3), "lora+": (1e-4, 3e-4, 1e-3), "pissa": (1e-4, 3e-4, 1e-3),
                 "dora": (3e-4, 1e-3, 3e-3), "vera": (3e-3, 1e-2, 3e-2)}


def mlp(cfg, device, dtype) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cfg["d_in"], cfg["hidden"]), nn.GELU(), nn.Linear(cfg["hidden"], cfg["hidden"]),
                         nn.GELU(), nn.Linear(cfg["hidden"], cfg["d_out"])).to(device, dtype)


@torch.no_grad()
def make_teacher(base: nn.Sequential, gen: torch.Generator) -> nn.Sequential:
    """diag(c) (W + U V^T) per linear: a rank-4 change of direction and a per-row change of scale."""
    teacher = copy.deepcopy(base)
    for i in map(int, TARGETS):
        w = teacher[i].weight
        n, k = w.shape
        u = torch.randn(n, TARGET_RANK, generator=gen)
        v = torch.randn(k, TARGET_RANK, generator=gen)
        delta = (u @ v.t()).to(w)
        w += delta * (0.5 * w.norm() / delta.norm())
        w *= (1 + 0.15 * torch.randn(n, 1, generator=gen)).to(w)
    return teacher


def adapt(base: nn.Sequential, variant: str, cfg) -> nn.Sequential:
    model = copy.deepcopy(base)
    if variant in ("lora", "lora+"):
        return lora_fast.apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA)
    if variant == "pissa":
        return lora_fast.apply_lora(model, TARGETS, rank=RANK, alpha=ALPHA, init="pissa")
    if variant == "dora":
        return lora_fast.apply_dora(model, TARGETS, rank=RANK, alpha=ALPHA)
    if variant == "vera":
        return lora_fast.apply_vera(model, TARGETS, rank=cfg["vera_rank"], seed=0)
    raise ValueError(variant)


def optimizer(model, variant: str, lr: float):
    if variant == "lora+":
        from lora_fast.optim import loraplus_param_groups

        return torch.optim.Adam(loraplus_param_groups(model, lr=lr, ratio=16))
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def train(model, variant, lr, teacher, cfg, args, x_eval, y_eval, base_loss):
    """Normalised held-out loss (over the base model's) every eval_every steps, same batches for every run."""
    # drawn where they are used: on a GPU, 600 CPU draws of a [2048, 1024] batch and their copies cost more than
    # the steps themselves
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    opt = optimizer(model, variant, lr)
    curve = []
    for step in range(cfg["steps"] + 1):
        if step % cfg["eval_every"] == 0:
            with torch.no_grad():
                curve.append((step, (torch.mean((model(x_eval).float() - y_eval) ** 2) / base_loss).item()))
        if step == cfg["steps"]:
            break
        x = torch.randn(cfg["batch"], cfg["d_in"], generator=gen, device=args.device).to(args.dtype)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.mean((model(x).float() - y.float()) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return curve


def steps_to(curve, level):
    return next((s for s, v in curve if v <= level), None)


def main(argv=None):
    args = parse_args(__doc__.split("\n")[0], argv)
    cfg = dict(SIZES[args.size])
    if args.steps:
        cfg["steps"] = args.steps
    started = time.time()
    if args.size == "large" and str(args.device).startswith("cuda") and args.dtype == torch.float32:
        # fp32 matmuls as TF32, for nn.Linear and lora-fast's kernels alike (kernels.helpers.dot_precision
        # follows this switch): the fp32 GEMMs of the large size are otherwise ~100 ms a step
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    base = mlp(cfg, args.device, args.dtype).requires_grad_(False)
    teacher = make_teacher(base, gen)
    x_eval = torch.randn(512, cfg["d_in"], generator=gen).to(args.device, args.dtype)
    with torch.no_grad():
        y_eval = teacher(x_eval).float()
        base_loss = torch.mean((base(x_eval).float() - y_eval) ** 2)
    results = {}
    for variant, grid in (LR_GRID_LARGE if args.size == "large" else LR_GRID).items():
        runs = {}
        for lr in grid:
            model = adapt(base, variant, cfg)
            runs[lr] = train(model, variant, lr, teacher, cfg, args, x_eval, y_eval, base_loss)
        sync(args.device)
        best = min(runs, key=lambda lr: runs[lr][-1][1])
        results[variant] = {"lr": best, "curve": runs[best], "trainable": lora_fast.count_parameters(model).trainable,
                            "final_by_lr": {str(lr): c[-1][1] for lr, c in runs.items()}}
        print(f"[{time.time() - started:.1f}s] {variant}: best lr {best:g}, final {runs[best][-1][1]:.4f}", flush=True)
    header = ["variant", "trainable params", "lr", "steps to 50%", "steps to 10%", "final loss / base"]
    rows = [[v, r["trainable"], r["lr"], steps_to(r["curve"], 0.5) or "-", steps_to(r["curve"], 0.1) or "-",
             r["curve"][-1][1]] for v, r in results.items()]
    table = write_results(args, "exp_variants", header, rows, {"config": cfg, "tf32": torch.backends.cuda.matmul.allow_tf32, "results": results}, started)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for v, r in results.items():
            steps, vals = zip(*r["curve"])
            ax.plot(steps, vals, label=f"{v} (lr {r['lr']:g}, {r['trainable']:,} params)")
        ax.set(yscale="log", xlabel="step", ylabel="held-out MSE / base model's",
               title=f"LoRA variants, {args.size} ({args.device})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{args.out}/exp_variants.png", dpi=120)
    print(table)
    return results


if __name__ == "__main__":
    main()
