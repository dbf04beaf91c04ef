"""Multi-LoRA prefill: where a graphed call's time goes beyond its kernels' own time.

`exp_multi_rows` at 4096 tokens / 32 adapters (twelfth session) timed a graphed call at 235 µs while its kernels
summed to 204 µs under torch.profiler (1024 tokens: 64.6 against 64.4). This probe times, under CUDA graphs over
8 weight sets: the base `F.linear`, ours, cuBLAS's `addmm_` with beta = 1 alone (y prefilled), and reads the
kernels' start and end times from a profiler trace of our graph, to report per call the busy time, the span
(first start to last end) and the largest idle gaps with the kernels around them.

    PYTHONPATH=$PWD python3 bench/probe_multi_gaps.py [--out DIR] [--shapes 1024x32,4096x32]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import bench_multi_lora as bml  # noqa: E402
from bench.common import bench_graph_us, capture_graph, format_table, write_json  # noqa: E402

DEV = "cuda"


def trace_calls(fns, replays=5):
    """Kernel (name, start, end) lists, one per replay of a graph calling each of fns once."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    graph = capture_graph(fns)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA]
    kernels.sort(key=lambda k: k[1])
    return kernels


def summarize(kernels, replays, calls_per_replay):
    """Per call: kernel (busy) time, span and idle time within a replay, and the largest gaps inside replays. The
    trace synchronises after every replay, so the time between replays is left out: kernels are split into
    `replays` equal runs in start order (each replay launches the same kernels)."""
    per = len(kernels) // replays
    busy = span = 0.0
    gaps = []
    for i in range(replays):
        run = kernels[i * per:(i + 1) * per]
        busy += sum(e - s for _, s, e in run)
        span += run[-1][2] - run[0][1]
        gaps += [(s1 - e0, n0[:28], n1[:28]) for (n0, _, e0), (n1, s1, _) in zip(run, run[1:])]
    gaps.sort(reverse=True)
    calls = replays * calls_per_replay
    return dict(busy_us_per_call=busy / calls, span_us_per_call=span / calls,
                idle_us_per_call=(span - busy) / calls, top_gaps=[(round(g, 2), a, b) for g, a, b in gaps[:6]])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--shapes", default="1024x32,4096x32")
    args = ap.parse_args(argv)
    rows = []
    for shape in args.shapes.split(","):
        T, n_ad = (int(v) for v in shape.split("x"))
        prob = bml.Problem(T, n_ad, 16, 4096, 4096, torch.bfloat16, DEV, sets=bml.WEIGHT_SETS)
        ys = [torch.randn(T, 4096, device=DEV, dtype=torch.bfloat16) for _ in range(bml.WEIGHT_SETS)]
        addmm = [(lambda s=s: ys[s].addmm_(prob.x, prob.sets[s][0].t())) for s in range(bml.WEIGHT_SETS)]
        ours = [prob.provider("ours", s) for s in range(bml.WEIGHT_SETS)]
        base = [prob.provider("base", s) for s in range(bml.WEIGHT_SETS)]
        times = {"base": [], "ours": [], "addmm": []}
        for _ in range(3):
            times["base"].append(bench_graph_us(base))
            times["ours"].append(bench_graph_us(ours))
            times["addmm"].append(bench_graph_us(addmm))
        med = {k: sorted(v)[1] for k, v in times.items()}
        row = dict(T=T, adapters=n_ad, **{f"{k}_us": round(v, 1) for k, v in med.items()},
                   ratio=round(med["ours"] / med["base"], 3), addmm_ratio=round(med["addmm"] / med["base"], 3))
        for name, fns in (("ours", ours), ("base", base)):
            summ = summarize(trace_calls(fns, replays=5), 5, len(fns))
            row.update({f"{name}_{k}": (round(v, 2) if isinstance(v, float) else v) for k, v in summ.items()})
        rows.append(row)
        print(row, flush=True)
    write_json("probe_multi_gaps", rows, {}, out_dir=args.out)
    print(format_table(rows, ["T", "adapters", "base_us", "ours_us", "addmm_us", "ratio", "addmm_ratio",
                              "ours_busy_us_per_call", "ours_span_us_per_call", "base_busy_us_per_call"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
