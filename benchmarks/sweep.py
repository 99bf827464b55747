"""The GPU sweep: the launch choices the path rule makes from an estimated model, measured
side by side (CUDA only; the device call after the bundle's).

The path rule picks the first layer's launches from the static cost model's estimates: the
pipelined path's stream-K programs (the fastest replay of :func:`dc_kernels.ops.path.
pipelined_stream_k_replays`), its helper programs (:func:`dc_kernels.ops.schedule.split_helpers`),
stream K or whole tiles, and the two-pass GEMM's stream K (:func:`dc_kernels.ops.schedule.
gemm_stream_k`). Where issue 12's verdict hangs on them (one CLIP-L/336 and one SigLIP-384
image -> 4096, bf16, then 16 images; :data:`SWEEP_CASES`), :func:`variants` lists every
choice near the rule's, each a provider with launcher switches
(:func:`benchmarks.providers.split_provider`), and :func:`run_sweep` runs them as benchmark rows
(:func:`benchmarks.runner.run`: each checked against the reference before it is timed, all
timed with ``do_bench`` in one run, a variant that fails recorded and the others run on).

Beside each pipelined variant stands the path model's replay of it (an ESTIMATE), and beside
each two-pass one the model's step-equivalents of its busiest program, so the report shows
where the measured ranking and the model's part: which choice the measurements favour, by how
much over the rule's, and whether the model would have found it. What to change then (a
constant of the calibration, the rule) is a decision for whoever reads it.

Files: ``<out>/<date>-<card>-sweep.md`` and ``.json``, rewritten after every row; within
``budget_s`` (cases in order, no row started after it); the bundle's watchdog ends a row that
never finishes (exit 5) after writing them. Exit codes: 0 every variant ran and passed, 1 one
failed (wrong result or error), 2 no CUDA, 4 the budget ran out first.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .cases import SHAPES, Case, Inputs, make_inputs
from .machine import machine_info, slug
from .providers import split_provider, variant_name
from .report import markdown_report, write_json, write_text
from .runner import Row, RunResult, Selection, run, snapshot

__all__ = ["SWEEP_CASES", "Variant", "variants", "pipelined_variants", "two_pass_variants",
           "run_sweep", "sweep_markdown"]

#: (shape, images), most telling first: the two 1-image cases whose target the estimates miss,
#: then 16 images
SWEEP_CASES = (("clip336-4096", 1), ("siglip384-4096", 1), ("clip336-4096", 16),
               ("siglip384-4096", 16))
_PIPE, _TWO = "dc_kernels-pipelined", "dc_kernels-two-pass"


@dataclass(frozen=True)
class Variant:
    """One launch choice of a case: the provider (with switches) that runs it, what it is in
    words, and the model's view of it: the path model's replayed seconds (pipelined, an
    estimate; None where it has none) or the busiest program's step-equivalents (two-pass)."""

    provider: str
    what: str
    model_s: Optional[float] = None
    model_steps: Optional[float] = None


def _sms(device: torch.device) -> int:
    from dc_kernels.ops import common, gemm_tma
    if common.interpreting() or device.type != "cuda":
        return gemm_tma.INTERPRET_SMS
    return gemm_tma._num_sms(device.index if device.index is not None else 0)


def _model(device: torch.device, hs0: torch.Tensor, sms: int) -> dict:
    from dc_kernels.ops import common, gemm_tma, path
    if common.interpreting() or device.type != "cuda":
        return path.model_for(None, None)
    return path.model_for(gemm_tma.arch_of(hs0), gemm_tma.card_of(hs0), sms)


