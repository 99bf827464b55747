"""Public functional API and backend dispatch."""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import distributed as _dist
from . import plan as _plan
from .autograd import features_op, linear_op, spec_args
from .ops.torch_ops import features_torch
from .spec import ConnectorSpec
from .validation import check_hidden_states

__all__ = ["dense_connector_features", "dense_connector_linear", "resolve_backend", "BACKENDS",
           "BACKEND_ENV", "ACTIVATIONS", "PATHS", "column_shard_path"]

BACKENDS = ("auto", "torch", "triton")
#: Environment variable that forces the backend chosen by ``backend="auto"``.
BACKEND_ENV = "DC_KERNELS_BACKEND"
ACTIVATIONS = (None, "gelu")
PATHS = ("auto", "fused", "two-pass", "overlap", "pipelined")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_ops():
    if not _triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton)")
    from .ops import common
    return common


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend; validate explicit choices.

    ``"auto"`` honours ``$DC_KERNELS_BACKEND`` (``torch`` or ``triton``) when set; otherwise it
    picks ``"triton"`` for CUDA tensors when triton imports and the card runs the kernels
    (NVIDIA, sm_80 or newer: :func:`dc_kernels.ops.common.cuda_device_problem`), and
    ``"torch"`` for everything else.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "").strip().lower()
        if forced:
            if forced not in ("torch", "triton"):
                raise ValueError(
                    f"${BACKEND_ENV}={forced!r}: expected 'torch' or 'triton' (or unset)")
            return forced
        if device.type != "cuda" or not _triton_available():
            return "torch"
        return "torch" if _triton_ops().cuda_device_problem(device) is not None else "triton"
    return backend


def _auto_fallback(backend: str, requested: str, dtype: torch.dtype) -> str:
    # "auto" never picks a Triton path that does not exist: fp64 stays on torch. An explicit
    # backend="triton" gets a clear error instead.
    if requested == "auto" and backend == "triton" and dtype == torch.float64:
        return "torch"
    return backend


def _op_inputs(hidden_states, spec: ConnectorSpec):
    """The hidden-state list handed to the custom ops: unread entries replaced by a stand-in.

    The kernels never touch the layers the spec does not read, and validation does not check
    them (any tensor is accepted there), so they are replaced by a detached view of the base
    layer (no copy). That keeps the op's dispatch and its output's ``requires_grad`` a matter
    of the read layers (and the weight and bias) only, as on the torch path and in the
    original: an unread tensor on another device (e.g. ``meta``) would otherwise route the call
    to the fake kernel, and an unread tensor that requires grad would make the output require
    grad.
    """
    read = set(spec.used_layers)
    stand_in = hidden_states[spec.final_layer].detach()
    return [h if i in read else stand_in for i, h in enumerate(hidden_states)]


def _features_custom_op(hidden_states, spec: ConnectorSpec) -> torch.Tensor:
    """The ``dc_kernels::features`` custom op on validated inputs (what torch.compile traces)."""
    return features_op(_op_inputs(hidden_states, spec), *spec_args(spec))


def _linear_custom_op(hidden_states, spec: ConnectorSpec, weight, bias, activation, path
                      ) -> torch.Tensor:
    """The ``dc_kernels::linear`` custom op on validated inputs (what torch.compile traces)."""
    return linear_op(_op_inputs(hidden_states, spec), *spec_args(spec), weight, bias,
                     activation or "none", path)


def _gelu(y: torch.Tensor) -> torch.Tensor:
    """Exact-erf GELU of the first Linear's fresh output ``y``, with ``gelu(+inf) = +inf``.

    torch's vectorised CPU kernel returns NaN for +inf (its scalar path, its CUDA kernel and the
    Triton epilogue return +inf); the backends must agree, so on CPU +inf lanes are restored.
    The check is one max-reduction; the exact mask is built only when the max is +inf or NaN.
    Where autograd does not need ``y`` (inference), GELU runs in place: no second ``[M, N]``
    buffer (on CPU, writing fresh memory costs more than the GELU itself).
    """
    if y.device.type != "cpu" or torch.compiler.is_compiling():
        return F.gelu(y)  # (traced: no data-dependent branch; inductor emits its own GELU)
    pos_inf = None
    if y.numel() and not bool(y.amax() < math.inf):  # +inf or NaN somewhere: rare
        pos_inf = torch.isposinf(y)
    if torch.is_grad_enabled() and y.requires_grad:
        out = F.gelu(y)
    else:
        out = torch.ops.aten.gelu_(y)
    if pos_inf is not None:
        out = out.masked_fill_(pos_inf, math.inf)
    return out


