"""Launch plans cached per input signature: the host path of a repeated call in O(1) per tensor.

Everything the public functions derive from their inputs' *signature* -- validation facts, the
resolved backend, the layout flags, the layer-entry order, the chosen path, kernel configs and
grids -- depends only on what :func:`signature` records of each tensor: its exact type, shape,
strides, dtype, device, whether its address is 16-byte aligned and whether it requires grad. A
plan is computed once per signature (a full validation included) and kept in a bounded LRU
table; a call whose signature was seen before only rebuilds that tuple and launches. A changed
stride, alignment, dtype or device is another signature, hence another plan: a plan is never
reused for a different layout.

The environment that steers dispatch (``$DC_KERNELS_BACKEND``, ``TRITON_INTERPRET``) is part of
the key too. Inputs that are not plain tensors (DTensor and other subclasses, fake tensors under
``torch.compile``) never take a plan: they go through the general path.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional, Sequence, Tuple

import torch

__all__ = ["signature", "lookup", "clear", "MAX_PLANS", "stats"]

#: Plans kept (least recently used dropped first).
MAX_PLANS = 256
_PLANS: "OrderedDict[Hashable, Any]" = OrderedDict()
_STATS = {"hits": 0, "misses": 0}

_TENSOR = torch.Tensor


def _tensor_sig(t):
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15, t.requires_grad)


def signature(hidden_states: Sequence[torch.Tensor], *others) -> Optional[Tuple]:
    """The plan key of a call's tensors, or None when they cannot take a plan.

    ``hidden_states`` must be a tuple/list of plain ``torch.Tensor`` s; ``others`` are further
    tensors (weight, bias) or None. O(1) per tensor: a handful of attribute reads each (inlined
    in one comprehension: this is the host path's largest cost at 25 hidden states).
    """
    if type(hidden_states) not in (tuple, list):
        return None
    for h in hidden_states:
        if type(h) is not _TENSOR:
            return None
    try:
        key = tuple([(h.shape, h.stride(), h.dtype, h.device, h.data_ptr() & 15,
                      h.requires_grad) for h in hidden_states])
    except RuntimeError:  # e.g. a tensor without storage
        return None
    rest = []
    for t in others:
        if t is None:
            rest.append(None)
        elif type(t) is _TENSOR or type(t) is torch.nn.Parameter:
            try:
                rest.append(_tensor_sig(t))
            except RuntimeError:  # no storage or strides (sparse, ...): validation reports it
                return None
        else:
            return None
    return key + tuple(rest) + (os.environ.get("DC_KERNELS_BACKEND", ""),
                                os.environ.get("TRITON_INTERPRET", ""), _switches())


_SWITCH_MODULES: list = []


def _switches() -> Tuple:
    # module-level switches of the launchers that change what a plan holds (tests flip them)
    if not _SWITCH_MODULES:
        try:
            from .ops import common, features, gemm_tma, linear, overlap, pipelined
            _SWITCH_MODULES.extend((common, features, linear, overlap, gemm_tma, pipelined))
        except ImportError:  # no triton: the torch backend has no switches
            _SWITCH_MODULES.append(None)
    if _SWITCH_MODULES[0] is None:
        return ()
    common, features, linear, overlap, gemm_tma, pipelined = _SWITCH_MODULES
    return (features.USE_TMA, common.FORCE_OFF64, common.interpreting, common.empty,
            overlap.OVERLAP_CHUNK_ROWS, overlap.OVERLAP_CHUNK_IMAGES, gemm_tma.STREAM_K_ITERS,
            gemm_tma.REVERSE_PROGRAMS, linear.PIPELINED, pipelined.HELPER,
            pipelined.HELPER_ROW_TILES, pipelined.HELPER_PROGRAMS, pipelined.STREAM_K,
            pipelined.STREAM_K_ITERS, pipelined.STREAM_K_PROGRAMS, pipelined.REVERSE_PROGRAMS)


def lookup(key: Hashable, build: Callable[[], Any]) -> Any:
    """The plan of ``key``, built by ``build()`` on a miss (exceptions propagate, nothing is
    cached for them)."""
    plan = _PLANS.get(key)
    if plan is not None:
        _STATS["hits"] += 1
        _PLANS.move_to_end(key)
        return plan
    _STATS["misses"] += 1
    plan = build()
    _PLANS[key] = plan
    if len(_PLANS) > MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def clear() -> None:
    """Drop every plan (tests; or after changing a module-level switch of the launchers)."""
    _PLANS.clear()


def stats() -> dict:
    """Hit and miss counts since import (tests and the host benchmark read them)."""
    return dict(_STATS, size=len(_PLANS))
