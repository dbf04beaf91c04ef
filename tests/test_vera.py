"""VeRA: fused vera_linear / VeRALinear against a plain fp64 reference and against PEFT's VeRA (real PEFT)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fast
from lora_fast.functional import draw_seed
from lora_fast.philox import dropout_mask_torch
from lora_fast.vera import VeRALinear, VeRAProjections, apply_vera, shared_projections, vera_linear
from tests.test_dora import _MaskDropout, _check_grads, _leaves, check_bf16_autocast, run_against_peft
from tests.utils import assert_close, lora_problem

DEV = "cpu"


def vera_reference(x, W, b, A, B, d, lb, keep=None, p=0.0):
    """y = x W^T + b + lb * ((d * (drop(x) A^T)) B^T) in fp64, as PEFT writes it."""
    x, W, A, B, d, lb = (t.double() for t in (x, W, A, B, d, lb))
    xd = x if keep is None else torch.where(keep, x / (1 - p), torch.zeros((), dtype=x.dtype))
    return F.linear(x, W, None if b is None else b.double()) + lb * F.linear(d * F.linear(xd, A), B)


@pytest.mark.parametrize("M,K,N,r,bias,dtype,p", [
    (7, 19, 23, 3, True, torch.float32, 0.0),   # odd K, N and rank
    (1, 16, 33, 1, False, torch.float32, 0.0),  # one row, rank 1
    (6, 21, 18, 5, True, torch.float32, 0.3),   # dropout
    (300, 21, 18, 5, True, torch.float32, 0.3),  # dropout above 256 rows: dX's term added by dA's programs
    (9, 24, 20, 4, True, torch.bfloat16, 0.0),
])
def test_vera_matches_reference(M, K, N, r, bias, dtype, p):
    torch.manual_seed(0)
    x, W, b, A, B = lora_problem(M, K, N, r, dtype, DEV, bias)
    d, lb = torch.randn(r, dtype=dtype), torch.randn(N, dtype=dtype)
    ins = _leaves(x, b, d, lb)
    ref_ins = _leaves(*(t.double() if t is not None else None for t in (x, b, d, lb)))
    keep = None
    if p:
        torch.manual_seed(3)
        keep = dropout_mask_torch(draw_seed(), M, K, p)
        torch.manual_seed(3)
    out = vera_linear(ins[0], W, ins[1], A, B, ins[2], ins[3], dropout_p=p, training=True)
    ref = vera_reference(ref_ins[0], W, ref_ins[1], A, B, ref_ins[2], ref_ins[3], keep, p)
    _check_grads(out, ref, ins, ref_ins, ["x", "bias", "lambda_d", "lambda_b"], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("r,K,N", [(1, 19, 33), (3, 300, 17), (20, 16, 1), (2, 4100, 70)])
def test_fold_and_lambda_grad_kernels(r, K, N, dtype):
    """kernels.scale_rows / row_dots (VeRA's fold and lambda gradients) against the torch expressions: odd sizes (K past one column block,
    more rows than one row block), strided operands and lambdas, fp32 lambdas on half factors, outputs NaN-free;
    each gradient alone."""
    from lora_fast import kernels

    A = torch.randn(K, r, dtype=dtype).t()  # strided [r, K]
    B = torch.randn(N, r, dtype=dtype)
    d = torch.randn(2 * r)[::2]  # strided fp32 lambda
    lb = torch.randn(N, dtype=dtype)
    a_d, b_b = kernels.scale_rows(A, d, B, lb, dtype)
    assert a_d.is_contiguous() and b_b.is_contiguous() and a_d.dtype == b_b.dtype == dtype
    want_a, want_b = (A * d[:, None]).to(dtype), (B * lb[:, None]).to(dtype)
    if dtype == torch.bfloat16:  # the interpreter rounds fp32 -> bf16 its own way: within one bf16 step
        torch.testing.assert_close(a_d.float(), want_a.float(), rtol=2**-7, atol=0)
        torch.testing.assert_close(b_b.float(), want_b.float(), rtol=2**-7, atol=0)
    else:
        torch.testing.assert_close(a_d, want_a, rtol=1e-6, atol=0)
        torch.testing.assert_close(b_b, want_b, rtol=1e-6, atol=0)
    acc = torch.promote_types(dtype, torch.float32)
    d_ad, d_bb = torch.randn(r, K, dtype=acc), torch.randn(r, N, dtype=acc).t()
    want_d = (d_ad.double() * A.double()).sum(1)
    want_lb = (d_bb.double() * B.double()).sum(1)
    dd, dlb = kernels.row_dots(d_ad, A, d_bb, B, torch.float32, dtype)
    assert dd.dtype == torch.float32 and dlb.dtype == dtype
    # fp32 sums of fp32 x half products (fp64 for fp64), then rounded to the output dtype
    tol_d = 1e-7 if dtype == torch.float64 else 1e-5 * K**0.5  # fp64 sums rounded to the fp32 output
    assert (dd.double() - want_d).norm() <= tol_d * want_d.norm(), (dd, want_d)
    tol_b = {torch.float64: 1e-12, torch.float32: 1e-5 * r**0.5, torch.bfloat16: 2**-7}[dtype]  # one bf16 step (the interpreter's rounding)
    assert (dlb.double() - want_lb).norm() <= tol_b * want_lb.norm(), (dlb, want_lb)
    only_d = kernels.row_dots(d_ad, A, None, B, torch.float32, dtype)
    only_b = kernels.row_dots(None, A, d_bb, B, torch.float32, dtype)
    assert only_d[1] is None and only_b[0] is None
    assert torch.equal(only_d[0], dd) and torch.equal(only_b[1], dlb)
    with pytest.raises(ValueError, match="va"):
        kernels.scale_rows(A, torch.randn(r + 1), B, lb, dtype)
    with pytest.raises(ValueError, match="vb"):
        kernels.row_dots(d_ad, A, d_bb, B[:-1] if N > 1 else B[:, :0], torch.float32, dtype)
    with pytest.raises(ValueError, match="va"):
        kernels.row_dots(d_ad, None, d_bb, B, torch.float32, dtype)
    with pytest.raises(ValueError, match="vb"):
        kernels.scale_rows(A, d, B, None, dtype)


def test_empty_batch():
    _, W, b, A, B = lora_problem(1, 16, 12, 2, torch.float32, DEV)
    x = torch.randn(0, 16, requires_grad=True)
    d, lb = torch.ones(2, requires_grad=True), torch.ones(12, requires_grad=True)
    y = vera_linear(x, W, b, A, B, d, lb)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert torch.equal(d.grad, torch.zeros(2)) and torch.equal(lb.grad, torch.zeros(12))


class _Two(nn.Module):
    def __init__(self, K, N):
        super().__init__()
        self.lin = nn.Linear(K, N)
        self.out = nn.Linear(N, K - 3)  # a second shape: the shared projections take the largest dims

    def forward(self, x):
        return self.out(self.lin(x))


@pytest.mark.parametrize("dropout,train", [(0.0, True), (0.2, True)])
def test_vera_matches_peft(dropout, train):
    peft = pytest.importorskip("peft")
    torch.manual_seed(6)
    K, N, r, key = 20, 14, 4, 1234
    base = _Two(K, N)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(
        r=r, target_modules=["lin", "out"], projection_prng_key=key, vera_dropout=dropout, save_projection=True))
    ours = apply_vera(copy.deepcopy(base), ["lin", "out"], rank=r, dropout=dropout, seed=key)
    # The seed alone reproduces PEFT's shared projections (its kaiming init on a seeded CPU generator).
    assert torch.equal(ours.lin.projections.vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(ours.lin.projections.vera_B, pm.base_model.vera_B["default"])
    pairs = []
    for name in ("lin", "out"):
        pl, ol = getattr(pm.base_model.model, name), getattr(ours, name)
        with torch.no_grad():
            pl.vera_lambda_b["default"].normal_()
            pl.vera_lambda_d["default"].normal_()
            ol.vera_lambda_b.copy_(pl.vera_lambda_b["default"])
            ol.vera_lambda_d.copy_(pl.vera_lambda_d["default"])
        if dropout:
            pl.vera_dropout["default"] = _MaskDropout(dropout)
        pairs.append((pl, ol))
    run_against_peft(pm, ours, torch.randn(2, 3, K), train)
    f32 = torch.float32
    for pl, ol in pairs:
        assert_close("dlambda_d", ol.vera_lambda_d.grad, pl.vera_lambda_d["default"].grad, f32)
        assert_close("dlambda_b", ol.vera_lambda_b.grad, pl.vera_lambda_b["default"].grad, f32)
    if not dropout:
        with torch.no_grad():
            pm.merge_adapter()
            for pl, ol in pairs:
                ol.merge()
                assert_close("merged W", ol.weight, pl.base_layer.weight, f32)


def test_projections_shared_and_stored_once():
    a = VeRALinear(12, 10, rank=3, seed=5)
    b = VeRALinear(12, 10, rank=3, seed=5)
    c = VeRALinear(12, 10, rank=3, seed=6)
    assert a.projections is b.projections is shared_projections(12, 10, 3, 5)
    assert c.projections is not a.projections
    assert set(a.state_dict()) == {"weight", "bias", "vera_lambda_d", "vera_lambda_b"}
    model = _Two(10, 12)
    apply_vera(model, ["lin", "out"], rank=3)
    keys = [k for k in model.state_dict() if "vera_A" in k or "vera_B" in k]
    assert keys == ["lin.vera_projections.vera_A", "lin.vera_projections.vera_B"]  # once, on the first layer
    assert model.out.projections is model.lin.projections
    # lin [12, 10] and out [7, 12]: the projections take the largest in (12) and out (12) features
    assert model.lin.projections.vera_A.shape == (3, 12) and model.lin.projections.vera_B.shape == (12, 3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "lin.vera_lambda_d", "lin.vera_lambda_b", "out.vera_lambda_d", "out.vera_lambda_b"}
    assert lora_fast.VeRALinear is VeRALinear
    c = lora_fast.count_parameters(model).by_variant["vera"]  # lambdas + the projections, stored once
    assert (c.modules, c.trainable, c.adapter) == (2, 3 + 12 + 3 + 7, 3 + 12 + 3 + 7 + 2 * 3 * 12)


def test_vera_init_merge_unmerge():
    torch.manual_seed(8)
    layer = VeRALinear(19, 13, rank=3)
    x = torch.randn(4, 19)
    with torch.no_grad():
        assert_close("init", layer(x), F.linear(x, layer.weight, layer.bias), torch.float32)  # lambda_b = 0
        assert torch.all(layer.vera_lambda_d == 0.1)
        layer.vera_lambda_b.normal_()
        y = layer(x)
        w0 = layer.weight.clone()
        layer.merge()
        assert_close("merged", layer(x), y, torch.float32)
        layer.unmerge()
        assert_close("unmerged W", layer.weight, w0, torch.float32)


def test_vera_bad_input():
    x, W, b, A, B = lora_problem(3, 16, 12, 2, torch.float32, DEV)
    d, lb = torch.ones(2), torch.ones(12)
    with pytest.raises(ValueError, match="lambda_d"):
        vera_linear(x, W, b, A, B, torch.ones(3), lb)
    with pytest.raises(ValueError, match="lambda_b"):
        vera_linear(x, W, b, A, B, d, torch.ones(2, 6))
    with pytest.raises(TypeError, match="lambda_b"):
        vera_linear(x, W, b, A, B, d, None)
    with pytest.raises(ValueError, match="dropout"):
        vera_linear(x, W, b, A, B, d, lb, dropout_p=-0.1, training=True)
    with pytest.raises(ValueError, match="vera_A"):
        vera_linear(x, W, b, A[:, :5], B, d, lb)
    with pytest.raises(ValueError, match="does not fit"):
        VeRALinear(12, 10, rank=3, projections=VeRAProjections(8, 10, 3))
    with pytest.raises(ValueError, match="rank"):
        VeRALinear(12, 10, rank=4, projections=VeRAProjections(12, 10, 3))
    with pytest.raises(ValueError, match="matched no"):
        apply_vera(nn.Sequential(nn.Linear(4, 4)), ["q_proj"])


def test_vera_under_autocast():
    torch.manual_seed(10)
    layer = VeRALinear(24, 20, rank=4)
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
    x = torch.randn(6, 24)
    A, B = layer.factors()
    ref = vera_reference(x, layer.weight, layer.bias, A, B, layer.vera_lambda_d, layer.vera_lambda_b)
    check_bf16_autocast(layer, x, ref, [layer.vera_lambda_d, layer.vera_lambda_b])


def test_vera_frozen_input():
    """x needs no gradient: dY @ B_b comes from the shrink kernel."""
    torch.manual_seed(12)
    x, W, b, A, B = lora_problem(5, 18, 14, 3, torch.float32, DEV)
    ins = _leaves(torch.randn(3), torch.randn(14))
    ref_ins = _leaves(ins[0].double(), ins[1].double())
    out = vera_linear(x, W, b, A, B, ins[0], ins[1])
    ref = vera_reference(x, W, b, A, B, ref_ins[0], ref_ins[1])
    _check_grads(out, ref, ins, ref_ins, ["lambda_d", "lambda_b"], torch.float32)
