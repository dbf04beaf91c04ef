"""Census of the global memory access widths of lora_fast's Triton kernels, compiled for sm_90 without a GPU.

The interpreter runs a kernel's arithmetic but not its code generation, so a load that compiles to one 2-byte access
per element (an offset read from memory with no divisibility hint, a mask that varies element by element along the
contiguous dimension) passes every CPU test. This script shows them. The real launchers (lora_fast.kernels.*) are
called on CPU tensors of the benchmark shapes with the H200's facts patched in (132 SMs, capability 9, PDL on, TMA
allowed, "prmt" decode, CUDA configs); `JITFunction.run` is replaced by a recorder, so every launch the launchers
make is captured with its exact arguments, constexprs and options. Each launch is then specialised as Triton would
on the GPU (pointers divisible by 16, ints that are multiples of 16 get tt.divisibility 16, ints equal to 1 become
constexpr 1, do_not_specialize respected) and compiled for sm_90. The PTX's ld.global / st.global / cp.async / atom
accesses are counted by flavour and mapped to source lines through its .loc directives, with the TTGIR layout of
each access; registers and spills come from cuobjdump -res-usage (bundled with Triton).

    python bench/ptx_census.py [case-substring ...]   # every case by default; --list shows them
    CENSUS_PTX=DIR ...    also writes each kernel's PTX, TTGIR and cubin to DIR
    CENSUS_SASS=1 ...     also prints each SASS loop's instruction count and its most frequent opcodes (the
                          instructions per element of a streaming kernel: divide by the elements a thread
                          handles per iteration)

Written on 2026-12-01 (twelfth session, bench/NOTES.md): it found the multi-LoRA expands' 2-byte y stores and B
loads, the NF4 GEMVs' 8-byte byte loads and dA / dB's scalar split-sum loads. It uses Triton internals
(`native_specialize_impl`, checked with Triton 3.9); `tests/test_ptx_widths.py` guards the fixed kernels with
stable APIs only.
"""
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.backends.nvidia as nv  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import lora_fast.kernels as K  # noqa: E402

# (the package rebinds some submodule names to functions: take the modules themselves)
_M = {n: sys.modules["lora_fast.kernels." + n] for n in (
    "config", "helpers", "lora_bwd", "lora_fwd", "dora", "nf4_gemv", "nf4_dequant", "lora_shrink", "lora_nf4_fwd",
    "lora_nf4_bwd", "rows")}
config, helpers, lora_bwd, lora_fwd, dora = (_M[n] for n in ("config", "helpers", "lora_bwd", "lora_fwd", "dora"))
nf4_gemv, nf4_dequant, lora_shrink = _M["nf4_gemv"], _M["nf4_dequant"], _M["lora_shrink"]
from lora_fast.nf4 import NF4Tensor  # noqa: E402

assert not helpers.is_interpret()

# ---------------------------------------------------------------- GPU facts of an H200
SMS = 132
for mod in (config, lora_fwd, lora_bwd, dora, nf4_gemv, lora_shrink):
    if hasattr(mod, "num_sms"):
        mod.num_sms = lambda device: SMS
for mod in (config, nf4_gemv):
    if hasattr(mod, "capability_major"):
        mod.capability_major = lambda device: 9
for mod in (helpers, lora_fwd, lora_bwd, nf4_gemv):
    if hasattr(mod, "pdl_enabled"):
        mod.pdl_enabled = lambda device: True
nf4_dequant.prmt_available = lambda device: True
config.shared_memory_per_sm = lambda device: 233472  # what torch reports on the H200 (the W-stream GEMM's guard)
import lora_fast.kernels.multi_lora  # noqa: E402,F401 (not imported by the package itself)
multi_lora = sys.modules["lora_fast.kernels.multi_lora"]
multi_lora.pdl_enabled = lambda device: True
multi_lora.get_config = lambda T, K, N, R_PAD, dtype, device: dict(
    multi_lora._config(multi_lora._bucket(T), int(K), int(N), int(R_PAD), dtype, True), **multi_lora._OVERRIDE)
