"""The terminal output of ``python -m benchmarks``: fits a terminal, one verdict line per op, a
visible warning when other processes loaded the CPU. Fed with the rows of a committed run
(``benchmarks/results/2026-11-25-cpu-quick.json``), so the numbers are real measurements."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.ceilings import Ceilings
from benchmarks.runner import Row, RunResult

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _result(load=None, busy_cores=0) -> RunResult:
    data = json.loads((RESULTS / "2026-11-25-cpu-quick.json").read_text())
    rows = [Row(**r) for r in data["rows"]]
    if load is not None:
        rows[-1].other_cpu_load = load
    selection = dict(data["selection"], busy_cores=busy_cores)
    return RunResult(machine=data["machine"], dtype=data["dtype"],
                     ceilings=Ceilings(**data["ceilings"]), selection=selection, rows=rows,
                     elapsed_s=data["elapsed_s"])


def _printed(result) -> str:
    buf = io.StringIO()
    report.print_table(result, buf)
    return buf.getvalue()


def test_terminal_table_fits_and_says_the_verdict(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = _result()
    text = _printed(result)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    table = report.compact_table(result.rows)
    assert max(len(line) for line in table) <= 72
    assert len([line for line in table if line.startswith("  dc_kernels ")]) == \
        len({(r.op, r.shape, r.images) for r in result.rows})
    verdicts = report.verdict_lines(result)
    assert [v.split(" (")[0] for v in verdicts] == ["features", "linear"]
    assert "WARNING" not in text  # this run was quiet (<= 1% other load)


@pytest.mark.parametrize("op", ("features", "linear"))
def test_verdict_ranges_are_the_rows_ratios(op):
    result = _result()
    line = next(v for v in report.verdict_lines(result) if v.startswith(op))
    rows = [r for r in result.rows if r.op == op]
    for base, label in (("reference", "reference"), ("reference+compile", "compile")):
        ratios = []
        for images in sorted({r.images for r in rows}):
            mine = next(r for r in rows if r.images == images and r.provider == "dc_kernels")
            theirs = next(r for r in rows if r.images == images and r.provider == base)
            ratios.append(theirs.median_ms / mine.median_ms)
        m = re.search(rf"vs {re.escape(label)} ([0-9.]+)(?:-([0-9.]+))?x (faster|slower|the "
                      "speed)", line)
        assert m, line
        lo, hi = float(m.group(1)), float(m.group(2) or m.group(1))
        if m.group(3) == "slower":
            ratios = [1 / r for r in ratios]
        assert lo == pytest.approx(min(ratios), abs=0.051)
        assert hi == pytest.approx(max(ratios), abs=0.051)


def test_load_warning_is_visible():
    text = _printed(_result(load=0.4))
    assert "!!!!!!!!" in text and "WARNING: other processes used up to 40% of the CPU" in text
    assert "rerun on a quiet machine" in text
    busy = _printed(_result(load=0.5, busy_cores=1))
    assert "on purpose: --busy-cores 1" in busy
    md = report.markdown_report(_result(load=0.4), "t")
    assert "**WARNING" in md and "## Verdict" in md


def test_cli_refuses_a_bad_busy_core_count_before_running(capsys):
    # the CLI path up to the run: argument checks answer with exit code 2 and a message
    import os
    from benchmarks.cli import main
    assert main(["--quick", "--device", "cpu", "--busy-cores", str((os.cpu_count() or 1) + 1)]) == 2
    assert "--busy-cores must be between 0 and" in capsys.readouterr().err


@pytest.mark.parametrize("arch, card", [(90, None), (90, "h200"), (80, None)])
def test_committed_calibrations_are_their_static_reports_own(arch, card):
    # every constant the static model derives (benchmarks.static.calibration_from_rows) is,
    # in the committed calibration the path rule reads, what that model gives on the report
    # the calibration names as its source: no constant edited by hand or left stale
    from benchmarks import static
    from dc_kernels.ops import path
    cal = json.loads(Path(path.calibration_file(arch, card)).read_text())
    name = re.search(r"[\w.-]+-static-[\w-]+\.json", cal["source"])
    assert name, cal["source"]
    rows = json.loads((RESULTS / name.group(0)).read_text())["rows"]
    gpu = static.CARD_GPUS[card] if card else static.GPUS[arch]
    derived = static.calibration_from_rows(rows, arch, gpu=gpu)
    assert {k: cal.get(k) for k in derived} == derived
    assert ("helper_program_bytes_per_s" in derived) == (arch == 90)


def test_cpu_chunks_ab_times_every_setting_on_the_same_bits_and_restores_them(tmp_path):
    # benchmarks.cpu_chunks, the A/B of the torch path's chunk settings in one process: a
    # short real run (SCI: one-layer groups, so the smallest features), its table and JSON,
    # and the module settings it changes put back afterwards
    import os
    from benchmarks import cpu_chunks
    from dc_kernels.ops import torch_ops
    before = (os.environ.get(torch_ops.CHUNK_POOL_ENV), torch_ops.POOL_CHUNKS_PER_WORKER)
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    assert cpu_chunks.main(["--kind", "sci", "--images", "1", "--dtypes", "bf16", "--rounds",
                            "2", "--sets", "1", "--budget", "0.01", "--per-worker", "3", "1",
                            "--markdown", str(md), "--json", str(js)]) == 0
    assert (os.environ.get(torch_ops.CHUNK_POOL_ENV), torch_ops.POOL_CHUNKS_PER_WORKER) == before
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["same_bits"] is True
    assert all(rows[0][k] > 0 for k in ("pool3", "pool1", "inline"))
    table = md.read_text().splitlines()
    assert table[-1].startswith("| bf16 | 1 | ") and table[-1].endswith("| yes |")
    assert len({line.count("|") for line in table if line.startswith("|")}) == 1
    with pytest.raises(SystemExit):
        cpu_chunks.main(["--per-worker", "0"])
