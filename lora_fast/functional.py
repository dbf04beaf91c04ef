"""`lora_linear`: the fused LoRA linear as a torch.autograd.Function, with validation and dispatch.

Dispatch (DESIGN.md): CUDA tensors run the Triton kernels; CPU tensors run them through Triton's interpreter
when TRITON_INTERPRET=1, and the plain-PyTorch `lora_fast.naive` path otherwise. Both compute the same
function with the same dropout mask.
"""
import torch

from . import naive
from .validation import check_lora_linear_args


def use_triton(t: torch.Tensor) -> bool:
    """True when `t`'s device runs the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if t.is_cuda:
        return True
    if t.device.type != "cpu":
        return False
    from .kernels import is_interpret

    return is_interpret()


def _ops(t: torch.Tensor):
    # fp64 on a GPU takes the PyTorch path (cuBLAS): Triton 3.6 does not compile an fp64 tl.dot for the H100.
    # The kernels do run fp64 under the interpreter, where gradcheck exercises them.
    if use_triton(t) and not (t.is_cuda and t.dtype == torch.float64):
        from . import kernels

        return kernels
    return naive


def draw_seed() -> int:
    """A dropout seed from torch's CPU generator: no device sync, reproducible under torch.manual_seed, and
    replayed by torch.utils.checkpoint, which restores the CPU RNG state before recomputing."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


class LoRALinearFunction(torch.autograd.Function):
    """y = x @ W^T + b + s * (drop(x) @ A^T) @ B^T with the fused kernels; see `lora_linear`.

    Saves x, W, A, B (no copies), the seed and xa = drop(x) @ A^T [M, r] (only when B needs a gradient).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        ops = _ops(x)
        x2d = x.reshape(-1, x.shape[-1])
        y2d, xa = ops.lora_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                                   store_xa=ctx.needs_input_grad[4])
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.has_bias = bias is not None
        return y2d.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        ops = _ops(x)
        s, p, seed = ctx.scaling, ctx.dropout_p, ctx.seed
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, weight.shape[0])
        if dy2d.dtype != x.dtype:
            dy2d = dy2d.to(x.dtype)
        dx = dw = dbias = dA = dB = None
        dyb = None
        if need_x:
            dx2d, dyb = ops.lora_backward_dx(dy2d, weight, lora_A, lora_B, s, p, seed, store_dyb=need_a)
            dx = dx2d.reshape(x.shape)
        elif need_a:
            dyb = ops.lora_shrink(dy2d, lora_B.t())
        if need_a or need_b:
            dA, dB = ops.lora_grad_ab(x2d, dy2d, xa, dyb, s, lora_A.dtype, lora_B.dtype, p, seed,
                                      need_a=need_a, need_b=need_b)
        if need_w:
            dw = (dy2d.t() @ x2d).to(weight.dtype)
        if need_bias and ctx.has_bias:
            dbias = dy2d.sum(0, dtype=torch.promote_types(dy2d.dtype, torch.float32)).to(dy2d.dtype)
        return dx, dw, dbias, dA, dB, None, None, None


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False):
    """Fused LoRA linear: `x @ weight^T + bias + scaling * (dropout(x) @ lora_A^T) @ lora_B^T`.

    x: [..., K]; weight: [N, K]; bias: [N] or None; lora_A: [r, K]; lora_B: [N, r]; one dtype (fp16, bf16,
    fp32 or fp64) and one device for all. scaling: Python float (alpha / r, or alpha / sqrt(r) for rsLoRA).
    dropout_p in [0, 1), applied to x on the LoRA branch only, and only when `training`.
    Returns y: [..., N]. Differentiable in every tensor argument.

    >>> layer = torch.nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    >>> A = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    >>> y = lora_linear(x, layer.weight, layer.bias, A, B, scaling=2.0, dropout_p=0.1, training=True)
    """
    scaling, dropout_p = check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    p = dropout_p if training else 0.0
    seed = draw_seed() if p > 0.0 else 0
    tensors = (x, weight, bias, lora_A, lora_B)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, p, seed)
    y2d, _ = _ops(x).lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling, p, seed)
    return y2d.reshape(*x.shape[:-1], weight.shape[0])
