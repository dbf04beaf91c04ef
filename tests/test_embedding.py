"""LoRAEmbedding against a plain fp64 reference and against PEFT's lora.Embedding (outputs and gradients)."""
import copy

import pytest
import torch
from torch import nn

from lora_fast import apply_lora
from lora_fast.embedding import LoRAEmbedding

from .utils import assert_close


def _reference(ids, E, A, B, s):
    """y = E[ids] + s * A[:, ids]^T @ B^T, in fp64."""
    return E.double()[ids] + s * A.double()[:, ids].movedim(0, -1) @ B.double().T


def _randomize(layer):
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()


@pytest.mark.parametrize("shape, rank", [((3, 7), 3), ((1,), 1), ((0,), 2), ((5,), 8)])
def test_matches_reference_outputs_and_grads(shape, rank):
    torch.manual_seed(0)
    layer = LoRAEmbedding(29, 13, rank=rank, alpha=5)
    _randomize(layer)
    ids = torch.randint(0, 29, shape)
    y = layer(ids)
    ref = _reference(ids, layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
    assert y.shape == (*shape, 13)
    if ids.numel() == 0:
        return
    assert_close("y", y, ref, torch.float32)
    dy = torch.randn_like(y)
    y.backward(dy)
    A, B = layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_()
    _reference(ids, layer.weight, A, B, layer.scaling).backward(dy.double())
    assert_close("dA", layer.lora_A.grad, A.grad, torch.float32)
    assert_close("dB", layer.lora_B.grad, B.grad, torch.float32)
    assert layer.weight.grad is None


@pytest.mark.parametrize("opts", [{"padding_idx": 0}, {"scale_grad_by_freq": True, "use_rslora": True}])
def test_matches_peft_embedding(opts):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    use_rslora = opts.pop("use_rslora", False)
    model = nn.Sequential(nn.Embedding(31, 10, **opts))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=3, lora_alpha=7, target_modules=["0"],
                                                                 use_rslora=use_rslora))
    pl = peft_model.base_model.model[0]
    pA, pB = pl.lora_embedding_A["default"], pl.lora_embedding_B["default"]
    # PEFT's default embedding init (A = 0, B ~ N(0, 1)) is ours too; make A nonzero to test the product.
    assert torch.count_nonzero(pA) == 0
    with torch.no_grad():
        pA.normal_()
    ours = apply_lora(copy.deepcopy(model), ["0"], rank=3, alpha=7, use_rslora=use_rslora)
    ol = ours[0]
    assert isinstance(ol, LoRAEmbedding) and ol.scaling == pytest.approx(pl.scaling["default"])
    assert ol.lora_A.shape == pA.shape and ol.lora_B.shape == pB.shape
    assert torch.count_nonzero(ol.lora_A) == 0 and torch.count_nonzero(ol.lora_B) > 0
    with torch.no_grad():
        ol.lora_A.copy_(pA)
        ol.lora_B.copy_(pB)
    ids = torch.tensor([[0, 4, 4, 30], [7, 0, 1, 4]])
    y_peft, y = peft_model(ids), ours(ids)
    assert_close("y", y, y_peft.detach(), torch.float32)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_peft.backward(dy)
    assert_close("dA", ol.lora_A.grad, pA.grad, torch.float32)
    assert_close("dB", ol.lora_B.grad, pB.grad, torch.float32)
    if opts.get("padding_idx") == 0:
        assert torch.count_nonzero(ol.lora_A.grad[:, 0]) == 0
    # merge / unmerge agree with PEFT's merged weight
    ol.merge()
    pl.merge()
    assert_close("merged weight", ol.weight, pl.base_layer.weight.detach(), torch.float32)


def test_merge_unmerge_round_trip():
    torch.manual_seed(2)
    layer = LoRAEmbedding(17, 9, rank=2, alpha=3, padding_idx=1)
    _randomize(layer)
    w0 = layer.weight.detach().clone()
    ids = torch.tensor([1, 2, 16, 2])
    y0 = layer(ids).detach()
    layer.merge()
    assert layer.merged
    assert_close("merged y", layer(ids), y0, torch.float32)
    assert_close("merged weight", layer.weight, w0.double() + layer.delta_weight().double(), torch.float32)
    layer.merge()  # idempotent
    with pytest.raises(ValueError, match="unmerge"):
        layer.reset_lora_parameters()
    layer.unmerge()
    assert not layer.merged and (layer.weight - w0).abs().max() <= 1e-6 * w0.abs().max()


