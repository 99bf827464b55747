"""dc_kernels: fused Triton kernels for the Dense Connector (arXiv 2405.13800).

Public API:
    ConnectorSpec                -- which hidden states are read and how they are combined
    dense_connector_features()  -- the features the original feeds its projector
    dense_connector_linear()    -- the projector's first layer (+bias, GELU) on them, fused
    DenseConnector               -- drop-in features + mm_projector module (original checkpoints)
    DenseConnectorLinear         -- its first layer: an nn.Linear fed the hidden states
    DenseConnectorVisionTower    -- transformers CLIP/SigLIP tower + DenseConnector (streaming)
    VisionFeatureLayers          -- transformers' vision_feature_layer selection, streamed
    patch_llava() / unpatch_llava()  -- LLaVA / LLaVA-NeXT / OneVision image features through them
    apply_dense_connector_to_llava() / revert_dense_connector_to_llava()  -- the same, class level
"""

from .functional import BACKEND_ENV, dense_connector_features, dense_connector_linear
from .modules import DenseConnector, DenseConnectorLinear, load_mm_projector_state_dict
from .spec import ConnectorSpec
from .integrations import (DenseConnectorVisionTower, StreamingFeatures, VisionFeatureLayers,
                           apply_dense_connector_to_llava, patch_llava,
                           revert_dense_connector_to_llava, unpatch_llava)
from .validation import check_hidden_states

__all__ = ["ConnectorSpec", "DenseConnector", "dense_connector_features", "dense_connector_linear",
           "check_hidden_states", "load_mm_projector_state_dict", "BACKEND_ENV",
           "DenseConnectorVisionTower", "StreamingFeatures", "patch_llava",
           "DenseConnectorLinear", "VisionFeatureLayers", "unpatch_llava",
           "apply_dense_connector_to_llava", "revert_dense_connector_to_llava"]
__version__ = "0.1.0"
