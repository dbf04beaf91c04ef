"""PEFT interoperability: run PEFT LoRA models on the fused kernels, and read / write PEFT adapter files.

`patch(model)` / `unpatch(model)`
    Switch every PEFT `lora.Linear` or `vera.Linear` (base `nn.Linear`, or a transformers `Conv1D` with
    `fan_in_fan_out=True`) of a PeftModel, or of a model after `peft.inject_adapter_in_model`, to
    `lora_fast.lora_linear` (or `dora_linear`, `vera_linear`), in place. Only the instance's `forward` attribute
    changes: parameters, names, state_dict, optimizer state and checkpoints are
    untouched. `unpatch` restores PEFT's forward.

    Semantics of the patched forward (PEFT's `lora.Linear.forward`, term by term):
    - `disable_adapters`, `merged`, extra forward arguments (`adapter_names=` mixed batches, variant kwargs):
      PEFT's own forward is called (base only / PEFT's mixed-batch path), so behaviour is PEFT's exactly.
    - Active adapters (`module.active_adapters`, set by `set_adapter`), those the module does not hold skipped.
      The FIRST active adapter is fused with the base GEMM: `lora_linear(x, W, b, A, B, scaling[name],
      p, training)`, or for a DoRA adapter (`use_dora`) `lora_fast.dora.dora_linear(x, W, b, A, B,
      lora_magnitude_vector[name].weight, scaling[name], p, training)`, which follows PEFT's DoRA term by term
      (detached weight norm, bias after the scale, undropped x on the base path). Each FURTHER active adapter adds
      PEFT's own plain-torch term `lora_B(lora_A(dropout(x))) * scaling[name]` (same modules, same dropout module),
      or PEFT's own DoRA variant on the running result, so several active adapters add up as in PEFT; only the
      first gets the fused kernel.
    - `scaling[name]` is read at every call (rsLoRA is already folded into it by PEFT; `set_scale` /
      `scale_layer` are honoured).
    - `lora_dropout[name]`: `nn.Dropout(p)` gives `dropout_p = p`, active when that Dropout module is in training
      mode (it follows `model.train()` / `.eval()`); `nn.Identity` gives 0. The fused kernel draws its own
      (Philox) mask, so with p > 0 in training the random mask differs from torch's, the distribution does not.
    - `fan_in_fan_out` (GPT-2 `Conv1D`, weight stored [in, out]): the kernel is given `weight.T`, a strided view,
      no copy.
    - dtypes: when the adapter's dtype differs from x's (PEFT's default keeps adapters in fp32 on a bf16/fp16
      base, `autocast_adapter_dtype=True`), PEFT casts x up to fp32 for the LoRA branch. The fused path instead
      casts A and B (small, [r, K] and [N, r]) DOWN to x's dtype with a differentiable `.to()`; the gradients of
      the fp32 parameters are computed in x's dtype and returned in fp32. Products still accumulate in fp32 in
      the kernel, so the difference from PEFT is one rounding of A, B and of xa to x's dtype. With fp32
      everywhere the results equal PEFT's up to summation order.
    - Not fused, PEFT's forward kept (decided per call, so adapters added after `patch` are covered too):
      LoRA variants other than DoRA (aLoRA, ...), DoRA on a `Conv1D` base, `lora_bias=True` (a bias on lora_B), an
      x whose dtype differs from the base weight's, dropout modules other than nn.Dropout / nn.Identity, base
      layers carrying forward hooks (accelerate offload hooks).
    - PEFT's VeRA layers (`VeraConfig`, a `vera.Linear` on the same bases): the first active adapter through
      `lora_fast.vera.vera_linear(x, W, b, vera_A[:, :in], vera_B[:out], vera_lambda_d, vera_lambda_b, p,
      training)`, which is PEFT's VeRA term (`lambda_b * ((lambda_d * (drop(x) @ A^T)) @ B^T)`); further active
      adapters add PEFT's own term. PEFT keeps the lambdas and projections in fp32 and casts x up; the fused path
      casts the projections down to x's dtype (fp32 sums) and returns the lambdas' gradients in fp32. Quantized
      bases keep PEFT's forward.
    - Not patched at all (reported in one log line): every other PEFT layer type (Embedding, Conv1d/2d/3d,
      bitsandbytes / GPTQ / AWQ / torchao quantized layers, ...), base layers other than exactly `nn.Linear` or
      `Conv1D`, and layers any of whose adapters uses a variant other than DoRA, or DoRA on a `Conv1D`, at patch
      time.

`load_peft_adapter(model, path)` / `save_peft_adapter(model, path)`
    PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors` or `adapter_model.bin`) to and
    from models built with `lora_fast.apply_lora` (`LoRALinear` modules).

`load_peft_adapter_into_pool(pool, layer_map, path, name)`
    A PEFT adapter directory into an `AdapterPool` slot.

PEFT is needed for `patch` only; the file functions use `safetensors` (and torch for `.bin`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import types
from collections import Counter
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .dora import dora_linear
from .functional import autocast_dtype, lora_linear
from .vera import vera_linear
from .embedding import LoRAEmbedding
from .layers import LoRALinear
from .validation import check_flag, check_target_modules

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SAVED = "_lora_fast_saved_forward"  # what the instance's __dict__ held under "forward" before patch (or a marker)
_NONE = "<no instance forward>"
_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------------------------

def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _check_path(path) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path (str or os.PathLike), got {type(path).__name__}")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers missing or moved
        return None


def _peft_linear_type():
    from peft.tuners.lora import Linear  # noqa: PLC0415  (PEFT is only needed here)
    return Linear


def _dora_adapters(module) -> set:
    return {k for k, v in (getattr(module, "use_dora", {}) or {}).items() if v}


def _other_variant_adapters(module) -> set:
    """The adapters of `module` that use a LoRA variant other than DoRA (aLoRA, ...): PEFT's forward for them."""
    return set(getattr(module, "lora_variant", {}) or {}) - _dora_adapters(module)


