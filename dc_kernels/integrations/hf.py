"""Hugging Face transformers glue: vision towers run layer by layer.

* :class:`DenseConnectorVisionTower` wraps a transformers CLIP or SigLIP vision model and a
  :class:`~dc_kernels.DenseConnector`; ``forward(pixel_values)`` returns what the original Dense
  Connector's ``encode_images()`` returns (``mm_projector(dense_connector(...))``).
* :class:`VisionFeatureLayers` is the same tower runner for transformers' own
  ``vision_feature_layer`` (an int or a list of layers concatenated on channels) and
  ``vision_feature_select_strategy``: the features a LLaVA-family model feeds its projector,
  streamed instead of collected.
* The LLaVA-family patches (:func:`~dc_kernels.integrations.llava.patch_llava` and friends)
  live in :mod:`dc_kernels.integrations.llava` and are re-exported here.

The towers are duck-typed (an object with ``embeddings`` and ``encoder.layers``, or one whose
``vision_model`` has them), so importing this module does not import transformers; only the
patches do. Tested with transformers 5.x (the installed 5.24); the layer calls also follow the
4.x conventions (extra positional mask arguments, tuple outputs).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import operator
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from ..functional import dense_connector_features
from ..modules import DenseConnector
from ..spec import ConnectorSpec, _is_int
from .streaming import StreamingFeatures

__all__ = ["DenseConnectorVisionTower", "VisionFeatureLayers", "project_features",
           "SUPPORTED_TOWERS", "SELECT_STRATEGIES", "patch_llava", "unpatch_llava",
           "apply_dense_connector_to_llava", "revert_dense_connector_to_llava"]

#: ``model_type`` of the vision configs the tower wrapper understands.
SUPPORTED_TOWERS = ("clip_vision_model", "siglip_vision_model")
#: transformers' ``vision_feature_select_strategy`` values: drop token 0 (CLS) or keep all.
SELECT_STRATEGIES = ("default", "full")

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
                    f"{model_type!r}); supported: {SUPPORTED_TOWERS} (fixed-size ViTs whose "
                    "layers run one after another; Pixtral-style towers that take image_sizes, "
                    "SigLIP2 and others are not supported)")
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


# --------------------------------------------------------------------------- running a tower
class _LayerwiseTower(nn.Module):
    """Runs a CLIP/SigLIP tower's embeddings and encoder layers itself (shared machinery).

    ``num_layers`` encoder layers are run (all of them, or all but the last with
    ``drop_last_layer``); hidden state ``i`` is the output of layer ``i`` (0: the embeddings,
    after CLIP's pre-layernorm), exactly Hugging Face's ``hidden_states[i]``. The post-layernorm
    and the head are never run, and ``vision_model`` is never modified.
    """

    def __init__(self, vision_model: nn.Module, drop_last_layer: bool, streaming: bool):
        super().__init__()
        if not isinstance(vision_model, nn.Module):
            raise TypeError(f"vision_model must be an nn.Module, got {type(vision_model).__name__}")
        if not isinstance(streaming, bool):
            raise TypeError(f"streaming must be a bool, got {streaming!r}")
        transformer = _resolve_transformer(vision_model)
        self.encoder_type = _tower_kind(vision_model, transformer)
        self.drop_last_layer = drop_last_layer
        self.streaming = streaming
        self.vision_model = vision_model
        total = len(transformer.encoder.layers)
        self.num_layers = total - int(drop_last_layer)  # layers that are run at most
        if self.num_layers < 0:
            raise ValueError(f"{type(vision_model).__name__} has no encoder layer to drop")
        self.vision_hidden_size = _tower_width(transformer)
        self._call_extra_args = [_extra_positional_args(layer)
                                 for layer in transformer.encoder.layers]

    @property
    def _transformer(self) -> nn.Module:
        return _resolve_transformer(self.vision_model)

    @property
    def num_hidden_states(self) -> int:
        """Length of the hidden-state tuple of the layers run: ``num_layers + 1``."""
        return self.num_layers + 1

    def _tokens_per_image(self) -> int:
        config = self._transformer.config
        patches = (config.image_size // config.patch_size) ** 2
        return patches + (1 if self.encoder_type == "clip" else 0)

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
        """The hidden states of the layers run: embeddings (+pre-layernorm) and every layer.

        ``num_layers + 1`` tensors, equal to Hugging Face's ``output_hidden_states`` of the tower
        (truncated when ``drop_last_layer``). All of them are alive at once: this is the
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

    def hidden_state(self, pixel_values: torch.Tensor, index: int,
                     interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Hidden state ``index`` alone: the layers after it are not run, none is kept."""
        self._check_pixels(pixel_values)
        if not 0 <= index <= self.num_layers:
            raise ValueError(f"hidden state {index} does not exist: the tower runs "
                             f"{self.num_layers} layers ({self.num_hidden_states} hidden states)")
        transformer = self._transformer
        with _hf_output_capture_paused():
            h = self._embed(transformer, pixel_values, interpolate_pos_encoding)
            for k in range(index):
                h = self._run_layer(k, transformer.encoder.layers[k], h)
        return h

    def _streaming_features(self, pixel_values: torch.Tensor, spec: ConnectorSpec,
                            interpolate_pos_encoding: bool) -> torch.Tensor:
        self._check_pixels(pixel_values)
        transformer = self._transformer
        acc = StreamingFeatures(spec)
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


# --------------------------------------------------------------------------- the DC tower
class DenseConnectorVisionTower(_LayerwiseTower):
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
    tower's device and dtype, as the original does. The tower's attention runs as its config
    says (``_attn_implementation``): the original's SigLIP ran eager attention, see
    ``docs/DESIGN.md`` §9.

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
        if not isinstance(connector, DenseConnector):
            raise TypeError(f"connector must be a dc_kernels.DenseConnector, got "
                            f"{type(connector).__name__}")
        if drop_last_layer is not None and not isinstance(drop_last_layer, bool):
            raise TypeError(f"drop_last_layer must be a bool or None, got {drop_last_layer!r}")
        if not isinstance(vision_model, nn.Module):
            raise TypeError(f"vision_model must be an nn.Module, got {type(vision_model).__name__}")
        if drop_last_layer is None:
            transformer = _resolve_transformer(vision_model)
            drop_last_layer = _tower_kind(vision_model, transformer) == "siglip"
        super().__init__(vision_model, drop_last_layer, streaming)
        self.connector = connector

        spec = connector.spec
        total = len(self._transformer.encoder.layers)
        n_states = self.num_hidden_states
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
        if self.vision_hidden_size != connector.vision_hidden_size:
            raise ValueError(
                f"the {self.encoder_type} tower is {self.vision_hidden_size} wide; the connector "
                f"was built for vision_hidden_size={connector.vision_hidden_size}")

    @property
    def spec(self) -> ConnectorSpec:
        """The connector's :class:`ConnectorSpec`."""
        return self.connector.spec

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image in the output (``spec.out_tokens(T)`` for the tower's image size).

        The number of image placeholder tokens a prompt needs per image; it differs from the
        tower's patch count for STI specs (extra pooled tokens) and for CLIP (CLS dropped).
        """
        return self.spec.out_tokens(self._tokens_per_image())

    def extra_repr(self) -> str:
        return (f"encoder_type={self.encoder_type!r}, num_layers={self.num_layers}, "
                f"drop_last_layer={self.drop_last_layer}, streaming={self.streaming}")

    def streaming_features(self, pixel_values: torch.Tensor,
                           interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The Dense Connector features, accumulated layer by layer by forward hooks.

        Equals ``dense_connector_features(self.hidden_states(pixel_values), spec,
        backend="torch")`` bit for bit, without keeping the hidden states. The hooks live only
        during this call (removed in ``finally``) and feed only this call: a forward of the same
        tower in another thread at the same time is not mixed in. Layers after the last one the
        spec reads are not run.
        """
        return self._streaming_features(pixel_values, self.spec, interpolate_pos_encoding)

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


# --------------------------------------------------------------------------- transformers' layers
def _check_strategy(strategy) -> str:
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES}, "
                         f"got {strategy!r}")
    return strategy


class VisionFeatureLayers(_LayerwiseTower):
    """transformers' ``vision_feature_layer`` selection of a CLIP/SigLIP tower, streamed.

    ``forward(pixel_values)`` returns what a transformers LLaVA-family model feeds its
    ``multi_modal_projector``: ``hidden_states[layer]`` for an int, or
    ``torch.cat([hidden_states[i] for i in layers], -1)`` for a list, token 0 dropped from each
    when ``select_strategy == "default"`` -- ``[B, T', len(layers) * C]``. Negative indices count
    from the end of the full tower's tuple (encoder layers + 1), as transformers resolves them.

    A list is the ``"sci"`` spec of :meth:`ConnectorSpec.from_layer_list` (every entry copied
    into its channel slab, no arithmetic), so the result equals transformers' bit for bit when
    the tower's layers compute the same hidden states (they are the same modules).

    Args:
        vision_model: a transformers ``CLIPVisionModel`` / ``SiglipVisionModel``; never modified.
        layers: an int or a list of ints (``config.vision_feature_layer``).
        select_strategy: ``"default"`` (drop token 0, CLIP's CLS) or ``"full"``.
        streaming: ``True`` (default): the layers after the last one read are not run; for one
            layer only the current hidden state is alive, for a list the layers are copied into
            the output as they are produced (:class:`StreamingFeatures`). ``False``: every hidden
            state is collected, then the selected ones are read (``dense_connector_features``:
            the Triton features kernel on CUDA), as transformers does with
            ``output_hidden_states``.

    Raises:
        TypeError: an unsupported tower, a bad ``streaming``.
        ValueError: an index outside the tower's hidden states, a bad strategy.
    """

    def __init__(self, vision_model: nn.Module, layers: Union[int, Sequence[int]],
                 select_strategy: str = "default", streaming: bool = True):
        super().__init__(vision_model, False, streaming)
        self.select_strategy = _check_strategy(select_strategy)
        n = self.num_hidden_states
        drop_cls = select_strategy == "default"
        if _is_int(layers):
            layers = [layers]
        elif isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise ValueError(f"vision_feature_layer must be an int or a list of ints, got "
                             f"{layers!r}")
        layers = list(layers)
        if len(layers) == 1:
            i = layers[0]
            if not _is_int(i) or not -n <= i < n:
                raise ValueError(f"vision_feature_layer {i!r} is not a hidden-state index of "
                                 f"this tower ({n} hidden states: {-n} .. {n - 1})")
            self.layers = (operator.index(i) % n,)
            self.spec = None
        else:
            self.spec = ConnectorSpec.from_layer_list(layers, n, drop_cls=drop_cls)
            self.layers = (self.spec.final_layer,) + tuple(s for s, _ in self.spec.groups)
        self.drop_cls = drop_cls

    @property
    def out_channels(self) -> int:
        """Width of the features: ``len(layers) * C``."""
        return len(self.layers) * self.vision_hidden_size

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image of the features (token 0 dropped with ``"default"``)."""
        return self._tokens_per_image() - int(self.drop_cls)

    def extra_repr(self) -> str:
        return (f"encoder_type={self.encoder_type!r}, layers={self.layers}, "
                f"select_strategy={self.select_strategy!r}, streaming={self.streaming}")

    def forward(self, pixel_values: torch.Tensor,
                interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The selected features ``[B, T', len(layers) * C]`` (a view for one layer)."""
        offset = int(self.drop_cls)
        if self.spec is None:
            index = self.layers[0]
            if self.streaming:
                h = self.hidden_state(pixel_values, index, interpolate_pos_encoding)
            else:
                h = self.hidden_states(pixel_values, interpolate_pos_encoding)[index]
            return h[:, offset:] if offset else h
        if self.streaming:
            return self._streaming_features(pixel_values, self.spec, interpolate_pos_encoding)
        hs = self.hidden_states(pixel_values, interpolate_pos_encoding)
        return dense_connector_features(hs, self.spec)


# The LLaVA-family patches, re-exported (they import the towers above).
from .llava import (apply_dense_connector_to_llava, patch_llava,  # noqa: E402
                    revert_dense_connector_to_llava, unpatch_llava)
