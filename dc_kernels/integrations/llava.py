"""The transformers LLaVA family (LLaVA, LLaVA-NeXT, LLaVA-OneVision) with layer-by-layer towers.

Two modes, one mechanism (the inner model's ``get_image_features`` / ``get_video_features`` are
replaced on the instance; the vision tower runs through
:class:`~dc_kernels.integrations.hf.VisionFeatureLayers` or
:class:`~dc_kernels.integrations.hf.DenseConnectorVisionTower`):

* **no spec** (``patch_llava(model)``): the model's own ``vision_feature_layer`` (int or list)
  and ``vision_feature_select_strategy`` and its own ``multi_modal_projector`` (``linear_1``,
  activation, ``linear_2``), the tower streamed: the layers after the last one read are not run,
  no hidden-state tuple is kept. Same results as stock transformers (same modules, same ops).
* **Dense Connector** (``patch_llava(model, spec)``): the projector is replaced by a
  :class:`~dc_kernels.DenseConnector` (``spec.out_channels(C)`` inputs, the original's
  ``0.*``/``2.*`` names); LLaVA-NeXT/OneVision run it on every AnyRes crop, then pack the crops
  with the model's own ``pack_image_features`` (unpadding, ``image_newline``), as the original
  Dense Connector's AnyRes models do. The spec is recorded in ``config.dense_connector`` so
  ``save_pretrained`` / ``from_pretrained`` (with the class-level patch) round-trip.

Liger-style entry points: :func:`apply_dense_connector_to_llava` (no model: class level, every
model built afterwards, e.g. by ``from_pretrained``, is patched at construction; a model: that
instance) and :func:`revert_dense_connector_to_llava`; :func:`unpatch_llava` restores an instance
bit for bit. See ``docs/DESIGN.md`` §9.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import os
import re
import threading
import types
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..modules import DenseConnector
from ..spec import ConnectorSpec
from .hf import (SUPPORTED_TOWERS, DenseConnectorVisionTower, VisionFeatureLayers,
                 _check_strategy, _resolve_transformer, _tower_kind)

__all__ = ["patch_llava", "unpatch_llava", "apply_dense_connector_to_llava",
           "revert_dense_connector_to_llava", "read_projector_checkpoint", "SUPPORTED_MODELS",
           "CONFIG_KEY"]

#: The inner model classes patched (``model.model`` of the ``...ForConditionalGeneration``).
SUPPORTED_MODELS = ("LlavaModel", "LlavaNextModel", "LlavaOnevisionModel")
#: ``config`` attribute where a Dense Connector patch records its spec (saved by save_pretrained).
CONFIG_KEY = "dense_connector"
_STATE = "_dc_kernels_patch"  # the patch's state on the inner model (a plain attribute)
#: checkpoint files looked for when ``checkpoint`` is a directory, in this order
CHECKPOINT_FILES = ("mm_projector.bin", "non_lora_trainables.bin")
_BARE_KEY = re.compile(r"^((\d+\.)?(weight|bias)|linear_[12]\.(weight|bias))$")


# --------------------------------------------------------------------------- families
def _families() -> Dict[type, str]:
    """{inner model class: family} for the classes this transformers has."""
    out = {}
    try:
        from transformers.models.llava.modeling_llava import LlavaModel
    except ImportError as e:  # pragma: no cover - transformers is a test dependency
        raise ImportError("the LLaVA patches need transformers (pip install transformers)") from e
    out[LlavaModel] = "llava"
    try:
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
        out[LlavaNextModel] = "llava_next"
    except ImportError:  # pragma: no cover - old transformers
        pass
    try:
        from transformers.models.llava_onevision.modeling_llava_onevision import \
            LlavaOnevisionModel
        out[LlavaOnevisionModel] = "llava_onevision"
    except ImportError:  # pragma: no cover - old transformers
        pass
    return out


def _inner(model: nn.Module) -> Tuple[nn.Module, str]:
    """(the inner LlavaModel-like module, its family); clear errors for anything else."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers LLaVA model, got {type(model).__name__}")
    families = _families()
    for candidate in (model, getattr(model, "model", None)):
        # exact classes: a subclass (LLaVA-NeXT-Video, ...) may compute its features otherwise
        if candidate is not None and type(candidate) in families:
            return candidate, families[type(candidate)]
    name = type(model).__name__
    supported = ", ".join(c.__name__.replace("Model", "ForConditionalGeneration") + " / "
                          + c.__name__ for c in families)
    if "llava" in name.lower():
        raise NotImplementedError(
            f"{name} is not supported; supported: {supported}. VipLlava (its own projector "
            "with a layernorm), Video-LLaVA and LLaVA-NeXT-Video (video towers and poolers) "
            "compute their features otherwise")
    raise TypeError(f"model must be one of {supported}, got {name}")


def _check_tower(inner: nn.Module) -> None:
    """A clear TypeError for towers the layer-by-layer runner cannot run."""
    tower = inner.vision_tower
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    if model_type is not None and model_type not in SUPPORTED_TOWERS:
        raise TypeError(
            f"unsupported vision tower {type(tower).__name__} (config.model_type="
            f"{model_type!r}); supported: {SUPPORTED_TOWERS} (fixed-size ViTs whose layers run "
            "one after another; Pixtral-style towers that take image_sizes, SigLIP2 and others "
            "are not supported)")
    _tower_kind(tower, _resolve_transformer(tower))


