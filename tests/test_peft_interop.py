"""PEFT interoperability on the CPU, against the real PEFT: `lora_fast.peft.patch` / `unpatch` parity (outputs and
the gradients of every LoRA parameter) and PEFT adapter files both ways. Tiny Hugging Face models built from a
config; nothing is downloaded. Without a GPU the kernels run through Triton's interpreter (tests/conftest.py)."""
import copy
import logging

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model, inject_adapter_in_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import lora_fast  # noqa: E402
import lora_fast.peft as lfp  # noqa: E402

TOL = 1e-4
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def llama(bias=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=128, vocab_size=128, max_position_embeddings=64, attention_bias=bias,
                      mlp_bias=bias)
    return LlamaForCausalLM(cfg).to(dtype)


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=128, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def ids(seed=1, batch=2, seq=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, seq), generator=g)


def _count_calls(monkeypatch, name):
    """{"n": calls so far} of lora_fast.peft's `name` (what the patched forwards call), counted from now on."""
    calls = {"n": 0}
    real = getattr(lfp, name)

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(lfp, name, counting)
    return calls


@pytest.fixture
def count_fused(monkeypatch):
    """Counts the calls of the fused lora_linear made by the patched forwards."""
    return _count_calls(monkeypatch, "lora_linear")


def run(model, x):
    """Logits and the gradients of every trainable parameter (by name) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    y = model(input_ids=x).logits
    if y.requires_grad:  # not under disable_adapter(): nothing trainable is used
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return y.detach(), grads


def assert_parity(model, x, tol=TOL):
    """PEFT's forward/backward vs the patched one on the same model; restores the unpatched state."""
    lfp.unpatch(model)
    y0, g0 = run(model, x)
    lfp.patch(model)
    y1, g1 = run(model, x)
    lfp.unpatch(model)
    assert rel(y1, y0) < tol, rel(y1, y0)
    assert g0.keys() == g1.keys()
    lora_names = [n for n in g0 if "lora_" in n]
    for n in g0:
        assert rel(g1[n], g0[n]) < tol, (n, rel(g1[n], g0[n]))
    return y0, lora_names


def assert_bf16_parity(model):
    """A bf16 model with fp32 adapter parameters (PEFT's default), PEFT's step against the patched one: outputs in
    bf16 within 2e-2, every gradient in its parameter's dtype within 5e-2 (PEFT computes the adapter branch in fp32,
    the fused path in bf16 with fp32 sums); restores the unpatched state."""
    y0, g0 = run(model, ids())
    lfp.patch(model)
    y1, g1 = run(model, ids())
    lfp.unpatch(model)
    assert y1.dtype == y0.dtype == torch.bfloat16
    assert rel(y1, y0) < 2e-2
    assert g0.keys() == g1.keys()
    for n in g0:
        assert g1[n].dtype == g0[n].dtype and rel(g1[n], g0[n]) < 5e-2, (n, rel(g1[n], g0[n]))


CASES = {
    "r4_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r8_all_rslora_dropout": dict(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.1, target_modules=LLAMA_TARGETS),
    "r2_alpha3_patterns": dict(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj", "o_proj"],
                               rank_pattern={"down_proj": 6}, alpha_pattern={r"layers\.1\.self_attn\.o_proj": 7}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_parity(case, count_fused):
    cfg = LoraConfig(init_lora_weights=False, **CASES[case])
    model = get_peft_model(llama(bias=case == "r8_all_rslora_dropout"), cfg)
    model.eval()
    _, lora_names = assert_parity(model, ids())
    assert lora_names and count_fused["n"] > 0


def test_gpt2_conv1d_fan_in_fan_out(count_fused):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                     init_lora_weights=False)
    model = get_peft_model(gpt2(), cfg).eval()
    _, lora_names = assert_parity(model, ids())
    assert len(lora_names) == 2 * 2 * 4  # A and B of 4 Conv1D per block, 2 blocks
    assert count_fused["n"] == 8


def test_several_adapters_set_adapter_disable_merge(count_fused):
    model = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=["v_proj", "up_proj"],
                                           init_lora_weights=False))
    model.eval()
    x = ids()
    model.set_adapter("second")
    assert_parity(model, x)
    model.set_adapter("default")
    assert_parity(model, x)
    model.base_model.set_adapter(["default", "second"])  # both active: their updates add up
    for _, p in model.named_parameters():
        p.requires_grad_("lora_" in _)  # LoraModel.set_adapter([...]) leaves requires_grad as is; train both
    y_both, _ = assert_parity(model, x)
    with model.disable_adapter():
        y_base, _ = assert_parity(model, x)
    assert rel(y_both, y_base) > 1e-3
    model.base_model.set_adapter("default")
    y_default = run(model, x)[0]
    model.merge_adapter()
    lfp.patch(model)
    n = count_fused["n"]
    with torch.no_grad():
        y_merged = model(input_ids=x).logits
    assert count_fused["n"] == n  # merged: base forward only
    assert rel(y_merged, y_default) < TOL
    model.unmerge_adapter()
    with torch.no_grad():
        y_unmerged = model(input_ids=x).logits
    assert count_fused["n"] > n
    assert rel(y_unmerged, y_default) < TOL
    lfp.unpatch(model)


