"""Shared timing and result helpers for every benchmark in bench/.

Protocol (../shared/BENCH.md): median of `triton.testing.do_bench` (it flushes L2), ratios to the base
`F.linear` timed in the same run, CUDA-graph timing with rotated weight sets for launch-bound shapes,
peak temporary memory of a forward, fresh random inputs (never zeros).

Results rows (what `write_json` stores and `plot.py` reads): one dict per (case, mode, provider) with at least
`case`, `mode`, `provider`, `us` (median, None without a GPU), `us_p20`, `us_p80` and `ratio_to_base`; optional
`graph_us` / `graph_ratio_to_base` (CUDA graph, launch-bound shapes), `paired_ratio_to_base` (`paired_ratios`: the
ratio within interleaved rounds of a few calls each), `interleaved_ratio_to_base` (`interleaved_ratios`: the ratio of
do_bench medians over interleaved rounds), `mem_fwd_bytes` / `mem_fwd_x_out`, `rel_err_*` and
`check_passed`. Scripts named `bench_<name>.py` write `<out_dir>/<name>.json`; `run_all.py` finds them.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
from typing import Callable, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# run_all.py names a file here for each script it runs: a script that skips itself writes the reason into it
SKIP_FILE_ENV = "LORA_FAST_BENCH_SKIP_FILE"


def missing_modules(*names: str) -> list[str]:
    """The modules of `names` that do not import (missing, or broken by one of their own dependencies)."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any import failure means the benchmark cannot use it
            missing.append(name)
    return missing


def skip_bench(name: str, reason: str) -> int:
    """A benchmark that cannot run on this machine: print `<name>: skipped: <reason>`, tell run_all.py (which then
    lists it as skipped, not failed), and return 0, the script's exit status. No results file is written."""
    print(f"{name}: skipped: {reason}", flush=True)
    path = os.environ.get(SKIP_FILE_ENV)
    if path:
        with open(path, "w") as f:
            f.write(reason)
    return 0


def have_gpu() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    if have_gpu():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, triton interpreter)"


def environment() -> dict:
    """What a results row needs to be read later: GPU, versions, time."""
    import triton

    import lora_fast

    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "lora_fast": lora_fast.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_us(fn: Callable[[], object], quantiles: Sequence[float] = (0.5, 0.2, 0.8)) -> list[float]:
    """Median (and the 20th/80th percentiles) of `fn` in microseconds, by `triton.testing.do_bench`."""
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(quantiles))
    if isinstance(ms, (int, float)):  # do_bench returns a bare float for a single quantile
        ms = [ms]
    return [t * 1e3 for t in ms]


def paired_ratios(fns: dict[str, Callable[[], object]], base: str, rounds: int = 15, calls: int = 6,
                  warm_calls: int = 6, flush_bytes: int = 256 << 20, head_start_ms: float = 5.0) -> dict[str, float]:
    """Per entry of `fns`, the median over `rounds` of (its time / `fns[base]`'s time) within one round.

    A round times `calls` calls of every function, one function after another (CUDA events around each call, L2
    flushed before each, as do_bench does), in an order reversed every other round, so that each ratio compares
    times a few milliseconds apart: slow drifts of the clock (power, temperature) cancel out, where the ratio of
    two do_bench medians taken seconds apart carries them. The GPU is kept busy through the whole round, as in
    do_bench's steady state: the round starts behind a GPU sleep of `head_start_ms` (the host queues ahead) and
    `warm_calls` untimed calls of the base (the clock settles under load; timing right after an idle GPU favours
    whatever runs first and shortest). Host-bound calls (decode shapes) leave gaps that count, as in do_bench.
    """
    sleep_cycles = int(head_start_ms * 1e-3 * 2.0e9)  # ~2 GHz SM clock; the exact length does not matter
    flush = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    names = list(fns)
    for fn in fns.values():
        fn()
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        torch.cuda._sleep(sleep_cycles)
        for _ in range(warm_calls):
            flush.zero_()
            fns[base]()
        events = {}
        for name in (names if i % 2 == 0 else names[::-1]):
            pairs = []
            for _ in range(calls):
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                pairs.append((start, end))
            events[name] = pairs
        torch.cuda.synchronize()
        ms = {n: sum(s.elapsed_time(e) for s, e in pairs) for n, pairs in events.items()}
        for n in names:
            ratios[n].append(ms[n] / ms[base])
    return {n: median(v) for n, v in ratios.items()}


