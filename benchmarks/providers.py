"""The implementations compared ("providers") and the callables each one times.

* ``reference``: the original's eager code -- ``reference.dense_connector`` for the features,
  then the original's ``nn.Sequential`` projector (``nn.Linear``, ``nn.GELU``, ``nn.Linear``).
* ``reference+compile``: ``torch.compile`` of that same callable (``mode=
  "max-autotune-no-cudagraphs"`` on CUDA, the default mode on CPU; static shapes, and dynamo's
  caches reset first so every case compiles fresh instead of hitting the recompile limit).
* ``dc_kernels``: ``dense_connector_features`` / ``dense_connector_linear`` with
  ``backend="auto"`` (torch on CPU, Triton on CUDA); the connector's second Linear is
  ``F.linear``.
* ``dc_kernels-fused`` / ``dc_kernels-two-pass`` / ``dc_kernels-overlap`` /
  ``dc_kernels-pipelined`` (CUDA only, ops with a first layer):
  ``dense_connector_linear(..., backend="triton", path=...)``.
* ``dc_kernels-two-pass-nosplit`` (CUDA only, ops with a first layer): the two-pass path with
  the TMA GEMM's stream K turned off (``gemm_tma.STREAM_K_ITERS = -1``): beside
  ``dc_kernels-two-pass`` it measures what stream K (chosen by an estimated rule,
  ``schedule.gemm_stream_k``) gains where it applies (1 image); elsewhere the two rows run the same
  kernels.
* ``<provider>@<switch>=<int>[,<switch>=<int>...]`` (CUDA only): a path provider with launcher
  switches set around each of its calls (:data:`SWITCHES`; the sweep's variants,
  :mod:`benchmarks.sweep`), e.g. ``dc_kernels-pipelined@programs=120,helpers=36``: stream K
  over the slabs on 120 programs beside 36 helper programs. Each switch is in the launch
  plans' key, so the variant's calls take plans of their own.
* ``dc_kernels+cublas`` (CUDA only, ops with a first layer): dc_kernels' features, then the
  vendor GEMM: ``torch.addmm(b1, A, W1^T)`` + ``F.gelu`` -- where our GEMM stands against
  cuBLAS on the same A.
* ``dc_kernels+graph`` (CUDA only, forward ops): ``dc_kernels`` (Triton, auto path) captured
  once in a CUDA graph after a warm-up call (autotuning and launch plans done), timed as
  ``graph.replay()``: the GPU-bound time, without the host's launch overhead; compare it with
  the eager ``dc_kernels`` row of the same case (at one image the difference is the host path).
* ``dc_kernels+compile`` (CPU only): ``torch.compile`` of the ``dc_kernels`` callable, as
  ``reference+compile`` compiles the reference (default mode, static shapes, fresh caches):
  what a user who compiles the module gets from the torch path (traced as whole-tensor ops,
  ``torch_ops._features_traced``). Not run on CUDA, where the Triton ops are opaque custom ops
  to inductor and a lent GPU's minutes go to the paths.
* ``dc_kernels-inline`` (CPU only): ``dc_kernels`` with ``DC_KERNELS_CHUNK_POOL=0``: the torch
  path's chunks run inline, every op on all intra-op threads (the path before the chunk pool;
  compare the two under load with ``--busy-cores``).

Forward ops run under ``torch.no_grad()`` (inference, as LLaVA runs the connector).
``linear-fwd-bwd`` keeps grad mode on: the hidden states do not require grad, the first
layer's weight and bias do, and the timed unit is the forward plus
``torch.autograd.grad(y.sum(), (weight, bias))``. Whether the Triton path carries autograd is
probed once per device (:func:`triton_has_autograd`): if it does, ``dc_kernels`` and the
explicit paths run it; if not, ``dc_kernels`` runs ``backend="torch"`` for this op (its row
says so) and the explicit paths are not run.

Every callable takes no argument and returns a tuple of tensors: ``(features,)``, ``(y,)`` or
``(y, dW, db)``, which :mod:`benchmarks.accuracy` checks against the reference's.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import reference
from dc_kernels import dense_connector_features, dense_connector_linear
from dc_kernels.functional import resolve_backend

from .cases import OPS, Inputs

__all__ = ["PROVIDERS", "QUICK_PROVIDERS", "SWITCHES", "Prepared", "unavailable_reason",
           "prepare", "split_provider", "variant_name", "reference_features",
           "triton_has_autograd", "compile_mode"]

PROVIDERS = ("reference", "reference+compile", "dc_kernels", "dc_kernels-fused",
             "dc_kernels-two-pass", "dc_kernels-two-pass-nosplit", "dc_kernels-overlap",
             "dc_kernels-pipelined", "dc_kernels+cublas",
             "dc_kernels+graph", "dc_kernels+compile", "dc_kernels-inline")
QUICK_PROVIDERS = ("reference", "reference+compile", "dc_kernels")
_PATHS = {"dc_kernels-fused": "fused", "dc_kernels-two-pass": "two-pass",
          "dc_kernels-two-pass-nosplit": "two-pass", "dc_kernels-overlap": "overlap",
          "dc_kernels-pipelined": "pipelined"}
_NOSPLIT = "dc_kernels-two-pass-nosplit"
_CUBLAS = "dc_kernels+cublas"
_GRAPH = "dc_kernels+graph"
_COMPILE = "dc_kernels+compile"
_FORWARD_OPS = ("features", "linear", "connector")

Outputs = Tuple[torch.Tensor, ...]

#: Launcher switches a path provider may set around its calls (``<provider>@<switch>=<int>``):
#: switch -> (module of ``dc_kernels.ops``, its attribute, the provider whose path reads it,
#: the smallest and largest value allowed (None: no largest))
SWITCHES = {
    # stream K over the slabs on exactly this many programs (pipelined.STREAM_K_PROGRAMS)
    "programs": ("pipelined", "STREAM_K_PROGRAMS", "dc_kernels-pipelined", 1, None),
    # this many helper programs beside the GEMM (pipelined.HELPER_PROGRAMS)
    "helpers": ("pipelined", "HELPER_PROGRAMS", "dc_kernels-pipelined", 1, None),
    # 0: whole output tiles only, no stream K over the slabs (pipelined.STREAM_K)
    "stream_k": ("pipelined", "STREAM_K", "dc_kernels-pipelined", 0, 1),
    # the TMA GEMM's stream K: -1 never, n > 0 at most n K steps per program
    # (gemm_tma.STREAM_K_ITERS)
    "split_iters": ("gemm_tma", "STREAM_K_ITERS", "dc_kernels-two-pass", -1, None),
}


def split_provider(name: str) -> Tuple[str, Dict[str, int]]:
    """``(provider, switches)`` of a provider name, ``"dc_kernels-pipelined@programs=120"`` ->
    ``("dc_kernels-pipelined", {"programs": 120})``; raises ValueError for an unknown
    provider or switch, a switch of another path, a value that is not an integer in its
    range (:data:`SWITCHES`), or a switch given twice."""
    if not isinstance(name, str):
        raise TypeError(f"a provider is a str, got {type(name).__name__}")
    base, sep, rest = name.partition("@")
    if base not in PROVIDERS:
        raise ValueError(f"unknown provider {base!r}; choose from {list(PROVIDERS)}")
    switches: Dict[str, int] = {}
    if not sep:
        return base, switches
    for item in rest.split(","):
        key, _, value = item.partition("=")
        if key not in SWITCHES:
            raise ValueError(f"{name}: unknown switch {key!r}; choose from {list(SWITCHES)}")
        _, _, owner, lo, hi = SWITCHES[key]
        if base != owner:
            raise ValueError(f"{name}: switch {key!r} is read by {owner}'s path, not {base}'s")
        if key in switches:
            raise ValueError(f"{name}: switch {key!r} given twice")
        try:
            v = int(value)
        except ValueError:
            v = None
        if v is None or v < lo or (hi is not None and v > hi):
            raise ValueError(f"{name}: switch {key!r} needs an integer >= {lo}"
                             + (f" and <= {hi}" if hi is not None else "")
                             + f", got {value!r}")
        switches[key] = v
    return base, switches


def variant_name(provider: str, **switches: int) -> str:
    """The provider name of ``provider`` with ``switches`` (:func:`split_provider`'s
    inverse; checked by it)."""
    name = provider + ("@" + ",".join(f"{k}={v}" for k, v in switches.items())
                       if switches else "")
    split_provider(name)
    return name


def _with_switches(unit: Callable[[], Outputs], switches: Dict[str, int]
                   ) -> Callable[[], Outputs]:
    # ``unit`` with the launcher switches set around each call (each is in the launch plans'
    # key: dc_kernels.plan._switches), restored after it
    if not switches:
        return unit
    import importlib
    targets = []
    for key, v in switches.items():
        module, attr = SWITCHES[key][:2]
        mod = importlib.import_module(f"dc_kernels.ops.{module}")
        targets.append((mod, attr, type(getattr(mod, attr))(v)))

    def run():
        old = [getattr(m, a) for m, a, _ in targets]
        for m, a, v in targets:
            setattr(m, a, v)
        try:
            return unit()
        finally:
            for (m, a, _), o in zip(targets, old):
                setattr(m, a, o)
    return run


@dataclass
class Prepared:
    """A provider ready to run one op on one case.

    Attributes:
        fn: the timed unit; returns the outputs to check.
        note: what the row should say about it (backend, path, compile mode), or "".
        compiles: the first call compiles (its time is reported apart, never timed).
    """

    fn: Callable[[], Outputs]
    note: str = ""
    compiles: bool = False


def compile_mode(device: torch.device) -> Optional[str]:
    """``torch.compile`` mode of the ``reference+compile`` provider on ``device``."""
    return "max-autotune-no-cudagraphs" if device.type == "cuda" else None


def unavailable_reason(provider: str, op: str, device: torch.device) -> Optional[str]:
    """Why ``provider`` (a name of :data:`PROVIDERS`, or one with switches:
    :func:`split_provider`) cannot run ``op`` on ``device``, or None when it can."""
    provider = split_provider(provider)[0]
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if provider == _COMPILE and device.type != "cpu":
        return ("CPU only: on CUDA the Triton ops are opaque custom ops to inductor (the GPU "
                "bundle's time goes to the paths)")
    if provider == "dc_kernels-inline" and device.type != "cpu":
        return "the chunk pool it turns off is a CPU feature of the torch path"
    if provider == _GRAPH:
        if device.type != "cuda":
            return "CUDA graphs need CUDA"
        if op not in _FORWARD_OPS:
            return "forward ops only (the timed backward allocates its gradients per call)"
    if provider in _PATHS or provider == _CUBLAS:
        if device.type != "cuda":
            return "the Triton paths need CUDA"
        from dc_kernels.ops.common import cuda_device_problem
        problem = cuda_device_problem(device)  # (an NVIDIA card older than sm_80, ROCm)
        if problem is not None:
            return problem
        if op == "features":
            return "the features op has a single Triton kernel (see the dc_kernels row)"
        if op == "linear-fwd-bwd" and not triton_has_autograd(device):
            return "the Triton path has no autograd yet"
    return None


@functools.lru_cache(maxsize=None)
def triton_has_autograd(device: torch.device) -> bool:
    """Does ``dense_connector_linear(backend="triton")`` return an output that carries grad?

    Probed once per device on a tiny input with a weight that requires grad (False off CUDA:
    there the benchmarks never run the Triton backend).
    """
    return device.type == "cuda" and _probe_autograd(device)


def _probe_autograd(device: torch.device) -> bool:
    from dc_kernels import ConnectorSpec
    spec = ConnectorSpec("sci", final_layer=0, groups=((1, 2),))
    hs = tuple(torch.randn(1, 4, 16, device=device) for _ in range(2))
    w = torch.randn(8, 32, device=device, requires_grad=True)
    with torch.enable_grad():
        y = dense_connector_linear(hs, spec, w, None, "gelu", backend="triton")
    return y.requires_grad


def reference_features(inputs: Inputs) -> torch.Tensor:
    """The original's features: ``reference.dense_connector`` on its base features."""
    shape = inputs.case.shape
    hs = inputs.hidden_states
    base = reference.select_image_features(hs, shape.is_siglip)
    return reference.dense_connector(base, hs, shape.is_siglip, shape.connector)


