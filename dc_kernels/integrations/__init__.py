"""Integrations with model libraries.

* :mod:`dc_kernels.integrations.hf` -- Hugging Face transformers towers:
  :class:`DenseConnectorVisionTower` (a CLIP/SigLIP tower + DenseConnector, streaming layer
  accumulation) and :class:`VisionFeatureLayers` (transformers' ``vision_feature_layer``
  selection, streamed).
* :mod:`dc_kernels.integrations.llava` -- the transformers LLaVA family (LLaVA, LLaVA-NeXT,
  LLaVA-OneVision): :func:`patch_llava` / :func:`unpatch_llava` per instance,
  :func:`apply_dense_connector_to_llava` / :func:`revert_dense_connector_to_llava` (Liger-style,
  class level), :func:`read_projector_checkpoint`.
* :mod:`dc_kernels.integrations.streaming` -- :class:`StreamingFeatures`, the features built from
  hidden states fed one at a time (framework-independent).

Importing these modules does not import transformers; the LLaVA patches do when called.
"""

from .hf import DenseConnectorVisionTower, VisionFeatureLayers, project_features
from .llava import (apply_dense_connector_to_llava, patch_llava, read_projector_checkpoint,
                    revert_dense_connector_to_llava, unpatch_llava)
from .streaming import StreamingFeatures

__all__ = ["DenseConnectorVisionTower", "VisionFeatureLayers", "patch_llava", "unpatch_llava",
           "apply_dense_connector_to_llava", "revert_dense_connector_to_llava",
           "read_projector_checkpoint", "project_features", "StreamingFeatures"]
