"""Initialisation schemes (lora_fast.init, LoRALinear(init=...), apply_lora(init=...)), PiSSA against PEFT."""
import copy
import math

import pytest
import torch
from torch import nn

from lora_fast import LoRALinear, apply_lora
from lora_fast.init import INIT_SCHEMES, init_lora, truncated_svd

from .utils import assert_close, rel_err


def _output_at_init(layer, base_weight, base_bias, device):
    x = torch.randn(5, layer.in_features, device=device, dtype=layer.weight.dtype)
    ref = x.double() @ base_weight.double().T + base_bias.double()
    return layer.eval()(x), ref


@pytest.mark.parametrize("init", ["default", "gaussian", "nonzero", "pissa"])
def test_output_at_init_equals_base(init, device):
    torch.manual_seed(0)
    base = nn.Linear(23, 17, device=device)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear.from_linear(base, rank=3, alpha=5, init=init)
    assert layer.init == init
    y, ref = _output_at_init(layer, w0, b0, device)
    assert_close(f"y at init ({init})", y, ref, torch.float32)
    if init in ("default", "gaussian"):
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.equal(layer.weight, w0)
    else:  # both factors nonzero, W compensated (in place, shared with base)
        assert torch.count_nonzero(layer.lora_B) > 0 and torch.count_nonzero(layer.lora_A) > 0
        assert layer.weight is base.weight and not torch.equal(layer.weight, w0)
        assert_close("W_new + s*B@A", layer.weight.double() + layer.delta_weight().double(), w0, torch.float32)
        assert layer.init_error < 1e-6


def test_default_and_gaussian_distributions():
    torch.manual_seed(0)
    W = torch.zeros(6, 4000)
    A, B, new, err = init_lora(W, 4, "default")
    assert new is None and err is None and torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(4000)  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    A, B, _, _ = init_lora(W, 4, "gaussian")
    # PEFT's init_lora_weights="gaussian": nn.init.normal_(lora_A, std=1 / r)
    assert A.std().item() == pytest.approx(1 / 4, rel=0.03) and abs(A.mean().item()) < 0.01
    assert torch.count_nonzero(B) == 0
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(init_lora(W, 2, "nonzero", generator=g1).A, init_lora(W, 2, "nonzero", generator=g2).A)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)])
def test_nonzero_compensation_rounding(dtype, bound):
    """W_new + s*B@A misses W only by the rounding of W_new to its dtype (at most the unit roundoff)."""
    torch.manual_seed(1)
    W = (torch.randn(40, 36) / 6).to(dtype)
    A, B, new, err = init_lora(W, 4, "nonzero", scaling=2.0)
    assert new.dtype == dtype and A.dtype == dtype
    direct = rel_err(new.double() + 2.0 * B.double() @ A.double(), W)
    assert err == pytest.approx(direct, rel=0.05, abs=1e-7)
    assert err <= bound


def _exact_top_r(W, r):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_residual_and_top_singular_part(use_rslora):
    torch.manual_seed(2)
    base = nn.Linear(30, 22)
    w0 = base.weight.detach().clone()
    layer = LoRALinear.from_linear(base, rank=4, alpha=6, use_rslora=use_rslora, init="pissa")
    assert layer.scaling == (6 / 2 if use_rslora else 6 / 4)
    principal = layer.lora_B.double() @ layer.lora_A.double() * layer.scaling
    assert_close("s*B@A = top-4 SVD part of W", principal, _exact_top_r(w0, 4), torch.float32)
    assert_close("W_res + s*B@A = W", layer.weight.double() + principal, w0, torch.float32)
    # sqrt(S/s) in both factors: A A^T = B^T B = diag(S_r / s)
    AAt, BtB = layer.lora_A.double() @ layer.lora_A.double().T, layer.lora_B.double().T @ layer.lora_B.double()
    assert_close("A A^T = B^T B", AAt, BtB, torch.float32)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_matches_peft(use_rslora):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(26, 19), nn.ReLU(), nn.Linear(19, 7))
    ours = apply_lora(copy.deepcopy(model), ["0", "2"], rank=3, alpha=5, use_rslora=use_rslora, init="pissa")
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["0", "2"], init_lora_weights="pissa", use_rslora=use_rslora)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    for i in ("0", "2"):
        pl, ol = peft_model.base_model.model.get_submodule(i), ours.get_submodule(i)
        pA, pB = pl.lora_A["default"].weight.detach(), pl.lora_B["default"].weight.detach()
        assert ol.scaling == pytest.approx(pl.scaling["default"])
        # Singular vectors are defined up to a sign per component (flipping in A and B together).
        sign = torch.sign((ol.lora_A * pA).sum(1))
        assert_close(f"{i}.lora_A", ol.lora_A * sign[:, None], pA, torch.float32)
        assert_close(f"{i}.lora_B", ol.lora_B * sign[None, :], pB, torch.float32)
        assert_close(f"{i}.weight (residual)", ol.weight, pl.base_layer.weight.detach(), torch.float32)
    x = torch.randn(4, 26)
    assert_close("model output", ours(x), peft_model(x).detach(), torch.float32)


