"""Public functional API and backend dispatch."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .ops.torch_ops import features_torch
from .spec import ConnectorSpec
from .validation import check_hidden_states

__all__ = ["dense_connector_features", "resolve_backend", "BACKENDS", "BACKEND_ENV"]

BACKENDS = ("auto", "torch", "triton")
#: Environment variable that forces the backend chosen by ``backend="auto"``.
BACKEND_ENV = "DC_KERNELS_BACKEND"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete backend; validate explicit choices.

    ``"auto"`` honours ``$DC_KERNELS_BACKEND`` (``torch`` or ``triton``) when set, and otherwise
    falls back to ``"torch"`` (the Triton kernels are not implemented yet).
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
        return "torch"
    return backend


def dense_connector_features(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                             backend: str = "auto") -> torch.Tensor:
    """The features the original Dense Connector feeds its projector.

    Equivalent to the original's ``torch.cat([image_features, group means...])`` (DCI/SCI, on
    channels) or ``torch.cat([image_features, pooled groups...], dim=-2)`` (STI), computed
    without stacking layers, with fp32 accumulation and a single rounding to the input dtype.

    Args:
        hidden_states: tuple/list of ``[B, T, C]`` tensors (Hugging Face's
            ``output_hidden_states``), one dtype (fp16, bf16, fp32 or fp64), one device. Views
            with arbitrary strides are read in place.
        spec: a :class:`ConnectorSpec`, e.g. ``ConnectorSpec.preset("clip", "dci")``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[B, spec.out_tokens(T), spec.out_channels(C)]`` in the input dtype.

    Raises:
        TypeError / ValueError: malformed inputs (see :func:`check_hidden_states`).
        NotImplementedError: ``backend="triton"`` (kernels not implemented yet).
    """
    info = check_hidden_states(hidden_states, spec)
    backend = resolve_backend(backend, info.device)
    if backend == "triton":
        raise NotImplementedError("the Triton backend of dense_connector_features is not "
                                  "implemented yet; use backend='torch'")
    return features_torch(hidden_states, spec, info.batch, info.tokens, info.channels)
