"""Peak memory of one call, above what was allocated before it (inputs, weights, caches).

* CUDA: ``torch.cuda.reset_peak_memory_stats``, then ``max_memory_allocated() -
  memory_allocated()`` around one call: the most bytes the caching allocator handed out at once
  during the call (outputs and temporaries; the allocator's reserved-but-free cache does not
  count).
* CPU (Linux): the process's resident-set high-water mark. Before the call, free heap memory is
  handed back to the kernel (``malloc_trim(0)``, so a reused freed block counts again once it is
  touched) and the high-water mark is reset to the current RSS (``echo 5 >
  /proc/self/clear_refs``); after the call ``VmHWM - RSS before`` from ``/proc/self/status``.
  This counts every page the call touched for the first time: torch's allocations, the
  temporaries of oneDNN/inductor kernels, thread stacks. Elsewhere (no ``/proc`` or no glibc)
  the value is not measured and reported as n/a.

The call is an extra, untimed one made after the timing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable, Optional

import torch

from .timing import synchronize

__all__ = ["peak_memory_bytes", "METHOD"]

METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during one call, minus memory_allocated() "
            "before it (inputs excluded)",
    "cpu": "resident-set high-water mark during one call (VmHWM after resetting it via "
           "/proc/self/clear_refs, free heap trimmed first) minus the RSS before it "
           "(inputs excluded)",
}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"{field} not in /proc/self/status")


_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim(0)


def _cpu_peak(fn: Callable[[], object]) -> Optional[int]:
    try:
        gc.collect()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
    except (OSError, AttributeError):
        return None
    out = fn()
    peak = _status_bytes("VmHWM")
    del out
    return max(peak - before, 0)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes one call of ``fn`` takes above the memory in use before it (None: unknown)."""
    if device.type == "cuda":
        synchronize(device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return peak
    return _cpu_peak(fn)
