"""`LoRALinear`, the drop-in module, and model-level helpers (`apply_lora`, `count_parameters`).

State-dict keys of a LoRALinear: `weight` [out, in] and `bias` [out] (the frozen base, as nn.Linear names them),
`lora_A` [r, in] and `lora_B` [out, r]. `scaling` and `dropout` are constructor arguments, not state.
merge() folds s * B @ A into `weight` in place; the state dict of a merged layer still holds the unmerged weight
(what unmerge() would restore: `lora_fast.merging`), and loading into a merged layer keeps it merged.
`init=` picks the initialisation (lora_fast.init): "pissa" and "nonzero" rewrite `weight` in place.
"""
from __future__ import annotations

import json
import re
from collections import abc
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import LoRAEmbedding
from .functional import lora_linear
from .init import LoRAFactors, check_init, deferred_base_writes, init_lora, write_deferred_base
from .merging import SavesUnmerged
from .validation import check_dropout, check_dtype, check_flag, check_rank, check_scaling, check_target_modules


def adopt_frozen_base(module: nn.Module, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """Give `module` the base layer's weight [out, in] and bias [out] (shared, not copied), frozen, and set its
    out_features / in_features."""
    module.out_features, module.in_features = weight.shape
    weight.requires_grad_(False)
    module.weight = weight
    if bias is not None:
        bias.requires_grad_(False)
    module.bias = bias


class LoRALinear(SavesUnmerged, LoRAFactors, nn.Module):
    """y = x @ W^T + b + scaling * (dropout(x) @ A^T) @ B^T, with W and b frozen and A, B trained.

    Args: in_features, out_features; rank r >= 1; alpha (scaling = alpha / r, or alpha / sqrt(r) with
    use_rslora); dropout in [0, 1) on the LoRA branch's input during training; bias; device; dtype.
    init: "default" (PEFT's: A kaiming-uniform (a = sqrt(5)), B zero: at init the output equals the base
    linear's), "gaussian", "nonzero", "pissa" or "from_delta" (with delta=dW [out, in]); see lora_fast.init.
    "pissa" and "nonzero" rewrite the weight in place (W <- W - s*B@A). pissa_niter: randomized SVD iterations.
    `init_error` holds the scheme's reported error (from_delta: ||dW - s*B@A|| / ||dW||), else None.

    >>> layer = LoRALinear(4096, 4096, rank=16, alpha=32, dropout=0.05, device="cuda", dtype=torch.bfloat16)
    >>> y = layer(torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16))
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, device=None, dtype=None, init: str = "default",
                 delta: torch.Tensor | None = None, pissa_niter: int | None = None):
        super().__init__()
        check_rank(in_features, "in_features")
        check_rank(out_features, "out_features")
        check_dtype(dtype, "dtype")
        check_flag(bias, "bias")  # a string such as "no" would be truthy: a bias the caller did not ask for
        kw = {"device": device, "dtype": dtype}
        base = nn.Linear(in_features, out_features, bias=bias, **kw)
        self._init(base.weight, base.bias, rank, alpha, dropout, use_rslora, init, delta, pissa_niter)

    adapter_variant = "lora"

    def _init(self, weight: nn.Parameter, bias: nn.Parameter | None, rank, alpha, dropout, use_rslora,
              init="default", delta=None, pissa_niter=None) -> None:
        self.rank = check_rank(rank)
        self.alpha = check_scaling(alpha, "alpha")
        self.dropout = check_dropout(dropout, "dropout")
        self.use_rslora = check_flag(use_rslora, "use_rslora")  # a truthy string would switch the scaling
        adopt_frozen_base(self, weight, bias)
        self._make_factors(self.in_features, self.out_features, weight, init, delta, pissa_niter)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default", delta: torch.Tensor | None = None,
                              pissa_niter: int | None = None, generator: torch.Generator | None = None) -> None:
        """(Re)initialise A and B by `init` (lora_fast.init.init_lora); "pissa"/"nonzero" also rewrite W in place.

        Default: PEFT's, A ~ kaiming-uniform(a = sqrt(5)), B = 0. The scaling (rsLoRA or not) is the layer's.
        """
        check_init(init)
        if self.merged:
            raise ValueError("reset_lora_parameters on a merged layer: unmerge() first")
        res = init_lora(self.weight, self.rank, init, self.scaling, delta, pissa_niter, generator)
        self._load_init(res)
        self.init, self.init_error = init, res.error

    def _init_view(self) -> torch.Tensor:
        return self.weight

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds for this layer (count_parameters sizes the adapter from these)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "default", delta: torch.Tensor | None = None,
                    pissa_niter: int | None = None) -> "LoRALinear":
        """Wrap `linear`, sharing (not copying) its weight and bias, which are frozen.

        init="pissa" or "nonzero" rewrites the shared weight in place: `linear` then holds the residual too.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init(linear.weight, linear.bias, rank, alpha, dropout, use_rslora, init, delta, pissa_niter)
        return layer

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A [out, in], computed in fp32 and returned in the weight's dtype."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight`: forward then costs a plain linear. Rounds in the weight's dtype."""
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self.lora_B.float() @ self.lora_A.float() * self.scaling)
                          .to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W is restored within the rounding of its dtype (fp32: ~1e-7 relative)."""
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight())
        self.merged = False

    def _unmerged_weight(self) -> torch.Tensor:
        """W as unmerge() restores it from the merged weight, in W's dtype (the layer is not changed)."""
        return (self.weight.float() - self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.weight.dtype)

    def _unmerged_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self._unmerged_weight()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           self.dropout, self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"bias={self.bias is not None}, use_rslora={self.use_rslora}, init={self.init}, merged={self.merged}")


