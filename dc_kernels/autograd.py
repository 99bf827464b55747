"""The Triton ops as ``torch.library`` custom ops, with fake (meta) kernels and autograd.

Registering them lets ``torch.compile(..., fullgraph=True)`` trace through the Triton backend
(the kernels stay opaque calls, their output shapes come from the fake kernels) and gives them
backward formulas:

* ``dc_kernels::features(hidden_states, ...) -> A``: the gradient of A's slab 0 goes to the base
  layer, slab ``g``'s gradient, scaled by ``1/len(group g)``, to every member of group ``g``; a
  layer in several slabs gets the sum; CLS positions get zero; layers the spec does not read
  get None (``dc_kernels::scatter_grad``, whose own backward is the features op again: the two
  maps are each other's transpose).
* ``dc_kernels::linear(hidden_states, ..., weight, bias, ..., keep_features, keep_pre) ->
  (act(A @ W^T + b), A, Z)``: the training launch also returns the features A and the
  pre-activation Z when asked (empty placeholders otherwise); :func:`linear_op` asks for what
  the gradients that will be needed require and returns the first output. Backward:
  ``dZ = dY * gelu'(Z)``, ``dW = dZ^T A``, ``db = sum(dZ)``, ``dA = dZ W`` scattered as above:
  eager's GEMMs and no other (docs/DESIGN.md §6.1 has what is kept in which case and why).

Specs cross the op boundary as plain ints (``final_layer``, flattened group bounds,
``drop_cls``, the STI pool or 0); DCI and SCI share the kernels, so the op rebuilds a DCI spec
for both.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .spec import ConnectorSpec

__all__ = ["features_op", "linear_op", "linear_custom_op", "scatter_grad_op", "spec_args",
           "scatter_to_layers", "FeaturesFunction", "LinearFunction"]


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


def _scatter_grad_setup(ctx, inputs, output):
    grad_a, final_layer, group_bounds, drop_cls, tokens, num_hidden_states, wanted = inputs
    ctx.set_materialize_grads(False)
    ctx.spec_args = (final_layer, list(group_bounds), drop_cls)
    ctx.wanted = list(wanted)
    ctx.n = num_hidden_states
    ctx.layer_shape = (grad_a.shape[0], tokens, grad_a.shape[-1] // (len(group_bounds) // 2 + 1))


def _scatter_grad_backward(ctx, grads):
    # the scatter is the transpose of the features map, so its backward is the features of
    # the outputs' gradients (layers without one read as zeros)
    if all(g is None for g in grads):
        return None, None, None, None, None, None, None
    like = next(g for g in grads if g is not None)
    zeros = like.new_zeros(ctx.layer_shape)
    layers = [zeros] * ctx.n
    for i, g in zip(ctx.wanted, grads):
        if g is not None:
            layers[i] = g
    return features_op(layers, *ctx.spec_args, 0), None, None, None, None, None, None


scatter_grad_op.register_autograd(_scatter_grad_backward, setup_context=_scatter_grad_setup)


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
def _used_layers(final_layer: int, group_bounds: Sequence[int]) -> List[int]:
    # the hidden states a spec reads, ascending (plain ints: traced by torch.compile as is)
    used = {final_layer}
    for k in range(0, len(group_bounds), 2):
        used.update(range(group_bounds[k], group_bounds[k + 1]))
    return sorted(used)


def _compact_spec_args(final_layer, group_bounds, drop_cls, sti_pool, used):
    # the spec renumbered onto the list ``[hidden_states[i] for i in used]``: every group is a
    # run of consecutive layers, all of them in ``used``, so it stays a run there
    pos = {layer: k for k, layer in enumerate(used)}
    bounds = []
    for k in range(0, len(group_bounds), 2):
        bounds += [pos[group_bounds[k]], pos[group_bounds[k + 1] - 1] + 1]
    return pos[final_layer], bounds, drop_cls, sti_pool


def _grad_needs(hidden_states, used, weight, bias):
    # (some read hidden state, every read hidden state, weight, bias) requires grad
    hs = [hidden_states[i].requires_grad for i in used]
    return any(hs), all(hs), weight.requires_grad, bias is not None and bias.requires_grad


def _kept_for_backward(hidden_states, final_layer, group_bounds, weight, bias, activation):
    """``(keep_features, keep_pre)``: what the forward hands to the backward (docs/DESIGN.md
    §6.1).

    Nothing without grad mode or when no input the op reads requires grad. For the weight's
    gradient: the read hidden states when every one of them requires grad (then their
    producer's graph holds them already, so keeping them costs nothing, and A is recomputed in
    backward by the features kernel), else the features A (a frozen ViT's hidden states are
    never kept; the two-pass forward writes A anyway). The pre-activation Z for GELU' whenever
    anything needs a gradient.
    """
    if not torch.is_grad_enabled():
        return False, False
    hs_any, hs_all, w, b = _grad_needs(hidden_states, _used_layers(final_layer, group_bounds),
                                       weight, bias)
    return w and not hs_all, activation == "gelu" and (hs_any or w or b)


@torch.library.custom_op("dc_kernels::linear", mutates_args=())
def linear_custom_op(hidden_states: List[torch.Tensor], final_layer: int,
                     group_bounds: List[int], drop_cls: bool, sti_pool: int,
                     weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                     path: str, keep_features: bool, keep_pre: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The custom op ``dc_kernels::linear``: ``(act(A @ weight.T + b), A, Z)`` on Triton.

    ``A`` (the features) and ``Z`` (the pre-activation) are returned when ``keep_features`` /
    ``keep_pre`` ask for them (for the backward), else as empty placeholders. Call it through
    :func:`linear_op`, which asks for exactly what the needed gradients require.
    """
    spec = _spec(final_layer, group_bounds, drop_cls, sti_pool)
    B, T, C = hidden_states[final_layer].shape
    act = None if activation == "none" else activation
    ops = _linear_ops()
    if keep_features or keep_pre:
        y, a, z = ops.linear_triton_for_training(hidden_states, spec, B, T, C, weight, bias,
                                                 act, path, keep_features=keep_features,
                                                 keep_pre=keep_pre)
    else:
        y, a, z = ops.linear_triton(hidden_states, spec, B, T, C, weight, bias, act, path), \
            None, None
    return (y, a if a is not None else y.new_empty(0), z if z is not None else y.new_empty(0))