def _module_of(inner: nn.Module):
    import importlib
    return importlib.import_module(type(inner).__module__)


# --------------------------------------------------------------------------- checkpoints
def read_projector_checkpoint(checkpoint) -> Tuple[Dict[str, torch.Tensor],
                                                   Dict[str, torch.Tensor]]:
    """The projector weights (and ``image_newline``) of an original LLaVA / Dense Connector file.

    Accepts a state dict, a file (``torch.load``-able: the stage-1 ``mm_projector.bin``, a LoRA
    run's ``non_lora_trainables.bin``, a full ``pytorch_model.bin`` shard) or a directory holding
    ``mm_projector.bin`` or ``non_lora_trainables.bin``. Keys are matched wherever
    ``mm_projector.`` occurs, so ``mm_projector.0.weight``, ``model.mm_projector.0.weight`` and
    the PEFT form ``base_model.model.model.mm_projector.0.weight`` all give ``0.weight``; a key
    ending in ``image_newline`` (``model.image_newline``, AnyRes models) is returned apart. Other
    keys (the LLM, ``embed_tokens``) are ignored, as the original's loader does. A state dict
    without ``mm_projector.`` keys whose keys are all a projector's own (``0.weight``,
    ``weight``, ``linear_1.weight``, ...) is taken as the projector itself.

    Returns:
        ``(projector, extras)``: ``{"0.weight": ..., "0.bias": ..., ...}`` and
        ``{"image_newline": ...}`` (or ``{}``).

    Raises:
        TypeError: not a mapping or a path.
        ValueError: no projector key, the same projector key twice under different prefixes, or
            a directory without one of the files.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if os.path.isdir(path):
            for name in CHECKPOINT_FILES:
                if os.path.isfile(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise ValueError(f"the directory {checkpoint!s} holds none of {CHECKPOINT_FILES}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a state dict or a path, got "
                        f"{type(checkpoint).__name__}")
    projector: Dict[str, torch.Tensor] = {}
    extras: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    for key, value in checkpoint.items():
        if not isinstance(key, str):
            continue
        marker = "mm_projector."
        at = key.find(marker)
        if at == 0 or (at > 0 and key[at - 1] == "."):
            name = key[at + len(marker):]
            if name in projector:
                raise ValueError(f"checkpoint holds projector weight {name!r} twice: "
                                 f"{origin[name]!r} and {key!r}")
            projector[name] = value
            origin[name] = key
        elif key == "image_newline" or key.endswith(".image_newline"):
            extras["image_newline"] = value
    if not projector:
        # a bare projector state dict: the module's own keys (0.weight ... / weight, bias /
        # linear_1.*, linear_2.*), as DenseConnector.state_dict() or a transformers projector
        bare = {k: v for k, v in checkpoint.items() if isinstance(k, str)
                and k != "image_newline"}
        if bare and all(_BARE_KEY.match(k) for k in bare):
            projector = bare
    if not projector:
        sample = sorted(k for k in checkpoint if isinstance(k, str))[:5]
        raise ValueError("checkpoint holds no mm_projector.* weights (keys such as "
                         f"'model.mm_projector.0.weight') and is not a bare projector state dict "
                         f"('0.weight', 'linear_1.weight', ...); its first keys: {sample}")
    return projector, extras


def _load_own_projector(projector: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Original ``mm_projector`` keys (``0.*``, ``2.*``) into ``linear_1`` / ``linear_2``."""
    if not (isinstance(getattr(projector, "linear_1", None), nn.Linear)
            and isinstance(getattr(projector, "linear_2", None), nn.Linear)):
        raise ValueError(f"the model's projector ({type(projector).__name__}) has no linear_1 / "
                         "linear_2 to load an original mlp2x_gelu projector into")
    mapping = {"0.": "linear_1.", "2.": "linear_2."}
    target = {}
    for key, value in weights.items():
        if key.startswith(("linear_1.", "linear_2.")):
            target[key] = value
        elif key[:2] in mapping:
            target[mapping[key[:2]] + key[2:]] = value
        else:
            raise ValueError(f"unexpected projector key {key!r}: an original mlp2x_gelu "
                             "projector has 0.weight, 0.bias, 2.weight, 2.bias")
    own = dict(projector.named_parameters())
    own = {k: v for k, v in own.items() if k.startswith(("linear_1.", "linear_2."))}
    problems = []
    missing = sorted(set(own) - set(target))
    unexpected = sorted(set(target) - set(own))
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    for k in sorted(set(own) & set(target)):
        if tuple(own[k].shape) != tuple(target[k].shape):
            problems.append(f"{k}: {tuple(target[k].shape)} (expected {tuple(own[k].shape)})")
    if problems:
        raise ValueError("checkpoint does not fit the model's projector: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in target.items():
            own[k].copy_(v)


# --------------------------------------------------------------------------- the patch state
_MISSING = object()


@dataclasses.dataclass
class _Patch:
    """What a patch changed on the inner model (so unpatch can undo it) and how it runs."""

    family: str
    mode: str                                    # "layers" | "dense_connector"
    streaming: bool
    from_config: bool = False                    # built from config.dense_connector
    wrapper: Optional[DenseConnectorVisionTower] = None
    old_projector: Optional[nn.Module] = None
    restore_params: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    old_config_entry: Any = _MISSING            # config.dense_connector before the patch
    towers: Dict[Any, VisionFeatureLayers] = dataclasses.field(default_factory=dict)

    def layers_tower(self, inner, layers, strategy) -> VisionFeatureLayers:
        """The (cached) tower for a ``vision_feature_layer`` value and a strategy."""
        key = (tuple(layers) if isinstance(layers, (list, tuple)) else layers, strategy)
        tower = self.towers.get(key)
        if tower is None:  # (two threads may both build one: setdefault keeps the first)
            tower = self.towers.setdefault(
                key, VisionFeatureLayers(inner.vision_tower, layers, strategy, self.streaming))
        return tower


def _state(inner) -> Optional[_Patch]:
    return inner.__dict__.get(_STATE)


def _effective_layers(inner, vision_feature_layer, strategy):
    layer = vision_feature_layer if vision_feature_layer is not None \
        else inner.config.vision_feature_layer
    strategy = strategy if strategy is not None else inner.config.vision_feature_select_strategy
    return layer, _check_strategy(strategy)


def _image_tokens(inner, pixel_values, vision_feature_layer, strategy) -> torch.Tensor:
    """``[N, T', H]`` projected tokens of ``N`` images / crops / frames."""
    state = _state(inner)
    if state.mode == "dense_connector":
        return state.wrapper(pixel_values)
    layer, strategy = _effective_layers(inner, vision_feature_layer, strategy)
    features = state.layers_tower(inner, layer, strategy)(pixel_values)
    return inner.multi_modal_projector(features)


def _output(pooler_output, kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    out = BaseModelOutputWithPooling(pooler_output=pooler_output)
    return out if kwargs.get("return_dict", True) else out.to_tuple()


# ------------------------------------------------------------- replacements (bound per instance)
def _llava_get_image_features(self, pixel_values: torch.Tensor, vision_feature_layer=None,
                              vision_feature_select_strategy=None, image_sizes=None, **kwargs):
    """``LlavaModel.get_image_features``, run by dc_kernels (see ``patch_llava``).

    Returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the list of per-image
    ``[tokens, hidden_size]`` features (the tower's hidden states are not returned; other
    keyword arguments, e.g. the language model's ``output_*`` flags, are ignored).
    """
    if image_sizes is not None:
        raise NotImplementedError("dc_kernels' LLaVA patch does not support image_sizes "
                                  "(variable-size towers such as Pixtral)")
    tokens = _image_tokens(self, pixel_values, vision_feature_layer,
                           vision_feature_select_strategy)
    return _output(list(tokens), kwargs)


def _crops(self, pixel_values, image_num_patches):
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() == 5:
        # [images, max crops, C, H, W], padded: the first image_num_patches[i] crops are real
        return torch.cat([pv[:n] for pv, n in zip(pixel_values, image_num_patches)], dim=0)
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}, expect to be of 4 "
                         "or 5 dimensions")
    return pixel_values


