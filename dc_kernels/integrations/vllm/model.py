"""vLLM model class for Dense Connector LLaVA models (imported by vLLM through the plugin).

:class:`DenseConnectorLlavaForConditionalGeneration` is a LLaVA whose image path is the Dense
Connector's (docs/DESIGN.md §1, §6):

* the vision tower (vLLM's CLIP/SigLIP, tensor-parallel like vLLM's LLaVA) is built with every
  layer the spec may read (vLLM's LLaVA stops at ``vision_feature_layer``), less SigLIP's last
  layer (the original's truncation);
* its layers are run by :class:`~dc_kernels.DenseConnectorVisionTower`: ``streaming`` (the
  default) folds each layer's output into the features as it is produced
  (:class:`~dc_kernels.StreamingFeatures`: fp32 group sums, nothing but the running sums and the
  current layer alive) and never runs the layers after the last one the spec reads; otherwise
  all hidden states are collected and the first projector layer is
  :func:`~dc_kernels.dense_connector_linear` on them (features built by the Triton kernels on
  CUDA, the torch path elsewhere) when its weight is a plain tensor;
* the projector (``spec.out_channels(C)`` inputs): first Linear a ``ColumnParallelLinear``
  (each tensor-parallel rank computes its slice of H from the full features), exact GELU, second
  Linear a ``RowParallelLinear`` (``mlp2x_gelu``); a ``linear`` projector gathers its output;
* the language model is vLLM's own (``text_config.architectures``).

The config's ``dense_connector`` section (:mod:`dc_kernels.integrations.vllm.config`) is checked
when the model is built and when the processor is made, so a bad model directory fails at load
time with a ``ValueError`` naming the problem; so do checkpoint tensors of the wrong shape
(e.g. a stock LLaVA projector with C inputs) and a missing projector.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Dict, Optional, Set, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from transformers import BatchFeature, LlavaConfig
from transformers.models.llava import LlavaProcessor

from vllm.config import VllmConfig
from vllm.distributed import (get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_gather)
from vllm.model_executor.layers.linear import (ColumnParallelLinear, RowParallelLinear,
                                               UnquantizedLinearMethod)
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import (AutoWeightsLoader, init_vllm_registered_model,
                                              maybe_prefix)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageSize
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor,
                                        BaseProcessingInfo, PromptReplacement)

from ...functional import dense_connector_features, dense_connector_linear
from ...modules import DenseConnector, load_mm_projector_state_dict
from ..hf import DenseConnectorVisionTower
from .config import DenseConnectorServingConfig, parse_dense_connector_config

__all__ = ["DenseConnectorLlavaForConditionalGeneration", "DenseConnectorProjector",
           "DenseConnectorLlavaProcessingInfo", "DenseConnectorLlavaMultiModalProcessor",
           "DenseConnectorLlavaDummyInputsBuilder", "normalize_weight_name"]

# text_config.model_type -> vLLM architecture, for text configs saved without architectures
_TEXT_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM",
               "gemma": "GemmaForCausalLM", "vicuna": "LlamaForCausalLM"}
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.",
                       "model.mm_projector.", "mm_projector.")


# --------------------------------------------------------------------------- processor
class DenseConnectorLlavaProcessingInfo(BaseProcessingInfo):
    """Processing facts of a Dense Connector LLaVA: ``spec.out_tokens(T)`` tokens per image."""

    def get_hf_config(self) -> LlavaConfig:
        return self.ctx.get_hf_config(LlavaConfig)

    def get_dense_connector_config(self) -> DenseConnectorServingConfig:
        """The checked ``dense_connector`` section (ValueError for a bad one)."""
        return parse_dense_connector_config(self.get_hf_config())

    def get_hf_processor(self, **kwargs: object) -> LlavaProcessor:
        processor = self.ctx.get_hf_processor(LlavaProcessor, **kwargs)
        if processor.patch_size is None:
            processor.patch_size = self.get_hf_config().vision_config.patch_size
        return processor

    def get_supported_mm_limits(self) -> Mapping[str, Optional[int]]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """Tokens per image: every image is resized to the tower's size by the processor."""
        return self.get_dense_connector_config().num_image_tokens

    def get_image_size_with_most_features(self) -> ImageSize:
        size = int(self.get_hf_config().vision_config.image_size)
        return ImageSize(width=size, height=size)

    def get_max_image_tokens(self) -> int:
        return self.get_dense_connector_config().num_image_tokens

    def get_mm_max_tokens_per_item(self, seq_len: int,
                                   mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}


