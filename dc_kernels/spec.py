"""ConnectorSpec: which hidden states the Dense Connector reads and how it combines them.

This module is the single place in the project that knows the layer indices of the original
Dense Connector (Yao et al., arXiv 2405.13800). Everything else -- the reference, the torch path,
the Triton kernels, the modules -- asks a :class:`ConnectorSpec`.

Index convention: ``hidden_states`` is the tuple Hugging Face returns with
``output_hidden_states=True``; index 0 is the embedding output and index ``i`` the output of
encoder layer ``i``. All indices in a spec are non-negative positions in that tuple.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["ConnectorSpec", "CONNECTOR_TYPES", "ENCODERS", "MAX_HIDDEN_STATES", "MAX_POOL_SIZE"]

CONNECTOR_TYPES = ("dci", "sci", "sti")
ENCODERS = ("clip", "siglip")

# Facts of the original (see docs/DESIGN.md §1), per encoder:
#   num_hidden_states: length of the hidden-state tuple the original sees
#   final_layer: index of the base features (CLIP: select_layer -2 of 25 -> 23; SigLIP: -1 of 27)
#   drop_cls: CLIP prepends a CLS token that the original drops from every layer
#   dci_groups: the two averaged groups of Dense Channel Integration
_ENCODER_FACTS = {
    "clip": dict(num_hidden_states=25, final_layer=23, drop_cls=True,
                 dci_groups=((0, 12), (12, 24))),
    "siglip": dict(num_hidden_states=27, final_layer=26, drop_cls=False,
                   dci_groups=((0, 13), (13, 26))),
}
# SCI and STI read two single middle layers, the same for both encoders.
_SINGLE_LAYERS = (7, 15)
_STI_POOL = 8

#: Hidden-state indices must be below this (ViTs have tens of layers). A spec is refused before
#: anything sized by its index ranges is built (``used_layers``, the streaming roles, the
#: kernels' layer tuples), so a typo such as ``(0, 10**9)`` cannot exhaust memory.
MAX_HIDDEN_STATES = 4096
#: The STI pool size must fit the kernels' 32-bit token arithmetic.
MAX_POOL_SIZE = 2 ** 31 - 1


def _is_int(x) -> bool:
    # ints and integer scalars (numpy.int64 from a config file), never bools
    if isinstance(x, bool):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def _as_int(x):
    return operator.index(x) if _is_int(x) else x


@dataclass(frozen=True)
class ConnectorSpec:
    """What the Dense Connector computes from a tuple of hidden states.

    Args:
        connector_type: ``"dci"`` (group means concatenated on channels), ``"sci"`` (single
            layers concatenated on channels; groups of one layer) or ``"sti"`` (group means
            average-pooled along tokens and appended as extra tokens).
        final_layer: hidden-state index of the base features (the original's
            ``image_features``).
        groups: half-open ``(start, stop)`` hidden-state index ranges; each range is averaged
            into one slab (DCI/SCI) or one block of pooled tokens (STI), in this order.
        drop_cls: drop token 0 (CLIP's CLS) from every hidden state.
        pool_size: STI only: the kernel and stride of the 1-D average pool over tokens
            (remainder dropped, as ``nn.AvgPool1d`` does).
        num_hidden_states: if given, inputs must hold exactly this many hidden states (presets
            set it, so a tower of the wrong depth is refused rather than silently misread);
            otherwise any tuple long enough for the indices is accepted.

    Example::

        spec = ConnectorSpec.preset("clip", "dci")
        custom = ConnectorSpec("dci", final_layer=23, groups=((0, 8), (8, 16), (16, 24)),
                               drop_cls=True)
    """

    connector_type: str
    final_layer: int
    groups: Tuple[Tuple[int, int], ...]
    drop_cls: bool = False
    pool_size: int = _STI_POOL
    num_hidden_states: Optional[int] = None

    def __post_init__(self):
        if self.connector_type not in CONNECTOR_TYPES:
            raise ValueError(
                f"connector_type must be one of {CONNECTOR_TYPES}, got {self.connector_type!r}")
        if not _is_int(self.final_layer) or self.final_layer < 0:
            raise ValueError(
                f"final_layer must be a non-negative hidden-state index, got {self.final_layer!r}")
        if self.final_layer >= MAX_HIDDEN_STATES:
            raise ValueError(
                f"final_layer={self.final_layer!r} is out of range: hidden-state indices must be "
                f"below {MAX_HIDDEN_STATES}")
        object.__setattr__(self, "final_layer", _as_int(self.final_layer))
        object.__setattr__(self, "pool_size", _as_int(self.pool_size))
        object.__setattr__(self, "num_hidden_states", _as_int(self.num_hidden_states))
        try:
            # len() first: a pair is checked before it is iterated (a huge iterable is refused,
            # not expanded)
            groups = tuple(g if len(g) != 2 else tuple(_as_int(v) for v in g)
                           for g in self.groups)
        except TypeError:
            raise ValueError(
                f"groups must be a sequence of (start, stop) pairs, got {self.groups!r}") from None
        if len(groups) == 0:
            raise ValueError("groups must name at least one (start, stop) range, got none")
        for i, g in enumerate(groups):
            if len(g) != 2 or not all(_is_int(v) for v in g):
                raise ValueError(f"groups[{i}] must be a pair of ints (start, stop), got {g!r}")
            start, stop = g
            if start < 0:
                raise ValueError(f"groups[{i}] = {g}: start must be >= 0")
            if stop > MAX_HIDDEN_STATES:
                raise ValueError(
                    f"groups[{i}] = {g}: stop is out of range: hidden-state indices must be "
                    f"below {MAX_HIDDEN_STATES}")
            if stop < start:
                raise ValueError(f"groups[{i}] = {g}: reversed range (stop < start)")
            if stop == start:
                raise ValueError(f"groups[{i}] = {g}: empty range (stop == start)")
            if self.connector_type == "sci" and stop - start != 1:
                raise ValueError(
                    f"groups[{i}] = {g}: an 'sci' spec takes single layers, i.e. (i, i + 1)")
        object.__setattr__(self, "groups", groups)
        if not isinstance(self.drop_cls, bool):
            raise ValueError(f"drop_cls must be a bool, got {self.drop_cls!r}")
        if not _is_int(self.pool_size) or self.pool_size < 1:
            raise ValueError(f"pool_size must be an int >= 1, got {self.pool_size!r}")
        if self.pool_size > MAX_POOL_SIZE:
            raise ValueError(
                f"pool_size={self.pool_size} is too large: at most {MAX_POOL_SIZE} (2^31 - 1)")
        if self.num_hidden_states is not None:
            if not _is_int(self.num_hidden_states) or self.num_hidden_states < self.min_hidden_states:
                raise ValueError(
                    f"num_hidden_states={self.num_hidden_states!r} is too small: the spec reads "
                    f"hidden-state indices up to {self.min_hidden_states - 1}")
            if self.num_hidden_states > MAX_HIDDEN_STATES:
                raise ValueError(
                    f"num_hidden_states={self.num_hidden_states} is too large: at most "
                    f"{MAX_HIDDEN_STATES}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, encoder: str, connector_type: str = "dci") -> "ConnectorSpec":
        """The original Dense Connector's spec.

        Args:
            encoder: ``"clip"`` (ViT-L/14-336: 25 hidden states, CLS dropped, base = index 23)
                or ``"siglip"`` (so400m truncated to 26 layers: 27 hidden states, no CLS,
                base = index 26).
            connector_type: ``"dci"``, ``"sci"`` or ``"sti"``.
        """
        if encoder not in _ENCODER_FACTS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if connector_type not in CONNECTOR_TYPES:
            raise ValueError(
                f"connector_type must be one of {CONNECTOR_TYPES}, got {connector_type!r}")
        facts = _ENCODER_FACTS[encoder]
        if connector_type == "dci":
            groups = facts["dci_groups"]
        else:
            groups = tuple((i, i + 1) for i in _SINGLE_LAYERS)
        return cls(connector_type=connector_type, final_layer=facts["final_layer"],
                   groups=groups, drop_cls=facts["drop_cls"], pool_size=_STI_POOL,
                   num_hidden_states=facts["num_hidden_states"])

    @classmethod
    def from_layer_list(cls, layers, num_hidden_states: int,
                        drop_cls: bool = False) -> "ConnectorSpec":
        """The spec of transformers' multi-layer ``vision_feature_layer``: layers concatenated.

        transformers' LLaVA family reads ``hidden_states[i]`` for every ``i`` in the list
        (negative indices count from the end of the tuple of ``num_hidden_states`` =
        encoder layers + 1), drops token 0 from each when ``vision_feature_select_strategy`` is
        ``"default"``, and concatenates them on channels in list order. That is an ``"sci"``
        spec: the first layer is the base, every other one a one-layer group, so
        ``dense_connector_features`` equals ``torch.cat([hs[i] for i in layers], -1)`` (copies,
        no arithmetic).

        Args:
            layers: two or more hidden-state indices, negative ones counted from the end
                (``-1`` is the last of ``num_hidden_states``); repeats are allowed. A single
                layer needs no spec (it is the hidden state itself).
            num_hidden_states: length of the tower's hidden-state tuple (encoder layers + 1);
                the spec is fixed to it (``num_hidden_states`` field), since negative indices
                were resolved against it.
            drop_cls: drop token 0 of every layer (strategy ``"default"``).

        Raises:
            ValueError: fewer than two layers, a non-integer entry, an index outside
                ``[-num_hidden_states, num_hidden_states)``, or a bad ``num_hidden_states``.

        Example: Granite Vision's ``[-24, -20, -12, -1]`` on SigLIP so400m (27 layers, 28 hidden
        states) is ``ConnectorSpec("sci", 4, ((8, 9), (16, 17), (27, 28)),
        num_hidden_states=28)``.
        """
        if not _is_int(num_hidden_states) or num_hidden_states < 1:
            raise ValueError(f"num_hidden_states must be an int >= 1, got {num_hidden_states!r}")
        num_hidden_states = operator.index(num_hidden_states)
        if _is_int(layers) or isinstance(layers, (str, bytes)):
            raise ValueError(f"layers must be a list of hidden-state indices, got {layers!r}")
        try:
            layers = list(layers)
        except TypeError:
            raise ValueError(
                f"layers must be a list of hidden-state indices, got {layers!r}") from None
        if len(layers) < 2:
            raise ValueError(
                f"layers must hold at least two indices, got {layers!r}: a single layer is the "
                "hidden state itself and needs no spec")
        resolved = []
        for k, i in enumerate(layers):
            if not _is_int(i):
                raise ValueError(f"layers[{k}] must be an int, got {i!r}")
            i = operator.index(i)
            if not -num_hidden_states <= i < num_hidden_states:
                raise ValueError(
                    f"layers[{k}] = {i} is out of range for {num_hidden_states} hidden states "
                    f"(valid: {-num_hidden_states} .. {num_hidden_states - 1})")
            resolved.append(i % num_hidden_states)
        return cls("sci", final_layer=resolved[0],
                   groups=tuple((i, i + 1) for i in resolved[1:]), drop_cls=drop_cls,
                   num_hidden_states=num_hidden_states)

    # ------------------------------------------------------------------ questions
    @property
    def num_groups(self) -> int:
        """Number of averaged groups (G)."""
        return len(self.groups)

    @property
    def min_hidden_states(self) -> int:
        """The fewest hidden states an input tuple must hold for these indices."""
        return max(self.final_layer + 1, max(stop for _, stop in self.groups))

    @property
    def required_hidden_states(self) -> int:
        """Hidden states needed: ``num_hidden_states`` when fixed, else ``min_hidden_states``."""
        return self.num_hidden_states if self.num_hidden_states is not None \
            else self.min_hidden_states

    @property
    def used_layers(self) -> Tuple[int, ...]:
        """Sorted distinct hidden-state indices the spec reads."""
        s = {self.final_layer}
        for start, stop in self.groups:
            s.update(range(start, stop))
        return tuple(sorted(s))

    @property
    def token_offset(self) -> int:
        """Tokens skipped at the start of every hidden state (1 when CLS is dropped)."""
        return 1 if self.drop_cls else 0

    def check_num_hidden_states(self, n: int) -> None:
        """Raise ValueError unless a tuple of ``n`` hidden states fits this spec."""
        if self.num_hidden_states is not None and n != self.num_hidden_states:
            raise ValueError(
                f"this spec expects exactly {self.num_hidden_states} hidden states (the encoder's "
                f"embedding output + {self.num_hidden_states - 1} layers), got {n}")
        if n < self.min_hidden_states:
            raise ValueError(
                f"this spec reads hidden-state indices up to {self.min_hidden_states - 1}, so it "
                f"needs at least {self.min_hidden_states} hidden states, got {n}")

    def tokens_kept(self, num_tokens: int) -> int:
        """Tokens per hidden state after dropping CLS (T')."""
        return num_tokens - self.token_offset

    def pooled_tokens(self, num_tokens: int) -> int:
        """STI: pooled tokens per group for ``num_tokens`` input tokens (remainder dropped)."""
        return self.tokens_kept(num_tokens) // self.pool_size

    def out_channels(self, channels: int) -> int:
        """Width of the features for hidden states of width ``channels`` (C).

        ``(G + 1) * C`` for DCI/SCI, ``C`` for STI. This is the original's ``mm_hidden_size``.
        """
        if self.connector_type == "sti":
            return channels
        return (self.num_groups + 1) * channels

    def out_tokens(self, num_tokens: int) -> int:
        """Tokens of the features for hidden states of ``num_tokens`` tokens (T, CLS included).

        ``T - drop_cls`` for DCI/SCI; STI appends ``(T - drop_cls) // pool_size`` pooled tokens
        per group.
        """
        kept = self.tokens_kept(num_tokens)
        if kept < 0:
            raise ValueError(f"num_tokens={num_tokens} leaves no token after dropping CLS")
        if self.connector_type == "sti":
            return kept + self.num_groups * (kept // self.pool_size)
        return kept
