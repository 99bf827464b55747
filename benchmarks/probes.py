"""Probes of the static cost model's assumptions, measured on the GPU that runs the bundle.

The static model (:mod:`benchmarks.static`) and the path rule (:mod:`dc_kernels.ops.path`)
rest on constants that no CPU run can check: the SM clock, the time of one 128 x 256 x 64
tensor-core step, the fixed cost of a launch, the loaded DRAM latency behind every bytes-in-
flight bound, the L2 bandwidth, and what one fp32 partial tile of the stream-K GEMM costs to
store and to load (``schedule.SPLIT_PARTIAL_STEPS``: the constant that decides whether one CLIP
image can reach issue 12's 1.3x the floor, ``docs/DESIGN.md`` §5.3). Each probe here is a
small Triton kernel that isolates one of them:

* ``tensor step``: one program per SM, 8 warps, [128, 64] x [64, 256] bf16 ``tl.dot`` s onto
  one fp32 accumulator, alternating two random operand pairs held in shared memory (no loads
  in the loop; random full-mantissa data, since the tensor cores draw less power, and clock
  higher, on zeros or repeated small integers): the tensor cores alone. The SM clock is read
  inside it (``%clock64`` against ``%globaltimer``), i.e. under tensor-core load.
* ``launch``: a 132-program kernel that stores one value per program, timed as the benchmark
  rows time a launch (``do_bench`` of one eager launch: what every estimate adds per launch);
  beside it the GPU's spacing of 64 launches replayed from a CUDA graph, and 64 eager
  launches back to back.
* ``DRAM read``: 1, 2, 4 and 8 programs per SM reading 1 GiB once with ``num_stages=1``, the
  bytes in flight read off the kernel's SASS exactly as the static model reads every kernel's
  (``static._inflight_per_cta``, on the build the GPU compiled): at each in-flight size the
  measured bandwidth beside the model's ``min(DRAM, SMs x in-flight / latency)``, and the
  latency Little's law implies.
* ``L2 read``: 8 programs per SM re-reading an 8.25 MiB buffer (``.cg``: L2, not L1).
* ``partial tile``: one program per SM (and a quarter of the SMs, where L2 does not bound
  them) stores, stores and releases (a CTA barrier and a ``release`` atomic after the stores,
  as ``gemm_tma._partial_epilogue`` does before its next segment), or loads and adds a 128 x
  256 fp32 tile in 128 x 64 quarters from the wgmma accumulator's layout; the programs' SMs
  are read (``%smid``) to say how many distinct SMs ran them.

Every time is differential: the same launch at two repeat counts, the difference over the
extra work, so the launch, the first pass from DRAM and the timer's L2 flush cancel (the
medians and 20th/80th percentiles of both launches are kept). Every kernel's result is
checked against torch (exactly on integer-valued data; the tensor step within the fp32
accumulation bound), so a probe that did not do its work fails instead of reporting a speed.
Each probe runs on its own: one that fails is recorded (``status`` ``"wrong"`` or
``"error"``) and the others go on, every result handed to ``on_result`` as it comes.
``run_probes`` needs CUDA; under ``TRITON_INTERPRET=1`` the kernels run on the CPU at small
sizes (the tests check their results), with no timing.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import triton
import triton.language as tl

from dc_kernels.ops.gemm_tma import _column_halves
from .timing import time_fn

__all__ = ["ProbeResult", "run_probes", "probes_markdown", "build_problems", "TILE_M",
           "TILE_N", "TILE_K", "tensor_step_launch", "launch_launch", "stream_launch",
           "partial_launch", "inflight_per_program", "dram_elements", "TENSOR_STEP", "SM_CLOCK",
           "LAUNCH", "DRAM_READ", "L2_READ", "EVERY_SM", "QUARTER_SMS", "partial_name"]

#: The stream-K GEMM's tile and K step (``gemm_tma``'s 128 x 256 x 64 config)
TILE_M, TILE_N, TILE_K = 128, 256, 64
#: operand pairs per tensor-step launch (two dots each; the difference is timed)
STEP_PAIRS = (512, 1024)
#: repeats per L2 / partial launch (the difference is timed; both divisible by 16, so one
#: specialization serves both)
REPEATS = (16, 64)
#: DRAM probe: fp32 tile, warps, programs per SM (each a bytes-in-flight point)
DRAM_BLOCK, DRAM_WARPS, DRAM_PROGRAMS_PER_SM = 1024, 4, (1, 2, 4, 8)
#: L2 probe: fp32 tile and programs per SM (8.25 MiB on 132 SMs)
L2_BLOCK, L2_PROGRAMS_PER_SM = 2048, 8
#: eager and graph launches per timed call of the launch probe's back-to-back figures
LAUNCHES = 64
#: partial-tile probe variants: (name, LOAD, RELEASE)
PARTIAL_VARIANTS = (("store", False, False), ("store + release", False, True),
                    ("load", True, False))
#: The results' names, as ``benchmarks.static.gpu_from_constants`` reads them back (a DRAM
#: point's name continues with its bytes in flight; :func:`partial_name` names a partial tile's)
TENSOR_STEP, SM_CLOCK, LAUNCH, DRAM_READ, L2_READ = (
    "tensor step (128 x 256 x 64, bf16)", "SM clock under tensor load", "launch", "DRAM read",
    "L2 read")
#: the partial-tile probe's SM sets
EVERY_SM, QUARTER_SMS = "every SM", "a quarter of the SMs"


def partial_name(what: str, label: str) -> str:
    """The name of a partial-tile result: variant ``what`` (:data:`PARTIAL_VARIANTS`) on SM
    set ``label`` (:data:`EVERY_SM`, :data:`QUARTER_SMS`)."""
    return f"partial tile {what}, {label}"


def dram_elements(sms: int) -> int:
    """fp32 elements of the DRAM probe's buffer (~1 GiB on 132 SMs): both its halves whole
    tiles for every program count."""
    return sms * max(DRAM_PROGRAMS_PER_SM) * DRAM_BLOCK * 256


@triton.jit
def _read_register(dep, REGISTER: tl.constexpr, CLOCK: tl.constexpr):
    # a 64-bit special register (``"clock64"``: the SM's cycle counter; ``"globaltimer"``:
    # the GPU's nanosecond timer), read after ``dep`` is computed (an operand of the asm);
    # 0 without CLOCK (the interpreter runs no inline asm)
    if CLOCK:
        return tl.inline_asm_elementwise("mov.u64 $0, %" + REGISTER + "; // $1", "=l,r",
                                         [dep], dtype=tl.uint64, is_pure=False, pack=1)
    else:
        return (dep * 0).to(tl.uint64)


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr):
    if DOT_FP32:  # the interpreter has no 16-bit arithmetic (the same products: exact here)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _operand_tiles(a_ptr, b_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    # the [BLOCK_M, BLOCK_K] tile at a_ptr and the [BLOCK_K, BLOCK_N] tile at b_ptr
    om = tl.arange(0, BLOCK_M)
    on = tl.arange(0, BLOCK_N)
    ok = tl.arange(0, BLOCK_K)
    return (tl.load(a_ptr + om[:, None] * BLOCK_K + ok[None, :]),
            tl.load(b_ptr + ok[:, None] * BLOCK_N + on[None, :]))


@triton.jit
def _tensor_step_kernel(a_ptr, b_ptr, out_ptr, clocks_ptr, PAIRS, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CLOCK: tl.constexpr,
                        DOT_FP32: tl.constexpr):
    # 2 PAIRS dependent dots onto one accumulator, alternating two operand pairs; the clocks
    # before and after (program 0 stores its accumulator, every program its clocks)
    pid = tl.program_id(0)
    a0, b0 = _operand_tiles(a_ptr, b_ptr, BLOCK_M, BLOCK_N, BLOCK_K)
    a1, b1 = _operand_tiles(a_ptr + BLOCK_M * BLOCK_K, b_ptr + BLOCK_K * BLOCK_N, BLOCK_M,
                            BLOCK_N, BLOCK_K)
    t0 = _read_register(pid, "globaltimer", CLOCK)
    c0 = _read_register(pid, "clock64", CLOCK)
    # the accumulator starts from c0's top bit (always 0, not known to be): no dot is moved
    # above the clock read
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + (c0 >> 63).to(tl.float32)
    for _ in range(PAIRS):
        acc = _dot(a0, b0, acc, DOT_FP32)
        acc = _dot(a1, b1, acc, DOT_FP32)
    done = tl.sum(tl.sum(acc, axis=1), axis=0).to(tl.int32, bitcast=True)
    c1 = _read_register(done, "clock64", CLOCK)
    t1 = _read_register(done, "globaltimer", CLOCK)
    tl.store(clocks_ptr + pid * 4 + 0, t0.to(tl.int64, bitcast=True))
    tl.store(clocks_ptr + pid * 4 + 1, t1.to(tl.int64, bitcast=True))
    tl.store(clocks_ptr + pid * 4 + 2, c0.to(tl.int64, bitcast=True))
    tl.store(clocks_ptr + pid * 4 + 3, c1.to(tl.int64, bitcast=True))
    o_out = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(out_ptr + o_out, acc, mask=(o_out * 0 + pid) == 0)


@triton.jit
def _launch_kernel(out_ptr):
    pid = tl.program_id(0)
    tl.store(out_ptr + pid, pid)


@triton.jit
def _stream_kernel(x_ptr, out_ptr, n_per_program, REPEAT, BLOCK: tl.constexpr):
    # each program sums its n_per_program contiguous elements REPEAT times, one BLOCK tile
    # per step (.cg: from L2 or DRAM, never L1); num_stages=1: no cp.async ring, so what a
    # program has in flight is the loads its warps issue before a sum needs one (the SASS's
    # load bursts: ptxas unrolls the loop and issues several tiles' loads at once)
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * n_per_program
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(REPEAT):
        for start in range(0, n_per_program, BLOCK):
            acc += tl.load(base + start + offs, cache_modifier=".cg")
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _partial_kernel(ws_ptr, a_ptr, b_ptr, out_ptr, flags_ptr, smid_ptr, REPEAT, WRAP,
                    LOAD: tl.constexpr, RELEASE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                    SMID: tl.constexpr):
    # a [BLOCK_M, BLOCK_N] fp32 accumulator in the wgmma layout (one dot), split into four
    # column quarters as gemm_tma._partial_epilogue splits it; then REPEAT times either
    # (LOAD = 0) store the quarters plus the repeat's index to the program's slot of ws --
    # RELEASE: then a CTA barrier and a release add on the program's flag, as the stream-K
    # pieces count a stored partial -- or (LOAD = 1) load the slot's quarters (.cg) and add
    # them; program 0 stores its tile to out, every program its SM (SMID) to smid_ptr
    pid = tl.program_id(0)
    a, b = _operand_tiles(a_ptr, b_ptr, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = _dot(a, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_FP32)
    HALF: tl.constexpr = BLOCK_N // 2
    QUARTER: tl.constexpr = BLOCK_N // 4
    lo, hi = _column_halves(acc, BLOCK_M, BLOCK_N)
    q0, q1 = _column_halves(lo, BLOCK_M, HALF)
    q2, q3 = _column_halves(hi, BLOCK_M, HALF)
    o_q = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, QUARTER)[None, :]
    slot = ws_ptr + pid.to(tl.int64) * (BLOCK_M * BLOCK_N) + o_q
    for r in range(REPEAT):
        # r // WRAP is 0 (WRAP > REPEAT), which the compiler cannot know: the loads stay in
        # the loop (loop-invariant ones would be hoisted out of it) and no store is dropped
        mine = slot + (r // WRAP) * (BLOCK_M * BLOCK_N)
        if LOAD:
            q0 += tl.load(mine, cache_modifier=".cg")
            q1 += tl.load(mine + QUARTER, cache_modifier=".cg")
            q2 += tl.load(mine + 2 * QUARTER, cache_modifier=".cg")
            q3 += tl.load(mine + 3 * QUARTER, cache_modifier=".cg")
        else:
            x = r * 1.0  # (the interpreter's loop index is a Python int)
            tl.store(mine, q0 + x, cache_modifier=".cg")
            tl.store(mine + QUARTER, q1 + x, cache_modifier=".cg")
            tl.store(mine + 2 * QUARTER, q2 + x, cache_modifier=".cg")
            tl.store(mine + 3 * QUARTER, q3 + x, cache_modifier=".cg")
            if RELEASE:
                tl.debug_barrier()
                tl.atomic_add(flags_ptr + pid, 1, sem="release", scope="gpu")
    first = (o_q * 0 + pid) == 0
    o_out = out_ptr + o_q
    tl.store(o_out, q0, mask=first)
    tl.store(o_out + QUARTER, q1, mask=first)
    tl.store(o_out + 2 * QUARTER, q2, mask=first)
    tl.store(o_out + 3 * QUARTER, q3, mask=first)
    if SMID:
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid; // $1", "=r,r", [pid],
                                       dtype=tl.int32, is_pure=False, pack=1)
    else:
        sm = pid * 0 - 1
    tl.store(smid_ptr + pid, sm)


# --------------------------------------------------------------------------- launchers
def _interpreting() -> bool:
    from dc_kernels.ops.common import interpreting
    return interpreting()


def _check_tiles(programs: int, *blocks: int) -> None:
    if programs < 1:
        raise ValueError(f"a probe needs at least one program, got {programs}")
    for b in blocks:
        if b < 16 or b & (b - 1):
            raise ValueError(f"probe tiles are powers of two of at least 16, got {b}")


def tensor_step_launch(programs: int, pairs: int, device, block_m: int = TILE_M,
                       block_n: int = TILE_N, block_k: int = TILE_K, seed: int = 0
                       ) -> Callable[[], None]:
    """A launcher of the tensor-step probe: ``programs`` programs, ``2 * pairs`` dots each
    (two random bf16 operand pairs in turn). ``check()`` compares program 0's accumulator
    with ``pairs * (a0 @ b0 + a1 @ b1)`` (fp64) within the fp32 accumulation bound and returns
    the clocks ``[programs, 4]`` (globaltimer start, end, clock64 start, end; zeros under the
    interpreter)."""
    _check_tiles(programs, block_m, block_n, block_k)
    if pairs < 1:
        raise ValueError(f"the tensor-step probe needs at least one pair, got {pairs}")
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, block_m, block_k, generator=g).to(torch.bfloat16).to(device)
    b = torch.randn(2, block_k, block_n, generator=g).to(torch.bfloat16).to(device)
    out = torch.full((block_m, block_n), float("nan"), device=device)
    clocks = torch.zeros(programs, 4, dtype=torch.int64, device=device)
    clock = not _interpreting()

    def launch():
        _tensor_step_kernel[(programs,)](a, b, out, clocks, pairs, BLOCK_M=block_m,
                                         BLOCK_N=block_n, BLOCK_K=block_k, CLOCK=clock,
                                         DOT_FP32=not clock, num_warps=8, num_stages=1)

    def check():
        a64, b64 = a.double().cpu(), b.double().cpu()
        want = pairs * (a64[0] @ b64[0] + a64[1] @ b64[1])
        # every fp32 addition of the 2 pairs dots of block_k products each rounds (tensor
        # cores may truncate: 2^-22 per addition, 4x the unit roundoff)
        bound = (2 * pairs + block_k) * 2.0 ** -22 * pairs * (
            a64[0].abs() @ b64[0].abs() + a64[1].abs() @ b64[1].abs())
        err = (out.cpu().double() - want).abs()
        if not bool((err <= bound).all()):
            raise AssertionError("tensor-step probe: program 0's accumulator is not "
                                 f"{pairs} x (a0 @ b0 + a1 @ b1) (worst error "
                                 f"{float((err - bound).max()):.3g} over the bound)")
        return clocks.cpu()
    launch.check, launch.out = check, out
    return launch


def launch_launch(programs: int, device) -> Callable[[], None]:
    """A launcher of the one-store-per-program kernel; ``check()`` asserts ``out == arange``."""
    out = torch.full((programs,), -1, dtype=torch.int32, device=device)

    def launch():
        _launch_kernel[(programs,)](out, num_warps=1)

    def check():
        if not torch.equal(out.cpu(), torch.arange(programs, dtype=torch.int32)):
            raise AssertionError("launch probe: a program did not store its id")
    launch.check, launch.out = check, out
    return launch


def stream_launch(x: torch.Tensor, programs: int, block: int, repeat: int, num_warps: int = 4
                  ) -> Callable[[], None]:
    """A launcher of the streaming-read probe over ``x`` (fp32, ``programs x k x block``
    elements, integer-valued); ``check()`` compares every program's sum with torch's; the
    attribute ``compiled`` holds what the launch returned (the compiled kernel on a GPU)."""
    if x.dtype != torch.float32:
        raise TypeError(f"the stream probe reads fp32, got {x.dtype}")
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"the stream probe reads a contiguous 1-D tensor, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    _check_tiles(programs, block)
    n = x.numel()
    if n % (programs * block):
        raise ValueError(f"{n} elements are not {programs} programs x whole {block}-tiles")
    per = n // programs
    out = torch.full((programs,), float("nan"), device=x.device)

    def launch():
        launch.compiled = _stream_kernel[(programs,)](x, out, per, repeat, BLOCK=block,
                                                      num_warps=num_warps, num_stages=1)

    def check():
        want = x.view(programs, per).sum(dim=1, dtype=torch.float64) * repeat
        if not torch.equal(out.double().cpu(), want.cpu()):
            raise AssertionError("stream probe: a program's sum differs from torch's")
    launch.check, launch.out = check, out
    return launch


def partial_launch(programs: int, repeat: int, load: bool, device, block_m: int = TILE_M,
                   block_n: int = TILE_N, block_k: int = TILE_K, seed: int = 1,
                   release: bool = False) -> Callable[[], None]:
    """A launcher of the partial-tile probe: ``programs`` programs each store (``load=False``;
    ``release``: each store followed by a CTA barrier and a release add on the program's
    flag) or load and add (``load=True``) its fp32 ``block_m x block_n`` slot ``repeat``
    times. ``check()`` compares program 0's tile with torch: ``a @ b`` plus ``repeat`` times
    the slot (loads; the slot is filled with ``a @ b + 1`` first), or ``a @ b`` (stores), every
    slot stored last with ``a @ b + repeat - 1``, and with ``release`` every flag a multiple
    of ``repeat``; it returns the number of distinct SMs the programs ran on (None under the
    interpreter). Integer-valued operands: every sum is exact."""
    _check_tiles(programs, block_m, block_n, block_k)
    if repeat < 1:
        raise ValueError(f"the partial probe needs at least one repeat, got {repeat}")
    if load and release:
        raise ValueError("the partial probe releases after stores, not after loads")
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-1, 2, (block_m, block_k), generator=g).to(torch.bfloat16).to(device)
    b = torch.randint(-1, 2, (block_k, block_n), generator=g).to(torch.bfloat16).to(device)
    ab = a.float() @ b.float()
    ws = torch.empty(programs, block_m, block_n, device=device)
    ws.copy_((ab + 1).expand_as(ws))
    out = torch.full((block_m, block_n), float("nan"), device=device)
    flags = torch.zeros(programs, dtype=torch.int32, device=device)
    smid = torch.full((programs,), -2, dtype=torch.int32, device=device)
    interpret = _interpreting()

    def launch():
        _partial_kernel[(programs,)](ws, a, b, out, flags, smid, repeat, 1 << 20, LOAD=load,
                                     RELEASE=release, BLOCK_M=block_m, BLOCK_N=block_n,
                                     BLOCK_K=block_k, DOT_FP32=interpret, SMID=not interpret,
                                     num_warps=8, num_stages=1)

    def check():
        if load:
            want, slot = ab + repeat * (ab + 1), ab + 1
        else:
            want, slot = ab, ab + (repeat - 1)
        if not torch.equal(out.cpu(), want.cpu()):
            raise AssertionError("partial probe: program 0's tile differs from torch's")
        if not torch.equal(ws.cpu(), slot.cpu().expand_as(ws)):
            raise AssertionError("partial probe: a slot holds the wrong values")
        f = flags.cpu()
        if bool((f % repeat != 0).any()) or (release and not bool((f > 0).all())) or \
                (not release and bool(f.any())):
            raise AssertionError("partial probe: the release counts are wrong")
        sms = smid.cpu()
        if bool((sms == -2).any()):
            raise AssertionError("partial probe: a program did not run")
        return None if interpret else int(torch.unique(sms).numel())
    launch.check, launch.out, launch.ws = check, out, ws
    return launch


# --------------------------------------------------------------------------- measuring
@dataclass
class ProbeResult:
    """One assumption: the model's value, the measured one and the ratio (measured /
    assumed), in ``unit``; ``detail`` says how it was measured. ``status``: ``"ok"``,
    ``"wrong"`` (the probe kernel computed a wrong result: nothing of it is timed) or
    ``"error"`` (the probe could not run; ``detail`` says why)."""

    name: str
    assumption: str      # where the model holds it
    unit: str
    assumed: Optional[float]
    measured: Optional[float]
    detail: str = ""
    extra: Dict[str, float] = field(default_factory=dict)
    status: str = "ok"

    @property
    def ratio(self) -> Optional[float]:
        if self.assumed and self.measured is not None and self.measured == self.measured:
            return self.measured / self.assumed
        return None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def _timed(fn: Callable[[], None], device, budget_s: float):
    # one checked call, then the timing (median, p20, p80 seconds)
    fn()
    torch.cuda.synchronize(device)
    fn.check()
    t = time_fn(fn, device, budget_s)
    return t.median_s, t.p20_s, t.p80_s


def _differential(make: Callable[[int], Callable[[], None]], low: int, high: int, device,
                  budget_s: float) -> tuple:
    """``(seconds per extra unit, spread)``: the medians of the ``low`` and ``high`` launches
    (each checked first), their difference over ``high - low``; NaN where noise made the
    longer launch no slower. ``spread``: both launches' median / p20 / p80 in us."""
    low_t, high_t = (_timed(make(n), device, budget_s) for n in (low, high))
    diff = high_t[0] - low_t[0]
    spread = {f"{tag}_{q}_us": v * 1e6 for tag, t in (("low", low_t), ("high", high_t))
              for q, v in zip(("median", "p20", "p80"), t)}
    return (diff / (high - low) if diff > 0 else float("nan")), spread


