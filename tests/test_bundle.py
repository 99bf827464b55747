"""The GPU bundle's orchestration, run on the CPU: the whole bundle with a small selection, the
time budget, a failing provider, the result files rewritten after every row, the watchdog.

The bundle runs only on a lent GPU machine, for minutes, so a bug in its plumbing would cost the
lease; these tests run the same code (``benchmarks.bundle.run_bundle``, ``benchmarks.runner.run``)
on the CPU with real providers and real pytest subprocesses."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from conftest import wrong_dc_kernels

from benchmarks import bundle, runner
from benchmarks.accuracy import CorrectnessError
from benchmarks.runner import Selection

CPU = torch.device("cpu")
# the smallest real cases: SCI reads 3 layers of one CLIP image; features only (no GEMM)
SMALL = Selection(shapes=["clip336-4096-sci"], images=[1, 2], ops=["features"],
                  providers=["reference", "dc_kernels"], budget_s=0.02,
                  order=[("clip336-4096-sci", 2, "features"), ("clip336-4096-sci", 1, "features")])


def _tests_file(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("def test_it():\n    " + body + "\n")
    return str(path)


def _quiet(_line):
    pass


def test_selection_order_runs_in_that_order_and_is_checked():
    tasks, _ = runner.plan(SMALL, CPU)
    assert [(c.images, op) for c, op, _ in tasks] == [(2, "features"), (1, "features")]
    assert SMALL.cases() == [("clip336-4096-sci", 2, "features"),
                             ("clip336-4096-sci", 1, "features")]
    for order, match in (([("clip336-4096-sci", 16, "features")], "not \\(shape, images, op\\)"),
                         ([("clip336-4096", 1, "features")], "not \\(shape, images, op\\)"),
                         ([("clip336-4096-sci", 1, "features")] * 2, "given twice")):
        with pytest.raises(ValueError, match=match):
            Selection(shapes=SMALL.shapes, images=[1, 2], ops=["features"],
                      order=order).validate()
    # the bundle's own order covers its selection once each
    assert sorted(bundle.BUNDLE_SELECTION.cases()) == sorted(
        (s, i, o) for s in bundle.BUNDLE_SELECTION.shapes
        for i in bundle.BUNDLE_SELECTION.images for o in bundle.BUNDLE_SELECTION.ops)
    bundle.BUNDLE_SELECTION.validate()


def test_no_row_starts_after_the_deadline():
    result = runner.run(SMALL, CPU, torch.float32, deadline=time.perf_counter())
    assert result.rows == []
    names = [s.split(":")[0] for s in result.skipped]
    assert names == ["features/clip336-4096-sci/2img/reference",
                     "features/clip336-4096-sci/2img/dc_kernels",
                     "features/clip336-4096-sci/1img/reference",
                     "features/clip336-4096-sci/1img/dc_kernels"]
    assert all("time budget" in s for s in result.skipped)


def test_a_wrong_provider_is_recorded_and_the_others_go_on(monkeypatch):
    wrong_dc_kernels(monkeypatch)
    seen = []
    result = runner.run(SMALL, CPU, torch.float32, keep_going=True,
                        on_row=lambda r, rows: seen.append(len(runner.snapshot(r, rows).rows)))
    assert [r.name for r in result.rows] == ["features/clip336-4096-sci/2img/reference",
                                             "features/clip336-4096-sci/1img/reference"]
    assert len(result.failures) == 1
    assert result.failures[0].startswith("features/clip336-4096-sci/2img/dc_kernels: "
                                         "CorrectnessError")
    assert "features/clip336-4096-sci/1img/dc_kernels: not run, the provider failed earlier" \
        in result.skipped
    assert seen == [1, 2]  # a snapshot after each measured row, the running case's included
    # without keep_going the error stops the run, the rows so far riding on it
    with pytest.raises(CorrectnessError) as e:
        runner.run(SMALL, CPU, torch.float32)
    assert [r.name for r in e.value.partial.rows] == ["features/clip336-4096-sci/2img/reference"]


def test_the_whole_bundle_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    first = _tests_file(tmp_path, "test_first.py", "assert 1 + 1 == 2")
    rest = _tests_file(tmp_path, "test_rest.py", "assert 2 * 3 == 6")
    code = bundle.run_bundle(str(out), 120.0, _quiet, budget_s=300.0, device=CPU,
                             dtype=torch.float32, selection=SMALL, first_tests=(first,),
                             rest_tests=(rest,))
    assert code == 0
    files = sorted(os.listdir(out))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md"), files
    data = json.loads((out / files[0]).read_text())
    assert data["complete"] is True and data["failures"] == [] and data["notes"] == []
    assert [t["label"] for t in data["tests"]] == ["GPU-critical tests", "the rest of the suite"]
    assert all(t["returncode"] == 0 and "1 passed" in t["summary"] for t in data["tests"])
    assert [r["name"] for r in data["rows"]] == [
        "features/clip336-4096-sci/2img/reference", "features/clip336-4096-sci/2img/dc_kernels",
        "features/clip336-4096-sci/1img/reference", "features/clip336-4096-sci/1img/dc_kernels"]
    assert all(r["median_ms"] > 0 and r["err_over_bound"] <= 1.0 for r in data["rows"])
    # the issue-12 checks are all there; the CLIP/SigLIP rows this run did not measure say so
    assert {c["status"] for c in data["targets"]} == {"MISSING"}
    # CPU fp32 rows are not compared with the static model's sm_90 bf16 estimates
    assert data["measured_vs_estimated"] == [] and data["calibration_factors"] == {}
    md = (out / files[1]).read_text()
    assert "GPU-critical tests" in md and "1 passed" in md and "MISSING" in md
    # the probes of the static model time GPU kernels: off CUDA the report says they did not run
    assert data["probes"] == [] and "Not run: the probes time GPU kernels (cpu here)" in md


def test_the_bundle_reports_a_failing_test_and_a_phase_left_out(tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = _tests_file(tmp_path, "test_first.py", "assert 1 + 1 == 3")
    rest = _tests_file(tmp_path, "test_rest.py", "assert True")
    # a 39 s budget, all of it the first phase's to take: the rest of the suite gets 30 s
    # only if 39 s - 10 s of margin is left after the first tests, never, so it is left out
    # and said to be
    monkeypatch.setattr(bundle, "FIRST_TESTS_SHARE", 1.0)
    code = bundle.run_bundle(str(out), 120.0, _quiet, budget_s=39.0, device=CPU,
                             dtype=torch.float32, selection=SMALL, first_tests=(first,),
                             rest_tests=(rest,))
    assert code == 1
    data = json.loads(next(out.glob("*.json")).read_text())
    first_phase, rest_phase = data["tests"]
    assert first_phase["returncode"] == 1 and "1 failed" in first_phase["summary"]
    assert rest_phase["summary"].startswith("not run:")
    assert any(n.startswith("the rest of the suite: not run") for n in data["notes"])
    assert "assert 1 + 1 == 3" in next(out.glob("*.md")).read_text()  # the failing tail


def test_the_watchdog_writes_what_was_measured_then_ends_the_process(tmp_path, monkeypatch):
    result = runner.run(SMALL, CPU, torch.float32,
                        deadline=None)  # a real (small) result to write
    reports = bundle._Reports(str(tmp_path), [bundle._not_run("GPU-critical tests", "test")])
    reports.write(result)
    exits = []
    done = threading.Event()

    def fake_exit(code):
        exits.append(code)
        dog.stopped.set()
        done.set()
    monkeypatch.setattr(bundle.os, "_exit", fake_exit)
    dog = bundle._Watchdog(reports, row_timeout_s=0.5, hard_deadline=time.perf_counter() + 600,
                           log=_quiet)
    dog.started_row("features/clip336-4096-sci/1img/dc_kernels")
    dog.start()
    assert done.wait(20.0), "the watchdog did not fire"
    assert exits == [5]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert len(data["rows"]) == 4
    assert any("did not finish within 0 s" in n or "did not finish within 1 s" in n
               for n in data["notes"]), data["notes"]
    assert "features/clip336-4096-sci/1img/dc_kernels did not finish" in \
        next(tmp_path.glob("*.md")).read_text()


def test_a_table_that_fails_before_its_first_row_still_leaves_the_tests(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no ceilings today")
    monkeypatch.setattr(bundle, "run", broken)
    out = tmp_path / "out"
    first = _tests_file(tmp_path, "test_first.py", "assert True")
    rest = tmp_path / "rest"
    rest.mkdir()
    _tests_file(rest, "test_rest.py", "assert True")
    _tests_file(rest, "test_first_again.py", "assert False")
    code = bundle.run_bundle(str(out), 120.0, _quiet, budget_s=300.0, device=CPU,
                             dtype=torch.float32, selection=SMALL,
                             first_tests=(first, str(rest / "test_first_again.py")),
                             rest_tests=(str(rest),))
    assert code == 1
    data = json.loads(next(out.glob("*.json")).read_text())
    assert data["complete"] is True and data["rows"] == []
    assert data["notes"] == ["the table stopped on RuntimeError: no ceilings today"]
    # the rest of the suite leaves out the first tests' files
    assert [t["summary"].split(" in ")[0] for t in data["tests"]] == ["1 failed, 1 passed",
                                                                      "1 passed"]
    assert "no ceilings today" in next(out.glob("*.md")).read_text()


@pytest.mark.parametrize("name, capability, report, calibration", [
    ("NVIDIA H200", "9.0", "-static-h200.json", "calibration-h200.json"),
    ("NVIDIA H200 NVL", "9.0", "-static-h200.json", "calibration-h200.json"),
    ("NVIDIA H100 80GB HBM3", "9.0", "-static-sm90.json", "calibration.json"),
    ("NVIDIA GH200 480GB", "9.0", "-static-sm90.json", "calibration.json"),
    ("NVIDIA A100-SXM4-80GB", "8.0", "-static-sm80.json", "calibration-sm80.json"),
    ("NVIDIA A10G", "8.6", "-static-sm80.json", "calibration-sm80.json"),
    # cards that run the portable kernels (path.TMA_MAJOR) read their model
    ("NVIDIA B200", "10.0", "-static-sm80.json", "calibration-sm80.json"),
    ("NVIDIA GeForce RTX 5090", "12.0", "-static-sm80.json", "calibration-sm80.json")])
def test_the_bundle_compares_a_card_with_its_own_estimates(tmp_path, name, capability, report,
                                                           calibration):
    # the lent machines are H200s: their rows are compared with the static model's H200
    # report (4.3 TB/s), not the H100's (3.0 TB/s), and the factors go to the H200's file
    machine = {"device_name": name, "capability": capability, "date": "2026-12-04"}
    reports = bundle._Reports(str(tmp_path), [], machine)
    static = reports.static_for(machine)
    arch = int(capability.replace(".", ""))
    if arch not in (80, 90):  # reads sm_80's calibration but has no report of its own
        assert bundle.card_of_machine(machine) == (arch, None)
    else:
        assert static is not None and static["path"].endswith(report), static and static["path"]
        assert static["gpu"]["arch"] == int(capability.replace(".", ""))
        assert reports.static_for(machine) is static  # read once per card
    assert os.path.basename(bundle.calibration_file_for(machine)) == calibration
    if report.endswith("h200.json"):
        assert static["gpu"]["dram_bytes_per_s"] == 4.3e12
        h100 = bundle.latest_static(arch=90)
        assert h100["gpu"]["dram_bytes_per_s"] == 3.0e12
        # the same shapes estimated for both cards; the memory-bound features pass is faster
        # on the H200 (by its DRAM, up to 4.3 / 3.0), no row of the H200 is slower -- except
        # where the two cards run different launches: STI's overlap picks its image chunks by
        # each card's calibration (the coarse rule), so its chunks can differ, and the finer
        # model may rank the two choices the other way (SigLIP, 64 images: 16-image chunks on
        # the H200, 738 us; 8-image chunks on the H100, 735 us): within 5 % there
        a = {r["case"]: r["est_s"] for r in h100["rows"]}
        b = {r["case"]: r["est_s"] for r in static["rows"]}
        n_a = {r["case"]: len(r["launches"]) for r in h100["rows"]}
        n_b = {r["case"]: len(r["launches"]) for r in static["rows"]}
        assert a.keys() == b.keys()
        slack = {k: 1.001 if n_a[k] == n_b[k] else 1.05 for k in a}
        assert all(b[k] <= a[k] * slack[k] for k in a), [k for k in a if b[k] > a[k] * slack[k]]
        assert all(n_a[k] == n_b[k] for k in a if "-sti-" not in k or "overlap" not in k)
        feats = "features/clip336-dci-16img-bf16"
        assert 1.25 < a[feats] / b[feats] <= 4.3 / 3.0 + 1e-9


def _row(provider, images, median_ms, floor_ms, shape="clip336-4096", speedup=None):
    fields = {f.name: 0 for f in runner.Row.__dataclass_fields__.values()}
    fields.update(name=f"linear/{shape}/{images}img/{provider}", provider=provider,
                  op="linear", shape=shape, images=images, dtype="bfloat16", device="cuda",
                  device_name="NVIDIA H200", note="", timing="", median_ms=median_ms,
                  floor_ms=floor_ms, speedup_vs_compile=speedup)
    return runner.Row(**fields)


def test_the_checks_say_what_speedup_the_floor_leaves():
    # a compute-bound floor on a card with fast DRAM: the compiled reference 1.55x the floor
    # can be beaten by at most 1.55x, which the bundle reports beside the >= 1.6x target
    from benchmarks.ceilings import Ceilings
    rows = [_row("reference+compile", 16, 0.4495, 0.29), _row("dc_kernels", 16, 0.31, 0.29,
                                                              speedup=0.4495 / 0.31),
            _row("dc_kernels", 64, 1.18, 1.16)]
    result = runner.RunResult(machine={"device_name": "NVIDIA H200", "capability": "9.0"},
                              dtype="bfloat16", ceilings=Ceilings(4.3e12, 1, 7.9e14, 1, "bf16"),
                              selection={}, rows=rows)
    checks = {c.name: c for c in bundle.target_checks(result)}
    allows = checks["clip336-4096, 16 images: the most speedup vs reference+compile the floor "
                    "allows"]
    assert (allows.status, allows.measured) == ("INFO", "1.55x")
    assert "449.5 us" in allows.detail and "290.0 us" in allows.detail
    target = checks["clip336-4096, 16 images: dc_kernels speedup vs reference+compile"]
    assert (target.status, target.measured) == ("FAIL", "1.45x")
    # where the compiled reference was not measured, both say so
    assert checks["clip336-4096, 64 images: the most speedup vs reference+compile the floor "
                  "allows"].status == "MISSING"
    assert checks["clip336-4096, 64 images: dc_kernels speedup vs reference+compile"
                  ].status == "MISSING"


def test_the_probes_are_written_as_they_come_and_a_wrong_one_fails_the_bundle(tmp_path,
                                                                               monkeypatch):
    # the probes time GPU kernels, so here a stand-in hands two results over as run_probes
    # does (one fine, one whose kernel computed a wrong result); the bundle's plumbing is real
    from benchmarks import probes
    seen_files = []

    def stand_in(device, arch, card, log, on_result):
        assert device.type == "cuda" and arch == 90
        on_result(probes.ProbeResult("L2 read", "static.GPU.l2_bytes_per_s", "TB/s", 10.0,
                                     8.0, "how"))
        seen_files.append(sorted(os.listdir(tmp_path)))  # written after the first result
        on_result(probes.ProbeResult("partial tile", "-", "-", None, None,
                                     "WRONG RESULT: partial probe", status="wrong"))
        return []
    monkeypatch.setattr(probes, "run_probes", stand_in)
    machine = dict(bundle.machine_info(CPU), capability="9.0", device_name="NVIDIA H100")
    reports = bundle._Reports(str(tmp_path), [bundle._not_run("GPU-critical tests", "test")],
                              machine)
    dog = bundle._Watchdog(reports, 600.0, time.perf_counter() + 600, _quiet)
    failed = bundle._run_probes(reports, torch.device("cuda"), time.perf_counter() + 600, dog,
                                _quiet)
    assert failed is True
    assert seen_files and any(f.endswith(".json") for f in seen_files[0])
    assert [p["name"] for p in reports.probes] == ["L2 read", "partial tile"]
    assert reports.probes[0]["ratio"] == pytest.approx(0.8)
    assert reports.notes == ["probe partial tile: WRONG RESULT: partial probe"]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [p["status"] for p in data["probes"]] == ["ok", "wrong"]
    assert "| partial tile (**wrong**) |" in next(tmp_path.glob("*.md")).read_text()
    # with too little of the budget left they are not run, and the notes say so
    reports.notes.clear()
    assert bundle._run_probes(reports, torch.device("cuda"), time.perf_counter() + 10, dog,
                              _quiet) is False
    assert reports.notes and "were not run" in reports.notes[0]