multi_lora._base_gemm = lambda *args: None  # cuBLAS's X·Wᵀ (a CPU GEMM of the real size would take minutes)
torch.Tensor.addmm_ = lambda self, *args, **kwargs: self  # likewise the "addmm" path's last step
nf4_gemv.lanes_unsupported = lambda x, w4, align=4: None


_TMA_ENABLED = helpers.tma_enabled


def _tma_enabled(mode, *tensors):
    """helpers.tma_enabled as on a Hopper GPU: "auto" takes descriptors wherever the tensors allow them."""
    return _TMA_ENABLED(True if mode == "auto" else mode, *tensors)


for mod in (helpers, lora_fwd, lora_bwd):
    if hasattr(mod, "tma_enabled"):
        mod.tma_enabled = _tma_enabled

# ---------------------------------------------------------------- capture launches
CAPTURED = []


def _record(self, *args, grid, warmup, **kwargs):
    CAPTURED.append((self, args, kwargs))
    return None


JITFunction.run = _record


def specialise(fn, args, kwargs):
    """(signature, constexprs, attrs, options) Triton would derive for fn[grid](*args, **kwargs) on the GPU."""
    names = fn.arg_names
    params = {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound = inspect.signature(fn.fn).bind(*args, **params)
    bound.apply_defaults()
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound.arguments[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
            continue
        ty, spec = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize, True)
        if ty == "constexpr":
            sig[p.name], consts[p.name] = "constexpr", spec
            continue
        sig[p.name] = ty
        if isinstance(v, torch.Tensor) or spec == "D":  # device allocations are 16-byte aligned
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs, options


BIN = os.path.join(os.path.dirname(nv.__file__), "bin")
ACC_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:ld|st)\.global[\w.:]*|cp\.async\.[\w.:]+|atom\.[\w.:]+|red\.[\w.:]+)"
                    r"(.*)$")


def analyse(ptx):
    """{(flavour, file:line): count} of global accesses, from the PTX and its .loc directives."""
    files = {m.group(1): os.path.basename(m.group(2))
             for m in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)}
    out, loc = collections.Counter(), "?"
    for line in ptx.splitlines():
        s = line.strip()
        m = re.match(r"\.loc\s+(\d+)\s+(\d+)", s)
        if m:
            loc = f"{files.get(m.group(1), m.group(1))}:{m.group(2)}"
            continue
        m = ACC_RE.match(s)
        if m:
            flav = m.group(1)
            if flav.startswith("cp.async") and ".shared.global" in flav and "bulk" not in flav:
                size = re.search(r"\],\s*(0x[0-9a-fA-F]+|\d+)", m.group(2))
                flav += f"[{int(size.group(1), 0)}B]" if size else ""
            if flav.startswith(("cp.async.commit", "cp.async.wait", "cp.async.bulk.commit", "cp.async.bulk.wait")):
                continue
            out[(flav, loc)] += 1
    return out


_BYTES = {"i1": 1, "i8": 1, "i16": 2, "bf16": 2, "f16": 2, "i32": 4, "f32": 4, "i64": 8, "f64": 8}


def ttgir_layouts(ttgir):
    """{file:line: set of 'op elem[shape] spt=.. order=..'} for the global loads / stores / async copies."""
    layouts = {}
    for m in re.finditer(r"^(#\w+) = #ttg\.(blocked|linear|slice)<(.*)>\s*$", ttgir, re.M):
        layouts[m.group(1)] = m.group(3)
    locs = {}
    for m in re.finditer(r"^(#loc\d+) = loc\((.*)\)\s*$", ttgir, re.M):
        locs[m.group(1)] = m.group(2)

    def resolve(ref, depth=0):
        body = locs.get(ref, "")
        m = re.match(r'"([^"]+\.py)":(\d+)', body)
        if m:
            return f"{os.path.basename(m.group(1))}:{m.group(2)}"
        m = re.search(r"(#loc\d+)", body)
        return resolve(m.group(1), depth + 1) if m and depth < 50 else "?"

    out = collections.defaultdict(set)
    for line in ttgir.splitlines():
        op = re.search(r"\b(tt\.load|tt\.store|ttg\.async_copy_global_to_local|tt\.descriptor_load|"
                       r"tt\.descriptor_store|ttng\.async_tma_copy_global_to_local|"
                       r"ttng\.async_tma_copy_local_to_global)\b", line)
        if not op:
            continue
        lm = re.search(r"loc\((#loc\d+)\)\s*$", line)
        where = resolve(lm.group(1)) if lm else "?"
        tm = re.search(r"tensor<([\dx]+)x!tt\.ptr<(\w+)>, (#\w+)", line)
        if tm:
            lay = layouts.get(tm.group(3), "")
            spt = re.search(r"sizePerThread = \[([\d, ]+)\]", lay)
            order = re.search(r"order = \[([\d, ]+)\]", lay)
            desc = f"{op.group(1).split('.')[-1]} {tm.group(2)}[{tm.group(1)}]"
            if spt:
                desc += f" spt=[{spt.group(1)}] ord=[{order.group(1) if order else ''}]"
            else:
                desc += f" {tm.group(3)}"
        elif "!tt.ptr<" in line and "tensor<" not in line.split(":")[-1]:
            desc = f"{op.group(1).split('.')[-1]} scalar"
        else:
            desc = op.group(1).split(".")[-1]
        out[where].add(desc)
    return out


