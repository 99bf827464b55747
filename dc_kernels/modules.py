"""Drop-in modules: the Dense Connector plus the original ``mm_projector``, fused.

``DenseConnector`` replaces the original's ``dense_connector(...)`` followed by
``mm_projector(...)``. Its parameters are the projector's, under the projector's own names, so an
original checkpoint loads unchanged.
"""

from __future__ import annotations

import operator
import os
import re
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn
import torch.nn.functional as F

from .functional import (ACTIVATIONS, BACKENDS, column_shard_path, dense_connector_features,
                         dense_connector_linear)
from .spec import ConnectorSpec
from .validation import check_hidden_states

__all__ = ["DenseConnector", "DenseConnectorLinear", "load_mm_projector_state_dict",
           "MM_PROJECTOR_PREFIXES"]

#: Prefixes under which LLaVA-style checkpoints store the projector.
MM_PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.")


def _positive_int(name: str, value) -> int:
    """``value`` as an int >= 1; TypeError for non-integers (2.5, True, "8"), ValueError for
    values below 1."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} "
                        f"({type(value).__name__})") from None
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


_PROJECTOR_TYPES = ("linear", "identity", "mlp<N>x_gelu (N >= 1)")


def _check_projector_type(projector_type) -> None:
    if not isinstance(projector_type, str):
        raise TypeError(f"projector_type must be a str, one of {_PROJECTOR_TYPES}; got "
                        f"{projector_type!r}")
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if projector_type in ("linear", "identity") or (m and int(m.group(1)) >= 1):
        return
    raise ValueError(f"projector_type must be one of {_PROJECTOR_TYPES}, got {projector_type!r}")


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


def _non_view(y: torch.Tensor, shape) -> torch.Tensor:
    """``y`` reshaped to ``shape`` without making it a view (an autograd-safe ``_unsafe_view``).

    Wrappers such as FSDP2 hook the tensors a module returns; a view there would let an in-place
    op on it skip the hook, so the modules here return fresh tensors. Subclasses (DTensor) are
    reshaped normally.
    """
    if type(y) is torch.Tensor:
        return torch.ops.aten._unsafe_view(y, shape)
    return y.reshape(shape)


class DenseConnectorLinear(nn.Linear):
    """The projector's first Linear, fed the hidden-state tuple: ``act(features @ W^T + b)``.

    An ``nn.Linear`` (same ``weight [out_features, in_features]`` and ``bias``, same state-dict
    keys) whose ``forward`` takes the ViT's hidden states and runs
    :func:`~dc_kernels.dense_connector_linear` on them, so the Dense Connector features are built
    inside the GEMM (Triton) or right before it (torch). Because it is a module that is *called*,
    every wrapper that hooks module calls sees it: FSDP/FSDP2 gather its parameters (and
    ``nn.Linear`` auto-wrap policies match it), DeepSpeed ZeRO-3 fetches them, tensor-parallel
    styles shard them (:mod:`dc_kernels.distributed`).

    Args:
        spec: the :class:`ConnectorSpec` whose features feed this layer;
            ``in_features`` must be ``spec.out_channels(C)``.
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        activation: ``None`` or ``"gelu"`` (exact erf), applied in the GEMM's epilogue.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    ``forward(x)``: ``x`` is the hidden-state tuple/list (the fused path), or a tensor
    ``[..., in_features]`` of ready-made features (then it is ``nn.Linear`` + activation). The
    output is never a view.

    Caveat: code that replaces every ``nn.Linear`` by type (LoRA/PEFT targets, int8/int4
    quantizers) would hand this layer's hidden-state tuple to its own Linear: exclude the
    projector (``modules_to_not_convert``/target lists) or wrap the projector's later layers
    only.
    """

    def __init__(self, spec: ConnectorSpec, in_features: int, out_features: int,
                 bias: bool = True, activation: Optional[str] = None, backend: str = "auto",
                 device=None, dtype=None):
        if not isinstance(spec, ConnectorSpec):
            raise TypeError(f"spec must be a dc_kernels.ConnectorSpec, got {type(spec).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.spec = spec
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_linear(cls, spec: ConnectorSpec, linear: nn.Linear, activation: Optional[str] = None,
                    backend: str = "auto") -> "DenseConnectorLinear":
        """A DenseConnectorLinear that shares ``linear``'s ``weight`` and ``bias`` Parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(spec, linear.in_features, linear.out_features, linear.bias is not None,
                    activation, backend, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    #: set by :meth:`column_shard`: the unsharded layer's ``out_features`` and this shard's
    #: first column (None / 0 for a whole layer)
    full_out_features: Optional[int] = None
    shard_offset: int = 0

    def forward(self, x) -> torch.Tensor:
        """``activation(features @ weight.T + bias)``: ``x`` is the hidden-state tuple (the
        features are built from it in place, :func:`dense_connector_linear`) or an already
        built ``[..., in_features]`` feature tensor."""
        if isinstance(x, torch.Tensor):
            return _linear_features(x, self.weight, self.bias, self.activation)
        path = "auto"
        if self.full_out_features is not None:
            path = column_shard_path(x, self.spec, self.weight, self.full_out_features,
                                     self.backend)
        return dense_connector_linear(x, self.spec, self.weight, self.bias, self.activation,
                                      backend=self.backend, path=path)

    def column_shard(self, rank: int, world_size: int) -> "DenseConnectorLinear":
        """This layer's output columns of ``rank`` out of ``world_size``: a column-parallel shard.

        Returns a new DenseConnectorLinear holding rows ``shard_range(out_features, rank,
        world_size)`` of ``weight`` and ``bias`` (plain local tensors, copied, without grad:
        for inference and serving). Its output is that slice of this layer's output columns
        (see ``docs/DESIGN.md`` §6 for when it is bit-equal). The split is ``torch.chunk``'s,
        the same as a DTensor ``Shard(0)``. For a sharded training layer use
        :class:`dc_kernels.distributed.FirstLayerColwiseParallel`.
        """
        from .distributed import shard_range
        start, stop = shard_range(self.out_features, rank, world_size)
        layer = type(self)(self.spec, self.in_features, stop - start, self.bias is not None,
                           self.activation, self.backend, device="meta")
        with torch.no_grad():
            layer.weight = nn.Parameter(self.weight[start:stop].detach().clone(),
                                        requires_grad=False)
            if self.bias is not None:
                layer.bias = nn.Parameter(self.bias[start:stop].detach().clone(),
                                          requires_grad=False)
        layer.shard_offset = self.shard_offset + start
        layer.full_out_features = self.full_out_features or self.out_features
        return layer

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, spec={self.spec}, activation={self.activation!r}, "
                f"backend={self.backend!r}")


