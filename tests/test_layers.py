"""LoRALinear, apply_lora, count_parameters, and the argument checks of every public entry point."""
import copy
import math

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import LoRALinear, apply_lora, count_parameters
from lora_fast.reference import ReferenceLoRALinear, lora_linear_reference

from .utils import assert_close


def test_from_linear_equals_base_at_init_and_shares_weight(device):
    base = nn.Linear(24, 18, device=device)
    layer = LoRALinear.from_linear(base, rank=4, alpha=8, dropout=0.1)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (18, 4) and layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / math.sqrt(24)  # kaiming-uniform with a = sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.abs().max() <= bound
    x = torch.randn(5, 24, device=device)
    layer.eval()
    assert_close("y", layer(x), base(x), torch.float32)


def test_module_matches_reference_module(device):
    ref = ReferenceLoRALinear(20, 12, rank=3, alpha=6, bias=True, device=device)
    nn.init.normal_(ref.lora_B.weight)
    ours = LoRALinear(20, 12, rank=3, alpha=6, device=device)
    ours.load_state_dict({"weight": ref.base.weight, "bias": ref.base.bias, "lora_A": ref.lora_A.weight,
                          "lora_B": ref.lora_B.weight})
    x = torch.randn(2, 7, 20, device=device)
    assert_close("y", ours(x), ref(x).detach(), torch.float32)


def test_rslora_scaling():
    assert LoRALinear(8, 8, rank=16, alpha=32, use_rslora=True).scaling == pytest.approx(32 / 4)
    assert LoRALinear(8, 8, rank=16, alpha=32).scaling == pytest.approx(2.0)


def test_merge_unmerge_round_trip(device):
    layer = LoRALinear(33, 17, rank=3, alpha=5, device=device)
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 33, device=device)
    y0 = layer(x)
    layer.merge()
    assert layer.merged
    assert_close("merged weight", layer.weight, w0.double() + layer.delta_weight().double(), torch.float32)
    assert_close("merged y", layer(x), y0.detach(), torch.float32)
    layer.merge()  # idempotent
    layer.unmerge()
    assert not layer.merged
    assert (layer.weight - w0).abs().max() <= 1e-6 * w0.abs().max()
    assert "merged=False" in repr(layer) and "rank=3" in repr(layer)


def test_state_dict_round_trip(device):
    a = LoRALinear(10, 6, rank=2, device=device)
    nn.init.normal_(a.lora_B)
    sd = a.state_dict()
    assert list(sd) == ["weight", "bias", "lora_A", "lora_B"]
    b = LoRALinear(10, 6, rank=2, device=device)
    b.load_state_dict(sd)
    x = torch.randn(3, 10, device=device)
    assert torch.equal(a(x), b(x))


def test_training_step_updates_only_lora(device):
    layer = LoRALinear(16, 8, rank=2, device=device)
    w0 = layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(4, 16, device=device)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(layer.weight, w0)
    assert torch.count_nonzero(layer.lora_B) > 0


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16, bias=False)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.mlp(self.norm(self.q_proj(x) + self.v_proj(x)))


def test_apply_lora_swaps_targets_and_freezes_the_rest(device):
    model = _Block().to(device)
    x = torch.randn(3, 16, device=device)
    y0 = model(x)
    total0 = count_parameters(model).total
    apply_lora(model, ["q_proj", "v_proj", "mlp.2"], rank=4, alpha=8)
    assert isinstance(model.q_proj, LoRALinear) and isinstance(model.v_proj, LoRALinear)
    assert isinstance(model.mlp[2], LoRALinear) and isinstance(model.mlp[0], nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B", "mlp.2.lora_A",
                         "mlp.2.lora_B"}
    assert_close("y at init", model(x), y0.detach(), torch.float32)
    count = count_parameters(model)
    lora = 3 * 4 * 16 + 3 * 16 * 4 + 4 * 32 - 4 * 16  # q, v: 4x16 + 16x4; mlp.2: 4x32 + 16x4
    assert count.trainable == lora and count.total == total0 + lora
    assert "trainable params" in str(count)