def _pack_strategy(self, strategy):
    state = _state(self)
    if state.mode == "dense_connector":  # only used for a shape warning by transformers
        return "default" if state.wrapper.spec.drop_cls else "full"
    return _effective_layers(self, None, strategy)[1]


def _next_get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                             vision_feature_layer=None, vision_feature_select_strategy=None,
                             **kwargs):
    """``LlavaNextModel.get_image_features``, run by dc_kernels (see ``patch_llava``).

    Every AnyRes crop goes through the tower (+ Dense Connector) and the projector, then the
    crops are packed by the model's own ``pack_image_features`` (unpad, ``image_newline``).
    """
    module = _module_of(self)
    image_num_patches = [
        module.image_size_to_num_patches(image_size=imsize,
                                         grid_pinpoints=self.config.image_grid_pinpoints,
                                         patch_size=self.config.vision_config.image_size)
        for imsize in image_sizes]
    pixel_values = _crops(self, pixel_values, image_num_patches)
    tokens = _image_tokens(self, pixel_values, vision_feature_layer,
                           vision_feature_select_strategy)
    tokens = torch.split(tokens, image_num_patches, dim=0)
    packed, _ = self.pack_image_features(
        tokens, image_sizes,
        vision_feature_select_strategy=_pack_strategy(self, vision_feature_select_strategy),
        image_newline=self.image_newline)
    return _output(packed, kwargs)