def test_pissa_randomized_svd():
    torch.manual_seed(4)
    # A clear spectral gap after 3 components: the randomized range finder recovers them accurately.
    W = torch.randn(40, 3) @ torch.randn(3, 36) + 1e-3 * torch.randn(40, 36)
    A, B, new, err = init_lora(W, 3, "pissa", scaling=2.0, pissa_niter=2)
    assert_close("W_res + s*B@A = W", new.double() + 2.0 * B.double() @ A.double(), W, torch.float32)
    assert_close("randomized top-3 part", 2.0 * B.double() @ A.double(), _exact_top_r(W, 3), torch.float32)
    U, S, Vh = truncated_svd(W, 3, niter=2)
    assert U.shape == (40, 3) and S.shape == (3,) and Vh.shape == (3, 36)


def test_from_delta_error_is_eckart_young(device, caplog):
    torch.manual_seed(5)
    W = torch.randn(21, 27, device=device) / 5
    exact = torch.randn(21, 2, device=device) @ torch.randn(2, 27, device=device)
    layer = LoRALinear(27, 21, rank=2, alpha=4, init="from_delta", delta=exact, device=device)
    assert layer.init_error < 1e-6
    assert_close("s*B@A = dW (rank 2)", layer.delta_weight(), exact, torch.float32)
    full = torch.randn(21, 27, device=device)
    with caplog.at_level("INFO", logger="lora_fast"):
        A, B, new, err = init_lora(W, 3, "from_delta", scaling=0.5, delta=full)
    assert new is None and "relative error" in caplog.text
    S = torch.linalg.svdvals(full.double())
    assert err == pytest.approx((S[3:].square().sum() / S.square().sum()).sqrt().item(), rel=1e-4)
    # The layer computes W x + best rank-3 approximation of dW.
    layer = LoRALinear(27, 21, rank=3, alpha=1.5, init="from_delta", delta=full, device=device)
    x = torch.randn(3, 27, device=device)
    ref = x.double() @ (layer.weight.double() + _exact_top_r(full, 3)).T + layer.bias.double()
    assert_close("y", layer.eval()(x), ref, torch.float32)


def test_apply_lora_init_and_deltas():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8))
    deltas = {"0": torch.randn(10, 1) @ torch.randn(1, 12), "2": torch.randn(8, 1) @ torch.randn(1, 10)}
    apply_lora(model, ["0", "2"], rank=1, alpha=2, init="from_delta", deltas=deltas)
    for name, d in deltas.items():
        assert_close(name, model.get_submodule(name).delta_weight(), d, torch.float32)
    with pytest.raises(ValueError, match="deltas has no entry"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], init="from_delta", deltas={})
    # a key that matches no module (a typo) would silently drop its delta: refused before the model changes
    typo = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"did not match: \['1'\]"):
        apply_lora(typo, ["0"], init="from_delta", deltas={"0": torch.zeros(4, 4), "1": torch.zeros(4, 4)})
    assert isinstance(typo[0], nn.Linear) and typo[0].weight.requires_grad
    with pytest.raises(ValueError, match="deltas"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], init="pissa", deltas={"0": torch.zeros(4, 4)})
    with pytest.raises(TypeError, match="deltas must be a mapping"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], init="from_delta", deltas=[torch.zeros(4, 4)])


def test_zeros_refused_with_reason():
    with pytest.raises(ValueError, match="zero gradients|never learns"):
        LoRALinear(8, 8, rank=2, init="zeros")
    with pytest.raises(ValueError, match="never learns"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], init="zeros")
    with pytest.raises(ValueError, match="never learns"):
        init_lora(torch.zeros(4, 4), 1, "zeros")


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"scheme": "kaiming"}, ValueError, "init must be one of"),
    ({"scheme": 3}, TypeError, "init must be a string"),
    ({"scheme": "from_delta"}, ValueError, "needs delta"),
    ({"scheme": "from_delta", "delta": torch.zeros(5, 6)}, ValueError, "delta must be"),
    ({"scheme": "pissa", "delta": torch.zeros(6, 5)}, ValueError, "only used by init='from_delta'"),
    ({"scheme": "default", "pissa_niter": 2}, ValueError, "pissa_niter is only used"),
    ({"scheme": "pissa", "pissa_niter": -1}, ValueError, "pissa_niter must be"),
    ({"scheme": "pissa", "rank": 7}, ValueError, "exceeds min"),
    ({"scheme": "pissa", "scaling": 0.0}, ValueError, "scaling"),
    ({"rank": 0}, ValueError, "rank"),
])
def test_bad_arguments(kwargs, exc, match):
    args = {"weight": torch.randn(6, 5), "rank": 2, **kwargs}
    with pytest.raises(exc, match=match):
        init_lora(**args)


def test_schemes_listed_and_reset_on_merged_layer_refused():
    assert set(INIT_SCHEMES) == {"default", "gaussian", "nonzero", "pissa", "from_delta"}
    layer = LoRALinear(6, 5, rank=1)
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        layer.reset_lora_parameters("pissa")


