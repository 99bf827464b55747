"""What every Triton kernel family of dc_kernels shares: device checks, layout facts, the
``@triton.jit`` helpers that address hidden-state tiles, and the one output allocator.

The kernels read the hidden states **in place**: the layers are a tuple-of-tensors kernel
argument (entry 0 the base layer, then every group's members in order; a layer in two groups is
simply passed twice), each with its own strides, and CLS is dropped by a token offset. Nothing is
stacked or copied. Sums are accumulated in fp32 and rounded once.

Host-side helpers here are looked up through the module at call time (``common.empty``,
``common.interpreting``, ``common.FORCE_OFF64``), so tests can patch them in one place.
"""

from __future__ import annotations

import functools
import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..spec import ConnectorSpec

__all__ = ["TRITON_DTYPES", "ACTIVATIONS", "AUTOTUNE_ENV", "interpreting", "autotune_enabled",
           "interpreter_problem", "layer_entries", "strides", "span", "layout_flags", "empty",
           "check_launchable", "MIN_CAPABILITY", "cuda_device_problem", "maxnreg_option",
           "side_stream"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: activation name -> the kernels' ``ACTIVATION`` constexpr
ACTIVATIONS = {None: 0, "gelu": 1}

#: ``DC_KERNELS_AUTOTUNE=0`` keeps only the first config of each autotune list (read at import):
#: GPU test runs check numerics on many small shapes and specs, where benchmarking every config
#: of every new variant would cost minutes. Every config is still built ahead of time.
AUTOTUNE_ENV = "DC_KERNELS_AUTOTUNE"

#: Tests set this to run the int64-offset code paths on small tensors.
FORCE_OFF64 = False


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def maxnreg_option(cap: int) -> dict:
    """The launch option capping a kernel's registers per thread at ``cap`` (``maxnreg``), or
    none under the interpreter (which ignores it): what keeps two kernels' CTAs resident on
    one SM (the pipelined path's pair, the overlap's features beside its GEMM)."""
    return {} if interpreting() else {"maxnreg": cap}


def autotune_enabled() -> bool:
    """False when ``$DC_KERNELS_AUTOTUNE`` is ``0``."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip() != "0"


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _tile_offsets(stride_b, stride_t, stride_c, b, t, o_c, OFF64: tl.constexpr):
    # element offsets of a [rows, channels] tile of one [B, T, C] layer; int64 when some tensor
    # spans 2^31 elements or more
    if OFF64:
        o_row = b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t
    else:
        o_row = b * stride_b + t * stride_t
    return o_row[:, None] + (o_c * stride_c)[None, :]


@triton.jit
def _round(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    # fp32 -> dtype, round to nearest even. The CPU interpreter truncates fp32 -> bf16; there
    # (EMULATE_RNE) the rounding is done on the bits first, so that the cast is exact.
    if EMULATE_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _member_tile(layers, stride_b, stride_t, stride_c, I: tl.constexpr, o_x, b, t, o_c, mask,
                 UNIFORM: tl.constexpr, OFF64: tl.constexpr):
    # one member layer's tile, widened to fp32 (zeros where masked)
    if UNIFORM:
        o_i = o_x
    else:
        o_i = _tile_offsets(stride_b[I], stride_t[I], stride_c[I], b, t, o_c, OFF64)
    return tl.load(layers[I] + o_i, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _group_sum(layers, stride_b, stride_t, stride_c, START: tl.constexpr, SIZE: tl.constexpr,
               o_x, b, t, o_c, mask, UNIFORM: tl.constexpr, OFF64: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # fp32 sum of layers[START:START + SIZE] over one tile, added in layer order (the torch
    # path's order: bit-equal results). Loads are issued four at a time before their adds, so
    # a warp keeps several tiles in flight (memory-bound: bytes in flight set the bandwidth).
    # UNIFORM: every layer has the base's strides, so the base tile's offsets ``o_x`` serve
    # them all (one offset tile live instead of one per layer: no spills with 13-layer groups)
    b_sum = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(0, SIZE, 4):
        x0 = _member_tile(layers, stride_b, stride_t, stride_c, START + i, o_x, b, t, o_c, mask,
                          UNIFORM, OFF64)
        if i + 1 < SIZE:
            x1 = _member_tile(layers, stride_b, stride_t, stride_c, START + i + 1, o_x, b, t,
                              o_c, mask, UNIFORM, OFF64)
        if i + 2 < SIZE:
            x2 = _member_tile(layers, stride_b, stride_t, stride_c, START + i + 2, o_x, b, t,
                              o_c, mask, UNIFORM, OFF64)
        if i + 3 < SIZE:
            x3 = _member_tile(layers, stride_b, stride_t, stride_c, START + i + 3, o_x, b, t,
                              o_c, mask, UNIFORM, OFF64)
        b_sum += x0
        if i + 1 < SIZE:
            b_sum += x1
        if i + 2 < SIZE:
            b_sum += x2
        if i + 3 < SIZE:
            b_sum += x3
    return b_sum


# --------------------------------------------------------------------------- host helpers
def layer_entries(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec
                  ) -> Tuple[List[torch.Tensor], Tuple[int, ...], Tuple[int, ...]]:
    """Flatten a spec into the kernels' layer tuple: ``[base, group 0 members, ...]``.

    Returns the tensors (views, never copies), the start of each group in that list and each
    group's size.
    """
    entries = [hidden_states[spec.final_layer]]
    starts, sizes = [], []
    for start, stop in spec.groups:
        starts.append(len(entries))
        sizes.append(stop - start)
        entries.extend(hidden_states[i] for i in range(start, stop))
    return entries, tuple(starts), tuple(sizes)


def entry_indices(spec: ConnectorSpec) -> Tuple[int, ...]:
    """The hidden-state index of every entry of :func:`layer_entries`."""
    index = [spec.final_layer]
    for start, stop in spec.groups:
        index.extend(range(start, stop))
    return tuple(index)


def strides(entries) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
    """The ``(stride_b, stride_t, stride_c)`` tuples of the kernels' layer arguments."""
    return (tuple(e.stride(0) for e in entries), tuple(e.stride(1) for e in entries),
            tuple(e.stride(2) for e in entries))


def span(t: torch.Tensor) -> int:
    """One past the largest element offset a kernel may form for ``t``."""
    return 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)


