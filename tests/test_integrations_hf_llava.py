"""The transformers LLaVA family through dc_kernels: LLaVA, LLaVA-NeXT (AnyRes), LLaVA-OneVision.

Ground truth:

* no spec (the model's own ``vision_feature_layer`` and projector): **stock transformers**, a
  deep copy of the same model left unpatched. The patched model runs the same modules on the
  same inputs with the same ops (a list of layers is copied into its channel slabs, as
  ``torch.cat`` does), so features and logits must be equal bit for bit, in fp32 and in bf16 --
  the stated bound is 0 (stricter than the issue's 1e-5 relative in fp32).
* a Dense Connector spec: **the original's semantics**: the tower run by transformers with
  ``output_hidden_states=True`` (SigLIP truncated by the original's own method),
  ``reference.dense_connector`` + the original projector on every crop, then the original
  LLaVA-NeXT packing, transcribed below from the original code's conventions (``(width,
  height)`` image sizes and pinpoints, ``int()`` in the unpadding). Tolerances as in
  ``test_integrations_hf.py`` (``TOL``): the original rounds each group mean twice in the input
  dtype, dc_kernels once.

Towers have the real depths (CLIP 24 layers, SigLIP 27; OneVision's SigLIP 26, as transformers'
OneVision configs), tiny widths, random weights, fp32 unless a test says otherwise.
"""

import copy
import json
import types

import pytest
import torch
from torch import nn

import reference
from dc_kernels import (BACKEND_ENV, ConnectorSpec, DenseConnector, VisionFeatureLayers,
                        apply_dense_connector_to_llava, dense_connector_features, patch_llava,
                        revert_dense_connector_to_llava, unpatch_llava)
from dc_kernels.integrations import read_projector_checkpoint
from dc_kernels.integrations.llava import _video_features_end_with_newline, class_patch_active

from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration, SiglipVisionConfig,
                          SiglipVisionModel)

WIDTH, LLM, IMAGE, PATCH = 32, 40, 20, 4
GRID = IMAGE // PATCH                       # 5 x 5 = 25 patches per crop
DEPTH = {"clip": 24, "siglip": 27}
IMAGE_TOKEN, VIDEO_TOKEN, VOCAB = 99, 98, 100
# symmetric, as LLaVA-NeXT's own list: the original reads pinpoints as (w, h), transformers as
# (h, w); on a symmetric list both pick the same physical grid
PINPOINTS = [[20, 40], [40, 20], [40, 40]]
IMAGE_SIZES = [[21, 36], [50, 14], [18, 18]]   # (height, width): landscape, portrait, square
# sizes where the original and transformers choose the same crop grid (see
# test_anyres_grid_choice_matches_the_original_except_ties)
ORIGINAL_SIZES = [[21, 36], [50, 14], [15, 33]]
CROPS = 5                                       # the most crops an image of PINPOINTS gets
# the Dense Connector against the original (see test_integrations_hf.py for the derivation)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2.0 ** -6, 2.0 ** -5)}


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)


@pytest.fixture(autouse=True)
def _no_class_patch_left():
    yield
    if class_patch_active():  # a failing test must not leave the classes patched
        revert_dense_connector_to_llava()
        pytest.fail("the class-level patch was left active")


# --------------------------------------------------------------------------- builders
def _vision_config(encoder, layers=None, attn=None):
    cls = CLIPVisionConfig if encoder == "clip" else SiglipVisionConfig
    kwargs = dict(attn_implementation=attn) if attn else {}
    return cls(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=4,
               num_hidden_layers=DEPTH[encoder] if layers is None else layers,
               image_size=IMAGE, patch_size=PATCH, **kwargs)


def _text_config():
    return LlamaConfig(hidden_size=LLM, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                       max_position_embeddings=1024)


def _model(family, encoder="clip", layer=-2, strategy="default", layers=None, seed=0,
           dtype=torch.float32):
    torch.manual_seed(seed)
    common = dict(vision_config=_vision_config(encoder, layers), text_config=_text_config(),
                  image_token_id=IMAGE_TOKEN, vision_feature_layer=layer,
                  vision_feature_select_strategy=strategy)
    if family == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
    elif family == "llava_next":
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(
            image_grid_pinpoints=PINPOINTS, **common))
    else:
        model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
            image_grid_pinpoints=PINPOINTS, video_token_id=VIDEO_TOKEN,
            vision_aspect_ratio="anyres_max_1", **common))  # max 1: the downscaling runs too
    return model.to(dtype).eval()


def _inputs(family, seed=1, dtype=torch.float32):
    """Model inputs for two images (AnyRes: 2 images, padded to CROPS crops each)."""
    g = torch.Generator().manual_seed(seed)
    if family == "llava":
        return dict(pixel_values=torch.randn(2, 3, IMAGE, IMAGE, generator=g).to(dtype))
    return dict(pixel_values=torch.randn(2, CROPS, 3, IMAGE, IMAGE, generator=g).to(dtype),
                image_sizes=torch.tensor(IMAGE_SIZES[:2]))


