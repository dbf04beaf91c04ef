"""LoRA fine-tuning of a Llama-style model with PEFT, then the same run with `lora_fast.peft.patch`.

The base model is built from a transformers LlamaConfig with seeded random weights (nothing is downloaded); the
data is generated (`examples/llama_tasks.py`: one synthetic language per task, with a learnable successor rule).
For each of `--tasks` tasks a PEFT adapter `task<k>` (r, alpha, dropout, all seven Llama projections) is trained
on its task. For the first `--compare-tasks` tasks the adapter is trained twice from the same initial weights, on
the same batches: with PEFT's own forward, and after `lora_fast.peft.patch(model)`. It prints step time, tokens/s
and peak memory of both and the two loss curves, which track each other (with dropout 0 they agree to rounding;
with dropout the random masks differ). The adapters (from the patched run) are saved in PEFT's format under
`--out`, one directory per task, with `base_model.json` telling `examples/serve_peft_adapters.py` how to rebuild
the base model.

    python examples/finetune_llama.py                                  # CPU, tiny, seconds
    python examples/finetune_llama.py --size 1b --device cuda --steps 60 --batch 2 --seq 1024 --dropout 0.1
    python examples/serve_peft_adapters.py --adapters examples/out/adapters
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from llama_tasks import (DTYPES, LLAMA_TARGETS, TaskLanguage, build_base, causal_lm_loss, count_params,  # noqa: E402
                         llama_config)

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "adapters")


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "1b"])
    ap.add_argument("--device", default="cuda" if gpu else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="base model dtype (default bf16 on "
                    "CUDA, fp32 on CPU)")
    ap.add_argument("--adapter-dtype", default="fp32", choices=["fp32", "model"],
                    help="fp32: PEFT's default (autocast_adapter_dtype=True); model: adapters in the base's dtype")
    ap.add_argument("--layers", type=int, default=None, help="override the size's number of decoder layers")
    ap.add_argument("--tasks", type=int, default=3, help="adapters to train, one per synthetic task")
    ap.add_argument("--compare-tasks", type=int, default=1, help="tasks trained with PEFT as well as patched")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter (default 40 tiny)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the step time")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 32 tiny, 512 otherwise)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-2 tiny, 2e-3 otherwise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"where the adapters go (default {DEFAULT_OUT})")
    ap.add_argument("--json", default=None, help="also write the report to this JSON file")
    args = ap.parse_args(argv)
    tiny = args.size == "tiny"
    args.steps = args.steps if args.steps is not None else (40 if tiny else 100)
    args.seq = args.seq or (32 if tiny else 512)
    args.lr = args.lr or (1e-2 if tiny else 2e-3)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if not 1 <= args.tasks or not 0 <= args.compare_tasks <= args.tasks:
        ap.error("need --tasks >= 1 and 0 <= --compare-tasks <= --tasks")
    if not 0 <= args.warmup < args.steps:
        ap.error("need 0 <= --warmup < --steps")
    return args


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def lora_params(model, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of one adapter, by name."""
    return {n: p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n}


def train(model, adapter, task, init, args, provider) -> dict:
    """Train `adapter` from `init` on `task` with PEFT's forward ("peft") or the patched one ("lora_fast")."""
    import lora_fast.peft as lfp

    (lfp.patch if provider == "lora_fast" else lfp.unpatch)(model)
    params = lora_params(model, adapter)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(init[n])
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.0)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(args.device)
    torch.manual_seed(args.seed)  # same dropout seeds for each provider's run
    model.train()
    losses, times = [], []
    for step in range(args.steps):
        tokens = task.sample(args.batch, args.seq, seed=step).to(args.device)
        sync(args.device)
        t0 = time.perf_counter()
        loss = causal_lm_loss(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    model.eval()
    step_s = statistics.median(times[args.warmup:])
    return {"provider": provider, "losses": losses, "step_ms": 1e3 * step_s,
            "tokens_per_s": args.batch * args.seq / step_s,
            "peak_mem_mb": torch.cuda.max_memory_allocated(args.device) / 2**20 if cuda else None}


@torch.no_grad()
def evaluate(model, task, args) -> tuple[float, float]:
    """(loss, rule accuracy) on held-out sequences of `task` with the model's active adapter (or none)."""
    tokens = task.sample(args.batch, args.seq, seed=10_000).to(args.device)
    logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten())
    return float(loss), task.rule_accuracy(tokens[:, :-1], logits[:, :-1].argmax(-1))