def width_bytes(flav):
    """Bytes per thread of an access flavour (None when not a plain ld/st)."""
    if flav.startswith("cp.async") and "[" in flav:
        return int(flav.split("[")[1].rstrip("B]"))
    if not flav.startswith(("ld.global", "st.global")):
        return None
    vec = 4 if ".v4" in flav else 2 if ".v2" in flav else 1
    m = re.search(r"\.[busf](8|16|32|64)\b", flav)
    return vec * int(m.group(1)) // 8 if m else None


def resources(cubin):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(reg=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(4))) if m else {}


def sass_loops(cubin):
    """The SASS loops of a cubin (nvdisasm, bundled with Triton): for each backward branch, its target label and
    the instructions between them, as (label, instruction count, the 6 most frequent opcodes). The innermost,
    hottest loop of a streaming kernel is usually the largest."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True).stdout
    body, labels, loops = [], {}, []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(body)
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*);", line)
        if not m:
            continue
        body.append(m.group(2).split(".")[0])
        target = re.search(r"`\((\.L_x_\d+)\)", m.group(3)) if m.group(2).startswith("BRA") else None
        if target and target.group(1) in labels:  # a branch back to a label already seen: a loop
            ops = body[labels[target.group(1)]:]
            loops.append((target.group(1), len(ops), collections.Counter(ops).most_common(6)))
    return loops


_DONE = {}


def _short(v):
    if isinstance(v, triton.language.dtype):
        return str(v)
    if isinstance(v, str) and len(v) > 12:
        return v[:10] + ".."
    return v


def compile_and_report(case, fn, args, kwargs):
    sig, consts, attrs, options = specialise(fn, args, kwargs)
    key = (fn.__name__, repr(sorted((k, str(v)) for k, v in sig.items())),
           repr(sorted((k, str(v)) for k, v in consts.items())), repr(sorted(attrs)), repr(sorted(options.items())))
    if key in _DONE:
        print(f"[{case}] {fn.__name__}: same specialisation as [{_DONE[key]}]")
        return
    _DONE[key] = case
    opts = {k: v for k, v in options.items() if k in ("num_warps", "num_stages", "launch_pdl", "enable_fp_fusion",
                                                      "num_ctas", "maxnreg")}
    t0 = time.time()
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 64),
                           options=opts)
    except Exception as e:  # noqa: BLE001
        print(f"[{case}] {fn.__name__}: COMPILE FAILED {type(e).__name__}: {str(e)[:400]}")
        return
    ptx = k.asm["ptx"]
    if os.environ.get("CENSUS_PTX"):
        out_dir = os.environ["CENSUS_PTX"]
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{case}.{fn.__name__}.ptx"), "w") as f:
            f.write(ptx)
        with open(os.path.join(out_dir, f"{case}.{fn.__name__}.ttgir"), "w") as f:
            f.write(k.asm["ttgir"])
        with open(os.path.join(out_dir, f"{case}.{fn.__name__}.cubin"), "wb") as f:
            f.write(k.asm["cubin"])  # nvdisasm (bundled with Triton) shows its SASS
    res = resources(k.asm["cubin"])
    shown = {n: _short(v) for n, v in consts.items() if not n.startswith("stride") or v == 1}
    div = [n for (i,) in attrs for n in [fn.arg_names[i]] if not sig[n].startswith("*")]
    nondiv = [n for n, t in sig.items() if t in ("i32", "i64") and (fn.arg_names.index(n),) not in attrs]
    print(f"[{case}] {fn.__name__}  warps={opts.get('num_warps')} stages={opts.get('num_stages')} "
          f"reg={res.get('reg')} stack={res.get('stack')} shared={k.metadata.shared}  ({time.time() - t0:.0f}s)")
    print(f"    constexprs: {shown}")
    print(f"    ints div16: {div}   ints unknown: {nondiv}")
    acc = analyse(ptx)
    by_flav = collections.Counter()
    for (flav, loc), n in acc.items():
        by_flav[flav] += n
    print("    totals: " + ", ".join(f"{f} x{n}" for f, n in sorted(by_flav.items())))
    if os.environ.get("CENSUS_SASS"):
        for label, n, top in sass_loops(k.asm["cubin"]):
            print(f"    SASS loop at {label}: {n} instructions; " + ", ".join(f"{op} {c}" for op, c in top))
    lays = ttgir_layouts(k.asm["ttgir"])
    shown_locs = set()
    for (flav, loc), n in sorted(acc.items(), key=lambda t: (t[0][1], t[0][0])):
        w = width_bytes(flav)
        mark = "  <-- SCALAR" if w is not None and w <= 4 else "  (8B)" if w == 8 else ""
        print(f"      {loc:22s} {flav:44s} x{n}{mark}")
        f, _, ln = loc.rpartition(":")
        above = [f"{f}:{int(ln) - d}" for d in (1, 2)] if ln.isdigit() else []
        near = [c for c in [loc] + above if c in lays]
        if loc not in shown_locs and near:
            shown_locs.add(loc)
            for d in sorted(lays[near[0]]):
                print(f"      {'':22s}   ttgir: {d}")
    sys.stdout.flush()


# ---------------------------------------------------------------- the cases
BF = torch.bfloat16
KD = ND = 4096
R = 16
SEED = 1234567890123  # an int64 seed, as draw_seed gives


def t(*shape, dtype=BF):
    return torch.empty(*shape, dtype=dtype)


def adapters(k=KD, n=ND, r=R):
    return t(n, k), t(n), t(r, k), t(n, r)  # W, bias, A, B


def nf4_weight(n=ND, k=KD, dq=False):
    if dq:
        blocks = n * k // 64
        return NF4Tensor(t(n, k // 2, dtype=torch.uint8), t(n, k // 64, dtype=torch.uint8), (n, k), BF,
                         t(256, dtype=torch.float32), t(-(-blocks // 256), dtype=torch.float32), 0.25, 256)
    return NF4Tensor(t(n, k // 2, dtype=torch.uint8), t(n, k // 64, dtype=torch.float32), (n, k), BF)


def case_fwd_decode(m):
    W, b, A, B = adapters()
    K.lora_forward(t(m, KD), W, b, A, B, 2.0)  # functional.py's inference call: store_xa False, p 0


def case_fwd_mode(m, mode, p=0.0, r=None):
    """The forward at m rows in one xa_mode (exp_split_rows times them at 65-512 rows)."""
    W, b, A, B = adapters()
    if r is not None:
        A, B = t(r, KD), t(ND, r)
    K.lora_forward(t(m, KD), W, b, A, B, 2.0, p, SEED if p else 0, xa_mode=mode)


def case_fwd_train(p):
    W, b, A, B = adapters()
    K.lora_forward(t(8192, KD), W, b, A, B, 2.0, p, SEED if p else 0, store_xa=True)


def case_dx_train(p, term):
    W, b, A, B = adapters()
    K.lora_backward_dx(t(8192, ND), W, A, B, 2.0, p, SEED if p else 0, store_dyb=True, dropout_term=term)


def case_ab_train(p):
    x, dy, xa, dyb = t(8192, KD), t(8192, ND), t(8192, R), t(8192, R)
    extra = dict(dx=t(8192, KD), lora_A=t(R, KD)) if K.dx_term_in_grad_ab(8192, R, p) else {}
    K.lora_grad_ab(x, dy, xa, dyb, 2.0, BF, BF, p, SEED if p else 0, **extra)


def case_nf4_gemv(m, engine="auto", dq=False, xa_mode="auto", stages=None):
    W, b, A, B = adapters()
    # stages: the wide engine's prefetch depth, or the fma engine's pipeline stages (each config's num_stages)
    key, cfg = (("nf4_gemv_rows", config.GemmConfig(1, 16, 256, num_warps=1, num_stages=stages)) if engine == "fma"
                else ("nf4_gemv_wide", config.GemmConfig(1, 32, 128, num_warps=1, num_stages=stages)))
    if stages is not None:
        config.set_override(key, "m16", cfg)
    try:
        K.nf4_gemv(t(m, KD), nf4_weight(dq=dq), b, A, B, 2.0, engine=engine, xa_mode=xa_mode)
    finally:
        if stages is not None:
            config.set_override(key, "m16", None)


def case_nf4_dequant(dq=False):
    K.nf4_dequantize(nf4_weight(dq=dq), BF)


def case_nf4_fused_fwd(m):
    W, b, A, B = adapters()
    K.lora_nf4_forward(t(m, KD), nf4_weight(), b, A, B, 2.0, path="fused")


def case_nf4_dx(m, p=0.0):
    W, b, A, B = adapters()
    K.lora_nf4_backward_dx(t(m, ND), nf4_weight(), A, B, 2.0, p, SEED if p else 0, path="fused")


def case_dora():
    W, b, A, B = adapters()
    mag = t(ND, dtype=torch.float32)
    norm, g = K.dora_norm(W, A, B, 2.0, mag)
    dy, y = t(8192, ND), t(8192, ND)
    dyg, parts = K.scale_columns(dy, g, y, b, partials=True)
    K.magnitude_grad(parts, mag, norm, dy, t(8192, KD), W, A, B, 2.0)
    K.column_dot(dy, y, b)


def case_rows():
    W, b, A, B = adapters()
    K.scale_rows(A, t(R), B, t(ND), BF)
    K.row_dots(A, A, B, B, torch.float32, torch.float32)


def case_multi(T, S, r=R, n=ND, pool_layout=False, **override):
    """One multi-LoRA layer call (T tokens over S adapters of rank r) with the CUDA configs, `override`'s keys
    replacing the table's; cuBLAS's part skipped."""
    from lora_fast.multi_lora import make_batch_metadata

    meta = make_batch_metadata((torch.arange(T) % S).to(torch.int32), S)
    B = t(S, r, n).transpose(1, 2) if pool_layout else t(S, n, r)  # the pool keeps Bt [S, R, N]
    multi_lora.set_config_override(override or None)
    try:
        multi_lora.multi_lora_forward(t(T, KD), t(n, KD), t(n), t(S, 1, r, KD), B, t(S, dtype=torch.float32),
                                      torch.full((S,), r, dtype=torch.int32), meta.perm, meta.seg_of,
                                      meta.seg_start, meta.seg_adapter, (n,), adapter_ids=meta.adapter_ids)
    finally:
        multi_lora.set_config_override(None)


CASES = {
    "multi_16x16": lambda: case_multi(16, 16),
    "multi_64x64": lambda: case_multi(64, 64),
    "multi_64x64_pool": lambda: case_multi(64, 64, pool_layout=True),
    "multi_64x64_lead": lambda: case_multi(64, 64, GEMM="lead"),
    "multi_64x64_lead_s4": lambda: case_multi(64, 64, GEMM="lead", R_S_STEPS=4, R_E_ELEMS=8192),
    "multi_64x64_pool_e16k": lambda: case_multi(64, 64, pool_layout=True, R_E_ELEMS=16384),
    "multi_16x16_pool": lambda: case_multi(16, 16, pool_layout=True),
    "multi_256x32_pool": lambda: case_multi(256, 32, pool_layout=True),
    "multi_4096x32_pool": lambda: case_multi(4096, 32, pool_layout=True),
    "multi_64x64_lora": lambda: case_multi(64, 64, GEMM="lora"),
    "multi_64x64_lora_pool": lambda: case_multi(64, 64, pool_layout=True, GEMM="lora"),
    "multi_64x64_lora_r64": lambda: case_multi(64, 64, r=64, GEMM="lora"),
    "multi_16x16_lora": lambda: case_multi(16, 16, BASE="addmm", EXPAND="rows", R_S_ELEMS=4096, R_S_STEPS=8,
                                           GEMM="lora", W_BLOCK_T=16, W_BLOCK_N=32, W_BLOCK_K=128, W_num_warps=4,
                                           W_num_stages=6),
    "multi_256x32": lambda: case_multi(256, 32),
    "multi_4096x32": lambda: case_multi(4096, 32),
    "fwd_m1": lambda: case_fwd_decode(1),
    "fwd_m16": lambda: case_fwd_decode(16),
    "fwd_m64": lambda: case_fwd_decode(64),
    "fwd_m128_split": lambda: case_fwd_mode(128, "split"),
    "fwd_m128_split_p0.1": lambda: case_fwd_mode(128, "split", 0.1),
    "fwd_m128_split_r64": lambda: case_fwd_mode(128, "split", r=64),
    "fwd_m512_split": lambda: case_fwd_mode(512, "split"),
    "nf4gemv_m1": lambda: case_nf4_gemv(1),
    "nf4gemv_m1_dq": lambda: case_nf4_gemv(1, dq=True),
    "nf4gemv_m16": lambda: case_nf4_gemv(16),
    "nf4gemv_m1_lanes": lambda: case_nf4_gemv(1, engine="lanes"),
    "nf4gemv_m1_wide": lambda: case_nf4_gemv(1, engine="wide"),
    "nf4gemv_m1_wide_dq": lambda: case_nf4_gemv(1, engine="wide", dq=True),
    "nf4gemv_m1_wide_s2": lambda: case_nf4_gemv(1, engine="wide", stages=2),
    "nf4gemv_m1_wide_fused": lambda: case_nf4_gemv(1, engine="wide", xa_mode="fused"),
    "nf4gemv_m1_wide_fused_s2": lambda: case_nf4_gemv(1, engine="wide", xa_mode="fused", stages=2),
    "nf4gemv_m1_fma_fused": lambda: case_nf4_gemv(1, engine="fma", xa_mode="fused"),
    "nf4gemv_m1_fma_s3": lambda: case_nf4_gemv(1, engine="fma", stages=3),
    "fwd_m8192_p0": lambda: case_fwd_train(0.0),
    "fwd_m8192_p0.1": lambda: case_fwd_train(0.1),
    "dx_m8192_p0": lambda: case_dx_train(0.0, True),
    "dx_m8192_p0.1_noterm": lambda: case_dx_train(0.1, False),
    "dx_m8192_p0.1_term": lambda: case_dx_train(0.1, True),
    "ab_m8192_p0": lambda: case_ab_train(0.0),
    "ab_m8192_p0.1": lambda: case_ab_train(0.1),
    "nf4dequant": lambda: case_nf4_dequant(),
    "nf4dequant_dq": lambda: case_nf4_dequant(True),
    "nf4fused_fwd_m64": lambda: case_nf4_fused_fwd(64),
    "nf4dx_m16": lambda: case_nf4_dx(16),
    "nf4dx_m16_p0.1": lambda: case_nf4_dx(16, 0.1),
    "dora": case_dora,
    "rows": case_rows,
}


def main(argv):
    if argv == ["--list"]:
        print("\n".join(CASES))
        return
    chosen = [c for c in CASES if not argv or any(a in c for a in argv)]
    for case in chosen:
        CAPTURED.clear()
        try:
            CASES[case]()
        except Exception as e:  # noqa: BLE001
            print(f"[{case}] LAUNCHER FAILED {type(e).__name__}: {e}")
        print(f"== {case}: {len(CAPTURED)} launch(es): {[fn.__name__ for fn, _, _ in CAPTURED]}")
        for fn, args, kwargs in list(CAPTURED):
            compile_and_report(case, fn, args, kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])