def inflight_per_program(compiled, num_warps: int) -> tuple:
    """``(bytes, loop_burst_bytes)`` of global loads one program of ``compiled`` (a Triton
    ``CompiledKernel``) keeps in flight: ``bytes`` exactly as the static model reads it off a
    kernel's SASS (``benchmarks.static._inflight_per_cta``: its warps times the mean load
    burst), ``loop_burst_bytes`` its main loop's longest burst. Raises RuntimeError when the
    SASS cannot be read here."""
    import subprocess
    from dc_kernels.ops import sass, triton_aot
    from .static import _inflight_per_cta
    try:
        text = triton_aot.read_cubin(compiled.asm["cubin"])[1]
    except (AttributeError, KeyError, OSError, RuntimeError,
            subprocess.CalledProcessError) as e:
        raise RuntimeError(f"the SASS of the compiled probe could not be read: "
                           f"{type(e).__name__}: {e}") from e
    stats = sass.analyze(text)
    loops = [lp for lp in stats["loops"] if lp["innermost"]]
    main = max(loops, key=lambda lp: lp["load_bytes_per_lane"], default=None)
    model = _inflight_per_cta("_stream_kernel", {"num_warps": num_warps, "num_stages": 1}, {},
                              4, stats)
    return model, (main["max_load_burst_per_lane"] * 32 * num_warps if main else 0)


