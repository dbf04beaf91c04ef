"""CPU smoke test of the benchmark CLI: two tiny cases through the Triton interpreter, then its reports.

The bench runs in a subprocess with CUDA hidden, so it takes its CPU mode (interpreter, checks, null timings)
on any machine, and TRITON_INTERPRET is set before its first triton import.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "bench")
# One case with dropout and a power-of-two rank, one decode-like row with an odd rank.
CASES = "cpu-33x40x24-r16-p0.1,cpu-1x40x24-r3-p0$"


def run_bench_cpu(out_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, os.path.join(BENCH_DIR, "bench_lora_linear.py"), "--cases", CASES, "--out", str(out_dir)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_bench_cli_cpu_smoke(tmp_path):
    proc = run_bench_cpu(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "timings need a GPU" in proc.stdout

    with open(tmp_path / "lora_linear.json") as f:
        payload = json.load(f)
    assert payload["env"]["lora_fast"] and payload["command"].startswith("python ")
    rows = payload["rows"]
    cases = {r["case"] for r in rows}
    assert cases == {"cpu-33x40x24-r16-p0.1", "cpu-1x40x24-r3-p0"}, cases
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["us"] is None and r["ratio_to_base"] is None for r in rows)
    assert all(r["flops"] > 0 and r["bytes"] > 0 for r in rows)
    for name in ("fused", "reference"):
        checked = [r for r in rows if r["provider"] == name]
        assert len(checked) == 4, checked
        for r in checked:
            assert r["check_passed"] is True, r
            grads = ("dx", "dA", "dB") if r["mode"] == "fwd+bwd" else ()
            for key in ("out", *grads):
                assert r[f"rel_err_{key}"] < r["check_tolerance"], (key, r)

    sys.path.insert(0, BENCH_DIR)
    try:
        import plot
    finally:
        sys.path.remove(BENCH_DIR)
    readme = tmp_path / "README.md"
    for _ in range(2):  # a second run replaces the section instead of appending one
        plot.report(str(tmp_path / "lora_linear.json"), str(readme), "python bench/run_all.py")
    text = readme.read_text()
    assert text.count("<!-- bench:lora_linear start -->") == 1
    assert "cpu-33x40x24-r16-p0.1" in text and "`python bench/run_all.py`" in text


@pytest.mark.gpu
def test_paired_ratios_measure_a_known_ratio():
    """`common.paired_ratios`: a function that runs the base's work twice measures about 2x, the base 1x."""
    import torch
    sys.path.insert(0, ROOT)
    from bench.common import paired_ratios

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    ratios = paired_ratios({"base": lambda: a @ a, "twice": lambda: (a @ a, a @ a)}, "base", rounds=5)
    assert ratios["base"] == 1.0 and 1.6 < ratios["twice"] < 2.4


def test_interleaved_rounds_pair_each_time_with_the_base_of_its_round():
    """`common.interleaved_times` / `round_ratios` (the multi-LoRA graph timings): the order flips every round, and
    a ratio is taken within a round, so a clock that slows the whole device between rounds (here 1.0, 1.3, 0.9,
    1.5, 1.1) leaves a known ratio exact, and the range shows the spread when the ratio itself varies."""
    sys.path.insert(0, ROOT)
    from bench.common import interleaved_times, round_ratios

    clock = iter([1.0, 1.3, 0.9, 1.5, 1.1])
    order, state = [], {"scale": 1.0, "calls": 0}

    def timer(name, us):
        def run():
            if state["calls"] % 3 == 0:  # a new round: the device's clock moves
                state["scale"] = next(clock)
            state["calls"] += 1
            order.append(name)
            return us * state["scale"]
        return run

    times = interleaved_times({"base": timer("base", 10.0), "ours": timer("ours", 12.0),
                               "other": timer("other", 25.0)}, rounds=5)
    assert order[:6] == ["base", "ours", "other", "other", "ours", "base"]
    assert times["base"] == [10.0, 13.0, 9.0, 15.0, 11.0]
    res = round_ratios(times, "base")
    assert res["base"]["ratio"] == 1.0 and res["base"]["ratio_range"] == [1.0, 1.0]
    assert abs(res["ours"]["ratio"] - 1.2) < 1e-12 and abs(res["other"]["ratio"] - 2.5) < 1e-12
    assert abs(res["ours"]["us"] - 13.2) < 1e-9  # the median time (12 x 1.1) carries the drift; the ratio does not
    res = round_ratios({"base": [10.0, 10.0, 10.0], "ours": [11.0, 13.0, 12.0]}, "base")
    assert res["ours"]["ratio"] == 1.2 and res["ours"]["ratio_range"] == [1.1, 1.3]


