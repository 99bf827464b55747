"""pytest-benchmark suite: the providers x ops of ``python -m benchmarks`` on a small shape set.

Not collected by the default test run (``testpaths = ["tests"]``). Run it explicitly::

    pytest benchmarks/test_bench.py --benchmark-only                 # all cases
    pytest benchmarks/test_bench.py --benchmark-only -k "dc_kernels"  # a subset

Each test prepares one provider for one op and case, calls it once (``torch.compile`` compiles
there, outside the timing), checks the result against the eager reference with the same bound
as the CLI (:mod:`benchmarks.accuracy`; a wrong result fails the test), then lets
pytest-benchmark time it (on CUDA each call ends with a synchronize). Shapes: CLIP-L/336 ->
4096 at 1 image on CPU (fp32); on CUDA (bf16) also 16 images and SigLIP at 1 image. The floor
bytes/FLOPs of the case go into ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import accuracy
from benchmarks.cases import OPS, SHAPES, Case, make_inputs
from benchmarks.costs import floor_cost
from benchmarks.providers import PROVIDERS, prepare, unavailable_reason
from benchmarks.runner import row_name

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = [("clip336-4096", 1)]
if DEVICE.type == "cuda":
    CASES += [("clip336-4096", 16), ("siglip384-4096", 1)]


@pytest.fixture(scope="module")
def store():
    """Inputs per case and yardsticks per (case, op), built once per module."""
    data = {}
    yield data
    data.clear()


def _inputs(store, case):
    key = ("inputs", case)
    if key not in store:
        store[key] = make_inputs(case, DTYPE, DEVICE)
    return store[key]


def _yardstick(store, case, op, inputs):
    key = ("stick", case, op)
    if key not in store:
        store[key] = accuracy.yardstick(op, inputs, prepare("reference", op, inputs).fn())
    return store[key]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,images", CASES, ids=[f"{s}-{i}img" for s, i in CASES])
def test_bench(benchmark, store, shape, images, op, provider):
    reason = unavailable_reason(provider, op, DEVICE)
    if reason:
        pytest.skip(reason)
    case = Case(SHAPES[shape], images)
    inputs = _inputs(store, case)
    stick = _yardstick(store, case, op, inputs)
    prepared = prepare(provider, op, inputs)
    checked = accuracy.check(prepared.fn(), stick, row_name(op, shape, images, provider))

    if DEVICE.type == "cuda":
        def fn():
            out = prepared.fn()
            torch.cuda.synchronize(DEVICE)
            return out
    else:
        fn = prepared.fn
    cost = floor_cost(op, case, inputs.hidden_states[0].element_size())
    benchmark.group = f"{op}/{shape}/{images}img ({str(DTYPE).replace('torch.', '')})"
    benchmark.extra_info.update(rows=case.rows, floor_bytes=cost.bytes, floor_flops=cost.flops,
                                note=prepared.note, max_abs_err=checked.max_abs_error,
                                err_over_bound=checked.worst_ratio)
    benchmark(fn)
