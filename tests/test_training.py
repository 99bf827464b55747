"""Training-grade backward (issue 13, docs/DESIGN.md §6), on both backends.

The setting that matters is Dense Connector training: the ViT is frozen, its hidden states are
made without grad and dropped after the connector's forward, the projector trains. Checked here:

* what autograd keeps for backward (counted with ``torch.autograd.graph.saved_tensors_hooks``:
  the distinct storages, full size, of the saved tensors still held when the forward returns)
  is at most what the original connector + ``mlp2x_gelu`` keeps, and never a hidden state when
  none needs a gradient;
* the backward's GEMM FLOPs (``torch.utils.flop_counter``) are at most eager's;
* gradients equal the original's within the bounds of ``test_modules`` (``TOL``) for every
  combination of inputs that need them, and second-order gradients equal the torch backend's;
* ``torch.utils.checkpoint`` (``use_reentrant=False``) and ``torch.compile(fullgraph=True)`` of a
  training step give the same gradients;
* the training launch of the Triton linear hands back exactly the features and the
  pre-activation its inference launch computes.

The Triton kernels run compiled on CUDA, else on the CPU interpreter (conftest). Every kernel
output starts as NaN.
"""

import itertools
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import reference
from conftest import CUSTOM_SPECS, make_hidden_states, poison_outputs
from dc_kernels import BACKEND_ENV, ConnectorSpec, DenseConnector, dense_connector_linear
from dc_kernels.ops import common, features as features_ops, linear as linear_ops
from dc_kernels.ops import overlap as overlap_ops
from test_modules import TOL

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton")
TOKENS = {"clip": 9, "siglip": 11}
SPECS = {  # name -> (spec, number of hidden states, is_siglip for the original's code)
    "clip-dci": (ConnectorSpec.preset("clip", "dci"), 25, False),
    "siglip-sci": (ConnectorSpec.preset("siglip", "sci"), 27, True),
    "clip-sti": (ConnectorSpec.preset("clip", "sti"), 25, False),
}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    poison_outputs(monkeypatch)


def _setup(name, dtype, B=2, C=16, H=24, seed=0, hs_grad=False):
    spec, n, siglip = SPECS[name]
    torch.manual_seed(seed)
    proj = reference.build_projector(spec.out_channels(C), H, "mlp2x_gelu").to(DEVICE, dtype)
    T = TOKENS["siglip" if siglip else "clip"] + (8 if spec.connector_type == "sti" else 0)
    hs = make_hidden_states(n, B, T, C, dtype, seed, device=DEVICE, requires_grad=hs_grad)
    return spec, proj, hs, siglip


def _original(hs, spec, proj, siglip):
    feats = reference.dense_connector(reference.select_image_features(hs, siglip), hs, siglip,
                                      spec.connector_type)
    return proj(feats)


def _loss_weights(shape, dtype):
    g = torch.Generator().manual_seed(7)
    return torch.randn(shape, generator=g).to(DEVICE, dtype)


def _loss(out, w=None):
    if w is None:
        w = _loss_weights(out.shape, out.dtype)
    return (out * w).float().sum()


class _Box:
    """What the pack hook hands autograd: it lives exactly as long as the saved tensor is kept
    (a node that is dropped, e.g. of a value only compared, frees it). It holds the tensor
    detached (same storage): a node that saves its own output would otherwise form a cycle
    through the box and never be freed. Autograd restores the graph links on unpack."""

    def __init__(self, t):
        self.t = t.detach()


def _saved(fn):
    """Run ``fn``; return its result, the bytes of the distinct storages autograd keeps for
    backward when ``fn`` returns, and their data pointers."""
    boxes = []

    def pack(t):
        box = _Box(t)
        boxes.append(weakref.ref(box))
        return box
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        out = fn()
    storages = {}
    for ref in boxes:
        box = ref()
        if box is not None:
            s = box.t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return out, sum(storages.values()), set(storages)


def _ptrs(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


# --------------------------------------------------------------------------- saved bytes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,dtype", [("clip-dci", torch.float32), ("clip-dci", torch.bfloat16),
                                        ("siglip-sci", torch.bfloat16),
                                        ("clip-sti", torch.float32)], ids=str)
