"""Cached launches: a launcher's host work is done once per plan instead of on every call.

On the GPU an eager step of small layers is bound by host time (bench/NOTES.md, "host time"). On the H200's host,
Triton's `kernel[grid](...)` took ~31 µs per launch of the forward kernel, of which calling the compiled kernel
directly takes ~10 µs: the rest binds ~45 arguments, derives their specialization and hashes it into the cache
key, on every call, for the same answer. Our launchers added ~25 µs of checks and config choices on top.

A launcher now keys its call with `plan_key` (shape, strides, dtype, device and 16-byte alignment of every tensor
argument, plus its own flags); on a miss it runs every check and choice once and builds a plan (a bad call raises
there, before anything is cached); on a hit it only allocates its outputs and calls the plan's `Launch`es with the
per-call values (pointers, seed, scaling).

`Launch` is one kernel's cached launch: the full argument list in the kernel's parameter order, constexprs
included, with the per-call slots filled in at each call. Its first call goes through `kernel[grid](...)`, which
compiles or finds the kernel and returns it; later calls on the same device call the compiled kernel's `run`, the
call Triton itself makes at the end of `JITFunction.run` (the same in Triton 3.6 to 3.9). Under the interpreter,
when launch hooks are installed (profilers), or on another current device, every call takes Triton's full path, so
the argument list built here is what the CPU tests exercise.

What a plan may not cache: anything that changes per call (data pointers, the dropout seed, the scaling factor)
and any tensor (plans outlive calls: holding a tensor would keep its memory alive).
"""
from __future__ import annotations

import os

import torch
from triton.runtime import driver as _driver

from .helpers import is_interpret

# A plan cache holds at most this many plans (one per distinct call signature); past it, it starts afresh.
MAX_PLANS = 4096
# LORA_FAST_DIRECT_LAUNCH=0 sends every launch through Triton's `kernel[grid](...)` (plans are still used): a
# switch for debugging, or for a Triton whose compiled-kernel interface differs from 3.6-3.9's.
DIRECT_LAUNCH = os.environ.get("LORA_FAST_DIRECT_LAUNCH", "1") != "0"


def tensor_key(t):
    """What a plan depends on in one tensor argument: shape, strides, dtype, device and 16-byte alignment
    (Triton specializes pointers on it). None stays None; anything else raises AttributeError/TypeError."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15


_FLAG_TYPES = (bool, int, float, str, type(None), torch.dtype)


def plan_key(tensors, *flags):
    """The key of one launcher call: `tensor_key` of each of `tensors`, then `flags` (plain values). None when a
    tensor argument is not a tensor (or None), or a flag not a plain value (a tensor is hashed by identity and may
    change in place): that call is not cached, and the launcher's checks judge it."""
    for f in flags:
        if not isinstance(f, _FLAG_TYPES):
            return None
    try:
        return tuple(map(tensor_key, tensors)) + flags
    except (AttributeError, TypeError):
        return None


def int_width(value) -> int:
    """32 or 64: the width Triton gives an int argument (its kernels are compiled per width); 0 for a non-int,
    which the launch itself then refuses."""
    try:
        return 32 if -2**31 <= value < 2**31 else 64
    except TypeError:
        return 0


def seed_key(seed):
    """A plan's key for a dropout seed: `int_width` of an int; "ptr" for a seed tensor (helpers.check_dropout),
    for which Triton compiles the kernel once more, with a pointer argument."""
    return "ptr" if isinstance(seed, torch.Tensor) else int_width(seed)


_ALL_CACHES = []


def clear_plans() -> None:
    """Forget every cached plan (config.set_override calls it: a plan holds the config it was built with)."""
    for cache in _ALL_CACHES:
        cache.clear()


class PlanCache(dict):
    """key -> plan, bounded by MAX_PLANS. A key that is None or unhashable is never found nor stored: that call
    builds its plan afresh."""

    def __init__(self):
        super().__init__()
        _ALL_CACHES.append(self)

    def find(self, key):
        try:
            return self.get(key)
        except TypeError:
            return None

    def put(self, key, plan):
        try:
            if key is not None:
                if len(self) >= MAX_PLANS:
                    self.clear()
                self[key] = plan
        except TypeError:
            pass
        return plan


try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - a Triton without knobs: every launch takes the full path
    _knobs = None


def _hooks_active() -> bool:
    """True when a launch hook is installed (Triton's enter/exit hook chains, e.g. a profiler)."""
    if _knobs is None:
        return True
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _current_device():
    return _driver.active.get_current_device()


def _current_stream(device):
    return _driver.active.get_current_stream(device)


class Launch:
    """One kernel launch with everything fixed but its per-call slots.

    fn: a @triton.jit kernel; grid: a tuple of 1 to 3 ints; slots: names of the parameters given at each call, in
    the order `__call__` takes them; args, kwargs: every other argument as in `fn[grid](*args, **kwargs)` (pass
    None for the slots); kwargs that name no parameter are launch options (num_warps, num_stages, ...).

    >>> launch = Launch(_kernel, (8,), ("X", "Y"), None, None, 128, BLOCK=64, num_warps=4)
    >>> launch(x, y)   # _kernel[(8,)](x, y, 128, BLOCK=64, num_warps=4)
    """

    __slots__ = ("fn", "grid", "args", "slots", "options", "compiled", "device")

    def __init__(self, fn, grid, slots, *args, **kwargs):
        names = list(fn.arg_names)
        if len(args) > len(names):
            raise TypeError(f"{fn.__name__} takes {len(names)} arguments, got {len(args)} positional")
        params = dict(zip(names, args))
        params.update((k, v) for k, v in kwargs.items() if k in names)
        missing = [n for n in names if n not in params]
        if missing:
            raise TypeError(f"{fn.__name__}: no value for {missing}")
        self.fn = fn
        self.grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.args = [params[n] for n in names]
        self.slots = tuple(names.index(s) for s in slots)
        self.options = {k: v for k, v in kwargs.items() if k not in names}
        self.compiled = None
        self.device = None

    def __call__(self, *values):
        args = self.args.copy()
        for i, v in zip(self.slots, values):
            args[i] = v
        kernel = self.compiled
        if kernel is not None and not _hooks_active():
            device = _current_device()
            if device == self.device:
                g0, g1, g2 = self.grid
                kernel.run(g0, g1, g2, _current_stream(device), kernel.function, kernel.packed_metadata, None,
                           None, None, *args)
                return
        kernel = self.fn[self.grid](*args, **self.options)
        if DIRECT_LAUNCH and kernel is not None and not is_interpret() and hasattr(kernel, "packed_metadata"):
            self.compiled, self.device = kernel, _current_device()


__all__ = ["Launch", "PlanCache", "clear_plans", "int_width", "plan_key", "seed_key", "tensor_key"]
