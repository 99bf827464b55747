"""The vLLM plugin's ``dense_connector`` config section, without vLLM.

``dc_kernels.integrations.vllm`` (config helpers, entry point) must import and work in an
environment without vLLM; the model class itself is tested on a real engine by ``.ci/vllm``
(``tests_vllm/``, its own environment). Here: the section round-trips, every inconsistency is
refused with a ValueError naming it, and ``prepare_model_dir`` edits a saved LLaVA config.
"""

import json
import subprocess
import sys

import pytest

from dc_kernels import ConnectorSpec
from dc_kernels.integrations.vllm import (ARCHITECTURE, dense_connector_config,
                                          parse_dense_connector_config, prepare_model_dir)

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig

WIDTH, LLM = 32, 64


def _llava(encoder="clip", layers=None, section=None):
    if encoder == "clip":
        vision = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=64, num_attention_heads=4,
                                  num_hidden_layers=24 if layers is None else layers,
                                  image_size=28, patch_size=4)
    else:
        vision = SiglipVisionConfig(hidden_size=WIDTH, intermediate_size=64,
                                    num_attention_heads=4,
                                    num_hidden_layers=27 if layers is None else layers,
                                    image_size=28, patch_size=4)
    text = LlamaConfig(hidden_size=LLM, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, vocab_size=40)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=4)
    if section is not None:
        cfg.dense_connector = section
    return cfg


