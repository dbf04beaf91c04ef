"""Benchmark: batched multi-adapter LoRA forward (multi-tenant inference), bf16.

Providers (ratios to `base`, timed in the same run on the same inputs):
  base        F.linear(x, W, b) alone (cuBLAS), no LoRA
  ours        lora_fast multi_lora_linear: split-K segment shrink + base GEMM with the expand fused in its epilogue
  gather_bmm  torch: gather A[ids], B[ids] per token, two bmm (Punica's BGMV written in torch)
  peft_loop   torch: one (x[rows] @ Aᵀ) @ Bᵀ per adapter present, indexed rows (what PEFT's mixed batch does)
  vllm_style  torch: base GEMM, then tokens sorted by adapter, shrink into an fp32 buffer per segment, then expand
              added into the output per segment (vLLM's lora_shrink + lora_expand, in plain torch for shape parity)
Each is timed eager (`do_bench` median, L2 flushed) and, on a GPU, under a CUDA graph that calls it on 8 weight sets
in turn (bench/common.py). Output: bench/results/multi_lora.json, a Markdown table, multi_lora.png (if matplotlib).

    python bench/bench_multi_lora.py                 # GPU: the issue's grid; CPU: tiny sizes through the interpreter
    python bench/bench_multi_lora.py --grid targets  # only the shapes with targets
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU runs go through the interpreter
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import bench_us, format_table, have_gpu, interleaved_graph_ratios, write_json  # noqa: E402
from lora_fast.multi_lora import make_batch_metadata, multi_lora_linear  # noqa: E402

PROVIDERS = ("base", "ours", "gather_bmm", "peft_loop", "vllm_style")
WEIGHT_SETS = 8  # rotated under CUDA graphs so that the weights do not sit in L2
GRAPH_ROUNDS = 3  # interleaved rounds of the graph timings (common.interleaved_graph_ratios)
GATHER_BYTES_LIMIT = 2 << 30  # gather_bmm materialises A[ids] and B[ids]: skip it beyond this


def full_grid() -> list[dict]:
    rows = []
    for T in (1, 16, 64, 256, 1024, 4096):
        for n_ad in (1, 8, 32, 64):
            if n_ad > T:
                continue
            for r in (16, 64):
                for N in (4096, 14336):
                    rows.append(dict(T=T, adapters=n_ad, r=r, K=4096, N=N))
    return rows


def target_grid() -> list[dict]:
    """The issue's targets (K=N=4096, r=16) and BENCH.md's vLLM rows."""
    shapes = [(1, 1, 16, 4096), (16, 16, 16, 4096), (64, 64, 16, 4096), (256, 32, 16, 4096), (256, 32, 64, 4096),
              (1024, 32, 16, 4096), (4096, 32, 16, 4096), (64, 64, 16, 14336)]
    return [dict(T=T, adapters=a, r=r, K=4096, N=N) for T, a, r, N in shapes]


def tiny_grid() -> list[dict]:
    return [dict(T=T, adapters=a, r=r, K=64, N=64) for T, a, r in ((1, 1, 16), (16, 8, 16), (33, 32, 16))]


class Problem:
    """One shape: x, ids (each of `adapters` slots used by at least one token, mixed at random), and
    `sets` weight sets (W, b, A [S, R, K], B [S, N, R]) with S = adapters slots."""

    def __init__(self, T, adapters, r, K, N, dtype, device, sets=1, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.T, self.S, self.r, self.K, self.N = T, adapters, r, K, N
        self.x = torch.randn(T, K, generator=g).to(device, dtype)
        ids = torch.arange(T) % adapters
        self.ids = ids[torch.randperm(T, generator=g)].to(torch.int32).to(device)
        self.scalings = (torch.rand(adapters, generator=g) + 0.5).to(device)
        self.ranks = torch.full((adapters,), r, dtype=torch.int32, device=device)
        self.sets = []
        for _ in range(sets):
            W = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
            b = (torch.randn(N, generator=g) * 0.1).to(device, dtype)
            A = (torch.randn(adapters, r, K, generator=g) / K**0.5).to(device, dtype)
            B = (torch.randn(adapters, N, r, generator=g) / r**0.5).to(device, dtype)
            self.sets.append((W, b, A, B))
        self.meta = make_batch_metadata(self.ids, adapters)
        # Host-side batch layout, as PEFT and vLLM build it per batch (outside the timed region here).
        ids_host = self.ids.cpu()
        present = sorted(set(ids_host.tolist()))
        self.rows = [(a, (ids_host == a).nonzero()[:, 0].to(device)) for a in present]
        perm = torch.argsort(ids_host, stable=True)
        counts = torch.bincount(ids_host.long(), minlength=adapters).tolist()
        self.perm = perm.to(device)
        self.segments, start = [], 0
        for a in range(adapters):
            if counts[a]:
                self.segments.append((a, start, start + counts[a]))
                start += counts[a]

    def provider(self, name: str, s: int = 0):
        W, b, A, B = self.sets[s]
        x, ids, sc = self.x, self.ids, self.scalings
        if name == "base":
            return lambda: F.linear(x, W, b)
        if name == "ours":
            return lambda: multi_lora_linear(x, W, b, A, B, sc, self.meta, ranks=self.ranks)
        if name == "gather_bmm":
            def gather_bmm():
                xa = torch.bmm(x[:, None, :], A[ids].transpose(1, 2)) * sc[ids][:, None, None].to(x.dtype)
                return F.linear(x, W, b) + torch.bmm(xa, B[ids].transpose(1, 2))[:, 0]
            return gather_bmm
        if name == "peft_loop":
            def peft_loop():
                y = F.linear(x, W, b)
                for a, rows in self.rows:
                    y[rows] += (x[rows] @ A[a].T) @ B[a].T * sc[a]
                return y
            return peft_loop
        if name == "vllm_style":
            def vllm_style():
                y = F.linear(x, W, b)
                xs = x[self.perm]
                xa = torch.empty(self.T, self.r, device=x.device, dtype=torch.float32)  # shrink output buffer
                for a, lo, hi in self.segments:  # shrink
                    xa[lo:hi] = (xs[lo:hi] @ A[a].T).float() * sc[a]
                delta = torch.empty(self.T, self.N, device=x.device, dtype=x.dtype)
                for a, lo, hi in self.segments:  # expand
                    torch.mm(xa[lo:hi].to(x.dtype), B[a].T, out=delta[lo:hi])
                y.index_add_(0, self.perm, delta)
                return y
            return vllm_style
        raise KeyError(name)

    def gather_bytes(self) -> int:
        return self.T * self.r * (self.K + self.N) * self.x.element_size()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def bench_shape(shape: dict, dtype=torch.bfloat16, providers=PROVIDERS, graphs=None) -> list[dict]:
    """Time every provider on one shape; rows carry µs, the ratio to base and the error against peft_loop in fp32."""
    device = "cuda" if have_gpu() else "cpu"
    graphs = have_gpu() if graphs is None else graphs
    prob = Problem(**shape, dtype=dtype, device=device, sets=WEIGHT_SETS if graphs else 1)
    ref = Problem(**shape, dtype=torch.float32, device=device, sets=1).provider("peft_loop")()
    rows = []
    for name in providers:
        if name == "gather_bmm" and prob.gather_bytes() > GATHER_BYTES_LIMIT:
            rows.append({**shape, "provider": name, "skipped": "materialises > 2 GiB"})
            continue
        fn = prob.provider(name)
        row = {**shape, "provider": name, "err": relative_error(fn(), ref)}
        if have_gpu():
            row["eager_us"] = bench_us(fn)[0]
        else:
            import time

            t0 = time.perf_counter()
            fn()
            row["eager_us"] = (time.perf_counter() - t0) * 1e6
        rows.append(row)
    if graphs:
        # every provider's graph timed in GRAPH_ROUNDS interleaved rounds; the ratio is the median of the rounds'
        # ratios to the base in the same round (a 4096-token shape drifted 1.10-1.30x between single timings)
        timed = [row for row in rows if "err" in row]
        res = interleaved_graph_ratios({row["provider"]: [prob.provider(row["provider"], s)
                                                          for s in range(WEIGHT_SETS)] for row in timed},
                                       "base", rounds=GRAPH_ROUNDS)
        for row in timed:
            r = res[row["provider"]]
            row.update(graph_us=r["us"], graph_ratio=r["ratio"], graph_ratio_range=r["ratio_range"])
    base_eager = rows[0].get("eager_us")
    for row in rows:
        if row.get("eager_us") and base_eager:
            row["eager_ratio"] = row["eager_us"] / base_eager
    return rows


def plot(rows: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    key = "graph_ratio" if any("graph_ratio" in r for r in rows) else "eager_ratio"
    sel = [r for r in rows if r.get("r") == 16 and r.get("N") == 4096 and key in r] or [r for r in rows if key in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in PROVIDERS[1:]:
        pts = [r for r in sel if r["provider"] == name]
        if pts:
            ax.plot([f"{r['T']}/{r['adapters']}" for r in pts], [r[key] for r in pts], marker="o", label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel("tokens / distinct adapters (K=N=4096, r=16)")
    ax.set_ylabel(f"time / base F.linear ({key.split('_')[0]})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


TABLE_COLUMNS = ["T", "adapters", "r", "N", "provider", "eager_us", "graph_us", "graph_ratio", "err"]


def shape_key(row: dict) -> tuple:
    return row["T"], row["adapters"], row["r"], row["N"]


def merge_shards(paths: list[str], out_dir: str | None = None) -> str:
    """Merge `--shard` results of one grid into `multi_lora_<grid>.json` / `.md` / `.png` in `out_dir`: rows in
    grid order (each shard's providers in their order), every shard's environment kept, and the shapes of the
    grid that no shard measured listed as "missing"."""
    shards = [json.load(open(p)) for p in paths]
    grid_names = {s.get("grid") for s in shards}
    if len(grid_names) != 1:
        raise SystemExit(f"--merge takes shards of one grid, got {sorted(map(str, grid_names))}")
    grid_name = grid_names.pop()
    grid = {"full": full_grid, "targets": target_grid, "tiny": tiny_grid}[grid_name]()
    order = {shape_key(g): i for i, g in enumerate(grid)}
    last = {shape_key(r): i for i, s in enumerate(shards) for r in s["rows"]}  # a later measurement of a shape wins
    rows = sorted((r for i, s in enumerate(shards) for r in s["rows"] if last[shape_key(r)] == i),
                  key=lambda r: order.get(shape_key(r), len(order)))
    seen = {shape_key(r) for r in rows}
    missing = [g for g in grid if shape_key(g) not in seen]
    name = "multi_lora" + ("_cpu" if str(shards[0].get("env", {}).get("device", "cpu")).startswith("cpu") else "")
    out_dir = out_dir or os.path.dirname(os.path.abspath(paths[0]))
    path = os.path.join(out_dir, f"{name}_{grid_name}.json")
    envs = [s.get("env", {}) for s in shards]
    with open(path, "w") as f:
        json.dump({"env": envs[0], "shard_envs": envs, "grid": grid_name, "shards": [s.get("shard") for s in shards],
                   "weight_sets": shards[0].get("weight_sets"), "missing": missing, "rows": rows}, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(f"multi-LoRA, {grid_name} grid, merged from {len(shards)} shard(s): "
                + "; ".join(f"{s.get('shard')} on {e.get('device')} ({e.get('date')})" for s, e in zip(shards, envs))
                + f". µs per call, eager and under CUDA graphs over {shards[0].get('weight_sets')} weight sets; "
                "graph_ratio = graph time / the base linear's graph time.\n\n")
        if missing:
            f.write("Not measured (the shard's run was cut short): "
                    + ", ".join(f"T={g['T']}/{g['adapters']} adapters r={g['r']} N={g['N']}" for g in missing)
                    + "\n\n")
        f.write(format_table(rows, TABLE_COLUMNS) + "\n")
    plot(rows, os.path.splitext(path)[0] + ".png")
    return path


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=("full", "targets", "tiny"), default=None)
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="run every N-th shape of the grid starting at the I-th (1-based), to split the full grid "
                         "over several GPU calls; results go to <name>_<grid>_<I>of<N>")
    ap.add_argument("--missing", default=None, metavar="JSON",
                    help="run only the shapes that a merged JSON (--merge's output) lists as missing; results go to "
                         "<name>_<grid>_missing, to merge with the shards")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge the JSON files of --shard runs into one table (no benchmark is run); where two "
                         "files measured one shape, the later file's rows are kept")
    ap.add_argument("--tokens", default=None, metavar="T[,T...]",
                    help="run only the grid's shapes with these token counts (to re-measure them after a change); "
                         "results go to <name>_<grid>_T<T...>, to merge after the shards they replace")
    args = ap.parse_args(argv)
    if args.merge:
        path = merge_shards(args.merge, args.out)
        print(f"wrote {path}")
        return json.load(open(path))["rows"]
    grid_name = args.grid or ("full" if have_gpu() else "tiny")
    grid = {"full": full_grid, "targets": target_grid, "tiny": tiny_grid}[grid_name]()
    name = "multi_lora" if have_gpu() else "multi_lora_cpu"
    meta = {"grid": grid_name, "weight_sets": WEIGHT_SETS}
    if args.shard:
        try:
            i, n = (int(v) for v in args.shard.split("/"))
            assert 1 <= i <= n
        except (ValueError, AssertionError):
            raise SystemExit(f"--shard must be I/N with 1 <= I <= N, got {args.shard!r}")
        grid = grid[i - 1::n]
        name, meta["shard"] = f"{name}_{grid_name}_{i}of{n}", args.shard
    if args.tokens:
        wanted_t = {int(t) for t in args.tokens.split(",")}
        grid = [g for g in grid if g["T"] in wanted_t]
        name, meta["shard"] = f"{name}_{grid_name}_T{'_'.join(map(str, sorted(wanted_t)))}", f"T in {sorted(wanted_t)}"
    if args.missing:
        merged = json.load(open(args.missing))
        if merged.get("grid") != grid_name:
            raise SystemExit(f"--missing {args.missing} is of the {merged.get('grid')!r} grid, not {grid_name!r}")
        wanted = {shape_key(g) for g in merged.get("missing", [])}
        grid = [g for g in grid if shape_key(g) in wanted]
        name, meta["shard"] = f"{name}_{grid_name}_missing", "missing"
        print(f"{len(grid)} missing shape(s) of {args.missing}")
    if not have_gpu():
        print("No GPU: tiny sizes through the Triton interpreter; the times below are not performance figures.")
    rows = []
    path = write_json(name, rows, meta, out_dir=args.out)
    for shape in grid:
        rows += bench_shape(shape, graphs=have_gpu() and not args.no_graphs)
        print(format_table(rows[-len(PROVIDERS):], TABLE_COLUMNS), flush=True)
        path = write_json(name, rows, meta, out_dir=args.out)  # after every shape: a cut-short run keeps its rows
    table = os.path.splitext(path)[0] + ".md"  # the whole table, with the run it came from
    env = json.load(open(path))["env"]
    with open(table, "w") as f:
        f.write(f"{name} ({grid_name} grid; {env.get('device')}, torch {env.get('torch')}, triton "
                f"{env.get('triton')}, {env.get('date')}): µs per call, eager and under CUDA graphs over "
                f"{WEIGHT_SETS} weight sets; graph_ratio = graph time / the base linear's graph time (since "
                f"2026-12-01's twelfth session: the median over {GRAPH_ROUNDS} interleaved rounds of the ratio "
                f"within a round; graph_us the median time; the JSON has each ratio's range)\n\n")
        f.write(format_table(rows, TABLE_COLUMNS) + "\n")
    png = plot(rows, os.path.splitext(path)[0] + ".png")
    print(f"wrote {path}, {table}" + (f" and {png}" if png else ""))
    return rows


if __name__ == "__main__":
    main()
