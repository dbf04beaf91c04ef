"""Access widths of the decode kernels as compiled for the H100 / H200 (sm_90), checked without a GPU.

The interpreter runs the kernels' arithmetic, not their code generation: a load whose mask varies element by
element along the contiguous dimension, or whose offset comes from memory with no divisibility hint, still gives
the right numbers but compiles to one 2-byte access per element. Twelfth session (bench/NOTES.md): the multi-LoRA
expand kernels stored y and loaded B that way (expand alone at 4096 / 32: 22.0 -> 17.3 µs with 16-byte accesses;
16 tokens / 16 adapters 1.25x -> 1.07x the base). These tests compile the kernels for sm_90 with Triton's CUDA
backend, specialised as Triton would on the GPU (pointers and multiple-of-16 ints divisible by 16, unit strides
constant), and count the PTX's global loads and stores by width.

The compile runs in a subprocess, because the test session sets TRITON_INTERPRET=1 before Triton loads. A Triton
without the CUDA backend (or its bundled ptxas) skips these tests.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import collections, json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, sys.argv[1])
try:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as e:  # noqa: BLE001
    print(json.dumps({"skip": f"no Triton CUDA compiler: {e!r}"})); sys.exit(0)
from lora_fast.kernels import multi_lora as ml
lora_bwd = sys.modules["lora_fast.kernels.lora_bwd"]


def widths(fn, constexprs, pointers, div16=(), num_warps=4, num_stages=1):
    """Counter of the PTX's ld.global / st.global flavours of fn compiled for sm_90."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 64),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    return dict(collections.Counter(re.findall(r"(?:ld|st)\.global[.\w]*", k.asm["ptx"])))


