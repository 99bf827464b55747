"""Drop-in modules: the Dense Connector plus the original ``mm_projector``, fused.

``DenseConnector`` replaces the original's ``dense_connector(...)`` followed by
``mm_projector(...)``. Its parameters are the projector's, under the projector's own names, so an
original checkpoint loads unchanged.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn
import torch.nn.functional as F

from .functional import BACKENDS, dense_connector_features, dense_connector_linear
from .spec import ConnectorSpec
from .validation import check_hidden_states

__all__ = ["DenseConnector", "load_mm_projector_state_dict", "MM_PROJECTOR_PREFIXES"]

#: Prefixes under which LLaVA-style checkpoints store the projector.
MM_PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.")


def _projector_layout(projector: nn.Module):
    """``(type, [Linear, ...])`` of an original projector; ValueError for anything else."""
    from .reference import IdentityMap
    if isinstance(projector, nn.Linear):
        return "linear", [projector]
    if isinstance(projector, IdentityMap) or isinstance(projector, nn.Identity):
        return "identity", []
    if isinstance(projector, nn.Sequential) and len(projector) % 2 == 1:
        mods = list(projector)
        linears = mods[0::2]
        gelus = mods[1::2]
        if all(isinstance(m, nn.Linear) for m in linears) and all(
                isinstance(m, nn.GELU) and m.approximate == "none" for m in gelus):
            return f"mlp{len(linears)}x_gelu", linears
    raise ValueError(
        "mm_projector must be an original projector: nn.Linear, nn.Sequential(Linear, GELU, "
        f"Linear, ...) with exact GELU, or the identity; got {projector.__class__.__name__}")


class DenseConnector(nn.Module):
    """Dense Connector features + the original ``mm_projector``, with the first layer fused.

    ``forward(hidden_states)`` equals ``mm_projector(dense_connector(image_features,
    hidden_states, ...))`` of the original: ``[B, T', hidden_size]``.

    Args:
        spec: a :class:`ConnectorSpec` (e.g. ``ConnectorSpec.preset("clip", "dci")``).
        vision_hidden_size: the ViT width C (1024 for CLIP-L, 1152 for SigLIP-so400m).
        hidden_size: the LLM width H.
        projector_type: the original's ``mm_projector_type``: ``"mlp2x_gelu"`` (default),
            ``"linear"``, ``"mlpNx_gelu"`` or ``"identity"``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``dense_connector_features``).

    The state dict has exactly the original projector's keys (``0.weight``, ``0.bias``,
    ``2.weight``, ``2.bias`` for mlp2x_gelu; ``weight``, ``bias`` for linear), so
    ``load_state_dict(original_projector.state_dict(), strict=True)`` works.

    The first Linear (and the GELU after it) runs through :func:`dense_connector_linear`
    (features built inside the GEMM, or by the one-pass features kernel, on the Triton backend);
    the rest are ordinary ``nn`` layers. The identity projector returns the features.
    """

    def __init__(self, spec: ConnectorSpec, vision_hidden_size: int, hidden_size: int,
                 projector_type: str = "mlp2x_gelu", backend: str = "auto",
                 _projector: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(spec, ConnectorSpec):
            raise TypeError(f"spec must be a dc_kernels.ConnectorSpec, got {type(spec).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.spec = spec
        self.vision_hidden_size = int(vision_hidden_size)
        self.hidden_size = int(hidden_size)
        self.backend = backend
        mm_hidden_size = spec.out_channels(self.vision_hidden_size)
        if _projector is None:
            from .reference import build_projector
            _projector = build_projector(mm_hidden_size, self.hidden_size, projector_type)
        kind, linears = _projector_layout(_projector)
        self.projector_type = kind
        if linears and linears[0].in_features != mm_hidden_size:
            raise ValueError(
                f"the projector's first Linear takes {linears[0].in_features} features; this "
                f"spec with vision_hidden_size={self.vision_hidden_size} makes {mm_hidden_size}")
        if kind == "linear":
            # the original's keys are the Linear's own: "weight", "bias"
            self.weight = linears[0].weight
            self.bias = linears[0].bias
        else:
            for name, module in _projector.named_children():
                self.add_module(name, module)
        self._linears = linears  # plain list: not registered twice

    @classmethod
    def from_projector(cls, spec: ConnectorSpec, mm_projector: nn.Module,
                       backend: str = "auto") -> "DenseConnector":
        """Wrap an existing original projector; the parameters are shared, not copied."""
        kind, linears = _projector_layout(mm_projector)
        if linears:
            width = linears[0].in_features
            if spec.connector_type != "sti":
                if width % (spec.num_groups + 1):
                    raise ValueError(
                        f"the projector takes {width} features, not a multiple of the spec's "
                        f"{spec.num_groups + 1} slabs")
                width //= spec.num_groups + 1
            hidden = linears[-1].out_features
        else:
            raise ValueError("from_projector needs a projector with a Linear layer; build "
                             "DenseConnector(spec, C, H, 'identity') for the identity")
        return cls(spec, width, hidden, kind, backend, _projector=mm_projector)

    # ------------------------------------------------------------------ forward
    def _first_linear(self):
        if self.projector_type == "linear":
            return self.weight, self.bias
        return self._linears[0].weight, self._linears[0].bias

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        info = check_hidden_states(hidden_states, self.spec)
        if info.channels != self.vision_hidden_size:
            raise ValueError(
                f"hidden states are {info.channels} wide; this DenseConnector was built for "
                f"vision_hidden_size={self.vision_hidden_size}")
        if self.projector_type == "identity":
            return dense_connector_features(hidden_states, self.spec, backend=self.backend)
        weight, bias = self._first_linear()
        deeper = len(self._linears) > 1
        x = dense_connector_linear(hidden_states, self.spec, weight, bias,
                                   "gelu" if deeper else None, backend=self.backend)
        return self._after_first_layer(x)

    def _after_first_layer(self, x: torch.Tensor) -> torch.Tensor:
        # x: the first Linear's output, after its GELU when more Linears follow
        for i, lin in enumerate(self._linears[1:], start=1):
            x = lin(x)
            if i < len(self._linears) - 1:
                x = F.gelu(x)
        return x

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the projector alone to ready-made features ``[..., spec.out_channels(C)]``.

        What the original's ``mm_projector(features)`` returns; used where the features come
        from elsewhere (e.g. the streaming vision tower). Under ``torch.autocast`` the Linears run
        in the autocast dtype, as ``nn.Linear`` does; otherwise the features' dtype must match
        the weights' (ValueError).
        """
        if self.projector_type == "identity":
            return features
        weight, bias = self._first_linear()
        if not torch.is_autocast_enabled(features.device.type) and weight.dtype != features.dtype:
            raise ValueError(
                f"the projector's weights are {weight.dtype}, the features {features.dtype}: "
                "convert one of them (e.g. connector.to(features.dtype))")
        x = F.linear(features, weight, bias)
        del features  # a caller passing a temporary frees the features here
        if len(self._linears) > 1:
            x = F.gelu(x)
        return self._after_first_layer(x)

    def extra_repr(self) -> str:
        return (f"spec={self.spec}, vision_hidden_size={self.vision_hidden_size}, "
                f"hidden_size={self.hidden_size}, projector_type={self.projector_type!r}, "
                f"backend={self.backend!r}")

    # ------------------------------------------------------------------ checkpoints
    def load_mm_projector(self, checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]]
                          ) -> None:
        """Load an original checkpoint's projector weights (strict).

        ``checkpoint`` is a state dict or a path to one (``torch.load``-able, e.g. the stage-1
        ``mm_projector.bin``). Keys may carry ``model.mm_projector.`` or ``mm_projector.``
        prefixes; other keys are ignored. Raises ValueError naming missing, unexpected or
        misshaped keys.
        """
        self.load_state_dict(load_mm_projector_state_dict(checkpoint, self.state_dict()))


def load_mm_projector_state_dict(checkpoint, expected: Mapping[str, torch.Tensor]):
    """The projector entries of an original checkpoint, checked against ``expected``.

    Strips ``model.mm_projector.`` / ``mm_projector.`` prefixes (a state dict without them is
    taken as the projector's own). Raises ValueError naming every missing, unexpected or
    misshaped key.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a state dict or a path, got {type(checkpoint)}")
    found = {}
    for prefix in MM_PROJECTOR_PREFIXES:
        found = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
        if found:
            break
    if not found:
        found = dict(checkpoint)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(f"{k}: {tuple(found[k].shape)} (expected {tuple(expected[k].shape)})"
                       for k in set(found) & set(expected)
                       if tuple(found[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshaped:
        problems.append(f"misshaped keys {misshaped}")
    if problems:
        raise ValueError("checkpoint does not fit this projector: " + "; ".join(problems))
    return found
