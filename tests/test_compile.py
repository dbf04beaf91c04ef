"""The `lora_fast::` ops: opcheck for each, and torch.compile(fullgraph=True) of models with LoRALinear and
MultiLoRALinear (training and inference) against eager; the dropout seed under compile; the multi-adapter dx.

On the CPU the ops run the Triton kernels through the interpreter (conftest sets TRITON_INTERPRET=1). The model test
uses the aot_eager backend (inductor's cold C++ compile of its elementwise ops costs a minute of CI); the dropout
tests go through inductor. bench/gpu_compile.py compiles everything with inductor on the GPU. fullgraph=True turns any graph break into an error, and a CompileCounter backend
counts the captured graphs. Sizes are tiny: the interpreter and the CPU compiler are slow.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it too; must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo.testing  # noqa: E402  (CompileCounterWithBackend)
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lora_fast import LoRALinear, ops  # noqa: E402
from lora_fast.multi_lora import AdapterPool, MultiLoRALinear, _multi_lora_torch, multi_lora_backward_dx  # noqa: E402
from tests.utils import assert_close, seeded_grads  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.HAS_CUSTOM_OPS, reason="torch without torch.library.custom_op")


def _lora_args(M=5, K=12, N=10, r=3, requires_grad=False, bias=True):
    g = torch.Generator().manual_seed(M * 100 + K)
    t = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, W, A, B = t(M, K), t(N, K) / K**0.5, t(r, K) / K**0.5, t(N, r)
    b = t(N) if bias else None
    if requires_grad:
        for v in (x, A, B):
            v.requires_grad_(True)
    return x, W, b, A, B


def test_opcheck_lora_forward_and_backward_ops():
    seed = torch.tensor([1234], dtype=torch.int64)
    x, W, b, A, B = _lora_args()
    torch.library.opcheck(torch.ops.lora_fast.lora_forward.default, (x, W, b, A, B, 2.0, 0.0, None, False))
    xg, Wg, bg, Ag, Bg = _lora_args(M=4, K=9, N=7, r=1, requires_grad=True, bias=False)
    torch.library.opcheck(torch.ops.lora_fast.lora_forward.default, (xg, Wg, bg, Ag, Bg, 0.5, 0.25, seed, True))
    for M in (0, 1):  # empty and single-row inputs through the op and its fake
        torch.library.opcheck(torch.ops.lora_fast.lora_forward.default, (x[:M], W, b, A, B, 2.0, 0.25, seed, True))
    dy = torch.randn(5, 10)
    torch.library.opcheck(torch.ops.lora_fast.lora_backward_dx.default, (dy, W, A, B, 2.0, 0.25, seed, True))
    torch.library.opcheck(torch.ops.lora_fast.lora_shrink.default, (x, A, 0.25, seed))
    xa = torch.randn(5, 3)
    dyb = torch.randn(5, 3)
    for need_a, need_b in ((True, True), (False, True)):
        torch.library.opcheck(torch.ops.lora_fast.lora_grad_ab.default,
                              (x, dy, xa, dyb if need_a else None, 2.0, torch.float32, torch.float32, 0.25, seed,
                               need_a, need_b))


def _fresh(t):
    """t owns its whole storage from offset 0 (what an op's outputs must, as their fake impls promise)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("M", [0, 1, 6, 260])
def test_opcheck_lora_backward_op(M):
    """`lora_fast::lora_backward` (dx, dA, dB of one layer in one op): opcheck with and without dropout, with every
    subset of the three gradients that a training step asks for (xa absent when dB is not needed); the outputs
    equal the PyTorch path's (`naive`, the same Philox mask), are fresh tensors, and are [0] where not needed.
    M = 260 with dropout takes the kernels' dX-term-in-dA path (`kernels.dx_term_in_grad_ab`)."""
    from lora_fast import functional, kernels, naive

    K, N, r = 24, 20, 3
    g = torch.Generator().manual_seed(1000 + M)
    x, W, A, B, dy = (torch.randn(*s, generator=g) for s in ((M, K), (N, K), (r, K), (N, r), (M, N)))
    seed_int = int(torch.randint(0, 2**62, (1,), generator=g))
    seed = torch.tensor([seed_int], dtype=torch.int64)
    cases = [(0.0, (True, True, True)), (0.25, (True, True, True)), (0.25, (False, True, True)),
             (0.25, (True, False, False)), (0.0, (False, False, True)), (0.25, (True, True, False))]
    if M == 260:
        assert kernels.dx_term_in_grad_ab(M, r, 0.25)
        cases = cases[1:2] + cases[-1:]
    for p, (need_dx, need_dA, need_dB) in cases:
        sd = seed if p > 0 else None
        xa = naive.lora_shrink(x, A, p, seed_int) if need_dB else None
        args = (dy, x, W, A, B, xa, 1.5, p, sd, need_dx, need_dA, need_dB)
        torch.library.opcheck(torch.ops.lora_fast.lora_backward.default, args)
        got = torch.ops.lora_fast.lora_backward(*args)
        want = functional.lora_backward(naive, dy, x, W, A, B, xa, 1.5, p, seed_int, False,
                                        (need_dx, False, False, need_dA, need_dB))
        for name, need, out, ref in zip(("dx", "dA", "dB"), (need_dx, need_dA, need_dB), got, want[:1] + want[3:]):
            if not need:
                assert out.shape == (0,), name
                continue
            assert _fresh(out), name
            assert out.dtype == (A.dtype if name == "dA" else B.dtype if name == "dB" else x.dtype)
            if M:
                assert_close(f"M={M} p={p} {name}", out, ref, torch.float32)
            else:
                assert out.shape == ref.shape and not out.any(), name
        ptrs = [t.data_ptr() for t in got if t.numel()]
        assert len(set(ptrs)) == len(ptrs) and not set(ptrs) & {t.data_ptr() for t in args[:6] if t is not None}


def test_opcheck_multi_lora_forward():
    _, multi, meta = _pool_model()
    A, B, sizes = multi.pool.layer_stacks(multi.key)
    x = torch.randn(6, 16, requires_grad=True)
    args = (x, multi.weight, multi.bias, A, B, multi.pool.scalings, multi.pool.ranks, meta.adapter_ids, meta.perm,
            meta.seg_of, meta.seg_start, meta.seg_adapter, list(sizes))
    torch.library.opcheck(torch.ops.lora_fast.multi_lora_forward.default, args)
    torch.library.opcheck(torch.ops.lora_fast.draw_seed.default, (torch.empty(0, dtype=torch.int64),))


def _pool_model(T=6, K=12, hidden=16, slots=3, R=4):
    """A LoRALinear feeding a two-slice MultiLoRALinear over a pool with two adapters of ranks 4 and 1."""
    torch.manual_seed(0)
    pool = AdapterPool(slots, R, dtype=torch.float32)
    first = LoRALinear(K, hidden, rank=3, alpha=6)
    nn.init.normal_(first.lora_B)
    multi = MultiLoRALinear(nn.Linear(hidden, 10), pool, key="proj", slice_sizes=(6, 4))
    for name, r in (("a", 4), ("b", 1)):
        pool.load(name, {"proj": [(torch.randn(r, hidden), torch.randn(6, r)),
                                  (torch.randn(r, hidden), torch.randn(4, r))]}, alpha=2.0 * r)
    for p in multi.parameters():
        p.requires_grad_(False)
    meta = pool.batch_metadata(["a", None, "b", "a", "b", None][:T])
    return first, multi, meta


class _Stack(nn.Module):
    def __init__(self, first, multi):
        super().__init__()
        self.first, self.multi = first, multi

    def forward(self, x, meta):
        return self.multi(F.gelu(self.first(x)), meta)


def _compile(model, backend="inductor"):
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    return torch.compile(model, backend=counter, fullgraph=True), counter


def test_compiled_fullgraph_training_and_inference_equal_eager():
    torch._dynamo.reset()
    first, multi, meta = _pool_model()
    model = _Stack(first, multi)
    # aot_eager: dynamo + AOTAutograd (fake impls, functionalization, the registered autograd, the joint graph)
    # without inductor's C++ codegen, which costs about a minute of CI time cold; the tiny dropout tests below
    # run inductor itself.
    compiled, counter = _compile(model, "aot_eager")
    x = torch.randn(6, 12, requires_grad=True)
    grads = {}
    for name, fn in (("eager", model), ("compiled", compiled)):
        for p in (x, first.lora_A, first.lora_B):
            p.grad = None
        y = fn(x, meta)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads[name] = [y.detach(), x.grad, first.lora_A.grad, first.lora_B.grad]
    assert counter.frame_count == 1
    for what, c, e in zip(("y", "dx", "dA", "dB"), grads["compiled"], grads["eager"]):
        assert c is not None, what
        assert_close(what, c, e, torch.float32)
    with torch.no_grad():  # inference: a second graph (grad mode is guarded), still one frame, no break
        x2 = torch.randn(6, 12)
        assert_close("inference y", compiled(x2, meta), model(x2, meta), torch.float32)
    meta.update_(torch.tensor([1, 0, -1, -1, 0, 1], dtype=torch.int32))  # a new adapter mix, same buffers
    with torch.no_grad():
        assert_close("new mix y", compiled(x2, meta), model(x2, meta), torch.float32)


def test_raw_adapter_ids_under_fullgraph_get_a_clear_error():
    """Raw ids need value-dependent checks and a sort: under torch.compile their metadata is built outside the graph
    (a graph break whose reason says to build a BatchMetadata outside instead; dynamo's own error would name a
    symbolic shape): an error with fullgraph=True, the eager result without it."""
    torch._dynamo.reset()
    _, multi, meta = _pool_model()
    ids = meta.adapter_ids.clone()
    x = torch.randn(6, 16)
    with pytest.raises(Exception, match="BatchMetadata"):
        torch.compile(multi, backend="eager", fullgraph=True)(x, ids)
    torch._dynamo.reset()
    with torch.no_grad():
        assert_close("raw ids, graph break", torch.compile(multi, backend="eager")(x, ids), multi(x, meta),
                     torch.float32)


def test_multi_lora_dx_matches_autograd_of_the_reference():
    _, multi, meta = _pool_model()
    A, B, sizes = multi.pool.layer_stacks(multi.key)
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    W = multi.weight.double()
    args = (W, None, A.double(), B.double(), multi.pool.scalings, multi.pool.ranks)
    y = _multi_lora_torch(x, *args, meta.adapter_ids, sizes)
    dy = torch.randn_like(y)
    (ref,) = torch.autograd.grad(y, x, dy)
    dx = multi_lora_backward_dx(dy, W, A.double(), B.double(), multi.pool.scalings, multi.pool.ranks,
                                meta.adapter_ids, sizes)
    assert_close("multi dx", dx, ref, torch.float64)


def _identity_lora(p):
    """K = N = r = 8, W = 0, A = B = I, scaling 1: y = drop(x), so the output shows the dropout mask."""
    layer = LoRALinear(8, 8, rank=8, alpha=8, dropout=p, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.lora_A.copy_(torch.eye(8))
        layer.lora_B.copy_(torch.eye(8))
    return layer


def test_compiled_dropout_fresh_mask_each_step_and_backward_uses_the_forwards():
    torch._dynamo.reset()
    p = 0.5
    layer = _identity_lora(p)
    compiled, counter = _compile(layer)
    x = torch.rand(6, 8) + 0.5  # no zeros: y == 0 exactly where dropped
    masks = []
    for _ in range(2):
        xg = x.clone().requires_grad_(True)
        layer.lora_A.grad = None
        y = compiled(xg)
        keep = y.detach() != 0
        assert 0 < keep.sum() < keep.numel()
        assert_close("y = drop(x)", y, x * keep / (1 - p), torch.float32)
        g = torch.randn(6, 8)
        y.backward(g)
        # The backward regenerates the forward's mask from the saved seed tensor.
        assert_close("dx = drop'(g)", xg.grad, g * keep / (1 - p), torch.float32)
        assert_close("dA = g^T drop(x)", layer.lora_A.grad, g.T @ y.detach(), torch.float32)
        masks.append(keep)
    assert counter.frame_count == 1
    assert not torch.equal(masks[0], masks[1]), "two compiled steps drew the same dropout mask"
    # The seed op draws what eager draws: under one torch.manual_seed both runs use the same mask.
    torch.manual_seed(7)
    y_compiled = compiled(x)
    torch.manual_seed(7)
    assert torch.equal(y_compiled, layer(x))


def test_shifted_seed_compiled_equals_eager_and_is_the_drawn_seed_plus_offset():
    """lora_linear_shifted (a tensor-parallel shard's dropout stream): the mask key is the drawn seed plus the
    offset mod 2**62, compiled (seed tensor) as eagerly (int); an offset past 2**61 wraps the same way in both."""
    from lora_fast.functional import draw_seed, lora_linear_shifted
    from lora_fast.philox import dropout_mask_torch

    torch._dynamo.reset()
    layer, p = _identity_lora(0.5), 0.5
    x = torch.rand(6, 8) + 0.5
    shifted = torch.compile(lambda t, off: lora_linear_shifted(t, layer.weight, None, layer.lora_A, layer.lora_B,
                                                               1.0, p, True, off), fullgraph=True, backend="aot_eager")
    for off in (12345, 2**62 - 3):
        torch.manual_seed(11)
        seed = draw_seed()
        keep = dropout_mask_torch((seed + off) % 2**62, 6, 8, p)
        torch.manual_seed(11)
        y_compiled = shifted(x, off)
        torch.manual_seed(11)
        y_eager = lora_linear_shifted(x, layer.weight, None, layer.lora_A, layer.lora_B, 1.0, p, True, off)
        assert_close("y = drop(x) with the shifted key", y_eager, x * keep / (1 - p), torch.float32)
        assert torch.equal(y_compiled, y_eager), off


def test_fallback_without_custom_ops_breaks_the_graph_but_matches_eager(monkeypatch):
    """A torch without torch.library.custom_op: the layers run outside the graph (torch.compiler.disable) instead of
    dynamo tracing into the Triton launchers; LoRALinear training (with dropout) and MultiLoRALinear inference
    still equal eager. (Without the op, the multi-adapter kernels have no autograd, as before the ops existed.)"""
    monkeypatch.setattr(ops, "HAS_CUSTOM_OPS", False)
    torch._dynamo.reset()
    first, multi, meta = _pool_model()
    first.dropout = 0.3
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled_first = torch.compile(lambda t: F.gelu(first(t)) * 2, backend=counter)
    compiled_multi = torch.compile(lambda t: multi(t, meta) + 1, backend=counter)
    x = torch.randn(6, 12, requires_grad=True)
    results = [seeded_grads(fn, x, [first.lora_A, first.lora_B], 5)
               for fn in (compiled_first, lambda t: F.gelu(first(t)) * 2)]
    for what, c, e in zip(("y", "dx", "dA", "dB"), *results):
        assert torch.equal(c, e), what
    with torch.no_grad():
        h = torch.randn(6, 16)
        assert torch.equal(compiled_multi(h), multi(h, meta) + 1)
    assert counter.frame_count >= 2


def test_compiled_dynamic_lengths_with_dropout_equal_eager():
    """Changing sequence lengths: the fake impls take symbolic sizes, so the second length compiles a dynamic graph
    that serves the third; with dropout, each step equals eager under the same torch.manual_seed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LoRALinear(12, 10, rank=3, dropout=0.2)
    nn.init.normal_(layer.lora_B)
    compiled, counter = _compile(layer, "aot_eager")
    for M in (5, 7, 9):
        x = torch.randn(2, M, 12, requires_grad=True)
        results = [seeded_grads(fn, x, [layer.lora_A, layer.lora_B], M) for fn in (compiled, layer)]
        for what, c, e in zip(("y", "dx", "dA", "dB"), *results):
            assert_close(f"M={M} {what}", c, e, torch.float32)
    assert counter.frame_count == 2


def _recording_backend(graphs):
    """A torch.compile backend: AOTAutograd with compilers that run the graphs as traced (aot_eager) and record
    them in `graphs` as ("fw" | "bw", GraphModule)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            graphs.append((kind, gm))
            return make_boxed_func(gm.forward)
        return compile_graph

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler("fw"), bw_compiler=compiler("bw"))
    return backend


def _lora_fast_calls(graphs, kind):
    """{op name: calls} of the lora_fast:: ops in the recorded graphs of `kind`."""
    calls = {}
    for k, gm in graphs:
        for node in gm.graph.nodes:
            if k == kind and node.op == "call_function" and str(node.target).startswith("lora_fast."):
                name = str(node.target).split(".")[1]
                calls[name] = calls.get(name, 0) + 1
    return calls


class _MLPBlock(nn.Module):
    """down(silu(gate(x)) * up(x)) + x of three LoRALinear layers (the host-time harness's block); `up` trains its
    base weight and bias too."""

    def __init__(self, d, h, r, p):
        super().__init__()
        self.gate, self.down = (LoRALinear(i, o, rank=r, alpha=2 * r, dropout=p, bias=False) for i, o in ((d, h), (h, d)))
        self.up = LoRALinear(d, h, rank=r, alpha=2 * r, dropout=p, bias=True)
        for layer in (self.gate, self.up, self.down):
            nn.init.normal_(layer.lora_B)
        self.up.weight.requires_grad_(True)
        self.up.bias.requires_grad_(True)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x)) + x