def layout_flags(entries, *others) -> dict:
    """The layout constexprs of the layer kernels.

    UNIFORM: every layer entry has the base's strides (the common case: Hugging Face's hidden
    states); OFF64: some tensor spans 2^31 elements or more, so offsets need int64;
    EMULATE_RNE: the interpreter's fp32 -> bf16 cast truncates, so rounding is done on the bits.
    """
    uniform = all(e.stride() == entries[0].stride() for e in entries)
    off64 = max(span(t) for t in (*entries, *others)) >= 2 ** 31 - 1
    return {"UNIFORM": uniform, "OFF64": off64 or FORCE_OFF64, "EMULATE_RNE": interpreting()}


class StandIn:
    """Shape and strides of an output not allocated yet (for :func:`layout_flags`' span)."""

    def __init__(self, shape, strides):
        self.shape, self._strides = shape, strides

    def stride(self):
        return self._strides


def empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel output of dc_kernels is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


_SIDE_STREAMS = {}


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The one side stream per CUDA device on which the overlapped path's chunk features
    (:mod:`.overlap`) and the pipelined path's helper (:mod:`.pipelined`) run beside the GEMM
    on the current stream; created on first use."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


@triton.jit
def _interpreter_probe_kernel(out, n, STEP: tl.constexpr):
    # what every kernel family does with program ids: a range started at one, a vector of
    # offsets from it, a masked store
    for i in tl.range(tl.program_id(0), n, STEP):
        o = i * 4 + tl.arange(0, 4)
        tl.store(out + o, o.to(tl.float32), mask=o < n * 4)


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> Optional[str]:
    """None when Triton's CPU interpreter (``TRITON_INTERPRET=1``) runs a small kernel here the
    way dc_kernels' kernels use it; else why not, with the versions involved. Probed once per
    process, on the first eager CPU launch (:func:`check_launchable`; not while
    ``torch.compile`` traces).

    Known case: triton 3.6's interpreter turns 1-element numpy arrays into Python ints (a
    program id used as a ``range`` bound), which numpy 2.4 and newer refuse."""
    import numpy as np
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    # real tensors even when the first launch comes under a FakeTensorMode (a shape-only trace
    # reaches the ops' fake kernels after this check): a fake probe would fail, and be cached
    with unset_fake_temporarily():
        out = torch.full((12,), float("nan"))
        try:
            _interpreter_probe_kernel[(2,)](out, 3, STEP=2)
            bad = None if torch.equal(out, torch.arange(12, dtype=torch.float32)) else \
                f"wrong result {out.tolist()}"
        except Exception as e:  # noqa: BLE001 -- any failure is reported, whatever its kind
            bad = repr(e)
    if bad is None:
        return None
    msg = (f"Triton {triton.__version__}'s CPU interpreter (TRITON_INTERPRET=1) cannot run "
           f"dc_kernels' kernels with numpy {np.__version__} here: {bad}")
    if "0-dimensional" in bad:
        msg += (". Triton 3.6's interpreter converts 1-element arrays to Python ints, which "
                "numpy 2.4 and newer refuse: install numpy<2.4 or triton 3.9, or use "
                "backend='torch'")
    return msg