def dense_connector_features(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                             backend: str = "auto") -> torch.Tensor:
    """The features the original Dense Connector feeds its projector.

    Equivalent to the original's ``torch.cat([image_features, group means...])`` (DCI/SCI, on
    channels) or ``torch.cat([image_features, pooled groups...], dim=-2)`` (STI), computed
    without stacking layers, with fp32 accumulation and a single rounding to the input dtype.

    Args:
        hidden_states: tuple/list of ``[B, T, C]`` tensors (Hugging Face's
            ``output_hidden_states``), one dtype (fp16, bf16, fp32 or fp64), one device. Views
            with arbitrary strides are read in place. Meta tensors give a meta output (every
            backend; nothing is launched).
        spec: a :class:`ConnectorSpec`, e.g. ``ConnectorSpec.preset("clip", "dci")``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[B, spec.out_tokens(T), spec.out_channels(C)]`` in the input dtype. DTensor hidden
        states (replicated or batch-sharded) give a DTensor placed like them
        (:mod:`dc_kernels.distributed`).

    Raises:
        TypeError / ValueError: malformed inputs (see :func:`check_hidden_states`).
    """
    if type(spec) is ConnectorSpec and type(backend) is str and \
            not torch.compiler.is_compiling():
        key = _plan.signature(hidden_states)
        if key is not None:  # plain tensors: a launch plan per signature (dc_kernels.plan)
            run = _plan.lookup(("features", spec, backend) + key,
                               lambda: _features_plan(hidden_states, spec, backend))
            return run(hidden_states)
    info = check_hidden_states(hidden_states, spec)
    if _dist.any_dtensor(hidden_states):
        return _dist.features_on_dtensors(dense_connector_features, hidden_states, spec,
                                          backend=backend)
    chosen = _auto_fallback(resolve_backend(backend, info.device), backend, info.dtype)
    if chosen == "triton":
        _triton_ops().check_launchable(info.device, info.dtype)
        return _features_custom_op(hidden_states, spec)
    return features_torch(hidden_states, spec, info.batch, info.tokens, info.channels)


def _features_plan(hidden_states, spec: ConnectorSpec, backend: str):
    """What a features call of this signature runs (inputs validated here, once)."""
    info = check_hidden_states(hidden_states, spec)
    chosen = _auto_fallback(resolve_backend(backend, info.device), backend, info.dtype)
    if chosen != "triton":
        def run_torch(hs):
            return features_torch(hs, spec, info.batch, info.tokens, info.channels)
        return run_torch
    _triton_ops().check_launchable(info.device, info.dtype)
    if info.device.type == "meta":  # no data to launch on: the custom op's fake kernel
        def run_fake(hs):
            return _features_custom_op(hs, spec)
        return run_fake
    from .autograd import FeaturesFunction
    from .ops.features import prepare_features
    launch = prepare_features(hidden_states, spec, info.batch, info.tokens, info.channels)
    read = spec.used_layers
    n = len(hidden_states)

    def run_triton(hs):
        if torch.is_grad_enabled() and any(hs[i].requires_grad for i in read):
            return FeaturesFunction.apply(launch, spec, n, read, *[hs[i] for i in read])
        return launch(hs)
    return run_triton


def _autocast(hidden_states, weight, bias):
    """Under ``torch.autocast``, behave as ``nn.Linear`` does: run in the autocast dtype.

    ``nn.Linear`` is on autocast's lower-precision list: when autocast is enabled for the
    device of the input, its input, weight and bias are cast to the autocast dtype (bf16/fp16)
    and so is its output. The same rule applies here to the hidden states, weight and bias
    (hidden states already in that dtype, the usual case with a bf16 ViT, are not copied).
    """
    if not isinstance(weight, torch.Tensor) or not isinstance(hidden_states, (tuple, list)):
        return hidden_states, weight, bias  # malformed: validation reports it
    device_type = weight.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device autocast does not know (e.g. meta): validation reports it
        return hidden_states, weight, bias
    if not enabled:
        return hidden_states, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
            return t.to(dtype)
        return t
    return [cast(h) for h in hidden_states], cast(weight), cast(bias)