def test_forced_zeros_gives_exactly_zero_gradients(device):
    """Why "zeros" is refused: through the fused kernels, dA and dB are exactly zero when A = B = 0."""
    torch.manual_seed(7)
    layer = LoRALinear(19, 13, rank=3, alpha=6, dropout=0.1, device=device)
    with torch.no_grad():
        layer.lora_A.zero_()
    x = torch.randn(6, 19, device=device, requires_grad=True)
    layer.train()(x).square().sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0 and torch.count_nonzero(layer.lora_B.grad) == 0
    assert torch.count_nonzero(x.grad) > 0  # the base path still back-propagates


def _load_example(name):
    import importlib
    import os
    import sys
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    sys.path.insert(0, examples)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(examples)


def test_experiment_init_claims(tmp_path):
    """examples/exp_init.py (2 steps): forced zeros has exactly zero gradients and never moves; default and the
    compensated inits start on the base output, the uncompensated nonzero init does not."""
    import json
    exp = _load_example("exp_init")
    exp.run(_load_example("exp_common").parse_args(exp.__doc__, ["--steps", "2", "--out", str(tmp_path), "--device", "cpu"]))
    rows = {r[0]: r for r in json.load(open(tmp_path / "exp_init.json"))["table"]["rows"]}
    assert rows["zeros (forced)"][5] == 0.0 and rows["zeros (forced)"][6] == 0.0 and rows["zeros (forced)"][7] == 0.0
    for init in ("default", "gaussian"):
        assert rows[init][1] < 1e-6 and rows[init][5] > 0   # B = 0: the base output up to GEMM summation order
    assert rows["nonzero"][1] < 1e-5 and rows["pissa"][1] < 1e-5 and rows["nonzero, uncompensated"][1] > 0.1
    assert (tmp_path / "exp_init.md").exists()


def test_experiment_rank_runs(tmp_path, monkeypatch):
    """examples/exp_rank.py at its default (small, CPU) size: the SVD's rank-r optimum falls with r and is 0 from
    the target's rank 8; and what the adapters *learn* reaches it: within 0.02 of it below rank 8, under 1e-2
    from rank 8 (the run takes ~10 s on the plain-PyTorch path; the interpreter would take minutes)."""
    import json
    import lora_fast.kernels
    monkeypatch.setattr(lora_fast.kernels, "is_interpret", lambda: False)
    exp = _load_example("exp_rank")
    exp.run(_load_example("exp_common").parse_args(exp.__doc__, ["--out", str(tmp_path), "--device", "cpu"]))
    rows = json.load(open(tmp_path / "exp_rank.json"))["table"]["rows"]
    assert [r[0] for r in rows] == [1, 2, 4, 8, 16, 64]
    assert all(r[2] == 0.0 for r in rows if r[0] >= 8) and rows[0][2] > rows[1][2] > rows[2][2] > 0
    for r, learned, optimum, *_ in rows:
        assert learned < 1e-2 if r >= 8 else abs(learned - optimum) < 0.02, (r, learned, optimum)


def test_experiment_variants_runs(tmp_path, monkeypatch):
    """examples/exp_variants.py (2 steps): every variant trains, is reported with its parameter count (VeRA far
    fewer than rank-8 LoRA, DoRA a magnitude vector more), and the table and JSON are written. On the plain-PyTorch
    CPU path (what the script runs without TRITON_INTERPRET): through the interpreter its 15 trainings take minutes,
    and the kernels are checked elsewhere."""
    import json
    import lora_fast.kernels
    monkeypatch.setattr(lora_fast.kernels, "is_interpret", lambda: False)
    exp = _load_example("exp_variants")
    exp.main(["--steps", "2", "--out", str(tmp_path), "--device", "cpu"])
    rows = {r[0]: r for r in json.load(open(tmp_path / "exp_variants.json"))["table"]["rows"]}
    assert set(rows) == {"lora", "lora+", "pissa", "dora", "vera"}
    assert rows["lora"][1] == rows["lora+"][1] == rows["pissa"][1] < rows["dora"][1]
    assert rows["vera"][1] < rows["lora"][1] / 4
    assert all(0.0 < r[5] < 10.0 for r in rows.values()) and (tmp_path / "exp_variants.md").exists()


def test_nonzero_init_is_small():
    """"nonzero": both factors random and small (issue 6): s*B@A a small change of a kaiming-initialised W, so the
    compensated W stays near W (B on fan-in r made ||s*B@A|| about 1.15 ||W||)."""
    torch.manual_seed(3)
    W = torch.empty(1024, 1024)
    nn.init.kaiming_uniform_(W, a=5 ** 0.5)
    A, B, new, _ = init_lora(W, 16, "nonzero", scaling=2.0)
    assert torch.count_nonzero(A) > 0 and torch.count_nonzero(B) > 0
    ratio = float((2.0 * B @ A).norm() / W.norm())
    assert 0.01 < ratio < 0.25, ratio
    assert float((new - W).norm() / W.norm()) < 0.25
