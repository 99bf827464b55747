"""Hugging Face integration: DenseConnectorVisionTower, streaming accumulation, patch_llava (DC).

(The LLaVA family without a spec, LLaVA-NeXT / OneVision, the class-level patch, checkpoints and
round trips: test_integrations_hf_llava.py.)

Everything is offline: towers and LLaVA models are built from configs with random weights, at
tiny widths but the real depths (CLIP 24 layers, SigLIP 27), so the presets' layer indices are
exercised as they are on the real models. Images of 28 px with 4 px patches give 49 patches
(CLIP: + CLS = 50 tokens), not a multiple of the STI pool (8): the pool's dropped remainder is
exercised too.

The ground truth is the original pipeline: the tower run by transformers with
``output_hidden_states=True`` (SigLIP truncated with the original's own method, on a deepcopy),
``reference.select_image_features`` + ``reference.dense_connector`` + the original projector.
"""

import copy
import threading

import pytest
import torch
from torch import nn

import reference
from conftest import CUSTOM_SPECS, make_hidden_states
from dc_kernels import (BACKEND_ENV, ConnectorSpec, DenseConnector, DenseConnectorVisionTower,
                        StreamingFeatures, dense_connector_features, patch_llava)
from dc_kernels.integrations import project_features

from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel)

WIDTH = 32          # C
LLM = 40            # H
IMAGE, PATCH = 28, 4
BATCH = 2
DEPTH = {"clip": 24, "siglip": 27}

# Tolerances of the wrapper against the original pipeline. Both read the SAME hidden states
# (the tower's ops are the same, so they are bitwise equal; test_hidden_states_equal_transformers
# checks it); they differ only in how the features are rounded: the original rounds the stacked
# group sum and the divide in the input dtype, dc_kernels accumulates in fp32 and rounds once.
# * fp32: a few units of 2^-24 relative on the features, carried through the projector's two
#   Linears (fan-in 3C = 96 and H = 40, |weights| <= 1/sqrt(fan_in)): far below 1e-5 of the
#   largest output.
# * bf16: each of the original's two roundings moves a group mean by up to half a bf16 ulp, so
#   the features differ by up to ~1 ulp (2^-8 relative); both sides then round every Linear and
#   GELU output to bf16, so an output element can differ by 1-2 ulps of its own magnitude
#   (observed: 1 ulp of the largest output, ~4.4 for SigLIP). Allowed: 4 ulps of the largest
#   output (atol = 2^-5 * max|out|, as an ulp is at most 2^-7 |x|) plus 2^-6 relative.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2.0 ** -6, 2.0 ** -5)}
# Gradients w.r.t. the pixels go back through 24-27 layers. In fp32 the two backward graphs
# differ by fp32 rounding only (observed relative error of the whole gradient <= 5e-7): 1e-5.
# In bf16 every backward matmul of the tower rounds to bf16, on both sides, starting from
# feature gradients that differ by a bf16 ulp: compared in norm, not elementwise (small entries
# carry no bf16 precision); observed <= 1.5e-2, allowed 5e-2 (~13 bf16 ulps of 2^-8).
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def _assert_close(actual, expected, dtype):
    """``actual`` within TOL[dtype] of ``expected`` (atol scaled by the largest |expected|)."""
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # CPU tensors: "auto" is the torch backend unless the environment forces Triton
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def _vision_config(encoder, layers=None, width=WIDTH):
    cls = CLIPVisionConfig if encoder == "clip" else SiglipVisionConfig
    return cls(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
               num_hidden_layers=DEPTH[encoder] if layers is None else layers,
               image_size=IMAGE, patch_size=PATCH)


def _tower(encoder, layers=None, width=WIDTH, seed=0):
    torch.manual_seed(seed)
    cls = CLIPVisionModel if encoder == "clip" else SiglipVisionModel
    return cls(_vision_config(encoder, layers, width)).eval()


def _truncate_like_the_original(tower):
    """The original's SigLIP handling, applied to a deep copy: last layer and head deleted."""
    t = copy.deepcopy(tower)
    vm = getattr(t, "vision_model", t)  # transformers 4.x nests it, 5.x does not
    vm.encoder.layers = vm.encoder.layers[:-1]
    vm.head = nn.Identity()
    return t


_TOWERS = {}


def _towers(encoder, dtype):
    """(user's tower, tower the original pipeline runs), cached per encoder and dtype."""
    key = (encoder, dtype)
    if key not in _TOWERS:
        tower = _tower(encoder).to(dtype)
        original = _truncate_like_the_original(tower) if encoder == "siglip" else tower
        _TOWERS[key] = (tower, original)
    return _TOWERS[key]


