"""DoRA: fused dora_linear / DoRALinear against a plain fp64 reference and against PEFT's DoRA (real PEFT)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fast
from lora_fast import kernels, naive
from lora_fast.dora import DoRALinear, apply_dora, dora_linear, dora_scale, dora_weight_norm
from lora_fast.functional import draw_seed
from lora_fast.philox import dropout_mask_torch
from tests.utils import REL_TOL, assert_close, lora_problem

DEV = "cpu"


def dora_reference(x, W, b, A, B, m, s, keep=None, p=0.0):
    """PEFT's DoRA in fp64, written out: detached norm, bias unscaled, base on undropped x."""
    x, W, A, B, m = (t.double() for t in (x, W, A, B, m))
    b = b.double() if b is not None else None
    norm = (W + s * B @ A).norm(dim=1).detach()
    g = m / norm
    xd = x if keep is None else torch.where(keep, x / (1 - p), torch.zeros((), dtype=x.dtype))
    return F.linear(x, W, b) + (g - 1) * F.linear(xd, W) + g * ((s * (xd @ A.t())) @ B.t())


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(t is not None) if t is not None else None for t in ts]


def _check_grads(out, ref, ins, ref_ins, names, dtype):
    dy = torch.randn_like(ref)
    out.backward(dy.to(out.dtype))
    ref.backward(dy)
    assert_close("y", out, ref, dtype)
    for name, a, r in zip(names, ins, ref_ins):
        if a is not None:
            assert_close(f"d{name}", a.grad, r.grad, dtype)


@pytest.mark.parametrize("M,K,N,r,bias,dtype", [
    (7, 19, 23, 3, True, torch.float32),   # odd K, N and rank
    (1, 16, 33, 1, False, torch.float32),  # one row, rank 1
    (9, 24, 20, 4, True, torch.bfloat16),
])
def test_dora_matches_reference(M, K, N, r, bias, dtype):
    torch.manual_seed(0)
    x, W, b, A, B = lora_problem(M, K, N, r, dtype, DEV, bias)
    m = (torch.rand(N, dtype=dtype) + 0.5)
    s = 1.7
    ins = _leaves(x, b, A, B, m)
    ref_ins = _leaves(*(t.double() if t is not None else None for t in (x, b, A, B, m)))
    out = dora_linear(ins[0], W, ins[1], ins[2], ins[3], ins[4], s)
    ref = dora_reference(ref_ins[0], W.double(), ref_ins[1], ref_ins[2], ref_ins[3], ref_ins[4], s)
    _check_grads(out, ref, ins, ref_ins, ["x", "bias", "A", "B", "magnitude"], dtype)


def test_dora_dropout_matches_reference():
    torch.manual_seed(1)
    M, K, N, r, p, s = 6, 21, 18, 3, 0.3, 0.9
    x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, DEV)
    m = torch.rand(N) + 0.5
    ins = _leaves(x, A, B, m)
    ref_ins = _leaves(x.double(), A.double(), B.double(), m.double())
    torch.manual_seed(5)
    seed = draw_seed()
    keep = dropout_mask_torch(seed, M, K, p)
    torch.manual_seed(5)
    out = dora_linear(ins[0], W, b, ins[1], ins[2], ins[3], s, dropout_p=p, training=True)
    ref = dora_reference(ref_ins[0], W, b, ref_ins[1], ref_ins[2], ref_ins[3], s, keep=keep, p=p)
    _check_grads(out, ref, ins, ref_ins, ["x", "A", "B", "magnitude"], torch.float32)
    with torch.no_grad():  # eval: no dropout at all
        assert_close("eval y", dora_linear(x, W, b, A, B, m, s, dropout_p=p, training=False),
                     dora_reference(x, W, b, A, B, m, s), torch.float32)


def test_zero_magnitude_column_gradient_is_exact():
    torch.manual_seed(2)
    x, W, b, A, B = lora_problem(5, 16, 12, 2, torch.float32, DEV)
    m = torch.rand(12) + 0.5
    m[[0, 7]] = 0.0  # g = 0: y holds no z there, so dm must be recomputed
    ins = _leaves(x, m)
    ref_ins = _leaves(x.double(), m.double())
    out = dora_linear(ins[0], W, b, A, B, ins[1], 2.0)
    ref = dora_reference(ref_ins[0], W, b, A, B, ref_ins[1], 2.0)
    _check_grads(out, ref, ins, ref_ins, ["x", "magnitude"], torch.float32)


