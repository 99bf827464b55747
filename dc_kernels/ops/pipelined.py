"""The pipelined first layer: one features launch and one GEMM launch running at once, the
GEMM's tiles waiting on per-row-block ready counts instead of on a stream boundary.

The overlapped path (:class:`.overlap.OverlapLaunch`) hides the features pass under the GEMM in
row chunks, but pays the first chunk's features alone and one GEMM launch per chunk (a whole
wave each, its tail, its fixed cost). Here the whole GEMM is one persistent launch:

* ``_features_helper_kernel`` (side stream, one program per SM beside the GEMM's CTAs; beside
  the stream-K GEMM below, :func:`.schedule.split_helpers` programs, one per unit of a slab at one
  CLIP image, with wider steps): each program claims *units* of A by ticket (an atomic
  counter: units are produced in ticket order), writes the unit with the features kernel's pointer-load body (``_produce_unit``;
  Triton's pipeliner keeps the next channel step's loads in flight as ``cp.async`` copies)
  and *publishes* it: a CTA barrier, then a ``release`` add on the ready count of each GEMM
  row block the unit's rows fall in. A unit is a row tile (``ROWS`` rows) of every slab, or,
  for the stream-K GEMM below, of one slab.
* ``_gemm_ready_kernel`` (current stream, persistent, the Hopper TMA GEMM's K loop and
  epilogue). With whole tiles, each program claims output tiles by ticket, in the grouped
  order, and before a tile's K loop waits until its row block's ready count reaches the
  number of row tiles overlapping it (an ``acquire`` load), then issues
  ``fence.proxy.async.global`` (A was written by generic stores of other SMs and is read by
  TMA, the async proxy) and runs the tile. Where whole tiles would leave SMs idle (e.g. one
  CLIP image: 80 tiles of 128 x 256 for 132 SMs; :func:`.schedule.pipelined_stream_k`) and the
  replayed schedule says so (:func:`.path.pipelined_stream_k_programs`, which also picks
  the programs), it runs *stream K over the slabs*: units are (slab, row tile), slab-major,
  with a ready count per slab and row block; program p of P runs the same positions
  ``[p S // P, (p + 1) S // P)`` of every slab's S-position (tile, K step) sequence, slab by slab, each slab's steps once that slab of the row
  block is ready -- so slab 0 (the base layer, a copy) is multiplied while the helper still
  averages the groups -- and a tile shared by several programs is finished by the last to
  arrive, which sums the fp32 partials in K order (:mod:`.gemm_tma`'s stream K).

No wait can depend on a program that has not started: a GEMM program that finds its count
short while some unit it needs is *not yet claimed* claims the next unit itself and produces
it (the same body: same sums, same order) instead of spinning; it spins only once every unit
it needs has been claimed -- by running programs, which finish without waiting on anything.
No GEMM program waits on another GEMM program. So the GEMM completes even if the helper never
becomes resident (and under the interpreter, which runs programs one after another). Results
are deterministic: every row of A is the features kernel's, bit for bit, whoever writes it;
every output tile is the TMA GEMM's K loop (stream K: partials summed in K order) and
epilogue.

The counts live in the per-(device, stream) zeroed int32 buffer of the stream-K arrivals
(:func:`.gemm_tma._arrivals`): ``[0]`` the unit ticket, ``[1]`` the output-tile ticket,
``[2]`` GEMM programs done, ``[3]`` helper programs done, then the ready counts (one per row
block; stream K: one per slab and row block, then the split tiles' arrivals). The GEMM's last
program waits for every helper program to have finished (the helper never waits on the GEMM,
and starts once SMs free up), then zeroes them all, so the buffer is zero again for the next
launch on the stream.

16-bit operands only (the 128 x 256 tiles of the overlapped path's GEMM); sm_90 with TMA
layouts, or the interpreter. :func:`pipelined_eligible` says when it applies;
:func:`prepare_pipelined` prepares a launch. ``docs/DESIGN.md`` §5.2.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import common
from .direct import DirectLaunch
from .common import _tile_offsets
from .features import _ldg_slab, _ldg_tile
from .gemm_tma import _k_range, _k_steps, _segment_epilogue, _tile_epilogue, _tile_origin

__all__ = ["pipelined_eligible", "prepare_pipelined", "PipelinedLaunch", "HELPER",
           "HELPER_ROW_TILES", "STREAM_K", "STREAM_K_ITERS", "REVERSE_PROGRAMS", "PRODUCE_C",
           "PRODUCE_C_INTERPRET"]

#: ``[0]`` row-tile ticket, ``[1]`` output-tile ticket, ``[2]`` GEMM programs done, ``[3]``
#: helper programs done; the ready counts follow
_HEAD = 4


@triton.jit
def _fence_proxy_async(THREADS: tl.constexpr):
    # every thread: order its view of generic-proxy writes (acquired from other SMs) before its
    # later async-proxy (TMA) reads of the same global memory
    tl.inline_asm_elementwise("fence.proxy.async.global; mov.u32 $0, $1;", "=r,r",
                              [tl.arange(0, THREADS)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _row_tile_rows(q, T_KEEP, PER_IMAGE, ROWS: tl.constexpr):
    # features row tile q: its image, first token, and rows [r0, r1) of A (tiles never
    # straddle images: PER_IMAGE = cdiv(T', ROWS) per image)
    b = q // PER_IMAGE
    t0 = (q % PER_IMAGE) * ROWS
    r0 = b * T_KEEP + t0
    r1 = b * T_KEEP + tl.minimum(T_KEEP, t0 + ROWS)
    return b, t0, r0, r1


@triton.jit
def _row_tile_of(row, T_KEEP, PER_IMAGE, ROWS: tl.constexpr):
    # the features row tile holding row ``row`` of A
    return (row // T_KEEP) * PER_IMAGE + (row % T_KEEP) // ROWS


@triton.jit
def _publish(cnt, r0, r1, BLOCK_M: tl.constexpr):
    # every thread's stores of the unit happen before the barrier; one thread's release add
    # per GEMM row block the rows [r0, r1) fall in (at most two; ``cnt``: the counts of the
    # unit's slab, or of every slab) makes them visible with it
    tl.debug_barrier()
    blk0 = r0 // BLOCK_M
    blk1 = (r1 - 1) // BLOCK_M
    tl.atomic_add(cnt + blk0, 1, sem="release", scope="gpu")
    if blk1 != blk0:
        tl.atomic_add(cnt + blk1, 1, sem="release", scope="gpu")


@triton.jit
def _features_helper_kernel(
    layers, stride_b, stride_t, stride_c,  # tuples, one entry per layer argument
    out, stride_om,  # A [B*T', (G+1)*C], unit channel stride
    state,  # int32 counts (see the module docstring)
    C, T_KEEP, Q,  # Q: features row tiles, B * cdiv(T', ROWS)
    PM,  # GEMM row blocks (SPLIT: the ready counts of slab s start at 4 + s * PM)
    LIMIT,  # units one program may claim (tests: leave some to the GEMM)
    TOK0: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr, UNIFORM: tl.constexpr,
    OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    SPLIT: tl.constexpr,  # units are (slab, row tile), slab-major (the stream-K GEMM's)
    STAGES: tl.constexpr,
):
    # claims units by ticket and produces each with the GEMM's own producer (pointer loads,
    # the features kernel's body), BLOCK_C channels at a time, then publishes it
    per_image = tl.cdiv(T_KEEP, ROWS)
    if SPLIT:
        units = Q * (len(SIZES) + 1)
    else:
        units = Q
    taken = 0
    u = tl.atomic_add(state, 1, sem="relaxed", scope="gpu")
    while u < units:
        _produce_unit(u, layers, stride_b, stride_t, stride_c, out, stride_om, state, C,
                      T_KEEP, per_image, Q, PM, TOK0, STARTS, SIZES, UNIFORM, OFF64,
                      EMULATE_RNE, ROWS, BLOCK_C, BLOCK_M, SPLIT, STAGES)
        taken += 1
        u = units  # a claimed unit is always produced: claim only while allowed to
        if taken < LIMIT:
            u = tl.atomic_add(state, 1, sem="relaxed", scope="gpu")
    # this program touches nothing more: the GEMM's last program may reset the counts
    tl.atomic_add(state + 3, 1, sem="release", scope="gpu")


@triton.jit
def _produce_unit(u, layers, stride_b, stride_t, stride_c, out, stride_om, state, C,
                  T_KEEP, PER_IMAGE, Q, PM, TOK0: tl.constexpr, STARTS: tl.constexpr,
                  SIZES: tl.constexpr, UNIFORM: tl.constexpr, OFF64: tl.constexpr,
                  EMULATE_RNE: tl.constexpr, ROWS: tl.constexpr, PRODUCE_C: tl.constexpr,
                  BLOCK_M: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr = 1):
    # a GEMM program's own production of unit u (pointer loads, the features kernel's tile
    # body: the same sums in the same order as the helper's), then its publication
    if SPLIT:
        s = u // Q
        q = u - s * Q
    else:
        q = u
    b, t0, r0, r1 = _row_tile_rows(q, T_KEEP, PER_IMAGE, ROWS)
    o_t = t0 + tl.arange(0, ROWS)
    m_t = o_t < T_KEEP
    if OFF64:
        o_row = b.to(tl.int64) * T_KEEP + o_t
    else:
        o_row = b * T_KEEP + o_t
    if SPLIT:
        # one slab: a channel loop of its own per slab (only the unit's runs)
        for sl in tl.static_range(len(SIZES) + 1):
            if s == sl:
                for c0 in tl.range(0, C, PRODUCE_C, num_stages=STAGES):
                    o_c = c0 + tl.arange(0, PRODUCE_C)
                    mask = m_t[:, None] & (o_c < C)[None, :]
                    p_out = out + o_row[:, None] * stride_om + o_c[None, :]
                    o_x = _tile_offsets(stride_b[0], stride_t[0], stride_c[0], b, o_t + TOK0,
                                        o_c, OFF64)
                    _ldg_slab(layers, stride_b, stride_t, stride_c, o_x, p_out, b, o_t + TOK0,
                              o_c, mask, C, sl, STARTS, SIZES, UNIFORM, OFF64, EMULATE_RNE,
                              ROWS, PRODUCE_C)
    else:
        for c0 in tl.range(0, C, PRODUCE_C, num_stages=STAGES):
            o_c = c0 + tl.arange(0, PRODUCE_C)
            mask = m_t[:, None] & (o_c < C)[None, :]
            p_out = out + o_row[:, None] * stride_om + o_c[None, :]
            _ldg_tile(layers, stride_b, stride_t, stride_c, p_out, b, o_t + TOK0, o_c, mask,
                      C, STARTS, SIZES, UNIFORM, OFF64, EMULATE_RNE, ROWS, PRODUCE_C)
    if SPLIT:
        _publish(state + 4 + s * PM, r0, r1, BLOCK_M)
    else:
        _publish(state + 4, r0, r1, BLOCK_M)


@triton.jit
def _wait_ready(cnt, need, last, units, state, layers, stride_b, stride_t, stride_c, out,
                stride_om, C, T_KEEP, PER_IMAGE, Q, PM, TOK0: tl.constexpr,
                STARTS: tl.constexpr, SIZES: tl.constexpr, UNIFORM: tl.constexpr,
                OFF64: tl.constexpr, EMULATE_RNE: tl.constexpr, ROWS: tl.constexpr,
                PRODUCE_C: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr):
    # until ``*cnt`` reaches ``need`` (acquire): while units up to ``last`` (the last one
    # this count waits for, in ticket order) are unclaimed, claim the next and produce it
    # instead of waiting on a program that may not have started
    seen = tl.atomic_add(cnt, 0, sem="acquire", scope="gpu")
    while seen < need:
        if tl.atomic_add(state, 0, sem="relaxed", scope="gpu") <= last:
            u = tl.atomic_add(state, 1, sem="relaxed", scope="gpu")
            if u < units:
                _produce_unit(u, layers, stride_b, stride_t, stride_c, out, stride_om, state,
                              C, T_KEEP, PER_IMAGE, Q, PM, TOK0, STARTS, SIZES, UNIFORM,
                              OFF64, EMULATE_RNE, ROWS, PRODUCE_C, BLOCK_M, SPLIT)
        seen = tl.atomic_add(cnt, 0, sem="acquire", scope="gpu")


@triton.jit
def _gemm_ready_kernel(
    a_desc, w_desc, o_desc, p_desc,  # A [M, K], W [N, K], out and pre [M, N]: TMA descriptors
    bias,
    state,  # int32 counts (see the module docstring)
    ws,  # stream K: fp32 partials [tiles * PARTS, BLOCK_M, BLOCK_N] (else unused)
    layers, stride_b, stride_t, stride_c,  # tuples, one entry per layer argument
    feats, stride_am,  # A again, for the program's own units (pointer stores)
    M, N, K, C, T_KEEP, Q,
    HELPERS,  # programs of the helper launch (0: none was launched)
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
    EMULATE_RNE: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PIECES: tl.constexpr,
    TOK0: tl.constexpr, STARTS: tl.constexpr, SIZES: tl.constexpr, UNIFORM: tl.constexpr,
    OFF64: tl.constexpr, ROWS: tl.constexpr, PRODUCE_C: tl.constexpr,
    FENCE: tl.constexpr, THREADS: tl.constexpr, R_BLOCK: tl.constexpr,
    SEGMENTS: tl.constexpr = 0,  # stream K: the most tiles one program's steps touch (0: off)
    PARTS: tl.constexpr = 1,  # stream K: the most programs one tile's steps are spread over
    WHOLE: tl.constexpr = False,  # stream K: a program's range may hold a whole tile
    REVERSED: tl.constexpr = False,  # tests: stream K's program i runs (programs - 1 - i)'s
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    per_image = tl.cdiv(T_KEEP, ROWS)
    SLABS: tl.constexpr = len(SIZES) + 1
    if SEGMENTS == 0:
        # whole tiles claimed by ticket in grouped order; a tile waits for every slab of its
        # row block (units: whole row tiles)
        tile = tl.atomic_add(state + 1, 1, sem="relaxed", scope="gpu")
        while tile < num_tiles:
            o_am, o_wn = _tile_origin(tile, num_pid_m, num_pid_n, GROUP_M, BLOCK_M, BLOCK_N)
            blk = o_am // BLOCK_M
            last = _row_tile_of(tl.minimum(M, o_am + BLOCK_M) - 1, T_KEEP, per_image, ROWS)
            need = last - _row_tile_of(o_am, T_KEEP, per_image, ROWS) + 1
            _wait_ready(state + 4 + blk, need, last, Q, state, layers, stride_b, stride_t,
                        stride_c, feats, stride_am, C, T_KEEP, per_image, Q, num_pid_m, TOK0,
                        STARTS, SIZES, UNIFORM, OFF64, EMULATE_RNE, ROWS, PRODUCE_C, BLOCK_M,
                        False)
            if FENCE:
                _fence_proxy_async(THREADS)
            b_acc = _k_range(a_desc, w_desc, o_am, o_wn, 0, k_tiles, DOT_FP32,
                             INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            _tile_epilogue(b_acc, o_desc, p_desc, bias, o_am, o_wn, N, HAS_BIAS, ACTIVATION,
                           STORE_PRE, EMULATE_RNE, BLOCK_M, BLOCK_N, PIECES)
            tile = tl.atomic_add(state + 1, 1, sem="relaxed", scope="gpu")
        n_counts = 4 + num_pid_m
    else:
        # stream K over the slabs (units: (slab, row tile), slab-major): program p of P runs
        # the steps [p S // P, (p + 1) S // P) of the S-step (tile, K step of one slab)
        # sequence -- the same
        # tiles and K offsets in every slab, one accumulator per tile it touches -- slab by
        # slab, each slab's steps once that slab of the row block is ready; a shared tile's
        # ranges go through gemm_tma's ticket protocol (the last ticket sums the partials). A
        # GEMM program waits only for ready counts and for ranges past their K loops, which
        # only store: any grid size is deadlock-free
        p = tl.program_id(0)
        if REVERSED:
            p = tl.num_programs(0) - 1 - p
        ks = C // BLOCK_K  # (pipelined_stream_k: C is a multiple of BLOCK_K)
        programs = tl.num_programs(0)
        total = num_tiles * ks
        it0 = p * total // programs
        it1 = (p + 1) * total // programs
        arrivals = state + 4 + SLABS * num_pid_m
        # two segments: the longer first (its last slab is needed later, when more of the
        # helper's units are ready); the order changes no result (partials sum in K order)
        head = tl.minimum(it1, (it0 // ks + 1) * ks) - it0
        swap = (head < it1 - it0 - head).to(tl.int32)
        for j in range(SEGMENTS):
            if SEGMENTS == 2:
                seg = j ^ swap
            else:
                seg = j
            tile = it0 // ks + seg
            t0 = tile * ks
            k_lo = tl.maximum(it0, t0) - t0
            k_hi = tl.minimum(it1, t0 + ks) - t0
            if k_lo < k_hi:
                o_am, o_wn = _tile_origin(tile, num_pid_m, num_pid_n, GROUP_M, BLOCK_M,
                                          BLOCK_N)
                blk = o_am // BLOCK_M
                last = _row_tile_of(tl.minimum(M, o_am + BLOCK_M) - 1, T_KEEP, per_image,
                                    ROWS)
                need = last - _row_tile_of(o_am, T_KEEP, per_image, ROWS) + 1
                b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for sl in tl.static_range(SLABS):
                    _wait_ready(state + 4 + sl * num_pid_m + blk, need, sl * Q + last,
                                SLABS * Q, state, layers, stride_b, stride_t, stride_c, feats,
                                stride_am, C, T_KEEP, per_image, Q, num_pid_m, TOK0, STARTS,
                                SIZES, UNIFORM, OFF64, EMULATE_RNE, ROWS, PRODUCE_C, BLOCK_M,
                                True)
                    if FENCE:
                        _fence_proxy_async(THREADS)
                    b_acc = _k_steps(b_acc, a_desc, w_desc, o_am, o_wn, sl * ks + k_lo,
                                     sl * ks + k_hi, DOT_FP32, INPUT_PRECISION, BLOCK_K)
                _segment_epilogue(b_acc, ws, arrivals, tile, p, t0, ks, total, programs, o_desc,
                                  p_desc, bias, o_am, o_wn, N, HAS_BIAS, ACTIVATION, STORE_PRE,
                                  EMULATE_RNE, BLOCK_M, BLOCK_N, PIECES, PARTS, WHOLE)
        n_counts = 4 + SLABS * num_pid_m  # (the partials' arrivals reset themselves)
    # the last program out waits for the helper's programs to be done, then leaves every count
    # zero for the next launch on this stream
    tl.debug_barrier()
    done = tl.atomic_add(state + 2, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        while tl.atomic_add(state + 3, 0, sem="acquire", scope="gpu") < HELPERS:
            pass
        for r0 in range(0, n_counts, R_BLOCK):
            o_r = r0 + tl.arange(0, R_BLOCK)
            tl.atomic_xchg(state + o_r, 0, mask=o_r < n_counts, sem="relaxed", scope="gpu")


# --------------------------------------------------------------------------- launcher
#: Module switches (tests): ``HELPER`` False launches no helper (the GEMM produces every
#: unit itself); ``HELPER_ROW_TILES`` > 0 caps the units each helper program claims.
HELPER = True
HELPER_ROW_TILES = 0
#: ``STREAM_K`` False: whole tiles always; ``STREAM_K_ITERS`` > 0 forces at most that many K
#: steps of every slab per program, on ``ceil(positions / n)`` programs, wherever a slab is
#: whole K steps (tests), 0: the path rule's choice
STREAM_K = True
STREAM_K_ITERS = 0
#: Sweeps (``python -m benchmarks --sweep``) and tests: ``STREAM_K_PROGRAMS`` > 0 runs stream K
#: over the slabs on that many programs (at most one per position) wherever a slab is whole K
#: steps, ahead of ``STREAM_K_ITERS``; ``HELPER_PROGRAMS`` > 0 launches that many helper
#: programs. 0: the path rule's choices (:func:`.path.pipelined_stream_k_programs`, one
#: helper per SM or :func:`.schedule.split_helpers`)
STREAM_K_PROGRAMS = 0
HELPER_PROGRAMS = 0
#: Tests: stream K's programs take their work last to first (see gemm_tma.REVERSE_PROGRAMS)
REVERSE_PROGRAMS = False
#: Helper programs, one beside every GEMM CTA: 2 warps over 8-row x 128-channel steps of a
#: unit, pointer loads that Triton's pipeliner turns into ``cp.async`` copies one step ahead
#: (``STAGES`` = 2: ~24 KiB of shared memory, every member layer's next step in flight, two
#: 16-byte copies per thread and layer; 48 registers, sm_90, triton 3.9). ``ROWS`` is also the
#: unit of the GEMM programs' own production. The interpreter's: small tiles, so blocks span
#: several units
HELPER_CONFIG = {"ROWS": 8, "BLOCK_C": 128, "num_warps": 2, "STAGES": 2}
#: The stream-K launch's helper: fewer programs (:func:`.schedule.split_helpers`, one per unit of
#: a slab at one CLIP image), each with twice the bytes in flight and the issue rate of the
#: one above: 4 warps over 8 x 256 steps (48 registers, 48 KiB of shared memory for a
#: 12-layer group, sm_90, triton 3.9). Same ``ROWS``: the GEMM programs' own units are the
#: same. Steps narrow to 128 channels where a group's step would need more shared memory than
#: :data:`SPLIT_HELPER_SHARED` (a group of more than 16 layers)
HELPER_CONFIG_SPLIT = {"ROWS": 8, "BLOCK_C": 256, "num_warps": 4, "STAGES": 2}
#: What triton 3.6's stream-K GEMM (161 KiB with its quarter-tile epilogue stores, inference
#: and training; 177 KiB before 2026-12-04) leaves the helper of the SM's 228 KiB, with 1 KiB
#: reserved per CTA, rounded down (triton 3.9's takes 144 KiB). SigLIP's 13-layer groups
#: take 52 KiB steps
SPLIT_HELPER_SHARED = 64 * 1024
HELPER_CONFIG_INTERPRET = {"ROWS": 4, "BLOCK_C": 32, "num_warps": 4, "STAGES": 2}
HELPER_CONFIG_SPLIT_INTERPRET = {"ROWS": 4, "BLOCK_C": 64, "num_warps": 4, "STAGES": 2}
#: Channels per step of a GEMM program's own row-tile production (8 warps over 8 x 256: one
#: 16-byte load per thread and layer); the interpreter's
PRODUCE_C = 256
PRODUCE_C_INTERPRET = 16


#: Register caps (``maxnreg``) that keep one helper CTA resident beside every GEMM CTA: 8 GEMM
#: warps x 216 + 2 helper warps x 160 = the SM's 65,536 registers (without the cap the GEMM
#: builds with 232, and the helper could not sit beside it; the helper itself builds with ~48).
GEMM_MAXNREG = 216
HELPER_MAXNREG = 160
#: The same for training launches (the epilogue also stores Z: triton 3.6 spills at 216)
GEMM_MAXNREG_PRE = 224
HELPER_MAXNREG_PRE = 128
#: The 4-warp stream-K helper's caps: what the GEMM leaves over 128 threads (216 x 256 +
#: 80 x 128 = 65,536; training: 224 x 256 + 64 x 128)
HELPER_MAXNREG_SPLIT = 80
HELPER_MAXNREG_SPLIT_PRE = 64


def _configs():
    from .gemm_tma import GEMM_TMA_CONFIG_INTERPRET, GEMM_TMA_CONFIGS_OVERLAP
    if common.interpreting():
        return GEMM_TMA_CONFIG_INTERPRET, HELPER_CONFIG_INTERPRET, PRODUCE_C_INTERPRET
    return GEMM_TMA_CONFIGS_OVERLAP[0], HELPER_CONFIG, PRODUCE_C


def _helper_launch(split: bool, interp: bool, row_tiles: int, sms: int,
                   group_layers: int = 1, element_size: int = 2):
    """(programs, config, register cap, training register cap) of the helper launch: one
    program per SM (``sms``) over :data:`HELPER_CONFIG` steps, or, beside the stream-K GEMM
    (``split``), :func:`.schedule.split_helpers` programs over :data:`HELPER_CONFIG_SPLIT` steps,
    128 channels wide where one step of the largest group (``group_layers`` layers) would not
    fit :data:`SPLIT_HELPER_SHARED`. The interpreter makes the same choice over
    ``INTERPRET_PROGRAMS`` programs, with its own configs (the split one's wider steps leave
    masked channels where ``C`` < 64)."""
    from .features import INTERPRET_PROGRAMS
    from .schedule import split_helpers
    if interp:
        if split:
            return (split_helpers(row_tiles, INTERPRET_PROGRAMS), HELPER_CONFIG_SPLIT_INTERPRET,
                    HELPER_MAXNREG_SPLIT, HELPER_MAXNREG_SPLIT_PRE)
        return INTERPRET_PROGRAMS, HELPER_CONFIG_INTERPRET, HELPER_MAXNREG, HELPER_MAXNREG_PRE
    if split:
        cfg = dict(HELPER_CONFIG_SPLIT)
        if group_layers * cfg["ROWS"] * cfg["BLOCK_C"] * element_size > SPLIT_HELPER_SHARED:
            cfg["BLOCK_C"] = 128
        return (split_helpers(row_tiles, sms), cfg, HELPER_MAXNREG_SPLIT,
                HELPER_MAXNREG_SPLIT_PRE)
    return sms, HELPER_CONFIG, HELPER_MAXNREG, HELPER_MAXNREG_PRE


def pipelined_eligible(entries, spec, weight: torch.Tensor, out2d_layout_ok: bool) -> bool:
    """Whether the pipelined path can run: a DCI/SCI spec, 16-bit operands, the TMA features
    kernel's layer layout and the TMA GEMM's (sm_90 or the interpreter)."""
    from .features import features_tma_eligible
    from .gemm_tma import _tma_layout_ok
    base = entries[0]
    return (spec.connector_type != "sti" and base.element_size() == 2
            and weight.dtype == base.dtype and out2d_layout_ok
            and features_tma_eligible(entries, base.device) and _tma_layout_ok(weight))


class PipelinedLaunch:
    """The pipelined path prepared for one input signature (see the module docstring):
    constants, grids, descriptor templates. ``launch(hidden_states, weight, bias, out2d,
    pre2d=None)`` allocates A, launches the helper (side stream) and the GEMM (current
    stream), and returns A."""

    __slots__ = ("shape", "dtype", "device", "index", "helper_args", "helper_meta",
                 "helper_meta_pre", "helper_site", "helpers", "gemm_tail", "gemm_meta",
                 "gemm_meta_pre", "gemm_site", "templates", "bias_copy", "state_len",
                 "iters", "programs", "ws_numel")

    def __call__(self, hidden_states, weight, bias, out2d, pre2d=None):
        from .gemm_tma import _arrivals, _clone_desc
        feats = common.empty(self.shape, self.dtype, self.device)
        a2 = feats.view(-1, self.shape[-1])
        entries = tuple([hidden_states[i] for i in self.index])
        state = _arrivals(a2, self.state_len)  # zero; the GEMM's last program re-zeroes it
        if bias is not None and self.bias_copy:
            bias = bias.contiguous()
        ta, tw, to, tp = self.templates
        # stream K: fp32 partial tiles (through common.empty: tests poison them)
        ws = common.empty((self.ws_numel,), torch.float32, self.device) if self.ws_numel \
            else state
        gemm_args = (_clone_desc(ta, a2), _clone_desc(tw, weight), _clone_desc(to, out2d),
                     _clone_desc(tp, pre2d if pre2d is not None else out2d),
                     bias if bias is not None else out2d, state, ws, entries,
                     *self.gemm_tail[:3], a2, *self.gemm_tail[3:])
        meta = self.gemm_meta if pre2d is None else self.gemm_meta_pre
        helper_meta = self.helper_meta if pre2d is None else self.helper_meta_pre
        cuda = self.device.type == "cuda"
        if self.helpers:
            helper_args = (entries, *self.helper_args[:3], a2, *self.helper_args[3:4], state,
                           *self.helper_args[4:])
        if not cuda:  # the interpreter: the helper's programs, then the GEMM's
            if self.helpers:
                self.helper_site(helper_args, helper_meta)
            self.gemm_site(gemm_args, meta)
            return feats
        main = torch.cuda.current_stream(self.device)
        if self.helpers:
            side = common.side_stream(self.device)
            side.wait_stream(main)  # the hidden states and the zeroed counts are ready
            with torch.cuda.stream(side):
                self.helper_site(helper_args, helper_meta)
        self.gemm_site(gemm_args, meta)
        if self.helpers:
            # (the GEMM's last program already waited for the helper's: this only tells the
            # caching allocator, A being allocated on ``main``)
            main.wait_stream(side)
        return feats


def prepare_pipelined(hidden_states, spec, batch: int, tokens: int, channels: int,
                      weight: torch.Tensor, bias: Optional[torch.Tensor],
                      activation: Optional[str]) -> PipelinedLaunch:
    """The :class:`PipelinedLaunch` of these (validated, :func:`pipelined_eligible`) inputs."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    from .gemm_tma import (INTERPRET_SMS, STREAM_K_PIECES, _num_sms, _set_blocks, arch_of,
                           card_of)
    from .path import model_for, pipelined_stream_k_programs
    from .schedule import stream_k_shape
    base = hidden_states[spec.final_layer]
    interp = common.interpreting()
    gcfg, hcfg, produce_c = _configs()
    g = gcfg.all_kwargs()
    t_keep = spec.tokens_kept(tokens)
    width = spec.out_channels(channels)
    M, N = batch * t_keep, weight.shape[0]
    launch = PipelinedLaunch()
    launch.shape = (batch, t_keep, width)
    launch.dtype, launch.device = base.dtype, base.device
    entries, starts, sizes = common.layer_entries(hidden_states, spec)
    launch.index = common.entry_indices(spec)
    sb, st, sc = common.strides(entries)
    flags = common.layout_flags(entries, weight, common.StandIn((M, N), (N, 1)),
                                common.StandIn((batch, t_keep, width), (t_keep * width, width, 1)))
    rows = hcfg["ROWS"]
    Q = batch * triton.cdiv(t_keep, rows)
    sms = INTERPRET_SMS if interp else _num_sms(base.device.index or 0)
    pm = triton.cdiv(M, g["BLOCK_M"])
    tiles = pm * triton.cdiv(N, g["BLOCK_N"])
    slabs = spec.num_groups + 1
    for name, value in (("STREAM_K_PROGRAMS", STREAM_K_PROGRAMS),
                        ("HELPER_PROGRAMS", HELPER_PROGRAMS)):
        if type(value) is not int or value < 0:
            raise ValueError(f"pipelined.{name} must be an int >= 0 (0: the path rule's "
                             f"choice), got {value!r}")
    # stream K over the slabs where whole tiles would leave SMs idle and the replays say so
    # (path.pipelined_stream_k_programs, which picks the programs; whole tiles e.g. for SCI's
    # one CLIP image; a slab must be whole K steps): units (slab, row tile), a ready count per
    # slab and row block, then the split tiles' arrival counts
    programs, iters, segments, parts = 0, 0, 0, 1
    if STREAM_K and channels % g["BLOCK_K"] == 0:
        ks = channels // g["BLOCK_K"]
        if STREAM_K_PROGRAMS:
            programs = min(STREAM_K_PROGRAMS, tiles * ks)
        elif STREAM_K_ITERS:
            programs = triton.cdiv(tiles * ks, STREAM_K_ITERS)
        else:
            programs = pipelined_stream_k_programs(
                M, channels, N, len(spec.used_layers), slabs, base.element_size(),
                model_for(None, None) if interp else model_for(arch_of(base), card_of(base),
                                                               sms),
                sms, (g["BLOCK_M"], g["BLOCK_N"], g["BLOCK_K"]))
        if programs:
            iters, segments, parts = stream_k_shape(tiles, ks, programs)
            if tiles * parts * g["BLOCK_M"] * g["BLOCK_N"] >= 2 ** 31 \
                    or tiles * ks * programs >= 2 ** 31:
                programs, iters, segments, parts = 0, 0, 0, 1  # 32-bit offsets and bounds
    launch.iters, launch.programs = iters, programs
    if iters:  # the reducer's quarters are the epilogue's pieces (gemm_tma._partial_epilogue)
        g = dict(g, PIECES=STREAM_K_PIECES)
    launch.ws_numel = tiles * parts * g["BLOCK_M"] * g["BLOCK_N"] if iters else 0
    launch.state_len = _HEAD + (slabs * pm + tiles if iters else pm)
    # descriptors: stand-ins of the operands' layout (the calls' tensors replace the bases)
    like = torch.empty((8,), dtype=base.dtype, device=base.device)  # (an aligned base)
    ta = TensorDescriptor(like, [M, width], [width, 1], [g["BLOCK_M"], g["BLOCK_K"]])
    tw = TensorDescriptor.from_tensor(weight, [g["BLOCK_N"], g["BLOCK_K"]])
    to = TensorDescriptor(like, [M, N], [N, 1], [g["BLOCK_M"], g["BLOCK_N"]])
    tp = TensorDescriptor(like, [M, N], [N, 1], [g["BLOCK_M"], g["BLOCK_N"]])
    _set_blocks(dict(a_desc=ta, w_desc=tw, o_desc=to, p_desc=tp, **g))
    for t in (ta, tw, to, tp):
        t.base = None  # a plan must not keep tensors alive (the calls' clones set it)
    launch.templates = (ta, tw, to, tp)
    launch.bias_copy = bias is not None and bias.stride(0) != 1
    helpers, hcfg_run, hcap, hcap_pre = _helper_launch(bool(iters), interp, Q, sms,
                                                       max(sizes), base.element_size())
    assert hcfg_run["ROWS"] == rows  # the GEMM programs' own units are the helper's
    launch.helpers = (HELPER_PROGRAMS or helpers) if HELPER else 0
    launch.gemm_tail = (sb, st, sc, width, M, N, width, channels, t_keep, Q, launch.helpers)
    launch.gemm_meta = dict(
        HAS_BIAS=bias is not None, ACTIVATION=common.ACTIVATIONS[activation], STORE_PRE=False,
        EMULATE_RNE=flags["EMULATE_RNE"], DOT_FP32=interp,
        INPUT_PRECISION="ieee",  # 16-bit operands only (pipelined_eligible)
        BLOCK_M=g["BLOCK_M"], BLOCK_N=g["BLOCK_N"], BLOCK_K=g["BLOCK_K"], GROUP_M=g["GROUP_M"],
        PIECES=g["PIECES"], TOK0=spec.token_offset, STARTS=starts, SIZES=sizes,
        UNIFORM=flags["UNIFORM"], OFF64=flags["OFF64"], ROWS=rows, PRODUCE_C=produce_c,
        FENCE=not interp, THREADS=32 * gcfg.num_warps, R_BLOCK=256,
        SEGMENTS=segments, PARTS=parts, WHOLE=bool(iters) and iters >= channels // g["BLOCK_K"],
        REVERSED=REVERSE_PROGRAMS, num_warps=gcfg.num_warps, num_stages=gcfg.num_stages,
        **common.maxnreg_option(GEMM_MAXNREG))
    launch.gemm_meta_pre = dict(launch.gemm_meta, STORE_PRE=True,
                                **common.maxnreg_option(GEMM_MAXNREG_PRE))
    launch.gemm_site = DirectLaunch(_gemm_ready_kernel,
                                    (programs if programs else min(sms, tiles),))
    launch.helper_args = (sb, st, sc, width, channels, t_keep, Q, pm,
                          HELPER_ROW_TILES if HELPER_ROW_TILES > 0 else 2 ** 31 - 1)
    launch.helper_meta = dict(
        TOK0=spec.token_offset, STARTS=starts, SIZES=sizes, UNIFORM=flags["UNIFORM"],
        OFF64=flags["OFF64"], EMULATE_RNE=flags["EMULATE_RNE"], ROWS=rows,
        BLOCK_C=hcfg_run["BLOCK_C"], BLOCK_M=g["BLOCK_M"], SPLIT=bool(iters),
        STAGES=hcfg_run["STAGES"], num_warps=hcfg_run["num_warps"], **common.maxnreg_option(hcap))
    launch.helper_meta_pre = dict(launch.helper_meta, **common.maxnreg_option(hcap_pre))
    launch.helper_site = DirectLaunch(_features_helper_kernel, (max(1, launch.helpers),))
    return launch
