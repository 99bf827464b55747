"""The path rule: which Triton route computes ``act(features @ W^T + b)`` for a shape.

:func:`estimate_linear_times` estimates each path from the constants of the committed
calibration of the card (``calibration.json`` beside this file for sm_90, an H100 SXM;
``calibration-h200.json`` for an H200, the same chip with 1.4x the DRAM bandwidth;
``calibration-sm80.json`` for sm_80): the ceilings of the card it describes, the
efficiencies the static cost model (``python -m benchmarks --static``) reads from the compiled
kernels, and the measured/estimated factors a GPU run (``python -m benchmarks --gpu-bundle``)
adds. :func:`choose_linear_path` picks the fastest. Until a GPU run is committed the
calibration's ``source`` says so, and every estimate is an estimate. The stream-K shares and
the schedule replays these estimates time are in :mod:`.schedule`.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Optional, Sequence, Tuple

from .schedule import (SLAB_FILL_STEPS, _stream_k_steps, gemm_stream_k, pipelined_makespan,
                       pipelined_stream_k, pipelined_stream_k_makespan, split_helpers)

__all__ = ["CALIBRATION_FILE", "CALIBRATION_FILES", "CARD_CALIBRATION_FILES", "load_calibration",
           "PATH_MODEL", "TMA_MAJOR", "runs_tma_kernels", "card_key", "calibration_file",
           "model_for", "estimate_linear_times", "pipelined_stream_k_replays",
           "pipelined_stream_k_programs", "choose_linear_path", "overlap_chunk_rows",
           "estimate_sti_times", "sti_overlap_images", "sti_chunk_row_multiple",
           "STI_MAX_CHUNK_IMAGES", "STI_OVERLAP_MARGIN", "gemm_split_gain"]

_HERE = os.path.dirname(os.path.abspath(__file__))
#: The sm_90 (H100-class) calibration: the default model (the interpreter, no card known).
CALIBRATION_FILE = os.path.join(_HERE, "calibration.json")
#: One calibration per architecture the static model builds for (``python -m benchmarks
#: --static`` writes both): sm_90 cards run the TMA GEMM (which may run stream K), sm_80 cards the
#: cp.async one (which does not), on other SM counts, tiles and ceilings.
CALIBRATION_FILES = {90: CALIBRATION_FILE, 80: os.path.join(_HERE, "calibration-sm80.json")}
_REQUIRED = ("dram_bytes_per_s", "l2_bytes_per_s", "flop_per_s", "launch_s", "sms",
             "issue_per_s", "features_efficiency", "features_efficiency_beside_gemm",
             "helper_efficiency_beside_gemm", "helper_layer_bytes", "beside_gemm_layer_bytes",
             "sti_efficiency_beside_gemm",
             "gemm_efficiency",
             "gemm_tile_m", "gemm_tile_n",
             "gemm_split_k", "fused_block_n", "fused_block_n_small_groups",
             "fused_instr_per_element",
             "measured_over_estimated")


def load_calibration(path: Optional[str] = None) -> Dict:
    """The path model's constants (``calibration.json``); ValueError if a key is missing."""
    with open(path or CALIBRATION_FILE) as f:
        cal = json.load(f)
    missing = [k for k in _REQUIRED if k not in cal]
    if missing:
        raise ValueError(f"calibration file {path or CALIBRATION_FILE} lacks {missing}")
    return cal


#: Cards of an architecture whose ceilings differ from its default calibration's enough to
#: move the rule's picks, by :func:`card_key`: the H200 is the H100's chip (132 SMs, the same
#: tensor cores) with HBM3e, ~4.3 TB/s of copy bandwidth against the H100 SXM's ~3.0 (the
#: copy measured on the H200s this project's GPU runs borrow). Its calibration is the static
#: model's H200 report (``benchmarks.static.CARD_GPUS``): the features beside the GEMM keep
#: the same bytes in flight, a smaller share of the faster DRAM (helper efficiency 0.71
#: against 1.0), so the rule keeps e.g. CLIP -> 7168 at 2 images and CLIP SCI at 8 on
#: two-pass and CLIP -> 7168 at 3 images on the overlap, where an H100 runs pipelined
#: (*estimates*, 2026-12-04).
CARD_CALIBRATION_FILES = {"h200": os.path.join(_HERE, "calibration-h200.json")}
#: ``card_key``'s patterns: a whole word of the CUDA device name (``"NVIDIA H200"``, ``"NVIDIA
#: H200 NVL"``; not ``"NVIDIA GH200 480GB"``, whose memory differs by model)
_CARD_PATTERNS = {"h200": re.compile(r"\bH200\b", re.IGNORECASE)}


