"""Host overhead: the Python in front of the kernels, per call, with the launches stubbed.

``python -m benchmarks --host`` times, on this machine's CPU, the per-call host cost of

* ``dense_connector_features(hs, spec, backend="triton")``,
* ``dense_connector_linear(hs, spec, W1, b1, "gelu", backend="triton")``,
* ``DenseConnector.forward(hs)`` (both projector layers: the second is a real ``nn.Linear`` on a
  tiny tensor, so it costs what a torch op costs; it is also timed alone),
* ``dense_connector_linear(..., path="overlap")`` in 4 row chunks (4 images of 32 rows, chunks
  of 32 rows: 8 launches; CPU stand-ins run the chunks in order, so the CUDA side stream and
  its events are not in it),

for the CLIP DCI spec (25 hidden states) at small sizes (T = 5, C = 64, H = 8: the host work
does not depend on the sizes, and the module's real second ``nn.Linear`` -- bf16 on a CPU, ~20 us
at 32 x 64 x 64 -- stays as cheap as a torch op), with the first layer's path forced to
``"two-pass"`` (what the 1-image CLIP-L/336 shape takes on an H100; these stand-in sizes would
pick the fused kernel, whose host path is one launch shorter), with every
Triton launch stubbed at Triton's own entry
(``JITFunction.run`` / ``Autotuner.run``, as :func:`dc_kernels.ops.triton_aot.record_launches`
does: the launchers see an sm_90 card; tensors are CPU stand-ins, nothing is computed), beside a
tiny ``F.linear`` measured in the same run as the unit. What remains is dc_kernels' own Python:
validation, dispatch, the custom op or autograd wrapper, the launch plan. Triton's binder and
the driver launch are outside it.

Two more sets of rows: ``..., direct launch`` -- the same calls once the launches are
binder-free (``dc_kernels.ops.direct``: the JIT entry hands back a stand-in compiled kernel
whose launcher does nothing, so every launch after the first goes through the direct path up to
the driver call); and ``Triton's binder + cache key`` -- Triton's own binder and kernel-cache
key run on the recorded launches of one first-layer call: the part of each JIT launch that the
direct path skips, before the driver call (pure Python: the same work on a GPU machine's host;
the rest of ``JITFunction.run`` -- device and stream lookups, the cache and global-value
checks, launch metadata -- needs a device and is not in it). On a GPU, a JIT call costs at
least the first row plus the binder row, a direct call the direct row; the driver launch is in
both.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

__all__ = ["measure_host", "host_markdown", "OVERLAP_ROW"]

#: the overlapped path's row (4 chunks)
OVERLAP_ROW = "dense_connector_linear, overlap in 4 row chunks"


def _per_call_us(fn: Callable[[], object], budget_s: float, inner: int = 50) -> Dict[str, float]:
    for _ in range(inner):  # warm: plans, caches
        fn()
    samples: List[float] = []
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end or len(samples) < 5:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    samples.sort()
    return {"median_us": statistics.median(samples), "p20_us": samples[len(samples) // 5],
            "p80_us": samples[(4 * len(samples)) // 5], "samples": len(samples)}


def measure_host(budget_s: float = 1.0, images: int = 1, tokens: int = 5, channels: int = 64,
                 hidden: int = 8) -> Dict[str, Dict[str, float]]:
    """Per-call host microseconds of each call (launches stubbed) and of a tiny ``F.linear``."""
    from dc_kernels import ConnectorSpec, DenseConnector
    from dc_kernels.ops import triton_aot

    spec = ConnectorSpec.preset("clip", "dci")
    hs = triton_aot._hidden_states(spec, images, tokens, channels, torch.bfloat16)
    conn = DenseConnector(spec, channels, hidden, backend="triton").to(torch.bfloat16)
    w1, b1 = conn.first_layer().weight, conn.first_layer().bias
    x = torch.randn(2, 8)
    lw = torch.randn(4, 8)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host work is one thread; OpenMP barriers only add noise
    try:
        _measure(out, budget_s, hs, spec, conn, w1, b1, x, lw)
    finally:
        torch.set_num_threads(threads)
    unit = out["F.linear (tiny, unit)"]["median_us"]
    for v in out.values():
        v["x_unit"] = v["median_us"] / unit
    return out


def _measure(out, budget_s, hs, spec, conn, w1, b1, x, lw) -> None:
    import dc_kernels
    from dc_kernels.ops import triton_aot
    with torch.no_grad():
        out["F.linear (tiny, unit)"] = _per_call_us(lambda: F.linear(x, lw), budget_s)
        from dc_kernels.ops import common, linear, overlap
        real_empty, real_choose = common.empty, linear.choose_linear_path
        second = conn.get_submodule("2")
        x2 = torch.zeros(hs[0].shape[0] * spec.tokens_kept(hs[0].shape[1]), second.in_features,
                         dtype=second.weight.dtype)
        out["the module's second nn.Linear alone (real, tiny)"] = _per_call_us(
            lambda: second(x2), budget_s)
        calls = {
            "dense_connector_features": lambda: dc_kernels.dense_connector_features(
                hs, spec, backend="triton"),
            "dense_connector_linear": lambda: dc_kernels.dense_connector_linear(
                hs, spec, w1, b1, "gelu", backend="triton"),
            "DenseConnector.forward": lambda: conn(hs),
        }
        # zero-filled stand-ins: the module's second (real) Linear then never meets garbage
        # denormals, which make CPU matmuls thousands of times slower
        common.empty = lambda shape, dtype, device: torch.zeros(shape, dtype=dtype,
                                                                device=device)
        linear.choose_linear_path = lambda *a, **k: "two-pass"
        # the overlapped path in 4 row chunks (4 images of 32 rows, 32-row chunks): 4 features
        # and 4 GEMM launches per call (CPU stand-ins: the chunks run in order, so the CUDA
        # side stream and its events are not in it)
        hs4 = triton_aot._hidden_states(spec, 4, 33, hs[0].shape[-1], torch.bfloat16)
        calls[OVERLAP_ROW] = lambda: dc_kernels.dense_connector_linear(
            hs4, spec, w1, b1, "gelu", backend="triton", path="overlap")
        real_chunk = overlap.OVERLAP_CHUNK_ROWS
        overlap.OVERLAP_CHUNK_ROWS = 32
        try:
            with triton_aot.record_launches(90, record=False):
                for name, fn in calls.items():
                    out[name] = _per_call_us(fn, budget_s)
            # the binder-free launch (dc_kernels.ops.direct): the JIT entry hands back a
            # stand-in compiled kernel whose launcher does nothing, so from the second call on
            # each launch goes through the direct path up to the driver call
            with triton_aot.record_launches(90, record=False, stand_in=_StandIn):
                for name, fn in calls.items():
                    out[f"{name}, direct launch"] = _per_call_us(fn, budget_s)
            # Triton's binder alone (what each JIT launch adds on the host before the driver
            # call), for the launches of one call
            with triton_aot.record_launches(90) as records:
                calls["dense_connector_linear"]()
            out["Triton's binder + cache key, the first layer's launches"] = _per_call_us(
                _binder_of(records), budget_s)
        finally:
            common.empty, linear.choose_linear_path = real_empty, real_choose
            overlap.OVERLAP_CHUNK_ROWS = real_chunk


class _StandIn:
    # stands in for Triton's CompiledKernel: the direct path calls ``run`` (the launcher)
    function = packed_metadata = None

    def __init__(self, fn, args, kwargs, grid):
        pass

    def run(self, *args):
        pass


def _binder_of(records) -> Callable[[], None]:
    """Runs Triton's own binder and kernel-cache key (as ``JITFunction.run`` does per launch
    before its cache lookup) on every recorded launch of one call."""
    from triton.runtime.jit import compute_cache_key
    from dc_kernels.ops import triton_aot
    work = []
    for r in records:
        _, args, kwargs, _ = r.variants()[0]
        work.append((triton_aot.binder(r.fn, 90), args, dict(kwargs, debug=False), {}))

    def run():
        for binder, args, kwargs, key_cache in work:
            _, specialization, options = binder(*args, **kwargs)
            compute_cache_key(key_cache, specialization, options)
    return run


def host_markdown(res: Dict[str, Dict[str, float]], meta: Dict[str, str]) -> str:
    """The committed table."""
    lines = [f"# Host overhead per call (launches stubbed), {meta['date']}", "",
             f"{meta['machine']}; torch {meta['torch']}, triton {meta['triton']}. CLIP DCI "
             "spec (25 hidden states), 1 image, T = 5, C = 64, H = 8, bf16 CPU stand-ins, "
             "first layer two-pass (the 1-image path on an H100), launches stubbed at "
             "Triton's entry (`benchmarks/host.py`); `, direct launch`: the binder-free "
             "launch (`dc_kernels.ops.direct`) up to the driver call, after the first call; "
             "the overlap row: 4 images of T = 33 in 4 chunks of 32 rows (features and GEMM "
             "launches per chunk; the chunks run in order on CPU stand-ins, so the CUDA "
             "stream and event calls are not in it). Measured.", "",
             "| call | median us | p20-p80 us | x tiny F.linear |", "|---|---|---|---|"]
    for k, v in res.items():
        lines.append(f"| {k} | {v['median_us']:.1f} | {v['p20_us']:.1f}-{v['p80_us']:.1f} | "
                     f"{v['x_unit']:.1f}x |")
    return "\n".join(lines) + "\n"