BF, F32, I32 = "*bf16", "*fp32", "*i32"
out = {}
try:
    rows_ptrs = dict(b_ptr=BF, bias_ptr=BF, ws_ptr=F32, y_ptr=BF, ids_ptr=I32, ranks_ptr=I32, scalings_ptr=F32,
                     slices_ptr=I32)
    rows_const = dict(stride_yn=1, HAS_BIAS=True, NUM_SLICES=1, SPLIT_K=2, BLOCK_R=16, BLOCK_N=1024, ACC=tl.float32,
                      GDC_WAIT=True, COL_ALIGN=16, R_ALIGNED=True, TRIGGER=True, ACCUMULATE=False)
    rows_div = ("stride_bs", "stride_wsk", "stride_wsi", "stride_wst", "stride_yt")
    # B as [S, N, R] (rank contiguous) and as the pool keeps it (Bt [S, R, N] viewed: N contiguous)
    rows = ml._expand_rows_kernel
    out["rows_nr"] = widths(rows, dict(rows_const, stride_br=1), rows_ptrs, rows_div + ("stride_bn",))
    out["rows_pool"] = widths(rows, dict(rows_const, stride_bn=1), rows_ptrs, rows_div + ("stride_br",))
    # the same kernel without the hints (VEC_HINTS off): the control that shows what the check catches
    out["rows_nr_nohints"] = widths(rows, dict(rows_const, stride_br=1, COL_ALIGN=1, R_ALIGNED=False), rows_ptrs,
                                    rows_div + ("stride_bn",))
    seg_ptrs = dict(x_ptr=BF, a_ptr=BF, b_ptr=BF, bias_ptr=BF, ws_ptr=F32, y_ptr=BF, perm_ptr=I32, seg_start_ptr=I32,
                    seg_adapter_ptr=I32, ranks_ptr=I32, scalings_ptr=F32, slices_ptr=I32)
    # without the bias: its [128] vector per step is one element per thread at 4 warps whatever the hints
    out["segment"] = widths(
        ml._expand_kernel,
        dict(stride_br=1, stride_yn=1, stride_xk=1, stride_ak=1, SHRINK=False, ACCUMULATE=False, HAS_BIAS=False,
             SEGS_P2=32, CHUNKS=4, SPLIT_K=4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, BLOCK_R=16, PRECISION="ieee",
             ACC=tl.float32, GDC_WAIT=False, COL_ALIGN=16, R_ALIGNED=True, TRIGGER=False),
        seg_ptrs, ("stride_xt", "stride_as", "stride_ai", "stride_ar", "stride_bs", "stride_bn", "stride_wsk",
                   "stride_wsi", "stride_wst", "stride_yt"), num_stages=2)
    fused_ptrs = dict(x_ptr=BF, w_ptr=BF, bias_ptr=BF, b_ptr=BF, ws_ptr=F32, y_ptr=BF, perm_ptr=I32, seg_of_ptr=I32,
                      seg_start_ptr=I32, seg_adapter_ptr=I32, ranks_ptr=I32, scalings_ptr=F32, slices_ptr=I32)
    out["fused"] = widths(
        ml._fused_kernel,
        dict(stride_xk=1, stride_wk=1, stride_br=1, stride_yn=1, HAS_BIAS=True, NUM_SLICES=1, SPLIT_K=4, BLOCK_M=16,
             BLOCK_N=32, BLOCK_K=256, BLOCK_R=16, GROUP_M=1, PRECISION="ieee", ACC=tl.float32, GATHER=True,
             GATHER_R=16, BASE_MODE=0, GDC_WAIT=True, COL_ALIGN=16, R_ALIGNED=True),
        fused_ptrs, ("stride_xt", "stride_wn", "stride_bs", "stride_bn", "stride_wsk", "stride_wsi", "stride_wst",
                     "stride_yt", "K"), num_stages=4)
    # the rows expand adding to y (GEMM "first") and the W-stream GEMM with its 64-token tile (kernels/wstream.py)
    out["rows_accumulate"] = widths(rows, dict(rows_const, stride_br=1, ACCUMULATE=True, TRIGGER=False), rows_ptrs,
                                    rows_div + ("stride_bn",))
    from lora_fast.kernels import wstream
    out["wstream"] = widths(
        wstream._wstream_kernel,
        dict(stride_xk=1, stride_wk=1, stride_yn=1, ACCUMULATE=True, HAS_BIAS=False, GDC_WAIT=True, TRIGGER=False,
             EVEN_K=True, BLOCK_T=64, BLOCK_N=32, BLOCK_K=128, PRECISION="ieee", ACC=tl.float32, PERSISTENT=False,
             LORA=False, NUM_SLICES=1, SPLIT_K=1, BLOCK_R=16, RANK_VEC=1),
        dict(x_ptr=BF, w_ptr=BF, bias_ptr=BF, y_ptr=BF, b_ptr=BF, ws_ptr=F32, ids_ptr=I32, ranks_ptr=I32,
             scalings_ptr=F32, slices_ptr=I32), ("N", "K", "stride_xt", "stride_wn", "stride_yt"), num_stages=6)
    # GEMM="lora": the W-stream GEMM adding the LoRA term, B in the pool's layout (N contiguous) and as [S, N, R]
    lora_const = dict(stride_xk=1, stride_wk=1, stride_yn=1, ACCUMULATE=False, HAS_BIAS=True, GDC_WAIT=True,
                      TRIGGER=False, EVEN_K=True, BLOCK_T=64, BLOCK_N=32, BLOCK_K=128, PRECISION="ieee",
                      ACC=tl.float32, PERSISTENT=False, LORA=True, NUM_SLICES=1, SPLIT_K=2, BLOCK_R=16)
    lora_ptrs = dict(x_ptr=BF, w_ptr=BF, bias_ptr=BF, y_ptr=BF, b_ptr=BF, ws_ptr=F32, ids_ptr=I32, ranks_ptr=I32,
                     scalings_ptr=F32, slices_ptr=I32)
    lora_div = ("N", "K", "stride_xt", "stride_wn", "stride_yt", "stride_bs", "stride_wsk", "stride_wsi", "stride_wst")
    out["wstream_lora_pool"] = widths(wstream._wstream_kernel, dict(lora_const, stride_bn=1, RANK_VEC=1), lora_ptrs,
                                      lora_div + ("stride_br",), num_stages=6)
    out["wstream_lora_nr"] = widths(wstream._wstream_kernel, dict(lora_const, stride_br=1, RANK_VEC=8), lora_ptrs,
                                    lora_div + ("stride_bn",), num_stages=6)
    out["sum_splits"] = widths(lora_bwd._sum_splits_kernel, dict(BLOCK=512, SPLIT_CHUNK=8),
                               dict(PA=F32, PB=F32, OUT_A="*bf16", OUT_B="*bf16"), ("NUM_A", "NUM_B"))
