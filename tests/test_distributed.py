"""DDP, FSDP2 and tensor parallelism with 2 CPU processes on gloo (the kernels run through Triton's interpreter in
the children too: TRITON_INTERPRET is inherited from conftest).

Each spawn costs seconds, so one spawn runs every data-parallel check and one every tensor-parallel check; a child
sends its traceback back and the parent fails with it. Every check compares with the single-process computation on
the full layer / full batch in float64 (`lora_fast.reference`) by relative error, for the outputs and every gradient.
"""
import copy
import datetime
import os
import socket
import sys
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too; must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lora_fast  # noqa: E402
from bench.gpu_distributed import LlamaBlock  # noqa: E402
from lora_fast import distributed as lfd  # noqa: E402
from lora_fast.reference import lora_linear_reference  # noqa: E402
from tests.utils import assert_close  # noqa: E402

WORLD = 2
DT = torch.float32

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


# ----------------------------------------------------------------------------------------------- spawn harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, port, check_name, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        # a short collective timeout: when one rank fails, the other stops waiting for it within a minute
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
        try:
            globals()[check_name](rank)
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 -- every failure goes back to the parent
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        os._exit(1)
    # Leave without the interpreter's teardown: after a clean run, a background C++ thread of the process group
    # sometimes outlived destroy_process_group and aborted the exit ("terminate called without an active
    # exception", exit code -6, about one run in five on the CPU machine). Every check has already passed here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(check_name: str) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, port, check_name, errors)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, "\n".join(msgs)
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}"


# ----------------------------------------------------------------------------------------------- shared helpers


def _close(name, out, ref):
    assert out is not None, f"{name}: no gradient"
    assert_close(name, out.detach(), ref.detach(), DT)


def _randomise_lora(model):
    """B nonzero (LoRA's init has B = 0, which would make dA vanish and hide a wrong reduction)."""
    torch.manual_seed(1234)
    for m in model.modules():
        if isinstance(m, lora_fast.LoRALinear):
            with torch.no_grad():
                m.lora_B.normal_(0, 0.5)


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(26, 30), nn.GELU(), nn.Linear(30, 22))
    lora_fast.apply_lora(model, ["0", "2"], rank=3, alpha=6)
    _randomise_lora(model)
    return model


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------- data parallel


def _check_data_parallel(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(7)
    x_all, t_all = torch.randn(2 * 5, 26), torch.randn(2 * 5, 22)
    x, t = x_all.chunk(WORLD)[rank], t_all.chunk(WORLD)[rank]
    ref = _mlp().double()
    F.mse_loss(ref(x_all.double()), t_all.double()).backward()  # single process, the concatenated batch
    ref_grads = _lora_grads(ref)
    assert set(ref_grads) == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}

    # DDP: the default find_unused_parameters=False; frozen parameters get no hook and no gradient.
    model = _mlp()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ddp = DDP(model)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    F.mse_loss(ddp(x), t).backward()
    for name, g in _lora_grads(model).items():
        _close(f"DDP grad {name}", g, ref_grads[name])
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad), "DDP: a frozen weight got a grad"
    opt.step()
    for name, p in model.named_parameters():  # ranks stay in sync; the base is untouched
        other = p.detach().clone()
        dist.broadcast(other, src=0)
        assert torch.equal(other, p.detach()), f"DDP: {name} differs between ranks after a step"
        if name in base_before:
            assert torch.equal(base_before[name], p.detach()), f"DDP: frozen {name} changed"
    F.mse_loss(ddp(x), t).backward()  # a second step works (no unused-parameter error)

    # FSDP2: shard each LoRALinear (base weight included) and the root; the kernels must see full tensors.
    fully_shard = lfd.import_fully_shard()
    if fully_shard is None:
        return
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy
    mesh = init_device_mesh("cpu", (WORLD,))
    # fp32 parameters, then FSDP2's usual mixed precision: bf16 compute on fp32 master weights, fp32 reduction
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for policy, dtype in ((None, DT), (bf16, torch.bfloat16)):
        kw = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
        model = _mlp()
        seen = []
        for m in model.modules():
            if isinstance(m, lora_fast.LoRALinear):
                m.register_forward_pre_hook(lambda mod, args: seen.append(
                    (type(mod.weight) is nn.Parameter, tuple(mod.weight.shape), (mod.out_features, mod.in_features))))
                fully_shard(m, **kw)
        fully_shard(model, **kw)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters()), "FSDP2 left a parameter unsharded"
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        F.mse_loss(model(x).float(), t).backward()
        assert seen and all(plain and shape == full for plain, shape, full in seen), f"kernels saw shards: {seen}"
        for name, g in _lora_grads(model).items():
            assert g.dtype == DT, f"FSDP2 {dtype}: grad {name} is {g.dtype}, expected the fp32 master dtype"
            assert_close(f"FSDP2 ({dtype} compute) grad {name}", g.full_tensor(), ref_grads[name], dtype)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad), "FSDP2: a frozen weight got a grad"
        base_before = {n: p.full_tensor().clone() for n, p in model.named_parameters() if not p.requires_grad}
        opt.step()
        for name, p in model.named_parameters():
            if name in base_before:
                assert torch.equal(base_before[name], p.full_tensor()), f"FSDP2: frozen {name} changed"