#: The oldest NVIDIA architecture the Triton kernels are built and checked for (sm_80, the
#: A100: bf16 tensor cores and ``cp.async``; ``tests/test_aot_compile.py`` builds sm_80, sm_86,
#: sm_90 and sm_120). Older cards (V100, T4) and ROCm devices take the torch backend.
MIN_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def _cuda_facts(index: int) -> Tuple[Optional[str], Tuple[int, int], str]:
    # (HIP version or None, compute capability, name) of CUDA device ``index``
    return (torch.version.hip, tuple(torch.cuda.get_device_capability(index)),
            torch.cuda.get_device_name(index))


def cuda_device_problem(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on CUDA ``device``; else why not: a ROCm
    device (the kernels are written for NVIDIA's: PTX, TMA, ``cp.async``) or an NVIDIA card
    older than :data:`MIN_CAPABILITY` (no bf16 tensor cores). ``backend="auto"`` then takes the
    torch backend (:func:`dc_kernels.functional.resolve_backend`); ``backend="triton"`` raises
    a ValueError with this text (:func:`check_launchable`)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    hip, capability, name = _cuda_facts(index)
    if hip:
        return (f"the Triton backend's kernels are written for NVIDIA GPUs; cuda:{index} "
                f"({name}) is a ROCm device (HIP {hip}): use backend='torch'")
    if tuple(capability) < MIN_CAPABILITY:
        major, minor = capability
        return (f"the Triton backend needs an NVIDIA GPU of compute capability "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer; cuda:{index} ({name}) is "
                f"sm_{major}{minor}: use backend='torch'")
    return None


def _check_triton_dtype(dtype: torch.dtype) -> None:
    if dtype not in TRITON_DTYPES:
        raise ValueError(
            f"the Triton backend supports {', '.join(map(str, TRITON_DTYPES))}; got {dtype} "
            "(use backend='torch')")


def check_launchable(device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError unless the Triton kernels can run on this device and dtype (a CUDA
    device: :func:`cuda_device_problem`); on the CPU interpreter, RuntimeError when it cannot
    run here (:func:`interpreter_problem`). Meta tensors (no data) pass with a supported dtype:
    the custom ops' fake kernels give their outputs, on a GPU machine or not."""
    if device.type == "meta":
        _check_triton_dtype(dtype)
        return
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton backend needs CUDA tensors (got {device}); use backend='torch', or "
            "set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter")
    if device.type == "cuda":
        problem = cuda_device_problem(device)
        if problem is not None:
            raise ValueError(problem)
    _check_triton_dtype(dtype)
    # (not while torch.compile traces: the probe is a launch; an eager call has run it)
    if device.type != "cuda" and not torch.compiler.is_compiling():
        problem = interpreter_problem()
        if problem is not None:
            raise RuntimeError(problem)
