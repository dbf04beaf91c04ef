"""The fused LoRA linear against the textbook reference: outputs, all gradients, dropout, gradcheck, dispatch.

On a CPU-only machine the kernels run through Triton's interpreter (tests/conftest.py), so sizes are small.
"""
import numpy as np
import pytest
import torch

import lora_fast
from lora_fast import kernels, naive
from lora_fast.functional import LoRALinearFunction, draw_seed, use_triton
from lora_fast.kernels.lora_shrink import lora_shrink_partials, shrink_splits
from lora_fast.nf4 import quantize_nf4
from lora_fast.philox import dropout_mask_torch
from lora_fast.reference import lora_linear_reference

from .utils import assert_close, lora_problem, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (M, K, N, r): M of 0 and 1, K and N of 1, 17 and 33, r of 1, 3 and 64, plus a multi-tile case.
SHAPES = [(0, 17, 33, 3), (1, 33, 17, 1), (33, 1, 33, 64), (33, 33, 1, 3), (17, 17, 17, 1), (40, 33, 24, 64),
          (1, 1, 1, 1)]


def _reference_grads(x, W, b, A, B, s, p, keep, dy):
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, B))
    yr = lora_linear_reference(xr, W.double(), None if b is None else b.double(), Ar, Br, s, p, p > 0, keep)
    yr.backward(dy.double())
    return yr, xr.grad, Ar.grad, Br.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M%d_K%d_N%d_r%d" % s)
def test_lora_linear_matches_reference(shape, p, bias, dtype, device):
    M, K, N, r = shape
    x, W, b, A, B = lora_problem(M, K, N, r, dtype, device, bias)
    assert (b is not None) == bias
    s = 1.7
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    torch.manual_seed(1000 + M)
    seed = draw_seed()
    torch.manual_seed(1000 + M)  # lora_linear draws the same seed
    y = lora_fast.lora_linear(x, W, b, A, B, s, dropout_p=p, training=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = dropout_mask_torch(seed, M, K, p, device) if p > 0 else None
    yr, dxr, dAr, dBr = _reference_grads(x, W, b, A, B, s, p, keep, dy)
    assert y.shape == (M, N) and y.dtype == dtype
    for name, out, ref in (("y", y, yr), ("dx", x.grad, dxr), ("dA", A.grad, dAr), ("dB", B.grad, dBr)):
        assert out.dtype == dtype, name
        assert_close(name, out, ref, dtype)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("mode", ["fused", "shrink"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_launchers_write_every_element(mode, p, tma, device):
    """NaN-filled outputs, both ways of computing the rank-r product, pointer and tensor-descriptor loads,
    several tiles in every dimension, edge tiles in every dimension."""
    M, K, N, r, s, seed = 37, (44 if tma else 45), (36 if tma else 35), 5, 0.5, 4242
    x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, device)
    dy = torch.randn(M, N, device=device)
    y = torch.full((M, N), float("nan"), device=device)
    dx = torch.full((M, K), float("nan"), device=device)
    if tma:
        assert kernels.helpers.tma_enabled(True, x, W, dy)
    _, xa = kernels.lora_forward(x, W, b, A, B, s, p, seed, store_xa=True, xa_mode=mode, out=y, tma=tma)
    _, dyb = kernels.lora_backward_dx(dy, W, A, B, s, p, seed, dyb_mode=mode, out=dx, tma=tma)
    dA, dB = kernels.lora_grad_ab(x, dy, xa, dyb, s, A.dtype, B.dtype, p, seed)
    keep = dropout_mask_torch(seed, M, K, p, device) if p > 0 else None
    yr, dxr, dAr, dBr = _reference_grads(x, W, b, A, B, s, p, keep, dy)
    xa_ref = (x.double() * (keep.double() / (1 - p) if p > 0 else 1.0)) @ A.double().t()
    for name, out, ref in (("y", y, yr), ("dx", dx, dxr), ("xa", xa, xa_ref), ("dyb", dyb, dy.double() @ B.double()),
                           ("dA", dA, dAr), ("dB", dB, dBr)):
        assert_close(name, out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 200, 70, 3), (16, 96, 33, 1), (5, 40, 19, 17), (3, 0, 9, 2)],
                         ids=lambda s: "M%d_K%d_N%d_r%d" % s)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_split_shrink_decode_mode(shape, p, dtype, device):
    """xa_mode="split" (decode: xa as fp32 partial sums over K ranges, summed in the GEMM's epilogue; a PDL pair on
    Hopper): NaN-filled y and xa against the reference, with dropout drawn in the shrink, and the partials add up
    to xa. K = 0 gives the empty sum."""
    M, K, N, r = shape
    seed = 77
    x, W, b, A, B = lora_problem(M, K, N, r, dtype, device)
    y = torch.full((M, N), float("nan"), device=device, dtype=dtype)
    _, xa = kernels.lora_forward(x, W, b, A, B, 0.7, p, seed, store_xa=True, xa_mode="split", out=y)
    _, no_xa = kernels.lora_forward(x, W, b, A, B, 0.7, p, seed, xa_mode="split")
    assert no_xa is None
    keep = dropout_mask_torch(seed, M, K, p, device).double() / (1 - p) if p > 0 else 1.0
    x_drop = (x.double() * keep).to(dtype).double()  # the kernels scale x in its own dtype
    xa_ref = (x_drop @ A.double().t()).to(dtype).double()  # rounded before it meets B
    ref = x.double() @ W.double().t() + b.double() + 0.7 * xa_ref @ B.double().t()
    assert_close("y", y, ref, dtype)
    assert xa.shape == (M, r) and xa.dtype == dtype
    assert_close("xa", xa, xa_ref if K else torch.zeros(M, r), dtype)
    ws = lora_shrink_partials(x, A, 4, p, seed)
    splits = shrink_splits(M, K, dtype, 4)[0]
    assert ws.shape == (splits, M, r) and ws.dtype == torch.float32 and 1 <= splits <= 4
    # fp32 sums of x's dtype products (the interpreter may round drop(x) to bf16 differently from torch)
    assert_close("xa partials", ws.sum(0), x_drop @ A.double().t() if K else torch.zeros(M, r), dtype)
    for bad in (0, 2.5, None):
        with pytest.raises(ValueError, match="splits"):
            lora_shrink_partials(x, A, bad)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_persistent_tile_walk_and_descriptor_store(p, device):
    """The large-M launch shape on small tiles: a grid of at most num_sms programs (4 under the interpreter)
    walking 3 x 3 tiles of y and of dX in grouped order, y stored through a tensor descriptor (into `out` and into
    a new tensor). NaN-filled outputs show any tile the walk skips."""
    cfg = kernels.config.GemmConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=1, tma=True, persistent=True,
                                    tma_store=True)
    M, K, N, r, s, seed = 40, 48, 40, 3, 0.7, 99
    x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, device)
    dy = torch.randn(M, N, device=device)
    y = torch.full((M, N), float("nan"), device=device)
    dx = torch.full((M, K), float("nan"), device=device)
    cls = kernels.config.shape_class(M)
    try:
        for kernel in ("fwd", "dx"):
            kernels.config.set_override(kernel, cls, cfg)
        _, xa = kernels.lora_forward(x, W, b, A, B, s, p, seed, store_xa=True, xa_mode="shrink", out=y, tma=True)
        y_new, _ = kernels.lora_forward(x, W, b, A, B, s, p, seed, xa_mode="shrink", tma=True)
        _, dyb = kernels.lora_backward_dx(dy, W, A, B, s, p, seed, dyb_mode="shrink", out=dx, tma=True)
        plans = list(kernels.lora_fwd._PLANS.values()) + list(kernels.lora_bwd._DX_PLANS.values())
        assert plans and all(plan.launch.grid[0] <= kernels.config.num_sms(x.device) for plan in plans)
        assert any(plan.y_tma for plan in kernels.lora_fwd._PLANS.values())
    finally:
        for kernel in ("fwd", "dx"):
            kernels.config.set_override(kernel, cls, None)
    keep = dropout_mask_torch(seed, M, K, p, device) if p > 0 else None
    yr, dxr, _, _ = _reference_grads(x, W, b, A, B, s, p, keep, dy)
    for name, out, ref in (("y", y, yr), ("y (new)", y_new, yr), ("dx", dx, dxr)):
        assert_close(name, out, ref, torch.float32)