def _reference_forward(op: str, inputs: Inputs) -> Callable[[], torch.Tensor]:
    proj = inputs.projector

    def features():
        return reference_features(inputs)

    def linear():
        return proj[1](proj[0](reference_features(inputs)))

    def connector():
        return proj(reference_features(inputs))

    return {"features": features, "linear": linear, "connector": connector,
            "linear-fwd-bwd": linear}[op]


def _dc_forward(op: str, inputs: Inputs, backend: str, path: str) -> Callable[[], torch.Tensor]:
    hs, spec = inputs.hidden_states, inputs.spec

    def features():
        return dense_connector_features(hs, spec, backend=backend)

    def linear():
        return dense_connector_linear(hs, spec, inputs.w1, inputs.b1, "gelu", backend=backend,
                                      path=path)

    def connector():
        return F.linear(linear(), inputs.w2, inputs.b2)

    return {"features": features, "linear": linear, "connector": connector,
            "linear-fwd-bwd": linear}[op]


def _cublas_forward(op: str, inputs: Inputs) -> Callable[[], torch.Tensor]:
    hs, spec = inputs.hidden_states, inputs.spec

    def linear():
        a = dense_connector_features(hs, spec, backend="triton")
        y = torch.addmm(inputs.b1, a.view(-1, a.shape[-1]), inputs.w1.t())
        return F.gelu(y).view(*a.shape[:-1], -1)

    def connector():
        return F.linear(linear(), inputs.w2, inputs.b2)

    return {"linear": linear, "connector": connector, "linear-fwd-bwd": linear}[op]