def test_weight_norm_without_merged_weight():
    torch.manual_seed(3)
    _, W, _, A, B = lora_problem(1, 37, 29, 5, torch.float32, DEV)  # K = 37 spans three K tiles, N = 29 two row tiles
    m = torch.rand(29) + 0.5
    ref = (W.double() + 1.3 * B.double() @ A.double()).norm(dim=1)
    assert_close("norm", dora_weight_norm(W, A, B, 1.3), ref, torch.float32)
    norm, g = kernels.dora_norm(W, A, B, 1.3, m)
    assert_close("kernel norm", norm, ref, torch.float32)
    assert_close("kernel g", g, m.double() / ref, torch.float32)
    assert_close("naive g", naive.dora_norm(W, A, B, 1.3, m)[1], m.double() / ref, torch.float32)
    Wb, Ab, Bb = W.bfloat16(), A.bfloat16(), B.bfloat16()
    ref_b = (Wb.double() + 1.3 * Bb.double() @ Ab.double()).norm(dim=1)
    assert_close("bf16 norm", dora_scale(Wb, Ab, Bb, 1.3, m)[0], ref_b, torch.float32)  # fp32 math on bf16 tiles


def test_launcher_scale_vectors_write_every_element():
    """The kernels' out_scale / dy_scale against the naive launchers, outputs NaN-filled first."""
    torch.manual_seed(4)
    M, K, N, r = 5, 18, 22, 3
    x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, DEV)
    g = torch.rand(N) + 0.5
    y = torch.full((M, N), float("nan"))
    kernels.lora_forward(x, W, b, A, B, 1.5, out=y, out_scale=g)
    assert_close("y", y, naive.lora_forward(x, W, b, A, B, 1.5, out_scale=g)[0], torch.float32)
    dy = torch.randn(M, N)
    dx = torch.full((M, K), float("nan"))
    for mode in ("fused", "shrink"):
        _, dyb = kernels.lora_backward_dx(dy, W, A, B, 1.5, dyb_mode=mode, out=dx, dy_scale=g)
        ref_dx, ref_dyb = naive.lora_backward_dx(dy, W, A, B, 1.5, dy_scale=g)
        assert_close(f"dx {mode}", dx, ref_dx, torch.float32)
        assert_close(f"dyb {mode}", dyb, ref_dyb, torch.float32)
    v = torch.randn(M, N)
    assert_close("column_dot", kernels.column_dot(dy, v, b), naive.column_dot(dy.double(), v.double(), b.double()),
                 torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,N", [(1, 1), (37, 45), (70, 19), (0, 5)])
def test_scale_columns_one_pass(M, N, dtype):
    """g * u (rounded once to u's dtype) and the column dot of the same pass, against plain PyTorch: odd shapes,
    several row splits, a strided u, with and without v and bias; every element of the scaled copy written."""
    u = torch.randn(N, M, dtype=dtype).t()  # strided: [M, N] with unit row stride
    v, bias = torch.randn(M, N, dtype=dtype), torch.randn(N, dtype=dtype)
    g = torch.rand(N) + 0.5
    want = (u.float() * g).to(dtype)
    for args in ((), (v,), (v, bias)):
        scaled, dot = kernels.scale_columns(u, g, *args)
        assert scaled.shape == (M, N) and scaled.dtype == dtype and scaled.is_contiguous()
        if dtype == torch.float32 or not kernels.is_interpret():
            assert torch.equal(scaled, want), args
        else:  # the interpreter rounds fp32 -> bf16 its own way: within one bf16 step of torch's rounding
            torch.testing.assert_close(scaled.float(), want.float(), rtol=2**-7, atol=0)
        if not args:
            assert dot is None
            continue
        ref = naive.column_dot(u.double(), v.double(), bias.double() if len(args) == 2 else None)
        assert dot.dtype == torch.float32 and torch.allclose(dot.double(), ref, rtol=1e-5, atol=1e-4), args
        assert torch.equal(naive.scale_columns(u, g, *args)[0], want)
    with pytest.raises(TypeError, match="g"):
        kernels.scale_columns(u, None)
    with pytest.raises(ValueError, match="g"):
        kernels.scale_columns(u, torch.rand(N + 1))
    with pytest.raises(ValueError, match="v"):
        kernels.scale_columns(u, g, torch.randn(M + 1, N, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,K,N,r,zeros", [
    (21, 19, 37, 3, [0, 17, 36]),   # three column blocks, a zero in each; odd K, N, rank
    (9, 24, 40, 1, [20]),            # one block with a zero, two without; rank 1
    (7, 16, 30, 5, []),              # no zero: dot / m only
    (0, 16, 12, 2, [3]),             # no rows: dm is zero, the zero column included
])
def test_magnitude_grad_on_device(M, K, N, r, zeros, dtype):
    """kernels.magnitude_grad against the fp64 formula: dot / m, and z recomputed for the zero-magnitude columns
    (only there), with several partial-sum splits and a strided x; magnitude in fp32 or x's dtype."""
    x, W, _, A, B = lora_problem(M, K, N, r, dtype, DEV, bias=False)
    x = torch.randn(K, M, dtype=dtype).t()  # strided [M, K]
    dy = torch.randn(M, N, dtype=dtype)
    parts = torch.randn(3, N)
    s = 1.3
    for mag_dtype in (torch.float32, dtype):
        m = (torch.rand(N) + 0.5).to(mag_dtype)
        m[zeros] = 0.0
        norm = (W.double() + s * B.double() @ A.double()).norm(dim=1)
        z = x.double() @ W.double().t() + s * (x.double() @ A.double().t()) @ B.double().t()
        want = parts.double().sum(0) / torch.where(m == 0, 1.0, m.double())
        want[zeros] = (dy.double()[:, zeros] * z[:, zeros]).sum(0) / norm[zeros]
        for ops in (kernels, naive):
            dm = ops.magnitude_grad(parts, m, norm.float(), dy, x, W, A, B, s)
            assert dm.shape == (N,) and dm.dtype == mag_dtype
            assert_close(f"{ops.__name__} dm", dm, want, dtype)
            if dtype == torch.float32:
                assert_close(f"{ops.__name__} dm zeros", dm[zeros], want[zeros], dtype)
    with pytest.raises(ValueError, match="partials"):
        kernels.magnitude_grad(parts.double(), m, norm.float(), dy, x, W, A, B, s)
    with pytest.raises(ValueError, match="norm"):
        kernels.magnitude_grad(parts, m, norm, dy, x, W, A, B, s)
    with pytest.raises(ValueError, match="magnitude"):
        kernels.magnitude_grad(parts, m[:-1], norm.float(), dy, x, W, A, B, s)


def test_empty_batch():
    _, W, b, A, B = lora_problem(1, 16, 12, 2, torch.float32, DEV)
    x = torch.randn(0, 16, requires_grad=True)
    m = (torch.rand(12) + 0.5).requires_grad_()
    y = dora_linear(x, W, b, A, B, m, 2.0)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert torch.equal(m.grad, torch.zeros(12))


class _Tiny(nn.Module):
    def __init__(self, K, N, bias=True):
        super().__init__()
        self.lin = nn.Linear(K, N, bias=bias)

    def forward(self, x):
        return self.lin(x)


class _MaskDropout(nn.Module):
    """nn.Dropout with lora-fast's Philox mask, seeded like lora_fast (draw_seed): PEFT then sees our mask."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        x2d = x.reshape(-1, x.shape[-1])
        keep = dropout_mask_torch(draw_seed(), x2d.shape[0], x2d.shape[1], self.p)
        return torch.where(keep, x2d / (1 - self.p), torch.zeros(())).reshape(x.shape)


def run_against_peft(peft_model, ours, x, train):
    """Forward both in train(train) mode from the same CPU RNG state (so a dropout draws the same seed), backward
    the same dY, and compare the outputs and dx."""
    peft_model.train(train)
    ours.train(train)
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(9)
    yp = peft_model(xp)
    torch.manual_seed(9)
    yo = ours(xo)
    dy = torch.randn_like(yp)
    yp.backward(dy)
    yo.backward(dy)
    assert_close("y", yo, yp, torch.float32)
    assert_close("dx", xo.grad, xp.grad, torch.float32)


@pytest.mark.parametrize("dropout,train", [(0.0, True), (0.25, True), (0.25, False)])
def test_dora_matches_peft(dropout, train):
    peft = pytest.importorskip("peft")
    torch.manual_seed(6)
    K, N, r, alpha = 20, 14, 4, 6
    base = _Tiny(K, N)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["lin"], use_dora=True, lora_dropout=dropout))
    pl = pm.base_model.model.lin
    with torch.no_grad():
        pl.lora_B["default"].weight.normal_(0, 0.3)
        pl.lora_magnitude_vector["default"].weight.uniform_(0.5, 1.5)
    if dropout:
        pl.lora_dropout["default"] = _MaskDropout(dropout)
    ours = DoRALinear.from_linear(copy.deepcopy(base.lin), rank=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        ours.lora_A.copy_(pl.lora_A["default"].weight)
        ours.lora_B.copy_(pl.lora_B["default"].weight)
        ours.lora_magnitude.copy_(pl.lora_magnitude_vector["default"].weight)
    run_against_peft(pm, ours, torch.randn(2, 4, K), train)
    tol = torch.float32
    assert_close("dA", ours.lora_A.grad, pl.lora_A["default"].weight.grad, tol)
    assert_close("dB", ours.lora_B.grad, pl.lora_B["default"].weight.grad, tol)
    assert_close("dm", ours.lora_magnitude.grad, pl.lora_magnitude_vector["default"].weight.grad, tol)
    if not train or not dropout:  # PEFT's merge agrees with ours
        with torch.no_grad():
            pl.merge()
            ours.merge()
        assert_close("merged W", ours.weight, pl.base_layer.weight, tol)


def test_dora_init_merge_unmerge_and_apply():
    torch.manual_seed(7)
    layer = DoRALinear(19, 13, rank=3, alpha=6)
    with torch.no_grad():  # LoRA's init (B = 0) and m = ||W||: the output is the base linear's
        x = torch.randn(4, 19)
        assert_close("init", layer(x), F.linear(x, layer.weight, layer.bias), torch.float32)
        assert_close("m init", layer.lora_magnitude, layer.weight.norm(dim=1), torch.float32)
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(1.3)
        y = layer(x)
        w0 = layer.weight.clone()
        layer.merge()
        assert layer.merged
        assert_close("merged", layer(x), y, torch.float32)
        layer.unmerge()
        assert_close("unmerged W", layer.weight, w0, torch.float32)
        assert_close("unmerged y", layer(x), y, torch.float32)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "lora_magnitude"}

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    apply_dora(model, ["0"], rank=2, alpha=4)
    assert isinstance(model[0], DoRALinear) and isinstance(model[2], nn.Linear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.lora_A", "0.lora_B", "0.lora_magnitude"}
    assert lora_fast.DoRALinear is DoRALinear
    c = lora_fast.count_parameters(model).by_variant["dora"]
    assert (c.modules, c.trainable, c.adapter) == (1, 2 * 8 + 8 * 2 + 8, 2 * 8 + 8 * 2 + 8)


def test_apply_dora_init_schemes():
    """apply_dora takes apply_lora's init=: with PiSSA (W <- residual, A and B from its top singular vectors) and
    with a given delta the output at init still equals the base layer's (the magnitude starts at the row norms of
    W + s B A); "zeros" and a from_delta without deltas are refused before any layer changes."""
    torch.manual_seed(3)
    for init, kw in (("pissa", {}), ("pissa", {"pissa_niter": 2}), ("gaussian", {}),
                     ("from_delta", {"deltas": {"0": torch.randn(8, 1) @ torch.randn(1, 12)}})):
        model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4))
        x = torch.randn(5, 12)
        y0 = model[0](x).detach().clone()
        apply_dora(model, ["0"], rank=2, alpha=4, init=init, **kw)
        assert isinstance(model[0], DoRALinear)
        if init != "from_delta":
            assert_close(f"{init} at init", model[0](x), y0, torch.float32)
        else:  # A and B carry the delta: s * B @ A equals dW (rank 1), and the magnitude matches W + dW
            assert_close("from_delta", model[0].lora_B @ model[0].lora_A * model[0].scaling, kw["deltas"]["0"],
                         torch.float32)
    model = nn.Sequential(nn.Linear(12, 8))
    w0 = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="never learns"):
        apply_dora(model, ["0"], init="zeros")
    with pytest.raises(ValueError, match="deltas"):
        apply_dora(model, ["0"], init="from_delta")
    with pytest.raises(TypeError, match="deltas must be a mapping"):
        apply_dora(model, ["0"], init="from_delta", deltas=[w0])
    assert isinstance(model[0], nn.Linear) and torch.equal(model[0].weight, w0)


def test_dora_bad_input():
    x, W, b, A, B = lora_problem(3, 16, 12, 2, torch.float32, DEV)
    m = torch.ones(12)
    with pytest.raises(ValueError, match="magnitude"):
        dora_linear(x, W, b, A, B, torch.ones(11), 2.0)
    with pytest.raises(TypeError, match="magnitude"):
        dora_linear(x, W, b, A, B, [1.0] * 12, 2.0)
    with pytest.raises(ValueError, match="dropout_p"):
        dora_linear(x, W, b, A, B, m, 2.0, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match="lora_B"):
        dora_linear(x, W, b, A, B[:, :1], m, 2.0)
    with pytest.raises(TypeError, match="model"):
        apply_dora("not a model", ["q"])
    with pytest.raises(ValueError, match="matched no"):
        apply_dora(nn.Sequential(nn.Linear(4, 4)), ["q_proj"])


def test_dora_under_autocast():
    """fp32 parameters under CPU bf16 autocast: bf16 kernels, fp32 gradients, close to the fp32 result."""
    torch.manual_seed(10)
    layer = DoRALinear(24, 20, rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    x = torch.randn(6, 24)
    ref = dora_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling)
    check_bf16_autocast(layer, x, ref, [layer.lora_A, layer.lora_B, layer.lora_magnitude])


def check_bf16_autocast(layer, x, ref, params):
    """layer(x) under CPU bf16 autocast: a bf16 output close to `ref`, and fp32 gradients for the fp32 `params`."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close("y", y, ref, torch.bfloat16)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


