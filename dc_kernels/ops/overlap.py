"""The overlapped path: two-pass in row chunks, the features of chunk j + 1 written on a side
stream while the GEMM of chunk j runs on the current one (:class:`OverlapLaunch`).

It has no kernel of its own: each chunk is a features launch of :mod:`.features` (the LDG or
TMA kernel on a row range or row tiles, STI's kernel on whole images) and a GEMM of
:func:`.linear.prepare_gemm` (the persistent TMA GEMM on sm_90, leaving an SM slot for the next
chunk's features). Chunk sizes come from the path rule (:func:`.path.overlap_chunk_rows`,
:func:`.path.sti_overlap_images`) unless the plan switches below set them. The dispatcher
(:func:`.linear.linear_triton`) picks this path; docs/DESIGN.md §5.1 gives its estimates.
"""

from __future__ import annotations

import torch

from ..spec import ConnectorSpec
from . import common
from .features import prepare_sti_chunk, sti_chunks_aligned
from .gemm_tma import arch_of, card_of, sms_of
from .path import model_for, overlap_chunk_rows, sti_chunk_row_multiple, sti_overlap_images

__all__ = ["OVERLAP_CHUNK_ROWS", "OVERLAP_CHUNK_IMAGES", "sti_overlap_serves",
           "sti_chunk_images", "overlap_chunks", "OverlapLaunch", "prepare_overlap"]

#: Overlapped path: rows per chunk; 0 = :func:`dc_kernels.ops.path.overlap_chunk_rows`
#: (whole GEMM waves per chunk). Tests set it to exercise small and ragged chunks.
OVERLAP_CHUNK_ROWS = 0
#: Overlapped path, STI: images per chunk; 0 = :func:`dc_kernels.ops.path.sti_overlap_images`.
#: Tests set it (a plan switch).
OVERLAP_CHUNK_IMAGES = 0


def sti_overlap_serves(hidden_states, spec: ConnectorSpec, batch: int, tokens: int) -> bool:
    """Whether the overlapped path can run STI in image chunks: at least two images, kept
    tokens, and chunk slices that keep the layers' and A's alignment
    (:func:`.features.sti_chunks_aligned`)."""
    return spec.connector_type == "sti" and batch >= 2 and spec.tokens_kept(tokens) > 0 and \
        sti_chunks_aligned(hidden_states, spec, tokens, hidden_states[spec.final_layer].shape[2])


def sti_chunk_images(hidden_states, spec: ConnectorSpec, batch: int, tokens: int,
                     weight: torch.Tensor) -> int:
    """Images per chunk of the overlapped path for these (validated) STI inputs:
    :data:`OVERLAP_CHUNK_IMAGES`, else :func:`dc_kernels.ops.path.sti_overlap_images` on the
    card's calibration and its GEMM's row multiple; at most ``batch``."""
    if OVERLAP_CHUNK_IMAGES:
        return max(1, min(batch, OVERLAP_CHUNK_IMAGES))
    base = hidden_states[spec.final_layer]
    arch = arch_of(base)
    return sti_overlap_images(batch, spec.tokens_kept(tokens), spec.out_tokens(tokens),
                              base.shape[2], weight.shape[0], len(spec.used_layers),
                              base.element_size(), model_for(arch, card_of(base), sms_of(base)),
                              sti_chunk_row_multiple(arch))


def overlap_chunks(M: int, chunk_rows: int) -> list:
    """Row ranges of the overlapped path with the LDG features kernel: ``chunk_rows`` each,
    the last one ragged."""
    return [(r, min(M, r + chunk_rows)) for r in range(0, M, chunk_rows)]