def _matches(name: str, targets: Iterable[str] | str) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _same_memory_key(t: torch.Tensor):
    """Equal for two tensors over the same elements (one tied Parameter, or two views of one region)."""
    return (t.data_ptr(), tuple(t.shape), t.stride()) if t.device.type != "meta" and t.data_ptr() else id(t)


def check_targets(targets: list[tuple[str, nn.Module]], rank: int, init: str, deltas=None,
                  quantize: str | None = None) -> None:
    """Per-module checks of the model helpers, run on every matched module before any is built or changed, each
    naming its module: deltas present for every module and for no other (init="from_delta"), rank <= min(out, in)
    for the SVD inits, a weight
    shared by two modules refused for the inits that rewrite it in place, NF4's K a multiple of 64 and a
    compute dtype it takes."""
    rewritten: dict[object, str] = {}
    if deltas is not None:  # a key that matches no module is most likely a typo: its delta would be dropped
        unused = sorted(set(deltas) - {name for name, _ in targets})
        if unused:
            raise ValueError(f"init='from_delta': deltas has entries for modules that target_modules did not match: "
                             f"{unused[:8]} (matched: {[name for name, _ in targets][:8]})")
    for name, module in targets:
        shape = tuple(module.weight.shape)  # linear [out, in]; embedding [vocab, dim]
        if deltas is not None and name not in deltas:
            raise ValueError(f"init='from_delta': deltas has no entry for matched module {name!r}")
        if init in ("pissa", "from_delta") and rank > min(shape):
            raise ValueError(f"module {name!r}: rank={rank} exceeds min{shape} = {min(shape)} of its weight: "
                             f"init={init!r} (an SVD) needs rank <= min(out_features, in_features)")
        if init in ("pissa", "nonzero"):
            key = _same_memory_key(module.weight)
            if key in rewritten:
                raise ValueError(f"init={init!r} rewrites each module's weight in place (W <- W - s*B@A), but "
                                 f"modules {rewritten[key]!r} and {name!r} share one weight (tied weights): "
                                 "adapt only one of them, or use init='default'")
            rewritten[key] = name
        if quantize is not None and isinstance(module, nn.Linear):
            from .nf4 import check_nf4_shape
            from .qlora import COMPUTE_DTYPES

            try:
                check_nf4_shape(shape, "weight")
                if module.weight.dtype not in COMPUTE_DTYPES:
                    raise TypeError(f"the weight's dtype {module.weight.dtype} is no NF4 compute dtype "
                                    "(float16, bfloat16 or float32)")
            except (ValueError, TypeError) as e:
                raise type(e)(f"quantize={quantize!r}, module {name!r}: {e}") from e


