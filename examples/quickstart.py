"""Drop-in quickstart: wrap an nn.Linear, train the adapter a few steps, merge for inference.

Runs on the GPU (Triton kernels) or the CPU (plain PyTorch path; TRITON_INTERPRET=1 runs the kernels there).
"""
import torch
from torch import nn

import lora_fast

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
K, N, M = (4096, 4096, 8192) if device == "cuda" else (64, 48, 32)
torch.manual_seed(0)

base = nn.Linear(K, N, device=device, dtype=dtype)
layer = lora_fast.LoRALinear.from_linear(base, rank=16, alpha=32, dropout=0.05)   # shares base's weight
x = torch.randn(M, K, device=device, dtype=dtype)
with torch.no_grad():  # at init B = 0: the output is the base linear's (up to GEMM summation order)
    diff = (layer.eval()(x).float() - base(x).float()).norm() / base(x).float().norm()
    print(f"relative difference from the base linear at init: {diff.item():.1e}")
    assert diff < 1e-2

target = base(x).detach() + 0.1 * torch.randn(M, N, device=device, dtype=dtype)
opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-3)
layer.train()
for step in range(20):
    loss = nn.functional.mse_loss(layer(x).float(), target.float())
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {loss.item():.5f}")

layer.eval().merge()                                  # inference at plain-linear cost
print(layer)
print(lora_fast.count_parameters(layer))
