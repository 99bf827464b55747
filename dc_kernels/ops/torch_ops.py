"""The pure-PyTorch path: no ``torch.stack``, no copies of whole layers, fp32 accumulation.

Used on CPU, where Triton is unavailable, and as the fallback of ``backend="auto"``. Every result
is written straight into the preallocated output; a group is summed into one fp32 buffer
(``[B, T', C]``, reused across groups) that is rounded once into the output dtype. fp32 and fp64
inputs accumulate directly in their output slab. The ops are built from differentiable torch
ops, so autograd works through them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..spec import ConnectorSpec

__all__ = ["features_torch", "accumulation_dtype", "window_sums", "link_unread_groups"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything narrower accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: CPU: the group sums run over token chunks whose fp32 accumulator is about this size, so the
#: accumulator stays in cache across a group's layers (one pass over memory per layer, not a
#: read-modify-write of a whole [B, T', C] buffer per layer).
CPU_CHUNK_BYTES = 1 << 20


def _token_chunks(tokens: int, batch: int, channels: int, device: torch.device):
    if device.type != "cpu":
        return [(0, tokens)]  # one launch per op on accelerators
    step = max(1, CPU_CHUNK_BYTES // max(1, 4 * batch * channels))
    return [(t, min(tokens, t + step)) for t in range(0, tokens, step)]


def _channel_features(hs, spec, tok0, out):
    B, kept, _ = out.shape
    C = hs[spec.final_layer].shape[2]
    acc_dtype = accumulation_dtype(out.dtype)
    out[..., :C].copy_(hs[spec.final_layer][:, tok0:])
    if kept == 0:
        link_unread_groups(out, hs, spec)
        return
    buf = None
    for t0, t1 in _token_chunks(kept, B, C, out.device):
        rows = slice(tok0 + t0, tok0 + t1)
        for g, (start, stop) in enumerate(spec.groups):
            dst = out[:, t0:t1, (g + 1) * C:(g + 2) * C]
            if stop - start == 1:
                dst.copy_(hs[start][:, rows])
                continue
            if out.dtype == acc_dtype:
                acc = dst
            else:
                if buf is None:
                    buf = torch.empty(dst.shape, dtype=acc_dtype, device=out.device)
                acc = buf[:, :t1 - t0]
            acc.copy_(hs[start][:, rows])
            for i in range(start + 1, stop):
                acc.add_(hs[i][:, rows])  # promotes to the accumulator dtype
            acc.div_(stop - start)
            if acc is not dst:
                dst.copy_(acc)  # the single rounding to the output dtype


def window_sums(x: torch.Tensor, pool: int, acc_dtype: torch.dtype) -> torch.Tensor:
    """``[B, T // pool, C]`` sums of ``pool`` consecutive tokens of ``x = [B, T, C]``.

    The remainder is dropped. Windows are summed in ``acc_dtype`` in cache-sized token chunks:
    each chunk is converted once (a narrow-dtype reduction with a wider ``dtype=`` is several
    times slower on CPU) and the temporary stays about ``CPU_CHUNK_BYTES``.
    """
    B, T, C = x.shape
    tp = T // pool
    out = torch.empty((B, tp, C), dtype=acc_dtype, device=x.device)
    for j0, j1 in _token_chunks(tp, B, C * pool, x.device):
        win = x[:, j0 * pool:j1 * pool].unflatten(1, (j1 - j0, pool))
        out[:, j0:j1].copy_(win.to(acc_dtype).sum(2))  # copy_, not out=: keeps autograd
    return out


def _token_features(hs, spec, tok0, out):
    base = hs[spec.final_layer][:, tok0:]
    kept = base.shape[1]
    p = spec.pool_size
    tp = kept // p
    acc_dtype = accumulation_dtype(out.dtype)
    out[:, :kept].copy_(base)
    if tp == 0:
        link_unread_groups(out, hs, spec)
        return
    for g, (start, stop) in enumerate(spec.groups):
        acc = None
        for i in range(start, stop):
            s = window_sums(hs[i][:, tok0:], p, acc_dtype)
            acc = s if acc is None else acc.add_(s)
        acc.div_((stop - start) * p)
        out[:, kept + g * tp:kept + (g + 1) * tp].copy_(acc)


def features_torch(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                   batch: int, tokens: int, channels: int) -> torch.Tensor:
    """Dense Connector features on the torch backend (inputs already validated).

    Returns ``[B, spec.out_tokens(T), spec.out_channels(C)]`` in the input dtype.
    """
    ref = hidden_states[spec.final_layer]
    out = torch.empty(batch, spec.out_tokens(tokens), spec.out_channels(channels),
                      dtype=ref.dtype, device=ref.device)
    tok0 = spec.token_offset
    if spec.connector_type == "sti":
        _token_features(hidden_states, spec, tok0, out)
    else:
        _channel_features(hidden_states, spec, tok0, out)
    return out


def link_unread_groups(out: torch.Tensor, hs: Sequence[torch.Tensor], spec: ConnectorSpec
                       ) -> None:
    """Record that ``out`` depends on every group member, when no element of theirs is read.

    With no token kept (only CLS), or STI with fewer kept tokens than the pool, the groups
    contribute no element and the ops above never touch their layers; the original's
    ``torch.cat`` (and the Triton backend's custom op) still return an output that requires
    grad, and give those layers zero gradients. An empty copy per layer records the same
    dependency (nothing is copied; called only in that degenerate case).
    """
    if not torch.is_grad_enabled():
        return
    for start, stop in spec.groups:
        for i in range(start, stop):
            if hs[i].requires_grad:
                out[:0, :0, :0].copy_(hs[i][:0, :0, :0])
