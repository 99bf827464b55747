"""The example scripts run as a user runs them: a fresh interpreter, exit status, printed output."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script, *args, timeout=300):
    env = dict(os.environ)
    env.pop("DC_KERNELS_BACKEND", None)
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _max_rel_error(stdout):
    m = re.search(r"max_rel_error=(\S+) tol=(\S+)", stdout)
    assert m, f"no max_rel_error line in:\n{stdout}"
    return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("args,tol", [
    # fp32: the original and dc_kernels both accumulate in fp32 and feed the same Linears:
    # a few fp32 roundings of outputs of magnitude ~1.
    ((), 1e-5),
    # bf16: the original rounds group sums and means in bf16, dc_kernels once; each Linear's
    # output is rounded to bf16 on both sides: a few bf16 ulps (2^-8) of the largest output.
    (("--dtype", "bfloat16", "--connector", "sti", "--batch", "3"), 6e-2),
], ids=["fp32-dci", "bf16-sti"])
def test_dense_connector_demo(args, tol):
    proc = _run("dense_connector_demo.py", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    err, printed_tol = _max_rel_error(out)
    assert err <= tol and printed_tol <= tol
    # the checkpoint went through the original's key format and the printed shapes are right
    assert "loaded from model.mm_projector.*" in out
    assert "['0.bias', '0.weight', '2.bias', '2.weight']" in out
    tokens = 49 if "sti" not in args else 49 + 2 * (49 // 8)
    batch = 4 if "--batch" not in args else int(args[args.index("--batch") + 1])
    assert f"image tokens (output): ({batch}, {tokens}, 128)" in out
    assert re.search(r"time \(best of 3\): original [\d.]+ ms, streaming [\d.]+ ms", out)


def test_dense_connector_demo_fails_loudly_above_tolerance():
    # the script's own check is live: an impossible tolerance makes it exit 1
    proc = _run("dense_connector_demo.py", "--dtype", "bfloat16", "--tol", "-1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stderr


def test_measure_tower_memory_smoke():
    # the memory script's machinery (fresh subprocess per measurement, RSS deltas, the table)
    # on a tiny tower; the real CLIP-L/336 numbers take minutes and live in the README
    proc = _run("measure_tower_memory.py", "--tiny", "--batches", "3", "--modes", "streaming",
                "collected")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the default agrees with the README's table: MALLOC_MMAP_THRESHOLD_ 128 KiB
    assert "peak RSS (ru_maxrss) delta in MiB (peak reset by clear_refs: True; " \
        "MALLOC_MMAP_THRESHOLD_=131072)" in proc.stdout
    assert "| images | streaming | collected | hidden states (25 layers) |" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 3 |")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert all(float(c) >= 0 for c in cells[1:]), rows[0]
