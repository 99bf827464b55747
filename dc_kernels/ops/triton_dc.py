"""Triton kernels for DCI/SCI: a one-pass features kernel and a fused first projector layer.

Both kernels read the hidden states **in place**: the layers are a tuple-of-tensors kernel
argument (entry 0 the base layer, then every group's members in order; a layer in two groups is
simply passed twice), each with its own strides, and CLS is dropped by a token offset. Nothing is
stacked or copied. Sums are accumulated in fp32 and rounded once.

* ``_features_kernel``: each program owns ``BLOCK_M`` rows x ``BLOCK_C`` channels, loads the base
  tile and every group member once and writes its part of every slab of ``A = [B, T', (G+1)C]``.
* ``_linear_kernel``: ``act(A @ W^T + b)`` where the K loop builds ``A`` on the fly: K-slab 0 is the
  base tile, K-slab ``g`` sums group ``g``'s layer tiles and scales by ``1/len``, rounded to the
  input dtype (so fused and two-pass agree bit for bit in A). Bias and exact-erf GELU in the
  epilogue, grouped program order. With no groups and a single 2-D "layer" it is a plain GEMM:
  the second pass of the two-pass path.

Launchers check their inputs (the public functions validate first); :func:`choose_linear_path`
holds the fused-vs-two-pass rule.
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
    "layer_entries",
]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = {None: 0, "gelu": 1}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------- kernels
@triton.jit
def _row_offsets(b, t, stride_b, stride_t):
    # int64 so that layers over 2^31 elements address correctly
    return b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t


@triton.jit
def _features_kernel(
    layers, stride_b, stride_t, stride_c,  # tuples, one entry per layer argument
    out, stride_om,  # out is [M, (G+1)*C] with unit channel stride
    M, C, T_KEEP,
    TOK0: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr,
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
    p_out = out + o_m.to(tl.int64)[:, None] * stride_om + o_c[None, :]

    # slab 0: the base features, copied as they are
    p_x = layers[0] + _row_offsets(b, t, stride_b[0], stride_t[0])[:, None] \
        + (o_c * stride_c[0])[None, :]
    b_x = tl.load(p_x, mask=mask)
    tl.store(p_out, b_x.to(out.dtype.element_ty), mask=mask)

    # slab g + 1: the mean of group g, fp32 accumulation, one rounding
    for g in tl.static_range(len(SIZES)):
        b_acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(SIZES[g]):
            j: tl.constexpr = STARTS[g] + i
            p_x = layers[j] + _row_offsets(b, t, stride_b[j], stride_t[j])[:, None] \
                + (o_c * stride_c[j])[None, :]
            b_acc += tl.load(p_x, mask=mask).to(tl.float32)
        b_acc = b_acc / SIZES[g]
        tl.store(p_out + (g + 1) * C, b_acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _linear_kernel(
    layers, stride_b, stride_t, stride_c,  # tuples, one entry per layer argument
    w, stride_wn, stride_wk,  # weight [N, (G+1)*C] as nn.Linear stores it
    bias, out, stride_om,  # out is [M, N] with unit column stride
    M, N, C, T_KEEP,
    M_BUCKET,  # autotune key only
    TOK0: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr,
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
    p_w = w + o_n.to(tl.int64)[None, :] * stride_wn

    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(len(SIZES) + 1):
        for k0 in range(0, C, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < C
            mask_a = m_m[:, None] & m_k[None, :]
            if s == 0:
                p_a = layers[0] + _row_offsets(b, t, stride_b[0], stride_t[0])[:, None] \
                    + (o_k * stride_c[0])[None, :]
                b_a = tl.load(p_a, mask=mask_a, other=0.0)
            else:
                b_sum = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
                for i in tl.static_range(SIZES[s - 1]):
                    j: tl.constexpr = STARTS[s - 1] + i
                    p_a = layers[j] + _row_offsets(b, t, stride_b[j], stride_t[j])[:, None] \
                        + (o_k * stride_c[j])[None, :]
                    b_sum += tl.load(p_a, mask=mask_a, other=0.0).to(tl.float32)
                b_a = (b_sum / SIZES[s - 1]).to(dtype)  # the features' single rounding
            b_w = tl.load(p_w + (s * C + o_k).to(tl.int64)[:, None] * stride_wk,
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
    p_out = out + o_m.to(tl.int64)[:, None] * stride_om + o_n[None, :]
    tl.store(p_out, b_acc.to(out.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


# --------------------------------------------------------------------------- configs
def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


#: GPU autotune space of the linear kernel (16-bit operands); keyed on shape.
LINEAR_CONFIGS_16 = [
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 64, 64, 4, 3),
]
#: fp32 operands take twice the shared memory per element: half the K block.
LINEAR_CONFIGS_32 = [
    _cfg(128, 128, 32, 8, 3),
    _cfg(64, 128, 32, 4, 4),
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 64, 32, 4, 3),
]
#: The interpreter cannot benchmark configs: one small config, ragged edges exercised.
LINEAR_CONFIG_INTERPRET = _cfg(32, 32, 16, 4, 1, group_m=2)

FEATURES_CONFIG = {"BLOCK_M": 32, "BLOCK_C": 128, "num_warps": 4}
FEATURES_CONFIG_INTERPRET = {"BLOCK_M": 16, "BLOCK_C": 16, "num_warps": 4}

_LINEAR_KEY = ["M_BUCKET", "N", "C"]


def _autotuned(configs):
    return triton.autotune(configs=configs, key=_LINEAR_KEY)(_linear_kernel)


_linear_16 = _autotuned(LINEAR_CONFIGS_16)
_linear_32 = _autotuned(LINEAR_CONFIGS_32)


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


def features_triton(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                    batch: int, tokens: int, channels: int) -> torch.Tensor:
    """DCI/SCI features with the one-pass Triton kernel (inputs already validated)."""
    base = hidden_states[spec.final_layer]
    _check_cuda_or_interpret(base.device)
    _check_dtype(base.dtype)
    t_keep = spec.tokens_kept(tokens)
    width = spec.out_channels(channels)
    out = torch.empty(batch, t_keep, width, dtype=base.dtype, device=base.device)
    M = batch * t_keep
    if M == 0 or channels == 0:
        return out
    entries, starts, sizes = layer_entries(hidden_states, spec)
    sb, st, sc = _strides(entries)
    cfg = FEATURES_CONFIG_INTERPRET if interpreting() else FEATURES_CONFIG
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(channels, cfg["BLOCK_C"]))
    _features_kernel[grid](
        tuple(entries), sb, st, sc, out, width, M, channels, t_keep,
        TOK0=spec.token_offset, STARTS=starts, SIZES=sizes,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return out


def _launch_linear(entries, starts, sizes, M, C, t_keep, tok0, weight, bias, activation, out):
    N = weight.shape[0]
    sb, st, sc = _strides(entries)
    dtype = entries[0].dtype
    allow_tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    args = (tuple(entries), sb, st, sc, weight, weight.stride(0), weight.stride(1),
            bias if bias is not None else weight, out, out.stride(0), M, N, C, t_keep,
            triton.next_power_of_2(M))
    meta = dict(TOK0=tok0, STARTS=starts, SIZES=sizes, HAS_BIAS=bias is not None,
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

    kernel = _linear_32 if dtype == torch.float32 else _linear_16
    kernel[grid](*args, **meta)


def choose_linear_path(M: int, C: int, N: int, num_layers_read: int, num_slabs: int,
                       element_size: int) -> str:
    """Pick ``"fused"`` or ``"two-pass"`` for ``act(features @ W^T + b)``.

    Bytes of each path (DESIGN.md section 2), with L distinct layers read and K = slabs * C:

    * two-pass moves ``L*M*C`` (read layers) + ``2*M*K`` (write A, read A back) + ``K*N`` + ``M*N``
      elements through DRAM: the A round trip is the extra.
    * fused moves the DRAM floor ``L*M*C + K*N + M*N`` once, but every N-tile re-reads its
      M-tile's layers: ``ceil(N / BLOCK_N) * L*M*C`` elements from L2, and it sums
      ``L/slabs`` tiles per K step instead of loading one.

    The re-read traffic only stays in L2 while the layer rows of the concurrently running row
    tiles fit it; beyond that it spills to DRAM and the fused kernel becomes memory-bound at
    several times the two-pass bytes. So: fused while the layers of the whole problem fit a
    conservative L2 budget (1-4 CLIP images), two-pass beyond. The budget (24 MiB, half of an
    H100's 50 MiB L2) is an estimate still to be replaced by GPU measurements recorded in
    ``benchmarks/results/``.
    """
    layer_bytes = num_layers_read * M * C * element_size
    l2_budget = 24 * 2 ** 20
    return "fused" if layer_bytes <= l2_budget else "two-pass"


def linear_triton(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                  batch: int, tokens: int, channels: int, weight: torch.Tensor,
                  bias, activation, path: str = "auto") -> torch.Tensor:
    """``act(features @ weight.T + bias)`` on the Triton backend (inputs already validated).

    ``path``: ``"fused"`` (features built in the GEMM's K loop), ``"two-pass"`` (features
    kernel, then the same GEMM over them) or ``"auto"`` (:func:`choose_linear_path`).
    """
    base = hidden_states[spec.final_layer]
    _check_cuda_or_interpret(base.device)
    _check_dtype(base.dtype)
    t_keep = spec.tokens_kept(tokens)
    M = batch * t_keep
    N = weight.shape[0]
    out = torch.empty(batch, t_keep, N, dtype=base.dtype, device=base.device)
    if M == 0 or N == 0:
        return out
    out2d = out.view(M, N)
    entries, starts, sizes = layer_entries(hidden_states, spec)
    if path == "auto":
        path = choose_linear_path(M, channels, N, len(spec.used_layers), spec.num_groups + 1,
                                  base.element_size())
    if path == "fused":
        _launch_linear(entries, starts, sizes, M, channels, t_keep, spec.token_offset,
                       weight, bias, activation, out2d)
    elif path == "two-pass":
        feats = features_triton(hidden_states, spec, batch, tokens, channels)
        K = feats.shape[-1]
        a = feats.view(1, M, K)
        _launch_linear([a], (), (), M, K, M, 0, weight, bias, activation, out2d)
    else:
        raise ValueError(f"path must be 'auto', 'fused' or 'two-pass', got {path!r}")
    return out