class DenseConnectorLlavaDummyInputsBuilder(
        BaseDummyInputsBuilder[DenseConnectorLlavaProcessingInfo]):
    """Profiling inputs: one ``<image>`` per image, images of the tower's size."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        overrides = mm_options.get("image") if mm_options else None
        return {"image": self._get_dummy_images(width=size.width, height=size.height,
                                                num_images=mm_counts.get("image", 0),
                                                overrides=overrides)}


class DenseConnectorLlavaMultiModalProcessor(
        BaseMultiModalProcessor[DenseConnectorLlavaProcessingInfo]):
    """``LlavaProcessor`` for the pixels; each image token becomes ``num_image_tokens`` ones."""

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]):
        return dict(pixel_values=MultiModalFieldConfig.batched("image"),
                    image_embeds=MultiModalFieldConfig.batched("image"))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token_id = self.info.get_hf_config().image_token_index
        n = self.info.get_dense_connector_config().num_image_tokens
        return [PromptReplacement(modality="image", target=[image_token_id],
                                  replacement=[image_token_id] * n)]


# --------------------------------------------------------------------------- projector
class DenseConnectorProjector(nn.Module):
    """The Dense Connector's ``mm_projector``, tensor-parallel.

    ``linear_1``: ``ColumnParallelLinear(spec.out_channels(C), H)`` (each rank holds H/tp output
    rows and reads the full features); ``mlp2x_gelu`` adds exact GELU and
    ``linear_2 = RowParallelLinear(H, H)`` (input split like linear_1's output, all-reduced);
    ``linear`` gathers linear_1's output. Checkpoint keys ``0.*``/``2.*`` (the original's) map to
    ``linear_1.*``/``linear_2.*``.
    """

    def __init__(self, dc: DenseConnectorServingConfig, quant_config=None, prefix: str = ""):
        super().__init__()
        self.spec = dc.spec
        self.projector_type = dc.projector_type
        self.mm_hidden_size = dc.mm_hidden_size
        self.hidden_size = dc.hidden_size
        mlp = dc.projector_type == "mlp2x_gelu"
        self.linear_1 = ColumnParallelLinear(dc.mm_hidden_size, dc.hidden_size, bias=True,
                                             gather_output=not mlp, quant_config=quant_config,
                                             prefix=f"{prefix}.linear_1")
        self.linear_2 = RowParallelLinear(dc.hidden_size, dc.hidden_size, bias=True,
                                          input_is_parallel=True, quant_config=quant_config,
                                          prefix=f"{prefix}.linear_2") if mlp else None

    def expected_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Full (unsharded) checkpoint shapes of the projector's tensors."""
        H, K = self.hidden_size, self.mm_hidden_size
        shapes = {"linear_1.weight": (H, K), "linear_1.bias": (H,)}
        if self.linear_2 is not None:
            shapes.update({"linear_2.weight": (H, H), "linear_2.bias": (H,)})
        return shapes

    def _after_first(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear_2 is None:
            return x
        x, _ = self.linear_2(x)
        return x

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., spec.out_channels(C)]`` features -> ``[..., H]`` (the original's projector)."""
        x, _ = self.linear_1(features)
        if self.linear_2 is not None:
            x = F.gelu(x)
        return self._after_first(x)

    def plain_first_weight(self) -> Optional[torch.Tensor]:
        """linear_1's weight if it is a plain ``[H/tp, K]`` tensor dc_kernels can read.

        ``None`` when the layer is quantized or vLLM has repacked the weight for its own GEMM
        (the CPU backend does after loading): then the features go through ``linear_1``.
        """
        if not isinstance(self.linear_1.quant_method, UnquantizedLinearMethod):
            return None
        w = getattr(self.linear_1, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != self.mm_hidden_size:
            return None
        return w

    def forward_hidden_states(self, hidden_states, backend: str = "auto") -> torch.Tensor:
        """The projector on the hidden-state tuple: first layer = ``dense_connector_linear``.

        The features are built inside dc_kernels (Triton's fused or two-pass path on CUDA) from
        the hidden states in place, against this rank's rows of linear_1.
        """
        weight = self.plain_first_weight()
        if weight is None:
            return self(dense_connector_features(hidden_states, self.spec, backend=backend))
        x = dense_connector_linear(hidden_states, self.spec, weight, self.linear_1.bias,
                                   "gelu" if self.linear_2 is not None else None,
                                   backend=backend)
        if self.linear_2 is None and get_tensor_model_parallel_world_size() > 1:
            x = tensor_model_parallel_all_gather(x)
        return self._after_first(x)


# --------------------------------------------------------------------------- weight names
def normalize_weight_name(name: str) -> Tuple[str, Optional[str]]:
    """``(kind, name)`` of a checkpoint tensor in this model's naming.

    ``kind`` is ``"projector"`` (name relative to the projector: ``linear_1.weight`` ...),
    ``"tower"`` (``vision_tower.vision_model.*``), ``"lm"`` (``language_model.*``) or
    ``"other"`` (name unchanged). Accepted layouts: transformers >= 4.52
    (``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
    ``lm_head.*``), older/legacy ones (``language_model.model.*``, ``vision_tower.*``), towers
    saved with or without ``vision_model.``, and the original Dense Connector projector keys
    (``model.mm_projector.0.weight``, ``mm_projector.*``, HF's ``linear_1``/``linear_2``).
    """
    for prefix in _PROJECTOR_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            head, _, tail = rest.partition(".")
            if head in ("0", "linear_1"):
                return "projector", f"linear_1.{tail}"
            if head in ("2", "linear_2"):
                return "projector", f"linear_2.{tail}"
            if rest in ("weight", "bias"):  # "linear" projector: the Linear's own keys
                return "projector", f"linear_1.{rest}"
            return "projector", rest
    if name.startswith("model.language_model."):
        return "lm", "language_model.model." + name[len("model.language_model."):]
    if name.startswith("lm_head."):
        return "lm", "language_model." + name
    if name.startswith("language_model."):
        return "lm", name
    if name.startswith("model.vision_tower."):
        name = name[len("model."):]
    if name.startswith("vision_tower."):
        rest = name[len("vision_tower."):]
        if not rest.startswith("vision_model."):
            rest = "vision_model." + rest
        return "tower", "vision_tower." + rest
    return "other", name


# --------------------------------------------------------------------------- the model
@MULTIMODAL_REGISTRY.register_processor(DenseConnectorLlavaMultiModalProcessor,
                                        info=DenseConnectorLlavaProcessingInfo,
                                        dummy_inputs=DenseConnectorLlavaDummyInputsBuilder)
class DenseConnectorLlavaForConditionalGeneration(nn.Module, SupportsMultiModal):
    """A LLaVA whose image features come from dc_kernels' Dense Connector (see the module doc).

    Built by vLLM from a model directory whose ``architectures`` is
    ``["DenseConnectorLlavaForConditionalGeneration"]``; the ``dense_connector`` section of its
    config decides the spec, the projector type, streaming and an optional original
    ``mm_projector`` file.
    """

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> Optional[str]:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("Only image modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.dc = parse_dense_connector_config(config)  # refuses a bad section first
        self.config = config
        self.model_dir = vllm_config.model_config.model
        quant_config = vllm_config.quant_config
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size,
                                         mm_token_ids=[config.image_token_index])
        text_archs = getattr(config.text_config, "architectures", None)
        if not text_archs:
            model_type = getattr(config.text_config, "model_type", None)
            if model_type not in _TEXT_ARCHS:
                raise ValueError(
                    f"text_config has no architectures and model_type {model_type!r} is not one "
                    f"of {sorted(_TEXT_ARCHS)}: set text_config.architectures in config.json")
            text_archs = [_TEXT_ARCHS[model_type]]

        tower_cls = CLIPVisionModel if self.dc.encoder == "clip" else SiglipVisionModel
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = tower_cls(
                config.vision_config, quant_config=quant_config,
                num_hidden_layers_override=self.dc.tower_layers, require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"))
            self.multi_modal_projector = DenseConnectorProjector(
                self.dc, quant_config=quant_config,
                prefix=maybe_prefix(prefix, "multi_modal_projector"))
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"), architectures=list(text_archs))
        self.make_empty_intermediate_tensors = (
            self.language_model.make_empty_intermediate_tensors)
        self._dc_tower: Optional[DenseConnectorVisionTower] = None

    # ------------------------------------------------------------------ image path
    def dense_connector_tower(self) -> DenseConnectorVisionTower:
        """The tower wrapper that runs vLLM's tower layers for the Dense Connector.

        Built on first use (not a submodule: the tower is already ``self.vision_tower``). Its
        connector is an identity :class:`~dc_kernels.DenseConnector`: it carries the spec, the
        projector is :class:`DenseConnectorProjector`.
        """
        if self._dc_tower is None:
            spec_carrier = DenseConnector(self.dc.spec, self.dc.vision_hidden_size,
                                          self.dc.hidden_size, "identity")
            object.__setattr__(self, "_dc_tower", DenseConnectorVisionTower(
                self.vision_tower, spec_carrier, streaming=self.dc.streaming,
                drop_last_layer=False))
        return self._dc_tower

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` pixels -> ``[N, num_image_tokens, H]`` language-model embeddings."""
        tower = self.dense_connector_tower()
        if self.dc.streaming:
            return self.multi_modal_projector(tower.streaming_features(pixel_values))
        return self.multi_modal_projector.forward_hidden_states(tower.hidden_states(pixel_values))

    def _pixel_values(self, pixel_values) -> torch.Tensor:
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack([torch.as_tensor(p) for p in pixel_values])
        size = int(self.config.vision_config.image_size)
        if (not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4
                or tuple(pixel_values.shape[1:]) != (3, size, size)):
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) \
                else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be [N, 3, {size}, {size}], got {shape}")
        return pixel_values

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.pop("pixel_values", None)
        image_embeds = kwargs.pop("image_embeds", None)
        if pixel_values is None and image_embeds is None:
            return []
        if pixel_values is None:
            if isinstance(image_embeds, (list, tuple)):
                return tuple(image_embeds)
            return image_embeds
        return self.image_features(self._pixel_values(pixel_values))

    # ------------------------------------------------------------------ language model
    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: Optional[torch.Tensor] = None,
                **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors,
                                         inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        return self.language_model.compute_logits(hidden_states)

    # ------------------------------------------------------------------ weights
    def _mm_projector_file(self) -> Dict[str, torch.Tensor]:
        path = os.path.join(self.model_dir, self.dc.mm_projector)
        if not os.path.isfile(path):
            raise ValueError(f"dense_connector config: mm_projector file {self.dc.mm_projector!r} "
                             f"not found in the model directory {self.model_dir}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        expected = {k.replace("linear_1", "0").replace("linear_2", "2")
                    if self.dc.projector_type == "mlp2x_gelu" else k.replace("linear_1.", ""):
                    torch.empty(s, device="meta")
                    for k, s in self.multi_modal_projector.expected_shapes().items()}
        try:
            found = load_mm_projector_state_dict(state, expected)
        except ValueError as e:
            raise ValueError(f"dense_connector config: mm_projector file {path}: {e}") from None
        return {normalize_weight_name("mm_projector." + k)[1]: v for k, v in found.items()}

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> Set[str]:
        """Load a checkpoint (see :func:`normalize_weight_name` for the accepted names).

        The projector's tensors are checked against the full shapes the config implies
        (``spec.out_channels(C)`` inputs) before any is copied: a stock LLaVA projector, or one
        made for another spec, raises ValueError. With ``mm_projector`` in the config, the
        projector comes from that file and the checkpoint's own projector tensors are skipped.
        """
        projector = self.multi_modal_projector
        shapes = projector.expected_shapes()
        from_file = self._mm_projector_file() if self.dc.mm_projector else None
        seen: Set[str] = set()

        def mapped():
            for name, tensor in weights:
                kind, new = normalize_weight_name(name)
                if kind == "projector":
                    if from_file is not None:
                        continue  # the mm_projector file is authoritative
                    self._check_projector_tensor(name, new, tensor, shapes)
                    seen.add(new)
                    yield "multi_modal_projector." + new, tensor
                else:
                    yield new, tensor
            if from_file is not None:
                for new, tensor in from_file.items():
                    self._check_projector_tensor(self.dc.mm_projector + ":" + new, new, tensor,
                                                 shapes)
                    seen.add(new)
                    yield "multi_modal_projector." + new, tensor

        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(mapped())
        missing = sorted(set(shapes) - seen)
        if missing:
            raise ValueError(
                f"the checkpoint has no Dense Connector projector tensors {missing} (looked for "
                f"{', '.join(p + '*' for p in _PROJECTOR_PREFIXES)}); name an original "
                "projector file with the config's dense_connector.mm_projector")
        return loaded

    def _check_projector_tensor(self, source: str, name: str, tensor: torch.Tensor,
                                shapes: Mapping[str, Tuple[int, ...]]) -> None:
        if name not in shapes:
            raise ValueError(
                f"checkpoint tensor {source!r} is not part of a {self.dc.projector_type} "
                f"projector (expected {sorted(shapes)})")
        if tuple(tensor.shape) != shapes[name]:
            hint = ""
            if name == "linear_1.weight" and tensor.dim() == 2 \
                    and tensor.shape[1] == self.dc.vision_hidden_size:
                hint = (" -- it takes the tower's width C: a stock LLaVA projector, not a "
                        "Dense Connector one")
            raise ValueError(
                f"checkpoint tensor {source!r} has shape {tuple(tensor.shape)}, but the "
                f"dense_connector config ({self.dc.spec.connector_type}, "
                f"mm_hidden_size {self.dc.mm_hidden_size} = spec.out_channels("
                f"{self.dc.vision_hidden_size}), text width {self.dc.hidden_size}) needs "
                f"{shapes[name]}{hint}")