def _onevision_get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                                  vision_feature_layer=None, vision_feature_select_strategy=None,
                                  vision_aspect_ratio=None, batch_num_images=None, **kwargs):
    """``LlavaOnevisionModel.get_image_features``, run by dc_kernels (see ``patch_llava``).

    As LLaVA-NeXT, with OneVision's ``batch_num_images`` (multi-image samples are not split
    into crops) and ``vision_aspect_ratio`` (``anyres_max_N`` downscaling in the packing).
    """
    module = _module_of(self)
    if vision_aspect_ratio is None:
        vision_aspect_ratio = self.config.vision_aspect_ratio
    if batch_num_images is None:
        need_patching = [True] * len(image_sizes)
    else:
        need_patching = [n == 1 for n in batch_num_images for _ in range(n)]
    image_num_patches = [
        module.image_size_to_num_patches(image_size=imsize,
                                         grid_pinpoints=self.config.image_grid_pinpoints,
                                         patch_size=self.config.vision_config.image_size)
        if should_patch else 1
        for imsize, should_patch in zip(image_sizes, need_patching)]
    pixel_values = _crops(self, pixel_values, image_num_patches)
    tokens = _image_tokens(self, pixel_values, vision_feature_layer,
                           vision_feature_select_strategy)
    tokens = torch.split(tokens, image_num_patches, dim=0)
    packed, _ = self.pack_image_features(tokens, image_sizes, image_newline=self.image_newline,
                                         vision_aspect_ratio=vision_aspect_ratio)
    return _output(packed, kwargs)


@functools.lru_cache(maxsize=None)
def _video_features_end_with_newline(cls) -> bool:
    """Whether transformers' own ``cls.get_video_features`` appends the ``image_newline`` to
    each video (as in transformers 5.25) or leaves that to ``forward`` (as in 5.17): the
    replacement must do what the installed version's ``forward`` expects, or the video tokens
    and features differ by one. Read off the stock method's source; without it, off its first
    parameter's name (``pixel_values_videos`` in 5.25, ``pixel_values`` in 5.17)."""
    stock = cls.get_video_features
    try:
        return "image_newline" in inspect.getsource(stock)
    except (OSError, TypeError):
        params = list(inspect.signature(stock).parameters)
        return len(params) > 1 and params[1] == "pixel_values_videos"


def _onevision_get_video_features(self, pixel_values_videos: torch.Tensor = None,
                                  vision_feature_layer=None, vision_feature_select_strategy=None,
                                  **kwargs):
    """``LlavaOnevisionModel.get_video_features``, run by dc_kernels (see ``patch_llava``).

    Every frame through the tower (+ Dense Connector) and the projector, then the model's own
    ``apply_pooling`` (2x bilinear downscaling) and, where the installed transformers' own
    method does (5.25; 5.17 adds it in ``forward``), one ``image_newline`` per video. The
    videos go first, or by either keyword transformers has given them: ``pixel_values_videos``
    (5.25) or ``pixel_values`` (5.17, whose ``LlavaOnevisionForConditionalGeneration`` passes
    that keyword).
    """
    if "pixel_values" in kwargs:
        if pixel_values_videos is not None:
            raise TypeError("get_video_features() got the videos twice: as pixel_values_videos "
                            "and as pixel_values")
        pixel_values_videos = kwargs.pop("pixel_values")
    if not isinstance(pixel_values_videos, torch.Tensor) or pixel_values_videos.dim() != 5:
        raise ValueError("pixel_values_videos must be a [batch, frames, channels, height, width] "
                         "tensor")
    batch_size, frames, channels, height, width = pixel_values_videos.shape
    pixel_values = pixel_values_videos.view(batch_size * frames, channels, height, width)
    tokens = _image_tokens(self, pixel_values, vision_feature_layer,
                           vision_feature_select_strategy)
    tokens = self.apply_pooling(tokens)
    tokens = tokens.reshape(batch_size, frames * tokens.shape[1], -1)
    if not _video_features_end_with_newline(type(self)):
        return _output(tokens, kwargs)
    newline = self.image_newline[None, None, :].repeat(batch_size, 1, 1).to(tokens.device)
    return _output(torch.cat((tokens, newline), dim=1), kwargs)


_REPLACEMENTS = {
    "llava": {"get_image_features": _llava_get_image_features},
    "llava_next": {"get_image_features": _next_get_image_features},
    "llava_onevision": {"get_image_features": _onevision_get_image_features,
                        "get_video_features": _onevision_get_video_features},
}


# --------------------------------------------------------------------------- patching
_SPEC_FIELDS = ("connector_type", "final_layer", "groups", "drop_cls", "pool_size",
                "num_hidden_states")


def _spec_entry(spec: ConnectorSpec, connector: DenseConnector, drop_last_layer: bool,
                streaming: bool) -> dict:
    """The ``config.dense_connector`` section: the format of the vLLM plugin's config
    (``dc_kernels.integrations.vllm.config``), so a saved model's section is the one it reads."""
    section = {"connector_type": spec.connector_type, "final_layer": spec.final_layer,
               "groups": [list(g) for g in spec.groups], "drop_cls": spec.drop_cls,
               "pool_size": spec.pool_size}
    if spec.num_hidden_states is not None:
        section["num_hidden_states"] = spec.num_hidden_states
    section["projector_type"] = connector.projector_type
    section["mm_hidden_size"] = spec.out_channels(connector.vision_hidden_size)
    section["drop_last_layer"] = bool(drop_last_layer)
    section["streaming"] = streaming
    return section


def _bad_entry(msg: str) -> ValueError:
    return ValueError(f"config.{CONFIG_KEY}: {msg}")


