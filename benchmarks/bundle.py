"""The GPU bundle: one command that, on a CUDA machine, produces the committed evidence.

Sized for a short lease (a drawn GPU machine gives a task ~15 minutes of device time, its
start included): everything runs inside ``budget_s`` (default 540 s), the most telling parts
first, and the result files are rewritten after every row, so a run stopped at any point (a
timeout, a hang, a crash) leaves what it measured.

1. the GPU-critical tests first (:data:`FIRST_TESTS`: CUDA graphs, the kernels, the first
   layer's paths, the direct launches) with compiled kernels (no ``TRITON_INTERPRET``), in
   parallel where pytest-xdist is installed and each test bounded where pytest-timeout is;
2. the issue-12 table (:data:`BUNDLE_SELECTION`): CLIP-L/336 and SigLIP-384 -> 4096, bf16,
   1, 16 and 64 images, ops ``features`` and ``linear``, every provider, the copy bandwidth
   and matmul peak measured in the same run; cases in :data:`BUNDLE_ORDER` (first-layer rows
   at 1 and 16 images first), no row started after the table's share of the budget; a
   provider that fails (wrong result, error) is recorded and the others go on;
3. the probes of the static model's assumptions (:mod:`benchmarks.probes`: SM clock, tensor
   step, launch, DRAM latency, L2, the stream-K partial tile), CUDA only, when at least
   :data:`PROBES_MIN_LEFT_S` of the budget is left;
4. the rest of the test suite with the time left (:data:`BUNDLE_IGNORED_TESTS` excluded: CPU
   work that CI does, the sm_90/sm_80 builds and the distributed tests' CPU ranks);
5. the issue-12 target checks (PASS / FAIL / MISSING each) and the measured-vs-estimated
   table, in ``<out>/<date>-<card-slug>.md`` and ``.json`` (card, torch, triton, python, date,
   each test phase's summary, the table, the checks).

A watchdog ends the process (exit 5) when one row runs past ``row_timeout_s`` or the whole
run past its budget by half a minute, after writing the files with a note naming the row: a
kernel that never finishes (a spin on a flag that is never set) costs one row's timeout, not
the lease. It refuses to run without CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .cases import Case, SHAPES
from .costs import floor_cost, floor_seconds
from .machine import machine_info, slug
from .providers import PROVIDERS
from .report import markdown_report, print_table, write_json, write_text
from .runner import Row, RunResult, Selection, run, snapshot

__all__ = ["BUNDLE_SELECTION", "BUNDLE_ORDER", "FIRST_TESTS", "ISSUE3_BYTES_PER_S",
           "ISSUE3_FLOP_PER_S", "TargetCheck", "run_test_suite", "target_checks", "run_bundle",
           "check_bundle_times", "PROBES_MIN_LEFT_S",
           "REPO_ROOT", "RESULTS_DIR"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")

SHAPE = "clip336-4096"
#: The table's cases, most telling first: the issue-12 first-layer rows at 1 and 16 images
#: (where the path rule's choices differ most), the features target (16 images), then 64
#: images and the remaining features rows
BUNDLE_ORDER = ((SHAPE, 1, "linear"), (SHAPE, 16, "linear"),
                ("siglip384-4096", 1, "linear"), ("siglip384-4096", 16, "linear"),
                (SHAPE, 16, "features"), (SHAPE, 1, "features"),
                (SHAPE, 64, "linear"), ("siglip384-4096", 64, "linear"),
                ("siglip384-4096", 16, "features"), ("siglip384-4096", 1, "features"),
                (SHAPE, 64, "features"), ("siglip384-4096", 64, "features"))
BUNDLE_SELECTION = Selection(shapes=[SHAPE, "siglip384-4096"], images=[1, 16, 64],
                             ops=["features", "linear"], providers=list(PROVIDERS),
                             budget_s=0.1, order=BUNDLE_ORDER)
#: The tests run before the table: compiled kernels, CUDA graphs, the binder-free launches
#: (the cross-program protocols of the pipelined and stream-K GEMMs that no CPU run checks)
FIRST_TESTS = ("tests/test_cuda_graphs.py", "tests/test_triton_kernels.py",
               "tests/test_first_layer.py", "tests/test_direct_launch.py")
#: Never in the bundle, CPU work that CI runs: the ahead-of-time builds, and the distributed
#: tests, whose ranks are CPU processes with interpreted kernels (which the GPU machines'
#: triton 3.6 cannot run beside their numpy 2.5: ``common.interpreter_problem``)
BUNDLE_IGNORED_TESTS = ("tests/test_aot_compile.py", "tests/test_distributed.py")
#: Shares of ``budget_s``: the first tests stop by 30 % of it, no table row starts after 80 %
FIRST_TESTS_SHARE = 0.3
TABLE_SHARE = 0.8
#: The probes (a few seconds of kernels, their compiles included) run only with this much of
#: the budget left after the table
PROBES_MIN_LEFT_S = 60.0
#: The fixed ceilings of issue 3's floor (H100: ~3.0 TB/s copy, ~800 TFLOP/s bf16 matmul).
ISSUE3_BYTES_PER_S = 3.0e12
ISSUE3_FLOP_PER_S = 8.0e14
_DC_PROVIDERS = ("dc_kernels", "dc_kernels-fused", "dc_kernels-two-pass",
                 "dc_kernels-overlap", "dc_kernels-pipelined")


@dataclass
class TargetCheck:
    """One target: what was measured, the target, PASS / FAIL / MISSING (INFO: reported only)."""

    name: str
    target: str
    measured: str
    status: str
    detail: str = ""


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def run_test_suite(timeout_s: float, paths: Sequence[str] = ("tests",),
                   ignore: Sequence[str] = BUNDLE_IGNORED_TESTS, label: str = "suite",
                   workers: Optional[int] = None, per_test_timeout_s: float = 120.0) -> dict:
    """``pytest <paths> -q`` in a subprocess from the repository root, TRITON_INTERPRET unset,
    one autotune config per kernel (``DC_KERNELS_AUTOTUNE=0``), ``ignore`` left out, stopped
    after ``timeout_s``.

    Where pytest-xdist is installed the tests run in ``workers`` processes (default: a quarter
    of the cores, 2 to 8: compiling kernels is most of their time on a GPU), and where
    pytest-timeout is, each test is stopped after ``per_test_timeout_s`` (thread method: a
    test blocked in a kernel that never ends is reported and its worker replaced).

    Returns ``{"label", "command", "returncode", "summary", "seconds", "tail"}``; returncode
    None on a timeout.
    """
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # one autotune config per kernel: the tests check numerics on many small variants, and
    # benchmarking every config of each would not fit the bundle's time (all configs are built
    # ahead of time by tests/test_aot_compile.py)
    env["DC_KERNELS_AUTOTUNE"] = "0"
    args = list(paths) + ["-q", "-p", "no:cacheprovider", "-rfE"]
    args += [f"--ignore={p}" for p in ignore]
    if _has("xdist"):
        n = workers or max(2, min(8, (os.cpu_count() or 8) // 4))
        args += ["-n", str(n)]
    if _has("pytest_timeout"):
        args += [f"--timeout={per_test_timeout_s:.0f}", "--timeout-method=thread"]
    cmd = [sys.executable, "-m", "pytest"] + args
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                      for x in (e.stdout, e.stderr))
        code = None
    seconds = time.perf_counter() - start
    lines = [ln for ln in out.splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines)
                    if re.search(r"\b(passed|failed|error|errors|no tests ran)\b", ln)), None)
    if summary is None and lines:
        summary = lines[-1].strip()
    if code is None:
        summary = f"timed out after {timeout_s:.0f} s" + (f" (last: {summary})" if summary
                                                          else "")
    return {"label": label,
            "command": "pytest " + " ".join(args) + " (TRITON_INTERPRET unset, "
                       "DC_KERNELS_AUTOTUNE=0)",
            "returncode": code,
            "summary": _scrub(summary or "(no summary line)"), "seconds": round(seconds, 1),
            "tail": _scrub("\n".join(lines[-40:]))}


def _not_run(label: str, why: str) -> dict:
    return {"label": label, "command": "-", "returncode": None, "summary": f"not run: {why}",
            "seconds": 0.0, "tail": ""}


def _scrub(text: str) -> str:
    """Drop this machine's absolute paths from pytest output before it goes in a result file."""
    text = text.replace(REPO_ROOT + os.sep, "").replace(REPO_ROOT, ".")
    return re.sub(r"/[^\s:'\"]*/(site|dist)-packages/", "<site-packages>/", text)