def _prompt(token_counts, seed=7, token=IMAGE_TOKEN):
    """One prompt (batch 1) with an image placeholder run per image, text between them."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, VIDEO_TOKEN, (2,), generator=g)]
    for n in token_counts:
        parts += [torch.full((n,), token), torch.randint(0, VIDEO_TOKEN, (2,), generator=g)]
    return torch.cat(parts)[None]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def _assert_close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def _assert_grad_close(actual, expected):
    """Gradients: the same terms, summed in another order where a layer feeds both its slab and
    the next layer (autograd accumulates the two contributions in graph order), so fp32
    rounding differences only: relative error in norm <= 1e-6 (~17 units of 2^-24; observed
    below 1e-7)."""
    err = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err <= 1e-6, err


def _features(model, **inputs):
    with torch.no_grad():
        return model.get_image_features(**inputs).pooler_output


# --------------------------------------------------------------------------- from_layer_list
def test_from_layer_list_resolves_like_transformers():
    spec = ConnectorSpec.from_layer_list([-24, -20, -12, -1], 28)  # Granite Vision on SigLIP
    assert spec == ConnectorSpec("sci", 4, ((8, 9), (16, 17), (27, 28)), num_hidden_states=28)
    # order kept, repeats allowed, positive and negative mixed, numpy-style ints
    import numpy as np
    spec = ConnectorSpec.from_layer_list([np.int64(-2), 3, -2, 0], 25, drop_cls=True)
    assert (spec.final_layer, spec.groups, spec.drop_cls) == (23, ((3, 4), (23, 24), (0, 1)), True)
    assert spec.out_channels(WIDTH) == 4 * WIDTH
    # the features are torch.cat of the layers, bit for bit, for any dtype and layout
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        g = torch.Generator().manual_seed(3)
        hs = [torch.randn(2, 11, 2 * WIDTH, generator=g).to(dtype)[..., ::2] for _ in range(25)]
        want = torch.cat([hs[i][:, 1:] for i in (23, 3, 23, 0)], -1)
        assert torch.equal(dense_connector_features(hs, spec, backend="torch"), want)


@pytest.mark.parametrize("layers, n, match", [
    ([5], 25, "at least two"), ([], 25, "at least two"), (-2, 25, "list of hidden-state"),
    ("12", 25, "list of hidden-state"), ([1, 25], 25, r"layers\[1\] = 25 is out of range"),
    ([-26, 1], 25, r"layers\[0\] = -26 is out of range.*-25 \.\. 24"),
    ([1, 2.0], 25, r"layers\[1\] must be an int"), ([1, True], 25, r"layers\[1\] must be an int"),
    ([1, 2], 0, "num_hidden_states must be an int >= 1"),
    ([1, 2], 2.5, "num_hidden_states must be an int >= 1")])
def test_from_layer_list_errors(layers, n, match):
    with pytest.raises(ValueError, match=match):
        ConnectorSpec.from_layer_list(layers, n)


# --------------------------------------------------------------------------- VisionFeatureLayers
def _tower(encoder, seed=0):
    torch.manual_seed(seed)
    cls = CLIPVisionModel if encoder == "clip" else SiglipVisionModel
    return cls(_vision_config(encoder)).eval()


@pytest.mark.parametrize("encoder, layers, strategy, streaming", [
    ("clip", -2, "default", True), ("clip", [-24, -20, -12, -1], "default", True),
    ("clip", [-24, -20, -12, -1], "default", False), ("clip", [0], "full", True),
    ("siglip", -1, "full", True), ("siglip", [3, -2, 3], "full", True),
    ("siglip", 5, "default", False)])
def test_vision_feature_layers_equal_transformers(encoder, layers, strategy, streaming):
    tower = _tower(encoder)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=g)
    with torch.no_grad():
        hs = tower(pixels, output_hidden_states=True).hidden_states
    index = [layers] if isinstance(layers, int) else layers
    want = torch.cat([hs[i][:, 1:] if strategy == "default" else hs[i] for i in index], -1)
    calls = [0] * DEPTH[encoder]
    handles = [layer.register_forward_pre_hook(
        lambda m, a, k=k: calls.__setitem__(k, calls[k] + 1))
        for k, layer in enumerate(tower.encoder.layers)]
    try:
        selector = VisionFeatureLayers(tower, layers, strategy, streaming=streaming)
        with torch.no_grad():
            got = selector(pixels)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(got, want)
    assert selector.out_channels == got.shape[-1] and selector.num_image_tokens == got.shape[1]
    deepest = max(i % (DEPTH[encoder] + 1) for i in index)
    ran = deepest if streaming else DEPTH[encoder]
    assert calls == [1] * ran + [0] * (DEPTH[encoder] - ran)


def test_vision_feature_layers_gradients_equal_transformers():
    tower = _tower("clip")
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2),
                         requires_grad=True)
    layers = [-24, -12, -2]
    hs = tower(pixels, output_hidden_states=True).hidden_states
    want = torch.cat([hs[i][:, 1:] for i in layers], -1)
    got = VisionFeatureLayers(tower, layers)(pixels)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    weight = tower.encoder.layers[3].mlp.fc1.weight
    a = torch.autograd.grad(got, (pixels, weight), g)
    b = torch.autograd.grad(want, (pixels, weight), g)
    for x, y in zip(a, b):
        _assert_grad_close(x, y)


def test_vision_feature_layers_errors():
    tower = _tower("clip")
    with pytest.raises(ValueError, match=r"vision_feature_layer 25 is not a hidden-state index.*"
                                         r"25 hidden states: -25 \.\. 24"):
        VisionFeatureLayers(tower, 25)
    with pytest.raises(ValueError, match="out of range"):
        VisionFeatureLayers(tower, [1, -26])
    with pytest.raises(ValueError, match="int or a list of ints"):
        VisionFeatureLayers(tower, "-2")
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be one of"):
        VisionFeatureLayers(tower, -2, "cls")
    with pytest.raises(TypeError, match="streaming must be a bool"):
        VisionFeatureLayers(tower, -2, streaming=1)
    with pytest.raises(TypeError, match="embeddings"):
        VisionFeatureLayers(nn.Linear(2, 2), -2)


# --------------------------------------------------------------------------- no spec == stock
NO_SPEC_CASES = [
    ("llava", "clip", -2, "default", None),
    ("llava", "clip", [-24, -20, -12, -1], "default", None),
    ("llava", "siglip", [-24, -20, -12, -1], "full", None),   # Granite Vision's list
    ("llava_next", "clip", -2, "default", None),
    ("llava_next", "siglip", [-24, -20, -12, -1], "full", None),
    ("llava_onevision", "siglip", -1, "full", 26),            # OneVision's tower and layer
    ("llava_onevision", "clip", [3, -2], "default", None),
]


# every case in fp32; in bf16 one per family (the SigLIP ones)
NO_SPEC_RUNS = [c + (torch.float32,) for c in NO_SPEC_CASES] + \
    [c + (torch.bfloat16,) for c in (NO_SPEC_CASES[2], NO_SPEC_CASES[4], NO_SPEC_CASES[5])]


@pytest.mark.parametrize("family, encoder, layer, strategy, layers, dtype", NO_SPEC_RUNS,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{str(c[5])[6:]}" for c in NO_SPEC_RUNS])
def test_no_spec_equals_stock_transformers(family, encoder, layer, strategy, layers, dtype):
    model = _model(family, encoder, layer, strategy, layers, dtype=dtype)
    stock = copy.deepcopy(model)
    state, config = _state(model), model.config.to_dict()
    assert patch_llava(model) is model
    _assert_same_state(model, state)                 # no weight, no key changed
    assert model.config.to_dict() == config          # nothing recorded in the config
    assert type(model.model.multi_modal_projector).__name__.endswith("MultiModalProjector")

    inputs = _inputs(family, dtype=dtype)
    want, got = _features(stock, **inputs), _features(model, **inputs)
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        assert a.dtype == dtype and torch.equal(a, b)

    ids = _prompt([f.shape[0] for f in want])
    with torch.no_grad():
        out = model(input_ids=ids, **inputs)
        ref = stock(input_ids=ids, **inputs)
    assert torch.equal(out.logits, ref.logits)
    assert torch.isfinite(out.logits).all()


def test_no_spec_collected_mode_equals_stock():
    # streaming=False: every hidden state collected, then the selected ones read
    model = _model("llava_next", "siglip", [-24, -20, -12, -1], "full")
    stock = copy.deepcopy(model)
    patch_llava(model, streaming=False)
    inputs = _inputs("llava_next")
    assert all(torch.equal(a, b) for a, b in zip(_features(model, **inputs),
                                                 _features(stock, **inputs)))


def test_no_spec_per_call_layer_and_strategy_follow_transformers():
    # transformers lets a call override vision_feature_layer / select strategy
    model = _model("llava", "clip", [-2, -5])
    stock = copy.deepcopy(model)
    patch_llava(model)
    inputs = _inputs("llava")
    for kwargs in (dict(vision_feature_layer=[4, -1]),
                   dict(vision_feature_layer=[-3, -3], vision_feature_select_strategy="full")):
        want = _features(stock, **inputs, **kwargs)
        got = _features(model, **inputs, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="select_strategy must be one of"):
        model.get_image_features(**inputs, vision_feature_select_strategy="cls")


def test_no_spec_training_gradients_equal_stock():
    model = _model("llava_next", "clip", [-24, -12, -2])
    stock = copy.deepcopy(model)
    patch_llava(model)
    inputs = _inputs("llava_next")
    ids = _prompt([f.shape[0] for f in _features(stock, **inputs)])
    grads = []
    for m in (stock, model):
        m.train()
        loss = m(input_ids=ids, labels=ids, **inputs).loss
        params = (m.model.multi_modal_projector.linear_1.weight, m.model.image_newline,
                  m.model.vision_tower.encoder.layers[5].self_attn.q_proj.weight)
        grads.append((loss.detach(), torch.autograd.grad(loss, params)))
    assert torch.equal(grads[0][0], grads[1][0])  # the forward is the same, bit for bit
    for a, b in zip(grads[0][1], grads[1][1]):
        _assert_grad_close(a, b)


def test_no_spec_onevision_video_and_generate():
    model = _model("llava_onevision", "siglip", -1, "full", layers=26)
    stock = copy.deepcopy(model)
    patch_llava(model)
    g = torch.Generator().manual_seed(4)
    videos = torch.randn(1, 3, 3, IMAGE, IMAGE, generator=g)
    with torch.no_grad():
        want = stock.model.get_video_features(videos).pooler_output
        got = model.model.get_video_features(videos).pooler_output
        # through the outer model (5.17's passes the videos as pixel_values)
        got_outer = model.get_video_features(videos).pooler_output
        # either keyword, whichever version: pixel_values_videos (5.25), pixel_values (5.17)
        for kw in ("pixel_values_videos", "pixel_values"):
            assert torch.equal(model.model.get_video_features(**{kw: videos}).pooler_output,
                               want), kw
        with pytest.raises(TypeError, match="videos twice"):
            model.model.get_video_features(videos, pixel_values=videos)
    assert torch.equal(got, want)
    assert torch.equal(got_outer, want)
    inputs = _inputs("llava_onevision")
    counts = [f.shape[0] for f in _features(stock, **inputs)]
    vc = model.config.vision_config
    side = -(-(vc.image_size // vc.patch_size) // 2)  # apply_pooling halves the grid, rounding up
    # every frame's pooled tokens and one newline (get_video_features adds it in transformers
    # 5.25, forward in 5.17)
    ids = torch.cat([_prompt(counts),
                     _prompt([videos.shape[1] * side * side + 1], token=VIDEO_TOKEN)], 1)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values_videos=videos, **inputs)
        ref = stock(input_ids=ids, pixel_values_videos=videos, **inputs)
        assert torch.equal(out.logits, ref.logits)
        gen = model.generate(input_ids=ids, pixel_values_videos=videos, max_new_tokens=3,
                             do_sample=False, **inputs)
        gen_ref = stock.generate(input_ids=ids, pixel_values_videos=videos, max_new_tokens=3,
                                 do_sample=False, **inputs)
    assert torch.equal(gen, gen_ref)


def test_no_spec_runs_fewer_layers_than_stock():
    # llava-1.5's -2: transformers runs all 24 layers and the post-layernorm; the patch 23
    model = _model("llava", "clip", -2)
    stock = copy.deepcopy(model)
    patch_llava(model)
    for m, want in ((stock, [f"layer{k}" for k in range(24)] + ["post_layernorm"]),
                    (model, [f"layer{k}" for k in range(23)])):
        tower = m.model.vision_tower
        calls = []
        handles = [mod.register_forward_pre_hook(lambda _m, _a, n=n: calls.append(n))
                   for n, mod in [(f"layer{k}", layer)
                                  for k, layer in enumerate(tower.encoder.layers)]
                   + [("post_layernorm", tower.post_layernorm)]]
        try:
            _features(m, **_inputs("llava"))
        finally:
            for h in handles:
                h.remove()
        assert calls == want


# --------------------------------------------------------------------------- DC on AnyRes
def _truncate_like_the_original(tower):
    t = copy.deepcopy(tower)
    t.encoder.layers = t.encoder.layers[:-1]
    t.head = nn.Identity()
    return t


def _original_encode_images(tower, encoder, connector_type, projector, pixels, truncate):
    """The original LLaVA + Dense Connector encode_images(), op for op."""
    is_siglip = encoder == "siglip"
    if truncate:
        tower = _truncate_like_the_original(tower)
    hs = tower(pixels, output_hidden_states=True).hidden_states
    image_features = reference.select_image_features(hs, is_siglip)
    return projector(reference.dense_connector(image_features, hs, is_siglip, connector_type))


def _original_best_resolution(width, height, pinpoints):
    """The original LLaVA-NeXT's choice: sizes and pinpoints as (width, height)."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for pw, ph in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pw * ph - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pw, ph), effective, wasted
    return best


