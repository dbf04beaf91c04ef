"""Batched multi-adapter LoRA: kernels (through Triton's interpreter on CPU), metadata, pool, module, validation.

Every check compares with the per-token float64 reference by relative error ||out - ref|| / ||ref||; outputs and the
kernels' xa workspace are filled with NaN first, so an element left unwritten (or read unwritten) shows.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too; must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

from lora_fast.functional import use_triton  # noqa: E402
from lora_fast.kernels import multi_lora as kml  # noqa: E402
from lora_fast.multi_lora import (AdapterPool, BatchMetadata, MultiLoRALinear, _multi_lora_torch,  # noqa: E402
                                  make_batch_metadata, multi_lora_linear)
from lora_fast.multi_lora_reference import multi_lora_linear_reference  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 4e-3, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _nan_workspace(monkeypatch):
    monkeypatch.setattr(kml, "DEBUG_FILL_WORKSPACE", True)


# The kernel paths a call can take: the interpreter's default (our GEMM with the LoRA epilogue, the GPU's path up
# to 16 tokens) and the GPU's path from 32 tokens (LoRA term + bias written first, cuBLAS adds X·Wᵀ: "addmm"), with
# the expand reading the shrink's partials or computing xa itself ("delta"), and the decode kernels with one sorted
# row per program ("rows": small chunks here, so that K and N take several programs and the tails are masked), and
# our W-stream GEMM (kernels/wstream.py) adding X·Wᵀ instead of cuBLAS, or writing X·Wᵀ + b before the expand
# adds the term ("first"), or before the shrink too ("lead", the GPU default at 17-64 tokens, its shrink walking K
# in steps), or adding the LoRA term itself after the rows shrink ("lora": no expand; its tokens' terms as extra K
# steps of the GEMM, 16 columns per row tile here, so that a slice table of odd widths falls back to "lead").
PATHS = {"triton": None, "addmm": dict(BASE="addmm", EXPAND="segment"),
         "addmm_delta": dict(BASE="addmm", EXPAND="delta", D_CHUNKS=3),
         "addmm_rows": dict(BASE="addmm", EXPAND="rows", R_S_ELEMS=256, R_E_ELEMS=512),
         "rows_wstream": dict(BASE="addmm", EXPAND="rows", R_S_ELEMS=256, R_E_ELEMS=512, GEMM="triton"),
         "rows_gemm_first": dict(BASE="addmm", EXPAND="rows", R_S_ELEMS=256, R_E_ELEMS=512, GEMM="first"),
         "rows_gemm_lead": dict(BASE="addmm", EXPAND="rows", R_S_ELEMS=128, R_S_STEPS=2, R_E_ELEMS=512,
                                GEMM="lead"),
         "rows_gemm_lora": dict(BASE="addmm", EXPAND="rows", R_S_ELEMS=128, R_S_STEPS=2, GEMM="lora")}


@pytest.fixture(params=list(PATHS))
def path(request):
    kml.set_config_override(PATHS[request.param])
    yield request.param
    kml.set_config_override(None)


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(out, ref, dtype, what=""):
    out = out.detach()
    assert not torch.isnan(out).any(), f"{what}: NaN at {torch.isnan(out).nonzero()[:5].tolist()}"
    err = rel_err(out, ref)
    if err > TOL[dtype]:
        bad = ((out.double() - ref.double()).abs() > 10 * TOL[dtype] * ref.double().abs().max()).nonzero()
        raise AssertionError(f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g}; first mismatches {bad[:5].tolist()}")


def make_case(T, S, R, K, N, dtype, seed, n_slices=1, base_frac=0.2, mixed_ranks=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    A = (torch.randn(S, n_slices, R, K, generator=g) / K**0.5).to(dtype)
    B = (torch.randn(S, N, R, generator=g) / R**0.5).to(dtype)
    scal = torch.rand(S, generator=g) + 0.5
    ranks = torch.randint(1, R + 1, (S,), generator=g, dtype=torch.int32) if mixed_ranks \
        else torch.full((S,), R, dtype=torch.int32)
    ids = torch.randint(0, S, (T,), generator=g, dtype=torch.int32)
    ids[torch.rand(T, generator=g) < base_frac] = -1
    return x, W, b, A, B, scal, ranks, ids


def run(x, W, b, A, B, scal, ranks, ids, slice_sizes=None):
    out = torch.full((x.shape[0], W.shape[0]), float("nan"), dtype=x.dtype)
    return multi_lora_linear(x, W, b, A, B, scal, ids, ranks=ranks, slice_sizes=slice_sizes, out=out)


def test_cpu_runs_the_triton_kernels():
    assert use_triton(torch.empty(1)), "tests must run the Triton kernels through TRITON_INTERPRET=1"


@pytest.mark.parametrize("T,S,R,K,N,dtype,mixed", [
    (0, 3, 16, 32, 48, torch.float32, False),
    (1, 1, 16, 64, 48, torch.float32, False),
    (1, 4, 16, 64, 48, torch.bfloat16, False),
    (5, 123 % 7, 8, 33, 17, torch.float32, True),        # weird shapes, rank below the chunk
    (37, 5, 64, 70, 65, torch.bfloat16, True),           # ranks 1..64 in one pool
    (40, 64, 16, 64, 70, torch.float32, False),          # 64 adapters (more than tokens)
    (23, 8, 32, 40, 24, torch.float64, True),
])
def test_matches_per_token_reference(T, S, R, K, N, dtype, mixed, path):
    x, W, b, A, B, scal, ranks, ids = make_case(T, S, R, K, N, dtype, seed=T * 7 + S, mixed_ranks=mixed)
    y = run(x, W, b, A, B, scal, ranks, ids)
    assert y.shape == (T, N) and y.dtype == dtype
    if T:
        assert_close(y, multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks), dtype, "kernel vs reference")
        assert_close(_multi_lora_torch(x, W, b, A, B, scal, ranks, ids, (N,)),
                     multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks), dtype, "torch path vs reference")


@pytest.mark.parametrize("case", ["all_base", "all_one_adapter", "no_bias"])
def test_degenerate_mixes(case, path):
    T, S, R, K, N = 19, 6, 16, 48, 40
    x, W, b, A, B, scal, ranks, ids = make_case(T, S, R, K, N, torch.float32, seed=3)
    if case == "all_base":
        ids = torch.full((T,), -1, dtype=torch.int32)
    elif case == "all_one_adapter":
        ids = torch.full((T,), 4, dtype=torch.int32)
    else:
        b = None
    assert_close(run(x, W, b, A, B, scal, ranks, ids),
                 multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks), torch.float32, case)


def test_true_rank_ignores_padded_rows(path):
    """Rows of A and columns of B beyond a slot's rank hold garbage: the result must not see them."""
    T, S, R, K, N = 21, 4, 64, 40, 36
    x, W, b, A, B, scal, _, ids = make_case(T, S, R, K, N, torch.float32, seed=11)
    ranks = torch.tensor([4, 16, 17, 64], dtype=torch.int32)
    ref = multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks)
    for s, r in enumerate(ranks.tolist()):
        A[s, :, r:] = 1e30
        B[s, :, r:] = float("nan")
    assert_close(run(x, W, b, A, B, scal, ranks, ids), ref, torch.float32, "mixed ranks")


