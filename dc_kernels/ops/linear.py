"""The first projector layer on Triton: ``act(features @ W^T + b)``, fused or two-pass.

``_linear_kernel`` is a GEMM whose K loop builds ``A`` on the fly: K-slab 0 is the base tile,
K-slab ``g`` sums group ``g``'s layer tiles and scales by ``1/len``, rounded to the input dtype
(so fused and two-pass agree bit for bit in A). Bias and exact-erf GELU in the epilogue, grouped
program order. With no groups and a single 2-D "layer" it is a plain GEMM: the second pass of
the two-pass path. ``STORE_PRE`` (training) also stores the pre-activation ``Z = A W^T + b``,
rounded to the input dtype, for the backward's GELU'.

:func:`linear_triton` dispatches between the paths (rule in :mod:`.path`; the overlapped
path's chunks in :mod:`.overlap`, the pipelined path in :mod:`.pipelined`);
:func:`linear_triton_for_training` is the same launch that also hands back what the backward
keeps (the features the two-pass and overlapped paths write, and ``Z``).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..spec import ConnectorSpec
from . import common, overlap
from .common import _group_sum, _round, _tile_offsets
from .direct import DirectLaunch
from .features import prepare_features
from .gemm_tma import (arch_of, card_of, direct_slabs, gemm_tma_eligible, prepare_gemm_tma,
                       slab_views, sms_of)
from .path import choose_linear_path
from .pipelined import pipelined_eligible, prepare_pipelined

__all__ = ["linear_triton", "linear_triton_for_training", "prepare_linear", "LinearLaunch",
           "gemm", "prepare_gemm", "prepare_kernel", "KernelLaunch", "CONFIG_LISTS",
           "pipelined_serves", "direct_serves", "auto_path", "DIRECT_A", "PIPELINED",
           "LINEAR_CONFIG_INTERPRET", "PATHS", "prune_configs", "shared_bytes_bound"]


@triton.jit
def _linear_kernel(
    layers, stride_b, stride_t, stride_c,  # tuples, one entry per layer argument
    w, stride_wn, stride_wk,  # weight [N, (G+1)*C] as nn.Linear stores it
    bias, out, pre, stride_om,  # out (and pre) are [M, N] with unit column stride
    M, N, C, T_KEEP,
    M_BUCKET,  # autotune key only
    TOK0: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr,
    UNIFORM: tl.constexpr, OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,  # 0 none, 1 exact-erf GELU
    STORE_PRE: tl.constexpr,  # also store the pre-activation (acc + bias) into ``pre``
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
    if STORE_PRE:
        _store_pre_and_out(pre, out, b_acc, pid_m, o_n, m_m, m_n, stride_om, ACTIVATION, OFF64,
                           EMULATE_RNE, BLOCK_M)
    else:
        if ACTIVATION == 1:
            b_acc = 0.5 * b_acc * (1.0 + tl.erf(b_acc * 0.7071067811865476))
        if OFF64:
            p_out = out + o_m.to(tl.int64)[:, None] * stride_om + o_n[None, :]
        else:
            p_out = out + o_m[:, None] * stride_om + o_n[None, :]
        tl.store(p_out, _round(b_acc, out.dtype.element_ty, EMULATE_RNE),
                 mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _store_pre_and_out(pre, out, b_acc, pid_m, o_n, m_m, m_n, stride_om,
                       ACTIVATION: tl.constexpr, OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr,
                       BLOCK_M: tl.constexpr):
    # the training epilogue: Z = acc (+ bias) and act(Z), each rounded once. Z is stored
    # before the GELU (no second copy of the tile stays live across it); offsets are the
    # tile's first row (a scalar, int64 if needed) plus 32-bit offsets within the tile
    # (BLOCK_M * stride_om < 2^31 for N < 2^24, checked on the host), formed at each store:
    # no [BLOCK_M, BLOCK_N] int64 tile, which spills registers with 128x128 tiles
    if OFF64:
        o_row0 = (pid_m * BLOCK_M).to(tl.int64) * stride_om
    else:
        o_row0 = pid_m * BLOCK_M * stride_om
    m_out = m_m[:, None] & m_n[None, :]
    tl.store(pre + o_row0 + (tl.arange(0, BLOCK_M)[:, None] * stride_om + o_n[None, :]),
             _round(b_acc, pre.dtype.element_ty, EMULATE_RNE), mask=m_out)
    if ACTIVATION == 1:
        b_acc = 0.5 * b_acc * (1.0 + tl.erf(b_acc * 0.7071067811865476))
    tl.store(out + o_row0 + (tl.arange(0, BLOCK_M)[:, None] * stride_om + o_n[None, :]),
             _round(b_acc, out.dtype.element_ty, EMULATE_RNE), mask=m_out)


# --------------------------------------------------------------------------- configs
def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Every config below is built ahead of time for sm_80 and sm_90 exactly as the JIT specializes
# it (tests/test_aot_compile.py): no register spills, shared memory within the architecture's
# limit or pruned by _prune_configs before launch. The fused kernel sums 12-13 layer tiles per
# K step, so it takes a narrower K block than a plain GEMM, and for fp32 a single stage (the
# pipeliner would otherwise multi-buffer every layer's tile in shared memory). Its BLOCK_M = 64
# configs use 4 warps (one warpgroup): with 8, both warpgroups would rebuild the same A tile.
#: Fused kernel (features built in the K loop), 16-bit operands. 64 x 64 x 16 serves sizes not
#: divisible by 16 with wide groups (see prune_configs: with triton 3.6 on sm_80 the 32-deep K
#: block spills there, 255 registers).
FUSED_CONFIGS_16 = [
    _cfg(64, 128, 32, 4, 3),
    _cfg(128, 64, 32, 8, 3),
    _cfg(64, 64, 32, 4, 3),
    _cfg(64, 64, 16, 4, 3),
]
#: Fused kernel, fp32 operands: K blocks of 16 (with triton 3.6, 64 x 64 x 32 spills on sm_90
#: and, as TF32, on sm_80).
FUSED_CONFIGS_32 = [
    _cfg(64, 128, 16, 4, 1),
    _cfg(64, 64, 16, 4, 1),
]
#: Plain GEMM (second pass where the TMA kernel does not apply: sm_80, awkward layouts),
#: 16-bit operands.
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

#: Register limit (``maxnreg``) of ``_linear_kernel`` builds for sm_100 (B200, B300) whose K
#: loop is aligned (:func:`k_aligned`: channels and weight row stride divisible by 16).
#: Without one, Triton's Blackwell ptxas picks its own register target, and for some 4-warp
#: configs it is too low: built as the JIT binds them (triton 3.9, ptxas 13.4, 2026-12-05),
#: the fused 64 x 128 x 32 (fp16) got 128 registers and spilled 1, the fp32 GEMM 64 x 64 x
#: 16 got 96 and spilled 2-4 (also with rows or columns not divisible by 16: SigLIP's 729
#: rows, N = 1000). With 240 every such build is spill-free (the fused 64 x 128 x 32: 158
#: registers; the fp32 GEMM: 128). Not where the K loop is masked (channels not divisible
#: by 16): there the limit makes ptxas spill where its own target does not (6-13 registers
#: at 240; without it 168-254 registers, no spill), and not on sm_120, where no build spills
#: without one. 240, not 255: ptxas can fail a tcgen05 kernel at 255 (triton-lang/triton
#: issue 8488). ``tests/test_aot_compile.py`` builds every case for sm_100 and sm_120.
BLACKWELL_MAXNREG = 240


def shared_bytes_bound(config: triton.Config, max_group: int, element_size: int) -> int:
    """An upper bound of the shared memory one build of ``_linear_kernel`` allocates.

    The pipeliner keeps up to ``num_stages`` copies of every tile loaded in a K step: the W
    tile and, for the fused kernel, the widest group's layer tiles (a plain GEMM loads one A
    tile). ``tests/test_aot_compile.py`` checks the bound against every ahead-of-time build.
    """
    k = config.kwargs
    tiles = max(1, max_group) * k["BLOCK_M"] * k["BLOCK_K"] + k["BLOCK_K"] * k["BLOCK_N"]
    return max(1, config.num_stages) * tiles * element_size


@functools.lru_cache(maxsize=None)
def _shared_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 166912)


def k_aligned(C: int, stride_wn: int) -> bool:
    """Whether a ``_linear_kernel`` launch's K loop runs unmasked: its channels (per layer for
    the fused kernel, the features' width for the GEMM) and its weight's row stride are
    divisible by 16 (where :data:`BLACKWELL_MAXNREG` applies)."""
    return C % 16 == 0 and stride_wn % 16 == 0


def launch_aligned(M: int, N: int, C: int, stride_om: int, stride_wn: int) -> bool:
    """Whether a ``_linear_kernel`` launch's rows, columns, channels and row strides are all
    divisible by 16 (the binder's hint: unmasked vector loads and stores): its K loop
    (:func:`k_aligned`) and its output tiles."""
    return k_aligned(C, stride_wn) and all(s % 16 == 0 for s in (M, N, stride_om))


def _sm100(arch: Optional[int]) -> bool:
    # the sm_100 family (B200, B300: 100-109), where BLACKWELL_MAXNREG and the fp32 tile
    # bound of prune_configs apply
    return arch is not None and arch // 10 == 10


def prune_configs(configs, max_group: int, element_size: int, shared_limit: int,
                  aligned: bool, arch: Optional[int] = None):
    """The configs that can run: shared memory bound within ``shared_limit``; with sizes or
    strides not divisible by 16 (``aligned=False``), tiles of at most 64 x 128 (64 x 64 for
    fp32 on sm_100, ``arch`` 100-109: 64 x 128 x 16 spills 16 registers there) and, for fp32
    or groups of more than 4 layers (``max_group``), K blocks of at most 16 (larger ones spill
    their masks' registers: fp32 with triton 3.9, 12-layer groups with triton 3.6 on sm_80).
    Never empty: falls back to the smallest config."""
    narrow_k = element_size >= 4 or max_group > 4
    max_tile = 64 * 64 if element_size >= 4 and _sm100(arch) else 64 * 128
    keep = [c for c in configs
            if shared_bytes_bound(c, max_group, element_size) <= shared_limit
            and (aligned or (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile
                             and (not narrow_k or c.kwargs["BLOCK_K"] <= 16)))]
    if keep:
        return keep
    return [min(configs, key=lambda c: shared_bytes_bound(c, max_group, element_size))]


def _early_prune(configs, named_args, **kwargs):
    layers = named_args["layers"]
    sizes = kwargs.get("SIZES", named_args.get("SIZES", ()))
    e = layers[0].element_size()
    device = layers[0].device
    # (gemm_tma's device check: an ahead-of-time recording stands CPU tensors in for a card's)
    from .gemm_tma import _cuda_device
    limit = _shared_limit(device.index or 0) if _cuda_device(layers[0]) else 166912
    aligned = launch_aligned(named_args["M"], named_args["N"], named_args["C"],
                             named_args["stride_om"], named_args["stride_wn"])
    return prune_configs(configs, max(sizes, default=1), e, limit, aligned,
                         arch_of(layers[0]))


def _autotuned(configs):
    if not common.autotune_enabled():
        configs = configs[:1]
    return triton.autotune(configs=configs, key=_LINEAR_KEY,
                           prune_configs_by={"early_config_prune": _early_prune}
                           )(_linear_kernel)


#: (kernel, operand bits) -> autotune configs; "gemm" is the linear kernel without groups.
CONFIG_LISTS = {
    ("fused", 16): FUSED_CONFIGS_16,
    ("fused", 32): FUSED_CONFIGS_32,
    ("gemm", 16): GEMM_CONFIGS_16,
    ("gemm", 32): GEMM_CONFIGS_32,
}
_AUTOTUNED = {key: _autotuned(configs) for key, configs in CONFIG_LISTS.items()}


# --------------------------------------------------------------------------- launchers
class KernelLaunch:
    """``_linear_kernel`` (fused, or the cp.async GEMM) with everything but its tensors fixed.

    ``launch(entries, weight, bias, out, pre)``: ``entries`` is the tuple of layer tensors
    (whose strides were fixed at preparation); ``out`` (and ``pre``) any tensor whose storage
    starts at the ``[M, N]`` output's first element with row stride N (the plan's ``[B, T', N]``
    output, unviewed, or its 2-D view)."""

    __slots__ = ("site", "strides", "wstrides", "tail", "meta", "meta_pre", "bias_copy",
                 "pre_ok")

    def __call__(self, entries, weight, bias, out, pre=None):
        if pre is not None and not self.pre_ok:
            raise ValueError("the Triton linear keeps Z for fewer than 2^24 columns only, got "
                             f"{self.tail[2]}")
        if bias is not None and self.bias_copy:
            # the epilogue reads the bias at ``bias + n`` (unit stride): a strided or expanded
            # bias (a matrix column, ``b[::2]``, ``expand``) is copied first (N elements)
            bias = bias.contiguous()
        self.site((entries, *self.strides, weight, *self.wstrides,
                   bias if bias is not None else weight, out, pre if pre is not None else out,
                   *self.tail), self.meta if pre is None else self.meta_pre)


def prepare_kernel(entries, starts, sizes, M, C, t_keep, tok0, weight, bias, activation,
                   stride_om, flags) -> KernelLaunch:
    """The :class:`KernelLaunch` of ``_linear_kernel`` for these layer entries (their strides),
    weight (its strides), bias (present or not), rows ``M`` and output row stride."""
    N = weight.shape[0]
    dtype = entries[0].dtype
    launch = KernelLaunch()
    launch.pre_ok = stride_om < 2 ** 24  # the STORE_PRE epilogue's 32-bit offsets
    launch.bias_copy = bias is not None and bias.stride(0) != 1
    launch.strides = common.strides(entries)
    launch.wstrides = (weight.stride(0), weight.stride(1))
    launch.tail = (stride_om, M, N, C, t_keep, triton.next_power_of_2(M))
    allow_tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    meta = dict(TOK0=tok0, STARTS=starts, SIZES=sizes, **flags, HAS_BIAS=bias is not None,
                ACTIVATION=common.ACTIVATIONS[activation], STORE_PRE=False,
                DOT_FP32=common.interpreting(),
                INPUT_PRECISION="tf32" if allow_tf32 else "ieee")
    if common.interpreting():
        cfg = LINEAR_CONFIG_INTERPRET
        kernel, grid = _linear_kernel, (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) *
                                        triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
        meta.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        def grid(m):
            return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)
        bits = 32 if dtype == torch.float32 else 16
        kernel = _AUTOTUNED[("gemm" if not sizes else "fused", bits)]
        if _sm100(arch_of(entries[0])) and k_aligned(C, weight.stride(0)):
            meta["maxnreg"] = BLACKWELL_MAXNREG
    launch.meta, launch.meta_pre = meta, dict(meta, STORE_PRE=True)
    launch.site = DirectLaunch(kernel, grid)
    return launch


class _CpAsyncGemm:
    # the cp.async GEMM as a prepared launch with gemm_tma's call signature
    __slots__ = ("kernel",)

    def __call__(self, a, weight, bias, out, pre=None):
        self.kernel((a,), weight, bias, out, pre)
        return out


def prepare_gemm(a: torch.Tensor, weight: torch.Tensor, bias, activation, out: torch.Tensor,
                 leave_room: bool = False):
    """The second pass's GEMM prepared for this layout: ``launch(a, weight, bias, out, pre)``
    runs ``out = act(a @ weight.T + bias)`` (``pre``, of ``out``'s layout: also ``a @ weight.T
    + bias``). The persistent TMA kernel where it applies (sm_90, TMA-compatible layouts;
    ``leave_room``: configs that leave an SM slot for the overlapped features), else the
    cp.async kernel. ``a``, ``out`` 2-D."""
    if gemm_tma_eligible(a, weight, out):
        return prepare_gemm_tma(a, weight, bias, activation, out, leave_room=leave_room)
    M, K = a.shape
    a3 = a.unsqueeze(0)
    launch = _CpAsyncGemm()
    launch.kernel = prepare_kernel([a3], (), (), M, K, M, 0, weight, bias, activation,
                                   out.stride(0), common.layout_flags([a3], weight, out))
    return launch


def gemm(a: torch.Tensor, weight: torch.Tensor, bias, activation, out: torch.Tensor,
         leave_room: bool = False, pre: Optional[torch.Tensor] = None) -> None:
    """``out = act(a @ weight.T + bias)`` for 2-D ``a`` (the second pass), prepared and run at
    once (:func:`prepare_gemm`). ``pre`` (training, the layout of ``out``): also receives
    ``a @ weight.T + bias`` before the activation."""
    if pre is not None and (pre.stride() != out.stride() or pre.shape != out.shape
                            or (pre.data_ptr() - out.data_ptr()) % 16):
        raise ValueError("pre must have out's shape, strides and alignment")
    prepare_gemm(a, weight, bias, activation, out, leave_room)(a, weight, bias, out, pre)


#: False: the path rule never picks the pipelined path and ``path="pipelined"`` runs two-pass
#: (a plan switch, like every launcher switch)
PIPELINED = True
#: False: the two-pass path always writes A, also where its GEMM could read the layers in
#: place (:func:`.gemm_tma.direct_slabs`; a plan switch; tests compare the two)
DIRECT_A = True


def direct_serves(hidden_states, spec: ConnectorSpec, batch: int, tokens: int,
                  weight: torch.Tensor) -> bool:
    """Whether the two-pass path's GEMM reads A's slabs in place from the layers, with no
    features pass (:func:`.gemm_tma.direct_slabs`: every slab one layer, the kept rows one 2-D
    TMA view; unless :data:`DIRECT_A` is off)."""
    return DIRECT_A and direct_slabs(hidden_states, spec, batch, tokens, weight) is not None


def pipelined_serves(entries, spec: ConnectorSpec, weight: torch.Tensor, n_out: int) -> bool:
    """Whether the pipelined path may run for these layer entries (``common.layer_entries``)
    and weight, its output ``n_out`` columns wide: :data:`PIPELINED` on and
    :func:`.pipelined.pipelined_eligible` (output rows 16-byte aligned for TMA)."""
    return PIPELINED and pipelined_eligible(entries, spec, weight,
                                            (n_out * entries[0].element_size()) % 16 == 0)


PATHS = ("auto", "fused", "two-pass", "overlap", "pipelined")


def linear_triton(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                  batch: int, tokens: int, channels: int, weight: torch.Tensor,
                  bias, activation, path: str = "auto") -> torch.Tensor:
    """``act(features @ weight.T + bias)`` on the Triton backend (inputs already validated).

    ``path``:

    * ``"fused"``: features built in the GEMM's K loop (one kernel);
    * ``"two-pass"``: the features kernel writes A, then the GEMM (persistent TMA kernel on
      sm_90, cp.async kernel elsewhere) reads it; where every slab is one layer and the TMA
      GEMM can read the layers in place (:func:`direct_serves`), it reads them and no features
      pass runs (unless the features are kept: the same bits either way);
    * ``"overlap"``: two-pass in row chunks, the features of chunk j + 1 written on a side
      stream while the GEMM of chunk j runs;
    * ``"pipelined"``: one features launch (side stream) and one persistent GEMM launch
      running at once, each GEMM tile waiting on its row block's ready count
      (:mod:`dc_kernels.ops.pipelined`; 16-bit DCI/SCI with TMA layouts on sm_90);
    * ``"auto"``: :func:`dc_kernels.ops.path.choose_linear_path`.

    A layout the fused kernel is not built for (layers with differing strides, 2^31+ element
    tensors, STI) runs two-pass when ``"fused"`` is asked for, and what the pipelined path is
    not built for (STI, fp32, layouts TMA cannot read, no sm_90) runs two-pass when
    ``"pipelined"`` is asked for; the result is the same within the GEMM's bound (bit for bit
    where neither runs stream K). STI runs the overlap in chunks of whole images, where it has
    two images or more and chunk slices keep the alignment (:func:`sti_overlap_serves`; else
    two-pass).
    """
    return _linear(hidden_states, spec, batch, tokens, channels, weight, bias, activation, path,
                   False, False)[0]


def linear_triton_for_training(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                               batch: int, tokens: int, channels: int, weight: torch.Tensor,
                               bias, activation, path: str = "auto", *,
                               keep_features: bool = False, keep_pre: bool = False
                               ) -> Tuple[torch.Tensor, Optional[torch.Tensor],
                                          Optional[torch.Tensor]]:
    """:func:`linear_triton`, also returning what a backward keeps: ``(out, features, pre)``.

    ``keep_features``: return the features ``A`` (``[B, T', K]``) the GEMM read; the fused
    path never writes them, so a fused launch runs two-pass instead (same result).
    ``keep_pre``: the GEMM's epilogue also stores ``Z = A @ weight.T + bias`` (before the
    activation; fp32 accumulation rounded once to the input dtype), ``[B, T', N]``. Entries
    not asked for are None. (docs/DESIGN.md §6.1)
    """
    return _linear(hidden_states, spec, batch, tokens, channels, weight, bias, activation, path,
                   keep_features, keep_pre)


def _linear(hidden_states, spec, batch, tokens, channels, weight, bias, activation, path,
            keep_features, keep_pre):
    launch = prepare_linear(hidden_states, spec, batch, tokens, channels, weight, bias,
                            activation, path)
    return launch(hidden_states, weight, bias, keep_features, keep_pre)


class LinearLaunch:
    """A first-layer launch prepared once per input signature (dc_kernels.plan): the resolved
    path, the features launch, the fused kernel's or the GEMM's constants and grids.

    ``launch(hidden_states, weight, bias, keep_features=False, keep_pre=False)`` with inputs of
    the signature it was prepared for returns ``(out, features or None, pre or None)`` as
    :func:`linear_triton_for_training` does; per call it allocates the outputs and launches.
    Unread entries of ``hidden_states`` may be None. The GEMM of the second pass is prepared on
    the first call that runs it (from the real, freshly allocated operands)."""

    __slots__ = ("path", "spec", "dims", "activation", "out_shape", "dtype", "device", "index",
                 "features", "kernel", "gemm", "mn", "overlap", "pipelined", "direct",
                 "direct_gemm")

    def __call__(self, hidden_states, weight, bias, keep_features=False, keep_pre=False):
        out = common.empty(self.out_shape, self.dtype, self.device)
        pre = common.empty(self.out_shape, self.dtype, self.device) if keep_pre else None
        path = self.path
        if path == "empty":
            return out, (self._features(hidden_states) if keep_features else None), pre
        if path == "fused" and not keep_features:  # (the fused kernel never writes A)
            self.kernel(tuple([hidden_states[i] for i in self.index]), weight, bias, out, pre)
            return out, None, pre
        if path == "pipelined":
            M, N = self.mn
            feats = self.pipelined(hidden_states, weight, bias, out.view(M, N),
                                   None if pre is None else pre.view(M, N))
            return out, (feats if keep_features else None), pre
        if path == "overlap":
            M, N = self.mn
            launch = self.overlap
            if launch is None:  # (OVERLAP_CHUNK_ROWS is a plan switch: a new one, a new plan)
                launch = self.overlap = overlap.prepare_overlap(
                    hidden_states, self.spec, *self.dims, weight, self.activation)
            feats = launch(hidden_states, weight, bias, out.view(M, N),
                           None if pre is None else pre.view(M, N))
            return out, (feats if keep_features else None), pre
        if self.direct and not keep_features:
            # two-pass without its features pass: the GEMM reads the layers in place
            M, N = self.mn
            slabs = slab_views(hidden_states, self.spec, self.dims[0], self.dims[1])
            gemm_launch = self.direct_gemm
            if gemm_launch is None:
                gemm_launch = self.direct_gemm = prepare_gemm_tma(slabs, weight, bias,
                                                                  self.activation,
                                                                  out.view(M, N))
            gemm_launch(slabs, weight, bias, out, pre)
            return out, None, pre
        feats = self._features(hidden_states)
        gemm_launch = self.gemm
        if gemm_launch is None:
            M, N = self.mn
            gemm_launch = self.gemm = prepare_gemm(feats.view(M, feats.shape[-1]), weight, bias,
                                                   self.activation, out.view(M, N))
        # the operands are passed unviewed: the prepared launch fixed their 2-D layout
        gemm_launch(feats, weight, bias, out, pre)
        return out, (feats if keep_features else None), pre

    def _features(self, hidden_states):
        launch = self.features
        if launch is None:
            launch = self.features = prepare_features(hidden_states, self.spec, *self.dims)
        return launch(hidden_states)


def auto_path(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec, weight: torch.Tensor,
              n_out: Optional[int] = None) -> str:
    """The path ``path="auto"`` runs on the Triton backend for these (validated) inputs:
    :func:`dc_kernels.ops.path.choose_linear_path` on the shape, the layers' layout (fused
    only for uniform strides and 32-bit offsets), the connector type, whether the pipelined
    path may run, and the card (:func:`.gemm_tma.arch_of`, :func:`.gemm_tma.card_of`,
    :func:`.gemm_tma.sms_of`).
    ``n_out``: the output width the rule sees, ``weight.shape[0]`` by default (a column shard
    passes the unsharded layer's: :func:`dc_kernels.functional.column_shard_path`)."""
    from . import gemm_tma  # (its device lookups, which the ahead-of-time builds stand in for)
    base = hidden_states[spec.final_layer]
    B, T, C = base.shape
    M = B * spec.out_tokens(T)
    N = weight.shape[0] if n_out is None else n_out
    entries, _, _ = common.layer_entries(hidden_states, spec)
    flags = common.layout_flags(entries, weight, common.StandIn((M, N), (N, 1)))
    off64 = flags["OFF64"] or N * weight.shape[1] >= 2 ** 31 - 1  # the unsharded weight
    sti = spec.connector_type == "sti"
    sti_rows = (spec.tokens_kept(T), spec.out_tokens(T)) \
        if sti and overlap.sti_overlap_serves(hidden_states, spec, B, T) else None
    return choose_linear_path(M, C, N, len(spec.used_layers), spec.num_groups + 1,
                              base.element_size(), flags["UNIFORM"], off64,
                              sti=sti, sti_rows=sti_rows,
                              cuda=gemm_tma._cuda_device(base), arch=arch_of(base),
                              pipelined=pipelined_serves(entries, spec, weight, N),
                              card=card_of(base), sms=sms_of(base),
                              direct=direct_serves(hidden_states, spec, B, T, weight))


def prepare_linear(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec, batch: int,
                   tokens: int, channels: int, weight: torch.Tensor, bias, activation,
                   path: str = "auto") -> LinearLaunch:
    """The :class:`LinearLaunch` of these (validated) inputs: what :func:`linear_triton` does,
    split into what depends on the inputs' signature only and the launch."""
    base = hidden_states[spec.final_layer]
    common.check_launchable(base.device, base.dtype)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    launch = LinearLaunch()
    launch.spec, launch.dims, launch.activation = spec, (batch, tokens, channels), activation
    t_keep = spec.tokens_kept(tokens)
    rows = spec.out_tokens(tokens)
    M = batch * rows
    N = weight.shape[0]
    launch.mn = (M, N)
    launch.out_shape = (batch, rows, N)
    launch.dtype, launch.device = base.dtype, base.device
    launch.gemm = launch.kernel = launch.overlap = launch.pipelined = None
    launch.direct_gemm = None
    launch.direct = False
    launch.features = None  # prepared on the first call that writes A
    if M == 0 or N == 0:
        launch.path = "empty"
        return launch
    entries, starts, sizes = common.layer_entries(hidden_states, spec)
    launch.index = common.entry_indices(spec)
    flags = common.layout_flags(entries, weight, common.StandIn((M, N), (N, 1)))
    sti = spec.connector_type == "sti"
    fusable = flags["UNIFORM"] and not flags["OFF64"] and not sti
    pipelinable = pipelined_serves(entries, spec, weight, N)
    if path == "auto":
        path = auto_path(hidden_states, spec, weight)
    elif path == "fused" and not fusable:
        path = "two-pass"
    elif path == "overlap" and sti and not overlap.sti_overlap_serves(hidden_states, spec,
                                                                      batch, tokens):
        path = "two-pass"
    elif path == "pipelined" and not pipelinable:
        path = "two-pass"
    launch.path = path
    launch.direct = path == "two-pass" and direct_serves(hidden_states, spec, batch, tokens,
                                                         weight)
    if path == "fused":
        launch.kernel = prepare_kernel(entries, starts, sizes, M, channels, t_keep,
                                       spec.token_offset, weight, bias, activation, N, flags)
    elif path == "pipelined":
        launch.pipelined = prepare_pipelined(hidden_states, spec, batch, tokens, channels,
                                             weight, bias, activation)
    return launch


