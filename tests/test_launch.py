"""The launch cache (kernels/launch.py): plans keyed on everything the launch depends on, and the direct launch.

The direct launch of a compiled kernel only exists on a GPU; here a fake jit function stands in to check the
protocol (first call through `kernel[grid]`, later calls through the compiled kernel's `run`), and the real
launchers run twice on fresh inputs to check that nothing of a call leaks into the next one's results.
"""
import importlib

import pytest
import torch

from lora_fast import kernels
from lora_fast.philox import dropout_mask_torch
from lora_fast.reference import lora_linear_reference

from .utils import assert_close, lora_problem

launch = importlib.import_module("lora_fast.kernels.launch")
lora_fwd = importlib.import_module("lora_fast.kernels.lora_fwd")


class FakeCompiled:
    function, packed_metadata = "fn-handle", "meta"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class FakeJit:
    """A jit function's launch interface: arg_names and fn[grid](*args, **kwargs), returning a compiled kernel."""
    arg_names = ["X", "Y", "n", "seed", "BLOCK", "Z", "FLAG"]
    __name__ = "fake"

    def __init__(self):
        self.calls, self.compiled = [], FakeCompiled()

    def __getitem__(self, grid):
        def go(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.compiled
        return go


@pytest.fixture
def on_gpu(monkeypatch):
    """Launch as it runs on a GPU: not interpreting, device 0, stream 77."""
    device = {"index": 0}
    monkeypatch.setattr(launch, "is_interpret", lambda: False)
    monkeypatch.setattr(launch, "_current_device", lambda: device["index"])
    monkeypatch.setattr(launch, "_current_stream", lambda d: 77)
    return device


def test_launch_orders_arguments_and_takes_the_direct_path(on_gpu):
    fn = FakeJit()
    run = launch.Launch(fn, (5,), ("X", "seed", "Z"), None, None, 40, None, BLOCK=64, Z=None, FLAG=True,
                        num_warps=4, num_stages=3)
    run("x0", 11, "z0")
    assert fn.calls == [((5, 1, 1), ("x0", None, 40, 11, 64, "z0", True), {"num_warps": 4, "num_stages": 3})]
    assert fn.compiled.runs == []
    run("x1", 12, "z1")  # compiled now: no second trip through fn[grid]
    assert len(fn.calls) == 1
    assert fn.compiled.runs == [(5, 1, 1, 77, "fn-handle", "meta", None, None, None,
                                 "x1", None, 40, 12, 64, "z1", True)]
    assert run.args == [None, None, 40, None, 64, None, True]  # the template is not written by a call


def test_launch_takes_the_full_path_with_hooks_or_on_another_device(on_gpu):
    from triton import knobs

    fn = FakeJit()
    run = launch.Launch(fn, (2, 3), ("X",), None, "y", 1, 0, 16, "z", False)
    run("a")
    on_gpu["index"] = 1  # another current device: its own module, so Triton's full path
    run("b")
    assert len(fn.calls) == 2 and fn.compiled.runs == []
    on_gpu["index"] = 0
    hook = lambda *a: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        run("c")  # a profiler's hook must see the launch
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(fn.calls) == 3 and fn.compiled.runs == []
    run("d")
    assert len(fn.compiled.runs) == 1 and fn.compiled.runs[0][:3] == (2, 3, 1)


def test_direct_launch_can_be_switched_off(on_gpu, monkeypatch):
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", False)  # LORA_FAST_DIRECT_LAUNCH=0
    fn = FakeJit()
    run = launch.Launch(fn, (1,), ("X",), None, "y", 1, 0, 16, "z", False)
    run("a")
    run("b")
    assert len(fn.calls) == 2 and fn.compiled.runs == []


def test_launch_refuses_an_incomplete_argument_list():
    with pytest.raises(TypeError, match="no value for"):
        launch.Launch(FakeJit(), (1,), (), None, None, 1)
    with pytest.raises(TypeError, match="takes 7 arguments"):
        launch.Launch(FakeJit(), (1,), (), *range(8))


def test_plan_key_sees_what_the_launch_depends_on():
    x = torch.randn(8, 16)
    key = launch.plan_key((x, None), 0.1)
    assert key == launch.plan_key((torch.randn(8, 16), None), 0.1)  # fresh data, same plan
    others = [launch.plan_key((x.t(), None), 0.1), launch.plan_key((x.double(), None), 0.1),
              launch.plan_key((x[:, 1:], None), 0.1), launch.plan_key((x[1:], None), 0.1),
              launch.plan_key((x, x), 0.1), launch.plan_key((x, None), 0.2)]
    assert all(k != key for k in others)
    assert launch.plan_key((x, 3.0)) is None  # not a tensor: no plan, the launcher's checks speak
    assert launch.plan_key((x,), torch.tensor(0.1)) is None  # a tensor flag may change in place: never cached
    assert launch.plan_key((x,), 0.1, True, "auto", torch.bfloat16, None, 3) is not None
    assert (launch.int_width(5), launch.int_width(2**40), launch.int_width(-2**31), launch.int_width("7")) == \
        (32, 64, 32, 0)


def test_plan_cache_is_bounded_and_ignores_unhashable_keys(monkeypatch):
    monkeypatch.setattr(launch, "MAX_PLANS", 3)
    cache = launch.PlanCache()
    for i in range(3):
        assert cache.put((i,), i) == i
    cache.put((3,), 3)
    assert len(cache) == 1 and cache.find((3,)) == 3
    assert cache.put(([1],), "p") == "p" and len(cache) == 1  # unhashable: not stored
    assert cache.find(([1],)) is None and cache.find(None) is None
    assert cache.put(None, "q") == "q" and len(cache) == 1


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["fused", "shrink"])
def test_repeated_calls_use_each_calls_own_inputs(mode, p, device):
    """Three calls of the launchers on one shape: fresh data, seed and scaling each time, and the third on views
    offset by one element (other alignment: a plan of its own). Each result matches its own reference."""
    M, K, N, r = 19, 24, 20, 3
    for i, offset in enumerate((0, 0, 1)):
        s, seed = 0.5 + i, 1000 + 7 * i
        x, W, b, A, B = lora_problem(M, K + offset, N, r, torch.float32, device)
        x, W, A = x[:, offset:], W[:, offset:], A[:, offset:]
        dy = torch.randn(M, N, device=device)
        y, xa = kernels.lora_forward(x, W, b, A, B, s, p, seed, store_xa=True, xa_mode=mode)
        dx, dyb = kernels.lora_backward_dx(dy, W, A, B, s, p, seed, dyb_mode=mode)
        dA, dB = kernels.lora_grad_ab(x, dy, xa, dyb, s, A.dtype, B.dtype, p, seed)
        keep = dropout_mask_torch(seed, M, K, p, device) if p > 0 else None
        xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, B))
        yr = lora_linear_reference(xr, W.double(), b.double(), Ar, Br, s, p, p > 0, keep)
        yr.backward(dy.double())
        for name, out, ref in (("y", y, yr), ("dx", dx, xr.grad), ("dA", dA, Ar.grad), ("dB", dB, Br.grad)):
            assert_close(f"call {i} {name}", out, ref, torch.float32)