def test_multi_slice_qkv(path):
    T, S, R, K = 17, 5, 16, 48
    sizes = (40, 16, 24)
    x, W, b, A, B, scal, ranks, ids = make_case(T, S, R, K, sum(sizes), torch.bfloat16, seed=5, n_slices=3,
                                                mixed_ranks=True)
    y = run(x, W, b, A, B, scal, ranks, ids, slice_sizes=sizes)
    assert_close(y, multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks, sizes), torch.bfloat16, "qkv")


def test_tenant_isolation_under_permutation_and_mixing(path):
    """Each row equals that token's single-adapter result, whatever else is in the batch (on every kernel path)."""
    T, S, R, K, N = 24, 7, 16, 40, 33
    x, W, b, A, B, scal, ranks, ids = make_case(T, S, R, K, N, torch.float32, seed=9, mixed_ranks=True)
    y = run(x, W, b, A, B, scal, ranks, ids)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(1))
    assert_close(run(x[perm], W, b, A, B, scal, ranks, ids[perm]), y[perm], torch.float32, "permuted batch")
    # each token alone with its adapter, and each tenant's tokens alone
    for t in (0, 7, T - 1):
        assert_close(run(x[t:t + 1], W, b, A, B, scal, ranks, ids[t:t + 1]), y[t:t + 1], torch.float32, f"token {t}")
    for a in ids.unique().tolist()[:3]:
        rows = (ids == a).nonzero()[:, 0]
        assert_close(run(x[rows], W, b, A, B, scal, ranks, ids[rows]), y[rows], torch.float32, f"tenant {a}")
    # mixing in tokens of other adapters leaves the original rows unchanged
    extra_x, extra_ids = torch.randn(9, K), torch.randint(0, S, (9,), dtype=torch.int32)
    mixed = run(torch.cat([extra_x, x]), W, b, A, B, scal, ranks, torch.cat([extra_ids, ids]))
    assert_close(mixed[9:], y, torch.float32, "mixed with other tenants")


