"""Bad input at the public entry points of the variants and helpers (QLoRA / NF4, VeRA, DoRA, LoRAEmbedding, init,
targeting, multi-LoRA, PEFT files, TP constructors): each case raises a TypeError or ValueError that names the
argument, before any kernel runs, instead of a crash inside, an out-of-bounds read or quietly wrong numbers.

Every case here failed that way before its check was added (see the commit messages). Nothing here runs a kernel:
the multi-LoRA and QLoRA launchers are replaced by stubs that fail the test if they are reached.
"""
import math
import os

import pytest
import torch
from torch import nn

import lora_fast
import lora_fast.multi_lora as ml
import lora_fast.qlora as ql
from lora_fast.dora import DoRALinear, apply_dora, dora_scale, dora_weight_norm
from lora_fast.embedding import LoRAEmbedding
from lora_fast.init import init_lora, lora_scaling, truncated_svd
from lora_fast.multi_lora import (AdapterPool, MultiLoRALinear, make_batch_metadata, multi_lora_linear,
                                  validate_adapter_ids)
from lora_fast.nf4 import NF4Tensor, dequantize_nf4, from_bnb, quantize_nf4
from lora_fast.qlora import LoRALinear4bit, qlora_linear
from lora_fast.targeting import matching_linears, replace_linears
from lora_fast.vera import VeRALinear, VeRAProjections, apply_vera, shared_projections

NAN, INF = float("nan"), float("inf")


def no_kernel(*args, **kwargs):
    pytest.fail("a kernel launcher was reached with bad input")


@pytest.fixture
def no_launch(monkeypatch):
    """Replace the QLoRA and multi-LoRA launch points by stubs that fail the test."""
    monkeypatch.setattr(ql, "_nf4_ops", no_kernel)
    monkeypatch.setattr(ml, "multi_lora_compute", no_kernel)


def two_linears():
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))


# ------------------------------------------------------------------------------------------------- NF4 / QLoRA

@pytest.fixture(scope="module")
def w4():
    torch.manual_seed(0)
    return quantize_nf4(torch.randn(8, 64))


@pytest.mark.parametrize("dtype", [torch.int32, "bfloat16"])
def test_quantize_nf4_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):  # was: an int / str NF4Tensor.dtype, ints out of dequantize
        quantize_nf4(torch.randn(8, 64), dtype=dtype)


def test_quantize_nf4_double_quant_flag():
    with pytest.raises(TypeError, match="double_quant"):  # was: "no" is truthy, the absmax got double-quantized
        quantize_nf4(torch.randn(8, 64), double_quant="no")


@pytest.mark.parametrize("bad", [NAN, INF])
def test_quantize_nf4_non_finite_weight(bad):
    W = torch.randn(8, 64)
    W[3, 5] = bad
    with pytest.raises(ValueError, match="weight must be finite"):  # was: the whole block decoded as NaN
        quantize_nf4(W)


def test_quantize_nf4_meta_weight():
    with pytest.raises(ValueError, match="weight is on the meta device"):  # was: RuntimeError from .item()
        quantize_nf4(torch.empty(8, 64, device="meta"))


@pytest.mark.parametrize("dtype", [torch.int32, "float32"])
def test_dequantize_nf4_dtype(w4, dtype):
    with pytest.raises(TypeError, match="dtype"):  # was: int32 weights / "Invalid device string"
        dequantize_nf4(w4, dtype)


def test_from_bnb_dtype_checked_first():
    with pytest.raises(TypeError, match="dtype"):
        from_bnb(object(), torch.int32)


def _edited(w4, **fields):
    q = NF4Tensor(w4.qweight, w4.absmax, w4.shape, w4.dtype, w4.absmax_code, w4.absmax_scale, w4.absmax_offset,
                  w4.absmax_group)
    for k, v in fields.items():
        setattr(q, k, v)
    return q