@linear_custom_op.register_fake
def _(hidden_states, final_layer, group_bounds, drop_cls, sti_pool, weight, bias, activation,
      path, keep_features, keep_pre):
    spec = _spec(final_layer, group_bounds, drop_cls, sti_pool)
    B, Tk, K = _features_shape(hidden_states, spec)
    N = weight.shape[0]
    like = hidden_states[final_layer]
    return (like.new_empty((B, Tk, N)),
            like.new_empty((B, Tk, K) if keep_features else (0,)),
            like.new_empty((B, Tk, N) if keep_pre else (0,)))


def linear_op(hidden_states: List[torch.Tensor], final_layer: int, group_bounds: List[int],
              drop_cls: bool, sti_pool: int, weight: torch.Tensor, bias: Optional[torch.Tensor],
              activation: str, path: str) -> torch.Tensor:
    """``act(features @ weight.T + bias)`` on Triton (``activation`` "none" or "gelu").

    Inputs validated by the caller; the spec as :func:`spec_args` gives it. Runs the custom op
    ``dc_kernels::linear``, asking it to keep for backward only what the gradients that will
    be asked for need (:func:`_kept_for_backward`, docs/DESIGN.md §6.1).
    """
    keep_features, keep_pre = _kept_for_backward(hidden_states, final_layer, group_bounds,
                                                 weight, bias, activation)
    return linear_custom_op(list(hidden_states), final_layer, group_bounds, drop_cls, sti_pool,
                            weight, bias, activation, path, keep_features, keep_pre)[0]


def _linear_setup(ctx, inputs, output):
    (hidden_states, final_layer, group_bounds, drop_cls, sti_pool, weight, bias, activation,
     path, keep_features, keep_pre) = inputs
    _, a, z = output
    used = _used_layers(final_layer, group_bounds)
    _save_linear(ctx, [hidden_states[i] for i in used], used,
                 (final_layer, list(group_bounds), drop_cls, sti_pool),
                 [h.shape for h in hidden_states], weight, bias, activation, a, z,
                 keep_features, keep_pre)


def _save_linear(ctx, read, used, spec_args_, shapes, weight, bias, activation, a, z,
                 keep_features, keep_pre):
    # what the backward keeps (docs/DESIGN.md §6.1); ``read`` are the hidden states at the
    # indices ``used``. Shared by the custom op and the eager LinearFunction.
    ctx.set_materialize_grads(False)  # unused outputs (A, Z) get no zero-filled gradients
    hs = [h.requires_grad for h in read]
    hs_grad, hs_all = any(hs), all(hs)
    w_grad, b_grad = weight.requires_grad, bias is not None and bias.requires_grad
    gelu = activation == "gelu"
    if gelu and (hs_grad or w_grad or b_grad) and not keep_pre:
        raise RuntimeError("dc_kernels::linear: a gradient is needed but the pre-activation "
                           "was not kept (call it through dc_kernels.autograd.linear_op)")
    if w_grad and not hs_all and not keep_features:
        raise RuntimeError("dc_kernels::linear: the weight needs a gradient but the features "
                           "were not kept (call it through dc_kernels.autograd.linear_op)")
    ctx.spec_args = spec_args_
    ctx.activation = activation
    ctx.shapes = shapes
    ctx.used = used
    # saved for dW: the read hidden states (A is recomputed from them) when all of them require
    # grad, else A itself; W for dA; Z for GELU'
    ctx.n_hs = len(used) if hs_all and w_grad else 0
    ctx.has_a = w_grad and not hs_all
    ctx.has_w = hs_grad
    ctx.has_z = gelu and (hs_grad or w_grad or b_grad)
    saved = list(read) if ctx.n_hs else []
    saved += [a] if ctx.has_a else []
    saved += [weight] if ctx.has_w else []
    saved += [z] if ctx.has_z else []
    ctx.save_for_backward(*saved)