def _check_linear_params(weight, bias, activation, path, spec, info) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.layout != torch.strided:
        raise ValueError(f"weight has layout {weight.layout}; a dense (strided) tensor is "
                         "required")
    k = spec.out_channels(info.channels)
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(
            f"weight must be [N, {k}] (nn.Linear layout; the features are {k} wide for this "
            f"spec and C={info.channels}), got shape {tuple(weight.shape)}")
    if weight.dtype != info.dtype or weight.device != info.device:
        raise ValueError(
            f"weight is {weight.dtype} on {weight.device}; the hidden states are {info.dtype} on "
            f"{info.device}: they must match")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.layout != torch.strided:
            raise ValueError(f"bias has layout {bias.layout}; a dense (strided) tensor is "
                             "required")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype != info.dtype or bias.device != info.device:
            raise ValueError(
                f"bias is {bias.dtype} on {bias.device}; the hidden states are {info.dtype} on "
                f"{info.device}: they must match")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def column_shard_path(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                      weight: torch.Tensor, full_width: int, backend: str = "auto",
                      path: str = "auto") -> str:
    """The ``path`` a column shard of a ``full_width``-wide first layer should run.

    The Triton backend's ``path="auto"`` picks fused or two-pass from the shape, output width
    included; a rank holding some of the columns would pick from its own width and could take
    the other path (the two round A's K blocks differently on the CPU interpreter, and pick
    different GEMM configs on a GPU). Resolving ``"auto"`` as the unsharded layer would keeps
    every rank's columns equal, bit for bit, to those of the unsharded result. Returns ``path``
    unchanged when it is not ``"auto"`` or the torch backend runs. ``weight`` is the local
    shard (inputs are assumed validated).
    """
    if path != "auto":
        return path
    check_hidden_states(hidden_states, spec)
    base = hidden_states[spec.final_layer]
    chosen = _auto_fallback(resolve_backend(backend, base.device), backend, base.dtype)
    if chosen != "triton" or not _triton_available():
        return path
    from .ops.linear import auto_path
    return auto_path(hidden_states, spec, weight, full_width)


