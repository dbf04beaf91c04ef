"""Multi-GPU check and timing of lora_fast.distributed on 2 GPUs with NCCL (device kind nvidia-h200-x2):

    PYTHONPATH=$PWD torchrun --nproc_per_node 2 bench/gpu_distributed.py --out $OUT

Checks (bf16 at real sizes unless noted; each TP result against the single-device computation on the full layer,
both measured by relative error to an fp64 reference (cuBLAS: fp64 takes lora-fast's PyTorch path, so the
reference needs no extra Triton compile); a TP result passes when it is no less accurate than the
single-device one, within 2x + 2e-3, and within 0.1 in any case):
- column- and row-parallel LoRA layer: output, dx, dA, dB; column-parallel dropout bitwise equal to single-device;
- a 2-way TP Llama-style block (q/k/v/gate/up column, o/down row) against the unsharded block: output, dx, LoRA grads;
- TP multi-adapter layers (fused qkv column with slices, row) against single-device MultiLoRALinear;
- DDP and FSDP2 (fp32, and FSDP2 with bf16 compute on fp32 parameters): one step's LoRA gradients against
  single-process gradients on the concatenated batch, the kernels receive unsharded weights under FSDP2, frozen
  weights get no gradient.
Timing at M=8192, r=16, bf16: the 2-GPU TP LoRA layer against the 2-GPU TP base layer (F.linear + the same
collectives), forward and forward+backward, column (K=4096, N=4096 / 14336) and row (K=4096 / 14336, N=4096);
target <= 1.05x. `local_ratio`: the same shard products without collectives (lora_linear vs F.linear on one
rank's shard), which tells the kernel's own overhead from the TP layer's. Fixed-count timing loop, not triton.testing.do_bench: do_bench picks its repeat count from a
per-rank estimate, so two ranks would issue different numbers of collectives and deadlock. The loop follows
do_bench otherwise (L2 flushed before each timed call, CUDA events, median and 20th/80th percentiles).

Rank 0 writes OUT/gpu_distributed.json and prints a table last. --dry: parse arguments and exit (CPU smoke test).
"""
from __future__ import annotations

import os

# Never NVLink multicast / symmetric memory on the lent machines (KINDS.md); set before torch.distributed starts.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lora_fast  # noqa: E402
from bench.common import format_table, rel_err, write_json  # noqa: E402
from lora_fast import distributed as lfd  # noqa: E402

BF16 = torch.bfloat16
DEV = "cuda"  # "cpu" under --cpu-smoke
START = time.time()
BUDGET_S = 60.0  # start no new timing shape past this: the checks that follow need ~40 s (whole run <= 120 s)
ROWS: list[dict] = []
MAX_REL_ERR = 0.1  # bf16 results at these sizes are ~1e-2 from fp32; nothing legitimate comes near 0.1


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[{time.time() - START:6.1f}s] {msg}", flush=True)


def case(name: str):
    """Run one check or timing case; record its failure (traceback) instead of stopping the others."""

    def wrap(fn):
        def run(*args, **kw):
            try:
                fn(*args, **kw)
            except Exception as e:  # noqa: BLE001
                ROWS.append({"case": name, "kind": "error", "passed": False, "error": repr(e),
                             "traceback": traceback.format_exc()[-2000:]})
                log(f"{name}: FAILED {e!r}")
        return run
    return wrap


def record_check(name: str, errs: dict, ref_errs: dict | None = None, tol: float | None = None) -> None:
    """errs: quantity -> rel. error of the TP/DP result to the fp64 reference; ref_errs: the same for the
    single-device result. Pass: err <= min(2 * single-device err + 2e-3, MAX_REL_ERR) (or err <= tol without
    ref_errs); the cap catches a comparison that is broken on both sides."""
    ok = {}
    for k, e in errs.items():
        bound = tol if ref_errs is None else min(2 * ref_errs[k] + 2e-3, MAX_REL_ERR)
        ok[k] = bool(e <= bound)
    row = {"case": name, "kind": "check", "passed": all(ok.values()), "worst_rel_err": max(errs.values()),
           "rel_err": {k: float(f"{v:.3g}") for k, v in errs.items()},
           "failed_quantities": [k for k, good in ok.items() if not good]}
    if ref_errs is not None:
        row["worst_single_device_rel_err"] = max(ref_errs.values())
        row["single_device_rel_err"] = {k: float(f"{v:.3g}") for k, v in ref_errs.items()}
    ROWS.append(row)
    log(f"{name}: {'pass' if row['passed'] else 'FAIL'} worst rel. err {row['worst_rel_err']:.3g} "
        f"{row['failed_quantities'] or ''}")