def _peft_vera_types():
    """(vera.Linear or None, VeraLayer or ()) of the installed PEFT: None / () for a PEFT without VeRA."""
    try:
        from peft.tuners.vera import Linear, VeraLayer  # noqa: PLC0415
    except ImportError:
        return None, ()
    return Linear, VeraLayer


def _skip_reason(module) -> str | None:
    """None when `module` (a PEFT lora or vera layer) can be patched, else a short kind name for the log line."""
    vera = _peft_vera_types()[0]
    if vera is not None and type(module) is vera:
        reason = _base_skip_reason(module)
        if reason is None and getattr(module, "quantization_backend", None) is not None:
            reason = "Linear(quantized weight)"
        return None if reason is None else f"vera.{reason}"
    if type(module) is not _peft_linear_type():
        family = "vera" if isinstance(module, _peft_vera_types()[1]) else "lora"
        return f"{family}.{type(module).__name__}"
    reason = _base_skip_reason(module)
    if reason is not None:
        return reason
    if _other_variant_adapters(module):
        return "variant"
    if _dora_adapters(module) and type(module.get_base_layer()) is not nn.Linear:
        return "DoRA(Conv1D)"
    return None


def _base_skip_reason(module) -> str | None:
    """Why a PEFT layer's base cannot take the fused kernels (None: it can): exactly nn.Linear, or a transformers
    Conv1D with fan_in_fan_out, holding a plain float weight."""
    base = module.get_base_layer()
    conv1d = _conv1d_type()
    if type(base) is nn.Linear:
        if module.fan_in_fan_out:
            return "Linear(fan_in_fan_out)"
    elif conv1d is not None and type(base) is conv1d:
        if not module.fan_in_fan_out:
            return "Conv1D(not fan_in_fan_out)"
    else:
        return f"Linear(base={type(base).__name__})"
    w = getattr(base, "weight", None)
    if not isinstance(w, torch.Tensor) or type(w.data) is not torch.Tensor or w.dtype not in _FLOAT_DTYPES:
        return "Linear(quantized weight)"
    return None