def test_ddp_and_fsdp2_match_single_process():
    _spawn("_check_data_parallel")


# ----------------------------------------------------------------------------------------------- tensor parallel


def _full_layer(K, N, r, bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = lora_fast.LoRALinear(K, N, rank=r, alpha=2 * r, dropout=dropout, bias=bias, dtype=DT)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        if bias:
            layer.bias.normal_()
    return layer


def _reference(layer, x, dy, keep=None):
    """y, dx, dA, dB of the full layer in float64 (dropout given as the keep mask)."""
    x = x.detach().double().requires_grad_(True)
    A = layer.lora_A.detach().double().requires_grad_(True)
    B = layer.lora_B.detach().double().requires_grad_(True)
    W, b = layer.weight.double(), None if layer.bias is None else layer.bias.double()
    if keep is None:
        y = lora_linear_reference(x, W, b, A, B, layer.scaling)
    else:
        xd = x * keep / (1 - layer.dropout)
        y = F.linear(x, W, b) + (xd @ A.T * layer.scaling) @ B.T
    y.backward(dy.double())
    return y.detach(), x.grad, A.grad, B.grad


def _check_column(rank):
    full = _full_layer(26, 30, 3)
    torch.manual_seed(11)
    x, dy = torch.randn(2, 3, 26), torch.randn(2, 3, 30)
    y_ref, dx_ref, dA_ref, dB_ref = _reference(full, x, dy)
    rows = slice(15 * rank, 15 * (rank + 1))
    for gather in (False, True):
        col = lfd.ColumnParallelLoRALinear.from_lora_linear(full, gather_output=gather)
        assert col.weight.shape == (15, 26) and col.lora_A.shape == (3, 26) and col.lora_B.shape == (15, 3)
        xi = x.clone().requires_grad_(True)
        y = col(xi)
        _close(f"column y (gather={gather})", y, y_ref if gather else y_ref[..., rows])
        y.backward(dy if gather else dy[..., rows].contiguous())
        _close("column dx", xi.grad, dx_ref)
        _close("column dA (replicated, all-reduced)", col.lora_A.grad, dA_ref)
        _close("column dB (sharded)", col.lora_B.grad, dB_ref[rows])
        assert col.weight.grad is None and col.bias.grad is None
    _check_round_trip(col, full)


def _check_row(rank):
    full = _full_layer(26, 30, 3)
    torch.manual_seed(12)
    x, dy = torch.randn(5, 26), torch.randn(5, 30)
    y_ref, dx_ref, dA_ref, dB_ref = _reference(full, x, dy)
    cols = slice(13 * rank, 13 * (rank + 1))
    # x full (split inside) and x already sharded (the usual input: a column layer's output)
    for parallel_input in (False, True):
        row = lfd.RowParallelLoRALinear.from_lora_linear(full, input_is_parallel=parallel_input)
        assert row.weight.shape == (30, 13) and row.lora_A.shape == (3, 13) and row.lora_B.shape == (30, 3)
        xi = (x[:, cols].contiguous() if parallel_input else x).clone().requires_grad_(True)
        reduced, all_reduce = [], dist.all_reduce

        def counting(t, *args, **kwargs):
            reduced.append(tuple(t.shape))
            return all_reduce(t, *args, **kwargs)

        dist.all_reduce = counting  # the layer's forward calls dist.all_reduce through the module attribute
        try:
            y = row(xi)
        finally:
            dist.all_reduce = all_reduce
        # one all-reduce of the [M, N] output carries the base product and the rank-r term together
        assert reduced == [(5, 30)], reduced
        _close("row y (bias once, base and LoRA in one all-reduce)", y, y_ref)
        y.backward(dy)
        _close("row dx", xi.grad, dx_ref[:, cols] if parallel_input else dx_ref)
        _close("row dA (sharded)", row.lora_A.grad, dA_ref[:, cols])
        _close("row dB (replicated, all-reduced)", row.lora_B.grad, dB_ref)
    _check_round_trip(row, full)
    # A trainable bias is added after the all-reduce, so every rank gets its gradient (not rank 0 only).
    row.bias.requires_grad_(True)
    y = row(x[:, cols].contiguous())
    _close("row y (trainable bias)", y, y_ref)
    y.backward(dy)
    _close("row d bias", row.bias.grad, dy.sum(0))


def _check_few_rows(rank):
    """M = 1 and M = 0 through both layers (an empty all-reduce and all-gather included)."""
    full = _full_layer(26, 30, 3)
    cols, rows = slice(13 * rank, 13 * (rank + 1)), slice(15 * rank, 15 * (rank + 1))
    col = lfd.ColumnParallelLoRALinear.from_lora_linear(full, gather_output=True)
    row = lfd.RowParallelLoRALinear.from_lora_linear(full)
    for M in (1, 0):
        x, dy = torch.randn(M, 26), torch.randn(M, 30)
        y_ref, dx_ref, dA_ref, dB_ref = _reference(full, x, dy)
        for layer, xi in ((col, x.clone()), (row, x[:, cols].contiguous())):
            layer.zero_grad()
            xi.requires_grad_(True)
            y = layer(xi)
            assert y.shape == (M, 30), f"M={M}: {type(layer).__name__} returned {tuple(y.shape)}"
            y.backward(dy)
            if M == 0:
                assert xi.grad.shape == xi.shape and not layer.lora_A.grad.any() and not layer.lora_B.grad.any()
                continue
            _close(f"M=1 {type(layer).__name__} y", y, y_ref)
            is_col = layer is col
            _close(f"M=1 {type(layer).__name__} dx", xi.grad, dx_ref if is_col else dx_ref[:, cols])
            _close(f"M=1 {type(layer).__name__} dA", layer.lora_A.grad, dA_ref if is_col else dA_ref[:, cols])
            _close(f"M=1 {type(layer).__name__} dB", layer.lora_B.grad, dB_ref[rows] if is_col else dB_ref)


def _check_round_trip(tp_layer, full):
    """to_lora_linear() gathers exactly the full layer back."""
    back = tp_layer.to_lora_linear()
    assert isinstance(back, lora_fast.LoRALinear) and back.scaling == full.scaling
    for name in ("weight", "bias", "lora_A", "lora_B"):
        assert torch.equal(getattr(back, name), getattr(full, name)), f"to_lora_linear: {name} differs"
    assert not back.weight.requires_grad and back.lora_A.requires_grad


def _row_dropout_masks(M, K, p, seed):
    """Recover every shard's dropout mask: A_p = I, B = I, W = 0, x = (1 on shard 0 | 2 on shard 1), so that
    y * (1 - p) = keep_0 + 2 * keep_1 element-wise."""
    r = K // WORLD
    probe = lora_fast.LoRALinear(K, r, rank=r, alpha=r, dropout=p, bias=False, dtype=DT)
    with torch.no_grad():
        probe.weight.zero_()
        probe.lora_A.copy_(torch.eye(r).repeat(1, WORLD))
        probe.lora_B.copy_(torch.eye(r))
    row = lfd.RowParallelLoRALinear.from_lora_linear(probe, input_is_parallel=False).train()
    x = torch.cat([torch.ones(M, r), 2 * torch.ones(M, r)], 1)
    torch.manual_seed(seed)  # the seed draw happens in the forward
    code = torch.round(row(x).detach() * (1 - p)).long()
    return [code % 2 == 1, code // 2 == 1]


def _check_dropout(rank):
    # Column: ranks share x and the seed (same CPU RNG state), so the result is bitwise single-device's.
    full = _full_layer(26, 30, 3, dropout=0.3).train()
    lfd.check_rng_in_sync()
    x = torch.randn(6, 26)
    torch.manual_seed(99)
    y_single = full(x).detach()
    col = lfd.ColumnParallelLoRALinear.from_lora_linear(full, gather_output=True).train()
    torch.manual_seed(99)
    assert torch.equal(col(x).detach(), y_single), "column-parallel dropout differs from single-device"

    # Row: per-shard masks. Statistics (keep rate, shards independent), then the layer against the float64
    # reference with those masks: forward and backward must regenerate the same per-shard mask.
    M, K, p = 24, 32, 0.5
    keep = _row_dropout_masks(M, K, p, seed=5)
    for m in keep:
        assert abs(m.float().mean().item() - (1 - p)) < 0.06, f"keep rate {m.float().mean():.3f} for p={p}"
    agree = (keep[0] == keep[1]).float().mean().item()
    assert abs(agree - 0.5) < 0.08, f"the shards' masks agree on {agree:.2f} of elements (correlated streams)"
    full = _full_layer(K, 10, 3, dropout=p)
    row = lfd.RowParallelLoRALinear.from_lora_linear(full, input_is_parallel=False).train()
    x, dy = torch.randn(M, K).requires_grad_(True), torch.randn(M, 10)
    torch.manual_seed(5)  # the same seed draw as the probe, hence the same masks
    y = row(x)
    y.backward(dy)
    y_ref, dx_ref, dA_ref, dB_ref = _reference(full, x, dy, keep=torch.cat(keep, 1).double())
    cols = slice(16 * rank, 16 * (rank + 1))
    _close("row dropout y", y, y_ref)
    _close("row dropout dx", x.grad, dx_ref)
    _close("row dropout dA", row.lora_A.grad, dA_ref[:, cols])
    _close("row dropout dB", row.lora_B.grad, dB_ref)


def _shard_of(module, full_grad, which):
    rows, cols = module._shard_slices(module.out_features, module.in_features)
    return full_grad[:, cols] if which == "lora_A" else full_grad[rows]


def _check_block(rank):
    torch.manual_seed(3)
    block = LlamaBlock(dim=24, heads=4, kv_heads=2, mlp=34, bias=True).to(DT)
    # k_proj stays a plain nn.Linear: the plan shards it as a TP base layer
    lora_fast.apply_lora(block, ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], rank=3, alpha=6)
    _randomise_lora(block)
    ref = copy.deepcopy(block).double()
    tp = lfd.tensor_parallel(block, lfd.LLAMA_TP_PLAN)
    assert isinstance(tp.k_proj, lfd.ColumnParallelLinear) and isinstance(tp.o_proj, lfd.RowParallelLoRALinear)
    torch.manual_seed(4)
    x, dy = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    xr = x.double().requires_grad_(True)
    y_ref = ref(xr)
    y_ref.backward(dy.double())
    xt = x.clone().requires_grad_(True)
    y = tp(xt)
    _close("TP block y", y, y_ref)
    y.backward(dy)
    _close("TP block dx", xt.grad, xr.grad)
    n = 0
    for name, module in tp.named_modules():
        if isinstance(module, lfd._ParallelLoRA):
            ref_mod = ref.get_submodule(name)
            for which in ("lora_A", "lora_B"):
                _close(f"TP block {name}.{which}.grad", getattr(module, which).grad,
                       _shard_of(module, getattr(ref_mod, which).grad, which))
            n += 1
    assert n == 6


def _check_multi_lora(rank):
    torch.manual_seed(8)
    qkv = nn.Linear(26, 24, dtype=DT)            # fused q, k, v of widths 12, 6, 6
    down = nn.Linear(30, 22, dtype=DT)
    pool = lfd.ShardedAdapterPool(max_adapters=3, max_rank=4, dtype=DT)
    ref_pool = lora_fast.AdapterPool(max_adapters=3, max_rank=4, dtype=DT)
    sizes = (12, 6, 6)
    col = lfd.ColumnParallelMultiLoRALinear(qkv, pool, key="qkv", slice_sizes=sizes)
    col_g = lfd.ColumnParallelMultiLoRALinear(qkv, pool, key="qkv_g", slice_sizes=sizes, gather_output=True)
    row = lfd.RowParallelMultiLoRALinear(down, pool, key="down", input_is_parallel=False)
    ref_col = lora_fast.MultiLoRALinear(qkv, ref_pool, key="qkv", slice_sizes=sizes)
    ref_g = lora_fast.MultiLoRALinear(qkv, ref_pool, key="qkv_g", slice_sizes=sizes)
    ref_row = lora_fast.MultiLoRALinear(down, ref_pool, key="down")
    for name, r, alpha in (("a", 3, 6.0), ("b", 2, 8.0)):  # mixed ranks
        w = {"qkv": [(torch.randn(r, 26), torch.randn(s, r)) for s in sizes],
             "qkv_g": [(torch.randn(r, 26), torch.randn(s, r)) for s in sizes],
             "down": (torch.randn(r, 30), torch.randn(22, r))}
        pool.load(name, w, alpha=alpha)
        ref_pool.load(name, w, alpha=alpha)
    x, h = torch.randn(7, 26), torch.randn(7, 30)
    names = ["a", None, "b", "a", "b", None, "a"]
    batch, ref_batch = pool.batch_metadata(names), ref_pool.batch_metadata(names)
    with torch.no_grad():
        full = ref_col(x, ref_batch)
        local_rows = torch.cat([part[:, s // 2 * rank: s // 2 * (rank + 1)]
                                for part, s in zip(full.split(sizes, -1), sizes)], -1)
        _close("TP multi-LoRA column (per-slice shards)", col(x, batch), local_rows)
        gathered = ref_g(x, ref_batch).split(sizes, -1)
        rank_major = torch.cat([p[:, s // 2 * q: s // 2 * (q + 1)] for q in range(WORLD)
                                for p, s in zip(gathered, sizes)], -1)
        _close("TP multi-LoRA column gather_output", col_g(x, batch), rank_major)
        _close("TP multi-LoRA row", row(h, batch), ref_row(h, ref_batch))
        _close("TP multi-LoRA row (ids tensor)", row(h, pool.ids(names)), ref_row(h, ref_batch))
    # unload keeps slots consistent across the sharded and the plain pool
    pool.unload("a")
    ref_pool.unload("a")
    names = ["b", None, "b"]
    with torch.no_grad():
        _close("TP multi-LoRA row after unload", row(h[:3], pool.batch_metadata(names)),
               ref_row(h[:3], ref_pool.batch_metadata(names)))


def _check_errors(rank):
    full = _full_layer(26, 31, 3)
    with pytest.raises(ValueError, match="out_features=31 must be divisible"):
        lfd.ColumnParallelLoRALinear.from_lora_linear(full)
    col = lfd.ColumnParallelLoRALinear.from_lora_linear(_full_layer(26, 30, 3))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 26\]"):
        col(torch.randn(4, 25))
    row = lfd.RowParallelLoRALinear.from_lora_linear(_full_layer(26, 30, 3))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 13\]"):
        row(torch.randn(4, 26))
    with pytest.raises(TypeError, match="layer must be a lora_fast.LoRALinear"):
        lfd.RowParallelLoRALinear.from_lora_linear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lfd.tensor_parallel(nn.Sequential(nn.Linear(4, 4)), lfd.LLAMA_TP_PLAN)
    odd = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 5))
    with pytest.raises(ValueError, match="out_features=5 must be divisible"):
        lfd.tensor_parallel(odd, {"0": "column", "1": "column"})
    assert all(type(m) is nn.Linear for m in odd), "a failed tensor_parallel left the model half converted"
    with pytest.raises(ValueError, match="plan must map"):
        lfd.tensor_parallel(nn.Sequential(nn.Linear(4, 4)), {"0": "diagonal"})
    pool = lfd.ShardedAdapterPool(2, 4, dtype=DT)
    lfd.RowParallelMultiLoRALinear(nn.Linear(26, 10), pool, key="down")
    with pytest.raises(ValueError, match=r"weights\['down'\]\[0\]: the full A must be \[r, 26\]"):
        pool.load("x", {"down": (torch.randn(2, 13), torch.randn(10, 2))}, alpha=2.0)
    with pytest.raises(TypeError, match="pool must be a lora_fast.distributed.ShardedAdapterPool"):
        lfd.ColumnParallelMultiLoRALinear(nn.Linear(4, 4), lora_fast.AdapterPool(2, 2, dtype=DT))
    only_rank0 = dist.new_group([0])  # every rank must take part in creating it
    if rank == 1:
        with pytest.raises(ValueError, match="group: this process .* is not a member"):
            lfd.ColumnParallelLoRALinear.from_lora_linear(_full_layer(26, 30, 3), group=only_rank0)
    else:  # a group of one: the layer is the whole layer
        solo = lfd.ColumnParallelLoRALinear.from_lora_linear(_full_layer(26, 30, 3), group=only_rank0)
        assert solo.tp_size == 1 and solo.weight.shape == (30, 26)
    # from_linear / direct construction: one adapter draw broadcast from rank 0, so ranks agree
    lin = nn.Linear(26, 30, dtype=DT)
    dist.broadcast(lin.weight.data, 0)
    dist.broadcast(lin.bias.data, 0)
    torch.manual_seed(100 + rank)  # different RNG on each rank
    with pytest.raises(RuntimeError, match="RNG states differ"):
        lfd.check_rng_in_sync()
    for layer in (lfd.ColumnParallelLoRALinear.from_linear(lin, rank=3, alpha=6),
                  lfd.ColumnParallelLoRALinear(26, 30, rank=3, dtype=DT)):
        a = layer.lora_A.detach().clone()
        dist.broadcast(a, 0)
        assert torch.equal(a, layer.lora_A.detach()), "ranks drew different A (it is replicated)"