@pytest.mark.parametrize("bad,needle", [(7, "outside [-1, 7)"), (-2, "outside [-1, 7)"), (100, "outside")])
def test_bad_ids_raise_before_any_kernel(monkeypatch, bad, needle):
    x, W, b, A, B, scal, ranks, ids = make_case(6, 7, 16, 32, 24, torch.float32, seed=2)
    ids[3] = bad
    monkeypatch.setattr(kml, "multi_lora_forward", lambda *a, **k: pytest.fail("a kernel ran"))
    with pytest.raises(ValueError, match=r"adapter_ids\[3\]") as info:
        multi_lora_linear(x, W, b, A, B, scal, ids, ranks=ranks)
    assert needle in str(info.value)


def test_empty_slot_and_wrong_types_raise():
    x, W, b, A, B, scal, ranks, ids = make_case(6, 4, 16, 32, 24, torch.float32, seed=2)
    ranks[2] = 0  # empty slot
    ids[:] = 2
    with pytest.raises(ValueError, match=r"adapter_ids\[0\] = 2 points at an empty slot"):
        multi_lora_linear(x, W, b, A, B, scal, ids, ranks=ranks)
    with pytest.raises(ValueError, match="adapter_ids must be an integer tensor"):
        multi_lora_linear(x, W, b, A, B, scal, ids.float(), ranks=ranks)
    with pytest.raises(ValueError, match="adapter_ids"):
        multi_lora_linear(x, W, b, A, B, scal, ids[:3], ranks=ranks)
    with pytest.raises(ValueError, match="lora_B_stack"):
        multi_lora_linear(x, W, b, A, B[:, :5], scal, ids, ranks=ranks)
    with pytest.raises(ValueError, match="slice_sizes"):
        multi_lora_linear(x, W, b, A, B, scal, ids, ranks=ranks, slice_sizes=(10, 14))
    with pytest.raises(ValueError, match="scalings"):
        multi_lora_linear(x, W, b, A, B, scal[:2], ids, ranks=ranks)


def test_unvalidated_invalid_ids_are_base_only():
    """With validation skipped (graph capture), invalid ids never read out of bounds: they compute as base."""
    x, W, b, A, B, scal, ranks, ids = make_case(10, 4, 16, 32, 24, torch.float32, seed=4)
    ids[2], ids[5] = 9, -7
    meta = make_batch_metadata(ids, 4, ranks=ranks, validate=False)
    clean = ids.clone()
    clean[2] = clean[5] = -1
    assert_close(run(x, W, b, A, B, scal, ranks, meta), multi_lora_linear_reference(x, W, b, A, B, scal, clean, ranks),
                 torch.float32, "base-only fallback")


def test_metadata_layout_and_update_in_place():
    ids = torch.tensor([3, -1, 3, 0, 5, 0, 3], dtype=torch.int32)
    meta = make_batch_metadata(ids, 6)
    assert isinstance(meta, BatchMetadata) and meta.max_segs == 7
    assert ids[meta.perm.long()].tolist() == [-1, 0, 0, 3, 3, 3, 5]
    assert meta.perm.tolist() == [1, 3, 5, 0, 2, 6, 4]  # stable
    assert meta.seg_of.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert meta.seg_start.tolist() == [0, 1, 3, 6, 7, 7, 7, 7]
    assert meta.seg_adapter.tolist() == [-1, 0, 3, 5, -1, -1, -1]
    buffers = [meta.perm.data_ptr(), meta.seg_start.data_ptr(), meta.seg_adapter.data_ptr()]
    new = torch.tensor([1, 1, 1, 1, 1, 1, 1], dtype=torch.int32)
    meta.update_(new)
    assert buffers == [meta.perm.data_ptr(), meta.seg_start.data_ptr(), meta.seg_adapter.data_ptr()]
    assert meta.seg_adapter.tolist()[:2] == [1, -1] and meta.seg_start.tolist()[:2] == [0, 7]
    with pytest.raises(ValueError, match="adapter_ids"):
        meta.update_(torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"adapter_ids\[0\]"):
        meta.update_(torch.full((7,), 6, dtype=torch.int32))


