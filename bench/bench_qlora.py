"""QLoRA benchmark: LoRA on an NF4 base weight (issue 7).

Providers (every ratio is to `base`, the bf16 F.linear timed in the same run on the same x):
  base          F.linear(x, W) in bf16 (fwd+bwd: dX only, W frozen)
  ours          lora_fast.qlora_linear, the path config.nf4_path picks (gemv / fused / dequant)
  ours-fused    the fused dequant-in-registers GEMMs forced (config.NF4_FUSED_ROWS raised)
  ours-dequant  dequantize kernel, then the bf16 fused LoRA kernels, forced (config.NF4_FUSED_ROWS = 0)
  ours-select   ours with the select-tree NF4 decode instead of the byte-permute one (decode rows only)
  deq+cublas    our dequantize kernel, then F.linear and the rank-r product in PyTorch (autograd keeps deq(W))
  bnb+peft      bitsandbytes Linear4bit under PEFT's LoRA (when bitsandbytes imports), same quantized bytes
Modes: fwd (no grad) and fwd+bwd (x, A, B require grad). Decode rows (M <= 16) are also timed in a CUDA graph
over 8 weight sets. `memory`: a 1B-parameter Llama-style model (transformers LlamaConfig, no download) with its
linears in NF4 against bf16. Without a GPU: a tiny interpreter check, null timings, results in qlora_cpu.json.

    PYTHONPATH=$PWD python bench/bench_qlora.py --out bench/out
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast.kernels import config as kcfg  # noqa: E402
from lora_fast.kernels import nf4_dequantize  # noqa: E402
from lora_fast.nf4 import from_bnb, quantize_nf4  # noqa: E402

BENCH_NAME = "qlora"
DTYPE = torch.bfloat16
TOLERANCE = 2e-2  # bf16 against fp32 math on the same dequantized W
# the core issue's training shapes (M, K, N); the first also at rank 64 (TRAIN_RANKS)
TRAIN_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096)]
TRAIN_RANKS = (16, 64)
CROSSOVER_M = [128, 512, 2048]  # fwd only: where the fused path stops beating dequantize-then-GEMM
DECODE_M = [1, 16, 128]
RANK = 16


def try_bnb():
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401

        return True
    except Exception:  # noqa: BLE001 - any import failure skips the provider
        return False


@contextlib.contextmanager
def nf4_fused_rows(rows):
    """Force the fused (rows huge) or the dequant path (rows 0) above the GEMV rows."""
    old = kcfg.NF4_FUSED_ROWS
    kcfg.NF4_FUSED_ROWS = rows
    try:
        yield
    finally:
        kcfg.NF4_FUSED_ROWS = old


class Problem:
    """x [M, K], an NF4 weight (quantized by bitsandbytes when present, so every provider uses the same bytes),
    its bf16 dequantization W, bias-free, adapters A [r, K], B [N, r] (B nonzero), dY [M, N]."""

    def __init__(self, M, K, N, r, device, use_bnb):
        g = {"device": device, "dtype": DTYPE}
        w = torch.randn(N, K, **g) / math.sqrt(K)
        self.bnb_linear = None
        if use_bnb:
            import bitsandbytes as bnb

            lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DTYPE, quant_type="nf4")
            lin.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", blocksize=64)
            self.bnb_linear = lin.to(device)
            self.w4 = from_bnb(self.bnb_linear, DTYPE)
        else:
            self.w4 = quantize_nf4(w, dtype=DTYPE)
        del w
        self.W = self.w4.dequantize(DTYPE)
        self.x = torch.randn(M, K, **g)
        self.A = (torch.randn(r, K, **g) / math.sqrt(K))
        self.B = torch.randn(N, r, **g) / math.sqrt(r)
        self.dy = torch.randn(M, N, **g)
        self.s = 2.0

    def reference(self):
        """fp32 math on the dequantized W: (y, dx, dA, dB)."""
        x, A, B = (t.float().requires_grad_() for t in (self.x, self.A, self.B))
        y = x @ self.W.float().t() + self.s * (x @ A.t()) @ B.t()
        y.backward(self.dy.float())
        return y.detach(), x.grad, A.grad, B.grad


def provider_fns(prob: Problem, name: str, train: bool):
    """A callable for one (provider, mode): returns (y, grads or None); None when the provider is missing."""
    x, A, B, s = prob.x, prob.A, prob.B, prob.s
    if train:
        x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))

    def run(fwd):
        def fn():
            for t in (x, A, B):
                t.grad = None
            y = fwd()
            if train:
                y.backward(prob.dy)
                return y, (x.grad, A.grad, B.grad)
            return y, None
        return fn

    ctx = torch.enable_grad if train else torch.no_grad
    if name == "base":
        return run(lambda: F.linear(x, prob.W)) if train else (lambda: (F.linear(x, prob.W), None)), ctx
    if name in ("ours", "ours-fused", "ours-dequant", "ours-select"):
        rows = {"ours-fused": 1 << 40, "ours-dequant": 0}.get(name)

        def fwd():
            with (nf4_fused_rows(rows) if rows is not None else contextlib.nullcontext()):
                return lora_fast.qlora_linear(x, prob.w4, None, A, B, s)

        if name == "ours-select":
            from lora_fast.kernels import lora_nf4_forward

            return (lambda: (lora_nf4_forward(x, prob.w4, None, A, B, s, decode="select")[0], None)), ctx
        return run(fwd), ctx
    if name == "deq+cublas":
        return run(lambda: F.linear(x, nf4_dequantize(prob.w4, DTYPE)) + s * (x @ A.t()) @ B.t()), ctx
    if name == "bnb+peft":
        if prob.bnb_linear is None:
            return None, ctx
        model = peft_model(prob)
        layer = model.proj
        with torch.no_grad():  # the same adapter values as every other provider
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
        if train:
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.requires_grad_(True)

        def fn():
            for t in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                t.grad = None
            y = model(x)
            if train:
                y.backward(prob.dy)
                return y, (x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
            return y, None
        return fn, ctx
    raise ValueError(name)


def peft_model(prob: Problem):
    """PEFT's LoRA (r, alpha = 2r) injected around the bitsandbytes Linear4bit, adapters in bf16."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = torch.nn.Module()
    holder.proj = prob.bnb_linear
    holder.forward = lambda x: holder.proj(x)
    r = prob.A.shape[0]
    model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]), holder)
    for p in model.parameters():  # bf16 adapters, as ours
        if p.is_floating_point():
            p.data = p.data.to(DTYPE)
    return model


