"""The path rule: which Triton route computes ``act(features @ W^T + b)`` for a shape.

:func:`estimate_linear_times` is a roofline estimate of each path from :data:`PATH_MODEL`'s
ceilings; :func:`choose_linear_path` picks the faster one. The constants are estimates until
GPU measurements recorded under ``benchmarks/results/`` replace them.
"""

from __future__ import annotations

__all__ = ["PATH_MODEL", "estimate_linear_times", "choose_linear_path"]


#: Ceilings the path rule assumes (H100 SXM; docs/DESIGN.md §2): DRAM copy bandwidth, L2
#: bandwidth, dense 16-bit tensor-core rate, and the cost of one extra launch. Estimates until
#: GPU measurements recorded under benchmarks/results/ replace them.
PATH_MODEL = {"dram_bytes_per_s": 3.0e12, "l2_bytes_per_s": 7.0e12, "flop_per_s": 8.0e14,
              "launch_s": 4e-6, "fused_block_n": 128}


def estimate_linear_times(M: int, C: int, N: int, num_layers_read: int, num_slabs: int,
                          element_size: int) -> dict:
    """Roofline estimates (seconds) of both paths, from :data:`PATH_MODEL`.

    With L distinct layers read, K = slabs * C and e bytes per element:

    * two-pass: the features kernel moves ``(L*M*C + M*K) e`` through DRAM; the GEMM reads A and
      W and writes the output, ``(M*K + K*N + M*N) e``, or is compute-bound at ``2 M K N``
      FLOPs; plus one extra launch.
    * fused: DRAM sees only the floor ``(L*M*C + K*N + M*N) e``, but every N-tile of the fused
      kernel rebuilds its row tile's features: ``ceil(N / BLOCK_N) * L*M*C*e`` bytes from L2
      (the row tiles that run together share them there, thanks to the grouped order).
    """
    m = PATH_MODEL
    e = element_size
    K = num_slabs * C
    layers = num_layers_read * M * C * e
    flops_t = 2.0 * M * K * N / m["flop_per_s"]
    two_pass = ((layers + M * K * e) / m["dram_bytes_per_s"]
                + max((M * K + K * N + M * N) * e / m["dram_bytes_per_s"], flops_t)
                + m["launch_s"])
    rereads = -(-N // m["fused_block_n"]) * layers
    fused = max((layers + (K * N + M * N) * e) / m["dram_bytes_per_s"],
                rereads / m["l2_bytes_per_s"], flops_t)
    return {"fused": fused, "two-pass": two_pass}


def choose_linear_path(M: int, C: int, N: int, num_layers_read: int, num_slabs: int,
                       element_size: int, uniform: bool = True, off64: bool = False,
                       sti: bool = False) -> str:
    """Pick ``"fused"`` or ``"two-pass"`` for ``act(features @ W^T + b)``: the faster estimate.

    The fused kernel saves the features' DRAM round trip and a launch, but rebuilds each row
    tile's features once per N-tile, so its L2 traffic grows with ``N / BLOCK_N`` (32 for a
    4096-wide LLM): with the model's ceilings it wins only for narrow outputs, and the
    two-pass path takes the usual LLM widths (see :func:`estimate_linear_times`). The constants
    are estimates, to be revisited with the GPU bundle's fused-vs-two-pass timings.

    The fused kernel is also built (and checked spill-free) only for layers that share one
    stride set and tensors under 2^31 elements; other layouts (``uniform=False``: views with
    differing strides; ``off64=True``) always take the two-pass path.

    STI (``sti=True``) is always two-pass: its features are only ``(1 + G / pool)`` times a
    layer (1.25x for the presets), so writing and re-reading them costs little, while building
    a pooled row inside the GEMM would re-read ``pool`` tokens of every group member per N-tile.
    """
    if not uniform or off64 or sti:
        return "two-pass"
    t = estimate_linear_times(M, C, N, num_layers_read, num_slabs, element_size)
    return "fused" if t["fused"] <= t["two-pass"] else "two-pass"
