"""Run a selection of (shape, images, op, provider) and collect one row per timed combination.

For every case (shape x images) the inputs are built once; for every op the eager reference
runs first and gives the yardstick (:mod:`benchmarks.accuracy`); then every provider is
prepared, called once (compiling if it compiles), **checked**, timed, and measured for peak
memory. A wrong result raises :class:`benchmarks.accuracy.CorrectnessError` before any time of
that provider is recorded (the partial result rides on the exception as ``.partial``).
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import accuracy
from .cases import OPS, SHAPES, Case, make_inputs
from .ceilings import Ceilings, measure_ceilings
from .costs import floor_cost, floor_seconds
from .machine import machine_info
from .memory import METHOD as MEMORY_METHOD
from .memory import peak_memory_bytes
from .providers import PROVIDERS, prepare, split_provider, unavailable_reason
from .timing import synchronize, time_fn

__all__ = ["Selection", "Row", "RunResult", "row_name", "plan", "run", "snapshot"]


@dataclass
class Selection:
    """What to run. ``filter`` keeps rows whose name (:func:`row_name`) contains it.

    ``order``, if given, is the ``(shape, images, op)`` cases to run, in that order (each from
    ``shapes``, ``images`` and ``ops``; the GPU bundle runs its most telling cases first, so a
    run stopped by its time budget has measured those); otherwise every combination, shape by
    shape.
    """

    shapes: Sequence[str]
    images: Sequence[int]
    ops: Sequence[str] = OPS
    providers: Sequence[str] = PROVIDERS
    filter: Optional[str] = None
    budget_s: float = 1.0  # per timing (CPU sampling time; do_bench's rep on CUDA)
    order: Optional[Sequence[Tuple[str, int, str]]] = None

    def validate(self) -> None:
        """Raise ValueError on unknown names, non-positive image counts, or an ``order``
        case outside the selection or given twice."""
        for kind, names, known in (("shape", self.shapes, SHAPES), ("op", self.ops, OPS),
                                   ("provider", [split_provider(p)[0] for p in self.providers],
                                    PROVIDERS)):
            bad = [n for n in names if n not in known]
            if bad:
                raise ValueError(f"unknown {kind}(s) {bad}; choose from {list(known)}")
        if any(int(i) < 1 for i in self.images):
            raise ValueError(f"images must be >= 1, got {list(self.images)}")
        if self.order is not None:
            cases = [tuple(c) for c in self.order]
            outside = [c for c in cases if len(c) != 3 or c[0] not in self.shapes
                       or c[1] not in self.images or c[2] not in self.ops]
            if outside:
                raise ValueError(f"order: cases {outside} are not (shape, images, op) of the "
                                 f"selection (shapes {list(self.shapes)}, images "
                                 f"{list(self.images)}, ops {list(self.ops)})")
            if len(set(cases)) != len(cases):
                raise ValueError(f"order: a case is given twice in {cases}")

    def cases(self) -> List[Tuple[str, int, str]]:
        """The ``(shape, images, op)`` cases in the order they run."""
        if self.order is not None:
            return [(s, int(i), o) for s, i, o in self.order]
        return [(s, int(i), o) for s in self.shapes for i in self.images for o in self.ops]


@dataclass
class Row:
    """One timed (provider, op, shape, images). Times in ms, memory in MiB; None = not
    applicable (e.g. FLOP/s of the features op, speedup when the baseline was not run)."""

    name: str
    provider: str
    op: str
    shape: str
    images: int
    batch: int
    rows: int  # M
    k: int
    n: int
    dtype: str
    device: str
    device_name: str
    note: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    timing: str
    first_call_s: float  # compile time included for reference+compile
    floor_bytes: int
    floor_flops: int
    tflops: Optional[float]
    gbps: float
    floor_ms: float
    pct_of_floor: float
    peak_mib: Optional[float]
    other_cpu_load: Optional[float]  # CPU: share of the cores other processes used meanwhile
    max_abs_err: float  # vs the eager reference
    err_over_bound: float  # worst element-wise error / bound (accuracy.py)
    max_abs_err_exact: float  # vs the exact result (fp64 features, fp32/fp64 GEMMs)
    rel_err_exact: float  # ||out - exact|| / ||exact||
    rel_err_limit: float  # the norm-wise limit it met
    speedup_vs_reference: Optional[float] = None
    speedup_vs_compile: Optional[float] = None


@dataclass
class RunResult:
    """Rows plus everything needed to read them: machine, dtype, ceilings, methods."""

    machine: dict
    dtype: str
    ceilings: Ceilings
    selection: dict
    rows: List[Row] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    methods: dict = field(default_factory=dict)
    #: ``keep_going`` runs: ``"<row name>: <error>"`` per provider that failed (wrong result,
    #: error); none of its times is reported
    failures: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"machine": self.machine, "dtype": self.dtype,
                "ceilings": self.ceilings.as_dict(), "selection": self.selection,
                "methods": self.methods, "elapsed_s": round(self.elapsed_s, 1),
                "rows": [asdict(r) for r in self.rows], "skipped": self.skipped,
                "failures": self.failures}


def row_name(op: str, shape: str, images: int, provider: str) -> str:
    """``op/shape/<images>img/provider``, e.g. ``linear/clip336-4096/16img/dc_kernels``."""
    return f"{op}/{shape}/{images}img/{provider}"


def plan(selection: Selection, device: torch.device):
    """``([(case, op, [providers])], skipped)`` after the filter and availability."""
    tasks, skipped = [], []
    for shape, images, op in selection.cases():
        case = Case(SHAPES[shape], images)
        chosen = []
        for provider in selection.providers:
            name = row_name(op, shape, images, provider)
            if selection.filter and selection.filter not in name:
                continue
            reason = unavailable_reason(provider, op, device)
            if reason:
                skipped.append(f"{name}: {reason}")
            else:
                chosen.append(provider)
        if chosen:
            tasks.append((case, op, chosen))
    return tasks, skipped


def _fill_speedups(rows: List[Row]) -> None:
    base = {r.provider: r.median_ms for r in rows}
    for r in rows:
        if "reference" in base:
            r.speedup_vs_reference = base["reference"] / r.median_ms
        if "reference+compile" in base:
            r.speedup_vs_compile = base["reference+compile"] / r.median_ms


def _measure_row(provider, op, inputs, stick, ceilings, dtype_name, device, device_label,
                 budget_s) -> Row:
    case = inputs.case
    label = row_name(op, case.shape.name, case.images, provider)
    prepared = prepare(provider, op, inputs)
    t0 = time.perf_counter()
    outputs = prepared.fn()
    synchronize(device)
    first_call_s = time.perf_counter() - t0
    checked = accuracy.check(outputs, stick, label)
    del outputs
    timing = time_fn(prepared.fn, device, budget_s)
    peak = peak_memory_bytes(prepared.fn, device)
    cost = floor_cost(op, case, inputs.hidden_states[0].element_size())
    floor_s = floor_seconds(cost, ceilings.copy_bytes_per_s, ceilings.matmul_flop_per_s)
    t = timing.median_s
    note = prepared.note
    if prepared.compiles:
        note += f", first call (compiles) {first_call_s:.1f} s"
    return Row(
        name=label, provider=provider, op=op, shape=case.shape.name, images=case.images,
        batch=case.batch, rows=case.rows, k=case.features_width, n=case.shape.hidden,
        dtype=dtype_name, device=device.type, device_name=device_label, note=note,
        median_ms=t * 1e3, p20_ms=timing.p20_s * 1e3, p80_ms=timing.p80_s * 1e3,
        timing=timing.method, first_call_s=first_call_s,
        floor_bytes=cost.bytes, floor_flops=cost.flops,
        tflops=cost.flops / t / 1e12 if cost.flops else None, gbps=cost.bytes / t / 1e9,
        floor_ms=floor_s * 1e3, pct_of_floor=100.0 * floor_s / t,
        peak_mib=None if peak is None else peak / 2 ** 20, other_cpu_load=timing.other_load,
        max_abs_err=checked.max_abs_error, err_over_bound=checked.worst_ratio,
        max_abs_err_exact=checked.max_abs_error_exact, rel_err_exact=checked.rel_error_exact,
        rel_err_limit=checked.rel_error_limit)


def _unusable(device: torch.device) -> Optional[str]:
    """None if ``device`` still synchronizes after a failed row, else why not (a CUDA error
    such as an illegal address leaves the context unusable)."""
    try:
        synchronize(device)
        return None
    except Exception as e:  # noqa: BLE001 -- any error here means the device is gone
        return f"the device failed to synchronize after an error ({type(e).__name__}: " \
               f"{str(e)[:200]})"


def _free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def snapshot(result: RunResult, rows: Sequence[Row] = ()) -> RunResult:
    """A copy of ``result`` with ``rows`` (a case still running) appended, their speedups
    filled from one another: what a run stopped now would have measured."""
    extra = [replace(r) for r in rows]
    _fill_speedups(extra)
    return replace(result, rows=list(result.rows) + extra, skipped=list(result.skipped))


def run(selection: Selection, device: torch.device, dtype: torch.dtype,
        log: Callable[[str], None] = lambda s: None, deadline: Optional[float] = None,
        on_row: Optional[Callable[[RunResult, Sequence[Row]], None]] = None,
        on_start: Optional[Callable[[str], None]] = None,
        keep_going: bool = False) -> RunResult:
    """Run ``selection`` on ``device`` in ``dtype``; ``log`` receives one line per row.

    ``deadline`` (a ``time.perf_counter()`` value): no row starts after it; the rows not run
    are listed in ``skipped`` as such. ``on_start(name)`` is called before each row and
    ``on_row(result, rows)`` after it, with the rows of the case still running (:func:`snapshot`
    makes them one result), so a caller can keep what was measured if the run dies.

    A wrong result raises :class:`accuracy.CorrectnessError` (the rows so far on it as
    ``.partial``). With ``keep_going`` (the GPU bundle) a provider whose row fails (wrong
    result or any error) is listed in ``failures`` instead and not run again; the others go
    on, unless the device no longer synchronizes after the error (then the run stops, every
    row left listed in ``skipped``).
    """
    selection.validate()
    start = time.perf_counter()
    dtype_name = str(dtype).replace("torch.", "")
    tasks, skipped = plan(selection, device)
    total = sum(len(p) for _, _, p in tasks)
    log(f"measuring the ceilings (copy bandwidth, {dtype_name} matmul) on {device.type} ...")
    ceilings = measure_ceilings(device, dtype, max(selection.budget_s, 0.2))
    log(f"copy {ceilings.copy_bytes_per_s / 1e9:.1f} GB/s, matmul "
        f"{ceilings.matmul_flop_per_s / 1e12:.2f} TFLOP/s; {total} rows to run")
    result = RunResult(
        machine=machine_info(device), dtype=dtype_name, ceilings=ceilings,
        selection={"shapes": list(selection.shapes), "images": list(selection.images),
                   "ops": list(selection.ops), "providers": list(selection.providers),
                   "filter": selection.filter, "budget_s": selection.budget_s},
        skipped=skipped,
        methods={"peak_memory": MEMORY_METHOD[device.type],
                 "timing": "triton.testing.do_bench, median and p20/p80" if device.type ==
                 "cuda" else "time.perf_counter per call after warm-up, median and p20/p80"})
    done = 0
    current_case, inputs, rows = None, None, []
    broken: set = set()  # keep_going: providers that failed
    dead: Optional[str] = None  # keep_going: why the device can no longer be used

    def why_not(provider: str) -> Optional[str]:
        # why a row of ``provider`` is not started now, or None
        if deadline is not None and time.perf_counter() >= deadline:
            return "the time budget was spent"
        if provider in broken:
            return "the provider failed earlier"
        return dead

    try:
        for case, op, providers in tasks:
            reasons = [why_not(p) for p in providers]
            if all(reasons):  # none of the case's rows starts: its inputs are not even built
                result.skipped.extend(
                    f"{row_name(op, case.shape.name, case.images, p)}: not run, {why}"
                    for p, why in zip(providers, reasons))
                done += len(providers)
                continue
            try:
                if case != current_case:
                    inputs = None
                    _free(device)
                    current_case = case
                    inputs = make_inputs(case, dtype, device)
                stick = accuracy.yardstick(op, inputs, prepare("reference", op, inputs).fn())
                for provider in providers:
                    done += 1
                    name = row_name(op, case.shape.name, case.images, provider)
                    why = why_not(provider)
                    if why:
                        result.skipped.append(f"{name}: not run, {why}")
                        continue
                    if on_start is not None:
                        on_start(name)
                    try:
                        row = _measure_row(provider, op, inputs, stick, ceilings, dtype_name,
                                           device, result.machine["device_name"],
                                           selection.budget_s)
                    except torch.cuda.OutOfMemoryError:
                        raise
                    except Exception as e:  # noqa: BLE001 -- keep_going records every failure
                        if not keep_going:
                            raise
                        message = f"{name}: {type(e).__name__}: {str(e)[:600]}"
                        result.failures.append(message)
                        broken.add(provider)
                        log(f"FAILED {message}")
                        dead = _unusable(device)
                        continue
                    rows.append(row)
                    log(f"[{done}/{total}] {row.name}: {row.median_ms:.3f} ms "
                        f"(check ok, err/bound {row.err_over_bound:.2g})")
                    if on_row is not None:
                        result.elapsed_s = time.perf_counter() - start
                        on_row(result, rows)
            except torch.cuda.OutOfMemoryError:
                message = f"{row_name(op, case.shape.name, case.images, '*')}: out of memory"
                result.skipped.append(message)
                log(f"skipped {message}")
            stick = None
            _fill_speedups(rows)
            result.rows.extend(rows)
            rows = []
    except accuracy.CorrectnessError as e:
        # the rows measured so far, those of the failing case included
        result.elapsed_s = time.perf_counter() - start
        e.partial = snapshot(result, rows)
        raise
    finally:
        inputs = stick = None
        _free(device)
        result.elapsed_s = time.perf_counter() - start
    return result