def test_pool_layout_and_strided_x(path):
    """On every kernel path: the pool's own layout (B stored transposed, so lora_B's rank stride is not 1), mixed
    ranks with an empty slot, and an x whose K stride is 2 (a view, not copied)."""
    torch.manual_seed(3)
    K, N, T = 40, 36, 21
    pool = AdapterPool(max_adapters=4, max_rank=16, dtype=torch.float32)
    layer = MultiLoRALinear(torch.nn.Linear(K, N), pool, key="p")
    for name, r in (("a", 3), ("b", 16), ("c", 9)):
        pool.load(name, {"p": (torch.randn(r, K), torch.randn(N, r))}, alpha=r)
    A, B, sl = pool.layer_stacks("p")
    assert B.stride(-1) != 1  # [S, N, R] view of the pool's [S, R, N] storage
    ids = torch.tensor([i % 4 - 1 for i in range(T)], dtype=torch.int32)  # -1, a, b, c, -1, ...
    x = torch.randn(T, 2 * K)[:, ::2]
    assert x.stride(-1) == 2
    ref = multi_lora_linear_reference(x, layer.weight, layer.bias, A, B, pool.scalings, ids, pool.ranks, sl)
    with torch.no_grad():
        assert_close(layer(x, pool.batch_metadata(ids)), ref, torch.float32, path)


def test_pool_and_module_mixed_ranks_and_slices():
    torch.manual_seed(0)
    K, sizes, T = 32, (24, 8, 8), 15
    pool = AdapterPool(max_adapters=4, max_rank=32, dtype=torch.float32)
    qkv = MultiLoRALinear(torch.nn.Linear(K, sum(sizes)), pool, key="qkv", slice_sizes=sizes)
    down = MultiLoRALinear(torch.nn.Linear(K, 20, bias=False), pool, key="down")
    weights = {}
    for name, r in (("a", 4), ("b", 32), ("c", 16)):
        w = {"qkv": [(torch.randn(r, K), torch.randn(n, r)) for n in sizes]}
        if name != "c":  # adapter c does not touch `down`
            w["down"] = (torch.randn(r, K), torch.randn(20, r))
        weights[name] = (w, r)
        pool.load(name, w, alpha=2.0 * r, use_rslora=name == "b")
    assert pool.names == ["a", "b", "c"] and pool.ranks.tolist() == [4, 32, 16, 0]
    assert pool.scalings.tolist()[:3] == pytest.approx([2.0, 64 / 32**0.5, 2.0])
    names = ["b", None, "a", "c", "a", "b", None, "c", "c", "a", "b", "b", None, "a", "c"]
    meta = pool.batch_metadata(names)
    x = torch.randn(3, 5, K)  # any leading shape
    for layer in (qkv, down):
        A, B, sl = pool.layer_stacks(layer.key)
        y = layer(x, meta)
        ref = multi_lora_linear_reference(x, layer.weight, layer.bias, A, B, pool.scalings, meta.adapter_ids,
                                          pool.ranks, sl)
        assert y.shape == (3, 5, sum(sl))
        assert_close(y, ref, torch.float32, layer.key)
    # the reference built from the adapters' own matrices, for one token of each
    for t, name in ((0, "b"), (2, "a"), (3, "c")):
        w, r = weights[name]
        s = pool.scalings[pool.slot(name)]
        xt = x.reshape(T, K)[t]
        want = torch.cat([qkv.weight[o:o + n] @ xt + qkv.bias[o:o + n] + s * (B_ @ (A_ @ xt))
                          for (A_, B_), n, o in zip(w["qkv"], sizes, (0, 24, 32))])
        assert_close(qkv(x.reshape(T, K)[t:t + 1], pool.ids([name]))[0], want, torch.float32, f"qkv {name}")
    with pytest.raises(ValueError, match=r"x: must be \[\.\.\., in_features=32\]"):  # x is named, not the weight
        qkv(torch.randn(T, K + 1), meta)
    # unload: the slot is empty (rejected), then reused by the next load without reallocating
    A_ptr = pool.layer_stacks("qkv")[0].data_ptr()
    pool.unload("a")
    with pytest.raises(ValueError, match="empty slot"):
        pool.batch_metadata(torch.tensor([0]))
    with pytest.raises(KeyError):
        pool.ids(["a"])
    assert pool.load("d", {"down": (torch.randn(8, K), torch.randn(20, 8))}, alpha=8) == 0
    assert pool.layer_stacks("qkv")[0].data_ptr() == A_ptr
    with pytest.raises(ValueError, match="already loaded"):
        pool.load("d", {}, alpha=1)
    with pytest.raises(ValueError, match="rank"):
        pool.load("e", {"down": (torch.randn(40, K), torch.randn(20, 40))}, alpha=1)
    pool.load("e", {}, alpha=1, rank=1)
    with pytest.raises(RuntimeError, match="full"):
        pool.load("f", {}, alpha=1, rank=1)


