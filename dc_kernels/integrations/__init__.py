"""Integrations with model libraries.

* :mod:`dc_kernels.integrations.hf` -- Hugging Face transformers: :class:`DenseConnectorVisionTower`
  (a CLIP/SigLIP tower + DenseConnector, streaming layer accumulation) and :func:`patch_llava`.
* :mod:`dc_kernels.integrations.streaming` -- :class:`StreamingFeatures`, the features built from
  hidden states fed one at a time (framework-independent).

Importing these modules does not import transformers; :func:`patch_llava` does when called.
"""

from .hf import DenseConnectorVisionTower, patch_llava, project_features
from .streaming import StreamingFeatures

__all__ = ["DenseConnectorVisionTower", "patch_llava", "project_features", "StreamingFeatures"]