def _original_crop_count(size_hw):
    pw, ph = _original_best_resolution(size_hw[1], size_hw[0], PINPOINTS)
    return (pw // IMAGE) * (ph // IMAGE) + 1


def _original_pack(tokens, size_hw, newline):
    """The original's spatial_unpad packing of one image's crop tokens ``[crops, 49, H]``."""
    width, height = size_hw[1], size_hw[0]               # the original's image_sizes: (w, h)
    base, rest = tokens[0], tokens[1:]
    pw, ph = _original_best_resolution(width, height, PINPOINTS)
    n_w, n_h = pw // IMAGE, ph // IMAGE
    x = rest.view(n_h, n_w, GRID, GRID, -1).permute(4, 0, 2, 1, 3).contiguous()
    x = x.flatten(1, 2).flatten(2, 3)                    # [H, n_h * 7, n_w * 7]
    cur_h, cur_w = x.shape[1:]
    if width / height > cur_w / cur_h:
        new_h = int(height * (cur_w / width))            # the original: int(), no rounding
        pad = (cur_h - new_h) // 2
        x = x[:, pad:cur_h - pad, :]
    else:
        new_w = int(width * (cur_h / height))
        pad = (cur_w - new_w) // 2
        x = x[:, :, pad:cur_w - pad]
    x = torch.cat((x, newline[:, None, None].expand(*x.shape[:-1], 1).to(x.dtype)), dim=-1)
    return torch.cat((base, x.flatten(1, 2).transpose(0, 1)), dim=0)


def test_anyres_grid_choice_matches_the_original_except_ties():
    # transformers reads image sizes and pinpoints as (height, width), the original as (width,
    # height): on a symmetric pinpoint list they choose the same physical grid, except where two
    # pinpoints tie (same effective and wasted resolution, e.g. any image smaller than one
    # crop): then each takes the first in list order, i.e. transposed grids. Each pipeline's
    # processor crops the image by its own choice, so each is self-consistent; dc_kernels packs
    # as transformers does (its processor made the pixel values).
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
    for size in ORIGINAL_SIZES + [[18, 18]]:
        rows, cols = get_anyres_image_grid_shape(size, PINPOINTS, IMAGE)
        pw, ph = _original_best_resolution(size[1], size[0], PINPOINTS)
        original = (ph // IMAGE, pw // IMAGE)
        if size == [18, 18]:
            assert (rows, cols) == (1, 2) and original == (2, 1)
        else:
            assert (rows, cols) == original, size


def _crops(pixel_values, sizes):
    return torch.cat([pv[:_original_crop_count(s)] for pv, s in zip(pixel_values, sizes)])


@pytest.mark.parametrize("encoder, connector_type, dtype", [
    ("siglip", "dci", torch.float32),     # the released DC AnyRes layout (SigLIP so400m)
    ("clip", "sci", torch.float32),
    ("siglip", "dci", torch.bfloat16)])
def test_dense_connector_llava_next_equals_original_anyres(encoder, connector_type, dtype):
    model = _model("llava_next", encoder, dtype=dtype)
    spec = ConnectorSpec.preset(encoder, connector_type)
    torch.manual_seed(5)
    projector = reference.build_projector(spec.out_channels(WIDTH), LLM).to(dtype)
    newline = torch.randn(LLM).to(dtype)
    # a LoRA run's non_lora_trainables.bin: PEFT prefixes, the projector and the newline
    checkpoint = {f"base_model.model.model.mm_projector.{k}": v
                  for k, v in projector.state_dict().items()}
    checkpoint["base_model.model.model.image_newline"] = newline
    tower = model.model.vision_tower
    patch_llava(model, spec, checkpoint=checkpoint)
    assert torch.equal(model.model.image_newline, newline)

    sizes = ORIGINAL_SIZES
    g = torch.Generator().manual_seed(6)
    pixels = torch.randn(len(sizes), CROPS, 3, IMAGE, IMAGE, generator=g).to(dtype)
    inputs = dict(pixel_values=pixels, image_sizes=torch.tensor(sizes))
    got = _features(model, **inputs)
    with torch.no_grad():
        crops = _crops(pixels, sizes)
        tokens = _original_encode_images(tower, encoder, connector_type, projector, crops,
                                         truncate=encoder == "siglip")
        per_image = torch.split(tokens, [_original_crop_count(s) for s in sizes])
        want = [_original_pack(t, s, newline) for t, s in zip(per_image, sizes)]
    assert [f.shape for f in got] == [f.shape for f in want]
    for a, b in zip(got, want):
        assert a.dtype == dtype
        _assert_close(a, b, dtype)

    # the logits: the original's image tokens in the prompt's placeholders
    ids = _prompt([f.shape[0] for f in want])
    with torch.no_grad():
        out = model(input_ids=ids, **inputs)
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == IMAGE_TOKEN] = torch.cat(want).to(dtype)
        ref = model(inputs_embeds=embeds)
    _assert_close(out.logits, ref.logits, dtype)


def test_dense_connector_onevision_images_and_video():
    # OneVision's SigLIP already has 26 layers: the 27-hidden-state preset fits it without
    # dropping a layer (drop_last_layer is chosen so)
    model = _model("llava_onevision", "siglip", -1, "full", layers=26)
    spec = ConnectorSpec.preset("siglip", "dci")
    torch.manual_seed(5)
    projector = reference.build_projector(spec.out_channels(WIDTH), LLM)
    patch_llava(model, spec, connector=projector)
    inner = model.model
    assert inner.dense_connector_tower.drop_last_layer is False
    assert inner.multi_modal_projector.get_submodule("0").weight is projector[0].weight
    inputs = _inputs("llava_onevision")
    g = torch.Generator().manual_seed(8)
    videos = torch.randn(1, 3, 3, IMAGE, IMAGE, generator=g)
    with torch.no_grad():
        got = inner.get_image_features(**inputs).pooler_output
        got_video = inner.get_video_features(videos).pooler_output
        # reference DC features of every crop / frame, then OneVision's own packing / pooling
        sizes = inputs["image_sizes"]
        counts = [_original_crop_count(s.tolist()) for s in sizes]
        crops = torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], counts)])
        tokens = _original_encode_images(inner.vision_tower, "siglip", "dci", projector, crops,
                                         truncate=False)
        want, _ = inner.pack_image_features(torch.split(tokens, counts), sizes,
                                            image_newline=inner.image_newline,
                                            vision_aspect_ratio="anyres_max_1")
        frames = _original_encode_images(inner.vision_tower, "siglip", "dci", projector,
                                         videos.flatten(0, 1), truncate=False)
        pooled = inner.apply_pooling(frames).reshape(1, -1, LLM)
        # the newline closing the video: in get_video_features (transformers 5.25) or added by
        # forward (5.17); the no-spec test holds the replacement to the stock method
        want_video = torch.cat((pooled, inner.image_newline[None, None]), dim=1) \
            if _video_features_end_with_newline(type(inner)) else pooled
    for a, b in zip(got, want):
        _assert_close(a, b, torch.float32)
    _assert_close(got_video, want_video, torch.float32)
    ids = torch.cat([_prompt([f.shape[0] for f in want]),
                     _prompt([pooled.shape[1] + 1], token=VIDEO_TOKEN)], 1)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values_videos=videos, **inputs)
    assert torch.isfinite(out.logits).all()


