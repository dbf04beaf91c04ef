"""LoRA+ parameter groups (lora_fast.optim) against PEFT's create_loraplus_optimizer."""
import pytest
import torch
from torch import nn

from lora_fast import apply_lora
from lora_fast.optim import loraplus_param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.q_proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        return self.head(self.norm(self.q_proj(self.emb(ids))))


def _unfreeze_extras(model, prefix=""):
    """Trainable LayerNorm (weight: 1-D in a LayerNorm; bias) and head bias, to exercise every group."""
    for name in ("norm.weight", "norm.bias", "head.bias"):
        model.get_parameter(prefix + name).requires_grad_(True)


def _peft_model():
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "q_proj", "head"]))
    _unfreeze_extras(model, "base_model.model.")
    assert model.get_parameter("base_model.model.head.base_layer.bias").requires_grad
    return model


def _peft_groups(model, **kw):
    from peft.optimizers import create_loraplus_optimizer
    opt = create_loraplus_optimizer(model, torch.optim.SGD, lr=1e-3, loraplus_lr_ratio=8,
                                    loraplus_weight_decay=0.05, loraplus_lr_embedding=2e-6)
    return opt.param_groups


def test_groups_match_peft_on_a_peft_model():
    model = _peft_model()
    ours = loraplus_param_groups(model, lr=1e-3, ratio=8, weight_decay=0.05, lr_embedding=2e-6)
    theirs = _peft_groups(model)
    assert [g["name"] for g in ours] == ["A", "embedding", "B", "B_no_decay"]
    for o, t in zip(ours, theirs):
        assert [id(p) for p in o["params"]] == [id(p) for p in t["params"]], o["name"]
        assert o["lr"] == pytest.approx(t["lr"]) and o["weight_decay"] == t["weight_decay"], o["name"]
    assert all(len(g["params"]) > 0 for g in ours)


def _canonical(name: str) -> str:
    """PEFT parameter name -> lora_fast's (apply_lora keeps adapter tensors on the wrapping module)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    for peft_key, ours in ((".lora_embedding_A.default", ".lora_A"), (".lora_embedding_B.default", ".lora_B"),
                           (".lora_A.default.weight", ".lora_A"), (".lora_B.default.weight", ".lora_B")):
        name = name.replace(peft_key, ours)
    return name


def test_groups_match_peft_on_a_lora_fast_model():
    peft_model = _peft_model()
    names = {id(p): n for n, p in peft_model.named_parameters()}
    theirs = [({_canonical(names[id(p)]) for p in g["params"]}, g["lr"], g["weight_decay"])
              for g in _peft_groups(peft_model)]
    torch.manual_seed(0)
    model = apply_lora(Tiny(), ["emb", "q_proj", "head"], rank=2, alpha=4)
    _unfreeze_extras(model)
    names = {id(p): n for n, p in model.named_parameters()}
    ours = [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"])
            for g in loraplus_param_groups(model, lr=1e-3, ratio=8, weight_decay=0.05, lr_embedding=2e-6)]
    assert ours == theirs
    # LoRA B at lr * ratio, the embedding adapter (A and B) at lr_embedding, A at lr
    assert ours[0][0] == {"q_proj.lora_A", "head.lora_A"}
    assert ours[1][0] == {"emb.lora_A", "emb.lora_B"}
    assert "q_proj.lora_B" in ours[2][0] and ours[2][1] == pytest.approx(8e-3)
    assert ours[3][0] == {"norm.bias", "norm.weight", "head.bias"} and ours[3][2] == 0.0


def test_groups_drive_a_torch_optimizer():
    torch.manual_seed(1)
    model = apply_lora(Tiny(), ["q_proj"], rank=2, alpha=4)
    with torch.no_grad():
        model.q_proj.lora_B.normal_()
    groups = loraplus_param_groups(model, lr=0.1, ratio=4)
    a0, b0 = model.q_proj.lora_A.detach().clone(), model.q_proj.lora_B.detach().clone()
    opt = torch.optim.SGD(groups)
    model(torch.tensor([1, 2, 3])).square().sum().backward()
    gA, gB = model.q_proj.lora_A.grad.clone(), model.q_proj.lora_B.grad.clone()
    opt.step()
    torch.testing.assert_close(model.q_proj.lora_A.detach(), a0 - 0.1 * gA)
    torch.testing.assert_close(model.q_proj.lora_B.detach(), b0 - 0.4 * gB)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"lr": "1e-3"}, TypeError, "lr"),
    ({"lr": 0.0}, ValueError, "lr must be > 0"),
    ({"ratio": -1.0}, ValueError, "ratio must be > 0"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"lr_embedding": 0}, ValueError, "lr_embedding"),
])
def test_bad_arguments(kwargs, exc, match):
    model = apply_lora(Tiny(), ["q_proj"])
    with pytest.raises(exc, match=match):
        loraplus_param_groups(model, **{"lr": 1e-3, **kwargs})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        loraplus_param_groups([1], lr=1e-3)