def _tile_chunks(spec, batch, tokens, chunk_rows: int) -> list:
    # the same in row tiles of the TMA features kernel: [((q0, q1), (r0, r1)), ...]
    from .features import _tma_config, row_of_tile, row_tiles
    Q = row_tiles(spec, batch, tokens)
    step = max(1, chunk_rows // _tma_config()["ROWS"])
    return [((q, min(Q, q + step)), (row_of_tile(spec, tokens, q),
                                     row_of_tile(spec, tokens, min(Q, q + step))))
            for q in range(0, Q, step)]


class OverlapLaunch:
    """The overlapped path prepared for one input signature and chunk size: the row chunks,
    one prepared features launch per chunk (:func:`~dc_kernels.ops.features.prepare_features_chunk`)
    and one prepared GEMM per chunk (:func:`.linear.prepare_gemm`, from the first call's operands: a
    chunk's views keep their alignment from call to call), and the chunks' events.

    ``launch(hidden_states, weight, bias, out2d, pre2d=None)`` allocates A and returns it. The
    features of row chunk j + 1 are written (side stream) while the GEMM of chunk j runs
    (current stream): the memory-bound pass hides under the compute-bound one. Each GEMM chunk
    waits on its features chunk's event only. A is the two-pass A bit for bit; so is every
    output row where neither path's GEMM runs stream K (a chunk's GEMM leaves room for the next
    chunk's features and never does, except the last chunk's, which runs alone; the two-pass
    GEMM does when whole tiles leave SMs idle): stream K changes only the fp32 summation
    order, within the same bound. The TMA features kernel
    (sm_90) keeps its bytes in flight in shared memory, so it still draws bandwidth beside the
    GEMM's CTAs; chunks are then whole row tiles of it. STI's chunks are whole images (the
    STI kernel on batch slices of the layers, :func:`~dc_kernels.ops.features.prepare_sti_chunk`).
    Off CUDA (the interpreter) the chunks run in order."""

    __slots__ = ("chunks", "features", "gemms", "shape", "dtype", "device", "activation",
                 "events")

    def __call__(self, hidden_states, weight, bias, out2d, pre2d=None):
        feats = common.empty(self.shape, self.dtype, self.device)
        a2 = feats.view(-1, self.shape[-1])
        if self.gemms is None:  # the first call prepares the GEMMs on its real operands
            from .linear import prepare_gemm  # (linear dispatches to this module)
            # every chunk's GEMM but the last leaves room for the next chunk's features; the
            # last runs alone (its features are done) and may run stream K (gemm_stream_k)
            last = len(self.chunks) - 1
            self.gemms = [prepare_gemm(a2[r0:r1], weight, bias, self.activation,
                                       out2d[r0:r1], leave_room=j < last)
                          for j, (r0, r1) in enumerate(self.chunks)]

        def gemm_chunk(j):
            r0, r1 = self.chunks[j]
            self.gemms[j](a2[r0:r1], weight, bias, out2d[r0:r1],
                          None if pre2d is None else pre2d[r0:r1])

        if self.device.type != "cuda":
            for j, produce in enumerate(self.features):
                produce(hidden_states, feats)
                gemm_chunk(j)
            return feats
        if self.events is None:
            self.events = [torch.cuda.Event() for _ in self.chunks]
        main = torch.cuda.current_stream(self.device)
        side = common.side_stream(self.device)
        side.wait_stream(main)  # the hidden states are ready
        with torch.cuda.stream(side):
            for produce, ev in zip(self.features, self.events):
                produce(hidden_states, feats)
                ev.record(side)
        # (an event recorded again by a later call: a wait already enqueued keeps the record
        # it was enqueued after)
        for j, ev in enumerate(self.events):
            main.wait_event(ev)
            gemm_chunk(j)
        # feats was allocated on ``main``, which waits for every side-stream write above
        # before its last GEMM: freeing it after return (or handing it to autograd) is safe
        # without record_stream
        return feats


def prepare_overlap(hidden_states, spec, batch, tokens, channels, weight, activation,
                    chunk_rows: int = 0) -> OverlapLaunch:
    """The :class:`OverlapLaunch` of these (validated) inputs; ``chunk_rows`` 0:
    :data:`OVERLAP_CHUNK_ROWS`, else :func:`dc_kernels.ops.path.overlap_chunk_rows`. STI
    (:func:`sti_overlap_serves`) runs in chunks of whole images instead
    (:func:`sti_chunk_images`; ``chunk_rows`` unused)."""
    from .features import features_tma_eligible, prepare_features_chunk
    base = hidden_states[spec.final_layer]
    t_keep = spec.tokens_kept(tokens)
    M = batch * t_keep
    launch = OverlapLaunch()
    launch.shape = (batch, spec.out_tokens(tokens), spec.out_channels(channels))
    launch.dtype, launch.device, launch.activation = base.dtype, base.device, activation
    launch.gemms = launch.events = None
    if spec.connector_type == "sti":
        if not sti_overlap_serves(hidden_states, spec, batch, tokens):
            raise ValueError("the overlapped path runs STI in image chunks: it needs 2+ images "
                             "and 16-byte aligned chunks (sti_overlap_serves)")
        k = sti_chunk_images(hidden_states, spec, batch, tokens, weight)
        t_out = launch.shape[1]
        images = [(b, min(batch, b + k)) for b in range(0, batch, k)]
        launch.chunks = [(b0 * t_out, b1 * t_out) for b0, b1 in images]
        # chunk 0 runs alone; the later chunks share the SMs with the GEMM
        launch.features = [prepare_sti_chunk(hidden_states, spec, batch, tokens, channels,
                                             images=im, beside_gemm=im[0] > 0)
                           for im in images]
        return launch
    chunk_rows = chunk_rows or OVERLAP_CHUNK_ROWS or overlap_chunk_rows(
        M, weight.shape[0], model_for(arch_of(base), card_of(base), sms_of(base)))
    entries, _, _ = common.layer_entries(hidden_states, spec)
    if features_tma_eligible(entries, base.device):
        tiled = _tile_chunks(spec, batch, tokens, chunk_rows)
        launch.chunks = [r for _, r in tiled]
        # chunk 0 runs alone; the later chunks share the SMs with the GEMM
        launch.features = [prepare_features_chunk(hidden_states, spec, batch, tokens, channels,
                                                  tiles=q, beside_gemm=q[0] > 0)
                           for q, _ in tiled]
    else:
        launch.chunks = overlap_chunks(M, chunk_rows)
        launch.features = [prepare_features_chunk(hidden_states, spec, batch, tokens, channels,
                                                  rows=r) for r in launch.chunks]
    return launch