def _spec_from_entry(entry, width: int) -> Tuple[ConnectorSpec, str, Optional[bool]]:
    """(spec, projector type, drop_last_layer or None) of a ``config.dense_connector`` section.

    Reads the spec fields or a preset (``encoder`` + ``connector_type``), as the vLLM plugin's
    config does. A section naming an external ``mm_projector`` file is refused: the weights are
    not in the checkpoint ``from_pretrained`` loads.
    """
    if not isinstance(entry, Mapping):
        raise _bad_entry(f"must be a mapping, got {type(entry).__name__}")
    if entry.get("mm_projector") is not None:
        raise _bad_entry(
            f"the projector's weights are in {entry['mm_projector']!r} (an original Dense "
            "Connector file next to the checkpoint), not in the checkpoint: load the model "
            "without the class-level patch and call patch_llava(model, spec, "
            "checkpoint=<that file>)")
    try:
        if "encoder" in entry:
            spec = ConnectorSpec.preset(entry["encoder"], entry.get("connector_type", "dci"))
        else:
            missing = [k for k in ("connector_type", "final_layer", "groups") if k not in entry]
            if missing:
                raise _bad_entry(f"missing {missing} (the spec fields, or a preset: encoder + "
                                 "connector_type)")
            kwargs = {k: entry[k] for k in _SPEC_FIELDS if k in entry}
            kwargs["groups"] = tuple(tuple(g) for g in kwargs["groups"])
            spec = ConnectorSpec(**kwargs)
    except (TypeError, ValueError) as e:
        if str(e).startswith(f"config.{CONFIG_KEY}"):
            raise
        raise _bad_entry(str(e)) from None
    if "mm_hidden_size" in entry and entry["mm_hidden_size"] != spec.out_channels(width):
        raise _bad_entry(f"mm_hidden_size is {entry['mm_hidden_size']}, but the spec makes "
                         f"{spec.out_channels(width)} features from the {width}-wide tower")
    drop_last_layer = entry.get("drop_last_layer")
    if drop_last_layer is not None and not isinstance(drop_last_layer, bool):
        raise _bad_entry(f"drop_last_layer must be true or false, got {drop_last_layer!r}")
    return spec, entry.get("projector_type", "mlp2x_gelu"), drop_last_layer