def test_frozen_vit_saves_no_more_than_the_original(name, dtype, backend):
    spec, proj, hs, siglip = _setup(name, dtype)
    m = DenseConnector.from_projector(spec, proj, backend=backend)
    _, want, _ = _saved(lambda: _loss(_original(hs, spec, proj, siglip)))
    _, got, ptrs = _saved(lambda: _loss(m(hs)))
    assert got <= want, f"{backend} keeps {got} B for backward, the original {want} B"
    assert not ptrs & _ptrs(hs), "a frozen hidden state was kept for backward"


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_vit_custom_spec_with_unused_layers(backend):
    spec, n = CUSTOM_SPECS["dci_longer_tuple"]
    torch.manual_seed(1)
    proj = reference.build_projector(spec.out_channels(12), 20, "mlp2x_gelu").to(DEVICE)
    hs = make_hidden_states(n, 2, 7, 12, torch.float32, 2, device=DEVICE)
    m = DenseConnector.from_projector(spec, proj, backend=backend)
    ref = lambda: _loss(proj(reference.features_from_spec(hs, spec)))  # noqa: E731
    _, want, _ = _saved(ref)
    _, got, ptrs = _saved(lambda: _loss(m(hs)))
    assert got <= want and not ptrs & _ptrs(hs)
    got_g = torch.autograd.grad(_loss(m(hs)), list(proj.parameters()))
    want_g = torch.autograd.grad(ref(), list(proj.parameters()))
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def _tower(n, B, T, C, dtype, seed, frozen=0):
    """A toy trainable ViT: ``h_{i+1} = h_i + tanh(h_i @ W_i)``; each matmul keeps its input,
    as a real encoder layer (LayerNorm, Linear) keeps the hidden state it reads. The first
    ``frozen`` layers do not train (their outputs need no gradient and nothing keeps them)."""
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(C, C, generator=g) / C).to(DEVICE, dtype).requires_grad_(i >= frozen)
          for i in range(n - 1)]
    x = torch.randn(B, T, C, generator=g).to(DEVICE, dtype)

    def run():
        hs = [x]
        for w in ws:
            hs.append(hs[-1] + torch.tanh(hs[-1] @ w))
        return hs
    return ws, run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,frozen", [("clip-dci", 0), ("clip-dci", 10), ("siglip-sci", 0),
                                         ("clip-sti", 0)])
def test_trainable_vit_keeps_no_more_than_the_original(name, frozen, backend):
    # hidden states that all need gradients are kept by reference (their producer's graph
    # holds them already) instead of A; with the first layers frozen (their outputs kept by
    # nothing) A is kept: the whole graph keeps no more than the original's
    spec, proj, hs0, siglip = _setup(name, torch.float32)
    ws, tower = _tower(len(hs0), *hs0[0].shape, torch.float32, 3, frozen)
    m = DenseConnector.from_projector(spec, proj, backend=backend)
    # the tower layers that matter
    params = ws[frozen:max(spec.used_layers)] + list(proj.parameters())
    out_ref, want, _ = _saved(lambda: _loss(_original(tower(), spec, proj, siglip)))
    out, got, _ = _saved(lambda: _loss(m(tower())))
    assert got <= want, f"{backend}: the graph keeps {got} B, the original's {want} B"
    for a, b in zip(torch.autograd.grad(out, params), torch.autograd.grad(out_ref, params)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# --------------------------------------------------------------------------- FLOPs
def _backward_flops(loss):
    with FlopCounterMode(display=False) as fc:
        loss.backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("hs_grad", (False, True), ids=("frozen", "hs-grad"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ("clip-dci", "clip-sti"))
def test_backward_gemm_flops_at_most_eager(name, backend, hs_grad):
    spec, proj, hs, siglip = _setup(name, torch.float32, hs_grad=hs_grad)
    m = DenseConnector.from_projector(spec, proj, backend=backend)
    want = _backward_flops(_loss(_original(hs, spec, proj, siglip)))
    got = _backward_flops(_loss(m(hs)))
    assert 0 < got <= want, f"backward GEMM FLOPs {got}, eager's {want}"


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name,path", [("clip-dci", "auto"), ("clip-dci", "fused"),
                                       ("clip-dci", "two-pass"), ("siglip-sci", "auto"),
                                       ("clip-sti", "auto")])
def test_frozen_vit_gradients_match_original(name, path, dtype):
    spec, proj, hs, siglip = _setup(name, dtype, seed=4)
    params = list(proj.parameters())

    def ours():
        y = dense_connector_linear(hs, spec, proj[0].weight, proj[0].bias, "gelu",
                                   backend="triton", path=path)
        return _loss(proj[2](y))
    got = torch.autograd.grad(ours(), params)
    want = torch.autograd.grad(_loss(_original(hs, spec, proj, siglip)), params)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=f"gradient of parameter {i}")


