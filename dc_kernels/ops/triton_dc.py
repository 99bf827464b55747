"""Triton kernels of the forward pass: one-pass features kernels and the fused first layer.

The kernels read the hidden states **in place**: the layers are a tuple-of-tensors kernel
argument (entry 0 the base layer, then every group's members in order; a layer in two groups is
simply passed twice), each with its own strides, and CLS is dropped by a token offset. Nothing is
stacked or copied. Sums are accumulated in fp32 and rounded once.

* ``_features_kernel``: each program owns ``BLOCK_M`` rows x ``BLOCK_C`` channels, loads the base
  tile and every group member once and writes its part of every slab of ``A = [B, T', (G+1)C]``.
* ``_sti_features_kernel``: STI, tokens instead of channels: copies the base tokens and writes
  each group's pooled tokens (mean over ``pool`` consecutive tokens of every member layer) in
  the original's row order.
* ``_linear_kernel``: ``act(A @ W^T + b)`` where the K loop builds ``A`` on the fly: K-slab 0 is the
  base tile, K-slab ``g`` sums group ``g``'s layer tiles and scales by ``1/len``, rounded to the
  input dtype (so fused and two-pass agree bit for bit in A). Bias and exact-erf GELU in the
  epilogue, grouped program order. With no groups and a single 2-D "layer" it is a plain GEMM:
  the second pass of the two-pass path.

Launchers check their inputs (the public functions validate first); :func:`choose_linear_path`
holds the fused-vs-two-pass rule. The backward's gradient scatter lives in ``triton_scatter``,
the autograd wiring in ``dc_kernels/autograd.py``.
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..spec import ConnectorSpec

__all__ = [
    "TRITON_DTYPES",
    "interpreting",
    "features_triton",
    "linear_triton",
    "choose_linear_path",
    "estimate_linear_times",
    "layer_entries",
    "check_launchable",
]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = {None: 0, "gelu": 1}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------- kernels
@triton.jit
def _tile_offsets(stride_b, stride_t, stride_c, b, t, o_c, OFF64: tl.constexpr):
    # element offsets of a [rows, channels] tile of one [B, T, C] layer; int64 when some tensor
    # spans 2^31 elements or more
    if OFF64:
        o_row = b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t
    else:
        o_row = b * stride_b + t * stride_t
    return o_row[:, None] + (o_c * stride_c)[None, :]


@triton.jit
def _round(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    # fp32 -> dtype, round to nearest even. The CPU interpreter truncates fp32 -> bf16; there
    # (EMULATE_RNE) the rounding is done on the bits first, so that the cast is exact.
    if EMULATE_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _group_sum(layers, stride_b, stride_t, stride_c, START: tl.constexpr, SIZE: tl.constexpr,
               o_x, b, t, o_c, mask, UNIFORM: tl.constexpr, OFF64: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # fp32 sum of layers[START:START + SIZE] over one tile. UNIFORM: every layer has the strides
    # of the base layer, so the base tile's offsets ``o_x`` serve them all (one offset tile live
    # instead of one per layer: no register spills with 12-13 layers per group)
    b_sum = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(SIZE):
        if UNIFORM:
            o_i = o_x
        else:
            o_i = _tile_offsets(stride_b[START + i], stride_t[START + i], stride_c[START + i],
                                b, t, o_c, OFF64)
        b_sum += tl.load(layers[START + i] + o_i, mask=mask, other=0.0).to(tl.float32)
    return b_sum


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

#: Features kernel: small tiles keep 13 in-flight layer tiles in registers (no spills, any
#: strides); each thread still loads 16 contiguous bytes of a bf16 layer.
FEATURES_CONFIG = {"BLOCK_M": 16, "BLOCK_C": 64, "num_warps": 4}
FEATURES_CONFIG_INTERPRET = {"BLOCK_M": 16, "BLOCK_C": 16, "num_warps": 4}
#: STI features kernel: base copy and every group's pooling share one program body, so the
#: register budget is set by the widest group; 8 warps over 16x64 keep 13-layer groups with
#: arbitrary strides and int64 offsets spill-free.
STI_FEATURES_CONFIG = {"BLOCK_M": 16, "BLOCK_C": 64, "num_warps": 8}

_LINEAR_KEY = ["M_BUCKET", "N", "C"]


#: ``DC_KERNELS_AUTOTUNE=0`` keeps only the first config of each list (read at import): GPU test
#: runs check numerics on many small shapes and specs, where benchmarking every config of every
#: new variant would cost minutes. Every config is still built ahead of time by the AOT tests.
AUTOTUNE_ENV = "DC_KERNELS_AUTOTUNE"


def _autotuned(configs):
    if os.environ.get(AUTOTUNE_ENV, "1").strip() == "0":
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
def layer_entries(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec
                  ) -> Tuple[List[torch.Tensor], Tuple[int, ...], Tuple[int, ...]]:
    """Flatten a spec into the kernels' layer tuple: ``[base, group 0 members, ...]``.

    Returns the tensors (views, never copies), the start of each group in that list and each
    group's size.
    """
    entries = [hidden_states[spec.final_layer]]
    starts, sizes = [], []
    for start, stop in spec.groups:
        starts.append(len(entries))
        sizes.append(stop - start)
        entries.extend(hidden_states[i] for i in range(start, stop))
    return entries, tuple(starts), tuple(sizes)


def _strides(entries):
    return (tuple(e.stride(0) for e in entries), tuple(e.stride(1) for e in entries),
            tuple(e.stride(2) for e in entries))


def _span(t: torch.Tensor) -> int:
    # one past the largest element offset a kernel may form for ``t``
    return 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)


def _layout_flags(entries, *others) -> dict:
    """UNIFORM: every layer entry has the base's strides (the common case: Hugging Face's
    hidden states); OFF64: some tensor spans 2^31 elements or more, so offsets need int64."""
    uniform = all(e.stride() == entries[0].stride() for e in entries)
    off64 = max(_span(t) for t in (*entries, *others)) >= 2 ** 31 - 1
    return {"UNIFORM": uniform, "OFF64": off64 or _FORCE_OFF64, "EMULATE_RNE": interpreting()}


#: Tests set this to run the int64-offset code paths on small tensors.
_FORCE_OFF64 = False


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output of this module is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_cuda_or_interpret(device: torch.device) -> None:
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton backend needs CUDA tensors (got {device}); use backend='torch', or "
            "set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in TRITON_DTYPES:
        raise ValueError(
            f"the Triton backend supports {', '.join(map(str, TRITON_DTYPES))}; got {dtype} "
            "(use backend='torch')")


def check_launchable(device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError unless the Triton kernels can run on this device and dtype."""
    _check_cuda_or_interpret(device)
    _check_dtype(dtype)