def interleaved_times(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Per entry of `timers` (name -> a function that times something and returns its time), the times of `rounds`
    rounds; each round calls every timer once, in an order reversed every other round, so that a slow drift of
    the device's clock shifts every entry of a round alike."""
    times: dict[str, list[float]] = {n: [] for n in timers}
    names = list(timers)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            times[name].append(timers[name]())
    return times


def median(values: Sequence[float]) -> float:
    """The median (the upper one of an even count, as the timing helpers here take it)."""
    return sorted(values)[len(values) // 2]


def round_ratios(times: dict[str, list[float]], base: str) -> dict[str, dict]:
    """Per entry of `interleaved_times`' result: {"us": the median time, "ratio": the median over rounds of the
    round's time / the base's in the same round, "ratio_range": [lowest, highest] of those per-round ratios}."""
    out = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base])]
        out[name] = {"us": median(ts), "ratio": median(ratios), "ratio_range": [min(ratios), max(ratios)]}
    return out


def interleaved_ratios(fns: dict[str, Callable[[], object]], base: str, rounds: int = 5) -> dict[str, float]:
    """Per entry of `fns`, the ratio of its median do_bench time to `fns[base]`'s, each the median over `rounds`
    interleaved rounds (one do_bench per function per round, the order reversed every other round).

    This is the protocol's measure (the do_bench median, ../shared/BENCH.md), made robust to the device's clock
    drift between two do_bench calls seconds apart: the base and the others alternate. `paired_ratios` times a few
    calls back to back per function instead; at 8192 x 4096 x 4096 it reads ~3 % higher for the fused forward than
    this does (`bench/probe_fwd_paths.py`), both are reported."""
    times = interleaved_times({n: (lambda fn=fn: bench_us(fn)[0]) for n, fn in fns.items()}, rounds)
    med = {n: median(v) for n, v in times.items()}
    return {n: med[n] / med[base] for n in fns}


