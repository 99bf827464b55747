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


@pytest.mark.parametrize("arch", [90, 80])
def test_every_probe_build_measures_what_it_claims(arch):
    res = subprocess.run([sys.executable, "-m", "benchmarks.probes", "--check-builds",
                          "--arch", str(arch)], env=ENV, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"every build for sm_{arch} measures what it claims" in res.stdout