def test_dense_connector_anyres_refuses_specs_that_break_the_grid():
    for spec, match in ((ConnectorSpec.preset("clip", "sti"), "STI adds pooled tokens"),
                        (ConnectorSpec("dci", 23, ((0, 12), (12, 24))), "CLS token is kept")):
        model = _model("llava_next", "clip")
        before = _state(model)
        with pytest.raises(ValueError, match=match):
            patch_llava(model, spec)
        _assert_same_state(model, before)
        assert not hasattr(model.config, "dense_connector")


# --------------------------------------------------------------------------- checkpoints
def test_original_mm_projector_bin_into_dense_connector_llava(tmp_path):
    model = _model("llava", "siglip")
    spec = ConnectorSpec.preset("siglip", "dci")
    torch.manual_seed(9)
    projector = reference.build_projector(spec.out_channels(WIDTH), LLM)
    # the stage-1 mm_projector.bin of the original trainer: model.mm_projector.* keys
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()},
               tmp_path / "mm_projector.bin")
    patch_llava(model, spec, checkpoint=tmp_path)  # a directory holding mm_projector.bin
    for k, v in projector.state_dict().items():
        assert torch.equal(model.state_dict()[f"model.multi_modal_projector.{k}"], v)
    pixels = _inputs("llava")["pixel_values"]
    got = torch.stack(_features(model, pixel_values=pixels))
    with torch.no_grad():
        want = _original_encode_images(model.model.vision_tower, "siglip", "dci", projector,
                                       pixels, truncate=True)
    _assert_close(got, want, torch.float32)


