"""Features kernels: the Dense Connector features written once, in one pass over the layers.

* ``_features_kernel`` (DCI/SCI): each program owns ``BLOCK_M`` rows x ``BLOCK_C`` channels,
  loads the base tile and every group member once and writes its part of every slab of
  ``A = [B, T', (G+1)C]``.
* ``_sti_features_kernel`` (STI, tokens instead of channels): copies the base tokens and writes
  each group's pooled tokens (mean over ``pool`` consecutive tokens of every member layer) in
  the original's row order.

:func:`features_triton` is the launcher (inputs validated by the public functions).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..spec import ConnectorSpec
from . import common
from .common import _group_sum, _round, _tile_offsets

__all__ = ["features_triton", "FEATURES_CONFIG", "FEATURES_CONFIG_INTERPRET",
           "STI_FEATURES_CONFIG"]

@triton.jit
def _features_kernel(
    layers, stride_b, stride_t, stride_c,  # tuples, one entry per layer argument
    out, stride_om,  # out is [M, (G+1)*C] with unit channel stride
    M, C, T_KEEP,
    TOK0: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr,
    UNIFORM: tl.constexpr, OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_m = o_m < M
    m_c = o_c < C
    mask = m_m[:, None] & m_c[None, :]
    b = o_m // T_KEEP
    t = o_m % T_KEEP + TOK0
    if OFF64:
        p_out = out + o_m.to(tl.int64)[:, None] * stride_om + o_c[None, :]
    else:
        p_out = out + o_m[:, None] * stride_om + o_c[None, :]

    # slab 0: the base features, copied as they are
    o_x = _tile_offsets(stride_b[0], stride_t[0], stride_c[0], b, t, o_c, OFF64)
    b_x = tl.load(layers[0] + o_x, mask=mask)
    tl.store(p_out, b_x.to(out.dtype.element_ty), mask=mask)

    # slab g + 1: the mean of group g, fp32 accumulation, one rounding
    for g in tl.static_range(len(SIZES)):
        b_sum = _group_sum(layers, stride_b, stride_t, stride_c, STARTS[g], SIZES[g], o_x, b, t,
                           o_c, mask, UNIFORM, OFF64, BLOCK_M, BLOCK_C)
        b_mean = _round(b_sum / SIZES[g], out.dtype.element_ty, EMULATE_RNE)
        tl.store(p_out + (g + 1) * C, b_mean, mask=mask)


@triton.jit
def _sti_features_kernel(
    layers, stride_b, stride_t, stride_c,  # tuples, one entry per layer argument
    out, stride_ob, stride_ot,  # out is [B, T' + G*TP, C] with unit channel stride
    B, C, T_KEEP, TP,  # TP: pooled tokens per group and image
    POOL: tl.constexpr, TOK0: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr,
    UNIFORM: tl.constexpr, OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # STI: axis 2 picks the segment. Segment 0 copies the base tokens (B*T' rows); segment
    # g + 1 writes group g's pooled tokens (B*TP rows): each the mean over POOL consecutive
    # tokens of every member layer, fp32 accumulation, one rounding. Rows land in the
    # original's order: per image, all base tokens, then group 0's pooled tokens, then group 1's.
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    seg = tl.program_id(2)
    o_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    if seg == 0:
        mask = (o_r < B * T_KEEP)[:, None] & m_c[None, :]
        b = o_r // T_KEEP
        t = o_r % T_KEEP
        o_x = _tile_offsets(stride_b[0], stride_t[0], stride_c[0], b, t + TOK0, o_c, OFF64)
        b_x = tl.load(layers[0] + o_x, mask=mask)
        o_out = _tile_offsets(stride_ob, stride_ot, 1, b, t, o_c, OFF64)
        tl.store(out + o_out, b_x.to(out.dtype.element_ty), mask=mask)
    else:
        mask = (o_r < B * TP)[:, None] & m_c[None, :]
        b = o_r // TP
        j = o_r % TP
        for g in tl.static_range(len(SIZES)):
            if seg == g + 1:
                b_sum = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
                for q in range(POOL):
                    t = TOK0 + j * POOL + q
                    o_x = _tile_offsets(stride_b[0], stride_t[0], stride_c[0], b, t, o_c, OFF64)
                    b_sum += _group_sum(layers, stride_b, stride_t, stride_c, STARTS[g],
                                        SIZES[g], o_x, b, t, o_c, mask, UNIFORM, OFF64,
                                        BLOCK_M, BLOCK_C)
                b_mean = _round(b_sum / (SIZES[g] * POOL), out.dtype.element_ty, EMULATE_RNE)
                o_out = _tile_offsets(stride_ob, stride_ot, 1, b, T_KEEP + g * TP + j, o_c,
                                      OFF64)
                tl.store(out + o_out, b_mean, mask=mask)


# --------------------------------------------------------------------------- configs
#: Features kernel: small tiles keep 13 in-flight layer tiles in registers (no spills, any
#: strides); each thread still loads 16 contiguous bytes of a bf16 layer.
FEATURES_CONFIG = {"BLOCK_M": 16, "BLOCK_C": 64, "num_warps": 4}
FEATURES_CONFIG_INTERPRET = {"BLOCK_M": 16, "BLOCK_C": 16, "num_warps": 4}
#: STI features kernel: base copy and every group's pooling share one program body, so the
#: register budget is set by the widest group; 8 warps over 16x64 keep 13-layer groups with
#: arbitrary strides and int64 offsets spill-free.
STI_FEATURES_CONFIG = {"BLOCK_M": 16, "BLOCK_C": 64, "num_warps": 8}


# --------------------------------------------------------------------------- launchers
def _sti_features(hidden_states, spec, batch, tokens, channels):
    base = hidden_states[spec.final_layer]
    t_keep = spec.tokens_kept(tokens)
    tp = spec.pooled_tokens(tokens)
    out = common.empty((batch, spec.out_tokens(tokens), channels), base.dtype, base.device)
    if out.numel() == 0:
        return out
    entries, starts, sizes = common.layer_entries(hidden_states, spec)
    sb, st, sc = common.strides(entries)
    cfg = FEATURES_CONFIG_INTERPRET if common.interpreting() else STI_FEATURES_CONFIG
    rows = max(batch * t_keep, batch * tp)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(channels, cfg["BLOCK_C"]),
            1 + (spec.num_groups if tp > 0 else 0))
    _sti_features_kernel[grid](
        tuple(entries), sb, st, sc, out, out.stride(0), out.stride(1), batch, channels, t_keep,
        tp, POOL=spec.pool_size, TOK0=spec.token_offset, STARTS=starts, SIZES=sizes,
        **common.layout_flags(entries, out), BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
        num_warps=cfg["num_warps"])
    return out


def features_triton(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                    batch: int, tokens: int, channels: int) -> torch.Tensor:
    """Features with the one-pass Triton kernels (inputs already validated).

    DCI/SCI: ``_features_kernel`` writes ``[B, T', (G+1)C]``; STI: ``_sti_features_kernel``
    writes ``[B, T' + G*(T' // pool), C]``.
    """
    base = hidden_states[spec.final_layer]
    common.check_launchable(base.device, base.dtype)
    if spec.connector_type == "sti":
        return _sti_features(hidden_states, spec, batch, tokens, channels)
    t_keep = spec.tokens_kept(tokens)
    width = spec.out_channels(channels)
    out = common.empty((batch, t_keep, width), base.dtype, base.device)
    M = batch * t_keep
    if M == 0 or channels == 0:
        return out
    entries, starts, sizes = common.layer_entries(hidden_states, spec)
    sb, st, sc = common.strides(entries)
    cfg = FEATURES_CONFIG_INTERPRET if common.interpreting() else FEATURES_CONFIG
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(channels, cfg["BLOCK_C"]))
    _features_kernel[grid](
        tuple(entries), sb, st, sc, out, width, M, channels, t_keep,
        TOK0=spec.token_offset, STARTS=starts, SIZES=sizes,
        **common.layout_flags(entries, out),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return out