def card_key(device_name: Optional[str]) -> Optional[str]:
    """The key of :data:`CARD_CALIBRATION_FILES` a CUDA device name (``torch.cuda.
    get_device_name``) matches, or None: the card takes its architecture's calibration."""
    for key, pattern in _CARD_PATTERNS.items():
        if device_name and pattern.search(device_name):
            return key
    return None


#: The SM major version the TMA / ``wgmma`` kernels (the TMA GEMM, the TMA features kernel,
#: the pipelined path) are written, tuned and checked for (``tests/test_aot_compile.py``,
#: ``.ci/aot36``): sm_90 (H100, H200, H800, H20, GH200). Every other card of
#: :data:`dc_kernels.ops.common.MIN_CAPABILITY` or newer runs the portable kernels (the
#: ``cp.async`` GEMM and the pointer-load features kernel, their configs pruned by the card's
#: shared memory), which are built for sm_80, sm_86, sm_90, sm_100 and sm_120. Built as the JIT binds
#: them (triton 3.9, one CLIP DCI image, 2026-12-04), the stream-K GEMM needs 254 registers on
#: sm_100 and the pipelined GEMM spills (10 spill stores); on sm_120 (no wgmma, 99 KiB of
#: shared memory) they spill 20-55.
TMA_MAJOR = 9


def runs_tma_kernels(arch: Optional[int]) -> bool:
    """Whether an ``sm_{arch}`` card runs the TMA kernels (:data:`TMA_MAJOR`; None, no card:
    False). The one rule the launchers (``gemm_tma.tma_kernels_serve``), the calibration
    choice (:func:`calibration_file`) and the GPU bundle's card lookup apply."""
    return arch is not None and arch // 10 == TMA_MAJOR


def calibration_file(arch: Optional[int], card: Optional[str] = None) -> str:
    """The calibration file of an ``sm_{arch}`` card: ``card``'s own where it has one (a key of
    :data:`CARD_CALIBRATION_FILES`, :func:`card_key` of the device name; an unknown key is a
    ValueError), else by the kernels the card runs: sm_90's for an sm_90 card (the TMA
    kernels, :func:`runs_tma_kernels`; and for None: the interpreter, or no
    card known), sm_80's (the portable ``cp.async`` kernels) for every other. What the path
    rule reads (:func:`model_for`), the static model writes and the GPU bundle names for its
    factors."""
    if card is not None:
        if card not in CARD_CALIBRATION_FILES:
            raise ValueError(f"no calibration for card {card!r}; known: "
                             f"{sorted(CARD_CALIBRATION_FILES)}")
        return CARD_CALIBRATION_FILES[card]
    return CALIBRATION_FILES[90 if arch is None or runs_tma_kernels(arch) else 80]


#: The constants of every calibration file, read once at import; PATH_MODEL: sm_90's (an
#: H100 SXM).
_MODELS = {f: load_calibration(f) for f in (*CALIBRATION_FILES.values(),
                                            *CARD_CALIBRATION_FILES.values())}
PATH_MODEL = _MODELS[CALIBRATION_FILE]


_SCALED: Dict[Tuple[str, int], Dict] = {}


def model_for(arch: Optional[int], card: Optional[str] = None, sms: Optional[int] = None
              ) -> Dict:
    """The constants of :func:`calibration_file` ``(arch, card)``; ``sms``: the card's SM
    count where it differs from the calibration's (an H100 PCIe's 114 against the SXM's 132,
    an L4's 58 against the A100's 108): the model then has that many SMs, each with the
    calibration card's FLOP and issue rates, so tile waves, overlap chunks and stream-K
    splits are counted on the card's SMs. Its DRAM and L2 stay the calibration's (no
    device query gives them; *estimates* either way)."""
    path = calibration_file(arch, card)
    m = _MODELS[path]
    if sms is None or sms == m["sms"]:
        return m
    if sms <= 0:
        raise ValueError(f"sms must be a positive SM count, got {sms}")
    key = (path, sms)
    if key not in _SCALED:
        f = sms / m["sms"]
        _SCALED[key] = dict(m, sms=sms, flop_per_s=m["flop_per_s"] * f,
                            issue_per_s=m["issue_per_s"] * f)
    return _SCALED[key]


