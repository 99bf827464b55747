"""The ``dense_connector`` section of a Dense Connector LLaVA model's ``config.json``.

A Dense Connector LLaVA model directory is a Hugging Face LLaVA directory (``model_type``
``"llava"``: a CLIP or SigLIP ``vision_config``, a ``text_config``, ``image_token_index``) whose
``architectures`` is ``["DenseConnectorLlavaForConditionalGeneration"]`` and whose config holds
a ``dense_connector`` section saying what the connector computes::

    "dense_connector": {
        "connector_type": "dci",            # dci | sci | sti
        "final_layer": 23,                   # hidden-state index of the base features
        "groups": [[0, 12], [12, 24]],       # half-open hidden-state ranges, each averaged
        "drop_cls": true,                    # drop CLIP's CLS token from every hidden state
        "pool_size": 8,                      # STI's token pool
        "num_hidden_states": 25,             # optional: exact tuple length the spec expects
        "projector_type": "mlp2x_gelu",      # mlp2x_gelu | linear
        "mm_hidden_size": 3072,              # optional check: the projector's input width
        "drop_last_layer": false,            # optional: skip the tower's last layer (SigLIP)
        "streaming": true,                   # optional: streaming tower (default) or collected
        "mm_projector": "mm_projector.bin"   # optional: original DC projector weights file
    }

The spec fields are those of :class:`~dc_kernels.ConnectorSpec`; instead of them the section
may name a preset, ``{"encoder": "clip", "connector_type": "dci"}`` (the original's layer
indices, ``ConnectorSpec.preset``). :func:`dense_connector_config` writes a section,
:func:`parse_dense_connector_config` reads and checks one against the model's config, and
:func:`prepare_model_dir` turns a Hugging Face LLaVA directory into a Dense Connector one.

Nothing here imports vLLM: these helpers run (and are tested) without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from ...spec import ENCODERS, ConnectorSpec

__all__ = ["ARCHITECTURE", "CONFIG_KEY", "PROJECTOR_TYPES", "DenseConnectorServingConfig",
           "dense_connector_config", "parse_dense_connector_config", "prepare_model_dir"]

#: The ``architectures`` entry vLLM resolves to the plugin's model class.
ARCHITECTURE = "DenseConnectorLlavaForConditionalGeneration"
#: The key of the section in the model's ``config.json``.
CONFIG_KEY = "dense_connector"
#: Projector types the vLLM model builds (the original's ``mm_projector_type``).
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")

_SPEC_KEYS = ("connector_type", "final_layer", "groups", "drop_cls", "pool_size",
              "num_hidden_states")
_PRESET_KEYS = ("encoder", "connector_type")
_OTHER_KEYS = ("projector_type", "mm_hidden_size", "drop_last_layer", "streaming",
               "mm_projector")
_TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


@dataclass(frozen=True)
class DenseConnectorServingConfig:
    """A checked ``dense_connector`` section, resolved against the model's config.

    Attributes:
        spec: the :class:`ConnectorSpec`.
        encoder: ``"clip"`` or ``"siglip"`` (the vision tower's kind).
        projector_type: ``"mlp2x_gelu"`` or ``"linear"``.
        vision_hidden_size: the tower's width C.
        hidden_size: the language model's width H.
        mm_hidden_size: the projector's input width, ``spec.out_channels(C)``.
        tower_layers: encoder layers the model builds and may run (the tower's depth, less the
            dropped last layer).
        drop_last_layer: whether the tower's last encoder layer is skipped.
        streaming: streaming tower (fp32 group sums fed by each layer) or collected hidden
            states (the Triton fused/two-pass first layer on CUDA).
        mm_projector: path of an original projector weights file relative to the model
            directory, or ``None``.
        num_image_tokens: tokens per image the language model sees,
            ``spec.out_tokens(T)`` for the tower's image size.
    """

    spec: ConnectorSpec
    encoder: str
    projector_type: str
    vision_hidden_size: int
    hidden_size: int
    mm_hidden_size: int
    tower_layers: int
    drop_last_layer: bool
    streaming: bool
    mm_projector: Optional[str]
    num_image_tokens: int


def dense_connector_config(spec: ConnectorSpec, vision_hidden_size: int,
                           projector_type: str = "mlp2x_gelu", *, streaming: bool = True,
                           drop_last_layer: Optional[bool] = None,
                           mm_projector: Optional[str] = None) -> dict:
    """The ``dense_connector`` section (a JSON-ready dict) for ``spec``.

    Args:
        spec: the :class:`ConnectorSpec` (written out field by field, so the section does not
            depend on a preset's definition).
        vision_hidden_size: the tower's width C (``mm_hidden_size = spec.out_channels(C)`` is
            written as a check the loader repeats).
        projector_type: ``"mlp2x_gelu"`` or ``"linear"``.
        streaming: see :class:`DenseConnectorServingConfig`.
        drop_last_layer: written only when given (default: SigLIP drops, CLIP does not).
        mm_projector: file name (relative to the model directory) of an original Dense
            Connector projector checkpoint, loaded instead of the projector weights of the
            model's own checkpoint.
    """
    if not isinstance(spec, ConnectorSpec):
        raise TypeError(f"spec must be a dc_kernels.ConnectorSpec, got {type(spec).__name__}")
    section = {
        "connector_type": spec.connector_type,
        "final_layer": spec.final_layer,
        "groups": [list(g) for g in spec.groups],
        "drop_cls": spec.drop_cls,
        "pool_size": spec.pool_size,
    }
    if spec.num_hidden_states is not None:
        section["num_hidden_states"] = spec.num_hidden_states
    section["projector_type"] = projector_type
    section["mm_hidden_size"] = spec.out_channels(int(vision_hidden_size))
    if drop_last_layer is not None:
        section["drop_last_layer"] = drop_last_layer
    section["streaming"] = streaming
    if mm_projector is not None:
        section["mm_projector"] = mm_projector
    _check_section_types(section)
    return section


def _get(config: Any, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _bad(msg: str) -> ValueError:
    return ValueError(f"{CONFIG_KEY} config: {msg}")


def _check_section_types(section: Mapping) -> None:
    allowed = set(_SPEC_KEYS) | set(_PRESET_KEYS) | set(_OTHER_KEYS)
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise _bad(f"unknown keys {unknown}; allowed: {sorted(allowed)}")
    if "projector_type" in section and section["projector_type"] not in PROJECTOR_TYPES:
        raise _bad(f"projector_type must be one of {PROJECTOR_TYPES}, got "
                   f"{section['projector_type']!r}")
    for key in ("streaming", "drop_last_layer"):
        if key in section and not isinstance(section[key], bool):
            raise _bad(f"{key} must be true or false, got {section[key]!r}")
    if "mm_projector" in section:
        path = section["mm_projector"]
        if not isinstance(path, str) or not path or os.path.isabs(path):
            raise _bad(f"mm_projector must be a file name relative to the model directory, got "
                       f"{path!r}")
    if "mm_hidden_size" in section:
        v = section["mm_hidden_size"]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise _bad(f"mm_hidden_size must be a positive integer, got {v!r}")


def _spec_from_section(section: Mapping, encoder: str) -> ConnectorSpec:
    has_spec = any(k in section for k in ("final_layer", "groups"))
    if "encoder" in section:
        if has_spec:
            raise _bad("give either a preset ('encoder' + 'connector_type') or the spec fields "
                       "('final_layer', 'groups', ...), not both")
        if section["encoder"] not in ENCODERS:
            raise _bad(f"encoder must be one of {ENCODERS}, got {section['encoder']!r}")
        if section["encoder"] != encoder:
            raise _bad(f"the preset is for a {section['encoder']} tower, but the model's "
                       f"vision_config is a {encoder} tower")
        if "connector_type" not in section:
            raise _bad("a preset needs 'connector_type' (dci, sci or sti)")
        try:
            return ConnectorSpec.preset(section["encoder"], section["connector_type"])
        except ValueError as e:
            raise _bad(str(e)) from None
    missing = [k for k in ("connector_type", "final_layer", "groups") if k not in section]
    if missing:
        raise _bad(f"missing {missing}: give the spec fields (connector_type, final_layer, "
                   "groups, drop_cls, pool_size, num_hidden_states) or a preset (encoder, "
                   "connector_type)")
    kwargs = {k: section[k] for k in _SPEC_KEYS if k in section}
    groups = kwargs["groups"]
    if not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, (list, tuple)) for g in groups):
        raise _bad(f"groups must be a list of [start, stop] pairs, got {groups!r}")
    kwargs["groups"] = tuple(tuple(g) for g in groups)
    if "drop_cls" in kwargs and not isinstance(kwargs["drop_cls"], bool):
        raise _bad(f"drop_cls must be true or false, got {kwargs['drop_cls']!r}")
    try:
        return ConnectorSpec(**kwargs)
    except (TypeError, ValueError) as e:
        raise _bad(str(e)) from None


def parse_dense_connector_config(hf_config: Any) -> DenseConnectorServingConfig:
    """Read and check the ``dense_connector`` section of a LLaVA config.

    ``hf_config`` is a transformers ``LlavaConfig`` (or any object / dict with
    ``vision_config``, ``text_config`` and ``dense_connector``). Everything that can be checked
    without the weights is checked here, so a bad model directory is refused before anything is
    built:

    * the section is present, a dict, with known keys of the right types;
    * the spec is valid; a preset's encoder is the tower's kind;
    * the tower (CLIP or SigLIP) has the depth the spec reads (``num_hidden_states`` when
      fixed), after dropping its last layer if ``drop_last_layer`` (default: SigLIP only, as
      the original does);
    * ``mm_hidden_size``, when given, equals ``spec.out_channels(C)``;
    * STI features keep at least one token.

    Raises:
        ValueError: naming the problem (all messages start with ``dense_connector config:``).
    """
    section = _get(hf_config, CONFIG_KEY)
    if section is None:
        raise _bad(f"the model's config.json has no {CONFIG_KEY!r} section: a Dense Connector "
                   "LLaVA model needs one saying which hidden states the connector reads (see "
                   "dc_kernels.integrations.vllm.dense_connector_config / prepare_model_dir)")
    if not isinstance(section, Mapping):
        raise _bad(f"the {CONFIG_KEY!r} section must be a JSON object, got "
                   f"{type(section).__name__}")
    _check_section_types(section)
    vision = _get(hf_config, "vision_config")
    text = _get(hf_config, "text_config")
    if vision is None or text is None:
        raise _bad("the model's config has no vision_config / text_config: a Dense Connector "
                   "model is a LLaVA config (model_type 'llava')")
    model_type = _get(vision, "model_type")
    if model_type not in _TOWERS:
        raise _bad(f"vision_config.model_type is {model_type!r}; the Dense Connector model "
                   f"supports {sorted(_TOWERS)}")
    encoder = _TOWERS[model_type]
    spec = _spec_from_section(section, encoder)

    width = int(_get(vision, "hidden_size"))
    hidden = int(_get(text, "hidden_size"))
    depth = int(_get(vision, "num_hidden_layers"))
    drop_last = section.get("drop_last_layer", encoder == "siglip")
    layers = depth - int(drop_last)
    try:
        spec.check_num_hidden_states(layers + 1)
    except ValueError as e:
        dropped = " less its dropped last layer" if drop_last else ""
        raise _bad(f"the {encoder} tower has {depth} layers{dropped}, i.e. {layers + 1} hidden "
                   f"states, which does not fit the spec: {e}") from None
    mm_hidden = spec.out_channels(width)
    if "mm_hidden_size" in section and section["mm_hidden_size"] != mm_hidden:
        raise _bad(f"mm_hidden_size is {section['mm_hidden_size']}, but the spec makes "
                   f"{mm_hidden} features from the {width}-wide tower "
                   f"({spec.connector_type}, {spec.num_groups} groups)")
    image_size = int(_get(vision, "image_size"))
    patch = int(_get(vision, "patch_size"))
    tokens = (image_size // patch) ** 2 + (1 if encoder == "clip" else 0)
    if spec.drop_cls and encoder != "clip":
        raise _bad("drop_cls is true but a SigLIP tower has no CLS token")
    num_image_tokens = spec.out_tokens(tokens)
    if num_image_tokens <= 0:
        raise _bad(f"the spec leaves no image token out of the tower's {tokens}")
    return DenseConnectorServingConfig(
        spec=spec, encoder=encoder, projector_type=section.get("projector_type", "mlp2x_gelu"),
        vision_hidden_size=width, hidden_size=hidden, mm_hidden_size=mm_hidden,
        tower_layers=layers, drop_last_layer=bool(drop_last),
        streaming=section.get("streaming", True), mm_projector=section.get("mm_projector"),
        num_image_tokens=num_image_tokens)


def prepare_model_dir(model_dir: Union[str, os.PathLike], spec: ConnectorSpec,
                      projector_type: str = "mlp2x_gelu", *, streaming: bool = True,
                      drop_last_layer: Optional[bool] = None,
                      mm_projector: Optional[str] = None) -> DenseConnectorServingConfig:
    """Make a Hugging Face LLaVA directory servable by the plugin, in place.

    Sets ``architectures`` to :data:`ARCHITECTURE` and writes the ``dense_connector`` section
    (:func:`dense_connector_config`) into ``model_dir/config.json``, after checking it against
    the directory's config (:func:`parse_dense_connector_config`); the file is not changed when
    the check fails. ``mm_projector``, if given, must be a file in ``model_dir``.

    Returns:
        the checked :class:`DenseConnectorServingConfig`.
    """
    path = os.path.join(os.fspath(model_dir), "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    vision = config.get("vision_config") or {}
    if "hidden_size" not in vision:
        raise ValueError(f"{path}: no vision_config.hidden_size; is this a LLaVA model?")
    config[CONFIG_KEY] = dense_connector_config(
        spec, vision["hidden_size"], projector_type, streaming=streaming,
        drop_last_layer=drop_last_layer, mm_projector=mm_projector)
    config["architectures"] = [ARCHITECTURE]
    parsed = parse_dense_connector_config(_ConfigView(config))
    if mm_projector is not None and not os.path.isfile(
            os.path.join(os.fspath(model_dir), mm_projector)):
        raise ValueError(f"mm_projector file {mm_projector!r} is not in {model_dir}")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return parsed


class _ConfigView(dict):
    """A config.json dict whose ``vision_config``/``text_config`` carry their defaults.

    transformers fills ``model_type``-specific defaults (e.g. CLIP's ``image_size``) when it
    loads a config; a raw config.json may omit them. Missing ones are taken from transformers'
    config classes when transformers is installed.
    """

    def __init__(self, config: Mapping):
        super().__init__(config)
        for key in ("vision_config", "text_config"):
            sub = dict(config.get(key) or {})
            try:  # fill defaults the way transformers does when it loads the config
                from transformers import AutoConfig
                sub = AutoConfig.for_model(**sub).to_dict() if "model_type" in sub else sub
            except (ImportError, ValueError, TypeError):
                pass
            self[key] = sub