def build_all(model: nn.Module, targets: list[tuple[str, nn.Module]], build) -> list[nn.Module]:
    """[build(name, module) for each target], all or nothing: built with `deferred_base_writes` (no shared base
    weight is rewritten yet); if one build fails, every parameter of `model` gets its requires_grad back and
    the error propagates (a ValueError / TypeError naming its module), the model as it was."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    built = []
    try:
        with deferred_base_writes():
            for name, module in targets:
                try:
                    new = build(name, module)
                except (ValueError, TypeError) as e:
                    if not name or repr(name) in str(e):
                        raise
                    try:
                        named = type(e)(f"module {name!r}: {e}")
                    except Exception:  # noqa: BLE001 -- an exception type with other arguments: as it is
                        raise e from None
                    raise named from e
                if not isinstance(new, nn.Module):
                    raise TypeError(f"make({name!r}, linear) must return an nn.Module, got {type(new).__name__}")
                built.append(new)
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return built


def swap_in(model: nn.Module, targets: list[tuple[str, nn.Module]], built: list[nn.Module]) -> None:
    """Write the base weights `build_all` held back, then put each built module in its target's place."""
    for new in built:
        write_deferred_base(new)
    for (name, _), new in zip(targets, built):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def freeze_base(model: nn.Module, trainable: tuple[str, ...]) -> None:
    """The model helpers' freezing rule: a parameter requires grad iff its name ends with one of `trainable` (the
    variant just applied), or it is an adapter parameter (a tensor `adapter_state_dict()` returns) of a lora-fast
    adapter module and requires grad already. So applying one variant after another (apply_vera after
    apply_dora, apply_lora on an embedding after apply_dora) keeps the earlier variants' adapters training (and
    one frozen on purpose frozen), and every base parameter (weights, biases, norms, heads) is frozen."""
    adapter = set()
    for module in model.modules():
        if callable(getattr(module, "adapter_state_dict", None)):
            adapter.update(id(t) for t in module.adapter_state_dict().values())
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(trainable) or (id(param) in adapter and param.requires_grad))