def _graph_replay(forward: Callable[[], torch.Tensor]) -> Callable[[], Outputs]:
    # warm up (autotuning, launch plans: nothing may tune or compile under capture) on a side
    # stream, as torch.cuda.graphs asks, then capture one call; replay reuses its output
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = forward()

    def replay():
        graph.replay()
        return (out,)
    return replay


def _timed_unit(op: str, forward: Callable[[], torch.Tensor], inputs: Inputs
                ) -> Callable[[], Outputs]:
    if op in _FORWARD_OPS:
        def run():
            with torch.no_grad():
                return (forward(),)
        return run
    params = (inputs.w1, inputs.b1)

    def run_fwd_bwd():
        with torch.enable_grad():
            y = forward()
            dw, db = torch.autograd.grad(y.sum(), params)
        return (y.detach(), dw, db)
    return run_fwd_bwd


def _dc_note(op: str, inputs: Inputs, device: torch.device) -> Tuple[str, str]:
    """(backend argument, note) of the auto ``dc_kernels`` provider: what it actually runs."""
    resolved = resolve_backend("auto", device)  # honours $DC_KERNELS_BACKEND
    if resolved == "triton" and op == "linear-fwd-bwd" and not triton_has_autograd(device):
        return "torch", "backend=torch (the Triton path has no autograd)"
    if resolved != "triton" or op == "features":
        return "auto", f"backend={resolved} (auto)"
    from dc_kernels.ops.linear import auto_path, direct_serves  # the launcher's own pick
    path = auto_path(inputs.hidden_states, inputs.spec, inputs.w1)
    base = inputs.hidden_states[inputs.spec.final_layer]
    if path == "two-pass" and direct_serves(inputs.hidden_states, inputs.spec, base.shape[0],
                                            base.shape[1], inputs.w1):
        path += " (A read in place)"  # its GEMM reads the layers: no features pass
    return "auto", f"backend=triton, auto path={path}"