@pytest.mark.parametrize("variant", [dict(GATHER=True), dict(BASE="cublas"), dict(GATHER=True, BASE="cublas"),
                                     dict(BLOCK_M=32, BLOCK_N=16, SPLIT_K=1), dict(BASE="cublas", EXPAND="segment"),
                                     dict(BASE="cublas", EXPAND="segment", E_BLOCK_M=32, E_BLOCK_N=32),
                                     dict(BASE="addmm", EXPAND="segment", E_BLOCK_M=32, E_BLOCK_N=32),
                                     dict(BASE="addmm", EXPAND="segment", E_CHUNKS=1, E_BLOCK_N=16, SPLIT_K=3),
                                     dict(BASE="addmm", EXPAND="delta", D_BLOCK_M=32, D_CHUNKS=5),
                                     dict(BASE="addmm", EXPAND="rows", R_S_ELEMS=128, R_E_ELEMS=128),
                                     dict(BASE="addmm", EXPAND="rows", E_PDL=False, SPLIT_K=3),
                                     dict(BASE="addmm", EXPAND="segment", GEMM="triton", W_BLOCK_K=16),
                                     dict(BASE="addmm", EXPAND="delta", GEMM="triton", W_BLOCK_N=32),
                                     dict(BASE="addmm", EXPAND="rows", GEMM="triton", W_BLOCK_T=32),
                                     dict(BASE="addmm", EXPAND="segment", GEMM="first", W_BLOCK_K=16),
                                     dict(BASE="addmm", EXPAND="delta", GEMM="first", D_CHUNKS=3),
                                     dict(BASE="addmm", EXPAND="rows", GEMM="first", SPLIT_K=3),
                                     dict(BASE="addmm", EXPAND="segment", GEMM="lead", W_BLOCK_K=16),
                                     dict(BASE="addmm", EXPAND="rows", GEMM="lead", SPLIT_K=3, W_BLOCK_T=32),
                                     dict(BASE="addmm", EXPAND="rows", GEMM="lead", R_S_ELEMS=128, R_S_STEPS=2)])
def test_epilogue_and_base_variants(variant):
    """The per-row gather epilogue (decode), the cuBLAS-base + LoRA-epilogue paths and the addmm path (bias +
    LoRA term written first, cuBLAS adds X·Wᵀ; xa from the shrink or computed in the expand) agree too."""
    T, S, R, K, N = 29, 9, 32, 48, 40
    sizes = (24, 16)
    x, W, b, A, B, scal, ranks, ids = make_case(T, S, R, K, N, torch.bfloat16, seed=21, n_slices=2, mixed_ranks=True)
    kml.set_config_override(variant)
    try:
        y = run(x, W, b, A, B, scal, ranks, ids, slice_sizes=sizes)
    finally:
        kml.set_config_override(None)
    assert_close(y, multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks, sizes), torch.bfloat16, str(variant))


@pytest.mark.parametrize("variant", [dict(BASE="cublas"), dict(BASE="cublas", EXPAND="segment"),
                                     dict(BASE="addmm", EXPAND="segment"), dict(BASE="addmm", EXPAND="delta"),
                                     dict(BASE="addmm", EXPAND="rows", GEMM="triton"),
                                     dict(BASE="addmm", EXPAND="rows", GEMM="first"),
                                     dict(BASE="addmm", EXPAND="rows", GEMM="lead")])
def test_module_with_trainable_base_on_cublas_paths(variant):
    """A MultiLoRALinear built from a plain nn.Linear (weight and bias still require grad) runs the cuBLAS base
    paths outside no_grad: the base GEMM writing into the output buffer must not meet autograd (H100 regression)."""
    torch.manual_seed(5)
    K, N, T = 40, 24, 11
    pool = AdapterPool(max_adapters=3, max_rank=16, dtype=torch.float32)
    lin = torch.nn.Linear(K, N)
    assert lin.weight.requires_grad
    layer = MultiLoRALinear(lin, pool, key="proj")
    for name, r in (("a", 3), ("b", 16)):
        pool.load(name, {"proj": (torch.randn(r, K), torch.randn(N, r))}, alpha=r)
    ids = pool.ids(["a", "b", None, "b", "a", "a", None, "b", "b", "a", "b"])
    x = torch.randn(T, K)
    kml.set_config_override(variant)
    try:
        y = layer(x, ids)
    finally:
        kml.set_config_override(None)
    A, B, sl = pool.layer_stacks("proj")
    ref = multi_lora_linear_reference(x, lin.weight, lin.bias, A, B, pool.scalings, ids, pool.ranks, sl)
    assert_close(y, ref, torch.float32, str(variant))