def apply_lora(model: nn.Module, target_modules: Iterable[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj"),
               rank: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
               init: str = "default", pissa_niter: int | None = None,
               deltas: Mapping[str, torch.Tensor] | None = None, quantize: str | None = None) -> nn.Module:
    """Replace every nn.Linear (nn.Embedding) of `model` whose name matches `target_modules` by a LoRALinear
    (LoRAEmbedding) sharing its weights, freeze every other parameter, and return `model` (changed in place).

    All or nothing: every matched module is checked and built before any weight is rewritten or module swapped,
    so an error (a rank too big for one layer's SVD init, a layer NF4 cannot take, ...) leaves the model as it
    was: its modules, weights and requires_grad. Freezing: lora_A / lora_B train, adapter parameters of other
    variants' modules (apply_dora's magnitude, apply_vera's lambdas) keep their requires_grad, and every other
    parameter is frozen (`freeze_base`).

    target_modules: names or name suffixes (["q_proj", "mlp.up_proj"]), or one regex string (full match).
    init, pissa_niter: see LoRALinear (embeddings take no dropout, as in PEFT). init="from_delta" needs
    deltas={module name: dW} for every matched module (dW [out, in] for a linear, [vocab, dim] for an embedding).
    quantize: None, "nf4" or "nf4_dq" (double-quantized absmax): QLoRA, each matched linear becomes a
    `lora_fast.qlora.LoRALinear4bit` whose frozen base is quantized to NF4 (its bf16 weight is released);
    compute dtype = the linear's dtype. Needs init="default" and in_features a multiple of 64. Every layer is
    quantized before the first is swapped: until apply_lora returns, the NF4 copies and the original weights
    coexist (about 1.3x the matched weights' bf16 bytes at the peak).

    >>> model = apply_lora(model, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], rank=16, alpha=32)
    """
    check_target_modules(model, target_modules)
    check_rank(rank)
    check_dropout(dropout, "dropout")
    check_init(init)
    if (deltas is not None) != (init == "from_delta"):
        raise ValueError("deltas={module name: dW} goes with init='from_delta' and only with it")
    if deltas is not None and not isinstance(deltas, abc.Mapping):
        raise TypeError(f"deltas must be a mapping {{module name: dW}}, got {type(deltas).__name__}")
    if quantize not in (None, "nf4", "nf4_dq"):
        raise ValueError(f"quantize must be None, 'nf4' or 'nf4_dq', got {quantize!r}")
    if quantize is not None and init != "default":
        raise ValueError(f"quantize={quantize!r} takes init='default' only (the base is frozen in NF4), got {init!r}")
    if quantize is not None and pissa_niter is not None:
        raise ValueError(f"pissa_niter goes with init='pissa', which quantize={quantize!r} does not take")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, nn.Embedding)) and _matches(name, target_modules)]
    if not targets:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear or nn.Embedding in the model")
    # All or nothing: every module is checked, then built (with the base rewrites of "pissa" / "nonzero" held
    # back), and only then are the weights written and the modules swapped: an error on any layer leaves the model
    # as it was (modules, weights, requires_grad).
    check_targets(targets, rank, init, deltas, quantize)

    def build(name, module):
        delta = None if deltas is None else deltas[name]
        if isinstance(module, nn.Embedding):
            return LoRAEmbedding.from_embedding(module, rank, alpha, use_rslora, init, delta, pissa_niter)
        if quantize is not None:  # (check_targets refused what NF4 cannot take; build_all names the module)
            from .qlora import LoRALinear4bit

            return LoRALinear4bit.from_linear(module, rank, alpha, dropout, module.weight.dtype, use_rslora,
                                              double_quant=quantize == "nf4_dq")
        return LoRALinear.from_linear(module, rank, alpha, dropout, use_rslora, init, delta, pissa_niter)

    swap_in(model, targets, build_all(model, targets, build))
    freeze_base(model, ("lora_A", "lora_B"))
    return model


@dataclass
class VariantCount:
    """One adapter variant's share of a model: its modules, trainable and adapter parameters, bytes on disk, and
    `total`: every parameter of its modules (the adapted layers' frozen weights and biases, a quantized base's
    weights, and the adapter tensors), each storage once."""
    modules: int
    trainable: int
    adapter: int
    adapter_bytes: int
    total: int = 0


@dataclass
class ParameterCount:
    """trainable / total parameters (PEFT's print line), plus the adapter: `adapter` parameters (every tensor an
    adapter file stores, trainable or frozen-but-adapter-owned, e.g. VeRA's shared projections, counted once),
    `adapter_bytes` (its safetensors size) and `by_variant` {variant name: VariantCount}."""
    trainable: int
    total: int
    adapter: int = 0
    adapter_bytes: int = 0
    by_variant: dict[str, VariantCount] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        line = f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"
        if self.adapter:
            line += f" || adapter: {self.adapter:,} params, {self.adapter_bytes:,} bytes"
        return line


def _storage_key(t: torch.Tensor):
    """Tensors sharing memory (one VeRA projection used by many layers) count once."""
    ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
    return ptr if ptr else id(t)


