"""`lora_linear`: the fused LoRA linear as a torch.autograd.Function, with validation and dispatch.

Dispatch (DESIGN.md): CUDA tensors run the Triton kernels; CPU tensors run them through Triton's interpreter
when TRITON_INTERPRET=1, and the plain-PyTorch `lora_fast.naive` path otherwise. Both compute the same
function with the same dropout mask.

Eager calls go straight to `LoRALinearFunction`; while torch.compile traces, `lora_linear` calls the
`lora_fast::lora_forward` op (`lora_fast.ops`), whose registered autograd shares `lora_backward` with the Function.
Under torch.autocast the operands are cast as nn.Linear's are (`autocast_inputs`); fp32 adapters on an fp16/bf16 x
are cast down to x's dtype (docs/compile_graphs.md).
"""

import torch

from . import kernels, naive  # (the package imports kernels first: no cycle)
from .validation import check_lora_linear_args


def use_triton(t: torch.Tensor) -> bool:
    """True when `t`'s device runs the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if t.is_cuda:
        return True
    return t.is_cpu and kernels.is_interpret()


def _ops(t: torch.Tensor):
    """The launchers for `t`: `lora_fast.kernels` where `use_triton(t)`, else `lora_fast.naive`. Called once per
    layer call and per backward, eager and in every op: attribute tests only, no import statement and no
    `t.device` object (0.3 against 2.2 µs per call on the CPU)."""
    # fp64 on a GPU takes the PyTorch path (cuBLAS): Triton 3.6 does not compile an fp64 tl.dot for the H100.
    # The kernels do run fp64 under the interpreter, where gradcheck exercises them.
    if t.is_cuda:
        return naive if t.dtype == torch.float64 else kernels
    return kernels if t.is_cpu and kernels.is_interpret() else naive


def draw_seed(like=None):
    """A dropout seed. Eagerly, an int from torch's CPU generator: no device sync, no launch, reproducible under
    torch.manual_seed, and replayed by torch.utils.checkpoint, which restores the CPU RNG state before recomputing.

    While `like` (the layer's input) is a CUDA tensor and its stream is being captured into a CUDA graph, an int
    would be baked into the graph and every replay would drop the same elements: the seed is then a one-element
    int64 tensor drawn by the CUDA generator inside the capture (a replay draws a fresh one, as torch's own
    dropout does) and the kernels read it through a pointer (kernels.helpers.check_dropout)."""
    if like is not None and like.is_cuda and torch.cuda.is_current_stream_capturing():
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=like.device)
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


class LoRALinearFunction(torch.autograd.Function):
    """y = x @ W^T + b + s * (drop(x) @ A^T) @ B^T with the fused kernels; see `lora_linear`.

    Saves x, W, A, B (no copies), the seed and xa = drop(x) @ A^T [M, r] (only when B needs a gradient).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        ops = _ops(x)
        flat = x.dim() != 2  # reshapes only where needed: each torch call costs host time (bench/NOTES.md)
        y2d, xa = ops.lora_forward(x.reshape(-1, x.shape[-1]) if flat else x, weight, bias, lora_A, lora_B, scaling,
                                   dropout_p, seed, store_xa=ctx.needs_input_grad[4])
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.scaling, ctx.dropout_p, ctx.seed = scaling, dropout_p, seed
        ctx.has_bias = bias is not None
        return y2d.reshape(*x.shape[:-1], weight.shape[0]) if flat else y2d

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        grads = lora_backward(_ops(x), dy, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, ctx.seed,
                              ctx.has_bias, ctx.needs_input_grad[:5])
        return (*grads, None, None, None)


def _term_in_ab(ops, m: int, rank: int, dropout_p: float) -> bool:
    """Whether `ops` (a launcher set) takes dX's dropout term into lora_grad_ab for this step: only launcher sets
    that say so (`lora_fast.kernels`, eagerly and inside the compiled `lora_fast::lora_backward` op; not the
    PyTorch path or QLoRA's launchers over the ops)."""
    decide = getattr(ops, "dx_term_in_grad_ab", None)
    return decide is not None and decide(m, rank, dropout_p)


def lora_backward(ops, dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, has_bias, needs):
    """The LoRA linear's gradients (dx, dW, db, dA, dB), each None unless `needs` asks for it.

    ops: the launchers (`lora_fast.kernels`, `lora_fast.naive`, or QLoRA's launchers over the `lora_fast::` ops,
    `lora_fast.ops._QLoRAOpLaunchers`); dy: [..., N]; x: [..., K]; xa: drop(x) @ A^T [M, r] from the forward (needed
    for dB); seed: whatever the launchers take (an int, or a seed tensor); needs: 5 bools.
    Shared by the autograd Function (eager), the `lora_fast::lora_backward` op that the compiled backward calls
    (the same launchers, without dW and db, which the graph computes) and QLoRA's compiled backward.
    """
    need_x, need_w, need_bias, need_a, need_b = needs
    flat = x.dim() != 2
    x2d = x.reshape(-1, x.shape[-1]) if flat else x
    dy2d = dy.reshape(-1, weight.shape[0]) if dy.dim() != 2 else dy
    if dy2d.dtype != x.dtype:
        dy2d = dy2d.to(x.dtype)
    dx = dw = dbias = dA = dB = None
    dyb = None
    # With dropout at large M the kernels draw the mask once for dX's term and dA (kernels.dx_term_in_grad_ab):
    # dX comes back without its term, which dA's programs then add in place.
    term_in_ab = need_x and need_a and _term_in_ab(ops, x2d.shape[0], lora_A.shape[0], dropout_p)
    if need_x:
        dx2d, dyb = ops.lora_backward_dx(dy2d, weight, lora_A, lora_B, scaling, dropout_p, seed, store_dyb=need_a,
                                         **({"dropout_term": False} if term_in_ab else {}))
        dx = dx2d.reshape(x.shape) if flat else dx2d
    elif need_a:
        dyb = ops.lora_shrink(dy2d, lora_B.t())
    if need_a or need_b:
        dA, dB = ops.lora_grad_ab(x2d, dy2d, xa, dyb, scaling, lora_A.dtype, lora_B.dtype, dropout_p, seed,
                                  need_a=need_a, need_b=need_b,
                                  **({"dx": dx2d, "lora_A": lora_A} if term_in_ab else {}))
    if need_w:
        dw = (dy2d.t() @ x2d).to(weight.dtype)
    if need_bias and has_bias:
        dbias = dy2d.sum(0, dtype=torch.promote_types(dy2d.dtype, torch.float32)).to(dy2d.dtype)
    return dx, dw, dbias, dA, dB


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False):
    """Fused LoRA linear: `x @ weight^T + bias + scaling * (dropout(x) @ lora_A^T) @ lora_B^T`.

    x: [..., K]; weight: [N, K]; bias: [N] or None, in x's dtype (fp16, bf16, fp32 or fp64) on x's device;
    lora_A: [r, K]; lora_B: [N, r], in x's dtype, or fp32 on an fp16/bf16 x (PEFT's fp32 adapters on a half base:
    the adapters are cast down to x's dtype, never x up, and their gradients come back in fp32).
    scaling: Python float (alpha / r, or alpha / sqrt(r) for rsLoRA).
    dropout_p in [0, 1), applied to x on the LoRA branch only, and only when `training`.
    Returns y: [..., N] in x's dtype. Differentiable in every tensor argument.

    Under `torch.autocast` every floating operand (not fp64) is cast to the autocast dtype first, as nn.Linear's
    inputs are, so with fp32 parameters the kernels run in bf16/fp16 and the gradients land in fp32.
    Eager calls go straight to `LoRALinearFunction` (no dispatcher cost); while torch.compile traces, the call
    goes through the `lora_fast::lora_forward` op instead (`lora_fast.ops`), which it captures without a break.

    >>> layer = torch.nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    >>> A = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    >>> y = lora_linear(x, layer.weight, layer.bias, A, B, scaling=2.0, dropout_p=0.1, training=True)
    """
    return lora_linear_shifted(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, 0)


