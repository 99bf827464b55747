"""The floor: the fewest bytes and FLOPs each op needs (docs/DESIGN.md §2).

With L distinct hidden states read, M rows, C channels, K = (G + 1) C, N = H and e bytes per
element, every input is read once and every output written once (``L*M*C`` below reads each layer
once: for STI, whose M counts the pooled rows too, that term uses the B*T' rows of a layer):

==================  ======================================================  =============
op                  bytes                                                   FLOPs
==================  ======================================================  =============
features            ``L*M*C*e + M*K*e``                                     0
linear              ``L*M*C*e + K*N*e + M*N*e``                             ``2*M*K*N``
connector           ``L*M*C*e + K*N*e + N*N*e + M*N*e``                     ``2*M*K*N + 2*M*N*N``
linear-fwd-bwd      ``L*M*C*e + 2*K*N*e + 2*N*e`` (read W, write dW, db)     ``4*M*K*N``
==================  ======================================================  =============

Biases (N elements) are left out of the forward floors, as in docs/DESIGN.md. The floor time is
``max(bytes / bandwidth, FLOPs / peak)``; :func:`floor_seconds` computes it from whatever
ceilings it is given (measured ones in the table, the issue's fixed ones in the GPU bundle).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cases import OPS, Case

__all__ = ["Cost", "floor_cost", "floor_seconds"]


@dataclass(frozen=True)
class Cost:
    """Floor traffic (bytes) and arithmetic (FLOPs) of one op on one case."""

    bytes: int
    flops: int


def floor_cost(op: str, case: Case, element_size: int) -> Cost:
    """Floor bytes and FLOPs of ``op`` on ``case`` with ``element_size``-byte elements."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    e = element_size
    M, C, K, N, L = (case.rows, case.shape.channels, case.features_width, case.shape.hidden,
                     case.layers_read)
    layers = L * case.layer_rows * C * e  # STI reads B*T' rows per layer, writes M rows
    if op == "features":
        return Cost(layers + M * K * e, 0)
    if op == "linear":
        return Cost(layers + K * N * e + M * N * e, 2 * M * K * N)
    if op == "connector":
        return Cost(layers + K * N * e + N * N * e + M * N * e, 2 * M * K * N + 2 * M * N * N)
    return Cost(layers + 2 * K * N * e + 2 * N * e, 4 * M * K * N)  # linear-fwd-bwd


def floor_seconds(cost: Cost, bytes_per_s: float, flop_per_s: float) -> float:
    """``max(bytes / bandwidth, FLOPs / peak)``: no implementation can be faster."""
    return max(cost.bytes / bytes_per_s, cost.flops / flop_per_s)
