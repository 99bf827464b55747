"""Stream-K shares and the pipelined launch's schedule: the integer formulas by which the
persistent GEMM kernels split their (tile, K step) sequence (:func:`stream_k_bounds`,
:func:`stream_k_owner`; ``gemm_tma`` and ``pipelined`` compute the same from their program id
and grid), the launch choices made from them (:func:`gemm_stream_k`, :func:`pipelined_stream_k`,
:func:`split_helpers`), and the event replays that time a schedule
(:func:`pipelined_stream_k_makespan`, :func:`pipelined_makespan`).

Nothing here reads a calibration: the path rule (:mod:`.path`) and the static cost model
(``benchmarks/static.py``) pass in their seconds per step, per row and per launch. The two
constants below are *estimates* of costs in K steps (no GPU run); a GPU run's measured partial
tile (``python -m benchmarks --probes``) is passed as ``partial_steps`` where one exists.
"""

from __future__ import annotations

import heapq
import math
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["SPLIT_PARTIAL_STEPS", "SLAB_FILL_STEPS", "stream_k_bounds", "stream_k_owner",
           "stream_k_shape", "stream_k_partials", "stream_k_program_steps", "gemm_stream_k",
           "pipelined_stream_k_steps", "pipelined_stream_k", "split_helpers",
           "pipelined_stream_k_makespan", "pipelined_makespan"]


#: The cost of one fp32 partial tile (written by a piece of a split tile, read back by its
#: reducer), in K steps of the tile's main loop: 128 x 256 x 4 bytes through an SM's ~64 B/clk
#: path to L2 against a 128 x 256 x 64 wgmma step's ~1,200 clocks -- an ESTIMATE (no GPU run).
SPLIT_PARTIAL_STEPS = 1.7