@pytest.mark.parametrize("fwd_mode", ["inline", "producer"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("shape", [(40, 48, 40, 3), (33, 17, 50, 16), (1, 20, 9, 1), (70, 40, 24, 64),
                                   (300, 24, 70, 5)], ids=lambda s: "M%d_K%d_N%d_r%d" % s)
def test_inline_shrink_forward_and_dx(shape, tma, fwd_mode, device):
    """The persistent GEMMs compute the rank-r product themselves: xa_mode / dyb_mode "inline" (their shrinking
    programs publish row blocks through flags that the tiles wait for) or "producer" (the first N / K tile of each
    row block accumulates xa / dY @ B in its loop and publishes it; the walk's other tiles wait). NaN-filled y and
    dX show a tile or row the walk skips; xa and dY @ B are checked too. dX with dropout still adds its masked term
    in a second pass. (300 rows: several row blocks and N tiles, so tiles wait on producers other than their own.)"""
    M, K, N, r = shape
    s, seed = 0.7, int(torch.randint(0, 2**31, ()))
    x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, device)
    dy = torch.randn(M, N, device=device)
    y = torch.full((M, N), float("nan"), device=device)
    y2, xa = kernels.lora_forward(x, W, b, A, B, s, store_xa=True, xa_mode=fwd_mode, out=y, tma=tma)
    y_new, no_xa = kernels.lora_forward(x, W, None, A, B, s, xa_mode=fwd_mode, tma=tma)
    assert y2 is y and no_xa is None
    yr, dxr, _, _ = _reference_grads(x, W, b, A, B, s, 0.0, None, dy)
    yr_nb, _, _, _ = _reference_grads(x, W, None, A, B, s, 0.0, None, dy)
    assert_close("y", y, yr, torch.float32)
    assert_close("y (no bias)", y_new, yr_nb, torch.float32)
    assert_close("xa", xa, x.double() @ A.double().t(), torch.float32)
    for p in (0.0, 0.25):
        dx = torch.full((M, K), float("nan"), device=device)
        _, dyb = kernels.lora_backward_dx(dy, W, A, B, s, p, seed, dyb_mode=fwd_mode, out=dx, tma=tma)
        keep = dropout_mask_torch(seed, M, K, p, device) if p > 0 else None
        dxr = _reference_grads(x, W, b, A, B, s, p, keep, dy)[1]
        assert_close(f"dx (p={p})", dx, dxr, torch.float32)
        assert_close(f"dyb (p={p})", dyb, dy.double() @ B.double(), torch.float32)
    plans = [pl for pl in list(kernels.lora_fwd._PLANS.values()) + list(kernels.lora_bwd._DX_PLANS.values())
             if getattr(pl, "inline", False)]
    assert len(plans) >= 3 and all(pl.launch.grid[0] <= kernels.config.num_sms(x.device) for pl in plans)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("shape", [(40, 48, 40, 3), (1, 20, 9, 1), (300, 24, 70, 16)],
                         ids=lambda s: "M%d_K%d_N%d_r%d" % s)
def test_producer_tiles_draw_the_dropout_mask(shape, tma, device):
    """xa_mode="producer" with dropout: the producer tiles apply the forward's mask to the X tiles of their K loop
    (each element drawn once). y (NaN-filled first) and xa against the reference with the same Philox mask, and
    against the "shrink" mode, which draws it in its own launch; a new seed gives a new mask."""
    M, K, N, r = shape
    s, p = 0.7, 0.3
    x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, device)
    seeds = [int(v) for v in torch.randint(0, 2**31, (2,))]
    outs = []
    for seed in seeds:
        y = torch.full((M, N), float("nan"), device=device)
        _, xa = kernels.lora_forward(x, W, b, A, B, s, p, seed, store_xa=True, xa_mode="producer", out=y, tma=tma)
        y_shrink, xa_shrink = kernels.lora_forward(x, W, b, A, B, s, p, seed, store_xa=True, xa_mode="shrink",
                                                   tma=tma)
        keep = dropout_mask_torch(seed, M, K, p, device)
        yr = _reference_grads(x, W, b, A, B, s, p, keep, torch.zeros(M, N, device=device))[0].detach()
        xd = x.double() * keep / (1 - p)
        assert_close("y", y, yr, torch.float32)
        assert_close("xa", xa, xd @ A.double().t(), torch.float32)
        assert_close("y vs shrink", y, y_shrink.double(), torch.float32)
        assert_close("xa vs shrink", xa, xa_shrink.double(), torch.float32)
        outs.append(xa)
    assert not torch.equal(outs[0], outs[1])
    plans = [pl for pl in kernels.lora_fwd._PLANS.values() if pl.producer and pl.dropout_p > 0]
    assert plans and all(pl.launch is not None for pl in plans)