def test_rows_path_is_taken_and_needs_the_ids():
    """The decode "rows" kernels run when the config asks for them (through `multi_lora_linear`, which passes the
    metadata's ids); the launcher called without ids falls back to the segment expand, with the same result."""
    T, S, R, K, N = 9, 4, 16, 40, 24
    x, W, b, A, B, scal, ranks, ids = make_case(T, S, R, K, N, torch.float32, seed=77, mixed_ranks=True)
    ref = multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks)
    kml.set_config_override(dict(BASE="addmm", EXPAND="rows", R_S_ELEMS=256))
    try:
        assert_close(run(x, W, b, A, B, scal, ranks, ids), ref, torch.float32, "rows")
        assert [p.expand for p in kml._PLANS.values()] == ["rows"]
        meta = make_batch_metadata(ids, S)
        out = torch.full((T, N), float("nan"))
        kml.multi_lora_forward(x, W, b, A, B, scal, ranks, meta.perm, meta.seg_of, meta.seg_start,
                               meta.seg_adapter, (N,), out=out)
        assert_close(out, ref, torch.float32, "launcher without ids")
        assert sorted(p.expand for p in kml._PLANS.values()) == ["rows", "segment"]
    finally:
        kml.set_config_override(None)


def test_cached_plan_serves_new_tensors_and_configs(path):
    """A second call with the same signature reuses the first call's plan (checks, config, argument lists) with its
    own tensors: new x, weights, adapters and adapter mix give their own results; an override rebuilds plans."""
    T, S, R, K, N = 13, 5, 16, 40, 24
    first = make_case(T, S, R, K, N, torch.float32, seed=41, mixed_ranks=True)
    second = make_case(T, S, R, K, N, torch.float32, seed=42, mixed_ranks=True)
    for x, W, b, A, B, scal, ranks, ids in (first, second, first):
        assert_close(run(x, W, b, A, B, scal, ranks, ids), multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks),
                     torch.float32, "plan reuse")
    assert len(kml._PLANS) >= 1
    kml.set_config_override(dict(kml._OVERRIDE, E_CHUNKS=1, SPLIT_K=1))
    assert len(kml._PLANS) == 0
    x, W, b, A, B, scal, ranks, ids = second
    assert_close(run(x, W, b, A, B, scal, ranks, ids), multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks),
                 torch.float32, "after an override")


def test_serving_demo_batched_equals_alone():
    """examples/serve_multi_lora.py at its smallest through the interpreter: one batch of requests on two adapters
    of different ranks and the base; each request's logits at every step equal its run alone (fed the same
    tokens), and the per-adapter loop agrees."""
    import importlib
    import sys
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    sys.path.insert(0, examples)
    try:
        demo = importlib.import_module("serve_multi_lora")
    finally:
        sys.path.remove(examples)
    report = demo.main(["--device", "cpu", "--layers", "1", "--batch", "4", "--adapters", "2", "--new-tokens", "2",
                        "--dim", "64"])
    assert report["ok"] and report["checked"] == 4 and report["identical_sequences"] == 4
    assert report["alone_rel_err"] < 1e-4 and report["loop_vs_ours_rel_err"] < 1e-4


def test_python_scalings_inside_a_graph_capture_get_a_named_error(monkeypatch):
    """scalings / ranks given as Python numbers need a host-to-device copy, which a CUDA graph capture cannot hold:
    the error names the argument (checked without a GPU: the capture state is faked)."""
    from lora_fast import multi_lora as ml
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(ValueError, match="scalings: Python numbers cannot be copied to the GPU inside a CUDA graph"):
        ml._checked_scalings(2.0, 3, torch.device("cuda"))
    with pytest.raises(ValueError, match="ranks: Python numbers"):
        ml._checked_ranks([4, 4, 0], 3, 4, torch.device("cuda"))
    assert ml._checked_scalings([1.0, 2.0], 2, torch.device("cpu")).tolist() == [1.0, 2.0]  # CPU: no capture


