"""GPU check of lora-fast inside training and serving stacks (issue 5): torch.compile, CUDA graphs, autocast,
activation checkpointing, and the compiled training step's time against eager.

    PYTHONPATH=$PWD python3 bench/gpu_compile.py --out $OUT        # one H100, <= 120 s including compiles
    PYTHONPATH=$PWD python3 bench/gpu_compile.py --out $OUT --only checkpointing,opcheck_cuda   # some cases
    python bench/gpu_compile.py --dry                              # CPU: imports and arguments only

Checks (each case in its own try/except; failures are recorded in the JSON and the exit status is 1):
- opcheck of every `lora_fast::` op on CUDA tensors;
- a Llama-style MLP block of LoRALinear layers, torch.compile(fullgraph=True) vs eager: output and every LoRA
  gradient (dropout 0), then the training step's time (forward + backward), eager and compiled, as ratios to the
  same block of plain frozen nn.Linear layers (F.linear) timed in the same run; dropout 0 and 0.1;
- MultiLoRALinear inference compiled (fullgraph) vs eager, and timed against the base F.linear;
- CUDA graph of a decode step of the serving demo's model (examples/serve_multi_lora.py, multi-adapter, fixed-size
  metadata buffers), replayed with new tokens and a new adapter mix (metadata refilled outside the graph, and
  refilled inside it with validate=False) against eager; CUDA graph of a LoRALinear decode (M = 1 and 16);
- autocast bf16 with fp32 parameters (output dtype, gradient dtypes, values against an fp64 reference) and fp32
  adapters on a bf16 base (values, gradient dtypes, and forward peak memory against an all-bf16 layer: no
  full-activation fp32 copy);
- torch.utils.checkpoint, re-entrant and not, dropout 0.1, under autocast too: gradients bit-equal to no checkpoint;
  and under torch.compile (checkpoint inside the compiled region and around a compiled module): the same mask;
- the host time of an eager call through the op's dispatcher against the direct autograd.Function that eager uses;
- torch.compile(mode="reduce-overhead"): a LoRALinear decode, a QLoRA decode at one row, and a training step
  without and with dropout,
  against eager (the dropout seed drawn on the GPU inside the graph: fresh masks per replay, the backward's the
  forward's); torch.cuda.graph around an eager training step with dropout, the same.
Writes OUT/gpu_compile.json and prints a table last.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import (  # noqa: E402
    bench_us, format_table, host_and_wall_us, peak_forward_bytes, rel_err, write_json,
)
from lora_fast import LoRALinear, ops  # noqa: E402
from lora_fast.multi_lora import AdapterPool, MultiLoRALinear, make_batch_metadata  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
ROWS: list[dict] = []
T0 = time.perf_counter()


def record(check: str, passed: bool | None, **info) -> None:
    """One check's row; passed None = skipped (not run for lack of time)."""
    ROWS.append({"case": check, "passed": None if passed is None else bool(passed), **info})


BUDGET_S = 105  # start no new case after this: the whole script must stay within 120 s


def case(fn):
    """Run one check; an exception is a recorded failure, not the end of the script."""
    t = time.perf_counter()
    if t - T0 > BUDGET_S:
        record(fn.__name__, None, error=f"skipped: {t - T0:.0f} s spent, over the {BUDGET_S} s budget")
        return
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every failure is reported
        record(fn.__name__, False, error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-2000:])
    print(f"[{time.perf_counter() - T0:6.1f}s] {fn.__name__} ({time.perf_counter() - t:.1f}s)", flush=True)


def time_ratio(name, fns: dict, base: str = "base", **info) -> None:
    """Median times of `fns` (name -> callable) and their ratios to fns[base], one row per provider."""
    us = {k: bench_us(f) for k, f in fns.items()}
    for k, (med, p20, p80) in us.items():
        ROWS.append({"case": name, "provider": k, "us": med, "us_p20": p20, "us_p80": p80,
                     "ratio_to_base": med / us[base][0], **info})


# ----------------------------------------------------------------------------------------------- opcheck


