"""The first projector layer on Triton: ``act(features @ W^T + b)``, fused or two-pass.

``_linear_kernel`` is a GEMM whose K loop builds ``A`` on the fly: K-slab 0 is the base tile,
K-slab ``g`` sums group ``g``'s layer tiles and scales by ``1/len``, rounded to the input dtype
(so fused and two-pass agree bit for bit in A). Bias and exact-erf GELU in the epilogue, grouped
program order. With no groups and a single 2-D "layer" it is a plain GEMM: the second pass of
the two-pass path.

:func:`linear_triton` dispatches between the paths (rule in :mod:`.path`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..spec import ConnectorSpec
from . import common
from .common import _group_sum, _round, _tile_offsets
from .features import features_triton
from .path import choose_linear_path

__all__ = ["linear_triton", "CONFIG_LISTS", "LINEAR_CONFIG_INTERPRET"]


@triton.jit
def _linear_kernel(
    layers, stride_b, stride_t, stride_c,  # tuples, one entry per layer argument
    w, stride_wn, stride_wk,  # weight [N, (G+1)*C] as nn.Linear stores it
    bias, out, stride_om,  # out is [M, N] with unit column stride
    M, N, C, T_KEEP,
    M_BUCKET,  # autotune key only
    TOK0: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr,
    UNIFORM: tl.constexpr, OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,  # 0 none, 1 exact-erf GELU
    DOT_FP32: tl.constexpr,  # interpreter: fp32 dot operands (no bf16 math on CPU)
    INPUT_PRECISION: tl.constexpr,  # "ieee" unless the caller allows tf32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped program order: GROUP_M row tiles share the W columns they sweep, and programs
    # that share a row tile run together, so the layer tiles they re-read come from L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    b = o_m // T_KEEP
    t = o_m % T_KEEP + TOK0
    dtype = layers[0].dtype.element_ty
    if OFF64:
        o_wn = o_n.to(tl.int64) * stride_wn
    else:
        o_wn = o_n * stride_wn

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(len(SIZES) + 1):
        for k0 in range(0, C, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < C
            mask_a = m_m[:, None] & m_k[None, :]
            o_a = _tile_offsets(stride_b[0], stride_t[0], stride_c[0], b, t, o_k, OFF64)
            if s == 0:
                b_a = tl.load(layers[0] + o_a, mask=mask_a, other=0.0)
            else:
                b_sum = _group_sum(layers, stride_b, stride_t, stride_c, STARTS[s - 1],
                                   SIZES[s - 1], o_a, b, t, o_k, mask_a, UNIFORM, OFF64,
                                   BLOCK_M, BLOCK_K)
                # the features' single rounding, as the features kernel does it
                b_a = _round(b_sum / SIZES[s - 1], dtype, EMULATE_RNE)
            o_wk = s * C + o_k
            if OFF64:
                o_wk = o_wk.to(tl.int64)
            b_w = tl.load(w + o_wn[None, :] + (o_wk * stride_wk)[:, None],
                          mask=m_k[:, None] & m_n[None, :], other=0.0)
            if DOT_FP32:
                b_acc = tl.dot(b_a.to(tl.float32), b_w.to(tl.float32), b_acc,
                               input_precision="ieee")
            else:
                b_acc = tl.dot(b_a, b_w, b_acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        b_acc += tl.load(bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        b_acc = 0.5 * b_acc * (1.0 + tl.erf(b_acc * 0.7071067811865476))
    if OFF64:
        p_out = out + o_m.to(tl.int64)[:, None] * stride_om + o_n[None, :]
    else:
        p_out = out + o_m[:, None] * stride_om + o_n[None, :]
    tl.store(p_out, _round(b_acc, out.dtype.element_ty, EMULATE_RNE),
             mask=m_m[:, None] & m_n[None, :])


# --------------------------------------------------------------------------- configs
def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Every config below compiles for sm_80 and sm_90 without register spills and within shared
# memory, with triton 3.6 (the GPU machines' stack) and 3.9 (CI's): tests/test_aot_compile.py
# checks each one with the installed triton. Larger tiles (128x256, and 128x128 for the fused
# kernel) spill with one version or the other. The fused kernel sums 12-13 layer tiles per
# K step, so it takes a narrower K block than a plain GEMM, and for fp32 a single stage (the
# pipeliner would otherwise multi-buffer every layer's tile in shared memory).
#: Fused kernel (features built in the K loop), 16-bit operands.
FUSED_CONFIGS_16 = [
    _cfg(64, 128, 32, 8, 3),
    _cfg(128, 64, 32, 8, 3),
    _cfg(64, 64, 32, 8, 3),
]
#: Fused kernel, fp32 operands.
FUSED_CONFIGS_32 = [
    _cfg(64, 64, 32, 8, 1),
    _cfg(64, 128, 16, 8, 1),
    _cfg(64, 64, 16, 4, 1),
]
#: Plain GEMM (second pass of the two-pass path), 16-bit operands.
GEMM_CONFIGS_16 = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(64, 128, 64, 8, 3),
    _cfg(128, 64, 64, 8, 3),
    _cfg(64, 64, 64, 4, 3),
]
#: Plain GEMM, fp32 operands (twice the bytes per element: a narrower K block).
GEMM_CONFIGS_32 = [
    _cfg(64, 128, 16, 8, 3),
    _cfg(128, 64, 16, 8, 3),
    _cfg(64, 64, 16, 4, 3),
]
#: The interpreter cannot benchmark configs: one small config, ragged edges exercised.
LINEAR_CONFIG_INTERPRET = _cfg(32, 32, 16, 4, 1, group_m=2)

_LINEAR_KEY = ["M_BUCKET", "N", "C"]


def _autotuned(configs):
    if not common.autotune_enabled():
        configs = configs[:1]
    return triton.autotune(configs=configs, key=_LINEAR_KEY)(_linear_kernel)


#: (kernel, operand bits) -> autotune configs; "gemm" is the linear kernel without groups.
CONFIG_LISTS = {
    ("fused", 16): FUSED_CONFIGS_16,
    ("fused", 32): FUSED_CONFIGS_32,
    ("gemm", 16): GEMM_CONFIGS_16,
    ("gemm", 32): GEMM_CONFIGS_32,
}
_AUTOTUNED = {key: _autotuned(configs) for key, configs in CONFIG_LISTS.items()}


# --------------------------------------------------------------------------- launchers
def _launch_linear(entries, starts, sizes, M, C, t_keep, tok0, weight, bias, activation, out,
                   flags):
    N = weight.shape[0]
    sb, st, sc = common.strides(entries)
    dtype = entries[0].dtype
    allow_tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    args = (tuple(entries), sb, st, sc, weight, weight.stride(0), weight.stride(1),
            bias if bias is not None else weight, out, out.stride(0), M, N, C, t_keep,
            triton.next_power_of_2(M))
    meta = dict(TOK0=tok0, STARTS=starts, SIZES=sizes, **flags, HAS_BIAS=bias is not None,
                ACTIVATION=common.ACTIVATIONS[activation], DOT_FP32=common.interpreting(),
                INPUT_PRECISION="tf32" if allow_tf32 else "ieee")
    if common.interpreting():
        cfg = LINEAR_CONFIG_INTERPRET
        grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
        _linear_kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages)
        return

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)

    bits = 32 if dtype == torch.float32 else 16
    _AUTOTUNED[("gemm" if not sizes else "fused", bits)][grid](*args, **meta)


def linear_triton(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                  batch: int, tokens: int, channels: int, weight: torch.Tensor,
                  bias, activation, path: str = "auto") -> torch.Tensor:
    """``act(features @ weight.T + bias)`` on the Triton backend (inputs already validated).

    ``path``: ``"fused"`` (features built in the GEMM's K loop), ``"two-pass"`` (features
    kernel, then the same GEMM over them) or ``"auto"`` (:func:`choose_linear_path`). A layout
    the fused kernel is not built for (see :func:`choose_linear_path`) runs two-pass even when
    ``"fused"`` is asked for; the result is the same.
    """
    base = hidden_states[spec.final_layer]
    common.check_launchable(base.device, base.dtype)
    t_keep = spec.tokens_kept(tokens)
    rows = spec.out_tokens(tokens)
    M = batch * rows
    N = weight.shape[0]
    out = common.empty((batch, rows, N), base.dtype, base.device)
    if M == 0 or N == 0:
        return out
    out2d = out.view(M, N)
    if path not in ("auto", "fused", "two-pass"):
        raise ValueError(f"path must be 'auto', 'fused' or 'two-pass', got {path!r}")
    entries, starts, sizes = common.layer_entries(hidden_states, spec)
    flags = common.layout_flags(entries, weight, out2d)
    fusable = choose_linear_path(M, channels, N, len(spec.used_layers), spec.num_groups + 1,
                                 base.element_size(), flags["UNIFORM"], flags["OFF64"],
                                 sti=spec.connector_type == "sti")
    if path == "auto" or fusable == "two-pass":
        path = fusable
    if path == "fused":
        _launch_linear(entries, starts, sizes, M, channels, t_keep, spec.token_offset,
                       weight, bias, activation, out2d, flags)
    else:
        feats = features_triton(hidden_states, spec, batch, tokens, channels)
        a = feats.view(1, M, feats.shape[-1])
        _launch_linear([a], (), (), M, a.shape[-1], M, 0, weight, bias, activation, out2d,
                       common.layout_flags([a], weight, out2d))
    return out