def _check_anyres_fit(inner, family, spec, wrapper):
    if family == "llava":
        return
    vc = inner.config.vision_config
    grid = (vc.image_size // vc.patch_size) ** 2
    tokens = wrapper.num_image_tokens
    if tokens != grid:
        why = "STI adds pooled tokens" if spec.connector_type == "sti" else \
            "a CLS token is kept (drop_cls=False on a CLIP tower)" if wrapper.encoder_type == \
            "clip" else "the spec's tokens differ from the patch grid"
        raise ValueError(
            f"{type(inner).__name__} packs every crop as a {vc.image_size // vc.patch_size}^2 "
            f"grid of {grid} tokens; this spec gives {tokens} per crop ({why})")


def _install(inner, family, state: _Patch) -> None:
    object.__setattr__(inner, _STATE, state)
    for name, fn in _REPLACEMENTS[family].items():
        object.__setattr__(inner, name, types.MethodType(fn, inner))
    if state.wrapper is not None:
        # a plain attribute: its tower and connector already are submodules of `inner`
        object.__setattr__(inner, "dense_connector_tower", state.wrapper)


def _default_drop_last_layer(tower, spec) -> Optional[bool]:
    """SigLIP: drop the last layer unless the tower already has the spec's depth (OneVision)."""
    if _tower_kind(tower, _resolve_transformer(tower)) != "siglip":
        return None
    layers = len(_resolve_transformer(tower).encoder.layers)
    if spec.num_hidden_states is not None and spec.num_hidden_states == layers + 1:
        return False
    return None


def patch_llava(model: nn.Module, spec: Optional[ConnectorSpec] = None, *,
                connector: Optional[nn.Module] = None,
                checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor], None] = None,
                projector_type: str = "mlp2x_gelu", streaming: bool = True,
                backend: str = "auto", drop_last_layer: Optional[bool] = None) -> nn.Module:
    """Run a transformers LLaVA-family model's image features layer by layer, in place.

    Supported: ``LlavaForConditionalGeneration`` / ``LlavaModel``,
    ``LlavaNextForConditionalGeneration`` / ``LlavaNextModel`` (AnyRes crops, ``image_sizes``,
    ``image_newline`` packing) and ``LlavaOnevisionForConditionalGeneration`` /
    ``LlavaOnevisionModel`` (images and videos), with a CLIP or SigLIP tower. After the patch,
    ``get_image_features`` (and so ``forward`` / ``generate``) runs the tower through dc_kernels.

    **Without spec and connector** (the model's own features): the features are transformers'
    ``vision_feature_layer`` (an int, or a list concatenated on channels) with
    ``vision_feature_select_strategy`` -- from the config, or per call as transformers allows --
    streamed (:class:`~dc_kernels.integrations.hf.VisionFeatureLayers`: the layers after the last
    one read are not run, no hidden-state tuple is kept), fed to the model's own
    ``multi_modal_projector`` (its ``linear_1``/``linear_2`` names, its activation). The state
    dict and config are unchanged, and the results equal stock transformers' (the same modules
    run the same ops; the tests compare logits in fp32 and bf16). ``checkpoint``, if given, is an
    original LLaVA projector (``mm_projector.0.*``/``2.*`` keys) loaded into
    ``linear_1``/``linear_2``.

    **With a Dense Connector** (``spec`` or a ``connector``): the model's
    ``multi_modal_projector`` is replaced by a :class:`~dc_kernels.DenseConnector`
    (``spec.out_channels(C)`` inputs; state-dict keys ``model.multi_modal_projector.0.weight``
    ..., the original's names), and each image -- each AnyRes crop for LLaVA-NeXT/OneVision,
    each video frame for OneVision -- goes through
    :class:`~dc_kernels.integrations.hf.DenseConnectorVisionTower` (the original DC's
    ``encode_images()``); the crops are then packed by the model's own ``pack_image_features``
    with its ``image_newline``: the layout of the original DC AnyRes checkpoints.
    ``vision_feature_layer``/``vision_feature_select_strategy`` are ignored (the spec decides).
    The spec is recorded in ``model.config.dense_connector``, so ``save_pretrained`` keeps it
    and ``from_pretrained`` rebuilds the model when the class-level patch is active
    (:func:`apply_dense_connector_to_llava`). The projector's weights come from, in order:

    * ``checkpoint``: an original Dense Connector checkpoint -- path, directory (with
      ``mm_projector.bin`` or ``non_lora_trainables.bin``) or state dict; keys
      ``model.mm_projector.*``, ``mm_projector.*`` or PEFT's
      ``base_model.model.model.mm_projector.*`` (:func:`read_projector_checkpoint`), loaded
      strictly; an ``image_newline`` in it is loaded into the model's;
    * ``connector``: a ready :class:`~dc_kernels.DenseConnector`, or an original projector module
      (``nn.Sequential(Linear, GELU, Linear)`` / ``nn.Linear``) whose parameters are wrapped;
    * otherwise freshly initialised (``nn.Linear``'s default), e.g. to train it.

    The connector is moved to the device and dtype of the replaced projector.

    Args:
        model: a supported LLaVA-family model (the ``...ForConditionalGeneration`` or its inner
            ``model``).
        spec: the :class:`ConnectorSpec` of a Dense Connector (e.g.
            ``ConnectorSpec.preset("siglip", "dci")``); optional when ``connector`` is a
            DenseConnector.
        connector, checkpoint, projector_type: the projector, see above (``projector_type`` for
            a freshly built connector: ``"mlp2x_gelu"``, ``"linear"``, ``"mlpNx_gelu"``).
        streaming: see :class:`~dc_kernels.integrations.hf.DenseConnectorVisionTower`.
        backend: the DenseConnector's backend.
        drop_last_layer: Dense Connector only, see
            :class:`~dc_kernels.integrations.hf.DenseConnectorVisionTower`; default: CLIP keeps
            every layer, SigLIP drops its last one unless the tower already has the spec's depth
            (OneVision's 26-layer SigLIP with the 27-hidden-state presets).

    Returns:
        ``model``, patched in place; :func:`unpatch_llava` undoes it.

    Raises:
        TypeError: not a LLaVA model, a bad spec/connector type, an unsupported tower
            (Pixtral, SigLIP2, ...).
        NotImplementedError: VipLlava, Video-LLaVA, LLaVA-NeXT-Video.
        ValueError: already patched, a spec that does not fit the tower (depth, width), the
            language model's width or the AnyRes crop grid (STI), a ``vision_feature_layer``
            outside the tower, a checkpoint that does not fit.

    Limits: the image outputs carry the projected features as ``pooler_output`` only (no tower
    ``hidden_states``); ``image_sizes`` on plain LLaVA (Pixtral towers) is refused. A Dense
    Connector on plain LLaVA needs ``model.model.dense_connector_tower.num_image_tokens`` image
    tokens per image in the prompt (the same as LLaVA's for DCI/SCI on CLIP, 576 at 336 px; more
    for STI). To reproduce the original Dense Connector's SigLIP checkpoints exactly, run the
    tower with eager attention (``model.set_attn_implementation({"vision_config": "eager"})``):
    the original's SigLIP is eager, transformers' default sdpa differs in the last bits
    (``docs/DESIGN.md`` §9).
    """
    inner, family = _inner(model)
    if _state(inner) is not None:
        raise ValueError("this model is already patched by dc_kernels (unpatch_llava(model) "
                         "first)")
    _check_tower(inner)
    if spec is not None and not isinstance(spec, ConnectorSpec):
        raise TypeError(f"spec must be a dc_kernels.ConnectorSpec, got {type(spec).__name__}")
    if not isinstance(streaming, bool):
        raise TypeError(f"streaming must be a bool, got {streaming!r}")
    if spec is None and connector is None:
        _refuse_unloaded_dense_connector(inner)
        if drop_last_layer is not None:
            raise ValueError("drop_last_layer= is for a Dense Connector spec; without one the "
                             "model's vision_feature_layer decides which layers run")
        _patch_layers(inner, family, streaming, checkpoint)
    else:
        _patch_dense_connector(inner, family, spec, connector, checkpoint, projector_type,
                               streaming, backend, drop_last_layer)
    return model