def _pixels(dtype=torch.float32, seed=1, batch=BATCH):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=g).to(dtype)


def _projector(spec, dtype, seed=2):
    torch.manual_seed(seed)
    return reference.build_projector(spec.out_channels(WIDTH), LLM, "mlp2x_gelu").to(dtype)


def _original_encode_images(original_tower, encoder, connector_type, projector, pixels):
    """The original LLaVA + Dense Connector encode_images(), op for op."""
    is_siglip = encoder == "siglip"
    hs = original_tower(pixels, output_hidden_states=True).hidden_states
    image_features = reference.select_image_features(hs, is_siglip)
    return projector(reference.dense_connector(image_features, hs, is_siglip, connector_type))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def _hook_counts(tower):
    return [(len(layer._forward_hooks), len(layer._forward_pre_hooks))
            for layer in tower.encoder.layers]


# --------------------------------------------------------------------------- the tower
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "collected"])
@pytest.mark.parametrize("connector_type", ["dci", "sci", "sti"])
@pytest.mark.parametrize("encoder", ["clip", "siglip"])
def test_tower_equals_original_pipeline(encoder, connector_type, streaming, dtype, grad):
    tower, original = _towers(encoder, dtype)
    spec = ConnectorSpec.preset(encoder, connector_type)
    projector = _projector(spec, dtype)
    connector = DenseConnector.from_projector(spec, projector)
    pixels = _pixels(dtype).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        want = _original_encode_images(original, encoder, connector_type, projector, pixels)
    # (after the original ran: transformers installs its recording hooks on first use)
    layers_before = len(tower.encoder.layers)
    state = _state(tower)
    hooks = _hook_counts(tower)
    wrapper = DenseConnectorVisionTower(tower, connector, streaming=streaming)
    with torch.set_grad_enabled(grad):
        out = wrapper(pixels)
    assert out.shape == want.shape == (BATCH, wrapper.num_image_tokens, LLM)
    assert out.dtype == dtype
    assert out.requires_grad == grad
    _assert_close(out, want, dtype)

    if grad:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        wrt = (pixels, projector[0].weight)  # the tower's input and the projector's first layer
        got = torch.autograd.grad(out, wrt, g)
        ref = torch.autograd.grad(want, wrt, g)
        for name, a, b in zip(("pixels", "projector[0].weight"), got, ref):
            err = (a.double() - b.double()).norm() / b.double().norm()
            assert err <= GRAD_RTOL[dtype], f"gradient of {name}: relative error {err:.2e}"

    # the user's model is untouched: same layers, same weights, no hook left behind
    assert len(tower.encoder.layers) == layers_before == DEPTH[encoder]
    _assert_same_state(tower, state)
    assert _hook_counts(tower) == hooks
    if encoder == "siglip":
        assert not isinstance(tower.head, nn.Identity)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("connector_type", ["dci", "sci", "sti"])
@pytest.mark.parametrize("encoder", ["clip", "siglip"])
def test_streaming_features_equal_torch_path_bitwise(encoder, connector_type, dtype):
    # The streaming path follows the torch path's rules op for op (fp32 sums, one rounding), so
    # on the same hidden states it gives the same bits -- under no_grad and with grad.
    tower, _ = _towers(encoder, torch.float32)
    spec = ConnectorSpec.preset(encoder, connector_type)
    wrapper = DenseConnectorVisionTower(copy.deepcopy(tower).to(dtype),
                                        DenseConnector(spec, WIDTH, LLM).to(dtype))
    pixels = _pixels(dtype)
    with torch.no_grad():
        hs = wrapper.hidden_states(pixels)
        assert len(hs) == spec.num_hidden_states
        want = dense_connector_features(hs, spec, backend="torch")
        got = wrapper.streaming_features(pixels)
        assert torch.equal(got, want)
        assert torch.equal(wrapper(pixels), project_features(wrapper.connector, want))
    got = wrapper.streaming_features(pixels)
    assert got.requires_grad and torch.equal(got.detach(), want)


