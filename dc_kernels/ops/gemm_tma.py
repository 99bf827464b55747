"""Hopper GEMM for the second pass: ``act(A @ W^T + b)`` with TMA loads, persistent programs.

``_gemm_tma_kernel``: ``NUM_SMS`` persistent programs walk the output tiles in grouped order
(``GROUP_M`` row tiles share the W columns they sweep, so W stays in L2); each tile's K loop
loads A and W tiles with TMA (host-side tensor descriptors, zero fill past the edges) into a
``num_stages``-deep shared-memory ring that Triton's pipeliner keeps ahead of ``wgmma``; the
epilogue adds the bias, applies exact-erf GELU, rounds once and stores the tile with TMA
(``STORE_PRE``, training: it also stores the pre-activation, rounded once, through a second
descriptor).

Stream K (``SEGMENTS`` > 0, 16-bit operands, chosen by :func:`dc_kernels.ops.schedule.gemm_stream_k`
when whole tiles leave SMs idle, e.g. 576 or 1152 rows): program p of P runs the steps
``[p S // P, (p + 1) S // P)`` of the S-step (tile, K step) sequence (equal shares, to one
step), crossing tiles where it must; a range of a shared tile
takes a ticket on the tile's count; the one with the last ticket sums the tile's fp32
partials in K order around its own registers (in any slot: it stores nothing) and runs the
epilogue a quarter of the tile at a time, the others store theirs and count them (release);
deterministic, and the reducer waits only for ranges past their K loops
(``_partial_epilogue``; ``docs/DESIGN.md`` §4).

Warp specialization: the installed Triton versions (3.6, 3.9) do not warp-specialize this loop
on sm_90 (``tl.range(..., warp_specialize=True)`` leaves the SASS unchanged with 8 warps and
fails to compile with 4), so the kernel does not ask for it; see ``docs/DESIGN.md`` §4.

:func:`gemm_tma_eligible` says when it applies (an sm_90 card, :func:`tma_kernels_serve`, or the
interpreter; 16-bit operands or TF32; TMA's layout rules); :func:`gemm_tma` launches it.
Everything else takes the cp.async kernel of :mod:`.linear`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import common
from .common import _round
from . import direct
from .direct import DirectLaunch
from .path import runs_tma_kernels
from .schedule import gemm_stream_k, stream_k_shape

__all__ = ["arch_of", "card_of", "sms_of", "gemm_tma", "gemm_tma_eligible", "prepare_gemm_tma",
           "direct_slabs", "slab_views",
           "tma_kernels_serve",
           "GemmTmaLaunch", "GEMM_TMA_CONFIGS", "GEMM_TMA_CONFIG_INTERPRET", "STREAM_K_ITERS",
           "REVERSE_PROGRAMS"]


@triton.jit
def _epilogue(b_acc, o_desc, p_desc, bias, o_am, o_n0, N, HAS_BIAS: tl.constexpr,
              ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr, EMULATE_RNE: tl.constexpr,
              WIDTH: tl.constexpr):
    # bias, exact-erf GELU, one rounding, TMA store of a [rows, WIDTH] tile at (o_am, o_n0);
    # STORE_PRE: the tile before the GELU too, through p_desc
    if HAS_BIAS:
        o_n = o_n0 + tl.arange(0, WIDTH)
        b_acc += tl.load(bias + o_n, mask=o_n < N, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        p_desc.store([o_am, o_n0], _round(b_acc, p_desc.dtype, EMULATE_RNE))
    if ACTIVATION == 1:
        b_acc = 0.5 * b_acc * (1.0 + tl.erf(b_acc * 0.7071067811865476))
    o_desc.store([o_am, o_n0], _round(b_acc, o_desc.dtype, EMULATE_RNE))


@triton.jit
def _tile_origin(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    # grouped order: GROUP_M row tiles share the W columns they sweep (W stays in L2)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % num_pid_in_group) % group_size_m
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _k_range(a_desc, w_desc, o_am, o_wn, k_lo, k_hi, DOT_FP32: tl.constexpr,
             INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    # fp32 A[o_am:, k] W[o_wn:, k]^T over the K steps [k_lo, k_hi)
    return _k_steps(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), a_desc, w_desc, o_am, o_wn,
                    k_lo, k_hi, DOT_FP32, INPUT_PRECISION, BLOCK_K)


@triton.jit
def _k_range_slabs(a_desc, w_desc, o_am, o_wn, k_lo, k_hi, slab_steps, DOT_FP32: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, A_SLABS: tl.constexpr):
    # _k_range where A is read in place from A_SLABS descriptors (A_SLABS > 0: ``a_desc`` is
    # their tuple, slab s holding A's K steps [s slab_steps, (s + 1) slab_steps)): one K loop
    # per slab the range touches, in K order, so the sum is _k_range's over the same A
    if A_SLABS == 0:
        return _k_range(a_desc, w_desc, o_am, o_wn, k_lo, k_hi, DOT_FP32, INPUT_PRECISION,
                        BLOCK_M, BLOCK_N, BLOCK_K)
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(A_SLABS):
        s0 = s * slab_steps
        b_acc = _k_steps_from(b_acc, a_desc[s], s0, w_desc, o_am, o_wn, max(k_lo, s0),
                              min(k_hi, s0 + slab_steps), DOT_FP32, INPUT_PRECISION, BLOCK_K)
    return b_acc


@triton.jit
def _k_steps(b_acc, a_desc, w_desc, o_am, o_wn, k_lo, k_hi, DOT_FP32: tl.constexpr,
             INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    # b_acc + A[o_am:, k] W[o_wn:, k]^T over the K steps [k_lo, k_hi), in K order
    return _k_steps_from(b_acc, a_desc, 0, w_desc, o_am, o_wn, k_lo, k_hi, DOT_FP32,
                         INPUT_PRECISION, BLOCK_K)


@triton.jit
def _k_steps_from(b_acc, a_desc, a_step0, w_desc, o_am, o_wn, k_lo, k_hi, DOT_FP32: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    # _k_steps with A's K step ki at a_desc's column (ki - a_step0) BLOCK_K (a slab of A)
    for ki in range(k_lo, k_hi):
        o_k = ki * BLOCK_K
        b_a = a_desc.load([o_am, o_k - a_step0 * BLOCK_K])
        b_w = w_desc.load([o_wn, o_k])
        if DOT_FP32:  # the interpreter has no 16-bit arithmetic
            b_acc = tl.dot(b_a.to(tl.float32), b_w.to(tl.float32).T, b_acc,
                           input_precision="ieee")
        else:
            b_acc = tl.dot(b_a, b_w.T, b_acc, input_precision=INPUT_PRECISION)
    return b_acc


@triton.jit
def _column_halves(x, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    # [ROWS, WIDTH] -> its columns [0, WIDTH / 2) and [WIDTH / 2, WIDTH): register-local in the
    # wgmma accumulator's layout (every thread holds columns of both halves)
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, WIDTH // 2)), (0, 2, 1)))


@triton.jit
def _tile_epilogue(b_acc, o_desc, p_desc, bias, o_am, o_wn, N, HAS_BIAS: tl.constexpr,
                   ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr, EMULATE_RNE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PIECES: tl.constexpr):
    # the epilogue in ``PIECES`` (1, 2 or 4) column pieces of the tile, each one TMA store of
    # o_desc's [BLOCK_M, BLOCK_N / PIECES] block: fewer live registers (128 x 256 tiles spill
    # in one piece)
    if PIECES == 1:
        _epilogue(b_acc, o_desc, p_desc, bias, o_am, o_wn, N, HAS_BIAS, ACTIVATION,
                  STORE_PRE, EMULATE_RNE, BLOCK_N)
    else:
        HALF: tl.constexpr = BLOCK_N // 2
        b_lo, b_hi = _column_halves(b_acc, BLOCK_M, BLOCK_N)
        for h in tl.static_range(2):
            if h == 0:
                b_half = b_lo
            else:
                b_half = b_hi
            if PIECES == 2:
                _epilogue(b_half, o_desc, p_desc, bias, o_am, o_wn + h * HALF, N, HAS_BIAS,
                          ACTIVATION, STORE_PRE, EMULATE_RNE, HALF)
            else:
                tl.static_assert(PIECES == 4)
                b_q0, b_q1 = _column_halves(b_half, BLOCK_M, HALF)
                _epilogue(b_q0, o_desc, p_desc, bias, o_am, o_wn + h * HALF, N, HAS_BIAS,
                          ACTIVATION, STORE_PRE, EMULATE_RNE, HALF // 2)
                _epilogue(b_q1, o_desc, p_desc, bias, o_am, o_wn + h * HALF + HALF // 2, N,
                          HAS_BIAS, ACTIVATION, STORE_PRE, EMULATE_RNE, HALF // 2)


#: A shared tile's count (``arrivals``): the low 16 bits take a ticket per piece past its K
#: loop, the bits above count the partials stored (``_STORED`` each)
_STORED = tl.constexpr(65536)


@triton.jit
def _partial_epilogue(b_acc, ws, arrivals, tile, slot, parts, o_desc, p_desc, bias, o_am, o_wn,
                      N, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                      STORE_PRE: tl.constexpr, EMULATE_RNE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      PIECES: tl.constexpr, PARTS: tl.constexpr):
    # One of a tile's ``parts`` K ranges (``slot``: its place in K order). Each piece takes a
    # ticket; the piece with the last ticket (whichever it is) sums the tile's partials in K
    # order, runs the epilogue and resets the count for the next launch; the others store
    # their fp32 partial (by quarters) and count it (release). The sum is
    # p0 + p1 + ... left to right, the same whoever reduces, so the result is deterministic.
    # The reducer stores nothing of its own, in any slot: a quarter of the tile at a time
    # (PIECES == 4: the epilogue's pieces) it sums the partials before its slot, adds its
    # registers ((p0 + ... + p[slot - 1]) + own: the same operation as with its partial
    # reloaded; own alone in slot 0), then adds the partials after it. Live: its accumulator,
    # one quarter being summed, one being loaded. It waits only for pieces that took their
    # tickets before it, which have nothing left but their stores: no schedule (the
    # interpreter's one program at a time included) can deadlock.
    tl.static_assert(PIECES == 4)
    HALF: tl.constexpr = BLOCK_N // 2
    QUARTER: tl.constexpr = BLOCK_N // 4
    TILE: tl.constexpr = BLOCK_M * BLOCK_N
    o_q = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, QUARTER)[None, :]
    first = ws + tile * PARTS * TILE
    # the quarters, once for both branches (each branch its own split would keep the
    # accumulator and a converted copy of it alive at once)
    b_lo, b_hi = _column_halves(b_acc, BLOCK_M, BLOCK_N)
    b_q0, b_q1 = _column_halves(b_lo, BLOCK_M, HALF)
    b_q2, b_q3 = _column_halves(b_hi, BLOCK_M, HALF)
    # one thread takes the ticket; the result reaches the CTA through shared memory
    ticket = tl.atomic_add(arrivals + tile, 1, sem="relaxed", scope="gpu") % _STORED
    if ticket != parts - 1:
        mine = first + slot * TILE + o_q
        tl.store(mine, b_q0, cache_modifier=".cg")
        tl.store(mine + QUARTER, b_q1, cache_modifier=".cg")
        tl.store(mine + 2 * QUARTER, b_q2, cache_modifier=".cg")
        tl.store(mine + 3 * QUARTER, b_q3, cache_modifier=".cg")
        # every thread's stores happen before the count (barrier), which releases them at GPU
        # scope; the reducer's acquire of the count makes them visible to it
        tl.debug_barrier()
        tl.atomic_add(arrivals + tile, _STORED, sem="release", scope="gpu")
    else:
        while tl.atomic_add(arrivals + tile, 0, sem="acquire", scope="gpu") // _STORED \
                < parts - 1:
            pass
        for q in tl.static_range(4):
            if q == 0:
                own = b_q0
            elif q == 1:
                own = b_q1
            elif q == 2:
                own = b_q2
            else:
                own = b_q3
            at = first + o_q + q * QUARTER
            # .cg: from L2, where the other SMs' partials are (never a stale L1 line)
            before = own
            for j in range(slot):
                x = tl.load(at + j * TILE, cache_modifier=".cg")
                before = tl.where(j == 0, x, before + x)
            b_sum = tl.where(slot == 0, own, before + own)
            for j in range(slot + 1, parts):
                b_sum += tl.load(at + j * TILE, cache_modifier=".cg")
            _epilogue(b_sum, o_desc, p_desc, bias, o_am, o_wn + q * QUARTER, N, HAS_BIAS,
                      ACTIVATION, STORE_PRE, EMULATE_RNE, QUARTER)
        tl.atomic_xchg(arrivals + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _stream_k_owner(step, total, programs):
    # the program whose range [p total // programs, (p + 1) total // programs) holds ``step``
    # (schedule.stream_k_owner: the largest p with p total // programs <= step)
    return ((step + 1) * programs - 1) // total


@triton.jit
def _segment_epilogue(b_acc, ws, arrivals, tile, program, t0, k_tiles, total, programs,
                      o_desc, p_desc, bias, o_am, o_wn, N, HAS_BIAS: tl.constexpr,
                      ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
                      EMULATE_RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      PIECES: tl.constexpr, PARTS: tl.constexpr, WHOLE: tl.constexpr):
    # The end of a stream-K segment: ``program``'s K range of ``tile`` (whose K steps start at
    # t0 of the ``total``-step (tile, K step) order, split evenly over ``programs``). A tile
    # one program runs whole takes the plain epilogue; the others go through the shared
    # tiles' ticket protocol
    first = _stream_k_owner(t0, total, programs)  # the programs that run this tile's steps
    parts = _stream_k_owner(t0 + k_tiles - 1, total, programs) - first + 1
    if WHOLE and parts == 1:  # (WHOLE false: every tile is shared)
        _tile_epilogue(b_acc, o_desc, p_desc, bias, o_am, o_wn, N, HAS_BIAS, ACTIVATION,
                       STORE_PRE, EMULATE_RNE, BLOCK_M, BLOCK_N, PIECES)
    else:
        _partial_epilogue(b_acc, ws, arrivals, tile, program - first, parts, o_desc, p_desc,
                          bias, o_am, o_wn, N, HAS_BIAS, ACTIVATION, STORE_PRE, EMULATE_RNE,
                          BLOCK_M, BLOCK_N, PIECES, PARTS)


@triton.jit
def _gemm_tma_kernel(
    a_desc, w_desc, o_desc, p_desc,  # A [M, K], W [N, K], out and pre [M, N]: TMA descriptors
    bias,
    ws, arrivals,  # stream K: fp32 partials [tiles * PARTS, BLOCK_M, BLOCK_N], int32 [tiles]
    M, N, K,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, PIECES: tl.constexpr,
    SEGMENTS: tl.constexpr = 0,  # stream K: the most tiles one program's steps touch (0: off)
    PARTS: tl.constexpr = 1,  # stream K: the most programs one tile's steps are spread over
    WHOLE: tl.constexpr = False,  # stream K: a program's range may hold a whole tile
    REVERSED: tl.constexpr = False,  # tests: program i runs program (programs - 1 - i)'s work
    A_SLABS: tl.constexpr = 0,  # > 0: a_desc is a tuple of A_SLABS descriptors of A's slabs
):
    start = tl.program_id(0)
    if REVERSED:
        start = tl.num_programs(0) - 1 - start
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # A read in place (A_SLABS > 0): every slab K / A_SLABS wide, whole K steps
    # (direct_slabs checks it)
    slab_steps = k_tiles // max(A_SLABS, 1)
    num_tiles = num_pid_m * num_pid_n
    if SEGMENTS == 0:
        # data parallel: whole tiles, NUM_SMS programs apart
        for tile in tl.range(start, num_tiles, NUM_SMS):
            o_am, o_wn = _tile_origin(tile, num_pid_m, num_pid_n, GROUP_M, BLOCK_M, BLOCK_N)
            b_acc = _k_range_slabs(a_desc, w_desc, o_am, o_wn, 0, k_tiles, slab_steps,
                                   DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                                   A_SLABS)
            _tile_epilogue(b_acc, o_desc, p_desc, bias, o_am, o_wn, N, HAS_BIAS, ACTIVATION,
                           STORE_PRE, EMULATE_RNE, BLOCK_M, BLOCK_N, PIECES)
    else:
        # stream K: program p of P runs the steps [p S // P, (p + 1) S // P) of the S-step
        # (tile, K step) sequence, one segment per tile they touch; a tile whose steps one
        # program runs whole takes the plain epilogue, the others are summed by their last
        # range
        programs = tl.num_programs(0)
        total = num_tiles * k_tiles
        it0 = start * total // programs
        it1 = (start + 1) * total // programs
        for seg in range(SEGMENTS):
            tile = it0 // k_tiles + seg
            t0 = tile * k_tiles
            k_lo = max(it0, t0) - t0
            k_hi = min(it1, t0 + k_tiles) - t0
            if k_lo < k_hi:
                o_am, o_wn = _tile_origin(tile, num_pid_m, num_pid_n, GROUP_M, BLOCK_M,
                                          BLOCK_N)
                b_acc = _k_range_slabs(a_desc, w_desc, o_am, o_wn, k_lo, k_hi, slab_steps,
                                       DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                                       A_SLABS)
                _segment_epilogue(b_acc, ws, arrivals, tile, start, t0, k_tiles, total,
                                  programs, o_desc, p_desc, bias, o_am, o_wn, N, HAS_BIAS,
                                  ACTIVATION, STORE_PRE, EMULATE_RNE, BLOCK_M, BLOCK_N, PIECES,
                                  PARTS, WHOLE)


def _set_blocks(nargs):
    # autotune pre-hook: the descriptors' block shapes follow the config's tiles
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    for a in nargs["a_desc"] if isinstance(nargs["a_desc"], tuple) else (nargs["a_desc"],):
        a.block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["o_desc"].block_shape = [bm, bn // nargs["PIECES"]]
    nargs["p_desc"].block_shape = nargs["o_desc"].block_shape


def _cfg(bm, bn, bk, warps, stages, pieces=1, group_m=8, maxnreg=None):
    # pieces: the epilogue's column pieces (_tile_epilogue); stream K takes 4 (_partial_epilogue)
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
                          "PIECES": pieces},
                         num_warps=warps, num_stages=stages, maxnreg=maxnreg,
                         pre_hook=_set_blocks)


#: 16-bit operands (and TF32), sm_90, triton 3.6 and 3.9 (checked ahead of time, no spills):
#: 128x256x64 with 8 warps (two warpgroups of 64 rows) and a split epilogue: ~226 registers,
#: 176 KiB (3 stages) / 224 KiB (4 stages) of shared memory; W's L2 traffic per FLOP is half
#: that of 128x128 tiles. 128x128x64 (4 stages, 160 KiB) and 64x128 (4 warps) serve few rows.
GEMM_TMA_CONFIGS = [
    _cfg(128, 256, 64, 8, 3, pieces=2),
    _cfg(128, 256, 64, 8, 4, pieces=2),
    _cfg(128, 128, 64, 8, 4),
    _cfg(64, 128, 64, 4, 4),
]
#: Register cap (``maxnreg``) of the overlapped path's GEMM: 8 warps x 224 leave 8,192 of the
#: SM's 65,536 registers to the features CTA beside it (``features.BESIDE_GEMM_REGISTERS``).
#: Without it triton 3.6 builds the 128 x 256 config with 237 (240 allocated), and neither
#: features kernel's beside config fits next to it (3.9 builds it with 224 anyway).
OVERLAP_GEMM_MAXNREG = 224
#: The overlapped path's GEMM leaves room on every SM for one features program beside each of
#: its CTAs (~8 K registers, ~27 KiB of shared memory): 3-stage rings only, registers capped.
GEMM_TMA_CONFIGS_OVERLAP = [
    _cfg(128, 256, 64, 8, 3, pieces=2, maxnreg=OVERLAP_GEMM_MAXNREG),
    _cfg(128, 128, 64, 8, 3, maxnreg=OVERLAP_GEMM_MAXNREG),
]
#: fp32 operands with TF32 allowed: 4-byte elements, so half the K depth per stage.
GEMM_TMA_CONFIGS_32 = [
    _cfg(128, 128, 32, 8, 3),
    _cfg(128, 256, 32, 8, 3, pieces=2),
    _cfg(64, 128, 32, 4, 3),
]
#: The epilogue's column pieces of a stream-K launch: the reducer sums the partials a quarter
#: of the tile at a time (``_partial_epilogue``), each quarter one TMA store
STREAM_K_PIECES = 4
GEMM_TMA_CONFIG_INTERPRET = _cfg(32, 32, 16, 4, 1, pieces=2, group_m=2)
_KEY = ["M", "N", "K"]


def _autotuned(configs):
    configs = configs if common.autotune_enabled() else configs[:1]
    return triton.autotune(configs=configs, key=_KEY)(_gemm_tma_kernel)


#: (operand bits, leave_room) -> autotuned kernel
_AUTOTUNED = {(16, False): _autotuned(GEMM_TMA_CONFIGS),
              (16, True): _autotuned(GEMM_TMA_CONFIGS_OVERLAP),
              (32, False): _autotuned(GEMM_TMA_CONFIGS_32),
              (32, True): _autotuned(GEMM_TMA_CONFIGS_32[:1])}


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def tma_kernels_serve(index: int) -> bool:
    """Whether CUDA device ``index`` runs the TMA kernels (an sm_90 card:
    :func:`dc_kernels.ops.path.runs_tma_kernels` of its capability)."""
    major, minor = _capability(index)
    return runs_tma_kernels(10 * major + minor)


def arch_of(t: torch.Tensor) -> Optional[int]:
    """The SM version of the CUDA device ``t`` is on (90 for an H100), None off CUDA: which
    calibration the path rule reads (:func:`dc_kernels.ops.path.model_for`)."""
    if not _cuda_device(t):
        return None
    index = t.device.index if t.device.index is not None else 0
    major, minor = _capability(index)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _card(index: int) -> Optional[str]:
    from .path import card_key
    return card_key(torch.cuda.get_device_name(index))


def card_of(t: torch.Tensor) -> Optional[str]:
    """The card-specific calibration key of the CUDA device ``t`` is on (``"h200"``, by its
    name: :func:`dc_kernels.ops.path.card_key`), None off CUDA or for a card that takes its
    architecture's calibration; with :func:`arch_of` it picks the path rule's constants
    (:func:`dc_kernels.ops.path.model_for`)."""
    if not _cuda_device(t):
        return None
    return _card(t.device.index if t.device.index is not None else 0)


def sms_of(t: torch.Tensor) -> Optional[int]:
    """The SM count of the CUDA device ``t`` is on, None off CUDA: with :func:`arch_of` and
    :func:`card_of`, what the path rule's model counts (:func:`dc_kernels.ops.path.model_for`)."""
    if not _cuda_device(t):
        return None
    return _num_sms(t.device.index if t.device.index is not None else 0)


