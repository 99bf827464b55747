"""The reference is the original Dense Connector, bit for bit.

The original (github HJYao00/DenseConnector) is restated below from its documented semantics
with LITERAL layer indices, independently of ``dc_kernels.ConnectorSpec`` (which the reference
uses), and fed real hidden states of depth-faithful random Hugging Face towers: CLIP with 24
layers (25 hidden states, CLS token) and SigLIP truncated to 26 layers (27 hidden states, no
CLS), as the original uses them. Tiny widths keep it fast; depths and indices are the real ones.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reference
from dc_kernels import ConnectorSpec

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONNECTORS = ("dci", "sci", "sti")
B = 2
C = 32

# CLIP: image 56 / patch 14 -> 16 patches + CLS = 17 tokens (T' = 16, two whole STI windows).
# SigLIP: image 70 / patch 14 -> 25 tokens (no CLS; 25 = 3 * 8 + 1 leaves an STI remainder).
CLIP_IMAGE, SIGLIP_IMAGE, PATCH = 56, 70, 14
CLIP_TOKENS, SIGLIP_TOKENS = 17, 25


# --------------------------------------------------------------------------- the original
def original_image_features(hidden_states, is_siglip):
    """CLIP: select_layer -2, 'patch' feature (CLS dropped). SigLIP: the last hidden state."""
    if is_siglip:
        return hidden_states[-1]
    return hidden_states[-2][:, 1:]


def original_dci(image_features, hidden_states, is_siglip):
    image_features_1 = []
    image_features_2 = []
    if not is_siglip:
        for i in range(0, 12):
            image_features_1.append(hidden_states[i][:, 1:].to(image_features.dtype))
        image_features_1 = torch.stack(image_features_1, dim=0)
        image_features_1 = torch.sum(image_features_1, dim=0) / 12
        for i in range(12, 24):
            image_features_2.append(hidden_states[i][:, 1:].to(image_features.dtype))
        image_features_2 = torch.stack(image_features_2, dim=0)
        image_features_2 = torch.sum(image_features_2, dim=0) / 12
    else:
        for i in range(0, 13):
            image_features_1.append(hidden_states[i][:, :].to(image_features.dtype))
        image_features_1 = torch.stack(image_features_1, dim=0)
        image_features_1 = torch.sum(image_features_1, dim=0) / 13
        for i in range(13, 26):
            image_features_2.append(hidden_states[i][:, :].to(image_features.dtype))
        image_features_2 = torch.stack(image_features_2, dim=0)
        image_features_2 = torch.sum(image_features_2, dim=0) / 13
    return torch.cat([image_features, image_features_1, image_features_2], dim=-1)


def original_sci(image_features, hidden_states, is_siglip):
    if not is_siglip:
        image_features_1 = hidden_states[7][:, 1:].to(image_features.dtype)
        image_features_2 = hidden_states[15][:, 1:].to(image_features.dtype)
    else:
        image_features_1 = hidden_states[7][:, :].to(image_features.dtype)
        image_features_2 = hidden_states[15][:, :].to(image_features.dtype)
    return torch.cat([image_features, image_features_1, image_features_2], dim=-1)


def original_sti(image_features, hidden_states, is_siglip):
    avg_pooling_k8 = nn.AvgPool1d(kernel_size=8, stride=8)
    if not is_siglip:
        image_features_1 = hidden_states[7][:, 1:].to(image_features.dtype)
        image_features_2 = hidden_states[15][:, 1:].to(image_features.dtype)
    else:
        image_features_1 = hidden_states[7][:, :].to(image_features.dtype)
        image_features_2 = hidden_states[15][:, :].to(image_features.dtype)
    image_features_1 = avg_pooling_k8(image_features_1.permute(0, 2, 1)).permute(0, 2, 1)
    image_features_2 = avg_pooling_k8(image_features_2.permute(0, 2, 1)).permute(0, 2, 1)
    return torch.cat([image_features, image_features_1, image_features_2], dim=-2)


ORIGINAL = {"dci": original_dci, "sci": original_sci, "sti": original_sti}


# --------------------------------------------------------------------------- towers
def _clip_tower():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(1234)
    cfg = CLIPVisionConfig(num_hidden_layers=24, hidden_size=C, intermediate_size=2 * C,
                           num_attention_heads=4, image_size=CLIP_IMAGE, patch_size=PATCH)
    return CLIPVisionModel(cfg).eval(), CLIP_IMAGE


def _siglip_tower():
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(5678)
    # The original deletes the last of so400m's 27 layers; here the tower simply has 26.
    cfg = SiglipVisionConfig(num_hidden_layers=26, hidden_size=C, intermediate_size=2 * C,
                             num_attention_heads=4, image_size=SIGLIP_IMAGE, patch_size=PATCH)
    return SiglipVisionModel(cfg).eval(), SIGLIP_IMAGE


@pytest.fixture(scope="module")
def tower_hidden_states():
    """{(encoder, dtype): hidden-state tuple} from the towers run in that dtype.

    fp16 and bf16 towers run natively on the CPU (torch 2.13 supports every op they use), so
    the hidden states are the ones a half-precision tower really produces.
    """
    out = {}
    for encoder, build in (("clip", _clip_tower), ("siglip", _siglip_tower)):
        model, image = build()
        pixels = torch.randn(B, 3, image, image, generator=torch.Generator().manual_seed(99))
        for dtype in DTYPES:
            m = copy.deepcopy(model).to(dtype)
            with torch.no_grad():
                hs = m(pixel_values=pixels.to(dtype), output_hidden_states=True).hidden_states
            out[encoder, dtype] = tuple(hs)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_towers_are_depth_faithful(tower_hidden_states, dtype):
    clip = tower_hidden_states["clip", dtype]
    siglip = tower_hidden_states["siglip", dtype]
    assert len(clip) == 25 and len(siglip) == 27
    for h in clip:
        assert h.shape == (B, CLIP_TOKENS, C) and h.dtype == dtype
        assert torch.isfinite(h).all()
    for h in siglip:
        assert h.shape == (B, SIGLIP_TOKENS, C) and h.dtype == dtype
        assert torch.isfinite(h).all()
    # Layers really differ (a test with identical layers could not tell indices apart).
    for hs in (clip, siglip):
        for i in range(1, len(hs)):
            assert not torch.equal(hs[i - 1], hs[i])


# --------------------------------------------------------------------------- bit equality
EXPECTED_SHAPES = {
    # encoder, connector -> [T_out, C_out] for C = 32
    ("clip", "dci"): (16, 3 * C),
    ("clip", "sci"): (16, 3 * C),
    ("clip", "sti"): (16 + 2 * (16 // 8), C),
    ("siglip", "dci"): (25, 3 * C),
    ("siglip", "sci"): (25, 3 * C),
    ("siglip", "sti"): (25 + 2 * (25 // 8), C),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("encoder", ("clip", "siglip"))
def test_select_image_features_is_original(tower_hidden_states, encoder, dtype):
    hs = tower_hidden_states[encoder, dtype]
    is_siglip = encoder == "siglip"
    got = reference.select_image_features(hs, is_siglip)
    want = original_image_features(hs, is_siglip)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    if is_siglip:
        assert torch.equal(got, hs[26])
    else:
        assert got.shape == (B, 16, C)
        assert torch.equal(got, hs[23][:, 1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("encoder", ("clip", "siglip"))
def test_dense_connector_bit_equal_to_original(tower_hidden_states, encoder, connector, dtype):
    hs = tower_hidden_states[encoder, dtype]
    is_siglip = encoder == "siglip"
    want = ORIGINAL[connector](original_image_features(hs, is_siglip), hs, is_siglip)
    assert want.shape == (B,) + EXPECTED_SHAPES[encoder, connector]

    got = reference.dense_connector(reference.select_image_features(hs, is_siglip), hs,
                                    is_siglip, connector)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got, want)

    # features_from_spec with the preset (image_features defaulted) is the same computation.
    spec = ConnectorSpec.preset(encoder, connector)
    got2 = reference.features_from_spec(hs, spec)
    assert torch.equal(got2, want)
    assert got2.shape == (B, spec.out_tokens(hs[0].shape[1]), spec.out_channels(C))


@pytest.mark.parametrize("connector", CONNECTORS)
@pytest.mark.parametrize("encoder", ("clip", "siglip"))
def test_original_restatement_is_sensitive_to_indices(tower_hidden_states, encoder, connector):
    """The bit-equality test can fail: an off-by-one layer index changes the result."""
    hs = tower_hidden_states[encoder, torch.float32]
    is_siglip = encoder == "siglip"
    want = ORIGINAL[connector](original_image_features(hs, is_siglip), hs, is_siglip)
    shifted = (hs[0],) + hs[:-1]  # every layer i now holds what was layer i - 1
    got = reference.dense_connector(reference.select_image_features(hs, is_siglip), shifted,
                                    is_siglip, connector)
    assert not torch.equal(got, want)


def test_reference_features_fp64_matches_original_in_fp64(tower_hidden_states):
    """features_fp64 (the tolerance yardstick) computes the same function as the original."""
    for encoder in ("clip", "siglip"):
        hs = tuple(h.double() for h in tower_hidden_states[encoder, torch.float32])
        is_siglip = encoder == "siglip"
        for connector in CONNECTORS:
            want = ORIGINAL[connector](original_image_features(hs, is_siglip), hs, is_siglip)
            got = reference.features_fp64(hs, ConnectorSpec.preset(encoder, connector))
            assert got.dtype == torch.float64 and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- presets = literals
def test_preset_indices_are_the_original_literals():
    clip = ConnectorSpec.preset("clip", "dci")
    assert clip.groups == ((0, 12), (12, 24))
    assert clip.final_layer == 23
    assert clip.drop_cls is True
    assert clip.num_hidden_states == 25
    assert clip.connector_type == "dci"

    siglip = ConnectorSpec.preset("siglip", "dci")
    assert siglip.groups == ((0, 13), (13, 26))
    assert siglip.final_layer == 26
    assert siglip.drop_cls is False
    assert siglip.num_hidden_states == 27

    for encoder, final, drop, n in (("clip", 23, True, 25), ("siglip", 26, False, 27)):
        for connector in ("sci", "sti"):
            s = ConnectorSpec.preset(encoder, connector)
            assert s.connector_type == connector
            assert s.groups == ((7, 8), (15, 16))
            assert s.final_layer == final
            assert s.drop_cls is drop
            assert s.num_hidden_states == n
            assert s.pool_size == 8
    assert ConnectorSpec.preset("clip").connector_type == "dci"  # the paper's default
    for encoder in ("clip", "siglip"):
        for connector in CONNECTORS:
            assert ConnectorSpec.preset(encoder, connector).pool_size == 8


# --------------------------------------------------------------------------- projector
def test_build_projector_linear():
    p = reference.build_projector(96, 40, "linear")
    assert type(p) is nn.Linear
    assert (p.in_features, p.out_features) == (96, 40)
    assert p.bias is not None
    assert list(p.state_dict()) == ["weight", "bias"]


def test_build_projector_mlp2x_gelu():
    p = reference.build_projector(96, 40, "mlp2x_gelu")
    assert isinstance(p, nn.Sequential)
    assert list(p.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [type(m) for m in p] == [nn.Linear, nn.GELU, nn.Linear]
    assert p[1].approximate == "none"
    assert tuple(p[0].weight.shape) == (40, 96) and tuple(p[0].bias.shape) == (40,)
    assert tuple(p[2].weight.shape) == (40, 40) and tuple(p[2].bias.shape) == (40,)
    # it computes Linear -> exact-erf GELU -> Linear
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = x @ p[0].weight.T + p[0].bias
        h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
        want = h @ p[2].weight.T + p[2].bias
        torch.testing.assert_close(p(x), want, rtol=1e-5, atol=1e-5)


def test_build_projector_default_is_mlp2x_gelu():
    p = reference.build_projector(8, 4)
    assert list(p.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_build_projector_mlp3x_gelu():
    p = reference.build_projector(96, 40, "mlp3x_gelu")
    assert list(p.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias",
                                    "4.weight", "4.bias"]
    assert [type(m) for m in p] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert all(m.approximate == "none" for m in p if isinstance(m, nn.GELU))
    assert tuple(p[4].weight.shape) == (40, 40)


def test_build_projector_identity():
    p = reference.build_projector(96, 96, "identity")
    x = torch.randn(2, 3, 96)
    assert p(x) is x
    assert list(p.state_dict()) == []


@pytest.mark.parametrize("bad", ["mlp", "mlp0x_gelu", "MLP2X_GELU", "mlp2x_relu", "", "linear2"])
def test_build_projector_unknown_type(bad):
    with pytest.raises(ValueError):
        reference.build_projector(8, 4, bad)
