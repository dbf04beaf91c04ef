"""Probe: DoRA training on the GPU against PEFT's DoRA, from the same initial weights on the same batches.

`examples/exp_variants.py --size large` (fp32 with TF32 on the H200) had DoRA end at 0.6-1.7x the base model's
held-out loss for every learning rate of its grid, while LoRA reached 0.07 and, at a medium size on the CPU (the
plain-PyTorch path), DoRA reached 0.003 against LoRA's 0.05. This trains exp_variants' MLP task with lora-fast's
DoRA / LoRA and with PEFT's (`use_dora=True` / plain LoRA, adapters copied from ours before the first step) side by
side, and first compares one step's loss and gradients at a nonzero B. Same batches, same Adam, same rates.
Prints a table; JSON to --out.

    PYTHONPATH=$PWD python bench/probe_dora_train.py --out /tmp/probe
"""
import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import exp_variants as E  # noqa: E402

SIZES = {"medium": dict(d_in=256, hidden=1024, d_out=256, batch=512),
         "large": dict(d_in=1024, hidden=4096, d_out=1024, batch=2048)}


def peft_twin(base, ours, variant):
    """PEFT's LoRA / DoRA on a copy of `base` with ours' adapter values."""
    from peft import LoraConfig, inject_adapter_in_model

    model = inject_adapter_in_model(LoraConfig(r=E.RANK, lora_alpha=E.ALPHA, target_modules=E.TARGETS,
                                               use_dora=variant == "dora"), copy.deepcopy(base))
    with torch.no_grad():
        for name in E.TARGETS:
            theirs, mine = model[int(name)], ours[int(name)]
            theirs.lora_A["default"].weight.copy_(mine.lora_A)
            theirs.lora_B["default"].weight.copy_(mine.lora_B)
            if variant == "dora":
                theirs.lora_magnitude_vector["default"].weight.copy_(mine.lora_magnitude)
    return model


def adapter_params(model, peft_style):
    out = []
    for name in E.TARGETS:
        layer = model[int(name)]
        if peft_style:
            out += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            if hasattr(layer, "lora_magnitude_vector") and "default" in layer.lora_magnitude_vector:
                out.append(layer.lora_magnitude_vector["default"].weight)
        else:
            out += [layer.lora_A, layer.lora_B] + ([layer.lora_magnitude] if hasattr(layer, "lora_magnitude") else [])
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lrs", default="0.003,0.01")
    args = ap.parse_args()
    dev, dt = ("cuda" if torch.cuda.is_available() else "cpu"), torch.float32
    report = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "runs": [], "one_step": []}
    # fp32 without TF32 at the medium size only: the large fp32 GEMMs take ~100 ms a step there
    for tf32, size in [(True, s) for s in SIZES] + [(False, "medium")]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        dims = SIZES[size]
        cfg = dict(dims, steps=args.steps, eval_every=20, vera_rank=8)
        gen = torch.Generator(device="cpu").manual_seed(0)
        torch.manual_seed(0)
        base = E.mlp(cfg, dev, dt).requires_grad_(False)
        teacher = E.make_teacher(base, gen)
        x_eval = torch.randn(512, cfg["d_in"], generator=gen).to(dev, dt)
        with torch.no_grad():
            y_eval = teacher(x_eval).float()
            base_loss = torch.mean((base(x_eval).float() - y_eval) ** 2)
        for variant in ("dora", "lora"):
            # one step at a nonzero B: loss and every gradient, ours against PEFT's
            ours = E.adapt(base, variant, cfg)
            with torch.no_grad():
                for name in E.TARGETS:
                    ours[int(name)].lora_B.normal_(0, 0.02)
            theirs = peft_twin(base, ours, variant)
            x = torch.randn(cfg["batch"], cfg["d_in"], device=dev)
            y = teacher(x)
            losses, grads = [], []
            for model, peft_style in ((ours, False), (theirs, True)):
                params = adapter_params(model, peft_style)
                loss = torch.mean((model(x).float() - y.float()) ** 2)
                losses.append(loss.item())
                grads.append(torch.autograd.grad(loss, params))
            report["one_step"].append({
                "tf32": tf32, "size": size, "variant": variant, "loss_ours": losses[0], "loss_peft": losses[1],
                "grad_rel_err": [rel(a, b) for a, b in zip(*grads)]})
            for lr in (float(v) for v in args.lrs.split(",")):
                ours = E.adapt(base, variant, cfg)
                theirs = peft_twin(base, ours, variant)
                ns = argparse.Namespace(seed=0, device=dev, dtype=dt)
                curves = {}
                for name, model, peft_style in (("ours", ours, False), ("peft", theirs, True)):
                    if peft_style:  # E.train's optimizer takes the trainable parameters
                        for p in model.parameters():
                            p.requires_grad_(False)
                        for p in adapter_params(model, True):
                            p.requires_grad_(True)
                    curves[name] = E.train(model, variant, lr, teacher, cfg, ns, x_eval, y_eval, base_loss)
                report["runs"].append({"tf32": tf32, "size": size, "variant": variant, "lr": lr,
                                       "final_ours": curves["ours"][-1][1], "final_peft": curves["peft"][-1][1],
                                       "curves": curves})
                print(report["runs"][-1]["size"], variant, lr, "tf32" if tf32 else "fp32",
                      f"ours {curves['ours'][-1][1]:.4f} peft {curves['peft'][-1][1]:.4f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_dora_train.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("| tf32 | size | variant | loss ours / peft | max grad rel err |\n|---|---|---|---|---|")
    for r in report["one_step"]:
        print(f"| {r['tf32']} | {r['size']} | {r['variant']} | {r['loss_ours']:.5g} / {r['loss_peft']:.5g} | "
              f"{max(r['grad_rel_err']):.2e} |")
    print("| tf32 | size | variant | lr | final ours | final peft |\n|---|---|---|---|---|---|")
    for r in report["runs"]:
        print(f"| {r['tf32']} | {r['size']} | {r['variant']} | {r['lr']:g} | {r['final_ours']:.4f} | "
              f"{r['final_peft']:.4f} |")


if __name__ == "__main__":
    main()