@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no_dx"])
def test_compiled_backward_is_one_lora_backward_op_per_layer(x_grad):
    """The compiled backward of an MLP block of three LoRALinear layers calls `lora_fast::lora_backward` once per
    layer and no other lora_fast op (not lora_backward_dx, lora_shrink or lora_grad_ab); dW and db of the layer
    whose base trains are graph ops. The compiled step's output and gradients (x, every A and B, W and b) equal
    eager's. Without x's gradient the first two layers' ops compute dA and dB alone."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _MLPBlock(16, 24, 3, 0.0)
    graphs = []
    compiled = torch.compile(block, backend=_recording_backend(graphs), fullgraph=True)
    x = torch.randn(2, 5, 16, requires_grad=x_grad)
    params = [p for p in block.parameters() if p.requires_grad]
    assert len(params) == 8  # three (A, B) pairs, up's W and b
    want = [None if t is None else t.detach().clone() for t in seeded_grads(block, x, params, 0)]
    got = seeded_grads(compiled, x, params, 0)
    assert _lora_fast_calls(graphs, "fw") == {"lora_forward": 3}
    assert _lora_fast_calls(graphs, "bw") == {"lora_backward": 3}
    for w, g, what in zip(want, got, ["y", "dx", "dA gate", "dB gate", "dW up", "db up", "dA up", "dB up", "dA down",
                                      "dB down"]):
        if what == "dx" and not x_grad:
            assert g is None and w is None
            continue
        assert g is not None, what
        assert_close(what, g, w, torch.float32)


def test_compiled_dropout_step_above_256_rows_adds_dx_term_in_grad_ab(monkeypatch):
    """With dropout above 256 rows the compiled step takes the eager step's path (kernels.dx_term_in_grad_ab): dX
    without its dropout term, which lora_grad_ab's dA programs add (called with dx=), inside the one
    `lora_fast::lora_backward` op; its output and gradients equal the eager step's under the same seed (on the
    CPU the graph's seed op draws what eager draws)."""
    from lora_fast import kernels

    torch._dynamo.reset()
    M, K, N, r, p = 260, 24, 20, 3, 0.3
    assert kernels.dx_term_in_grad_ab(M, r, p)
    layer = LoRALinear(K, N, rank=r, alpha=2 * r, dropout=p)
    nn.init.normal_(layer.lora_B)
    params = [layer.lora_A, layer.lora_B]
    calls = []
    real = kernels.lora_grad_ab
    monkeypatch.setattr(kernels, "lora_grad_ab",
                        lambda *a, **k: (calls.append(k.get("dx") is not None), real(*a, **k))[1])
    graphs = []
    compiled = torch.compile(layer, backend=_recording_backend(graphs), fullgraph=True)
    x = torch.randn(M, K, requires_grad=True)
    seed = int(torch.randint(0, 2**31, ()))
    want = [t.detach().clone() for t in seeded_grads(layer, x, params, seed)]
    assert calls == [True]
    got = seeded_grads(compiled, x, params, seed)
    assert calls == [True, True]
    assert _lora_fast_calls(graphs, "bw") == {"lora_backward": 1}
    for w, g, what in zip(want, got, ["y", "dx", "dA", "dB"]):
        assert_close(what, g, w, torch.float32)
    y_other = seeded_grads(compiled, x, params, seed + 1)[0]  # another seed, another mask
    assert not torch.equal(y_other, got[0])