def test_apply_lora_regex_and_no_match():
    model = _Block()
    apply_lora(model, r"(q|v)_proj", rank=2)
    assert isinstance(model.q_proj, LoRALinear) and isinstance(model.mlp[0], nn.Linear)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(_Block(), ["nope"])
    with pytest.raises(TypeError, match="target_modules"):
        apply_lora(_Block(), [1, 2])
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(_Block(), "(unclosed")
    with pytest.raises(TypeError, match="model"):
        apply_lora("not a model", ["q_proj"])
    with pytest.raises(TypeError, match="model"):
        count_parameters([1, 2])


# ------------------------------------------------------------------------------------------- bad input
def _args(**over):
    x, W, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    args = dict(x=x, weight=W, bias=b, lora_A=A, lora_B=B, scaling=1.0, dropout_p=0.0, training=False)
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, name", [
    (dict(x=torch.randn(4, 7)), ValueError, "x"),
    (dict(weight=torch.randn(6)), ValueError, "weight"),
    (dict(lora_A=torch.randn(2, 9)), ValueError, "lora_A"),
    (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError, "rank"),
    (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B"),
    (dict(lora_B=torch.randn(5, 2)), ValueError, "lora_B"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "weight"),
    (dict(lora_A=torch.randn(2, 8, dtype=torch.bfloat16)), TypeError, "lora_A"),
    (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, "bias"),
    (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "x"),
    (dict(lora_B=torch.randn(6, 2, device="meta")), ValueError, "lora_B"),
    (dict(x=[[1.0] * 8]), TypeError, "x"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p"),
    (dict(scaling=torch.tensor(1.0)), TypeError, "scaling"),
    (dict(scaling="2"), TypeError, "scaling"),
    (dict(scaling=True), TypeError, "scaling"),
    (dict(scaling=float("nan")), ValueError, "scaling"),
    (dict(training=1), TypeError, "training"),
])
def test_bad_input_names_the_argument(over, exc, name):
    with pytest.raises(exc, match=name):
        lora_fast.lora_linear(**_args(**over))


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(rank=0), ValueError, "rank"),
    (dict(rank=2.5), TypeError, "rank"),
    (dict(dropout=1.5), ValueError, "dropout"),
    (dict(in_features=0), ValueError, "in_features"),
    (dict(alpha="16"), TypeError, "alpha"),
    (dict(alpha=float("inf")), ValueError, "alpha"),
    (dict(bias="no"), TypeError, "bias"),
    (dict(use_rslora=1), TypeError, "use_rslora"),
])
def test_module_bad_arguments(kwargs, exc, name):
    args = dict(in_features=8, out_features=4)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        LoRALinear(**args)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))


def test_reference_function_matches_module():
    ref = ReferenceLoRALinear(9, 5, rank=2, alpha=4)
    nn.init.normal_(ref.lora_B.weight)
    x = torch.randn(3, 9)
    y = lora_linear_reference(x, ref.base.weight, ref.base.bias, ref.lora_A.weight, ref.lora_B.weight, ref.scaling)
    assert torch.allclose(y, ref(x))