def test_hidden_states_equal_transformers():
    for encoder in ("clip", "siglip"):
        tower, original = _towers(encoder, torch.float32)
        wrapper = DenseConnectorVisionTower(tower, DenseConnector(
            ConnectorSpec.preset(encoder, "dci"), WIDTH, LLM))
        pixels = _pixels()
        with torch.no_grad():
            ours = wrapper.hidden_states(pixels)
            theirs = original(pixels, output_hidden_states=True).hidden_states
        assert len(ours) == len(theirs) == DEPTH[encoder] + (1 if encoder == "clip" else 0)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), f"{encoder} hidden state {i}"
        # HF's hidden_states[-1] is before SigLIP's post-layernorm; so is ours
        if encoder == "siglip":
            assert not torch.allclose(tower.post_layernorm(ours[-1]), ours[-1])


def test_custom_spec_runs_only_the_layers_it_reads():
    # a custom spec on a CLIP tower, reading hidden states 0..5 only; no fixed depth
    spec = ConnectorSpec("dci", final_layer=4, groups=((0, 3), (2, 6)), drop_cls=True)
    tower, _ = _towers("clip", torch.float32)
    projector = _projector(spec, torch.float32)
    calls = [0] * len(tower.encoder.layers)
    handles = [layer.register_forward_pre_hook(
        lambda m, a, k=k: calls.__setitem__(k, calls[k] + 1))
        for k, layer in enumerate(tower.encoder.layers)]
    try:
        pixels = _pixels()
        with torch.no_grad():
            hs = tower(pixels, output_hidden_states=True).hidden_states
            want = projector(reference.features_from_spec(hs, spec))
            calls[:] = [0] * len(calls)
            for streaming, ran in ((True, 5), (False, 24)):
                wrapper = DenseConnectorVisionTower(
                    tower, DenseConnector.from_projector(spec, projector), streaming=streaming)
                _assert_close(wrapper(pixels), want, torch.float32)
                assert calls == [1] * ran + [0] * (24 - ran), streaming
                calls[:] = [0] * len(calls)
    finally:
        for h in handles:
            h.remove()


def test_already_truncated_siglip_with_drop_last_layer_false():
    tower, original = _towers("siglip", torch.float32)
    spec = ConnectorSpec.preset("siglip", "dci")
    connector = DenseConnector(spec, WIDTH, LLM)
    pixels = _pixels()
    with torch.no_grad():
        want = DenseConnectorVisionTower(tower, connector)(pixels)
        got = DenseConnectorVisionTower(original, connector, drop_last_layer=False)(pixels)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="27 hidden states"):
        DenseConnectorVisionTower(original, connector)  # would drop a second layer


def test_inner_vision_model_attribute_is_resolved():
    # transformers 4.x keep the transformer in .vision_model; CLIPVisionModelWithProjection
    # does in 5.x too
    from transformers import CLIPVisionModelWithProjection
    torch.manual_seed(0)
    outer = CLIPVisionModelWithProjection(_vision_config("clip")).eval()
    spec = ConnectorSpec.preset("clip", "sci")
    projector = _projector(spec, torch.float32)
    wrapper = DenseConnectorVisionTower(outer, DenseConnector.from_projector(spec, projector))
    pixels = _pixels()
    with torch.no_grad():
        want = _original_encode_images(outer.vision_model, "clip", "sci", projector, pixels)
        _assert_close(wrapper(pixels), want, torch.float32)


# --------------------------------------------------------------------------- errors
def test_depth_and_width_mismatch_errors():
    spec = ConnectorSpec.preset("clip", "dci")
    with pytest.raises(ValueError, match=r"23 encoder layers.*24 hidden states.*exactly 25"):
        DenseConnectorVisionTower(_tower("clip", layers=23), DenseConnector(spec, WIDTH, LLM))
    siglip = ConnectorSpec.preset("siglip", "sci")
    with pytest.raises(ValueError, match=r"26 encoder layers \(its last layer dropped"):
        DenseConnectorVisionTower(_tower("siglip", layers=26), DenseConnector(siglip, WIDTH, LLM))
    with pytest.raises(ValueError, match="exactly 25 .*got 27"):  # a CLIP spec, SigLIP tower
        DenseConnectorVisionTower(_towers("siglip", torch.float32)[0],
                                  DenseConnector(spec, WIDTH, LLM))
    # a custom spec too deep for the tower
    deep = ConnectorSpec("dci", final_layer=30, groups=((0, 2),))
    with pytest.raises(ValueError, match="at least 31"):
        DenseConnectorVisionTower(_towers("clip", torch.float32)[0],
                                  DenseConnector(deep, WIDTH, LLM))
    with pytest.raises(ValueError, match=r"32 wide.*vision_hidden_size=48"):
        DenseConnectorVisionTower(_towers("clip", torch.float32)[0],
                                  DenseConnector(spec, 48, LLM))


