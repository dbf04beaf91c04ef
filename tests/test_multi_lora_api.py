"""Multi-LoRA API contracts: stale batch metadata after the pool changes, and the argument checks of
MultiLoRALinear / AdapterPool / multi_lora_linear (tiny shapes: the kernels run in Triton's interpreter on CPU)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too; must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402

from lora_fast.multi_lora import AdapterPool, MultiLoRALinear, make_batch_metadata, multi_lora_linear  # noqa: E402
from lora_fast.multi_lora_reference import multi_lora_linear_reference  # noqa: E402

K, N, R = 8, 6, 4


def _adapter(r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)


def _layer(slots=2):
    torch.manual_seed(0)
    pool = AdapterPool(slots, R, dtype=torch.float32)
    return pool, MultiLoRALinear(torch.nn.Linear(K, N), pool, key="p")


def _reference(layer, x, ids):
    """The float64 per-token reference, in fp32."""
    A, B, sizes = layer.pool.layer_stacks(layer.key)
    return multi_lora_linear_reference(x, layer.weight, layer.bias, A, B, layer.pool.scalings, ids,
                                       layer.pool.ranks, sizes).float()


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- stale metadata


def test_metadata_from_before_an_unload_is_refused():
    """Was: after pool.unload("a") the old metadata's "a" tokens silently came out as base only."""
    pool, layer = _layer()
    pool.load("a", {"p": _adapter(seed=1)}, alpha=2)
    meta = pool.batch_metadata(["a", None, "a"])
    x = torch.randn(3, K)
    with torch.no_grad():
        layer(x, meta)  # current: fine
    pool.unload("a")
    with pytest.raises(ValueError, match="BatchMetadata was built before the AdapterPool last loaded or unloaded"):
        layer(x, meta)
    A, B, sizes = pool.layer_stacks("p")
    with pytest.raises(ValueError, match="rebuild it"):  # the functional form with the pool's tensors too
        multi_lora_linear(x, layer.weight, layer.bias, A, B, pool.scalings, meta, ranks=pool.ranks)


def test_metadata_from_before_a_load_into_the_reused_slot_is_refused():
    """Was: tenant b, loaded into a's freed slot, served the tokens the old metadata gave to a."""
    pool, layer = _layer()
    pool.load("a", {"p": _adapter(seed=1)}, alpha=2)
    meta = pool.batch_metadata(["a", None, "a"])
    pool.unload("a")
    assert pool.load("b", {"p": _adapter(seed=2)}, alpha=2) == 0  # a's slot
    x = torch.randn(3, K)
    with pytest.raises(ValueError, match="rebuild it"):
        layer(x, meta)
    # rebuilt metadata (or the old one refilled in place) is current again and serves b where asked
    fresh = pool.batch_metadata(["b", None, "b"])
    with torch.no_grad():
        want = _reference(layer, x, fresh.adapter_ids)
        _close(layer(x, fresh), want)
        meta.update_(pool.ids(["b", None, "b"]))
        _close(layer(x, meta), want)


def test_generation_counts_loads_and_unloads_only():
    pool, layer = _layer(slots=3)
    g0 = pool.generation
    pool.load("a", {"p": _adapter(seed=1)}, alpha=2)
    pool.load("b", {"p": _adapter(seed=2)}, alpha=2)
    pool.unload("a")
    assert pool.generation == g0 + 3
    with pytest.raises(ValueError, match="already loaded"):  # a refused load changes nothing
        pool.load("b", {"p": _adapter()}, alpha=2)
    assert pool.generation == g0 + 3
    meta = pool.batch_metadata(["b", None])
    assert meta.pool is pool and meta.generation == pool.generation


def test_metadata_built_from_a_slot_count_or_used_with_other_tensors_is_not_tied_to_the_pool():
    """Only metadata built from a pool and used with that pool's ranks is compared with the pool's counter."""
    pool, layer = _layer()
    pool.load("a", {"p": _adapter(seed=1)}, alpha=2)
    ids = pool.ids(["a", None, "a"])
    by_count = make_batch_metadata(ids, pool.max_adapters)
    assert by_count.pool is None and by_count.generation is None
    by_pool = pool.batch_metadata(ids)
    pool.load("b", {"p": _adapter(seed=2)}, alpha=2)  # slot 1: ids above still mean a
    x = torch.randn(3, K)
    with torch.no_grad():
        want = _reference(layer, x, ids)
        _close(layer(x, by_count), want)
        A, B, sizes = pool.layer_stacks("p")
        # a snapshot of the ranks (not the pool's own tensor): the caller vouches for the layout
        got = multi_lora_linear(x, layer.weight, layer.bias, A, B, pool.scalings, by_pool, ranks=pool.ranks.clone())
        _close(got, want)