def _sti_features(hidden_states, spec, batch, tokens, channels):
    base = hidden_states[spec.final_layer]
    t_keep = spec.tokens_kept(tokens)
    tp = spec.pooled_tokens(tokens)
    out = _empty((batch, spec.out_tokens(tokens), channels), base.dtype, base.device)
    if out.numel() == 0:
        return out
    entries, starts, sizes = layer_entries(hidden_states, spec)
    sb, st, sc = _strides(entries)
    cfg = FEATURES_CONFIG_INTERPRET if interpreting() else STI_FEATURES_CONFIG
    rows = max(batch * t_keep, batch * tp)
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(channels, cfg["BLOCK_C"]),
            1 + (spec.num_groups if tp > 0 else 0))
    _sti_features_kernel[grid](
        tuple(entries), sb, st, sc, out, out.stride(0), out.stride(1), batch, channels, t_keep,
        tp, POOL=spec.pool_size, TOK0=spec.token_offset, STARTS=starts, SIZES=sizes,
        **_layout_flags(entries, out), BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
        num_warps=cfg["num_warps"])
    return out


def features_triton(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                    batch: int, tokens: int, channels: int) -> torch.Tensor:
    """Features with the one-pass Triton kernels (inputs already validated).

    DCI/SCI: ``_features_kernel`` writes ``[B, T', (G+1)C]``; STI: ``_sti_features_kernel``
    writes ``[B, T' + G*(T' // pool), C]``.
    """
    base = hidden_states[spec.final_layer]
    check_launchable(base.device, base.dtype)
    if spec.connector_type == "sti":
        return _sti_features(hidden_states, spec, batch, tokens, channels)
    t_keep = spec.tokens_kept(tokens)
    width = spec.out_channels(channels)
    out = _empty((batch, t_keep, width), base.dtype, base.device)
    M = batch * t_keep
    if M == 0 or channels == 0:
        return out
    entries, starts, sizes = layer_entries(hidden_states, spec)
    sb, st, sc = _strides(entries)
    cfg = FEATURES_CONFIG_INTERPRET if interpreting() else FEATURES_CONFIG
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(channels, cfg["BLOCK_C"]))
    _features_kernel[grid](
        tuple(entries), sb, st, sc, out, width, M, channels, t_keep,
        TOK0=spec.token_offset, STARTS=starts, SIZES=sizes, **_layout_flags(entries, out),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return out


def _launch_linear(entries, starts, sizes, M, C, t_keep, tok0, weight, bias, activation, out,
                   flags):
    N = weight.shape[0]
    sb, st, sc = _strides(entries)
    dtype = entries[0].dtype
    allow_tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    args = (tuple(entries), sb, st, sc, weight, weight.stride(0), weight.stride(1),
            bias if bias is not None else weight, out, out.stride(0), M, N, C, t_keep,
            triton.next_power_of_2(M))
    meta = dict(TOK0=tok0, STARTS=starts, SIZES=sizes, **flags, HAS_BIAS=bias is not None,
                ACTIVATION=ACTIVATIONS[activation], DOT_FP32=interpreting(),
                INPUT_PRECISION="tf32" if allow_tf32 else "ieee")
    if interpreting():
        cfg = LINEAR_CONFIG_INTERPRET
        grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
        _linear_kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages)
        return

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)

    bits = 32 if dtype == torch.float32 else 16
    _AUTOTUNED[("gemm" if not sizes else "fused", bits)][grid](*args, **meta)