def test_inject_adapter_in_model_and_training_mode():
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"],
                                               init_lora_weights=False), llama())
    model.eval()
    assert_parity(model, ids())
    # training with dropout 0: identical; with p > 0 the kernel draws its own mask, so only check it runs
    model.train()
    assert_parity(model, ids())
    for m in model.modules():
        if "lora_dropout" in m._modules:
            m.lora_dropout["default"] = torch.nn.Dropout(0.3)
    lfp.patch(model)
    _, grads = run(model, ids())
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    lfp.unpatch(model)


def test_patch_keeps_parameters_unpatch_restores(caplog):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens", "k_proj"],
                     init_lora_weights=False)
    model = get_peft_model(llama(), cfg).eval()
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["k_proj"], use_dora=True))
    sd0 = {k: v.data_ptr() for k, v in model.state_dict().items()}
    params0 = [(n, id(p)) for n, p in model.named_parameters()]
    x = ids()
    with torch.no_grad():
        y0 = model(input_ids=x).logits
    with caplog.at_level(logging.INFO, logger="lora_fast.peft"):
        assert lfp.patch(model) is model
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "patched 6 lora.Linear" in msg and "lora.Embedding x1" in msg and "variant" not in msg, msg
    patched = [m for m in model.modules() if lfp.is_patched(m)]
    assert len(patched) == 6 and all("forward" in m.__dict__ for m in patched)  # k_proj with its DoRA adapter too
    sd1 = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert sd1 == sd0 and [(n, id(p)) for n, p in model.named_parameters()] == params0
    lfp.patch(model)  # idempotent
    with torch.no_grad():
        y1 = model(input_ids=x).logits
        clone = copy.deepcopy(model)  # the copy's patched forwards are bound to the copy's modules
        assert sum(lfp.is_patched(m) for m in clone.modules()) == 6
        for name, m in clone.named_modules():
            if lfp.is_patched(m):
                assert m.forward.__self__ is m and m._lora_fast_peft_forward.__self__ is m, name
        assert rel(clone(input_ids=x).logits, y0) < TOL
    assert rel(y1, y0) < TOL
    lfp.unpatch(model)
    assert not any(lfp.is_patched(m) or "forward" in m.__dict__ for m in model.modules())
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == sd0
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, y0)


@pytest.fixture
def count_dora(monkeypatch):
    """Counts the calls of the fused dora_linear made by the patched forwards."""
    return _count_calls(monkeypatch, "dora_linear")


def dora_model(dtype=torch.float32, **extra):
    """A PEFT Llama with DoRA adapters whose magnitudes are moved off their init (g != 1 everywhere)."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                     init_lora_weights=False, **extra)
    model = get_peft_model(llama(dtype=dtype), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dora_adapters_are_fused(mode, count_dora, count_fused):
    """PEFT's DoRA (`use_dora=True`) through lora_fast's fused DoRA: outputs and the gradients of A, B and the
    magnitude equal PEFT's (fp32; in eval, and in training with lora_dropout 0)."""
    model = dora_model()
    model.train(mode == "train")
    _, lora_names = assert_parity(model, ids())
    assert any("lora_magnitude_vector" in n for n in lora_names)
    assert count_dora["n"] == 2 * 3 and count_fused["n"] == 0  # 3 targets in each of 2 layers


def test_dora_with_dropout_runs_fused(count_dora):
    """With lora_dropout > 0 in training the kernel draws its own mask: the step runs fused, gradients finite, and
    in eval the same model equals PEFT's."""
    model = dora_model(lora_dropout=0.2).train()
    lfp.patch(model)
    _, grads = run(model, ids())
    lfp.unpatch(model)
    assert count_dora["n"] == 6 and grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any("lora_magnitude_vector" in n for n in grads)
    assert_parity(model.eval(), ids())


def test_dora_and_lora_adapters_active_together(count_dora, count_fused):
    """Two active adapters on one module, DoRA and plain LoRA in either order: the first is fused, the second added
    by PEFT's own code on the running result, as PEFT's forward adds it."""
    model = dora_model()
    model.add_adapter("plain", LoraConfig(r=2, lora_alpha=5, target_modules=["v_proj", "up_proj"],
                                          init_lora_weights=False))
    model.eval()
    for order in (["default", "plain"], ["plain", "default"]):
        model.base_model.set_adapter(order)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        assert_parity(model, ids())
    assert count_dora["n"] > 0 and count_fused["n"] > 0


