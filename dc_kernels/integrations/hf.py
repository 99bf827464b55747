"""Hugging Face transformers glue: a Dense Connector vision tower and a LLaVA patch.

* :class:`DenseConnectorVisionTower` wraps a transformers CLIP or SigLIP vision model and a
  :class:`~dc_kernels.DenseConnector`; ``forward(pixel_values)`` returns what the original Dense
  Connector's ``encode_images()`` returns (``mm_projector(dense_connector(...))``).
* :func:`patch_llava` routes a transformers ``LlavaForConditionalGeneration``'s image features
  through such a tower.

The towers are duck-typed (an object with ``embeddings`` and ``encoder.layers``, or one whose
``vision_model`` has them), so importing this module does not import transformers; only
:func:`patch_llava` does. Tested with transformers 5.x (the installed 5.24); the layer calls also
follow the 4.x conventions (extra positional mask arguments, tuple outputs).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
import types
from typing import List, Mapping, Optional, Union

import torch
from torch import nn

from ..modules import DenseConnector
from ..spec import ConnectorSpec
from .streaming import StreamingFeatures

__all__ = ["DenseConnectorVisionTower", "patch_llava", "project_features",
           "SUPPORTED_TOWERS"]

#: ``model_type`` of the vision configs the tower wrapper understands.
SUPPORTED_TOWERS = ("clip_vision_model", "siglip_vision_model")

# The accumulator of the streaming forward running in this context (thread / task). Hooks are
# module-wide: a forward of the same layers in another thread (or nested) must not feed them.
_ACTIVE_STREAM: contextvars.ContextVar = contextvars.ContextVar("dc_kernels_stream",
                                                                default=None)


# --------------------------------------------------------------------------- tower helpers
def _resolve_transformer(vision_model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` and ``encoder.layers``.

    transformers 5.x ``CLIPVisionModel``/``SiglipVisionModel`` hold them directly; 4.x keep them
    in ``.vision_model`` (``CLIPVisionTransformer``), as does ``CLIPVisionModelWithProjection``.
    """
    for candidate in (vision_model, getattr(vision_model, "vision_model", None)):
        if candidate is None:
            continue
        layers = getattr(getattr(candidate, "encoder", None), "layers", None)
        if hasattr(candidate, "embeddings") and isinstance(layers, nn.ModuleList):
            return candidate
    raise TypeError(
        "vision_model must be a transformers CLIPVisionModel / SiglipVisionModel (or their inner "
        "vision transformer): a module with .embeddings and .encoder.layers, got "
        f"{type(vision_model).__name__}")


def _tower_kind(vision_model: nn.Module, transformer: nn.Module) -> str:
    """``"clip"`` or ``"siglip"``, from the config's ``model_type`` (else the class name)."""
    for obj in (transformer, vision_model):
        model_type = getattr(getattr(obj, "config", None), "model_type", None)
        if model_type:
            if model_type not in SUPPORTED_TOWERS:
                raise TypeError(
                    f"unsupported vision tower {type(vision_model).__name__} (config.model_type="
                    f"{model_type!r}); supported: {SUPPORTED_TOWERS}")
            return model_type.split("_")[0]
    for obj in (transformer, vision_model):
        name = type(obj).__name__.lower()
        if name.startswith("siglip") and not name.startswith("siglip2"):
            return "siglip"
        if name.startswith("clip"):
            return "clip"
    raise TypeError(
        f"cannot tell whether {type(vision_model).__name__} is a CLIP or a SigLIP tower (no "
        f"config.model_type in {SUPPORTED_TOWERS})")


def _tower_width(transformer: nn.Module) -> int:
    config = getattr(transformer, "config", None)
    width = getattr(config, "hidden_size", None)
    if width is None:
        width = getattr(transformer.embeddings, "embed_dim", None)
    if width is None:
        raise TypeError(f"cannot read the width of {type(transformer).__name__} "
                        "(no config.hidden_size nor embeddings.embed_dim)")
    return int(width)