def curve(losses, points=8) -> str:
    idx = sorted({round(i * (len(losses) - 1) / (points - 1)) for i in range(points)})
    return " ".join(f"{losses[i]:.3f}" for i in idx)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from peft import LoraConfig, get_peft_model

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    config = llama_config(args.size, max_positions=max(args.seq, 64), **overrides)
    dtype = DTYPES[args.dtype]
    base = build_base(config, args.seed, args.device, dtype)
    lcfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=LLAMA_TARGETS,
                      task_type="CAUSAL_LM")
    names = [f"task{k}" for k in range(args.tasks)]
    autocast = args.adapter_dtype == "fp32"
    torch.manual_seed(args.seed + 1)  # the adapters' initial A (B starts at zero, as in PEFT)
    model = get_peft_model(base, lcfg, adapter_name=names[0], autocast_adapter_dtype=autocast)
    for name in names[1:]:
        model.add_adapter(name, lcfg, autocast_adapter_dtype=autocast)
    n_lora = sum(p.numel() for p in lora_params(model, names[0]).values())
    print(f"model: Llama {args.size}, {count_params(base) / 1e6:.3g} M parameters, {args.dtype} on {args.device}; "
          f"LoRA r={args.rank} alpha={args.alpha:g} dropout={args.dropout:g} on {', '.join(LLAMA_TARGETS)} "
          f"({n_lora / 1e6:.3f} M trainable per adapter, {'fp32' if autocast else args.dtype}); "
          f"batch {args.batch} x seq {args.seq}, {args.steps} steps, AdamW lr {args.lr:g}")

    report = {"args": vars(args), "tasks": []}
    for k, name in enumerate(names):
        task = TaskLanguage(k, config.vocab_size)
        model.set_adapter(name)
        with model.disable_adapter():
            base_loss, base_acc = evaluate(model, task, args)
        init = {n: p.detach().clone() for n, p in lora_params(model, name).items()}
        providers = ["peft", "lora_fast"] if k < args.compare_tasks else ["lora_fast"]
        runs = {p: train(model, name, task, init, args, p) for p in providers}
        loss, acc = evaluate(model, task, args)  # the patched run's adapter, which is what gets saved
        entry = {"adapter": name, "entropy_floor": task.entropy, "eval_loss_base": base_loss,
                 "eval_loss": loss, "rule_acc_base": base_acc, "rule_acc": acc, "runs": runs}
        print(f"\n{name}: eval loss {base_loss:.3f} (base) -> {loss:.3f} (floor {task.entropy:.3f}); "
              f"rule accuracy {base_acc:.2f} -> {acc:.2f}")
        for p, r in runs.items():
            mem = f"{r['peak_mem_mb']:.0f} MB" if r["peak_mem_mb"] is not None else "n/a (CPU)"
            print(f"  {p:9s} step {r['step_ms']:8.2f} ms  {r['tokens_per_s']:10.0f} tokens/s  peak {mem:>10s}  "
                  f"loss {curve(r['losses'])}")
        if len(runs) == 2:
            a, b = runs["peft"]["losses"], runs["lora_fast"]["losses"]
            entry["max_loss_diff"] = max(abs(x - y) for x, y in zip(a, b))
            entry["speedup"] = runs["lora_fast"]["tokens_per_s"] / runs["peft"]["tokens_per_s"]
            print(f"  lora_fast / peft tokens/s: {entry['speedup']:.2f}x; largest loss difference along the curves: "
                  f"{entry['max_loss_diff']:.2e}")
        report["tasks"].append(entry)

    model.save_pretrained(args.out)  # adapter "task<k>" -> <out>/task<k>/ (PEFT's layout for named adapters)
    with open(os.path.join(args.out, "base_model.json"), "w") as f:
        json.dump({"config": config.to_dict(), "seed": args.seed, "dtype": args.dtype, "size": args.size,
                   "adapters": names}, f, indent=2)
    report["out"] = args.out
    print(f"\nsaved {len(names)} PEFT adapters under {args.out}: {', '.join(names)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
