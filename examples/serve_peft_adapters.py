"""Serve several PEFT adapters together in one batch with the multi-adapter path, and check it against PEFT.

Reads the output of `examples/finetune_llama.py` (`base_model.json` + one PEFT adapter directory per task), rebuilds
the base model from its config and seed, and wraps every adapted nn.Linear in a `MultiLoRALinear` sharing one
`AdapterPool`; each adapter directory goes into the pool with `lora_fast.peft.load_peft_adapter_into_pool`. One
batch of requests mixes every adapter and base-only requests (-1). Each request's logits are compared with PEFT's
(`PeftModel.from_pretrained` + `load_adapter`, then `set_adapter(name)` per adapter, `disable_adapter()` for the
base-only requests); the largest relative error is printed and the script exits nonzero above the tolerance. It
also prints each request's rule accuracy on its task (the adapters learned their task; the base did not) and the
tokens/s of the batch against PEFT's own mixed-batch forward (`adapter_names=`).

    python examples/finetune_llama.py --out /tmp/adapters && python examples/serve_peft_adapters.py --adapters /tmp/adapters
    python examples/serve_peft_adapters.py --adapters DIR --device cuda --requests 64 --seq 512
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from llama_tasks import DTYPES, TaskLanguage, build_base  # noqa: E402
from lora_fast.multi_lora import AdapterPool, MultiLoRALinear, make_batch_metadata  # noqa: E402
from lora_fast.peft import load_peft_adapter_into_pool, read_peft_adapter  # noqa: E402

DEFAULT_ADAPTERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "adapters")


class ServedLinear(nn.Module):
    """An adapted nn.Linear of the Hugging Face model, served by a MultiLoRALinear.

    The model calls it as `layer(x)`; the batch's adapter layout (`BatchMetadata`, one per batch, shared by every
    layer) is read from `state["batch"]`, which the server sets before each forward.
    """

    def __init__(self, linear: nn.Linear, pool: AdapterPool, key: str, state: dict):
        super().__init__()
        self.inner = MultiLoRALinear(linear, pool, key=key)
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, self.state["batch"])


class MultiAdapterServer:
    """A Hugging Face causal LM whose adapted linears serve every adapter of `adapter_dirs` in one batch.

    adapter_dirs: {adapter name: PEFT adapter directory}. `logits(tokens [B, L], slots [B])` -> [B, L, V], each
    request with its own adapter slot (-1: base only); `slot(name)` gives a name's slot.
    """

    def __init__(self, base: nn.Module, adapter_dirs: dict[str, str]):
        files = {name: read_peft_adapter(path)[1] for name, path in adapter_dirs.items()}
        modules = sorted({m for pairs in files.values() for m in pairs})
        max_rank = max(a.shape[0] for pairs in files.values() for a, _ in pairs.values())
        w = base.get_output_embeddings().weight
        self.pool = AdapterPool(max_adapters=len(adapter_dirs), max_rank=max_rank, device=w.device, dtype=w.dtype)
        self.state = {"batch": None}
        for name in modules:
            linear = base.get_submodule(name)
            if type(linear) is not nn.Linear:
                raise ValueError(f"adapted module {name!r} is a {type(linear).__name__}, not an nn.Linear")
            base.set_submodule(name, ServedLinear(linear, self.pool, name, self.state))
        for name, path in adapter_dirs.items():
            load_peft_adapter_into_pool(self.pool, {m: m for m in modules}, path, name)
        self.model = base

    def slot(self, name: str | None) -> int:
        return -1 if name is None else self.pool.slot(name)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        per_token = slots.to(torch.int32).repeat_interleave(tokens.shape[1]).to(tokens.device)
        self.state["batch"] = make_batch_metadata(per_token, self.pool)  # validates the ids once per batch
        try:
            return self.model(input_ids=tokens).logits
        finally:
            self.state["batch"] = None


def find_adapters(root: str) -> tuple[dict, dict[str, str]]:
    """(base_model.json contents, {adapter name: directory}) of a finetune_llama.py output directory."""
    with open(os.path.join(root, "base_model.json")) as f:
        meta = json.load(f)
    dirs = {name: os.path.join(root, name) for name in meta["adapters"]}
    missing = [d for d in dirs.values() if not os.path.exists(os.path.join(d, "adapter_config.json"))]
    if missing:
        raise FileNotFoundError(f"no adapter_config.json in {missing}")
    return meta, dirs


def task_of(name: str | None) -> TaskLanguage | None:
    m = re.fullmatch(r"task(\d+)", name or "")
    return int(m.group(1)) if m else None


def peft_reference(base: nn.Module, dirs: dict[str, str], tokens, names) -> torch.Tensor:
    """Each request's logits from PEFT with that request's adapter set (`set_adapter`), base-only via
    `disable_adapter()`. tokens [B, L]; names: adapter name or None per request."""
    from peft import PeftModel

    items = list(dirs.items())
    peft_model = PeftModel.from_pretrained(base, items[0][1], adapter_name=items[0][0])
    for name, path in items[1:]:
        peft_model.load_adapter(path, adapter_name=name)
    peft_model.eval()
    out = [None] * len(names)
    with torch.no_grad():
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            if name is None:
                with peft_model.disable_adapter():
                    y = peft_model(input_ids=tokens[rows]).logits
            else:
                peft_model.set_adapter(name)
                y = peft_model(input_ids=tokens[rows]).logits
            for j, i in enumerate(rows):
                out[i] = y[j]
    return peft_model, torch.stack(out)


def time_call(fn, device, reps: int) -> float:
    """Seconds per call (on CUDA after one warm-up call: Triton compiles, cuBLAS heuristics)."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> dict:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default=DEFAULT_ADAPTERS, help="finetune_llama.py's --out directory")
    ap.add_argument("--device", default="cuda" if gpu else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: the dtype the adapters were "
                    "trained with")
    ap.add_argument("--requests", type=int, default=None, help="requests in the batch (default 2 per adapter + 2)")
    ap.add_argument("--seq", type=int, default=24, help="tokens per request")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 1 on CPU, 10 on CUDA)")
    ap.add_argument("--tol", type=float, default=None, help="max relative error (default 1e-4 fp32, 5e-2 half)")
    args = ap.parse_args(argv)

    meta, dirs = find_adapters(args.adapters)
    from transformers import LlamaConfig

    config = LlamaConfig.from_dict(meta["config"])
    dtype = DTYPES[args.dtype or meta["dtype"]]
    device = torch.device(args.device)
    names = list(dirs)
    n_req = args.requests or 2 * len(names) + 2
    # every adapter and the base model take turns, so the batch mixes all of them
    req_names = [([None] + names)[i % (len(names) + 1)] for i in range(n_req)]
    tasks = {n: TaskLanguage(task_of(n) if task_of(n) is not None else 0, config.vocab_size) for n in req_names}
    tokens = torch.stack([tasks[n].sample(1, args.seq, seed=20_000 + i)[0] for i, n in enumerate(req_names)])
    tokens = tokens.to(device)

    base = build_base(config, meta["seed"], device, dtype)
    peft_base = copy.deepcopy(base)
    server = MultiAdapterServer(base, dirs)
    slots = torch.tensor([server.slot(n) for n in req_names], dtype=torch.int32)
    ours = server.logits(tokens, slots)
    peft_model, ref = peft_reference(peft_base, dirs, tokens, req_names)

    errs = ((ours.double() - ref.double()).flatten(1).norm(dim=1) / ref.double().flatten(1).norm(dim=1)).tolist()
    tol = args.tol or (1e-4 if dtype == torch.float32 else 5e-2)
    print(f"served {n_req} requests x {args.seq} tokens in one batch: adapters {names} + base-only, "
          f"{dtype} on {device}, pool of {len(names)} slots (max rank {server.pool.max_rank})")
    print(f"{'request':>7s} {'adapter':>8s} {'rel err vs PEFT':>16s} {'rule acc':>9s}")
    acc = {}
    for i, (n, e) in enumerate(zip(req_names, errs)):
        a = tasks[n].rule_accuracy(tokens[i:i + 1, :-1], ours[i:i + 1, :-1].argmax(-1))
        acc.setdefault(n or "base", []).append(a)
        print(f"{i:7d} {n or 'base':>8s} {e:16.2e} {a:9.2f}")

    reps = args.reps or (10 if device.type == "cuda" else 1)
    t_ours = time_call(lambda: server.logits(tokens, slots), device, reps)
    mixed = [n or "__base__" for n in req_names]  # PEFT's own mixed-batch forward: one LoRA pair per adapter
    with torch.no_grad():
        t_peft = time_call(lambda: peft_model(input_ids=tokens, adapter_names=mixed), device, reps)
    report = {"requests": n_req, "seq": args.seq, "dtype": str(dtype), "adapters": names, "max_rel_err": max(errs),
              "tol": tol, "rule_acc": {k: sum(v) / len(v) for k, v in acc.items()},
              "ours_tokens_per_s": n_req * args.seq / t_ours, "peft_mixed_tokens_per_s": n_req * args.seq / t_peft}
    report["ok"] = report["max_rel_err"] <= tol
    print(f"max relative error vs PEFT (set_adapter per request): {report['max_rel_err']:.2e} (tolerance {tol:g})")
    print("rule accuracy by adapter: " + ", ".join(f"{k} {v:.2f}" for k, v in report["rule_acc"].items()))
    print(f"tokens/s, whole batch forward: ours {report['ours_tokens_per_s']:.0f}, PEFT mixed batch "
          f"(adapter_names=) {report['peft_mixed_tokens_per_s']:.0f}")
    if not report["ok"]:
        raise SystemExit(f"mismatch: max relative error {report['max_rel_err']:.2e} > {tol:g}")
    return report


if __name__ == "__main__":
    main()