def _dropout_p(drop: nn.Module):
    """(p, training) of a PEFT lora_dropout entry, or None when it is not a plain Dropout / Identity."""
    if isinstance(drop, nn.Identity):
        return 0.0, False
    if type(drop) is nn.Dropout:
        p = float(drop.p)
        if not 0.0 <= p < 1.0:
            return None
        return p, bool(drop.training)
    return None


def _base_operands(self, x: torch.Tensor):
    """(W [N, K], b) of a PEFT layer's base for the fused kernels, or None when PEFT's forward must run: a base with
    forward hooks (accelerate offload), a non-float x, or dtypes that differ outside autocast."""
    base = self.get_base_layer()
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
        return None
    weight, bias = base.weight, base.bias
    if x.dtype not in _FLOAT_DTYPES:
        return None
    # Under autocast lora_linear casts every operand to the autocast dtype, as PEFT's base layer and adapters get
    # cast, so x, W and b may differ in dtype there (a bf16 activation meeting fp32 weights is the usual case).
    autocast = autocast_dtype("cuda" if x.is_cuda else "cpu") is not None
    if not autocast and (x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype)):
        return None
    # Conv1D stores [in, out]; the kernels take strides, no copy
    return (weight.T if self.fan_in_fan_out else weight), bias


def _fused_vera_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The patched `forward` of a PEFT vera.Linear: its first active adapter through `vera_linear` (the module
    docstring); the others add PEFT's own term."""
    peft_forward = self._lora_fast_peft_forward
    if args or kwargs or self.disable_adapters or self.merged or not isinstance(x, torch.Tensor):
        return peft_forward(x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.vera_lambda_d]
    operands = _base_operands(self, x) if active else None
    drop = _dropout_p(self.vera_dropout[active[0]]) if active else None
    if operands is None or drop is None or getattr(self, "quantization_backend", None) is not None:
        return peft_forward(x)

    def projections(name):  # this layer's slices of the shared projections, as PEFT's forward takes them
        return (self.vera_A[name][:, :self.in_features].to(x.device),
                self.vera_B[name][:self.out_features].to(x.device))

    first = active[0]
    result = vera_linear(x, *operands, *projections(first), self.vera_lambda_d[first], self.vera_lambda_b[first],
                         *drop)
    out_dtype = result.dtype
    for name in active[1:]:  # PEFT's own term for every further adapter
        lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
        A, B = projections(name)
        xc = self._cast_input_dtype(x, lambda_d.dtype)
        result = result + lambda_b * F.linear(lambda_d * F.linear(self.vera_dropout[name](xc), A), B)
    return result.to(out_dtype)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The patched `forward` of a PEFT lora.Linear (see the module docstring)."""
    peft_forward = self._lora_fast_peft_forward
    if args or kwargs or self.disable_adapters or self.merged or not isinstance(x, torch.Tensor):
        return peft_forward(x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if not active:
        return peft_forward(x)
    others, dora = _other_variant_adapters(self), _dora_adapters(self)
    if any(a in others or self.lora_B[a].bias is not None or self.lora_A[a].bias is not None for a in active):
        return peft_forward(x)
    if self.fan_in_fan_out and dora.intersection(active):  # DoRA on a Conv1D base: PEFT's forward
        return peft_forward(x)
    operands = _base_operands(self, x)
    if operands is None:
        return peft_forward(x)
    weight, bias = operands
    first = active[0]
    drop = _dropout_p(self.lora_dropout[first])
    A, B = self.lora_A[first].weight, self.lora_B[first].weight
    cast = A.dtype != x.dtype or B.dtype != x.dtype
    if drop is None or (cast and not getattr(self, "cast_input_dtype_enabled", True)):
        return peft_forward(x)
    if cast:
        A, B = A.to(x.dtype), B.to(x.dtype)
    p, training = drop
    scaling = self.scaling[first]
    if isinstance(scaling, torch.Tensor):
        scaling = float(scaling)
    if first in dora:  # magnitude [N]: PEFT keeps it in the adapters' dtype; its gradient comes back in it
        result = dora_linear(x, weight, bias, A, B, self.lora_magnitude_vector[first].weight, float(scaling), p,
                             training)
    else:
        result = lora_linear(x, weight, bias, A, B, float(scaling), p, training)
    if len(active) > 1:
        out_dtype = result.dtype
        for name in active[1:]:  # PEFT's own term for every further adapter
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            xc = self._cast_input_dtype(x, lora_A.weight.dtype)
            if name in dora:  # PEFT's DoRA variant, on the running result as PEFT's forward gives it
                result = self.lora_variant[name].forward(self, active_adapter=name, x=xc, result=result)
            else:
                result = result + lora_B(lora_A(self.lora_dropout[name](xc))) * self.scaling[name]
        result = result.to(out_dtype)
    return result


def _peft_layers(model: nn.Module):
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as e:  # pragma: no cover
        raise ImportError("lora_fast.peft.patch needs the `peft` package (pip install peft)") from e
    kinds = (LoraLayer, _peft_vera_types()[1])
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def is_patched(module: nn.Module) -> bool:
    return _SAVED in module.__dict__


def patch(model: nn.Module) -> nn.Module:
    """Switch every fusable PEFT lora.Linear and vera.Linear of `model` to the fused kernels, in place; return
    `model`.

    Idempotent. Parameters and state_dict are unchanged (only the instances' `forward` attribute is set).
    Logs one INFO line: how many modules were patched, and which kinds kept PEFT's forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    patched, already, skipped = Counter(), 0, Counter()
    vera = _peft_vera_types()[0]
    for _, module in _peft_layers(model):
        if is_patched(module):
            already += 1
            continue
        reason = _skip_reason(module)
        if reason is not None:
            skipped[reason] += 1
            continue
        module.__dict__[_SAVED] = module.__dict__.get("forward", _NONE)
        module._lora_fast_peft_forward = module.forward  # PEFT's (or the previously set) bound forward
        is_vera = vera is not None and type(module) is vera
        module.forward = types.MethodType(_fused_vera_forward if is_vera else _fused_forward, module)
        patched["vera.Linear" if is_vera else "lora.Linear"] += 1
    kept = ", ".join(f"{k} x{v}" for k, v in sorted(skipped.items())) or "none"
    done = " + ".join(f"{v} {k}" for k, v in sorted(patched.items())) or "0 lora.Linear"
    logger.info("lora_fast.peft.patch: patched %s module(s)%s; kept PEFT's forward for: %s",
                done, f" ({already} already patched)" if already else "", kept)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore PEFT's forward on every module `patch` changed; return `model`."""
    _check_model(model)
    restored = 0
    for _, module in model.named_modules():
        if not is_patched(module):
            continue
        saved = module.__dict__.pop(_SAVED)
        module.__dict__.pop("_lora_fast_peft_forward", None)
        if isinstance(saved, str) and saved == _NONE:
            module.__dict__.pop("forward", None)
        else:
            module.forward = saved
        restored += 1
    logger.info("lora_fast.peft.unpatch: restored PEFT's forward on %d module(s)", restored)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Adapter files
# ----------------------------------------------------------------------------------------------------------------

def _pattern_value(patterns: Mapping[str, object] | None, name: str, default):
    """PEFT's `get_pattern_key`: the first key `k` with re.match(rf"(.*\\.)?({k})$", name)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft_adapter(path: str) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config dict, {module name: (A [r, K], B [N, r])}) of a PEFT adapter directory.

    Module names are relative to the base model (PEFT's `base_model.model.` prefix removed); embedding adapters
    (`lora_embedding_A` [r, vocab] / `lora_embedding_B` [dim, r]) come as (A, B) too. Raises for what a plain LoRA
    file cannot hold here: DoRA magnitudes, lora_bias, modules_to_save weights, non-LoRA types.
    """
    _check_path(path)
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file
        state = load_file(st)
    else:
        state = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    pat = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    emb = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_embedding_([AB])(?:\.[^.]+)?$")
    for key, t in state.items():
        m = pat.match(key) or emb.match(key)
        if m is None:
            raise ValueError(f"{path}: unsupported key {key!r} (only plain LoRA lora_A / lora_B weights and "
                             "lora_embedding_A / _B are supported: no DoRA, lora_bias or modules_to_save)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    out = {}
    for name, d in pairs.items():
        if set(d) != {"A", "B"}:
            raise ValueError(f"{path}: module {name!r} has only lora_{''.join(d)}")
        for part, t in d.items():
            if t.dim() != 2 or not t.dtype.is_floating_point:
                raise ValueError(f"{path}: {name}.lora_{part} must be a 2-D float tensor, got {t.dtype} "
                                 f"{list(t.shape)}")
        out[name] = (d["A"], d["B"])
    return config, out


def load_peft_adapter(model: nn.Module, path: str, adapter_name: str = "default", strict: bool = True) -> nn.Module:
    """Load a PEFT LoRA adapter directory into `model` (built with `lora_fast.apply_lora`), in place.

    Each adapted module `name` of the file must be a `LoRALinear` of `model` (or a plain nn.Linear, which is then
    wrapped with `LoRALinear.from_linear`), or a `LoRAEmbedding` (nn.Embedding, wrapped) for embedding adapters. Its rank comes from the tensors (= `r` or `rank_pattern`), its alpha
    from `lora_alpha` / `alpha_pattern`, `use_rslora` and `lora_dropout` from the config. When the rank differs
    from the layer's, lora_A / lora_B are replaced by new Parameters (build the optimizer after loading).
    strict: raise if `model` has LoRALinear modules the file does not adapt (else they are left as they are).
    `adapter_name` only labels messages: a LoRALinear holds one adapter.
    Returns `model`.
    """
    _check_model(model)
    _check_path(path)
    check_flag(strict, "strict")
    config, pairs = read_peft_adapter(path)
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters are not supported by LoRALinear")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(f"{path}: adapters with trained biases (bias / lora_bias) are not supported")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{path}: fan_in_fan_out (Conv1D) adapters need a Conv1D base; LoRALinear wraps nn.Linear")
    modules = dict(model.named_modules())
    adaptable = (nn.Linear, LoRALinear, nn.Embedding, LoRAEmbedding)
    missing = [n for n in pairs if not isinstance(modules.get(n), adaptable)]
    if missing:
        raise ValueError(f"{path} (adapter {adapter_name!r}): modules {missing[:5]}{'...' if len(missing) > 5 else ''}"
                         " are not nn.Linear / LoRALinear / nn.Embedding / LoRAEmbedding modules of the model")
    if strict:
        extra = [n for n, m in modules.items() if isinstance(m, (LoRALinear, LoRAEmbedding)) and n not in pairs]
        if extra:
            raise ValueError(f"{path} (adapter {adapter_name!r}) does not adapt LoRALinear modules {extra[:5]}"
                             f"{'...' if len(extra) > 5 else ''}; pass strict=False to leave them as they are")
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    for name, (a, b) in pairs.items():
        layer = modules[name]
        rank = int(a.shape[0])
        expected = _pattern_value(config.get("rank_pattern"), name, r0)
        if rank != int(expected):
            raise ValueError(f"{path}: {name}.lora_A has rank {rank} but the config says r={expected}")
        alpha = float(_pattern_value(config.get("alpha_pattern"), name, alpha0))
        if not isinstance(layer, (LoRALinear, LoRAEmbedding)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(layer, nn.Embedding):
                layer = LoRAEmbedding.from_embedding(layer, rank, alpha, use_rslora)
            else:
                layer = LoRALinear.from_linear(layer, rank, alpha, dropout, use_rslora)
            setattr(parent, child, layer)
        if layer.merged:
            raise ValueError(f"{name} is merged; unmerge() before loading an adapter")
        fan_in, fan_out = layer.lora_A.shape[1], layer.lora_B.shape[0]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise ValueError(f"{path}: {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; the layer needs "
                             f"[r, {fan_in}] and [{fan_out}, r]")
        kw = {"device": layer.weight.device, "dtype": layer.lora_A.dtype}
        if layer.rank != rank:
            layer.lora_A = nn.Parameter(a.to(**kw).clone(), requires_grad=layer.lora_A.requires_grad)
            layer.lora_B = nn.Parameter(b.to(**kw).clone(), requires_grad=layer.lora_B.requires_grad)
        else:
            with torch.no_grad():
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)
        layer.rank, layer.alpha, layer.use_rslora = rank, alpha, use_rslora
        if isinstance(layer, LoRALinear):   # PEFT applies no dropout to embedding adapters
            layer.dropout = dropout
    return model


def _suffix_targets(model: nn.Module, names: list[str]) -> list[str] | None:
    """The shortest name suffixes that select exactly `names` among the model's linear modules, or None."""
    linears = [n for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, LoRALinear, nn.Embedding, LoRAEmbedding))]
    chosen = set(names)
    for depth in range(1, max(n.count(".") for n in names) + 2):
        suffixes = sorted({".".join(n.split(".")[-depth:]) for n in names})
        hits = {n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)}
        if hits == chosen:
            return suffixes
    return None