NF4_EDITS = [
    (dict(qweight=None), r"weight\.qweight"),                      # sliced below: half the bytes
    (dict(shape=(8, 128)), r"weight\.qweight"),                    # the shape lies about the bytes
    (dict(shape=(8, 60)), r"weight\.shape"),
    (dict(shape=(8.0, 64)), r"weight\.shape"),
    (dict(absmax=None), r"weight\.absmax"),                        # fp64 scales
    (dict(dtype=torch.int32), r"weight\.dtype"),
    (dict(absmax_scale=torch.ones(1)), r"weight\.absmax_scale"),   # scale without a code table
]


@pytest.mark.parametrize("edit,needle", NF4_EDITS)
def test_hand_built_nf4_tensor_is_checked(w4, no_launch, edit, needle):
    edit = dict(edit)
    if "qweight" in edit:
        edit["qweight"] = w4.qweight[:, :16]
    if "absmax" in edit:
        edit["absmax"] = w4.absmax.double()
    bad = _edited(w4, **edit)
    x, A, B = torch.randn(3, 64), torch.randn(2, 64), torch.randn(8, 2)
    err = TypeError if "dtype" in needle else ValueError
    with pytest.raises(err, match=needle):  # was: the launcher's ValueError, or torch's reshape error on the CPU path
        qlora_linear(x, bad, None, A, B, 1.0)
    with pytest.raises(err, match="q" + needle[len("weight"):]):
        dequantize_nf4(bad)


def test_double_quant_scale_too_short(no_launch):
    dq = quantize_nf4(torch.randn(8, 64), double_quant=True)
    bad = _edited(dq, absmax_scale=dq.absmax_scale[:0])
    with pytest.raises(ValueError, match=r"weight\.absmax_scale"):  # the kernel would read scale[0] past the end
        qlora_linear(torch.randn(3, 64), bad, None, torch.randn(2, 64), torch.randn(8, 2), 1.0)


@pytest.mark.parametrize("kw,name", [(dict(double_quant="yes"), "double_quant"), (dict(use_rslora="no"), "use_rslora")])
def test_lora_linear_4bit_flags(kw, name):
    with pytest.raises(TypeError, match=name):  # was: a truthy string switched the format / the scaling
        LoRALinear4bit(64, 8, **kw)


def test_lora_linear_4bit_from_linear_checks_before_quantizing(monkeypatch):
    monkeypatch.setattr(ql, "quantize_nf4", no_kernel)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear4bit.from_linear(nn.Linear(64, 8), rank=0)
    with pytest.raises(TypeError, match="compute_dtype"):
        LoRALinear4bit.from_linear(nn.Linear(64, 8), compute_dtype=torch.int8)


def test_lora_linear_4bit_set_base(w4):
    layer = LoRALinear4bit(64, 8, compute_dtype=torch.float32)
    with pytest.raises(TypeError, match="w4"):  # was: AttributeError 'Tensor' has no 'double_quant'
        layer.set_base(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"w4\.qweight"):
        layer.set_base(_edited(w4, qweight=w4.qweight[:, :16]))


# ------------------------------------------------------------------------------------------------- VeRA

@pytest.mark.parametrize("d_initial,err", [(NAN, ValueError), (INF, ValueError), ("0.1", TypeError),
                                           (torch.tensor([0.1, 0.2]), TypeError)])
def test_vera_d_initial(d_initial, err):
    with pytest.raises(err, match="d_initial"):  # was: NaN lambda_d (every output NaN) / unnamed conversion errors
        VeRALinear(16, 8, rank=2, d_initial=d_initial)
    model = two_linears()
    with pytest.raises(err, match="d_initial"):
        apply_vera(model, ["0", "1"], rank=2, d_initial=d_initial)
    assert all(type(m) is nn.Linear for m in model)


@pytest.mark.parametrize("seed", [1.7, "a", True])
def test_vera_seed(seed):
    with pytest.raises(TypeError, match="seed"):  # was: 1.7 truncated to 1; "a": int()'s unnamed ValueError
        VeRAProjections(16, 8, 2, seed=seed)
    with pytest.raises(TypeError, match="seed"):
        shared_projections(16, 8, 2, seed=seed)
    with pytest.raises(TypeError, match="seed"):
        VeRALinear(16, 8, rank=2, seed=seed)
    with pytest.raises(TypeError, match="seed"):
        apply_vera(two_linears(), ["0"], rank=2, seed=seed)