def test_peft_patched_model_compiles_fullgraph_with_dropout():
    """A PEFT LoRA model patched onto the fused kernels (lora_fast.peft.patch) traces without a break; with dropout,
    the compiled step equals eager under the same torch.manual_seed."""
    peft = pytest.importorskip("peft")
    import lora_fast.peft as lfp

    torch._dynamo.reset()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 10))
    model = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"],
                                                      lora_dropout=0.1))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)
    lfp.patch(model)
    compiled, counter = _compile(model, "aot_eager")
    x = torch.randn(5, 12, requires_grad=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    results = [seeded_grads(fn, x, trained, 1) for fn in (compiled, model)]
    assert counter.frame_count == 1
    assert len(results[0]) == 6
    for i, (c, e) in enumerate(zip(*results)):
        assert_close(f"output/gradient {i}", c, e, torch.float32)


def test_opcheck_dora_norm():
    x, W, _, A, B = _lora_args(M=3, K=11, N=9, r=3)
    torch.library.opcheck(torch.ops.lora_fast.dora_norm.default, (W, A, B, 1.5))


def _dora_vera_layers():
    from lora_fast.dora import DoRALinear
    from lora_fast.vera import VeRALinear

    torch.manual_seed(5)
    dora = DoRALinear.from_linear(nn.Linear(40, 24), rank=4, alpha=8)
    vera = VeRALinear.from_linear(nn.Linear(40, 24), rank=8)
    with torch.no_grad():
        dora.lora_B.normal_()
        dora.lora_magnitude.mul_(torch.rand(24) + 0.5)
        dora.lora_magnitude[3] = 0.0  # a zero magnitude: its gradient comes from z, not from y
        vera.vera_lambda_b.normal_()
    return {"dora": dora, "vera": vera}


@pytest.mark.parametrize("name", ["dora", "vera"])
def test_dora_and_vera_compile_without_a_graph_break(name):
    """DoRA (its norm op, g = m / norm, lora_forward's op, g * z + b) and VeRA (the scaled factors, lora_forward's
    op) trace as one graph under fullgraph=True, in training (no dropout) and in inference; outputs and the
    gradients of x and of every trained parameter (the magnitude, with a zero entry; the lambdas) equal eager's."""
    torch._dynamo.reset()
    _check_one_graph_equals_eager(name, _dora_vera_layers()[name], 40)


def _check_one_graph_equals_eager(name, layer, in_features):
    """`layer` under torch.compile(fullgraph=True, aot_eager) captures one graph; its training output and the
    gradients of x and of every trainable parameter, then its inference output, equal eager's."""
    params = [p for p in layer.parameters() if p.requires_grad]
    compiled, counter = _compile(layer, "aot_eager")
    x = torch.randn(2, 5, in_features, requires_grad=True)
    want = [t.detach().clone() for t in seeded_grads(layer, x, params, 0)]
    got = seeded_grads(compiled, x, params, 0)
    assert counter.frame_count == 1 and len(got) == 2 + len(params)
    for w, g, what in zip(want, got, ["y", "dx"] + [f"grad {i}" for i in range(len(params))]):
        assert g is not None, what
        assert_close(f"{name} {what}", g, w, torch.float32)
    with torch.no_grad():
        layer.eval()
        assert_close(f"{name} inference", compiled(x), layer(x), torch.float32)


def test_dora_with_dropout_traces_its_formula(monkeypatch):
    """DoRA with dropout in training traces as one graph: y = (x - drop(x)) @ W^T + b + g * z(drop(x)). torch's
    dropout in the graph is replaced by a fixed mask here, so outputs and the gradients of x, A, B and the magnitude
    can be checked against that formula in float64 with the same mask; then a smoke run with torch's own dropout."""
    import types

    import lora_fast.dora as dora_mod

    torch._dynamo.reset()
    layer = _dora_vera_layers()["dora"]
    W, b, s, p = layer.weight, layer.bias, layer.scaling, 0.3
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude]
    x = torch.randn(6, 40, requires_grad=True)
    keep = torch.rand(6, 40, generator=torch.Generator().manual_seed(11)) > p

    def step(x):
        return dora_mod.dora_linear(x, W, b, *params, s, dropout_p=p, training=True)

    monkeypatch.setattr(dora_mod, "F", types.SimpleNamespace(linear=F.linear,
                                                             dropout=lambda t, q, training: t * keep / (1 - q)))
    compiled, counter = _compile(step, "aot_eager")
    got = seeded_grads(compiled, x, params, 0)
    assert counter.frame_count == 1

    def formula(x):
        A, B, m = (t.double() for t in params)
        xd = x.double() * keep / (1 - p)
        g = m / (W.double() + s * B @ A).norm(dim=1).detach()  # DoRA's norm is a constant
        return (x.double() - xd) @ W.double().t() + b.double() + g * (xd @ W.double().t() + s * (xd @ A.t()) @ B.t())

    want = seeded_grads(formula, x, params, 0)
    for w, g, what in zip(want, got, ["y", "dx", "dA", "dB", "dm"]):
        assert_close(f"dora p={p} {what}", g, w, torch.float32)
    monkeypatch.undo()
    torch._dynamo.reset()
    compiled, counter = _compile(step, "aot_eager")
    got = seeded_grads(compiled, x, params, 0)
    assert counter.frame_count == 1 and all(torch.isfinite(t).all() for t in got)