def estimate_linear_times(M: int, C: int, N: int, num_layers_read: int, num_slabs: int,
                          element_size: int, model: Optional[Dict] = None,
                          direct: bool = False) -> dict:
    """Estimated seconds of each path, from :data:`PATH_MODEL` (or ``model``).

    With L distinct layers read, K = slabs * C and e bytes per element:

    * features pass: ``(L*M*C + M*K) e`` through DRAM at ``features_efficiency`` of the copy
      bandwidth;
    * GEMM: ``max(2 M K N / flop_per_s, (M*K + K*N + M*N) e / dram)`` over
      ``gemm_efficiency``, with wave quantization of 128 x 128 tiles over the SMs, times
      :func:`gemm_split_gain` where the kernel runs stream K;
    * ``two-pass`` = features + GEMM + a launch; with ``direct`` (its GEMM reads every slab
      in place from its layer: :func:`dc_kernels.ops.linear.direct_serves`) the GEMM alone,
      each tile's K loop restarting its TMA ring once per slab after the first
      (:data:`SLAB_FILL_STEPS` of a 64-deep step each); ``overlap`` (row chunks of
      :func:`overlap_chunk_rows`, at least two) = the first chunk's features, then per chunk
      the slower of its GEMM (quantized per chunk; only the last chunk's may run stream K) and the
      next chunk's features (which run beside the GEMM's CTAs at
      ``features_efficiency_beside_gemm`` of the bandwidth, calibrated on a case reading
      layers of ``beside_gemm_layer_bytes`` = L x e bytes per element row; with fewer layers
      a features program beside the GEMM keeps proportionally fewer bytes in flight -- one
      tile per layer -- so the efficiency scales down with ``L e``: SCI's 3 layers reach about
      an eighth of DCI's bandwidth there) + a launch per chunk;
    * ``pipelined`` (one features launch beside one persistent GEMM whose tiles wait on
      per-row-block ready counts; :mod:`dc_kernels.ops.pipelined`) = its schedule replayed by
      :func:`pipelined_makespan` (whole tiles; the first wave's rows at the features pass's
      rate, the rest at the helper's, ``helper_efficiency_beside_gemm`` of the bandwidth,
      scaled down as above below ``helper_layer_bytes`` per element row) or, where
      :func:`pipelined_stream_k` splits the slabs' K steps (few tiles) and its replay
      (:func:`pipelined_stream_k_makespan`) is faster (:func:`pipelined_stream_k_programs`), by
      that (its helpers together no faster than ``helper_program_bytes_per_s`` each, where the
      calibration has it: one program's bytes in flight over the DRAM latency); + a launch;
    * ``fused``: DRAM floor ``(L*M*C + K*N + M*N) e``, the layer tiles re-read from L2 once per
      N tile (``fused_block_n`` wide; ``fused_block_n_small_groups`` when the slabs average
      at most 4 layers) and W once per 64-row tile, the FLOPs, and the issue cost of
      rebuilding A per N tile (``fused_instr_per_element`` warp instructions per layer
      element and N tile);
    * each multiplied by its ``measured_over_estimated`` factor (1 until a GPU run says more).
    """
    m = model or PATH_MODEL
    e = element_size
    K = num_slabs * C
    layers = num_layers_read * M * C * e
    dram = m["dram_bytes_per_s"]
    feats_per_row = (layers / M + K * e) / (dram * m["features_efficiency"])
    feats = feats_per_row * M

    def gemm_of(rows: int, may_split: bool) -> float:
        return _gemm_time(rows, N, K, e, m, may_split)

    if direct:
        k_steps = max(1, math.ceil(K / 64))
        two_pass = gemm_of(M, True) * (1 + (num_slabs - 1) * SLAB_FILL_STEPS / k_steps) \
            + m["launch_s"]
    else:
        two_pass = feats + gemm_of(M, True) + m["launch_s"]
    rows = overlap_chunk_rows(M, N, m)
    chunks = max(1, math.ceil(M / rows))
    if chunks >= 2:
        # the features of chunk 0 run alone, those of chunk j + 1 beside the GEMM of chunk j
        # at ``features_efficiency_beside_gemm`` of the copy bandwidth; every chunk's GEMM is
        # quantized on its own, and only the last one (nothing runs beside it) may run stream K
        beside_per_row = _beside_per_row(feats_per_row, num_layers_read * e, m,
                                         "features_efficiency_beside_gemm",
                                         "beside_gemm_layer_bytes")
        sizes = [rows] * (chunks - 1) + [M - rows * (chunks - 1)]
        overlap = feats_per_row * sizes[0] + chunks * m["launch_s"]
        for j, r in enumerate(sizes):
            nxt = beside_per_row * sizes[j + 1] if j + 1 < chunks else 0.0
            overlap += max(gemm_of(r, j == chunks - 1), nxt)
    else:
        overlap = two_pass
    whole, split = _pipelined_makespans(M, C, N, num_layers_read, num_slabs, e, m)
    pipelined = min([whole, *split.values()])
    # the fused kernel's N tile: its shared memory holds one A tile per group member, so
    # small groups (SCI's single layers) leave room for wider tiles than DCI's 12-layer groups
    small = num_layers_read <= 4 * num_slabs
    tiles_n = math.ceil(N / m["fused_block_n_small_groups" if small else "fused_block_n"])
    rebuild = tiles_n * num_layers_read * M * C * m["fused_instr_per_element"] / m["issue_per_s"]
    tiles_m = math.ceil(M / 64)  # the fused kernel's row tiles (BLOCK_M = 64)
    fused = max((layers + (K * N + M * N) * e) / dram,
                (tiles_n * layers + tiles_m * K * N * e) / m["l2_bytes_per_s"],
                2.0 * M * K * N / m["flop_per_s"], rebuild)
    f = m["measured_over_estimated"]
    return {"fused": fused * f.get("fused", 1.0), "two-pass": two_pass * f.get("two-pass", 1.0),
            "overlap": overlap * f.get("overlap", 1.0),
            "pipelined": pipelined * f.get("pipelined", 1.0)}


