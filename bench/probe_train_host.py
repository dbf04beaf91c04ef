"""Where the host time of a patched PEFT training step goes: the 1B Llama of bench_train_step (bf16 adapters,
batch 2 x 2048), with and without dropout. Per setting: wall time per step (synchronised), the Python profile of
two steps (top functions by own time), the launch plans cached, and any synchronising op (sync debug mode).

    PYTHONPATH=$PWD python3 bench/probe_train_host.py [--layers 16]
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
from llama_tasks import LLAMA_TARGETS, build_base, llama_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    import lora_fast.peft as lfp
    from lora_fast.kernels import launch

    for p in (0.0, 0.1):
        base = build_base(llama_config("1b", num_hidden_layers=args.layers), 0, "cuda", torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=p, target_modules=LLAMA_TARGETS),
                               autocast_adapter_dtype=False)
        for provider in ("peft", "lora_fast"):
            (lfp.patch if provider == "lora_fast" else lfp.unpatch)(model)
            params = [q for n, q in model.named_parameters() if q.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            model.train()
            tokens = torch.randint(0, 32000, (args.batch, 2048), device="cuda")

            def step():
                logits = model(input_ids=tokens).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            plans = sum(len(c) for c in launch._ALL_CACHES)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                step()
                torch.cuda.set_sync_debug_mode("default")
            syncs = sorted({str(w.message)[:120] for w in caught if "synchron" in str(w.message).lower()})
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
            times.sort()
            print(f"=== p={p} {provider}: step {1e3 * times[2]:.1f} ms (min {1e3 * times[0]:.1f}); plans cached "
                  f"{plans} -> {sum(len(c) for c in launch._ALL_CACHES)}; syncs: {syncs or 'none'}")
            print("\n".join(s.getvalue().splitlines()[:40]))
        model = base = opt = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