def test_original_llava_projector_into_own_projector(tmp_path):
    # no spec: an original LLaVA mm_projector (0.*, 2.*) loads into linear_1 / linear_2
    model = _model("llava", "clip", [-2, -5])
    torch.manual_seed(10)
    projector = reference.build_projector(2 * WIDTH, LLM)
    path = tmp_path / "non_lora_trainables.bin"
    torch.save({f"base_model.model.model.mm_projector.{k}": v
                for k, v in projector.state_dict().items()}, path)
    patch_llava(model, checkpoint=str(path))
    own = model.model.multi_modal_projector
    assert torch.equal(own.linear_1.weight, projector[0].weight)
    assert torch.equal(own.linear_2.bias, projector[2].bias)


def test_read_projector_checkpoint_forms_and_errors(tmp_path):
    w = {"0.weight": torch.ones(2, 3), "2.bias": torch.zeros(2)}
    for prefix in ("mm_projector.", "model.mm_projector.",
                   "base_model.model.model.mm_projector."):
        ckpt = {prefix + k: v for k, v in w.items()}
        ckpt["model.embed_tokens.weight"] = torch.ones(1)   # other keys are ignored
        got, extras = read_projector_checkpoint(ckpt)
        assert set(got) == set(w) and extras == {}
    _, extras = read_projector_checkpoint({"mm_projector.0.weight": torch.ones(1),
                                           "model.image_newline": torch.ones(4)})
    assert set(extras) == {"image_newline"}
    with pytest.raises(ValueError, match="no mm_projector"):
        read_projector_checkpoint({"model.layers.0.weight": torch.ones(1)})
    # a bare projector state dict (a DenseConnector's or transformers' own keys) is the projector
    for keys in (("0.weight", "2.bias"), ("weight", "bias"), ("linear_1.weight", "linear_2.bias")):
        got, extras = read_projector_checkpoint({**{k: torch.ones(1) for k in keys},
                                                 "image_newline": torch.ones(3)})
        assert set(got) == set(keys) and set(extras) == {"image_newline"}
    with pytest.raises(ValueError, match="no mm_projector"):  # bare and other keys mixed
        read_projector_checkpoint({"0.weight": torch.ones(1), "lm_head.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="twice"):
        read_projector_checkpoint({"mm_projector.0.weight": torch.ones(1),
                                   "model.mm_projector.0.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="holds none of"):
        read_projector_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="state dict or a path"):
        read_projector_checkpoint([1, 2])
    # a key that merely contains the word is not a projector key
    with pytest.raises(ValueError, match="no mm_projector"):
        read_projector_checkpoint({"model.not_mm_projector.0.weight": torch.ones(1)})


def test_checkpoint_errors_leave_the_model_unchanged():
    spec = ConnectorSpec.preset("clip", "dci")
    good = reference.build_projector(spec.out_channels(WIDTH), LLM).state_dict()
    cases = [
        ("llava", spec, {f"mm_projector.{k}": v for k, v in good.items() if k != "2.bias"},
         r"missing keys \['2.bias'\]"),
        ("llava", spec, {f"mm_projector.{k}": v[:1] for k, v in good.items()}, "misshaped"),
        ("llava", spec, {**{f"mm_projector.{k}": v for k, v in good.items()},
                         "model.image_newline": torch.zeros(LLM)}, "has none"),
        ("llava_next", spec, {**{f"mm_projector.{k}": v for k, v in good.items()},
                              "model.image_newline": torch.zeros(LLM + 1)}, "image_newline is"),
        ("llava", None, {f"mm_projector.{k}": v for k, v in good.items()},   # 3C into 2C
         "does not fit the model's projector"),
        ("llava_next", None, {"mm_projector.0.weight": torch.zeros(LLM, 2 * WIDTH),
                              "mm_projector.0.bias": torch.zeros(LLM),
                              "mm_projector.2.weight": torch.zeros(LLM, LLM),
                              "mm_projector.2.bias": torch.zeros(LLM),
                              "model.image_newline": torch.zeros(3)}, "image_newline is"),
    ]
    for family, s, ckpt, match in cases:
        model = _model(family, "clip", [-2, -5] if s is None else -2)
        before, config = _state(model), model.config.to_dict()
        with pytest.raises(ValueError, match=match):
            patch_llava(model, s, checkpoint=ckpt)
        _assert_same_state(model, before)
        assert model.config.to_dict() == config
        assert "_dc_kernels_patch" not in model.model.__dict__


# --------------------------------------------------------------------------- unpatch, round trips
def _snapshot(model):
    inner = model.model
    return dict(state=_state(model), config=copy.deepcopy(model.config.to_dict()),
                inner_dict=set(inner.__dict__), modules=[(n, m) for n, m in model.named_modules()],
                hooks=[(len(m._forward_hooks), len(m._forward_pre_hooks))
                       for m in model.modules()])


def _assert_snapshot(model, snap):
    _assert_same_state(model, snap["state"])
    assert model.config.to_dict() == snap["config"]
    assert set(model.model.__dict__) == snap["inner_dict"]
    now = [(n, m) for n, m in model.named_modules()]
    assert [n for n, _ in now] == [n for n, _ in snap["modules"]]
    assert all(a is b for (_, a), (_, b) in zip(now, snap["modules"]))  # the same objects
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks))
            for m in model.modules()] == snap["hooks"]