except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
    import traceback
    out["error"] = traceback.format_exc()[-2000:]
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ROOT], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert "error" not in result, result["error"]
    return result


def narrow(counts, kinds=("ld.global.b16", "st.global.b16")):
    return {k: v for k, v in counts.items() if k in kinds}


@pytest.mark.parametrize("case", ["rows_nr", "rows_pool", "segment", "fused", "rows_accumulate", "wstream",
                                  "wstream_lora_pool", "wstream_lora_nr"])
def test_multi_lora_expand_accesses_are_16_bytes(ptx, case):
    """No 2-byte loads or stores of y, B or the bias in the multi-LoRA epilogues (either B layout, writing or adding
    to y), nor of y in the W-stream GEMM's epilogue, nor of B in its LoRA term (GEMM="lora", either layout: the
    rank-contiguous one needs the mask rounded to 8 rank rows)."""
    counts = ptx[case]
    assert not narrow(counts), f"{case}: 2-byte global accesses {narrow(counts)} (all: {counts})"
    assert counts.get("st.global.v4.b32", 0) >= 1 or case == "fused", f"{case}: y not stored in 16 bytes: {counts}"


def test_the_check_sees_2_byte_accesses_without_the_hints(ptx):
    """The control: the rows expand without the slice divisibility and the rounded rank mask is what the check
    above must catch (one 2-byte access per element of B and of the bias, and of y)."""
    counts = ptx["rows_nr_nohints"]
    assert counts.get("ld.global.b16", 0) >= 64 and counts.get("st.global.b16", 0) >= 1, counts


def test_sum_splits_loads_partials_16_bytes_at_a_time(ptx):
    """dA / dB's split sum reads its fp32 partials as 16-byte vectors (NUM_A / NUM_B specialised)."""
    counts = ptx["sum_splits"]
    assert counts.get("ld.global.b32", 0) == 0 and counts.get("ld.global.v4.b32", 0) >= 8, counts


def test_launchers_claim_only_the_alignment_the_slices_have():
    """COL_ALIGN is what the kernels assert about every slice's column offset and width (a wrong claim would make
    the GPU read and write misaligned vectors): the largest power of two up to 16 dividing every width; R_ALIGNED
    needs B's rank to be a multiple of 8. VEC_HINTS False turns both off."""
    import torch

    from lora_fast.kernels.multi_lora import _col_align, _r_aligned

    assert _col_align((4096,), {}) == 16
    assert _col_align((4096, 1024, 1024), {}) == 16
    assert _col_align((40, 16, 24), {}) == 8   # offsets 0, 40, 56
    assert _col_align((4096, 4100), {}) == 4
    assert _col_align((17,), {}) == 1
    assert _col_align((4096,), {"VEC_HINTS": False}) == 1
    for width in (1, 3, 6, 40, 100, 4100):
        align = _col_align((width, 64), {})
        assert width % align == 0 and (width + 64) % align == 0 and (align == 16 or width % (2 * align))
    B = torch.empty(2, 8, 16).transpose(1, 2)  # [S, N=16, R=8]
    assert _r_aligned(torch.empty(2, 8, 16), {}) and _r_aligned(torch.empty(2, 8, 64), {})
    assert not _r_aligned(torch.empty(2, 8, 12), {}) and not _r_aligned(torch.empty(2, 8, 3), {})
    assert _r_aligned(B, {}) and not _r_aligned(torch.empty(2, 8, 16), {"VEC_HINTS": False})