def _find(rows: List[Row], op: str, images: int, provider: str) -> Optional[Row]:
    return next((r for r in rows if (r.op, r.images, r.provider) == (op, images, provider)),
                None)


def _status(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def target_checks(result: RunResult) -> List[TargetCheck]:
    """The issue-12 targets, from the bundle's rows (floors at the issue's fixed ceilings)."""
    rows, checks = result.rows, []

    def floor_ms(shape: str, images: int) -> float:
        return floor_seconds(floor_cost("linear", Case(SHAPES[shape], images), 2),
                             ISSUE3_BYTES_PER_S, ISSUE3_FLOP_PER_S) * 1e3

    def find(shape, op, images, provider):
        return next((r for r in rows if (r.shape, r.op, r.images, r.provider) ==
                     (shape, op, images, provider)), None)

    for shape in BUNDLE_SELECTION.shapes:
        for images in BUNDLE_SELECTION.images:
            dc = [r for r in (find(shape, "linear", images, p) for p in _DC_PROVIDERS) if r]
            limit = 1.3 if images == 1 else 1.15
            name = f"{shape}, {images} image(s): best dc_kernels linear time / floor"
            if not dc:
                checks.append(TargetCheck(name, f"<= {limit}x", "not measured", "MISSING"))
                continue
            best = min(dc, key=lambda r: r.median_ms)
            ratio = best.median_ms / floor_ms(shape, images)
            checks.append(TargetCheck(
                name, f"<= {limit}x of max(bytes / 3.0 TB/s, FLOPs / 800 TFLOP/s)",
                f"{ratio:.2f}x ({best.median_ms * 1e3:.1f} us)", _status(ratio <= limit),
                f"best: {best.provider}"))
            if images > 1:
                auto = find(shape, "linear", images, "dc_kernels")
                name = f"{shape}, {images} images: dc_kernels speedup vs reference+compile"
                v = auto.speedup_vs_compile if auto else None
                checks.append(TargetCheck(name, ">= 1.6x", "not measured" if v is None
                                          else f"{v:.2f}x", "MISSING" if v is None
                                          else _status(v >= 1.6), auto.note if auto else ""))
                # what the card's own floor leaves of that target: the compiled reference's
                # time over the floor at the ceilings this run measured (on an H200 the
                # compile's memory-bound features pass gains the faster DRAM, the compute-
                # bound floor does not: docs/DESIGN.md section 5.4 estimates ~1.61x)
                comp = find(shape, "linear", images, "reference+compile")
                name = (f"{shape}, {images} images: the most speedup vs reference+compile "
                        "the floor allows")
                checks.append(TargetCheck(
                    name, "reported (>= 1.6 for the target above to be reachable)",
                    "not measured" if comp is None else
                    f"{comp.median_ms / comp.floor_ms:.2f}x", "MISSING" if comp is None
                    else "INFO", "" if comp is None else
                    f"reference+compile {comp.median_ms * 1e3:.1f} us, floor at the measured "
                    f"ceilings {comp.floor_ms * 1e3:.1f} us"))

    def one_image_pair(title, target, first, second, measured, note):
        # an INFO check per bundle shape comparing two providers' 1-image first-layer rows
        for shape in BUNDLE_SELECTION.shapes:
            a = find(shape, "linear", 1, first)
            b = find(shape, "linear", 1, second)
            name = f"{shape}, 1 image: {title}"
            if a and b:
                checks.append(TargetCheck(name, target, measured(a, b), "INFO",
                                          note(a, b, shape)))
            else:
                checks.append(TargetCheck(name, "reported", "not measured", "MISSING"))

    # issue 11: the 1-image row eager and as a CUDA-graph replay (the GPU-bound time)
    one_image_pair(
        "dc_kernels eager vs CUDA-graph replay", "reported (host share = 1 - replay / eager)",
        "dc_kernels", "dc_kernels+graph",
        lambda e, g: f"eager {e.median_ms * 1e3:.1f} us, replay {g.median_ms * 1e3:.1f} us",
        lambda e, g, shape: f"replay / floor {g.median_ms / floor_ms(shape, 1):.2f}x")
    # the stream-K GEMM (chosen by an estimated rule): what it gains where it applies
    one_image_pair(
        "two-pass with vs without the GEMM's stream K",
        "reported (the rule runs stream K for CLIP's 80 and SigLIP's 96 tiles)",
        "dc_kernels-two-pass", "dc_kernels-two-pass-nosplit",
        lambda s, w: f"{s.median_ms * 1e3:.1f} vs {w.median_ms * 1e3:.1f} us",
        lambda s, w, shape: f"stream K / whole tiles {s.median_ms / w.median_ms:.3f}")

    copy = result.ceilings.copy_bytes_per_s / 1e9
    f16 = find(SHAPE, "features", 16, "dc_kernels")
    name = "features kernel (CLIP, 16 images): GB/s as % of measured copy bandwidth"
    if f16:
        pct = 100.0 * f16.gbps / copy
        checks.append(TargetCheck(name, ">= 85%", f"{pct:.0f}% ({f16.gbps:.4g} of "
                                  f"{copy:.4g} GB/s)", _status(pct >= 85)))
    else:
        checks.append(TargetCheck(name, ">= 85%", "not measured", "MISSING"))
    return checks


def latest_static(folder: str = RESULTS_DIR, arch: int = 90, card: Optional[str] = None
                  ) -> Optional[dict]:
    """The newest committed static report of ``card`` (``*-static-<card>.json``: a key of
    ``benchmarks.static.CARD_GPUS``, e.g. ``"h200"``) or, without one, of ``sm_{arch}``
    (``*-static-sm<arch>.json``), or None."""
    import glob
    import json
    paths = sorted(glob.glob(os.path.join(folder, f"*-static-{card or f'sm{arch}'}.json")))
    if not paths:
        return None
    with open(paths[-1]) as f:
        data = json.load(f)
    data["path"] = os.path.relpath(paths[-1], REPO_ROOT)
    return data


def measured_vs_estimated(result: RunResult, static: Optional[dict]) -> List[dict]:
    """Every measured row that the static model estimated (bf16 on a CUDA GPU: what it
    models): measured, estimated, ratio."""
    if not static:
        return []
    est = {r["row_name"]: r for r in static["rows"] if r.get("row_name")
           and r["dtype"] == "bf16"}
    out = []
    for r in result.rows:
        if r.device != "cuda" or r.dtype != "bfloat16":
            continue
        name = f"{r.op}/{r.shape}/{r.images}img/{r.provider}"
        if name in est and r.median_ms:
            e = est[name]["est_s"] * 1e3
            out.append(dict(row=name, measured_ms=r.median_ms, estimated_ms=e,
                            measured_over_estimated=r.median_ms / e))
    return out


def card_of_machine(machine: dict) -> tuple:
    """``(arch, card)`` of the bundle's machine (``benchmarks.machine.machine_info``): the SM
    version of its ``capability`` (90 when it has none: the static model's default card) and
    ``dc_kernels.ops.path.card_key`` of its device name (None off sm_90: the cards with their
    own calibration are sm_90 ones)."""
    from dc_kernels.ops.path import card_key, runs_tma_kernels
    major, _, minor = str(machine.get("capability") or "9.0").partition(".")
    arch = 10 * int(major) + int(minor or 0)
    return arch, (card_key(machine.get("device_name")) if runs_tma_kernels(arch) else None)


def calibration_file_for(machine: dict) -> str:
    """The calibration file the path rule reads on the bundle machine's card
    (``dc_kernels.ops.path.model_for``): the card's own, else its architecture's."""
    from dc_kernels.ops.path import calibration_file
    return calibration_file(*card_of_machine(machine))


def calibration_update(pairs: List[dict]) -> dict:
    """``measured_over_estimated`` per path (median over the measured rows of that path)."""
    import statistics
    by = {}
    for p in pairs:
        provider = p["row"].rsplit("/", 1)[1]
        path = {"dc_kernels-fused": "fused", "dc_kernels-two-pass": "two-pass",
                "dc_kernels-overlap": "overlap", "dc_kernels-pipelined": "pipelined"}.get(provider)
        if path and p["row"].startswith("linear/"):
            by.setdefault(path, []).append(p["measured_over_estimated"])
    return {k: round(statistics.median(v), 3) for k, v in by.items()}


def _checks_markdown(tests: Sequence[dict], checks: List[TargetCheck],
                     failures: Sequence[str], notes: Sequence[str]) -> str:
    lines = ["## Test suite", ""]
    for t in tests:
        lines += [f"- {t['label']}: `{t['command']}`: **{t['summary']}** ({t['seconds']} s, "
                  f"exit {t['returncode']})"]
    lines += [""]
    for t in tests:
        if t["returncode"] not in (0, 5) and t["tail"]:
            lines += [f"<details><summary>{t['label']}: last lines of the pytest output"
                      "</summary>", "", "```", t["tail"], "```", "", "</details>", ""]
    lines += ["## Targets (issue 12: CLIP-L/336 and SigLIP-384 -> 4096, bf16)", "",
              "| check | target | measured | status | detail |", "|---|---|---|---|---|"]
    lines += [f"| {c.name} | {c.target} | {c.measured} | **{c.status}** | {c.detail} |"
              for c in checks]
    if failures:
        lines += ["", "**FAILED rows (no time reported for these providers from here on):**",
                  ""] + [f"- {f}" for f in failures]
    if notes:
        lines += ["", "**The run is incomplete:**", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


class _Reports:
    """Writes the bundle's ``.md`` and ``.json`` from what is known so far, again after every
    row (atomically: a file is replaced whole), so a run stopped at any point leaves them."""

    def __init__(self, folder: str, tests: List[dict], machine: Optional[dict] = None):
        self.folder, self.tests, self.machine = folder, tests, machine
        self.result: Optional[RunResult] = None
        self.notes: List[str] = []
        self.probes: List[dict] = []  # benchmarks.probes.ProbeResult.as_dict() of each
        self.probes_md = ""  # their markdown section (or why they did not run)
        self.lock = threading.Lock()
        self.paths: List[str] = []
        self._static: Dict[tuple, Optional[dict]] = {}  # per (arch, card), read once

    def write(self, result: Optional[RunResult] = None, complete: bool = False) -> None:
        with self.lock:
            if result is not None:
                self.result = result
            if self.result is not None:
                self._write(self.result, complete)
            elif self.machine is not None:
                self._write_tests_only(complete)

    def static_for(self, machine: dict) -> Optional[dict]:
        """The static report the rows of this machine's card are compared with
        (:func:`card_of_machine`; read once per card)."""
        key = card_of_machine(machine)
        if key not in self._static:
            self._static[key] = latest_static(arch=key[0], card=key[1])
        return self._static[key]

    def _notes(self, complete: bool) -> List[str]:
        return list(self.notes) if complete else list(self.notes) + [
            "written while the bundle was still running: the rows, checks and test phases "
            "not listed had not run yet"]

    def _replace(self, machine: dict, write_md: Callable[[str], None],
                 write_js: Callable[[str], None]) -> None:
        # each file written beside its place, then moved over it whole
        stem = os.path.join(self.folder, f"{machine['date']}-{slug(machine['device_name'])}")
        self.paths = [stem + ".md", stem + ".json"]
        for path, writer in zip(self.paths, (write_md, write_js)):
            writer(path + ".tmp")
            os.replace(path + ".tmp", path)

    def _write_tests_only(self, complete: bool) -> None:
        # no table row yet (the first tests just ran, or the table failed before its first
        # row): the machine, the test phases and the notes
        m, notes = self.machine, self._notes(complete)
        md = "\n".join([f"# dc_kernels GPU bundle: {m['device_name']}, {m['date']}", "",
                         "No table row was measured.", "",
                         _checks_markdown(self.tests, [], [], notes)]
                        + ([self.probes_md] if self.probes_md else [])) + "\n"
        data = {"bundle": True, "complete": complete, "machine": m, "rows": [],
                "notes": notes, "tests": self.tests, "probes": self.probes}
        self._replace(m, lambda p: write_text(p, md),
                      lambda p: write_text(p, json.dumps(data, indent=2) + "\n"))

    def _write(self, result: RunResult, complete: bool) -> None:
        checks = target_checks(result)
        m = result.machine
        static = self.static_for(m)
        pairs = measured_vs_estimated(result, static)
        factors = calibration_update(pairs)
        cal_file = os.path.relpath(calibration_file_for(m), REPO_ROOT)
        title = f"dc_kernels GPU bundle: {m['device_name']}, {m['date']}"
        notes = self._notes(complete)
        mve = ["## Measured vs the static estimate", "",
               f"Estimates: `{static['path']}`." if static else "No static report committed.",
               "", "| row | measured us | estimated us | measured / estimated |",
               "|---|---|---|---|"]
        mve += [f"| {p['row']} | {p['measured_ms'] * 1e3:.1f} | {p['estimated_ms'] * 1e3:.1f} "
                f"| {p['measured_over_estimated']:.2f} |" for p in pairs]
        mve += ["", f"Calibration factors (median measured / estimated per path): {factors}. "
                f"Copy them into `{cal_file}` (`measured_over_estimated`, "
                "and `source`) to make the path rule use them."]
        md = markdown_report(result, title, [_checks_markdown(self.tests, checks,
                                                              result.failures, notes),
                                             "\n".join(mve)]
                             + ([self.probes_md] if self.probes_md else []))
        extra = {"bundle": True, "complete": complete, "notes": notes, "tests": self.tests,
                 "targets": [asdict(c) for c in checks], "measured_vs_estimated": pairs,
                 "calibration_factors": factors, "failures": result.failures,
                 "probes": self.probes,
                 "issue3_ceilings": {"bytes_per_s": ISSUE3_BYTES_PER_S,
                                     "flop_per_s": ISSUE3_FLOP_PER_S}}
        self._replace(m, lambda p: write_text(p, md), lambda p: write_json(p, result, extra))


class _Watchdog(threading.Thread):
    """Ends the process (exit 5) when the row in progress has run ``row_timeout_s``, or the
    whole bundle is ``grace_s`` past its ``hard_deadline``, after writing the reports with a
    note that says so."""

    def __init__(self, reports: _Reports, row_timeout_s: float, hard_deadline: float,
                 log: Callable[[str], None], grace_s: float = 30.0):
        super().__init__(daemon=True)
        self.reports, self.row_timeout_s, self.log = reports, row_timeout_s, log
        self.hard_deadline = hard_deadline + grace_s
        self.row: Optional[str] = None
        self.since = time.perf_counter()
        self.stopped = threading.Event()

    def started_row(self, name: str) -> None:
        self.row, self.since = name, time.perf_counter()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            now = time.perf_counter()
            why = None
            if self.row is not None and now - self.since > self.row_timeout_s:
                why = (f"row {self.row} did not finish within {self.row_timeout_s:.0f} s "
                       "(a kernel that never ends?); the bundle was stopped there")
            elif now > self.hard_deadline:
                why = (f"the bundle ran past its budget (row in progress: {self.row}); "
                       "stopped there")
            if why:
                self.log(f"[bundle] WATCHDOG: {why}")
                self.reports.notes.append(why)
                try:
                    self.reports.write()
                finally:
                    os._exit(5)


def _run_probes(reports: _Reports, device: torch.device, end: float, dog: _Watchdog,
                log: Callable[[str], None]) -> bool:
    # the probes (CUDA only) into the reports, rewritten after each result, under the
    # watchdog's row timeout; True when a probe kernel computed a wrong result (a probe that
    # could not run is a note)
    from .probes import ProbeResult, probes_markdown, run_probes
    left = end - time.perf_counter()
    if device.type != "cuda":
        reports.probes_md = ("## The static model's assumptions, measured (probes)\n\n"
                             f"Not run: the probes time GPU kernels ({device.type} here).")
        return False
    if left < PROBES_MIN_LEFT_S:
        reports.notes.append(f"the probes of the static model were not run: {left:.0f} s "
                             f"left, they start with {PROBES_MIN_LEFT_S:.0f} s")
        return False
    log("[bundle] the probes of the static model's assumptions ...")
    found: List[ProbeResult] = []

    def on_result(r: ProbeResult) -> None:
        found.append(r)
        reports.probes = [x.as_dict() for x in found]
        reports.probes_md = probes_markdown(found)
        reports.write()
        m = "-" if r.measured is None else f"{r.measured:.3g}"
        log(f"[probes] {r.name}: {m} {r.unit} (assumed {r.assumed}; {r.status})")

    dog.started_row("probes")
    arch, card = card_of_machine(reports.machine or machine_info(device))
    try:
        run_probes(device, arch, card, log=log, on_result=on_result)
    except ValueError as e:  # the interpreter is on: no compiled kernel to time
        reports.notes.append(f"the probes of the static model were not run: {e}")
    finally:
        dog.row = None
    for r in found:
        if r.status != "ok":
            reports.notes.append(f"probe {r.name}: {r.detail}")
    return any(r.status == "wrong" for r in found)


def check_bundle_times(test_timeout_s: float, budget_s: float, row_timeout_s: float) -> None:
    """Raise ValueError unless the bundle's test timeout, budget and row timeout are positive
    numbers of seconds (the CLI's ``--test-timeout``, ``--bundle-budget``, ``--row-timeout``)."""
    for flag, v in (("--test-timeout", test_timeout_s), ("--bundle-budget", budget_s),
                    ("--row-timeout", row_timeout_s)):
        if not v > 0:
            raise ValueError(f"{flag} must be a positive number of seconds, got {v}")


def run_bundle(out_dir: Optional[str], test_timeout_s: float,
               log: Callable[[str], None], budget_s: float = 540.0,
               row_timeout_s: float = 240.0, *, device: Optional[torch.device] = None,
               dtype: torch.dtype = torch.bfloat16, selection: Selection = BUNDLE_SELECTION,
               first_tests: Sequence[str] = FIRST_TESTS,
               rest_tests: Sequence[str] = ("tests",)) -> int:
    """Run the bundle within ``budget_s`` seconds (module docstring); returns the exit code:
    0 when both test phases ran to the end and passed and no row failed, 1 when a test, a
    row or a probe (a wrong result) failed, 4 when nothing failed but a test phase was stopped or left out for time (the
    report's notes say what), 2 without CUDA; the watchdog exits with 5.

    ``device``, ``dtype``, ``selection`` and the test paths are the bundle's own unless given
    (the test suite runs the whole bundle on the CPU with a small selection: an explicit
    ``device`` skips the CUDA check).
    """
    check_bundle_times(test_timeout_s, budget_s, row_timeout_s)
    if device is None:
        if not torch.cuda.is_available():
            log("--gpu-bundle needs a CUDA GPU: torch.cuda.is_available() is False here "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). Run it on "
                "a GPU machine; on CPU use `python -m benchmarks --quick`.")
            return 2
        device = torch.device("cuda")
    start = time.perf_counter()
    end = start + budget_s
    folder = out_dir or RESULTS_DIR
    tests: List[dict] = []
    reports = _Reports(folder, tests, machine_info(device))

    # 1. the GPU-critical tests
    first_s = min(test_timeout_s, FIRST_TESTS_SHARE * budget_s)
    log(f"[bundle] the GPU-critical tests {list(first_tests)} (timeout {first_s:.0f} s) ...")
    tests.append(run_test_suite(first_s, first_tests, label="GPU-critical tests"))
    log(f"[bundle] {tests[-1]['summary']} ({tests[-1]['seconds']} s)")
    reports.write()

    # 2. the table, rewritten after every row
    table_end = start + TABLE_SHARE * budget_s
    log(f"[bundle] the issue-12 table (no row starts after {table_end - start:.0f} s) ...")
    dog = _Watchdog(reports, row_timeout_s, end, log)
    dog.start()
    result: Optional[RunResult] = None
    try:
        result = run(selection, device, dtype, log, deadline=table_end,
                     on_row=lambda r, rows: reports.write(snapshot(r, rows)),
                     on_start=dog.started_row, keep_going=True)
    except Exception as e:  # noqa: BLE001 -- what was measured is kept, the tests still run
        error = f"the table stopped on {type(e).__name__}: {str(e)[:600]}"
        log(f"[bundle] {error}")
        reports.notes.append(error)
    dog.row = None
    if result is not None:
        reports.write(result)
        if any("time budget" in s for s in result.skipped):
            reports.notes.append("the table's share of the budget ran out: the rows listed "
                                 "under 'Not run' as such were not measured")

    # 3. the probes of the static model's assumptions
    probes_failed = _run_probes(reports, device, end, dog, log)

    # 4. the rest of the test suite, with the time left
    left = end - time.perf_counter() - 10.0
    if left >= 30.0:
        log(f"[bundle] the rest of the test suite (timeout {left:.0f} s) ...")
        tests.append(run_test_suite(min(left, test_timeout_s), rest_tests,
                                    ignore=tuple(BUNDLE_IGNORED_TESTS) + tuple(first_tests),
                                    label="the rest of the suite"))
        log(f"[bundle] {tests[-1]['summary']} ({tests[-1]['seconds']} s)")
    else:
        tests.append(_not_run("the rest of the suite", f"{max(left, 0):.0f} s left"))
    for t in tests:
        if t["returncode"] is None:
            reports.notes.append(f"{t['label']}: {t['summary']}")
    dog.stopped.set()
    reports.write(complete=True)

    if reports.result is not None:  # the last snapshot, if the table stopped on an error
        print_table(reports.result, sys.stdout)
        for c in target_checks(reports.result):
            print(f"{c.status:7s} {c.name}: {c.measured} (target {c.target})")
        for f in reports.result.failures:
            print(f"FAILED  {f}")
    for n in reports.notes:
        print(f"NOTE    {n}")
    log("[bundle] tests: " + "; ".join(f"{t['label']}: {t['summary']}" for t in tests)
        + f"; wrote {', '.join(os.path.relpath(p) for p in reports.paths)}; "
        f"{time.perf_counter() - start:.0f} s in all")
    failed = result is None or result.failures or probes_failed
    if failed or any(t["returncode"] not in (0, None) for t in tests):
        return 1
    return 0 if all(t["returncode"] == 0 for t in tests) else 4
