"""Malformed inputs to dense_connector_features fail with a clear error before any work.

"Before any work" is enforced: an autouse fixture replaces the compute function the dispatcher
calls with one that fails the test, so an error raised only after computing starts (or no error
at all) makes the test fail rather than pass.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import dc_kernels.functional as functional
from conftest import make_hidden_states
from dc_kernels import BACKEND_ENV, ConnectorSpec, dense_connector_features

CLIP_DCI = ConnectorSpec.preset("clip", "dci")
CUSTOM = ConnectorSpec("dci", final_layer=5, groups=((0, 3), (3, 9)))  # needs >= 9, not fixed


class _WorkStarted(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _forbid_work(monkeypatch):
    """Fail if the dispatcher reaches the computation; keep $DC_KERNELS_BACKEND unset."""
    def trap(*args, **kwargs):
        raise _WorkStarted("dense_connector_features started computing on malformed input")
    monkeypatch.setattr(functional, "features_torch", trap)  # raising=True: name must exist
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def clip_states(n=25, B=2, T=17, C=4, dtype=torch.float32):
    return list(make_hidden_states(n, B, T, C, dtype, seed=0))


def test_trap_fires_on_valid_input():
    """The guard is live: valid input reaches the (trapped) computation."""
    with pytest.raises(_WorkStarted):
        dense_connector_features(tuple(clip_states()), CLIP_DCI)


# --------------------------------------------------------------------------- container type
@pytest.mark.parametrize("bad", [
    torch.zeros(25, 2, 17, 4),  # a stacked tensor is not a tuple of hidden states
    None,
    {i: torch.zeros(2, 17, 4) for i in range(25)},
    "hidden_states",
    (torch.zeros(2, 17, 4) for _ in range(25)),
], ids=("tensor", "none", "dict", "str", "generator"))
def test_hidden_states_not_a_sequence(bad):
    with pytest.raises(TypeError, match=r"hidden_states must be a tuple or list"):
        dense_connector_features(bad, CLIP_DCI)


@pytest.mark.parametrize("index, bad", [
    (3, np.zeros((2, 17, 4), dtype=np.float32)),
    (0, None),
    (23, [[0.0]]),
    (24, 1.5),  # even an entry the spec does not read must be a tensor
])
def test_entry_not_a_tensor(index, bad):
    hs = clip_states()
    hs[index] = bad
    with pytest.raises(TypeError, match=rf"hidden_states\[{index}\] must be a torch.Tensor, "
                                        rf"got {type(bad).__name__}"):
        dense_connector_features(tuple(hs), CLIP_DCI)


@pytest.mark.parametrize("bad", ["dci", None, {"connector_type": "dci"}, CLIP_DCI.groups])
def test_spec_not_a_connector_spec(bad):
    with pytest.raises(TypeError, match=r"spec must be a dc_kernels.ConnectorSpec"):
        dense_connector_features(tuple(clip_states()), bad)


# --------------------------------------------------------------------------- counts
@pytest.mark.parametrize("n", (0, 5, 8))
def test_too_few_hidden_states(n):
    with pytest.raises(ValueError, match=rf"needs at least 9 hidden states, got {n}\b"):
        dense_connector_features(tuple(clip_states(n)), CUSTOM)


def test_more_hidden_states_than_needed_is_fine_without_fixed_count():
    with pytest.raises(_WorkStarted):  # passes validation, reaches the computation
        dense_connector_features(tuple(clip_states(30)), CUSTOM)


@pytest.mark.parametrize("n", (24, 26))
def test_clip_preset_needs_exactly_25(n):
    with pytest.raises(ValueError, match=rf"exactly 25 hidden states.*got {n}\b"):
        dense_connector_features(tuple(clip_states(n)), CLIP_DCI)


@pytest.mark.parametrize("connector", ("dci", "sci", "sti"))
@pytest.mark.parametrize("n", (25, 26, 28))
def test_siglip_preset_needs_exactly_27(connector, n):
    with pytest.raises(ValueError, match=rf"exactly 27 hidden states.*got {n}\b"):
        dense_connector_features(tuple(clip_states(n, T=29)),
                                 ConnectorSpec.preset("siglip", connector))


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("index, shape", [
    (0, (2, 17, 5)),     # channels
    (11, (2, 16, 4)),    # tokens
    (12, (3, 17, 4)),    # batch
    (7, (2, 17, 4, 1)),  # rank
    (5, (2, 17)),
])
def test_used_layer_with_other_shape(index, shape):
    hs = clip_states()
    hs[index] = torch.zeros(shape)
    with pytest.raises(ValueError, match=rf"hidden_states\[{index}\] has shape "
                                         + re.escape(str(tuple(shape)))):
        dense_connector_features(tuple(hs), CLIP_DCI)


def test_unused_layer_may_differ():
    """CLIP index 24 is not read by the DCI preset; its shape is not constrained."""
    hs = clip_states()
    hs[24] = torch.zeros(1, 2, 3)
    with pytest.raises(_WorkStarted):
        dense_connector_features(tuple(hs), CLIP_DCI)


@pytest.mark.parametrize("shape", [(17, 4), (4,), (), (1, 2, 17, 4)])
def test_not_3d(shape):
    hs = [torch.zeros(shape) for _ in range(25)]
    with pytest.raises(ValueError, match=r"hidden_states\[23\] must be 3-D \[B, T, C\]"):
        dense_connector_features(tuple(hs), CLIP_DCI)


def test_clip_spec_with_zero_tokens():
    hs = [torch.zeros(2, 0, 4) for _ in range(25)]
    with pytest.raises(ValueError, match=r"0 tokens.*drops a CLS token"):
        dense_connector_features(tuple(hs), CLIP_DCI)


# --------------------------------------------------------------------------- dtypes, devices
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64, torch.float8_e4m3fn], ids=str)
def test_unsupported_dtype(dtype):
    hs = [torch.zeros(2, 17, 4).to(dtype) for _ in range(25)]
    with pytest.raises(ValueError, match=rf"hidden_states\[23\] has dtype {dtype}; supported"):
        dense_connector_features(tuple(hs), CLIP_DCI)


@pytest.mark.parametrize("index, dtype", [(0, torch.float16), (12, torch.float64),
                                          (7, torch.bfloat16), (15, torch.int32)])
def test_mixed_dtypes(index, dtype):
    hs = clip_states()
    hs[index] = hs[index].to(dtype)
    with pytest.raises(ValueError, match=rf"hidden_states\[{index}\] has dtype {dtype}, "
                                         r"expected torch.float32"):
        dense_connector_features(tuple(hs), ConnectorSpec.preset("clip", "dci"))


def test_sci_checks_only_the_layers_it_reads():
    hs = clip_states()
    hs[3] = hs[3].half()  # not read by SCI (7, 15, 23)
    with pytest.raises(_WorkStarted):
        dense_connector_features(tuple(hs), ConnectorSpec.preset("clip", "sci"))
    hs[15] = hs[15].half()
    with pytest.raises(ValueError, match=r"hidden_states\[15\] has dtype torch.float16"):
        dense_connector_features(tuple(hs), ConnectorSpec.preset("clip", "sci"))


@pytest.mark.parametrize("index", (0, 9, 15))
def test_other_device(index):
    hs = clip_states()
    hs[index] = torch.empty(2, 17, 4, device="meta")
    with pytest.raises(ValueError, match=rf"hidden_states\[{index}\] is on meta, expected cpu"):
        dense_connector_features(tuple(hs), CLIP_DCI)


# --------------------------------------------------------------------------- backend
@pytest.mark.parametrize("backend", ["cuda", "cpu", "", None, 0])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"backend must be one of"):
        dense_connector_features(tuple(clip_states()), CLIP_DCI, backend=backend)


@pytest.mark.parametrize("value", ["garbage", "cuda", "auto", "torch,triton"])
def test_garbage_backend_env(monkeypatch, value):
    monkeypatch.setenv(BACKEND_ENV, value)
    with pytest.raises(ValueError, match=rf"\${BACKEND_ENV}='{value}': expected 'torch' or "
                                         r"'triton'"):
        dense_connector_features(tuple(clip_states()), CLIP_DCI, backend="auto")


CARDS = [  # (HIP version, compute capability, name, whether the Triton kernels run there)
    (None, (7, 5), "Tesla T4", False),
    (None, (7, 0), "Tesla V100-SXM2-16GB", False),
    ("6.2.41133", (9, 4), "AMD Instinct MI300X", False),  # ROCm reports gfx942 as 9.4
    (None, (8, 0), "NVIDIA A100-SXM4-80GB", True),
    (None, (8, 9), "NVIDIA L4", True),
    (None, (9, 0), "NVIDIA H200", True),
    (None, (10, 0), "NVIDIA B200", True),
    (None, (12, 0), "NVIDIA GeForce RTX 5090", True)]


@pytest.mark.parametrize("hip, capability, name, runs", CARDS)
def test_cards_the_triton_kernels_do_not_run_on(monkeypatch, hip, capability, name, runs):
    # backend="auto" takes the torch backend on a CUDA device the kernels are not built for
    # (an NVIDIA card older than sm_80: no bf16 tensor cores; a ROCm device: the kernels are
    # PTX, TMA and cp.async), so nobody gets a compiler error from inside a kernel; an explicit
    # backend="triton" (or $DC_KERNELS_BACKEND=triton) is refused before launch with the card
    # named. The device facts are stubbed: this machine has no CUDA device
    from dc_kernels.ops import common
    monkeypatch.setattr(common, "_cuda_facts", lambda index: (hip, capability, name))
    cuda = torch.device("cuda:0")
    assert functional.resolve_backend("auto", cuda) == ("triton" if runs else "torch")
    assert functional.resolve_backend("triton", cuda) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert functional.resolve_backend("auto", cuda) == "triton"
    problem = common.cuda_device_problem(cuda)
    assert problem is None if runs else name in problem
    # the benchmarks leave out the explicit Triton rows there, saying why
    from benchmarks.providers import unavailable_reason
    for provider in ("dc_kernels-fused", "dc_kernels-pipelined", "dc_kernels+cublas"):
        assert unavailable_reason(provider, "linear", cuda) == problem
    if runs:
        common.check_launchable(cuda, torch.bfloat16)
        return
    why = (rf"is a ROCm device \(HIP {re.escape(hip)}\)" if hip
           else f"is sm_{capability[0]}{capability[1]}")
    with pytest.raises(ValueError, match=rf"cuda:0 \({re.escape(name)}\) {why}: use "
                                         r"backend='torch'"):
        common.check_launchable(cuda, torch.bfloat16)


def test_explicit_torch_backend_ignores_env(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "garbage")
    with pytest.raises(_WorkStarted):
        dense_connector_features(tuple(clip_states()), CLIP_DCI, backend="torch")


@pytest.mark.parametrize("index", (3, 23))
def test_sparse_entry(index):
    hs = list(make_hidden_states(25, 2, 17, 4))
    hs[index] = hs[index].to_sparse()
    with pytest.raises(ValueError, match=re.escape(f"hidden_states[{index}] has layout")):
        dense_connector_features(hs, CLIP_DCI)