def _model_gpu(arch: int, card: Optional[str]):
    from .static import CARD_GPUS, GPUS
    return CARD_GPUS.get(card) if card in CARD_GPUS else GPUS.get(arch, GPUS[90])


def _tensor_step(ctx) -> List[ProbeResult]:
    gpu, sms, device, budget_s = ctx["gpu"], ctx["sms"], ctx["device"], ctx["budget_s"]
    launches = {}

    def make(pairs):
        launches[pairs] = tensor_step_launch(sms, pairs, device)
        return launches[pairs]
    per_pair, spread = _differential(make, *STEP_PAIRS, device, budget_s)
    step_s = per_pair / 2
    ctx["step_s"] = step_s
    clocks = launches[STEP_PAIRS[1]].check().double()
    dt = (clocks[:, 1] - clocks[:, 0]).clamp(min=1)
    clock_hz = float(((clocks[:, 3] - clocks[:, 2]) / dt).median()) * 1e9
    ctx["clock_hz"] = clock_hz
    return [ProbeResult(
        TENSOR_STEP,
        f"{gpu.tensor_flop_per_s['16'] / 1e12:.0f} TFLOP/s over {gpu.sms} SMs "
        "(static.GPU.tensor_flop_per_s)", "us", ctx["assumed_step"] * 1e6, step_s * 1e6,
        f"{sms} programs (one per SM), 8 warps, two random bf16 operand pairs in shared "
        f"memory in turn; {2 * STEP_PAIRS[0]} vs {2 * STEP_PAIRS[1]} dots",
        {"tflop_per_s": 2.0 * TILE_M * TILE_N * TILE_K * sms / step_s / 1e12, **spread}),
        ProbeResult(SM_CLOCK, "static.GPU.clock_hz", "GHz",
                    gpu.clock_hz / 1e9, clock_hz / 1e9,
                    "%clock64 over %globaltimer around the tensor-step probe's loop, median "
                    "over its programs")]