def check(out, grads, ref) -> dict:
    errs = {"rel_err_out": common.rel_err(out, ref[0])}
    if grads is not None:
        for key, g, want in zip(("dx", "dA", "dB"), grads, ref[1:]):
            errs[f"rel_err_{key}"] = common.rel_err(g, want)
    errs["check_passed"] = all(v < TOLERANCE for v in errs.values())
    return errs


PAIRED_ROUNDS = 9  # interleaved rounds of common.paired_ratios for the fwd+bwd rows (GPU)
HOST_CALLS = 30  # calls of each fwd+bwd provider timed without a sync (common.host_and_wall_us)


def time_case(prob, case, providers, modes, graph, rows):
    ref = prob.reference()
    for mode in modes:
        train = mode == "fwd+bwd"
        base_us = None
        timed = {}  # name -> fn, for the paired ratios of a fwd+bwd case
        for name in providers:
            row = {"case": case, "mode": mode, "provider": name}
            try:
                fn, ctx = provider_fns(prob, name, train)
                if fn is None:
                    row["skipped"] = "bitsandbytes or peft not importable"
                    rows.append(row)
                    continue
                with ctx():
                    y, grads = fn()
                    if name != "base":  # the plain linear is the timing yardstick, not a LoRA result
                        row.update(check(y, grads, ref))
                    if common.have_gpu():
                        us = common.bench_us(fn)
                        row.update(us=us[0], us_p20=us[1], us_p80=us[2])
                        if name == "base":
                            base_us = us[0]
                        row["ratio_to_base"] = us[0] / base_us if base_us else None
                        if graph and not train:
                            row["graph_us"] = graph_time(prob, name)
                        if train:
                            timed[name] = fn
                            row["host_us"], row["wall_us"] = common.host_and_wall_us(fn, HOST_CALLS)
                    else:
                        row.update(us=None, ratio_to_base=None)
            except Exception as e:  # noqa: BLE001 - one failure must not stop the others
                row["error"] = f"{type(e).__name__}: {e}"
                row["traceback"] = traceback.format_exc()[-2000:]
            rows.append(row)
        if train and "base" in timed and len(timed) > 1:
            # each provider's time over the base's within interleaved rounds: the figure to compare providers by
            # (do_bench medians taken seconds apart carry the device's clock drift, bench/common.py)
            try:
                with torch.enable_grad():
                    paired = common.paired_ratios(timed, "base", rounds=PAIRED_ROUNDS, calls=3)
            except Exception as e:  # noqa: BLE001 - the per-provider rows stand without it
                paired = {}
                print(f"paired ratios of {case} failed: {type(e).__name__}: {e}")
            try:
                with torch.enable_grad():
                    inter = common.interleaved_ratios(timed, "base")
            except Exception as e:  # noqa: BLE001
                inter = {}
                print(f"interleaved ratios of {case} failed: {type(e).__name__}: {e}")
            for r in rows:
                if r["case"] == case and r["mode"] == mode and r["provider"] in paired:
                    r["paired_ratio_to_base"] = paired[r["provider"]]
                if r["case"] == case and r["mode"] == mode and r["provider"] in inter:
                    r["interleaved_ratio_to_base"] = inter[r["provider"]]
        base_graph = next((r.get("graph_us") for r in rows if r["case"] == case and r["provider"] == "base"
                           and r["mode"] == mode), None)
        for r in rows:
            if r["case"] == case and r["mode"] == mode and r.get("graph_us") and base_graph:
                r["graph_ratio_to_base"] = r["graph_us"] / base_graph