def _qlora_layer(double_quant, dropout=0.0):
    from lora_fast.qlora import LoRALinear4bit

    torch.manual_seed(3)
    layer = LoRALinear4bit.from_linear(nn.Linear(64, 24), rank=4, alpha=8, dropout=dropout,
                                       compute_dtype=torch.float32, double_quant=double_quant)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 would leave A's gradient zero
    return layer


def test_opcheck_qlora_ops():
    """`lora_fast::qlora_forward` / `qlora_backward_dx` (the NF4 weight as its fields): schema, fake tensors,
    autograd registration and dispatch, with and without a bias, double quantization, dropout and xa / dyb."""
    from lora_fast.ops import nf4_fields

    seed = torch.tensor([77], dtype=torch.int64)
    for dq in (False, True):
        layer = _qlora_layer(dq)
        w4, fields = layer.weight4, nf4_fields(layer.weight4)
        x = torch.randn(5, 64)
        A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        b = torch.randn(24)
        torch.library.opcheck(torch.ops.lora_fast.qlora_forward.default,
                              (x, *fields, None, A, B, 2.0, 0.0, None, False))
        xg, Ag, Bg, bg = (t.clone().requires_grad_() for t in (x, A, B, b))
        torch.library.opcheck(torch.ops.lora_fast.qlora_forward.default,
                              (xg, *fields, bg, Ag, Bg, 0.5, 0.25, seed, True))
        dy = torch.randn(5, 24)
        torch.library.opcheck(torch.ops.lora_fast.qlora_backward_dx.default,
                              (dy, *fields[:6], w4.shape[1], A, B, 2.0, 0.25, seed, True))