@pytest.mark.parametrize("args,err,name", [((-1, 8), ValueError, "in_features"), ((0, 8), ValueError, "in_features"),
                                           ((16, 0), ValueError, "out_features")])
def test_vera_projection_slice_sizes(args, err, name):
    proj = VeRAProjections(16, 8, 2)
    with pytest.raises(err, match=name):  # was: vera_A[:, :-1], the wrong columns, quietly
        proj.sliced(*args, "cpu", torch.float32)


def test_vera_projection_slice_dtype():
    with pytest.raises(TypeError, match="dtype"):  # was: integer projections (all truncated to 0)
        VeRAProjections(16, 8, 2).sliced(16, 8, "cpu", torch.int32)


def test_vera_layer_dtype_and_x():
    with pytest.raises(TypeError, match="dtype"):  # was: torch's "Only Tensors of floating point ..." RuntimeError
        VeRALinear(16, 8, rank=2, dtype=torch.int32)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):  # was: AttributeError 'list' has no 'device'
        VeRALinear(16, 8, rank=2)([1.0] * 16)


# ------------------------------------------------------------------------------------------------- DoRA

def _wab():
    return torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)


@pytest.mark.parametrize("case,err,name", [
    ("weight_1d", ValueError, "weight"), ("weight_list", TypeError, "weight"), ("weight_int", TypeError, "weight"),
    ("A_dtype", TypeError, "lora_A"), ("A_meta", ValueError, "lora_A"), ("B_shape", ValueError, "lora_B"),
    ("scaling_nan", ValueError, "scaling"), ("scaling_str", TypeError, "scaling"),
])
def test_dora_weight_norm(case, err, name):
    W, A, B = _wab()
    s = 2.0
    if case == "weight_1d":
        W = W[0]
    elif case == "weight_list":
        W = W.tolist()
    elif case == "weight_int":
        W = W.int()
    elif case == "A_dtype":
        A = A.double()
    elif case == "A_meta":
        A = A.to("meta")
    elif case == "B_shape":
        B = torch.randn(8, 3)
    elif case == "scaling_nan":
        s = NAN
    else:
        s = "2"
    # was: an unpacking ValueError, AttributeError, a NaN or a string scaling accepted, or the launcher naming the
    # wrong tensor
    with pytest.raises(err, match=name):
        dora_weight_norm(W, A, B, s)


def test_dora_scale_magnitude():
    W, A, B = _wab()
    with pytest.raises(ValueError, match="magnitude"):
        dora_scale(W, A, B, 2.0, torch.ones(7))


@pytest.mark.parametrize("kw,err,name", [(dict(dtype=torch.int32), TypeError, "dtype"),
                                         (dict(use_rslora="no"), TypeError, "use_rslora")])
def test_dora_layer_options(kw, err, name):
    with pytest.raises(err, match=name):
        DoRALinear(16, 8, rank=2, **kw)


def test_apply_dora_checks_before_swapping():
    model = two_linears()
    with pytest.raises(ValueError, match="alpha"):
        apply_dora(model, ["0", "1"], rank=2, alpha=NAN)
    with pytest.raises(ValueError, match="rank"):
        apply_dora(model, ["0", "1"], rank=0)
    assert all(type(m) is nn.Linear for m in model)


# ------------------------------------------------------------------------------------------------- LoRAEmbedding

@pytest.mark.parametrize("padding_idx,err", [(10, ValueError), (-11, ValueError), (1.0, TypeError), (True, TypeError)])
def test_embedding_padding_idx(padding_idx, err):
    with pytest.raises(err, match="padding_idx"):  # was: nn.Embedding's AssertionError
        LoRAEmbedding(10, 4, rank=2, padding_idx=padding_idx)


@pytest.mark.parametrize("kw,name", [(dict(dtype=torch.int64), "dtype"), (dict(use_rslora="yes"), "use_rslora")])
def test_embedding_options(kw, name):
    with pytest.raises(TypeError, match=name):
        LoRAEmbedding(10, 4, rank=2, **kw)


