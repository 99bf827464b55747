"""Dense Connector features built from hidden states that arrive one at a time.

The original asks the ViT for ``output_hidden_states=True`` and so keeps all 25-27 hidden states
alive until the connector has read them. :class:`StreamingFeatures` instead takes each hidden
state as the encoder produces it (``add(index, tensor)``, indices in increasing order) and folds
it into the output at once:

* the base layer (``spec.final_layer``, CLS dropped if the spec says so) is copied into its slab
  of the output;
* a one-layer group (SCI) is copied into its slab;
* a group of several layers is summed into an fp32 accumulator (fp64 for fp64 inputs) -- for
  fp32/fp64 inputs the accumulator *is* the group's slab of the output, otherwise a separate
  ``[B, T', C]`` buffer -- divided by the group's length and rounded once into its slab when the
  group's last member arrives (the buffer is freed then);
* STI groups: each member's tokens are summed per pooling window in fp32 into a
  ``[B, T' // pool, C]`` accumulator, divided by ``len(group) * pool`` and rounded once.

These are exactly the rules (and the order of operations) of the torch path
(``dc_kernels.ops.torch_ops.features_torch``), so on the same hidden states the result is the
same tensor, bit for bit. Only the output, the fp32 accumulators of unfinished groups and the
hidden state being added are alive; the caller drops each hidden state when the next one exists.

Everything is built from differentiable torch ops, so autograd works through it (as through the
torch path) when gradients are enabled.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..ops.torch_ops import accumulation_dtype, window_sums
from ..spec import ConnectorSpec
from ..validation import SUPPORTED_DTYPES

__all__ = ["StreamingFeatures"]


class StreamingFeatures:
    """Accumulate Dense Connector features from hidden states fed in index order.

    Args:
        spec: the :class:`ConnectorSpec` whose features are built.

    Usage::

        acc = StreamingFeatures(spec)
        h = embeddings(pixels)
        acc.add(0, h)
        for i, layer in enumerate(layers, start=1):
            h = layer(h)
            acc.add(i, h)        # or from a forward hook
            if i == acc.last_index:
                break
        features = acc.finish()  # == dense_connector_features(hidden_states, spec)

    ``add`` must see the indices ``0, 1, 2, ...`` in order (hidden states the spec does not read
    may be skipped or fed; they are ignored; skipping one it reads is a ValueError naming it).
    Every tensor must be ``[B, T, C]`` with the shape, dtype and device of the first one.
    ``finish`` returns ``[B, spec.out_tokens(T), spec.out_channels(C)]`` in the input dtype and
    refuses (ValueError) while a hidden state the spec reads is missing; the object is single
    use.
    """

    def __init__(self, spec: ConnectorSpec):
        if not isinstance(spec, ConnectorSpec):
            raise TypeError(f"spec must be a dc_kernels.ConnectorSpec, got {type(spec).__name__}")
        self.spec = spec
        # index -> list of roles: ("base",) or ("group", g)
        self._roles: Dict[int, List[Tuple]] = {}
        self._roles.setdefault(spec.final_layer, []).append(("base",))
        for g, (start, stop) in enumerate(spec.groups):
            for i in range(start, stop):
                self._roles.setdefault(i, []).append(("group", g))
        self._read = sorted(self._roles)  # the indices the spec reads, ascending
        self._received = 0  # how many of them have been added
        self._next = 0  # smallest index that may be added next
        self._out: Optional[torch.Tensor] = None
        self._shape: Optional[torch.Size] = None
        self._acc: Dict[int, torch.Tensor] = {}
        self._finished = False

    @property
    def last_index(self) -> int:
        """The largest hidden-state index the spec reads: later hidden states are not needed."""
        return self.spec.used_layers[-1]

    # ------------------------------------------------------------------ feeding
    def _check_order(self, index) -> None:
        if self._finished:
            raise RuntimeError("StreamingFeatures.finish() was already called; make a new one")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise TypeError(f"index must be a non-negative int, got {index!r}")
        if index < self._next:
            raise ValueError(
                f"hidden state {index} arrived after hidden state {self._next - 1}: hidden states "
                "must be added once each, in increasing index order")
        # a read index below ``index`` that has not arrived can never arrive: refuse now, before
        # the features are built from an incomplete group
        if self._received < len(self._read) and self._read[self._received] < index:
            skipped = [i for i in self._read[self._received:] if i < index]
            raise ValueError(
                f"hidden state {index} arrived but hidden state(s) {skipped}, which the spec "
                "reads, were skipped: every hidden state the spec reads must be added, in "
                "increasing index order")

    def _check(self, index: int, h) -> None:
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"hidden state {index} must be a torch.Tensor, got {type(h).__name__}")
        if self._shape is None:
            if h.dim() != 3:
                raise ValueError(f"hidden state {index} must be 3-D [B, T, C], got shape "
                                 f"{tuple(h.shape)}")
            if h.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"hidden state {index} has dtype {h.dtype}; supported: "
                                 f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
            if h.shape[1] < self.spec.token_offset:
                raise ValueError(f"hidden state {index} has no token; the spec drops a CLS token")
        elif (h.shape != self._shape or h.dtype != self._out.dtype
              or h.device != self._out.device):
            raise ValueError(
                f"hidden state {index} is {tuple(h.shape)} {h.dtype} on {h.device}; the earlier "
                f"ones are {tuple(self._shape)} {self._out.dtype} on {self._out.device}")

    def _allocate(self, h: torch.Tensor) -> None:
        B, T, C = h.shape
        spec = self.spec
        self._shape = h.shape
        self._out = torch.empty(B, spec.out_tokens(T), spec.out_channels(C), dtype=h.dtype,
                                device=h.device)

    def add(self, index: int, hidden_state: torch.Tensor) -> None:
        """Fold hidden state ``index`` (``[B, T, C]``) into the features."""
        self._check_order(index)
        roles = self._roles.get(index)
        if roles is None:  # a layer the spec does not read
            self._next = index + 1
            return
        self._check(index, hidden_state)
        if self._out is None:
            self._allocate(hidden_state)
        self._next = index + 1
        self._received += 1
        x = hidden_state[:, self.spec.token_offset:]
        for role in roles:
            if role[0] == "base":
                self._add_base(x)
            else:
                self._add_to_group(role[1], index, x)

    def _add_base(self, x: torch.Tensor) -> None:
        C = self._shape[2]
        if self.spec.connector_type == "sti":
            self._out[:, :x.shape[1]].copy_(x)
        else:
            self._out[..., :C].copy_(x)

    def _add_to_group(self, g: int, index: int, x: torch.Tensor) -> None:
        if self.spec.connector_type == "sti":
            self._add_to_pooled_group(g, index, x)
            return
        start, stop = self.spec.groups[g]
        C = self._shape[2]
        dst = self._out[..., (g + 1) * C:(g + 2) * C]
        if stop - start == 1:  # a single layer: copied, no rounding (as the torch path)
            dst.copy_(x)
            return
        acc_dtype = accumulation_dtype(self._out.dtype)
        if index == start:
            acc = dst if self._out.dtype == acc_dtype else torch.empty(
                dst.shape, dtype=acc_dtype, device=dst.device)
            acc.copy_(x)
            self._acc[g] = acc
            return
        acc = self._acc[g]
        acc.add_(x)  # promotes to the accumulator dtype, no copy of the layer
        if index == stop - 1:
            acc.div_(stop - start)
            if acc is not dst:
                dst.copy_(acc)  # the single rounding to the output dtype
            del self._acc[g]

    def _add_to_pooled_group(self, g: int, index: int, x: torch.Tensor) -> None:
        start, stop = self.spec.groups[g]
        kept = x.shape[1]
        p = self.spec.pool_size
        tp = kept // p
        if tp == 0:  # too few tokens for one window: the group adds no token, but the
            # output depends on it (zero gradient), as on the torch path (link_unread_groups)
            if torch.is_grad_enabled() and x.requires_grad:
                self._out[:0, :0, :0].copy_(x[:0, :0, :0])
            return
        s = window_sums(x, p, accumulation_dtype(self._out.dtype))
        acc = s if index == start else self._acc[g].add_(s)
        if index == stop - 1:
            acc.div_((stop - start) * p)
            self._out[:, kept + g * tp:kept + (g + 1) * tp].copy_(acc)
            self._acc.pop(g, None)
        else:
            self._acc[g] = acc

    # ------------------------------------------------------------------ result
    def finish(self) -> torch.Tensor:
        """The features; raises ValueError if a hidden state the spec reads never arrived."""
        if self._finished:
            raise RuntimeError("StreamingFeatures.finish() was already called; make a new one")
        if self._received < len(self._read):
            missing = self._read[self._received:]
            raise ValueError(
                f"the features are incomplete: the spec reads hidden states up to index "
                f"{self.last_index}, but the last one added was {self._next - 1} (missing: "
                f"{missing[:8]}{' ...' if len(missing) > 8 else ''})")
        self._finished = True
        out, self._out = self._out, None
        self._acc.clear()
        return out