# ------------------------------------------------------------------------------------------- all or nothing
def _bits(t):
    """t's bits (a NaN equals itself: torch.equal on the integer view)."""
    t = t.detach().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _model_state(model):
    """(module types by name, parameters by name (cloned) and their requires_grad): what a failed helper must keep."""
    return ({n: type(m) for n, m in model.named_modules()},
            {n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_unchanged(model, state, x, y0):
    types, params, flags = state
    assert {n: type(m) for n, m in model.named_modules()} == types, "a failed helper swapped modules"
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for n, p in params.items():
        assert torch.equal(_bits(now[n]), _bits(p)), f"a failed helper changed {n}"
    assert {n: p.requires_grad for n, p in now.items()} == flags, "a failed helper changed requires_grad"
    assert torch.equal(_bits(model(x)), _bits(y0))


def _two_layers(k1, n1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, k1), nn.Tanh(), nn.Linear(k1, n1))


@pytest.mark.parametrize("case", ["nf4_k", "pissa_rank", "nonzero_nan", "pissa_nan", "from_delta_shape"])
def test_apply_lora_failure_on_a_later_layer_leaves_the_model_unchanged(case):
    """A failure on module '2' (found by the checks up front, or only while building it) leaves module '0' as it
    was: not swapped or quantized, its weight not rewritten by "pissa" / "nonzero", requires_grad untouched."""
    model = _two_layers(32 if case == "nf4_k" else 64, 4)  # nf4_k: layer '2' has K = 32, no multiple of 64
    kw = {"rank": 2}
    if case == "nf4_k":
        kw["quantize"] = "nf4"
    elif case == "pissa_rank":
        kw = {"init": "pissa", "rank": 8}  # 8 > min(4, 64) of layer '2' only
    elif case in ("nonzero_nan", "pissa_nan"):  # found only while building layer '2' (init_lora's value check)
        with torch.no_grad():
            model[2].weight[0, 0] = float("nan")
        kw["init"] = case.split("_")[0]
    elif case == "from_delta_shape":  # found only while building layer '2' (init_lora's shape check)
        kw.update(init="from_delta", deltas={"0": torch.randn(64, 64), "2": torch.randn(5, 64)})
    x = torch.randn(3, 64)
    with torch.no_grad():
        y0 = model(x)
    state = _model_state(model)
    with pytest.raises((ValueError, TypeError), match="'2'"):
        apply_lora(model, ["0", "2"], **kw)
    with torch.no_grad():
        _assert_unchanged(model, state, x, y0)


def test_apply_lora_deferred_rewrite_equals_the_direct_init():
    """apply_lora writes the "pissa" / "nonzero" residual only after every layer was built: the weights it
    writes, and A and B, are bit for bit those of LoRALinear.from_linear on the same layer."""
    for init in ("pissa", "nonzero"):
        model = _two_layers(64, 16)
        ref = copy.deepcopy(model)
        torch.manual_seed(1)
        apply_lora(model, ["0", "2"], rank=3, alpha=6, init=init)
        torch.manual_seed(1)
        direct = [LoRALinear.from_linear(ref[i], 3, 6, init=init) for i in (0, 2)]
        for ours, theirs in zip((model[0], model[2]), direct):
            for name in ("weight", "lora_A", "lora_B"):
                assert torch.equal(getattr(ours, name), getattr(theirs, name)), (init, name)


def test_apply_lora_refuses_an_in_place_init_on_tied_weights():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].weight = model[0].weight
    state = _model_state(model)
    x = torch.randn(2, 8)
    y0 = model(x)
    with pytest.raises(ValueError, match="share one weight"):
        apply_lora(model, ["0", "1"], rank=2, init="pissa")
    _assert_unchanged(model, state, x, y0)


