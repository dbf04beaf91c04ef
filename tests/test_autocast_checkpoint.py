"""LoRALinear under torch.autocast (fp32 parameters), fp32 adapters on a bf16 base, and torch.utils.checkpoint
(re-entrant and not, eager and compiled) with dropout: outputs and every gradient against references.

CPU autocast (bf16) exercises the same code path as CUDA autocast: `lora_linear` casts its operands to the
autocast dtype of x's device. Kernels run through Triton's interpreter (conftest); sizes are tiny.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too; must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import LoRALinear, functional, ops  # noqa: E402
from lora_fast.reference import lora_linear_reference  # noqa: E402
from tests.utils import assert_close, seeded_grads  # noqa: E402

BF16 = torch.bfloat16


def _layer(K=12, N=10, r=3, dropout=0.0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(K, N, rank=r, alpha=2 * r, dropout=dropout, dtype=dtype)
    torch.nn.init.normal_(layer.lora_B)
    return layer


def _reference_grads(layer, x, g, cast):
    """fp64 output and (dx, dA, dB) of the textbook LoRA on the operands rounded through `cast` (no dropout)."""
    leaves = [t.detach().to(cast).double().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B)]
    xr, Ar, Br = leaves
    y = lora_linear_reference(xr, layer.weight.to(cast).double(), layer.bias.to(cast).double(), Ar, Br,
                              layer.scaling)
    return (y, *torch.autograd.grad(y, leaves, g.double()))


def _check_layer_grads(layer, x, y, g, cast):
    ref = _reference_grads(layer, x, g, cast)
    y.backward(g)
    for name, out, r in zip(("y", "dx", "dA", "dB"), (y, x.grad, layer.lora_A.grad, layer.lora_B.grad), ref):
        assert_close(name, out, r, BF16)


def test_autocast_fp32_params_behave_as_nn_linear():
    layer = _layer()
    x = torch.randn(5, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
        base = F.linear(x, layer.weight, layer.bias)
    assert y.dtype == base.dtype == BF16
    g = torch.randn(5, 10, dtype=BF16)
    _check_layer_grads(layer, x, y, g, BF16)
    # As with nn.Linear, the gradients land in the parameters' (and input's) fp32.
    assert x.grad.dtype == layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32


def test_fp32_adapters_on_bf16_base_cast_the_adapters_not_x(monkeypatch):
    layer = _layer(dtype=BF16)
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = layer.lora_B.data.float()
    seen = []
    apply = functional.LoRALinearFunction.apply
    monkeypatch.setattr(functional.LoRALinearFunction, "apply",
                        lambda *a: seen.append([t.dtype for t in a if isinstance(t, torch.Tensor)]) or apply(*a))
    x = torch.randn(2, 3, 12, dtype=BF16, requires_grad=True)
    y = layer(x)
    assert seen == [[BF16] * 5], "x must stay bf16 (no full-activation fp32 copy); the adapters are cast down"
    assert y.dtype == BF16
    _check_layer_grads(layer, x, y, torch.randn(2, 3, 10, dtype=BF16), BF16)
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    assert x.grad.dtype == BF16


@pytest.mark.parametrize("adapter, x_dtype", [(torch.float16, BF16), (BF16, torch.float32)])
def test_other_adapter_dtype_mixes_are_rejected(adapter, x_dtype):
    x, W = torch.randn(4, 8, dtype=x_dtype), torch.randn(6, 8, dtype=x_dtype)
    with pytest.raises(TypeError, match="lora_A"):
        lora_fast.lora_linear(x, W, None, torch.randn(2, 8, dtype=adapter), torch.randn(6, 2, dtype=x_dtype), 1.0)


class _Two(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.a, self.b = _layer(12, 16, dropout=p, seed=1), _layer(16, 10, dropout=p, seed=2)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


def _step(model, x, g, mode, autocast):
    """One forward + backward with the CPU RNG at a fixed state; returns y and every gradient."""
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1234)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        y = model(x) if mode is None else checkpoint(model, x, use_reentrant=mode == "reentrant")
    y.backward(g.to(y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("autocast", [False, True])
def test_checkpoint_recompute_regenerates_the_dropout_mask(autocast):
    model = _Two(p=0.4)
    x, g = torch.randn(7, 12), torch.randn(7, 10)
    plain = _step(model, x, g, None, autocast)
    model.eval()
    assert not torch.allclose(plain[0].float(), model(x).float()), "dropout must be active in this test"
    model.train()
    for mode in ("reentrant", "non_reentrant"):
        got = _step(model, x, g, mode, autocast)
        for i, (a, b) in enumerate(zip(got, plain)):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{mode}: output/gradient {i} differs"


@pytest.mark.skipif(not ops.HAS_CUSTOM_OPS, reason="torch without torch.library.custom_op")
@pytest.mark.parametrize("order", ["compile(checkpoint)", "checkpoint(compiled) reentrant",
                                   "checkpoint(compiled) non_reentrant"])
def test_compiled_checkpoint_backward_uses_the_forward_mask(order):
    """K = N = r = 8, W = 0, A = B = I: y = drop(x) shows the mask; the checkpointed, compiled backward must give
    dx = g * keep / (1 - p) with that same mask. Checkpoint inside the compiled region goes through inductor (which
    saves and restores the generator around the seed op); a compiled module inside an eager checkpoint is recomputed
    with the CPU RNG restored by checkpoint (aot_eager: no C++ compile needed)."""
    torch._dynamo.reset()
    p = 0.5
    layer = LoRALinear(8, 8, rank=8, alpha=8, dropout=p, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.lora_A.copy_(torch.eye(8))
        layer.lora_B.copy_(torch.eye(8))
    if order == "compile(checkpoint)":
        fn = torch.compile(lambda t: checkpoint(layer, t, use_reentrant=False), fullgraph=True)
    else:
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        fn = lambda t: checkpoint(compiled, t, use_reentrant=order.endswith(" reentrant"))  # noqa: E731
    x = (torch.rand(6, 8) + 0.5).requires_grad_(True)
    y = fn(x)
    keep = y.detach() != 0
    assert 0 < keep.sum() < keep.numel()
    g = torch.randn(6, 8)
    y.backward(g)
    assert_close("dx", x.grad, g * keep / (1 - p), torch.float32)
    assert_close("dA", layer.lora_A.grad, g.T @ y.detach(), torch.float32)


@pytest.mark.skipif(not ops.HAS_CUSTOM_OPS, reason="torch without torch.library.custom_op")
def test_compiled_autocast_with_dropout_equals_eager():
    """fullgraph compile of an autocast region: bf16 output, fp32 grads, and (the seed op draws what eager draws)
    the same dropout mask as eager under one torch.manual_seed."""
    torch._dynamo.reset()
    layer = _layer(dropout=0.3)

    def step(x):
        with torch.autocast("cpu", dtype=BF16):
            return layer(x)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 12, requires_grad=True)
    results = [seeded_grads(fn, x, [layer.lora_A, layer.lora_B], 3) for fn in (compiled, step)]
    assert results[0][0].dtype == BF16 and results[0][2].dtype == torch.float32
    for i, (c, e) in enumerate(zip(*results)):
        assert torch.equal(c, e), f"compiled output/gradient {i} differs from eager"


def test_multi_lora_under_autocast_casts_like_nn_linear():
    """An fp32 serving layer under CPU autocast: bf16 output equal to the reference on bf16-rounded operands."""
    from lora_fast.multi_lora import AdapterPool, MultiLoRALinear, _multi_lora_torch

    torch.manual_seed(0)
    pool = AdapterPool(3, 4, dtype=torch.float32)
    multi = MultiLoRALinear(torch.nn.Linear(12, 10), pool, key="p")
    pool.load("a", {"p": (torch.randn(4, 12), torch.randn(10, 4))}, alpha=8)
    pool.load("b", {"p": (torch.randn(2, 12), torch.randn(10, 2))}, alpha=2, rank=2)
    meta = pool.batch_metadata(["a", None, "b", "a", "b"])
    x = torch.randn(5, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        y = multi(x, meta)
    A, B, sizes = pool.layer_stacks("p")
    c = lambda t: t.to(BF16).double()  # noqa: E731
    ref = _multi_lora_torch(c(x), c(multi.weight), c(multi.bias), c(A), c(B), pool.scalings.double(), pool.ranks,
                            meta.adapter_ids, sizes)
    assert y.dtype == BF16
    assert_close("multi y", y, ref, BF16)