COMBOS = [c for c in itertools.product((False, True), repeat=3) if any(c)]
# (hidden states, weight, bias) need gradients: every combination on DCI with GELU, a few
# without the activation and on STI
GRAD_CASES = ([("clip-dci", c, "gelu") for c in COMBOS]
              + [("clip-dci", c, None) for c in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
              + [("clip-sti", c, "gelu") for c in ((1, 1, 1), (0, 1, 0), (0, 0, 1))])


@pytest.mark.parametrize("name,combo,activation", GRAD_CASES,
                         ids=["{}-hs{}-w{}-b{}-{}".format(n, *map(int, c), a)
                              for n, c, a in GRAD_CASES])
def test_every_combination_of_needed_gradients(name, combo, activation):
    # only the gradients that are asked for are produced, each equal to the original's
    hs_grad, w_grad, b_grad = map(bool, combo)
    spec, proj, hs, siglip = _setup(name, torch.float32, seed=5, hs_grad=hs_grad)
    w = proj[0].weight.detach().requires_grad_(w_grad)
    b = proj[0].bias.detach().requires_grad_(b_grad)
    inputs = [t for t, need in ((w, w_grad), (b, b_grad)) if need]
    inputs += [hs[i] for i in spec.used_layers] if hs_grad else []
    act = (lambda x: torch.nn.functional.gelu(x)) if activation else (lambda x: x)
    want = torch.autograd.grad(
        _loss(act(torch.nn.functional.linear(reference.features_from_spec(hs, spec), w, b))),
        inputs)
    for backend in BACKENDS:
        y = dense_connector_linear(hs, spec, w, b, activation, backend=backend)
        got = torch.autograd.grad(_loss(y), inputs)
        for i, (a, c) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, c, **TOL[torch.float32],
                                       msg=f"{backend}: gradient of input {i}")


@pytest.mark.parametrize("hs_grad", ("none", "all", "some"))
@pytest.mark.parametrize("name", ("clip-dci", "clip-sti"))
def test_double_backward_same_on_both_backends(name, hs_grad):
    # a gradient penalty: second-order gradients through GELU'', the kept A and the scatter.
    # "some": only odd layers need gradients, so A is kept and the second-order term through
    # dW = dZ^T A must reach them through A
    spec, proj, hs, siglip = _setup(name, torch.float32, seed=6, hs_grad=hs_grad == "all")
    if hs_grad == "some":
        hs = tuple(h.requires_grad_(i % 2 == 1) for i, h in enumerate(hs))
    params = list(proj.parameters())
    inputs = params + [hs[i] for i in spec.used_layers if hs[i].requires_grad]

    def second_order(forward):
        g = torch.autograd.grad(_loss(forward()), inputs, create_graph=True)
        penalty = sum((x.float() ** 2).sum() for x in g)
        gg = torch.autograd.grad(penalty, inputs, allow_unused=True)  # b2: no second order
        return [torch.zeros_like(t) if x is None else x for x, t in zip(gg, inputs)]
    want = second_order(lambda: _original(hs, spec, proj, siglip))
    for backend in BACKENDS:
        m = DenseConnector.from_projector(spec, proj, backend=backend)
        got = second_order(lambda: m(hs))
        for i, (a, b) in enumerate(zip(got, want)):
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * scale,
                                       msg=f"{backend}: second-order gradient of input {i}")


