"""Host time against wall time of one eager LoRALinear forward+backward at 8192x4096x4096 (bf16, r=16), with and
without dropout, and any synchronising op the step makes (torch.cuda.set_sync_debug_mode). When host time reaches
the wall time, the step is host-bound; a synchronising op makes host and GPU time add up.

    PYTHONPATH=$PWD python3 bench/probe_dropout_host.py
"""
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import host_and_wall_us  # noqa: E402
from lora_fast import LoRALinear  # noqa: E402


def main():
    torch.manual_seed(0)
    M, K, N = 8192, 4096, 4096
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    for p in (0.0, 0.1):
        layer = LoRALinear(K, N, rank=16, alpha=32, dropout=p, device="cuda", dtype=torch.bfloat16).train()
        torch.nn.init.normal_(layer.lora_B, std=0.02)
        params = [x, layer.lora_A, layer.lora_B]

        def step():
            return torch.autograd.grad(layer(x), params, dy)

        step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message)[:160] for w in caught if "synchron" in str(w.message).lower()]
        host, wall = host_and_wall_us(step, 30)
        print(f"p={p}: host {host:.0f} us per step, wall {wall:.0f} us per step, synchronising ops: {syncs or 'none'}")


if __name__ == "__main__":
    main()
