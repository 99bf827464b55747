"""Ahead-of-time compilation for real GPUs (sm_80, sm_90), on a CPU-only machine.

The interpreter accepts programs the compiler rejects and says nothing about registers or shared
memory. Here every kernel x dtype x config x layout that the launchers can pick
(``dc_kernels.ops.triton_aot.aot_cases``) is compiled with the compiler Triton uses on a GPU;
each build must succeed, spill no registers, fit the architecture's shared memory, and (for
16-bit and tf32 operands) use wgmma on Hopper.

The builds run once, in a subprocess without ``TRITON_INTERPRET`` (under the interpreter
``triton.jit`` hands back interpreted functions the compiler cannot take).
"""

import json
import os
import subprocess
import sys

import pytest

from dc_kernels.ops.triton_aot import aot_cases
from dc_kernels.spec import ConnectorSpec

CASES = aot_cases()


@pytest.fixture(scope="session")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "dc_kernels.ops.triton_aot"], env=env,
                         capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, f"AOT builder failed:\n{res.stderr[-4000:]}"
    return {r["id"]: r for r in json.loads(res.stdout)}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_kernel_compiles_without_spills(reports, case):
    r = reports[case["id"]]
    assert "error" not in r, r.get("error")
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, \
        f"register spills: {r['spill_stores']} B stored, {r['spill_loads']} B loaded " \
        f"({r['registers']} registers)"
    assert 0 < r["registers"] <= 255
    assert r["shared"] <= r["shared_limit"], \
        f"shared memory {r['shared']} B over the sm_{r['arch']} limit {r['shared_limit']} B"
    if r["arch"] >= 90 and r["wgmma"]:
        assert r["has_wgmma"], "no wgmma instruction on sm_90"


def test_every_launchable_config_is_covered():
    from dc_kernels.ops import linear as K
    for (kind, bits), cfgs in K.CONFIG_LISTS.items():
        dt = "fp32" if bits == 32 else "bf16"
        built = {c["config"] for c in CASES if c["kernel"] == kind and c["dtype"] == dt}
        assert built == set(range(len(cfgs)))


def test_presets_fit_the_compiled_layout():
    # No preset keeps more layer tiles in flight than SigLIP's DCI, the layout compiled.
    widest = max(b - a for a, b in ConnectorSpec.preset("siglip", "dci").groups)
    for enc in ("clip", "siglip"):
        for ct in ("dci", "sci"):
            spec = ConnectorSpec.preset(enc, ct)
            assert max(stop - start for start, stop in spec.groups) <= widest