def test_wstream_gemm_default_needs_pdl():
    """The GPU default at 17-64 tokens (N <= 4096, 16-bit) runs our W-stream GEMM first ("lead", with the rows
    kernels; "triton" after the expand where the segment kernels serve 64 tokens), but only with PDL: where PDL is
    off (here: the interpreter) the plan takes cuBLAS instead, with the same result. An explicit GEMM runs the
    W-stream GEMM whatever PDL does. The fallback from "lead" also gives the rows shrink back its one-step tiles,
    whose latency is then on the critical path."""
    for T in (32, 64):
        cfg = kml._config(T, 4096, 4096, 16, torch.bfloat16, True)
        assert cfg["GEMM"] == "lead" and cfg["G_ONLY_PDL"] and cfg["EXPAND"] == "rows"
        assert cfg["R_S_STEPS"] > 1
    cfg = kml._config(64, 4096, 4096, 128, torch.bfloat16, True)  # rank x (K + N) too large for the rows kernels
    assert cfg["GEMM"] == "triton" and cfg["EXPAND"] == "segment"
    assert "GEMM" not in kml._config(64, 4096, 14336, 16, torch.bfloat16, True)
    assert "GEMM" not in kml._config(64, 4096, 4096, 16, torch.float32, True)
    T, S, R, K, N = 7, 3, 16, 40, 24
    x, W, b, A, B, scal, ranks, ids = make_case(T, S, R, K, N, torch.float32, seed=91, mixed_ranks=True)
    ref = multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks)
    lead_tiles = dict(R_S_ELEMS=128, R_S_STEPS=4, R_E_ELEMS=256)
    for gemm_cfg, expected in ((dict(GEMM="triton", G_ONLY_PDL=True), "cublas"), (dict(GEMM="triton"), "triton"),
                               (dict(GEMM="lead", G_ONLY_PDL=True, **lead_tiles), "cublas"),
                               (dict(GEMM="lead", **lead_tiles), "lead")):
        kml.set_config_override(dict(dict(BASE="addmm", EXPAND="rows", R_S_ELEMS=256), **gemm_cfg))
        try:
            assert_close(run(x, W, b, A, B, scal, ranks, ids), ref, torch.float32, str(gemm_cfg))
            assert [p.gemm for p in kml._PLANS.values()] == [expected]
            (plan,) = kml._PLANS.values()
            if gemm_cfg["GEMM"] == "lead":  # lead's K-stepping shrink tiles; back to the rows defaults without it
                assert plan.cfg["R_S_STEPS"] == (4 if expected == "lead" else 1)
        finally:
            kml.set_config_override(None)


def test_gemm_lead_needs_a_shrink():
    """GEMM="lead" (the W-stream GEMM first, the shrink waiting for it as its programs exit) has no shrink to carry
    that wait with the "delta" expand, which computes xa itself: refused with a clear error, not run unordered."""
    T, S, R, K, N = 5, 2, 16, 32, 16
    x, W, b, A, B, scal, ranks, ids = make_case(T, S, R, K, N, torch.float32, seed=93)
    kml.set_config_override(dict(BASE="addmm", EXPAND="delta", GEMM="lead"))
    try:
        with pytest.raises(ValueError, match="GEMM='lead' needs a shrink kernel"):
            run(x, W, b, A, B, scal, ranks, ids)
    finally:
        kml.set_config_override(None)


@pytest.mark.parametrize("T,S,R,sizes,dtype,mixed,pool", [
    (37, 5, 16, (32, 16, 48), torch.bfloat16, True, False),  # 3 slices, 3 row tiles of 16, ranks 1..16
    (37, 5, 16, (32, 16, 48), torch.bfloat16, True, True),   # the same with the pool's B layout (N contiguous)
    (40, 40, 64, (48,), torch.float32, True, False),          # 40 adapters, rank 64
    (1, 1, 8, (16,), torch.float32, False, True),             # rank 8: the rank block is 16 wide
    (19, 3, 20, (64, 32), torch.float16, True, False),        # R = 20, not a multiple of 8: one rank row a step
])
def test_gemm_lora_adds_each_tokens_term(T, S, R, sizes, dtype, mixed, pool):
    """GEMM="lora": the rows shrink, then the W-stream GEMM adds each token's LoRA term after its K loop, from B
    rows gathered by token (8 rank rows a step where B's rank is contiguous, one where N is). The plan must take
    it (not fall back), and every row must equal its per-token reference: mixed ranks with the padded rows of A and
    B poisoned (read up to the rank rounded to 8, then zeroed), base-only tokens, several slices and row tiles;
    y starts as NaN and the workspace is NaN-filled."""
    K = 40
    x, W, b, A, B, scal, ranks, ids = make_case(T, S, R, K, sum(sizes), dtype, seed=T + S + R,
                                                n_slices=len(sizes), mixed_ranks=mixed)
    ref = multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks, sizes)
    if pool:  # the pool keeps Bt [S, R, N]: B viewed with N contiguous
        B = B.transpose(1, 2).contiguous().transpose(1, 2)
    for s, r in enumerate(ranks.tolist()):
        A[s, :, r:] = 1e4
        B[s, :, r:] = float("nan")
    kml.set_config_override(dict(BASE="addmm", EXPAND="rows", R_S_ELEMS=128, R_S_STEPS=2, GEMM="lora"))
    try:
        y = run(x, W, b, A, B, scal, ranks, ids, slice_sizes=sizes)
        assert [p.gemm for p in kml._PLANS.values()] == ["lora"]
        assert_close(y, ref, dtype, f"lora GEMM {sizes}")
        y2 = run(x, W, None, A, B, scal, ranks, ids, slice_sizes=sizes)  # no bias
        assert_close(y2, ref - b.double(), dtype, "lora GEMM without bias")
    finally:
        kml.set_config_override(None)


