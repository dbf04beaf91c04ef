"""QLoRA (issue 7): NF4 quantization against a reference written from the paper, the NF4 kernels against
dequantize-then-reference (outputs and every gradient), the module (save/load, merge/unmerge, .to), apply_lora's
quantize option, bad input, and bitsandbytes' layout when bitsandbytes is installed.

The kernels run through Triton's interpreter on the CPU (tests/conftest.py): sizes stay tiny.
"""
import importlib
import io
import math

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import kernels
from lora_fast.nf4 import NF4_CODE, NF4Tensor, dequantize_nf4, fp8_absmax_code, quantize_nf4, roundtrip_error
from lora_fast.philox import dropout_mask_torch
from lora_fast.qlora import LoRALinear4bit, QLoRALinearFunction, qlora_linear

from .utils import REL_TOL, assert_close, rel_err


def paper_code_book() -> torch.Tensor:
    """NF4 from the QLoRA paper (section 3 and appendix E): 8 positive and 7 negative quantiles of N(0, 1) taken
    at evenly spaced probabilities from `offset` = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 down to 0.5 (exclusive),
    plus an exact zero, normalised by the largest magnitude."""
    offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return values / values.abs().max()


def reference_quantize(W: torch.Tensor):
    """Blockwise absmax NF4 by brute force: (codes [N, K] long, absmax [N, K // 64]) with each weight mapped to
    the code of least |w / absmax - c| (no midpoints, no packing)."""
    code = torch.tensor(NF4_CODE, dtype=torch.float64)
    N, K = W.shape
    blocks = W.double().reshape(N, K // 64, 64)
    absmax = blocks.abs().amax(-1)
    normalized = blocks / absmax[..., None]
    codes = (normalized[..., None] - code).abs().argmin(-1)
    return codes.reshape(N, K), absmax


def weight(N, K, dtype=torch.float32):
    return torch.randn(N, K, dtype=dtype) / math.sqrt(K)


def test_code_book_is_the_papers():
    assert len(NF4_CODE) == 16 and NF4_CODE[7] == 0.0
    assert torch.allclose(torch.tensor(NF4_CODE, dtype=torch.float64), paper_code_book(), atol=2e-7, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_reference(dtype):
    torch.manual_seed(0)
    W = weight(6, 192, dtype)
    q = quantize_nf4(W)
    codes, absmax = reference_quantize(W)
    assert q.qweight.dtype == torch.uint8 and tuple(q.qweight.shape) == (6, 96)
    assert torch.equal(q.codes().long(), codes)
    # packing: element 2j in the high nibble of byte j
    assert torch.equal(q.qweight.long(), codes[:, 0::2] * 16 + codes[:, 1::2])
    assert torch.equal(q.absmax.double(), absmax.float().double())
    ref = (torch.tensor(NF4_CODE, dtype=torch.float64)[codes].reshape(6, 3, 64) * absmax.float().double()[..., None])
    assert torch.equal(dequantize_nf4(q, torch.float32).double(), ref.reshape(6, 192).float().double())
    assert dequantize_nf4(q).dtype == dtype
    err = rel_err(ref.reshape(6, 192), W)
    assert q.error == pytest.approx(err, rel=1e-3) and 0.05 < q.error < 0.15  # NF4 on Gaussian weights: ~0.1


def test_quantize_zero_block_and_extremes():
    W = torch.zeros(2, 128)
    W[1, 64:] = torch.linspace(-3, 3, 64)
    q = quantize_nf4(W)
    out = q.dequantize(torch.float32)
    assert torch.equal(out[:, :64], torch.zeros(2, 64))  # an all-zero block stays zero (no 0/0)
    assert out[1, 64] == -3.0 and out[1, 127] == 3.0  # the block's extremes are exact (codes -1 and 1)


def test_double_quant():
    torch.manual_seed(1)
    W = weight(20, 1024)  # 320 blocks: two groups of 256 for the second level
    plain, dq = quantize_nf4(W), quantize_nf4(W, double_quant=True)
    assert dq.double_quant and dq.absmax.dtype == torch.uint8 and dq.absmax_scale.numel() == 2
    assert torch.equal(dq.qweight, plain.qweight)  # the 4-bit codes do not depend on the second level
    absmax = plain.absmax.reshape(-1).double()
    offset = absmax.mean()
    centered = absmax - offset
    scale = torch.stack([centered[:256].abs().max(), centered[256:].abs().max()])
    assert dq.absmax_offset == pytest.approx(offset.item(), rel=1e-6)
    assert torch.allclose(dq.absmax_scale.double(), scale, rtol=1e-6)
    decoded = dq.absmax_float().reshape(-1).double()
    hand = fp8_absmax_code()[dq.absmax.reshape(-1).long()].double() * dq.absmax_scale.double().repeat_interleave(
        256)[:320] + offset
    assert torch.allclose(decoded, hand, rtol=1e-6)
    # FP8 E4M3 keeps 3 mantissa bits: each centred value within 2^-4 of itself (plus the subnormal step)
    group_scale = scale.repeat_interleave(256)[:320]
    assert ((decoded - absmax).abs() <= centered.abs() / 16 + group_scale * 2.0**-9 / 448 * 64 + 1e-9).all()
    assert dq.absmax.element_size() * 4 == plain.absmax.element_size()  # 8 bits per block instead of 32
    assert dq.error < plain.error + 0.01


def test_nf4tensor_state_dict_and_to():
    torch.manual_seed(2)
    for dq in (False, True):
        q = quantize_nf4(weight(8, 128), double_quant=dq)
        q2 = NF4Tensor.from_state_dict(q.state_dict(), q.dtype)
        assert torch.equal(q2.dequantize(), q.dequantize())
        moved = q.to("cpu", dtype=torch.bfloat16)
        assert moved.dequantize().dtype == torch.bfloat16 and moved.qweight.dtype == torch.uint8
    with pytest.raises(ValueError, match="missing 'absmax'"):
        NF4Tensor.from_state_dict({"qweight": q.qweight})


def test_memory_at_most_0_3_of_bf16():
    q = quantize_nf4(weight(64, 1024), double_quant=True)
    assert q.nbytes <= 0.3 * 64 * 1024 * 2
    assert quantize_nf4(weight(64, 1024)).nbytes == 64 * 1024 // 2 + 64 * 16 * 4  # 4.5 bits per weight


@pytest.mark.parametrize("bad", [100, 63, 0])
def test_k_not_multiple_of_blocksize_is_refused(bad):
    with pytest.raises(ValueError, match="multiple of the blocksize 64"):
        quantize_nf4(torch.randn(4, bad))
    if bad:
        with pytest.raises(ValueError, match="multiple of the blocksize 64"):
            LoRALinear4bit.from_linear(nn.Linear(bad, 4), rank=2)


def test_bad_input():
    q = quantize_nf4(weight(8, 64))
    x, A, B = torch.randn(3, 64), torch.randn(2, 64), torch.randn(8, 2)
    with pytest.raises(TypeError, match="weight must be"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="weight must be an NF4Tensor"):
        qlora_linear(x, torch.randn(8, 64), None, A, B, 1.0)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        qlora_linear(x.double(), q, None, A, B, 1.0)
    with pytest.raises(ValueError, match="K=64"):
        qlora_linear(torch.randn(3, 32), q, None, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_B must be"):
        qlora_linear(x, q, None, A, torch.randn(7, 2), 1.0)
    with pytest.raises(TypeError, match="lora_A has dtype"):
        qlora_linear(x, q, None, A.to(torch.bfloat16), B, 1.0)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        qlora_linear(x, q, None, A, B, 1.0, dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match="bias must be"):
        qlora_linear(x, q, torch.randn(5), A, B, 1.0)
    with pytest.raises(TypeError, match="compute_dtype"):
        LoRALinear4bit(64, 8, compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="path must be"):
        kernels.lora_nf4_forward(x, q, None, A, B, 1.0, path="cublas")


def reference_grads(x, W, b, A, B, s, p, seed, dy):
    """fp64 dequantize-then-reference: (y, dx, db, dA, dB) with the kernels' dropout mask."""
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    b64 = b.detach().double().requires_grad_() if b is not None else None
    keep = dropout_mask_torch(seed, x.shape[0], x.shape[1], p, "cpu") if p > 0 else torch.ones_like(x, dtype=bool)
    xd = torch.where(keep, x64 / (1 - p), 0.0)
    y = x64 @ W.double().t() + s * (xd @ A64.t()) @ B64.t()
    if b64 is not None:
        y = y + b64
    y.backward(dy.double())
    return y, x64.grad, (b64.grad if b64 is not None else None), A64.grad, B64.grad


# (M, K, N, r, double_quant, dropout, dtype): M <= 16 takes the GEMV forward, M > 16 the fused GEMM (forced here:
# the default sends M > 16 to the dequant path until the fused GEMM is tuned; test_every_path covers that one).
CASES = [
    (1, 128, 37, 3, False, 0.0, torch.float32),
    (5, 64, 20, 1, True, 0.25, torch.float32),
    (19, 192, 33, 3, True, 0.0, torch.float32),
    (18, 128, 17, 16, False, 0.25, torch.bfloat16),
]


@pytest.mark.parametrize("M,K,N,r,dq,p,dtype", CASES)
def test_fused_outputs_and_gradients(M, K, N, r, dq, p, dtype, monkeypatch):
    from lora_fast.kernels import config as kcfg

    monkeypatch.setattr(kcfg, "NF4_FUSED_ROWS", 1024)
    torch.manual_seed(M * 131 + K)
    q = quantize_nf4(weight(N, K), double_quant=dq, dtype=dtype)
    W = q.dequantize(torch.float32)
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    b = torch.randn(N, dtype=dtype, requires_grad=True)
    A = (torch.randn(r, K) / math.sqrt(K)).to(dtype).requires_grad_()
    B = (torch.randn(N, r) / math.sqrt(r)).to(dtype).requires_grad_()
    s, seed = 1.5, 1234
    y = QLoRALinearFunction.apply(x, b, A, B, q, s, p, seed)
    dy = torch.randn(M, N, dtype=dtype)
    y.backward(dy)
    ref = reference_grads(x, W, b, A, B, s, p, seed, dy)
    for name, out, want in zip(("y", "dx", "db", "dA", "dB"), (y, x.grad, b.grad, A.grad, B.grad), ref):
        assert out.dtype == dtype
        assert_close(name, out, want, dtype)


@pytest.mark.parametrize("path,decode", [("dequant", "table"), ("fused", "select"), ("gemv", "select"),
                                         ("gemv", "table"), ("fused", "auto")])
def test_every_path_and_decode(path, decode):
    torch.manual_seed(3)
    M, K, N, r = (4 if path == "gemv" else 9), 128, 21, 3
    q = quantize_nf4(weight(N, K), double_quant=True)
    W = q.dequantize(torch.float32).double()
    x, dy = torch.randn(M, K), torch.randn(M, N)
    A, B = torch.randn(r, K) / 8, torch.randn(N, r)
    y, xa = kernels.lora_nf4_forward(x, q, None, A, B, 2.0, store_xa=True, path=path, decode=decode)
    assert_close("y", y, x.double() @ W.t() + 2.0 * (x.double() @ A.double().t()) @ B.double().t(), torch.float32)
    assert_close("xa", xa, x.double() @ A.double().t(), torch.float32)
    if path != "gemv":
        dx, dyb = kernels.lora_nf4_backward_dx(dy, q, A, B, 2.0, path=path, decode=decode)
        assert_close("dx", dx, dy.double() @ W + 2.0 * (dy.double() @ B.double()) @ A.double(), torch.float32)
        assert_close("dyb", dyb, dy.double() @ B.double(), torch.float32)


@pytest.mark.parametrize("decode", ["select", "table"])
def test_dequantize_kernel_writes_every_element(decode):
    torch.manual_seed(4)
    for dq in (False, True):
        q = quantize_nf4(weight(19, 192), double_quant=dq)
        out = torch.full((19, 192), float("nan"))
        kernels.nf4_dequantize(q, torch.float32, out=out, decode=decode)
        assert torch.equal(out, q.dequantize(torch.float32))


def test_decode_argument_is_checked():
    q = quantize_nf4(weight(8, 64))
    x, A, B = torch.randn(2, 64), torch.randn(2, 64), torch.randn(8, 2)
    with pytest.raises(ValueError, match="decode must be"):
        kernels.nf4_dequantize(q, torch.float32, decode="lut")
    # the byte-permute decode is PTX: on the CPU (and under the interpreter) it is refused, never emulated
    with pytest.raises(ValueError, match="NVIDIA GPU"):
        kernels.nf4_dequantize(q, torch.float32, decode="prmt")
    with pytest.raises(ValueError, match="NVIDIA GPU"):
        kernels.lora_nf4_forward(x, q, None, A, B, 1.0, decode="prmt")
    # a weight that is not NF4 is named before any plan or kernel
    for bad in (torch.randn(8, 64), None):
        with pytest.raises(TypeError, match="w4 must be an NF4 weight"):
            kernels.nf4_gemv(x, bad, None, A, B, 1.0)
        with pytest.raises(TypeError, match="w4 must be an NF4 weight"):
            kernels.nf4_dequantize(bad, torch.float32)


def test_gemv_split_k_and_empty_rows():
    torch.manual_seed(5)
    q = quantize_nf4(weight(20, 256))
    x, A, B, b = torch.randn(3, 256), torch.randn(2, 256) / 16, torch.randn(20, 2), torch.randn(20)
    want = x.double() @ q.dequantize(torch.float32).double().t() + b.double() + (x.double() @ A.double().t()) @ B.double().t()
    for splits in (1, 3, 4):
        y, _ = kernels.nf4_gemv(x, q, b, A, B, 1.0, splits=splits)
        assert_close(f"y (splits={splits})", y, want, torch.float32)
    for path in ("gemv", "fused"):
        y, xa = kernels.lora_nf4_forward(x[:0], q, b, A, B, 1.0, store_xa=True, path=path)
        assert y.shape == (0, 20) and xa.shape == (0, 2)
    dx, _ = kernels.lora_nf4_backward_dx(torch.randn(0, 20), q, A, B, 1.0)
    assert dx.shape == (0, 256)


@pytest.mark.parametrize("r", [3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 16])
def test_gemv_one_row_and_many_splits(M, dtype, r):
    """One, two and sixteen rows (the finishing kernel's rank term by sums below 16 rows, by a dot at 16); 18 splits make the finishing kernel sum more than one
    chunk of partials; rank 40 (padded to 64) at sixteen rows makes it sum the xa partials four splits at a time.
    Dropout, bias, double quantization and the stored xa are all checked."""
    torch.manual_seed(11)
    N, K, p, seed = 37, 1152, 0.25, 99
    q = quantize_nf4(weight(N, K), double_quant=True)
    x = torch.randn(M, K).to(dtype)
    A, B, b = (torch.randn(r, K) / 16).to(dtype), torch.randn(N, r).to(dtype), torch.randn(N).to(dtype)
    keep = dropout_mask_torch(seed, M, K, p, "cpu")
    xd = torch.where(keep, x.double() / (1 - p), 0.0)
    xa_want = xd @ A.double().t()
    want = x.double() @ q.dequantize(torch.float32).double().t() + b.double() + 2.0 * xa_want @ B.double().t()
    for splits in (18, 5):
        y, xa = kernels.nf4_gemv(x, q, b, A, B, 2.0, dropout_p=p, seed=seed, store_xa=True, splits=splits)
        assert_close(f"y (M={M}, splits={splits})", y, want, dtype)
        assert_close(f"xa (M={M}, splits={splits})", xa, xa_want, dtype)


def make_layer(dq=False, dtype=torch.float32):
    torch.manual_seed(6)
    linear = nn.Linear(128, 24)
    layer = LoRALinear4bit.from_linear(linear, rank=3, alpha=6, compute_dtype=dtype, double_quant=dq)
    nn.init.normal_(layer.lora_B)
    return linear, layer


@pytest.mark.parametrize("dq", [False, True])
def test_module_matches_reference_and_saves(dq):
    linear, layer = make_layer(dq)
    assert layer.quant_error == pytest.approx(roundtrip_error(linear.weight, layer.weight4), rel=1e-6)
    x = torch.randn(2, 3, 128, requires_grad=True)
    y = layer(x)
    ref = lora_fast.reference.lora_linear_reference(x.detach(), layer.weight4.dequantize(torch.float32),
                                                    linear.bias.detach(), layer.lora_A.detach(),
                                                    layer.lora_B.detach(), layer.scaling)
    assert_close("module y", y, ref, torch.float32)
    y.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and not layer.bias.requires_grad
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = LoRALinear4bit(128, 24, rank=3, alpha=6, compute_dtype=torch.float32, double_quant=dq)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), y)
    keys = set(layer.state_dict())
    assert {"qweight", "absmax", "bias", "lora_A", "lora_B"} <= keys and ("absmax_code" in keys) == dq
    layer.to(torch.bfloat16)  # the format's tensors keep their dtypes; the adapters follow
    assert layer.qweight.dtype == torch.uint8 and layer.lora_A.dtype == torch.bfloat16
    assert layer.absmax.dtype == (torch.uint8 if dq else torch.float32)
    assert torch.equal(layer.weight4.dequantize(torch.float32), fresh.weight4.dequantize(torch.float32))


def test_merge_unmerge():
    _, layer = make_layer(dq=True)
    x = torch.randn(4, 128)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    target = layer.weight4.dequantize(torch.float32) + layer.delta_weight()
    err = layer.merge()
    assert layer.merged and err == layer.merge_error and 0.0 < err < 0.15
    assert err == pytest.approx(roundtrip_error(target, layer.weight4), rel=1e-6)
    y_merged = layer(x)
    ref_merged = x.double() @ layer.weight4.dequantize(torch.float32).double().t() + layer.bias.double()
    assert_close("merged y", y_merged, ref_merged, torch.float32)
    assert rel_err(y_merged, y) < 2 * err  # the merged layer computes the same function up to the NF4 rounding
    # gradients still flow through a merged layer to x (as through a merged LoRALinear), not to A, B
    xg = x.clone().requires_grad_()
    dy = torch.randn_like(y_merged)
    layer(xg).backward(dy)
    dx_ref = dy.double() @ layer.weight4.dequantize(torch.float32).double()
    assert_close("merged dx", xg.grad, dx_ref, torch.float32)
    assert layer.lora_A.grad is None and layer.lora_B.grad is None and layer.bias.grad is None  # bias frozen
    layer.unmerge()
    assert not layer.merged
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(layer(x), y)


def test_apply_lora_quantize_nf4():
    torch.manual_seed(7)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj, self.o_proj = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.o_proj(self.q_proj(x) + self.v_proj(x))

    model = nn.Sequential(Block(), nn.Linear(64, 8))
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    lora_fast.apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4, quantize="nf4_dq")
    assert isinstance(model[0].q_proj, LoRALinear4bit) and model[0].q_proj.double_quant
    assert isinstance(model[0].o_proj, nn.Linear) and not isinstance(model[0].o_proj, LoRALinear4bit)
    assert torch.allclose(model[0].q_proj.weight4.dequantize(torch.float32), weights["0.q_proj"], atol=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"0.{m}.lora_{ab}" for m in ("q_proj", "v_proj") for ab in "AB"}
    model(torch.randn(3, 64)).sum().backward()
    assert model[0].q_proj.lora_B.grad is not None
    with pytest.raises(ValueError, match="quantize must be"):
        lora_fast.apply_lora(nn.Sequential(nn.Linear(64, 8)), ["0"], quantize="int4")
    with pytest.raises(ValueError, match="pissa_niter"):  # an option quantize cannot honour is refused, not dropped
        lora_fast.apply_lora(nn.Sequential(nn.Linear(64, 8)), ["0"], quantize="nf4", pissa_niter=2)
    odd = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 100))
    with pytest.raises(ValueError, match="module '1'.*64"):  # the error names the module that cannot be quantized
        lora_fast.apply_lora(odd, ["0", "1"], quantize="nf4")