def _compiled(op: str, forward: Callable[[], torch.Tensor], inputs: Inputs, note: str
              ) -> Prepared:
    # torch.compile of ``forward`` as the compile providers run it: static shapes, dynamo's
    # caches reset first (no recompile limit, no automatic dynamic shapes), the first call apart
    torch._dynamo.reset()
    mode = compile_mode(inputs.hidden_states[0].device)
    compiled = torch.compile(forward, mode=mode, dynamic=False)
    return Prepared(_timed_unit(op, compiled, inputs), f"{note}mode={mode or 'default'}",
                    compiles=True)


def prepare(provider: str, op: str, inputs: Inputs) -> Prepared:
    """The timed unit of ``provider`` running ``op`` on ``inputs`` (not yet called)."""
    device = inputs.hidden_states[0].device
    reason = unavailable_reason(provider, op, device)
    if reason:
        raise ValueError(f"{provider} cannot run {op} on {device.type}: {reason}")
    if provider == "reference":
        return Prepared(_timed_unit(op, _reference_forward(op, inputs), inputs))
    if provider == "reference+compile":
        return _compiled(op, _reference_forward(op, inputs), inputs, "")
    if provider == "dc_kernels":
        backend, note = _dc_note(op, inputs, device)
        return Prepared(_timed_unit(op, _dc_forward(op, inputs, backend, "auto"), inputs), note)
    if provider == _COMPILE:
        return _compiled(op, _dc_forward(op, inputs, "torch", "auto"), inputs, "backend=torch, ")
    if provider == _CUBLAS:
        return Prepared(_timed_unit(op, _cublas_forward(op, inputs), inputs),
                        "dc_kernels features (Triton) + torch.addmm (cuBLAS) + F.gelu")
    if provider == _GRAPH:
        return Prepared(_graph_replay(_dc_forward(op, inputs, "triton", "auto")),
                        "backend=triton, auto path, CUDA-graph replay", compiles=True)
    if provider == "dc_kernels-inline":
        unit = _timed_unit(op, _dc_forward(op, inputs, "torch", "auto"), inputs)

        def inline():
            from dc_kernels.ops.torch_ops import CHUNK_POOL_ENV
            old = os.environ.get(CHUNK_POOL_ENV)
            os.environ[CHUNK_POOL_ENV] = "0"
            try:
                return unit()
            finally:
                if old is None:
                    os.environ.pop(CHUNK_POOL_ENV, None)
                else:
                    os.environ[CHUNK_POOL_ENV] = old
        return Prepared(inline, "backend=torch, chunk pool off (DC_KERNELS_CHUNK_POOL=0)")
    base, switches = split_provider(provider)
    path = _PATHS[base]
    unit = _timed_unit(op, _dc_forward(op, inputs, "triton", path), inputs)
    if base == _NOSPLIT:
        return Prepared(_with_switches(unit, {"split_iters": -1}),
                        f"backend=triton, path={path}, no stream K")
    note = f"backend=triton, path={path}"
    if switches:
        note += ", " + ", ".join(f"{SWITCHES[k][0]}.{SWITCHES[k][1]}={v}"
                                 for k, v in switches.items())
    return Prepared(_with_switches(unit, switches), note)
