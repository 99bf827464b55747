"""Static cost model: GPU time estimated from the kernels as the JIT builds them, no GPU needed.

``python -m benchmarks --static`` builds every kernel of the benchmark shapes exactly as Triton's
runtime specializes it (``dc_kernels.ops.triton_aot``), reads registers, shared memory and the
SASS (``dc_kernels.ops.sass``), and estimates each launch's time on an H100 SXM and an A100 (and,
from the same sm_90 builds, an H200: :data:`CARD_GPUS`) as the max of

* DRAM bytes / the achievable bandwidth: the copy ceiling, or less when too few bytes are in
  flight: ``SMs x bytes in flight per SM / latency`` (Little's law), where the bytes in flight
  per SM = resident warps x 32 lanes x the mean bytes a warp issues before it waits on a load
  (its SASS load bursts); cp.async / TMA kernels keep ``(stages - 1)`` tiles in flight;
* L2 bytes / L2 bandwidth: every tile a program loads passes through L2;
* the busiest SM's tensor FLOPs / its share of the tensor-core ceiling of the dtype (none for
  fp32 without TF32: its FFMAs are counted as issue slots), counting whole tiles: an edge
  tile's padding goes through the tensor cores too, and a persistent GEMM program runs
  ``ceil(tiles / programs)`` tiles (at one CLIP image, 160 tiles of 128 x 128 on 132 programs
  take two tile times, not 160/132);
* issue cycles / (4 schedulers x clock): instructions per warp from the SASS (straight-line
  code + each loop body x its trip count) x warps per SM;

with wave quantization (the busiest SM runs ``ceil(programs / SMs)`` programs) plus a fixed
per-launch cost (ramp-up and tail). Autotuned launches take the best config's estimate (the
autotuner picks by measurement). Every number this module produces is an **estimate**.

Rows are compared with the floor (:mod:`benchmarks.costs`) and with an estimate of
``torch.compile(reference)``: Inductor fuses the group means and the concatenation into one
memory-bound kernel that writes A (at 85 % of the copy bandwidth), then a cuBLAS-class GEMM
with the bias and GELU fused (at 90 % of the tensor ceiling).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dc_kernels.ops.schedule import (SLAB_FILL_STEPS, SPLIT_PARTIAL_STEPS, pipelined_makespan,
                                     pipelined_stream_k_makespan, pipelined_stream_k_steps,
                                     stream_k_partials, stream_k_program_steps)

__all__ = ["GPU", "GPUS", "CARD_GPUS", "gpu_from_constants", "estimate_launch", "estimate_rows",
           "run_static", "markdown", "pipelined_residency_problems", "overlap_residency_problems"]


@dataclass(frozen=True)
class GPU:
    """Ceilings of one card (assumptions, stated in every report)."""

    name: str
    arch: int
    sms: int
    clock_hz: float          # sustained SM clock under load
    dram_bytes_per_s: float  # achievable copy bandwidth (read + write)
    l2_bytes_per_s: float
    tensor_flop_per_s: Dict[str, float]  # "16" (bf16/fp16), "tf32"
    fp32_flop_per_s: float
    latency_s: float         # loaded DRAM latency (Little's law)
    regs_per_sm: int = 65536
    smem_per_sm: int = 233472
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    launch_fixed_s: float = 2.0e-6
    #: one fp32 partial tile of a stream-K GEMM (stored or loaded), in its K steps
    partial_steps: float = SPLIT_PARTIAL_STEPS


GPUS = {
    90: GPU("H100 SXM (est.)", 90, 132, 1.755e9, 3.0e12, 10.0e12,
            {"16": 8.0e14, "tf32": 4.0e14}, 5.9e13, 1.3e-6, smem_per_sm=233472),
    80: GPU("A100 SXM 80GB (est.)", 80, 108, 1.41e9, 1.75e12, 5.0e12,
            {"16": 2.8e14, "tf32": 1.4e14}, 1.95e13, 1.0e-6, smem_per_sm=167936),
}

#: Cards estimated from another card's builds (the same architecture, other ceilings), each
#: with its own report (``<date>-static-<card>.{md,json}``) and the path rule's calibration
#: (``dc_kernels.ops.path.CARD_CALIBRATION_FILES``). The H200: the H100's chip and clocks with
#: HBM3e; 4.3 TB/s is the device-to-device copy measured on this project's lent H200s (the
#: device notes, 2026-10-28 and 2026-11-04: ~4.3 TB/s counting bytes read and written; the
#: datasheet's 4.8 TB/s is the peak), and 800 TFLOP/s stays (769-798 TFLOP/s measured there
#: for an 8192^3 bf16 product); L2 and latency are the H100's assumptions.
CARD_GPUS = {
    "h200": GPU("H200 (est.)", 90, 132, 1.755e9, 4.3e12, 10.0e12,
                {"16": 8.0e14, "tf32": 4.0e14}, 5.9e13, 1.3e-6, smem_per_sm=233472),
}

_ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}


def gpu_from_constants(base: GPU, data: dict) -> Tuple[GPU, List[str]]:
    """``base`` with the constants a GPU run measured, and one line per constant saying what
    replaced what (or why it was kept). ``data``: a probes file (``python -m benchmarks
    --probes``: ``machine``, ``probes``) or a GPU bundle's (which also holds the measured copy
    ``ceilings``). Taken, where the probe ran (status ``ok``):

    * the 16-bit tensor rate from the tensor-step probe, per SM, times ``base``'s SMs (the
      builds' launches are recorded for its SM count); TF32 scaled alike;
    * the SM clock under tensor load; the fixed cost of one eager launch; the L2 read rate;
    * the loaded DRAM latency: the median of the DRAM probe's Little's-law latencies at its
      points below 70 % of the copy bandwidth (above it the figure is mostly queueing);
    * the copy bandwidth, from a bundle's measured ceilings;
    * the partial tile: the mean of "store + release" and "load" on every SM, in K steps of
      the measured tensor step (every SM stores or loads its partials about at once in a
      balanced stream-K launch; a stored partial is followed by its release).

    Everything else (DRAM from a probes file, the ring refill, issue rates) stays ``base``'s."""
    from .probes import (DRAM_READ, EVERY_SM, L2_READ, LAUNCH, SM_CLOCK, TENSOR_STEP,
                         partial_name)
    ok = {p["name"]: p for p in data.get("probes", [])
          if p.get("status") == "ok" and p.get("measured") is not None}
    notes = [f"not used: {p['name']} ({p.get('status')}: {p.get('detail', '')[:120]})"
             for p in data.get("probes", []) if p["name"] not in ok]
    sms = (data.get("machine") or {}).get("sm_count") or base.sms
    kw: Dict[str, Any] = {}

    def took(field: str, value: float, old: float, unit: str, scale: float, source: str):
        kw[field] = value
        notes.append(f"{field}: {old * scale:.4g} -> {value * scale:.4g} {unit} ({source})")
    if TENSOR_STEP in ok and ok[TENSOR_STEP]["extra"].get("tflop_per_s"):
        rate = ok[TENSOR_STEP]["extra"]["tflop_per_s"] * 1e12 / sms * base.sms
        f = rate / base.tensor_flop_per_s["16"]
        kw["tensor_flop_per_s"] = {k: v * f for k, v in base.tensor_flop_per_s.items()}
        notes.append(f"tensor_flop_per_s: 16-bit {base.tensor_flop_per_s['16'] / 1e12:.0f} -> "
                     f"{rate / 1e12:.0f} TFLOP/s over {base.sms} SMs (TF32 alike; "
                     f"{TENSOR_STEP}, {sms} SMs measured)")
    if SM_CLOCK in ok:
        took("clock_hz", ok[SM_CLOCK]["measured"] * 1e9, base.clock_hz, "GHz", 1e-9, SM_CLOCK)
    if LAUNCH in ok:
        took("launch_fixed_s", ok[LAUNCH]["measured"] * 1e-6, base.launch_fixed_s, "us", 1e6,
             LAUNCH)
    if L2_READ in ok:
        took("l2_bytes_per_s", ok[L2_READ]["measured"] * 1e12, base.l2_bytes_per_s, "TB/s",
             1e-12, L2_READ)
    copy = (data.get("ceilings") or {}).get("copy_bytes_per_s")
    if copy:
        took("dram_bytes_per_s", copy, base.dram_bytes_per_s, "TB/s", 1e-12,
             "the bundle's measured copy ceiling")
    dram = kw.get("dram_bytes_per_s", base.dram_bytes_per_s)
    lat = sorted(p["extra"]["implied_latency_us"] for name, p in ok.items()
                 if name.startswith(DRAM_READ + ",") and "implied_latency_us" in p["extra"]
                 and p["measured"] * 1e12 < 0.7 * dram)
    if lat:
        took("latency_s", lat[len(lat) // 2] * 1e-6 if len(lat) % 2 else
             (lat[len(lat) // 2 - 1] + lat[len(lat) // 2]) / 2 * 1e-6, base.latency_s, "us",
             1e6, f"median of {len(lat)} DRAM point(s) below 70 % of the copy bandwidth")
    else:
        notes.append("latency_s: kept (no DRAM point below 70 % of the copy bandwidth)")
    parts = [ok[n]["measured"] for n in (partial_name("store + release", EVERY_SM),
                                         partial_name("load", EVERY_SM)) if n in ok]
    if parts:
        took("partial_steps", sum(parts) / len(parts), base.partial_steps, "K steps", 1.0,
             f"mean of {len(parts)} partial-tile probe(s) on every SM")
    m = data.get("machine") or {}
    name = f"{m.get('device_name', base.name)} (constants measured {m.get('date', '?')})"
    return replace(base, name=name, **kw), notes


# --------------------------------------------------------------------------- one launch
def _warp_regs(registers: int) -> int:
    return math.ceil(max(registers, 1) * 32 / 256) * 256  # allocated in 256-register units


def occupancy(registers: int, shared: int, warps: int, gpu: GPU,
              beside: Optional[dict] = None) -> int:
    """Resident CTAs per SM: limited by registers (allocated per warp in 256-register units),
    shared memory (1 KiB reserved per CTA), warps and the CTA cap. ``beside``: a build of which
    one CTA already occupies every SM (a concurrent kernel): only what it leaves is counted."""
    regs, smem, wmax, cmax = gpu.regs_per_sm, gpu.smem_per_sm, gpu.max_warps_per_sm, \
        gpu.max_ctas_per_sm
    if beside is not None:
        regs -= _warp_regs(beside["registers"]) * beside["num_warps"]
        smem -= beside["shared"] + 1024
        wmax -= beside["num_warps"]
        cmax -= 1
    by_regs = (max(0, regs) // _warp_regs(registers)) // warps
    by_smem = max(0, smem) // (shared + 1024) if shared else cmax
    by_warps = max(0, wmax) // warps
    return max(0, min(by_regs, by_smem, by_warps, cmax))


def pipelined_residency_problems(reports: Sequence[dict]) -> List[str]:
    """The benchmark cases (``dc_kernels.ops.triton_aot`` build reports, any triton version)
    whose pipelined launches cannot share an sm_90 SM: one GEMM CTA and one helper CTA within
    the register file and shared memory (:func:`occupancy`); the whole design rests on it."""
    by_case: Dict[str, Dict[str, dict]] = {}
    for r in reports:
        if r.get("kernel") in ("_gemm_ready_kernel", "_features_helper_kernel") \
                and "error" not in r and r.get("arch") == 90:
            for u in r["uses"]:  # a card's launches are a case of their own
                name = u["case"] + (f" ({u['card']})" if u.get("card") else "")
                by_case.setdefault(name, {})[r["kernel"]] = r
    bad = []
    for case, ks in sorted(by_case.items()):
        gemm, helper = ks.get("_gemm_ready_kernel"), ks.get("_features_helper_kernel")
        if gemm is None:
            continue
        if occupancy(gemm["registers"], gemm["shared"], gemm["num_warps"], GPUS[90]) < 1:
            bad.append(f"{case}: the GEMM ({gemm['registers']} registers, {gemm['shared']} B) "
                       f"does not fit an SM")
        elif helper is not None and occupancy(helper["registers"], helper["shared"],
                                              helper["num_warps"], GPUS[90], beside=gemm) < 1:
            bad.append(f"{case}: the helper ({helper['registers']} registers, "
                       f"{helper['shared']} B) does not fit beside the GEMM "
                       f"({gemm['registers']} registers, {gemm['shared']} B)")
    return bad


def overlap_residency_problems(reports: Sequence[dict]) -> List[str]:
    """The benchmark cases (build reports, any triton version) whose overlapped launches cannot
    share an sm_90 SM: every features build of a chunk after the first (the beside configs,
    told apart by their warps: ``features.FEATURES_TMA_CONFIG_BESIDE``, STI's
    ``STI_FEATURES_CONFIG_BESIDE``) beside every GEMM build of the configs that leave room
    (``gemm_tma.GEMM_TMA_CONFIGS_OVERLAP``, told apart by their register cap; the last chunk's
    GEMM runs alone), within the register file and shared memory (:func:`occupancy`). Without
    room the features of chunk j + 1 wait for the GEMM of chunk j's CTAs to end: the passes
    serialize."""
    from dc_kernels.ops.features import FEATURES_TMA_CONFIG_BESIDE, STI_FEATURES_CONFIG_BESIDE
    from dc_kernels.ops.gemm_tma import OVERLAP_GEMM_MAXNREG
    beside_warps = {"_features_tma_kernel": FEATURES_TMA_CONFIG_BESIDE["num_warps"],
                    "_sti_features_kernel": STI_FEATURES_CONFIG_BESIDE["num_warps"]}
    by_case: Dict[str, Dict[str, list]] = {}
    for r in reports:
        if "error" in r or r.get("arch") != 90:
            continue
        k = r.get("kernel")
        if k == "_gemm_tma_kernel":
            if r.get("maxnreg") != OVERLAP_GEMM_MAXNREG:
                continue
            role = "gemm"
        elif beside_warps.get(k) == r["num_warps"]:
            role = "features"
        else:
            continue
        for u in r["uses"]:
            if "overlap/" not in u["case"]:
                continue
            name = u["case"] + (f" ({u['card']})" if u.get("card") else "")
            by_case.setdefault(name, {"gemm": [], "features": []})[role].append(r)
    bad = []
    for case, ks in sorted(by_case.items()):
        for g in ks["gemm"]:
            for f in ks["features"]:
                if occupancy(f["registers"], f["shared"], f["num_warps"], GPUS[90],
                             beside=g) < 1:
                    bad.append(f"{case}: {f['kernel']} ({f['registers']} registers, "
                               f"{f['shared']} B) does not fit beside the GEMM "
                               f"({g['registers']} registers, {g['shared']} B)")
    return bad


def _stream_k_tiles(kernel: str, c: dict, a: dict) -> Tuple[int, int]:
    """(tiles, K steps per tile) of a stream-K GEMM launch's (tile, K step) sequence (the
    pipelined GEMM's: a slab's K steps)."""
    tiles = math.ceil(a["M"] / c["BLOCK_M"]) * math.ceil(a["N"] / c["BLOCK_N"])
    if kernel == "_gemm_ready_kernel":
        return tiles, a["C"] // c["BLOCK_K"]
    return tiles, math.ceil(a["K"] / c["BLOCK_K"])


def _stream_k_iters(kernel: str, c: dict, a: dict, programs: int) -> int:
    """The most steps of the (tile, K step) sequence one of ``programs`` stream-K programs
    runs (schedule.stream_k_bounds: equal shares to one step)."""
    tiles, ks = _stream_k_tiles(kernel, c, a)
    return -(-(tiles * ks) // programs)


def _loop_trips(kernel: str, loop: dict, c: dict, a: dict, programs: int, grid=(1, 1, 1)
                ) -> float:
    """How often one iteration of a SASS loop runs per program (nested trips multiplied), from
    the kernel's structure and its launch arguments."""
    if kernel == "_linear_kernel":
        if loop["mix"].get("tensor") or loop["mix"].get("fp32", 0) > 64:
            return math.ceil(a["C"] / c["BLOCK_K"])
        return 1
    if kernel == "_gemm_tma_kernel":
        if c.get("SEGMENTS", 0):
            # stream K: at most ceil(steps / programs) K steps (the wgmma loop) per program
            # over SEGMENTS tiles; the sum of a shared tile's partials loops over its PARTS at
            # most
            if not loop["innermost"]:
                return c["SEGMENTS"]
            return _stream_k_iters(kernel, c, a, programs) if loop["mix"].get("tensor") \
                else c["PARTS"]
        tiles = math.ceil(a["M"] / c["BLOCK_M"]) * math.ceil(a["N"] / c["BLOCK_N"])
        per_program = math.ceil(tiles / programs)
        if loop["innermost"]:
            return per_program * math.ceil(a["K"] / c["BLOCK_K"])
        return per_program
    if kernel == "_gemm_ready_kernel" and c.get("SEGMENTS", 0):
        # pipelined stream K: ceil(positions / programs) K steps of every slab (one wgmma
        # loop per slab) over
        # SEGMENTS tiles; the sum of a shared tile's partials (loads, no stores) loops over its
        # PARTS at most; its own units' production (loads and stores) only while it waits
        # (the ready times of the schedule replay), spins and the final reset once
        if loop["mix"].get("tensor"):
            return _stream_k_iters(kernel, c, a, programs) if loop["innermost"] \
                else c["SEGMENTS"]
        if loop["innermost"] and loop["mix"].get("global_load") \
                and not loop["mix"].get("global_store") and loop["mix"].get("fp32", 0) >= 32:
            return c["PARTS"]
        if loop["mix"].get("global_load") or loop["mix"].get("global_store"):
            return 0
        return 1
    if kernel == "_gemm_ready_kernel":
        # pipelined GEMM: whole tiles claimed by ticket (the busiest program: ceil(tiles /
        # programs)); its own row-tile production runs only while the first wave waits (the
        # ramp term of estimate_rows), the final reset loop once
        tiles = math.ceil(a["M"] / c["BLOCK_M"]) * math.ceil(a["N"] / c["BLOCK_N"])
        per_program = math.ceil(tiles / programs)
        if loop["mix"].get("tensor"):
            return per_program * (math.ceil(a["K"] / c["BLOCK_K"]) if loop["innermost"] else 1)
        if loop["mix"].get("global_load"):  # the ramp's production and waits
            return 0
        return 1
    if kernel == "_features_helper_kernel":
        # units claimed by ticket: ceil(Q / programs) row tiles' worth each, C / BLOCK_C
        # channel steps per unit (SPLIT: units of one slab, a channel loop per slab, each
        # running that many steps on average); the unit loop once per unit
        per_program = math.ceil(a["Q"] / programs)
        if loop["innermost"] and loop["mix"].get("global_load"):
            return per_program * math.ceil(a["C"] / c["BLOCK_C"])
        if loop["mix"].get("global_load"):
            return per_program * (len(c["SIZES"]) + 1 if c.get("SPLIT") else 1)
        return 1
    if kernel == "_sti_features_kernel":
        # one launch: the first POOLED_TILES programs of axis 0 write pooled tokens, each
        # running one group's loop (POOL trips), the rest copy base tokens (no loop): a group
        # loop's mean trips per program (the straight-line code of both parts is counted for
        # every program, an over-count of the shorter one)
        groups = max(1, len(c["SIZES"]))
        return c["POOL"] * a["POOLED_TILES"] / groups / max(1, grid[0])
    if kernel == "_features_tma_kernel" and loop["mix"].get("tma"):
        tiles = (a["Q1"] - a["Q0"]) * math.ceil(a["C"] / c["BLOCK_C"])
        return math.ceil(tiles / programs)
    return 1


def _inflight_per_cta(kernel: str, build: dict, c: dict, e: int, stats: dict) -> float:
    """Bytes of global loads one CTA keeps in flight."""
    stages = c.get("STAGES", build["num_stages"])
    if kernel == "_features_tma_kernel":
        # TMA ring: (STAGES - 1) tiles of every layer ahead
        tile = (1 + sum(c["SIZES"])) * c["ROWS"] * c["BLOCK_C"] * e
        return max(1, stages - 1) * tile
    if kernel in ("_gemm_tma_kernel", "_gemm_ready_kernel"):
        return max(1, stages - 1) * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * e
    if stages > 1 and stats["mix"].get("cp_async"):
        loop = max((lp for lp in stats["loops"] if lp["innermost"]),
                   key=lambda lp: lp["load_bytes_per_lane"], default=None)
        return (stages - 1) * (loop["load_bytes_per_lane"] * 32 * build["num_warps"]
                               if loop else 0)
    return build["num_warps"] * 32 * stats["mean_load_burst_per_lane"]


def _work(kernel: str, c: dict, a: dict, facts: dict, e: int, grid,
          partial_steps: float = SPLIT_PARTIAL_STEPS) -> Dict[str, float]:
    """DRAM bytes, L2 bytes and tensor FLOPs of one launch (the tiling's traffic; a stream-K
    GEMM's busiest program with ``partial_steps`` K steps per partial tile)."""
    sizes = c.get("SIZES", ())
    entries = 1 + sum(sizes)
    L = facts.get("layers", entries)
    if kernel == "_features_tma_kernel":
        rows = min((a["Q1"] - a["Q0"]) * c["ROWS"], a["B"] * a["T_KEEP"])
        C = a["C"]
        out = rows * (len(sizes) + 1) * C * e
        return dict(dram=L * rows * C * e + out, l2=entries * rows * C * e + out, flops=0)
    if kernel == "_features_helper_kernel":  # every row of A (the GEMM's share: the ramp)
        images = a["Q"] // math.ceil(a["T_KEEP"] / c["ROWS"])
        rows, C = images * a["T_KEEP"], a["C"]
        out = rows * (len(sizes) + 1) * C * e
        return dict(dram=L * rows * C * e + out, l2=entries * rows * C * e + out, flops=0)
    if kernel == "_features_kernel":
        M, C = a["M"] - a.get("ROW0", 0), a["C"]  # this launch's rows
        out = M * (len(sizes) + 1) * C * e
        return dict(dram=L * M * C * e + out, l2=entries * M * C * e + out, flops=0)
    if kernel == "_sti_features_kernel":
        B, C, tk, tp = a["B"], a["C"], a["T_KEEP"], a["TP"]
        # the base tokens, copied, and the pooled tokens: POOL source rows of every member
        # layer per pooled row
        copy = 2 * B * tk * C * e
        reads = sum(sizes) * B * tp * c["POOL"] * C * e
        out = len(sizes) * B * tp * C * e
        return dict(dram=copy + reads + out, l2=copy + reads + out, flops=0)
    if kernel == "_scatter_grad_kernel":
        M, C, tk, T = a["M"], a["C"], a["T_KEEP"], a["T"]
        n_out = len(c["SLABS"])
        ga = (M // T) * tk * (len(c["SLAB_SCALE"])) * C * e
        reads = sum(len(s) for s in c["SLABS"]) * (M // T) * tk * C * e
        return dict(dram=ga + n_out * M * C * e, l2=reads + n_out * M * C * e, flops=0)
    if kernel in ("_gemm_tma_kernel", "_gemm_ready_kernel"):
        M, N, K = a["M"], a["N"], a["K"]
        tiles_n = math.ceil(N / c["BLOCK_N"])
        tiles_m = math.ceil(M / c["BLOCK_M"])
        # persistent: the busiest program runs ceil(tiles / programs) whole tiles (an edge
        # tile's zero-filled rows and columns go through the tensor cores too)
        k_tiles = math.ceil(K / c["BLOCK_K"])
        step = 2.0 * c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"]
        P = grid[0] * grid[1] * grid[2]
        dram = (M * K + K * N + M * N) * e
        l2 = M * K * e * tiles_n + K * N * e * tiles_m + M * N * e
        # A read in place from A_SLABS layers: a K loop per slab, its TMA ring refilled
        # before every slab after the first (a ring refill per slab boundary of a tile or,
        # stream K, at most per slab boundary inside each segment)
        refills = max(0, c.get("A_SLABS", 0) - 1) * SLAB_FILL_STEPS
        if not c.get("SEGMENTS", 0):
            return dict(dram=dram, l2=l2, flops=2.0 * M * K * N,
                        program_flops=math.ceil(tiles_m * tiles_n / P) * (k_tiles + refills)
                        * step)
        # stream K: the pieces of a shared tile that do not reduce it write fp32 partial
        # tiles, its reducer reads them back (through L2; the stores counted once more
        # through DRAM, as written back); the busiest program runs its steps plus the
        # partials it stores and loads (the path rule's own cost, schedule.stream_k_partials and
        # schedule.stream_k_program_steps)
        pipelined = kernel == "_gemm_ready_kernel"
        ks = a["C"] // c["BLOCK_K"] if pipelined else k_tiles  # a slab's K steps, or K's
        busiest, stored, loaded = stream_k_partials(tiles_m * tiles_n, ks, P,
                                                    longer_first=pipelined)
        iters = _stream_k_iters(kernel, c, a, P)
        tile_bytes = c["BLOCK_M"] * c["BLOCK_N"] * 4
        if pipelined:  # its steps of every slab, ring refills
            steps = pipelined_stream_k_steps(iters, len(sizes) + 1, c["SEGMENTS"], busiest,
                                             partial_steps)
        else:
            steps = stream_k_program_steps(iters, busiest, partial_steps) \
                + c["SEGMENTS"] * refills
        return dict(dram=dram + stored * tile_bytes,
                    l2=l2 + (stored + loaded) * tile_bytes, flops=2.0 * M * K * N,
                    program_flops=steps * step)
    if kernel == "_linear_kernel":
        M, N, C = a["M"], a["N"], a["C"]
        K = C * (len(sizes) + 1)
        tiles_n = math.ceil(N / c["BLOCK_N"])
        tiles_m = math.ceil(M / c["BLOCK_M"])
        if sizes:  # fused: the layers, re-read per N tile from L2
            a_dram, a_l2 = L * M * C * e, entries * M * C * e * tiles_n
        else:
            a_dram, a_l2 = M * K * e, M * K * e * tiles_n
        # one whole tile per program; the K loop runs per slab (fused) or over A
        k_steps = (len(sizes) + 1) * math.ceil(C / c["BLOCK_K"])
        return dict(dram=a_dram + K * N * e + M * N * e,
                    l2=a_l2 + K * N * e * tiles_m + M * N * e, flops=2.0 * M * K * N,
                    program_flops=2.0 * c["BLOCK_M"] * c["BLOCK_N"] * k_steps * c["BLOCK_K"])
    raise KeyError(f"no work model for kernel {kernel}")


def estimate_launch(build: dict, use: dict, gpu: GPU, dtype: str,
                    beside: Optional[dict] = None) -> Dict[str, Any]:
    """Estimated seconds of one launch of one build, with the terms and what bounds it.

    ``beside``: the build of a kernel running at the same time with one CTA on every SM (the
    GEMM under the overlapped path's features): this launch gets only the registers, shared
    memory and warp slots it leaves (its issue slots are assumed free: the other kernel is
    bound by its tensor cores)."""
    kernel = build["kernel"]
    c, a = build["constexprs"], use["args"]
    e = _ELEM[dtype]
    grid = use["grid"]
    P = grid[0] * grid[1] * grid[2]
    warps = build["num_warps"]
    occ = occupancy(build["registers"], build["shared"], warps, gpu, beside)
    if occ == 0:
        raise ValueError(f"{kernel} cannot be resident beside {beside['kernel']}")
    stats = build["sass_stats"]
    loops = stats["loops"]
    inner = [lp for lp in loops if lp["innermost"]]
    instr = stats["outside"]["instructions"]
    for lp in loops:
        # a loop's own instructions (those in no loop nested inside it) x its trips
        nested = [o for o in loops if o is not lp and lp["start"] <= o["start"]
                  and o["end"] <= lp["end"]]
        own = lp["instructions"] - sum(o["instructions"] for o in nested
                                       if not any(q is not o and q["start"] <= o["start"] and
                                                  o["end"] <= q["end"] for q in nested))
        instr += max(0, own) * _loop_trips(kernel, lp, c, a, P, grid)
    per_sm = math.ceil(P / gpu.sms)
    resident = max(1, min(occ, per_sm))
    # a warp issues at most every other cycle on average (dependent instructions, shared-memory
    # and barrier latency): an SM issues min(4, resident warps / 2) instructions per cycle
    ipc = min(4.0, 0.5 * resident * warps)
    issue_s = per_sm * warps * instr / (ipc * gpu.clock_hz)
    w = _work(kernel, c, a, use["facts"], e, grid, gpu.partial_steps)
    # bytes in flight per SM (Little's law)
    per_cta = _inflight_per_cta(kernel, build, c, e, stats)
    inflight = resident * per_cta
    active_sms = min(gpu.sms, P)
    bw = min(gpu.dram_bytes_per_s, active_sms * inflight / gpu.latency_s) if inflight \
        else gpu.dram_bytes_per_s
    dram_s = w["dram"] / bw
    l2_s = w["l2"] / gpu.l2_bytes_per_s
    tensor_s = 0.0
    if w["flops"] and stats["mix"].get("tensor"):
        prec = c.get("INPUT_PRECISION", "ieee")
        rate = gpu.tensor_flop_per_s["tf32" if dtype == "fp32" and prec == "tf32" else "16"]
        # the busiest SM's programs, whole tiles each (wave and tile quantization)
        tensor_s = per_sm * w["program_flops"] / (rate / gpu.sms)
    terms = dict(dram=dram_s, l2=l2_s, tensor=tensor_s, issue=issue_s)
    bound = max(terms, key=terms.get)
    return dict(kernel=kernel, config=use.get("config_desc", build["config"]), seconds=terms[bound] + gpu.launch_fixed_s,
                bound=bound, terms=terms, programs=P, ctas_per_sm=occ, waves=math.ceil(
                    P / (gpu.sms * max(occ, 1))), registers=build["registers"],
                shared=build["shared"], instr_per_warp=instr,
                inflight_kib_per_sm=inflight / 1024, dram_bytes=w["dram"], l2_bytes=w["l2"],
                flops=w["flops"], loop_mix=[lp["mix"] for lp in inner],
                loop_instructions=[lp["instructions"] for lp in inner])


# --------------------------------------------------------------------------- rows
#: benchmark shape name of an AOT case (tower, connector); N = 4096
_SHAPE_NAMES = {("clip336", "dci"): "clip336-4096", ("siglip384", "dci"): "siglip384-4096",
                ("clip336", "sci"): "clip336-4096-sci", ("siglip384", "sci"): "siglip384-4096-sci",
                ("clip336", "sti"): "clip336-4096-sti", ("siglip384", "sti"): "siglip384-4096-sti"}
_PROVIDER = {"features": "dc_kernels", "linear-fused": "dc_kernels-fused",
             "linear-two-pass": "dc_kernels-two-pass", "linear-overlap": "dc_kernels-overlap",
             "linear-pipelined": "dc_kernels-pipelined",
             "scatter": "dc_kernels"}


def _floor(f: dict, e: int, gpu: GPU) -> Tuple[float, float, float]:
    """(floor seconds, floor bytes, floor FLOPs) of the row's op (benchmarks.costs' formulas)."""
    M, K, N, C, L = f["M"], f["K"], f["N"], f["C"], f["layers"]
    layer_rows = f["layer_rows"]
    op = f["op"]
    layers = L * layer_rows * C * e
    if op == "features":
        b, fl = layers + M * K * e, 0.0
    elif op == "scatter":
        b, fl = M * K * e + L * layer_rows * C * e, 0.0
    else:
        b, fl = layers + K * N * e + M * N * e, 2.0 * M * K * N
    return max(b / gpu.dram_bytes_per_s, fl / gpu.tensor_flop_per_s["16"]), b, fl


def compile_reference_estimate(f: dict, e: int, gpu: GPU) -> Optional[float]:
    """Estimated GPU time of ``torch.compile(reference)`` for a features or linear row."""
    M, K, N, C, L = f["M"], f["K"], f["N"], f["C"], f["layers"]
    feats = (L * f["layer_rows"] * C + M * K) * e / (0.85 * gpu.dram_bytes_per_s) \
        + gpu.launch_fixed_s
    if f["op"] == "features":
        return feats
    if f["op"] != "linear":
        return None
    gemm = max(2.0 * M * K * N / (0.9 * gpu.tensor_flop_per_s["16"]),
               (M * K + K * N + M * N) * e / gpu.dram_bytes_per_s) + gpu.launch_fixed_s
    return feats + gemm


def estimate_rows(reports: Sequence[dict], arch: int, gpu: Optional[GPU] = None,
                  card: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per benchmark case (op x shape x images x dtype x path) for ``sm_{arch}``'s
    builds on ``gpu`` (default: the architecture's card, ``GPUS[arch]``), from the launches
    recorded for ``card`` (a key of :data:`CARD_GPUS`, whose launchers read its calibration:
    ``triton_aot.unique_builds``' ``cards``; None: the architecture's)."""
    gpu = gpu or GPUS[arch]
    if gpu.arch != arch:
        raise ValueError(f"{gpu.name} is sm_{gpu.arch}; these are sm_{arch} builds")
    rows: Dict[str, Dict[str, Any]] = {}
    for r in reports:
        if r["arch"] != arch or "error" in r:
            continue
        for use in r["uses"]:
            if use["group"] != "benchmark" or use.get("card") != card:
                continue
            f = use["facts"]
            case = use["case"]
            row = rows.setdefault(case, dict(case=case, facts=f, launches={}))
            est = estimate_launch(r, use, gpu, f["dtype"])
            est["_build"], est["_use"] = r, use
            row["launches"].setdefault(use["launch"], []).append(est)
    out = []
    for case, row in sorted(rows.items()):
        f = dict(row["facts"])
        e = _ELEM[f["dtype"]]
        f["layer_rows"] = f["images"] * (576 if f["tower"] == "clip336" else 729)
        chosen = [min(ests, key=lambda x: x["seconds"]) for _, ests in
                  sorted(row["launches"].items())]
        total = sum(x["seconds"] for x in chosen)
        if case.startswith("linear-overlap"):
            # features chunk j + 1 (side stream) runs under GEMM chunk j: a two-stage pipeline.
            # Chunk 0's features run alone; the later chunks' features get only the SM
            # resources one GEMM CTA leaves on every SM (their bytes in flight shrink)
            fe = [x for x in chosen if "features" in x["kernel"]]
            ge = [x for x in chosen if "features" not in x["kernel"]]
            under = []
            for j, x in enumerate(fe):
                if j == 0:
                    under.append(x["seconds"])
                    continue
                g = ge[min(j - 1, len(ge) - 1)]
                try:
                    y = estimate_launch(x["_build"], x["_use"], gpu, f["dtype"],
                                        beside=g["_build"])
                    under.append(y["seconds"])
                except ValueError:  # no room beside the GEMM: the passes serialize
                    under.append(x["seconds"] + g["seconds"])
            total = under[0] + sum(max(g["seconds"], under[j + 1] if j + 1 < len(under)
                                       else 0.0) for j, g in enumerate(ge))
            row["overlap_features_under_gemm_s"] = under
        if case.startswith("linear-pipelined"):
            if not any(x["kernel"] == "_gemm_ready_kernel" for x in chosen):
                continue  # not built for this card (sm_80 runs two-pass for it)
            total = _pipelined_total(row, chosen, rows, gpu, f)
        for x in chosen:
            x.pop("_build", None)
            x.pop("_use", None)
        floor_s, fb, ff = _floor(f, e, gpu)
        comp = compile_reference_estimate(f, e, gpu)
        kind = case.split("/")[0]
        shape = _SHAPE_NAMES.get((f["tower"], f["connector"]))
        out.append(dict(
            case=case, op=kind, dtype=f["dtype"], images=f["images"], shape=shape,
            row_name=f"{'linear' if kind.startswith('linear') else kind}/{shape}/"
                     f"{f['images']}img/{_PROVIDER[kind]}" if shape else None,
            est_s=total, floor_s=floor_s, est_over_floor=total / floor_s if floor_s else None,
            compile_ref_est_s=comp, speedup_vs_compile_est=(comp / total) if comp else None,
            launches=chosen, floor_bytes=fb, floor_flops=ff,
            **{k: row[k] for k in ("overlap_features_under_gemm_s", "pipelined_ramp_s",
                                   "pipelined_helper_beside_gemm_s") if k in row}))
    return out


def _pipelined_total(row: dict, chosen: list, rows: dict, gpu: GPU, f: dict) -> float:
    """The pipelined path (``dc_kernels.ops.pipelined``): the helper's features launch beside
    the one persistent GEMM launch, whose schedule
    :func:`dc_kernels.ops.schedule.pipelined_makespan` replays (the path rule's own; stream K
    over the slabs:
    :func:`dc_kernels.ops.schedule.pipelined_stream_k_makespan`): the tiles of the GEMM's estimate
    (whole tiles, claimed in grouped order), each waiting for its row block -- the first wave's
    rows produced at this case's ``features/`` row rate (every waiting GEMM program helps), the
    rest at the helper's estimate beside the GEMM (what one GEMM CTA leaves on every SM), no
    faster than each helper program's share of that launch's DRAM bandwidth."""
    gemm = next(x for x in chosen if x["kernel"] == "_gemm_ready_kernel")
    helper = next((x for x in chosen if x["kernel"] == "_features_helper_kernel"), None)
    c, a = gemm["_build"]["constexprs"], gemm["_use"]["args"]
    M, N = a["M"], a["N"]
    tiles = math.ceil(M / c["BLOCK_M"]) * math.ceil(N / c["BLOCK_N"])
    one_tile = (gemm["seconds"] - gpu.launch_fixed_s) / max(1, math.ceil(tiles / gemm["programs"]))
    feats = rows.get(f"features/{row['case'].split('/', 1)[1]}")
    feats_s = min(x["seconds"] for x in feats["launches"][0]) if feats else helper["seconds"]
    alone = (feats_s - gpu.launch_fixed_s) / M
    beside = alone
    if helper is not None:
        try:
            est = estimate_launch(helper["_build"], helper["_use"], gpu, f["dtype"],
                                  beside=gemm["_build"])
            b, dram_s = est["seconds"], est["terms"]["dram"]
        except ValueError:  # not resident beside the GEMM: it runs as the GEMM's CTAs end
            b = helper["seconds"] + gemm["seconds"]
            dram_s = 0.0
        row["pipelined_helper_beside_gemm_s"] = b
        # per row of the helper's throughput: its busiest program's units (the estimate's
        # ceil(Q / programs) row tiles' worth) over every program's rows (not the rows of A:
        # with fewer row tiles than programs, the busiest program's time is one unit's
        # latency), but no faster than every program's share of the launch's DRAM bandwidth
        # (all of A's rows through DRAM: with few row tiles a program's issue rate alone would
        # let the programs together read faster than the bandwidth)
        hc, ha = helper["_build"]["constexprs"], helper["_use"]["args"]
        counted = math.ceil(ha["Q"] / helper["programs"]) * hc["ROWS"] * helper["programs"]
        beside = max((b - gpu.launch_fixed_s) / counted, dram_s / M)
    if c.get("SEGMENTS", 0):
        # stream K over the slabs: the busiest program's step-equivalents give one step's
        # seconds; units slab-major, each slab's bytes per row its layers read and its write
        sizes = c["SIZES"]
        P = gemm["programs"]
        steps = pipelined_stream_k_steps(
            _stream_k_iters("_gemm_ready_kernel", c, a, P), len(sizes) + 1, c["SEGMENTS"],
            stream_k_partials(math.ceil(M / c["BLOCK_M"]) * math.ceil(N / c["BLOCK_N"]),
                              a["C"] // c["BLOCK_K"], P, longer_first=True)[0],
            gpu.partial_steps)
        step_s = (gemm["seconds"] - gpu.launch_fixed_s) / steps
        slab_bytes = [2.0] + [size + 1.0 for size in sizes]
        row["pipelined_ramp_s"] = alone * M * slab_bytes[0] / sum(slab_bytes)
        return pipelined_stream_k_makespan(
            M, N, c["BLOCK_M"], c["BLOCK_N"], c["GROUP_M"], a["C"] // c["BLOCK_K"], P,
            step_s, helper["programs"] if helper is not None else gpu.sms,
            helper["_build"]["constexprs"]["ROWS"] if helper is not None else 8, alone,
            beside, slab_bytes, gpu.partial_steps) + gpu.launch_fixed_s
    row["pipelined_ramp_s"] = alone * min(M, math.ceil(gpu.sms / math.ceil(N / c["BLOCK_N"]))
                                          * c["BLOCK_M"])
    return pipelined_makespan(M, N, c["BLOCK_M"], c["BLOCK_N"], c["GROUP_M"], gemm["programs"],
                              one_tile, alone, beside) + gpu.launch_fixed_s


# --------------------------------------------------------------------------- reports
def _us(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e6:,.1f}"


def markdown(rows: Sequence[dict], reports: Sequence[dict], meta: dict, arch: int,
             gpu: Optional[GPU] = None, constants: Sequence[str] = ()) -> str:
    """The committed markdown report of one architecture's builds on ``gpu`` (default: its
    card, ``GPUS[arch]``); ``constants``: the lines of :func:`gpu_from_constants` when some of
    its constants were measured (``meta["constants"]`` names the file)."""
    gpu = gpu or GPUS[arch]
    lines = [f"# Static cost model, sm_{arch} ({gpu.name}) — every number is an ESTIMATE",
             "",
             f"triton {meta['triton']}, torch {meta['torch']}, {meta['date']}; built on a CPU "
             "machine with Triton's own binder (the kernels the JIT runs), no GPU involved. "
             "Model and assumptions: `benchmarks/static.py`, `docs/DESIGN.md` §5.",
             ""]
    if constants:
        lines += [f"The model with the constants a GPU run measured (`{meta['constants']}`), "
                  "the others assumed; still estimates of the kernels' time:", ""]
        lines += [f"- {c}" for c in constants] + [""]
    lines += [f"{'Ceilings' if constants else 'Assumed ceilings'}: DRAM "
              f"{gpu.dram_bytes_per_s / 1e12:.2f} TB/s, L2 "
              f"{gpu.l2_bytes_per_s / 1e12:.1f} TB/s, 16-bit tensor "
              f"{gpu.tensor_flop_per_s['16'] / 1e12:.0f} TFLOP/s, TF32 "
              f"{gpu.tensor_flop_per_s['tf32'] / 1e12:.0f}, fp32 FFMA "
              f"{gpu.fp32_flop_per_s / 1e12:.1f}, {gpu.sms} SMs at "
              f"{gpu.clock_hz / 1e9:.2f} GHz, loaded latency {gpu.latency_s * 1e6:.2f} us, "
              f"{gpu.launch_fixed_s * 1e6:.1f} us fixed per launch, "
              f"{gpu.partial_steps:.2f} K steps per stream-K partial tile.", "",
              "| case | est. us | bound (per launch) | floor us | est. / floor | "
              "compile(ref) est. us | est. speedup vs compile(ref) | launches: kernel cfg "
              "regs smem CTAs/SM waves in-flight KiB/SM |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        launches = "; ".join(
            f"{x['kernel'].strip('_')} c{x['config'] if x['config'] is not None else '-'} "
            f"{x['registers']}r {x['shared'] // 1024}K {x['ctas_per_sm']}x{x['waves']}w "
            f"{x['inflight_kib_per_sm']:.0f}K" for x in r["launches"])
        bound = ", ".join(f"{x['bound']}" for x in r["launches"])
        eof = f"{r['est_over_floor']:.2f}" if r["est_over_floor"] else "-"
        sp = f"{r['speedup_vs_compile_est']:.2f}x" if r["speedup_vs_compile_est"] else "-"
        lines.append(f"| {r['case']} | {_us(r['est_s'])} | {bound} | {_us(r['floor_s'])} | "
                     f"{eof} | {_us(r['compile_ref_est_s'])} | {sp} | {launches} |")
    lines += ["", "## Main-loop instruction mix per iteration (innermost loops, per warp)", "",
              "| kernel | cfg | dtype | loop instructions | mix |", "|---|---|---|---|---|"]
    seen = set()
    for r in reports:
        if r["arch"] != arch or "error" in r:
            continue
        loops = [lp for lp in r["sass_stats"]["loops"] if lp["innermost"]]
        if not loops:
            continue
        key = (r["kernel"], r["config"], r["uses"][0]["facts"].get("dtype"),
               tuple(lp["instructions"] for lp in loops))
        if key in seen:
            continue
        seen.add(key)
        for lp in loops:
            mix = ", ".join(f"{k} {v}" for k, v in sorted(lp["mix"].items(), key=lambda t: -t[1]))
            lines.append(f"| {r['kernel']} | {r['config']} | {key[2]} | {lp['instructions']} | "
                         f"{mix} |")
    return "\n".join(lines) + "\n"


def _beside_efficiency(over: Optional[dict], gpu: GPU) -> Optional[float]:
    # an overlap row's features beside the GEMM (its chunks after the first): their DRAM bytes
    # over the copy bandwidth, over their estimated seconds there; None without such chunks
    if not over or not over.get("overlap_features_under_gemm_s"):
        return None
    under = over["overlap_features_under_gemm_s"][1:]
    fe = [x for x in over["launches"] if "features" in x["kernel"]][1:]
    if not under or not fe:
        return None
    return round(sum(x["dram_bytes"] for x in fe) / gpu.dram_bytes_per_s / sum(under), 3)


def calibration_from_rows(rows: Sequence[dict], arch: int = 90,
                          shape: str = "clip336-dci", images: int = 16,
                          gpu: Optional[GPU] = None) -> Dict[str, Any]:
    """Constants of the path model (``dc_kernels/ops/calibration.json``) read off the static
    estimates of one shape (bf16) on ``gpu`` (default ``GPUS[arch]``; the rows must be its
    own): how far each pass lands from its own roofline."""
    from dc_kernels import ConnectorSpec
    from dc_kernels.ops.triton_aot import TOWERS
    gpu = gpu or GPUS[arch]
    by = {r["case"]: r for r in rows}
    tower, connector = shape.split("-")
    enc = {name: enc for name, enc, _, _ in TOWERS}[tower]
    tag = f"{shape}-{images}img-bf16"
    feats = by[f"features/{tag}"]
    two = by[f"linear-two-pass/{tag}"]
    fused = by[f"linear-fused/{tag}"]
    over = by.get(f"linear-overlap/{tag}")
    f_floor = feats["floor_bytes"] / gpu.dram_bytes_per_s
    gemm = [x for x in two["launches"] if "features" not in x["kernel"]][0]
    g_floor = gemm["flops"] / gpu.tensor_flop_per_s["16"]
    fl = fused["launches"][0]
    layer_elems = fl["l2_bytes"]  # the fused kernel's L2 bytes are dominated by layer re-reads
    f = fused["facts"] if "facts" in fused else None  # noqa: F841 (kept for readability)
    cal = dict(
        dram_bytes_per_s=gpu.dram_bytes_per_s, l2_bytes_per_s=gpu.l2_bytes_per_s,
        flop_per_s=gpu.tensor_flop_per_s["16"], launch_s=gpu.launch_fixed_s * 2,
        sms=gpu.sms, issue_per_s=gpu.sms * 4 * gpu.clock_hz,
        features_efficiency=round(f_floor / (feats["est_s"] - gpu.launch_fixed_s), 3),
        gemm_efficiency=round(g_floor / (gemm["seconds"] - gpu.launch_fixed_s), 3),
        gemm_tile_m=int(gemm["config"].split("x")[0]),
        gemm_tile_n=int(gemm["config"].split("x")[1]),
        gemm_split_k=arch >= 90,  # the TMA GEMM runs stream K; sm_80's cp.async GEMM does not
        fused_block_n=int(fl["config"].split("x")[1]),
        # groups of at most 4 layers (SCI) leave the fused kernel room for wider tiles
        fused_block_n_small_groups=int(
            by[f"linear-fused/{tower}-sci-{images}img-bf16"]["launches"][0]
            ["config"].split("x")[1]),
        fused_instr_per_element=round(
            fl["instr_per_warp"] * fl["programs"] * int(fl["config"].split("w")[1].split()[0])
            / max(1.0, layer_elems / 2), 4))
    eff = _beside_efficiency(over, gpu)
    if eff is not None:
        cal["features_efficiency_beside_gemm"] = eff
        # what it was read on: the case's distinct layers x bytes per element (bf16)
        cal["beside_gemm_layer_bytes"] = 2 * len(
            ConnectorSpec.preset(enc, connector).used_layers)
    # STI's features beside the GEMM (the overlap's image chunks after the first: the STI
    # kernel's beside config), read off the tower's STI overlap row; the DCI features' where
    # that row has no chunk beside the GEMM
    eff = _beside_efficiency(by.get(f"linear-overlap/{tower}-sti-{images}img-bf16"), gpu)
    if eff is not None or "features_efficiency_beside_gemm" in cal:
        cal["sti_efficiency_beside_gemm"] = eff if eff is not None \
            else cal["features_efficiency_beside_gemm"]
    # the pipelined path's helper beside the GEMM (its own kernel, not the overlap's features
    # launch): the lower of its efficiencies at one image and at ``images``; and the layer
    # bytes per element row below which it keeps too few bytes in flight, read off SCI's
    # (3 layers) efficiency at ``images``, as beside_gemm_layer_bytes for the overlap
    def helper_eff(case):
        row = by.get(case)
        h = [x for x in row["launches"] if x["kernel"] == "_features_helper_kernel"] \
            if row and row.get("pipelined_helper_beside_gemm_s") else []
        return h[0]["dram_bytes"] / gpu.dram_bytes_per_s / (
            row["pipelined_helper_beside_gemm_s"] - gpu.launch_fixed_s) if h else None
    effs = [x for x in (helper_eff(f"linear-pipelined/{shape}-{n}img-bf16")
                        for n in sorted({1, images})) if x]
    eff = min(effs) if effs else cal["features_efficiency_beside_gemm"]
    cal["helper_efficiency_beside_gemm"] = round(eff, 3)
    sci = helper_eff(f"linear-pipelined/{tower}-sci-{images}img-bf16")
    sci_bytes = 2 * len(ConnectorSpec.preset(enc, "sci").used_layers)
    cal["helper_layer_bytes"] = round(sci_bytes * eff / sci) if sci and sci < eff \
        else sci_bytes
    # one stream-K helper program's DRAM rate at the bytes it keeps in flight (Little's law,
    # as estimate_launch bounds every launch), read off the 1-image row's helper launch (the
    # split config): the path model's cap for helper counts below its own (the sweep's
    # @helpers=N), where fewer programs share the bandwidth but each keeps no more in flight
    row = by.get(f"linear-pipelined/{shape}-1img-bf16")
    h = [x for x in row["launches"] if x["kernel"] == "_features_helper_kernel"] if row else []
    if h and h[0].get("inflight_kib_per_sm"):
        resident = max(1, min(h[0]["ctas_per_sm"], math.ceil(h[0]["programs"] / gpu.sms)))
        cal["helper_program_bytes_per_s"] = float(
            f"{h[0]['inflight_kib_per_sm'] * 1024 / resident / gpu.latency_s:.4g}")
    return cal


def write_calibration(cal: Dict[str, Any], source: str, path: Optional[str] = None,
                      arch: int = 90, card: Optional[str] = None) -> str:
    """Merge ``cal`` into the package's calibration file of ``card`` (a key of
    :data:`CARD_GPUS`) or else of ``sm_{arch}`` (keeps measured factors; a missing file starts
    with factors of 1)."""
    from dc_kernels.ops import path as path_mod
    target = path or path_mod.calibration_file(arch, card)
    old: Dict[str, Any] = {"measured_over_estimated": {"fused": 1.0, "two-pass": 1.0,
                                                       "overlap": 1.0, "pipelined": 1.0}}
    if os.path.exists(target):
        with open(target) as f:
            old = json.load(f)
    old.update(cal)
    old["source"] = source
    with open(target, "w") as f:
        json.dump(old, f, indent=2)
        f.write("\n")
    return target


def _constants_run(path: str, log) -> Tuple[int, Optional[str], GPU, List[str]]:
    # (arch, card, GPU, notes) of a probes or bundle file: its machine's card with the
    # constants it measured (gpu_from_constants)
    from .bundle import card_of_machine
    with open(path) as f:
        data = json.load(f)
    if not data.get("probes"):
        raise ValueError(f"{path}: no probe results in it (a `python -m benchmarks --probes` "
                         "or GPU bundle JSON has them)")
    arch, card = card_of_machine(data.get("machine") or {})
    base = CARD_GPUS.get(card) if card in CARD_GPUS else GPUS.get(arch)
    if base is None:
        raise ValueError(f"{path}: its card is sm_{arch}; the static model has "
                         f"{sorted(GPUS)} and {sorted(CARD_GPUS)}")
    gpu, notes = gpu_from_constants(base, data)
    for n in notes:
        log(f"  {n}")
    return arch, (card if card in CARD_GPUS else None), gpu, notes


def run_static(out_dir: str, archs: Sequence[int] = (90, 80), dtypes=("bf16", "fp16", "fp32"),
               log=print, calibrate: bool = True, constants: Optional[str] = None) -> List[str]:
    """Build, estimate, write ``<date>-static-sm<arch>.{md,json}`` (and
    ``<date>-static-<card>.{md,json}`` for :data:`CARD_GPUS` of those architectures) and, with
    ``calibrate``, the path rule's calibration files; returns the paths written.

    ``constants``: a probes or GPU bundle JSON: only its card's architecture is built, and
    estimated with the constants it measured (:func:`gpu_from_constants`), into
    ``<date>-static-<card>-measured-constants.{md,json}``, beside the assumed model's reports;
    no calibration is written (which constants the path rule should take is for whoever reads
    both)."""
    import torch
    from dc_kernels.ops import triton_aot
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: --static builds the real kernels")
    measured = _constants_run(constants, log) if constants else None
    if measured:
        archs, calibrate = (measured[0],), False
    log(f"building every benchmark kernel for sm_{','.join(map(str, archs))} ...")
    cases = [c for c in triton_aot.aot_cases(dtypes)]
    cards = [(g.arch, card) for card, g in CARD_GPUS.items() if g.arch in archs
             and (measured is None or card == measured[1])]
    reports = triton_aot.build_cases(cases, archs, cards=cards)
    log(triton_aot.summarize(reports))
    meta = dict(triton=triton_aot.triton_version(), torch=torch.__version__,
                python=platform.python_version(), date=datetime.date.today().isoformat(),
                estimate=True)
    paths = []
    os.makedirs(out_dir, exist_ok=True)
    # each architecture's card, then the cards estimated from its builds
    runs = [(arch, None, GPUS[arch]) for arch in archs]
    runs += [(arch, card, CARD_GPUS[card]) for arch, card in cards]
    suffix, notes = "", []
    if measured:
        arch, card, gpu, notes = measured
        runs, suffix = [(arch, card, gpu)], "-measured-constants"
        meta["constants"] = os.path.basename(constants)
        meta["constants_notes"] = notes
    for arch, card, gpu in runs:
        rows = estimate_rows(reports, arch, gpu, card)
        base = os.path.join(out_dir, f"{meta['date']}-static-{card or f'sm{arch}'}{suffix}")
        with open(base + ".md", "w") as f:
            f.write(markdown(rows, reports, meta, arch, gpu, notes))
        with open(base + ".json", "w") as f:
            json.dump(dict(meta=meta, gpu=asdict(gpu), rows=rows,
                           builds=[{k: v for k, v in r.items() if k != "uses"}
                                   for r in reports if r["arch"] == arch and
                                   any(u.get("card") == card for u in r["uses"])]),
                      f, indent=1, default=str)
        paths += [base + ".md", base + ".json"]
        if calibrate:
            cal = calibration_from_rows(rows, arch, gpu=gpu)
            cal["device"] = gpu.name.replace("(est.)", "(assumed ceilings)")
            paths.append(write_calibration(
                cal, f"estimate: static cost model of sm_{arch} builds ({meta['date']}, triton "
                     f"{meta['triton']}; {os.path.basename(base)}.json), no GPU measurement",
                arch=arch, card=card))
    return paths


if __name__ == "__main__":  # pragma: no cover
    for p in run_static(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"):
        print(p)