def test_bitsandbytes_layout():
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbF

    torch.manual_seed(8)
    W = weight(40, 128, torch.bfloat16)
    for compress in (False, True):
        p = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4", compress_statistics=compress,
                              blocksize=64)
        if p.quant_state is None:
            p = p._quantize("cpu")
        q = lora_fast.nf4.from_bnb(p)
        theirs = bnbF.dequantize_4bit(p.data, p.quant_state)
        assert torch.equal(q.dequantize(theirs.dtype), theirs)
        ours = quantize_nf4(W, double_quant=compress)
        assert torch.equal(ours.qweight, q.qweight)  # same codes, same packing: no re-quantization needed
        linear = bnb.nn.Linear4bit(128, 40, compute_dtype=torch.bfloat16, quant_type="nf4")
        linear.weight = p
        layer = LoRALinear4bit.from_linear(linear, rank=2, compute_dtype=torch.bfloat16)
        assert torch.equal(layer.weight4.dequantize(), theirs)


def test_decode_tiles_spanning_several_blocks(monkeypatch):
    """The GPU configs decode BLOCK_K = 128 or 256 (several 64-weight blocks per row, a masked tail when K = 192);
    the interpreter's default tiles hold one block: force the wide ones here. (The GEMV always steps one
    64-weight block along K, whatever the config's block_k; a wider BLOCK_N is forced for it instead.)"""
    from lora_fast.kernels import config as kcfg

    wide = {"gemm": kcfg.GemmConfig(16, 128, 128, group_m=2, num_warps=1, num_stages=1),
            "gemv": kcfg.GemmConfig(16, 32, 128, num_warps=1, num_stages=1),
            "dequant": kcfg.GemmConfig(0, 16, 128, num_warps=1, num_stages=1)}
    monkeypatch.setattr(kcfg, "_NF4_INTERPRET", wide)
    kcfg.nf4_config.cache_clear()
    try:
        torch.manual_seed(9)
        M, K, N, r = 18, 192, 20, 3
        q = quantize_nf4(weight(N, K), double_quant=True)
        W = q.dequantize(torch.float32).double()
        x, dy, A, B = torch.randn(M, K), torch.randn(M, N), torch.randn(r, K) / 8, torch.randn(N, r)
        assert torch.equal(kernels.nf4_dequantize(q, torch.float32), q.dequantize(torch.float32))
        want = x.double() @ W.t() + (x.double() @ A.double().t()) @ B.double().t()
        y, _ = kernels.lora_nf4_forward(x, q, None, A, B, 1.0, path="fused")
        assert_close("fused y", y, want, torch.float32)
        y, _ = kernels.nf4_gemv(x[:5], q, None, A, B, 1.0)
        assert_close("gemv y", y, want[:5], torch.float32)
        dx, _ = kernels.lora_nf4_backward_dx(dy, q, A, B, 1.0, path="fused")
        assert_close("dx", dx, dy.double() @ W + (dy.double() @ B.double()) @ A.double(), torch.float32)
    finally:
        kcfg.nf4_config.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_row_engines_match_the_reference(dtype):
    """The one-row GEMV engines ("fma": the default for M = 1 off the GPU too; "padded": rows padded to 16) at
    odd shapes: N = 37 (not a multiple of the 16-row tile), K = 1152 (18 quantization blocks: the interpreter's
    128-weight steps leave a half step), ranks 1 and 3, with and without bias and double quantization, every K
    split from one to more than the steps; outputs NaN-checked and xa stored."""
    torch.manual_seed(21)
    N, K = 37, 1152
    for r, dq, with_bias in ((1, False, True), (3, True, False)):
        q = quantize_nf4(weight(N, K), double_quant=dq)
        x = torch.randn(1, K).to(dtype)
        A, B = (torch.randn(r, K) / 16).to(dtype), torch.randn(N, r).to(dtype)
        b = torch.randn(N).to(dtype) if with_bias else None
        xa_want = x.double() @ A.double().t()
        want = x.double() @ q.dequantize(torch.float32).double().t() + 1.5 * xa_want @ B.double().t()
        if b is not None:
            want = want + b.double()
        for engine, splits in (("auto", None), ("fma", 1), ("fma", 4), ("fma", 40), ("padded", 3)):
            y, xa = kernels.nf4_gemv(x, q, b, A, B, 1.5, store_xa=True, engine=engine, splits=splits)
            assert torch.isfinite(y).all()
            assert_close(f"y ({engine}, splits={splits})", y, want, dtype)
            assert_close(f"xa ({engine}, splits={splits})", xa, xa_want, dtype)
            y2, _ = kernels.nf4_gemv(x, q, b, A, B, 1.5, engine=engine, splits=splits)
            assert torch.equal(y, y2), "the split sum must not depend on which program finishes last"