def _linear_features(features, weight, bias, activation):
    # nn.Linear (+ activation) on ready-made features, output not a view
    if not torch.is_autocast_enabled(features.device.type) and weight.dtype != features.dtype:
        raise ValueError(
            f"the projector's weights are {weight.dtype}, the features {features.dtype}: "
            "convert one of them (e.g. connector.to(features.dtype))")
    shape = features.shape
    y = F.linear(features.reshape(-1, shape[-1]), weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    return _non_view(y, (*shape[:-1], y.shape[-1]))


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
    the rest are ordinary ``nn`` layers. For ``mlpNx_gelu`` the first Linear is the child
    ``"0"``, a :class:`DenseConnectorLinear` (an ``nn.Linear``) that is called with the hidden
    states, so FSDP, FSDP2, DeepSpeed ZeRO-3 and tensor-parallel styles see it (README,
    "Distributed training"); the child ``"1"`` (``nn.GELU``) stays for the structure but runs
    fused in ``"0"``. For ``"linear"`` the weight and bias are this module's own. The identity
    projector returns the features. Outputs are never views.
    """

    def __init__(self, spec: ConnectorSpec, vision_hidden_size: int, hidden_size: int,
                 projector_type: str = "mlp2x_gelu", backend: str = "auto",
                 _projector: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(spec, ConnectorSpec):
            raise TypeError(f"spec must be a dc_kernels.ConnectorSpec, got {type(spec).__name__}")
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.spec = spec
        self.vision_hidden_size = _positive_int("vision_hidden_size", vision_hidden_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        _check_projector_type(projector_type)
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
            # the original's keys are the Linear's own: "weight", "bias" (this module's forward
            # is the first layer's, so wrappers hooking it gather them)
            self.weight = linears[0].weight
            self.bias = linears[0].bias
        else:
            for name, module in _projector.named_children():
                if linears and module is linears[0]:
                    # the first Linear becomes a layer fed the hidden states, sharing the
                    # original's Parameters; the GELU after it runs in its epilogue
                    module = DenseConnectorLinear.from_linear(
                        spec, module, "gelu" if len(linears) > 1 else None, backend)
                self.add_module(name, module)

    @property
    def backend(self) -> str:
        """The backend of the fused first layer; setting it also sets the first layer's."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value
        for module in self.modules():
            if isinstance(module, DenseConnectorLinear):
                module.backend = value

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
    def first_layer(self) -> nn.Module:
        """The module that computes the projector's first Linear (+ GELU) from hidden states.

        ``self[0]``-style child ``"0"`` (a :class:`DenseConnectorLinear`, or whatever a wrapper
        such as FSDP1 put in its place) for ``mlpNx_gelu``; for ``"linear"`` a
        DenseConnectorLinear sharing this module's ``weight`` and ``bias`` (not registered: the
        parameters stay under the original's keys). ValueError for the identity.
        """
        if self.projector_type == "identity":
            raise ValueError("the identity projector has no first layer")
        if self.projector_type == "linear":
            layer = DenseConnectorLinear(self.spec, self.weight.shape[1], self.weight.shape[0],
                                         self.bias is not None, None, self.backend,
                                         device="meta")
            layer.weight = self.weight
            layer.bias = self.bias
            return layer
        return self._modules["0"]

    def _first_linear(self):
        """``(weight, bias)`` of the first Linear."""
        if self.projector_type == "linear":
            return self.weight, self.bias
        first = self._modules["0"]
        return first.weight, first.bias

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """The original's ``mm_projector(dense_connector(...))`` for the vision tower's
        hidden-state tuple, ``[B, T', hidden_size]`` (the features for ``"identity"``); the
        spec's layers are read in place. ValueError when they are not ``vision_hidden_size``
        wide."""
        # the width is checked here; everything else by the functions called below (once per
        # input signature: dc_kernels.plan), so a repeated call does O(1) work per tensor
        base = hidden_states[self.spec.final_layer] if (
            type(hidden_states) in (tuple, list)
            and 0 <= self.spec.final_layer < len(hidden_states)) else None
        if isinstance(base, torch.Tensor) and base.dim() == 3:
            channels = base.shape[-1]
        else:
            channels = check_hidden_states(hidden_states, self.spec).channels
        if channels != self.vision_hidden_size:
            raise ValueError(
                f"hidden states are {channels} wide; this DenseConnector was built for "
                f"vision_hidden_size={self.vision_hidden_size}")
        if self.projector_type == "identity":
            return dense_connector_features(hidden_states, self.spec, backend=self.backend)
        if self.projector_type == "linear":
            return dense_connector_linear(hidden_states, self.spec, self.weight, self.bias,
                                          None, backend=self.backend)
        # the child module is called (not its weight read), so wrappers' hooks fire
        x = self._modules["0"](hidden_states)
        return self._after_first_layer(x)

    def _after_first_layer(self, x: torch.Tensor) -> torch.Tensor:
        # x: the first layer's output after its fused GELU; the children after "1" (the GELU
        # the first layer ran) are applied in order, on rows [M, width] so that no layer
        # returns a view; the result is reshaped without making a view.
        rest = list(self._modules.values())[2:]
        if not rest:
            return x
        shape = x.shape
        y = x.reshape(-1, shape[-1])
        for module in rest:
            y = module(y)
        return _non_view(y, (*shape[:-1], y.shape[-1]))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the projector alone to ready-made features ``[..., spec.out_channels(C)]``.

        What the original's ``mm_projector(features)`` returns; used where the features come
        from elsewhere (e.g. the streaming vision tower). Under ``torch.autocast`` the Linears run
        in the autocast dtype, as ``nn.Linear`` does; otherwise the features' dtype must match
        the weights' (ValueError). The first layer's module is called, as in ``forward``.
        """
        if self.projector_type == "identity":
            return features
        if self.projector_type == "linear":
            return _linear_features(features, self.weight, self.bias, None)
        x = self._modules["0"](features)
        del features  # a caller passing a temporary frees the features here
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


def _load_checkpoint_file(path, source: str):
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong with the file.

    Missing or unreadable files raise the OSError as it is; everything else torch.load raises
    becomes a ValueError naming the file: empty or truncated, not a checkpoint (corrupt bytes,
    another format), or holding Python objects that weights-only loading refuses (code is never
    run: such a file is not loaded). The original exception is chained.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except EOFError as e:
        raise ValueError(f"{source} is empty or truncated: not a complete torch.save "
                         "checkpoint") from e
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types on bad bytes
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        refused = [ln for ln in lines if "GLOBAL" in ln]
        if refused:
            raise ValueError(
                f"{source} holds Python objects other than tensors, which weights-only loading "
                f"refuses ({refused[0]}); a projector checkpoint holds only tensors. It was not "
                "loaded (no code from it ran).") from e
        detail = next((ln for ln in lines if "WeightsUnpickler error" in ln), None)
        if detail is not None:  # the reason is on the next line
            i = lines.index(detail)
            detail = lines[i + 1] if i + 1 < len(lines) else detail
        else:
            detail = f"{type(e).__name__}: {lines[0] if lines else ''}"
        raise ValueError(f"{source} is not a readable PyTorch checkpoint (corrupt, or not "
                         f"written by torch.save): {detail[:200]}") from e


def load_mm_projector_state_dict(checkpoint, expected: Mapping[str, torch.Tensor]):
    """The projector entries of an original checkpoint, checked against ``expected``.

    Strips ``model.mm_projector.`` / ``mm_projector.`` prefixes (a state dict without them is
    taken as the projector's own). Raises ValueError naming every missing, unexpected or
    misshaped key, TypeError for a non-string key or a projector entry that is not a tensor,
    and ValueError naming the file when it is empty, corrupt or refused by weights-only loading.
    """
    source = "checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = f"checkpoint file {os.fspath(checkpoint)!r}"
        checkpoint = _load_checkpoint_file(checkpoint, source)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"{source} must be a state dict (a mapping of names to tensors) or a "
                        f"path to one, got {type(checkpoint).__name__}")
    for k in checkpoint:
        if not isinstance(k, str):
            raise TypeError(f"{source} has a key {k!r} of type {type(k).__name__}; a state "
                            "dict's keys are str")
    found = {}
    for prefix in MM_PROJECTOR_PREFIXES:
        found = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
        if found:
            break
    if not found:
        found = dict(checkpoint)
    for k, v in found.items():
        if k in expected and not isinstance(v, torch.Tensor):
            raise TypeError(f"{source}: the value of {k!r} is a {type(v).__name__}, not a "
                            "tensor")
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
