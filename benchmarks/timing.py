"""The one timing function of the suite.

* CUDA: ``triton.testing.do_bench(fn, warmup=25, rep=..., quantiles=[0.5, 0.2, 0.8])`` -- CUDA
  events around each call, the L2 cache flushed between calls, warm-up first. (That signature
  works from triton 3.2 to 3.9.)
* CPU: ``time.perf_counter`` around each call after warm-up calls (at least one, then until
  ~10% of the budget is spent); at least 3 samples, more for fast ops (up to the time budget,
  at most 200); a sample of an op under 1 ms times several back-to-back calls and divides.

Reported: the median and the 20th/80th percentiles of the per-call samples. On Linux CPUs also
the share of the machine's CPU time that *other* processes used while the samples were taken
(``/proc/stat`` busy time minus this process's CPU time): a number above a few percent means the
timings were contended and are pessimistic.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["Timing", "synchronize", "time_fn", "other_load_now"]

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20th / 80th percentiles."""

    median_s: float
    p20_s: float
    p80_s: float
    samples: Optional[int]  # None: do_bench chose the count
    method: str
    other_load: Optional[float] = None  # CPU: share of all cores used by other processes


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, budget_s: float = 1.0,
            min_samples: int = 3, max_samples: int = 200) -> Timing:
    """Time ``fn`` (already called once, so compiled and checked) on ``device``.

    Args:
        fn: the unit of work; its return value is dropped.
        device: where its work runs.
        budget_s: roughly how long to spend sampling (CPU), or do_bench's ``rep`` (CUDA).
        min_samples, max_samples: CPU sample count limits.
    """
    if device.type == "cuda":
        import triton.testing
        rep_ms = max(int(budget_s * 1000), 20)
        med, lo, hi = triton.testing.do_bench(fn, warmup=25, rep=rep_ms,
                                              quantiles=list(QUANTILES))
        return Timing(med / 1e3, lo / 1e3, hi / 1e3, None, f"do_bench(rep={rep_ms}ms)")
    return _time_cpu(fn, budget_s, min_samples, max_samples)


def _time_cpu(fn, budget_s, min_samples, max_samples) -> Timing:
    warm_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        per_call = time.perf_counter() - t0
        if time.perf_counter() - warm_start >= 0.1 * budget_s:
            break
    number = max(1, math.ceil(1e-3 / max(per_call, 1e-9)))
    samples = int(budget_s / (per_call * number))
    samples = min(max(samples, min_samples), max_samples)
    times = []
    load = _OtherLoad()
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    med, lo, hi = (float(np.percentile(times, 100 * q)) for q in QUANTILES)
    return Timing(med, lo, hi, samples, f"perf_counter({samples}x{number})", load.stop())


class _OtherLoad:
    """Share of the machine's CPU time used by other processes since construction (Linux)."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.own = time.process_time()
        self.busy = _busy_seconds()

    def stop(self) -> Optional[float]:
        busy = _busy_seconds()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.wall
        others = (busy - self.busy) - (time.process_time() - self.own)
        return min(max(others / (wall * (os.cpu_count() or 1)), 0.0), 1.0)


def _busy_seconds() -> Optional[float]:
    # first line of /proc/stat: cpu user nice system idle iowait irq softirq steal ...
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def other_load_now(seconds: float = 0.5) -> Optional[float]:
    """Share of all cores other processes use over the next ``seconds`` (this process sleeps);
    None where ``/proc/stat`` is missing."""
    load = _OtherLoad()
    time.sleep(seconds)
    return load.stop()