def _load_newline(inner, extras, state: _Patch) -> None:
    newline = extras.get("image_newline")
    if newline is None:
        return
    own = getattr(inner, "image_newline", None)
    if not isinstance(own, torch.Tensor):
        raise ValueError(f"the checkpoint holds an image_newline (an AnyRes model's); "
                         f"{type(inner).__name__} has none")
    if tuple(newline.shape) != tuple(own.shape):
        raise ValueError(f"the checkpoint's image_newline is {tuple(newline.shape)}, the "
                         f"model's {tuple(own.shape)}")
    state.restore_params["image_newline"] = own.detach().clone()
    with torch.no_grad():
        own.copy_(newline)


def _patch_layers(inner, family, streaming, checkpoint) -> None:
    _check_tower(inner)
    state = _Patch(family=family, mode="layers", streaming=streaming)
    # build the default tower now: an unsupported tower or a bad vision_feature_layer fails here
    layer, strategy = _effective_layers(inner, None, None)
    state.layers_tower(inner, layer, strategy)
    if checkpoint is not None:
        weights, extras = read_projector_checkpoint(checkpoint)
        projector = inner.multi_modal_projector
        saved = {k: v.detach().clone() for k, v in projector.named_parameters()}
        _load_own_projector(projector, weights)  # checks everything before copying
        try:
            _load_newline(inner, extras, state)
        except ValueError:
            with torch.no_grad():
                for k, v in projector.named_parameters():
                    v.copy_(saved[k])
            raise
        state.restore_params.update({f"multi_modal_projector.{k}": v for k, v in saved.items()})
    _install(inner, family, state)


def _build_connector(inner, spec, connector, projector_type, backend) -> DenseConnector:
    tower = inner.vision_tower
    hidden = int(inner.config.text_config.hidden_size)
    width = int(_resolve_transformer(tower).config.hidden_size)
    if isinstance(connector, DenseConnector):
        if spec is not None and spec != connector.spec:
            raise ValueError(f"spec {spec} differs from the connector's spec {connector.spec}")
    elif connector is not None:
        if not isinstance(connector, nn.Module):
            raise TypeError("connector must be a DenseConnector, an original projector module "
                            f"or None, got {type(connector).__name__}")
        if spec is None:
            raise ValueError("wrapping a projector module needs spec=")
        connector = DenseConnector.from_projector(spec, connector, backend=backend)
    else:
        connector = DenseConnector(spec, width, hidden, projector_type, backend=backend)
    if connector.hidden_size != hidden:
        raise ValueError(f"the connector projects to {connector.hidden_size} features; the "
                         f"language model is {hidden} wide")
    return connector


def _patch_dense_connector(inner, family, spec, connector, checkpoint, projector_type, streaming,
                           backend, drop_last_layer, from_config: bool = False) -> None:
    tower = inner.vision_tower
    _check_tower(inner)
    connector = _build_connector(inner, spec, connector, projector_type, backend)
    spec = connector.spec
    if drop_last_layer is None:
        drop_last_layer = _default_drop_last_layer(tower, spec)
    old = inner.multi_modal_projector
    ref = next(iter(old.parameters()), None)
    if ref is not None:
        connector.to(device=ref.device, dtype=ref.dtype)
    # checks depth and width against the spec before anything is changed
    wrapper = DenseConnectorVisionTower(tower, connector, streaming=streaming,
                                        drop_last_layer=drop_last_layer)
    _check_anyres_fit(inner, family, spec, wrapper)
    state = _Patch(family=family, mode="dense_connector", streaming=streaming,
                   from_config=from_config, wrapper=wrapper, old_projector=old,
                   old_config_entry=copy.deepcopy(getattr(inner.config, CONFIG_KEY))
                   if hasattr(inner.config, CONFIG_KEY) else _MISSING)
    if checkpoint is not None:
        weights, extras = read_projector_checkpoint(checkpoint)
        connector.load_mm_projector(weights)
        _load_newline(inner, extras, state)
    inner.multi_modal_projector = connector  # same key, same place in the state dict
    if not from_config:
        setattr(inner.config, CONFIG_KEY,
                _spec_entry(spec, connector, wrapper.drop_last_layer, streaming))
    _install(inner, family, state)


