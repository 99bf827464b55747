"""Distributed tensors and tensor parallelism for the Dense Connector's first layer.

Data parallelism (DDP, FSDP, FSDP2, DeepSpeed ZeRO) needs nothing from this module: the first
layer is a module that is called (:class:`~dc_kernels.DenseConnectorLinear`), so the wrappers
gather its parameters as they do any ``nn.Linear``'s. This module covers the rest:

* **DTensor arguments** (:func:`dense_connector_linear` / :func:`dense_connector_features` call
  :func:`linear_on_dtensors` / :func:`features_on_dtensors` when an argument is a DTensor): the
  ops run on the local shards and the result is wrapped back into a DTensor. Supported, on a
  1-D device mesh (plain tensors mixed in are taken as replicated, as the hidden states of a
  column-parallel layer usually are):

  ================================  =====================  ===========================
  weight (and bias)                 hidden states          output
  ================================  =====================  ===========================
  ``Shard(0)`` (column-parallel)    replicated / plain     ``Shard(2)``: own columns
  ``Replicate()`` / plain           replicated / plain     ``Replicate()``
  ``Replicate()`` / plain           ``Shard(0)`` (batch)   ``Shard(0)``
  ================================  =====================  ===========================

  Gradients follow the math: a replicated input of a column-parallel layer gets the sum of the
  ranks' partial gradients, a replicated weight fed batch shards too. Anything else (``Shard(1)``
  weights, ``Partial``, token- or channel-sharded hidden states, meshes of more than one
  dimension, a bias sharded unlike its weight) raises a ValueError naming it: no silent
  all-gather.
* :class:`FirstLayerColwiseParallel`: a ``ParallelStyle`` for ``parallelize_module`` that shards
  the first layer's weight and bias on the output dimension (``Shard(0)``) and returns each
  rank's output columns; compose it with ``RowwiseParallel`` on the second Linear for a
  Megatron-style projector.
* :func:`shard_range` and :meth:`DenseConnectorLinear.column_shard` for engines that keep plain
  local shards (serving).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = ["shard_range", "is_dtensor", "any_dtensor", "linear_on_dtensors",
           "features_on_dtensors", "FirstLayerColwiseParallel"]


def shard_range(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``(start, stop)`` of ``rank``'s part of ``n`` rows split over ``world_size`` ranks.

    The split of ``torch.chunk`` and of DTensor's ``Shard``: ``ceil(n / world_size)`` rows per
    rank, the last ranks get fewer (possibly none).
    """
    for name, v in (("n", n), ("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    per = -(-n // world_size)
    start = min(rank * per, n)
    return start, min(start + per, n)


def _dtensor_types():
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    return DTensor, Partial, Replicate, Shard


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (cheap when DTensor was never imported)."""
    if "torch.distributed.tensor" not in sys.modules or type(t) is torch.Tensor:
        return False
    return isinstance(t, _dtensor_types()[0])


def any_dtensor(hidden_states, *tensors) -> bool:
    """True when one of ``tensors`` or an entry of ``hidden_states`` is a DTensor."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    if any(is_dtensor(t) for t in tensors):
        return True
    return isinstance(hidden_states, (tuple, list)) and any(is_dtensor(h) for h in hidden_states)


def _placement_name(p) -> str:
    return repr(p)


def _mesh_of(tensors, what: str):
    mesh = None
    for t in tensors:
        if is_dtensor(t):
            if mesh is None:
                mesh = t.device_mesh
            elif t.device_mesh != mesh:
                raise ValueError(f"{what}: every DTensor argument must be on one device mesh")
    if mesh.ndim != 1:
        raise ValueError(
            f"{what}: DTensor arguments on a {mesh.ndim}-D device mesh are not supported (a "
            "1-D mesh is: shard the first layer over one mesh dimension, e.g. the TP "
            "sub-mesh)")
    return mesh


def _hidden_placement(hidden_states, what: str):
    """``"replicate"`` or ``"batch"`` for the hidden-state tuple; ValueError otherwise."""
    _, _, Replicate, Shard = _dtensor_types()
    kinds = set()
    for i, h in enumerate(hidden_states):
        if not is_dtensor(h):
            if isinstance(h, torch.Tensor):
                kinds.add("replicate")
            continue
        (p,) = h.placements
        if isinstance(p, Replicate):
            kinds.add("replicate")
        elif isinstance(p, Shard) and p.dim == 0:
            kinds.add("batch")
        else:
            raise ValueError(
                f"{what}: hidden_states[{i}] is a DTensor placed {_placement_name(p)}; "
                "supported: Replicate() or Shard(0) (batch)")
    if len(kinds) > 1:
        raise ValueError(f"{what}: the hidden states mix batch-sharded (Shard(0)) and replicated "
                         "tensors; give them one placement")
    return kinds.pop() if kinds else "replicate"


def _param_placement(t, name: str, what: str):
    """``"replicate"``, ``"shard0"`` or None (absent) for the weight / bias."""
    if t is None:
        return None
    if not is_dtensor(t):
        return "replicate"
    _, _, Replicate, Shard = _dtensor_types()
    (p,) = t.placements
    if isinstance(p, Replicate):
        return "replicate"
    if isinstance(p, Shard) and p.dim == 0:
        return "shard0"
    raise ValueError(
        f"{what}: {name} is a DTensor placed {_placement_name(p)}; supported: Shard(0) "
        "(column-parallel: each rank computes its output columns) or Replicate()")


def _local(t, mesh, grad_partial: bool):
    """The local tensor of ``t`` (a plain tensor is taken as replicated on ``mesh``).

    ``grad_partial``: the local gradient is only this rank's share of the gradient of a
    replicated tensor; summed over the ranks in backward (a plain tensor that requires grad is
    wrapped so that the sum happens too).
    """
    DTensor, Partial, Replicate, _ = _dtensor_types()
    if t is None or not isinstance(t, torch.Tensor):
        return t
    if not is_dtensor(t):
        if not (grad_partial and t.requires_grad):
            return t
        t = DTensor.from_local(t, mesh, [Replicate()], run_check=False)
    if grad_partial:
        return t.to_local(grad_placements=[Partial()])
    return t.to_local()


def _contiguous_stride(shape) -> Tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))


