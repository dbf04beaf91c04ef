"""Shared test helpers: relative error, tolerances, random LoRA problems."""
import torch

# Relative-error bounds ||out - ref|| / ||ref|| against an fp64 reference, per operand dtype.
REL_TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-5, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(name, out, ref, dtype):
    err = rel_err(out, ref)
    if not err <= REL_TOL[dtype]:
        diff = (out.double() - ref.double()).abs()
        diff[~torch.isfinite(diff)] = float("inf")
        idx = [i.tolist() for i in torch.nonzero(diff > diff.max() * 0.5)[:5]]
        raise AssertionError(f"{name}: relative error {err:.3e} > {REL_TOL[dtype]:.0e} ({dtype}); "
                             f"worst indices {idx}")


def lora_problem(M, K, N, r, dtype, device, bias=True):
    """Fresh random x [M, K], W [N, K], b [N], A [r, K], B [N, r] (B nonzero, unlike LoRA's init)."""
    g = dict(device=device, dtype=dtype)
    x = torch.randn(M, K, **g)
    W = torch.randn(N, K, **g) / max(K, 1) ** 0.5
    b = torch.randn(N, **g) if bias else None
    A = torch.randn(r, K, **g) / max(K, 1) ** 0.5
    B = torch.randn(N, r, **g) / r**0.5
    return x, W, b, A, B


def seeded_grads(fn, x, params, seed):
    """[y, x.grad, *param grads] of one step `fn(x)` (loss sum(y²) in fp32) after torch.manual_seed(seed): run a
    compiled and an eager `fn` through it to compare outputs, gradients and dropout masks."""
    for t in (x, *params):
        t.grad = None
    torch.manual_seed(seed)
    y = fn(x)
    y.float().square().sum().backward()
    return [y, x.grad, *(p.grad for p in params)]
