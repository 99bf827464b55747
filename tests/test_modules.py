"""DenseConnector module, autograd of the Triton ops, torch.compile, checkpoints, autocast.

Backends: "torch" everywhere; "triton" on CUDA or the CPU interpreter (conftest). Gradients are
compared with the reference's autograd graph (the original's ops) on the same inputs.
"""

import pytest
import torch
from torch import nn

import reference
from conftest import make_hidden_states, poison_outputs
from dc_kernels import (BACKEND_ENV, ConnectorSpec, DenseConnector, dense_connector_features,
                        dense_connector_linear)
from dc_kernels.ops import linear as linear_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton")
TOKENS = {"clip": 9, "siglip": 11}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    poison_outputs(monkeypatch)


def _original(hs, spec, projector, is_siglip):
    feats = reference.dense_connector(reference.select_image_features(hs, is_siglip), hs,
                                      is_siglip, spec.connector_type)
    return projector(feats)


def _setup(encoder, connector, dtype, C=16, H=24, B=2, requires_grad=False, ptype="mlp2x_gelu",
           seed=0):
    spec = ConnectorSpec.preset(encoder, connector)
    torch.manual_seed(seed)
    proj = reference.build_projector(spec.out_channels(C), H, ptype).to(DEVICE, dtype)
    hs = make_hidden_states(spec.num_hidden_states, B, TOKENS[encoder], C, dtype, seed,
                            device=DEVICE, requires_grad=requires_grad)
    return spec, proj, hs


TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float16: dict(rtol=4e-3, atol=4e-3),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float64: dict(rtol=1e-10, atol=1e-10)}
# The original rounds the group sum and the divide in the input dtype and we round once, so the
# two differ by a few units of the input dtype's rounding (2^-8 bf16, 2^-11 fp16) on features of
# magnitude ~1, carried through two Linear layers whose weights have |row| ~ 1: a few ulps of
# output plus the matmuls' own fp32-accumulation differences.


# --------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("ptype,keys", [
    ("mlp2x_gelu", ["0.weight", "0.bias", "2.weight", "2.bias"]),
    ("mlp3x_gelu", ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]),
    ("linear", ["weight", "bias"]),
    ("identity", []),
])
def test_state_dict_keys_are_the_originals(ptype, keys):
    spec = ConnectorSpec.preset("clip", "dci")
    m = DenseConnector(spec, 16, 24, ptype)
    orig = reference.build_projector(spec.out_channels(16), 24, ptype)
    assert list(m.state_dict()) == keys == list(orig.state_dict())
    m.load_state_dict(orig.state_dict(), strict=True)
    for k, v in orig.state_dict().items():
        assert torch.equal(m.state_dict()[k], v)
    orig.load_state_dict(m.state_dict(), strict=True)  # and back


def test_from_projector_shares_parameters():
    spec, proj, hs = _setup("clip", "dci", torch.float32)
    m = DenseConnector.from_projector(spec, proj)
    assert m.vision_hidden_size == 16 and m.hidden_size == 24
    assert {id(p) for p in m.parameters()} == {id(p) for p in proj.parameters()}
    with torch.no_grad():
        proj[0].bias.add_(1.0)  # visible through the module: no copy
    torch.testing.assert_close(m(hs), _original(hs, spec, proj, False), **TOL[torch.float32])