def test_type_errors():
    tower = _towers("clip", torch.float32)[0]
    connector = DenseConnector(ConnectorSpec.preset("clip", "dci"), WIDTH, LLM)
    with pytest.raises(TypeError, match="DenseConnector"):
        DenseConnectorVisionTower(tower, reference.build_projector(3 * WIDTH, LLM))
    with pytest.raises(TypeError, match="embeddings"):
        DenseConnectorVisionTower(nn.Linear(3, 3), connector)
    with pytest.raises(TypeError, match="streaming must be a bool"):
        DenseConnectorVisionTower(tower, connector, streaming="yes")
    wrapper = DenseConnectorVisionTower(tower, connector)
    with pytest.raises(TypeError, match="pixel_values"):
        wrapper([_pixels()[0]])
    with pytest.raises(ValueError, match="4-D"):
        wrapper(_pixels()[0])
    # the projector's dtype must match the tower's (the streaming path says so clearly)
    with pytest.raises(ValueError, match="bfloat16"):
        DenseConnectorVisionTower(tower, copy.deepcopy(connector).to(torch.bfloat16))(_pixels())


def test_unsupported_tower_model_type():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    tower = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=WIDTH, intermediate_size=64,
                                                   num_attention_heads=4, num_hidden_layers=27))
    with pytest.raises(TypeError, match="siglip2_vision_model"):
        DenseConnectorVisionTower(tower, DenseConnector(ConnectorSpec.preset("siglip"), WIDTH,
                                                        LLM))


@pytest.mark.parametrize("failure", ["layer_raises", "hook_raises"])
def test_hooks_removed_on_exception(failure, monkeypatch):
    tower = _tower("clip")  # fresh: transformers never installed its recording hooks on it
    layers = tower.encoder.layers
    assert all(len(layer._forward_hooks) == 0 for layer in layers)
    wrapper = DenseConnectorVisionTower(tower, DenseConnector(ConnectorSpec.preset("clip"),
                                                              WIDTH, LLM))
    seen = {}
    original_forward = layers[5].forward

    def broken(hidden_states, *args, **kwargs):
        seen["hooks_during_run"] = [len(layer._forward_hooks) for layer in layers]
        if failure == "layer_raises":
            raise RuntimeError("layer 5 failed")
        return original_forward(hidden_states, *args, **kwargs)[:, :-1]  # a malformed output

    monkeypatch.setattr(layers[5], "forward", broken)
    err = RuntimeError if failure == "layer_raises" else ValueError
    with pytest.raises(err, match="layer 5 failed" if failure == "layer_raises"
                       else "hidden state 6"):
        wrapper(_pixels())
    # the hooks were there during the run (one per layer it runs) ...
    assert seen["hooks_during_run"] == [1] * 23 + [0]
    # ... and are gone now
    assert all(len(layer._forward_hooks) == 0 for layer in layers)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)


