"""Run every benchmark in bench/ (each `bench_*.py`), then plot each results file and update the results README.

Each script runs in its own process (a crash or a CUDA error in one does not stop the others) with `--out DIR`
(and `--quick` when given); any other option is passed on to each script whose --help lists it. Script `bench_<name>.py` writes
`DIR/<name>.json`; this then writes `DIR/<name>.png` and the `<name>` section of `DIR/README.md`. A script that
cannot run on this machine (an optional dependency missing: `common.skip_bench`) is listed as skipped, not failed.

    python bench/run_all.py                        # everything, into bench/results/
    python bench/run_all.py --out "$OUT" --quick   # a quick pass, results under $OUT
    python bench/run_all.py --only lora_linear --no-peft
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
import plot  # noqa: E402
from common import RESULTS_DIR, SKIP_FILE_ENV  # noqa: E402


def bench_scripts(only: list[str] | None = None) -> dict[str, str]:
    """{name: path} of bench/bench_<name>.py, sorted, optionally restricted to `only`."""
    scripts = {}
    for path in sorted(glob.glob(os.path.join(BENCH_DIR, "bench_*.py"))):
        name = os.path.basename(path)[len("bench_"):-len(".py")]
        if not only or name in only:
            scripts[name] = path
    return scripts


def option_groups(args: list[str]) -> list[list[str]]:
    """Split ['--cases', 'decode', '--no-peft'] into [['--cases', 'decode'], ['--no-peft']]."""
    groups: list[list[str]] = []
    for a in args:
        if a.startswith("--") or not groups:
            groups.append([a])
        else:
            groups[-1].append(a)
    return groups


def accepted_options(path: str, options: list[list[str]]) -> list[str]:
    """The option groups whose flag the script's --help mentions, flattened."""
    if not options:
        return []
    help_text = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True).stdout
    kept, dropped = [], []
    for group in options:
        flag = group[0].split("=", 1)[0]
        (kept if re.search(rf"{re.escape(flag)}\b", help_text) else dropped).append(group)
    if dropped:
        print(f"{os.path.basename(path)} does not take {' '.join(g[0] for g in dropped)}: not passed")
    return [a for g in kept for a in g]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=RESULTS_DIR, help=f"results directory (default {RESULTS_DIR})")
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script")
    ap.add_argument("--only", help="comma-separated benchmark names (bench_<name>.py) to run")
    ap.add_argument("--no-plot", action="store_true", help="skip the plots and the README")
    args, passthrough = ap.parse_known_args(argv)
    command = "python " + shlex.join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv)))
    scripts = bench_scripts(args.only.split(",") if args.only else None)
    if not scripts:
        print("no benchmark script matches", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)

    failures, skipped = [], []
    skip_dir = tempfile.mkdtemp(prefix="lora_fast_bench_")
    for name, path in scripts.items():
        cmd = [sys.executable, path, "--out", args.out] + (["--quick"] if args.quick else [])
        cmd += accepted_options(path, option_groups(passthrough))
        print(f"\n===== {name}: {shlex.join(cmd)}", flush=True)
        start = time.time()
        skip_file = os.path.join(skip_dir, f"{name}.skip")
        rc = subprocess.call(cmd, env={**os.environ, SKIP_FILE_ENV: skip_file})
        print(f"===== {name}: exit {rc} after {time.time() - start:.0f} s", flush=True)
        if os.path.exists(skip_file):  # the script cannot run here (common.skip_bench): not a failure
            with open(skip_file) as f:
                reason = f.read().strip()
            os.remove(skip_file)
            if rc == 0:
                skipped.append(f"{name}: {reason}")
                continue
        # A bench names its file <name>.json, or <name>_cpu.json for a run without a GPU.
        paths = [os.path.join(args.out, f"{name}{suffix}.json") for suffix in ("", "_cpu")]
        json_path = next((p for p in paths if os.path.exists(p) and os.path.getmtime(p) >= start), None)
        fresh = json_path is not None
        if rc != 0 or not fresh:
            failures.append(name)
        if fresh and not args.no_plot and plot.handles(plot.load(json_path)):
            png, readme = plot.report(json_path, os.path.join(args.out, "README.md"), command)
            print(f"plot: {png or '(matplotlib missing)'}; README: {readme}")

    os.rmdir(skip_dir)
    if skipped:
        print(f"\nskipped: {'; '.join(skipped)}")
    if failures:
        print(f"\nfailed (non-zero exit or no fresh results): {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"\nall {len(scripts) - len(skipped)} benchmark(s) done" + (f", {len(skipped)} skipped" if skipped else "")
          + f"; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
