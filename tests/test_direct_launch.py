"""Binder-free launches (``dc_kernels.ops.direct``): a prepared launch calls its compiled kernel
without Triton's binder after the first call, with exactly the values the JIT would pass.

Without a GPU the compiled kernel's launcher cannot run, so the CPU test checks everything up
to it: ``tests/direct_launch_worker.py`` (a subprocess without ``TRITON_INTERPRET``) runs each
public call on CPU stand-ins of the real shapes with the launchers seeing an sm_80 / sm_90 card,
and compares, launch by launch, what the direct path hands the launcher with what Triton's own
binder derives for the same call through the JIT (grid, kernel, every parameter), and checks
that no tensor of the first call stays alive in a plan's launch sites. The GPU test runs both
paths on real kernels and compares the outputs bit for bit.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from dc_kernels import ConnectorSpec, dense_connector_features, dense_connector_linear
from dc_kernels.ops import direct

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def worker_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("direct") / "report.json"
    res = subprocess.run([sys.executable, os.path.join(HERE, "direct_launch_worker.py"),
                          str(path)], env=ENV, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(path.read_text())


def test_direct_launches_pass_what_the_jit_passes(worker_report):
    cases = {k: v for k, v in worker_report.items() if k != "fallbacks"}
    assert len(cases) >= 8
    for name, r in cases.items():
        assert r["launches"] > 0, name
        assert not r["problems"], f"{name}: " + "\n".join(r["problems"])
        assert r["direct"] == r["launches"], name  # the repeated call launched directly


def test_direct_launches_fall_back_to_the_jit(worker_report):
    # a registered launch hook (profilers) or another current device: the JIT path again
    assert worker_report["fallbacks"] == {"launch hook": 1, "other device": 1}


def test_hook_chains():
    from triton import knobs
    assert not direct._hooks_set()  # nothing registered in a test process
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_exit_hook.add(hook)
    try:
        assert direct._hooks_set()
    finally:
        knobs.runtime.launch_exit_hook.remove(hook)
    assert not direct._hook_set(None)
    assert direct._hook_set(lambda m: None)  # a plain callable (not a chain) counts as set


def _k(x, n, BLOCK: "tl.constexpr", FLAG: "tl.constexpr" = 3):
    pass


def test_capture_values_names_a_missing_parameter():
    # a real JITFunction (the interpreter's triton.jit would hand back an interpreted one)
    from triton.runtime.jit import JITFunction
    import triton.language as tl  # noqa: F401  (the annotations name it)
    k = JITFunction(_k)
    values, names = direct.capture_values(k, (1, 2), {"BLOCK": 16, "num_warps": 4})
    assert names == ("x", "n", "BLOCK", "FLAG") and values == [1, 2, 16, 3]
    with pytest.raises(TypeError, match="BLOCK"):
        direct.capture_values(k, (1, 2), {})
    with pytest.raises(TypeError, match="takes 4 arguments"):
        direct.capture_values(k, (1, 2, 3, 4, 5), {})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="the interpreter's behaviour")
def test_the_interpreter_never_launches_directly():
    # under the interpreter there is no compiled kernel: every launch goes through Triton
    spec = ConnectorSpec("dci", final_layer=3, groups=((0, 2), (2, 4)))
    hs = [torch.randn(2, 5, 16) for _ in range(5)]
    w, b = torch.randn(8, 48), torch.randn(8)
    before = direct.stats()
    for _ in range(3):
        dense_connector_features(hs, spec, backend="triton")
        dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path="two-pass")
    after = direct.stats()
    assert after["direct"] == before["direct"]
    assert after["jit"] >= before["jit"] + 9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA device")
@pytest.mark.parametrize("path", ("fused", "two-pass", "overlap"))
def test_direct_and_jit_launches_give_the_same_bits(path, monkeypatch):
    spec = ConnectorSpec.preset("clip", "dci")
    g = torch.Generator(device="cuda").manual_seed(7)
    hs = [torch.randn(2, 65, 128, device="cuda", dtype=torch.bfloat16, generator=g)
          for _ in range(spec.num_hidden_states)]
    w = torch.randn(192, 384, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    b = torch.randn(192, device="cuda", dtype=torch.bfloat16, generator=g)
    ref_f = dense_connector_features(hs, spec, backend="triton")       # JIT (first call)
    ref_y = dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path=path)
    before = direct.stats()
    for _ in range(2):
        f = dense_connector_features(hs, spec, backend="triton")
        y = dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path=path)
        torch.testing.assert_close(f, ref_f, rtol=0, atol=0)
        torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
    assert direct.stats()["direct"] > before["direct"]
    monkeypatch.setenv(direct.DIRECT_ENV, "0")
    before = direct.stats()
    y = dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path=path)
    assert direct.stats()["direct"] == before["direct"]
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