def test_import_does_not_need_vllm():
    code = ("import sys, dc_kernels.integrations.vllm as v; "
            "assert 'vllm' not in sys.modules, 'vllm imported'; print(v.ARCHITECTURE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ARCHITECTURE


@pytest.mark.parametrize("encoder,ctype", [("clip", "dci"), ("clip", "sci"), ("clip", "sti"),
                                           ("siglip", "dci"), ("siglip", "sti")])
@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "linear"])
def test_round_trip_presets(encoder, ctype, projector_type):
    spec = ConnectorSpec.preset(encoder, ctype)
    section = json.loads(json.dumps(dense_connector_config(spec, WIDTH, projector_type)))
    dc = parse_dense_connector_config(_llava(encoder, section=section))
    assert dc.spec == spec
    assert dc.encoder == encoder and dc.projector_type == projector_type
    assert dc.mm_hidden_size == spec.out_channels(WIDTH) and dc.hidden_size == LLM
    assert dc.drop_last_layer == (encoder == "siglip")
    assert dc.tower_layers == spec.num_hidden_states - 1
    patches = (28 // 4) ** 2
    assert dc.num_image_tokens == spec.out_tokens(patches + (encoder == "clip"))
    assert dc.streaming is True and dc.mm_projector is None
    # the preset form of the section reads the same spec
    dc2 = parse_dense_connector_config(
        _llava(encoder, section={"encoder": encoder, "connector_type": ctype}))
    assert dc2.spec == spec


def test_custom_spec_and_options():
    spec = ConnectorSpec("dci", 23, ((0, 8), (8, 16), (16, 24)), drop_cls=True)
    section = dense_connector_config(spec, WIDTH, streaming=False, mm_projector="mm.bin")
    dc = parse_dense_connector_config(_llava(section=section))
    assert dc.spec == spec and dc.mm_hidden_size == 4 * WIDTH
    assert dc.streaming is False and dc.mm_projector == "mm.bin"
    # a SigLIP tower already truncated to 26 layers: drop_last_layer false
    spec = ConnectorSpec.preset("siglip", "dci")
    dc = parse_dense_connector_config(_llava("siglip", layers=26, section=dense_connector_config(
        spec, WIDTH, drop_last_layer=False)))
    assert dc.tower_layers == 26 and not dc.drop_last_layer


def _section(**changes):
    s = dense_connector_config(ConnectorSpec.preset("clip", "dci"), WIDTH)
    for k, v in changes.items():
        if v is None:
            s.pop(k)
        else:
            s[k] = v
    return s


@pytest.mark.parametrize("config,message", [
    (_llava(), "has no 'dense_connector' section"),
    (_llava(section=[1, 2]), "must be a JSON object"),
    (_llava(section=_section(conector_type="dci")), "unknown keys ['conector_type']"),
    (_llava(section=_section(connector_type="xyz")), "connector_type must be one of"),
    (_llava(section=_section(groups=None)), "missing ['groups']"),
    (_llava(section=_section(groups=[[0, 12], [12, 30]])), "dense_connector config:"),
    (_llava(section=_section(groups="0-12")), "groups must be a list of [start, stop] pairs"),
    (_llava(section=_section(drop_cls="yes")), "drop_cls must be true or false"),
    (_llava(section=_section(projector_type="mlp3x_gelu")), "projector_type must be one of"),
    (_llava(section=_section(streaming="no")), "streaming must be true or false"),
    (_llava(section=_section(mm_projector="/abs/mm.bin")), "mm_projector must be a file name"),
    (_llava(section=_section(mm_hidden_size=64)), "mm_hidden_size is 64, but the spec makes 96"),
    (_llava(section=_section(mm_hidden_size=-1)), "mm_hidden_size must be a positive integer"),
    (_llava(layers=12, section=_section()),
     "the clip tower has 12 layers, i.e. 13 hidden states, which does not fit the spec"),
    (_llava("siglip", layers=26, section={"encoder": "siglip", "connector_type": "dci"}),
     "the siglip tower has 26 layers less its dropped last layer, i.e. 26 hidden states"),
    (_llava(section={"encoder": "siglip", "connector_type": "dci"}),
     "the preset is for a siglip tower, but the model's vision_config is a clip tower"),
    (_llava(section={"encoder": "clip"}), "a preset needs 'connector_type'"),
    (_llava(section={"encoder": "clip", "connector_type": "dci", "final_layer": 3}),
     "give either a preset"),
    (_llava("siglip", section=dense_connector_config(ConnectorSpec.preset("clip", "dci"), WIDTH)),
     "does not fit the spec"),
])
def test_bad_sections_refused(config, message):
    with pytest.raises(ValueError) as e:
        parse_dense_connector_config(config)
    assert message in str(e.value)
    assert str(e.value).startswith("dense_connector config:")


def test_bad_vision_tower_refused():
    from transformers import PixtralVisionConfig
    cfg = LlavaConfig(vision_config=PixtralVisionConfig(), text_config=LlamaConfig())
    cfg.dense_connector = {"encoder": "clip", "connector_type": "dci"}
    with pytest.raises(ValueError, match="vision_config.model_type is 'pixtral'"):
        parse_dense_connector_config(cfg)


def test_dense_connector_config_rejects_bad_arguments():
    spec = ConnectorSpec.preset("clip", "dci")
    with pytest.raises(TypeError, match="spec must be a dc_kernels.ConnectorSpec"):
        dense_connector_config("clip-dci", WIDTH)
    with pytest.raises(ValueError, match="projector_type must be one of"):
        dense_connector_config(spec, WIDTH, "identity")
    with pytest.raises(ValueError, match="streaming must be true or false"):
        dense_connector_config(spec, WIDTH, streaming=1)


def test_prepare_model_dir(tmp_path):
    _llava().save_pretrained(tmp_path)
    before = (tmp_path / "config.json").read_text()
    spec = ConnectorSpec.preset("clip", "sti")
    # refused without touching the file: the projector file is not there
    with pytest.raises(ValueError, match="mm_projector file 'mm.bin' is not in"):
        prepare_model_dir(tmp_path, spec, mm_projector="mm.bin")
    assert (tmp_path / "config.json").read_text() == before
    # a spec the tower cannot feed: refused, file unchanged
    with pytest.raises(ValueError, match="does not fit the spec"):
        prepare_model_dir(tmp_path, ConnectorSpec.preset("siglip", "dci"))
    assert (tmp_path / "config.json").read_text() == before
    (tmp_path / "mm.bin").write_bytes(b"")
    dc = prepare_model_dir(tmp_path, spec, "linear", mm_projector="mm.bin")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE]
    assert cfg["dense_connector"]["connector_type"] == "sti"
    assert cfg["dense_connector"]["mm_projector"] == "mm.bin"
    assert dc.num_image_tokens == 49 + 2 * (49 // 8)
    # what transformers reads back parses to the same
    loaded = LlavaConfig.from_pretrained(tmp_path)
    assert parse_dense_connector_config(loaded) == dc
