"""Launch plans cached per input signature (dc_kernels.plan), and the lean eager path.

A repeated call with the same signature must reuse its plan; any change of what the kernels
depend on (shape, stride, alignment, dtype, device, requires_grad, the backend switch) must
take a new plan and stay correct. The lean eager path (no custom-op dispatch) must give the
same values and gradients as the custom op that ``torch.compile`` traces.
"""

import pytest
import torch

from conftest import make_hidden_states
from dc_kernels import ConnectorSpec, dense_connector_features, plan
from dc_kernels.autograd import features_op, spec_args
from dc_kernels.ops import common

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPEC = ConnectorSpec.preset("clip", "dci")


@pytest.fixture(autouse=True)
def _fresh_plans(monkeypatch):
    plan.clear()

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(common, "empty", nan_empty)
    yield
    plan.clear()


def _hs(seed, dtype=torch.bfloat16, B=2, T=9, C=24):
    return list(make_hidden_states(25, B, T, C, dtype, seed, device=DEVICE))


def _misses():
    return plan.stats()["misses"]


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_same_signature_reuses_the_plan_and_new_data_is_read(backend):
    want = [dense_connector_features(_hs(s), SPEC, backend="torch") for s in (1, 2)]
    plan.clear()
    m0 = _misses()
    a = dense_connector_features(_hs(1), SPEC, backend=backend)
    m1 = _misses()
    b = dense_connector_features(_hs(2), SPEC, backend=backend)  # same signature, new values
    assert m1 == m0 + 1 and _misses() == m1
    assert torch.equal(a, want[0]) and torch.equal(b, want[1])


def _views(kind, seed):
    hs = _hs(seed)
    if kind == "dtype":
        return [h.float() for h in hs]
    if kind == "stride":  # every other channel of a wider tensor
        return [torch.cat([h, h], dim=-1)[..., ::2] for h in hs]
    if kind == "alignment":  # one element into the storage
        out = []
        for h in hs:
            flat = torch.empty(h.numel() + 1, dtype=h.dtype, device=h.device)
            v = flat[1:].view(h.shape)
            v.copy_(h)
            out.append(v)
        return out
    if kind == "shape":
        return _hs(seed, T=11)
    if kind == "requires_grad":
        return [h.requires_grad_() for h in hs]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ("dtype", "stride", "alignment", "shape", "requires_grad"))
def test_a_changed_layout_takes_a_new_plan_and_is_correct(kind):
    dense_connector_features(_hs(3), SPEC, backend="triton")
    m0 = _misses()
    hs = _views(kind, 4)
    got = dense_connector_features(hs, SPEC, backend="triton")
    assert _misses() == m0 + 1, "a different signature reused a plan"
    want = dense_connector_features([h.detach() for h in hs], SPEC, backend="torch")
    assert torch.equal(got.detach(), want)


def test_backend_switch_is_part_of_the_key(monkeypatch):
    hs = _hs(5)
    dense_connector_features(hs, SPEC)  # auto: torch on CPU, triton on CUDA
    m0 = _misses()
    monkeypatch.setenv("DC_KERNELS_BACKEND", "torch")
    dense_connector_features(hs, SPEC)
    assert _misses() == m0 + 1


def test_errors_are_not_cached():
    hs = _hs(6)
    hs[5] = hs[5][:, :4]  # a read layer with another shape
    for _ in range(2):
        with pytest.raises(ValueError, match=r"hidden_states\[5\] has shape"):
            dense_connector_features(hs, SPEC, backend="triton")


def test_lean_autograd_equals_the_custom_op():
    hs = [h.float().requires_grad_() for h in _hs(7)]
    hs2 = [h.detach().clone().requires_grad_() for h in hs]
    g = torch.randn(2, 8, 72, device=DEVICE)
    lean = dense_connector_features(hs, SPEC, backend="triton")
    op = features_op(hs2, *spec_args(SPEC))
    assert torch.equal(lean, op)
    lean.backward(g)
    op.backward(g)
    read = set(SPEC.used_layers)
    for i, (a, b) in enumerate(zip(hs, hs2)):
        if i in read:
            assert torch.equal(a.grad, b.grad), f"layer {i}"
        else:
            assert a.grad is None and b.grad is None


def test_plans_are_bounded(monkeypatch):
    monkeypatch.setattr(plan, "MAX_PLANS", 3)
    for T in range(5, 11):
        dense_connector_features(_hs(8, T=T), SPEC, backend="torch")
    assert plan.stats()["size"] == 3