def test_dora_frozen_input_and_frozen_magnitude():
    """The branches where x needs no gradient (dyb from the shrink kernel) and where m is frozen (y not saved)."""
    torch.manual_seed(11)
    x, W, b, A, B = lora_problem(5, 18, 14, 3, torch.float32, DEV)
    m = torch.rand(14) + 0.5
    ins = _leaves(A, B, m)
    ref_ins = _leaves(A.double(), B.double(), m.double())
    out = dora_linear(x, W, b, ins[0], ins[1], ins[2], 1.5)
    ref = dora_reference(x, W, b, ref_ins[0], ref_ins[1], ref_ins[2], 1.5)
    _check_grads(out, ref, ins, ref_ins, ["A", "B", "magnitude"], torch.float32)
    xg, Ag = _leaves(x, A)
    dora_linear(xg, W, b, Ag, B, m, 1.5).sum().backward()
    xr, Ar = _leaves(x.double(), A.double())
    dora_reference(xr, W, b, Ar, B, m, 1.5).sum().backward()
    assert_close("dx, m frozen", xg.grad, xr.grad, torch.float32)
    assert_close("dA, m frozen", Ag.grad, Ar.grad, torch.float32)


@pytest.mark.parametrize("scaling,err", [(float("nan"), ValueError), (float("inf"), ValueError), ("1.3", TypeError)])
def test_dora_norm_launcher_checks_scaling(scaling, err):
    W, A, B, m = torch.randn(8, 64), torch.randn(2, 64), torch.randn(8, 2), torch.rand(8)
    with pytest.raises(err, match="scaling"):
        kernels.dora_norm(W, A, B, scaling, m)