def _wrap(out: torch.Tensor, mesh, placement, global_shape) -> torch.Tensor:
    DTensor = _dtensor_types()[0]
    shape = torch.Size(global_shape)
    return DTensor.from_local(out, mesh, [placement], run_check=False, shape=shape,
                              stride=_contiguous_stride(shape))


def linear_on_dtensors(fn: Callable, hidden_states: Sequence[torch.Tensor], spec, weight,
                       bias, activation: Optional[str] = None, backend: str = "auto",
                       path: str = "auto") -> torch.Tensor:
    """Run ``fn`` (:func:`dense_connector_linear`) on local shards; return a DTensor.

    See the module docstring for the supported placements (inputs already validated). For a
    column-parallel weight, ``path="auto"`` is resolved as for the unsharded layer
    (:func:`~dc_kernels.functional.column_shard_path`). The output is ``[B, T', N]`` globally,
    placed ``Shard(2)`` for a column-parallel weight, ``Shard(0)`` for batch-sharded hidden
    states, ``Replicate()`` otherwise.
    """
    what = "dense_connector_linear"
    _, _, Replicate, Shard = _dtensor_types()
    mesh = _mesh_of([*(hidden_states if isinstance(hidden_states, (tuple, list)) else ()),
                     weight, bias], what)
    hs_kind = _hidden_placement(hidden_states, what)
    w_kind = _param_placement(weight, "weight", what)
    b_kind = _param_placement(bias, "bias", what)
    if b_kind is not None and b_kind != w_kind:
        raise ValueError(f"{what}: the bias must be placed like the weight (both Shard(0) or "
                         f"both replicated); got weight {w_kind}, bias {b_kind}")
    if w_kind == "shard0" and hs_kind == "batch":
        raise ValueError(f"{what}: a column-parallel (Shard(0)) weight needs replicated hidden "
                         "states, not batch-sharded (Shard(0)) ones, on a 1-D mesh")
    column = w_kind == "shard0"
    # the hidden states' local gradients are partial sums when each rank holds only some of the
    # weight's rows; the weight's when each rank holds only some of the batch
    local_hs = [_local(h, mesh, column) for h in hidden_states]
    w_local = _local(weight, mesh, hs_kind == "batch")
    b_local = _local(bias, mesh, hs_kind == "batch")
    if column:
        # the path the unsharded layer takes, so the columns equal its columns bit for bit
        from .functional import column_shard_path
        path = column_shard_path(local_hs, spec, w_local, weight.shape[0], backend, path)
    out = fn(local_hs, spec, w_local, b_local, activation, backend, path)
    base = hidden_states[spec.final_layer]
    B, T, _ = base.shape
    global_shape = (B, spec.out_tokens(T), weight.shape[0])
    if column:
        return _wrap(out, mesh, Shard(2), global_shape)
    if hs_kind == "batch":
        return _wrap(out, mesh, Shard(0), global_shape)
    return _wrap(out, mesh, Replicate(), global_shape)


