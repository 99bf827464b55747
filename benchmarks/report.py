"""Presenting a :class:`benchmarks.runner.RunResult`: stdout table, markdown, JSON, plot.

Every output shows the same columns (:data:`COLUMNS`); the JSON holds every field of every row
plus the machine, ceilings and methods.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from typing import Callable, List, Optional, Sequence, TextIO, Tuple

from .runner import Row, RunResult

__all__ = ["COLUMNS", "table_cells", "markdown_table", "header_lines", "markdown_report",
           "write_text", "write_json", "print_table", "plot_speedups", "verdict_lines",
           "load_warning", "compact_table", "LOAD_WARNING_THRESHOLD"]

#: Share of all cores used by other processes above which a run's times are called contended.
LOAD_WARNING_THRESHOLD = 0.10


def _num(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ms(x: float) -> str:
    return f"{x:.4g}" if x < 1000 else f"{x:.0f}"


def _speedup(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


#: (header, cell formatter) of the table, in order.
COLUMNS: List[Tuple[str, Callable[[Row], str]]] = [
    ("provider", lambda r: r.provider),
    ("op", lambda r: r.op),
    ("shape", lambda r: r.shape),
    ("img", lambda r: str(r.images)),
    ("M", lambda r: str(r.rows)),
    ("median ms", lambda r: _ms(r.median_ms)),
    ("p20-p80 ms", lambda r: f"{_ms(r.p20_ms)}-{_ms(r.p80_ms)}"),
    ("TFLOP/s", lambda r: _num(r.tflops, ".3g")),
    ("GB/s", lambda r: f"{r.gbps:.3g}"),
    ("% floor", lambda r: f"{r.pct_of_floor:.1f}"),
    ("peak MiB", lambda r: _num(r.peak_mib, ".1f")),
    ("max err", lambda r: f"{r.max_abs_err:.2g}"),
    ("err exact", lambda r: f"{r.max_abs_err_exact:.2g}"),
    ("rel err", lambda r: f"{r.rel_err_exact:.2g}"),
    ("vs ref", lambda r: _speedup(r.speedup_vs_reference)),
    ("vs compile", lambda r: _speedup(r.speedup_vs_compile)),
    ("note", lambda r: r.note),
]


def table_cells(rows: Sequence[Row]) -> Tuple[List[str], List[List[str]]]:
    """Headers and formatted cells of ``rows``."""
    return [h for h, _ in COLUMNS], [[f(r) for _, f in COLUMNS] for r in rows]


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub markdown table."""
    headers, cells = table_cells(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def header_lines(result: RunResult) -> List[str]:
    """Markdown bullet lines: machine, versions, date, measured ceilings, methods."""
    m, c = result.machine, result.ceilings
    lines = [
        f"- device: **{m['device_name']}** ({m['device']}"
        + (f", CUDA {m['cuda']}, {m['gpu_memory_gib']} GiB, sm_{m['capability'].replace('.', '')}"
           if m["device"] == "cuda" else "") + ")",
        f"- CPU: {m['cpu_model']}, {m['cpu_cores']} usable cores, torch threads "
        f"{m['torch_threads']}",
        f"- torch {m['torch']}, triton {m['triton']}, python {m['python']}, {m['platform']}",
        f"- date: {m['date']} ({m['time_utc']}); dtype **{result.dtype}**; run took "
        f"{result.elapsed_s:.0f} s",
        f"- measured ceilings: copy **{c.copy_bytes_per_s / 1e9:.1f} GB/s** "
        f"({c.copy_buffer_bytes >> 20} MiB buffer, read + write counted), matmul "
        f"**{c.matmul_flop_per_s / 1e12:.2f} TFLOP/s** ({c.matmul_dtype}, "
        f"{c.matmul_n}x{c.matmul_n}x{c.matmul_n})",
        "- selection: " + "; ".join(
            f"{k} {', '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
            for k, v in result.selection.items() if v is not None),
        f"- timing: {result.methods.get('timing', '')}",
        f"- peak memory: {result.methods.get('peak_memory', '')}",
        "- floor = max(floor bytes / copy bandwidth, FLOPs / matmul peak) with the ceilings "
        "above; floor bytes and FLOPs as in docs/DESIGN.md §2 (benchmarks/costs.py); "
        "'% floor' = floor / median",
        "- every row was checked before it was timed (benchmarks/accuracy.py): element-wise "
        "against the eager reference within a worst-case rounding bound, and norm-wise against "
        "the exact result (float64 features; GEMMs in fp32, or fp64 for fp32 runs). max err: "
        "largest |output - reference|; err exact: largest |output - exact|; rel err: "
        "||output - exact|| / ||exact||",
    ]
    loads = [r.other_cpu_load for r in result.rows if r.other_cpu_load is not None]
    if loads:
        lines.append(f"- CPU time used by other processes while the samples were taken: mean "
                     f"{100 * sum(loads) / len(loads):.0f}%, max {100 * max(loads):.0f}% of all "
                     "cores (per row in the JSON; above a few % the times are contended)")
    return lines


def load_warning(result: RunResult) -> Optional[str]:
    """A warning when other processes used more than :data:`LOAD_WARNING_THRESHOLD` of the
    cores while some row was timed, else None."""
    loads = [(r.other_cpu_load, r.name) for r in result.rows if r.other_cpu_load is not None]
    if not loads or max(loads)[0] <= LOAD_WARNING_THRESHOLD:
        return None
    worst, name = max(loads)
    busy = sum(1 for v, _ in loads if v > LOAD_WARNING_THRESHOLD)
    text = (f"WARNING: other processes used up to {100 * worst:.0f}% of the CPU while timing "
            f"({busy} of {len(loads)} rows above {100 * LOAD_WARNING_THRESHOLD:.0f}%, worst: "
            f"{name}). These times are contended")
    loops = result.selection.get("busy_cores") or 0
    if loops:
        return text + (f", on purpose: --busy-cores {loops} ran {loops} busy-loop process(es) "
                       "alongside.")
    return text + "; rerun on a quiet machine before quoting them."


def _x(v: float) -> str:
    return f"{v:.1f}" if v < 9.95 else f"{v:.0f}"


def _range(values: Sequence[float]) -> str:
    lo, hi = _x(min(values)), _x(max(values))
    return f"{lo}x" if lo == hi else f"{lo}-{hi}x"


def _compare(ratios: Sequence[float], better: str, worse: str, neutral: str) -> str:
    # ratios: baseline / provider; above 1 = the provider is better
    if min(ratios) >= 1:
        return f"{_range(ratios)} {better}"
    if max(ratios) < 1:
        return f"{_range([1 / r for r in ratios])} {worse}"
    return f"{_range(ratios)} {neutral}"


def verdict_lines(result: RunResult, provider: str = "dc_kernels") -> List[str]:
    """One line per op: ``provider`` against ``reference`` and ``reference+compile`` in time
    (baseline median / provider median) and peak memory (baseline peak / provider peak), as
    ranges over the cases run (shapes x images)."""
    lines = []
    for op in dict.fromkeys(r.op for r in result.rows):
        rows = [r for r in result.rows if r.op == op]
        cases = list(dict.fromkeys((r.shape, r.images) for r in rows))
        parts = []
        for base, label in (("reference", "reference"), ("reference+compile", "compile")):
            speed, mem = [], []
            for case in cases:
                mine = [r for r in rows if (r.shape, r.images) == case and r.provider == provider]
                theirs = [r for r in rows if (r.shape, r.images) == case and r.provider == base]
                if not mine or not theirs:
                    continue
                speed.append(theirs[0].median_ms / mine[0].median_ms)
                if mine[0].peak_mib and theirs[0].peak_mib is not None:
                    mem.append(theirs[0].peak_mib / mine[0].peak_mib)
            if speed:
                part = f"vs {label} " + _compare(speed, "faster", "slower", "the speed")
                if mem:
                    part += ", " + _compare(mem, "less memory", "more memory", "memory ratio")
                parts.append(part)
        images = sorted({i for _, i in cases})
        where = f"{op} ({', '.join(map(str, images))} img)"
        lines.append(f"{where}: " + ("; ".join(parts) if parts else
                                     f"no {provider} row with a baseline to compare"))
    return lines


#: (header, width, formatter) of the terminal table, one block per (op, shape, images)
_COMPACT = [
    ("provider", 19, lambda r: r.provider),
    ("median ms", 9, lambda r: _ms(r.median_ms)),
    ("peak MiB", 8, lambda r: _num(r.peak_mib, ".1f")),
    ("% floor", 7, lambda r: f"{r.pct_of_floor:.1f}"),
    ("vs ref", 6, lambda r: _speedup(r.speedup_vs_reference)),
    ("vs compile", 10, lambda r: _speedup(r.speedup_vs_compile)),
]


def compact_table(rows: Sequence[Row]) -> List[str]:
    """The rows as plain text at most 72 characters wide: one block per (op, shape, images)
    with the columns a reader compares; every other column is in the markdown and JSON."""
    out = []
    ops = list(dict.fromkeys(r.op for r in rows))
    blocks = sorted(dict.fromkeys((r.op, r.shape, r.images, r.rows) for r in rows),
                    key=lambda b: (ops.index(b[0]), b[1], b[2]))
    for op, shape, images, m in blocks:
        out.append(f"{op} | {shape} | {images} img (M={m})")
        out.append("  " + "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                                    for i, (h, w, _) in enumerate(_COMPACT)))
        for r in rows:
            if (r.op, r.shape, r.images) == (op, shape, images):
                out.append("  " + "  ".join(f(r).ljust(w) if i == 0 else f(r).rjust(w)
                                            for i, (_, w, f) in enumerate(_COMPACT)))
    return out


def markdown_report(result: RunResult, title: str, sections: Sequence[str] = ()) -> str:
    """A complete markdown document: title, header lines, load warning, verdicts, extra
    sections, table, skips."""
    parts = [f"# {title}", "", *header_lines(result), ""]
    warning = load_warning(result)
    if warning:
        parts += [f"**{warning}**", ""]
    verdicts = verdict_lines(result)
    if verdicts:
        parts += ["## Verdict", "", *[f"- {v}" for v in verdicts], ""]
    for s in sections:
        parts += [s.rstrip(), ""]
    parts += ["## Results", "", markdown_table(result.rows), ""]
    if result.skipped:
        parts += ["## Not run", "", *[f"- {s}" for s in result.skipped], ""]
    return "\n".join(parts)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path``, creating its folder."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def write_json(path: str, result: RunResult, extra: Optional[dict] = None) -> None:
    """The result (every row field, machine, ceilings, methods), the verdict lines, the load
    warning (or null) plus ``extra`` as JSON."""
    data = result.as_dict()
    data["verdicts"] = verdict_lines(result)
    data["load_warning"] = load_warning(result)
    if extra:
        data.update(extra)
    write_text(path, json.dumps(data, indent=2) + "\n")


def print_table(result: RunResult, stream: TextIO) -> None:
    """What a terminal shows: a few header lines, the load warning, the compact table (at most
    72 characters wide) and one verdict line per op. The full table (17 columns) goes to
    ``--markdown`` / ``--json``."""
    m, c = result.machine, result.ceilings
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    lines = []
    for line in (f"{m['device_name']} ({m['device']}, {m['cpu_cores']} cores, torch threads "
                 f"{m['torch_threads']}), {result.dtype}; run took {result.elapsed_s:.0f} s",
                 f"torch {m['torch']}, triton {m['triton']}; measured ceilings: copy "
                 f"{c.copy_bytes_per_s / 1e9:.1f} GB/s, matmul "
                 f"{c.matmul_flop_per_s / 1e12:.2f} TFLOP/s"):
        lines += textwrap.wrap(line, width)
    warning = load_warning(result)
    if warning:
        bar = "!" * 72
        lines += ["", bar, *textwrap.wrap(warning, 72), bar]
    lines += ["", *compact_table(result.rows), ""]
    verdicts = verdict_lines(result)
    if verdicts:
        shapes = ", ".join(dict.fromkeys(r.shape for r in result.rows))
        lines.append(f"Verdict, dc_kernels ({shapes}, {result.dtype}):")
        for v in verdicts:
            lines += textwrap.wrap(v, width, initial_indent="* ", subsequent_indent="    ")
    lines.append("Every column, the floor and the errors: --markdown PATH / --json PATH.")
    stream.write("\n".join(lines) + "\n")


def plot_speedups(result: RunResult, path: str) -> str:
    """PNG of each provider's speedup over the eager reference against images, one panel per
    (op, shape). Returns a message (what was written, or why nothing was)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    rows = [r for r in result.rows if r.speedup_vs_reference is not None
            and r.provider != "reference"]
    panels = sorted({(r.op, r.shape) for r in rows})
    if not panels:
        return "no speedup to plot (the reference provider did not run)"
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (op, shape) in zip(axes.flat, panels):
        for provider in sorted({r.provider for r in rows if (r.op, r.shape) == (op, shape)}):
            pts = sorted((r.images, r.speedup_vs_reference) for r in rows
                         if (r.op, r.shape, r.provider) == (op, shape, provider))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ticks = sorted({r.images for r in rows if (r.op, r.shape) == (op, shape)})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(f"{op} - {shape}", fontsize=9)
        ax.set_xlabel("images")
        ax.set_ylabel("speedup vs eager reference")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{result.machine['device_name']} - {result.dtype} - {result.machine['date']}",
                 fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


def write_outputs(markdown_path: Optional[str], text: str, json_path: Optional[str],
                  payload: dict) -> None:
    """A side script's result files: ``text`` to ``markdown_path`` and ``payload`` as indented
    JSON (``str`` for what JSON cannot hold) to ``json_path``; a path that is None is skipped."""
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1, default=str)
