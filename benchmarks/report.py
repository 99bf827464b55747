"""Presenting a :class:`benchmarks.runner.RunResult`: stdout table, markdown, JSON, plot.

Every output shows the same columns (:data:`COLUMNS`); the JSON holds every field of every row
plus the machine, ceilings and methods.
"""

from __future__ import annotations

import json
import os
from typing import Callable, List, Optional, Sequence, TextIO, Tuple

from .runner import Row, RunResult

__all__ = ["COLUMNS", "table_cells", "markdown_table", "header_lines", "markdown_report",
           "write_text", "write_json", "print_table", "plot_speedups"]


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


def markdown_report(result: RunResult, title: str, sections: Sequence[str] = ()) -> str:
    """A complete markdown document: title, header lines, extra sections, table, skips."""
    parts = [f"# {title}", "", *header_lines(result), ""]
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
    """The result (every row field, machine, ceilings, methods) plus ``extra`` as JSON."""
    data = result.as_dict()
    if extra:
        data.update(extra)
    write_text(path, json.dumps(data, indent=2) + "\n")


def print_table(result: RunResult, stream: TextIO) -> None:
    """The table on ``stream``: a rich table when rich is installed, else markdown."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        stream.write("\n".join(header_lines(result)) + "\n\n" + markdown_table(result.rows)
                     + "\n")
        return
    headers, cells = table_cells(result.rows)
    table = Table(title=f"{result.machine['device_name']} - {result.dtype}")
    for h in headers:
        table.add_column(h, justify="left" if h in ("provider", "op", "shape", "note")
                         else "right")
    for c in cells:
        table.add_row(*c)
    console = Console(file=stream, width=220)
    for line in header_lines(result):
        console.print(line, markup=False, highlight=False)
    console.print(table)


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