@pytest.mark.parametrize("mode", ["no_spec_with_checkpoint", "dense_connector"])
def test_unpatch_restores_the_model_bit_for_bit(mode):
    model = _model("llava_next", "clip", [-2, -5] if mode.startswith("no") else -2)
    inputs = _inputs("llava_next")
    with torch.no_grad():
        counts = [f.shape[0] for f in model.get_image_features(**inputs).pooler_output]
        ids = _prompt(counts)
        before_logits = model(input_ids=ids, **inputs).logits
    snap = _snapshot(model)
    torch.manual_seed(11)
    if mode.startswith("no"):
        proj = reference.build_projector(2 * WIDTH, LLM)
        ckpt = {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
        ckpt["model.image_newline"] = torch.randn(LLM)
        patch_llava(model, checkpoint=ckpt)
    else:
        spec = ConnectorSpec.preset("clip", "dci")
        proj = reference.build_projector(spec.out_channels(WIDTH), LLM)
        ckpt = {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
        ckpt["model.image_newline"] = torch.randn(LLM)
        patch_llava(model, spec, checkpoint=ckpt)
        assert "dense_connector" in model.config.to_dict()
    with torch.no_grad():
        patched_logits = model(input_ids=ids, **inputs).logits
    assert not torch.equal(patched_logits, before_logits)  # the checkpoint changed something
    assert unpatch_llava(model) is model
    _assert_snapshot(model, snap)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, **inputs).logits, before_logits)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_llava(model)
    patch_llava(model)  # patchable again
    unpatch_llava(model)
    _assert_snapshot(model, snap)