def _check_tensor_parallel(rank):
    for check in (_check_column, _check_row, _check_few_rows, _check_dropout, _check_block,
                  _check_multi_lora, _check_errors):
        check(rank)


def test_tensor_parallel_layers_block_and_multi_lora_match_single_device():
    _spawn("_check_tensor_parallel")


def test_tensor_parallel_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        lfd.ColumnParallelLoRALinear.from_lora_linear(_full_layer(4, 4, 1))


def test_shard_range():
    assert lfd.shard_range(30, 1, 2, "n") == slice(15, 30)
    with pytest.raises(ValueError, match="n=7 must be divisible by the tensor-parallel size 2"):
        lfd.shard_range(7, 0, 2, "n")


def test_tensor_parallel_refuses_variants_it_cannot_shard(tmp_path):
    """DoRALinear subclasses LoRALinear: sharded as one it lost its magnitude (plain LoRA, silently); VeRA and
    QLoRA 4-bit layers matched by the plan were left whole among sharded layers. Each is refused, named, and the
    model is left as it was; plain LoRALinear and nn.Linear still shard (a one-process gloo group)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from lora_fast.qlora import LoRALinear4bit

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        plan = {"0": "column", "1": "row"}
        for variant in ("dora", "vera", "nf4"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
            if variant == "dora":
                lora_fast.apply_dora(model, ["1"], rank=2)
            elif variant == "vera":
                lora_fast.apply_vera(model, ["1"], rank=2)
            else:
                model[1] = LoRALinear4bit.from_linear(model[1], rank=2, compute_dtype=torch.float32)
            types = [type(m) for m in model]
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            with pytest.raises(TypeError, match=r"module '1' is a .*(DoRALinear|VeRALinear|LoRALinear4bit).*"
                                                r"plain nn\.Linear and lora_fast\.LoRALinear layers only"):
                lfd.tensor_parallel(model, plan)
            assert [type(m) for m in model] == types, variant
            assert all(torch.equal(p, params[n]) for n, p in model.named_parameters()), variant
        dora = lora_fast.DoRALinear(8, 8, rank=2)
        for cls in (lfd.ColumnParallelLoRALinear, lfd.RowParallelLoRALinear):
            with pytest.raises(TypeError, match="layer must be a lora_fast.LoRALinear, got DoRALinear"):
                cls.from_lora_linear(dora)

        class MyLinear(nn.Linear):
            pass

        with pytest.raises(TypeError, match="module '0' is a .*MyLinear"):
            lfd.tensor_parallel(nn.Sequential(MyLinear(8, 8), nn.Linear(8, 8)), plan)
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        lora_fast.apply_lora(model, ["0"], rank=2)
        nn.init.normal_(model[0].lora_B)
        x = torch.randn(3, 8)
        y0 = model(x)
        lfd.tensor_parallel(model, plan)
        assert isinstance(model[0], lfd.ColumnParallelLoRALinear) and isinstance(model[1], lfd.RowParallelLinear)
        assert_close("tp_size 1", model(x), y0.detach(), DT)
        # the TP layer is an adapter module (adapter_state_dict): another variant applied after tensor_parallel
        # keeps its factors training (the freezing rule kept only its own names), and they count as LoRA
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        lora_fast.apply_lora(model, ["0"], rank=2)
        lfd.tensor_parallel(model, {"0": "column"})
        lora_fast.apply_vera(model, ["1"], rank=2)
        assert model[0].lora_A.requires_grad and model[0].lora_B.requires_grad
        assert not model[0].weight.requires_grad and model[1].vera_lambda_b.requires_grad
        counts = lora_fast.count_parameters(model).by_variant
        assert counts["lora"].adapter == model[0].lora_A.numel() + model[0].lora_B.numel()
    finally:
        dist.destroy_process_group()