def test_gemm_lora_falls_back_where_a_tile_would_straddle_slices():
    """A slice width that is not a multiple of the GEMM's BLOCK_N would put two slices (two xa workspaces) in one
    tile: the plan takes "lead" instead, with the same result; and "lora" needs the rows kernels (the ids)."""
    T, S, R, K, sizes = 9, 3, 16, 32, (40, 24)
    x, W, b, A, B, scal, ranks, ids = make_case(T, S, R, K, sum(sizes), torch.float32, seed=97, n_slices=2)
    ref = multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks, sizes)
    for cfg, expected in ((dict(BASE="addmm", EXPAND="rows", GEMM="lora"), "lead"),
                          (dict(BASE="addmm", EXPAND="rows", GEMM="lora", W_BLOCK_N=8), "lora"),
                          (dict(BASE="addmm", EXPAND="segment", GEMM="lora", W_BLOCK_N=8), "lead")):
        kml.set_config_override(cfg)
        try:
            assert_close(run(x, W, b, A, B, scal, ranks, ids, slice_sizes=sizes), ref, torch.float32, str(cfg))
            assert [p.gemm for p in kml._PLANS.values()] == [expected], cfg
        finally:
            kml.set_config_override(None)


def test_rows_expand_tile_follows_the_b_layout():
    """The rows expand's columns per program: R_E_ELEMS / BLOCK_R for B [S, N, R] (rank contiguous); where N is
    contiguous (the pool's layout) at least 256 per warp at one rank chunk, so that no warp splits the rank rows;
    never past the widest slice's power of two."""
    S, N, R = 4, 4096, 16
    B = torch.empty(S, N, R)
    pool_B = torch.empty(S, R, N).transpose(1, 2)
    cfg = dict(R_E_ELEMS=8192, r_e_num_warps=4)
    assert kml._rows_block_n(B, (N,), cfg, 16) == 512
    assert kml._rows_block_n(pool_B, (N,), cfg, 16) == 1024
    assert kml._rows_block_n(pool_B, (N,), dict(cfg, r_e_num_warps=8), 16) == 2048
    assert kml._rows_block_n(pool_B, (300, 200), cfg, 16) == 512  # the widest slice, 300 -> 512
    pool_B64 = torch.empty(S, 64, N).transpose(1, 2)
    assert kml._rows_block_n(pool_B64, (N,), cfg, 64) == 128     # larger ranks keep R_E_ELEMS / BLOCK_R
    assert kml._rows_block_n(B, (8,), cfg, 16) == 16
    assert kml._rows_block_n(pool_B, (N,), dict(cfg, R_POOL_COLS_PER_WARP=0), 16) == 512  # off: as before


def test_rows_path_with_the_pool_layout_of_b():
    """The rows kernels ("lead" and the plain addmm path) with B as the pool keeps it (N contiguous): the larger
    expand tile gives the per-token reference, the padded rank rows poisoned."""
    T, S, R, K, N = 23, 6, 16, 40, 1100
    x, W, b, A, B, scal, ranks, ids = make_case(T, S, R, K, N, torch.float32, seed=101, mixed_ranks=True)
    ref = multi_lora_linear_reference(x, W, b, A, B, scal, ids, ranks)
    B = B.transpose(1, 2).contiguous().transpose(1, 2)
    for s, r in enumerate(ranks.tolist()):
        B[s, :, r:] = float("nan")
    for cfg in (PATHS["addmm_rows"], PATHS["rows_gemm_lead"]):
        kml.set_config_override(cfg)
        try:
            assert_close(run(x, W, b, A, B, scal, ranks, ids), ref, torch.float32, f"pool layout {cfg}")
        finally:
            kml.set_config_override(None)