# ------------------------------------------------------------------------------------------------- init

@pytest.mark.parametrize("scheme", ["pissa", "from_delta"])
def test_svd_init_negative_scaling(scheme):
    W = torch.randn(8, 6)
    delta = torch.randn(8, 6) if scheme == "from_delta" else None
    with pytest.raises(ValueError, match="scaling"):  # was: sqrt(S / s) of a negative s: NaN factors, quietly
        init_lora(W, 2, scheme, -1.0, delta=delta)


@pytest.mark.parametrize("case", ["delta_nan", "delta_meta", "weight_nan", "weight_meta", "nonzero_meta"])
def test_init_needs_values(case):
    W, delta, scheme = torch.randn(8, 6), None, "pissa"
    if case.startswith("delta"):
        scheme = "from_delta"
        delta = torch.full((8, 6), NAN) if case == "delta_nan" else torch.empty(8, 6, device="meta")
    elif case == "weight_nan":
        W[0, 0] = NAN
    else:
        W = W.to("meta")
        scheme = "nonzero" if case == "nonzero_meta" else "pissa"
    name = "delta" if case.startswith("delta") else "weight"
    with pytest.raises(ValueError, match=name):  # was: LinAlgError, NotImplementedError or .item() on meta
        init_lora(W, 2, scheme, 1.0, delta=delta)


def test_randomized_svd_of_non_finite_matrix():
    M = torch.randn(8, 6)
    M[1, 1] = INF
    with pytest.raises(ValueError, match="matrix must be finite"):  # was: torch's LinAlgError, naming no argument
        truncated_svd(M, 2, niter=2)


@pytest.mark.parametrize("args,err,name", [((1.0, 0, False), ValueError, "rank"), ((NAN, 2, False), ValueError, "alpha"),
                                           ((1.0, 2, "no"), TypeError, "use_rslora"),
                                           ((1.0, -4, False), ValueError, "rank")])
def test_lora_scaling(args, err, name):
    with pytest.raises(err, match=name):  # was: ZeroDivisionError / a negative or NaN scaling
        lora_scaling(*args)


# ------------------------------------------------------------------------------------------------- targeting

def test_one_shot_target_iterator():
    with pytest.raises(TypeError, match="target_modules"):  # was: used up by the check, then "matched nothing"
        matching_linears(two_linears(), (n for n in ["0"]))
    with pytest.raises(TypeError, match="target_modules"):
        lora_fast.apply_lora(two_linears(), (n for n in ["0"]), rank=1)


def test_replace_linears_arguments():
    with pytest.raises(TypeError, match="make"):
        replace_linears(two_linears(), ["0"], "not callable", ("lora_A",))
    model = two_linears()
    with pytest.raises(TypeError, match="make"):  # was: the linear replaced by None
        replace_linears(model, ["0"], lambda name, lin: None, ("lora_A",))
    assert type(model[0]) is nn.Linear
    with pytest.raises(TypeError, match="trainable"):  # was: "bias" split into 'b', 'i', 'a', 's' suffixes
        replace_linears(two_linears(), ["0"], lambda name, lin: lin, "bias")


def test_replace_linears_is_all_or_nothing():
    def make(name, lin):
        if name == "1":
            raise ValueError("layer 1 does not fit")
        return lora_fast.LoRALinear.from_linear(lin, 2)

    model = two_linears()
    with pytest.raises(ValueError, match="layer 1"):
        replace_linears(model, ["0", "1"], make, ("lora_A",))
    assert all(type(m) is nn.Linear for m in model)  # was: layer 0 swapped, layer 1 not


# ------------------------------------------------------------------------------------------------- multi-LoRA

@pytest.mark.parametrize("args,kw,err,name", [
    ((2.5, 4), {}, TypeError, "max_adapters"), ((True, 4), {}, TypeError, "max_adapters"),
    (("2", 4), {}, TypeError, "max_adapters"), ((2, None), {}, TypeError, "max_rank"),
    ((2, 4), dict(dtype=torch.int32), TypeError, "dtype"), ((2, 4), dict(dtype="float32"), TypeError, "dtype"),
])
def test_adapter_pool_constructor(args, kw, err, name):
    with pytest.raises(err, match=name):  # was: torch.zeros' / '<' TypeErrors, or an integer pool
        AdapterPool(*args, **kw)