def test_dora_on_conv1d_keeps_peft_forward(caplog):
    model = get_peft_model(gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                              use_dora=True, init_lora_weights=False)).eval()
    with caplog.at_level(logging.INFO, logger="lora_fast.peft"):
        lfp.patch(model)
    assert "DoRA(Conv1D) x2" in " ".join(r.getMessage() for r in caplog.records)
    lfp.unpatch(model)
    assert_parity(model, ids())


def test_dora_bf16_base_fp32_adapters(count_dora):
    """PEFT's default on a bf16 model: fp32 adapters and magnitudes. The fused path runs in bf16 (fp32 sums) where
    PEFT casts x up for the DoRA branch; their gradients come back in fp32."""
    assert_bf16_parity(dora_model(dtype=torch.bfloat16).eval())
    assert count_dora["n"] == 6


@pytest.fixture
def count_vera(monkeypatch):
    """Counts the calls of the fused vera_linear made by the patched forwards."""
    return _count_calls(monkeypatch, "vera_linear")


def vera_model(base, **cfg):
    """A PEFT VeRA model whose lambdas are moved off their init (PEFT starts lambda_b at zero)."""
    model = get_peft_model(base, VeraConfig(r=8, **cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vera_lambda" in n:
                p.normal_()
    return model


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_vera_adapters_are_fused(mode, count_vera, caplog):
    """PEFT's VeRA layers (`VeraConfig`) through lora_fast's vera_linear: outputs and the gradients of both lambdas
    equal PEFT's (fp32), and the log names them."""
    model = vera_model(llama(), target_modules=["q_proj", "v_proj", "down_proj"])
    model.train(mode == "train")
    with caplog.at_level(logging.INFO, logger="lora_fast.peft"):
        lfp.patch(model)
    assert "patched 6 vera.Linear module(s)" in " ".join(r.getMessage() for r in caplog.records)
    lfp.unpatch(model)
    assert_parity(model, ids())  # every trainable parameter's gradient: the lambdas (2 per layer, 6 layers)
    assert count_vera["n"] == 2 * 3
    assert sum("vera_lambda" in n for n in run(model, ids())[1]) == 2 * 2 * 3


def test_two_vera_adapters_active_together(count_vera):
    """Two active VeRA adapters on one module: the first through vera_linear, the second added by PEFT's own term,
    outputs and every lambda's gradient equal to PEFT's."""
    model = vera_model(llama(), target_modules=["q_proj", "v_proj"])
    model.add_adapter("second", VeraConfig(r=8, target_modules=["v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vera_lambda" in n and "second" in n:
                p.normal_()
    model.base_model.set_adapter(["default", "second"])
    for n, p in model.named_parameters():
        p.requires_grad_("vera_lambda" in n)
    assert_parity(model.eval(), ids())
    assert count_vera["n"] == 4
    assert sum("second" in n for n in run(model, ids())[1]) == 2 * 2  # v_proj's two lambdas, 2 layers


def test_vera_on_gpt2_conv1d(count_vera):
    model = vera_model(gpt2(), target_modules=["c_attn", "c_fc"], fan_in_fan_out=True).eval()
    assert_parity(model, ids())
    assert count_vera["n"] == 4


def test_vera_with_dropout_runs_fused(count_vera):
    model = vera_model(llama(), target_modules=["q_proj", "v_proj"], vera_dropout=0.2).train()
    lfp.patch(model)
    _, grads = run(model, ids())
    lfp.unpatch(model)
    assert count_vera["n"] == 4 and grads and all(torch.isfinite(g).all() for g in grads.values())
    assert_parity(model.eval(), ids())


def test_vera_bf16_base_fp32_lambdas(count_vera):
    """PEFT keeps VeRA's lambdas and projections in fp32 on a bf16 model and casts x up; the fused path runs in
    bf16 (fp32 sums) and returns the lambdas' gradients in fp32."""
    assert_bf16_parity(vera_model(llama(dtype=torch.bfloat16), target_modules=["q_proj", "v_proj"]).eval())
    assert count_vera["n"] == 4


def test_bf16_base_fp32_adapters():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(llama(dtype=torch.bfloat16), cfg)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float32 for p in lora)  # PEFT's autocast_adapter_dtype
    assert_bf16_parity(model.eval())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_model_under_autocast_is_fused(count_fused, dropout):
    """fp32 PEFT model under bf16 autocast: every LoRA module takes the fused path (also where a bf16 activation
    meets the fp32 weights), and the result is as close to the fp32 step as PEFT's own autocast step is: bf16
    rounding through two layers moves single gradients by several percent either way (eval: dropout off)."""
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    model = get_peft_model(llama(), cfg)
    model.eval()
    y_ref, g_ref = run(model, ids())  # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0, g0 = run(model, ids())
        lfp.patch(model)
        y1, g1 = run(model, ids())
    lfp.unpatch(model)
    assert count_fused["n"] == 2 * len(LLAMA_TARGETS)  # 2 layers, every target fused
    assert y1.dtype == y0.dtype
    assert all(g1[n].dtype == g0[n].dtype == torch.float32 for n in g0) and g0.keys() == g1.keys()

    def dist(g):
        return sum(float((g[n].double() - g_ref[n].double()).norm() ** 2) for n in g_ref) ** 0.5 / \
            sum(float(g_ref[n].double().norm() ** 2) for n in g_ref) ** 0.5

    assert rel(y1, y_ref) <= 1.5 * rel(y0, y_ref) + 1e-3, (rel(y1, y_ref), rel(y0, y_ref))
    assert dist(g1) <= 1.5 * dist(g0) + 1e-3, (dist(g1), dist(g0))
    assert rel(y1, y0) < 2e-2


# ------------------------------------------------------------------------------------------------- adapter files

FILE_CFG = dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 5})


@pytest.mark.parametrize("safe", [True, False])
def test_peft_files_load_into_ours(tmp_path, safe):
    peft_model = get_peft_model(llama(), LoraConfig(init_lora_weights=False, **FILE_CFG)).eval()
    peft_model.save_pretrained(tmp_path, safe_serialization=safe)
    with torch.no_grad():
        y_peft = peft_model(input_ids=ids()).logits
    ours = lora_fast.apply_lora(llama(), ["q_proj", "v_proj", "down_proj"], rank=4, alpha=1.0).eval()
    lfp.load_peft_adapter(ours, str(tmp_path))
    down = ours.model.layers[1].mlp.down_proj
    q0 = ours.model.layers[0].self_attn.q_proj
    assert (down.rank, q0.alpha, q0.use_rslora) == (2, 5.0, True)
    with torch.no_grad():
        y_ours = ours(input_ids=ids()).logits
    assert rel(y_ours, y_peft) < TOL


def test_our_files_load_into_peft(tmp_path):
    ours = lora_fast.apply_lora(llama(), ["q_proj", "v_proj", "up_proj"], rank=4, alpha=8).eval()
    up = ours.model.layers[1].mlp.up_proj  # a different rank and alpha on one module
    up.lora_A = torch.nn.Parameter(torch.randn(3, up.in_features) * 0.1)
    up.lora_B = torch.nn.Parameter(torch.zeros(up.out_features, 3))
    up.rank, up.alpha = 3, 2.5
    torch.manual_seed(5)
    for m in ours.modules():
        if isinstance(m, lora_fast.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    cfg = lfp.save_peft_adapter(ours, str(tmp_path))
    assert sorted(cfg["target_modules"]) == ["q_proj", "up_proj", "v_proj"]
    assert list(cfg["rank_pattern"].values()) == [3] and list(cfg["alpha_pattern"].values()) == [2.5]
    with torch.no_grad():
        y_ours = ours(input_ids=ids()).logits
    peft_model = PeftModel.from_pretrained(llama(), str(tmp_path)).eval()
    assert peft_model.base_model.model.model.layers[1].mlp.up_proj.r["default"] == 3
    with torch.no_grad():
        y_peft = peft_model(input_ids=ids()).logits
    assert rel(y_peft, y_ours) < TOL
    # and back into ours
    back = lora_fast.apply_lora(llama(), ["q_proj", "v_proj", "up_proj"], rank=4, alpha=8).eval()
    lfp.load_peft_adapter(back, str(tmp_path))
    with torch.no_grad():
        assert rel(back(input_ids=ids()).logits, y_ours) < TOL


def test_peft_file_into_adapter_pool(tmp_path):
    peft_model = get_peft_model(llama(), LoraConfig(init_lora_weights=False, **FILE_CFG)).eval()
    peft_model.save_pretrained(tmp_path)
    pool = lora_fast.AdapterPool(max_adapters=2, max_rank=8, dtype=torch.float32)
    names = {"q0": "model.layers.0.self_attn.q_proj", "d1": "model.layers.1.mlp.down_proj"}
    pool.add_layer("q0", 64, [64])
    pool.add_layer("d1", 128, [64])
    slot = lfp.load_peft_adapter_into_pool(pool, names, str(tmp_path), "ft")
    base = peft_model.base_model.model.model
    for key, path in names.items():
        mod = base.get_submodule(path.removeprefix("model."))
        x = torch.randn(5, mod.in_features)
        with torch.no_grad():
            want = mod(x)
        A, B, _ = pool.layer_stacks(key)
        w = mod.get_base_layer()
        got = lora_fast.multi_lora_linear(x, w.weight, w.bias, A, B, pool.scalings, torch.full((5,), slot),
                                          ranks=pool.ranks)
        assert rel(got, want) < TOL, key