def test_concurrent_streaming_forwards_do_not_mix(monkeypatch):
    # The hooks are on shared layers: while one streaming forward runs, another thread runs
    # the same tower. Each call must see only its own layer outputs.
    tower = _tower("clip")
    wrapper = DenseConnectorVisionTower(tower, DenseConnector(ConnectorSpec.preset("clip"),
                                                              WIDTH, LLM))
    pixels_a, pixels_b = _pixels(seed=1), _pixels(seed=2)
    with torch.no_grad():
        want_a, want_b = wrapper(pixels_a), wrapper(pixels_b)
    results = {}
    layer = tower.encoder.layers[3]
    original_forward = layer.forward

    def forward(hidden_states, *args, **kwargs):
        if threading.current_thread() is threading.main_thread() and "b" not in results:
            def other():
                try:
                    with torch.no_grad():
                        results["b"] = wrapper(pixels_b)
                except Exception as e:  # reported below
                    results["b"] = e
            t = threading.Thread(target=other)
            t.start()
            t.join()
        return original_forward(hidden_states, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", forward)
    with torch.no_grad():
        got_a = wrapper(pixels_a)
    assert isinstance(results["b"], torch.Tensor), repr(results["b"])
    assert torch.equal(got_a, want_a)
    assert torch.equal(results["b"], want_b)


def test_transformers_recording_hooks_stay_quiet():
    # transformers >= 5 records hidden states with forward hooks on the layers, active while a
    # collector is set. Our layer calls must not leak into an enclosing model's collection.
    from transformers.utils import output_capturing
    tower = _tower("clip")
    with torch.no_grad():
        tower(_pixels(), output_hidden_states=True)  # installs transformers' hooks
    wrapper = DenseConnectorVisionTower(tower, DenseConnector(ConnectorSpec.preset("clip"),
                                                              WIDTH, LLM))
    collected = {"hidden_states": []}
    token = output_capturing._active_collector.set(collected)
    try:
        with torch.no_grad():
            h = tower.embeddings(_pixels())
            tower.encoder.layers[0](h, None)  # called bare, the hook records ...
            assert len(collected["hidden_states"]) == 2
            collected["hidden_states"].clear()
            for streaming in (True, False):
                wrapper.streaming = streaming
                wrapper(_pixels())  # ... but not through the wrapper
    finally:
        output_capturing._active_collector.reset(token)
    assert collected["hidden_states"] == []


# --------------------------------------------------------------------------- StreamingFeatures
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(CUSTOM_SPECS))
def test_streaming_features_custom_specs(name, dtype):
    spec, n = CUSTOM_SPECS[name]
    hs = make_hidden_states(n, 2, 13, 8, dtype, seed=4, requires_grad=True)
    acc = StreamingFeatures(spec)
    for i, h in enumerate(hs):
        acc.add(i, h)
    got = acc.finish()
    want = dense_connector_features(hs, spec, backend="torch")
    assert torch.equal(got, want)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    used = [hs[i] for i in spec.used_layers]
    for a, b in zip(torch.autograd.grad(got, used, g), torch.autograd.grad(want, used, g)):
        assert torch.equal(a, b)


def test_streaming_features_errors():
    spec = ConnectorSpec("dci", final_layer=3, groups=((0, 2), (2, 4)))
    hs = make_hidden_states(5, 2, 6, 4)
    acc = StreamingFeatures(spec)
    assert acc.last_index == 3
    acc.add(0, hs[0])
    with pytest.raises(ValueError, match="increasing index order"):
        acc.add(0, hs[0])
    with pytest.raises(ValueError, match=r"hidden state 1 is \(2, 5, 4\)"):
        acc.add(1, hs[1][:, :5])
    with pytest.raises(ValueError, match="dtype|float64"):
        acc.add(1, hs[1].double())
    with pytest.raises(TypeError, match="torch.Tensor"):
        acc.add(1, [1.0])
    with pytest.raises(ValueError, match=r"hidden state\(s\) \[1\], which the spec reads, "
                                         "were skipped"):
        acc.add(2, hs[2])  # index 1 skipped: its group could never be completed
    acc.add(1, hs[1])
    acc.add(2, hs[2])
    with pytest.raises(ValueError, match=r"incomplete.*up to index 3.*missing: \[3\]"):
        acc.finish()   # index 3 never came
    with pytest.raises(TypeError, match="ConnectorSpec"):
        StreamingFeatures("dci")
    done = StreamingFeatures(spec)
    for i in range(4):
        done.add(i, hs[i])
    done.finish()
    with pytest.raises(RuntimeError, match="already called"):
        done.add(4, hs[4])


@pytest.mark.parametrize("ptype", ["linear", "mlp3x_gelu", "identity"])
def test_project_features_equals_connector(ptype):
    spec = ConnectorSpec.preset("clip", "dci")
    torch.manual_seed(0)
    connector = DenseConnector(spec, 8, 12, ptype)
    hs = make_hidden_states(25, 2, 9, 8, seed=6)
    feats = dense_connector_features(hs, spec, backend="torch")
    torch.testing.assert_close(project_features(connector, feats), connector(hs),
                               rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- LLaVA
IMAGE_TOKEN = 99


def _llava(encoder="clip", seed=0):
    torch.manual_seed(seed)
    text = LlamaConfig(hidden_size=LLM, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                       max_position_embeddings=512)
    config = LlavaConfig(vision_config=_vision_config(encoder), text_config=text,
                         image_token_id=IMAGE_TOKEN)
    return LlavaForConditionalGeneration(config).eval()


def _prompt(n_image_tokens, batch=BATCH, seed=7):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, IMAGE_TOKEN, (batch, 5), generator=g)
    image = torch.full((batch, n_image_tokens), IMAGE_TOKEN)
    return torch.cat([text[:, :2], image, text[:, 2:]], dim=1)


@pytest.mark.parametrize("encoder,connector_type,streaming", [
    ("clip", "dci", True), ("clip", "sti", False), ("siglip", "sci", True)])