def _extra_positional_args(layer: nn.Module) -> int:
    """How many required positional arguments follow ``hidden_states`` in ``layer.forward``.

    transformers 5.x: ``forward(hidden_states, attention_mask, **kwargs)`` -> 1. 4.x CLIP:
    ``forward(hidden_states, attention_mask, causal_attention_mask, output_attentions=False)``
    -> 2. Vision towers use no mask, so each of them is passed ``None``.
    """
    try:
        params = list(inspect.signature(layer.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return 1
    n = 0
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            n += 1
        else:
            break
    return n


def _layer_output(output) -> torch.Tensor:
    """A layer's hidden state, whether it returns a tensor (5.x) or a tuple (4.x)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) or hasattr(output, "__getitem__"):
        return output[0]
    raise TypeError(f"an encoder layer returned {type(output).__name__}, expected a tensor or "
                    "a tuple whose first entry is the hidden state")


@contextlib.contextmanager
def _hf_output_capture_paused():
    """Keep transformers' own hidden-state recorders quiet while the layers run.

    transformers >= 5 records ``output_hidden_states`` with forward hooks on the encoder layers,
    active whenever a collector is set in a context variable. The layers are called here outside
    the vision model's ``forward``, possibly inside another model's forward that collects its
    own hidden states (e.g. a composite model called with ``output_hidden_states=True``): without
    this, the vision layers would append to that model's hidden states.
    """
    try:
        from transformers.utils import output_capturing
        collector = output_capturing._active_collector
    except (ImportError, AttributeError):  # transformers 4.x or absent: nothing to pause
        yield
        return
    token = collector.set(None)
    try:
        yield
    finally:
        collector.reset(token)


def project_features(connector: DenseConnector, features: torch.Tensor) -> torch.Tensor:
    """Apply ``connector``'s projector (all its layers) to ready-made features.

    Equals ``DenseConnector.forward`` minus building the features: the first Linear, then for
    ``mlpNx_gelu`` exact GELU and the following Linears. Under ``torch.autocast`` the Linears run
    in the autocast dtype, as ``nn.Linear`` does.
    """
    if not isinstance(connector, DenseConnector):
        raise TypeError(f"connector must be a dc_kernels.DenseConnector, got "
                        f"{type(connector).__name__}")
    return connector.project(features)


# --------------------------------------------------------------------------- the tower
class DenseConnectorVisionTower(nn.Module):
    """A CLIP/SigLIP vision tower + :class:`~dc_kernels.DenseConnector`: images -> LLM tokens.

    ``forward(pixel_values)`` returns the original Dense Connector's ``encode_images()``:
    ``mm_projector(dense_connector(image_features, hidden_states))`` with the hidden states of
    the tower as the original sees them, ``[B, spec.out_tokens(T), hidden_size]``:

    * CLIP: all encoder layers; ``image_features = hidden_states[-2][:, 1:]`` (the presets'
      ``final_layer`` 23 of 25, CLS dropped).
    * SigLIP: the original deletes the tower's last encoder layer and its head
      (``encoder.layers = layers[:-1]``, ``head = Identity()``) and takes
      ``hidden_states[-1]`` -- the last kept layer's output, before the post-layernorm. The
      wrapper reproduces that by running the layers itself: it never runs the last layer, the
      post-layernorm or the head, and never modifies ``vision_model``.

    The tower's pre-layernorm (CLIP's ``pre_layrnorm``) is applied to the embeddings, so
    hidden state 0 is exactly Hugging Face's ``hidden_states[0]``. Pixel values are cast to the
    tower's device and dtype, as the original does.

    Args:
        vision_model: a transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` (or
            ``CLIPVisionModelWithProjection``, or the inner vision transformer of 4.x). It is
            registered as a submodule (so ``.to()`` and ``state_dict()`` see it), never modified.
        connector: the :class:`~dc_kernels.DenseConnector` (its ``spec`` says which hidden
            states are read; its ``vision_hidden_size`` must be the tower's width).
        streaming: ``True`` (default): never materialise the hidden-state tuple. Forward hooks on
            the encoder layers fold each layer's output into the features as it is produced
            (fp32 group sums, see :class:`~dc_kernels.integrations.streaming.StreamingFeatures`),
            the hooks are removed when the call ends (also on exceptions), and the layers after
            the last one the spec reads are not run (CLIP's last layer, with the presets). Then
            the connector's projector runs on the features. ``False``: collect every hidden
            state, as ``output_hidden_states=True`` does, and call the connector on the tuple
            (the original's memory profile; the Triton backend's fused first layer).
            Both give the same result (bit for bit on the torch backend).
        drop_last_layer: skip the tower's last encoder layer (the original's SigLIP
            truncation). Default ``None``: ``True`` for SigLIP, ``False`` for CLIP. Pass
            ``False`` for a SigLIP tower that is already truncated (26 layers).

    Raises:
        TypeError: ``vision_model`` is not a CLIP/SigLIP tower, ``connector`` not a
            DenseConnector.
        ValueError: the tower's depth does not give the number of hidden states the spec needs,
            or its width is not ``connector.vision_hidden_size``.
    """

    def __init__(self, vision_model: nn.Module, connector: DenseConnector, streaming: bool = True,
                 drop_last_layer: Optional[bool] = None):
        super().__init__()
        if not isinstance(connector, DenseConnector):
            raise TypeError(f"connector must be a dc_kernels.DenseConnector, got "
                            f"{type(connector).__name__}")
        if not isinstance(vision_model, nn.Module):
            raise TypeError(f"vision_model must be an nn.Module, got {type(vision_model).__name__}")
        if not isinstance(streaming, bool):
            raise TypeError(f"streaming must be a bool, got {streaming!r}")
        if drop_last_layer is not None and not isinstance(drop_last_layer, bool):
            raise TypeError(f"drop_last_layer must be a bool or None, got {drop_last_layer!r}")
        transformer = _resolve_transformer(vision_model)
        self.encoder_type = _tower_kind(vision_model, transformer)
        self.drop_last_layer = (self.encoder_type == "siglip") if drop_last_layer is None \
            else drop_last_layer
        self.streaming = streaming
        self.vision_model = vision_model
        self.connector = connector

        spec = connector.spec
        total = len(transformer.encoder.layers)
        self.num_layers = total - int(self.drop_last_layer)  # layers the original runs
        if self.num_layers < 0:
            raise ValueError(f"{type(vision_model).__name__} has no encoder layer to drop")
        n_states = self.num_layers + 1
        try:
            spec.check_num_hidden_states(n_states)
        except ValueError as e:
            dropped = " (its last layer dropped, as the original does for SigLIP)" \
                if self.drop_last_layer else ""
            raise ValueError(
                f"the {self.encoder_type} tower has {total} encoder layers{dropped}, i.e. "
                f"{n_states} hidden states; the connector's spec does not fit: {e}. Use a tower "
                "of the spec's depth, another spec (ConnectorSpec.preset or a custom one), or "
                "drop_last_layer= to say whether the last layer is dropped") from None
        width = _tower_width(transformer)
        if width != connector.vision_hidden_size:
            raise ValueError(
                f"the {self.encoder_type} tower is {width} wide; the connector was built for "
                f"vision_hidden_size={connector.vision_hidden_size}")
        self.vision_hidden_size = width
        self._call_extra_args = [_extra_positional_args(layer)
                                 for layer in transformer.encoder.layers]

    # ------------------------------------------------------------------ properties
    @property
    def spec(self) -> ConnectorSpec:
        """The connector's :class:`ConnectorSpec`."""
        return self.connector.spec

    @property
    def _transformer(self) -> nn.Module:
        return _resolve_transformer(self.vision_model)

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image in the output (``spec.out_tokens(T)`` for the tower's image size).

        The number of image placeholder tokens a prompt needs per image; it differs from the
        tower's patch count for STI specs (extra pooled tokens) and for CLIP (CLS dropped).
        """
        config = self._transformer.config
        patches = (config.image_size // config.patch_size) ** 2
        tokens = patches + (1 if self.encoder_type == "clip" else 0)
        return self.spec.out_tokens(tokens)

    def extra_repr(self) -> str:
        return (f"encoder_type={self.encoder_type!r}, num_layers={self.num_layers}, "
                f"drop_last_layer={self.drop_last_layer}, streaming={self.streaming}")

    # ------------------------------------------------------------------ running the tower
    def _embed(self, transformer, pixel_values, interpolate_pos_encoding):
        weight = next(transformer.embeddings.parameters())
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        if interpolate_pos_encoding:
            h = transformer.embeddings(pixel_values, interpolate_pos_encoding=True)
        else:
            h = transformer.embeddings(pixel_values)
        pre_norm = getattr(transformer, "pre_layrnorm", None)  # CLIP's (sic)
        return pre_norm(h) if pre_norm is not None else h

    def _run_layer(self, k: int, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return _layer_output(layer(h, *([None] * self._call_extra_args[k])))

    def _check_pixels(self, pixel_values) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a [B, 3, H, W] tensor, got "
                            f"{type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be 4-D [B, channels, H, W], got shape "
                             f"{tuple(pixel_values.shape)}")

    def hidden_states(self, pixel_values: torch.Tensor,
                      interpolate_pos_encoding: bool = False) -> List[torch.Tensor]:
        """The hidden states the original reads: embeddings (+pre-layernorm) and every layer.

        ``num_layers + 1`` tensors, equal to Hugging Face's ``output_hidden_states`` of the tower
        (truncated as the original does for SigLIP). All of them are alive at once: this is the
        non-streaming path.
        """
        self._check_pixels(pixel_values)
        transformer = self._transformer
        with _hf_output_capture_paused():
            h = self._embed(transformer, pixel_values, interpolate_pos_encoding)
            states = [h]
            for k in range(self.num_layers):
                h = self._run_layer(k, transformer.encoder.layers[k], h)
                states.append(h)
        return states

    def streaming_features(self, pixel_values: torch.Tensor,
                           interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The Dense Connector features, accumulated layer by layer by forward hooks.

        Equals ``dense_connector_features(self.hidden_states(pixel_values), spec,
        backend="torch")`` bit for bit, without keeping the hidden states. The hooks live only
        during this call (removed in ``finally``) and feed only this call: a forward of the same
        tower in another thread at the same time is not mixed in. Layers after the last one the
        spec reads are not run.
        """
        self._check_pixels(pixel_values)
        transformer = self._transformer
        acc = StreamingFeatures(self.spec)
        layers = transformer.encoder.layers
        run = min(self.num_layers, acc.last_index)
        handles = []

        def make_hook(index):
            def hook(module, args, output):
                if _ACTIVE_STREAM.get() is acc:  # not a forward of another thread / call
                    acc.add(index, _layer_output(output))
            return hook

        token = _ACTIVE_STREAM.set(acc)
        try:
            for k in range(run):
                handles.append(layers[k].register_forward_hook(make_hook(k + 1)))
            with _hf_output_capture_paused():
                h = self._embed(transformer, pixel_values, interpolate_pos_encoding)
                acc.add(0, h)
                for k in range(run):
                    h = self._run_layer(k, layers[k], h)
            del h
            return acc.finish()
        finally:
            for handle in handles:
                handle.remove()
            _ACTIVE_STREAM.reset(token)

    def forward(self, pixel_values: torch.Tensor,
                interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Projected image tokens ``[B, spec.out_tokens(T), connector.hidden_size]``.

        Args:
            pixel_values: ``[B, 3, H, W]`` images (cast to the tower's device and dtype).
            interpolate_pos_encoding: passed to the tower's embeddings (other image sizes).
        """
        if self.streaming:
            return project_features(self.connector,
                                    self.streaming_features(pixel_values, interpolate_pos_encoding))
        return self.connector(self.hidden_states(pixel_values, interpolate_pos_encoding))


# --------------------------------------------------------------------------- LLaVA
def _llava_inner(model: nn.Module) -> nn.Module:
    try:
        from transformers import LlavaModel
    except ImportError as e:  # pragma: no cover - transformers is a test dependency
        raise ImportError("patch_llava needs transformers (pip install transformers)") from e
    inner = getattr(model, "model", model)
    if not isinstance(inner, LlavaModel):
        name = type(model).__name__
        if "llava" in name.lower():
            raise NotImplementedError(
                f"patch_llava supports LlavaForConditionalGeneration / LlavaModel, not {name}: "
                "LLaVA-NeXT/OneVision (anyres crops packed with image_newline) and VipLlava "
                "(its own projector) are not supported yet")
        raise TypeError(f"model must be a transformers LlavaForConditionalGeneration or "
                        f"LlavaModel, got {name}")
    return inner


def patch_llava(model: nn.Module, spec: Optional[ConnectorSpec] = None, *,
                connector: Optional[nn.Module] = None,
                checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor], None] = None,
                projector_type: str = "mlp2x_gelu", streaming: bool = True,
                backend: str = "auto", drop_last_layer: Optional[bool] = None) -> nn.Module:
    """Route a transformers LLaVA model's image features through a Dense Connector, in place.

    After the patch, ``model.get_image_features(pixel_values)`` (and so ``forward`` and
    ``generate`` with ``pixel_values``) returns ``DenseConnector(hidden states of the tower)``
    per image -- the original Dense Connector's ``encode_images()`` -- instead of
    ``multi_modal_projector(hidden_states[vision_feature_layer])``.

    The Dense Connector's projector takes ``spec.out_channels(C)`` features (3C for the DCI/SCI
    presets), not the C of LLaVA's ``multi_modal_projector``, so it needs its own weights: the
    patch replaces ``model.model.multi_modal_projector`` by the
    :class:`~dc_kernels.DenseConnector` (state-dict keys
    ``model.multi_modal_projector.0.weight`` ... with the original's names ``0.*``/``2.*``).
    Its weights come from, in order of precedence:

    * ``checkpoint``: an original Dense Connector checkpoint (path or state dict; keys
      ``model.mm_projector.0.weight`` ..., or ``mm_projector.*``, or bare), loaded strictly with
      :meth:`DenseConnector.load_mm_projector`;
    * ``connector``: a ready :class:`~dc_kernels.DenseConnector`, or an original projector
      module (``nn.Sequential(Linear, GELU, Linear)`` / ``nn.Linear``) whose parameters are
      wrapped, not copied;
    * otherwise freshly initialised (``nn.Linear``'s default), e.g. to train it (stage 1).

    The connector is moved to the device and dtype of the replaced projector.

    Args:
        model: ``LlavaForConditionalGeneration`` or ``LlavaModel`` with a CLIP or SigLIP tower.
        spec: the :class:`ConnectorSpec` (e.g. ``ConnectorSpec.preset("clip", "dci")``);
            optional when ``connector`` is a DenseConnector (its spec is used).
        connector, checkpoint: the projector weights, see above.
        projector_type: for a freshly built connector: ``"mlp2x_gelu"`` (default), ``"linear"``,
            ``"mlpNx_gelu"``.
        streaming, drop_last_layer: see :class:`DenseConnectorVisionTower`.
        backend: the DenseConnector's backend for a freshly built or wrapped projector.

    Returns:
        ``model`` (patched in place; the patch is not reversible: deepcopy first to keep the
        original). The tower wrapper is ``model.model.dense_connector_tower`` (not registered
        as a submodule: its tower and connector already are).

    Limits:
        * transformers 5.x ``LlavaModel`` (its ``get_image_features`` is replaced on the
          instance). LLaVA-NeXT (anyres), OneVision, VipLlava are refused.
        * ``vision_feature_layer`` / ``vision_feature_select_strategy`` are ignored: the spec
          decides which hidden states are read and whether CLS is dropped.
        * ``image_sizes`` (Pixtral-style towers) is refused; the image outputs carry the
          projected features as ``pooler_output`` only (no tower ``hidden_states``).
        * The prompt must hold ``model.model.dense_connector_tower.num_image_tokens`` image
          tokens per image: the same as LLaVA's for the DCI/SCI presets with CLIP (576 at 336
          px), more for STI (720), so set the processor's ``num_image_tokens`` /
          ``image_seq_length`` accordingly.
    """
    inner = _llava_inner(model)
    if getattr(inner, "dense_connector_tower", None) is not None:
        raise ValueError("this model is already patched by patch_llava")
    if spec is not None and not isinstance(spec, ConnectorSpec):
        raise TypeError(f"spec must be a dc_kernels.ConnectorSpec, got {type(spec).__name__}")
    tower = inner.vision_tower
    text_config = getattr(model.config, "text_config", None) or inner.config.text_config
    width = int(tower.config.hidden_size)
    hidden = int(text_config.hidden_size)

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
        if spec is None:
            raise ValueError("patch_llava needs spec= (or connector=)")
        connector = DenseConnector(spec, width, hidden, projector_type, backend=backend)
    if connector.hidden_size != hidden:
        raise ValueError(f"the connector projects to {connector.hidden_size} features; the "
                         f"language model is {hidden} wide")
    if checkpoint is not None:
        connector.load_mm_projector(checkpoint)

    old = inner.multi_modal_projector
    ref = next(iter(old.parameters()), None)
    if ref is not None:
        connector.to(device=ref.device, dtype=ref.dtype)
    # checks depth and width against the spec before anything is changed
    wrapper = DenseConnectorVisionTower(tower, connector, streaming=streaming,
                                        drop_last_layer=drop_last_layer)

    inner.multi_modal_projector = connector
    # plain attributes: the wrapper's tower and connector are already submodules of `inner`
    object.__setattr__(inner, "dense_connector_tower", wrapper)
    object.__setattr__(inner, "get_image_features",
                       types.MethodType(_dense_connector_get_image_features, inner))
    return model


def _dense_connector_get_image_features(self, pixel_values: torch.Tensor,
                                        vision_feature_layer=None,
                                        vision_feature_select_strategy=None,
                                        image_sizes=None, **kwargs):
    """LlavaModel.get_image_features, patched by dc_kernels.patch_llava.

    Returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the list of per-image
    ``[num_image_tokens, hidden_size]`` features (``DenseConnector`` of the tower's hidden
    states); ``vision_feature_layer``/``vision_feature_select_strategy`` are ignored (the spec
    decides), other keyword arguments (the language model's ``output_*`` flags) too.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    if image_sizes is not None:
        raise NotImplementedError("the Dense Connector patch does not support image_sizes "
                                  "(variable-size towers such as Pixtral)")
    return_dict = kwargs.pop("return_dict", True)
    features = self.dense_connector_tower(pixel_values)
    out = BaseModelOutputWithPooling(pooler_output=list(features))
    return out if return_dict else out.to_tuple()