@pytest.mark.parametrize("case", ["pissa_rank", "pissa_nan", "nonzero_nan"])
def test_apply_dora_failure_on_a_later_layer_leaves_the_model_unchanged(case):
    """replace_linears builds every DoRALinear before swapping, and "pissa" / "nonzero" rewrite the shared base
    weight in place: a failure on layer '2' must not leave layer '0''s nn.Linear weight rewritten (or frozen)."""
    from tests.test_layers import _assert_unchanged, _model_state, _two_layers

    model = _two_layers(16, 4)
    init, rank = case.split("_")[0], 8 if case == "pissa_rank" else 2  # 8 > min(4, 16) of layer '2' only
    if case.endswith("nan"):  # found only while building layer '2'
        with torch.no_grad():
            model[2].weight[1, 3] = float("nan")
    x = torch.randn(3, 64)
    with torch.no_grad():
        y0 = model(x)
    state = _model_state(model)
    with pytest.raises(ValueError, match="'2'"):
        apply_dora(model, ["0", "2"], rank=rank, init=init)
    with torch.no_grad():
        _assert_unchanged(model, state, x, y0)


def test_apply_dora_deferred_rewrite_equals_the_direct_init():
    """The base rewrite of "pissa" / "nonzero" written after every layer was built, and the magnitude computed
    from the rewritten W: bit for bit DoRALinear.from_linear's, and the output at init is the base's."""
    from tests.test_layers import _two_layers

    for init in ("pissa", "nonzero"):
        model = _two_layers(16, 8)
        ref = copy.deepcopy(model)
        x = torch.randn(3, 64)
        with torch.no_grad():
            y0 = model(x)
        torch.manual_seed(1)
        apply_dora(model, ["0", "2"], rank=3, alpha=6, init=init)
        torch.manual_seed(1)
        direct = [DoRALinear.from_linear(ref[i], 3, 6, init=init) for i in (0, 2)]
        for ours, theirs in zip((model[0], model[2]), direct):
            for name in ("weight", "lora_A", "lora_B", "lora_magnitude"):
                assert torch.equal(getattr(ours, name), getattr(theirs, name)), (init, name)
        with torch.no_grad():
            assert_close(f"{init} at init", model(x), y0, torch.float32)
