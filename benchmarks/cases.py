"""What is benchmarked: shape presets, ops, cases (shape x images) and their inputs.

A :class:`Shape` names a vision tower (via a :class:`dc_kernels.ConnectorSpec` preset, the one
place that knows layer indices), the LLM width ``H`` and the crops per image (AnyRes: 5).
A :class:`Case` is a shape at a number of images; :func:`make_inputs` builds its hidden states
(a tuple of independent tensors, as Hugging Face returns them) and the original's
``mlp2x_gelu`` projector (``reference.build_projector``, so the weights have ``nn.Linear``'s
initialisation and the original's parameter names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

from dc_kernels import ConnectorSpec
from reference import build_projector

__all__ = ["OPS", "IMAGES", "QUICK_IMAGES", "ENCODER_DIMS", "Shape", "SHAPES", "Case", "Inputs",
           "make_inputs", "DTYPES"]

#: The ops every provider implements (see :mod:`benchmarks.providers`).
OPS = ("features", "linear", "connector", "linear-fwd-bwd")

#: Images per case in a full run, and in ``--quick``.
IMAGES = (1, 4, 16, 64)
QUICK_IMAGES = (1, 4)

#: ``--dtype`` names.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: Tokens per hidden state (T, CLS included) and channels (C) of each tower (docs/DESIGN.md §1):
#: CLIP ViT-L/14-336 has 1 CLS + 24 x 24 patches of width 1024, SigLIP so400m/14-384 27 x 27
#: patches of width 1152 and no CLS.
ENCODER_DIMS = {"clip": (577, 1024), "siglip": (729, 1152)}


@dataclass(frozen=True)
class Shape:
    """A benchmark shape preset.

    Args:
        name: the preset's name (``clip336-4096``, ...).
        encoder: ``"clip"`` or ``"siglip"`` (a :meth:`ConnectorSpec.preset` encoder).
        connector: ``"dci"``, ``"sci"`` or ``"sti"``.
        hidden: the LLM width H, the projector's output width.
        crops: crops per image (1; AnyRes runs 5 crops per image through the connector).
    """

    name: str
    encoder: str
    connector: str
    hidden: int
    crops: int = 1

    @property
    def spec(self) -> ConnectorSpec:
        """The original Dense Connector's spec for this tower and connector type."""
        return ConnectorSpec.preset(self.encoder, self.connector)

    @property
    def tokens(self) -> int:
        """T: tokens per hidden state, CLS included."""
        return ENCODER_DIMS[self.encoder][0]

    @property
    def channels(self) -> int:
        """C: width of every hidden state."""
        return ENCODER_DIMS[self.encoder][1]

    @property
    def is_siglip(self) -> bool:
        """The original's ``is_siglip`` flag."""
        return self.encoder == "siglip"


SHAPES = {s.name: s for s in (
    Shape("clip336-4096", "clip", "dci", 4096),
    Shape("clip336-5120", "clip", "dci", 5120),
    Shape("clip336-7168", "clip", "dci", 7168),
    Shape("siglip384-4096", "siglip", "dci", 4096),
    Shape("clip336-4096-anyres", "clip", "dci", 4096, crops=5),
    Shape("clip336-4096-sci", "clip", "sci", 4096),
    Shape("clip336-4096-sti", "clip", "sti", 4096),
    Shape("siglip384-4096-sti", "siglip", "sti", 4096),
)}


@dataclass(frozen=True)
class Case:
    """A shape at a number of images: the sizes every op of the case sees."""

    shape: Shape
    images: int

    @property
    def batch(self) -> int:
        """B: images times crops."""
        return self.images * self.shape.crops

    @property
    def rows(self) -> int:
        """M: rows of the features, ``B * T'`` (STI: ``B * (T' + G * (T' // pool))``)."""
        return self.batch * self.shape.spec.out_tokens(self.shape.tokens)

    @property
    def layer_rows(self) -> int:
        """Rows read from each hidden state, ``B * T'`` (CLS dropped)."""
        return self.batch * self.shape.spec.tokens_kept(self.shape.tokens)

    @property
    def features_width(self) -> int:
        """K: width of the features, ``(G + 1) * C`` (STI: ``C``; the original's
        ``mm_hidden_size``)."""
        return self.shape.spec.out_channels(self.shape.channels)

    @property
    def layers_read(self) -> int:
        """L: distinct hidden states the spec reads (24 for CLIP DCI, 3 for SCI)."""
        return len(self.shape.spec.used_layers)

    @property
    def max_group(self) -> int:
        """Most layers averaged into one feature value."""
        return max(stop - start for start, stop in self.shape.spec.groups)


@dataclass
class Inputs:
    """The tensors of one case: hidden states and the ``mlp2x_gelu`` projector."""

    case: Case
    hidden_states: Tuple[torch.Tensor, ...]
    projector: nn.Sequential

    @property
    def spec(self) -> ConnectorSpec:
        return self.case.shape.spec

    @property
    def w1(self) -> torch.Tensor:
        return self.projector[0].weight

    @property
    def b1(self) -> torch.Tensor:
        return self.projector[0].bias

    @property
    def w2(self) -> torch.Tensor:
        return self.projector[2].weight

    @property
    def b2(self) -> torch.Tensor:
        return self.projector[2].bias


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Deterministic inputs for a case.

    Hidden states: ``spec.num_hidden_states`` independent ``[B, T, C]`` tensors of N(0, 1)
    values drawn directly in ``dtype`` on ``device`` (no full-size temporaries). Projector:
    ``reference.build_projector(K, H, "mlp2x_gelu")`` initialised on ``device`` (``nn.Linear``'s
    kaiming-uniform init), then cast to ``dtype``; its parameters require grad.
    """
    shape = case.shape
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    hs = tuple(torch.randn(case.batch, shape.tokens, shape.channels, generator=gen, dtype=dtype,
                           device=device)
               for _ in range(shape.spec.required_hidden_states))
    cuda_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(seed + 1)
        with device:
            projector = build_projector(case.features_width, shape.hidden, "mlp2x_gelu")
    return Inputs(case, hs, projector.to(dtype))