#: STI takes the overlap only where its estimate is at least this much under two-pass's: its
#: chunks add launches and a side stream whose costs the rule's roofline does not resolve, so a
#: near tie goes to the one-launch-per-pass path (at 16 CLIP images the rule has the two within
#: 0.1 %, and the static model puts the overlap 2 % behind: *estimates*, 2026-12-06).
STI_OVERLAP_MARGIN = 0.03
#: The largest image chunk :func:`sti_overlap_images` considers (a bigger first chunk only
#: lengthens the features pass that runs alone).
STI_MAX_CHUNK_IMAGES = 64


def _sti_overlap_time(batch: int, images: int, t_out: int, C: int, N: int, e: int,
                      per_image: float, beside_per_image: float, m: Dict) -> float:
    # the overlapped path over chunks of ``images`` images (the last one ragged): the first
    # chunk's features alone, then per chunk the slower of its GEMM (only the last one, alone,
    # may run stream K) and the next chunk's features beside it; a launch per chunk
    chunks = math.ceil(batch / images)
    sizes = [images] * (chunks - 1) + [batch - images * (chunks - 1)]
    total = per_image * sizes[0] + chunks * m["launch_s"]
    for j, n in enumerate(sizes):
        nxt = beside_per_image * sizes[j + 1] if j + 1 < chunks else 0.0
        total += max(_sti_gemm_time(n * t_out, N, C, e, m, j == chunks - 1), nxt)
    return total


def _sti_gemm_time(rows: int, N: int, K: int, e: int, m: Dict, may_split: bool) -> float:
    # STI's GEMMs, quantized in the calibration's tiles (128 x 256 on sm_90): its image chunks
    # fill the tile waves unevenly, which 128 x 128 tiles would understate
    return _gemm_time(rows, N, K, e, m, may_split, (m["gemm_tile_m"], m["gemm_tile_n"]))


def _sti_rates(t_keep: int, t_out: int, C: int, num_layers_read: int, e: int, m: Dict
               ) -> Tuple[float, float]:
    # seconds per image of the STI features alone and beside the GEMM: every read layer's
    # kept tokens (the base copied, each group member pooled) and A's rows, through DRAM
    per_image = (num_layers_read * t_keep + t_out) * C * e / (
        m["dram_bytes_per_s"] * m["features_efficiency"])
    return per_image, per_image * m["features_efficiency"] / m["sti_efficiency_beside_gemm"]