def test_a_cached_plan_does_not_hide_bad_input(device):
    x, W, b, A, B = lora_problem(9, 16, 12, 4, torch.float32, device)
    kernels.lora_forward(x, W, b, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        kernels.lora_forward(x, W, b, A, B[:, :3], 1.0)
    with pytest.raises(ValueError, match="out"):
        kernels.lora_forward(x, W, b, A, B, 1.0, out=torch.empty(9, 11, device=device))
    with pytest.raises(ValueError, match="xa_mode"):
        kernels.lora_forward(x, W, b, A, B, 1.0, xa_mode="fast")


def test_tf32_switch_is_part_of_the_key(device):
    x, W, b, A, B = lora_problem(5, 16, 8, 2, torch.float32, device)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        keys = []
        for flag in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = flag
            kernels.lora_forward(x, W, b, A, B, 1.0)
            keys.append(next(reversed(lora_fwd._PLANS)))
        assert keys[0] != keys[1]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_pdl_pairs_are_planned_where_pdl_is_enabled(device, monkeypatch):
    """Which launches pair up by programmatic dependent launch (kernels/helpers.pdl_enabled; the GPU script
    bench/exp_pdl.py runs them): off the GPU never; with PDL on, "auto" takes the split decode mode up to
    MAX_SPLIT_ROWS rows (with or without dropout and stored xa), the GEMM is launched with `launch_pdl` and waits,
    and the shrink before dX is its producer. LORA_FAST_PDL=0 (PDL_ENV) turns it off."""
    from lora_fast.kernels import helpers, lora_bwd, lora_fwd

    assert not helpers.pdl_enabled(torch.device("cpu"))
    monkeypatch.setattr(helpers, "PDL_ENV", False)
    assert not helpers.pdl_enabled(torch.device("cuda"))
    for module in (lora_fwd, lora_bwd):
        monkeypatch.setattr(module, "pdl_enabled", lambda dev: True)
    K, N, r = 48, 40, 3
    for M, p, store, mode in ((1, 0.0, False, "split"), (16, 0.1, True, "split"),
                              (lora_fwd.MAX_SPLIT_ROWS, 0.0, True, "split"), (lora_fwd.MAX_SPLIT_ROWS + 1, 0.0, False,
                                                                               "fused"), (300, 0.0, True, "shrink")):
        x, W, b, A, B = lora_problem(M, K, N, r, torch.float32, device)
        plan = lora_fwd._ForwardPlan(x, W, b, A, B, p, store, "auto", None, "auto", None)
        assert (plan.splits > 0, plan.shrink) == (mode == "split", mode == "shrink"), (M, p, store, mode)
        paired = mode != "fused"
        assert plan.pdl == paired and plan.launch.options.get("launch_pdl", False) == paired
        gdc_wait = plan.launch.args[plan.launch.fn.arg_names.index("GDC_WAIT")]
        assert gdc_wait == paired
    dy = torch.randn(300, N, device=device)
    dx_plan = lora_bwd._DxPlan(dy, W, A, B, 0.0, True, "auto", None, "auto", None)
    assert dx_plan.shrink and dx_plan.pdl and dx_plan.launch.options.get("launch_pdl") is True


def test_mid_row_tiles_fill_the_gpu_and_pick_their_modes(monkeypatch):
    """From 65 rows on a Hopper GPU (half precision) the forward and dX take the first `config._HALF_MID` tile whose
    grid has its share of the SMs in tiles, until the large tile fills MID_FILL of them (bench/exp_mid_rows.py);
    "auto" then takes the shrink launch (<= MID_SHRINK_ROWS rows, no dropout) or "split" for the forward (and
    "split" with the large tile up to SPLIT_MAX_ROWS), dY @ B in the loop for 64-row dX tiles and a shrink launch
    for 128-row ones. Not on GPUs before Hopper or with less shared memory (`fill_sms`), in fp32, or under an
    override.
    Plans only (the tiles run in bench/exp_mid_rows.py and gpu_check on the GPU)."""
    from lora_fast.kernels import config, lora_bwd, lora_fwd

    monkeypatch.setattr(config, "is_interpret", lambda: False)
    config.set_override("fwd", "m256", None)  # no config cached before the patch
    gpu = torch.device("cuda", 0)  # never touched: the device facts are patched
    for major, shared, sms in ((9, 228 << 10, 132), (10, 228 << 10, 148), (8, 164 << 10, 0), (12, 100 << 10, 0)):
        monkeypatch.setattr(config, "capability_major", lambda dev, major=major: major)
        monkeypatch.setattr(config, "shared_memory_per_sm", lambda dev, shared=shared: shared)
        monkeypatch.setattr(config, "num_sms", lambda dev, n=sms or 99: n)
        assert config.fill_sms(gpu) == sms, (major, shared)
    assert config.fill_sms(torch.device("cpu")) == 0
    bf16 = torch.bfloat16
    tile = lambda cfg: cfg and (cfg.block_m, cfg.block_n)  # noqa: E731
    assert tile(config.mid_tile("fwd", 96, bf16, 4096, 132)) == (64, 64)  # 128 tiles
    assert tile(config.mid_tile("fwd", 256, bf16, 4096, 132)) == (64, 128)
    assert tile(config.mid_tile("fwd_split", 512, bf16, 4096, 132)) == (128, 128)
    assert tile(config.mid_tile("dx", 256, bf16, 14336, 132)) == (128, 128)  # 224 tiles: 1.5 waves
    assert tile(config.mid_tile("dx", 512, bf16, 4096, 132)) == (64, 128)  # 128 x 128: one wave only
    stages = lambda m: config.mid_tile("dx", m, bf16, 4096, 132).num_stages  # noqa: E731
    assert (stages(256), stages(512)) == (6, config.MID_SHARED_STAGES)  # 128 / 256 tiles of 64 x 128
    assert config.mid_tile("fwd", 1024, bf16, 4096, 132) is None  # the large 128 x 256 tile: 128 tiles
    assert config.mid_tile("fwd", 768, bf16, 4096, 132) is None  # 96 tiles >= 0.7 x 132
    assert tile(config.mid_tile("fwd", 768, bf16, 4096, 160)) == (128, 128)
    assert config.mid_tile("fwd", 64, bf16, 4096, 132) is None  # the split decode tiles below 65 rows
    assert config.mid_tile("fwd", 256, torch.float32, 4096, 132) is None
    assert config.mid_tile("fwd", 256, bf16, 4096, 0) is None  # not a Hopper GPU
    assert tile(config.mid_tile("fwd", 200, bf16, 64, 132)) == (64, 64)  # nothing fills: the smallest
    override = config.GemmConfig(32, 32, 32)
    config.set_override("fwd", "m256", override)
    try:
        assert config.mid_tile("fwd", 256, bf16, 4096, 132) is None
        assert config.gemm_config("fwd", 256, bf16, 0, 4096, 132) == override
    finally:
        config.set_override("fwd", "m256", None)
    for module in (lora_fwd, lora_bwd):
        monkeypatch.setattr(module, "pdl_enabled", lambda dev: True)
        monkeypatch.setattr(module, "fill_sms", lambda dev: 132)
    K = N = 4096
    arg = lambda plan, name: plan.launch.args[plan.launch.fn.arg_names.index(name)]  # noqa: E731
    try:
        for M, p, mode, blocks, *rank in ((96, 0.0, "shrink", (64, 64)), (128, 0.1, "split", (64, 64)),
                                   (256, 0.0, "split", (64, 128)), (512, 0.0, "split", (128, 128)),
                                   (1024, 0.1, "split", (128, 256)), (8192, 0.0, "producer", (128, 256)),
                                   (8192, 0.1, "shrink", (128, 256)), (2048, 0.0, "producer", (128, 256), 32)):
            x, W, b, A, B = lora_problem(M, K, N, (rank or [16])[0], bf16, "cpu")
            plan = lora_fwd._ForwardPlan(x, W, b, A, B, p, False, "auto", None, "auto", None)
            got = "split" if plan.splits else "shrink" if plan.shrink else "producer" if plan.producer else "other"
            assert (got, (arg(plan, "BLOCK_M"), arg(plan, "BLOCK_N"))) == (mode, blocks), (M, p)
        for M, mode, blocks, r in ((128, "fused", (64, 64), 16), (256, "fused", (64, 128), 32),
                                   (512, "fused", (64, 128), 16), (512, "shrink", (64, 128), 64),
                                   (1024, "inline", (128, 256), 16)):
            dy, W, A, B = (torch.randn(M, N, dtype=bf16), torch.randn(N, K, dtype=bf16),
                           torch.randn(r, K, dtype=bf16), torch.randn(N, r, dtype=bf16))
            plan = lora_bwd._DxPlan(dy, W, A, B, 0.0, True, "auto", None, "auto", None)
            got = "inline" if plan.inline else "shrink" if plan.shrink else "fused"
            assert (got, (arg(plan, "BLOCK_M"), arg(plan, "BLOCK_K"))) == (mode, blocks), (M, r)  # dX's tile: M x K
    finally:
        config.set_override("fwd", "m256", None)  # drops the configs cached while patched, and every plan


def test_cached_device_tensors_come_from_the_driver_only_on_cuda():
    """helpers.driver_copy (the memory of the device tensors kept across calls: NF4 code table, multi-LoRA slice
    tables, the fused GEMV's counters) serves CUDA devices only; elsewhere cached_device_tensor is a plain copy on
    the device, with the same values, and the NF4 code table is cached once per device."""
    helpers = importlib.import_module("lora_fast.kernels.helpers")
    nf4_dequant = importlib.import_module("lora_fast.kernels.nf4_dequant")
    src = torch.arange(-3, 9, dtype=torch.int32).view(3, 4)
    assert helpers.driver_copy(src, "cpu") is None
    out = helpers.cached_device_tensor(src, torch.device("cpu"))
    assert out.dtype == torch.int32 and out.shape == (3, 4) and torch.equal(out, src)
    table = nf4_dequant.nf4_code_table("cpu")
    assert nf4_dequant.nf4_code_table(torch.device("cpu")) is table
    assert table.numel() == nf4_dequant.CODE_TABLE_SIZE