def test_unpatch_after_moving_the_model_follows_its_dtype():
    model = _model("llava", "clip")
    patch_llava(model, ConnectorSpec.preset("clip", "sci"))
    model.to(torch.bfloat16)
    unpatch_llava(model)
    assert model.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16


def test_class_level_patch_and_revert_bit_for_bit(tmp_path):
    from transformers.models.llava.modeling_llava import LlavaModel
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
    classes = (LlavaModel, LlavaNextModel, LlavaOnevisionModel)
    before = [dict(vars(c)) for c in classes]
    stock = _model("llava_next", "siglip", [-24, -20, -12, -1], "full")
    stock.save_pretrained(tmp_path)

    apply_dense_connector_to_llava()
    apply_dense_connector_to_llava()  # idempotent
    try:
        assert class_patch_active()
        loaded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
        built = _model("llava", "clip")
        assert "_dc_kernels_patch" in loaded.model.__dict__
        assert "_dc_kernels_patch" in built.model.__dict__
    finally:
        revert_dense_connector_to_llava()
    assert not class_patch_active()
    for c, d in zip(classes, before):  # the very same class attributes
        now = dict(vars(c))
        assert now.keys() == d.keys() and all(now[k] is d[k] for k in d), c.__name__
    after = _model("llava", "clip")
    assert "_dc_kernels_patch" not in after.model.__dict__

    _assert_same_state(loaded, _state(stock))
    inputs = _inputs("llava_next")
    want = _features(stock, **inputs)
    got = _features(loaded, **inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    ids = _prompt([f.shape[0] for f in want])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, **inputs).logits,
                           stock(input_ids=ids, **inputs).logits)
    # the instance form
    assert apply_dense_connector_to_llava(after) is after
    assert revert_dense_connector_to_llava(after) is after
    assert "_dc_kernels_patch" not in after.model.__dict__


@pytest.mark.parametrize("family, encoder", [("llava", "clip"), ("llava_next", "siglip")])
def test_save_pretrained_from_pretrained_round_trip(tmp_path, family, encoder):
    model = _model(family, encoder)
    spec = ConnectorSpec.preset(encoder, "dci")
    patch_llava(model, spec)
    if family != "llava":
        with torch.no_grad():
            model.model.image_newline.normal_()
    inputs = _inputs(family)
    want = _features(model, **inputs)
    ids = _prompt([f.shape[0] for f in want])
    with torch.no_grad():
        logits = model(input_ids=ids, **inputs).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # the section is the vLLM plugin's format (dc_kernels.integrations.vllm.config)
    from dc_kernels.integrations.vllm import dense_connector_config
    drop = encoder == "siglip"
    assert saved["dense_connector"] == dense_connector_config(
        spec, WIDTH, "mlp2x_gelu", streaming=True, drop_last_layer=drop)

    cls = type(model)
    apply_dense_connector_to_llava()
    try:
        loaded = cls.from_pretrained(tmp_path).eval()
    finally:
        revert_dense_connector_to_llava()
    assert isinstance(loaded.model.multi_modal_projector, DenseConnector)
    assert loaded.model.multi_modal_projector.spec == spec
    _assert_same_state(loaded, _state(model))
    got = _features(loaded, **inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, **inputs).logits, logits)
    with pytest.raises(ValueError, match="built as a Dense Connector model"):
        unpatch_llava(loaded)

    # without the class-level patch transformers builds its own projector and drops the Dense
    # Connector's weights (its load report lists them): refused instead of silently wrong
    plain = cls.from_pretrained(tmp_path)
    assert not isinstance(plain.model.multi_modal_projector, DenseConnector)
    for fn in (patch_llava, apply_dense_connector_to_llava):
        with pytest.raises(ValueError, match="apply_dense_connector_to_llava"):
            fn(plain)


def test_config_section_is_what_the_vllm_plugin_reads(tmp_path):
    from dc_kernels.integrations.vllm import parse_dense_connector_config
    model = _model("llava", "siglip")
    spec = ConnectorSpec.preset("siglip", "sti")
    patch_llava(model, spec, projector_type="linear")
    parsed = parse_dense_connector_config(model.config)
    assert (parsed.spec, parsed.projector_type, parsed.drop_last_layer) == (spec, "linear", True)
    assert parsed.num_image_tokens == model.model.dense_connector_tower.num_image_tokens


def test_class_level_patch_reads_presets_and_refuses_external_weights(tmp_path):
    model = _model("llava", "clip")
    spec = ConnectorSpec.preset("clip", "sci")
    patch_llava(model, spec)
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["dense_connector"] = {"encoder": "clip", "connector_type": "sci"}  # a preset section
    path.write_text(json.dumps(config))
    apply_dense_connector_to_llava()
    try:
        loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
        assert loaded.model.multi_modal_projector.spec == spec
        _assert_same_state(loaded, _state(model))
        for section, match in (
                ({"encoder": "clip", "connector_type": "sci", "mm_projector": "mm.bin"},
                 "mm.bin"),
                ({"connector_type": "sci", "groups": [[7, 8]]}, r"missing \['final_layer'\]"),
                ({"encoder": "clip", "connector_type": "dci", "mm_hidden_size": 5},
                 "mm_hidden_size is 5"),
                ({"connector_type": "sci", "final_layer": 23, "groups": [[7, 9]]},
                 "single layers")):
            config["dense_connector"] = section
            path.write_text(json.dumps(config))
            with pytest.raises(ValueError, match=match):
                LlavaForConditionalGeneration.from_pretrained(tmp_path)
    finally:
        revert_dense_connector_to_llava()