def test_fused_xa_matches_the_reference_and_leaves_its_counters_zero():
    """xa_mode "fused" (no shrink before the GEMV: each program adds its own K range's share of x @ A^T, and the
    tiles' split counters live across calls, reset by the program that finishes each tile), through the "fma"
    engine that the interpreter runs: odd shapes (N = 37, K = 1152; ranks 1, 3 and 20, whose padded rank 32 spans
    two tiles of the "wide" engine's xa), K splits from one to more than the steps, y and xa against the fp64
    reference; two shapes' plans interleaved on the same counters, each call bitwise equal to the first, and
    every counter back at zero after every call (a missed reset would leave the next call's tiles unfinished)."""
    gemv = importlib.import_module("lora_fast.kernels.nf4_gemv")
    torch.manual_seed(23)
    problems = []
    for (N, K, r, dq), dtype in zip(((37, 1152, 1, False), (50, 640, 3, True), (21, 192, 20, False)),
                                    (torch.float32, torch.bfloat16, torch.float16)):
        q = quantize_nf4(weight(N, K), double_quant=dq)
        x = torch.randn(1, K).to(dtype)
        A, B = (torch.randn(r, K) / 16).to(dtype), torch.randn(N, r).to(dtype)
        b = torch.randn(N).to(dtype)
        xa_want = x.double() @ A.double().t()
        want = x.double() @ q.dequantize(torch.float32).double().t() + 1.5 * xa_want @ B.double().t() + b.double()
        problems.append((q, x, A, B, b, xa_want, want, dtype))
    counters = gemv.tile_counters(torch.device("cpu"))  # this stream's slot
    for splits in (1, 4, 40):
        first = []
        for rnd in range(2):  # the plans alternate on the same counters
            for i, (q, x, A, B, b, xa_want, want, dtype) in enumerate(problems):
                y, xa = kernels.nf4_gemv(x, q, b, A, B, 1.5, store_xa=True, engine="fma", splits=splits,
                                         xa_mode="fused")
                assert int(counters.count_nonzero()) == 0, "a tile's counter was not reset"
                if rnd == 0:
                    assert_close(f"y (fused, splits={splits}, {dtype})", y, want, dtype)
                    assert_close(f"xa (fused, splits={splits}, {dtype})", xa, xa_want, dtype)
                    first.append(y)
                else:
                    assert torch.equal(y, first[i]), "a repeated call must give the same bits"


