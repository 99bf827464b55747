"""Pure-PyTorch reference: the original Dense Connector's semantics, op for op.

The ground truth of every test in this project. It reproduces the arithmetic of the original
code (github HJYao00/DenseConnector): each group mean is ``torch.stack(layers).sum(0) / n`` in the
input dtype (so the sum and the divide each round), STI pools with ``nn.AvgPool1d(8, 8)`` in the
input dtype, and the pieces are joined with ``torch.cat``. It is deliberately unoptimised.

Layer indices come from :class:`dc_kernels.ConnectorSpec` presets (the one place that knows them);
the tests restate the original with literal indices, independently, and check bit equality.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
from torch import nn

from .spec import ConnectorSpec

__all__ = [
    "select_image_features",
    "dense_connector",
    "features_from_spec",
    "features_fp64",
    "build_projector",
    "IdentityMap",
]


def _preset_encoder(is_siglip: bool) -> str:
    return "siglip" if is_siglip else "clip"


def select_image_features(hidden_states: Sequence[torch.Tensor], is_siglip: bool,
                          select_layer: int = -2) -> torch.Tensor:
    """The original's base features.

    CLIP: ``hidden_states[select_layer][:, 1:]`` (CLS dropped). SigLIP: ``hidden_states[-1]``
    (the original truncates the tower so its last hidden state is the one it wants).
    """
    if is_siglip:
        return hidden_states[-1]
    return hidden_states[select_layer][:, 1:]


def _group_mean_original(hidden_states, start, stop, tok0, dtype):
    # The original: append each layer (CLS dropped), stack, sum, divide by the count.
    layers = [hidden_states[i][:, tok0:].to(dtype) for i in range(start, stop)]
    return torch.sum(torch.stack(layers, dim=0), dim=0) / (stop - start)


def _sti_pool_original(x: torch.Tensor, pool: int) -> torch.Tensor:
    # nn.AvgPool1d over the token axis, in the input dtype, remainder dropped.
    return nn.AvgPool1d(kernel_size=pool, stride=pool)(x.permute(0, 2, 1)).permute(0, 2, 1)


def features_from_spec(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                       image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The original's arithmetic, generalised to any :class:`ConnectorSpec`.

    Group means are ``stack + sum + divide`` in the input dtype; SCI groups (one layer) are the
    layer itself, as in the original; STI pools each group with ``nn.AvgPool1d``.
    ``image_features`` defaults to ``hidden_states[spec.final_layer]`` with CLS dropped.
    """
    tok0 = spec.token_offset
    if image_features is None:
        image_features = hidden_states[spec.final_layer][:, tok0:]
    dtype = image_features.dtype
    parts = [image_features]
    for start, stop in spec.groups:
        if stop - start == 1:
            g = hidden_states[start][:, tok0:].to(dtype)  # the original's SCI/STI: no mean
        else:
            g = _group_mean_original(hidden_states, start, stop, tok0, dtype)
        if spec.connector_type == "sti":
            g = _sti_pool_original(g, spec.pool_size)
        parts.append(g)
    return torch.cat(parts, dim=-2 if spec.connector_type == "sti" else -1)


def dense_connector(image_features: torch.Tensor, hidden_states: Sequence[torch.Tensor],
                    is_siglip: bool, connector_type: str = "dci") -> torch.Tensor:
    """What the original ``dense_connector()`` returns.

    Args:
        image_features: the base features (see :func:`select_image_features`).
        hidden_states: the encoder's hidden-state tuple (25 for CLIP-L, 27 for truncated SigLIP).
        is_siglip: SigLIP (no CLS) or CLIP (CLS dropped from every layer).
        connector_type: ``"dci"``, ``"sci"`` or ``"sti"``.
    """
    spec = ConnectorSpec.preset(_preset_encoder(is_siglip), connector_type)
    return features_from_spec(hidden_states, spec, image_features=image_features)


def features_fp64(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec) -> torch.Tensor:
    """The exact features (every step in float64) for a spec: the yardstick for tolerances."""
    tok0 = spec.token_offset
    hs = [h.double() for h in hidden_states]
    parts = [hs[spec.final_layer][:, tok0:]]
    for start, stop in spec.groups:
        g = sum(hs[i][:, tok0:] for i in range(start, stop)) / (stop - start)
        if spec.connector_type == "sti":
            p = spec.pool_size
            tp = g.shape[1] // p
            g = g[:, : tp * p].reshape(g.shape[0], tp, p, g.shape[2]).mean(2)
        parts.append(g)
    return torch.cat(parts, dim=-2 if spec.connector_type == "sti" else -1)


class IdentityMap(nn.Module):
    """The original's ``identity`` projector."""

    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self):
        return {"mm_projector_type": "identity"}


def build_projector(mm_hidden_size: int, hidden_size: int,
                    projector_type: str = "mlp2x_gelu") -> nn.Module:
    """The original LLaVA ``build_vision_projector`` with its parameter names.

    ``"linear"``: ``nn.Linear(mm_hidden_size, hidden_size)``. ``"mlpNx_gelu"``:
    ``nn.Sequential(Linear, GELU, Linear, ..., GELU, Linear)`` with N Linears (keys ``0.weight``,
    ``0.bias``, ``2.weight``, ...). ``"identity"``: returns its input.
    """
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    m = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if m:
        depth = int(m.group(1))
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {projector_type!r}")
        modules = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(1, depth):
            modules.append(nn.GELU())
            modules.append(nn.Linear(hidden_size, hidden_size))
        return nn.Sequential(*modules)
    if projector_type == "identity":
        return IdentityMap()
    raise ValueError(f"Unknown projector type: {projector_type!r}")