def test_no_spec_patched_model_saves_a_stock_checkpoint(tmp_path):
    model = _model("llava_onevision", "siglip", -1, "full", layers=26)
    stock = copy.deepcopy(model)
    patch_llava(model)
    model.save_pretrained(tmp_path / "patched")
    stock.save_pretrained(tmp_path / "stock")
    for name in ("config.json", "model.safetensors"):
        patched, stock_file = tmp_path / "patched" / name, tmp_path / "stock" / name
        assert patched.read_bytes() == stock_file.read_bytes()


def test_deepcopy_of_a_patched_model_is_patched_independently():
    model = _model("llava", "clip", [-2, -5])
    patch_llava(model, ConnectorSpec.preset("clip", "dci"))
    twin = copy.deepcopy(model)
    assert twin.model.dense_connector_tower.vision_model is twin.model.vision_tower
    assert twin.model.get_image_features.__self__ is twin.model
    inputs = _inputs("llava")
    assert all(torch.equal(a, b) for a, b in zip(_features(twin, **inputs),
                                                 _features(model, **inputs)))
    unpatch_llava(twin)
    assert isinstance(model.model.multi_modal_projector, DenseConnector)


# --------------------------------------------------------------------------- SigLIP attention
def _original_siglip_attention(self, hidden_states, attention_mask=None, **kwargs):
    """The original Dense Connector's SigLIP attention (its own eager implementation)."""
    b, t, _ = hidden_states.shape
    shape = (b, t, self.num_heads, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    weights = torch.matmul(q, k.transpose(2, 3)) * self.scale
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(weights, v).transpose(1, 2).contiguous().reshape(b, t, -1)
    return self.out_proj(out), weights


def test_siglip_eager_attention_reproduces_the_original():
    # The original's SigLIP tower computes attention eagerly (matmul, fp32 softmax, matmul).
    # transformers' "eager" is the same arithmetic; its default "sdpa" is a fused kernel that
    # rounds differently. So: eager reproduces the original bit for bit, sdpa does not.
    torch.manual_seed(0)
    eager = SiglipVisionModel(_vision_config("siglip", attn="eager")).eval()
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    original = copy.deepcopy(eager)
    for layer in original.encoder.layers:
        layer.self_attn.forward = types.MethodType(_original_siglip_attention, layer.self_attn)
    original = _truncate_like_the_original(original)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    spec = ConnectorSpec.preset("siglip", "dci")
    with torch.no_grad():
        want = original(pixels, output_hidden_states=True).hidden_states
        from dc_kernels import DenseConnectorVisionTower
        runs = {}
        for name, tower in (("eager", eager), ("sdpa", sdpa)):
            wrapper = DenseConnectorVisionTower(tower, DenseConnector(spec, WIDTH, LLM))
            runs[name] = wrapper.hidden_states(pixels)
    assert len(want) == len(runs["eager"]) == 27
    for i, (a, b) in enumerate(zip(runs["eager"], want)):
        assert torch.equal(a, b), f"eager hidden state {i}"
    diff = max((a - b).abs().max().item() for a, b in zip(runs["sdpa"], want))
    scale = max(b.abs().max().item() for b in want)
    # sdpa is close (fp32 rounding, < 1e-5 of the largest value here) but not the original
    assert 0 < diff < 1e-5 * scale, diff


# --------------------------------------------------------------------------- errors
def test_unsupported_models_are_refused_clearly():
    from transformers import (LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration,
                              PixtralVisionConfig, VipLlavaConfig, VipLlavaForConditionalGeneration)
    vip = VipLlavaForConditionalGeneration(VipLlavaConfig(
        vision_config=_vision_config("clip", 6), text_config=_text_config(),
        vision_feature_layers=[-2, -5], image_token_id=IMAGE_TOKEN))
    with pytest.raises(NotImplementedError, match="VipLlava"):
        patch_llava(vip)
    video = LlavaNextVideoForConditionalGeneration(LlavaNextVideoConfig(
        vision_config=_vision_config("clip", 6), text_config=_text_config(),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN))
    with pytest.raises(NotImplementedError, match="LLaVA-NeXT-Video"):
        patch_llava(video)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        patch_llava(nn.Linear(2, 2))
    pixtral = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=PixtralVisionConfig(hidden_size=WIDTH, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          head_dim=8, image_size=IMAGE, patch_size=PATCH),
        text_config=_text_config(), image_token_id=IMAGE_TOKEN))
    for spec in (None, ConnectorSpec.preset("clip", "dci")):
        with pytest.raises(TypeError, match="pixtral.*Pixtral-style towers"):
            patch_llava(pixtral, spec)
        assert "_dc_kernels_patch" not in pixtral.model.__dict__


def test_patch_errors():
    model = _model("llava", "clip", 30)  # a vision_feature_layer the tower does not have
    with pytest.raises(ValueError, match="vision_feature_layer 30"):
        patch_llava(model)
    model = _model("llava", "clip")
    with pytest.raises(ValueError, match="drop_last_layer= is for a Dense Connector"):
        patch_llava(model, drop_last_layer=True)
    with pytest.raises(TypeError, match="streaming must be a bool"):
        patch_llava(model, streaming="yes")
    with pytest.raises(TypeError, match="ConnectorSpec"):
        patch_llava(model, "dci")
    patch_llava(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_llava(model, ConnectorSpec.preset("clip", "dci"))
    with pytest.raises(NotImplementedError, match="image_sizes"):
        model.get_image_features(pixel_values=_inputs("llava")["pixel_values"],
                                 image_sizes=torch.tensor([[28, 28]]))
    with pytest.raises(TypeError, match="streaming must be a bool"):
        apply_dense_connector_to_llava(streaming=None)
    assert not class_patch_active()
    next_model = _model("llava_next", "clip")
    patch_llava(next_model)
    with pytest.raises(ValueError, match="4 or 5 dimensions"):
        next_model.get_image_features(pixel_values=torch.zeros(3, IMAGE, IMAGE),
                                      image_sizes=torch.tensor([[28, 28]]))
