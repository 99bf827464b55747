"""The Triton ops as ``torch.library`` custom ops, with fake (meta) kernels and autograd.

Registering them lets ``torch.compile(..., fullgraph=True)`` trace through the Triton backend
(the kernels stay opaque calls, their output shapes come from the fake kernels) and gives them
backward formulas:

* ``dc_kernels::features(hidden_states, ...) -> A``: the gradient of A's slab 0 goes to the base
  layer, slab ``g``'s gradient, scaled by ``1/len(group g)``, to every member of group ``g``; a
  layer in several slabs gets the sum; CLS positions get zero; layers the spec does not read
  get None.
* ``dc_kernels::linear(hidden_states, ..., weight, bias) -> act(A @ W^T + b)``: backward
  recomputes A with the features kernel (nothing of size ``[M, K]`` is kept between forward and
  backward) and the pre-activation ``Z = A @ W^T + b`` with cuBLAS, then
  ``dZ = dY * gelu'(Z)``, ``dW = dZ^T A``, ``db = sum(dZ)``, ``dA = dZ W`` scattered as above.

Specs cross the op boundary as plain ints (``final_layer``, flattened group bounds,
``drop_cls``, the STI pool or 0); DCI and SCI share the kernels, so the op rebuilds a DCI spec
for both.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .spec import ConnectorSpec

__all__ = ["features_op", "linear_op", "spec_args", "scatter_to_layers"]


def spec_args(spec: ConnectorSpec):
    """``(final_layer, group_bounds, drop_cls, sti_pool)``: a spec as custom-op arguments.

    ``sti_pool`` is the STI pool size, 0 for channel specs (DCI and SCI share the kernels).
    """
    bounds = [v for g in spec.groups for v in g]
    pool = spec.pool_size if spec.connector_type == "sti" else 0
    return spec.final_layer, bounds, spec.drop_cls, pool


def _spec(final_layer: int, group_bounds: Sequence[int], drop_cls: bool,
          sti_pool: int) -> ConnectorSpec:
    groups = tuple((group_bounds[i], group_bounds[i + 1]) for i in range(0, len(group_bounds), 2))
    if sti_pool:
        return ConnectorSpec("sti", final_layer=final_layer, groups=groups, drop_cls=drop_cls,
                             pool_size=sti_pool)
    return ConnectorSpec("dci", final_layer=final_layer, groups=groups, drop_cls=drop_cls)


def _features_ops():
    from .ops import features
    return features


def _linear_ops():
    from .ops import linear
    return linear


def scatter_to_layers(grad_a: torch.Tensor, spec: ConnectorSpec, shapes: Sequence[torch.Size],
                      needs_grad: Sequence[bool]) -> List[Optional[torch.Tensor]]:
    """Gradients of the hidden states from the gradient of the features ``A``.

    ``grad_a`` is ``[B, T', (G+1)C]`` (DCI/SCI) or ``[B, T' + G*TP, C]`` (STI); ``shapes`` and
    ``needs_grad`` describe the hidden states. Returns one entry per hidden state: a
    ``[B, T, C]`` tensor for every layer the spec reads whose ``needs_grad`` is set, else None.
    An STI pooled row's gradient, divided by ``len(group) * pool``, goes to each of its
    ``pool`` source tokens in every member layer.
    """
    C = shapes[spec.final_layer][-1]
    tok0 = spec.token_offset
    grads: List[Optional[torch.Tensor]] = [None] * len(shapes)

    def add(i, g):
        if not needs_grad[i]:
            return
        if grads[i] is None:
            grads[i] = torch.zeros(shapes[i], dtype=grad_a.dtype, device=grad_a.device)
        grads[i][:, tok0:tok0 + g.shape[1]] += g

    if spec.connector_type == "sti":
        kept = spec.tokens_kept(shapes[spec.final_layer][1])
        tp, p = kept // spec.pool_size, spec.pool_size
        add(spec.final_layer, grad_a[:, :kept])
        for s, (start, stop) in enumerate(spec.groups):
            g = grad_a[:, kept + s * tp:kept + (s + 1) * tp] / ((stop - start) * p)
            g = g.repeat_interleave(p, dim=1)  # [B, tp * p, C]: every source token
            for i in range(start, stop):
                add(i, g)
        return grads

    add(spec.final_layer, grad_a[..., :C])
    for s, (start, stop) in enumerate(spec.groups, start=1):
        g = grad_a[..., s * C:(s + 1) * C]
        if stop - start > 1:
            g = g / (stop - start)
        for i in range(start, stop):
            add(i, g)
    return grads


def _features_shape(hidden_states, spec):
    B, T, C = hidden_states[spec.final_layer].shape
    return B, spec.out_tokens(T), spec.out_channels(C)


# --------------------------------------------------------------------------- features
@torch.library.custom_op("dc_kernels::features", mutates_args=())
def features_op(hidden_states: List[torch.Tensor], final_layer: int, group_bounds: List[int],
                drop_cls: bool, sti_pool: int) -> torch.Tensor:
    """Features with the one-pass Triton kernels. Inputs validated by the caller."""
    spec = _spec(final_layer, group_bounds, drop_cls, sti_pool)
    B, T, C = hidden_states[final_layer].shape
    return _features_ops().features_triton(hidden_states, spec, B, T, C)


@features_op.register_fake
def _(hidden_states, final_layer, group_bounds, drop_cls, sti_pool):
    spec = _spec(final_layer, group_bounds, drop_cls, sti_pool)
    base = hidden_states[final_layer]
    return base.new_empty(_features_shape(hidden_states, spec))


def _features_setup(ctx, inputs, output):
    hidden_states, final_layer, group_bounds, drop_cls, sti_pool = inputs
    ctx.spec = _spec(final_layer, group_bounds, drop_cls, sti_pool)
    ctx.needs = [h.requires_grad for h in hidden_states]
    ctx.shapes = [h.shape for h in hidden_states]


@torch.library.custom_op("dc_kernels::scatter_grad", mutates_args=())
def scatter_grad_op(grad_a: torch.Tensor, final_layer: int, group_bounds: List[int],
                    drop_cls: bool, tokens: int, num_hidden_states: int,
                    wanted: List[int]) -> List[torch.Tensor]:
    """Gradients of the hidden states listed in ``wanted`` (channel specs), Triton kernel."""
    from .ops.scatter import scatter_grad_triton
    spec = _spec(final_layer, group_bounds, drop_cls, 0)
    B, C = grad_a.shape[0], grad_a.shape[-1] // (spec.num_groups + 1)
    shapes = [torch.Size((B, tokens, C))] * num_hidden_states
    needs = [i in wanted for i in range(num_hidden_states)]
    grads = scatter_grad_triton(grad_a, spec, shapes, needs)
    return [grads[i] for i in wanted]


@scatter_grad_op.register_fake
def _(grad_a, final_layer, group_bounds, drop_cls, tokens, num_hidden_states, wanted):
    C = grad_a.shape[-1] // (len(group_bounds) // 2 + 1)
    return [grad_a.new_empty((grad_a.shape[0], tokens, C)) for _ in wanted]


def _scatter(grad_a, spec, shapes, needs):
    # the one-pass Triton kernel for channel specs, the torch formulation for STI
    if spec.connector_type == "sti":
        return scatter_to_layers(grad_a, spec, shapes, needs)
    read = set(spec.used_layers)
    wanted = [i for i in range(len(shapes)) if needs[i] and i in read]
    grads: List[Optional[torch.Tensor]] = [None] * len(shapes)
    if wanted:
        final_layer, bounds, drop_cls, _ = spec_args(spec)
        outs = scatter_grad_op(grad_a, final_layer, bounds, drop_cls,
                               shapes[spec.final_layer][1], len(shapes), wanted)
        for i, g in zip(wanted, outs):
            grads[i] = g
    return grads


def _features_backward(ctx, grad):
    grads = _scatter(grad, ctx.spec, ctx.shapes, ctx.needs)
    return grads, None, None, None, None


features_op.register_autograd(_features_backward, setup_context=_features_setup)


# --------------------------------------------------------------------------- linear
@torch.library.custom_op("dc_kernels::linear", mutates_args=())
def linear_op(hidden_states: List[torch.Tensor], final_layer: int, group_bounds: List[int],
              drop_cls: bool, sti_pool: int, weight: torch.Tensor, bias: Optional[torch.Tensor],
              activation: str, path: str) -> torch.Tensor:
    """``act(features @ weight.T + bias)`` on Triton (``activation`` "none" or "gelu")."""
    spec = _spec(final_layer, group_bounds, drop_cls, sti_pool)
    B, T, C = hidden_states[final_layer].shape
    act = None if activation == "none" else activation
    return _linear_ops().linear_triton(hidden_states, spec, B, T, C, weight, bias, act, path)


@linear_op.register_fake
def _(hidden_states, final_layer, group_bounds, drop_cls, sti_pool, weight, bias, activation,
      path):
    spec = _spec(final_layer, group_bounds, drop_cls, sti_pool)
    B, Tk, _ = _features_shape(hidden_states, spec)
    return weight.new_empty((B, Tk, weight.shape[0]))


def _linear_setup(ctx, inputs, output):
    (hidden_states, final_layer, group_bounds, drop_cls, sti_pool, weight, bias, activation,
     path) = inputs
    ctx.spec_args = (final_layer, list(group_bounds), drop_cls, sti_pool)
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.needs = [h.requires_grad for h in hidden_states]
    ctx.weight_needs = weight.requires_grad
    ctx.bias_needs = bias is not None and bias.requires_grad
    ctx.n = len(hidden_states)
    saved = list(hidden_states) + [weight] + ([bias] if bias is not None else [])
    ctx.save_for_backward(*saved)


def _linear_backward(ctx, grad):
    saved = ctx.saved_tensors
    hidden_states, weight = list(saved[:ctx.n]), saved[ctx.n]
    bias = saved[ctx.n + 1] if ctx.has_bias else None
    a = features_op(hidden_states, *ctx.spec_args)  # recomputed: [B, T', K]
    a2 = a.reshape(-1, a.shape[-1])
    dz = grad.reshape(-1, grad.shape[-1])
    if ctx.activation == "gelu":
        z = torch.nn.functional.linear(a2, weight, bias)
        dz = torch.ops.aten.gelu_backward(dz, z)
    grad_w = dz.t() @ a2 if ctx.weight_needs else None
    grad_b = dz.sum(0) if ctx.bias_needs else None
    grads_hs = [None] * ctx.n
    if any(ctx.needs):
        grad_a = (dz @ weight).reshape(a.shape)
        grads_hs = _scatter(grad_a, _spec(*ctx.spec_args), [h.shape for h in hidden_states],
                            ctx.needs)
    return grads_hs, None, None, None, None, grad_w, grad_b, None, None


linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# --------------------------------------------------------------------------- eager, lean
class FeaturesFunction(torch.autograd.Function):
    """Eager autograd of a prepared features launch (``dc_kernels.plan``): the custom op's
    formulas without its dispatch. ``torch.compile`` traces ``dc_kernels::features`` instead.

    ``apply(launch, spec, n, read, *layers)``: ``layers`` are the hidden states at the indices
    ``read`` of an ``n``-tuple; returns A; backward gives each read layer its gradient.
    """

    @staticmethod
    def forward(ctx, launch, spec, n, read, *layers):
        hs = [None] * n
        for i, t in zip(read, layers):
            hs[i] = t
        ctx.spec, ctx.n, ctx.read = spec, n, read
        ctx.shapes = [t.shape for t in layers]
        ctx.needs = [t.requires_grad for t in layers]
        return launch(hs)

    @staticmethod
    def backward(ctx, grad):
        shapes = [None] * ctx.n
        needs = [False] * ctx.n
        for i, shape, need in zip(ctx.read, ctx.shapes, ctx.needs):
            shapes[i], needs[i] = shape, need
        for i in range(ctx.n):  # unread layers: any shape (no gradient is formed for them)
            if shapes[i] is None:
                shapes[i] = ctx.shapes[0]
        grads = _scatter(grad, ctx.spec, shapes, needs)
        return (None, None, None, None, *[grads[i] for i in ctx.read])