def stream_k_bounds(total: int, programs: int) -> List[int]:
    """Where each program's range of a stream-K launch starts, and the end: program p runs
    the steps ``[p total // programs, (p + 1) total // programs)`` of the (tile, K step)
    sequence, so ranges differ by at most one step (the kernels compute the same bounds from
    their program id and grid size)."""
    return [p * total // programs for p in range(programs + 1)]


def stream_k_owner(step: int, total: int, programs: int) -> int:
    """The program whose range (:func:`stream_k_bounds`) holds ``step``: the largest p with
    ``p total // programs <= step``, ``((step + 1) programs - 1) // total`` (the kernels' own
    formula: a tile's first and last piece)."""
    return ((step + 1) * programs - 1) // total


def stream_k_shape(tiles: int, k_tiles: int, programs: int) -> Tuple[int, int, int]:
    """``(iters, segments, parts)`` of a stream-K launch of ``programs`` programs over the
    (tile, K step) sequence (:func:`stream_k_bounds`): the most steps one program runs, the
    most tiles one program's steps touch, the most programs one tile's steps are spread
    over."""
    total = tiles * k_tiles
    if programs <= 0 or total <= 0 or programs > total:
        raise ValueError(f"stream K needs 1 <= programs <= tiles x K steps, got {programs} "
                         f"programs for {tiles} x {k_tiles}")
    b = stream_k_bounds(total, programs)
    segments = max((b[p + 1] - 1) // k_tiles - b[p] // k_tiles + 1 for p in range(programs))
    parts = max(stream_k_owner((t + 1) * k_tiles - 1, total, programs)
                - stream_k_owner(t * k_tiles, total, programs) + 1 for t in range(tiles))
    return -(-total // programs), segments, parts


def stream_k_partials(tiles: int, k_tiles: int, programs: int, longer_first: bool = False
                      ) -> Tuple[int, int, int]:
    """``(busiest, stored, loaded)``: the fp32 partial tiles the busiest program of a stream-K
    launch of ``programs`` programs stores and loads, and all programs together, by the
    kernels' protocol (``gemm_tma._partial_epilogue``): each piece of a shared tile takes a
    ticket after its K loop; the last one reduces the tile in place from its registers, in
    any slot (``parts - 1`` loads, no store); every other piece stores its partial.

    The last ticket is taken to go to the piece that ends latest in its program's order (K
    steps before its end; on a tie the highest slot): the programs start together and run
    near-equal steps, so the piece ending a program (a tile's head: slot 0) or filling one
    (slot 1) finishes last, the tile's tail, at the start of its program, first.
    ``longer_first``: the pipelined GEMM runs the longer of two segments first, which can put
    the tail last. An ESTIMATE of which piece wins a race no model sees; the reducer's cost
    is the same in every slot, so the race decides only which program pays it."""
    total = tiles * k_tiles
    if programs <= 0 or total <= 0:
        return 0, 0, 0
    _, segments, _ = stream_k_shape(tiles, k_tiles, programs)
    b = stream_k_bounds(total, programs)
    pieces: Dict[int, List[Tuple[int, int, int]]] = {}  # tile -> (end, slot, program)
    for p in range(programs):
        lo, hi = b[p], b[p + 1]
        segs = [(t, max(lo, t * k_tiles), min(hi, (t + 1) * k_tiles))
                for t in range(lo // k_tiles, (hi - 1) // k_tiles + 1)]
        if longer_first and segments == 2 and len(segs) == 2 and \
                segs[0][2] - segs[0][1] < segs[1][2] - segs[1][1]:
            segs.reverse()
        end = 0
        for t, a, c in segs:
            end += c - a
            slot = p - stream_k_owner(t * k_tiles, total, programs)
            pieces.setdefault(t, []).append((end, slot, p))
    cost = [0] * programs
    stored = loaded = 0
    for t, ps in pieces.items():
        if len(ps) == 1:
            continue  # run whole: the plain epilogue
        reducer = max(ps)[2]
        for _, _, p in ps:
            if p != reducer:
                cost[p] += 1
                stored += 1
        cost[reducer] += len(ps) - 1
        loaded += len(ps) - 1
    return max(cost), stored, loaded


def stream_k_program_steps(iters: int, partials: int,
                           partial_steps: Optional[float] = None) -> float:
    """Main-loop step-equivalents of the busiest program of a stream-K launch: its ``iters``
    steps and the ``partials`` fp32 partial tiles it stores and loads
    (:func:`stream_k_partials`; ``partial_steps`` each, default :data:`SPLIT_PARTIAL_STEPS`;
    the static cost model counts the same, with its card's measured value where a GPU run
    gave one)."""
    return iters + partials * (SPLIT_PARTIAL_STEPS if partial_steps is None else partial_steps)


def _stream_k_steps(tiles: int, k_tiles: int, programs: int) -> float:
    iters = stream_k_shape(tiles, k_tiles, programs)[0]
    return stream_k_program_steps(iters, stream_k_partials(tiles, k_tiles, programs)[0])


def gemm_stream_k(tiles: int, k_tiles: int, sms: int) -> int:
    """Programs of a stream-K launch of the persistent GEMM, 0: whole tiles.

    With whole tiles the busiest program runs ``ceil(tiles / sms)`` of them: 576 rows give 80
    tiles of 128 x 256 for 132 SMs, one 48-step K loop each while 52 SMs idle; 1152 rows give
    144, two per program on 12 SMs. Stream K spreads the ``tiles * k_tiles`` steps evenly
    (:func:`stream_k_bounds`): at most ``iters = ceil(tiles * k_tiles / sms)`` per program on
    the fewest programs that allows, ``ceil(tiles * k_tiles / iters)`` (80 tiles: 30 steps on
    128), crossing tiles where it must; a shared tile's pieces store fp32 partials that one
    of them sums (:func:`stream_k_partials`, :data:`SPLIT_PARTIAL_STEPS` each). Taken when
    the busiest program saves at least 10 %."""
    if tiles <= 0 or k_tiles <= 0 or sms <= 0:
        return 0
    iters = math.ceil(tiles * k_tiles / sms)
    if iters < 4:
        return 0
    programs = math.ceil(tiles * k_tiles / iters)
    unsplit = math.ceil(tiles / sms) * k_tiles
    return programs if _stream_k_steps(tiles, k_tiles, programs) <= 0.9 * unsplit else 0


#: A slab's K loop after the first in a stream-K segment of the pipelined GEMM restarts its
#: TMA ring (the wait for that slab's rows sits between the loops): about one L2 round trip,
#: ~600 clocks against a 128 x 256 x 64 step's ~1,200 -- an ESTIMATE (no GPU run).
SLAB_FILL_STEPS = 0.5


def pipelined_stream_k_steps(iters: int, slabs: int, segments: int, partials: int,
                             partial_steps: Optional[float] = None) -> float:
    """Main-loop step-equivalents of the busiest program of the pipelined path's stream-K GEMM:
    ``iters`` steps of each of ``slabs`` slabs, ``partials`` fp32 partial tiles
    (:func:`stream_k_partials` with ``longer_first``; :func:`stream_k_program_steps`, with
    ``partial_steps``), and a ring refill (:data:`SLAB_FILL_STEPS`) per slab after the first
    of every segment (the static cost model counts the same)."""
    return (stream_k_program_steps(slabs * iters, partials, partial_steps)
            + segments * (slabs - 1) * SLAB_FILL_STEPS)


def pipelined_stream_k(tiles: int, ks: int, slabs: int, sms: int) -> int:
    """Programs of the pipelined path's stream-K GEMM by the step count alone, 0: whole tiles
    (:mod:`dc_kernels.ops.pipelined`; :func:`pipelined_stream_k_programs` then lets the
    replays pick among this many programs and more, up to ``sms``).

    Its programs run the same positions of every slab's (tile, K step) sequence (``ks`` steps
    of a tile per slab; :func:`stream_k_bounds`): at most ``ceil(tiles * ks / sms)``
    positions on the fewest programs that allows, ``slabs`` times, plus partials and refills
    (:func:`pipelined_stream_k_steps`). Taken, as :func:`gemm_stream_k`,
    when the busiest program saves at least 10 % over whole tiles, or, with at most one wave
    of tiles (``tiles <= sms``), when it is no slower: there every whole tile starts at once
    and needs all of its rows' slabs, so whole tiles cannot overlap the features at all,
    while the split multiplies slab 0 as the groups are averaged (one SigLIP image: 96
    tiles, 49.1 step-equivalents against 54 on 124 programs)."""
    if tiles <= 0 or ks <= 0 or sms <= 0 or slabs <= 0:
        return 0
    iters = math.ceil(tiles * ks / sms)
    if iters * slabs < 4:
        return 0
    programs = math.ceil(tiles * ks / iters)
    whole = math.ceil(tiles / sms) * slabs * ks
    split = _pipelined_split_steps(tiles, ks, slabs, programs)
    return programs if split <= (1.0 if tiles <= sms else 0.9) * whole else 0


def _pipelined_split_steps(tiles: int, ks: int, slabs: int, programs: int) -> float:
    iters, segments, _ = stream_k_shape(tiles, ks, programs)
    return pipelined_stream_k_steps(iters, slabs, segments,
                                    stream_k_partials(tiles, ks, programs, True)[0])


def split_helpers(row_tiles: int, sms: int) -> int:
    """Helper programs of the pipelined path's stream-K launch (units (slab, row tile),
    slab-major): as few as produce each slab's ``row_tiles`` units in the same number of
    rounds as one per SM would, ``ceil(row_tiles / ceil(row_tiles / sms))`` (one CLIP image:
    72 row tiles of 8 rows, 72 programs).

    Helper programs share the DRAM bandwidth, so a unit's time grows with their number: 132
    programs over 72 units per slab leave some of every slab's units to a second round at a
    132nd of the bandwidth (slab 2 ready after ~19 us instead of ~11 us at one image, by the
    replay of :func:`pipelined_stream_k_makespan`); one program per unit produces each slab
    in one round at a 72nd. Each program then needs the bytes in flight of 132 / 72 programs
    (the launcher's wider, 4-warp helper steps, ``pipelined.HELPER_CONFIG_SPLIT``)."""
    if row_tiles <= 0 or sms <= 0:
        return max(1, sms)
    return math.ceil(row_tiles / math.ceil(row_tiles / sms))


def pipelined_stream_k_makespan(M: int, N: int, tile_m: int, tile_n: int, group_m: int,
                                ks: int, programs: int, step_s: float, sms: int,
                                unit_rows: int,
                                alone_s_per_row: float, beside_s_per_row: float,
                                slab_bytes: Sequence[float],
                                partial_steps: Optional[float] = None) -> float:
    """Seconds of the pipelined path's stream-K GEMM launch, both launches' schedule replayed
    (events in time order; every cost deterministic).

    * Units (slab, ``unit_rows`` rows) are claimed by ticket, slab-major, by ``sms`` helper
      programs -- each unit at ``beside_s_per_row`` (the helper launch beside the GEMM) times
      the programs -- and by GEMM programs that wait -- at ``alone_s_per_row`` (the features
      pass) times ``sms``: a program alone gets its share of the bandwidth; a unit's seconds
      are its slab's share of ``slab_bytes`` (bytes per row: layers read + written).
    * GEMM program p of ``programs`` runs its positions (:func:`stream_k_bounds`) of the
      (tile, K step of a slab) sequence (grouped tile order, ``ks`` steps per slab; of two
      segments the longer first), slab after slab; before a slab's steps (``step_s`` each; a
      ring refill of :data:`SLAB_FILL_STEPS` before every slab after the first) it waits until that slab of
      the tile's row block is produced, producing the next unit itself while some it needs are
      unclaimed; after a shared tile's range the program takes the tile's ticket (in time
      order): the last one waits for the others' partials and sums them in place, onto its
      registers; the others store theirs (``partial_steps`` each, default
      :data:`SPLIT_PARTIAL_STEPS`; ``gemm_tma._partial_epilogue``).
    """
    slabs = len(slab_bytes)
    total = float(sum(slab_bytes))
    share = [b / total for b in slab_bytes]
    pm, pn = math.ceil(M / tile_m), math.ceil(N / tile_n)
    tiles = pm * pn
    Q = math.ceil(M / unit_rows)
    units = slabs * Q
    cost_h = [beside_s_per_row * sms * unit_rows * f for f in share]
    cost_g = [alone_s_per_row * sms * unit_rows * f for f in share]
    finish: list = [None] * units
    per_group = group_m * pn
    runs = []  # per GEMM program: [(tile, slab, steps, first unit, last unit, segment end)]
    split_parts: Dict[int, int] = {}  # tile -> the programs its steps are spread over
    bounds = stream_k_bounds(tiles * ks, programs)
    for p in range(programs):
        it0, it1 = bounds[p], bounds[p + 1]
        segs = []
        for tile in range(it0 // ks, (it1 - 1) // ks + 1):
            steps = min(it1, (tile + 1) * ks) - max(it0, tile * ks)
            first = (tile // per_group) * group_m
            r = first + (tile % per_group) % min(pm - first, group_m)
            q0, q1 = r * tile_m // unit_rows, (min(M, (r + 1) * tile_m) - 1) // unit_rows
            parts = stream_k_owner((tile + 1) * ks - 1, tiles * ks, programs) \
                - stream_k_owner(tile * ks, tiles * ks, programs) + 1
            split_parts[tile] = parts
            segs.append((tile, steps, q0, q1, parts > 1))
        if len(segs) == 2 and segs[0][1] < segs[1][1]:
            segs.reverse()  # the kernel runs the longer of two segments first
        runs.append([(tile, sl, steps, sl * Q + q0, sl * Q + q1, split and sl == slabs - 1)
                     for tile, steps, q0, q1, split in segs for sl in range(slabs)])
    events = [(0.0, 0, i) for i in range(sms)] + [(0.0, 1, p) for p in range(len(runs))]
    heapq.heapify(events)
    nxt = 0
    pos = [0] * len(runs)
    ends = [0.0] * len(runs)
    ticket = [False] * len(runs)  # the program is at a shared tile's ticket (its K loop done)
    arrivals: Dict[int, list] = {}  # tile -> the seconds its pieces' partials are stored by
    part_s = (SPLIT_PARTIAL_STEPS if partial_steps is None else partial_steps) * step_s
    while events:
        t, kind, i = heapq.heappop(events)
        if kind == 0:  # a helper program: the next unit, if any
            if nxt < units:
                finish[nxt] = t + cost_h[nxt // Q]
                heapq.heappush(events, (finish[nxt], 0, i))
                nxt += 1
            continue
        if ticket[i]:  # tickets in time order: the last one reduces (gemm_tma's protocol)
            ticket[i] = False
            tile = runs[i][pos[i] - 1][0]
            got = arrivals.setdefault(tile, [])
            if len(got) < split_parts[tile] - 1:
                t += part_s  # stores its partial
                got.append(t)
            else:  # waits for the others' stores, sums them in place
                t = max([t] + got) + len(got) * part_s
            heapq.heappush(events, (t, 1, i))
            continue
        if pos[i] == len(runs[i]):
            ends[i] = t
            continue
        tile, sl, steps, u0, u1, seg_end = runs[i][pos[i]]
        if nxt <= u1:  # some unit this slab needs is unclaimed: produce the next one
            finish[nxt] = t + cost_g[nxt // Q]
            heapq.heappush(events, (finish[nxt], 1, i))
            nxt += 1
            continue
        ready = max(finish[u0:u1 + 1])
        if ready > t:
            heapq.heappush(events, (ready, 1, i))
            continue
        t += steps * step_s + (SLAB_FILL_STEPS * step_s if sl else 0.0)
        ticket[i] = seg_end
        pos[i] += 1
        heapq.heappush(events, (t, 1, i))
    return max(ends)


def pipelined_makespan(M: int, N: int, tile_m: int, tile_n: int, group_m: int, sms: int,
                       tile_s: float, alone_s_per_row: float, beside_s_per_row: float) -> float:
    """Seconds of the pipelined path's GEMM launch (:mod:`dc_kernels.ops.pipelined`), its
    schedule replayed: ``sms`` programs claim the ``tile_m x tile_n`` output tiles in the
    kernel's grouped order (``group_m`` row tiles per group), each as soon as it is free and
    the tile's row block is ready (``tile_s`` per tile). Row blocks become ready in row order:
    those the first wave needs at ``alone_s_per_row`` (every waiting program produces rows
    with the helper), the rest at ``beside_s_per_row`` (the helper alone beside the GEMM)."""
    pm, pn = math.ceil(M / tile_m), math.ceil(N / tile_n)
    first_blocks = min(pm, math.ceil(sms / pn))
    ramp_end = alone_s_per_row * min(M, first_blocks * tile_m)

    def ready(r: int) -> float:
        rows = min(M, (r + 1) * tile_m)
        if r < first_blocks:
            return alone_s_per_row * rows
        return ramp_end + beside_s_per_row * (rows - first_blocks * tile_m)

    free = [0.0] * min(sms, pm * pn)
    heapq.heapify(free)
    end = 0.0
    per_group = group_m * pn
    for t in range(pm * pn):
        first = (t // per_group) * group_m
        size = min(pm - first, group_m)
        r = first + (t % per_group) % size
        start = max(heapq.heappop(free), ready(r))
        heapq.heappush(free, start + tile_s)
        end = max(end, start + tile_s)
    return end