def test_inline_shrink_flags_start_at_zero_and_every_row_block_is_published(device, monkeypatch):
    """The launch contract of the inline and producer modes, call after call of one cached plan: the row-block flags
    the kernel receives are all zero (a fresh buffer per call, so no replay or later call sees an earlier call's
    flags), one per BLOCK_M rows, and after the kernel every one is set (every row block was shrunk and
    published)."""
    seen = []
    original = kernels.launch.Launch.__call__

    def recording(self, *values):
        params = self.fn.arg_names
        inline = any(n in params and self.args[params.index(n)]
                     for n in ("INLINE_XA", "INLINE_DYB", "PRODUCER_XA", "PRODUCER_DYB"))
        if inline:
            flags = values[[params[i] for i in self.slots].index("FLAGS")]
            before = flags.clone()
        original(self, *values)
        if inline:
            seen.append((before, self.args[params.index("BLOCK_M")], flags.clone()))

    monkeypatch.setattr(kernels.launch.Launch, "__call__", recording)
    M, K, N, r = 45, 24, 20, 3
    x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, device)
    dy = torch.randn(M, N, device=device)
    for _ in range(2):  # the second call reuses the plans
        kernels.lora_forward(x, W, b, A, B, 1.0, xa_mode="inline")
        kernels.lora_forward(x, W, b, A, B, 1.0, xa_mode="producer")
        kernels.lora_backward_dx(dy, W, A, B, 1.0, dyb_mode="inline")
        kernels.lora_backward_dx(dy, W, A, B, 1.0, dyb_mode="producer")
    assert len(seen) == 8
    for before, block_m, after in seen:
        assert before.dtype == torch.int32 and before.shape == (-(-M // block_m),)
        assert torch.all(before == 0) and torch.all(after == 1)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_inline_shrink_is_what_auto_picks_for_a_persistent_large_walk(p, device, monkeypatch):
    """With a persistent config for large M (as on Hopper), "auto" computes xa and dY @ B inside the GEMMs (xa by
    producer tiles, or with dropout, where lora_fwd.INLINE_DROPOUT asks for it, by the shrinking programs, which
    draw the mask): a whole lora_linear step (output and all three gradients) through them, against the reference
    with the step's mask."""
    monkeypatch.setattr(kernels.lora_fwd, "INLINE_DROPOUT", True)
    cfg = kernels.config.GemmConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=1, tma=True, persistent=True)
    M, K, N, r, s = 300, 24, 20, 5, 1.3
    x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, device)
    for t in (x, A, B):
        t.requires_grad_()
    kernels.launch.clear_plans()
    try:
        for kernel in ("fwd", "dx"):
            kernels.config.set_override(kernel, "large", cfg)
        torch.manual_seed(3)
        seed = draw_seed()
        torch.manual_seed(3)  # the step draws that seed
        y = lora_fast.lora_linear(x, W, b, A, B, s, p, training=True)
        dy = torch.randn_like(y)
        y.backward(dy)
        fwd = [pl for pl in kernels.lora_fwd._PLANS.values() if pl.y_shape == (M, N)]
        dxp = [pl for pl in kernels.lora_bwd._DX_PLANS.values() if pl.dx_shape == (M, K)]
        assert fwd and all((pl.inline and not pl.producer) if p else pl.producer for pl in fwd)
        assert dxp and all(pl.inline and not pl.producer for pl in dxp)
    finally:
        for kernel in ("fwd", "dx"):
            kernels.config.set_override(kernel, "large", None)
    keep = dropout_mask_torch(seed, M, K, p, device) if p else None
    yr, dxr, dAr, dBr = _reference_grads(x, W, b, A, B, s, p, keep, dy)
    for name, out, ref in (("y", y, yr), ("dx", x.grad, dxr), ("dA", A.grad, dAr), ("dB", B.grad, dBr)):
        assert_close(name, out, ref, torch.float32)


def test_inline_shrink_refuses_what_it_cannot_do(device):
    x, W, b, A, B = lora_problem(8, 16, 12, 3, torch.float32, device)
    x2, W2, b2, A2, B2 = lora_problem(8, 16, 12, 65, torch.float32, device)
    for mode in ("inline", "producer"):
        with pytest.raises(ValueError, match=f"{mode}.*rank"):
            kernels.lora_forward(x2, W2, b2, A2, B2, 1.0, xa_mode=mode)
    for mode in ("inline", "producer"):
        with pytest.raises(ValueError, match=f"{mode}.*dy_scale"):
            kernels.lora_backward_dx(torch.randn(8, 12, device=device), W, A, B, 1.0, dyb_mode=mode,
                                     dy_scale=torch.ones(12, device=device))


def test_inline_shrink_grid(monkeypatch):
    """The shrinking programs are those with a tile fewer to walk, at least half as many as row blocks; with fewer
    tiles than SMs, one extra program per row block; under the interpreter one program shrinks everything."""
    from lora_fast.kernels import helpers

    assert helpers.inline_shrink_grid(1024, 64, 132) == ((132, 1) if helpers.is_interpret() else (132, 32))
    monkeypatch.setattr(helpers, "is_interpret", lambda: False)
    assert helpers.inline_shrink_grid(1024, 64, 132) == (132, 32)   # 8192 x 4096, 128 x 256 tiles: 32 idle
    assert helpers.inline_shrink_grid(3584, 64, 132) == (132, 64)   # N = 14336: 112 idle, 64 blocks
    assert helpers.inline_shrink_grid(1056, 64, 132) == (132, 32)   # no idle position: half the row blocks
    assert helpers.inline_shrink_grid(64, 4, 132) == (68, 4)        # M = 512: a program per row block beside
    assert helpers.inline_shrink_grid(3, 1, 4) == (4, 1)
    assert helpers.inline_shrink_grid(1024, 64, 132, ahead=1) == (132, 64)  # with dropout: one block each
    assert helpers.inline_shrink_grid(3584, 64, 132, ahead=1) == (132, 64)


@pytest.mark.parametrize("shape", [(45, 24, 20, 3), (37, 40, 33, 16), (300, 16, 9, 1)],
                         ids=lambda s: "M%d_K%d_N%d_r%d" % s)