def lora_linear_shifted(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, seed_offset: int):
    """`lora_linear` whose dropout key is the drawn seed plus `seed_offset` (an int in [0, 2**62)): a
    tensor-parallel shard's own mask stream (`distributed.RowParallelLoRALinear`), drawn from the same generator
    state on every rank, eagerly, under torch.compile and inside a CUDA graph capture alike."""
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    scaling, dropout_p = check_lora_linear_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    if lora_A.dtype != x.dtype:  # fp32 adapters on a half base: a differentiable cast of the small matrices
        lora_A = lora_A.to(x.dtype)
    if lora_B.dtype != x.dtype:
        lora_B = lora_B.to(x.dtype)
    p = dropout_p if training else 0.0
    return compile_dispatch(_lora_linear_traced, _lora_linear_eager, x, weight, bias, lora_A, lora_B, scaling, p,
                            seed_offset)


def compile_dispatch(traced, eager, *args):
    """`eager(*args)`; while torch.compile traces, `traced(*args)` (built on the `lora_fast::` ops, no graph break),
    or `eager` at a graph break on a torch without custom ops (`eager_only`)."""
    if not is_compiling():
        return eager(*args)
    from . import ops

    return (traced if ops.HAS_CUSTOM_OPS else eager_only(eager))(*args)


