"""The kernels as torch operators in the `lora_fast::` namespace, so torch.compile traces them without graph breaks.

Ops (each with a fake implementation for tracing; shapes as in the launchers of `lora_fast.kernels`):
- `lora_fast::lora_forward(x [M, K], weight [N, K], bias [N]?, lora_A [r, K], lora_B [N, r], scaling, dropout_p,
  seed?, store_xa)` -> `(y [M, N], xa [M or 0, r])`, with autograd registered (training): its backward is one
  `lora_backward` op for dx, dA and dB, and graph ops for dW and db (inductor's own GEMM and reduction);
- `lora_fast::lora_backward(dy [M, N], x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], xa [M, r]?, scaling,
  dropout_p, seed?, need_dx, need_dA, need_dB)` -> `(dx [M, K] or [0], dA [r, K] or [0], dB [N, r] or [0])`, dA and
  dB in lora_A's and lora_B's dtypes: the eager backward's launches (`functional.lora_backward` without dW and db:
  lora_backward_dx, or lora_shrink when dx is not needed, then lora_grad_ab; with dropout above 256 rows dX's
  dropout term comes from dA's programs, `kernels.dx_term_in_grad_ab`) in one op, so one op call per layer;
- `lora_fast::lora_backward_dx(dy [M, N], weight, lora_A, lora_B, scaling, dropout_p, seed?, store_dyb)`
  -> `(dx [M, K], dyb [M or 0, r])`;
- `lora_fast::lora_shrink(x [M, K], lora_A [r, K], dropout_p, seed?)` -> `xa [M, r]`;
- `lora_fast::lora_grad_ab(x, dy, xa?, dyb?, scaling, a_dtype, b_dtype, dropout_p, seed?, need_a, need_b)`
  -> `(dA [r, K] or [0], dB [N, r] or [0])` (these three: the launchers one by one, as ops; QLoRA's compiled
  backward calls the last two, and graphs compiled before `lora_backward` existed call all three);
- `lora_fast::draw_seed(generator [0])` -> int64 [1] on the generator's device: a dropout seed (see below);
- `lora_fast::dora_norm(weight [N, K], lora_A [r, K], lora_B [N, r], scaling)` -> `||W + s * B @ A||_row` [N] fp32
  (fp64 for fp64), no autograd (DoRA's norm is a constant; `dora.dora_linear` traces DoRA with it, with
  `lora_forward` and graph ops; VeRA traces with `lora_forward` and graph ops alone);
- `lora_fast::qlora_forward(x [M, K], qweight [N, K/2], absmax, absmax_code?, absmax_scale?, absmax_offset,
  absmax_group, out_features, bias?, lora_A, lora_B, scaling, dropout_p, seed?, store_xa)` -> `(y [M, N],
  xa [M or 0, r])`: QLoRA's forward (`lora_fast.nf4.NF4Tensor`'s fields in W's place), with autograd registered;
- `lora_fast::qlora_backward_dx(dy [M, N], <the same NF4 fields>, in_features, lora_A, lora_B, scaling,
  dropout_p, seed?, store_dyb)` -> `(dx [M, K], dyb [M or 0, r])`;
- `lora_fast::multi_lora_forward(x [T, K], weight, bias?, A [S, slices, R, K], B [S, N, R], scalings [S],
  ranks [S], adapter_ids, perm, seg_of, seg_start, seg_adapter, slice_sizes)` -> `y [T, N]`, with autograd for x
  only (serving: the pool and the base weight are frozen, their gradients are not computed).

The ops are opaque: defined on a plain `torch.library.Library` (`_Op`: the schema inferred from the annotations, one
implementation for every device, `register_fake` and `register_autograd` as for `torch.library.custom_op`, whose
Python wrapper costs more host time per call: 37 against 32 µs on the CPU for a 17 µs launcher call).
Why opaque ops and not `triton_op` + `wrap_triton`: the launchers do host work that a
traced triton_op would have to see through with fake tensors: they read `data_ptr()` to decide whether TMA may be
used and build host `TensorDescriptor`s from it on Hopper at large M, pick configs from lru_cached device facts,
cache device-side slice tables, and on the CPU CI path run the kernels through Triton's interpreter, which inductor
cannot compile. Inductor could not fuse anything into these GEMM kernels anyway, so an opaque op loses nothing that
matters: the graph has no break, the kernels run exactly as in eager (TMA included), and the op is CUDA-graph safe
(no host sync, no host value per call).

The dropout seed: `seed` is an int64 [1] tensor on x's device, drawn inside the traced graph by the
`lora_fast::draw_seed` op (`draw_seed_tensor`) and read by the kernels through a pointer, so every compiled step, and
every replay of inductor's CUDA graphs (`mode="reduce-overhead"`), draws a fresh mask (not a constant baked into the
graph); the autograd saves that same tensor so the backward regenerates the forward's mask. None = no dropout. On
a GPU it comes from the CUDA generator, so compiled masks differ from eager's (an int from the CPU generator, no
launch) though both follow `torch.manual_seed`; on the CPU both draw the same value from the CPU generator.

Eager calls do not come here: `lora_fast.lora_linear` calls `LoRALinearFunction` directly unless torch.compile is
tracing (no dispatcher cost on the host-bound small-size eager step). `HAS_CUSTOM_OPS` is False on a torch without
`torch.library.custom_op` / `register_fake` / `register_autograd` / `infer_schema` (< 2.5); then nothing is
registered and compile
runs each layer outside the graph (`functional.eager_only`: a graph break per layer). `lora_fast` imports this
module, so the ops exist once the package is imported.

>>> x, W, A, B = torch.randn(5, 12), torch.randn(10, 12), torch.randn(3, 12), torch.randn(10, 3)
>>> y, _ = torch.ops.lora_fast.lora_forward(x, W, None, A, B, 2.0, 0.0, None, False)
>>> torch.testing.assert_close(y, x @ W.T + 2.0 * (x @ A.T) @ B.T)
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .functional import _ops, lora_backward as _shared_backward, shift_seed

HAS_CUSTOM_OPS = all(hasattr(torch.library, f) for f in ("custom_op", "register_fake", "register_autograd",
                                                         "infer_schema"))

Tensor = torch.Tensor


def seed_value(seed: Optional[Tensor]):
    """What the launchers take for an op's seed: the seed tensor itself (read in the kernels through a pointer, no
    host sync), or 0 when there is none (no dropout)."""
    return 0 if seed is None else seed


def draw_seed_tensor(device) -> Tensor:
    """int64 [1] on `device`, via the `lora_fast::draw_seed` op, so that a compiled graph draws it afresh on every
    call: from the CUDA generator on a GPU (graph-safe: a CUDA graph replay draws anew), from the CPU generator on
    the CPU (where it is the value eager's `functional.draw_seed` draws). torch.utils.checkpoint, and inductor's
    recompute of a seeded op, restore that device's RNG state before recomputing."""
    return torch.ops.lora_fast.draw_seed(torch.empty(0, dtype=torch.int64, device=device))


def _empty(like: Tensor, *shape, dtype=None) -> Tensor:
    return torch.empty(shape, device=like.device, dtype=dtype or like.dtype)


def _own(t: Tensor) -> Tensor:
    """`t`, or a copy when it is a piece of a larger storage (inside an op `_is_view()` is not tracked)."""
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


if HAS_CUSTOM_OPS:
    _LIB = torch.library.Library("lora_fast", "FRAGMENT")

    class _Op:
        """`lora_fast::<fn's name>`, defined on a plain `torch.library.Library` with the schema of fn's annotations
        and fn as its implementation for every device; `register_fake` and `register_autograd` as on a
        `torch.library.custom_op`, whose extra Python wrapper cost ~5 µs more host time per call on the CPU (a
        compiled training step calls two of these ops per layer, three with dropout, and is host-bound at moderate
        sizes)."""

        def __init__(self, fn, tags=()):
            self.name = "lora_fast::" + fn.__name__
            _LIB.define(fn.__name__ + torch.library.infer_schema(fn, mutates_args=()), tags=tags)
            _LIB.impl(fn.__name__, fn, "CompositeExplicitAutograd")

        def register_fake(self, fn):
            torch.library.register_fake(self.name, fn, lib=_LIB)
            return fn

        def register_autograd(self, backward, setup_context):
            torch.library.register_autograd(self.name, backward, setup_context=setup_context, lib=_LIB)

    # An opaque op rather than torch.randint in the graph: inductor would generate its own RNG code for randint
    # (C++ on the CPU, other numbers than torch's generator); this draws exactly what eager draws. Tagged as
    # seeded-random so the graph passes neither merge two draws nor recompute one (checkpointing saves it).
    # `generator` is an empty tensor whose device names the generator drawn from: inductor's checkpoint recompute
    # (`run_and_save_rng_state`) saves and restores the RNG state of the device of the op's tensor arguments.
    def draw_seed(generator: Tensor) -> Tensor:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=generator.device)

    draw_seed = _Op(draw_seed, tags=(torch.Tag.nondeterministic_seeded,))

    @draw_seed.register_fake
    def _(generator):
        return torch.empty(1, dtype=torch.int64, device=generator.device)

    # ------------------------------------------------------------------------------------------- single adapter

    @_Op
    def lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                     scaling: float, dropout_p: float, seed: Optional[Tensor], store_xa: bool) -> Tuple[Tensor, Tensor]:
        y, xa = _ops(x).lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_value(seed),
                                     store_xa=store_xa)
        return y, (xa if xa is not None else _empty(x, 0, lora_A.shape[0]))

    @lora_forward.register_fake
    def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, store_xa):
        return _empty(x, x.shape[0], weight.shape[0]), _empty(x, x.shape[0] if store_xa else 0, lora_A.shape[0])

    @_Op
    def lora_backward_dx(dy: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                         dropout_p: float, seed: Optional[Tensor], store_dyb: bool) -> Tuple[Tensor, Tensor]:
        dx, dyb = _ops(dy).lora_backward_dx(dy, weight, lora_A, lora_B, scaling, dropout_p, seed_value(seed),
                                            store_dyb=store_dyb)
        return dx, (dyb if dyb is not None else _empty(dy, 0, lora_A.shape[0]))

    @lora_backward_dx.register_fake
    def _(dy, weight, lora_A, lora_B, scaling, dropout_p, seed, store_dyb):
        return _empty(dy, dy.shape[0], weight.shape[1]), _empty(dy, dy.shape[0] if store_dyb else 0, lora_A.shape[0])

    @_Op
    def lora_shrink(x: Tensor, lora_A: Tensor, dropout_p: float, seed: Optional[Tensor]) -> Tensor:
        return _ops(x).lora_shrink(x, lora_A, dropout_p, seed_value(seed))

    @lora_shrink.register_fake
    def _(x, lora_A, dropout_p, seed):
        return _empty(x, x.shape[0], lora_A.shape[0])

    @_Op
    def lora_grad_ab(x: Tensor, dy: Tensor, xa: Optional[Tensor], dyb: Optional[Tensor], scaling: float,
                     a_dtype: torch.dtype, b_dtype: torch.dtype, dropout_p: float, seed: Optional[Tensor],
                     need_a: bool, need_b: bool) -> Tuple[Tensor, Tensor]:
        dA, dB = _ops(x).lora_grad_ab(x, dy, xa, dyb, scaling, a_dtype, b_dtype, dropout_p, seed_value(seed),
                                      need_a=need_a, need_b=need_b)
        # The launcher may return both as views into one partial-sum buffer; op outputs must be their own
        # tensors (no aliasing, zero storage offset, as the fake ones), so copy those views (r-sized, cheap).
        return (_own(dA) if dA is not None else _empty(x, 0, dtype=a_dtype),
                _own(dB) if dB is not None else _empty(x, 0, dtype=b_dtype))

    @lora_grad_ab.register_fake
    def _(x, dy, xa, dyb, scaling, a_dtype, b_dtype, dropout_p, seed, need_a, need_b):
        rank = (xa if xa is not None else dyb).shape[1]
        return (_empty(x, rank, x.shape[1], dtype=a_dtype) if need_a else _empty(x, 0, dtype=a_dtype),
                _empty(x, dy.shape[1], rank, dtype=b_dtype) if need_b else _empty(x, 0, dtype=b_dtype))

    @_Op
    def lora_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Optional[Tensor],
                      scaling: float, dropout_p: float, seed: Optional[Tensor], need_dx: bool, need_dA: bool,
                      need_dB: bool) -> Tuple[Tensor, Tensor, Tensor]:
        # The eager backward's launcher calls, in one op: `functional.lora_backward` on the eager launchers (so the
        # dX-term-in-dA path is taken exactly as eagerly), without dW and db, which stay graph ops.
        dx, _, _, dA, dB = _shared_backward(_ops(dy), dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p,
                                            seed_value(seed), False, (need_dx, False, False, need_dA, need_dB))
        # dx is a new tensor from the launcher; dA and dB may be views of a larger buffer: see `lora_grad_ab`.
        return (dx if dx is not None else _empty(x, 0),
                _own(dA) if dA is not None else _empty(x, 0, dtype=lora_A.dtype),
                _own(dB) if dB is not None else _empty(x, 0, dtype=lora_B.dtype))

    @lora_backward.register_fake
    def _(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
        return (_empty(x, x.shape[0], x.shape[1]) if need_dx else _empty(x, 0),
                _empty(x, *lora_A.shape, dtype=lora_A.dtype) if need_dA else _empty(x, 0, dtype=lora_A.dtype),
                _empty(x, *lora_B.shape, dtype=lora_B.dtype) if need_dB else _empty(x, 0, dtype=lora_B.dtype))

    @_Op
    def dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
        from .dora import dora_weight_norm

        return dora_weight_norm(weight, lora_A, lora_B, scaling)

    @dora_norm.register_fake
    def _(weight, lora_A, lora_B, scaling):
        return _empty(weight, weight.shape[0], dtype=torch.promote_types(weight.dtype, torch.float32))

    def _lora_forward_setup(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, store_xa = inputs
        ctx.save_for_backward(x, weight, lora_A, lora_B, output[1] if store_xa else None, seed)
        ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
        ctx.mark_non_differentiable(output[1])

    def _lora_forward_backward(ctx, dy, _dxa):
        """One `lora_fast::lora_backward` op for dx, dA and dB (the kernels' launches as in eager), dW and db as
        graph ops (inductor's GEMM and reduction)."""
        x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        dx = dw = dbias = dA = dB = None
        if need_x or need_a or need_b:
            dx, dA, dB = torch.ops.lora_fast.lora_backward(dy, x, weight, lora_A, lora_B, xa, ctx.scaling,
                                                           ctx.dropout_p, seed, need_x, need_a, need_b)
        if need_w:
            dw = (dy.t() @ x).to(weight.dtype)
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(dy.dtype)
        return (dx if need_x else None, dw, dbias, dA if need_a else None, dB if need_b else None,
                None, None, None, None)

    lora_forward.register_autograd(_lora_forward_backward, setup_context=_lora_forward_setup)

    # ------------------------------------------------------------------------------------------- QLoRA (NF4 base)
    # The NF4 weight travels as its fields (tensors, and the double quantization's scalars), the op rebuilds the
    # NF4Tensor view (no copy) and runs `lora_fast.qlora`'s launchers: the NF4 kernels, or dequantize + the plain
    # path on a CPU without the interpreter.

    def _nf4_view(qweight, absmax, absmax_code, absmax_scale, absmax_offset, absmax_group, out_features,
                  in_features, dtype):
        from .nf4 import NF4Tensor

        return NF4Tensor(qweight, absmax, (out_features, in_features), dtype, absmax_code, absmax_scale,
                         absmax_offset, absmax_group)

    def nf4_fields(w4) -> tuple:
        """The op arguments of the NF4 weight `w4`: (qweight, absmax, absmax_code, absmax_scale, absmax_offset,
        absmax_group, out_features)."""
        return (w4.qweight, w4.absmax, w4.absmax_code, w4.absmax_scale, float(w4.absmax_offset),
                int(w4.absmax_group), int(w4.shape[0]))

    @_Op
    def qlora_forward(x: Tensor, qweight: Tensor, absmax: Tensor, absmax_code: Optional[Tensor],
                      absmax_scale: Optional[Tensor], absmax_offset: float, absmax_group: int, out_features: int,
                      bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
                      seed: Optional[Tensor], store_xa: bool) -> Tuple[Tensor, Tensor]:
        from .qlora import _nf4_ops

        w4 = _nf4_view(qweight, absmax, absmax_code, absmax_scale, absmax_offset, absmax_group, out_features,
                       x.shape[1], x.dtype)
        y, xa = _nf4_ops(x).lora_nf4_forward(x, w4, bias, lora_A, lora_B, scaling, dropout_p, seed_value(seed),
                                             store_xa=store_xa)
        return y, (xa if xa is not None else _empty(x, 0, lora_A.shape[0]))

    @qlora_forward.register_fake
    def _(x, qweight, absmax, absmax_code, absmax_scale, absmax_offset, absmax_group, out_features, bias, lora_A,
          lora_B, scaling, dropout_p, seed, store_xa):
        return _empty(x, x.shape[0], out_features), _empty(x, x.shape[0] if store_xa else 0, lora_A.shape[0])

    @_Op
    def qlora_backward_dx(dy: Tensor, qweight: Tensor, absmax: Tensor, absmax_code: Optional[Tensor],
                          absmax_scale: Optional[Tensor], absmax_offset: float, absmax_group: int, in_features: int,
                          lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                          store_dyb: bool) -> Tuple[Tensor, Tensor]:
        from .qlora import _nf4_ops

        w4 = _nf4_view(qweight, absmax, absmax_code, absmax_scale, absmax_offset, absmax_group, dy.shape[1],
                       in_features, dy.dtype)
        dx, dyb = _nf4_ops(dy).lora_nf4_backward_dx(dy, w4, lora_A, lora_B, scaling, dropout_p, seed_value(seed),
                                                    store_dyb=store_dyb)
        return dx, (dyb if dyb is not None else _empty(dy, 0, lora_A.shape[0]))

    @qlora_backward_dx.register_fake
    def _(dy, qweight, absmax, absmax_code, absmax_scale, absmax_offset, absmax_group, in_features, lora_A, lora_B,
          scaling, dropout_p, seed, store_dyb):
        return _empty(dy, dy.shape[0], in_features), _empty(dy, dy.shape[0] if store_dyb else 0, lora_A.shape[0])

    class _QLoRAOpLaunchers:
        """`functional.lora_backward`'s launchers over the ops (the launchers' signatures), with an NF4 weight in W's
        place (never a dW): QLoRA's compiled backward. (LoRA's own calls the one `lora_backward` op.)"""

        @staticmethod
        def lora_backward_dx(dy, w4, lora_A, lora_B, scaling, dropout_p, seed, store_dyb=True):
            fields = nf4_fields(w4)[:6]
            dx, dyb = torch.ops.lora_fast.qlora_backward_dx(dy, *fields, int(w4.shape[1]), lora_A, lora_B, scaling,
                                                            dropout_p, seed, store_dyb)
            return dx, (dyb if store_dyb else None)

        @staticmethod
        def lora_shrink(x, lora_A, dropout_p=0.0, seed=None):
            return torch.ops.lora_fast.lora_shrink(x, lora_A, dropout_p, seed)

        @staticmethod
        def lora_grad_ab(x, dy, xa, dyb, scaling, a_dtype, b_dtype, dropout_p, seed, need_a=True, need_b=True):
            dA, dB = torch.ops.lora_fast.lora_grad_ab(x, dy, xa, dyb, scaling, a_dtype, b_dtype, dropout_p, seed,
                                                      need_a, need_b)
            return (dA if need_a else None), (dB if need_b else None)

    def _qlora_forward_setup(ctx, inputs, output):
        x, qweight, absmax, absmax_code, absmax_scale, absmax_offset, absmax_group, out_features, bias, lora_A, \
            lora_B, scaling, dropout_p, seed, store_xa = inputs
        ctx.save_for_backward(x, lora_A, lora_B, output[1] if store_xa else None, seed, qweight, absmax,
                              absmax_code, absmax_scale)
        ctx.nf4 = (absmax_offset, absmax_group, out_features)
        ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
        ctx.mark_non_differentiable(output[1])

    def _qlora_forward_backward(ctx, dy, _dxa):
        x, lora_A, lora_B, xa, seed, qweight, absmax, absmax_code, absmax_scale = ctx.saved_tensors
        offset, group, out_features = ctx.nf4
        w4 = _nf4_view(qweight, absmax, absmax_code, absmax_scale, offset, group, out_features, x.shape[1], x.dtype)
        need = ctx.needs_input_grad
        dx, _, dbias, dA, dB = _shared_backward(_QLoRAOpLaunchers, dy, x, w4, lora_A, lora_B, xa, ctx.scaling,
                                                ctx.dropout_p, seed, ctx.has_bias, (need[0], False, need[8], need[9],
                                                                                    need[10]))
        return (dx, *([None] * 7), dbias, dA, dB, None, None, None, None)

    qlora_forward.register_autograd(_qlora_forward_backward, setup_context=_qlora_forward_setup)

    # ------------------------------------------------------------------------------------------- multi-adapter

    @_Op
    def multi_lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                           scalings: Tensor, ranks: Tensor, adapter_ids: Tensor, perm: Tensor, seg_of: Tensor,
                           seg_start: Tensor, seg_adapter: Tensor, slice_sizes: List[int]) -> Tensor:
        from .multi_lora import multi_lora_compute

        return multi_lora_compute(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_ids, perm, seg_of,
                                  seg_start, seg_adapter, tuple(slice_sizes))

    @multi_lora_forward.register_fake
    def _(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_ids, perm, seg_of, seg_start, seg_adapter,
          slice_sizes):
        return _empty(x, x.shape[0], weight.shape[0])

    def _multi_setup(ctx, inputs, output):
        x, weight, _, lora_A, lora_B, scalings, ranks, adapter_ids = inputs[:8]
        ctx.save_for_backward(weight, lora_A, lora_B, scalings, ranks, adapter_ids)
        ctx.slice_sizes = tuple(inputs[-1])

    def _multi_backward(ctx, dy):
        from .multi_lora import multi_lora_backward_dx

        weight, lora_A, lora_B, scalings, ranks, adapter_ids = ctx.saved_tensors
        dx = multi_lora_backward_dx(dy, weight, lora_A, lora_B, scalings, ranks, adapter_ids, ctx.slice_sizes)
        return (dx, *([None] * 12))

    multi_lora_forward.register_autograd(_multi_backward, setup_context=_multi_setup)


def lora_linear_op(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed_offset: int = 0):
    """`lora_fast.lora_linear` after its checks and casts, through the `lora_fast::lora_forward` op.

    x: [..., K] -> [..., N]. The seed is drawn as a tensor inside the graph (see the module docstring), plus
    seed_offset (`functional.lora_linear_shifted`); xa is stored only when lora_B needs a gradient.
    """
    seed = shift_seed(draw_seed_tensor(x.device), seed_offset) if dropout_p > 0.0 else None
    store_xa = torch.is_grad_enabled() and lora_B.requires_grad
    y2d, _ = torch.ops.lora_fast.lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling,
                                              dropout_p, seed, store_xa)
    return y2d.reshape(*x.shape[:-1], weight.shape[0])


def qlora_linear_op(x, w4, bias, lora_A, lora_B, scaling: float, dropout_p: float):
    """`lora_fast.qlora_linear` after its checks and casts, through the `lora_fast::qlora_forward` op (the NF4
    weight `w4` passed as its fields). x: [..., K] -> [..., N]; the seed as in `lora_linear_op`."""
    seed = draw_seed_tensor(x.device) if dropout_p > 0.0 else None
    store_xa = torch.is_grad_enabled() and lora_B.requires_grad
    y2d, _ = torch.ops.lora_fast.qlora_forward(x.reshape(-1, x.shape[-1]), *nf4_fields(w4), bias, lora_A, lora_B,
                                               scaling, dropout_p, seed, store_xa)
    return y2d.reshape(*x.shape[:-1], w4.shape[0])


__all__ = ["HAS_CUSTOM_OPS", "draw_seed_tensor", "lora_linear_op", "qlora_linear_op", "seed_value"]
