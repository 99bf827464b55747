"""The probes of the static cost model's assumptions (``benchmarks/probes.py``).

Their timings need a GPU (the bundle runs them there); here every probe kernel runs at small
sizes on fresh random data (under the interpreter on a CPU machine, compiled on a GPU) and must
compute what torch computes (exactly on integer-valued data, the tensor step within its fp32
accumulation bound), its outputs poisoned first; each probe's own check must
catch a wrong result; and every probe kernel, built for sm_90 and sm_80 as the JIT binds it at
the sizes the bundle times, must measure what it claims (no spills, no cp.async ring, the loop
as stated: ``probes.build_problems``).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from benchmarks import probes
from dc_kernels.ops.common import interpreting

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _corrupt_and_expect_failure(fn, tensor):
    # the probe's own check must see a changed output
    tensor.view(-1)[0] += 1
    with pytest.raises(AssertionError):
        fn.check()


@pytest.mark.parametrize("blocks", [(32, 64, 16), (16, 32, 32)])
def test_tensor_step_probe_computes_pairs_times_the_two_products(blocks):
    rng = random.Random()
    pairs, programs = rng.randint(1, 5), rng.randint(1, 3)
    fn = probes.tensor_step_launch(programs, pairs, DEVICE, *blocks, seed=rng.randrange(1 << 30))
    assert torch.isnan(fn.out).all()  # poisoned before the launch
    fn()
    clocks = fn.check()
    assert clocks.shape == (programs, 4)
    if DEVICE.type == "cuda":  # the clocks run forward on a GPU
        assert bool((clocks[:, 1] >= clocks[:, 0]).all() and (clocks[:, 3] > clocks[:, 2]).all())
    _corrupt_and_expect_failure(fn, fn.out)
    with pytest.raises(ValueError, match="at least one pair"):
        probes.tensor_step_launch(1, 0, DEVICE, *blocks)


def test_launch_probe_stores_every_program():
    programs = random.randint(1, 40)
    fn = probes.launch_launch(programs, DEVICE)
    fn()
    fn.check()
    _corrupt_and_expect_failure(fn, fn.out)


@pytest.mark.parametrize("block, warps", [(64, 1), (128, 4)])
def test_stream_probe_sums_each_programs_share(block, warps):
    rng = random.Random()
    programs, tiles, repeat = rng.randint(1, 5), rng.randint(1, 4), rng.randint(1, 3)
    x = torch.randint(-2, 3, (programs * tiles * block,), dtype=torch.int32).float().to(DEVICE)
    fn = probes.stream_launch(x, programs, block, repeat, num_warps=warps)
    fn()
    fn.check()
    _corrupt_and_expect_failure(fn, fn.out)


def test_stream_probe_refuses_what_it_cannot_read():
    x = torch.zeros(4 * 64, device=DEVICE)
    with pytest.raises(TypeError, match="fp32"):
        probes.stream_launch(x.half(), 4, 64, 1)
    with pytest.raises(ValueError, match="contiguous 1-D"):
        probes.stream_launch(torch.zeros(8, 64, device=DEVICE)[:, :32], 4, 64, 1)
    with pytest.raises(ValueError, match="whole 64-tiles"):
        probes.stream_launch(x[:200], 4, 64, 1)
    with pytest.raises(ValueError, match="powers of two"):
        probes.stream_launch(x, 4, 48, 1)
    with pytest.raises(ValueError, match="at least one program"):
        probes.stream_launch(x, 0, 64, 1)


@pytest.mark.parametrize("what, load, release", probes.PARTIAL_VARIANTS)
def test_partial_probe_stores_or_loads_the_tile(what, load, release):
    rng = random.Random()
    programs, repeat = rng.randint(1, 3), rng.randint(1, 4)
    fn = probes.partial_launch(programs, repeat, load, DEVICE, 32, 64, 16,
                               seed=rng.randrange(1 << 30), release=release)
    assert torch.isnan(fn.out).all()
    fn()
    on_sms = fn.check()
    assert on_sms is None if DEVICE.type == "cpu" else 1 <= on_sms <= programs
    # a wrong tile in any program's slot is seen too, not only program 0's output
    _corrupt_and_expect_failure(fn, fn.ws[-1])
    with pytest.raises(ValueError, match="at least one repeat"):
        probes.partial_launch(1, 0, load, DEVICE, 32, 64, 16)
    with pytest.raises(ValueError, match="releases after stores"):
        probes.partial_launch(1, 1, True, DEVICE, 32, 64, 16, release=True)


def test_run_probes_needs_a_compiled_gpu():
    with pytest.raises(ValueError, match="CUDA"):
        probes.run_probes(torch.device("cpu"))


def test_markdown_says_assumed_measured_ratio_and_status():
    found = [probes.ProbeResult("L2 read", "static.GPU.l2_bytes_per_s", "TB/s", 10.0, 7.5,
                                "how"),
             probes.ProbeResult("launch", "static.GPU.launch_fixed_s", "us", 2.0, None),
             probes.ProbeResult("DRAM read", "-", "TB/s", 3.0, float("nan")),
             probes.ProbeResult("tensor step", "-", "-", None, None, "WRONG RESULT: x",
                                status="wrong")]
    assert found[0].ratio == pytest.approx(0.75)
    assert found[1].ratio is None and found[2].ratio is None and found[3].ratio is None
    md = probes.probes_markdown(found)
    assert "| L2 read | 10 TB/s | 7.5 TB/s | 0.75 | static.GPU.l2_bytes_per_s | how |" in md
    assert "| launch | 2 us | - | - |" in md
    assert "| tensor step (**wrong**) | - | - | - | - | WRONG RESULT: x |" in md
    assert found[0].as_dict()["ratio"] == pytest.approx(0.75)


def _measured(sm_count=132, copy=2.9e12):
    # a probes file as the bundle writes it (ProbeResult.as_dict), made of results a GPU
    # could give: two DRAM points below 70 % of the copy bandwidth, one near it, a partial
    # variant the model does not read, a probe that failed
    P, E = probes.ProbeResult, probes.EVERY_SM
    found = [P(probes.TENSOR_STEP, "-", "us", 0.71, 0.8, extra={"tflop_per_s": 700.0}),
             P(probes.SM_CLOCK, "-", "GHz", 1.755, 1.83),
             P(probes.LAUNCH, "-", "us", 2.0, 3.1),
             P(f"{probes.DRAM_READ}, 8.0 KiB in flight per SM", "-", "TB/s", 0.8, 0.9,
               extra={"implied_latency_us": 1.2}),
             P(f"{probes.DRAM_READ}, 16.0 KiB in flight per SM", "-", "TB/s", 1.6, 1.5,
               extra={"implied_latency_us": 1.4}),
             P(f"{probes.DRAM_READ}, 64.0 KiB in flight per SM", "-", "TB/s", 3.0, 2.8,
               extra={"implied_latency_us": 3.0}),
             P(probes.L2_READ, "-", "TB/s", 10.0, 7.5),
             P(probes.partial_name("store + release", E), "-", "steps", 1.7, 2.4),
             P(probes.partial_name("load", E), "-", "steps", 1.7, 1.6),
             P(probes.partial_name("store", E), "-", "steps", 1.7, 9.9),
             P(probes.partial_name("load", probes.QUARTER_SMS), "-", "steps", 1.7, 0.5),
             P("partial tile", "-", "-", None, None, "error: boom", status="error")]
    data = {"machine": {"device_name": "NVIDIA H100 80GB HBM3", "sm_count": sm_count,
                        "capability": "9.0", "date": "2026-12-08"},
            "probes": [r.as_dict() for r in found]}
    if copy:
        data["ceilings"] = {"copy_bytes_per_s": copy}
    return data


def test_static_model_takes_the_measured_constants():
    from benchmarks.static import GPUS, gpu_from_constants
    base = GPUS[90]
    gpu, notes = gpu_from_constants(base, _measured())
    assert gpu.tensor_flop_per_s["16"] == pytest.approx(700e12)
    assert gpu.tensor_flop_per_s["tf32"] == pytest.approx(base.tensor_flop_per_s["tf32"] * 7 / 8)
    assert gpu.clock_hz == pytest.approx(1.83e9) and gpu.launch_fixed_s == pytest.approx(3.1e-6)
    assert gpu.l2_bytes_per_s == pytest.approx(7.5e12)
    assert gpu.dram_bytes_per_s == pytest.approx(2.9e12)
    # the median of the DRAM points below 70 % of 2.9 TB/s (the 2.8 TB/s one is queueing)
    assert gpu.latency_s == pytest.approx(1.3e-6)
    # store + release and load, on every SM
    assert gpu.partial_steps == pytest.approx(2.0)
    assert gpu.sms == base.sms and gpu.fp32_flop_per_s == base.fp32_flop_per_s
    assert "2026-12-08" in gpu.name
    assert any(n.startswith("not used: partial tile (error") for n in notes)
    assert any(n.startswith("partial_steps: 1.7 -> 2 K steps") for n in notes)
    # a card with fewer SMs: the rate per SM times the model's SMs; a probes file (no
    # ceilings): the copy bandwidth stays assumed (3.0 TB/s, of which 70 % is 2.1)
    gpu, notes = gpu_from_constants(base, _measured(sm_count=114, copy=None))
    assert gpu.tensor_flop_per_s["16"] == pytest.approx(700e12 / 114 * 132)
    assert gpu.dram_bytes_per_s == base.dram_bytes_per_s
    assert gpu.latency_s == pytest.approx(1.3e-6)  # 0.9 and 1.5 TB/s, under 2.1
    # nothing measured: the model unchanged but its name, every constant said to be kept
    gpu, notes = gpu_from_constants(base, {"probes": []})
    assert gpu.clock_hz == base.clock_hz and gpu.partial_steps == base.partial_steps
    assert notes == ["latency_s: kept (no DRAM point below 70 % of the copy bandwidth)"]


def test_static_constants_file_is_checked_before_any_build(tmp_path, monkeypatch, capsys):
    import json
    from benchmarks import static
    from benchmarks.cli import main
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    empty = tmp_path / "none.json"
    empty.write_text(json.dumps({"machine": {}, "rows": []}))
    with pytest.raises(ValueError, match="no probe results"):
        static.run_static(str(tmp_path), constants=str(empty))
    odd = tmp_path / "sm75.json"
    odd.write_text(json.dumps(dict(_measured(), machine={"capability": "7.5"})))
    with pytest.raises(ValueError, match="sm_75"):
        static.run_static(str(tmp_path), constants=str(odd))
    assert main(["--static", "--constants", str(empty)]) == 2
    assert main(["--static", "--constants", str(tmp_path / "missing.json")]) == 2
    assert main(["--constants", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "goes with --static" in err
    assert not list(tmp_path.glob("*static*"))  # nothing built, nothing written


@pytest.mark.parametrize("arch", [90, 80])
def test_every_probe_build_measures_what_it_claims(arch):
    res = subprocess.run([sys.executable, "-m", "benchmarks.probes", "--check-builds",
                          "--arch", str(arch)], env=ENV, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"every build for sm_{arch} measures what it claims" in res.stdout