def random_lora_inputs(M: int, K: int, N: int, r: int, dtype, seed: int):
    """(x, W, b, A, B, dy) on the GPU from a seeded generator, W and A ~ N(0, 1/K)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
    W = (torch.randn(N, K, device="cuda", dtype=dtype, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda", dtype=dtype, generator=g)
    A = (torch.randn(r, K, device="cuda", dtype=dtype, generator=g) / K ** 0.5).to(dtype)
    B = torch.randn(N, r, device="cuda", dtype=dtype, generator=g)
    dy = torch.randn(M, N, device="cuda", dtype=dtype, generator=g)
    return x, W, b, A, B, dy


def lora_training_step(x, W, A, B, scaling: float, p: float, dy, before: Callable[[], object] | None = None,
                       seed: int = 11) -> Callable[[], tuple]:
    """fn() -> (dx, dA, dB): one `lora_fast.lora_linear` training step (no bias, dropout p) on x, A, B, which must
    require grad, against the upstream gradient dy. `before()` runs first (a module switch of an experiment), then
    torch.manual_seed(seed), so every call draws the same dropout seed."""
    import lora_fast

    def run():
        if before is not None:
            before()
        torch.manual_seed(seed)
        y = lora_fast.lora_linear(x, W, None, A, B, scaling, p, True)
        return torch.autograd.grad(y, [x, A, B], dy)
    return run


def training_problem(r: int, seed: int, M: int = 8192, K: int = 4096, N: int = 4096):
    """The prefill training shape's bf16 inputs: (x, W, A, B, dy) from `random_lora_inputs`, then leaf copies of x,
    A and B that require grad (xg, Ag, Bg), for `lora_training_step`."""
    x, W, _, A, B, dy = random_lora_inputs(M, K, N, r, torch.bfloat16, seed=seed)
    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    return x, W, A, B, dy, xg, Ag, Bg


def finish_report(report: dict, checks: list[dict], out_dir: str, name: str) -> bool:
    """Store `checks` and their tally in `report`, write it to out_dir/name (when out_dir is set), print the tally;
    True when every check passed."""
    report["checks"] = checks
    report["checks_passed"] = f"{sum(c['ok'] for c in checks)}/{len(checks)}"
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(report, f, indent=1)
    print("checks", report["checks_passed"])
    return all(c["ok"] for c in checks)


def lora_references(x, W, b, A, B, dy, scaling: float) -> tuple:
    """float64 (y, xa, dx, dy @ B) of the fused forward and dX without dropout, the rank-r products rounded to x's
    dtype before the second product, as the kernels round them."""
    dt = x.dtype
    xa_ref = x.double() @ A.double().t()
    y_ref = x.double() @ W.double().t() + b.double() + scaling * xa_ref.to(dt).double() @ B.double().t()
    dyb_ref = dy.double() @ B.double()
    dx_ref = dy.double() @ W.double() + scaling * dyb_ref.to(dt).double() @ A.double()
    return y_ref, xa_ref, dx_ref, dyb_ref


def print_shape_report(rows: list[dict], checks: list[dict]) -> None:
    """The last lines of an experiment over shapes: each row's kernel times of one step (`step_kernels_us`), a table
    of every ratio (`ratios`) by shape, and how many `checks` passed (`ok`)."""
    for row in rows:
        print("kernels of one step", row["shape"], [(k[:30], round(v, 1)) for k, v in row["step_kernels_us"]])
    print(f"{'':>20} " + " ".join(f"{'x'.join(map(str, row['shape'][:3])):>17}" for row in rows))
    for key in (rows[0]["ratios"] if rows else ()):
        print(f"{key:>20} " + " ".join(f"{row['ratios'].get(key, float('nan')):17.3f}" for row in rows))
    bad = sum(not c["ok"] for c in checks)
    print(f"checks: {len(checks) - bad}/{len(checks)} ok")


def capture_graph(fns: Sequence[Callable[[], object]]) -> "torch.cuda.CUDAGraph":
    """A CUDA graph that calls each of `fns` once, in turn; warmed up (compile, allocate) and replayed once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # warm up: compile, autotune, allocate outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def graph_replay_us(graph: "torch.cuda.CUDAGraph", calls: int, replays: int = 50) -> float:
    """Median per-call time in microseconds over `replays` replays of a captured graph that makes `calls` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return median(times)


def bench_graph_us(fns: Sequence[Callable[[], object]], replays: int = 50) -> float:
    """Per-call time in microseconds of a CUDA graph that calls each of `fns` once, in turn.

    Each function should use a different weight set (8 is usual) so that the weights do not sit in L2.
    """
    return graph_replay_us(capture_graph(fns), len(fns), replays)


def interleaved_graph_ratios(fn_sets: dict[str, Sequence[Callable[[], object]]], base: str, rounds: int = 3,
                             replays: int = 50) -> dict[str, dict]:
    """`round_ratios` of CUDA graphs: each entry's functions (one per weight set) captured once in a graph, then
    the graphs timed in `interleaved_times` rounds. A compute-bound shape's time drifts by 10-15 % between runs
    on the H200 (the base at 4096 tokens: 176-198 µs, bench/NOTES.md twelfth session); within a round the base
    and the others see the same clock."""
    graphs = {name: capture_graph(fns) for name, fns in fn_sets.items()}
    timers = {name: (lambda g=g, n=len(fn_sets[name]): graph_replay_us(g, n, replays)) for name, g in graphs.items()}
    return round_ratios(interleaved_times(timers, rounds), base)


def graph_kernel_times(fns: Sequence[Callable[[], object]], replays: int = 20) -> list[tuple[str, float, float]]:
    """(kernel name, launches per function call, GPU µs per launch) of each kernel in a CUDA graph calling each of
    `fns` once (capture_graph), by torch.profiler over `replays` replays."""
    from torch.profiler import ProfilerActivity, profile

    graph = capture_graph(fns)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    out = []
    for ev in prof.key_averages():
        total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if total and ev.count:
            out.append((ev.key, ev.count / (replays * len(fns)), total / ev.count))
    return out


def graph_kernel_timeline(fns: Sequence[Callable[[], object]], replays: int = 20) -> list[tuple[str, float, float]]:
    """(kernel name, start µs, end µs) of each kernel one call of `fns[i]` launches, relative to the call's first
    kernel's start: medians over `replays` replays of a CUDA graph calling each of `fns` once (every call must
    launch the same kernels), by torch.profiler; a last entry ("(gap to the next call)", g, g) gives the median
    idle time between one call's end and the next call's first kernel in the graph. Shows which kernels of a call
    overlap (PDL), its tail, and what the graph adds between calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    graph = capture_graph(fns)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.elapsed_us() > 0),
                     key=lambda e: e.time_range.start)
    calls = replays * len(fns)
    if not kernels or len(kernels) % calls:
        return []
    per = len(kernels) // calls
    groups = [kernels[i * per:(i + 1) * per] for i in range(calls)]
    out = []
    for j in range(per):
        starts = [g[j].time_range.start - g[0].time_range.start for g in groups]
        ends = [g[j].time_range.end - g[0].time_range.start for g in groups]
        out.append((groups[0][j].name, median(starts), median(ends)))
    # the gap from a call's last kernel's end to the next call's first kernel's start, within a replay
    gaps = [b[0].time_range.start - max(k.time_range.end for k in a)
            for i, (a, b) in enumerate(zip(groups, groups[1:])) if (i + 1) % len(fns)]
    if gaps:
        out.append(("(gap to the next call)", median(gaps), median(gaps)))
    return out