#: Ceilings the path rule assumes (H100 SXM; DESIGN.md section 2): DRAM copy bandwidth, L2
#: bandwidth, dense 16-bit tensor-core rate, and the cost of one extra launch. Estimates until
#: GPU measurements recorded under benchmarks/results/ replace them.
PATH_MODEL = {"dram_bytes_per_s": 3.0e12, "l2_bytes_per_s": 7.0e12, "flop_per_s": 8.0e14,
              "launch_s": 4e-6, "fused_block_n": 128}


def estimate_linear_times(M: int, C: int, N: int, num_layers_read: int, num_slabs: int,
                          element_size: int) -> dict:
    """Roofline estimates (seconds) of both paths, from :data:`PATH_MODEL`.

    With L distinct layers read, K = slabs * C and e bytes per element:

    * two-pass: the features kernel moves ``(L*M*C + M*K) e`` through DRAM; the GEMM reads A and
      W and writes the output, ``(M*K + K*N + M*N) e``, or is compute-bound at ``2 M K N``
      FLOPs; plus one extra launch.
    * fused: DRAM sees only the floor ``(L*M*C + K*N + M*N) e``, but every N-tile of the fused
      kernel rebuilds its row tile's features: ``ceil(N / BLOCK_N) * L*M*C*e`` bytes from L2
      (the row tiles that run together share them there, thanks to the grouped order).
    """
    m = PATH_MODEL
    e = element_size
    K = num_slabs * C
    layers = num_layers_read * M * C * e
    flops_t = 2.0 * M * K * N / m["flop_per_s"]
    two_pass = ((layers + M * K * e) / m["dram_bytes_per_s"]
                + max((M * K + K * N + M * N) * e / m["dram_bytes_per_s"], flops_t)
                + m["launch_s"])
    rereads = -(-N // m["fused_block_n"]) * layers
    fused = max((layers + (K * N + M * N) * e) / m["dram_bytes_per_s"],
                rereads / m["l2_bytes_per_s"], flops_t)
    return {"fused": fused, "two-pass": two_pass}


def choose_linear_path(M: int, C: int, N: int, num_layers_read: int, num_slabs: int,
                       element_size: int, uniform: bool = True, off64: bool = False,
                       sti: bool = False) -> str:
    """Pick ``"fused"`` or ``"two-pass"`` for ``act(features @ W^T + b)``: the faster estimate.

    The fused kernel saves the features' DRAM round trip and a launch, but rebuilds each row
    tile's features once per N-tile, so its L2 traffic grows with ``N / BLOCK_N`` (32 for a
    4096-wide LLM): with the model's ceilings it wins only for narrow outputs, and the
    two-pass path takes the usual LLM widths (see :func:`estimate_linear_times`). The constants
    are estimates, to be revisited with the GPU bundle's fused-vs-two-pass timings.

    The fused kernel is also built (and checked spill-free) only for layers that share one
    stride set and tensors under 2^31 elements; other layouts (``uniform=False``: views with
    differing strides; ``off64=True``) always take the two-pass path.

    STI (``sti=True``) is always two-pass: its features are only ``(1 + G / pool)`` times a
    layer (1.25x for the presets), so writing and re-reading them costs little, while building
    a pooled row inside the GEMM would re-read ``pool`` tokens of every group member per N-tile.
    """
    if not uniform or off64 or sti:
        return "two-pass"
    t = estimate_linear_times(M, C, N, num_layers_read, num_slabs, element_size)
    return "fused" if t["fused"] <= t["two-pass"] else "two-pass"


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
    check_launchable(base.device, base.dtype)
    t_keep = spec.tokens_kept(tokens)
    rows = spec.out_tokens(tokens)
    M = batch * rows
    N = weight.shape[0]
    out = _empty((batch, rows, N), base.dtype, base.device)
    if M == 0 or N == 0:
        return out
    out2d = out.view(M, N)
    if path not in ("auto", "fused", "two-pass"):
        raise ValueError(f"path must be 'auto', 'fused' or 'two-pass', got {path!r}")
    entries, starts, sizes = layer_entries(hidden_states, spec)
    flags = _layout_flags(entries, weight, out2d)
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
                       _layout_flags([a], weight, out2d))
    return out