@pytest.mark.parametrize("args,err,name", [((3, 8, [4]), TypeError, "key"), (("b", 0, [4]), ValueError, "in_features"),
                                           (("b", 8, []), ValueError, "slice_sizes"),
                                           (("b", 8, [0]), ValueError, "slice_sizes"),
                                           (("b", 8, [-2]), ValueError, "slice_sizes")])
def test_adapter_pool_add_layer(args, err, name):
    pool = AdapterPool(2, 4, dtype=torch.float32)
    with pytest.raises(err, match=name):  # was: accepted (an empty layer), or torch.zeros' RuntimeError
        pool.add_layer(*args)
    assert list(pool._layers) == []


def _pool():
    pool = AdapterPool(2, 4, dtype=torch.float32)
    pool.add_layer("a", 8, [4])
    pool.add_layer("qkv", 8, [2, 2])
    return pool


A8, B4 = torch.randn(2, 8), torch.randn(4, 2)
LOAD_CASES = [
    (dict(alpha=NAN), ValueError, "alpha"), (dict(alpha=INF), ValueError, "alpha"),
    (dict(alpha="4"), TypeError, "alpha"), (dict(alpha=True), TypeError, "alpha"),
    (dict(rank=2.0), TypeError, "rank"), (dict(rank=True), TypeError, "rank"),
    (dict(use_rslora="no"), TypeError, "use_rslora"),
    (dict(name=None), TypeError, "name"), (dict(name=5), TypeError, "name"),
    (dict(weights=[("a", (A8, B4))]), TypeError, "weights"), (dict(weights=None), TypeError, "weights"),
    (dict(weights={"a": (A8,)}), TypeError, r"weights\['a'\]"),
    (dict(weights={"a": (A8.long(), B4)}), TypeError, r"weights\['a'\]\[0\] A"),
    (dict(weights={"a": (A8.tolist(), B4)}), TypeError, r"weights\['a'\]"),
    (dict(weights={"a": (A8.to("meta"), B4)}), ValueError, r"weights\['a'\]\[0\] A"),
    (dict(weights={"a": (A8[0], B4)}), ValueError, r"weights\['a'\]\[0\] A"),
]


@pytest.mark.parametrize("kw,err,name", LOAD_CASES)
def test_adapter_pool_load(kw, err, name):
    pool = _pool()
    args = dict(name="t", weights={"a": (A8, B4)}, alpha=4.0)
    args.update(kw)
    with pytest.raises(err, match=name):  # was: a NaN / inf scaling, an unreachable slot, int tensors accepted, ...
        pool.load(args.pop("name"), args.pop("weights"), **args)
    assert pool.names == [] and pool.ranks.tolist() == [0, 0] and pool.scalings.tolist() == [0.0, 0.0]


def test_adapter_pool_names():
    pool = _pool()
    pool.load("t", {"a": (A8, B4)}, alpha=4.0)
    with pytest.raises(TypeError, match="names"):  # was: "t" read as one name per character
        pool.ids("t")
    with pytest.raises(TypeError, match="adapters"):
        pool.batch_metadata("t")


def _case():
    torch.manual_seed(1)
    x, W, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
    return x, W, b, torch.randn(2, 2, 8), torch.randn(2, 4, 2), torch.tensor([0, 1, -1])