def graph_time(prob, name):
    """CUDA-graph time per call over 8 weight sets (so that W is not in L2): ours, base, ours-select and deq+cublas."""
    if name not in ("base", "ours", "ours-select", "deq+cublas"):
        return None
    M, K = prob.x.shape
    N = prob.W.shape[0]
    fns = []
    for _ in range(8):
        w = torch.randn(N, K, device="cuda", dtype=DTYPE) / math.sqrt(K)
        w4 = quantize_nf4(w, report_error=False)
        if name == "base":
            fns.append(lambda w=w: F.linear(prob.x, w))
            continue
        del w
        if name == "deq+cublas":
            fns.append(lambda w4=w4: F.linear(prob.x, nf4_dequantize(w4, DTYPE)) + prob.s * (prob.x @ prob.A.t()) @ prob.B.t())
        else:
            fns.append(lambda w4=w4: lora_fast.kernels.lora_nf4_forward(prob.x, w4, None, prob.A, prob.B, prob.s,
                                                                         decode="select" if name == "ours-select" else "auto"))
    with torch.no_grad():
        return common.bench_graph_us(fns)


def llama_memory(device) -> dict:
    """Weight memory of a 1B-parameter Llama-style model: every decoder linear in NF4 (4.5 bits, and 4.127
    double-quantized) against bf16; embeddings, norms and lm_head stay bf16 in both."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    out = {}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for quantize in (None, "nf4", "nf4_dq"):
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(DTYPE)
        params = sum(p.numel() for p in model.parameters())
        linear_bf16 = sum(m.weight.numel() * 2 for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets)
        if quantize:
            lora_fast.apply_lora(model, targets, rank=RANK, alpha=2 * RANK, quantize=quantize)
        base_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                         if n.rsplit(".", 1)[-1] in ("qweight", "absmax", "absmax_code", "absmax_scale",
                                                     "absmax_offset", "absmax_group"))
        total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        key = quantize or "bf16"
        out[key] = {"parameters": params, "model_bytes": total,
                    "linear_base_bytes": base_bytes if quantize else linear_bf16}
        if quantize:
            out[key]["linear_ratio_to_bf16"] = base_bytes / out["bf16"]["linear_base_bytes"]
            out[key]["model_ratio_to_bf16"] = total / out["bf16"]["model_bytes"]
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=common.RESULTS_DIR, help="results directory")
    ap.add_argument("--quick", action="store_true", help="training shape 8192x4096x4096 and decode M=1 only")
    ap.add_argument("--no-memory", action="store_true", help="skip the 1B Llama memory comparison")
    args = ap.parse_args(argv)
    rows, extra = run(args.quick, not args.no_memory)
    name = BENCH_NAME if common.have_gpu() else BENCH_NAME + "_cpu"
    path = common.write_json(name, rows, extra, args.out)
    print_summary(rows, extra)
    print(f"results: {path}")
    return 0 if all(r.get("check_passed", True) and "error" not in r for r in rows) else 1


def run(quick=False, memory=True):
    """(rows, extra): every case's rows, and {"memory": ...} (the Llama comparison) when asked."""
    gpu = common.have_gpu()
    device = "cuda" if gpu else "cpu"
    use_bnb = gpu and try_bnb()
    torch.manual_seed(0)
    rows: list[dict] = []
    if gpu:
        train_shapes = TRAIN_SHAPES[:1] if quick else TRAIN_SHAPES
        cases = [(f"train-{M}x{K}x{N}-r{r}", (M, K, N, r), ("fwd", "fwd+bwd"),
                  ("base", "ours", "ours-fused", "ours-dequant", "deq+cublas", "bnb+peft"), False)
                 for i, (M, K, N) in enumerate(train_shapes)
                 for r in (TRAIN_RANKS if i == 0 and not quick else (RANK,))]
        if not quick:
            cases += [(f"cross-{M}x4096x4096-r{RANK}", (M, 4096, 4096, RANK), ("fwd",),
                       ("base", "ours-fused", "ours-dequant", "deq+cublas"), False) for M in CROSSOVER_M]
        cases += [(f"decode-{M}x4096x4096-r{RANK}", (M, 4096, 4096, RANK), ("fwd",),
                   ("base", "ours", "ours-select", "deq+cublas", "bnb+peft"), True)
                  for M in (DECODE_M[:1] if quick else DECODE_M)]
    else:  # interpreter: tiny shapes, checks only
        cases = [("cpu-4x128x24-r3", (4, 128, 24, 3), ("fwd", "fwd+bwd"), ("base", "ours", "ours-dequant"), False),
                 ("cpu-20x128x24-r3", (20, 128, 24, 3), ("fwd+bwd",), ("base", "ours", "ours-dequant"), False)]
    for case, (M, K, N, r), modes, providers, graph in cases:
        try:
            prob = Problem(M, K, N, r, device, use_bnb)
        except Exception as e:  # noqa: BLE001
            rows.append({"case": case, "mode": "setup", "provider": "-", "error": f"{type(e).__name__}: {e}"})
            continue
        time_case(prob, case, providers, modes, graph and gpu, rows)
        del prob
        if gpu:
            torch.cuda.empty_cache()
    extra = {"bitsandbytes": use_bnb}
    if memory and gpu:
        try:
            extra["memory"] = llama_memory(device)
        except Exception as e:  # noqa: BLE001
            extra["memory"] = {"error": f"{type(e).__name__}: {e}"}
    return rows, extra


def print_summary(rows, extra):
    cols = ["case", "mode", "provider", "us", "ratio_to_base", "paired_ratio_to_base", "interleaved_ratio_to_base",
            "host_us", "wall_us",
            "graph_ratio_to_base", "rel_err_out", "check_passed"]
    print(common.format_table(rows, cols))
    for r in rows:
        if "error" in r:
            print(f"ERROR {r['case']} {r['mode']} {r['provider']}: {r['error']}")
    if not common.have_gpu():
        print("timings need a GPU: CPU run checked the kernels through the interpreter only")
    mem = extra.get("memory")
    if mem and "error" not in mem:
        for key in ("nf4", "nf4_dq"):
            m = mem[key]
            print(f"memory {key}: decoder linears {m['linear_ratio_to_bf16']:.3f}x bf16, "
                  f"whole model {m['model_ratio_to_bf16']:.3f}x ({mem['bf16']['parameters'] / 1e9:.2f} B params)")
    elif mem:
        print(f"memory: {mem['error']}")


if __name__ == "__main__":
    sys.exit(main())