def opcheck_cuda():
    g = dict(device=DEV, dtype=BF16)
    M, K, N, r = 70, 200, 136, 16
    x, W, b = torch.randn(M, K, **g), torch.randn(N, K, **g) / K**0.5, torch.randn(N, **g)
    A, B = torch.randn(r, K, **g) / K**0.5, torch.randn(N, r, **g)
    seed = torch.tensor([99], dtype=torch.int64, device=DEV)
    dy, xa, dyb = torch.randn(M, N, **g), torch.randn(M, r, **g), torch.randn(M, r, **g)
    xg, Ag, Bg = (t.clone().requires_grad_(True) for t in (x, A, B))
    lf = torch.ops.lora_fast
    cases = {
        "lora_forward": (lf.lora_forward.default, (x, W, b, A, B, 2.0, 0.0, None, False)),
        "lora_forward_grad_dropout": (lf.lora_forward.default, (xg, W, None, Ag, Bg, 2.0, 0.1, seed, True)),
        "lora_backward_dx": (lf.lora_backward_dx.default, (dy, W, A, B, 2.0, 0.1, seed, True)),
        "lora_shrink": (lf.lora_shrink.default, (x, A, 0.1, seed)),
        "lora_grad_ab": (lf.lora_grad_ab.default, (x, dy, xa, dyb, 2.0, BF16, BF16, 0.1, seed, True, True)),
        "lora_backward": (lf.lora_backward.default, (dy, x, W, A, B, xa, 2.0, 0.1, seed, True, True, True)),
        "lora_backward_large_dropout": (lf.lora_backward.default,
                                        (torch.randn(300, N, **g), torch.randn(300, K, **g), W, A, B,
                                         torch.randn(300, r, **g), 2.0, 0.1, seed, True, True, True)),
    }
    pool, meta, multi = _pool_layer(T=40, K=K, N=N, S=4, R=16)
    A_s, B_s, sizes = pool.layer_stacks(multi.key)
    xm = torch.randn(40, K, **g, requires_grad=True)
    cases["multi_lora_forward"] = (lf.multi_lora_forward.default,
                                   (xm, multi.weight, multi.bias, A_s, B_s, pool.scalings, pool.ranks,
                                    meta.adapter_ids, meta.perm, meta.seg_of, meta.seg_start, meta.seg_adapter,
                                    list(sizes)))
    cases["draw_seed"] = (lf.draw_seed.default, (torch.empty(0, dtype=torch.int64, device=DEV),))
    for name, (op, args) in cases.items():
        try:
            torch.library.opcheck(op, args, atol=2e-2, rtol=2e-2)
            record(f"opcheck {name}", True)
        except Exception as e:  # noqa: BLE001
            record(f"opcheck {name}", False, error=str(e)[:500])


# ----------------------------------------------------------------------------------------------- training block


class MLPBlock(nn.Module):
    """Llama's MLP with a residual: down(silu(gate(x)) * up(x)) + x; every projection a LoRALinear (or frozen
    nn.Linear for the base)."""

    def __init__(self, dim, hidden, rank, dropout, lora=True):
        super().__init__()
        make = ((lambda i, o: LoRALinear(i, o, rank=rank, alpha=2 * rank, dropout=dropout, bias=False, device=DEV,
                                         dtype=BF16))
                if lora else (lambda i, o: nn.Linear(i, o, bias=False, device=DEV, dtype=BF16).requires_grad_(False)))
        self.gate, self.up, self.down = make(dim, hidden), make(dim, hidden), make(hidden, dim)
        if lora:
            for layer in (self.gate, self.up, self.down):
                nn.init.normal_(layer.lora_B, std=0.02)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x)) + x


def _train_step(model, x, g, mark_step=False):
    def step():
        if mark_step:  # a training loop under mode="reduce-overhead" marks each step
            torch.compiler.cudagraph_mark_step_begin()
        x.grad = None
        for p in model.parameters():
            p.grad = None
        model(x).backward(g)
    return step