MLL_CASES = [
    ("x_int", TypeError, "x"), ("x_list", TypeError, "x"), ("weight_list", TypeError, "weight"),
    ("bias_fp64", TypeError, "bias"), ("bias_int", TypeError, "bias"), ("bias_list", TypeError, "bias"),
    ("A_list", TypeError, "lora_A_stack"), ("scalings_nan", ValueError, "scalings"),
    ("scalings_list_inf", ValueError, r"scalings\[1\]"), ("scalings_str", TypeError, "scalings"),
    ("scalings_bool", TypeError, "scalings"), ("scalings_meta", ValueError, "scalings"),
    ("ranks_above_R", ValueError, r"ranks\[1\] = 3"), ("ranks_negative", ValueError, r"ranks\[0\] = -1"),
    ("ranks_float", TypeError, "ranks"), ("ranks_list", ValueError, "ranks"), ("ranks_meta", ValueError, "ranks"),
    ("slice_float", ValueError, "slice_sizes"), ("out_meta", ValueError, "out"), ("out_list", TypeError, "out"),
    ("ids_meta", ValueError, "adapter_ids"), ("meta_device", ValueError, "adapter_ids"),
]


@pytest.mark.parametrize("case,err,name", MLL_CASES)
def test_multi_lora_linear(no_launch, case, err, name):
    x, W, b, A, B, ids = _case()
    kw = dict(scalings=1.0)
    if case == "x_int":
        x, W, b, A, B = (t.int() for t in (x, W, b, A, B))  # was: accepted, the kernels ran on int32
    elif case == "x_list":
        x = x.tolist()
    elif case == "weight_list":
        W = W.tolist()  # was: AttributeError 'list' has no 'dim'
    elif case == "bias_fp64":
        b = b.double()  # was: accepted unchecked; the cuBLAS base path's addmm then fails inside the launcher
    elif case == "bias_int":
        b = b.long()
    elif case == "bias_list":
        b = b.tolist()
    elif case == "A_list":
        A = A.tolist()
    elif case == "scalings_nan":
        kw["scalings"] = NAN  # was: NaN outputs for every adapter token
    elif case == "scalings_list_inf":
        kw["scalings"] = [1.0, INF]
    elif case == "scalings_str":
        kw["scalings"] = "1"  # was: "too many dimensions 'str'"
    elif case == "scalings_bool":
        kw["scalings"] = True
    elif case == "scalings_meta":
        kw["scalings"] = torch.ones(2, device="meta")  # was: NotImplementedError (copy out of meta)
    elif case == "ranks_above_R":
        kw["ranks"] = torch.tensor([2, 3])  # was: the kernels read A and B rows past R (out of bounds)
    elif case == "ranks_negative":
        kw["ranks"] = torch.tensor([-1, 2])  # was: A[:, :-1] on the CPU path, quietly
    elif case == "ranks_float":
        kw["ranks"] = torch.tensor([1.5, 2.0])
    elif case == "ranks_list":
        kw["ranks"] = [2, 5]
    elif case == "ranks_meta":
        kw["ranks"] = torch.ones(2, dtype=torch.int32, device="meta")
    elif case == "slice_float":
        kw["slice_sizes"] = [4.5]  # was: int(4.5) = 4, quietly
    elif case == "out_meta":
        kw["out"] = torch.empty(3, 4, device="meta")
    elif case == "out_list":
        kw["out"] = [0.0]
    elif case == "ids_meta":
        ids = ids.to("meta")
    elif case == "meta_device":
        ids = make_batch_metadata(ids.to("meta"), 2, validate=False)  # metadata on another device than x
    scalings = kw.pop("scalings")
    with pytest.raises(err, match=name):
        multi_lora_linear(x, W, b, A, B, scalings, ids, **kw)


def test_multi_lora_ranks_checked_again_after_an_in_place_change(monkeypatch):
    monkeypatch.setattr(ml, "multi_lora_compute", lambda x2d, weight, *a, **k: x2d.new_zeros(x2d.shape[0], 4))
    x, W, b, A, B, ids = _case()
    ranks = torch.tensor([2, 1])
    meta = make_batch_metadata(ids, 2)
    multi_lora_linear(x, W, b, A, B, 1.0, meta, ranks=ranks)  # checked once, then remembered
    ranks[1] = 7
    with pytest.raises(ValueError, match=r"ranks\[1\] = 7"):
        multi_lora_linear(x, W, b, A, B, 1.0, meta, ranks=ranks)