def test_inline_shrink_draws_the_dropout_mask(shape, device):
    """xa_mode="inline" with dropout: the GEMM's shrinking programs draw the mask on X. y and the stored xa (into
    NaN-filled outputs) equal the shrink launch's and the reference with the same seed's mask; the backward with
    that seed then matches the reference too."""
    M, K, N, r = shape
    s, p = 1.1, 0.25
    seed = int(torch.randint(0, 2**31, ()))
    x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, device)
    out = torch.full((M, N), float("nan"), device=device)
    y, xa = kernels.lora_forward(x, W, b, A, B, s, p, seed, store_xa=True, xa_mode="inline", out=out)
    y_s, xa_s = kernels.lora_forward(x, W, b, A, B, s, p, seed, store_xa=True, xa_mode="shrink")
    assert y is out and not torch.isnan(y).any() and not torch.isnan(xa).any()
    keep = dropout_mask_torch(seed, M, K, p, device)
    xd = x.double() * keep / (1 - p)
    assert_close("xa inline", xa, xd @ A.double().T, torch.float32)
    assert_close("xa inline vs shrink", xa, xa_s.double(), torch.float32)
    assert_close("y inline", y, x.double() @ W.double().T + b.double() + s * (xd @ A.double().T) @ B.double().T,
                 torch.float32)
    assert_close("y inline vs shrink", y, y_s.double(), torch.float32)


def test_strided_and_batched_inputs(device):
    """Non-contiguous x (a transposed view, 3-D), W, A and B views: strides are passed, nothing assumed."""
    dtype, s = torch.float32, 2.0
    x = torch.randn(2, 19, 5, device=device, dtype=dtype).transpose(1, 2)  # [2, 5, 19], non-contiguous
    W = torch.randn(19, 23, device=device, dtype=dtype).t()  # [23, 19] with strides (1, 23)
    A = torch.randn(19, 3, device=device, dtype=dtype).t().requires_grad_()  # a leaf view [3, 19]
    B = torch.randn(6, 23, device=device, dtype=dtype)[::2].t()  # [23, 3], strides (1, 46)
    B = B.detach().requires_grad_()
    x = x.detach().requires_grad_()
    y = lora_fast.lora_linear(x, W, None, A, B, s)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dAr, dBr = _reference_grads(x, W, None, A, B, s, 0.0, None, dy)
    assert y.shape == (2, 5, 23)
    for name, out, ref in (("y", y, yr), ("dx", x.grad, dxr), ("dA", A.grad, dAr), ("dB", B.grad, dBr)):
        assert_close(name, out, ref, dtype)


def test_frozen_weight_and_bias_gradients_when_requested(device):
    x, W, b, A, B = lora_problem(9, 12, 10, 2, torch.float64, device)
    for t in (x, W, b, A, B):
        t.requires_grad_()
    y = lora_fast.lora_linear(x, W, b, A, B, 0.5)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close("dW", W.grad, dy.t() @ x.detach(), torch.float64)
    assert_close("db", b.grad, dy.sum(0), torch.float64)