def test_patch_llava_image_features_and_generate(encoder, connector_type, streaming):
    model = _llava(encoder)
    spec = ConnectorSpec.preset(encoder, connector_type)
    assert patch_llava(model, spec, streaming=streaming) is model
    inner = model.model
    connector = inner.multi_modal_projector
    assert isinstance(connector, DenseConnector) and connector.spec == spec
    assert connector.get_submodule("0").in_features == spec.out_channels(WIDTH)
    assert "model.multi_modal_projector.0.weight" in model.state_dict()
    assert len(inner.vision_tower.encoder.layers) == DEPTH[encoder]  # tower not truncated

    pixels = _pixels()
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels).pooler_output
        tower = inner.vision_tower
        if encoder == "siglip":
            tower = _truncate_like_the_original(tower)
        hs = tower(pixels, output_hidden_states=True).hidden_states
        want = connector(hs)
    assert len(feats) == BATCH
    _assert_close(torch.stack(feats), want, torch.float32)

    n = inner.dense_connector_tower.num_image_tokens
    assert n == want.shape[1]
    ids = _prompt(n)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
        assert out.logits.shape == (BATCH, ids.shape[1], 100)
        assert len(out.hidden_states) == 3  # the LLM's: embeddings + 2 layers, nothing leaked
        # the image tokens' inputs are the Dense Connector features
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == IMAGE_TOKEN] = want.reshape(-1, LLM)
        ref = model(inputs_embeds=embeds)
        _assert_close(out.logits, ref.logits, torch.float32)
        gen = model.generate(input_ids=ids, pixel_values=pixels,
                             attention_mask=torch.ones_like(ids), max_new_tokens=2,
                             do_sample=False)
    assert gen.shape == (BATCH, ids.shape[1] + 2)


def test_patch_llava_loads_original_checkpoint_and_follows_dtype(tmp_path):
    model = _llava().to(torch.bfloat16)
    spec = ConnectorSpec.preset("clip", "dci")
    torch.manual_seed(3)
    original = reference.build_projector(spec.out_channels(WIDTH), LLM)
    path = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in original.state_dict().items()}, path)
    patch_llava(model, spec, checkpoint=str(path))
    connector = model.model.multi_modal_projector
    for k, v in original.state_dict().items():
        assert connector.state_dict()[k].dtype == torch.bfloat16
        assert torch.equal(connector.state_dict()[k], v.to(torch.bfloat16)), k
    n = model.model.dense_connector_tower.num_image_tokens
    with torch.no_grad():
        out = model(input_ids=_prompt(n), pixel_values=_pixels())  # fp32 pixels are cast
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


def test_patch_llava_wraps_given_projector():
    model = _llava()
    spec = ConnectorSpec.preset("clip", "sci")
    projector = reference.build_projector(spec.out_channels(WIDTH), LLM)
    patch_llava(model, spec, connector=projector)
    assert model.model.multi_modal_projector.get_submodule("0").weight is projector[0].weight


def test_patch_llava_errors():
    spec = ConnectorSpec.preset("clip", "dci")
    with pytest.raises(ValueError, match="needs spec"):  # a projector module to wrap
        patch_llava(_llava(), connector=reference.build_projector(3 * WIDTH, LLM))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        patch_llava(nn.Linear(2, 2), spec)
    with pytest.raises(ValueError, match="language model is 40 wide"):
        patch_llava(_llava(), connector=DenseConnector(spec, WIDTH, 64))
    with pytest.raises(ValueError, match="exactly 27"):  # SigLIP spec, CLIP tower
        patch_llava(_llava(), ConnectorSpec.preset("siglip", "dci"))
    with pytest.raises(ValueError, match="differs"):
        patch_llava(_llava(), ConnectorSpec.preset("clip", "sci"),
                    connector=DenseConnector(spec, WIDTH, LLM))
    model = _llava()
    patch_llava(model, spec)
    with pytest.raises(ValueError, match="already patched"):
        patch_llava(model, spec)
    with pytest.raises(NotImplementedError, match="image_sizes"):
        model.get_image_features(pixel_values=_pixels(), image_sizes=torch.tensor([[28, 28]]))
    # a failed patch leaves the model as it was
    model = _llava()
    before = _state(model)
    with pytest.raises(ValueError):
        patch_llava(model, ConnectorSpec.preset("siglip", "dci"))
    _assert_same_state(model, before)
    assert getattr(model.model, "dense_connector_tower", None) is None
