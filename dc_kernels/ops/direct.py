"""Binder-free launches: a prepared launch calls its compiled kernel without Triton's binder.

A launch through Triton's JIT (``kernel[grid](*args, **kwargs)``, or an autotuned kernel) binds
and specializes every argument on every call -- ~15-35 us of Python for our 5- to 27-argument
kernels -- before the driver launch. A launch plan (:mod:`dc_kernels.plan`) already fixes
everything that binding derives: the inputs' shapes, strides, dtypes, alignment and device, hence
the specialization, the autotuned config and the grid. :class:`DirectLaunch` is the one place
that exploits it. Its first call goes through the JIT (compiling, autotuning) and keeps what the
JIT launched -- the ``CompiledKernel``, the argument values in the kernel's parameter order
(defaults and the chosen config's constants included), the grid, the config's pre-hook -- and
later calls replace the tensor arguments in that list and call the compiled kernel's launcher
directly, exactly as ``JITFunction.run`` ends (triton 3.6 and 3.9:
``kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, launch_metadata,
enter_hook, exit_hook, *bound_args.values())``). With no launch hook registered (Triton's hook
chains empty) the JIT's launcher calls nothing with the launch metadata, so the direct launch
passes None for it and for both hooks, which the launcher skips.

The contract of a launch site (the prepared launches of ``features``, ``linear``, ``gemm_tma``
keep it by construction): every argument that is not a tensor, a tensor descriptor or a tuple
of either is the same on every call, and ``meta`` is the very same dict object (a site with two
variants -- with and without ``STORE_PRE`` -- keeps one state per dict). The tensors themselves
must have the layout of the plan (its signature guarantees it): the compiled kernel is
specialized on their alignment.

The JIT path is taken instead whenever the shortcut could differ from it: under the interpreter,
while Triton's launch hooks are set (profilers such as proton read them), when the current CUDA
device is not the one the kernel was loaded on, when a call is recorded instead of run
(``triton_aot.record_launches``: the JIT returns no kernel), and with
``DC_KERNELS_DIRECT_LAUNCH=0`` (read per call). Under CUDA-graph capture the direct launch is the
same driver call as the JIT's.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from triton import knobs
from triton.runtime import driver

__all__ = ["DirectLaunch", "DIRECT_ENV", "capture_values", "enabled", "stats"]

#: ``DC_KERNELS_DIRECT_LAUNCH=0`` sends every launch through Triton's JIT (read per call).
DIRECT_ENV = "DC_KERNELS_DIRECT_LAUNCH"

_STATS = {"direct": 0, "jit": 0}


def enabled() -> bool:
    """False when ``$DC_KERNELS_DIRECT_LAUNCH`` is ``0``."""
    return os.environ.get(DIRECT_ENV, "1").strip() != "0"


def stats() -> Dict[str, int]:
    """Launch counts since import: ``direct`` (binder-free) and ``jit`` (through Triton)."""
    return dict(_STATS)


# device and stream of the launch, as JITFunction.run looks them up (Triton's active driver:
# with torch loaded, torch's current device and raw current stream); looked up through the
# module (triton_aot.record_launches replaces them on a CPU)
def _current_device() -> int:
    return driver.active.get_current_device()


def _current_stream(device: int) -> int:
    return driver.active.get_current_stream(device)


def _hook_set(hook) -> bool:
    # triton 3.6 / 3.9 keep launch hooks in a HookChain (never None; empty when unused)
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


def _hooks_set() -> bool:
    runtime = knobs.runtime
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


def _is_slot(value: Any) -> bool:
    # an argument that changes per call: a tensor, a tensor descriptor, a tuple of either (the
    # layers of the features kernels, the in-place A slabs of the TMA GEMM)
    if isinstance(value, tuple):
        return len(value) > 0 and all(_is_slot(v) and not isinstance(v, tuple) for v in value)
    return isinstance(value, torch.Tensor) or type(value).__name__ == "TensorDescriptor"


def _jit_function(fn):
    # the JITFunction under an Autotuner (or Heuristics) wrapper
    from triton.runtime.jit import JITFunction
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


class _State:
    __slots__ = ("meta", "compiled", "device", "values", "slots", "grid", "pre_hook", "names")


def capture_values(fn, args: Sequence[Any], kwargs: Dict[str, Any],
                   config_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[list, Tuple[str, ...]]:
    """The argument values ``JITFunction.run`` passes to the compiled kernel's launcher for
    ``fn[grid](*args, **kwargs)`` (``config_kwargs``: the autotuned config's ``all_kwargs()``),
    in the kernel's parameter order, with the parameters' names. Options (``num_warps``, ...)
    are not parameters and are left out, as Triton's binder leaves them out."""
    jit = _jit_function(fn)
    names = tuple(jit.arg_names)
    given = dict(zip(names, args))
    if len(args) > len(names):
        raise TypeError(f"{jit.__name__} takes {len(names)} arguments, got {len(args)}")
    for source in (kwargs, config_kwargs or {}):
        for name, value in source.items():
            if name in names:
                given[name] = value
    values = []
    for name, param in zip(names, jit.params):
        if name in given:
            values.append(given[name])
        elif param.has_default:
            values.append(param.default)
        else:
            raise TypeError(f"{jit.__name__}: no value for parameter {name!r}")
    return values, names


class DirectLaunch:
    """One launch site of a prepared launch: ``site(args, meta)`` launches
    ``fn[grid](*args, **meta)``, through Triton's JIT on the first call (and whenever the
    shortcut does not apply: see the module's docstring), directly afterwards."""

    __slots__ = ("fn", "grid", "states")

    def __init__(self, fn, grid):
        self.fn = fn
        self.grid = grid
        self.states: list = []

    def __call__(self, args: Tuple, meta: Dict[str, Any]):
        for state in self.states:
            if state.meta is meta:
                break
        else:
            state = None
        if state is not None and enabled() and not _hooks_set() \
                and _current_device() == state.device:
            values = list(state.values)
            for i in state.slots:  # argument i is parameter i
                values[i] = args[i]
            if state.pre_hook is not None:
                state.pre_hook(dict(zip(state.names, values)))
            c = state.compiled
            run = c.run
            g0, g1, g2 = state.grid
            run(g0, g1, g2, _current_stream(state.device), c.function, c.packed_metadata, None,
                None, None, *values)
            _STATS["direct"] += 1
            return
        _STATS["jit"] += 1
        compiled = self.fn[self.grid](*args, **meta)
        if state is None and enabled() and _capturable(compiled):
            self.states.append(self._capture(compiled, args, meta))

    def _capture(self, compiled, args, meta) -> _State:
        from triton.runtime.autotuner import Autotuner
        # the autotuner records the config it just launched (one thread launches at a time
        # through a site: a concurrent launch of the same autotuned kernel could overwrite it)
        config = self.fn.best_config if isinstance(self.fn, Autotuner) else None
        config_kwargs = config.all_kwargs() if config is not None else None
        state = _State()
        state.meta = meta
        state.compiled = compiled
        state.device = _current_device()
        state.values, state.names = capture_values(self.fn, args, meta, config_kwargs)
        # the per-call tensors (argument i of the call is parameter i)
        state.slots = tuple(i for i, a in enumerate(args) if _is_slot(a))
        state.pre_hook = config.pre_hook if config is not None else None
        grid = self.grid
        if callable(grid):
            grid = grid(dict(zip(state.names, state.values)))
        state.grid = tuple(grid) + (1,) * (3 - len(grid))
        for i in state.slots:  # a plan must not keep the first call's tensors alive
            state.values[i] = None
        return state


def _capturable(compiled) -> bool:
    # a CompiledKernel (a recorded launch returns None; the interpreter returns nothing usable)
    return compiled is not None and hasattr(compiled, "packed_metadata") \
        and hasattr(compiled, "run")