def test_only_some_gradients(device):
    """x without grad (a first layer) and B alone: the paths that skip dX or dA."""
    x, W, b, A, B = lora_problem(11, 20, 13, 4, torch.float32, device)
    B.requires_grad_()
    y = lora_fast.lora_linear(x, W, b, A, B, 1.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close("dB", B.grad, (dy.double().t() @ (x.double() @ A.double().t())), torch.float32)
    A.requires_grad_()
    B.grad = None
    lora_fast.lora_linear(x, W, b, A, B, 1.0).backward(dy)
    assert_close("dA", A.grad, (dy.double() @ B.double()).t() @ x.double(), torch.float32)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_float64(p, device):
    x, W, b, A, B = lora_problem(5, 7, 6, 3, torch.float64, device)
    for t in (x, b, A, B):
        t.requires_grad_()
    seed = 31337

    def fn(x, b, A, B):
        return LoRALinearFunction.apply(x, W, b, A, B, 1.3, p, seed)

    assert torch.autograd.gradcheck(fn, (x, b, A, B), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_dropout_mask_kernel_matches_numpy_philox(device):
    for seed, M, K, p in [(0, 3, 5, 0.5), (2**40 + 7, 17, 33, 0.1), (123456789, 64, 130, 0.9)]:
        got = kernels.dropout_mask(seed, M, K, p, device).cpu()
        want = dropout_mask_torch(seed, M, K, p)
        assert torch.equal(got, want), (seed, M, K, p)


def test_dropout_statistics_and_seeds(device):
    M, K = 64, 256
    for p in (0.1, 0.5):
        keep = kernels.dropout_mask(7, M, K, p, device)
        assert abs(keep.float().mean().item() - (1 - p)) < 0.02
    a, b = kernels.dropout_mask(1, M, K, 0.5, device), kernels.dropout_mask(2, M, K, 0.5, device)
    assert not torch.equal(a, b)
    assert kernels.dropout_mask(5, M, K, 0.0, device).all()
    # Each column has its own 16 bits: neighbours (the two halves of one word, two words of one Philox call)
    # and columns 8 apart (two calls) agree half the time at p = 0.5, not always.
    a = a.float()
    for shift in (1, 2, 4, 8):
        agree = (a[:, shift:] == a[:, :-shift]).float().mean().item()
        assert abs(agree - 0.5) < 0.03, (shift, agree)
    # p is rounded up to a multiple of 2**-16: within 2**-16 of 1, nothing is kept
    assert not kernels.dropout_mask(5, M, K, 1 - 2**-17, device).any()


def test_dropout_same_mask_forward_and_backward(device):
    """The backward regenerates the forward's mask: with B = I-like and W = 0, dx's LoRA term is zero exactly
    where the forward dropped x."""
    M, K, r, p = 8, 16, 16, 0.5
    x = torch.randn(M, K, device=device, requires_grad=True)
    W = torch.zeros(r, K, device=device)
    A = torch.eye(r, K, device=device)
    B = torch.eye(r, r, device=device)
    torch.manual_seed(3)
    y = lora_fast.lora_linear(x, W, None, A, B, 1.0, dropout_p=p, training=True)
    y.backward(torch.ones_like(y))
    kept_fwd = y != 0  # y = drop(x) here
    kept_bwd = x.grad != 0
    assert torch.equal(kept_fwd, kept_bwd)
    assert 0 < kept_fwd.float().mean() < 1


def test_eval_mode_ignores_dropout(device):
    x, W, b, A, B = lora_problem(6, 10, 7, 2, torch.float32, device)
    y = lora_fast.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5, training=False)
    assert_close("y", y, lora_linear_reference(x.double(), W.double(), b.double(), A.double(), B.double(), 1.0),
                 torch.float32)


@pytest.mark.parametrize("p", [0.0, 0.5], ids=["p0", "p0.5"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["dA_dB", "dA", "dB"])
def test_grad_ab_adds_its_split_partials_in_fp32(need, p, device):
    """dA and dB reduce over M in several splits (fp32 partial sums, then one launch that adds them in a fixed
    order, several splits per load): in bf16 each element must be the fp32 sum rounded once, within one bf16 step
    of the float64 value. With dropout dA takes more splits than one load holds (the sum's chunk loop, its last
    chunk partly masked); p = 0.5 keeps drop(x) = 2x exact in bf16, so the one-step bound still holds."""
    M, K, N, r, s = 200, 16, 24, 3, 0.7
    x, dy = torch.randn(M, K, device=device), torch.randn(M, N, device=device)
    xa, dyb = torch.randn(M, r, device=device), torch.randn(M, r, device=device)
    x, dy, xa, dyb = (t.to(torch.bfloat16) for t in (x, dy, xa, dyb))
    kernels.launch.clear_plans()  # the one plan left afterwards is this call's
    dA, dB = kernels.lora_grad_ab(x, dy, xa, dyb, s, torch.bfloat16, torch.bfloat16, p, 5, need_a=need[0],
                                  need_b=need[1])
    plan = next(iter(kernels.lora_bwd._AB_PLANS.values()))
    assert max(plan.splits_a, plan.splits_b) > 2
    if p > 0 and need[0]:
        assert plan.splits_a > kernels.lora_bwd.SUM_SPLIT_CHUNK and plan.splits_a % kernels.lora_bwd.SUM_SPLIT_CHUNK
    keep = kernels.dropout_mask(5, M, K, p, device) if p > 0 else torch.ones(M, K, dtype=torch.bool, device=device)
    xd = x.double() * keep / (1 - p)
    refs = (s * dyb.double().t() @ xd, s * dy.double().t() @ xa.double())
    for name, out, ref, wanted in (("dA", dA, refs[0], need[0]), ("dB", dB, refs[1], need[1])):
        if not wanted:
            assert out is None, name
            continue
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape, name
        step = ref.abs().clamp_min(1e-30).log2().floor().exp2() * 2.0 ** -7  # one bf16 step at each value
        assert ((out.double() - ref).abs() <= step).all(), name


def test_kernel_and_torch_paths_agree(device):
    """The CPU path (lora_fast.naive) and the kernels give the same results, dropout mask included."""
    x, W, b, A, B = lora_problem(21, 30, 14, 3, torch.float64, device)
    dy = torch.randn(21, 14, device=device, dtype=torch.float64)
    for p in (0.0, 0.3):
        yk, xak = kernels.lora_forward(x, W, b, A, B, 0.7, p, 99, store_xa=True)
        yn, xan = naive.lora_forward(x, W, b, A, B, 0.7, p, 99, store_xa=True)
        dxk, dybk = kernels.lora_backward_dx(dy, W, A, B, 0.7, p, 99)
        dxn, dybn = naive.lora_backward_dx(dy, W, A, B, 0.7, p, 99)
        gk = kernels.lora_grad_ab(x, dy, xak, dybk, 0.7, A.dtype, B.dtype, p, 99)
        gn = naive.lora_grad_ab(x, dy, xan, dybn, 0.7, A.dtype, B.dtype, p, 99)
        for name, a, b_ in (("y", yk, yn), ("xa", xak, xan), ("dx", dxk, dxn), ("dA", gk[0], gn[0]),
                            ("dB", gk[1], gn[1])):
            assert rel_err(a, b_) < 1e-12, (name, p)


@pytest.mark.parametrize("path", ["kernels", "naive"])
def test_cpu_dispatch_runs_the_chosen_path(path, monkeypatch):
    """lora_fast.lora_linear on CPU tensors runs the Triton kernels (interpreted) when TRITON_INTERPRET=1 and the
    PyTorch `naive` path otherwise (functional._ops, read at call time): only that path's forward and backward
    launchers run, and the result and gradients match the reference either way."""
    if path == "kernels" and not kernels.is_interpret():
        pytest.skip("CPU tensors run the kernels only under TRITON_INTERPRET=1")
    monkeypatch.setattr(kernels, "is_interpret", lambda: path == "kernels")
    calls = []
    for owner, mod in (("kernels", kernels), ("naive", naive)):
        for fn in ("lora_forward", "lora_backward_dx"):
            original = getattr(mod, fn)

            def spy(*args, _original=original, _tag=(owner, fn), **kwargs):
                calls.append(_tag)
                return _original(*args, **kwargs)

            monkeypatch.setattr(mod, fn, spy)
    assert use_triton(torch.zeros(1)) == (path == "kernels")
    x, W, b, A, B = lora_problem(5, 12, 7, 2, torch.float32, "cpu", True)
    x.requires_grad_()
    y = lora_fast.lora_linear(x, W, b, A, B, 1.5)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert calls == [(path, "lora_forward"), (path, "lora_backward_dx")], calls
    yr, dxr, _, _ = _reference_grads(x, W, b, A, B, 1.5, 0.0, None, dy)
    assert_close("y", y, yr, torch.float32)
    assert_close("dx", x.grad, dxr, torch.float32)
    calls.clear()
    with torch.no_grad():  # the inference call (no autograd Function) dispatches the same way
        assert_close("y no_grad", lora_fast.lora_linear(x, W, b, A, B, 1.5), yr, torch.float32)
    assert calls == [(path, "lora_forward")], calls


@pytest.mark.gpu
def test_cuda_dispatch():
    assert use_triton(torch.zeros(1, device="cuda"))


@pytest.mark.gpu
def test_gpu_matches_cpu_path():
    x, W, b, A, B = lora_problem(300, 257, 129, 7, torch.float32, "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    y = lora_fast.lora_linear(x, W, b, A, B, 2.0)
    yc, _ = naive.lora_forward(x.cpu(), W.cpu(), b.cpu(), A.cpu(), B.cpu(), 2.0)
    assert rel_err(y.cpu(), yc) < 1e-5


def test_seed_tensor_gives_the_int_seeds_results(device):
    """A seed given as a one-element int64 tensor (drawn on the device inside a CUDA graph, read by the kernels
    through a pointer) gives exactly the int seed's mask and results, in every launcher that draws the mask and
    through the autograd Function; a key above 2**32 uses both Philox key words."""
    M, K, N, r, p, s = 19, 64, 13, 3, 0.3, 0.8
    seed = int(torch.randint(2**33, 2**62, (1,)))
    t = torch.tensor([seed], device=device)
    x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, device)
    dy, xa = torch.randn(M, N, device=device), torch.randn(M, r, device=device)
    q = quantize_nf4(torch.randn(N, K, device=device))
    calls = {"forward": lambda sd: kernels.lora_forward(x, W, b, A, B, s, p, sd, store_xa=True),
             "forward fused": lambda sd: kernels.lora_forward(x, W, b, A, B, s, p, sd, store_xa=True, xa_mode="fused"),
             "shrink": lambda sd: (kernels.lora_shrink(x, A, p, sd),),
             "shrink partials": lambda sd: (lora_shrink_partials(x, A, 2, p, sd),),
             "dx": lambda sd: kernels.lora_backward_dx(dy, W, A, B, s, p, sd),
             "dA dB": lambda sd: kernels.lora_grad_ab(x, dy, xa, xa, s, A.dtype, B.dtype, p, sd),
             "nf4 gemv": lambda sd: kernels.nf4_gemv(x[:4], q, b, A, B, s, p, sd, store_xa=True),
             "nf4 forward": lambda sd: kernels.lora_nf4_forward(x, q, b, A, B, s, p, sd, store_xa=True, path="fused"),
             "nf4 dx": lambda sd: kernels.lora_nf4_backward_dx(dy, q, A, B, s, p, sd),
             "mask": lambda sd: (kernels.dropout_mask(sd, M, K, p, device),)}
    for name, call in calls.items():
        for a, b_ in zip(call(seed), call(t)):
            assert torch.equal(a, b_), name
    assert torch.equal(kernels.dropout_mask(t, M, K, p, device).cpu(), dropout_mask_torch(seed, M, K, p))
    grads = []
    for sd in (seed, t):
        leaves = [v.detach().clone().requires_grad_() for v in (x, A, B)]
        y = LoRALinearFunction.apply(leaves[0], W, b, leaves[1], leaves[2], s, p, sd)
        y.backward(dy)
        grads.append([y.detach()] + [v.grad for v in leaves])
    for a, b_ in zip(*grads):
        assert torch.equal(a, b_)
    # outside a CUDA graph capture the eager seed is a host int (no launch)
    assert type(draw_seed(x)) is int


BAD_DROPOUT = [(1.5, 1, ValueError, "dropout_p"), (-0.1, 1, ValueError, "dropout_p"),
               (float("nan"), 1, ValueError, "dropout_p"), (True, 1, TypeError, "dropout_p"),
               ("0.1", 1, TypeError, "dropout_p"), (0.1, 1.5, TypeError, "seed"), (0.1, "7", TypeError, "seed"),
               (0.1, None, TypeError, "seed"), (0.1, -3, ValueError, "seed"), (0.1, 2**64, ValueError, "seed"),
               (0.1, torch.tensor([1.0]), TypeError, "seed"), (0.1, torch.tensor([1, 2]), TypeError, "seed"),
               (0.1, torch.tensor([1], dtype=torch.int32), TypeError, "seed"),
               (0.1, torch.empty(1, dtype=torch.int64, device="meta"), ValueError, "seed")]


@pytest.mark.parametrize("p,seed,err,name", BAD_DROPOUT)
def test_launchers_reject_bad_dropout_arguments(p, seed, err, name, device):
    """Every kernel launcher that draws the mask names a dropout_p outside [0, 1) or a seed that is neither an int in
    [0, 2**63) nor a one-element int64 tensor on the operands' device, before any launch (p = 1.5 used to drop
    everything and scale by -2, silently)."""
    x, W, b, A, B = lora_problem(4, 64, 8, 2, torch.float32, device)
    dy, xa = torch.randn(4, 8, device=device), torch.randn(4, 2, device=device)
    q = quantize_nf4(torch.randn(8, 64, device=device))
    calls = [lambda: kernels.lora_forward(x, W, b, A, B, 1.0, dropout_p=p, seed=seed),
             lambda: kernels.lora_shrink(x, A, p, seed),
             lambda: lora_shrink_partials(x, A, 2, p, seed),
             lambda: kernels.lora_backward_dx(dy, W, A, B, 1.0, p, seed),
             lambda: kernels.lora_grad_ab(x, dy, xa, xa, 1.0, A.dtype, B.dtype, p, seed),
             lambda: kernels.nf4_gemv(x, q, b, A, B, 1.0, dropout_p=p, seed=seed),
             lambda: kernels.lora_nf4_forward(x, q, b, A, B, 1.0, dropout_p=p, seed=seed, path="fused"),
             lambda: kernels.lora_nf4_backward_dx(dy, q, A, B, 1.0, dropout_p=p, seed=seed),
             lambda: kernels.dropout_mask(seed, 4, 64, p, device)]
    for call in calls:
        with pytest.raises(err, match=name):
            call()
    # a numpy integer is an int, and without dropout any int seed in range is accepted
    kernels.lora_shrink(x, A, 0.1, np.int64(5))
    kernels.lora_shrink(x, A, 0.0, 2**63 - 1)


@pytest.mark.parametrize("scaling,err", [(float("nan"), ValueError), (float("inf"), ValueError), ("2", TypeError),
                                         (None, TypeError), (True, TypeError)])
def test_launchers_reject_bad_scaling(scaling, err, device):
    """A NaN or infinite scaling made every output NaN, a string was parsed: each launcher now names it."""
    x, W, b, A, B = lora_problem(4, 64, 8, 2, torch.float32, device)
    dy, xa = torch.randn(4, 8, device=device), torch.randn(4, 2, device=device)
    q = quantize_nf4(torch.randn(8, 64, device=device))
    calls = [lambda: kernels.lora_forward(x, W, b, A, B, scaling),
             lambda: kernels.lora_backward_dx(dy, W, A, B, scaling),
             lambda: kernels.lora_grad_ab(x, dy, xa, xa, scaling, A.dtype, B.dtype),
             lambda: kernels.nf4_gemv(x, q, b, A, B, scaling),
             lambda: kernels.lora_nf4_forward(x, q, b, A, B, scaling, path="fused"),
             lambda: kernels.lora_nf4_backward_dx(dy, q, A, B, scaling)]
    for call in calls:
        with pytest.raises(err, match="scaling"):
            call()


def test_launchers_check_flags_dtypes_and_splits(device):
    """Options that used to be taken by truthiness ("no" stored xa), gradient dtypes that were not float, a
    missing rank product (an AttributeError before) and NF4 split counts that were 0 (silently automatic), 1.5 or
    negative (a ZeroDivisionError)."""
    x, W, b, A, B = lora_problem(4, 64, 8, 2, torch.float32, device)
    dy, xa = torch.randn(4, 8, device=device), torch.randn(4, 2, device=device)
    q = quantize_nf4(torch.randn(8, 64, device=device))
    with pytest.raises(TypeError, match="store_xa"):
        kernels.lora_forward(x, W, b, A, B, 1.0, store_xa="no")
    with pytest.raises(TypeError, match="store_dyb"):
        kernels.lora_backward_dx(dy, W, A, B, 1.0, store_dyb=1)
    with pytest.raises(TypeError, match="need_a"):
        kernels.lora_grad_ab(x, dy, xa, xa, 1.0, A.dtype, B.dtype, need_a="yes")
    with pytest.raises(TypeError, match="a_dtype"):
        kernels.lora_grad_ab(x, dy, xa, xa, 1.0, torch.int32, B.dtype)
    with pytest.raises(TypeError, match="b_dtype"):
        kernels.lora_grad_ab(x, dy, xa, xa, 1.0, A.dtype, "float32")
    with pytest.raises(ValueError, match="dyb"):
        kernels.lora_grad_ab(x, dy, xa, None, 1.0, A.dtype, B.dtype)
    with pytest.raises(ValueError, match="xa"):
        kernels.lora_grad_ab(x, dy, None, xa, 1.0, A.dtype, B.dtype)
    with pytest.raises(ValueError, match="xa or dyb"):
        kernels.lora_grad_ab(x, dy, None, None, 1.0, A.dtype, B.dtype, need_a=False, need_b=False)
    for splits in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="splits"):
            kernels.nf4_gemv(x, q, b, A, B, 1.0, splits=splits)
    with pytest.raises(TypeError, match="store_xa"):
        kernels.nf4_gemv(x, q, b, A, B, 1.0, store_xa="yes")
    for M, K, name in ((2.0, 8, "M"), (2, -1, "K"), (True, 8, "M")):
        with pytest.raises(ValueError, match=name):
            kernels.dropout_mask(1, M, K, 0.1, device)


def test_launchers_reject_mismatched_shapes(device):
    x, W, b, A, B = lora_problem(4, 8, 6, 2, torch.float32, device)
    with pytest.raises(ValueError, match="lora_B"):
        kernels.lora_forward(x, W, b, A, B[:, :1], 1.0)
    with pytest.raises(ValueError, match="bias"):
        kernels.lora_forward(x, W, b[:3], A, B, 1.0)
    with pytest.raises(ValueError, match="lora_A"):  # K is read off the weight: A no longer matches it
        kernels.lora_backward_dx(torch.randn(4, 6, device=device), W[:, :5], A, B, 1.0)
    with pytest.raises(ValueError, match="weight"):
        kernels.lora_backward_dx(torch.randn(4, 5, device=device), W, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        kernels.lora_shrink(x, A.double())
    with pytest.raises(ValueError, match="xa"):
        kernels.lora_grad_ab(x, torch.randn(4, 6, device=device), torch.randn(3, 2, device=device),
                             torch.randn(4, 2, device=device), 1.0, A.dtype, B.dtype)


def test_launchers_name_a_tensor_of_the_wrong_rank(device):
    """A 1-D or 3-D operand (or a non-tensor) used to fail unpacking its shape ("not enough values to unpack"),
    naming no argument: every launcher that reads M, K or N off an operand now names it."""
    x, W, b, A, B = lora_problem(4, 8, 6, 2, torch.float32, device)
    dy, r2 = torch.randn(4, 6, device=device), torch.randn(4, 2, device=device)
    calls = [(ValueError, "x", lambda: kernels.lora_forward(x[None], W, b, A, B, 1.0)),
             (ValueError, "weight", lambda: kernels.lora_forward(x, W[0], b, A, B, 1.0)),
             (ValueError, "x", lambda: kernels.lora_shrink(x[0], A)),
             (ValueError, "dy", lambda: kernels.lora_backward_dx(dy[0], W, A, B, 1.0)),
             (TypeError, "weight", lambda: kernels.lora_backward_dx(dy, "W", A, B, 1.0)),
             (ValueError, "x", lambda: kernels.lora_grad_ab(x[None], dy, r2, r2, 1.0, A.dtype, B.dtype)),
             (ValueError, "xa", lambda: kernels.lora_grad_ab(x, dy, r2[0], r2, 1.0, A.dtype, B.dtype)),
             (ValueError, "weight", lambda: kernels.dora_norm(W[0], A, B, 1.0, torch.rand(6, device=device))),
             (ValueError, "u", lambda: kernels.column_dot(dy[0], dy[0])),
             (ValueError, "u", lambda: kernels.scale_columns(dy[None], torch.rand(6, device=device)))]
    for err, name, call in calls:
        with pytest.raises(err, match=f"^{name} must"):
            call()


@pytest.mark.parametrize("shape", [(300, 24, 70, 16), (290, 37, 20, 3), (260, 16, 9, 1)],
                         ids=lambda s: "M%d_K%d_N%d_r%d" % s)
def test_dx_dropout_term_added_by_grad_ab(shape, device, monkeypatch):
    """With dropout above MAX_FUSED_ROWS rows, dX comes back from lora_backward_dx(dropout_term=False) without its
    term s * drop'((dY B) A), and dA's programs in lora_grad_ab(dx=, lora_A=) add it with the mask they draw
    for dA. Launchers: dx then equals the one-launcher result and the reference (dx NaN-free), dA and dB equal
    the unfused call's bit for bit. lora_linear: the training step takes that path (kernels.dx_term_in_grad_ab)
    and its gradients equal those with the switch off and the reference's."""
    M, K, N, r = shape
    s, p = 0.7, 0.3
    seed = int(torch.randint(0, 2**31, ()))
    x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, device)
    dy = torch.randn(M, N, device=device)
    xa = kernels.lora_shrink(x, A, p, seed)
    dx_full, dyb = kernels.lora_backward_dx(dy, W, A, B, s, p, seed)
    dA_ref, dB_ref = kernels.lora_grad_ab(x, dy, xa, dyb, s, A.dtype, B.dtype, p, seed)
    dx_part, dyb2 = kernels.lora_backward_dx(dy, W, A, B, s, p, seed, dropout_term=False)
    assert torch.equal(dyb2, dyb)
    assert_close("dx without its term", dx_part, dy.double() @ W.double(), torch.float32)
    dA, dB = kernels.lora_grad_ab(x, dy, xa, dyb, s, A.dtype, B.dtype, p, seed, dx=dx_part, lora_A=A)
    assert torch.equal(dA, dA_ref) and torch.equal(dB, dB_ref)
    assert not torch.isnan(dx_part).any()
    assert_close("dx with dA's term", dx_part, dx_full.double(), torch.float32)
    keep = dropout_mask_torch(seed, M, K, p, device)
    assert_close("dx vs reference", dx_part, _reference_grads(x, W, b, A, B, s, p, keep, dy)[1], torch.float32)
    assert kernels.dx_term_in_grad_ab(M, r, p) and not kernels.dx_term_in_grad_ab(M, r, 0.0)
    assert not kernels.dx_term_in_grad_ab(256, r, p) and not kernels.dx_term_in_grad_ab(M, 65, p)

    def step(switch):
        monkeypatch.setattr(kernels.lora_bwd, "DX_TERM_IN_AB", switch)
        xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
        torch.manual_seed(7)  # the same dropout seed for both steps
        y = lora_fast.lora_linear(xg, W, b, Ag, Bg, s, p, True)
        return torch.autograd.grad(y, [xg, Ag, Bg], dy)

    calls = []
    real = kernels.lora_grad_ab
    monkeypatch.setattr(kernels, "lora_grad_ab", lambda *a, **k: (calls.append(k.get("dx") is not None), real(*a, **k))[1])
    fused, plain = step(True), step(False)
    assert calls == [True, False]
    for name, g1, g2 in zip(("dx", "dA", "dB"), fused, plain):
        assert_close(name, g1, g2.double(), torch.float32)


@pytest.mark.parametrize("shape", [(40, 24, 20, 3, "shrink", torch.float32), (37, 40, 33, 1, "inline", torch.float32),
                                   (33, 56, 16, 20, "inline", torch.float32), (50, 40, 24, 5, "shrink", torch.float16)],
                         ids=lambda s: "M%d_K%d_N%d_r%d_%s_%s" % (*s[:5], str(s[5])[6:]))
def test_dx_dropout_term_in_the_epilogue(shape, device, monkeypatch):
    """lora_backward_dx(term_epilogue=True): with dropout and dY @ B precomputed ("shrink", "inline"), the GEMM's
    epilogue adds the masked term s * drop'((dY B) A) in column slices of its tile instead of a pass of its own.
    dx (into a NaN-filled out) equals the pass's and the reference's; no term pass is launched; r = 20 takes two
    rank chunks per slice; "producer" keeps its pass; a bad value is refused."""
    M, K, N, r, mode, dtype = shape
    s, p = 0.9, 0.3
    seed = int(torch.randint(0, 2**31, ()))
    x, W, b, A, B = lora_problem(M, K, N, r, dtype, device)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    made = []

    class Spy(kernels.lora_bwd.Launch):
        def __init__(self, fn, *args, **kw):
            made.append(fn.__name__)
            super().__init__(fn, *args, **kw)

    monkeypatch.setattr(kernels.lora_bwd, "Launch", Spy)
    kernels.launch.clear_plans()
    dx_pass, _ = kernels.lora_backward_dx(dy, W, A, B, s, p, seed, dyb_mode=mode, term_epilogue=False)
    assert "_lora_dx_dropout_term_kernel" in made
    made.clear()
    out = torch.full((M, K), float("nan"), device=device, dtype=dtype)
    dx, dyb = kernels.lora_backward_dx(dy, W, A, B, s, p, seed, dyb_mode=mode, term_epilogue=True, out=out)
    assert made == ["_lora_bwd_dx_kernel"] and dx is out and not torch.isnan(dx).any()
    keep = dropout_mask_torch(seed, M, K, p, device)
    ref = dy.double() @ W.double() + s * ((dy.double() @ B.double()) @ A.double()) * keep / (1 - p)
    assert_close("dx, term in the epilogue", dx, ref, dtype)
    assert_close("dx, epilogue against the pass", dx, dx_pass.double(), dtype)
    made.clear()
    kernels.lora_backward_dx(dy, W, A, B, s, p, seed, dyb_mode="producer", term_epilogue=True)
    assert "_lora_dx_dropout_term_kernel" in made
    with pytest.raises(ValueError, match="term_epilogue"):
        kernels.lora_backward_dx(dy, W, A, B, s, p, seed, term_epilogue="yes")


def test_dx_dropout_term_arguments_are_checked(device):
    x, W, b, A, B = lora_problem(300, 16, 12, 3, torch.float32, device)
    dy = torch.randn(300, 12, device=device)
    xa, dyb = torch.randn(300, 3, device=device), torch.randn(300, 3, device=device)
    dx = torch.zeros(300, 16, device=device)
    with pytest.raises(ValueError, match="dx and lora_A"):
        kernels.lora_grad_ab(x, dy, xa, dyb, 1.0, A.dtype, B.dtype, 0.1, 3, dx=dx)
    with pytest.raises(ValueError, match="dropout_p > 0"):
        kernels.lora_grad_ab(x, dy, xa, dyb, 1.0, A.dtype, B.dtype, 0.0, 3, dx=dx, lora_A=A)
    with pytest.raises(ValueError, match="need_a"):
        kernels.lora_grad_ab(x, dy, xa, dyb, 1.0, A.dtype, B.dtype, 0.1, 3, need_a=False, dx=dx, lora_A=A)
    with pytest.raises(ValueError, match="dx"):
        kernels.lora_grad_ab(x, dy, xa, dyb, 1.0, A.dtype, B.dtype, 0.1, 3, dx=dx[:, :15], lora_A=A)
    with pytest.raises(ValueError, match="fused"):
        kernels.lora_backward_dx(dy, W, A, B, 1.0, 0.1, 3, dyb_mode="fused", dropout_term=False)
    with pytest.raises(ValueError, match="store_dyb"):
        kernels.lora_backward_dx(dy, W, A, B, 1.0, 0.1, 3, store_dyb=False, dropout_term=False)
    with pytest.raises(TypeError, match="dropout_term"):
        kernels.lora_backward_dx(dy, W, A, B, 1.0, 0.1, 3, dropout_term=None)