def sti_chunk_row_multiple(arch: Optional[int]) -> int:
    """What STI's image chunks' rows must be a multiple of on an ``sm_{arch}`` card: 1 where
    the TMA GEMM runs (:func:`runs_tma_kernels`; None: the interpreter, no card), 16 on the
    cards of the ``cp.async`` GEMM, whose launches with rows not divisible by 16 keep only
    narrow tiles (``linear.prune_configs``; SigLIP's 911 rows per image took 128 x 64 tiles,
    L2-bound, in the sm_80 report: the overlap there 25 % behind two-pass, *estimates*)."""
    return 1 if arch is None or runs_tma_kernels(arch) else 16


def sti_overlap_images(batch: int, t_keep: int, t_out: int, C: int, N: int,
                       num_layers_read: int, element_size: int,
                       model: Optional[Dict] = None, row_multiple: int = 1) -> int:
    """Images per chunk of the overlapped path for STI (chunks are whole images: the features
    kernel's programs are per image): among the counts from 1 to :data:`STI_MAX_CHUNK_IMAGES`
    and at most half the batch (two chunks at least) whose chunk rows are multiples of
    ``row_multiple`` (:func:`sti_chunk_row_multiple`), the one :func:`estimate_sti_times` puts
    fastest, the larger on a tie; ``batch`` (one chunk: no overlap) when fewer than 2 images
    or no count qualifies."""
    m = model or PATH_MODEL
    if batch < 2:
        return max(batch, 1)
    per_image, beside = _sti_rates(t_keep, t_out, C, num_layers_read, element_size, m)
    best, best_t = batch, math.inf
    for k in range(1, min(STI_MAX_CHUNK_IMAGES, math.ceil(batch / 2)) + 1):
        if (k * t_out) % row_multiple:
            continue
        t = _sti_overlap_time(batch, k, t_out, C, N, element_size, per_image, beside, m)
        if t <= best_t:
            best, best_t = k, t
    return best


def estimate_sti_times(batch: int, t_keep: int, t_out: int, C: int, N: int,
                       num_layers_read: int, element_size: int, model: Optional[Dict] = None,
                       images_per_chunk: int = 0, row_multiple: int = 1) -> dict:
    """Estimated seconds of the STI paths (:data:`PATH_MODEL` or ``model``): ``batch`` images
    of ``t_keep`` kept tokens, ``t_out`` rows of A each (the kept tokens, then the pooled
    ones), ``C`` channels (A is ``[batch * t_out, C]``), ``N`` outputs, ``num_layers_read``
    distinct layers.

    * ``two-pass``: the features pass (every read layer's kept tokens and A's rows through
      DRAM at ``features_efficiency``), the GEMM (:func:`estimate_linear_times`' model, its
      waves counted in the calibration's ``gemm_tile_m`` x ``gemm_tile_n`` tiles) and a
      launch;
    * ``overlap``: image chunks of ``images_per_chunk`` (0: :func:`sti_overlap_images`, with
      ``row_multiple``); the features of chunk j + 1 beside the GEMM of chunk j at
      ``sti_efficiency_beside_gemm`` of the bandwidth (calibrated on the STI kernel's
      beside-the-GEMM config); with one chunk, two-pass;
    * each multiplied by its ``measured_over_estimated`` factor."""
    m = model or PATH_MODEL
    e = element_size
    per_image, beside = _sti_rates(t_keep, t_out, C, num_layers_read, e, m)
    two_pass = per_image * batch + _sti_gemm_time(batch * t_out, N, C, e, m, True) \
        + m["launch_s"]
    k = images_per_chunk or sti_overlap_images(batch, t_keep, t_out, C, N, num_layers_read, e,
                                               m, row_multiple)
    overlap = two_pass if k >= batch else \
        _sti_overlap_time(batch, k, t_out, C, N, e, per_image, beside, m)
    f = m["measured_over_estimated"]
    return {"two-pass": two_pass * f.get("two-pass", 1.0),
            "overlap": overlap * f.get("overlap", 1.0)}