def dense_connector_linear(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                           weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                           activation: Optional[str] = None, backend: str = "auto",
                           path: str = "auto") -> torch.Tensor:
    """The projector's first layer on the Dense Connector features, fused.

    Computes ``activation(dense_connector_features(hidden_states, spec) @ weight.T + bias)``.
    On the Triton backend the features are built inside the GEMM's K loop (``path="fused"``),
    written once by the features kernel and fed to a GEMM (``path="two-pass"``; a persistent
    TMA kernel on Hopper, which reads SCI's one-layer slabs in place from the hidden states,
    with no features pass, where their kept rows form one 2-D view), or written in row chunks
    (STI: chunks of whole images) on a side stream while the GEMM consumes the previous chunk
    (``path="overlap"``), or by
    one features launch running beside one persistent GEMM launch whose tiles wait on their
    rows' ready counts (``path="pipelined"``; 16-bit DCI/SCI on sm_90); ``path="auto"``
    chooses from the shape (``dc_kernels.ops.path.choose_linear_path``). Every path computes
    the same A.

    Args:
        hidden_states, spec, backend: as for :func:`dense_connector_features`.
        weight: ``[N, spec.out_channels(C)]``, laid out as ``nn.Linear`` stores it; same dtype and
            device as the hidden states.
        bias: ``[N]`` or None.
        activation: None or ``"gelu"`` (exact erf, as ``nn.GELU()``).
        path: ``"auto"``, ``"fused"``, ``"two-pass"``, ``"overlap"`` or ``"pipelined"`` (Triton
            backend only).

    Returns:
        ``[B, spec.out_tokens(T), N]`` in the input dtype; fp32 accumulation; a fresh tensor
        (not a view).

    DTensor arguments (tensor parallelism, FSDP2 with the layer not gathered) run on their
    local shards: a ``Shard(0)`` (column-parallel) weight gives each rank its output columns;
    see :mod:`dc_kernels.distributed` for the supported placements (others: ValueError).
    """
    if type(spec) is ConnectorSpec and type(backend) is str and type(path) is str and \
            (activation is None or type(activation) is str) and \
            type(weight) in _PLAIN and not torch.compiler.is_compiling():
        key = _plan.signature(hidden_states, weight, bias)
        if key is not None and not _autocast_on(weight):
            # plain tensors outside autocast: a launch plan per signature (dc_kernels.plan)
            run = _plan.lookup(("linear", spec, backend, activation, path) + key,
                               lambda: _linear_plan(hidden_states, spec, weight, bias,
                                                    activation, backend, path))
            return run(hidden_states, weight, bias)
    hidden_states, weight, bias = _autocast(hidden_states, weight, bias)
    info = check_hidden_states(hidden_states, spec)
    _check_linear_params(weight, bias, activation, path, spec, info)
    if _dist.any_dtensor(hidden_states, weight, bias):
        # local shards in, a DTensor out (dc_kernels.distributed); the ops see plain tensors
        return _dist.linear_on_dtensors(dense_connector_linear, hidden_states, spec, weight,
                                        bias, activation, backend, path)
    chosen = _auto_fallback(resolve_backend(backend, info.device), backend, info.dtype)
    if chosen == "triton":
        _triton_ops().check_launchable(info.device, info.dtype)
        return _linear_custom_op(hidden_states, spec, weight, bias, activation, path)
    return _linear_torch(hidden_states, spec, info, weight, bias, activation)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _autocast_on(weight: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(weight.device.type)
    except RuntimeError:  # a device autocast does not know (e.g. meta): the general path
        return True


def _linear_torch(hidden_states, spec, info, weight, bias, activation):
    feats = features_torch(hidden_states, spec, info.batch, info.tokens, info.channels)
    # on rows [M, K], so that the result is a fresh tensor (F.linear on [B, T', K] returns a
    # view), reshaped without making a view
    y = F.linear(feats.reshape(-1, feats.shape[-1]), weight, bias)
    if activation == "gelu":
        y = _gelu(y)  # in place where autograd allows: y is fresh
    return torch.ops.aten._unsafe_view(y, (*feats.shape[:-1], y.shape[-1]))


def _linear_plan(hidden_states, spec: ConnectorSpec, weight, bias, activation, backend: str,
                 path: str):
    """What a first-layer call of this signature runs (inputs validated here, once).

    Triton: the prepared launch (:func:`dc_kernels.ops.linear.prepare_linear`), called directly
    when no gradient can be formed (grad mode off, or nothing read requires grad), else through
    :class:`dc_kernels.autograd.LinearFunction`, which keeps what the custom op would
    (``requires_grad`` is part of the signature, so what to keep is decided here once)."""
    info = check_hidden_states(hidden_states, spec)
    _check_linear_params(weight, bias, activation, path, spec, info)
    chosen = _auto_fallback(resolve_backend(backend, info.device), backend, info.dtype)
    if chosen != "triton":
        def run_torch(hs, w, b):
            return _linear_torch(hs, spec, info, w, b, activation)
        return run_torch
    _triton_ops().check_launchable(info.device, info.dtype)
    if info.device.type == "meta":  # no data to launch on: the custom op's fake kernel
        def run_fake(hs, w, b):
            return _linear_custom_op(hs, spec, w, b, activation, path)
        return run_fake
    from .autograd import LinearFunction
    from .ops.linear import prepare_linear
    launch = prepare_linear(hidden_states, spec, info.batch, info.tokens, info.channels, weight,
                            bias, activation, path)
    read = spec.used_layers
    n = len(hidden_states)
    hs_req = [hidden_states[i].requires_grad for i in read]
    w_req = weight.requires_grad
    b_req = bias is not None and bias.requires_grad
    needs_grad = any(hs_req) or w_req or b_req
    # as dc_kernels.autograd._kept_for_backward decides for the custom op
    keep_features = w_req and not all(hs_req)
    keep_pre = activation == "gelu" and needs_grad

    def run_triton(hs, w, b):
        if needs_grad and torch.is_grad_enabled():
            return LinearFunction.apply(launch, spec, n, read, activation, keep_features,
                                        keep_pre, w, b, *[hs[i] for i in read])[0]
        return launch(hs, w, b)[0]
    return run_triton