def _linear_backward(ctx, grad_y, grad_a_out, grad_z_out):
    needs = ctx.needs_input_grad
    grads_hs, grad_w, grad_b = _linear_grads(ctx, list(needs[0]), needs[5], needs[6], grad_y,
                                             grad_a_out, grad_z_out)
    return grads_hs, None, None, None, None, grad_w, grad_b, None, None, None, None


def _linear_grads(ctx, hs_needs, w_need, b_need, grad_y, grad_a_out, grad_z_out):
    """Gradients ``(hidden states list, weight, bias)``; eager's GEMMs, nothing recomputed but A.

    ``dZ = dY * gelu'(Z)`` (+ the gradient of the Z output), ``dW = dZ^T A``, ``db = sum dZ``,
    ``dA = dZ W`` (+ the gradient of the A output) scattered to the hidden states. Built from
    differentiable ops, with the kept A's and Z's own gradients honoured (they are outputs of
    the forward, so a second-order term through them comes back here), so double backward
    works as with the torch backend's autograd. ``hs_needs`` has one flag per hidden state.
    """
    saved = list(ctx.saved_tensors)
    hs = saved[:ctx.n_hs]
    k = ctx.n_hs
    a = saved[k] if ctx.has_a else None
    k += ctx.has_a
    weight = saved[k] if ctx.has_w else None
    k += ctx.has_w
    z = saved[k] if ctx.has_z else None
    n = len(ctx.shapes)
    grads_hs: List[Optional[torch.Tensor]] = [None] * n

    dz = None
    if grad_y is not None:
        dz = torch.ops.aten.gelu_backward(grad_y, z) if ctx.activation == "gelu" else grad_y
    if grad_z_out is not None and ctx.has_z:
        dz = grad_z_out if dz is None else dz + grad_z_out
    grad_w = grad_b = grad_a = None
    if dz is not None:
        dz2 = dz.reshape(-1, dz.shape[-1])
        if w_need:
            if a is None:  # recomputed from the kept hidden states: [B, T', K]
                a = features_op(hs, *_compact_spec_args(*ctx.spec_args, ctx.used))
            grad_w = dz2.t() @ a.reshape(-1, a.shape[-1])
        if b_need:
            grad_b = dz2.sum(0)
        if any(hs_needs):
            grad_a = (dz2 @ weight).reshape(*dz.shape[:-1], weight.shape[1])
    if grad_a_out is not None and ctx.has_a and any(hs_needs):
        grad_a = grad_a_out if grad_a is None else grad_a + grad_a_out
    if grad_a is not None:
        grads_hs = _scatter(grad_a, _spec(*ctx.spec_args), ctx.shapes, hs_needs)
    return grads_hs, grad_w, grad_b


linear_custom_op.register_autograd(_linear_backward, setup_context=_linear_setup)


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


class LinearFunction(torch.autograd.Function):
    """Eager autograd of a prepared first-layer launch (``dc_kernels.plan``): the custom op
    ``dc_kernels::linear``'s formulas and saved tensors (:func:`_save_linear`,
    :func:`_linear_grads`) without its dispatch. ``torch.compile`` traces the custom op instead.

    ``apply(launch, spec, n, read, activation, keep_features, keep_pre, weight, bias, *layers)``:
    ``layers`` are the hidden states at the indices ``read`` (ascending) of an ``n``-tuple;
    returns ``(Y, A, Z)`` as the custom op does (A and Z empty unless kept): use ``[0]``.
    """

    @staticmethod
    def forward(ctx, launch, spec, n, read, activation, keep_features, keep_pre, weight, bias,
                *layers):
        hs = [None] * n
        for i, t in zip(read, layers):
            hs[i] = t
        y, a, z = launch(hs, weight, bias, keep_features, keep_pre)
        a = a if a is not None else y.new_empty(0)
        z = z if z is not None else y.new_empty(0)
        shapes = [layers[0].shape] * n  # unread layers: any shape (they get no gradient)
        for i, t in zip(read, layers):
            shapes[i] = t.shape
        final_layer, bounds, drop_cls, pool = spec_args(spec)
        _save_linear(ctx, layers, list(read), (final_layer, bounds, drop_cls, pool), shapes,
                     weight, bias, activation or "none", a, z, keep_features, keep_pre)
        ctx.read = read
        return y, a, z

    @staticmethod
    def backward(ctx, grad_y, grad_a_out, grad_z_out):
        needs = ctx.needs_input_grad
        hs_needs = [False] * len(ctx.shapes)
        for i, need in zip(ctx.read, needs[9:]):
            hs_needs[i] = need
        grads_hs, grad_w, grad_b = _linear_grads(ctx, hs_needs, needs[7], needs[8], grad_y,
                                                 grad_a_out, grad_z_out)
        return (None,) * 7 + (grad_w, grad_b) + tuple(grads_hs[i] for i in ctx.read)
