"""Features kernels: the Dense Connector features written once, in one pass over the layers.

* ``_features_kernel`` (DCI/SCI): each program owns ``BLOCK_M`` rows x ``BLOCK_C`` channels,
  loads the base tile and every group member once and writes its part of every slab of
  ``A = [B, T', (G+1)C]``.
* ``_sti_features_kernel`` (STI, tokens instead of channels): one launch copies the base tokens
  and writes each group's pooled tokens (mean over ``pool`` consecutive tokens of every member
  layer) in the original's row order.

:func:`features_triton` is the launcher (inputs validated by the public functions).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..spec import ConnectorSpec
from . import common
from .common import _group_sum, _round, _tile_offsets
from .direct import DirectLaunch

__all__ = ["features_triton", "features_tma", "features_tma_eligible", "row_tiles",
           "prepare_features_chunk", "FeaturesChunkLaunch", "prepare_sti_chunk",
           "StiChunkLaunch", "sti_chunks_aligned",
           "row_of_tile", "FEATURES_CONFIG", "FEATURES_CONFIG_INTERPRET", "STI_FEATURES_CONFIG",
           "STI_FEATURES_CONFIG_INTERPRET", "STI_FEATURES_CONFIG_BESIDE",
           "FEATURES_TMA_CONFIG", "FEATURES_TMA_CONFIG_BESIDE", "BESIDE_GEMM_REGISTERS"]

@triton.jit
def _features_kernel(
    layers, stride_b, stride_t, stride_c,  # tuples, one entry per layer argument
    out, stride_om,  # out is [M, (G+1)*C] with unit channel stride
    ROW0, M, C, T_KEEP,  # this launch writes rows [ROW0, M) of A
    TOK0: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr,
    UNIFORM: tl.constexpr, OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # channel-major program order: consecutive programs read consecutive channel tiles of the
    # same rows (whole DRAM rows of every layer together)
    # (one grid axis: no 65535 cap on the row tiles)
    pid = tl.program_id(0)
    num_c = tl.cdiv(C, BLOCK_C)
    pid_c = pid % num_c
    pid_m = pid // num_c
    o_m = ROW0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
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

    _ldg_tile(layers, stride_b, stride_t, stride_c, p_out, b, t, o_c, mask, C, STARTS, SIZES,
              UNIFORM, OFF64, EMULATE_RNE, BLOCK_M, BLOCK_C)


@triton.jit
def _ldg_tile(layers, stride_b, stride_t, stride_c, p_out, b, t, o_c, mask, C,
              STARTS: tl.constexpr, SIZES: tl.constexpr, UNIFORM: tl.constexpr,
              OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_C: tl.constexpr):
    # One [BLOCK_R, BLOCK_C] tile of every slab of A at p_out (rows: image b, token t; pointer
    # loads): the features kernel's body, also the pipelined GEMM's own producer
    # (:mod:`.pipelined`)
    o_x = _tile_offsets(stride_b[0], stride_t[0], stride_c[0], b, t, o_c, OFF64)
    for s in tl.static_range(len(SIZES) + 1):
        _ldg_slab(layers, stride_b, stride_t, stride_c, o_x, p_out, b, t, o_c, mask, C, s,
                  STARTS, SIZES, UNIFORM, OFF64, EMULATE_RNE, BLOCK_R, BLOCK_C)


@triton.jit
def _ldg_slab(layers, stride_b, stride_t, stride_c, o_x, p_out, b, t, o_c, mask, C,
              SLAB: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr,
              UNIFORM: tl.constexpr, OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Slab SLAB of one tile of A (``o_x``: the base layer's offsets of the tile). Slab 0: the
    # base features, copied as they are; slab g + 1: the mean of group g, fp32 accumulation,
    # one rounding
    if SLAB == 0:
        b_x = tl.load(layers[0] + o_x, mask=mask)
        tl.store(p_out, b_x.to(p_out.dtype.element_ty), mask=mask)
    else:
        b_sum = _group_sum(layers, stride_b, stride_t, stride_c, STARTS[SLAB - 1],
                           SIZES[SLAB - 1], o_x, b, t, o_c, mask, UNIFORM, OFF64, BLOCK_R,
                           BLOCK_C)
        b_mean = _round(b_sum / SIZES[SLAB - 1], p_out.dtype.element_ty, EMULATE_RNE)
        tl.store(p_out + SLAB * C, b_mean, mask=mask)


@triton.jit
def _sti_features_kernel(
    layers, stride_b, stride_t, stride_c,  # tuples, one entry per layer argument
    out, stride_ob, stride_ot,  # out is [B, T' + G*TP, C] with unit channel stride
    B, C, T_KEEP, TP,  # TP: pooled tokens per group and image
    POOLED_TILES,  # G * cdiv(B*TP, BLOCK_P): the programs (axis 0) that write pooled tokens
    POOL: tl.constexpr, TOK0: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr,
    UNIFORM: tl.constexpr, OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # STI, one launch: axis-0 programs below POOLED_TILES write group g's pooled tokens
    # (BLOCK_P of the B*TP rows, g = pid // cdiv(B*TP, BLOCK_P)): each the mean over POOL
    # consecutive tokens of every member layer, fp32 accumulation, one rounding; the
    # programs after them copy BLOCK_M of the B*T' base tokens. The pooled programs, which
    # read POOL rows of every member per row, come first, so the short copies fill the tail.
    # Rows land in the original's order: per image, all base tokens, then group 0's pooled
    # tokens, ...
    pid = tl.program_id(0)
    o_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    # (each part in its own function: the branches' tiles differ in shape)
    if pid >= POOLED_TILES:
        _sti_copy_tile(layers, stride_b, stride_t, stride_c, out, stride_ob, stride_ot, B, C,
                       T_KEEP, pid - POOLED_TILES, o_c, TOK0, OFF64, BLOCK_M)
    else:
        _sti_pooled_tile(layers, stride_b, stride_t, stride_c, out, stride_ob, stride_ot, B, C,
                         T_KEEP, TP, pid, o_c, POOL, TOK0, STARTS, SIZES, UNIFORM, OFF64,
                         EMULATE_RNE, BLOCK_P, BLOCK_C)


@triton.jit
def _sti_copy_tile(layers, stride_b, stride_t, stride_c, out, stride_ob, stride_ot, B, C,
                   T_KEEP, tile, o_c, TOK0: tl.constexpr, OFF64: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    # base tokens [tile BLOCK_M, (tile + 1) BLOCK_M) of the B*T', channels o_c: copied
    o_r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (o_r < B * T_KEEP)[:, None] & (o_c < C)[None, :]
    b = o_r // T_KEEP
    t = o_r % T_KEEP
    o_x = _tile_offsets(stride_b[0], stride_t[0], stride_c[0], b, t + TOK0, o_c, OFF64)
    b_x = tl.load(layers[0] + o_x, mask=mask)
    o_out = _tile_offsets(stride_ob, stride_ot, 1, b, t, o_c, OFF64)
    tl.store(out + o_out, b_x.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _sti_pooled_tile(layers, stride_b, stride_t, stride_c, out, stride_ob, stride_ot, B, C,
                     T_KEEP, TP, tile, o_c, POOL: tl.constexpr, TOK0: tl.constexpr,
                     STARTS: tl.constexpr, SIZES: tl.constexpr, UNIFORM: tl.constexpr,
                     OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    # pooled tile ``tile`` (group-major: cdiv(B*TP, BLOCK_P) per group), channels o_c
    p_tiles = tl.cdiv(B * TP, BLOCK_P)
    grp = tile // p_tiles
    o_r = (tile % p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (o_r < B * TP)[:, None] & (o_c < C)[None, :]
    b = o_r // TP
    j = o_r % TP
    for g in tl.static_range(len(SIZES)):
        if grp == g:
            b_sum = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
            for q in range(POOL):
                t = TOK0 + j * POOL + q
                o_x = _tile_offsets(stride_b[0], stride_t[0], stride_c[0], b, t, o_c, OFF64)
                b_sum += _group_sum(layers, stride_b, stride_t, stride_c, STARTS[g], SIZES[g],
                                    o_x, b, t, o_c, mask, UNIFORM, OFF64, BLOCK_P, BLOCK_C)
            b_mean = _round(b_sum / (SIZES[g] * POOL), out.dtype.element_ty, EMULATE_RNE)
            o_out = _tile_offsets(stride_ob, stride_ot, 1, b, T_KEEP + g * TP + j, o_c, OFF64)
            tl.store(out + o_out, b_mean, mask=mask)


@triton.jit
def _tma_group_sum(descs, START: tl.constexpr, SIZE: tl.constexpr, b, t, c0,
                   ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # fp32 sum, in layer order, of one [ROWS, BLOCK_C] tile of every member layer (TMA loads;
    # rows past T and channels past C come back as zeros)
    b_sum = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(SIZE):
        b_sum += descs[START + i].load([b, t, c0]).reshape(ROWS, BLOCK_C).to(tl.float32)
    return b_sum


@triton.jit
def _features_tma_kernel(
    layers, stride_b, stride_t,  # tuples: every layer [B, T, C] with unit channel stride
    out, stride_om,  # out is [B*T', (G+1)*C] with unit channel stride
    B, T, C, T_KEEP, Q0, Q1,  # this launch: row tiles [Q0, Q1) of the B * cdiv(T', ROWS)
    TOK0: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr,
    OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    STAGES: tl.constexpr,
):
    # Persistent: NUM_PROGRAMS programs walk the (row tile, channel tile) pairs; each tile's
    # member-layer loads are TMA copies into a STAGES-deep shared-memory ring, so a program
    # keeps whole tiles of every layer in flight with few registers (it runs beside the GEMM
    # on the overlapped path). Row tiles never straddle two images (cdiv(T', ROWS) per image).
    descs = ()
    for i in tl.static_range(len(layers)):
        descs = descs + (tl.make_tensor_descriptor(
            layers[i], shape=[B, T, C], strides=[stride_b[i], stride_t[i], 1],
            block_shape=[1, ROWS, BLOCK_C]),)
    row_tiles = tl.cdiv(T_KEEP, ROWS)
    c_tiles = tl.cdiv(C, BLOCK_C)
    n_tiles = (Q1 - Q0) * c_tiles
    for tile in tl.range(tl.program_id(0), n_tiles, NUM_PROGRAMS, num_stages=STAGES):
        q = Q0 + tile // c_tiles
        c0 = (tile % c_tiles) * BLOCK_C
        b = q // row_tiles
        t0 = (q % row_tiles) * ROWS
        o_r = t0 + tl.arange(0, ROWS)
        o_c = c0 + tl.arange(0, BLOCK_C)
        mask = (o_r < T_KEEP)[:, None] & (o_c < C)[None, :]
        if OFF64:
            o_row = b.to(tl.int64) * T_KEEP + o_r
        else:
            o_row = b * T_KEEP + o_r
        p_out = out + o_row[:, None] * stride_om + o_c[None, :]
        b_x = descs[0].load([b, TOK0 + t0, c0]).reshape(ROWS, BLOCK_C)
        tl.store(p_out, b_x.to(out.dtype.element_ty), mask=mask)
        for g in tl.static_range(len(SIZES)):
            b_sum = _tma_group_sum(descs, STARTS[g], SIZES[g], b, TOK0 + t0, c0, ROWS,
                                   BLOCK_C)
            tl.store(p_out + (g + 1) * C,
                     _round(b_sum / SIZES[g], out.dtype.element_ty, EMULATE_RNE), mask=mask)


# --------------------------------------------------------------------------- configs
#: Features kernel: small tiles keep 13 in-flight layer tiles in registers (no spills, any
#: strides); each thread still loads 16 contiguous bytes of a bf16 layer.
FEATURES_CONFIG = {"BLOCK_M": 16, "BLOCK_C": 64, "num_warps": 4}
#: Layers that cannot be loaded 16 bytes at a time (channel stride != 1, misaligned views):
#: scalar loads need more registers per element; narrower tiles keep them spill-free.
FEATURES_CONFIG_SCALAR = {"BLOCK_M": 16, "BLOCK_C": 32, "num_warps": 4}
FEATURES_CONFIG_INTERPRET = {"BLOCK_M": 16, "BLOCK_C": 16, "num_warps": 4}
#: STI features kernel, one launch of both parts: 8 warps over 16 x 64 pooled tiles
#: (``BLOCK_P``) keep 13-layer groups with arbitrary strides and int64 offsets spill-free; the
#: base copy takes 64 x 64 tiles (two 16-byte loads of a bf16 layer per thread, no more
#: registers than the pooled part: 30-32 with triton 3.9), so a copy program's share of the
#: launch's straight-line code is spread over 4x the bytes of a 16-row tile (the static model
#: counts both parts' code for every program: 16-row copies made one image issue-bound).
STI_FEATURES_CONFIG = {"BLOCK_M": 64, "BLOCK_P": 16, "BLOCK_C": 64, "num_warps": 8}
#: The same beside the GEMM (the overlapped path's image chunks after the first): one CTA
#: per SM in what a 128 x 256 GEMM CTA leaves (~8 K registers): 4 warps of <= 64 registers.
STI_FEATURES_CONFIG_BESIDE = {"BLOCK_M": 64, "BLOCK_P": 16, "BLOCK_C": 64, "num_warps": 4}
#: The same under the interpreter (small tiles: the tests' ragged shapes cross tile edges).
STI_FEATURES_CONFIG_INTERPRET = {"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_C": 16, "num_warps": 4}
#: TMA features kernel (sm_90), alone on the GPU: 8 x 64 tiles, a 3-deep ring (~50 KiB of
#: shared memory, 44-96 registers with triton 3.9 / 3.6), 4 programs per SM: every program
#: keeps two tiles of every layer (~50 KiB) in flight.
FEATURES_TMA_CONFIG = {"ROWS": 8, "BLOCK_C": 64, "num_warps": 4, "STAGES": 3,
                       "programs_per_sm": 4}
#: The same beside the GEMM (overlapped path, chunks after the first): one program per SM in
#: what a 128 x 256 GEMM CTA leaves (~8 K registers, ~51 KiB of shared memory): 2 warps, a
#: 2-deep ring (~26 KiB), one tile of every layer in flight. Same ROWS: chunks are row tiles.
FEATURES_TMA_CONFIG_BESIDE = {"ROWS": 8, "BLOCK_C": 64, "num_warps": 2, "STAGES": 2,
                              "programs_per_sm": 1}
FEATURES_TMA_CONFIG_INTERPRET = {"ROWS": 4, "BLOCK_C": 16, "num_warps": 4, "STAGES": 1,
                                 "programs_per_sm": 1}
#: Registers a features CTA beside an overlapped-path GEMM CTA may hold: what 8 GEMM warps
#: capped at ``gemm_tma.OVERLAP_GEMM_MAXNREG`` (224) leave of the SM's 65,536. The beside
#: configs are built with ``maxnreg`` = this over their threads (2 TMA warps: 128, 4 STI
#: warps: 64; STI's fp32 tiles need more and stay uncapped), so the pair fits by construction
#: whatever the compiler's own count (``benchmarks.static.overlap_residency_problems`` checks
#: the builds).
BESIDE_GEMM_REGISTERS = 8192


def _beside_regs(num_warps: int, beside_gemm: bool) -> dict:
    # the beside configs' register cap
    if not beside_gemm:
        return {}
    return common.maxnreg_option(BESIDE_GEMM_REGISTERS // (32 * num_warps))


#: programs of the persistent grid under the interpreter (fewer than tiles: the loop is tested)
INTERPRET_PROGRAMS = 3


# --------------------------------------------------------------------------- launchers
def _vector_ok(t: torch.Tensor) -> bool:
    # 16-byte loads as the JIT compiles them: a unit channel stride, a 16-byte aligned base,
    # and image/token strides and a channel count the binder marks divisible by 16 (elements;
    # it gives no hint for e.g. 200, so a [.., 200]-channel layer with 400-byte rows still
    # gets scalar loads, which the wide config's registers do not hold on sm_120)
    return (t.stride(2) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0
            and t.stride(1) % 16 == 0 and t.shape[2] % 16 == 0)


class FeaturesLaunch:
    """A features launch prepared once per input signature (shapes, strides, alignment, dtype,
    device, spec): which kernel, its layer-entry order, constants and grid. Calling it with
    hidden states of that signature allocates the output and launches, nothing else."""

    __slots__ = ("kind", "index", "out_shape", "dtype", "device", "parts")

    def __call__(self, hidden_states) -> torch.Tensor:
        out = common.empty(self.out_shape, self.dtype, self.device)
        if self.kind == "empty":
            return out
        # one chunk of every row (DCI/SCI) or of every image (STI)
        return self.parts(hidden_states, out)


def prepare_features(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec, batch: int,
                     tokens: int, channels: int) -> FeaturesLaunch:
    """The :class:`FeaturesLaunch` of these (validated) inputs: :func:`features_triton` without
    ``out``/``rows``, split into what depends on the signature only and the launch."""
    base = hidden_states[spec.final_layer]
    common.check_launchable(base.device, base.dtype)
    launch = FeaturesLaunch()
    launch.dtype, launch.device = base.dtype, base.device
    t_keep = spec.tokens_kept(tokens)
    launch.out_shape = (batch, spec.out_tokens(tokens), spec.out_channels(channels))
    entries, starts, sizes = common.layer_entries(hidden_states, spec)
    launch.index = common.entry_indices(spec)
    sb, st, sc = common.strides(entries)
    M = batch * t_keep
    if M == 0 or channels == 0 or 0 in launch.out_shape:
        launch.kind = "empty"
        return launch
    if spec.connector_type == "sti":
        launch.kind = "sti"
        launch.parts = prepare_sti_chunk(hidden_states, spec, batch, tokens, channels)
        return launch
    launch.kind = "chunk"
    tiles = (0, row_tiles(spec, batch, tokens)) if features_tma_eligible(entries, base.device) \
        else None
    launch.parts = prepare_features_chunk(hidden_states, spec, batch, tokens, channels,
                                          tiles=tiles)
    return launch


class StiChunkLaunch:
    """STI features of the images ``[b0, b1)`` written into a given A, prepared once
    (:func:`prepare_sti_chunk`; the overlapped path's image chunks, or every image):
    ``launch(hidden_states, out)`` runs ``_sti_features_kernel`` on those images of the layers
    (batch slices: views, no copies) into the same images of ``out``, a contiguous
    ``[B, T' + G*TP, C]`` A of the layout it was prepared for."""

    __slots__ = ("kind", "index", "images", "whole", "args", "meta", "site")

    def __call__(self, hidden_states, out: torch.Tensor) -> torch.Tensor:
        if self.kind == "empty":
            return out
        if self.whole:
            entries = tuple([hidden_states[i] for i in self.index])
            part = out
        else:
            b0, b1 = self.images
            entries = tuple([hidden_states[i][b0:b1] for i in self.index])
            part = out[b0:b1]
        # one launch: the base copy and the pooled tokens
        self.site((entries, *self.args[:3], part, *self.args[3:]), self.meta)
        return out


def sti_chunks_aligned(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                       tokens: int, channels: int) -> bool:
    """Whether image chunks of STI keep every pointer's 16-byte alignment (a chunk's layer
    slices and A slice start whole 16-byte multiples after the tensors): each read layer's
    batch stride and A's per-image rows ``(T' + G*TP) C`` are 16-byte multiples. The launches
    of a plan are specialized on the first call's pointers; with these, a later call's slices
    are aligned exactly as its tensors are."""
    entries, _, _ = common.layer_entries(hidden_states, spec)
    e = entries[0].element_size()
    return all((x.stride(0) * e) % 16 == 0 for x in entries) and \
        (spec.out_tokens(tokens) * channels * e) % 16 == 0


def prepare_sti_chunk(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec, batch: int,
                      tokens: int, channels: int, images: Optional[Tuple[int, int]] = None,
                      beside_gemm: bool = False) -> StiChunkLaunch:
    """The :class:`StiChunkLaunch` writing the STI features of images ``images = (b0, b1)``
    (default: all ``batch``) of ``hidden_states`` into A. ``beside_gemm``: the config that
    fits beside a GEMM CTA (:data:`STI_FEATURES_CONFIG_BESIDE`). A chunk of fewer than all
    images needs :func:`sti_chunks_aligned` (ValueError otherwise)."""
    b0, b1 = images if images is not None else (0, batch)
    if not 0 <= b0 <= b1 <= batch:
        raise ValueError(f"images {images} outside the batch of {batch}")
    launch = StiChunkLaunch()
    launch.index = common.entry_indices(spec)
    launch.images = (b0, b1)
    launch.whole = (b0, b1) == (0, batch)
    if not launch.whole and not sti_chunks_aligned(hidden_states, spec, tokens, channels):
        raise ValueError("STI image chunks need 16-byte multiples of every read layer's batch "
                         "stride and of A's rows per image (sti_chunks_aligned)")
    t_keep = spec.tokens_kept(tokens)
    n = b1 - b0
    if n == 0 or t_keep == 0 or channels == 0:
        launch.kind = "empty"
        return launch
    launch.kind = "sti"
    entries, starts, sizes = common.layer_entries(hidden_states, spec)
    sb, st, sc = common.strides(entries)
    tp = spec.pooled_tokens(tokens)
    out_shape = (n, spec.out_tokens(tokens), channels)
    out_strides = (out_shape[1] * channels, channels)
    flags = common.layout_flags(entries, common.StandIn(out_shape, out_strides))
    cfg = STI_FEATURES_CONFIG_INTERPRET if common.interpreting() else \
        STI_FEATURES_CONFIG_BESIDE if beside_gemm else STI_FEATURES_CONFIG
    pooled_tiles = spec.num_groups * triton.cdiv(n * tp, cfg["BLOCK_P"])
    grid = (pooled_tiles + triton.cdiv(n * t_keep, cfg["BLOCK_M"]),
            triton.cdiv(channels, cfg["BLOCK_C"]))
    launch.args = (sb, st, sc, *out_strides, n, channels, t_keep, tp, pooled_tiles)
    launch.meta = dict(POOL=spec.pool_size, TOK0=spec.token_offset, STARTS=starts, SIZES=sizes,
                       **flags, **cfg,
                       # (fp32 tiles need more than 64 registers: uncapped, beside the fp32
                       # GEMM, which is not the capped 16-bit TMA one)
                       **_beside_regs(cfg["num_warps"],
                                      beside_gemm and entries[0].element_size() == 2))
    launch.site = DirectLaunch(_sti_features_kernel, grid)
    return launch


class FeaturesChunkLaunch:
    """DCI/SCI features of one row range written into a given A, prepared once (the
    overlapped path's chunks; :func:`features_triton` with ``rows`` and :func:`features_tma`
    with ``tiles`` prepare one and run it): kernel, row range, constants, grid.
    ``launch(hidden_states, out)`` launches into ``out``, of the layout it was prepared for."""

    __slots__ = ("kind", "index", "args", "meta", "site")

    def __call__(self, hidden_states, out: torch.Tensor) -> torch.Tensor:
        if self.kind == "empty":
            return out
        entries = tuple([hidden_states[i] for i in self.index])
        if self.kind == "tma":
            _ensure_allocator()
            self.site((entries, *self.args[:2], out, *self.args[2:]), self.meta)
        else:
            self.site((entries, *self.args[:3], out, *self.args[3:]), self.meta)
        return out


def prepare_features_chunk(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                           batch: int, tokens: int, channels: int,
                           rows: Optional[Tuple[int, int]] = None,
                           tiles: Optional[Tuple[int, int]] = None,
                           programs: Optional[int] = None,
                           beside_gemm: bool = False) -> FeaturesChunkLaunch:
    """The :class:`FeaturesChunkLaunch` writing rows ``r0 <= b*T' + t < r1`` of ``out`` with
    the LDG kernel (``rows``), or row tiles ``[q0, q1)`` of :func:`row_tiles` with the TMA
    kernel (``tiles``; checked eligible; ``programs``: the persistent grid, default
    ``_tma_programs``; ``beside_gemm``: :data:`FEATURES_TMA_CONFIG_BESIDE`). DCI/SCI only;
    the launch writes a contiguous ``[B, T', (G+1)C]`` A (the callers check theirs)."""
    launch = FeaturesChunkLaunch()
    base = hidden_states[spec.final_layer]
    t_keep = spec.tokens_kept(tokens)
    width = spec.out_channels(channels)
    entries, starts, sizes = common.layer_entries(hidden_states, spec)
    launch.index = common.entry_indices(spec)
    sb, st, sc = common.strides(entries)
    flags = common.layout_flags(entries, common.StandIn((batch, t_keep, width),
                                                        (t_keep * width, width, 1)))
    if tiles is not None:
        cfg = _tma_config(beside_gemm)
        q0, q1 = tiles
        n_tiles = max(0, q1 - q0) * triton.cdiv(channels, cfg["BLOCK_C"])
        if n_tiles == 0:
            launch.kind = "empty"
            return launch
        programs = max(1, min(programs, n_tiles)) if programs is not None \
            else _tma_programs(n_tiles, base.device, cfg, len(entries), base.element_size())
        stages = cfg["STAGES"] if beside_gemm else \
            _tma_stages(n_tiles, programs, base.device, cfg, len(entries),
                        base.element_size())
        launch.kind = "tma"
        launch.args = (sb, st, width, batch, tokens, channels, t_keep, q0, q1)
        launch.meta = dict(TOK0=spec.token_offset, STARTS=starts, SIZES=sizes,
                           OFF64=flags["OFF64"], EMULATE_RNE=flags["EMULATE_RNE"],
                           ROWS=cfg["ROWS"], BLOCK_C=cfg["BLOCK_C"], NUM_PROGRAMS=programs,
                           STAGES=stages, num_warps=cfg["num_warps"],
                           **_beside_regs(cfg["num_warps"], beside_gemm))
        launch.site = DirectLaunch(_features_tma_kernel, (programs,))
        return launch
    r0, r1 = rows if rows is not None else (0, batch * t_keep)
    if r1 <= r0 or channels == 0:
        launch.kind = "empty"
        return launch
    if common.interpreting():
        cfg = FEATURES_CONFIG_INTERPRET
    else:
        cfg = FEATURES_CONFIG if all(_vector_ok(e) for e in entries) else FEATURES_CONFIG_SCALAR
    launch.kind = "ldg"
    launch.args = (sb, st, sc, width, r0, r1, channels, t_keep)
    launch.meta = dict(TOK0=spec.token_offset, STARTS=starts, SIZES=sizes, **flags,
                       BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    launch.site = DirectLaunch(
        _features_kernel,
        (triton.cdiv(channels, cfg["BLOCK_C"]) * triton.cdiv(r1 - r0, cfg["BLOCK_M"]),))
    return launch


def features_triton(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                    batch: int, tokens: int, channels: int, out: Optional[torch.Tensor] = None,
                    rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Features with the one-pass Triton kernels (inputs already validated).

    DCI/SCI: ``[B, T', (G+1)C]``, by the persistent TMA kernel where it applies (sm_90,
    TMA-compatible layers: :func:`features_tma_eligible`), else by ``_features_kernel``; STI:
    ``_sti_features_kernel`` writes ``[B, T' + G*(T' // pool), C]``.

    DCI/SCI only: ``out`` (a contiguous ``[B, T', (G+1)C]`` tensor) receives the features
    instead of a new tensor, and ``rows = (r0, r1)`` restricts the launch to the rows
    ``r0 <= b*T' + t < r1`` of it (the overlapped linear path fills A chunk by chunk).
    """
    if out is None and rows is None:
        return prepare_features(hidden_states, spec, batch, tokens, channels)(hidden_states)
    base = hidden_states[spec.final_layer]
    common.check_launchable(base.device, base.dtype)
    if spec.connector_type == "sti":
        raise ValueError("out= and rows= are for channel (DCI/SCI) specs")
    t_keep = spec.tokens_kept(tokens)
    width = spec.out_channels(channels)
    if out is None:
        out = common.empty((batch, t_keep, width), base.dtype, base.device)
    elif (tuple(out.shape) != (batch, t_keep, width) or not out.is_contiguous()
          or out.dtype != base.dtype or out.device != base.device):
        # the kernels write rows of ``width`` elements at ``out + row * width``
        raise ValueError(f"out must be a contiguous {(batch, t_keep, width)} {base.dtype} tensor "
                         f"on {base.device}; got {tuple(out.shape)} {out.dtype} on {out.device}, "
                         f"strides {out.stride()}")
    M = batch * t_keep
    r0, r1 = rows if rows is not None else (0, M)
    if not 0 <= r0 <= r1 <= M:
        raise ValueError(f"rows {rows} outside the features' {M} rows")
    return prepare_features_chunk(hidden_states, spec, batch, tokens, channels,
                                  rows=(r0, r1))(hidden_states, out)


# --------------------------------------------------------------------------- TMA launcher
def _ensure_allocator() -> None:
    # tl.make_tensor_descriptor needs a global scratch buffer: give Triton a torch allocator
    # unless the user installed one (a ContextVar: set per thread)
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        def alloc(size: int, alignment: int, stream):
            device = "cpu" if common.interpreting() else "cuda"
            return torch.empty(size, dtype=torch.int8, device=device)
        triton.set_allocator(alloc)


def _tma_3d_ok(t: torch.Tensor) -> bool:
    e = t.element_size()
    return (t.stride(2) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * e) % 16 == 0
            and (t.stride(1) * e) % 16 == 0 and t.shape[2] * e >= 16
            and max(t.shape) < 2 ** 31)


#: Tests set this to False to run the LDG kernel where the TMA kernel would be chosen.
USE_TMA = True


def features_tma_eligible(entries, device: torch.device) -> bool:
    """Whether the TMA features kernel applies: an sm_90 card
    (:func:`dc_kernels.ops.gemm_tma.tma_kernels_serve`) or the interpreter, and every layer
    laid out as TMA requires (unit channel stride, 16-byte aligned base and strides)."""
    if not USE_TMA:
        return False
    if not common.interpreting():
        from .gemm_tma import _cuda_device, tma_kernels_serve
        if not _cuda_device(entries[0]) or not tma_kernels_serve(device.index or 0):
            return False
    return all(_tma_3d_ok(e) for e in entries)


def row_tiles(spec: ConnectorSpec, batch: int, tokens: int) -> int:
    """Row tiles of the TMA features kernel (``batch * cdiv(T', ROWS)``)."""
    rows = _tma_config()["ROWS"]
    return batch * triton.cdiv(spec.tokens_kept(tokens), rows)


def row_of_tile(spec: ConnectorSpec, tokens: int, q: int) -> int:
    """The first feature row of row tile ``q`` (tiles never straddle images)."""
    rows = _tma_config()["ROWS"]
    t_keep = spec.tokens_kept(tokens)
    per_image = triton.cdiv(t_keep, rows)
    return (q // per_image) * t_keep + min(t_keep, (q % per_image) * rows)


#: Programs per SM of the persistent TMA features kernel, fewer than ``programs_per_sm`` at
#: small M: each program first creates one device-side descriptor per layer entry (3,384
#: instructions per warp for CLIP DCI's 25 entries in the sm_90 SASS, ~4.5 tiles' worth at 757
#: per tile), so a program should walk at least ``MIN_TILES_PER_PROGRAM`` tiles -- as long as
#: the SM keeps ``INFLIGHT_PER_SM`` bytes of loads in flight (3 TB/s x 1.3 us / 132 SMs ~ 30 KB:
#: full bandwidth by Little's law) and two warps per scheduler (8 warps) to issue from.
#: CLIP DCI at 1 image: 264 programs instead of 528 (DRAM-bound instead of issue-bound by the
#: static model); SCI keeps 4 per SM (3 layers: 6 KiB in flight per program); 16 images keep 4.
MIN_TILES_PER_PROGRAM = 8
INFLIGHT_PER_SM = 32 * 1024


def _tma_programs(n_tiles: int, device: torch.device, cfg, entries: int, element_size: int
                  ) -> int:
    # programs of the persistent grid: whole multiples of the SMs (see MIN_TILES_PER_PROGRAM)
    if common.interpreting():
        return max(1, min(INTERPRET_PROGRAMS, n_tiles))
    from .gemm_tma import _num_sms
    sms = _num_sms(device.index or 0)
    inflight = max(1, cfg["STAGES"] - 1) * entries * cfg["ROWS"] * cfg["BLOCK_C"] * element_size
    per_sm = cfg["programs_per_sm"]
    while (per_sm > 1 and triton.cdiv(n_tiles, sms * per_sm) < MIN_TILES_PER_PROGRAM
           and (per_sm - 1) * inflight >= INFLIGHT_PER_SM
           and (per_sm - 1) * cfg["num_warps"] >= 8):
        per_sm -= 1
    return max(1, min(sms * per_sm, n_tiles))


#: Bytes of loads the TMA features kernel's ring should keep in flight per SM: an H200's
#: ~4.3 TB/s x 1.3 us / 132 SMs ~ 42 KB, with margin (an H100 needs ~30 KB). Few layers (SCI:
#: 3 x 1 KiB per 16-bit tile) keep 6 KiB per program with ``STAGES`` = 3, 24 KiB per SM: a
#: deeper ring makes up for them, up to ``MAX_TMA_STAGES``.
INFLIGHT_RING_PER_SM = 48 * 1024
MAX_TMA_STAGES = 6
#: shared memory the deeper rings of one SM's programs may take (sm_90 has 227 KiB per block,
#: 228 KiB per SM; the default ring's 50 KiB x 4 programs stays as configured)
RING_SHARED_PER_SM = 160 * 1024


def _tma_stages(n_tiles: int, programs: int, device: torch.device, cfg, entries: int,
                element_size: int) -> int:
    # ring depth of the persistent TMA kernel alone on the GPU: the configured STAGES, deeper
    # where that keeps fewer than INFLIGHT_RING_PER_SM bytes of loads in flight per SM and
    # every program walks MIN_TILES_PER_PROGRAM tiles or more (a ring reaches only as far
    # ahead as its program's own tiles, and a deeper one lengthens the prologue: one CLIP SCI
    # image, ~2 tiles per program, would take 1,472 instead of 1,156 instructions per warp)
    stages = cfg["STAGES"]
    if common.interpreting() or triton.cdiv(n_tiles, programs) < MIN_TILES_PER_PROGRAM:
        return stages
    from .gemm_tma import _num_sms
    per_sm = triton.cdiv(programs, _num_sms(device.index or 0))
    tile = entries * cfg["ROWS"] * cfg["BLOCK_C"] * element_size
    while ((stages - 1) * tile * per_sm < INFLIGHT_RING_PER_SM and stages < MAX_TMA_STAGES
           and (stages + 1) * tile * per_sm <= RING_SHARED_PER_SM):
        stages += 1
    return stages


def _tma_config(beside_gemm: bool = False):
    if common.interpreting():
        return FEATURES_TMA_CONFIG_INTERPRET
    return FEATURES_TMA_CONFIG_BESIDE if beside_gemm else FEATURES_TMA_CONFIG


def features_tma(hidden_states, spec: ConnectorSpec, batch: int, tokens: int, channels: int,
                 out: torch.Tensor, tiles: Optional[Tuple[int, int]] = None,
                 programs: Optional[int] = None, beside_gemm: bool = False) -> torch.Tensor:
    """DCI/SCI features with the persistent TMA kernel (checked eligible), row tiles
    ``tiles = (q0, q1)`` of :func:`row_tiles` (default all) written into ``out``.
    ``beside_gemm``: the launch shares the SMs with the GEMM (:data:`FEATURES_TMA_CONFIG_BESIDE`).
    """
    tiles = tiles if tiles is not None else (0, row_tiles(spec, batch, tokens))
    return prepare_features_chunk(hidden_states, spec, batch, tokens, channels,
                                  tiles=tiles, programs=programs,
                                  beside_gemm=beside_gemm)(hidden_states, out)
