"""Input checks shared by every backend: run before any work or kernel launch."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .spec import ConnectorSpec

__all__ = ["HiddenStatesInfo", "check_hidden_states", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class HiddenStatesInfo(NamedTuple):
    """Shape facts of a validated hidden-state tuple."""

    batch: int
    tokens: int  # T, CLS included
    channels: int
    dtype: torch.dtype
    device: torch.device


def check_hidden_states(hidden_states: Sequence[torch.Tensor],
                        spec: ConnectorSpec) -> HiddenStatesInfo:
    """Validate a hidden-state tuple against a spec; return its shape facts.

    Raises:
        TypeError: ``hidden_states`` is not a tuple/list, ``spec`` is not a ConnectorSpec, or an
            entry is not a tensor.
        ValueError: too few/many hidden states for the spec, an entry that is not ``[B, T, C]``
            or whose shape, dtype or device differs from entry 0, an unsupported dtype, or too
            few tokens to drop CLS.
    """
    if not isinstance(spec, ConnectorSpec):
        raise TypeError(f"spec must be a dc_kernels.ConnectorSpec, got {type(spec).__name__}")
    if isinstance(hidden_states, torch.Tensor) or not isinstance(hidden_states, (tuple, list)):
        raise TypeError(
            "hidden_states must be a tuple or list of [B, T, C] tensors (the tuple Hugging Face "
            f"returns with output_hidden_states=True), got {type(hidden_states).__name__}")
    for i, h in enumerate(hidden_states):
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"hidden_states[{i}] must be a torch.Tensor, got {type(h).__name__}")
        if h.layout != torch.strided:
            raise ValueError(f"hidden_states[{i}] has layout {h.layout}; dense (strided) tensors "
                             "are required")
    spec.check_num_hidden_states(len(hidden_states))
    ref = hidden_states[spec.final_layer]
    if ref.dim() != 3:
        raise ValueError(
            f"hidden_states[{spec.final_layer}] must be 3-D [B, T, C], got shape "
            f"{tuple(ref.shape)}")
    if ref.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"hidden_states[{spec.final_layer}] has dtype {ref.dtype}; supported: "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    for i in spec.used_layers:
        h = hidden_states[i]
        if h.shape != ref.shape:
            raise ValueError(
                f"hidden_states[{i}] has shape {tuple(h.shape)}, expected {tuple(ref.shape)} "
                f"like hidden_states[{spec.final_layer}]")
        if h.dtype != ref.dtype:
            raise ValueError(
                f"hidden_states[{i}] has dtype {h.dtype}, expected {ref.dtype} like "
                f"hidden_states[{spec.final_layer}] (all hidden states must share one dtype)")
        if h.device != ref.device:
            raise ValueError(
                f"hidden_states[{i}] is on {h.device}, expected {ref.device} like "
                f"hidden_states[{spec.final_layer}] (all hidden states must share one device)")
    batch, tokens, channels = ref.shape
    if tokens < spec.token_offset:
        raise ValueError(
            f"hidden states have {tokens} tokens; the spec drops a CLS token, so at least 1 is "
            "needed")
    return HiddenStatesInfo(batch, tokens, channels, ref.dtype, ref.device)