# Above this many bytes of tensors, count_parameters estimates the safetensors size instead of serializing
# (which copies every tensor to host memory: fine for adapters, not for a fully trainable 7B model).
_SERIALIZE_LIMIT = 64 << 20
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Size of `tensors` saved as one safetensors file: exact (safetensors' serializer) up to _SERIALIZE_LIMIT,
    else data bytes + the JSON header, which can differ from the real header by a few bytes of padding."""
    if not tensors:
        return 0
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        from safetensors.torch import save
    except ImportError:
        save = None
    if save is not None and data <= _SERIALIZE_LIMIT:
        return len(save({k: t.detach().contiguous().cpu() for k, t in tensors.items()}))
    header, offset = {}, 0
    for k, t in tensors.items():
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES.get(t.dtype, "F32"), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    return 8 + -(-len(json.dumps(header, separators=(",", ":"))) // 8) * 8 + data


def _adapter_tensors(model: nn.Module) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int], dict[str, int]]:
    """{variant: {qualified name: tensor}}, {variant: number of modules} and {variant: every parameter of its
    modules (VariantCount.total)}, each storage once (the largest view kept, in the first variant that holds it).
    Adapter modules are those with `adapter_state_dict()`; a trainable parameter outside them (a trained head, say)
    belongs to variant "other"."""
    found: dict[object, tuple[str, str, torch.Tensor]] = {}
    owned, modules, totals, counted = set(), {}, {}, {}

    def add(variant: str, name: str, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key not in found or t.numel() > found[key][2].numel():
            found[key] = (found[key][0] if key in found else variant, name, t)

    for mname, module in model.named_modules():
        if callable(getattr(module, "adapter_state_dict", None)):
            # Looked up on the module's own class: a subclass (DoRALinear of LoRALinear) is its own variant.
            variant = vars(type(module)).get("adapter_variant", type(module).__name__)
            modules[variant] = modules.get(variant, 0) + 1
            adapter = module.adapter_state_dict()
            for k, t in adapter.items():
                add(variant, f"{mname}.{k}" if mname else k, t)
            owned.update(id(p) for p in module.parameters())
            seen = counted.setdefault(variant, set())
            for t in (*module.parameters(), *adapter.values()):
                if _storage_key(t) not in seen:
                    seen.add(_storage_key(t))
                    totals[variant] = totals.get(variant, 0) + t.numel()
            if callable(getattr(module, "quantized_numel", None)):
                totals[variant] = totals.get(variant, 0) + int(module.quantized_numel())
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in owned:
            add("other", name, p)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for variant, name, t in found.values():
        out.setdefault(variant, {})[name] = t
    return out, modules, totals


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters of `model` (shared tensors counted once), and the adapter's size.

    Adapter convention (for every variant module): a module that defines `adapter_state_dict() -> {name: tensor}`
    (the tensors an adapter file holds for it) is an adapter; its class attribute `adapter_variant` names the
    variant ("lora", "vera", "dora"; default: the class name, not inherited). Tensors that share memory across
    modules count once. `total` also includes adapter tensors that are buffers rather than parameters, and the
    frozen base weights a module holds quantized in buffers: a module that defines `quantized_numel() -> int`
    (LoRALinear4bit: its NF4 weight's out x in elements) adds that many frozen parameters. `adapter_bytes` is the
    safetensors size of each variant's tensors.

    >>> model = apply_lora(model, ["q_proj", "v_proj"], rank=16)
    >>> c = count_parameters(model)
    >>> print(c, c.by_variant["lora"].adapter_bytes)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if _storage_key(p) in seen:
            continue
        seen.add(_storage_key(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for module in model.modules():
        if callable(getattr(module, "quantized_numel", None)):
            total += int(module.quantized_numel())
    count = ParameterCount(trainable, total)
    tensors_by_variant, modules, totals = _adapter_tensors(model)
    for variant, tensors in tensors_by_variant.items():
        uniq = list(tensors.values())
        adapter = sum(t.numel() for t in uniq)
        vc = VariantCount(modules.get(variant, 0), sum(t.numel() for t in uniq if t.requires_grad), adapter,
                          _safetensors_bytes(tensors), totals.get(variant, adapter))
        count.by_variant[variant] = vc
        count.adapter += vc.adapter
        count.adapter_bytes += vc.adapter_bytes
        count.total += sum(t.numel() for t in uniq if _storage_key(t) not in seen)
    return count
