"""Compile the persistent forward and dX kernels for sm_90 with the installed Triton, without a GPU, and print the
shared memory each variant allocates (the H100 / H200 allow 227 KB per block). The device runs Triton 3.6; this
checks that the same kernels still fit under another version (the project supports 3.6 to 3.9).

    python bench/compile_sm90.py

Variants: the forward with a shrink launch before it (its plain persistent walk), with the inline shrink, and with
producer tiles (A through pointers or a descriptor); dX with the inline shrink and with producer tiles. Ranks 16 and
64, the "large" bf16 tiles of kernels/config.py (128 x 256 x 64, 8 warps, 3 stages).
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lora_fast.kernels import lora_bwd, lora_fwd  # noqa: E402

ROWS, COLS, STEP = 128, 256, 64  # output tile and reduction step of the "large" configs


def shared_bytes(fn, constexprs: dict, descriptors: dict, pointers: tuple, floats=("scaling", "inv_keep")) -> int:
    """Shared memory of `fn` compiled for sm_90: tensor descriptors (name -> block), bf16 pointers, an int32 FLAGS
    pointer, fp32 `floats`, every other runtime argument int32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in descriptors:
            sig[name] = "tensordesc<bf16[%d,%d]>" % descriptors[name]
        elif name == "FLAGS":
            sig[name] = "*i32"
        elif name in pointers:
            sig[name] = "*bf16"
        else:
            sig[name] = "fp32" if name in floats else "i32"
    kernel = triton.compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 64),
                            options=dict(num_warps=8, num_stages=3))
    return kernel.metadata.shared


def forward(rank_block: int, mode: str, a_tma: bool = False) -> int:
    producer, inline = mode == "producer", mode == "inline"
    y_tma = not producer  # the plan stores y through pointers with producer tiles
    const = dict(HAS_BIAS=False, DROPOUT=False, COMPUTE_XA=False, STORE_XA=False, USE_TMA=True, BLOCK_M=ROWS,
                 BLOCK_N=COLS, BLOCK_K=STEP, BLOCK_R=rank_block, NUM_R_CHUNKS=1, GROUP_M=8, PRECISION="ieee",
                 ACC=triton.language.float32, HAS_OUT_SCALE=False, PERSISTENT=True, Y_TMA=y_tma, XA_SPLITS=0,
                 GDC_WAIT=False, INLINE_XA=inline, SHRINK_STAGES=3, PRODUCER_XA=producer, A_TMA=a_tma)
    desc = {"X": (ROWS, STEP), "W": (COLS, STEP)}
    desc.update({"Y": (ROWS, COLS)} if y_tma else {})
    desc.update({"A": (rank_block, STEP)} if a_tma else {})
    return shared_bytes(lora_fwd._lora_fwd_kernel, const, desc,
                        ("X", "W", "A", "B", "BIAS", "XA", "Y", "OUT_SCALE", "XA_OUT"))


def dx(rank_block: int, mode: str, b_tma: bool = False) -> int:
    producer, inline = mode == "producer", mode == "inline"
    dx_tma = not producer
    const = dict(DROPOUT=False, COMPUTE_DYB=False, STORE_DYB=False, USE_TMA=True, BLOCK_M=ROWS, BLOCK_K=COLS,
                 BLOCK_N=STEP, BLOCK_R=rank_block, NUM_R_CHUNKS=1, GROUP_M=8, PRECISION="ieee",
                 ACC=triton.language.float32, HAS_DY_SCALE=False, PERSISTENT=True, GDC_WAIT=False,
                 INLINE_DYB=inline, DX_TMA=dx_tma, SHRINK_STAGES=4, PRODUCER_DYB=producer, B_TMA=b_tma)
    desc = {"DY": (ROWS, STEP), "W": (STEP, COLS)}
    desc.update({"DX": (ROWS, COLS)} if dx_tma else {})
    desc.update({"B": (STEP, rank_block)} if b_tma else {})
    return shared_bytes(lora_bwd._lora_bwd_dx_kernel, const, desc, ("DY", "W", "B", "A", "DYB", "DX", "DY_SCALE"))


def main():
    print(f"Triton {triton.__version__}, sm_90, shared memory per block (limit 227 KB = 232448 bytes)")
    cases = [("forward, shrink launch", forward, "shrink", {}), ("forward, inline", forward, "inline", {}),
             ("forward, producer, A pointers", forward, "producer", {}),
             ("forward, producer, A descriptor", forward, "producer", {"a_tma": True}),
             ("dX, inline", dx, "inline", {}), ("dX, producer, B pointers", dx, "producer", {}),
             ("dX, producer, B descriptor", dx, "producer", {"b_tma": True})]
    worst = 0
    for name, build, mode, kw in cases:
        for rank_block in (16, 64):
            try:
                smem = build(rank_block, mode, **kw)
                worst = max(worst, smem)
                print(f"{name:34s} r<={rank_block:2d}: {smem:7d} bytes", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{name:34s} r<={rank_block:2d}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    return 0 if worst <= 232448 else 1


if __name__ == "__main__":
    sys.exit(main())