def training_block(M=4096, dim=4096, hidden=4096, rank=16):
    torch.manual_seed(0)
    x = torch.randn(M, dim, device=DEV, dtype=BF16, requires_grad=True)
    g = torch.randn(M, dim, device=DEV, dtype=BF16)
    base = MLPBlock(dim, hidden, rank, 0.0, lora=False)
    base_c = torch.compile(base, fullgraph=True)
    for p_drop in (0.0, 0.1):
        lora = MLPBlock(dim, hidden, rank, p_drop)
        with torch.no_grad():
            for lb, ll in zip((base.gate, base.up, base.down), (lora.gate, lora.up, lora.down)):
                lb.weight.copy_(ll.weight)
        compiled = torch.compile(lora, fullgraph=True)
        if p_drop == 0.0:  # compiled vs eager: output and every gradient (same kernels, inductor around them)
            outs = {}
            for name, fn in (("eager", lora), ("compiled", compiled)):
                x.grad = None
                for p in lora.parameters():
                    p.grad = None
                y = fn(x)
                y.backward(g)
                outs[name] = [y.detach(), x.grad] + [p.grad.clone() for p in lora.parameters() if p.requires_grad]
            errs = [rel_err(c, e) for c, e in zip(outs["compiled"], outs["eager"])]
            record("compiled training block == eager (y, dx, dA/dB of 3 layers)", max(errs) <= 2e-2,
                   rel_err_max=max(errs), rel_errs=errs)
        else:  # dropout: compiled steps draw fresh masks (their outputs differ from each other)
            y1, y2 = compiled(x).detach(), compiled(x).detach()  # the training graph (grad mode on), no new compile
            with torch.no_grad():
                lora.eval()
                y0 = lora(x)
                lora.train()
            record("compiled dropout: fresh mask per step", not torch.equal(y1, y2) and rel_err(y1, y0) > 1e-4,
                   step_diff=rel_err(y1, y2))
        steps = {"base": _train_step(base, x, g), "base_compiled": _train_step(base_c, x, g),
                 "eager": _train_step(lora, x, g), "compiled": _train_step(compiled, x, g)}
        # inductor's CUDA graphs (no host time per launch); with dropout the seed is drawn inside the graph
        try:
            ro = torch.compile(lora, mode="reduce-overhead", fullgraph=True)
            ro_step = _train_step(ro, x, g, mark_step=True)
            ro_step()
            ro_step()
            steps["compiled_reduce_overhead"] = ro_step
        except Exception as e:  # noqa: BLE001 - the timing row is simply missing; the error is recorded
            record(f"train step reduce-overhead p={p_drop}", False, error=f"{type(e).__name__}: {str(e)[:300]}")
        time_ratio(f"train step MLP M={M} d={dim} h={hidden} r={rank} p={p_drop}", steps, p=p_drop)
        if p_drop == 0.0 and time.perf_counter() - T0 > 45:  # leave the other cases their share of the 120 s
            record("training block dropout 0.1 (check and timing)", None, error="skipped: time budget")
            break


# ----------------------------------------------------------------------------------------------- multi-adapter


