"""Reports made from the results JSON that the bench scripts write: PNG plots and the results README table.

A separate step from the measuring, so that a plot can be redrawn without a GPU. matplotlib is optional: without it
the plots are skipped and the README table is still written.

    python bench/plot.py bench/results/lora_linear.json                 # -> bench/results/lora_linear.png
    python bench/plot.py $OUT/*.json --readme $OUT/README.md --command "python bench/run_all.py --out \\$OUT"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import format_table  # noqa: E402

README_HEADER = """# Benchmark results

Written by `bench/run_all.py` (or `bench/plot.py --readme`): each section below is replaced by the latest run of
its benchmark; ratios are times over the base `F.linear` timed in the same run (median of `do_bench`).
"""


def load(path: str) -> dict:
    with open(path) as f:
        payload = json.load(f)
    payload.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return payload


def providers_of(rows: list[dict]) -> list[str]:
    """Providers in first-seen order, base first."""
    names = list(dict.fromkeys(r["provider"] for r in rows))
    return sorted(names, key=lambda n: n != "base")


def _by_case(rows: list[dict], mode: str) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r.get("mode") == mode:
            out.setdefault(r["case"], {})[r["provider"]] = r
    return out


def _max_rel_err(row: dict) -> float | None:
    errs = [v for k, v in row.items() if k.startswith("rel_err_") and v is not None]
    return max(errs) if errs else None


# ---------------------------------------------------------------------------------------------------- plots


def plot(payload: dict, png_path: str) -> str | None:
    """Grouped bars per case: ratio to base per provider, one panel per mode (plus CUDA-graph and memory panels
    when the rows have them). Without timings (a CPU run) it plots the relative errors of the check instead.
    Returns the PNG path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    rows = payload["rows"]
    timed = any(r.get("us") is not None for r in rows)
    panels = []  # (title, mode, key, log scale, reference line)
    for mode in dict.fromkeys(r["mode"] for r in rows):
        if timed:
            panels.append((f"{mode}: time / base", mode, "ratio_to_base", False, 1.0))
        else:
            panels.append((f"{mode}: max relative error vs fp32 reference (no GPU: no timings)", mode,
                           "max_rel_err", True, None))
    if any(r.get("graph_ratio_to_base") is not None for r in rows):
        panels.append(("fwd in a CUDA graph (rotated weights): time / base", "fwd", "graph_ratio_to_base", False, 1.0))
    if any(r.get("mem_fwd_x_out") is not None for r in rows):
        panels.append(("fwd peak memory / output size", "fwd", "mem_fwd_x_out", False, 1.0))

    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.9 * len(_by_case(rows, panels[0][1]))), 4.2 * len(panels)),
                             squeeze=False)
    env = payload.get("env", {})
    fig.suptitle(f"{payload['name']} on {env.get('device', '?')} ({env.get('date', '')[:10]})", fontsize=11)
    for ax, (title, mode, key, log, line) in zip(axes[:, 0], panels):
        by_case = _by_case(rows, mode)
        cases = [c for c, prov in by_case.items() if any(_value(r, key) is not None for r in prov.values())]
        names = [n for n in providers_of(rows) if any(_value(by_case[c].get(n), key) is not None for c in cases)
                 and not (n == "base" and "ratio" in key)]  # base is the 1.00 line
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cases))]
            ys = [_value(by_case[c].get(name), key) for c in cases]
            ax.bar(xs, [y if y is not None else 0 for y in ys], width, label=name)
        if line is not None:
            ax.axhline(line, color="black", linewidth=0.8, linestyle="--")
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=35, ha="right", fontsize=7)
        ax.legend(fontsize=7, ncol=len(names))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _value(row: dict | None, key: str):
    if row is None:
        return None
    return _max_rel_err(row) if key == "max_rel_err" else row.get(key)


# ---------------------------------------------------------------------------------------------- README table


def _ratio(row: dict | None, key: str = "ratio_to_base") -> str:
    return f"{row[key]:.2f}×" if row and row.get(key) is not None else ""


def _check(prov: dict[str, dict]) -> str:
    checked = [r for r in prov.values() if r.get("check_passed") is not None]
    if not checked:
        return ""
    failed = [r["provider"] for r in checked if not r["check_passed"]]
    worst = max((e for r in checked if (e := _max_rel_err(r)) is not None), default=None)
    status = "FAIL " + ",".join(failed) if failed else "ok"
    return status + (f" ({worst:.1e})" if worst is not None else "")


def results_table(rows: list[dict]) -> str:
    """One line per (case, mode): base µs, every provider's ratio to base, CUDA-graph ratios, forward memory
    over the output size, and the correctness check (worst relative error over providers and tensors)."""
    names = providers_of(rows)
    timed = any(r.get("us") is not None for r in rows)
    graph = [n for n in names if any(r.get("graph_ratio_to_base") is not None for r in rows if r["provider"] == n)]
    mem = [n for n in ("fused", "reference", "peft")
           if any(r.get("mem_fwd_x_out") is not None for r in rows if r["provider"] == n)]
    table = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for case, prov in _by_case(rows, mode).items():
            line = {"case": case, "mode": mode}
            if timed:
                base = prov.get("base", {})
                line["base µs"] = base.get("us") if base.get("us") is not None else ""
                for n in names:
                    if n != "base":
                        line[n] = _ratio(prov.get(n))
                if prov.get("base", {}).get("graph_us") is not None:
                    line["base graph µs"] = prov["base"]["graph_us"]
                for n in graph:
                    if n != "base":
                        line[f"{n} graph"] = _ratio(prov.get(n), "graph_ratio_to_base")
                for n in mem:
                    v = prov.get(n, {}).get("mem_fwd_x_out")
                    line[f"{n} mem/Y"] = f"{v:.2f}" if v is not None else ""
            else:  # no timings: each provider's worst relative error
                for n in names:
                    err = _max_rel_err(prov.get(n, {}))
                    line[n] = f"{err:.1e}" if err is not None else ""
            line["check"] = _check(prov)
            table.append(line)
    columns = ["case", "mode"]
    if timed:
        columns += ["base µs", *[n for n in names if n != "base"]]
        if graph:
            columns += ["base graph µs", *[f"{n} graph" for n in graph if n != "base"]]
        columns += [f"{n} mem/Y" for n in mem]
    else:
        columns += [n for n in names if any(_max_rel_err(r) is not None for r in rows if r["provider"] == n)]
    columns.append("check")
    return format_table(table, columns)