# --------------------------------------------------------------------------- checkpoint, compile
@pytest.mark.parametrize("hs_grad", (False, True), ids=("frozen", "hs-grad"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_checkpointing(backend, hs_grad):
    spec, proj, hs, siglip = _setup("clip-dci", torch.float32, seed=8, hs_grad=hs_grad)
    m = DenseConnector.from_projector(spec, proj, backend=backend)
    inputs = list(proj.parameters()) + ([hs[i] for i in spec.used_layers] if hs_grad else [])
    out, saved, _ = _saved(lambda: _loss(checkpoint(m, hs, use_reentrant=False)))
    got = torch.autograd.grad(out, inputs)
    want = torch.autograd.grad(_loss(m(hs)), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the recompute is the same launch
    _, plain, _ = _saved(lambda: _loss(m(hs)))
    assert saved < plain  # checkpointing kept less


@pytest.mark.parametrize("backend,hs_grad", [("torch", False), ("triton", False),
                                             ("triton", True)])
def test_compile_fullgraph_training_step(backend, hs_grad):
    spec, proj, hs, siglip = _setup("clip-dci", torch.float32, seed=9, hs_grad=hs_grad)
    m = DenseConnector.from_projector(spec, proj, backend=backend)
    inputs = list(proj.parameters()) + ([hs[i] for i in spec.used_layers] if hs_grad else [])

    lw = _loss_weights((2, 8, 24), torch.float32)

    def step(hidden_states):
        return _loss(m(hidden_states), lw)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, saved, ptrs = _saved(lambda: compiled(hs))
    got = torch.autograd.grad(out, inputs)
    want = torch.autograd.grad(_loss(_original(hs, spec, proj, siglip)), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    _, orig, _ = _saved(lambda: _loss(_original(hs, spec, proj, siglip)))
    assert saved <= orig
    if not hs_grad:
        assert not ptrs & _ptrs(hs)


def test_compile_inductor_training_step_triton():
    spec, proj, hs, siglip = _setup("clip-dci", torch.float32, seed=10)
    m = DenseConnector.from_projector(spec, proj, backend="triton")
    params = list(proj.parameters())
    torch._dynamo.reset()
    lw = _loss_weights((2, 8, 24), torch.float32)
    compiled = torch.compile(lambda h: _loss(m(h), lw), fullgraph=True)
    got = torch.autograd.grad(compiled(hs), params)
    want = torch.autograd.grad(_loss(_original(hs, spec, proj, siglip)), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# --------------------------------------------------------------------------- the training launch
@pytest.mark.parametrize("dtype,off64", [(torch.float32, False), (torch.float16, False),
                                         (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=str)
@pytest.mark.parametrize("path", ("fused", "two-pass", "overlap"))
def test_training_launch_returns_the_inference_launch_values(dtype, off64, path, monkeypatch):
    # Z is the same kernel's pre-activation: bit-equal to the activation-free launch; A is the
    # features kernel's output; the GELU output is unchanged by storing Z. Overlap: 3 ragged
    # row chunks of 16 (M = 40)
    monkeypatch.setattr(common, "FORCE_OFF64", off64)
    monkeypatch.setattr(overlap_ops, "OVERLAP_CHUNK_ROWS", 16)
    spec = ConnectorSpec("dci", final_layer=5, groups=((0, 3), (3, 6)), drop_cls=True)
    hs = make_hidden_states(6, 2, 21, 18, dtype, 11, device=DEVICE)
    g = torch.Generator().manual_seed(12)
    w = (torch.randn(37, 54, generator=g) / 8).to(DEVICE, dtype)
    b = torch.randn(37, generator=g).to(DEVICE, dtype)
    args = (hs, spec, 2, 21, 18, w, b)
    y = linear_ops.linear_triton(*args, "gelu", path)
    z = linear_ops.linear_triton(*args, None, path)
    a = features_ops.features_triton(hs, spec, 2, 21, 18)
    for keep_features in (False, True):
        y2, a2, z2 = linear_ops.linear_triton_for_training(
            *args, "gelu", path, keep_features=keep_features, keep_pre=True)
        # keep_features runs fused as two-pass: same A, fp32 sums in another order
        exact = path != "fused" or not keep_features
        if exact:
            assert torch.equal(y2, y) and torch.equal(z2, z)
        else:
            torch.testing.assert_close(y2, y, **TOL[dtype])
            torch.testing.assert_close(z2, z, **TOL[dtype])
        assert (a2 is not None) == keep_features
        if keep_features:
            assert torch.equal(a2, a)
    y3, a3, z3 = linear_ops.linear_triton_for_training(*args, None, path, keep_features=True)
    assert z3 is None and torch.equal(a3, a)


def test_training_launch_empty_shapes():
    spec = ConnectorSpec.preset("clip", "dci")
    w = torch.randn(5, 24, device=DEVICE)
    hs = make_hidden_states(25, 2, 1, 8, torch.float32, 13, device=DEVICE)  # only CLS
    y, a, z = linear_ops.linear_triton_for_training(hs, spec, 2, 1, 8, w, None, "gelu",
                                                    keep_features=True, keep_pre=True)
    assert y.shape == z.shape == (2, 0, 5) and a.shape == (2, 0, 24)
    hs = make_hidden_states(25, 2, 4, 8, torch.float32, 13, device=DEVICE)  # N = 0
    y, a, z = linear_ops.linear_triton_for_training(hs, spec, 2, 4, 8, w[:0], None, "gelu",
                                                    keep_features=True, keep_pre=True)
    assert y.shape == z.shape == (2, 3, 0)
    assert torch.equal(a, features_ops.features_triton(hs, spec, 2, 4, 8))


def test_raw_op_refuses_training_without_what_backward_needs():
    from dc_kernels.autograd import spec_args
    spec, proj, hs, _ = _setup("clip-dci", torch.float32)
    w, b = proj[0].weight, proj[0].bias
    with pytest.raises(RuntimeError, match="pre-activation was not kept"):
        torch.ops.dc_kernels.linear(list(hs), *spec_args(spec), w, b, "gelu", "auto",
                                    False, False)
    with pytest.raises(RuntimeError, match="features were not kept"):
        torch.ops.dc_kernels.linear(list(hs), *spec_args(spec), w, b, "none", "auto",
                                    False, False)