def gemm_split_gain(M: int, N: int, K: int, model: Optional[Dict] = None) -> float:
    """The busiest program's K steps with stream K (:func:`gemm_stream_k`) over those with
    whole tiles (1.0: whole tiles, or a calibration whose ``gemm_split_k`` is false), for
    tiles of the calibration's ``gemm_tile_m`` x ``gemm_tile_n``, 64 deep."""
    m = model or PATH_MODEL
    if not m["gemm_split_k"]:  # the card's GEMM (sm_80: cp.async) never splits
        return 1.0
    tiles = math.ceil(M / m["gemm_tile_m"]) * math.ceil(N / m["gemm_tile_n"])
    k_tiles = math.ceil(K / 64)
    programs = gemm_stream_k(tiles, k_tiles, m["sms"])
    if not programs:
        return 1.0
    return _stream_k_steps(tiles, k_tiles, programs) / (math.ceil(tiles / m["sms"]) * k_tiles)


def overlap_chunk_rows(M: int, N: int, model: Optional[Dict] = None) -> int:
    """Rows per chunk of the overlapped path: the fewest whole GEMM row tiles (of the
    calibration's ``gemm_tile_m`` x ``gemm_tile_n``) whose tiles fill the SMs' waves to at
    least 95 % (the GEMM of one chunk runs alone on the compute units), at most ``M``."""
    m = model or PATH_MODEL
    tm, tn, sms = m["gemm_tile_m"], m["gemm_tile_n"], m["sms"]
    n_tiles = math.ceil(N / tn)
    best, best_eff = 1, 0.0
    for k in range(1, max(1, math.ceil(M / tm)) + 1):
        tiles = k * n_tiles
        eff = tiles / (math.ceil(tiles / sms) * sms)
        if eff >= 0.95:
            return k * tm
        if eff > best_eff:
            best, best_eff = k, eff
    return best * tm


def _gemm_time(rows: int, N: int, K: int, e: int, m: Dict, may_split: bool,
               tile: Tuple[int, int] = (128, 128)) -> float:
    # the path model's GEMM: wave-quantized ``tile`` tiles (128 x 128; STI's estimates take
    # the calibration's GEMM tiles) against the FLOP and DRAM limits, times gemm_split_gain
    # where the kernel runs stream K
    tm, tn = tile
    waves = math.ceil(math.ceil(rows / tm) * math.ceil(N / tn) / m["sms"])
    tiles_time = waves * tm * tn * K * 2.0 / (m["flop_per_s"] / m["sms"])
    if may_split:
        tiles_time *= gemm_split_gain(rows, N, K, m)
    return max(tiles_time, (rows * K + K * N + rows * N) * e / m["dram_bytes_per_s"]) \
        / m["gemm_efficiency"]


def _beside_per_row(feats_per_row: float, layer_bytes: float, m: Dict, efficiency: str,
                    reference_bytes: str) -> float:
    # seconds per row of features produced beside the GEMM: the features pass's rate over the
    # calibrated efficiency there (key ``efficiency``), scaled down where a unit reads fewer
    # ``layer_bytes`` per element row than the case it was read on (key ``reference_bytes``):
    # fewer layers keep fewer bytes in flight
    eff = m[efficiency] * min(1.0, layer_bytes / m[reference_bytes])
    return feats_per_row * m["features_efficiency"] / eff


