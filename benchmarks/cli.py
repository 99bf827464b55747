"""``python -m benchmarks``: the command line.

Examples::

    python -m benchmarks --quick                       # CPU-friendly subset, about a minute
    python -m benchmarks --device cuda --json r.json --markdown r.md --plot r.png
    python -m benchmarks --ops linear --filter clip336-4096/16img
    python -m benchmarks --gpu-bundle                  # tests + issue-12 table + result files
    python -m benchmarks --static                      # static cost model (no GPU needed)
    python -m benchmarks --probes                      # the model's assumptions, measured (GPU)
    python -m benchmarks --sweep                       # the rule's launch choices, measured (GPU)

Exit codes: 0 success; 1 GPU bundle with a failing test or row, a sweep with a failing
variant, or a probe kernel with a wrong result; 2 bad arguments or no CUDA where CUDA is
required; 3 a provider returned a wrong result (nothing of it is timed or written); 4 GPU
bundle with nothing failed but a test phase stopped or left out for time, or a sweep whose
budget ran out before its last variant; 5 GPU bundle or sweep stopped by its watchdog (a row
past ``--row-timeout`` or the run past its budget; the files say where).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from typing import List, Optional, Sequence

import torch

from .accuracy import CorrectnessError
from .cases import DTYPES, IMAGES, OPS, QUICK_IMAGES, SHAPES
from .providers import PROVIDERS, QUICK_PROVIDERS, unavailable_reason
from .report import (LOAD_WARNING_THRESHOLD, markdown_report, plot_speedups, print_table,
                     write_json, write_text)
from .runner import Selection, plan, run
from .timing import other_load_now

__all__ = ["build_parser", "main"]

QUICK_SHAPES = ("clip336-4096",)
QUICK_OPS = ("features", "linear")
DEFAULT_SHAPES = tuple(SHAPES)


def _csv(kind: str, known: Sequence[str]):
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {kind} {bad}; choose from {list(known)}")
        return items
    return parse


def _int_csv(text: str) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"image counts must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (see the module docstring and benchmarks/README.md)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark dc_kernels against the original Dense Connector (eager and "
                    "torch.compile). Every row is checked for correctness before it is timed.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available (default)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--quick", action="store_true",
                   help="CPU-friendly subset: clip336-4096, 1 and 4 images, features and linear, "
                        "providers reference, reference+compile, dc_kernels (and the Triton "
                        "paths on CUDA)")
    p.add_argument("--shapes", type=_csv("shape", tuple(SHAPES)), default=None,
                   help=f"comma-separated, from {', '.join(SHAPES)} (default: all)")
    p.add_argument("--images", type=_int_csv, default=None,
                   help=f"comma-separated image counts (default: {','.join(map(str, IMAGES))})")
    p.add_argument("--ops", type=_csv("op", OPS), default=None,
                   help=f"comma-separated, from {', '.join(OPS)} (default: all)")
    p.add_argument("--providers", type=_csv("provider", PROVIDERS), default=None,
                   help=f"comma-separated, from {', '.join(PROVIDERS)} (default: all that run "
                        "on the device)")
    p.add_argument("--filter", default=None, metavar="SUBSTR",
                   help="keep rows whose name op/shape/<n>img/provider contains SUBSTR")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time per measurement (CPU sampling; do_bench rep on CUDA). Default: "
                        "0.1 on cuda, 1.0 on cpu, 0.5 with --quick on cpu")
    p.add_argument("--busy-cores", type=int, default=0, metavar="N",
                   help="CPU: run N busy-loop processes (each pinned to one of the last N "
                        "cores) alongside the whole run, to measure under a loaded machine; "
                        "the report says so (default 0)")
    p.add_argument("--json", metavar="PATH", help="write every row field as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write a markdown report")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of speedup vs images "
                                                  "(needs matplotlib)")
    p.add_argument("--gpu-bundle", action="store_true",
                   help="CUDA only, within --bundle-budget: the GPU-critical tests, the "
                        "issue-12 table, the rest of the tests; check the targets, write "
                        "<date>-<card>.md/.json under benchmarks/results (or --out) after "
                        "every row")
    p.add_argument("--static", action="store_true",
                   help="no GPU needed: build every benchmark kernel as the JIT specializes it "
                        "for sm_90 and sm_80, estimate GPU times from the SASS (static cost "
                        "model), write <date>-static-sm<arch>.{md,json} under "
                        "benchmarks/results (or --out) and the path model's calibration")
    p.add_argument("--constants", metavar="JSON", default=None,
                   help="--static: estimate with the constants a GPU run measured (a --probes "
                        "or --gpu-bundle JSON): only its card's architecture, written as "
                        "<date>-static-<card>-measured-constants.{md,json}, no calibration")
    p.add_argument("--host", action="store_true",
                   help="host overhead per call of dense_connector_features, "
                        "dense_connector_linear and DenseConnector.forward with the Triton "
                        "launches stubbed, beside a tiny F.linear (CPU; writes "
                        "<date>-host.{md,json} under benchmarks/results or --out)")
    p.add_argument("--probes", action="store_true",
                   help="CUDA only: measure the static cost model's assumptions (SM clock, "
                        "tensor step, launch, DRAM latency, L2, the stream-K partial tile; "
                        "benchmarks/probes.py), write <date>-<card>-probes.{md,json} under "
                        "benchmarks/results (or --out); the GPU bundle runs them too")
    p.add_argument("--sweep", action="store_true",
                   help="CUDA only, within --sweep-budget: the path rule's launch choices "
                        "(stream-K programs, helper programs, whole tiles) measured side by "
                        "side beside the model's estimates at 1 and 16 images "
                        "(benchmarks/sweep.py); writes <date>-<card>-sweep.{md,json} under "
                        "benchmarks/results (or --out) after every row")
    p.add_argument("--sweep-budget", type=float, default=540.0, metavar="SECONDS",
                   help="--sweep: the whole run's time (default 540: a 600 s device call); "
                        "no row starts after it")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="--gpu-bundle / --sweep / --static / --host / --probes: folder for "
                        "the result files")
    p.add_argument("--test-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="--gpu-bundle: stop each test phase after this long at the most "
                        "(default 300)")
    p.add_argument("--bundle-budget", type=float, default=540.0, metavar="SECONDS",
                   help="--gpu-bundle: the whole run's time (default 540: a 600 s device "
                        "call with room to write); the first tests take at most 30%%, no "
                        "table row starts after 80%%, the rest of the suite gets what is left")
    p.add_argument("--row-timeout", type=float, default=None, metavar="SECONDS",
                   help="--gpu-bundle / --sweep: a row running longer ends the run (exit "
                        "5) after writing what it measured (default 240 for the bundle, "
                        "whose rows compile torch.compile's; 90 for the sweep)")
    return p


@contextlib.contextmanager
def busy_loops(n: int, log=lambda s: None):
    """``n`` processes spinning in ``while True: pass``, each pinned to one of the last ``n``
    cores, for the duration of the block (killed by their ids afterwards)."""
    procs = []
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    try:
        for k in range(n):
            core = cores[-1 - k] if len(cores) > k else None

            def pin(core=core):
                if core is not None:
                    os.sched_setaffinity(0, {core})
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                          preexec_fn=pin))
        if procs:
            log(f"{n} busy-loop process(es) running on core(s) "
                f"{[cores[-1 - k] for k in range(n)] if cores else '?'} (--busy-cores)")
            time.sleep(0.5)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _resolve_device(name: str) -> Optional[torch.device]:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        return None
    return torch.device(name)


def _selection(args, device: torch.device) -> Selection:
    quick = args.quick
    providers = args.providers
    if providers is None:
        pool = QUICK_PROVIDERS if quick and device.type != "cuda" else PROVIDERS
        # the providers that run on this device for at least one op
        providers = [p for p in pool if any(unavailable_reason(p, op, device) is None
                                            for op in OPS)]
    budget = args.budget
    if budget is None:
        budget = 0.1 if device.type == "cuda" else (0.5 if quick else 1.0)
    return Selection(
        shapes=args.shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES),
        images=args.images or (QUICK_IMAGES if quick else IMAGES),
        ops=args.ops or (QUICK_OPS if quick else OPS),
        providers=providers, filter=args.filter, budget_s=budget)


def _run_host(args) -> int:
    import datetime
    import platform
    import triton
    from .host import host_markdown, measure_host
    from .machine import machine_info
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        _log("--host stubs the compiled launches: unset TRITON_INTERPRET")
        return 2
    res = measure_host(args.budget or 1.0)
    info = machine_info(torch.device("cpu"))
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(),
                machine=info.get("device_name", "cpu"))
    md = host_markdown(res, meta)
    print(md)
    _write_pair(args, f"{meta['date']}-host", md, dict(meta=meta, results=res))
    return 0


def _results_dir(args) -> str:
    # --out, or the committed results folder
    from .bundle import RESULTS_DIR
    return args.out or RESULTS_DIR


def _write_pair(args, name: str, md: str, data: dict) -> str:
    # <results>/<name>.md and .json; returns their stem
    import json
    stem = os.path.join(_results_dir(args), name)
    write_text(stem + ".md", md)
    write_text(stem + ".json", json.dumps(data, indent=2) + "\n")
    _log(f"written {stem}.md and {stem}.json")
    return stem


def _run_probes(args) -> int:
    from .bundle import card_of_machine
    from .machine import machine_info, slug
    from .probes import probes_markdown, run_probes
    if not torch.cuda.is_available():
        _log("--probes times GPU kernels: torch.cuda.is_available() is False here")
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        _log("--probes times compiled kernels: unset TRITON_INTERPRET")
        return 2
    device = torch.device("cuda")
    info = machine_info(device)
    found = run_probes(device, *card_of_machine(info), budget_s=args.budget or 0.1, log=_log)
    md = "\n".join([f"# dc_kernels probes: {info['device_name']}, {info['date']}", "",
                     f"torch {info['torch']}, triton {info['triton']}.", "",
                     probes_markdown(found)]) + "\n"
    print(md)
    _write_pair(args, f"{info['date']}-{slug(info['device_name'])}-probes", md,
                dict(machine=info, probes=[r.as_dict() for r in found]))
    for r in found:
        if r.status != "ok":
            _log(f"PROBE {r.status.upper()}: {r.name}: {r.detail}")
    return 1 if any(r.status == "wrong" for r in found) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, run, print the table; see the module docstring for exit codes."""
    args = build_parser().parse_args(argv)
    if args.gpu_bundle:
        from .bundle import check_bundle_times, run_bundle
        row_timeout = 240.0 if args.row_timeout is None else args.row_timeout
        try:
            check_bundle_times(args.test_timeout, args.bundle_budget, row_timeout)
        except ValueError as e:
            _log(str(e))
            return 2
        return run_bundle(args.out, args.test_timeout, _log, budget_s=args.bundle_budget,
                          row_timeout_s=row_timeout)
    if args.constants and not args.static:
        _log("--constants goes with --static (it re-estimates the static model)")
        return 2
    if args.sweep:
        from .sweep import run_sweep
        row_timeout = 90.0 if args.row_timeout is None else args.row_timeout
        for flag, v in (("--sweep-budget", args.sweep_budget), ("--row-timeout", row_timeout)):
            if not v > 0:
                _log(f"{flag} must be a positive number of seconds, got {v}")
                return 2
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            _log("--sweep times compiled kernels: unset TRITON_INTERPRET")
            return 2
        return run_sweep(args.out, _log, budget_s=args.sweep_budget, row_timeout_s=row_timeout)
    if args.host:
        return _run_host(args)
    if args.probes:
        return _run_probes(args)
    if args.static:
        from .static import run_static
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            _log("--static builds the real kernels: unset TRITON_INTERPRET")
            return 2
        out = _results_dir(args)
        if args.constants and not os.path.isfile(args.constants):
            _log(f"--constants: no such file {args.constants!r}")
            return 2
        try:
            paths = run_static(out, log=_log, constants=args.constants)
        except ValueError as e:  # a constants file without probes, or of an unknown card
            _log(str(e))
            return 2
        for path in paths:
            _log(f"written {path}")
        return 0
    device = _resolve_device(args.device)
    if device is None:
        _log("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
        return 2
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    selection = _selection(args, device)
    if not plan(selection, device)[0]:
        _log("nothing to run: the selection and --filter leave no row (row names look like "
             "linear/clip336-4096/16img/dc_kernels)")
        return 2
    if args.busy_cores < 0 or args.busy_cores > (os.cpu_count() or 1):
        _log(f"--busy-cores must be between 0 and {os.cpu_count()}, got {args.busy_cores}")
        return 2
    busy = other_load_now() if device.type == "cpu" else None
    if busy is not None and busy > LOAD_WARNING_THRESHOLD:
        _log("!" * 78)
        _log(f"WARNING: other processes are using {100 * busy:.0f}% of the CPU right now: "
             "the times will be contended (each row records the load; the report says it)")
        _log("!" * 78)
    try:
        with busy_loops(args.busy_cores, _log):
            result = run(selection, device, DTYPES[dtype_name], _log)
        result.selection["busy_cores"] = args.busy_cores
    except CorrectnessError as e:
        _log("=" * 78)
        _log(f"CORRECTNESS FAILURE: {e}")
        _log("A provider returned a wrong result; its time is not reported. Nothing written.")
        _log("=" * 78)
        return 3
    print_table(result, sys.stdout)
    title = f"dc_kernels benchmark: {result.machine['device_name']}, {result.dtype}" + \
        (" (--quick)" if args.quick else "")
    if args.markdown:
        write_text(args.markdown, markdown_report(result, title))
        _log(f"markdown written to {args.markdown}")
    if args.json:
        write_json(args.json, result, {"quick": bool(args.quick)})
        _log(f"JSON written to {args.json}")
    if args.plot:
        _log(plot_speedups(result, args.plot))
    return 0