@pytest.mark.parametrize("init", ["nonzero", "pissa"])
def test_compensated_inits_keep_base_output(init):
    torch.manual_seed(3)
    base = nn.Embedding(23, 11)
    e0 = base.weight.detach().clone()
    layer = LoRAEmbedding.from_embedding(base, rank=3, alpha=6, init=init)
    assert torch.count_nonzero(layer.lora_A) > 0 and torch.count_nonzero(layer.lora_B) > 0
    ids = torch.arange(23)
    assert_close(f"y at init ({init})", layer(ids), e0, torch.float32)
    assert layer.weight is base.weight


def test_from_delta_embedding():
    torch.manual_seed(4)
    dE = torch.randn(19, 2) @ torch.randn(2, 8)           # [vocab, dim], rank 2
    layer = LoRAEmbedding(19, 8, rank=2, alpha=2, init="from_delta", delta=dE)
    assert layer.init_error < 1e-5
    assert_close("delta_weight", layer.delta_weight(), dE, torch.float32)


def test_bad_ids_and_arguments():
    layer = LoRAEmbedding(10, 4, rank=2)
    with pytest.raises(TypeError, match="ids must be int64 or int32"):
        layer(torch.zeros(3))
    with pytest.raises(TypeError, match="ids must be a torch.Tensor"):
        layer([1, 2])
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\)"):
        layer(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\)"):
        layer(torch.tensor([-1]))
    with pytest.raises(TypeError, match="embedding must be an nn.Embedding"):
        LoRAEmbedding.from_embedding(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="rank"):
        LoRAEmbedding(10, 4, rank=0)
    with pytest.raises(ValueError, match="never learns"):
        LoRAEmbedding(10, 4, init="zeros")
    with pytest.raises(ValueError, match="not used"):
        LoRAEmbedding(10, 4, init="default", pissa_niter=1)
    assert layer(torch.tensor([3, 9], dtype=torch.int32)).shape == (2, 4)


def test_apply_lora_on_embedding_state_dict_and_freeze():
    model = nn.Sequential(nn.Embedding(12, 6), nn.Linear(6, 3))
    apply_lora(model, ["0", "1"], rank=2)
    assert list(model[0].state_dict()) == ["weight", "lora_A", "lora_B"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B", "1.lora_A",
                                                                          "1.lora_B"}
    assert "rank=2" in repr(model[0])


@pytest.mark.parametrize("opts", [{"sparse": True}, {"max_norm": 1.0}])
def test_sparse_and_max_norm_options(opts):
    """sparse=True (the frozen table's option) still trains A with a dense gradient; max_norm renormalises rows
    of E (and columns of A, as PEFT's lookup does) before the lookup."""
    torch.manual_seed(5)
    layer = LoRAEmbedding(15, 6, rank=2, alpha=2, **opts)
    _randomize(layer)
    ids = torch.tensor([3, 3, 14, 0])
    y = layer(ids)
    ref = _reference(ids, layer.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)
    assert_close("y", y, ref, torch.float32)  # after the in-place renormalisation, the plain formula holds
    if "max_norm" in opts:
        assert layer.weight[ids].norm(dim=-1).max() <= 1.0 + 1e-6
    y.square().sum().backward()
    assert layer.lora_A.grad.layout == torch.strided and torch.count_nonzero(layer.lora_A.grad[:, 3]) > 0


def test_peft_adapter_files_round_trip(tmp_path):
    """An apply_lora model with an embedding adapter saves as a PEFT adapter that PEFT loads (same outputs), and
    a PEFT-saved embedding adapter loads into a lora_fast model."""
    from peft import LoraConfig, PeftModel, get_peft_model

    import lora_fast.peft as lfp
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(16, 6), nn.Linear(6, 4))
    ours = apply_lora(copy.deepcopy(model), ["0", "1"], rank=2, alpha=3)
    for layer in (ours[0], ours[1]):
        _randomize(layer)
    config = lfp.save_peft_adapter(ours, str(tmp_path / "ours"))
    assert sorted(config["target_modules"]) == ["0", "1"]
    ids = torch.tensor([[3, 15, 0]])
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours"))
    assert_close("PEFT loads ours", loaded(ids).detach(), ours(ids).detach(), torch.float32)

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=3, target_modules=["0", "1"]))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    back = lfp.load_peft_adapter(copy.deepcopy(model), str(tmp_path / "peft"))
    assert isinstance(back[0], LoRAEmbedding)
    assert_close("ours loads PEFT's", back(ids).detach(), peft_model(ids).detach(), torch.float32)