def kernel_times_us(fns: Sequence[Callable[[], object]], rounds: int = 5) -> list[tuple[str, float]]:
    """(kernel name, GPU µs per call) of each kernel `fns` launch, by torch.profiler over `rounds` rounds of every
    function once (after one warm-up round), the time divided by the number of calls."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            for fn in fns:
                fn()
        torch.cuda.synchronize()
    out = []
    for ev in prof.key_averages():
        total = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if total:
            out.append((ev.key, total / (rounds * len(fns))))
    return out


def host_and_wall_us(fn: Callable[[], object], calls: int, warmup: int = 10) -> tuple[float, float]:
    """(host µs per call of `fn` with no sync inside the timed loop, wall µs per call up to a final sync): when the
    first reaches the second, the calls are bound by host time, not by the GPU."""
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / calls * 1e6


def cprofile_text(fn: Callable[[], object], calls: int, sort: str = "tottime", lines: int = 18,
                  keep: int = 6000) -> str:
    """cProfile of `calls` calls of `fn` (then a CUDA sync), the top `lines` functions by `sort`, as text (its
    last `keep` characters). Only the calling thread is profiled: an autograd backward on CUDA tensors runs on the
    engine's device thread and shows as `run_backward`'s own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(sort).print_stats(lines)
    return s.getvalue()[-keep:]


def measure_peaks(copy_bytes: int = 1 << 30, matmul_n: int = 8192) -> dict:
    """Measured memory bandwidth (a device-to-device copy, bytes read + written) and bf16 matmul rate.

    Returns {"bandwidth_Bps": ..., "matmul_flops": ...}; the floors of every case are computed from these.
    """
    src = torch.randn(copy_bytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_s = bench_us(lambda: dst.copy_(src))[0] * 1e-6
    del src, dst
    a = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device="cuda", dtype=torch.bfloat16)
    mm_s = bench_us(lambda: a @ b)[0] * 1e-6
    del a, b
    torch.cuda.empty_cache()
    return {"bandwidth_Bps": 2 * copy_bytes / copy_s, "matmul_flops": 2 * matmul_n**3 / mm_s, "measured": True}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| computed in fp32 (the plain norm of the difference when ref is all zeros)."""
    out, ref = out.detach().float(), ref.detach().float()
    diff = torch.linalg.vector_norm(out - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / scale if scale > 0 else diff


def peak_forward_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated while `fn` runs, minus what was allocated before it (its output included)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def write_json(name: str, rows: list[dict], extra: dict | None = None, out_dir: str | None = None) -> str:
    """Write `{"env": ..., "rows": rows}` to `<out_dir>/<name>.json` and return the path."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    payload = {"env": environment(), **(extra or {}), "rows": rows}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """A Markdown table of `rows` restricted to `columns` (floats to 3 significant digits)."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