def _pool_layer(T, K, N, S, R, slices=None):
    torch.manual_seed(1)
    pool = AdapterPool(S, R, device=DEV, dtype=BF16)
    sizes = slices or (N,)
    multi = MultiLoRALinear(nn.Linear(K, N, device=DEV, dtype=BF16).requires_grad_(False), pool, key="proj",
                            slice_sizes=sizes)
    for a in range(S):
        r = (R, R // 2, 1)[a % 3] or 1
        pairs = [(torch.randn(r, K, device=DEV, dtype=BF16) / K**0.5, torch.randn(n, r, device=DEV, dtype=BF16))
                 for n in sizes]
        pool.load(f"a{a}", {"proj": pairs if len(pairs) > 1 else pairs[0]}, alpha=2 * r)
    ids = (torch.arange(T, device=DEV) * 7 % (S + 1) - 1).to(torch.int32)
    return pool, make_batch_metadata(ids, pool), multi


def multi_inference(T=256, K=4096, N=4096, S=16, R=16):
    pool, meta, multi = _pool_layer(T, K, N, S, R)
    x = torch.randn(T, K, device=DEV, dtype=BF16)
    compiled = torch.compile(multi, fullgraph=True)
    with torch.inference_mode():
        y_e, y_c = multi(x, meta), compiled(x, meta)
        meta.update_((torch.arange(T, device=DEV) * 3 % (S + 1) - 1).to(torch.int32))
        y_e2, y_c2 = multi(x, meta), compiled(x, meta)
    errs = [rel_err(y_c, y_e), rel_err(y_c2, y_e2)]
    record("compiled MultiLoRALinear == eager (two adapter mixes)", max(errs) <= 1e-3, rel_errs=errs)
    with torch.inference_mode():
        time_ratio(f"multi-LoRA inference T={T} S={S} r={R} K=N={K}",
                   {"base": lambda: F.linear(x, multi.weight, multi.bias), "eager": lambda: multi(x, meta),
                    "compiled": lambda: compiled(x, meta)})


# ----------------------------------------------------------------------------------------------- CUDA graphs


def _graph(fn):
    """Capture fn() (warmed up on a side stream) and return (graph, its static output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def demo_decode_graph(batch=16, dim=1024, layers=2, n_ad=4, max_len=16):
    import examples.serve_multi_lora as demo

    torch.manual_seed(0)
    heads = max(4, dim // 128)
    pool = AdapterPool(n_ad, 64, device=DEV, dtype=BF16)
    model = demo.TinyLlama(512, dim, layers, heads, heads // 2, int(dim * 2.75) // 16 * 16, pool, DEV, BF16)
    for a in range(n_ad):
        r = (8, 16, 64)[a % 3]
        w = {}
        for blk in model.blocks:
            for layer in (blk.qkv, blk.o, blk.gate_up, blk.down):
                pairs = [(torch.randn(r, layer.in_features, device=DEV, dtype=BF16) / layer.in_features**0.5,
                          torch.randn(n, r, device=DEV, dtype=BF16) * 0.5 / r**0.5) for n in layer.slice_sizes]
                w[layer.key] = pairs if len(pairs) > 1 else pairs[0]
        pool.load(f"t{a}", w, alpha=2 * r)
    caches = [(torch.randn(batch, blk.kv_heads, max_len, blk.hd, device=DEV, dtype=BF16) * 0.3,
               torch.randn(batch, blk.kv_heads, max_len, blk.hd, device=DEV, dtype=BF16) * 0.3)
              for blk in model.blocks]
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=DEV)
    pos = torch.zeros(1, dtype=torch.long, device=DEV)
    ids_buf = torch.zeros(batch, dtype=torch.int32, device=DEV)
    meta = make_batch_metadata(ids_buf, pool)

    def step(update_inside):
        if update_inside:
            meta.update_(ids_buf, validate=False)
        return model(tokens, lambda layer, h: layer(h, meta), caches, pos)

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(0, 512, (batch, 1), generator=g), torch.tensor([(5 + seed) % max_len]),
                (torch.randint(-1, n_ad, (batch,), generator=g)).to(torch.int32))

    saved = [(k.clone(), v.clone()) for k, v in caches]

    def restore():
        for (k, v), (k0, v0) in zip(caches, saved):
            k.copy_(k0)
            v.copy_(v0)

    with torch.inference_mode():
        for update_inside in (False, True):
            t, p, ids = inputs(1)
            tokens.copy_(t)
            pos.copy_(p)
            ids_buf.copy_(ids)
            meta.update_(ids_buf)
            graph, out = _graph(lambda: step(update_inside))
            errs = []
            for seed in (2, 3):  # new tokens, position and adapter mix each replay
                t, p, ids = inputs(seed)
                restore()
                tokens.copy_(t)
                pos.copy_(p)
                ids_buf.copy_(ids)
                if not update_inside:
                    meta.update_(ids_buf)  # validated, outside the graph
                graph.replay()
                got = out.clone()
                restore()
                meta.update_(ids_buf)
                errs.append(rel_err(got, step(False)))
            record(f"CUDA graph demo decode replay == eager (metadata refilled {'inside' if update_inside else 'outside'})",
                   max(errs) <= 1e-3, rel_errs=errs, batch=batch, dim=dim, layers=layers)


def lora_linear_decode_graph(K=4096, N=4096, r=16):
    layer = LoRALinear(K, N, rank=r, alpha=32, device=DEV, dtype=BF16).eval()
    nn.init.normal_(layer.lora_B, std=0.1)
    for M in (1, 16):
        x = torch.randn(M, K, device=DEV, dtype=BF16)
        with torch.inference_mode():
            graph, out = _graph(lambda: layer(x))
            errs = []
            for _ in range(2):
                x.copy_(torch.randn(M, K, device=DEV, dtype=BF16))
                graph.replay()
                errs.append(rel_err(out, layer(x)))
        record(f"CUDA graph LoRALinear decode M={M} replay == eager", max(errs) <= 1e-3, rel_errs=errs)


def _identity_layer(K, p):
    """LoRALinear with K = N = r, W = 0, A = B = I, scaling 1 (fp32): y = drop(x) shows the mask, and the backward
    must give dx = g * keep / (1 - p) with that same mask."""
    layer = LoRALinear(K, K, rank=K, alpha=K, dropout=p, bias=False, device=DEV, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.zero_()
        layer.lora_A.copy_(torch.eye(K))
        layer.lora_B.copy_(torch.eye(K))
    return layer


def _mask_step(fn, M, K, p, before=None):
    """One training step of an identity layer (`_identity_layer`) on a fresh x: (keep mask [M, K] read off y, the
    worst of rel_err(y, x * keep / (1 - p)) and rel_err(dx, g * keep / (1 - p)), kept fraction)."""
    x = (torch.rand(M, K, device=DEV) + 0.5).requires_grad_(True)
    g = torch.randn(M, K, device=DEV)
    if before is not None:
        before()
    layer = getattr(fn, "_orig_mod", fn)
    layer.lora_A.grad = layer.lora_B.grad = None  # no accumulation into the last step's CUDA-graph outputs
    out = fn(x)
    y = out.detach().clone()  # a CUDA-graph output is valid until the next replay: keep copies
    out.backward(g)
    dx = x.grad.clone()
    keep = y != 0
    err = max(rel_err(y, x.detach() * keep / (1 - p)), rel_err(dx, g * keep / (1 - p)))
    return keep, err, keep.float().mean().item()


def _record_masks(name, steps, p):
    """One record: every step's backward used its forward's mask, the kept fraction is 1 - p, and no two steps
    drew the same mask."""
    masks, errs, rates = zip(*steps)
    fresh = all(not torch.equal(masks[i], masks[j]) for i in range(len(masks)) for j in range(i))
    record(name, max(errs) <= 1e-5 and all(abs(r - (1 - p)) < 0.02 for r in rates) and fresh,
           rel_errs=list(errs), kept=list(rates), fresh_masks=fresh)


def _decode_matches_eager(name, layer, M, K, replays=4):
    """`layer` (eval, lora_B drawn at random) under torch.compile(mode="reduce-overhead") against eager, with new
    [M, K] inputs each replay."""
    nn.init.normal_(layer.lora_B, std=0.1)
    layer.eval()
    fwd = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    errs = []
    with torch.no_grad():
        for _ in range(replays):
            x = torch.randn(M, K, device=DEV, dtype=BF16)
            errs.append(rel_err(fwd(x).clone(), layer(x)))
    record(name, max(errs) <= 1e-3, rel_errs=errs)


def reduce_overhead(K=4096, N=4096, r=16, M=16):
    """torch.compile(mode="reduce-overhead") (inductor's own CUDA graphs): a LoRALinear decode replayed with new
    inputs equals eager; a training step without dropout equals eager; a training step with dropout (the seed drawn
    on the GPU inside the graph, read by the kernels through a pointer) draws a fresh mask on every replay, its
    backward uses the forward's mask, and it equals an eager step given the seed the CUDA generator draws there.
    And a torch.cuda.graph capture of an eager training step with dropout: fresh masks per replay as well."""
    from lora_fast.functional import LoRALinearFunction
    from lora_fast.qlora import LoRALinear4bit

    layer = LoRALinear(K, N, rank=r, alpha=32, dropout=0.1, device=DEV, dtype=BF16)
    _decode_matches_eager(f"reduce-overhead LoRALinear decode M={M} == eager", layer, M, K)
    # QLoRA decode at one row, its first call inside the compiled region: the device tensors our kernels cache
    # (the NF4 code table, the GEMV's split counters) must stay outside the graph trees' pool
    qlayer = LoRALinear4bit.from_linear(nn.Linear(K, N, device=DEV, dtype=BF16), rank=r, alpha=32)
    _decode_matches_eager("reduce-overhead QLoRA decode M=1 == eager", qlayer, 1, K)
    from torch._dynamo.utils import counters  # inductor counts the graphs it would not CUDA-graph

    for p in (0.0, 0.1):
        torch._dynamo.reset()
        counters.clear()
        layer.dropout = p
        layer.train()
        x = torch.randn(256, K, device=DEV, dtype=BF16, requires_grad=True)
        try:
            train = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
            outs, grads = [], []
            for step in range(4):  # warm-up, recording, then replays
                # x.grad too: accumulating into the last step's dx (a CUDA-graph output) is not allowed
                layer.lora_A.grad = layer.lora_B.grad = x.grad = None
                torch.manual_seed(11 + step)
                torch.compiler.cudagraph_mark_step_begin()  # a training loop under reduce-overhead marks steps
                y = train(x)
                y.float().square().mean().backward()
                outs.append(y.detach().clone())
                grads.append(layer.lora_A.grad.clone())
        except Exception as e:  # noqa: BLE001 - one record per setting
            record(f"reduce-overhead training step p={p}", False, error=f"{type(e).__name__}: {str(e)[:300]}")
            continue
        # the eager step with the seed that the compiled step drew: the CUDA generator's first draw after
        # torch.manual_seed(11 + step) (with p = 0 no seed)
        ref_y, ref_g = [], []
        for step in range(4):
            A = layer.lora_A.detach().requires_grad_(True)
            torch.manual_seed(11 + step)
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEV) if p else 0
            y = LoRALinearFunction.apply(x.detach(), layer.weight, layer.bias, A, layer.lora_B.detach(),
                                         layer.scaling, p, seed)
            y.float().square().mean().backward()
            ref_y.append(y.detach())
            ref_g.append(A.grad)
        ey = max(rel_err(a, b) for a, b in zip(outs, ref_y))
        eg = max(rel_err(a, b) for a, b in zip(grads, ref_g))
        fresh = p == 0.0 or all(not torch.equal(outs[i], outs[i - 1]) for i in range(1, 4))
        record(f"reduce-overhead training step p={p}: equals eager" + (", fresh masks" if p else ""),
               ey <= 1e-3 and eg <= 2e-2 and fresh, rel_err_y=ey, rel_err_dA=eg,
               cudagraph_skips=counters["inductor"].get("cudagraph_skips", 0))
    # the identity layer: each replay's y shows its mask, and its dx must use the same one
    K2, M2, p2 = 64, 512, 0.25
    ident = _identity_layer(K2, p2)
    train = torch.compile(ident, mode="reduce-overhead", fullgraph=True)
    _record_masks(f"reduce-overhead identity layer p={p2}: backward uses each replay's fresh mask",
                  [_mask_step(train, M2, K2, p2, torch.compiler.cudagraph_mark_step_begin) for _ in range(4)], p2)
    # torch.cuda.graph around an eager step: the seed is drawn on the GPU while capturing (functional.draw_seed)
    x = (torch.rand(M2, K2, device=DEV) + 0.5).requires_grad_(True)
    g = torch.randn(M2, K2, device=DEV)

    def step():
        x.grad = None
        y = ident(x)
        y.backward(g)
        return y

    graph, y_static = _graph(step)
    steps = []
    for _ in range(3):
        x.data.copy_(torch.rand(M2, K2, device=DEV) + 0.5)
        graph.replay()
        keep = y_static != 0
        err = max(rel_err(y_static, x.detach() * keep / (1 - p2)), rel_err(x.grad, g * keep / (1 - p2)))
        steps.append((keep.clone(), err, keep.float().mean().item()))
    _record_masks(f"torch.cuda.graph eager training step p={p2}: fresh mask per replay, backward uses it", steps, p2)


# ----------------------------------------------------------------------------------------------- autocast


def _ref_grads(x, W, A, B, s, g):
    leaves = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
    y = F.linear(leaves[0], W.double()) + s * (leaves[0] @ leaves[1].T) @ leaves[2].T
    return [y, *torch.autograd.grad(y, leaves, g.double())]


def autocast_fp32_params(M=2048, K=2048, N=2048, r=16):
    layer = LoRALinear(K, N, rank=r, alpha=32, bias=False, device=DEV, dtype=torch.float32)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(M, K, device=DEV, requires_grad=True)
    g = torch.randn(M, N, device=DEV, dtype=BF16)
    with torch.autocast(DEV, dtype=BF16):
        y = layer(x)
    y.backward(g)
    ref = _ref_grads(x.to(BF16), layer.weight.to(BF16), layer.lora_A.to(BF16), layer.lora_B.to(BF16),
                     layer.scaling, g)
    errs = [rel_err(o, rf) for o, rf in zip((y, x.grad, layer.lora_A.grad, layer.lora_B.grad), ref)]
    dtypes_ok = y.dtype == BF16 and x.grad.dtype == layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    record("autocast bf16, fp32 params (y bf16, grads fp32, values)", dtypes_ok and max(errs) <= 2e-2, rel_errs=errs)


def mixed_adapters(M=4096, K=4096, N=4096, r=16):
    layer = LoRALinear(K, N, rank=r, alpha=32, bias=False, device=DEV, dtype=BF16)
    nn.init.normal_(layer.lora_B, std=0.1)
    same = LoRALinear(K, N, rank=r, alpha=32, bias=False, device=DEV, dtype=BF16)
    layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
    x = torch.randn(M, K, device=DEV, dtype=BF16, requires_grad=True)
    g = torch.randn(M, N, device=DEV, dtype=BF16)
    y = layer(x)
    y.backward(g)
    ref = _ref_grads(x, layer.weight, layer.lora_A.to(BF16), layer.lora_B.to(BF16), layer.scaling, g)
    errs = [rel_err(o, rf) for o, rf in zip((y, x.grad, layer.lora_A.grad, layer.lora_B.grad), ref)]
    dtypes_ok = y.dtype == BF16 and layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    mem_mixed = peak_forward_bytes(lambda: layer(x))
    mem_bf16 = peak_forward_bytes(lambda: same(x))
    # An fp32 copy of x would add M*K*4 bytes (64 MB here); the adapter casts add (r*K + N*r)*2 bytes.
    no_copy = mem_mixed - mem_bf16 < M * K * 2
    record("fp32 adapters on a bf16 base (values, grads fp32, no fp32 activation copy)",
           dtypes_ok and max(errs) <= 2e-2 and no_copy, rel_errs=errs, mem_fwd_mixed=mem_mixed, mem_fwd_bf16=mem_bf16)


# ----------------------------------------------------------------------------------------------- checkpoint


def checkpointing(M=2048, dim=2048, r=16):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(dim, dim, rank=r, dropout=0.1, device=DEV, dtype=torch.float32), nn.GELU(),
                          LoRALinear(dim, dim, rank=r, dropout=0.1, device=DEV, dtype=torch.float32))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B, std=0.1)
    x0, g = torch.randn(M, dim, device=DEV), torch.randn(M, dim, device=DEV)

    def run(mode, autocast):
        for p in model.parameters():
            p.grad = None
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(7)
        with torch.autocast(DEV, dtype=BF16, enabled=autocast):
            y = model(x) if mode is None else checkpoint(model, x, use_reentrant=mode == "reentrant")
        y.backward(g.to(y.dtype))
        return [y.detach(), x.grad] + [p.grad for p in model.parameters() if p.requires_grad]

    for autocast in (False, True):
        plain = run(None, autocast)
        for mode in ("reentrant", "non_reentrant"):
            got = run(mode, autocast)
            equal = all(torch.equal(a, b) for a, b in zip(got, plain))
            record(f"checkpoint {mode}{' + autocast' if autocast else ''}: grads equal, dropout 0.1", equal,
                   max_rel=max(rel_err(a, b) for a, b in zip(got, plain)))


def host_overhead(K=4096, N=4096, r=16, M=16, calls=300):
    """Host time per eager call (no sync inside the loop, launch-bound size): the direct autograd.Function path
    that eager uses against the same call through the `lora_fast::lora_forward` op's dispatcher and autograd."""
    layer = LoRALinear(K, N, rank=r, alpha=32, device=DEV, dtype=BF16)
    x = torch.randn(M, K, device=DEV, dtype=BF16)
    paths = {"eager (autograd.Function)": lambda: layer(x),
             "op dispatch (lora_fast::lora_forward)": lambda: ops.lora_linear_op(
                 x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, 0.0)}
    us = {}
    for name, fn in paths.items():
        us[name] = host_and_wall_us(fn, calls, warmup=20)[0]
    # A measurement, not a check: it says whether eager could go through the op (< 5 us more) or, as it does,
    # must keep the direct Function (the CPU here measured ~35 us more through the op).
    base = us["eager (autograd.Function)"]
    for name, v in us.items():
        ROWS.append({"case": f"host us per training-forward call, M={M} (no sync)", "provider": name, "us": v,
                     "ratio_to_base": v / base, "extra_us": v - base})


def checkpoint_compiled(M=512, K=64, p=0.5):
    """Checkpoint inside a compiled region (inductor saves and restores the CUDA generator around the seed op) and
    around a compiled module: `_identity_layer`, so y = drop(x) shows the mask and the backward must give
    dx = g * keep / (1 - p) with that same mask."""
    from torch.utils.checkpoint import checkpoint

    layer = _identity_layer(K, p)
    compiled = torch.compile(layer, fullgraph=True)
    variants = {"compile(checkpoint)": torch.compile(lambda t: checkpoint(layer, t, use_reentrant=False),
                                                     fullgraph=True),
                "checkpoint(compiled) non_reentrant": lambda t: checkpoint(compiled, t, use_reentrant=False),
                "checkpoint(compiled) reentrant": lambda t: checkpoint(compiled, t, use_reentrant=True)}
    for name, fn in variants.items():
        x = (torch.rand(M, K, device=DEV) + 0.5).requires_grad_(True)
        layer.lora_A.grad = None
        y = fn(x)
        keep = y.detach() != 0
        g = torch.randn(M, K, device=DEV)
        y.backward(g)
        err = rel_err(x.grad, g * keep / (1 - p))
        record(f"{name}: backward uses the forward's dropout mask", err <= 1e-5 and 0 < int(keep.sum()) < keep.numel(),
               rel_err_dx=err)


def variants_compiled(M=4096, K=4096, N=4096):
    """DoRA, VeRA and QLoRA layers (bf16) under torch.compile(fullgraph=True, inductor): one graph each, a training
    step's output and gradients against eager's, and fwd+bwd times of both (the traced DoRA saves z for dm; QLoRA
    runs the `lora_fast::qlora_forward` op)."""
    import torch._dynamo.testing

    from lora_fast.dora import DoRALinear
    from lora_fast.qlora import LoRALinear4bit
    from lora_fast.vera import VeRALinear

    torch.manual_seed(0)
    layers = {"dora": DoRALinear(K, N, rank=16, alpha=32, device=DEV, dtype=BF16),
              "vera": VeRALinear.from_linear(nn.Linear(K, N, device=DEV, dtype=BF16), rank=256),
              "qlora": LoRALinear4bit.from_linear(nn.Linear(K, N, device=DEV, dtype=BF16), rank=16, alpha=32)}
    with torch.no_grad():
        nn.init.normal_(layers["dora"].lora_B, std=0.1)
        layers["vera"].vera_lambda_b.normal_(std=0.1)
        nn.init.normal_(layers["qlora"].lora_B, std=0.1)
    x = torch.randn(M, K, device=DEV, dtype=BF16, requires_grad=True)
    g = torch.randn(M, N, device=DEV, dtype=BF16)
    for name, layer in layers.items():
        params = [p for p in layer.parameters() if p.requires_grad]
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        compiled = torch.compile(layer, backend=counter, fullgraph=True)
        out = {}
        for kind, fn in (("eager", layer), ("compiled", compiled)):
            y = fn(x)
            out[kind] = [y, *torch.autograd.grad(y, [x, *params], g)]
        errs = [rel_err(c, e) for c, e in zip(out["compiled"], out["eager"])]
        record(f"{name} compiled fullgraph (one graph; y and grads vs eager)",
               counter.frame_count == 1 and max(errs) <= 2e-2, frames=counter.frame_count, rel_errs=errs)
        weight = layer.weight if name != "qlora" else layer.weight4.dequantize(BF16)
        time_ratio(f"{name} fwd+bwd {M}x{K}x{N}",
                   {"base": lambda: torch.autograd.grad(F.linear(x, weight), x, g),
                    "eager": lambda: torch.autograd.grad(layer(x), [x, *params], g),
                    "compiled": lambda: torch.autograd.grad(compiled(x), [x, *params], g)})


# ----------------------------------------------------------------------------------------------- main


# In order of importance: the budget guard skips what comes last when compiles run long (run it with --only).
CASES = {f.__name__: f for f in (training_block, opcheck_cuda, multi_inference, demo_decode_graph,
                                 lora_linear_decode_graph, autocast_fp32_params, mixed_adapters, checkpointing,
                                 host_overhead, reduce_overhead, checkpoint_compiled, variants_compiled)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("bench", "out"), help="folder for gpu_compile.json")
    ap.add_argument("--dry", action="store_true", help="parse the arguments and exit (no GPU needed)")
    ap.add_argument("--only", default="", help=f"comma-separated cases to run (default all: {', '.join(CASES)})")
    args = ap.parse_args(argv)
    only = [c for c in args.only.split(",") if c]
    unknown = sorted(set(only) - set(CASES))
    if unknown:
        ap.error(f"--only: unknown cases {unknown}; choose from {list(CASES)}")
    if args.dry or not torch.cuda.is_available():
        print("gpu_compile: " + ("dry run" if args.dry else "no CUDA device") + ", nothing measured")
        return 0
    if not ops.HAS_CUSTOM_OPS:
        record("torch.library.custom_op available", False, error=f"torch {torch.__version__}")
    for name in only or CASES:
        case(CASES[name])
    path = write_json("gpu_compile", ROWS, extra={"wall_s": time.perf_counter() - T0}, out_dir=args.out)
    checks = [r for r in ROWS if "passed" in r]
    timings = [r for r in ROWS if "us" in r]
    print(f"\nwrote {path} in {time.perf_counter() - T0:.0f} s")
    print(format_table(timings, ["case", "provider", "us", "ratio_to_base"]))
    print(format_table([{**r, "detail": r.get("error", r.get("rel_err_max", r.get("rel_errs", "")))} for r in checks],
                       ["case", "passed", "detail"]))
    failed = [r["case"] for r in checks if r["passed"] is False]
    skipped = [r["case"] for r in checks if r["passed"] is None]
    print(f"{len(checks) - len(failed) - len(skipped)}/{len(checks)} checks passed"
          + (f"; failed: {failed}" if failed else "") + (f"; skipped: {skipped}" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