@pytest.mark.parametrize("double_quant,dropout", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_qlora_compiles_fullgraph_and_equals_eager(double_quant, dropout):
    """LoRALinear4bit traces as one graph under fullgraph=True (the `lora_fast::qlora_forward` op with its autograd)
    in training and in inference; the output and the gradients of x, A and B equal eager's (with dropout too: on
    the CPU the graph's seed op and eager draw the same seed from the same generator state)."""
    torch._dynamo.reset()
    _check_one_graph_equals_eager("qlora", _qlora_layer(double_quant, dropout), 64)


def test_variants_compile_without_fullgraph_and_equal_eager():
    """Every variant layer under torch.compile without fullgraph (the default backend path a user takes) equals
    eager: QLoRA, DoRA and VeRA all trace (see the tests above). Outputs and every gradient equal eager's; dropout
    off so both see the same function."""
    from lora_fast.dora import DoRALinear
    from lora_fast.qlora import LoRALinear4bit
    from lora_fast.vera import apply_vera

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 24)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(3)
    layers = {"dora": DoRALinear.from_linear(nn.Linear(64, 24), rank=4, alpha=8),
              "vera": apply_vera(One(), ["lin"], rank=4),
              "qlora": LoRALinear4bit.from_linear(nn.Linear(64, 24), rank=4, alpha=8, compute_dtype=torch.float32)}
    for name, layer in layers.items():
        params = [p for p in layer.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:
                if p.dim() == 2 and float(p.abs().sum()) == 0:  # a zero B: make its A's gradient nonzero too
                    p.normal_()
        x = torch.randn(5, 64, requires_grad=True)
        compiled = torch.compile(layer, backend="aot_eager")
        want = [t.detach().clone() for t in seeded_grads(layer, x, params, 0)]
        got = seeded_grads(compiled, x, params, 0)
        for w, g, what in zip(want, got, ["y", "dx"] + [f"grad {i}" for i in range(len(params))]):
            assert_close(f"{name} {what}", g, w, torch.float32)