def test_multi_lora_bench_cpu_smoke(tmp_path):
    """bench/bench_multi_lora.py on its tiny grid through the interpreter: every provider of every shape runs and
    agrees with the reference (the base alone is the one that lacks the LoRA term), and the JSON and the Markdown
    table are written."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, os.path.join(BENCH_DIR, "bench_multi_lora.py"), "--grid", "tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.load(open(tmp_path / "multi_lora_cpu.json"))["rows"]
    providers = {r["provider"] for r in rows}
    assert {"base", "ours", "gather_bmm", "peft_loop", "vllm_style"} <= providers
    assert all(r["err"] < 2e-2 for r in rows if r["provider"] != "base"), rows
    table = (tmp_path / "multi_lora_cpu.md").read_text()
    assert table.count("| ours |") == len({(r["T"], r["adapters"], r["r"], r["N"]) for r in rows})


def test_multi_lora_bench_shard(tmp_path):
    """`--shard I/N` runs every N-th shape from the I-th (the full GPU grid is split over several device calls)
    into its own file; a bad shard is refused."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    script = os.path.join(BENCH_DIR, "bench_multi_lora.py")
    cmd = [sys.executable, script, "--grid", "tiny", "--shard", "2/2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    payload = json.load(open(tmp_path / "multi_lora_cpu_tiny_2of2.json"))
    assert payload["shard"] == "2/2"
    assert {(r["T"], r["adapters"]) for r in payload["rows"]} == {(16, 8)}  # the second of the three tiny shapes
    bad = subprocess.run([sys.executable, script, "--grid", "tiny", "--shard", "3/2", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--shard must be I/N" in bad.stderr
    # --merge: one shard alone lists the grid's other shapes as missing; with the other shard, none are
    merge = [sys.executable, script, "--merge", str(tmp_path / "multi_lora_cpu_tiny_2of2.json"), "--out", str(tmp_path)]
    proc = subprocess.run(merge, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged = json.load(open(tmp_path / "multi_lora_cpu_tiny.json"))
    assert [(g["T"], g["adapters"]) for g in merged["missing"]] == [(1, 1), (33, 32)]
    assert "Not measured" in (tmp_path / "multi_lora_cpu_tiny.md").read_text()
    # --missing: only the shapes the merged file lists as missing (the other shard's), merged in after
    cmd = [sys.executable, script, "--grid", "tiny", "--missing", str(tmp_path / "multi_lora_cpu_tiny.json"),
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    payload = json.load(open(tmp_path / "multi_lora_cpu_tiny_missing.json"))
    assert payload["shard"] == "missing"
    assert {(r["T"], r["adapters"]) for r in payload["rows"]} == {(1, 1), (33, 32)}
    proc = subprocess.run(merge[:3] + [str(tmp_path / "multi_lora_cpu_tiny_missing.json")] + merge[3:], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged = json.load(open(tmp_path / "multi_lora_cpu_tiny.json"))
    assert merged["missing"] == [] and merged["shards"] == ["missing", "2/2"]
    assert [(r["T"], r["adapters"]) for r in merged["rows"] if r["provider"] == "ours"] == [(1, 1), (16, 8), (33, 32)]
    # --tokens: re-measure the shapes of some token counts; merged after the shards, its rows replace theirs
    cmd = [sys.executable, script, "--grid", "tiny", "--tokens", "16", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    again = json.load(open(tmp_path / "multi_lora_cpu_tiny_T16.json"))
    assert {(r["T"], r["adapters"]) for r in again["rows"]} == {(16, 8)}
    files = [tmp_path / f"multi_lora_cpu_tiny_{s}.json" for s in ("missing", "2of2", "T16")]  # T16 last: it wins
    proc = subprocess.run(merge[:3] + [str(f) for f in files] + merge[4:], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged = json.load(open(tmp_path / "multi_lora_cpu_tiny.json"))
    assert merged["missing"] == [] and len(merged["rows"]) == len(payload["rows"]) + len(again["rows"])
    assert [r for r in merged["rows"] if r["T"] == 16] == again["rows"]


def test_ncu_stalls_sums_samples_by_reason_and_line():
    """bench/ncu_stalls.py on a small report in Nsight Compute's `--page source --csv` shape: preamble lines
    skipped, samples summed per reason, the busiest SASS line first with its top reason."""
    sys.path.insert(0, BENCH_DIR)
    try:
        from ncu_stalls import summarise
    finally:
        sys.path.remove(BENCH_DIR)
    text = ('==PROF== preamble\n'
            '"# Address","Source","Warp Stall Sampling (All Samples)","stall_long_sb","stall_membar"\n'
            '"0x10","ERRBAR","12","0","12"\n'
            '"0x20","LDG.E.128 R4, desc[UR4][R2.64]","1,030","1,000","30"\n')
    out = summarise(text, top=1)
    assert "total samples 1042" in out
    assert "stall_long_sb                  1000  96.0 %" in out
    assert "stall_membar                     42   4.0 %" in out
    last = out.splitlines()[-1]
    assert last.split()[0] == "1030" and "LDG.E.128" in last and last.endswith("stall_long_sb")


def _without_peft_and_transformers(tmp_path) -> dict:
    """An environment whose `import peft` and `import transformers` fail, as on a machine with only the [bench]
    extra installed (stub modules first on PYTHONPATH)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("peft", "transformers"):
        (stubs / f"{name}.py").write_text(f"raise ImportError('No module named {name!r} (test stub)')\n")
    path = os.pathsep.join(p for p in (str(stubs), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}


def test_train_step_bench_skips_without_peft_and_transformers(tmp_path):
    """Was: an ImportError traceback and exit 1 (run.sh's `bash run.sh main` then stopped before the serving demo).
    Now: a "skipped" line, exit 0, no results file."""
    env = _without_peft_and_transformers(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "bench_train_step.py"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "train_step: skipped: needs peft and transformers" in proc.stdout
    assert not (out / "train_step.json").exists()


def test_run_all_lists_a_skipped_bench_without_failing(tmp_path):
    """run_all.py counts a bench that skips itself (common.skip_bench) as skipped, not failed: exit 0."""
    env = _without_peft_and_transformers(tmp_path)
    cmd = [sys.executable, os.path.join(BENCH_DIR, "run_all.py"), "--only", "train_step", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "skipped: train_step: needs peft and transformers" in proc.stdout
    assert "all 0 benchmark(s) done, 1 skipped" in proc.stdout and "failed" not in proc.stderr