def _pipelined_makespans(M: int, C: int, N: int, num_layers_read: int, num_slabs: int,
                         e: int, m: Dict, tile: Optional[Tuple[int, int, int]] = None,
                         programs: Optional[Sequence[int]] = None,
                         helpers: Optional[int] = None
                         ) -> Tuple[float, Dict[int, float]]:
    """The pipelined path's replayed seconds with whole tiles and, where
    :func:`pipelined_stream_k` allows it (else an empty dict), with stream K over the slabs
    on each of ``programs`` programs (default: from the fewest that run ``ceil(positions /
    SMs)`` each up to one per SM) beside ``helpers`` helper programs (default
    :func:`split_helpers`). ``tile``: the kernel's (BLOCK_M, BLOCK_N, BLOCK_K) in place of the
    calibration's tiles, 64 deep."""
    K = num_slabs * C
    feats_per_row = (num_layers_read * C * e + K * e) / (
        m["dram_bytes_per_s"] * m["features_efficiency"])
    # the first wave's rows at the features pass's rate (every waiting program helps), the
    # rest at the helper's beside the GEMM (fewer layers keep fewer bytes in flight, as for
    # the overlap's features)
    beside_per_row = _beside_per_row(feats_per_row, num_layers_read * e, m,
                                     "helper_efficiency_beside_gemm", "helper_layer_bytes")
    tile_m, tile_n, tile_k = tile or (m["gemm_tile_m"], m["gemm_tile_n"], 64)
    tiles = math.ceil(M / tile_m) * math.ceil(N / tile_n)
    one_tile = _gemm_time(M, N, K, e, m, False) / max(1, math.ceil(tiles / m["sms"]))
    whole = pipelined_makespan(M, N, tile_m, tile_n, 8, m["sms"], one_tile, feats_per_row,
                               beside_per_row) + m["launch_s"]
    ks = C // tile_k if C % tile_k == 0 else 0  # K steps of a slab (stream K: whole ones)
    fewest = pipelined_stream_k(tiles, ks, num_slabs, m["sms"]) if m["gemm_split_k"] else 0
    if not fewest:
        return whole, {}
    # stream K over the slabs: units slab-major; slab 0 copies the base (a layer read and
    # written), the groups share the other layers evenly. A unit reads one slab's layers,
    # so its bytes in flight, and the helper's efficiency, scale with a group's layers (SCI:
    # one), not with every layer read
    groups = max(1, num_slabs - 1)
    # (at least one: a group may share its layers with the base, e.g. [base, mean(hs[23:24])])
    per_group = max(1.0, (num_layers_read - 1) / groups)
    slab_bytes = [2.0] + [per_group + 1.0] * (num_slabs - 1)
    beside_split = _beside_per_row(feats_per_row, per_group * e, m,
                                   "helper_efficiency_beside_gemm", "helper_layer_bytes")
    if helpers is None:
        helpers = split_helpers(math.ceil(M / 8), m["sms"])
    # the helpers together read no faster than each keeps bytes in flight for (key
    # ``helper_program_bytes_per_s``, where calibrated: the split helper's in-flight over the
    # loaded DRAM latency): binds only below the default count (one CLIP image: 72 x 42.5
    # GB/s is just over the 3 TB/s; 18 would read at a quarter of it)
    rate = m.get("helper_program_bytes_per_s")
    if rate:
        beside_split = max(beside_split, sum(slab_bytes) * C * e / (helpers * rate))
    # the fewest programs that run at most ceil(steps / SMs) positions each, or more, up to
    # one per SM: which spreads the tiles' pieces best shows only in the replay (one SigLIP
    # image: 124 programs of 14 positions put some tiles over 3 programs; 128 of 13-14 put
    # every tile over 2)
    if programs is None:
        programs = range(fewest, max(fewest, m["sms"]) + 1)
    return whole, {p: pipelined_stream_k_makespan(
        M, N, tile_m, tile_n, 8, ks, p, one_tile / (num_slabs * ks), helpers, 8,
        feats_per_row, beside_split, slab_bytes) + m["launch_s"]
        for p in programs if 1 <= p <= tiles * ks}


def pipelined_stream_k_replays(M: int, C: int, N: int, num_layers_read: int, num_slabs: int,
                               element_size: int, model: Optional[Dict] = None,
                               sms: Optional[int] = None,
                               tile: Optional[Tuple[int, int, int]] = None,
                               programs: Optional[Sequence[int]] = None,
                               helpers: Optional[int] = None
                               ) -> Tuple[float, Dict[int, float]]:
    """``(whole tiles' seconds, {programs: seconds})``: the path model's replays of the
    pipelined path (launch included; *estimates*) with whole tiles and with stream K over
    the slabs on each of ``programs`` programs beside ``helpers`` helper programs (defaults:
    the range and the helpers :func:`pipelined_stream_k_programs` chooses from; an empty dict
    where :func:`pipelined_stream_k` rules stream K out). What the sweep
    (``python -m benchmarks --sweep``) sets beside each measured variant."""
    m = model or PATH_MODEL
    if sms is not None:
        m = dict(m, sms=sms)
    return _pipelined_makespans(M, C, N, num_layers_read, num_slabs, element_size, m, tile,
                                programs, helpers)