def _lora_linear_traced(*args):
    from . import ops

    return ops.lora_linear_op(*args)


def eager_only(fn, reason: str | None = None):
    """`fn` run outside the graph under torch.compile (a graph break): the fallback on a torch without custom ops,
    where dynamo would otherwise trace into the Triton launchers (and the interpreter on CPU). `reason` shows in
    dynamo's graph-break message (and its fullgraph error) where the torch takes one (>= 2.7)."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None) or torch._dynamo.disable
    if reason is not None:
        try:
            return disable(fn, reason=reason)
        except TypeError:
            pass
    return disable(fn)


def shift_seed(seed, offset: int):
    """(seed + offset) mod 2**62 for a dropout seed in [0, 2**62) (an int, or a seed tensor: the sum stays below
    2**63, so int64 does not overflow) and an offset in [0, 2**62)."""
    return (seed + offset) % 2**62 if offset else seed


def _lora_linear_eager(x, weight, bias, lora_A, lora_B, scaling, p, seed_offset=0):
    """`lora_linear` after its checks and casts: the autograd Function when a gradient is needed, else the launch."""
    seed = shift_seed(draw_seed(x), seed_offset) if p > 0.0 else 0
    tensors = (x, weight, bias, lora_A, lora_B)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, p, seed)
    if x.dim() == 2:
        return _ops(x).lora_forward(x, weight, bias, lora_A, lora_B, scaling, p, seed)[0]
    y2d, _ = _ops(x).lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling, p, seed)
    return y2d.reshape(*x.shape[:-1], weight.shape[0])


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces the caller."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return bool(getattr(getattr(torch, "_dynamo", None), "is_compiling", lambda: False)())


_CASTABLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_enabled_fn():
    """torch.is_autocast_enabled(device_type) (torch >= 2.4), or its older per-device spellings."""
    try:
        torch.is_autocast_enabled("cpu")
        return torch.is_autocast_enabled
    except TypeError:  # torch < 2.4: no device argument
        return lambda device_type: (torch.is_autocast_enabled() if device_type == "cuda"
                                    else torch.is_autocast_cpu_enabled())


_autocast_enabled = _autocast_enabled_fn()


def autocast_dtype(device_type: str):
    """The autocast dtype active for `device_type` ("cuda", "cpu"), or None when autocast is off there."""
    if not _autocast_enabled(device_type):
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def autocast_inputs(x, *others):
    """(x, *others) cast as autocast casts nn.Linear's operands: every fp16/bf16/fp32 tensor to the autocast dtype
    of x's device (a differentiable `.to`, so gradients return in each tensor's own dtype); unchanged when autocast
    is off. Anything else (fp64, non-tensors) passes through for the argument checks to judge.
    Costs well under a microsecond when autocast is off (`x.is_cuda`, not `x.device`: eager steps are host-bound)."""
    if not isinstance(x, torch.Tensor):
        return (x, *others)
    device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else None
    if device_type is None or not _autocast_enabled(device_type):
        return (x, *others)
    dtype = autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE else t for t in (x, *others))
