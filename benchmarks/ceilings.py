"""The two ceilings of the floor, measured in the same run as the table.

* copy bandwidth: ``dst.copy_(src)`` of a large buffer (1 GiB on CUDA, 256 MiB on CPU), counted
  as read + write, i.e. ``2 * size`` bytes per copy;
* matmul peak: ``torch.mm`` of two square matrices in the run's dtype (8192 on CUDA, 2048 on
  CPU), ``2 n^3`` FLOPs.

Both are timed with :func:`benchmarks.timing.time_fn` and reported at the median.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .timing import time_fn

__all__ = ["Ceilings", "measure_ceilings"]


@dataclass(frozen=True)
class Ceilings:
    """Measured DRAM copy bandwidth (bytes/s) and matmul rate (FLOP/s) of the run's device."""

    copy_bytes_per_s: float
    copy_buffer_bytes: int
    matmul_flop_per_s: float
    matmul_n: int
    matmul_dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def measure_ceilings(device: torch.device, dtype: torch.dtype, budget_s: float = 1.0
                     ) -> Ceilings:
    """Measure both ceilings on ``device`` (matmul in ``dtype``)."""
    cuda = device.type == "cuda"
    size = (1 << 30) if cuda else (256 << 20)
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, budget_s)
    del src, dst

    n = 8192 if cuda else 2048
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    mm = time_fn(lambda: torch.mm(a, b, out=c), device, budget_s)
    del a, b, c
    if cuda:
        torch.cuda.empty_cache()
    return Ceilings(2 * size / copy.median_s, size, 2.0 * n ** 3 / mm.median_s, n,
                    str(dtype).replace("torch.", ""))