def test_load_mm_projector_from_original_checkpoint(tmp_path):
    spec, proj, hs = _setup("siglip", "dci", torch.float32)
    m = DenseConnector(spec, 16, 24).to(DEVICE)
    ckpt = {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
    ckpt["model.layers.0.weight"] = torch.zeros(3)  # the rest of an LLM checkpoint: ignored
    path = tmp_path / "mm_projector.bin"
    torch.save(ckpt, path)
    m.load_mm_projector(path)
    torch.testing.assert_close(m(hs), _original(hs, spec, proj, True), **TOL[torch.float32])
    m2 = DenseConnector(spec, 16, 24).to(DEVICE)
    m2.load_mm_projector({f"mm_projector.{k}": v for k, v in proj.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(),
                                                 proj.state_dict().values()))


@pytest.mark.parametrize("edit,msg", [
    (lambda sd: sd.pop("2.bias"), r"missing keys \['2.bias'\]"),
    (lambda sd: sd.__setitem__("0.weight", torch.zeros(24, 47)), r"misshaped keys \['0.weight"),
    (lambda sd: sd.__setitem__("4.weight", torch.zeros(1)), r"unexpected keys \['4.weight'\]"),
])
def test_load_mm_projector_errors(edit, msg):
    spec = ConnectorSpec.preset("clip", "dci")
    sd = dict(reference.build_projector(48, 24).state_dict())
    edit(sd)
    with pytest.raises(ValueError, match=msg):
        DenseConnector(spec, 16, 24).load_mm_projector({f"mm_projector.{k}": v
                                                        for k, v in sd.items()})


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("encoder,connector", [("clip", "dci"), ("siglip", "dci"),
                                               ("clip", "sci"), ("siglip", "sti")])
def test_forward_matches_original(encoder, connector, dtype, backend):
    spec, proj, hs = _setup(encoder, connector, dtype)
    m = DenseConnector.from_projector(spec, proj, backend=backend)
    out = m(hs)
    B, T, _ = hs[0].shape
    assert out.shape == (B, spec.out_tokens(T), 24) and out.dtype == dtype
    torch.testing.assert_close(out, _original(hs, spec, proj, encoder == "siglip"), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ptype", ("linear", "mlp3x_gelu", "identity"))
def test_other_projector_types(ptype, backend):
    spec, proj, hs = _setup("clip", "dci", torch.float32, ptype=ptype)
    m = DenseConnector(spec, 16, 24, ptype, backend=backend).to(DEVICE)
    m.load_state_dict(proj.state_dict())
    torch.testing.assert_close(m(hs), _original(hs, spec, proj, False), **TOL[torch.float32])


# --------------------------------------------------------------------------- backward
def _grads(out, tensors):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    grads = torch.autograd.grad((out * w).sum(), tensors, allow_unused=True)
    return grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("encoder,connector", [("clip", "dci"), ("siglip", "sci"),
                                               ("siglip", "sti"), ("clip", "sti")])
def test_backward_matches_original(encoder, connector, dtype, backend):
    spec, proj, hs = _setup(encoder, connector, dtype, requires_grad=True)
    m = DenseConnector.from_projector(spec, proj, backend=backend)
    params = list(proj.parameters())
    got = _grads(m(hs), list(hs) + params)
    want = _grads(_original(hs, spec, proj, encoder == "siglip"), list(hs) + params)
    used = set(spec.used_layers)
    for i, (a, b) in enumerate(zip(got, want)):
        if i < len(hs) and i not in used:
            assert a is None and (b is None or not b.any()), f"unused layer {i} got a gradient"
            continue
        assert a is not None, f"no gradient for input {i}"
        torch.testing.assert_close(a, b, **TOL[dtype], msg=f"gradient of input {i}")


def test_layer_in_two_slabs_gets_both_contributions():
    # CLIP DCI: layer 23 is the base AND a member of group (12, 24)
    for backend in BACKENDS:
        spec, proj, hs = _setup("clip", "dci", torch.float32, requires_grad=True)
        y = dense_connector_linear(hs, spec, proj[0].weight, proj[0].bias, "gelu",
                                   backend=backend)
        g23, g22 = _grads(y, [hs[23], hs[22]])
        y_ref = proj[1](proj[0](reference.features_fp64(hs, spec).float()))
        r23, r22 = _grads(y_ref, [hs[23], hs[22]])
        torch.testing.assert_close(g23, r23, **TOL[torch.float32])
        torch.testing.assert_close(g22, r22, **TOL[torch.float32])
        assert not g23[:, 0].any()  # CLS gets no gradient


def test_gradcheck_torch_backend_fp64():
    spec = ConnectorSpec("dci", final_layer=2, groups=((0, 2), (1, 4)), drop_cls=True)
    hs = make_hidden_states(4, 1, 4, 3, torch.float64, seed=3, requires_grad=True)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)

    def f(*args):
        return dense_connector_linear(args[:4], spec, args[4], args[5], "gelu", backend="torch")
    assert torch.autograd.gradcheck(f, (*hs, w, b))


def test_features_op_gradients_triton():
    spec = ConnectorSpec("dci", final_layer=3, groups=((0, 4), (2, 6)), drop_cls=True)
    hs = make_hidden_states(6, 2, 7, 5, torch.float32, seed=5, device=DEVICE,
                            requires_grad=True)
    got = _grads(dense_connector_features(hs, spec, backend="triton"), list(hs))
    want = _grads(dense_connector_features(hs, spec, backend="torch"), list(hs))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_forward_backward(backend):
    spec, proj, hs = _setup("clip", "dci", torch.float32, requires_grad=True)
    m = DenseConnector.from_projector(spec, proj, backend=backend)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(hs)
    torch.testing.assert_close(out, m(hs), **TOL[torch.float32])
    got = _grads(out, list(hs[20:]) + list(proj.parameters()))
    want = _grads(m(hs), list(hs[20:]) + list(proj.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_compile_inductor_triton_op():
    spec, proj, hs = _setup("siglip", "dci", torch.float32)
    m = DenseConnector.from_projector(spec, proj, backend="triton")
    with torch.no_grad():
        out = torch.compile(m, fullgraph=True)(hs)
    torch.testing.assert_close(out, _original(hs, spec, proj, True).detach(),
                               **TOL[torch.float32])


# --------------------------------------------------------------------------- autocast, env
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_behaves_like_nn_linear(backend):
    # autocast (bf16): nn.Linear casts input, weight and bias and returns bf16
    spec, proj, hs = _setup("clip", "dci", torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want = nn.functional.gelu(proj[0](dense_connector_features(hs, spec)))
        got = dense_connector_linear(hs, spec, proj[0].weight, proj[0].bias, "gelu",
                                     backend=backend)
    assert want.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])


def test_env_forces_backend(monkeypatch):
    spec, proj, hs = _setup("clip", "dci", torch.float32)
    m = DenseConnector.from_projector(spec, proj)
    calls = []
    # the custom op (compile) and the eager plan route
    for name in ("linear_triton", "linear_triton_for_training", "prepare_linear"):
        real = getattr(linear_ops, name)
        monkeypatch.setattr(linear_ops, name,
                            lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    monkeypatch.setenv(BACKEND_ENV, "triton")
    a = m(hs)
    assert calls, "DC_KERNELS_BACKEND=triton did not reach the Triton launcher"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    calls.clear()
    b = m(hs)
    assert not calls
    torch.testing.assert_close(a, b, **TOL[torch.float32])


# --------------------------------------------------------------------------- errors
def test_module_errors():
    spec, proj, hs = _setup("clip", "dci", torch.float32)
    m = DenseConnector.from_projector(spec, proj)
    with pytest.raises(ValueError, match="exactly 25 hidden states"):
        m(hs[:24])
    with pytest.raises(ValueError, match="vision_hidden_size=16"):
        m([h[..., :8] for h in hs])
    bad = list(hs)
    bad[5] = bad[5][:, :-1]
    with pytest.raises(ValueError, match=r"hidden_states\[5\] has shape"):
        m(bad)
    bad = list(hs)
    bad[7] = bad[7].double()
    with pytest.raises(ValueError, match=r"hidden_states\[7\] has dtype"):
        m(bad)
    bad = list(hs)
    bad[9] = bad[9].to("meta")
    with pytest.raises(ValueError, match=r"hidden_states\[9\] is on meta"):
        m(bad)
    bad = list(hs)
    bad[3] = "layer"
    with pytest.raises(TypeError, match=r"hidden_states\[3\] must be a torch.Tensor"):
        m(bad)
    with pytest.raises(ValueError, match="first Linear takes 48"):
        DenseConnector(ConnectorSpec("dci", 23, ((0, 12),), drop_cls=True), 16, 24,
                       _projector=proj)
    with pytest.raises(ValueError, match="original projector"):
        DenseConnector.from_projector(spec, nn.Sequential(nn.Linear(48, 24), nn.ReLU(),
                                                          nn.Linear(24, 24)))
    with pytest.raises(TypeError, match="ConnectorSpec"):
        DenseConnector("clip", 16, 24)


@pytest.mark.parametrize("ptype", ("linear", "mlp2x_gelu", "mlp3x_gelu", "identity"))
def test_project_applies_the_projector_alone(ptype):
    spec, proj, hs = _setup("clip", "dci", torch.float32, ptype=ptype)
    m = DenseConnector(spec, 16, 24, ptype).to(DEVICE)
    m.load_state_dict(proj.state_dict())
    feats = reference.dense_connector(reference.select_image_features(hs, False), hs, False)
    torch.testing.assert_close(m.project(feats), proj(feats), **TOL[torch.float32])
    if ptype != "identity":
        with pytest.raises(ValueError, match="weights are torch.float32"):
            m.project(feats.double())