def test_unvalidated_int64_ids_do_not_wrap_into_a_slot():
    ids = torch.tensor([2**32, 2**32 + 1, 1])
    with pytest.raises(ValueError, match=r"adapter_ids\[0\]"):
        make_batch_metadata(ids, 2)
    # validate=False: invalid ids are base only (-1); the int32 cast used to wrap 2**32 + 1 to slot 1
    assert make_batch_metadata(ids, 2, validate=False).adapter_ids.tolist() == [-1, -1, 1]


@pytest.mark.parametrize("kw,err,name", [
    (dict(pool_or_slots=2.5), TypeError, "pool_or_slots"), (dict(pool_or_slots="2"), TypeError, "pool_or_slots"),
    (dict(pool_or_slots=None), TypeError, "pool_or_slots"), (dict(pool_or_slots=0), ValueError, "pool_or_slots"),
    (dict(ranks=torch.tensor([1])), ValueError, "ranks"), (dict(ranks=[1, 1]), TypeError, "ranks"),
    (dict(validate="no"), TypeError, "validate"),
])
def test_make_batch_metadata(kw, err, name):
    args = dict(pool_or_slots=2)
    args.update(kw)
    with pytest.raises(err, match=name):  # was: int("2") / int(2.5) accepted, IndexError, AttributeError
        make_batch_metadata(torch.tensor([0, 1]), args.pop("pool_or_slots"), **args)


def test_validate_adapter_ids():
    with pytest.raises(ValueError, match="adapter_ids"):  # was: AttributeError 'list' has no 'dtype'
        validate_adapter_ids([0, 1], 2)
    with pytest.raises(TypeError, match="num_slots"):
        validate_adapter_ids(torch.tensor([0]), "2")


def test_multi_lora_linear_module():
    pool = AdapterPool(2, 2, dtype=torch.float32)
    with pytest.raises(TypeError, match="base_linear"):  # was: AttributeError 'Conv1d' has no 'in_features'
        MultiLoRALinear(nn.Conv1d(1, 1, 1), pool)
    with pytest.raises(TypeError, match="pool"):
        MultiLoRALinear(nn.Linear(8, 4), "pool")
    with pytest.raises(ValueError, match="slice_sizes"):  # was: accepted, (5, -1) sums to 4
        MultiLoRALinear(nn.Linear(8, 4), pool, slice_sizes=[5, -1])
    layer = MultiLoRALinear(nn.Linear(8, 4), pool, key="k")
    with pytest.raises(TypeError, match="batch"):  # was: AttributeError 'list' has no 'to'
        layer(torch.randn(2, 8), [0, -1])
    with pytest.raises(TypeError, match="x"):
        layer([1.0] * 8, torch.tensor([0]))


# ------------------------------------------------------------------------------------------------- PEFT files

@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    from lora_fast.peft import save_peft_adapter

    path = str(tmp_path_factory.mktemp("adapter"))
    save_peft_adapter(lora_fast.apply_lora(two_linears(), ["0", "1"], rank=2), path)
    return path


def test_peft_file_helpers_arguments(adapter_dir, tmp_path):
    from lora_fast.peft import load_peft_adapter, save_peft_adapter, unpatch

    model = lora_fast.apply_lora(two_linears(), ["0", "1"], rank=2)
    with pytest.raises(TypeError, match="model"):  # was: AttributeError 'str' has no 'named_modules'
        save_peft_adapter("model", str(tmp_path))
    with pytest.raises(TypeError, match="model"):
        load_peft_adapter("model", adapter_dir)
    with pytest.raises(TypeError, match="model"):
        unpatch("model")
    with pytest.raises(TypeError, match="path"):
        save_peft_adapter(model, None)
    with pytest.raises(TypeError, match="path"):
        load_peft_adapter(model, 5)
    with pytest.raises(TypeError, match="target_modules"):  # was: written into the config as it was
        save_peft_adapter(model, str(tmp_path), target_modules=[1])
    with pytest.raises(TypeError, match="safe_serialization"):
        save_peft_adapter(model, str(tmp_path), safe_serialization="no")
    with pytest.raises(TypeError, match="strict"):
        load_peft_adapter(model, adapter_dir, strict="no")