def unpatch_llava(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_llava` on this instance: the model is the stock one again, bit for bit.

    Removes the replaced methods and the patch's attributes, puts the original
    ``multi_modal_projector`` module back (moved to the Dense Connector's device and dtype if the
    model was moved since), restores parameters a checkpoint overwrote (``linear_1``/``linear_2``,
    ``image_newline``) and removes ``config.dense_connector``. A model built from a saved Dense
    Connector model (``config.dense_connector`` present at construction) has no stock projector
    to go back to: ValueError.
    """
    inner, _ = _inner(model)
    state = _state(inner)
    if state is None:
        raise ValueError("this model is not patched by dc_kernels")
    if state.from_config:
        raise ValueError("this model was built as a Dense Connector model (its config has "
                         f"{CONFIG_KEY}); it has no stock projector to restore")
    if state.mode == "dense_connector":
        connector = inner.multi_modal_projector
        ref = next(iter(connector.parameters()), None)
        old = state.old_projector
        old_ref = next(iter(old.parameters()), None)
        if ref is not None and old_ref is not None and (
                old_ref.device != ref.device or old_ref.dtype != ref.dtype):
            old.to(device=ref.device, dtype=ref.dtype)
        inner.multi_modal_projector = old
        if state.old_config_entry is _MISSING:
            if hasattr(inner.config, CONFIG_KEY):
                delattr(inner.config, CONFIG_KEY)
        else:
            setattr(inner.config, CONFIG_KEY, state.old_config_entry)
    with torch.no_grad():
        for name, value in state.restore_params.items():
            target = inner.get_parameter(name)
            target.copy_(value.to(target.device))
    for name in list(_REPLACEMENTS[state.family]) + [_STATE, "dense_connector_tower"]:
        inner.__dict__.pop(name, None)
    return model


def _refuse_unloaded_dense_connector(inner) -> None:
    if getattr(inner.config, CONFIG_KEY, None) is not None:
        raise ValueError(
            f"this model's config records a Dense Connector (config.{CONFIG_KEY}) but the model "
            "was built without it, so its Dense Connector weights were not loaded (transformers "
            "reported them as unexpected keys). Call dc_kernels.apply_dense_connector_to_llava() "
            "before from_pretrained, or patch_llava(model, spec, checkpoint=...) with the "
            "projector's weights")


def _patch_from_config(inner, family, streaming, backend) -> None:
    entry = getattr(inner.config, CONFIG_KEY, None)
    if entry is None:
        _patch_layers(inner, family, streaming, None)
        return
    width = int(_resolve_transformer(inner.vision_tower).config.hidden_size)
    spec, projector_type, drop_last_layer = _spec_from_entry(entry, width)
    _patch_dense_connector(inner, family, spec, None, None, projector_type, streaming, backend,
                           drop_last_layer, from_config=True)


# --------------------------------------------------------------------------- Liger-style entry
_CLASS_PATCH: Dict[str, Any] = {}        # options of the class-level patch while it is active
_ORIGINAL_INITS: Dict[type, Any] = {}    # class -> its own __init__ before the patch
_CLASS_LOCK = threading.Lock()


def _make_init(cls, original):
    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        # exact class: subclasses (e.g. LLaVA-NeXT-Video) compute their features otherwise
        if type(self) is cls and _CLASS_PATCH:
            _patch_from_config(self, _families()[cls], _CLASS_PATCH["streaming"],
                               _CLASS_PATCH["backend"])
    return __init__


def apply_dense_connector_to_llava(model: Optional[nn.Module] = None, *, streaming: bool = True,
                                   backend: str = "auto") -> Optional[nn.Module]:
    """Liger-style entry: patch the LLaVA family at class level, or one model.

    * ``model=None``: class level. Every ``LlavaModel`` / ``LlavaNextModel`` /
      ``LlavaOnevisionModel`` built afterwards -- by ``from_pretrained``, ``from_config`` or a
      constructor, and so every ``...ForConditionalGeneration`` -- is patched when it is built:
      with the Dense Connector its ``config.dense_connector`` records (a model saved after
      :func:`patch_llava` with a spec: its ``0.*``/``2.*`` projector weights then load from the
      checkpoint), else in the no-spec mode. Call it before ``from_pretrained``; models built
      earlier are not touched. Applying it again only updates the options.
    * ``model`` given: that instance, as ``patch_llava(model)`` (the no-spec mode); returns it.
      A model whose config records a Dense Connector but which was built without the
      class-level patch (so its Dense Connector weights were dropped by transformers) is
      refused with a ValueError saying so.

    Args:
        streaming, backend: as for :func:`patch_llava`.
    """
    if not isinstance(streaming, bool):
        raise TypeError(f"streaming must be a bool, got {streaming!r}")
    if model is not None:
        inner, family = _inner(model)
        if _state(inner) is not None:
            raise ValueError("this model is already patched by dc_kernels")
        _refuse_unloaded_dense_connector(inner)
        _patch_from_config(inner, family, streaming, backend)
        return model
    families = _families()
    with _CLASS_LOCK:
        _CLASS_PATCH.update(streaming=streaming, backend=backend)
        for cls in families:
            if cls in _ORIGINAL_INITS:
                continue
            original = cls.__dict__["__init__"]
            _ORIGINAL_INITS[cls] = original
            cls.__init__ = _make_init(cls, original)
    return None


def revert_dense_connector_to_llava(model: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """Undo :func:`apply_dense_connector_to_llava`.

    ``model=None``: the classes get their own ``__init__`` back (the very function objects);
    models built while the patch was active stay patched (:func:`unpatch_llava` each).
    ``model`` given: :func:`unpatch_llava` (model); returns it.
    """
    if model is not None:
        return unpatch_llava(model)
    with _CLASS_LOCK:
        for cls, original in list(_ORIGINAL_INITS.items()):
            cls.__init__ = original
            del _ORIGINAL_INITS[cls]
        _CLASS_PATCH.clear()
    return None


def class_patch_active() -> bool:
    """Whether :func:`apply_dense_connector_to_llava` (class level) is in effect."""
    return bool(_CLASS_PATCH)