def _launch(ctx) -> List[ProbeResult]:
    gpu, sms, device, budget_s = ctx["gpu"], ctx["sms"], ctx["device"], ctx["budget_s"]
    fn = launch_launch(sms, device)
    one = _timed(fn, device, budget_s)[0]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAUNCHES):
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    per_graph = time_fn(graph.replay, device, budget_s).median_s / LAUNCHES
    per_eager = time_fn(lambda: [fn() for _ in range(LAUNCHES)], device,
                        budget_s).median_s / LAUNCHES
    fn.check()
    return [ProbeResult(
        LAUNCH, "static.GPU.launch_fixed_s", "us", gpu.launch_fixed_s * 1e6, one * 1e6,
        f"{sms} programs storing one int each, one eager launch timed as the benchmark rows "
        f"time a call; {LAUNCHES} back to back: {per_eager * 1e6:.2f} us each eagerly (Triton's "
        f"launcher), {per_graph * 1e6:.2f} us each replayed from a CUDA graph",
        {"eager_back_to_back_us": per_eager * 1e6, "graph_back_to_back_us": per_graph * 1e6})]


def _dram(ctx) -> List[ProbeResult]:
    gpu, sms, device, budget_s = ctx["gpu"], ctx["sms"], ctx["device"], ctx["budget_s"]
    total = dram_elements(sms)
    x = torch.randint(-2, 3, (total,), device=device, dtype=torch.int32).float()
    out = []
    for per_sm in DRAM_PROGRAMS_PER_SM:
        # the whole buffer against its first half: the same programs and tiles per step
        programs = per_sm * sms
        fns = {}

        def make(halves):
            fns[halves] = stream_launch(x[: total // 2 * halves], programs, DRAM_BLOCK, 1,
                                        num_warps=DRAM_WARPS)
            return fns[halves]
        per_half, spread = _differential(make, 1, 2, device, budget_s)
        per_program, burst = inflight_per_program(fns[2].compiled, DRAM_WARPS)
        inflight = per_sm * per_program
        bw = (total * 4 / 2) / per_half
        model = min(gpu.dram_bytes_per_s, sms * inflight / gpu.latency_s)
        latency = sms * inflight / bw
        near = bw > 0.7 * gpu.dram_bytes_per_s
        out.append(ProbeResult(
            f"{DRAM_READ}, {inflight / 1024:.1f} KiB in flight per SM",
            "min(static.GPU.dram_bytes_per_s, SMs x in-flight / static.GPU.latency_s)",
            "TB/s", model / 1e12, bw / 1e12,
            f"{per_sm} program(s) per SM, {DRAM_WARPS} warps, num_stages=1, {DRAM_BLOCK}-"
            f"element fp32 tiles; in flight as the model reads the SASS "
            f"({per_program / 1024:.1f} KiB per program; the main loop's longest burst "
            f"{burst / 1024:.1f} KiB); Little's law latency {latency * 1e6:.2f} us (model "
            f"{gpu.latency_s * 1e6:.2f} us)" + ("; near the DRAM ceiling, so that latency "
                                                  "is mostly queueing" if near else ""),
            {"inflight_kib_per_sm": inflight / 1024, "loop_burst_kib_per_program":
             burst / 1024, "implied_latency_us": latency * 1e6, **spread}))
    del x
    return out


def _l2(ctx) -> List[ProbeResult]:
    gpu, sms, device, budget_s = ctx["gpu"], ctx["sms"], ctx["device"], ctx["budget_s"]
    programs = L2_PROGRAMS_PER_SM * sms
    x = torch.randint(-2, 3, (programs * L2_BLOCK,), device=device, dtype=torch.int32).float()
    per_pass, spread = _differential(lambda r: stream_launch(x, programs, L2_BLOCK, r),
                                     *REPEATS, device, budget_s)
    return [ProbeResult(
        L2_READ, "static.GPU.l2_bytes_per_s", "TB/s", gpu.l2_bytes_per_s / 1e12,
        x.numel() * 4 / per_pass / 1e12,
        f"{programs} programs ({L2_PROGRAMS_PER_SM} per SM), a {x.numel() * 4 / 2 ** 20:.2f} "
        f"MiB buffer re-read with .cg loads; {REPEATS[0]} vs {REPEATS[1]} passes", spread)]


def _partials(ctx) -> List[ProbeResult]:
    from dc_kernels.ops.schedule import SPLIT_PARTIAL_STEPS
    sms, device, budget_s = ctx["sms"], ctx["device"], ctx["budget_s"]
    step_s, clock_hz = ctx.get("step_s"), ctx.get("clock_hz")
    out = []
    for what, load, release in PARTIAL_VARIANTS:
        for programs, label in ((sms, EVERY_SM), (max(1, sms // 4), QUARTER_SMS)):
            last = {}

            def make(r):
                last[r] = partial_launch(programs, r, load, device, release=release)
                return last[r]
            tile_s, spread = _differential(make, *REPEATS, device, budget_s)
            on_sms = last[REPEATS[1]].check()
            measured_step = step_s if step_s and step_s == step_s else None
            out.append(ProbeResult(
                partial_name(what, label), "schedule.SPLIT_PARTIAL_STEPS K steps", "steps",
                SPLIT_PARTIAL_STEPS, tile_s / measured_step if measured_step else None,
                f"{programs} programs on {on_sms} distinct SMs, one 128 x 256 fp32 tile each "
                f"({what}; 128 x 64 quarters from the wgmma layout, .cg); {REPEATS[0]} vs "
                f"{REPEATS[1]} repeats; {tile_s * 1e6:.3f} us per tile, in steps of the "
                "tensor-step probe (the model's step: "
                f"{tile_s / ctx['assumed_step']:.2f} of its steps)",
                {"us_per_tile": tile_s * 1e6, "model_steps": tile_s / ctx["assumed_step"],
                 "distinct_sms": on_sms,
                 **({"bytes_per_clock_per_sm": TILE_M * TILE_N * 4 / (tile_s * clock_hz)}
                    if clock_hz else {}), **spread}))
    return out


#: The probes, in order: name, function (each returns its results; the tensor step's step
#: time and clock serve the partial tiles)
_PROBES = (("tensor step", _tensor_step), ("launch", _launch), ("DRAM read", _dram),
           ("L2 read", _l2), ("partial tile", _partials))


def run_probes(device: torch.device, arch: int = 90, card: Optional[str] = None,
               budget_s: float = 0.1, log: Callable[[str], None] = lambda s: None,
               on_result: Callable[[ProbeResult], None] = lambda r: None
               ) -> List[ProbeResult]:
    """Measure every assumption on ``device`` (CUDA) against the static model's card
    (``benchmarks.static.CARD_GPUS[card]`` or ``GPUS[arch]``), each result handed to
    ``on_result`` as it comes. A probe whose kernel computes a wrong result is recorded with
    status ``"wrong"``, one that raises with ``"error"``; the others go on. Raises ValueError
    off CUDA or under the interpreter."""
    if device.type != "cuda":
        raise ValueError("the probes time GPU kernels: they need a CUDA device")
    if _interpreting():
        raise ValueError("the probes time compiled kernels: unset TRITON_INTERPRET")
    gpu = _model_gpu(arch, card)
    ctx = dict(gpu=gpu, device=device, budget_s=budget_s,
               sms=torch.cuda.get_device_properties(device).multi_processor_count,
               assumed_step=2.0 * TILE_M * TILE_N * TILE_K / (gpu.tensor_flop_per_s["16"]
                                                              / gpu.sms))
    results: List[ProbeResult] = []
    for name, probe in _PROBES:
        log(f"[probes] {name} ...")
        try:
            found = probe(ctx)
        except AssertionError as e:
            found = [ProbeResult(name, "-", "-", None, None, f"WRONG RESULT: {e}",
                                 status="wrong")]
        except Exception as e:  # noqa: BLE001 -- recorded; the other probes still run
            found = [ProbeResult(name, "-", "-", None, None,
                                 f"error: {type(e).__name__}: {str(e)[:400]}", status="error")]
        for r in found:
            results.append(r)
            on_result(r)
    return results


def probes_markdown(results: List[ProbeResult]) -> str:
    """The probes as a markdown section (measured on the bundle's GPU; the assumed values
    are the static model's)."""
    lines = ["## The static model's assumptions, measured (probes)", "",
             "Each probe isolates one constant of `benchmarks/static.py` or "
             "`dc_kernels/ops/path.py` (`benchmarks/probes.py`); measured / assumed far from "
             "1 says which estimate to distrust.", "",
             "| probe | assumed | measured | measured / assumed | model constant | how |",
             "|---|---|---|---|---|---|"]
    for r in results:
        a = "-" if r.assumed is None else f"{r.assumed:.3g} {r.unit}"
        m = "-" if r.measured is None else f"{r.measured:.3g} {r.unit}"
        q = "-" if r.ratio is None else f"{r.ratio:.2f}"
        name = r.name if r.status == "ok" else f"{r.name} (**{r.status}**)"
        lines.append(f"| {name} | {a} | {m} | {q} | {r.assumption} | {r.detail} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- builds
def build_problems(arch: int = 90, sms: int = 132) -> List[str]:
    """Build every probe kernel for ``sm_{arch}`` as the JIT binds it at the probes' sizes
    on ``sms`` SMs (``dc_kernels.ops.triton_aot``; no GPU) and say what would make a probe
    measure something else than it claims: a spill, no tensor-core loop or clock reads
    outside it in the tensor step, a ``cp.async`` ring or loads that are not whole tiles in
    the stream probe, fewer resident programs per SM than it launches, a partial tile that
    is not one 128 x 256 fp32 tile per repeat, a release that does not follow a CTA
    barrier after the stores (:mod:`dc_kernels.ops.ordering`). Empty when all is well. Needs
    ``TRITON_INTERPRET`` unset."""
    from dc_kernels.ops import ordering, sass, triton_aot
    from .static import GPUS, occupancy
    cpu = torch.device("cpu")
    per_sm = {}  # stream builds: the programs per SM each must hold at once
    with triton_aot.record_launches(arch) as records:
        tensor_step_launch(sms, STEP_PAIRS[0], cpu)()
        launch_launch(sms, cpu)()
        dram = torch.empty(dram_elements(sms))
        for k in DRAM_PROGRAMS_PER_SM:
            stream_launch(dram, k * sms, DRAM_BLOCK, 1, num_warps=DRAM_WARPS)()
            per_sm[len(records) - 1] = k
        l2 = torch.empty(L2_PROGRAMS_PER_SM * sms * L2_BLOCK)
        for r in REPEATS:
            stream_launch(l2, L2_PROGRAMS_PER_SM * sms, L2_BLOCK, r)()
            per_sm[len(records) - 1] = L2_PROGRAMS_PER_SM
        for r in REPEATS:
            for _, load, release in PARTIAL_VARIANTS:
                partial_launch(sms, r, load, cpu, release=release)()
    problems: List[str] = []
    tile_bytes = TILE_M * TILE_N * 4
    for i, rec in enumerate(records):
        b = triton_aot.build(rec.fn, rec.args, rec.kwargs, arch)
        what = f"{b.kernel} (sm_{arch}, {b.registers} registers)"
        if b.spill_stores or b.spill_loads:
            problems.append(f"{what}: {b.spill_stores} spill stores, {b.spill_loads} loads")
        if b.shared > triton_aot.SHARED_LIMIT[arch]:
            problems.append(f"{what}: {b.shared} B of shared memory")
        stats = sass.analyze(b.sass)
        loops = [lp for lp in stats["loops"] if lp["innermost"]]
        main = max(loops, key=lambda lp: lp["instructions"], default=None)
        mix = main["mix"] if main else {}
        threads = 32 * b.num_warps
        if stats["mix"].get("cp_async"):
            problems.append(f"{what}: cp.async copies (a ring: more in flight than claimed)")
        if b.kernel == "_tensor_step_kernel":
            if not mix.get("tensor") or mix.get("global_load"):
                problems.append(f"{what}: its loop is not tensor-core steps alone ({mix})")
            reads = [int(m, 16) for m in re.findall(r"/\*([0-9a-f]+)\*/[^\n]*SR_CLOCKLO",
                                                    b.sass)]
            if main is None or len(reads) != 2 or not reads[0] < main["start"] <= \
                    main["end"] < reads[1]:
                problems.append(f"{what}: its clock reads ({[hex(r) for r in reads]}) do not "
                                "bracket its loop")
        elif b.kernel == "_stream_kernel":
            per_iter = main["load_bytes_per_lane"] * threads if main else 0
            tile = rec.kwargs["BLOCK"] * 4
            if not per_iter or per_iter % tile or mix.get("global_store"):
                problems.append(f"{what}: its loop loads {per_iter} B per iteration, not whole "
                                f"{tile}-byte tiles")
            fits = occupancy(b.registers, b.shared, b.num_warps, GPUS.get(arch, GPUS[90]))
            if fits < per_sm[i]:
                problems.append(f"{what}: {fits} programs fit an SM, the probe runs "
                                f"{per_sm[i]} per SM")
        elif b.kernel == "_partial_kernel":
            if rec.kwargs["LOAD"]:
                moved = main["load_bytes_per_lane"] * threads if main else 0
                if moved != tile_bytes or mix.get("global_store"):
                    problems.append(f"{what}: its loop loads {moved} B, not one fp32 tile")
            elif not mix.get("global_store") or mix.get("global_load"):
                problems.append(f"{what}: its loop does not store the tile ({mix})")
            # the release variant times what a stream-K piece pays to publish its partial:
            # the CTA barrier after the stores, then the GPU-scope release
            facts = ordering.audit(b.ptx)
            problems += [f"{what}: {p}" for p in
                         ordering.protocol_problems(b.kernel, {}, facts)]
            if rec.kwargs["RELEASE"] and not (facts["counts"]["release"]
                                              and facts["counts"]["barrier"]):
                problems.append(f"{what}: no barrier and release after its stores")
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m benchmarks.probes --check-builds [--arch 90]``: print
    :func:`build_problems` (exit 1 if any). Timing the probes is ``python -m benchmarks
    --probes`` (CUDA)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m benchmarks.probes", description=main.__doc__)
    p.add_argument("--check-builds", action="store_true", required=True)
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    problems = build_problems(args.arch)
    print("\n".join(problems) or f"probes: every build for sm_{args.arch} measures what it "
          "claims (no spills, no cp.async ring, the loops as stated, the programs resident)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