def pipelined_stream_k_programs(M: int, C: int, N: int, num_layers_read: int,
                                num_slabs: int, element_size: int,
                                model: Optional[Dict] = None, sms: Optional[int] = None,
                                tile: Optional[Tuple[int, int, int]] = None) -> int:
    """The programs of the pipelined path's GEMM as stream K over the slabs, 0: whole tiles.
    Where :func:`pipelined_stream_k` allows it, the replays
    (:func:`pipelined_stream_k_makespan`) pick the programs, from the fewest that run
    ``ceil(positions / SMs)`` each up to one per SM, and stream K is taken if that replay is
    faster than whole tiles' (e.g. one and two CLIP DCI images at N = 4096: 80 and 144 tiles
    for 132 SMs; not SCI's one image, whose one-layer slabs leave the split helper too few
    bytes in flight). ``sms``: the card's, in place of the model's; ``tile``: the kernel's
    (BLOCK_M, BLOCK_N, BLOCK_K), in place of the calibration's tiles 64 deep."""
    m = model or PATH_MODEL
    if sms is not None:
        m = dict(m, sms=sms)
    whole, split = _pipelined_makespans(M, C, N, num_layers_read, num_slabs, element_size,
                                        m, tile)
    if not split:
        return 0
    programs = min(split, key=lambda p: (split[p], p))  # the fastest, the fewest on a tie
    return programs if split[programs] < whole else 0


def choose_linear_path(M: int, C: int, N: int, num_layers_read: int, num_slabs: int,
                       element_size: int, uniform: bool = True, off64: bool = False,
                       sti: bool = False, cuda: bool = True, arch: Optional[int] = None,
                       pipelined: bool = False, card: Optional[str] = None,
                       sms: Optional[int] = None, direct: bool = False,
                       sti_rows: Optional[Tuple[int, int]] = None) -> str:
    """Pick ``"fused"``, ``"two-pass"``, ``"overlap"`` or ``"pipelined"``: the smallest
    estimate that runs.

    The fused kernel saves the features' DRAM round trip and a launch, but rebuilds each row
    tile's features once per N tile, so its issue and L2 cost grow with ``N / fused_block_n``:
    it wins only for narrow outputs. The overlapped path needs at least two row chunks and CUDA
    streams (``cuda=False``: never chosen). The fused kernel is built only for layers sharing
    one stride set and tensors under 2^31 elements (``uniform=False`` or ``off64=True``: not
    chosen). STI (``sti=True``) is never fused: building a pooled row inside the GEMM would
    re-read ``pool`` tokens of every group member per N tile; it picks the overlap of
    whole-image chunks where :func:`estimate_sti_times` puts it :data:`STI_OVERLAP_MARGIN`
    under two-pass (16-bit only), else two-pass, given ``sti_rows = (T', T' + G*TP)`` (kept
    tokens and A's rows per image, ``M`` a multiple of the latter) where image chunks can run
    (:func:`dc_kernels.ops.features.sti_chunks_aligned`; None: two-pass).
    ``arch``: the card's SM version, ``card``: its :func:`card_key`, ``sms``: its SM count
    (:func:`model_for` picks the calibration from the first two and counts the third's SMs).
    ``pipelined``: the pipelined path can run (:func:`dc_kernels.ops.pipelined.pipelined_eligible`;
    it also needs CUDA streams). ``direct``: the two-pass path's GEMM reads the layers in place,
    with no features pass (:func:`dc_kernels.ops.linear.direct_serves`).
    """
    model = model_for(arch, card, sms)
    if sti:
        # (fp32: the FFMA or TF32 GEMM is ~30x the features pass, and the chunks move its
        # config choice more than the hidden features save: two-pass)
        if sti_rows is None or not cuda or element_size != 2:
            return "two-pass"
        t_keep, t_out = sti_rows
        if t_out <= 0 or M % t_out:
            raise ValueError(f"sti_rows {sti_rows}: M = {M} is not whole images of {t_out} rows")
        t = estimate_sti_times(M // t_out, t_keep, t_out, C, N, num_layers_read, element_size,
                               model, row_multiple=sti_chunk_row_multiple(arch))
        return "overlap" if t["overlap"] < (1.0 - STI_OVERLAP_MARGIN) * t["two-pass"] \
            else "two-pass"
    t = estimate_linear_times(M, C, N, num_layers_read, num_slabs, element_size, model,
                              direct=direct)
    if not uniform or off64:
        t.pop("fused")
    if not cuda or math.ceil(M / overlap_chunk_rows(M, N, model)) < 2:
        t.pop("overlap")
    if not cuda or not pipelined:
        t.pop("pipelined")
    return min(t, key=t.get)
