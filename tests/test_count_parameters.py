"""count_parameters: trainable / total, the adapter's parameters and its size on disk, per variant."""
import os

import pytest
import torch
from torch import nn

from lora_fast import ParameterCount, apply_lora, count_parameters


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, 5, bias=False))


def test_lora_counts_and_safetensors_size(tmp_path):
    from safetensors.torch import save_file
    model = apply_lora(_model(), ["0", "1", "3"], rank=2)
    c = count_parameters(model)
    lora = {"1.lora_A": (2, 8), "1.lora_B": (6, 2), "3.lora_A": (2, 6), "3.lora_B": (5, 2)}
    emb = {"0.lora_A": (2, 20), "0.lora_B": (8, 2)}
    n = lambda shapes: sum(a * b for a, b in shapes.values())  # noqa: E731
    base = 20 * 8 + 8 * 6 + 6 + 2 * 6 + 6 * 5
    assert (c.trainable, c.total, c.adapter) == (n(lora) + n(emb), base + n(lora) + n(emb), n(lora) + n(emb))
    assert c.by_variant["lora"].modules == 2 and c.by_variant["lora_embedding"].modules == 1
    assert c.by_variant["lora"].trainable == n(lora) and c.by_variant["lora_embedding"].adapter == n(emb)
    # per variant, every parameter of its modules: the adapted layers' frozen weights and biases, and the adapter
    assert c.by_variant["lora"].total == 8 * 6 + 6 + 6 * 5 + n(lora)
    assert c.by_variant["lora_embedding"].total == 20 * 8 + n(emb)
    params = dict(model.named_parameters())
    save_file({k: params[k].detach().contiguous() for k in lora}, tmp_path / "lora.safetensors")
    assert c.by_variant["lora"].adapter_bytes == os.path.getsize(tmp_path / "lora.safetensors")
    assert c.adapter_bytes == sum(v.adapter_bytes for v in c.by_variant.values())
    assert "adapter:" in str(c) and "trainable%" in str(c)


class _SharedProjection(nn.Module):
    """A VeRA-like module: frozen projections shared by every layer (one buffer), per-layer trainable vectors."""
    adapter_variant = "shared_test"

    def __init__(self, shared: torch.Tensor, n: int):
        super().__init__()
        self.register_buffer("proj", shared, persistent=False)
        self.vec = nn.Parameter(torch.ones(n))

    def adapter_state_dict(self):
        return {"proj": self.proj, "vec": self.vec}


def test_shared_frozen_tensors_count_once_and_other_trainables():
    shared = torch.randn(4, 16)
    model = nn.Sequential(_SharedProjection(shared, 3), _SharedProjection(shared, 5), nn.Linear(3, 2))
    model[2].weight.requires_grad_(False)
    c = count_parameters(model)
    v = c.by_variant["shared_test"]
    assert (v.modules, v.trainable, v.adapter, v.total) == (2, 8, 64 + 8, 64 + 8)  # the shared buffer once
    assert c.by_variant["other"].adapter == 2 and c.by_variant["other"].modules == 0   # the trained bias
    assert c.trainable == 8 + 2 and c.total == 8 + 6 + 2 + 64 and c.adapter == 64 + 8 + 2


def test_backward_compatible_and_errors():
    c = ParameterCount(3, 12)
    assert c.percent == 25.0 and c.adapter == 0 and c.by_variant == {}
    assert str(c) == "trainable params: 3 || all params: 12 || trainable%: 25.0000"
    plain = count_parameters(nn.Linear(4, 3))
    assert (plain.trainable, plain.total) == (15, 15) and set(plain.by_variant) == {"other"}
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        count_parameters("model")


def test_size_estimate_for_large_adapters_matches_serializer(monkeypatch):
    """Above the serialization limit the size is computed from the header; it agrees with safetensors."""
    import lora_fast.layers as layers
    model = apply_lora(_model(), ["0", "1", "3"], rank=3)
    exact = count_parameters(model)
    monkeypatch.setattr(layers, "_SERIALIZE_LIMIT", 0)
    estimate = count_parameters(model)
    for name, v in exact.by_variant.items():
        assert abs(estimate.by_variant[name].adapter_bytes - v.adapter_bytes) <= 8, name


def test_subclass_is_its_own_variant():
    from lora_fast import LoRALinear

    class MyLoRA(LoRALinear):
        pass

    model = nn.Sequential(MyLoRA(4, 3, rank=1), LoRALinear(3, 2, rank=1))
    c = count_parameters(model)
    assert c.by_variant["MyLoRA"].adapter == 4 + 3 and c.by_variant["lora"].adapter == 3 + 2


def test_quantized_base_weights_count_in_the_total():
    """An NF4 base is held in uint8 / fp32 buffers, not parameters: its out x in weights still count (frozen), so
    trainable% is over the model's real size."""
    torch.manual_seed(0)
    model = apply_lora(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8)), ["0"], rank=4,
                       quantize="nf4")
    c = count_parameters(model)
    adapter = 4 * 128 + 64 * 4
    base = 128 * 64 + 64 + 64 * 8 + 8  # the NF4 weight, its bias, and the plain Linear
    assert c.trainable == adapter
    assert c.total == base + adapter
    assert c.by_variant["lora"].total == 128 * 64 + 64 + adapter  # the NF4 weight counts in its variant's total