def test_one_row_engines_draw_the_same_dropout_mask():
    """With dropout the "fma" engine's xa (its split shrink) uses the mask the padded engine and the backward
    regenerate, from (seed, row, column)."""
    torch.manual_seed(22)
    N, K, r, p, seed = 40, 640, 4, 0.3, 1234
    q = quantize_nf4(weight(N, K))
    x, A, B = torch.randn(1, K), torch.randn(r, K) / 16, torch.randn(N, r)
    keep = dropout_mask_torch(seed, 1, K, p, "cpu")
    xa_want = torch.where(keep, x.double() / (1 - p), 0.0) @ A.double().t()
    want = x.double() @ q.dequantize(torch.float32).double().t() + 2.0 * xa_want @ B.double().t()
    for engine in ("fma", "padded"):
        y, xa = kernels.nf4_gemv(x, q, None, A, B, 2.0, dropout_p=p, seed=seed, store_xa=True, engine=engine)
        assert_close(f"xa ({engine})", xa, xa_want, torch.float32)
        assert_close(f"y ({engine})", y, want, torch.float32)


def test_gemv_engine_and_xa_mode_arguments_are_checked(monkeypatch):
    q = quantize_nf4(weight(8, 64))
    x, A, B = torch.randn(1, 64), torch.randn(2, 64), torch.randn(8, 2)
    with pytest.raises(ValueError, match="xa_mode must be one of"):
        kernels.nf4_gemv(x, q, None, A, B, 1.0, xa_mode="inline")
    with pytest.raises(ValueError, match="xa_mode='fused' cannot run here: it has no dropout"):
        kernels.nf4_gemv(x, q, None, A, B, 1.0, dropout_p=0.1, seed=3, engine="fma", xa_mode="fused")
    with pytest.raises(ValueError, match="xa_mode='fused' is for the one-row engines"):
        kernels.nf4_gemv(torch.randn(2, 64), q, None, A, B, 1.0, xa_mode="fused")
    # more output tiles than a counter slot holds: refused by name ("auto" takes the shrink there)
    gemv = importlib.import_module("lora_fast.kernels.nf4_gemv")
    monkeypatch.setattr(gemv, "COUNTER_SLOT", 0)
    with pytest.raises(ValueError, match="xa_mode='fused' cannot run here: it takes at most 0 output tiles, got 1"):
        kernels.nf4_gemv(x, q, None, A, B, 1.0, engine="fma", xa_mode="fused")
    monkeypatch.undo()
    # with dropout, "auto" takes the shrink (whose mask the backward regenerates)
    y, _ = kernels.nf4_gemv(x, q, None, A, B, 1.0, dropout_p=0.1, seed=3, engine="fma")
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="engine must be one of"):
        kernels.nf4_gemv(x, q, None, A, B, 1.0, engine="tensor")
    with pytest.raises(ValueError, match="engine='fma' takes one row, got M=2"):
        kernels.nf4_gemv(torch.randn(2, 64), q, None, A, B, 1.0, engine="fma")
    # "lanes" runs PTX (mma.sync): on the CPU it is refused with the reason, never emulated
    with pytest.raises(ValueError, match="engine='lanes' cannot run here: it runs PTX"):
        kernels.nf4_gemv(x, q, None, A, B, 1.0, engine="lanes")
    with pytest.raises(ValueError, match="engine='wide' cannot run here: it runs PTX"):
        kernels.nf4_gemv(x, q, None, A, B, 1.0, engine="wide")