def shard(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.chunk(dist.get_world_size(), dim)[dist.get_rank()]


def full_lora(K, N, r, dtype=BF16, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = lora_fast.LoRALinear(K, N, rank=r, alpha=2 * r, dropout=dropout, device=DEV, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0, K**-0.5)
        layer.bias.normal_(0, 0.5)
        layer.lora_B.normal_(0, 0.5)
    return layer


def run_layer(layer, x, dy):
    """y, dx, dA, dB of one forward/backward."""
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad


# ----------------------------------------------------------------------------------------------- checks


@case("tp_layers")
def check_tp_layers(M=2048, K=4096, N=4096, r=16):
    full = full_lora(K, N, r)
    torch.manual_seed(1)
    x = torch.randn(M, K, device=DEV, dtype=BF16)
    dy = torch.randn(M, N, device=DEV, dtype=BF16)
    ref = run_layer(copy.deepcopy(full).double(), x.double(), dy.double())
    single = run_layer(copy.deepcopy(full), x, dy)
    names = ("y", "dx", "dA", "dB")
    col = lfd.ColumnParallelLoRALinear.from_lora_linear(full)
    got = run_layer(col, x, shard(dy, 1).contiguous())
    # column: y, dB are this rank's output rows; dx and dA are full (all-reduced)
    views = (lambda t: shard(t, 1), lambda t: t, lambda t: t, lambda t: shard(t, 0))
    record_check("tp_column_layer", {n: rel_err(g, v(f)) for n, g, f, v in zip(names, got, ref, views)},
                 {n: rel_err(v(s), v(f)) for n, s, f, v in zip(names, single, ref, views)})
    row = lfd.RowParallelLoRALinear.from_lora_linear(full)
    got = run_layer(row, shard(x, 1).contiguous(), dy)
    views = (lambda t: t, lambda t: shard(t, 1), lambda t: shard(t, 1), lambda t: t)
    record_check("tp_row_layer", {n: rel_err(g, v(f)) for n, g, f, v in zip(names, got, ref, views)},
                 {n: rel_err(v(s), v(f)) for n, s, f, v in zip(names, single, ref, views)})
    # column-parallel dropout: the same seed on both ranks -> bitwise the single-device output
    drop = full_lora(K, N, r, dropout=0.1).train()
    col = lfd.ColumnParallelLoRALinear.from_lora_linear(drop, gather_output=True).train()
    torch.manual_seed(5)
    y_single = drop(x).detach()
    torch.manual_seed(5)
    y_tp = col(x).detach()
    ROWS.append({"case": "tp_column_dropout_bitwise", "kind": "check", "passed": bool(torch.equal(y_single, y_tp)),
                 "max_abs_diff": float((y_single.float() - y_tp.float()).abs().max())})
    log(f"tp_column_dropout_bitwise: {ROWS[-1]}")


class LlamaBlock(nn.Module):
    """Llama-style decoder block: RMSNorm, GQA causal attention (q, k, v, o), SwiGLU MLP (gate, up, down).
    Heads are reshaped with -1, so a TP rank runs its local heads unchanged. Also used by tests/test_distributed.py.
    """

    def __init__(self, dim, heads, kv_heads, mlp, bias=False):
        super().__init__()
        self.head_dim, self.groups = dim // heads, heads // kv_heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.gate_proj = nn.Linear(dim, mlp, bias=False)
        self.up_proj = nn.Linear(dim, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, dim, bias=bias)

    def forward(self, x):  # x [batch, T, dim]
        b, t, _ = x.shape
        h = self.norm1(x)
        q = self.q_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2).repeat_interleave(self.groups, 1)
        v = self.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2).repeat_interleave(self.groups, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.o_proj(a)
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def lora_block(dim=2048, heads=16, kv_heads=8, mlp=5632):
    torch.manual_seed(2)
    block = LlamaBlock(dim, heads, kv_heads, mlp).to(DEV, BF16)
    lora_fast.apply_lora(block, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         rank=16, alpha=32)
    torch.manual_seed(3)
    for m in block.modules():
        if isinstance(m, lora_fast.LoRALinear):
            with torch.no_grad():
                m.lora_B.normal_(0, 0.05)
    return block


def lora_grads(model) -> dict:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def compare_tp(name: str, model: nn.Module, run) -> None:
    """`run(model, dtype)` -> (outputs dict, LoRA grads dict) of one forward/backward. Compares the 2-way TP model
    (`tensor_parallel(model, LLAMA_TP_PLAN)`) and the single-device bf16 model against the fp64 model."""
    out_ref, g_ref = run(copy.deepcopy(model).double(), torch.float64)
    out_1, g_1 = run(copy.deepcopy(model), BF16)
    tp = lfd.tensor_parallel(model, lfd.LLAMA_TP_PLAN)
    out_tp, g_tp = run(tp, BF16)
    errs = {k: rel_err(out_tp[k], out_ref[k]) for k in out_ref}
    single = {k: rel_err(out_1[k], out_ref[k]) for k in out_ref}
    for mod_name, module in tp.named_modules():
        if isinstance(module, (lfd.ColumnParallelLoRALinear, lfd.RowParallelLoRALinear)):
            rows, cols = module._shard_slices(module.out_features, module.in_features)
            for which in ("lora_A", "lora_B"):
                key = f"{mod_name}.{which}"
                pick = (lambda t: t[:, cols]) if which == "lora_A" else (lambda t: t[rows])
                errs[key] = rel_err(g_tp[key], pick(g_ref[key]))
                single[key] = rel_err(pick(g_1[key]), pick(g_ref[key]))
    record_check(name, errs, single)


@case("tp_llama_block")
def check_tp_block(batch=2, T=512, dim=2048, heads=16, kv_heads=8, mlp=5632):
    block = lora_block(dim, heads, kv_heads, mlp)
    torch.manual_seed(4)
    x = torch.randn(batch, T, dim, device=DEV, dtype=BF16)
    dy = torch.randn(batch, T, dim, device=DEV, dtype=BF16)

    def run(model, dtype):
        xi = x.detach().to(dtype).clone().requires_grad_(True)  # a fresh leaf per run: grads must not accumulate
        y = model(xi)
        y.backward(dy.to(dtype))
        return {"y": y.detach(), "dx": xi.grad}, lora_grads(model)

    compare_tp("tp_llama_block", block, run)


@case("tp_hf_llama")
def check_tp_hf_llama(layers=2, dim=1024, heads=16, kv_heads=8, mlp=2816, T=256, vocab=1024):
    """transformers' own LlamaForCausalLM (attention reshapes heads with -1, so local heads just work)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        ROWS.append({"case": "tp_hf_llama", "kind": "check", "passed": None, "skipped": "no transformers"})
        return
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=T)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(10)
    model = LlamaForCausalLM(cfg).to(DEV, BF16)
    lora_fast.apply_lora(model, list(lfd.LLAMA_TP_PLAN), rank=16, alpha=32)
    for m in model.modules():
        if isinstance(m, lora_fast.LoRALinear):
            with torch.no_grad():
                m.lora_B.normal_(0, 0.05)
    ids = torch.randint(0, vocab, (2, T), device=DEV)
    dy = torch.randn(2, T, vocab, device=DEV)

    def run(m, dtype):
        logits = m(input_ids=ids).logits
        logits.backward(dy.to(logits.dtype))
        return {"logits": logits.detach()}, lora_grads(m)

    compare_tp("tp_hf_llama", model, run)


@case("tp_multi_lora")
def check_tp_multi_lora(T=512, S=8, R=16, dim=4096, kv=1024):
    torch.manual_seed(6)
    qkv = nn.Linear(dim, dim + 2 * kv, bias=False, device=DEV, dtype=BF16)
    down = nn.Linear(dim, dim, bias=True, device=DEV, dtype=BF16)
    sizes = (dim, kv, kv)
    pool = lfd.ShardedAdapterPool(S, R, device=DEV, dtype=BF16)
    ref_pool = lora_fast.AdapterPool(S, R, device=DEV, dtype=BF16)
    col = lfd.ColumnParallelMultiLoRALinear(qkv, pool, key="qkv", slice_sizes=sizes, gather_output=True)
    row = lfd.RowParallelMultiLoRALinear(down, pool, key="down", input_is_parallel=False)
    ref_col = lora_fast.MultiLoRALinear(qkv, ref_pool, key="qkv", slice_sizes=sizes)
    ref_row = lora_fast.MultiLoRALinear(down, ref_pool, key="down")
    g = dict(device=DEV, dtype=BF16)
    for i in range(S):
        r = R if i % 2 == 0 else R // 2
        w = {"qkv": [(torch.randn(r, dim, **g) / dim**0.5, torch.randn(s, r, **g) / r**0.5) for s in sizes],
             "down": (torch.randn(r, dim, **g) / dim**0.5, torch.randn(dim, r, **g) / r**0.5)}
        pool.load(f"a{i}", w, alpha=2.0 * r)
        ref_pool.load(f"a{i}", w, alpha=2.0 * r)
    ids = torch.randint(-1, S, (T,), device=DEV, dtype=torch.int32)
    x = torch.randn(T, dim, **g)
    with torch.no_grad():
        full = ref_col(x, ref_pool.batch_metadata(ids)).float()
        parts = full.split(sizes, -1)
        ws = dist.get_world_size()
        rank_major = torch.cat([p.chunk(ws, -1)[q] for q in range(ws) for p in parts], -1)
        y_col = col(x, pool.batch_metadata(ids))
        y_row = row(x, pool.batch_metadata(ids))
        ref_y_row = ref_row(x, ref_pool.batch_metadata(ids))
    record_check("tp_multi_lora", {"column_qkv": rel_err(y_col, rank_major), "row": rel_err(y_row, ref_y_row)},
                 tol=2e-2)


def mlp(dim=1024, hidden=2816):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)).to(DEV)
    lora_fast.apply_lora(model, ["0", "2"], rank=16, alpha=32)
    for m in model.modules():
        if isinstance(m, lora_fast.LoRALinear):
            with torch.no_grad():
                m.lora_B.normal_(0, 0.05)
    return model


@case("data_parallel")
def check_data_parallel(M=512, dim=1024):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ws, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(7)
    x_all = torch.randn(ws * M, dim, device=DEV)
    t_all = torch.randn(ws * M, dim, device=DEV)
    x, t = x_all.chunk(ws)[rank], t_all.chunk(ws)[rank]
    ref = mlp(dim).double()
    F.mse_loss(ref(x_all.double()), t_all.double()).backward()
    ref_g = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}

    model = mlp(dim)
    ddp = DDP(model, device_ids=[torch.cuda.current_device()] if DEV == "cuda" else None)
    F.mse_loss(ddp(x), t).backward()
    errs = {f"ddp.{n}": rel_err(p.grad, ref_g[n]) for n, p in model.named_parameters() if p.requires_grad}
    frozen_ok = all(p.grad is None for p in model.parameters() if not p.requires_grad)
    record_check("ddp_step", errs, tol=5e-3)
    ROWS[-1]["passed"] = ROWS[-1]["passed"] and frozen_ok
    ROWS[-1]["frozen_without_grad"] = frozen_ok

    fully_shard = lfd.import_fully_shard()
    if fully_shard is None:
        ROWS.append({"case": "fsdp2_step", "kind": "check", "passed": None, "skipped": "no fully_shard"})
        return
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy
    mesh = init_device_mesh(DEV, (ws,))
    # fp32 parameters; then FSDP2's usual mixed precision (bf16 compute, fp32 master weights and reduction)
    bf16 = MixedPrecisionPolicy(param_dtype=BF16, reduce_dtype=torch.float32)
    for name, policy, tol in (("fsdp2_step", None, 5e-3), ("fsdp2_bf16_params_step", bf16, 3e-2)):
        model = mlp(dim)
        kw = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
        seen = []
        for m in model.modules():
            if isinstance(m, lora_fast.LoRALinear):
                m.register_forward_pre_hook(lambda mod, a: seen.append(
                    type(mod.weight) is nn.Parameter and tuple(mod.weight.shape) == (mod.out_features, mod.in_features)))
                fully_shard(m, **kw)
        fully_shard(model, **kw)
        F.mse_loss(model(x).float(), t).backward()
        errs = {f"{name}.{n}": rel_err(p.grad.full_tensor(), ref_g[n])
                for n, p in model.named_parameters() if p.requires_grad}
        frozen_ok = all(p.grad is None for p in model.parameters() if not p.requires_grad)
        record_check(name, errs, tol=tol)
        ROWS[-1]["passed"] = ROWS[-1]["passed"] and frozen_ok and bool(seen) and all(seen)
        ROWS[-1].update(frozen_without_grad=frozen_ok, kernels_saw_full_weights=bool(seen) and all(seen))


# ----------------------------------------------------------------------------------------------- timing


def time_us(fn, warmup: int = 10, iters: int = 40) -> list[float]:
    """Median, 20th and 80th percentile in µs of `fn` over a fixed number of calls (the same on every rank),
    each preceded by an L2 flush, as do_bench does."""
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=DEV)
    for _ in range(warmup):
        fn()
    dist.barrier()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])
    return [float(torch.quantile(times, q)) for q in (0.5, 0.2, 0.8)]


def out_of_time() -> bool:
    """Rank 0 decides, so every rank skips the same cases."""
    flag = torch.tensor([float(time.time() - START > BUDGET_S)], device=DEV)
    dist.broadcast(flag, 0)
    return bool(flag.item())


@case("timing")
def time_tp(M=8192, r=16):
    shapes = [("column", 4096, 4096), ("column", 4096, 14336), ("row", 4096, 4096), ("row", 14336, 4096)]
    for style, K, N in shapes:
        if out_of_time():
            ROWS.append({"case": f"{style} M={M} K={K} N={N}", "kind": "timing", "skipped": "time budget"})
            continue
        time_shape(style, M, K, N, r)


@case("timing_shape")
def time_shape(style, M, K, N, r):
    torch.manual_seed(9)
    full = full_lora(K, N, r)
    base_linear = nn.Linear(K, N, device=DEV, dtype=BF16)
    base_linear.weight.data.copy_(full.weight)
    base_linear.bias.data.copy_(full.bias)
    base_linear.requires_grad_(False)
    if style == "column":
        base, lora = lfd.ColumnParallelLinear(base_linear), lfd.ColumnParallelLoRALinear.from_lora_linear(full)
        x_shape, dy_shape = (M, K), (M, N // dist.get_world_size())
    else:
        base, lora = lfd.RowParallelLinear(base_linear), lfd.RowParallelLoRALinear.from_lora_linear(full)
        x_shape, dy_shape = (M, K // dist.get_world_size()), (M, N)
    x = torch.randn(*x_shape, device=DEV, dtype=BF16)
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(*dy_shape, device=DEV, dtype=BF16)
    params = [xg, *lora.parameters()]

    def fwd(layer):
        return lambda: layer(x)

    def fwd_bwd(layer):
        def run():
            for p in params:
                p.grad = None
            layer(xg).backward(dy)
        return run

    # The same shard products without collectives: separates the kernel's own overhead from the TP layer's.
    def local_base(xi):
        return F.linear(xi, lora.weight, lora.bias)

    def local_lora(xi):
        return lora_fast.lora_linear(xi, lora.weight, lora.bias, lora.lora_A, lora.lora_B, lora.scaling)

    case_name = f"TP{dist.get_world_size()} {style} M={M} K={K} N={N} r={r}"
    for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            t = {name: time_us(make(layer)) for name, layer in
                 (("base", base), ("lora", lora), ("local_base", local_base), ("local_lora", local_lora))}
        row = {"case": case_name, "kind": "timing", "mode": mode, "target": 1.05,
               **{f"{k}_us": round(v[0], 1) for k, v in t.items()},
               **{f"{k}_us_p20_p80": [round(q, 1) for q in v[1:]] for k, v in t.items()},
               "ratio_to_base": round(t["lora"][0] / t["base"][0], 3),
               "local_ratio": round(t["local_lora"][0] / t["local_base"][0], 3)}
        row["meets_target"] = row["ratio_to_base"] <= 1.05
        ROWS.append(row)
        log(f"{case_name} {mode}: TP base {row['base_us']} us, TP LoRA {row['lora_us']} us, ratio "
            f"{row['ratio_to_base']} (shard kernels alone: {row['local_ratio']})")


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join("bench", "out"), help="folder for gpu_distributed.json")
    ap.add_argument("--dry", action="store_true", help="parse arguments and exit (smoke test without GPUs)")
    ap.add_argument("--no-timing", action="store_true", help="correctness checks only")
    ap.add_argument("--no-checks", action="store_true", help="timing only")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny checks on CPU with gloo (under torchrun)")
    args = ap.parse_args(argv)
    if args.dry:
        print("gpu_distributed: dry run, nothing measured")
        return 0
    if args.cpu_smoke:
        return cpu_smoke(args.out)
    if not torch.cuda.is_available():
        print("gpu_distributed: no CUDA device; run under torchrun on 2 GPUs (see the module docstring)")
        return 0
    if "WORLD_SIZE" not in os.environ:
        print("gpu_distributed: launch with torchrun --nproc_per_node 2 (WORLD_SIZE is not set)")
        return 2
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=90),
                            device_id=torch.device("cuda", local_rank))
    log(f"{dist.get_world_size()} ranks, {torch.cuda.get_device_name()}")
    if not args.no_timing:  # first: the target measurement must not be squeezed out by the checks' compiles
        time_tp()
    if not args.no_checks:
        check_tp_layers()
        check_tp_block()
        check_tp_hf_llama()
        check_tp_multi_lora()
        check_data_parallel()
    torch.cuda.synchronize()
    return report(args.out)


def cpu_smoke(out_dir: str) -> int:
    """Every check at tiny sizes on CPU processes (gloo, kernels through the Triton interpreter), no timing:
    `TRITON_INTERPRET=1 torchrun --nproc_per_node 2 bench/gpu_distributed.py --cpu-smoke --out DIR`."""
    global DEV
    DEV = "cpu"
    dist.init_process_group("gloo")
    check_tp_layers(M=6, K=32, N=24, r=3)
    check_tp_block(batch=1, T=5, dim=16, heads=4, kv_heads=2, mlp=22)
    check_tp_hf_llama(layers=1, dim=16, heads=4, kv_heads=2, mlp=22, T=5, vocab=32)
    check_tp_multi_lora(T=6, S=3, R=4, dim=16, kv=8)
    check_data_parallel(M=4, dim=16)
    return report(out_dir)


def report(out_dir: str) -> int:
    dist.barrier()
    failed = []
    if dist.get_rank() == 0:
        checks = [r for r in ROWS if r.get("kind") in ("check", "error")]
        failed = [r["case"] for r in checks if r.get("passed") is False]
        path = write_json("gpu_distributed", ROWS, {"world_size": dist.get_world_size(), "failed": failed,
                                                    "nccl_nvls_enable": os.environ["NCCL_NVLS_ENABLE"],
                                                    "seconds": round(time.time() - START, 1)},
                                     out_dir=out_dir)
        print(f"wrote {path}")
        print(format_table([r for r in ROWS if r.get("kind") == "timing"],
                           ["case", "mode", "base_us", "lora_us", "ratio_to_base", "local_ratio", "meets_target",
                            "skipped"]))
        print(format_table(checks, ["case", "passed", "worst_rel_err", "worst_single_device_rel_err",
                                    "failed_quantities", "error"]))
        print(f"checks: {len(checks) - len(failed)}/{len(checks)} passed" + (f"; FAILED {failed}" if failed else ""))
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
