"""Probes of the static cost model's assumptions, measured on the GPU that runs the bundle.

The static model (:mod:`benchmarks.static`) and the path rule (:mod:`dc_kernels.ops.path`)
rest on constants that no CPU run can check: the SM clock, the time of one 128 x 256 x 64
tensor-core step, the fixed cost of a launch, the loaded DRAM latency behind every bytes-in-
flight bound, the L2 bandwidth, and what one fp32 partial tile of the stream-K GEMM costs to
store and to load (``path.SPLIT_PARTIAL_STEPS``: the constant that decides whether one CLIP
image can reach issue 12's 1.3x the floor, ``docs/DESIGN.md`` §5.3). Each probe here is a
small Triton kernel that isolates one of them:

* ``tensor step``: one program per SM, a [128, 64] x [64, 256] bf16 ``tl.dot`` onto an fp32
  accumulator ``ITERS`` times (operands in shared memory, no loads in the loop), 8 warps: the
  tensor cores alone. The SM clock is read inside it (``%clock64`` against
  ``%globaltimer``), i.e. under tensor-core load, the clock the model assumes.
* ``launch``: a 132-program kernel that stores one value per program, 64 launches captured in
  a CUDA graph and replayed (the GPU's cost per launch), and the same 64 launched eagerly (the
  host's, through Triton's launcher).
* ``DRAM latency``: 1, 2, 4 and 8 programs per SM reading 1 GiB once with
  ``num_stages=1``, each with the bytes in flight its SASS's load burst says (read from the
  kernel compiled on the GPU, as the static model reads every kernel's): at each in-flight
  size the measured bandwidth beside the model's ``min(DRAM, SMs x in-flight / latency)``,
  and the latency Little's law implies.
* ``L2 read``: 8 programs per SM re-reading a 16.5 MiB buffer (``.cg``: L2, not L1).
* ``partial store`` / ``partial load``: one program per SM (and a quarter of the SMs, where
  L2 does not bound them) stores, or loads and adds, a 128 x 256 fp32 tile in 128 x 64
  quarters from the wgmma accumulator's layout, as ``gemm_tma._partial_epilogue`` does.

Every time is differential: the same launch at two repeat counts, the difference over the
extra work, so the launch, the first pass from DRAM and the timer's L2 flush cancel. Every
kernel's result is checked against torch (exact: integer-valued data), so a probe that did not
do its work fails instead of reporting a speed. ``run_probes`` needs CUDA; under
``TRITON_INTERPRET=1`` the kernels run on the CPU at small sizes (the tests check their
results), with no timing.
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

__all__ = ["ProbeResult", "run_probes", "probes_markdown", "TILE_M", "TILE_N", "TILE_K",
           "tensor_step_launch", "launch_launch", "stream_launch", "partial_launch",
           "inflight_per_program"]

#: The stream-K GEMM's tile and K step (``gemm_tma``'s 128 x 256 x 64 config)
TILE_M, TILE_N, TILE_K = 128, 256, 64
#: dots per tensor-step launch (the difference is timed)
STEP_ITERS = (1024, 2048)
#: repeats per L2 / partial launch (the difference is timed)
REPEATS = (8, 16)
#: DRAM probe: fp32 tile, warps, programs per SM (each a bytes-in-flight point)
DRAM_BLOCK, DRAM_WARPS, DRAM_PROGRAMS_PER_SM = 1024, 4, (1, 2, 4, 8)
#: L2 probe: fp32 tile and programs per SM (one tile each: 16.5 MiB on 132 SMs)
L2_BLOCK, L2_PROGRAMS_PER_SM = 4096, 8
#: eager and graph launches per timed call of the launch probe
LAUNCHES = 64


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
def _tensor_step_kernel(a_ptr, b_ptr, out_ptr, clocks_ptr, ITERS, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CLOCK: tl.constexpr,
                        DOT_FP32: tl.constexpr):
    # ITERS dependent [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] dots onto one accumulator; the
    # clocks before and after (program 0 stores its accumulator, every program its clocks)
    pid = tl.program_id(0)
    om = tl.arange(0, BLOCK_M)
    on = tl.arange(0, BLOCK_N)
    ok = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + om[:, None] * BLOCK_K + ok[None, :])
    b = tl.load(b_ptr + ok[:, None] * BLOCK_N + on[None, :])
    t0 = _read_register(pid, "globaltimer", CLOCK)
    c0 = _read_register(pid, "clock64", CLOCK)
    # the accumulator starts from c0's top bit (always 0, not known to be): no dot is moved
    # above the clock read
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + (c0 >> 63).to(tl.float32)
    for _ in range(ITERS):
        acc = _dot(a, b, acc, DOT_FP32)
    done = tl.sum(tl.sum(acc, axis=1), axis=0).to(tl.int32, bitcast=True)
    c1 = _read_register(done, "clock64", CLOCK)
    t1 = _read_register(done, "globaltimer", CLOCK)
    tl.store(clocks_ptr + pid * 4 + 0, t0.to(tl.int64, bitcast=True))
    tl.store(clocks_ptr + pid * 4 + 1, t1.to(tl.int64, bitcast=True))
    tl.store(clocks_ptr + pid * 4 + 2, c0.to(tl.int64, bitcast=True))
    tl.store(clocks_ptr + pid * 4 + 3, c1.to(tl.int64, bitcast=True))
    o_out = om[:, None] * BLOCK_N + on[None, :]
    tl.store(out_ptr + o_out, acc, mask=(o_out * 0 + pid) == 0)


@triton.jit
def _launch_kernel(out_ptr):
    pid = tl.program_id(0)
    tl.store(out_ptr + pid, pid)


@triton.jit
def _stream_kernel(x_ptr, out_ptr, n_per_program, REPEAT, BLOCK: tl.constexpr):
    # each program sums its n_per_program contiguous elements REPEAT times, one BLOCK tile
    # per step (.cg: from L2 or DRAM, never L1); num_stages=1: no cp.async ring, so what a
    # program has in flight is the loads its warps issue before the first sum needs one (the
    # SASS's load burst: ptxas unrolls the loop and issues several tiles' loads at once)
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * n_per_program
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(REPEAT):
        for start in range(0, n_per_program, BLOCK):
            acc += tl.load(base + start + offs, cache_modifier=".cg")
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _partial_kernel(ws_ptr, a_ptr, b_ptr, out_ptr, REPEAT, WRAP, LOAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_FP32: tl.constexpr):
    # a [BLOCK_M, BLOCK_N] fp32 accumulator in the wgmma layout (one dot), split into four
    # column quarters as gemm_tma._partial_epilogue splits it; then REPEAT times either
    # (LOAD = 0) store the quarters plus the repeat's index to the program's slot of ws, or
    # (LOAD = 1) load the slot's quarters (.cg) and add them; program 0 stores its tile to out
    pid = tl.program_id(0)
    om = tl.arange(0, BLOCK_M)
    on = tl.arange(0, BLOCK_N)
    ok = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + om[:, None] * BLOCK_K + ok[None, :])
    b = tl.load(b_ptr + ok[:, None] * BLOCK_N + on[None, :])
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
    first = (o_q * 0 + pid) == 0
    o_out = out_ptr + o_q
    tl.store(o_out, q0, mask=first)
    tl.store(o_out + QUARTER, q1, mask=first)
    tl.store(o_out + 2 * QUARTER, q2, mask=first)
    tl.store(o_out + 3 * QUARTER, q3, mask=first)


# --------------------------------------------------------------------------- launchers
def _interpreting() -> bool:
    from dc_kernels.ops.common import interpreting
    return interpreting()


def _operands(device, block_m: int = TILE_M, block_n: int = TILE_N, block_k: int = TILE_K,
              seed: int = 0):
    # bf16 operands with entries in {-1, 0, 1}: every product and sum is an exact integer
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-1, 2, (block_m, block_k), generator=g).to(torch.bfloat16).to(device)
    b = torch.randint(-1, 2, (block_k, block_n), generator=g).to(torch.bfloat16).to(device)
    return a, b


def _check_tiles(programs: int, *blocks: int) -> None:
    if programs < 1:
        raise ValueError(f"a probe needs at least one program, got {programs}")
    for b in blocks:
        if b < 16 or b & (b - 1):
            raise ValueError(f"probe tiles are powers of two of at least 16, got {b}")


def tensor_step_launch(programs: int, iters: int, device, block_m: int = TILE_M,
                       block_n: int = TILE_N, block_k: int = TILE_K, seed: int = 0
                       ) -> Callable[[], None]:
    """A launcher of the tensor-step probe (``programs`` programs, ``iters`` dots each) that
    checks nothing; its attribute ``check()`` compares program 0's accumulator with
    ``iters * (a @ b)`` (exact) and returns the clocks ``[programs, 4]`` (globaltimer start,
    end, clock64 start, end; zeros under the interpreter)."""
    _check_tiles(programs, block_m, block_n, block_k)
    a, b = _operands(device, block_m, block_n, block_k, seed)
    out = torch.full((block_m, block_n), float("nan"), device=device)
    clocks = torch.zeros(programs, 4, dtype=torch.int64, device=device)
    clock = not _interpreting()

    def launch():
        _tensor_step_kernel[(programs,)](a, b, out, clocks, iters, BLOCK_M=block_m,
                                         BLOCK_N=block_n, BLOCK_K=block_k, CLOCK=clock,
                                         DOT_FP32=not clock, num_warps=8, num_stages=1)

    def check():
        want = (a.float() @ b.float()) * iters
        if not torch.equal(out.cpu(), want.cpu()):
            raise AssertionError("tensor-step probe: program 0's accumulator is not "
                                 f"{iters} x (a @ b)")
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
        want = x.view(programs, per).double().sum(dim=1) * repeat
        if not torch.equal(out.cpu().double(), want.cpu()):
            raise AssertionError("stream probe: a program's sum differs from torch's")
    launch.check, launch.out = check, out
    return launch


def partial_launch(programs: int, repeat: int, load: bool, device, block_m: int = TILE_M,
                   block_n: int = TILE_N, block_k: int = TILE_K, seed: int = 1
                   ) -> Callable[[], None]:
    """A launcher of the partial-tile probe: ``programs`` programs each store (``load=False``)
    or load and add (``load=True``) its fp32 ``block_m x block_n`` slot ``repeat`` times.
    ``check()`` compares program 0's tile with torch: ``a @ b`` plus ``repeat`` times the slot
    (loads; the slot is filled with ``a @ b + 1`` first), or ``a @ b`` (stores), and the slot
    stored last with ``a @ b + repeat - 1``."""
    _check_tiles(programs, block_m, block_n, block_k)
    if repeat < 1:
        raise ValueError(f"the partial probe needs at least one repeat, got {repeat}")
    a, b = _operands(device, block_m, block_n, block_k, seed)
    ab = a.float() @ b.float()
    ws = torch.empty(programs, block_m, block_n, device=device)
    ws.copy_((ab + 1).expand_as(ws))
    out = torch.full((block_m, block_n), float("nan"), device=device)
    interpret = _interpreting()

    def launch():
        _partial_kernel[(programs,)](ws, a, b, out, repeat, 1 << 20, LOAD=load, BLOCK_M=block_m,
                                     BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=interpret,
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
    launch.check, launch.out, launch.ws = check, out, ws
    return launch


# --------------------------------------------------------------------------- measuring
@dataclass
class ProbeResult:
    """One assumption: the model's value, the measured one and the ratio (measured /
    assumed), in ``unit``; ``detail`` says how it was measured."""

    name: str
    assumption: str      # where the model holds it
    unit: str
    assumed: Optional[float]
    measured: Optional[float]
    detail: str = ""
    extra: Dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        if self.assumed and self.measured is not None:
            return self.measured / self.assumed
        return None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def _differential(make: Callable[[int], Callable[[], None]], low: int, high: int, device,
                  budget_s: float) -> float:
    # seconds per extra unit of work between the ``low`` and ``high`` launches (each checked)
    times = []
    for n in (low, high):
        fn = make(n)
        fn()
        torch.cuda.synchronize(device)
        fn.check()
        times.append(time_fn(fn, device, budget_s).median_s)
    # (NaN where noise made the longer launch no slower: the report then says nan, not a
    # negative speed)
    diff = times[1] - times[0]
    return diff / (high - low) if diff > 0 else float("nan")


def inflight_per_program(compiled, num_warps: int, fallback: int) -> tuple:
    """``(bytes, how)``: the global-load bytes one program of ``compiled`` (a Triton
    ``CompiledKernel``) keeps in flight, read the way the static model reads it (the load
    burst of its main loop's SASS, ``dc_kernels.ops.sass``: what its warps issue before a
    loaded register is needed) -- or ``fallback`` when its SASS cannot be read here."""
    import subprocess
    import tempfile
    from dc_kernels.ops import sass, triton_aot
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            text = subprocess.run([triton_aot._tool("nvdisasm"), "-c", f.name],
                                  capture_output=True, text=True, check=True).stdout
    except (AttributeError, KeyError, OSError, RuntimeError,
            subprocess.CalledProcessError) as e:
        return fallback, f"SASS not read ({type(e).__name__}): one tile assumed"
    loops = [lp for lp in sass.analyze(text)["loops"] if lp["innermost"]]
    main = max(loops, key=lambda lp: lp["load_bytes_per_lane"], default=None)
    if main is None or not main["max_load_burst_per_lane"]:
        return fallback, "no load loop in the SASS: one tile assumed"
    return (main["max_load_burst_per_lane"] * 32 * num_warps,
            f"the SASS's load burst, {main['max_load_burst_per_lane']} B per lane")


def _model_gpu(arch: int, card: Optional[str]):
    from .static import CARD_GPUS, GPUS
    return CARD_GPUS.get(card) if card in CARD_GPUS else GPUS.get(arch, GPUS[90])


def run_probes(device: torch.device, arch: int = 90, card: Optional[str] = None,
               budget_s: float = 0.1, log: Callable[[str], None] = lambda s: None
               ) -> List[ProbeResult]:
    """Measure every assumption on ``device`` (CUDA) against the static model's card
    (``benchmarks.static.CARD_GPUS[card]`` or ``GPUS[arch]``). Raises AssertionError when a
    probe kernel computes a wrong result, ValueError off CUDA."""
    if device.type != "cuda":
        raise ValueError("the probes time GPU kernels: they need a CUDA device")
    if _interpreting():
        raise ValueError("the probes time compiled kernels: unset TRITON_INTERPRET")
    from dc_kernels.ops.path import SPLIT_PARTIAL_STEPS
    gpu = _model_gpu(arch, card)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    results: List[ProbeResult] = []
    step_flops = 2.0 * TILE_M * TILE_N * TILE_K
    assumed_step = step_flops / (gpu.tensor_flop_per_s["16"] / gpu.sms)

    # tensor step and the clock under tensor load
    log("[probes] tensor step ...")
    last = {}

    def step(n):
        fn = tensor_step_launch(sms, n, device)
        last[n] = fn
        return fn
    step_s = _differential(step, *STEP_ITERS, device, budget_s)
    clocks = last[STEP_ITERS[1]].check().double()
    dt = (clocks[:, 1] - clocks[:, 0]).clamp(min=1)
    dclk = clocks[:, 3] - clocks[:, 2]
    clock_hz = float((dclk / dt).median()) * 1e9
    results.append(ProbeResult(
        "tensor step", f"{gpu.tensor_flop_per_s['16'] / 1e12:.0f} TFLOP/s over {gpu.sms} SMs "
        "(static.GPU.tensor_flop_per_s)", "us",
        assumed_step * 1e6, step_s * 1e6,
        f"{sms} programs (one per SM), 8 warps, [128, 64] x [64, 256] bf16 dots onto one "
        f"fp32 accumulator, operands in shared memory; {STEP_ITERS[0]} vs {STEP_ITERS[1]} "
        "dots",
        {"tflop_per_s": step_flops * sms / step_s / 1e12}))
    results.append(ProbeResult(
        "SM clock under tensor load", "static.GPU.clock_hz", "GHz", gpu.clock_hz / 1e9,
        clock_hz / 1e9, "%clock64 over %globaltimer in the tensor-step probe, median over SMs"))

    # launch
    log("[probes] launch ...")
    fn = launch_launch(sms, device)
    fn()
    torch.cuda.synchronize(device)
    fn.check()
    n = LAUNCHES
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    per_graph = time_fn(graph.replay, device, budget_s).median_s / n
    per_eager = time_fn(lambda: [fn() for _ in range(n)], device, budget_s).median_s / n
    fn.check()
    results.append(ProbeResult(
        "launch", "static.GPU.launch_fixed_s", "us", gpu.launch_fixed_s * 1e6, per_graph * 1e6,
        f"{sms} programs storing one int each, {n} launches in a CUDA graph per replay; "
        f"eager (Triton's launcher, host-bound): {per_eager * 1e6:.2f} us per launch",
        {"eager_us": per_eager * 1e6}))

    # DRAM: bytes in flight -> bandwidth, against Little's law with the model's latency
    log("[probes] DRAM latency ...")
    block, warps = DRAM_BLOCK, DRAM_WARPS
    total = dram_elements(sms)
    x = torch.randint(-2, 3, (total,), device=device, dtype=torch.int32).float()
    for per_sm in DRAM_PROGRAMS_PER_SM:
        programs = per_sm * sms
        # the whole buffer against its first half: the same programs and tiles per step
        halves, fn = {}, None
        for frac in (2, 1):
            fn = stream_launch(x[: total // frac], programs, block, 1, num_warps=warps)
            fn()
            torch.cuda.synchronize(device)
            fn.check()
            halves[frac] = time_fn(fn, device, budget_s).median_s
        per_program, how = inflight_per_program(fn.compiled, warps, block * 4)
        inflight = per_sm * per_program
        diff = halves[1] - halves[2]
        bw = (total * 4 / 2) / diff if diff > 0 else float("nan")
        model = min(gpu.dram_bytes_per_s, sms * inflight / gpu.latency_s)
        results.append(ProbeResult(
            f"DRAM read, {inflight / 1024:.0f} KiB in flight per SM",
            "min(static.GPU.dram_bytes_per_s, SMs x in-flight / static.GPU.latency_s)",
            "TB/s", model / 1e12, bw / 1e12,
            f"{per_sm} program(s) per SM, {warps} warps, num_stages=1, {block}-element fp32 "
            f"tiles; {per_program / 1024:.0f} KiB in flight per program ({how}); "
            f"Little's law latency {sms * inflight / bw * 1e6:.2f} us (model "
            f"{gpu.latency_s * 1e6:.2f} us)",
            {"inflight_kib_per_sm": inflight / 1024,
             "implied_latency_us": sms * inflight / bw * 1e6}))
    del x

    # L2 read bandwidth
    log("[probes] L2 read ...")
    programs, block = L2_PROGRAMS_PER_SM * sms, L2_BLOCK
    x = torch.randint(-2, 3, (programs * block,), device=device, dtype=torch.int32).float()
    l2_s = _differential(lambda r: stream_launch(x, programs, block, r), *REPEATS, device,
                         budget_s)
    results.append(ProbeResult(
        "L2 read", "static.GPU.l2_bytes_per_s", "TB/s", gpu.l2_bytes_per_s / 1e12,
        x.numel() * 4 / l2_s / 1e12,
        f"{programs} programs ({L2_PROGRAMS_PER_SM} per SM), a "
        f"{x.numel() * 4 / 2 ** 20:.1f} MiB buffer re-read with .cg loads; {REPEATS[0]} vs "
        f"{REPEATS[1]} passes"))
    del x

    # fp32 partial tiles, in steps of the tensor probe
    for what, load in (("store", False), ("load", True)):
        for programs, label in ((sms, "every SM"), (max(1, sms // 4), "a quarter of the SMs")):
            log(f"[probes] partial {what}, {label} ...")
            tile_s = _differential(lambda r: partial_launch(programs, r, load, device),
                                   *REPEATS, device, budget_s)
            results.append(ProbeResult(
                f"partial tile {what}, {label}",
                "path.SPLIT_PARTIAL_STEPS tensor steps", "steps", SPLIT_PARTIAL_STEPS,
                tile_s / step_s,
                f"{programs} programs, one 128 x 256 fp32 tile each ({what} in 128 x 64 "
                f"quarters from the wgmma layout, .cg); {REPEATS[0]} vs {REPEATS[1]} repeats; "
                "in measured steps "
                f"of {step_s * 1e6:.3f} us",
                {"us_per_tile": tile_s * 1e6,
                 "bytes_per_clock_per_sm": TILE_M * TILE_N * 4 / (tile_s * clock_hz)}))
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
        lines.append(f"| {r.name} | {a} | {m} | {q} | {r.assumption} | {r.detail} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- builds
def build_problems(arch: int = 90, sms: int = 132) -> List[str]:
    """Build every probe kernel for ``sm_{arch}`` as the JIT binds it at the probes' sizes
    on ``sms`` SMs (``dc_kernels.ops.triton_aot``; no GPU) and say what would make a probe
    measure something else than it claims: a spill, no wgmma in the tensor step's loop,
    a ``cp.async`` ring or loads outside the stream probe's loop, a partial tile that is not
    128 x 256 fp32 per repeat. Empty when all is well. Needs ``TRITON_INTERPRET`` unset."""
    from dc_kernels.ops import sass, triton_aot
    cpu = torch.device("cpu")
    with triton_aot.record_launches(arch) as records:
        tensor_step_launch(sms, STEP_ITERS[0], cpu)()
        launch_launch(sms, cpu)()
        dram = torch.empty(dram_elements(sms))
        for per_sm in DRAM_PROGRAMS_PER_SM:
            stream_launch(dram, per_sm * sms, DRAM_BLOCK, 1, num_warps=DRAM_WARPS)()
        l2 = torch.empty(L2_PROGRAMS_PER_SM * sms * L2_BLOCK)
        stream_launch(l2, L2_PROGRAMS_PER_SM * sms, L2_BLOCK, REPEATS[0])()
        for load in (False, True):
            partial_launch(sms, REPEATS[0], load, cpu)()
    problems: List[str] = []
    tile_bytes = TILE_M * TILE_N * 4
    for rec in records:
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
            reads = [int(m, 16) for m in re.findall(r"/\*([0-9a-f]+)\*/[^\n]*SR_CLOCKLO", b.sass)]
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
        elif b.kernel == "_partial_kernel":
            if rec.kwargs["LOAD"]:
                moved = main["load_bytes_per_lane"] * threads if main else 0
                if moved != tile_bytes or mix.get("global_store"):
                    problems.append(f"{what}: its loop loads {moved} B, not one fp32 tile")
            elif not mix.get("global_store") or mix.get("global_load"):
                problems.append(f"{what}: its loop does not store the tile ({mix})")
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
          "claims (no spills, no cp.async ring, the loops as stated)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