@pytest.mark.parametrize("bad", ["1d", "int64"])
@pytest.mark.parametrize("into", ["model", "pool"])
def test_peft_file_with_a_bad_tensor(tmp_path, bad, into):
    from safetensors.torch import load_file, save_file

    from lora_fast.peft import load_peft_adapter, load_peft_adapter_into_pool, save_peft_adapter

    model = lora_fast.apply_lora(two_linears(), ["0", "1"], rank=2)
    save_peft_adapter(model, str(tmp_path))
    file = os.path.join(str(tmp_path), "adapter_model.safetensors")
    state = load_file(file)
    key = "base_model.model.0.lora_A.weight"
    state[key] = state[key][0].contiguous() if bad == "1d" else state[key].long()
    save_file(state, file)
    # was: the pool path's IndexError on a 1-D A; an int64 A loaded as it was on both paths
    with pytest.raises(ValueError, match=r"0\.lora_A must be a 2-D float tensor"):
        if into == "model":
            load_peft_adapter(model, str(tmp_path))
        else:
            pool = AdapterPool(2, 4, dtype=torch.float32)
            pool.add_layer("k0", 8, [8])
            load_peft_adapter_into_pool(pool, {"k0": "0"}, str(tmp_path), "a")


def test_load_peft_adapter_into_pool_arguments(adapter_dir):
    from lora_fast.peft import load_peft_adapter_into_pool

    pool = AdapterPool(2, 4, dtype=torch.float32)
    pool.add_layer("k0", 8, [8])
    with pytest.raises(TypeError, match="pool"):  # was: AttributeError 'str' has no 'dtype'
        load_peft_adapter_into_pool("pool", {"k0": "0"}, adapter_dir, "a")
    with pytest.raises(TypeError, match="layer_map"):  # was: AttributeError 'list' has no 'items'
        load_peft_adapter_into_pool(pool, ["k0"], adapter_dir, "a")
    with pytest.raises(ValueError, match="layer_map"):
        load_peft_adapter_into_pool(pool, {"zz": "0"}, adapter_dir, "a")
    with pytest.raises(TypeError, match="layer_map"):
        load_peft_adapter_into_pool(pool, {"k0": 5}, adapter_dir, "a")
    with pytest.raises(TypeError, match="name"):  # was: loaded under the name None
        load_peft_adapter_into_pool(pool, {"k0": "0"}, adapter_dir, None)
    assert pool.names == []


# ------------------------------------------------------------------------------------------------- TP constructors

def test_tp_constructors_check_before_the_process_group():
    from lora_fast import distributed as lfd

    with pytest.raises(TypeError, match="max_adapters"):
        lfd.ShardedAdapterPool(2.5, 4)
    with pytest.raises(TypeError, match="dtype"):
        lfd.ShardedAdapterPool(2, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        lfd.ColumnParallelLoRALinear(8, 8, rank=2, dtype=torch.int32)
    with pytest.raises(TypeError, match="use_rslora"):
        lfd.RowParallelLoRALinear(8, 8, rank=2, use_rslora="no")


def test_sharded_pool_load_arguments(tmp_path):
    import torch.distributed as dist

    from lora_fast import distributed as lfd

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        pool = lfd.ShardedAdapterPool(2, 4, dtype=torch.float32)
        lfd.ColumnParallelMultiLoRALinear(nn.Linear(8, 8), pool, key="m")
        with pytest.raises(TypeError, match="weights"):  # was: AttributeError 'list' has no 'items'
            pool.load("t", [("m", (A8, torch.randn(8, 2)))], alpha=2.0)
        with pytest.raises(TypeError, match=r"weights\['m'\]"):  # was: AttributeError 'list' has no 'dim'
            pool.load("t", {"m": (A8.tolist(), torch.randn(8, 2))}, alpha=2.0)
        with pytest.raises(ValueError, match="alpha"):
            pool.load("t", {"m": (A8, torch.randn(8, 2))}, alpha=math.nan)
        assert pool.names == []
    finally:
        dist.destroy_process_group()
