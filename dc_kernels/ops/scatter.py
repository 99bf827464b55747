"""Triton kernel for the hidden-state gradients of the channel features (DCI/SCI backward).

``A = [base | mean(group 0) | mean(group 1) | ...]`` on channels, so the gradient of a layer is
the sum, over the slabs that read it, of that slab's gradient scaled by ``1/len(group)`` (1 for
the base slab), and zero at dropped CLS positions. The torch formulation zero-fills every layer's
gradient and adds slices into it (three passes over the layers); this kernel reads the slab
gradients once per tile and writes each layer's gradient once, accumulating in fp32.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..spec import ConnectorSpec
from . import common
from .common import _round, _tile_offsets
from .features import FEATURES_CONFIG, FEATURES_CONFIG_INTERPRET

__all__ = ["scatter_grad_triton", "SCATTER_CONFIG"]

#: Per program: BLOCK_M token rows x BLOCK_C channels of every layer's gradient.
SCATTER_CONFIG = FEATURES_CONFIG


@triton.jit
def _scatter_grad_kernel(
    grad_a, stride_ab, stride_at,  # [B, T', (G+1)C], unit channel stride
    grads, stride_gb, stride_gt,  # tuple of [B, T, C] outputs sharing one contiguous layout
    M, T, T_KEEP, C,  # M = B * T rows, CLS included
    TOK0: tl.constexpr, SLABS: tl.constexpr, SLAB_SCALE: tl.constexpr,
    OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # SLABS[i]: the slabs output i reads; SLAB_SCALE[s]: 1 / len(group) of slab s
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    o_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_out = (o_r < M)[:, None] & (o_c < C)[None, :]
    b = o_r // T
    t = o_r % T
    m_in = m_out & (t >= TOK0)[:, None]  # CLS rows read nothing: their gradient is 0
    o_in = _tile_offsets(stride_ab, stride_at, 1, b, t - TOK0, o_c, OFF64)
    o_out = _tile_offsets(stride_gb, stride_gt, 1, b, t, o_c, OFF64)
    for i in tl.static_range(len(SLABS)):
        b_g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for k in tl.static_range(len(SLABS[i])):
            b_s = tl.load(grad_a + o_in + SLABS[i][k] * C, mask=m_in, other=0.0)
            b_g += b_s.to(tl.float32) * SLAB_SCALE[SLABS[i][k]]
        tl.store(grads[i] + o_out, _round(b_g, grads[i].dtype.element_ty, EMULATE_RNE),
                 mask=m_out)


def layer_slabs(spec: ConnectorSpec, num_hidden_states: int):
    """For each hidden state, the channel slabs that read it (empty for unused layers)."""
    slabs = [[] for _ in range(num_hidden_states)]
    slabs[spec.final_layer].append(0)
    for s, (start, stop) in enumerate(spec.groups, start=1):
        for i in range(start, stop):
            slabs[i].append(s)
    return slabs


def scatter_grad_triton(grad_a: torch.Tensor, spec: ConnectorSpec, shapes: Sequence[torch.Size],
                        needs_grad: Sequence[bool]) -> List[Optional[torch.Tensor]]:
    """Hidden-state gradients from ``grad_a = dL/dA`` (``[B, T', (G+1)C]``), DCI/SCI specs.

    Same contract as ``dc_kernels.autograd.scatter_to_layers``: a ``[B, T, C]`` gradient for
    every read layer whose ``needs_grad`` is set, None elsewhere.
    """
    if spec.connector_type == "sti":
        raise ValueError("scatter_grad_triton handles channel (DCI/SCI) specs only")
    common.check_launchable(grad_a.device, grad_a.dtype)
    B, T, C = shapes[spec.final_layer]
    slabs = layer_slabs(spec, len(shapes))
    wanted = [i for i in range(len(shapes)) if slabs[i] and needs_grad[i]]
    grads: List[Optional[torch.Tensor]] = [None] * len(shapes)
    if not wanted:
        return grads
    outs = [common.empty((B, T, C), grad_a.dtype, grad_a.device) for _ in wanted]
    for i, o in zip(wanted, outs):
        grads[i] = o
    M = B * T
    if M == 0 or C == 0:
        return grads
    if grad_a.stride(-1) != 1:
        grad_a = grad_a.contiguous()
    scale = (1.0,) + tuple(1.0 / (stop - start) for start, stop in spec.groups)
    off64 = max(common.span(grad_a), common.span(outs[0])) >= 2 ** 31 - 1
    cfg = FEATURES_CONFIG_INTERPRET if common.interpreting() else SCATTER_CONFIG
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(C, cfg["BLOCK_C"]))
    _scatter_grad_kernel[grid](
        grad_a, grad_a.stride(0), grad_a.stride(1), tuple(outs), outs[0].stride(0),
        outs[0].stride(1), M, T, spec.tokens_kept(T), C, TOK0=spec.token_offset,
        SLABS=tuple(tuple(slabs[i]) for i in wanted), SLAB_SCALE=scale,
        OFF64=off64 or common.FORCE_OFF64, EMULATE_RNE=common.interpreting(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return grads