def test_slot_count_with_ranks_rejects_an_empty_slot():
    """make_batch_metadata(ids, S, ranks=...) checks the ids against the ranks: an id naming a rank-0 slot is
    rejected (validate=True), not served as base only."""
    ranks = torch.tensor([0, 2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"adapter_ids\[1\] = 0 points at an empty slot"):
        make_batch_metadata(torch.tensor([1, 0, -1]), 3, ranks=ranks)
    assert make_batch_metadata(torch.tensor([1, 0, -1]), 3, ranks=ranks, validate=False).adapter_ids.tolist() \
        == [1, 0, -1]
    assert make_batch_metadata(torch.tensor([1, 2, -1]), 3, ranks=ranks).num_tokens == 3


# ------------------------------------------------------------------------------------------------- argument checks


def test_pool_on_another_device_than_the_base_layer_is_refused_at_construction():
    """Was: accepted, and the first forward failed on `ranks` / `lora_A_stack` (the meta device stands in for a GPU
    pool under a CPU layer)."""
    pool = AdapterPool(2, R, dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match=r"pool: the AdapterPool is on meta but the base layer's weight is on cpu"):
        MultiLoRALinear(torch.nn.Linear(K, N), pool, key="p")
    assert "p" not in pool._layers  # refused before registering a layer


def test_pool_dtype_that_never_works_is_refused_at_construction():
    """Was: accepted; the first forward then blamed lora_A_stack. A float64 base never meets an fp32 pool (autocast
    leaves float64 alone)."""
    for base_dtype, pool_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        pool = AdapterPool(2, R, dtype=pool_dtype)
        with pytest.raises(TypeError, match=rf"pool: the AdapterPool holds {pool_dtype} adapters but the base "
                                            rf"layer's weight is {base_dtype}: create the pool with dtype"):
            MultiLoRALinear(torch.nn.Linear(K, N, dtype=base_dtype), pool, key="p")


def test_half_pool_under_an_fp32_base_needs_autocast():
    """A bfloat16 pool under an fp32 layer is the autocast setup (the docstring's advice: keep the pool in the
    autocast dtype): built fine, served under autocast, and outside autocast refused naming the pool."""
    torch.manual_seed(0)
    pool = AdapterPool(2, R, dtype=torch.bfloat16)
    layer = MultiLoRALinear(torch.nn.Linear(K, N), pool, key="p")
    pool.load("a", {"p": _adapter(seed=1)}, alpha=2)
    meta = pool.batch_metadata(["a", None, "a"])
    x = torch.randn(3, K)
    with pytest.raises(TypeError, match=r"pool: the AdapterPool holds torch.bfloat16 adapters but the base layer's "
                                        r"weight is torch.float32: outside torch.autocast they must match"):
        layer(x, meta)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, meta)
    assert y.dtype == torch.bfloat16
    A, B, sizes = pool.layer_stacks("p")
    c = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
    want = multi_lora_linear_reference(c(x), c(layer.weight), c(layer.bias), c(A), c(B), pool.scalings.double(),
                                       meta.adapter_ids, pool.ranks, sizes)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)


def test_load_with_no_weights_needs_an_explicit_rank():
    """Was: load(name, {}, alpha) put a silent all-zero rank-1 adapter in a slot."""
    pool, _ = _layer()
    with pytest.raises(ValueError, match=r"weights: no \(A, B\) pair for adapter 'a' \(an empty dict\)"):
        pool.load("a", {}, alpha=2)
    assert pool.names == [] and pool.ranks.tolist() == [0, 0] and pool.generation == 0
    assert pool.load("placeholder", {}, alpha=2, rank=1) == 0  # asked for explicitly: an all-zero adapter


def test_ids_must_have_x_leading_shape():
    """Was: ids of the same count but another shape ([1, 3] for x [3, K]) were accepted. Taken: x's leading shape,
    flat [T] (row-major token order) and, for x [B, L, K], [B] (one adapter per request, as PEFT's adapter_names)."""
    pool, layer = _layer()
    pool.load("a", {"p": _adapter(seed=1)}, alpha=2)
    pool.load("b", {"p": _adapter(seed=2)}, alpha=3)
    x = torch.randn(3, K)
    ids = pool.ids(["a", None, "a"])
    with pytest.raises(ValueError, match=r"batch: adapter ids must be an integer tensor of x's leading shape "
                                         r"\(3,\).*got \(1, 3\)"):
        layer(x, ids.view(1, 3))
    A, B, sizes = pool.layer_stacks("p")
    with pytest.raises(ValueError, match=r"adapter_ids: adapter ids must be an integer tensor of x's leading shape "
                                         r"\(3,\).*got \(1, 3\)"):
        multi_lora_linear(x, layer.weight, layer.bias, A, B, pool.scalings, ids.view(1, 3), ranks=pool.ranks)
    x2 = torch.randn(2, 3, K)
    ids6 = pool.ids(["a", None, "b", "b", "a", None])
    with pytest.raises(ValueError, match=r"leading shape \(2, 3\).*flat \[6\], or \[2\].*got \(3, 2\)"):
        layer(x2, ids6.view(3, 2))  # [L, B] for x [B, L]: a mistake, not a layout
    with torch.no_grad():  # matching shapes (and a BatchMetadata, which is flat, for any leading shape) still work
        want = _reference(layer, x, ids)
        _close(layer(x.view(1, 3, K), ids.view(1, 3)).view(3, N), want)
        _close(layer(x.view(1, 3, K), ids).view(3, N), want)  # flat ids, x's row-major token order
        _close(multi_lora_linear(x.view(1, 3, K), layer.weight, layer.bias, A, B, pool.scalings, ids,
                                 ranks=pool.ranks).view(3, N), want)
        _close(layer(x.view(1, 3, K), pool.batch_metadata(ids)).view(3, N), want)
        # one id per request: every token of request b takes ids[b]
        per_request = pool.ids(["b", None])
        per_token = per_request[:, None].expand(2, 3)
        _close(layer(x2, per_request), _reference(layer, x2.view(6, K), per_token.reshape(6)).view(2, 3, N))
