"""NF4 quantization of frozen base weights (QLoRA, Dettmers et al. 2023), in plain PyTorch.

`quantize_nf4(W)` -> `NF4Tensor`; `dequantize_nf4(q)` -> W'. Layout (what the kernels decode in registers):
  qweight [N, K // 2] uint8: two 4-bit codes per byte, element 2j of a row in the high nibble;
  absmax  [N, K // 64] fp32: the largest |w| of each 64-weight block along K (blocksize 64, as in the paper);
  with double quantization (the paper's section 3), absmax is stored as uint8 codes of an 8-bit float
  (FP8 E4M3, normalised to [-1, 1]) in groups of 256 blocks after subtracting its mean:
  absmax = absmax_code[q] * absmax_scale[i // 256] + absmax_offset, i the block's flat index.
W'[n, k] = NF4_CODE[code(n, k)] * absmax[n, k // 64]. Storage per weight: 4 + 32/64 = 4.5 bits, or
4 + 8/64 + 32/(64 * 256) = 4.127 bits double-quantized, against 16 for bf16.

The bytes are bitsandbytes' `Params4bit` layout (quant_type "nf4", blocksize 64) viewed as [N, K // 2]:
`from_bnb` imports a `Linear4bit` or `Params4bit` without re-quantizing. K must be a multiple of 64: then
every quantization block lies in one row, which the kernels rely on; other K are refused (pad W's columns
with zeros and x's with zeros to use NF4 there).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace

import torch

from .kernels.nf4_dequant import NF4_BLOCK, NF4_CODE
from .validation import FLOAT_DTYPES, check_dtype, check_flag, check_tensor

# Blocks of absmax per second-level scale in double quantization (the paper's blocksize 256).
ABSMAX_GROUP = 256
# FP8 E4M3's largest finite value: the second-level codes are E4M3 numbers scaled to [-1, 1] by it.
_E4M3_MAX = 448.0

__all__ = ["NF4_BLOCK", "NF4_CODE", "NF4Tensor", "check_nf4_tensor", "quantize_nf4", "dequantize_nf4",
           "roundtrip_error", "from_bnb"]


@dataclass
class NF4Tensor:
    """A 2-D weight [N, K] stored as NF4 (see the module docstring for the fields' layout).

    qweight: uint8 [N, K // 2]; absmax: fp32 [N, K // 64], or uint8 [N, K // 64] when double-quantized, with
    absmax_code fp32 [256], absmax_scale fp32 [ceil(N * K / 64 / absmax_group)], absmax_offset (float);
    shape: (N, K); dtype: the dtype `dequantize()` returns by default (the original weight's).
    error: ||W - W'|| / ||W|| measured when quantized here (None for an imported tensor).

    >>> q = quantize_nf4(linear.weight, double_quant=True)
    >>> print(q.error, q.nbytes / (linear.weight.numel() * 2))   # round-trip error, size vs bf16
    >>> W2 = q.dequantize()
    """

    qweight: torch.Tensor
    absmax: torch.Tensor
    shape: tuple
    dtype: torch.dtype = torch.bfloat16
    absmax_code: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: float = 0.0
    absmax_group: int = ABSMAX_GROUP
    error: float | None = field(default=None, compare=False)

    @property
    def double_quant(self) -> bool:
        return self.absmax_code is not None

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (the code tables included)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def absmax_float(self) -> torch.Tensor:
        """fp32 [N, K // 64] block scales (decoding the second level when double-quantized)."""
        N, K = self.shape
        if not self.double_quant:
            return self.absmax.view(N, K // NF4_BLOCK)
        idx = torch.arange(self.absmax.numel(), device=self.device) // self.absmax_group
        flat = self.absmax_code[self.absmax.reshape(-1).long()] * self.absmax_scale[idx] + self.absmax_offset
        return flat.view(N, K // NF4_BLOCK)

    def codes(self) -> torch.Tensor:
        """The 4-bit codes as uint8 [N, K], unpacked."""
        N, K = self.shape
        return torch.stack((self.qweight >> 4, self.qweight & 15), dim=-1).view(N, K)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W' [N, K] in `dtype` (default: self.dtype), computed in fp32 and rounded once."""
        dtype = check_dtype(dtype, "dtype") or check_dtype(self.dtype, "NF4Tensor.dtype", none_ok=False)
        N, K = self.shape
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=self.device)
        vals = code[self.codes().long()].view(N, K // NF4_BLOCK, NF4_BLOCK)
        return (vals * self.absmax_float()[..., None]).view(N, K).to(dtype)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "NF4Tensor":
        """A copy on `device` (the packed tensors keep their dtypes); `dtype` changes the dequantize dtype."""
        check_dtype(dtype, "dtype")
        moved = {k: v.to(device) if device is not None else v for k, v in self._tensors().items()}
        return replace(self, **moved, dtype=dtype or self.dtype)

    def _tensors(self) -> dict:
        t = {"qweight": self.qweight, "absmax": self.absmax}
        if self.double_quant:
            t.update(absmax_code=self.absmax_code, absmax_scale=self.absmax_scale)
        return t

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors to save: qweight, absmax, and absmax_code / absmax_scale / absmax_offset / absmax_group
        when double-quantized. `NF4Tensor.from_state_dict` rebuilds it."""
        sd = dict(self._tensors())
        if self.double_quant:
            sd["absmax_offset"] = torch.tensor(self.absmax_offset, dtype=torch.float32)
            sd["absmax_group"] = torch.tensor(self.absmax_group, dtype=torch.int64)
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, dtype: torch.dtype = torch.bfloat16) -> "NF4Tensor":
        """Inverse of `state_dict()`: the shape is (qweight rows, 2 * qweight columns)."""
        for key in ("qweight", "absmax"):
            if key not in sd:
                raise ValueError(f"NF4 state dict is missing {key!r}")
        qweight = sd["qweight"]
        if qweight.dtype != torch.uint8 or qweight.dim() != 2:
            raise TypeError(f"qweight must be a 2-D uint8 tensor, got {qweight.dtype} {list(qweight.shape)}")
        N, K = qweight.shape[0], 2 * qweight.shape[1]
        dq = "absmax_code" in sd
        return cls(qweight, sd["absmax"].reshape(N, K // NF4_BLOCK), (N, K), dtype,
                   sd.get("absmax_code"), sd.get("absmax_scale"),
                   float(sd["absmax_offset"]) if dq else 0.0, int(sd["absmax_group"]) if dq else ABSMAX_GROUP)

    def __repr__(self) -> str:
        err = "" if self.error is None else f", error={self.error:.4f}"
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, double_quant={self.double_quant}, "
                f"device={self.device}, bits_per_weight={8 * self.nbytes / (self.shape[0] * self.shape[1]):.3f}"
                f"{err})")


def check_nf4_shape(shape, name: str = "weight") -> None:
    """K (the last dimension) must be a multiple of the blocksize: each block then lies in one row."""
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {list(shape)}")
    if shape[1] % NF4_BLOCK or shape[1] == 0:
        raise ValueError(f"{name} has K={shape[1]} columns: NF4 needs K to be a positive multiple of the "
                         f"blocksize {NF4_BLOCK} (pad the weight's columns, and x, with zeros)")


def _is_int(v) -> bool:
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def check_nf4_tensor(q, name: str = "weight") -> "NF4Tensor":
    """`q` is an NF4Tensor whose fields agree with each other (an NF4Tensor built or edited by hand may not): the
    layout every decode path reads, checked in O(1) (no tensor is read; a few µs, as qlora_linear runs it on every
    call). Each error names `name` and the field."""
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"{name} must be an NF4Tensor (lora_fast.nf4.quantize_nf4), got {type(q).__name__}")
    shape = q.shape
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and _is_int(shape[0]) and _is_int(shape[1])):
        raise ValueError(f"{name}.shape must be two ints (N, K), got {shape!r}")
    N, K = shape
    if N < 0:
        raise ValueError(f"{name}.shape has N={N} rows")
    check_nf4_shape(shape, f"{name}.shape")
    if q.dtype not in FLOAT_DTYPES:
        check_dtype(q.dtype, f"{name}.dtype", none_ok=False)
    qweight, absmax = q.qweight, q.absmax
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.shape != (N, K // 2):
        got = f"{qweight.dtype} {list(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise ValueError(f"{name}.qweight must be a uint8 [{N}, {K // 2}] tensor (two 4-bit codes per byte), got {got}")
    dq = q.absmax_code is not None
    blocks = N * K // NF4_BLOCK
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != (torch.uint8 if dq else torch.float32) \
            or absmax.numel() != blocks or not absmax.is_contiguous():
        got = f"{absmax.dtype} {list(absmax.shape)}" if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise ValueError(f"{name}.absmax must be a contiguous {torch.uint8 if dq else torch.float32} tensor of {blocks} "
                         f"block scales ([{N}, {K // NF4_BLOCK}]{', double-quantized codes' if dq else ''}), got {got}")
    device = qweight.device
    if absmax.device != device:
        raise ValueError(f"{name}.absmax is on {absmax.device} but {name}.qweight is on {device}")
    if dq:
        code, scale, group = q.absmax_code, q.absmax_scale, q.absmax_group
        if not isinstance(code, torch.Tensor) or not code.dtype.is_floating_point or code.numel() != 256:
            raise ValueError(f"{name}.absmax_code must be a float tensor of 256 values")
        if not _is_int(group) or group < 1:
            raise ValueError(f"{name}.absmax_group must be an int >= 1, got {group!r}")
        if not isinstance(scale, torch.Tensor) or not scale.dtype.is_floating_point \
                or scale.numel() < -(-blocks // group) or not scale.is_contiguous():
            raise ValueError(f"{name}.absmax_scale must be a contiguous float tensor of ceil({blocks} / "
                             f"{group}) = {-(-blocks // group)} scales")
        offset = q.absmax_offset
        if type(offset) is not float and (isinstance(offset, bool) or not isinstance(offset, numbers.Real)):
            raise ValueError(f"{name}.absmax_offset must be a float, got {type(offset).__name__}")
        for field_name, t in (("absmax_code", code), ("absmax_scale", scale)):
            if t.device != device:
                raise ValueError(f"{name}.{field_name} is on {t.device} but {name}.qweight is on {device}")
    elif q.absmax_scale is not None:
        raise ValueError(f"{name}.absmax_scale is set but absmax_code is None: double quantization needs both")
    return q


def _nearest_code(normalized: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 value to each element of `normalized` (in [-1, 1]): uint8."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=normalized.device)
    midpoints = (code[1:] + code[:-1]) / 2
    return torch.bucketize(normalized, midpoints).to(torch.uint8)


def fp8_absmax_code(device=None) -> torch.Tensor:
    """The 256 FP8 E4M3 values (by byte), divided by 448 so that they span [-1, 1]: the second-level code of
    double quantization. The two NaN bytes decode as +-1 (quantization never produces them)."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float() / _E4M3_MAX
    vals[0x7F], vals[0xFF] = 1.0, -1.0
    return vals.to(device)


def _double_quantize(absmax: torch.Tensor, group: int):
    """(codes uint8 [n], code [256], scale fp32 [ceil(n / group)], offset) of the fp32 block scales `absmax`."""
    flat = absmax.reshape(-1)
    offset = flat.mean()
    centered = flat - offset
    pad = (-centered.numel()) % group
    groups = torch.nn.functional.pad(centered, (0, pad)).view(-1, group)
    scale = groups.abs().amax(-1)
    normalized = groups / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    q = (normalized * _E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1)[: flat.numel()]
    return q.view(absmax.shape), fp8_absmax_code(absmax.device), scale, float(offset)


def quantize_nf4(weight: torch.Tensor, double_quant: bool = False, dtype: torch.dtype | None = None,
                 report_error: bool = True) -> NF4Tensor:
    """Quantize `weight` [N, K] (K a multiple of 64) to NF4 with blocksize 64 and fp32 absmax.

    Each weight maps to the nearest code of NF4_CODE after dividing its block by the block's absmax.
    double_quant: also quantize the absmax (8-bit floats, groups of 256, mean subtracted), as in the paper.
    dtype: what `dequantize()` returns (default: weight's dtype). report_error: measure the round-trip error
    ||W - W'|| / ||W|| (in fp32) into `.error` (NF4 on Gaussian weights: about 0.10).

    >>> q = quantize_nf4(torch.randn(4096, 4096, dtype=torch.bfloat16) / 64)
    >>> q.error                                        # ~0.10
    >>> W2 = dequantize_nf4(q)
    """
    check_tensor("weight", weight, ndim=2)
    check_nf4_shape(weight.shape)
    check_flag(double_quant, "double_quant")
    check_dtype(dtype, "dtype")
    if weight.device.type == "meta":
        raise ValueError("weight is on the meta device: quantize_nf4 needs its values (materialize it first)")
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // NF4_BLOCK, NF4_BLOCK)
    absmax = w.abs().amax(-1)
    # One reduction of the [N, K / 64] scales (a quantization reads W several times anyway): a NaN or inf weight
    # would turn its whole 64-weight block into NaN.
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("weight must be finite: it holds NaN or inf values, which NF4 cannot store (each block is "
                         "scaled by its largest |w|)")
    normalized = w / absmax.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    codes = _nearest_code(normalized).view(N, K)
    qweight = (codes[:, 0::2] << 4) | codes[:, 1::2]
    q = NF4Tensor(qweight.contiguous(), absmax, (N, K), dtype or weight.dtype)
    if double_quant:
        aq, code, scale, offset = _double_quantize(absmax, ABSMAX_GROUP)
        q = replace(q, absmax=aq, absmax_code=code, absmax_scale=scale, absmax_offset=offset)
    if report_error:
        q.error = roundtrip_error(weight, q)
    return q


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W' [N, K] = NF4_CODE[codes] * absmax, in `dtype` (default q.dtype). Plain PyTorch (any device).

    >>> W2 = dequantize_nf4(quantize_nf4(W), torch.float32)
    """
    check_nf4_tensor(q, "q")
    return q.dequantize(dtype)


def roundtrip_error(weight: torch.Tensor, q: NF4Tensor) -> float:
    """||W - dequantize(q)|| / ||W|| in fp32 (0 for an all-zero W that round-trips exactly)."""
    w = weight.detach().float()
    diff = torch.linalg.vector_norm(w - q.dequantize(torch.float32)).item()
    ref = torch.linalg.vector_norm(w).item()
    return diff / ref if ref > 0 else diff


def from_bnb(obj, dtype: torch.dtype | None = None) -> NF4Tensor:
    """Import a bitsandbytes `Linear4bit` (its weight) or `Params4bit` without re-quantizing.

    Needs quant_type "nf4", blocksize 64, uint8 storage and K % 64 == 0; nested (double-quantized) statistics
    are kept as they are, with bitsandbytes' own 8-bit code table. The packed bytes are bitsandbytes' flat
    layout, which for these shapes is row-major [N, K // 2], so nothing is copied or re-rounded.

    >>> q = from_bnb(bnb_linear4bit)
    >>> torch.equal(q.dequantize(), bitsandbytes.functional.dequantize_4bit(p.data, p.quant_state))
    """
    check_dtype(dtype, "dtype")
    param = getattr(obj, "weight", obj)
    state = getattr(param, "quant_state", None)
    if state is None:
        raise TypeError(f"expected a bitsandbytes Linear4bit or Params4bit with a quant_state (quantized: moved "
                        f"to the device), got {type(obj).__name__}")
    if state.quant_type != "nf4" or state.blocksize != NF4_BLOCK:
        raise ValueError(f"only nf4 with blocksize {NF4_BLOCK} imports, got {state.quant_type} blocksize "
                         f"{state.blocksize}")
    N, K = (int(d) for d in state.shape)
    check_nf4_shape((N, K))
    data = param.data
    if data.dtype != torch.uint8:
        raise ValueError(f"only uint8 quant_storage imports, got {data.dtype}")
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=state.code.device)
    if not torch.allclose(state.code.float(), code, atol=1e-7, rtol=0):
        raise ValueError("the bitsandbytes code table differs from the NF4 code book")
    qweight = data.reshape(N, K // 2)
    out_dtype = dtype or state.dtype
    if getattr(state, "nested", False):
        s2 = state.state2
        return NF4Tensor(qweight, state.absmax.reshape(N, K // NF4_BLOCK), (N, K), out_dtype,
                         s2.code.float(), s2.absmax.float(), float(state.offset), int(s2.blocksize))
    return NF4Tensor(qweight, state.absmax.float().reshape(N, K // NF4_BLOCK), (N, K), out_dtype)
