"""Microbenchmark of the single-adapter LoRA linear: Y = X W^T + b + s * (drop(X) A^T) B^T.

Providers: `fused` (lora_fast.lora_linear), `reference` (lora_fast.reference, the unfused textbook), `peft`
(PEFT's own lora.Linear, when peft is importable), `addmm` (Unsloth-style cuBLAS: addmm then addmm_ of the
rank-r product) and `base` (F.linear alone, the 1.00 of every ratio). Modes: `fwd` (no grad) and `fwd+bwd`
(x requires grad, W frozen, A and B trained, gradient from a fixed random dY).

Every case is first checked against the reference in fp32 math (same dropout mask), then timed. Without a GPU it
runs tiny shapes through the Triton interpreter, checks them and writes rows with null timings.

    python bench/bench_lora_linear.py                       # full grid (GPU), results in bench/results/
    python bench/bench_lora_linear.py --quick --out $OUT    # a subset, results under $OUT
    python bench/bench_lora_linear.py --cases decode --modes fwd
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Without a GPU the kernels run through Triton's interpreter, which must be chosen before triton is first
# imported (lora_fast imports it); otherwise lora_fast would take its plain-PyTorch CPU path instead.
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("warning: triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import reference  # noqa: E402

BENCH_NAME = "lora_linear"
PROVIDERS = ("base", "fused", "reference", "peft", "addmm")
MODES = ("fwd", "fwd+bwd")
DTYPE = torch.bfloat16
# Relative-error bound of a bf16 result against fp32 math: a few bf16 ulps (2**-8) once accumulated.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
# Launch-bound shapes (M <= this) are also timed inside a CUDA graph over rotated weight sets.
GRAPH_MAX_M = 256
GRAPH_WEIGHT_SETS = 8
# Rounds of `common.paired_ratios` (each provider's ratio to the base within interleaved rounds of 6 calls each, the
# GPU kept busy), a second figure beside the ratio of do_bench medians, which the clock's drift between two timings
# seconds apart moves; above GRAPH_MAX_M rows only.
PAIRED_ROUNDS = 15
# Rounds of `common.interleaved_ratios` (the protocol's do_bench median per provider, the providers alternating round
# by round); above GRAPH_MAX_M rows only.
INTERLEAVED_ROUNDS = 5
# The H100's measured rates (shared/BENCH.md), used for the floors when nothing was measured on this machine.
NOMINAL_PEAKS = {"bandwidth_Bps": 3.0e12, "matmul_flops": 730e12, "measured": False}


@dataclass(frozen=True)
class Case:
    kind: str  # "prefill", "decode" or "cpu"
    M: int
    K: int
    N: int
    r: int
    p: float

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.M}x{self.K}x{self.N}-r{self.r}-p{self.p:g}"

    @property
    def scaling(self) -> float:
        return 2.0  # alpha = 2 r, the usual choice


def gpu_cases() -> list[Case]:
    shapes = [("prefill", 8192, 4096, 4096), ("prefill", 8192, 4096, 14336), ("prefill", 8192, 14336, 4096)]
    shapes += [("prefill", m, 4096, 4096) for m in (512, 2048)]  # mid-size batches (config.mid_tile at 512)
    shapes += [("decode", m, 4096, 4096) for m in (1, 16, 128)]
    return [Case(kind, M, K, N, r, p) for kind, M, K, N in shapes for r in (16, 64) for p in (0.0, 0.1)]


def quick_cases() -> list[Case]:
    return [Case("prefill", 8192, 4096, 4096, 16, 0.0), Case("prefill", 8192, 4096, 4096, 16, 0.1),
            Case("decode", 1, 4096, 4096, 16, 0.0), Case("decode", 16, 4096, 4096, 16, 0.0)]


def cpu_cases() -> list[Case]:
    """Tiny, odd shapes that the interpreter runs in seconds."""
    return [Case("cpu", 33, 40, 24, 3, 0.0), Case("cpu", 33, 40, 24, 16, 0.1), Case("cpu", 1, 40, 24, 3, 0.0)]


def select_cases(cases: list[Case], patterns: str | None) -> list[Case]:
    """Keep the cases whose name matches any of the comma-separated regular expressions."""
    if not patterns:
        return cases
    regexes = [re.compile(p) for p in patterns.split(",") if p]
    return [c for c in cases if any(rx.search(c.name) for rx in regexes)]


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass
class WeightSet:
    weight: torch.Tensor  # [N, K], frozen
    bias: torch.Tensor | None  # [N]
    lora_A: torch.Tensor  # [r, K], requires grad
    lora_B: torch.Tensor  # [N, r], requires grad

    def to(self, dtype: torch.dtype) -> "WeightSet":
        """A detached copy in `dtype`, with the same requires_grad flags (fresh leaves)."""
        def cast(t, grad):
            return None if t is None else t.detach().to(dtype).requires_grad_(grad)

        return WeightSet(cast(self.weight, False), cast(self.bias, False), cast(self.lora_A, True),
                         cast(self.lora_B, True))


def random_weights(case: Case, bias: bool, device: str, dtype: torch.dtype) -> WeightSet:
    """W ~ N(0, 1/K); A ~ N(0, 1/K) and B ~ N(0, 1/r), both nonzero: B = 0 (LoRA's init) would hide bugs."""
    def randn(*shape, std):
        return (torch.randn(*shape, device=device) * std).to(dtype)

    return WeightSet(
        weight=randn(case.N, case.K, std=case.K ** -0.5),
        bias=randn(case.N, std=1.0) if bias else None,
        lora_A=randn(case.r, case.K, std=case.K ** -0.5).requires_grad_(),
        lora_B=randn(case.N, case.r, std=case.r ** -0.5).requires_grad_(),
    )


# ------------------------------------------------------------------------------------------------- providers


class Provider:
    """One way to compute the op. `prepare` builds per-weight-set state once, outside any timing."""

    name = ""
    is_lora = True
    accepts_mask = True  # can it be given an explicit dropout mask (for the correctness check)?

    def __init__(self, case: Case):
        self.case = case

    def prepare(self, w: WeightSet):
        return w

    def forward(self, state, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def params(self, state) -> list[torch.Tensor]:
        """Trainable tensors whose gradients the fwd+bwd mode computes (besides x)."""
        return [state.lora_A, state.lora_B]

    @property
    def training(self) -> bool:
        return self.case.p > 0


class Base(Provider):
    name, is_lora = "base", False

    def forward(self, w, x, mask=None):
        return F.linear(x, w.weight, w.bias)

    def params(self, w):
        return []


class Fused(Provider):
    name, accepts_mask = "fused", False  # draws its own mask from a seed: see `capture_seeds`

    def forward(self, w, x, mask=None):
        return lora_fast.lora_linear(x, w.weight, w.bias, w.lora_A, w.lora_B, self.case.scaling,
                                     dropout_p=self.case.p, training=self.training)


class Reference(Provider):
    name = "reference"

    def forward(self, w, x, mask=None):
        return reference.lora_linear_reference(x, w.weight, w.bias, w.lora_A, w.lora_B, self.case.scaling,
                                               dropout_p=self.case.p, training=self.training, dropout_mask=mask)


class Addmm(Provider):
    """Unsloth-style: y = addmm(b, x, W^T), then y.addmm_(drop(x) A^T, B^T, alpha=s), all cuBLAS."""

    name = "addmm"

    def forward(self, w, x, mask=None):
        y = torch.addmm(w.bias, x, w.weight.t()) if w.bias is not None else torch.mm(x, w.weight.t())
        if mask is not None:
            xd = x * mask / (1.0 - self.case.p)
        else:
            xd = F.dropout(x, self.case.p, self.training) if self.case.p > 0 else x
        return y.addmm_(xd @ w.lora_A.t(), w.lora_B.t(), alpha=self.case.scaling)


class _MaskDropout(torch.nn.Module):
    """Stands in for PEFT's nn.Dropout during the correctness check, so that it uses the shared mask."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask / (1.0 - self.p)


class Peft(Provider):
    """PEFT's `peft.tuners.lora.Linear` around an nn.Linear that shares W and b, its A and B set to ours."""

    name = "peft"

    def prepare(self, w):
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear

        c = self.case
        linear = torch.nn.Linear(c.K, c.N, bias=w.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(w.weight, requires_grad=False)
        if w.bias is not None:
            linear.bias = torch.nn.Parameter(w.bias, requires_grad=False)
        kwargs = dict(r=c.r, lora_alpha=c.scaling * c.r, lora_dropout=c.p)
        if "config" in inspect.signature(PeftLinear.__init__).parameters:  # peft >= 0.18 wants the config too
            kwargs["config"] = LoraConfig(**kwargs)
        module = PeftLinear(linear, "default", **kwargs)
        module.lora_A["default"].weight = torch.nn.Parameter(w.lora_A.detach())
        module.lora_B["default"].weight = torch.nn.Parameter(w.lora_B.detach())
        module.scaling["default"] = c.scaling
        return module.train(self.training)

    def forward(self, module, x, mask=None):
        if mask is None:
            return module(x)
        dropout = module.lora_dropout["default"]
        module.lora_dropout["default"] = _MaskDropout(mask, self.case.p)
        try:
            return module(x)
        finally:
            module.lora_dropout["default"] = dropout

    def params(self, module):
        return [module.lora_A["default"].weight, module.lora_B["default"].weight]


def have_peft() -> bool:
    try:
        import peft  # noqa: F401
        from peft.tuners.lora import Linear  # noqa: F401
    except Exception:  # peft missing, or missing one of its own dependencies
        return False
    return True


PROVIDER_CLASSES = {cls.name: cls for cls in (Base, Fused, Reference, Peft, Addmm)}


# --------------------------------------------------------------------------------------------- correctness


@contextlib.contextmanager
def capture_seeds():
    """Record the `seed` argument of every lora_fast kernel launcher called inside the block.

    lora_linear draws its dropout seed itself; the check needs it to rebuild the kernel's mask with
    `lora_fast.kernels.dropout.dropout_mask`. Launchers are patched wherever lora_fast modules reference them.
    """
    seeds: list[int] = []
    launchers = {}
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("lora_fast.kernels") and mod is not None:
            for attr, fn in vars(mod).items():
                if inspect.isfunction(fn) and fn.__module__ == mod_name and not attr.startswith("_"):
                    if "seed" in inspect.signature(fn).parameters and fn not in launchers:
                        launchers[fn] = _recording(fn, seeds)
    patched = []
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("lora_fast") and mod is not None:
            for attr, fn in list(vars(mod).items()):
                if inspect.isfunction(fn) and fn in launchers:
                    setattr(mod, attr, launchers[fn])
                    patched.append((mod, attr, fn))
    try:
        yield seeds
    finally:
        for mod, attr, fn in patched:
            setattr(mod, attr, fn)


def _recording(fn, seeds):
    signature = inspect.signature(fn)

    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if float(bound.arguments.get("dropout_p", 1.0)) > 0:
            seeds.append(int(bound.arguments["seed"]))
        return fn(*args, **kwargs)

    return wrapper


def kernel_mask(seed: int, case: Case, device) -> torch.Tensor:
    from lora_fast.kernels.dropout import dropout_mask

    return dropout_mask(seed, case.M, case.K, case.p, device)


def run_once(provider: Provider, state, x: torch.Tensor, dy: torch.Tensor, with_grad: bool, mask=None):
    """(y, [dx, dA, dB] or [], seeds captured) of one call of `provider`."""
    xg = x.detach().requires_grad_(with_grad)
    with capture_seeds() as seeds, torch.set_grad_enabled(with_grad):
        y = provider.forward(state, xg, mask)
        grads = list(torch.autograd.grad(y, [xg, *provider.params(state)], dy)) if with_grad else []
    return y.detach(), grads, seeds


def check_case(case: Case, providers: list[Provider], states: dict, w: WeightSet, x, dy, with_grad: bool) -> dict:
    """Relative errors of every LoRA provider against the reference in fp32 math, given the same mask.

    Returns {provider name: {"rel_err_out": ..., "rel_err_dx": ..., "check_passed": ..., "note": ...}}.
    """
    results: dict[str, dict] = {}
    outputs: dict[str, tuple] = {}
    mask = None
    lora = [p for p in providers if p.is_lora]
    fused = next((p for p in lora if p.name == "fused"), None)
    if fused is not None:  # first: with dropout its seed decides the mask everyone else is given
        try:
            y, grads, seeds = run_once(fused, states["fused"], x, dy, with_grad)
            outputs["fused"] = (y, grads)
            if case.p > 0:
                if not seeds:
                    results["fused"] = {"note": "dropout seed of the fused call not found: not checked"}
                    del outputs["fused"]
                else:
                    mask = kernel_mask(seeds[0], case, x.device)
                    if len(set(seeds)) > 1:
                        results["fused"] = {"note": f"launchers saw different seeds {sorted(set(seeds))}"}
        except Exception as exc:  # report, keep benchmarking the others
            results["fused"] = {"check_passed": False, "note": f"fused failed: {type(exc).__name__}: {exc}"}
    if case.p > 0 and mask is None:
        mask = torch.rand(case.M, case.K, device=x.device) >= case.p
    for p in lora:
        if p.name in outputs or p.name in results:
            continue
        try:
            y, grads, _ = run_once(p, states[p.name], x, dy, with_grad, mask)
            outputs[p.name] = (y, grads)
        except Exception as exc:
            results[p.name] = {"check_passed": False, "note": f"{p.name} failed: {type(exc).__name__}: {exc}"}

    ref_provider = Reference(case)
    y_ref, grads_ref, _ = run_once(ref_provider, w.to(torch.float32), x.float(), dy.float(), with_grad, mask)
    tol = TOLERANCE[x.dtype]
    for name, (y, grads) in outputs.items():
        errs = {"rel_err_out": common.rel_err(y, y_ref)}
        for label, g, g_ref in zip(("dx", "dA", "dB"), grads, grads_ref):
            errs[f"rel_err_{label}"] = common.rel_err(g, g_ref)
        errs["check_passed"] = all(e < tol for e in errs.values())
        errs["check_tolerance"] = tol
        results[name] = {**errs, **results.get(name, {})}
    return results


# ------------------------------------------------------------------------------------------------- floors


def floor_counts(case: Case, mode: str, elt: int, bias: bool) -> tuple[float, float]:
    """(FLOPs, bytes) that any implementation must spend: the matmuls, and one read of each operand plus one
    write of each result (fwd: X, W, A, B, b -> Y; fwd+bwd adds dY, W, X, A, B -> dX, dA, dB)."""
    M, K, N, r = case.M, case.K, case.N, case.r
    flops = 2 * M * N * K + 2 * M * r * (K + N)
    nbytes = elt * (M * K + N * K + r * K + N * r + M * N + (N if bias else 0))
    if mode == "fwd+bwd":
        # dX = dY W (+ (dY B) A), dA = (dY B)^T X, dB = dY^T (X A^T): one more big GEMM, 4 more rank-r ones.
        flops += 2 * M * N * K + 4 * M * r * (K + N)
        nbytes += elt * (M * N + N * K + M * K + 2 * (r * K + N * r) + M * K)
    return float(flops), float(nbytes)


def floor_us(flops: float, nbytes: float, peaks: dict) -> float:
    return 1e6 * max(flops / peaks["matmul_flops"], nbytes / peaks["bandwidth_Bps"])


# ------------------------------------------------------------------------------------------------- timing


def timing_fn(provider: Provider, state, x, dy, mode: str):
    """A closure for do_bench: the forward, or forward plus backward (gradients returned, not accumulated)."""
    if mode == "fwd":
        return lambda: provider.forward(state, x)
    xg = x.detach().requires_grad_()
    inputs = [xg, *provider.params(state)]

    def step():
        return torch.autograd.grad(provider.forward(state, xg), inputs, dy)

    return step


def time_case(case: Case, mode: str, providers: list[Provider], states: dict, x, dy) -> dict[str, dict]:
    """Median / p20 / p80 µs of each provider, the CUDA-graph µs for decode shapes, and forward memory."""
    out: dict[str, dict] = {}
    out_bytes = case.M * case.N * x.element_size()
    for p in providers:
        row: dict = {}
        notes = []

        def attempt(what, measure):  # one failure (say, a graph capture) must not lose the other figures
            try:
                row.update(measure())
            except Exception as exc:
                notes.append(f"{what} failed: {type(exc).__name__}: {str(exc)[:200]}")

        fn = timing_fn(p, states[p.name][0], x, dy, mode)
        with torch.set_grad_enabled(mode != "fwd"):
            attempt("timing", lambda: dict(zip(("us", "us_p20", "us_p80"), common.bench_us(fn))))
        if mode == "fwd":
            with torch.no_grad():
                if case.M <= GRAPH_MAX_M:
                    fns = [timing_fn(p, s, x, dy, mode) for s in states[p.name]]
                    attempt("CUDA graph", lambda: {"graph_us": common.bench_graph_us(fns)})
                attempt("memory", lambda: {"mem_fwd_bytes": common.peak_forward_bytes(fn)})
            if "mem_fwd_bytes" in row:
                row["mem_fwd_x_out"] = row["mem_fwd_bytes"] / out_bytes
        if notes:
            row["note"] = "; ".join(notes)
        out[p.name] = row
    fns = {p.name: timing_fn(p, states[p.name][0], x, dy, mode) for p in providers if "us" in out[p.name]}
    if "base" in fns and len(fns) > 1 and case.M > GRAPH_MAX_M:  # decode: host-bound, timed under graphs
        with torch.set_grad_enabled(mode != "fwd"):
            for name, ratio in common.paired_ratios(fns, "base", rounds=PAIRED_ROUNDS).items():
                out[name]["paired_ratio_to_base"] = ratio
            for name, ratio in common.interleaved_ratios(fns, "base", rounds=INTERLEAVED_ROUNDS).items():
                out[name]["interleaved_ratio_to_base"] = ratio
    return out


# ------------------------------------------------------------------------------------------------- the run


def prepare_states(providers: list[Provider], weight_sets: list[WeightSet]) -> tuple[dict, dict]:
    """({provider: [state per weight set]}, {provider: note}) for the providers that could be built."""
    states, failed = {}, {}
    for p in providers:
        try:
            states[p.name] = [p.prepare(w) for w in weight_sets]
        except Exception as exc:
            failed[p.name] = {"note": f"could not build {p.name}: {type(exc).__name__}: {str(exc)[:300]}"}
    return states, failed


def run(cases: list[Case], modes: list[str], provider_names: list[str], device: str, bias: bool,
        peaks: dict | None, graph_sets: int, timed: bool, on_case=None) -> list[dict]:
    """Check every case, and time it when `timed`; `on_case(rows so far)` after each one (to save partial
    results)."""
    rows: list[dict] = []
    for case in cases:
        torch.manual_seed(0)
        providers = [PROVIDER_CLASSES[n](case) for n in provider_names]
        n_sets = graph_sets if timed and case.M <= GRAPH_MAX_M and "fwd" in modes else 1
        weight_sets = [random_weights(case, bias, device, DTYPE) for _ in range(n_sets)]
        states, unbuilt = prepare_states(providers, weight_sets)
        providers = [p for p in providers if p.name in states]
        x = torch.randn(case.M, case.K, device=device, dtype=DTYPE)
        dy = torch.randn(case.M, case.N, device=device, dtype=DTYPE)
        first = {name: s[0] for name, s in states.items()}
        for mode in modes:
            checks = check_case(case, providers, first, weight_sets[0], x, dy, mode == "fwd+bwd")
            times = time_case(case, mode, providers, states, x, dy) if timed else {}
            flops, nbytes = floor_counts(case, mode, x.element_size(), bias)
            base = times.get("base", {})
            for p in [PROVIDER_CLASSES[n](case) for n in provider_names]:
                row = {"bench": BENCH_NAME, "case": case.name, "kind": case.kind, "mode": mode,
                       "provider": p.name, "M": case.M, "K": case.K, "N": case.N, "r": case.r,
                       "dropout": case.p, "scaling": case.scaling, "bias": bias, "dtype": str(DTYPE)[6:],
                       "us": None, "us_p20": None, "us_p80": None, "ratio_to_base": None,
                       "flops": flops, "bytes": nbytes,
                       "floor_us": floor_us(flops, nbytes, peaks) if peaks else None}
                parts = [checks.get(p.name, {}), times.get(p.name, {}), unbuilt.get(p.name, {})]
                for part in parts:
                    row.update(part)
                notes = [part["note"] for part in parts if part.get("note")]
                if notes:
                    row["note"] = "; ".join(notes)
                if row["us"] is not None and base.get("us"):
                    row["ratio_to_base"] = row["us"] / base["us"]
                if row.get("graph_us") is not None and base.get("graph_us"):
                    row["graph_ratio_to_base"] = row["graph_us"] / base["graph_us"]
                rows.append(row)
            report_progress(case, mode, [r for r in rows if r["case"] == case.name and r["mode"] == mode])
        del states, weight_sets, x, dy
        if device == "cuda":
            torch.cuda.empty_cache()
        if on_case is not None:
            on_case(rows)
    return rows


def report_progress(case: Case, mode: str, rows: list[dict]) -> None:
    parts = []
    for r in rows:
        cell = r["provider"]
        if r["us"] is not None:
            cell += f" {r['us']:.1f}us" + (f" ({r['ratio_to_base']:.2f}x)" if r["ratio_to_base"] else "")
        if "check_passed" in r:
            cell += " ok" if r["check_passed"] else " CHECK FAILED"
        if r.get("note"):
            cell += f" [{r['note']}]"
        parts.append(cell)
    print(f"{case.name:32s} {mode:8s} " + " | ".join(parts), flush=True)


# ------------------------------------------------------------------------------------------------- tables


def _cell_time(row: dict | None, key: str = "us", ratio: str = "ratio_to_base") -> str:
    if not row or row.get(key) is None:
        return "-"
    return f"{row[key]:.1f} ({row[ratio]:.2f}x)" if row.get(ratio) else f"{row[key]:.1f}"


def summary_tables(rows: list[dict], providers: list[str]) -> str:
    """Console tables: time and ratio to base per provider, graph times, memory, and the checks."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["case"], r["mode"]), {})[r["provider"]] = r
    out = []
    timed = any(r["us"] is not None for r in rows)
    if timed:
        for mode in dict.fromkeys(r["mode"] for r in rows):
            table = []
            for (case, m), prov in by_key.items():
                if m != mode:
                    continue
                any_row = next(iter(prov.values()))
                t = {"case": case}
                for name in providers:
                    t[f"{name} us (x base)"] = _cell_time(prov.get(name))
                t["floor us"] = any_row["floor_us"]
                fused = prov.get("fused", {})
                if fused.get("us") and any_row["floor_us"]:
                    t["fused/floor"] = fused["us"] / any_row["floor_us"]
                table.append(t)
            cols = ["case", *[f"{n} us (x base)" for n in providers], "floor us", "fused/floor"]
            out.append(f"\n## {mode}: median µs (ratio to base)\n" + common.format_table(table, cols))
        for key, title in (("paired_ratio_to_base",
                            f"paired ratio to base (median over {PAIRED_ROUNDS} interleaved rounds of 6 calls)"),
                           ("interleaved_ratio_to_base", f"ratio of do_bench medians to base, {INTERLEAVED_ROUNDS} "
                                                         "interleaved rounds (the protocol's measure, drift-robust)")):
            ratios = [{"case": c, "mode": m, **{n: f"{p[n][key]:.3f}x" for n in providers
                                                if p.get(n, {}).get(key) is not None}}
                      for (c, m), p in by_key.items() if any(v.get(key) for v in p.values())]
            if ratios:
                cols = ["case", "mode", *[n for n in providers if n != "base"]]
                out.append(f"\n## {title}\n" + common.format_table(ratios, cols))
        graph = [{"case": c, **{f"{n} graph us (x)": _cell_time(p.get(n), "graph_us", "graph_ratio_to_base")
                                for n in providers}}
                 for (c, m), p in by_key.items() if m == "fwd" and any(v.get("graph_us") for v in p.values())]
        if graph:
            cols = ["case", *[f"{n} graph us (x)" for n in providers]]
            out.append("\n## fwd under a CUDA graph, weight sets rotated: µs per call\n"
                       + common.format_table(graph, cols))
        mem = []
        for (c, m), p in by_key.items():
            if m == "fwd" and any(v.get("mem_fwd_bytes") is not None for v in p.values()):
                mem.append({"case": c, **{f"{n} peak / Y": p[n]["mem_fwd_x_out"] for n in providers
                                          if p.get(n, {}).get("mem_fwd_x_out") is not None}})
        if mem:
            cols = ["case", *[f"{n} peak / Y" for n in providers if n != "base"]]
            out.append("\n## forward peak allocated memory (output included) / output size\n"
                       + common.format_table(mem, cols))
    checks = [{"case": c, "mode": m, "provider": n, **{k: r.get(k, "") for k in
              ("rel_err_out", "rel_err_dx", "rel_err_dA", "rel_err_dB", "check_passed", "note")}}
              for (c, m), p in by_key.items() for n, r in p.items() if "check_passed" in r or r.get("note")]
    if checks:
        cols = ["case", "mode", "provider", "rel_err_out", "rel_err_dx", "rel_err_dA", "rel_err_dB",
                "check_passed", "note"]
        out.append("\n## correctness against the reference in fp32 math (same dropout mask)\n"
                   + common.format_table(checks, cols))
    floors = [{"case": c, "mode": m, "GFLOP": r["flops"] / 1e9, "MB": r["bytes"] / 1e6,
               "floor us": r["floor_us"] if r["floor_us"] is not None else "-"}
              for (c, m), p in by_key.items() for r in [next(iter(p.values()))]]
    out.append("\n## FLOP / byte floor of each case (max of FLOPs / matmul peak and bytes / bandwidth)\n"
               + common.format_table(floors, ["case", "mode", "GFLOP", "MB", "floor us"]))
    return "\n".join(out)


def previous_rows(out_dir: str | None, cases: list[Case], modes: list[str]) -> list[dict]:
    """Rows of an earlier results file that this run does not redo."""
    path = os.path.join(out_dir or common.RESULTS_DIR, f"{BENCH_NAME}.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)["rows"]
    redone = {(c.name, m) for c in cases for m in modes}
    return [r for r in old if (r["case"], r["mode"]) not in redone]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small subset of the cases")
    ap.add_argument("--cases", help="comma-separated regexes matched against case names, e.g. 'decode,r16-p0$'")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of providers")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT's lora.Linear even if peft is installed")
    ap.add_argument("--bias", action="store_true", help="give the base linear a bias (default: none)")
    ap.add_argument("--out", help=f"results directory (default {common.RESULTS_DIR})")
    ap.add_argument("--no-measure-peaks", action="store_true",
                    help=f"use the nominal H100 peaks ({NOMINAL_PEAKS['bandwidth_Bps'] / 1e12:.1f} TB/s, "
                         f"{NOMINAL_PEAKS['matmul_flops'] / 1e12:.0f} TFLOP/s) for the floors")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of other cases/modes already in the results file (runs split by --cases)")
    ap.add_argument("--graph-sets", type=int, default=GRAPH_WEIGHT_SETS, help="weight sets rotated in a graph")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Run the benchmark; the exit status is 1 when a correctness check failed (the rows are written anyway)."""
    args = parse_args(argv)
    on_gpu = common.have_gpu()
    device = "cuda" if on_gpu else "cpu"
    modes = [m for m in args.modes.split(",") if m]
    providers = [p for p in args.providers.split(",") if p]
    for name in modes + providers:
        if name not in MODES + PROVIDERS:
            raise SystemExit(f"unknown mode or provider {name!r}: modes {MODES}, providers {PROVIDERS}")
    notes = []
    if "peft" in providers and (args.no_peft or not have_peft()):
        providers.remove("peft")
        notes.append("peft skipped: " + ("--no-peft" if args.no_peft else "peft is not importable"))
    if on_gpu:
        all_cases = quick_cases() if args.quick else gpu_cases()
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    else:
        all_cases = cpu_cases()[:2] if args.quick else cpu_cases()
    cases = select_cases(all_cases, args.cases)
    if not cases:
        raise SystemExit(f"no case matches --cases {args.cases!r}; cases: {[c.name for c in all_cases]}")

    peaks = NOMINAL_PEAKS
    if on_gpu and not args.no_measure_peaks:
        peaks = common.measure_peaks()
    print(f"device: {common.device_name()}; peaks for floors: {peaks['bandwidth_Bps'] / 1e12:.2f} TB/s, "
          f"{peaks['matmul_flops'] / 1e12:.0f} TFLOP/s ({'measured' if peaks['measured'] else 'nominal H100'})")
    for note in notes:
        print(note)
    if not on_gpu:
        print("no GPU: tiny shapes through the Triton interpreter, checked against the reference; "
              "timings need a GPU (timing fields are null)")

    command = "python " + shlex.join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv)))
    extra = {"command": command, "peaks": peaks, "notes": notes, "timed": on_gpu, "interpreter": not on_gpu,
             "providers": providers, "modes": modes}
    kept = previous_rows(args.out, cases, modes) if args.merge else []

    def save(rows):  # after every case, so that a crash or a time limit keeps what was measured
        return common.write_json(BENCH_NAME, kept + rows, extra=extra, out_dir=args.out)

    rows = run(cases, modes, providers, device, args.bias, peaks, args.graph_sets, timed=on_gpu, on_case=save)
    print(summary_tables(rows, providers))
    path = save(rows)
    failed = [r for r in rows if r.get("check_passed") is False]
    print(f"\nwrote {len(kept) + len(rows)} rows ({len(kept)} kept from before) to {path}"
          + (f"; {len(failed)} CHECKS FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