def _fewer(total: int, programs: int, more: Sequence[int] = (1, 2)) -> List[int]:
    # program counts whose busiest program runs 1, 2, ... more steps than on ``programs``
    iters = -(-total // programs)
    return [-(-total // (iters + k)) for k in more]


def two_pass_variants(M: int, K: int, N: int, sms: int, tile: Tuple[int, int, int]
                      ) -> List[Variant]:
    """The two-pass path's GEMM choices of an ``[M, K] x [K, N]`` first layer on ``sms`` SMs
    with the TMA GEMM's stream-K ``tile`` (BLOCK_M, BLOCK_N, BLOCK_K): the rule's
    (:func:`dc_kernels.ops.schedule.gemm_stream_k`), whole tiles, and stream K on one program per
    SM and on the programs that run 1 and 2 K steps more each than the rule's, where that is
    still fewer steps than whole tiles; each with the model's step-equivalents of its busiest
    program (estimates)."""
    from dc_kernels.ops import schedule
    tiles = math.ceil(M / tile[0]) * math.ceil(N / tile[1])
    ks = math.ceil(K / tile[2])
    whole = math.ceil(tiles / sms) * ks
    rule = schedule.gemm_stream_k(tiles, ks, sms)

    def steps(p: int) -> float:
        return schedule.stream_k_program_steps(schedule.stream_k_shape(tiles, ks, p)[0],
                                               schedule.stream_k_partials(tiles, ks, p)[0])
    out = [Variant(_TWO, "two-pass, the rule's GEMM: " + (f"stream K on {rule} programs"
                                                          if rule else "whole tiles"),
                   model_steps=steps(rule) if rule else whole),
           Variant("dc_kernels-two-pass-nosplit", "two-pass, whole tiles (no stream K)",
                   model_steps=whole)]
    total = tiles * ks
    seen = {-(-total // rule)} if rule else set()
    for p in sorted({sms, *_fewer(total, rule or sms)}, reverse=True):
        iters = -(-total // p)
        if iters in seen or iters >= whole or not 1 <= p <= total:
            continue  # the rule's, or no fewer steps than whole tiles
        seen.add(iters)
        programs = -(-total // iters)
        out.append(Variant(variant_name(_TWO, split_iters=iters),
                           f"two-pass, stream K: at most {iters} K steps per program "
                           f"({programs} programs)", model_steps=steps(programs)))
    return out


def pipelined_variants(M: int, C: int, N: int, num_layers_read: int, num_slabs: int,
                       element_size: int, model: dict, sms: int, tile: Tuple[int, int, int],
                       rule_programs: int, rule_helpers: int) -> List[Variant]:
    """The pipelined path's choices around the rule's (``rule_programs`` stream-K programs,
    0: whole tiles, beside ``rule_helpers`` helper programs; the launcher's, read off its
    launch): with stream K, every program count the rule's replays chose from and those that
    run 1 and 2 positions more each, a quarter, half and one helper per SM, whole tiles; with
    whole tiles, stream K on one program per SM, half and a quarter of the helpers. Each with
    the path model's replay of it (``model``, an estimate) where it has one."""
    from dc_kernels.ops import path
    positions = math.ceil(M / tile[0]) * math.ceil(N / tile[1]) * (C // tile[2]) \
        if C % tile[2] == 0 else 0
    args = (M, C, N, num_layers_read, num_slabs, element_size, model, sms, tile)

    def replay(programs: int, helpers: int) -> Optional[float]:
        whole, split = path.pipelined_stream_k_replays(
            *args, programs=[programs] if programs else [], helpers=helpers)
        return split.get(programs) if programs else whole

    rule_p, rule_h = rule_programs, rule_helpers
    out = [Variant(_PIPE, "pipelined, the rule's choice: "
                   + (f"stream K on {rule_p} programs" if rule_p else "whole tiles")
                   + f", {rule_h} helper programs", replay(rule_p, rule_h))]
    fewer_helpers = {max(1, rule_h // 4), max(1, rule_h // 2)}
    if rule_p:
        _, candidates = path.pipelined_stream_k_replays(*args, helpers=rule_h)
        progs = sorted((set(candidates) | set(_fewer(positions, rule_p))) - {rule_p},
                       reverse=True)
        out += [Variant(variant_name(_PIPE, programs=p),
                        f"pipelined, stream K on {p} programs", replay(p, rule_h))
                for p in progs if 1 <= p <= positions]
        out += [Variant(variant_name(_PIPE, helpers=h),
                        f"pipelined, stream K on {rule_p} programs, {h} helper programs",
                        replay(rule_p, h))
                for h in sorted((fewer_helpers | {sms}) - {rule_h})]
        out.append(Variant(variant_name(_PIPE, stream_k=0), "pipelined, whole tiles",
                           replay(0, rule_h)))
        return out
    if positions:
        p = min(sms, positions)
        out.append(Variant(variant_name(_PIPE, programs=p),
                           f"pipelined, stream K on {p} programs", replay(p, rule_h)))
    out += [Variant(variant_name(_PIPE, helpers=h),
                    f"pipelined, whole tiles, {h} helper programs")
            for h in sorted(fewer_helpers - {rule_h})]
    return out


def _launch_choices(inputs: Inputs, sms: int) -> List[Variant]:
    # both paths' variants from the launchers' own choices for these inputs
    from dc_kernels.ops import common, gemm_tma
    from dc_kernels.ops import linear as linear_ops
    hs, spec, w = inputs.hidden_states, inputs.spec, inputs.w1
    B, T, C = hs[spec.final_layer].shape
    case = inputs.case
    out: List[Variant] = []
    launch = linear_ops.prepare_linear(hs, spec, B, T, C, w, inputs.b1, "gelu",
                                       path="pipelined")
    if launch.path == "pipelined":
        pl, (M, N) = launch.pipelined, launch.mn
        meta = pl.gemm_meta
        out += pipelined_variants(
            M, C, N, len(spec.used_layers), spec.num_groups + 1, hs[0].element_size(),
            _model(hs[0].device, hs[0], sms), sms,
            (meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]), pl.programs, pl.helpers)
    cfg = (gemm_tma.GEMM_TMA_CONFIG_INTERPRET if common.interpreting()
           else gemm_tma.GEMM_TMA_CONFIGS[0]).all_kwargs()  # the stream-K launches' config
    out += two_pass_variants(case.rows, case.features_width, case.shape.hidden, sms,
                             (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]))
    return out


def _priority(v: Variant) -> int:
    # the order variants run in, most telling first (a short lease may end the sweep early):
    # the anchors and each path's rule, the helper counts (where the path model is least
    # sure: it caps fewer helpers at one program's bytes in flight, nothing more), whole
    # tiles, then the program counts, then the two-pass GEMM's
    base, sw = split_provider(v.provider)
    if not sw and base != "dc_kernels-two-pass-nosplit":
        return 0
    if "helpers" in sw:
        return 1
    if "stream_k" in sw or base == "dc_kernels-two-pass-nosplit":
        return 2
    return 3 if "programs" in sw else 4


def variants(inputs: Inputs) -> List[Variant]:
    """The launch choices of ``inputs``' case (op ``linear``) to measure side by side, most
    telling first: the auto path and cuBLAS on our features (anchors) and each path's rule,
    the pipelined path's helper programs around the rule's, whole tiles (both paths), the
    pipelined path's stream-K programs around the rule's, the two-pass GEMM's stream K on
    fewer programs (:func:`pipelined_variants`, :func:`two_pass_variants`). Off CUDA the same
    list from the interpreter's configs and SMs (the tests)."""
    from dc_kernels.ops import common
    device = inputs.hidden_states[0].device
    sms = _sms(device)
    out = [Variant("dc_kernels", "the auto path (the rule's choice)"),
           Variant("dc_kernels+cublas", "our features, then cuBLAS (torch.addmm) and GELU")]
    if device.type != "cuda" and not common.interpreting():
        return out  # no Triton launch can be prepared here
    out += _launch_choices(inputs, sms)
    out.sort(key=_priority)  # (stable: each group in its own order)
    names = [v.provider for v in out]
    assert len(set(names)) == len(names), names  # (a variant is a row name)
    return out


# --------------------------------------------------------------------------- the run
def _merged(results: Sequence[RunResult]) -> RunResult:
    # one result of the cases' runs: the first's machine and ceilings (each case's own
    # ceilings are in the JSON), every row, skip and failure
    first = results[0]
    return replace(first, rows=[r for x in results for r in x.rows],
                   skipped=[s for x in results for s in x.skipped],
                   failures=[f for x in results for f in x.failures],
                   elapsed_s=sum(x.elapsed_s for x in results))


def _us(ms: Optional[float]) -> str:
    return "-" if ms is None else f"{ms * 1e3:.1f}"


def sweep_markdown(cases: Sequence[Tuple[str, int, List[Variant]]], rows: Sequence[Row]
                   ) -> str:
    """The sweep's section: per case, every variant's measured median (us, with p20-p80),
    its ratio to the rule's choice of its path (the auto path for the anchors) and the
    model's view of it (estimates), the fastest measured variant first; then which variant
    measured fastest against the auto path."""
    by = {(r.shape, r.images, r.provider): r for r in rows}
    lines = ["## The sweep: launch choices measured side by side", "",
             "Measured: median of `do_bench` (us, L2 flushed between calls), each output "
             "checked against the reference first. *model* columns are ESTIMATES: the path "
             "model's replay (`path.pipelined_stream_k_replays`, launch included) and the "
             "busiest program's K-step equivalents (`schedule.stream_k_partials`, 1 = one "
             "128 x 256 x 64 step).", ""]
    for shape, images, vs in cases:
        dtypes = sorted({r.dtype for r in rows if (r.shape, r.images) == (shape, images)})
        lines += [f"### {shape}, {images} image{'s' if images > 1 else ''} (linear"
                  + "".join(f", {d}" for d in dtypes) + ")", "",
                  "| variant | what | measured us | p20-p80 us | / the rule's | model us "
                  "(est.) | model steps (est.) |", "|---|---|---|---|---|---|---|"]
        base = {_PIPE: by.get((shape, images, _PIPE)), _TWO: by.get((shape, images, _TWO))}
        auto = by.get((shape, images, "dc_kernels"))

        def ref_of(v: Variant) -> Optional[Row]:
            b = split_provider(v.provider)[0]
            return base.get("dc_kernels-two-pass" if b.startswith(_TWO) else b, auto)

        measured = [(by.get((shape, images, v.provider)), v) for v in vs]
        order = sorted(measured, key=lambda rv: (rv[0] is None,
                                                 rv[0].median_ms if rv[0] else 0.0))
        for r, v in order:
            ref = ref_of(v)
            ratio = f"{r.median_ms / ref.median_ms:.3f}" if r and ref else "-"
            lines.append(
                f"| `{v.provider}` | {v.what} | {_us(r.median_ms) if r else 'not run'} | "
                f"{f'{_us(r.p20_ms)}-{_us(r.p80_ms)}' if r else '-'} | {ratio} | "
                f"{'-' if v.model_s is None else f'{v.model_s * 1e6:.1f}'} | "
                f"{'-' if v.model_steps is None else f'{v.model_steps:.1f}'} |")
        ran = [(r, v) for r, v in measured if r is not None and v.provider != "dc_kernels"]
        if ran and auto is not None:
            r, v = min(ran, key=lambda rv: rv[0].median_ms)
            lines += ["", f"Fastest measured: `{v.provider}` {_us(r.median_ms)} us, "
                          f"{auto.median_ms / r.median_ms:.3f}x the auto path's "
                          f"{_us(auto.median_ms)} us ({auto.note})."]
        modelled = [(r, v) for r, v in ran if v.model_s is not None]
        if len(modelled) > 1:
            best_m = min(modelled, key=lambda rv: rv[1].model_s)[1]
            best_r = min(modelled, key=lambda rv: rv[0].median_ms)[1]
            lines.append(f"Among the replayed variants the model's fastest is "
                         f"`{best_m.provider}`, the measured fastest `{best_r.provider}`.")
        lines.append("")
    return "\n".join(lines)


class _SweepReports:
    """The sweep's ``.md`` and ``.json``, rewritten whole after every row (what the bundle's
    watchdog writes before it ends the process: ``notes`` and ``write()``)."""

    def __init__(self, folder: str, machine: dict):
        self.folder, self.machine = folder, machine
        self.cases: List[Tuple[str, int, List[Variant]]] = []
        self.results: List[RunResult] = []
        self.current: Optional[RunResult] = None
        self.notes: List[str] = []
        self.lock = threading.Lock()
        stem = os.path.join(folder, f"{machine['date']}-{slug(machine['device_name'])}-sweep")
        self.paths = [stem + ".md", stem + ".json"]

    def write(self, complete: bool = False) -> None:
        with self.lock:
            results = self.results + ([self.current] if self.current is not None else [])
            notes = list(self.notes) + ([] if complete else [
                "written while the sweep was still running: the variants marked not run had "
                "not run yet"])
            title = f"dc_kernels sweep: {self.machine['device_name']}, {self.machine['date']}"
            if results:
                result = _merged(results)
                md = markdown_report(result, title, [sweep_markdown(self.cases, result.rows)]
                                     + ([self._notes_md(notes)] if notes else []))
            else:
                result = None
                md = "\n".join([f"# {title}", "", "No variant was measured.", "",
                                 self._notes_md(notes)]) + "\n"
            extra = {"sweep": True, "complete": complete, "notes": notes,
                     "variants": [dict(shape=s, images=i, variants=[asdict(v) for v in vs])
                                  for s, i, vs in self.cases],
                     "ceilings_per_case": [x.ceilings.as_dict() for x in results]}
            os.makedirs(self.folder, exist_ok=True)
            md_path, js_path = self.paths
            write_text(md_path + ".tmp", md)
            if result is not None:
                write_json(js_path + ".tmp", result, extra)
            else:
                write_text(js_path + ".tmp", json.dumps(dict(machine=self.machine, rows=[],
                                                             **extra), indent=2) + "\n")
            for p in self.paths:
                os.replace(p + ".tmp", p)

    @staticmethod
    def _notes_md(notes: Sequence[str]) -> str:
        return "\n".join(["## Notes", ""] + [f"- {n}" for n in notes])


def run_sweep(out_dir: Optional[str], log: Callable[[str], None], budget_s: float = 540.0,
              row_timeout_s: float = 90.0, *, device: Optional[torch.device] = None,
              dtype: torch.dtype = torch.bfloat16,
              cases: Sequence[Tuple[str, int]] = SWEEP_CASES,
              variants_of: Callable[[Inputs], List[Variant]] = variants) -> int:
    """Run every variant of ``cases`` (module docstring) within ``budget_s``; returns the
    exit code (0 all ran and passed, 1 a variant failed, 2 no CUDA, 4 not all ran in time;
    the watchdog exits with 5). ``device``, ``cases`` and ``variants_of`` are the sweep's own
    unless given (the tests run it on the CPU: an explicit ``device`` skips the CUDA check;
    there the Triton variants are listed as not run)."""
    from .bundle import RESULTS_DIR, _Watchdog
    for flag, v in (("budget_s", budget_s), ("row_timeout_s", row_timeout_s)):
        if not v > 0:
            raise ValueError(f"{flag} must be a positive number of seconds, got {v}")
    for shape, images in cases:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r} in cases; choose from {list(SHAPES)}")
        if type(images) is not int or images < 1:
            raise ValueError(f"images must be an int >= 1 in cases, got {images!r}")
    if device is None:
        if not torch.cuda.is_available():
            log("--sweep needs a CUDA GPU: torch.cuda.is_available() is False here")
            return 2
        device = torch.device("cuda")
    start = time.perf_counter()
    end = start + budget_s
    reports = _SweepReports(out_dir or RESULTS_DIR, machine_info(device))
    dog = _Watchdog(reports, row_timeout_s, end, log)
    dog.start()
    try:
        for shape, images in cases:
            if time.perf_counter() >= end:
                reports.notes.append(f"{shape}, {images} images: not run, the time budget "
                                     "was spent")
                continue
            case = Case(SHAPES[shape], images)
            inputs = make_inputs(case, dtype, device)
            vs = variants_of(inputs)
            del inputs
            reports.cases.append((shape, images, vs))
            log(f"[sweep] {shape}, {images} images: {len(vs)} variants")
            selection = Selection(shapes=[shape], images=[images], ops=["linear"],
                                  providers=[v.provider for v in vs], budget_s=0.1)

            def on_row(result: RunResult, rows: Sequence[Row]) -> None:
                reports.current = snapshot(result, rows)
                reports.write()
            try:
                result = run(selection, device, dtype, log, deadline=end, on_row=on_row,
                             on_start=dog.started_row, keep_going=True)
            except Exception as e:  # noqa: BLE001 -- the cases measured so far are kept
                reports.notes.append(f"{shape}, {images} images stopped on "
                                     f"{type(e).__name__}: {str(e)[:600]}")
                reports.current = None
                continue
            finally:
                dog.row = None
            reports.current = None
            reports.results.append(result)
            reports.write()
    finally:
        dog.stopped.set()
    reports.write(complete=True)
    log(f"[sweep] wrote {', '.join(os.path.relpath(p) for p in reports.paths)}; "
        f"{time.perf_counter() - start:.0f} s")
    failures = [f for r in reports.results for f in r.failures]
    for f in failures:
        log(f"FAILED  {f}")
    if failures or any("stopped on" in n for n in reports.notes):
        return 1
    incomplete = any("time budget" in s for r in reports.results for s in r.skipped) \
        or any("not run, the time budget" in n for n in reports.notes)
    return 4 if incomplete else 0