def test_variant_helpers_combined_keep_each_others_adapters_trainable():
    """Each helper freezes base parameters only: apply_vera after apply_dora keeps the DoRA layer's A, B and
    magnitude training, apply_lora on an embedding after both keeps theirs; an adapter parameter frozen on purpose
    stays frozen, and every base weight, bias and the norm are frozen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 8),
                          nn.Linear(8, 8))
    lora_fast.apply_dora(model, ["1"], rank=2)
    lora_fast.apply_vera(model, ["3"], rank=2)
    dora = {"1.lora_A", "1.lora_B", "1.lora_magnitude"}
    vera = {"3.vera_lambda_d", "3.vera_lambda_b"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == dora | vera
    model[3].vera_lambda_d.requires_grad_(False)  # frozen on purpose: another helper does not turn it back on
    apply_lora(model, ["0", "4"], rank=2)
    lora = {"0.lora_A", "0.lora_B", "4.lora_A", "4.lora_B"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == dora | lora | {"3.vera_lambda_b"}
    nn.init.normal_(model[4].lora_B)
    model(torch.tensor([[1, 4, 7]])).pow(2).sum().backward()
    for name in dora | lora | {"3.vera_lambda_b"}:
        assert model.get_parameter(name).grad is not None, name
    assert count_parameters(model).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def _mergeable(kind):
    torch.manual_seed(2)
    if kind == "embedding":
        layer = lora_fast.embedding.LoRAEmbedding(12, 6, rank=2, alpha=4)
        nn.init.normal_(layer.lora_A)  # PEFT's embedding init has A = 0: nothing to merge
        return layer, lambda: lora_fast.embedding.LoRAEmbedding(12, 6, rank=2, alpha=4), torch.tensor([[1, 5, 11]])
    if kind == "vera":
        layer = lora_fast.VeRALinear(10, 6, rank=2)
        with torch.no_grad():
            layer.vera_lambda_b.normal_()
        return layer, lambda: lora_fast.VeRALinear(10, 6, rank=2), torch.randn(3, 10)
    cls = {"lora": LoRALinear, "dora": lora_fast.DoRALinear}[kind]
    layer = cls(10, 6, rank=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    return layer, lambda: cls(10, 6, rank=2, alpha=4), torch.randn(3, 10)


@pytest.mark.parametrize("kind", ["lora", "dora", "embedding", "vera"])
def test_merged_state_dict_loads_unmerged_without_a_second_adapter(kind):
    """merge() folds the adapter into `weight` and `merged` is no state: a merged layer's state dict loaded into a
    fresh layer applied the adapter twice. It now holds the unmerged weight (same keys), so any layer that loads it
    computes the saved function: a fresh one unmerged, a merged one still merged. An unmerged layer's state dict
    still references its tensors (no copy)."""
    layer, fresh_layer, x = _mergeable(kind)
    with torch.no_grad():
        y = layer(x)
        sd0 = layer.state_dict()
        assert all(sd0[k].data_ptr() == p.data_ptr() for k, p in layer.named_parameters())
        sd0 = {k: v.clone() for k, v in sd0.items()}
        layer.merge()
        w_merged = layer.weight.detach().clone()
        sd = layer.state_dict()
        assert list(sd) == list(sd0) and layer.merged and torch.equal(layer.weight, w_merged)
        assert_close("saved weight", sd["weight"], sd0["weight"], torch.float32)  # unmerged, within rounding
        fresh = fresh_layer()
        fresh.load_state_dict(sd)
        assert not fresh.merged
        assert_close("fresh y", fresh(x), y, torch.float32)
        other = fresh_layer()
        other.merge()
        other.load_state_dict(sd)
        assert other.merged
        assert_close("merged y", other(x), y, torch.float32)
        assert_close("merged weight", other.weight, w_merged, torch.float32)


def test_merged_vera_reloads_its_own_projections_before_merging_again():
    """A merged VeRALinear that owns its projections (a child module, loaded after the layer itself) merges
    again only once the new projections are in: it then computes the saved layer's function."""
    def vera(seed):
        torch.manual_seed(seed)
        layer = lora_fast.VeRALinear(10, 6, rank=2, seed=seed,
                                     projections=lora_fast.VeRAProjections(10, 6, rank=2, seed=seed))
        layer.own_projections()
        with torch.no_grad():
            layer.vera_lambda_b.normal_()
        return layer

    src, dst = vera(0), vera(1)
    x = torch.randn(3, 10)
    with torch.no_grad():
        y = src(x)
        src.merge()
        dst.merge()
        dst.load_state_dict(src.state_dict())
        assert dst.merged and torch.equal(dst.projections.vera_A, src.projections.vera_A)
        assert_close("merged y", dst(x), y, torch.float32)
        dst.unmerge()
        assert_close("unmerged y", dst(x), y, torch.float32)