def features_on_dtensors(fn: Callable, hidden_states: Sequence[torch.Tensor], spec,
                         *args, **kwargs) -> torch.Tensor:
    """Run ``fn`` (:func:`dense_connector_features`) on the local hidden states.

    Replicated hidden states give a replicated result, batch-sharded (``Shard(0)``) ones a
    batch-sharded result; other placements raise ValueError.
    """
    what = "dense_connector_features"
    _, _, Replicate, Shard = _dtensor_types()
    mesh = _mesh_of(hidden_states, what)
    hs_kind = _hidden_placement(hidden_states, what)
    out = fn([_local(h, mesh, False) for h in hidden_states], spec, *args, **kwargs)
    B, T, C = hidden_states[spec.final_layer].shape
    global_shape = (B, spec.out_tokens(T), spec.out_channels(C))
    return _wrap(out, mesh, Shard(0) if hs_kind == "batch" else Replicate(), global_shape)


def _parallel_style_base():
    from torch.distributed.tensor.parallel import ParallelStyle
    return ParallelStyle


def __getattr__(name):
    # FirstLayerColwiseParallel subclasses torch's ParallelStyle: defined on first use so that
    # importing dc_kernels does not import torch.distributed.tensor
    if name == "FirstLayerColwiseParallel":
        cls = _make_colwise_style()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_colwise_style():
    from torch import nn
    from torch.distributed.tensor import distribute_module, distribute_tensor

    DTensor, _, Replicate, Shard = _dtensor_types()

    class FirstLayerColwiseParallel(_parallel_style_base()):
        """Column-parallel first layer: ``weight``/``bias`` sharded ``Shard(0)`` on the mesh.

        For ``parallelize_module(connector, tp_mesh, {"0": FirstLayerColwiseParallel()})``
        (``mlpNx_gelu``; add ``"2": RowwiseParallel()`` for the Megatron pattern) or
        ``parallelize_module(connector, tp_mesh, FirstLayerColwiseParallel())`` for the
        ``"linear"`` projector (its parameters are the connector's own). torch's
        ``ColwiseParallel`` cannot be used: it turns ``inputs[0]`` into a DTensor and so needs a
        tensor, not the hidden-state tuple.

        The hidden states are taken as replicated over the mesh (every rank passes the same
        values; their gradients, if they require grad, are summed over the ranks). Each rank's
        output is its columns ``shard_range(N, rank, world)`` of the layer's output, a plain
        tensor (``use_local_output=True``, the default) or a ``Shard(2)`` DTensor.

        Args:
            use_local_output: return the local tensor (default) or the DTensor.
        """

        def __init__(self, *, use_local_output: bool = True):
            super().__init__()
            self.use_local_output = use_local_output

        def _partition(self, name, module, device_mesh):
            for pname in ("weight", "bias"):
                param = module._parameters.get(pname)
                if param is None:
                    continue
                kw = ({"src_data_rank": self.src_data_rank}
                      if hasattr(self, "src_data_rank") else {})  # torch >= 2.6
                module.register_parameter(pname, nn.Parameter(
                    distribute_tensor(param, device_mesh, [Shard(0)], **kw),
                    requires_grad=param.requires_grad))

        @staticmethod
        def _prepare_input(mod, inputs, device_mesh):
            def replicated(t):
                if isinstance(t, torch.Tensor) and not is_dtensor(t):
                    return DTensor.from_local(t, device_mesh, [Replicate()], run_check=False)
                return t
            if not inputs:
                return None
            if isinstance(inputs[0], (tuple, list)):  # the hidden states
                return ([replicated(h) for h in inputs[0]], *inputs[1:])
            return (replicated(inputs[0]), *inputs[1:])  # ready-made features

        def _prepare_output(self, mod, outputs, device_mesh):
            if self.use_local_output and is_dtensor(outputs):
                return outputs.to_local()
            return outputs

        def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
            from .modules import DenseConnector, DenseConnectorLinear
            ok = isinstance(module, DenseConnectorLinear) or (
                isinstance(module, DenseConnector) and module.projector_type == "linear")
            if not ok:
                raise TypeError(
                    "FirstLayerColwiseParallel applies to a DenseConnectorLinear (a "
                    "DenseConnector's child '0') or a DenseConnector with projector_type "
                    f"'linear'; got {type(module).__name__}")
            if device_mesh.ndim != 1:
                raise ValueError(f"FirstLayerColwiseParallel needs a 1-D device mesh, got "
                                 f"{device_mesh.ndim}-D")
            return distribute_module(module, device_mesh, self._partition, self._prepare_input,
                                     self._prepare_output)

        def __repr__(self) -> str:
            return f"FirstLayerColwiseParallel(use_local_output={self.use_local_output})"

    FirstLayerColwiseParallel.__module__ = __name__
    return FirstLayerColwiseParallel