def test_shrink_partials_zeroes_the_consumers_counters():
    """lora_shrink_partials(zero=...) clears the given int32 buffer in the same launch (the one-row GEMV's split
    counters, taken uninitialised from the allocator): also with no rows, and a wrong buffer is named."""
    from lora_fast.kernels.lora_shrink import lora_shrink_partials

    x, A = torch.randn(1, 192), torch.randn(3, 192)
    for count, rows in ((1500, 1), (7, 0)):  # 1500: more than one 1024-element store
        zero = torch.full((count,), 77, dtype=torch.int32)
        ws = lora_shrink_partials(x[:rows], A, 4, zero=zero)
        assert torch.equal(zero, torch.zeros_like(zero))
        if rows:
            assert_close("xa", ws.sum(0), x.double() @ A.double().t(), torch.float32)
    for bad in (torch.zeros(4), [0, 0], torch.zeros(8, dtype=torch.int32)[::2]):
        with pytest.raises(ValueError, match="zero must be a contiguous int32 tensor"):
            lora_shrink_partials(x, A, 4, zero=bad)


@pytest.mark.parametrize("dq", [False, True])
def test_merged_state_dict_loads_unmerged_without_a_second_adapter(dq):
    """merge() re-quantizes deq(Wq) + s B A into the buffers, and `merged` is no state: a merged layer's state
    dict loaded into a fresh layer applied the adapter twice. It now holds the NF4 base from before the merge
    (same keys), so the fresh layer computes exactly what the layer did before merging; loading into a merged
    layer keeps it merged (the adapter re-folded once)."""
    _, layer = make_layer(dq)
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = layer(x)
        keys = list(layer.state_dict())
        layer.merge()
        merged_buffers = {k: getattr(layer, k).clone() for k in ("qweight", "absmax")}
        y_merged = layer(x)
        sd = layer.state_dict()
        assert list(sd) == keys
        assert layer.merged and all(torch.equal(getattr(layer, k), v) for k, v in merged_buffers.items())
        assert not torch.equal(sd["qweight"], merged_buffers["qweight"])  # the base from before the merge
        fresh = LoRALinear4bit(128, 24, rank=3, alpha=6, compute_dtype=torch.float32, double_quant=dq)
        fresh.load_state_dict(sd)
        assert not fresh.merged and torch.equal(fresh(x), y)
        other = LoRALinear4bit(128, 24, rank=3, alpha=6, compute_dtype=torch.float32, double_quant=dq)
        other.merge()
        other.load_state_dict(sd)
        assert other.merged and torch.equal(other(x), y_merged)
        other.unmerge()
        assert torch.equal(other(x), y)