def _cuda_device(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


#: programs of the persistent grid under the interpreter (fewer than tiles: the loop is tested)
INTERPRET_SMS = 3


def _tma_layout_ok(t: torch.Tensor) -> bool:
    # TMA: 16-byte aligned base, unit inner stride, outer stride a multiple of 16 bytes
    e = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * e) % 16 == 0 and t.shape[1] * e >= 16)


def gemm_tma_eligible(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`gemm_tma` can run ``out = act(a @ weight.T + b)`` (all 2-D)."""
    if a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 \
            and not common.interpreting():
        return False  # fp32 without TF32: no tensor cores; the cp.async kernel serves it
    if not common.interpreting():
        if not _cuda_device(a) or not tma_kernels_serve(a.device.index or 0):
            return False
    return all(_tma_layout_ok(t) for t in (a, weight, out))


def _clone_desc(template, base):
    # a descriptor of ``base`` with ``template``'s shape, strides and block shape, without
    # TensorDescriptor's validation: ``base`` has the layout the template was validated for
    # (the plan's signature guarantees it). The autotune pre-hook assigns block shapes to the
    # clone, never to the template.
    desc = object.__new__(type(template))
    desc.__dict__.update(template.__dict__)
    desc.base = base
    return desc


#: Stream K: 0 = :func:`dc_kernels.ops.schedule.gemm_stream_k`'s choice, -1 = never, n > 0 = at
#: most n K steps per program, on ``ceil(steps / n)`` programs, wherever stream K may run
#: (tests force it)
STREAM_K_ITERS = 0
#: Tests: the programs take their work last to first (``REVERSED``), so under the interpreter,
#: which runs them one after another, a shared tile's first piece takes the last ticket and
#: reduces it (run in order, its last piece does)
REVERSE_PROGRAMS = False
#: (device, stream) -> int32 ticket counts of shared tiles, zero between launches (every tile's
#: reducer resets its count)
_ARRIVALS: dict = {}


def _arrivals(t: torch.Tensor, tiles: int) -> torch.Tensor:
    # The arrival counts a stream-K launch on t's device and current stream uses: one zeroed
    # buffer per (device, stream), kept, since every launch leaves it zeroed (launches on one
    # stream run one after another; another stream has its own). Under CUDA-graph capture a
    # missing buffer cannot be zeroed now: that launch gets its own zeroed one, a memset the
    # graph replays.
    cuda = t.device.type == "cuda"
    if cuda:
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        key = (index, direct._current_stream(index))
    else:
        key = (str(t.device), 0)
    buf = _ARRIVALS.get(key)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, 256), dtype=torch.int32, device=t.device)
        if not (cuda and torch.cuda.is_current_stream_capturing()):
            _ARRIVALS[key] = buf
    return buf


class GemmTmaLaunch:
    """A :func:`gemm_tma` launch prepared for one layout: descriptors' shapes and strides,
    constants, kernel and grid. Calling it with tensors of that layout (``a``, ``out`` and
    ``pre`` may be any tensor whose storage starts where the 2-D operand does) builds the four
    descriptors from templates and launches; a stream-K launch (``programs`` programs of at
    most ``iters`` K steps, 0: whole tiles) also allocates its fp32 partial tiles
    (``ws_numel`` elements) and takes its stream's arrival counts."""

    __slots__ = ("site", "templates", "tail", "meta", "meta_pre", "bias_copy", "iters",
                 "programs", "ws_numel", "tiles")

    def __call__(self, a, weight, bias, out, pre=None):
        ta, tw, to, tp = self.templates
        if bias is not None and self.bias_copy:
            bias = bias.contiguous()  # the epilogue reads it at bias + n
        if self.iters:
            # (through common.empty: tests poison it, so a partial read unwritten shows)
            ws = common.empty((self.ws_numel,), torch.float32, out.device)
            arrivals = _arrivals(out, self.tiles)
        else:
            ws = arrivals = out  # never read
        a_desc = tuple(_clone_desc(t, x) for t, x in zip(ta, a)) if isinstance(ta, tuple) \
            else _clone_desc(ta, a)
        self.site((a_desc, _clone_desc(tw, weight), _clone_desc(to, out),
                   _clone_desc(tp, pre if pre is not None else out),
                   bias if bias is not None else out, ws, arrivals, *self.tail),
                  self.meta if pre is None else self.meta_pre)
        return out


def prepare_gemm_tma(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     activation: Optional[str], out: torch.Tensor,
                     leave_room: bool = False) -> GemmTmaLaunch:
    """The :class:`GemmTmaLaunch` of these operands (checked eligible, all 2-D).

    ``a`` may be a tuple of A's column slabs, each ``[M, K / len(a)]`` (:func:`direct_slabs`):
    the kernel then reads A in place from one descriptor per slab (``A_SLABS``), and the
    launch is called with slabs of the same layout."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    slabs = a if isinstance(a, tuple) else None
    a0 = slabs[0] if slabs else a
    M, K = a0.shape[0], sum(x.shape[1] for x in slabs) if slabs else a.shape[1]
    N = weight.shape[0]
    allow_tf32 = a0.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    interp = common.interpreting()
    # block shapes: placeholders on a GPU (the autotune pre-hook sets each config's own)
    cfg = GEMM_TMA_CONFIG_INTERPRET.all_kwargs()
    ta = tuple(TensorDescriptor.from_tensor(x, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
               for x in slabs) if slabs else \
        TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
    tw = TensorDescriptor.from_tensor(weight, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    to = TensorDescriptor.from_tensor(out, [cfg["BLOCK_M"], cfg["BLOCK_N"]])
    # ``pre`` has out's layout; without it the kernel never touches p_desc (out's stands in)
    tp = TensorDescriptor.from_tensor(out, [cfg["BLOCK_M"], cfg["BLOCK_N"]])
    if interp:
        _set_blocks(dict(a_desc=ta, w_desc=tw, o_desc=to, p_desc=tp, **cfg))
    for t in (*(ta if slabs else (ta,)), tw, to, tp):
        t.base = None  # a plan must not keep the first call's tensors alive (clones set it)
    launch = GemmTmaLaunch()
    launch.templates = (ta, tw, to, tp)
    launch.bias_copy = bias is not None and bias.stride(0) != 1
    sms = INTERPRET_SMS if interp else _num_sms(a0.device.index or 0)
    launch.meta = dict(HAS_BIAS=bias is not None, ACTIVATION=common.ACTIVATIONS[activation],
                       STORE_PRE=False, EMULATE_RNE=interp, DOT_FP32=interp,
                       INPUT_PRECISION="tf32" if allow_tf32 else "ieee", NUM_SMS=sms,
                       REVERSED=REVERSE_PROGRAMS)
    if slabs:
        launch.meta["A_SLABS"] = len(slabs)
    launch.meta_pre = dict(launch.meta, STORE_PRE=True)
    # stream K (16-bit operands, not beside the overlapped features: a chunk's GEMM fills the
    # SMs): a fixed config, the first one (the steps per program follow from its tiles)
    sk_cfg = cfg if interp else GEMM_TMA_CONFIGS[0].all_kwargs()
    tiles = triton.cdiv(M, sk_cfg["BLOCK_M"]) * triton.cdiv(N, sk_cfg["BLOCK_N"])
    k_tiles = triton.cdiv(K, sk_cfg["BLOCK_K"])
    programs = 0
    if a0.element_size() == 2 and not leave_room and STREAM_K_ITERS >= 0:
        programs = triton.cdiv(tiles * k_tiles, STREAM_K_ITERS) if STREAM_K_ITERS \
            else gemm_stream_k(tiles, k_tiles, sms)
    iters, segments, parts = stream_k_shape(tiles, k_tiles, programs) if programs \
        else (0, 0, 1)
    if tiles * parts * sk_cfg["BLOCK_M"] * sk_cfg["BLOCK_N"] >= 2 ** 31 \
            or tiles * k_tiles * programs >= 2 ** 31:
        programs, iters, segments, parts = 0, 0, 0, 1  # the offsets and bounds are 32-bit
    launch.iters, launch.programs, launch.tiles = iters, programs, tiles
    launch.ws_numel = tiles * parts * sk_cfg["BLOCK_M"] * sk_cfg["BLOCK_N"]
    launch.tail = (M, N, K)
    if interp or iters:
        if iters:  # the reducer's quarters are the epilogue's pieces (_partial_epilogue)
            sk_cfg = dict(sk_cfg, PIECES=STREAM_K_PIECES)
        if iters or not interp:
            _set_blocks(dict(a_desc=ta, w_desc=tw, o_desc=to, p_desc=tp, **sk_cfg))
        blocks = {k: v for k, v in sk_cfg.items() if k not in ("num_ctas",)}
        for meta in (launch.meta, launch.meta_pre):
            meta.update(blocks, SEGMENTS=segments, PARTS=parts, WHOLE=iters >= k_tiles)
        grid = programs if programs else min(sms, tiles)
        launch.site = DirectLaunch(_gemm_tma_kernel, (grid,))
        return launch

    def grid(m):
        return (min(sms, triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"])),)
    launch.site = DirectLaunch(_AUTOTUNED[(32 if a0.dtype == torch.float32 else 16,
                                           leave_room)], grid)
    return launch


def gemm_tma(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             activation: Optional[str], out: torch.Tensor, leave_room: bool = False,
             pre: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out = act(a @ weight.T + bias)`` with the persistent TMA kernel (checked eligible).

    ``leave_room``: pick among :data:`GEMM_TMA_CONFIGS_OVERLAP` (a features program fits beside
    every CTA). ``pre`` (training; eligible too, ``out``'s shape): also receives
    ``a @ weight.T + bias`` before the activation."""
    return prepare_gemm_tma(a, weight, bias, activation, out, leave_room)(a, weight, bias, out,
                                                                          pre)


def direct_slabs(hidden_states, spec, batch: int, tokens: int, weight: torch.Tensor):
    """Where the GEMM can read A's column slabs in place from the layers (the two-pass path
    without its features pass): the slabs as 2-D ``[B*T', C]`` views of the layers
    themselves, in A's slab order, else None. (The output is a fresh ``[B*T', N]`` tensor.)

    It applies when every slab is one layer (SCI-like specs: the features pass would only copy
    them) and each layer's kept rows are one 2-D view TMA can read: one image, or images whose
    kept tokens follow each other in memory (no CLS token to drop), a unit channel stride and
    16-byte aligned rows; 16-bit layers with C a multiple of the GEMM's K step (slabs of whole
    K steps), on a card that runs the TMA GEMM (or the interpreter), with ``weight`` and the
    output TMA-readable too. The views depend only on the layers' layout: a launch plan's
    signature fixes them, :func:`slab_views` rebuilds them per call."""
    if spec.connector_type == "sti" or any(b - a != 1 for a, b in spec.groups):
        return None
    base = hidden_states[spec.final_layer]
    C = base.shape[2]
    N = weight.shape[0]
    step = GEMM_TMA_CONFIG_INTERPRET.all_kwargs()["BLOCK_K"] if common.interpreting() else \
        max(c.all_kwargs()["BLOCK_K"] for c in GEMM_TMA_CONFIGS)
    e = base.element_size()
    if e != 2 or C % step or (N * e) % 16 or N * e < 16:
        return None
    t_keep = spec.tokens_kept(tokens)
    for i in common.entry_indices(spec):
        sb, st, sc = hidden_states[i].stride()
        if sc != 1 or (batch > 1 and sb != t_keep * st):
            return None
    views = slab_views(hidden_states, spec, batch, tokens)
    # (the output's layout checked above: a view stands in for it)
    if not all(_tma_layout_ok(v) for v in views) or not gemm_tma_eligible(views[0], weight,
                                                                          views[0]):
        return None
    return views


def slab_views(hidden_states, spec, batch: int, tokens: int):
    """The ``[B*T', C]`` views of every slab's layer (base first) that :func:`direct_slabs`
    found readable in place: rows ``b*T' + t`` at token ``token_offset + t`` of image b."""
    t_keep, tok0 = spec.tokens_kept(tokens), spec.token_offset
    views = []
    for i in common.entry_indices(spec):
        x = hidden_states[i]
        st = x.stride(1)
        views.append(x.as_strided((batch * t_keep, x.shape[2]), (st, 1),
                                  x.storage_offset() + tok0 * st))
    return tuple(views)