def drift_robust_table(rows: list[dict]) -> str | None:
    """The rows that carry the drift-robust ratios (common.interleaved_ratios: do_bench medians over interleaved
    rounds; common.paired_ratios: a few calls back to back per round) beside their single do_bench ratio; None when
    no row has them."""
    keys = ("interleaved_ratio_to_base", "paired_ratio_to_base")
    picked = [r for r in rows if any(r.get(k) is not None for k in keys)]
    if not picked:
        return None
    fmt = lambda v: f"{v:.3f}×" if isinstance(v, (int, float)) else ""  # noqa: E731
    table = [{"case": r["case"], "mode": r["mode"], "provider": r["provider"], "do_bench": fmt(r.get("ratio_to_base")),
              "interleaved do_bench": fmt(r.get(keys[0])), "paired": fmt(r.get(keys[1]))} for r in picked]
    return format_table(table, ["case", "mode", "provider", "do_bench", "interleaved do_bench", "paired"])


def readme_section(payload: dict, command: str | None = None, png_name: str | None = None) -> str:
    env = payload.get("env", {})
    name = payload["name"]
    lines = [f"<!-- bench:{name} start -->", f"## {name}", ""]
    lines.append(f"- date: {env.get('date', '?')}")
    lines.append(f"- device: {env.get('device', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')},"
                 f" lora_fast {env.get('lora_fast', '?')}")
    if command:
        lines.append(f"- command: `{command}`")
    if payload.get("command") and payload.get("command") != command:
        lines.append(f"- bench command: `{payload['command']}`")
    peaks = payload.get("peaks")
    if peaks:
        lines.append(f"- peaks for the floors: {peaks['bandwidth_Bps'] / 1e12:.2f} TB/s, "
                     f"{peaks['matmul_flops'] / 1e12:.0f} TFLOP/s bf16 "
                     f"({'measured in this run' if peaks.get('measured') else 'nominal H100, not measured'})")
    for note in payload.get("notes", []):
        lines.append(f"- {note}")
    if not any(r.get("us") is not None for r in payload["rows"]):
        lines.append("- no GPU: correctness checks only (through the Triton interpreter); timings need a GPU")
    lines += ["", "Ratios are time / base (`F.linear`); `mem/Y` is the forward's peak allocation over the output's "
              "size (1.00 = nothing but Y); `check` is the worst relative error against the fp32 reference.", ""]
    lines.append(results_table(payload["rows"]))
    robust = drift_robust_table(payload["rows"])
    if robust:
        lines += ["", "Drift-robust ratios to the base (`bench/common.py`): the do_bench median over interleaved rounds "
                  "(`interleaved_ratios`) and the median of per-round ratios of a few back-to-back calls "
                  "(`paired_ratios`), beside the single do_bench ratio of the table above.", "", robust]
    if png_name:
        lines += ["", f"![{name}]({png_name})"]
    lines.append(f"<!-- bench:{name} end -->")
    return "\n".join(lines)


def update_readme(readme_path: str, payload: dict, command: str | None = None, png_name: str | None = None) -> str:
    """Write or replace this benchmark's section of the results README, keeping every other section."""
    section = readme_section(payload, command, png_name)
    text = README_HEADER
    if os.path.exists(readme_path):
        with open(readme_path) as f:
            text = f.read()
    name = re.escape(payload["name"])
    pattern = re.compile(rf"<!-- bench:{name} start -->.*?<!-- bench:{name} end -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    os.makedirs(os.path.dirname(os.path.abspath(readme_path)), exist_ok=True)
    with open(readme_path, "w") as f:
        f.write(text.rstrip("\n") + "\n")
    return readme_path


def handles(payload: dict) -> bool:
    """Whether these reports fit the payload: rows of (case, mode, provider), as bench_lora_linear writes.
    Other benchmarks (bench_multi_lora) write their own table and plot."""
    rows = payload.get("rows") or []
    return bool(rows) and all(k in rows[0] for k in ("case", "mode", "provider"))


def report(json_path: str, readme_path: str | None = None, command: str | None = None) -> tuple[str | None, str | None]:
    """Plot `json_path` next to itself and update `readme_path` (default: README.md in the same folder)."""
    payload = load(json_path)
    png = plot(payload, os.path.splitext(json_path)[0] + ".png")
    readme_path = readme_path or os.path.join(os.path.dirname(os.path.abspath(json_path)), "README.md")
    png_name = os.path.relpath(png, os.path.dirname(os.path.abspath(readme_path))) if png else None
    return png, update_readme(readme_path, payload, command, png_name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="results files written by the bench scripts")
    ap.add_argument("--readme", help="README to update (default: README.md beside each JSON file)")
    ap.add_argument("--command", help="the command line that produced the results, for the README")
    args = ap.parse_args(argv)
    for path in args.json:
        png, readme = report(path, args.readme, args.command)
        print(f"{path}: plot {png or '(none)'}, README {readme}")


if __name__ == "__main__":
    main()