def save_peft_adapter(model: nn.Module, path: str, target_modules: Iterable[str] | str | None = None,
                      base_model_name_or_path: str | None = None, task_type: str | None = None,
                      safe_serialization: bool = True) -> dict:
    """Write the `LoRALinear` and `LoRAEmbedding` adapters of `model` as a PEFT LoRA adapter directory; return
    the config written.

    `peft.PeftModel.from_pretrained(base_model, path)` loads it, `base_model` being the model before
    `apply_lora`. The most common rank and alpha become `r` / `lora_alpha`, the others go to
    `rank_pattern` / `alpha_pattern` (full module names, regex-escaped). `use_rslora` must be the same for every
    layer; `lora_dropout` is the most common one (PEFT has no per-module dropout).
    target_modules: written as given; by default the shortest module-name suffixes that select exactly the
    adapted layers (e.g. ["q_proj", "v_proj"]), else the full names.
    """
    _check_model(model)
    _check_path(path)
    if target_modules is not None:
        check_target_modules(model, target_modules)
    check_flag(safe_serialization, "safe_serialization")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]
    if not layers:
        raise ValueError("model has no LoRALinear or LoRAEmbedding module")
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise ValueError(f"modules {merged[:5]} are merged; unmerge() them before saving")
    rslora = {m.use_rslora for _, m in layers}
    if len(rslora) > 1:
        raise ValueError("PEFT's config holds one use_rslora; the model's LoRALinear layers mix both")
    names = [n for n, _ in layers]
    r0 = Counter(m.rank for _, m in layers).most_common(1)[0][0]
    a0 = Counter(m.alpha for _, m in layers).most_common(1)[0][0]
    d0 = Counter(m.dropout for _, m in layers if isinstance(m, LoRALinear)).most_common(1)
    d0 = d0[0][0] if d0 else 0.0
    rank_pattern = {re.escape(n): m.rank for n, m in layers if m.rank != r0}
    alpha_pattern = {re.escape(n): _num(m.alpha) for n, m in layers if m.alpha != a0}
    if target_modules is None:
        target_modules = _suffix_targets(model, names) or names
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r0, "lora_alpha": _num(a0), "lora_dropout": d0, "use_rslora": rslora.pop(),
        "target_modules": target_modules, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "use_dora": False, "inference_mode": True, "revision": None,
    }
    state = {}
    for n, m in layers:
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if isinstance(m, LoRAEmbedding) else \
            ("lora_A.weight", "lora_B.weight")
        state[f"{_PREFIX}{n}.{a_key}"] = m.lora_A.detach().contiguous().cpu().clone()
        state[f"{_PREFIX}{n}.{b_key}"] = m.lora_B.detach().contiguous().cpu().clone()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if safe_serialization:
        from safetensors.torch import save_file
        save_file(state, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, os.path.join(path, "adapter_model.bin"))
    return config


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def load_peft_adapter_into_pool(pool, layer_map: Mapping[str, str | list[str]], path: str, name: str) -> int:
    """Load a PEFT adapter directory into a free slot of `pool` (an `AdapterPool`) as `name`; return the slot.

    layer_map: pool layer key -> the PEFT module name (relative to the base model, e.g.
    "model.layers.0.self_attn.q_proj"), or a list of names, one per slice, for a fused layer (e.g. qkv).
    Pool layers not mapped, or mapped to modules the file does not adapt, get a zero update.
    A slot holds one rank and one scaling: per-module ranks (rank_pattern) are zero-padded to the largest, and a
    per-module scaling that differs from the slot's (alpha_pattern) is folded into that module's B. The folding
    is exact in fp32, one rounding in the pool's dtype.
    """
    from .multi_lora import AdapterPool

    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be a lora_fast.AdapterPool, got {type(pool).__name__}")
    if not isinstance(layer_map, Mapping):
        raise TypeError(f"layer_map must be a dict {{pool layer key: PEFT module name or list of names}}, "
                        f"got {type(layer_map).__name__}")
    for key, mods in layer_map.items():
        if key not in pool._layers:
            raise ValueError(f"layer_map: {key!r} is not a layer of the pool (its layers: {sorted(pool._layers)})")
        names = mods if isinstance(mods, list) else [mods]
        if not names or not all(isinstance(m, str) for m in names):
            raise TypeError(f"layer_map[{key!r}] must be a PEFT module name or a list of names, one per slice, "
                            f"got {mods!r}")
        if len(names) != len(pool._layers[key][2]):
            raise ValueError(f"layer_map[{key!r}] names {len(names)} module(s) but the pool layer has "
                             f"{len(pool._layers[key][2])} slice(s)")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    _check_path(path)
    config, pairs = read_peft_adapter(path)
    if config.get("use_dora") or config.get("lora_bias") or config.get("bias", "none") != "none":
        raise ValueError(f"{path}: DoRA / bias adapters cannot go in an AdapterPool")
    use_rslora = bool(config.get("use_rslora", False))
    alpha0 = config.get("lora_alpha", 8)

    def scale(mod, rank):
        alpha = float(_pattern_value(config.get("alpha_pattern"), mod, alpha0))
        return alpha / (math.sqrt(rank) if use_rslora else rank)

    used = {k: (v if isinstance(v, list) else [v]) for k, v in layer_map.items()}
    ranks = [int(pairs[m][0].shape[0]) for mods in used.values() for m in mods if m in pairs]
    if not ranks:
        raise ValueError(f"{path}: layer_map names none of the adapted modules {sorted(pairs)[:5]}")
    rank = max(ranks)
    alpha_slot = float(alpha0)
    slot_scale = alpha_slot / (math.sqrt(rank) if use_rslora else rank)
    weights = {}
    for key, mods in used.items():
        plist = []
        for mod in mods:
            if mod in pairs:
                a, b = pairs[mod]
                r = a.shape[0]
                b = b.float() * (scale(mod, r) / slot_scale)
                a = torch.cat([a.float(), a.new_zeros(rank - r, a.shape[1], dtype=torch.float32)])
                b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
                plist.append((a, b))
            else:
                plist.append(None)
        if all(p is None for p in plist):
            continue
        # a fused layer with some slices unadapted: zero pairs of the right shapes
        if any(p is None for p in plist):
            ref = next(p for p in plist if p is not None)
            sizes = pool._layers[key][2]
            plist = [p if p is not None else (ref[0].new_zeros(rank, ref[0].shape[1]),
                                                  ref[1].new_zeros(sizes[i], rank)) for i, p in enumerate(plist)]
        weights[key] = plist if len(plist) > 1 else plist[0]
    dt = pool.dtype
    weights = {k: ([(a.to(dt), b.to(dt)) for a, b in v] if isinstance(v, list) else (v[0].to(dt), v[1].to(dt)))
               for k, v in weights.items()}
    return pool.load(name, weights, alpha=alpha_slot, rank=rank, use_rslora=use_rslora)
