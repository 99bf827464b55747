"""Launch plans cached per input signature (dc_kernels.plan), and the lean eager path.

A repeated call with the same signature must reuse its plan; any change of what the kernels
depend on (shape, stride, alignment, dtype, device, requires_grad, the backend switch) must
take a new plan and stay correct. The lean eager path (no custom-op dispatch) must give the
same values and gradients as the custom op that ``torch.compile`` traces.
"""

import pytest
import torch

from conftest import make_hidden_states, poison_outputs
from dc_kernels import ConnectorSpec, dense_connector_features, dense_connector_linear, plan
from dc_kernels.autograd import features_op, linear_op, spec_args
from dc_kernels.ops import common

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPEC = ConnectorSpec.preset("clip", "dci")


@pytest.fixture(autouse=True)
def _fresh_plans(monkeypatch):
    plan.clear()
    poison_outputs(monkeypatch)
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


# --------------------------------------------------------------------------- first layer
def _wb(seed, K=72, N=20, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    return w, b


def _op_route(hs, w, b, activation, path):
    # what torch.compile traces: the custom op dc_kernels::linear (same kernels, same A)
    return linear_op(list(hs), *spec_args(SPEC), w, b, activation or "none", path)


@pytest.mark.parametrize("path", ("fused", "two-pass", "overlap"))
def test_linear_plan_reused_new_data_read_and_equal_to_the_custom_op(path):
    w, b = _wb(1)
    data = [([h.float() for h in _hs(s)], *_wb(s + 10)) for s in (11, 12)]
    m0 = _misses()
    got = [dense_connector_linear(hs, SPEC, w_, b_, "gelu", backend="triton", path=path)
           for hs, w_, b_ in data]
    assert _misses() == m0 + 1, "the second call (same signature) did not reuse the plan"
    for (hs, w_, b_), y in zip(data, got):
        assert torch.equal(y, _op_route(hs, w_, b_, "gelu", path))
        assert not torch.isnan(y).any()


def _linear_views(kind, seed):
    hs = [h.float() for h in _hs(seed)]
    w, b = _wb(seed)
    if kind == "weight-stride":  # a transposed view: column stride != 1
        w = w.t().contiguous().t()
    elif kind == "weight-alignment":
        flat = torch.empty(w.numel() + 1, dtype=w.dtype, device=w.device)
        w = flat[1:].view(w.shape).copy_(w)
    elif kind == "bias-stride":
        b = torch.stack([b, b], dim=1)[:, 0]
    elif kind == "no-bias":
        b = None
    elif kind == "dtype":
        hs, w, b = [h.bfloat16() for h in hs], w.bfloat16(), b.bfloat16()
    elif kind == "weight-requires-grad":
        w = w.requires_grad_()
    elif kind == "hidden-states":
        hs = [torch.cat([h, h], dim=-1)[..., ::2] for h in hs]  # channel stride 2
    else:
        raise AssertionError(kind)
    return hs, w, b


@pytest.mark.parametrize("kind", ("weight-stride", "weight-alignment", "bias-stride", "no-bias",
                                  "dtype", "weight-requires-grad", "hidden-states"))
def test_linear_changed_layout_takes_a_new_plan_and_is_correct(kind):
    w, b = _wb(21)
    dense_connector_linear([h.float() for h in _hs(21)], SPEC, w, b, "gelu", backend="triton")
    m0 = _misses()
    hs, w, b = _linear_views(kind, 22)
    got = dense_connector_linear(hs, SPEC, w, b, "gelu", backend="triton")
    assert _misses() == m0 + 1, "a different signature reused a plan"
    # (in grad mode, as the call: a weight that requires grad keeps A, so the launch is two-pass)
    assert torch.equal(got.detach(), _op_route(hs, w, b, "gelu", "auto").detach())


# every combination of what requires grad: (read hidden states: none / some / all), weight, bias
_GRAD_CASES = [(hs, w, b) for hs in ("none", "some", "all") for w in (False, True)
               for b in (False, True) if hs != "none" or w or b]


@pytest.mark.parametrize("activation", (None, "gelu"))
@pytest.mark.parametrize("path", ("fused", "two-pass", "overlap"))
@pytest.mark.parametrize("case", _GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_linear_lean_autograd_equals_the_custom_op(case, path, activation):
    hs_grad, w_grad, b_grad = case
    base = [h.float() for h in _hs(31)]
    w0, b0 = _wb(32)
    read = SPEC.used_layers

    def leaves():
        hs = [h.detach().clone() for h in base]
        wanted = {"none": (), "some": read[::2], "all": read}[hs_grad]
        for i in wanted:
            hs[i].requires_grad_()
        return hs, w0.detach().clone().requires_grad_(w_grad), \
            b0.detach().clone().requires_grad_(b_grad)

    g = torch.randn(2, 8, 20, device=DEVICE)
    (hs1, w1, b1), (hs2, w2, b2) = leaves(), leaves()
    lean = dense_connector_linear(hs1, SPEC, w1, b1, activation, backend="triton", path=path)
    op = _op_route(hs2, w2, b2, activation, path)
    assert torch.equal(lean, op)
    lean.backward(g)
    op.backward(g)
    for name, x, y in [("weight", w1, w2), ("bias", b1, b2)] + \
            [(f"hidden_states[{i}]", x, y) for i, (x, y) in enumerate(zip(hs1, hs2))]:
        if y.grad is None:
            assert x.grad is None, name
        else:
            assert torch.equal(x.grad, y.grad), name


def test_linear_lean_double_backward_equals_the_custom_op():
    base = [h.double().float() for h in _hs(41)]
    w0, b0 = _wb(42)

    def grads(fn):
        hs = [h.detach().clone().requires_grad_() for h in base]
        w = w0.detach().clone().requires_grad_()
        y = fn(hs, w)
        gw, = torch.autograd.grad((y * y).sum(), [w], create_graph=True)
        gg = torch.autograd.grad(gw.square().sum(), [hs[SPEC.final_layer], w])
        return y, gw, gg

    lean = grads(lambda hs, w: dense_connector_linear(hs, SPEC, w, b0, "gelu",
                                                      backend="triton", path="two-pass"))
    op = grads(lambda hs, w: _op_route(hs, w, b0, "gelu", "two-pass"))
    for x, y in zip([lean[0], lean[1], *lean[2]], [op[0], op[1], *op[2]]):
        assert torch.equal(x, y)


def test_linear_without_grad_mode_launches_directly():
    hs = [h.float().requires_grad_() for h in _hs(51)]
    w, b = _wb(52)
    w.requires_grad_()
    with torch.no_grad():
        y = dense_connector_linear(hs, SPEC, w, b, "gelu", backend="triton")
    assert not y.requires_grad and y.grad_fn is None
    y2 = dense_connector_linear(hs, SPEC, w, b, "gelu", backend="triton")  # same plan, grad on
    assert y2.requires_grad and torch.equal(y, y2.detach())


def test_linear_errors_are_not_cached():
    hs = [h.float() for h in _hs(61)]
    w, b = _wb(62, K=71)
    for _ in range(2):
        with pytest.raises(ValueError, match="weight must be"):
            dense_connector_linear(hs, SPEC, w, b, "gelu", backend="triton")


def test_linear_under_autocast_takes_no_plan():
    hs = [h.float() for h in _hs(71)]
    w, b = _wb(72)
    m0 = plan.stats()["hits"] + _misses()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = dense_connector_linear(hs, SPEC, w, b, "gelu", backend="triton")
    assert y.dtype == torch.bfloat16
    assert plan.stats()["hits"] + _misses() == m0


@pytest.mark.parametrize("path", ("fused", "two-pass", "overlap"))
def test_a_plan_keeps_no_tensor_of_its_calls_alive(monkeypatch, path):
    # plans live long (LRU of 256): the outputs, the features A and the weight of a call must
    # be freed when the caller drops them (the TMA GEMM's descriptor templates included)
    import gc
    import weakref
    made = []
    real = common.empty

    def tracking_empty(shape, dtype, device):
        t = real(shape, dtype, device)
        made.append(weakref.ref(t))
        return t
    monkeypatch.setattr(common, "empty", tracking_empty)
    hs = [h.float() for h in _hs(81)]
    w, b = _wb(82, N=40)  # N = 40, K = 72: rows of 16-byte multiples (the TMA GEMM's layout)
    wref = weakref.ref(w)
    for _ in range(2):  # the miss and a hit
        y = dense_connector_linear(hs, SPEC, w, b, "gelu", backend="triton", path=path)
    del y, w
    gc.collect()
    assert made and all(r() is None for r in made), "a plan keeps a call's tensors alive"
    assert wref() is None, "a plan keeps the weight alive"
