"""The pure-PyTorch path: no ``torch.stack``, no copies of whole layers, fp32 accumulation.

Used on CPU, where Triton is unavailable, and as the fallback of ``backend="auto"``. Every result
is written straight into the preallocated output; a group is summed into an fp32 buffer that is
rounded once into the output dtype. fp32 and fp64 inputs accumulate directly in their output
slab. The ops are built from differentiable torch ops, so autograd works through them.

CPU (docs/DESIGN.md §8): the group sums run over token chunks whose accumulator stays in cache.
Where no autograd graph is recorded, the chunks are dealt to a small pool of worker threads, each
running its ops on one intra-op thread (:func:`chunk_workers`): a chunk is a few hundred small
ops, and an op split over all cores waits at an OpenMP barrier for the slowest core -- on a
machine where another process holds a core, every op then waits for a time slice. Workers that
take the next free chunk have no such barrier: a preempted worker just does fewer chunks.
STI's window sums are a few large ops per layer and run inline (:func:`window_sums`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..spec import ConnectorSpec

__all__ = ["features_torch", "accumulation_dtype", "window_sums", "link_unread_groups",
           "chunk_workers", "CPU_CHUNK_BYTES", "POOL_CHUNKS_PER_WORKER", "WINDOW_CHUNK_BYTES",
           "PARALLEL_MIN_BYTES", "CHUNK_POOL_ENV"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything narrower accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: CPU: the group sums run over token chunks whose fp32 accumulator is at most about this size,
#: so the accumulator stays in cache across a group's layers (one pass over memory per layer,
#: not a read-modify-write of a whole [B, T', C] buffer per layer).
CPU_CHUNK_BYTES = 1 << 20
#: CPU: STI's window sums convert a narrower input to the accumulator dtype in chunks of at
#: most this many converted bytes (bf16: one whole-layer conversion was ~8x slower at 16
#: images, chunks of 1 MiB 1.4-1.6x slower than 8 MiB at 1-16: docs/DESIGN.md §8).
WINDOW_CHUNK_BYTES = 8 << 20
#: Below this many accumulator bytes a call runs inline (a pool round trip costs more).
PARALLEL_MIN_BYTES = 256 << 10
#: ``DC_KERNELS_CHUNK_POOL=0`` turns the chunk pool off (every chunk inline, the ops on all
#: intra-op threads), e.g. to compare the two in a benchmark.
CHUNK_POOL_ENV = "DC_KERNELS_CHUNK_POOL"

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()
_local = threading.local()  # per worker: a reusable fp32 accumulator


def _openmp_backend() -> bool:
    # per-thread intra-op thread counts are an OpenMP property (its ICVs are per thread); with
    # ATen's native or TBB pools, set_num_threads resizes one process-wide pool
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


_OPENMP = None


def chunk_workers(device: torch.device, tensors: Sequence[torch.Tensor]) -> int:
    """How many pool workers the CPU chunk loops use for a call on ``tensors``; 1 = inline.

    The pool is used on CPU, with ATen's OpenMP backend, when ``torch.get_num_threads() > 1``,
    ``$DC_KERNELS_CHUNK_POOL`` is not ``0``, nothing is being traced by ``torch.compile`` and no
    autograd graph is recorded (grad mode off, or no input requires grad: in-place ops on one
    output from several threads must not record history). Its size follows
    ``torch.get_num_threads()``.
    """
    global _OPENMP
    if device.type != "cpu" or torch.compiler.is_compiling():
        return 1
    if os.environ.get(CHUNK_POOL_ENV, "1").strip() == "0":
        return 1
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return 1
    n = torch.get_num_threads()
    if n <= 1:
        return 1
    if _OPENMP is None:
        _OPENMP = _openmp_backend()
    return n if _OPENMP else 1


def _init_worker(barrier: threading.Barrier) -> None:
    torch.get_num_threads()  # ATen's lazy per-thread init first, so it cannot undo the next line
    torch.set_num_threads(1)  # this thread's OpenMP ICV: its ops run on this thread alone
    barrier.wait()


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            barrier = threading.Barrier(n + 1)
            pool = ThreadPoolExecutor(n, thread_name_prefix="dc_kernels-chunks",
                                      initializer=_init_worker, initargs=(barrier,))
            for _ in range(n):  # start every worker now (the pool starts them lazily)
                pool.submit(int)
            barrier.wait()
            # set_num_threads(1) in a worker also stored 1 as the count later threads start
            # with: restore this process's setting (this thread's own count is unchanged)
            torch.set_num_threads(n)
            _pool, _pool_size = pool, n
        return _pool


def _reset_pool_after_fork() -> None:
    global _pool, _pool_size
    _pool, _pool_size = None, 0  # the child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _run_chunks(fn: Callable[[int, int], None], chunks: List[Tuple[int, int]],
                workers: int) -> None:
    """``fn(t0, t1)`` for every chunk: inline, or on the pool (each worker takes the next)."""
    if workers <= 1 or len(chunks) <= 1:
        for t0, t1 in chunks:
            fn(t0, t1)
        return
    pool = _get_pool(workers)
    futures = [pool.submit(fn, t0, t1) for t0, t1 in chunks]
    for f in futures:
        f.result()  # re-raises a worker's exception


#: On the pool, every worker gets at least this many chunks, so that the others make up for
#: one that another process preempts. More is slower: each chunk is ~30 ops of ~5 us dispatch
#: each, and 4 per worker made one CLIP or SigLIP image 1.45-1.8x slower than 2 on a quiet
#: machine, 1.1-1.3x with a core busy (docs/DESIGN.md §8, benchmarks/results/
#: 2026-12-07-cpu-chunks-*.md).
POOL_CHUNKS_PER_WORKER = 2


def _token_chunks(tokens: int, batch: int, channels: int, device: torch.device,
                  workers: int = 1, chunk_bytes: Optional[int] = None) -> List[Tuple[int, int]]:
    """``(t0, t1)`` token ranges covering ``[0, tokens)``: one on accelerators and while
    ``torch.compile`` traces (a chunk there is a scatter into the whole result); on CPU
    near-equal chunks of at most ``chunk_bytes`` (default :data:`CPU_CHUNK_BYTES`) of fp32
    (``4 * batch * channels`` bytes a token; one token where a token is more). With
    ``workers > 1`` their number is a multiple of ``workers`` and at least
    :data:`POOL_CHUNKS_PER_WORKER` per worker (while there are tokens for it), so no worker is
    left a short last round."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return [(0, tokens)]  # one launch per op on accelerators; whole ops when traced
    if tokens <= 0:
        return []
    per_token = max(1, 4 * batch * channels)
    limit = CPU_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    n = -(-tokens // max(1, limit // per_token))
    if workers > 1:
        n = workers * max(-(-n // workers), POOL_CHUNKS_PER_WORKER)
    n = min(n, tokens)
    return [(c * tokens // n, (c + 1) * tokens // n) for c in range(n)]


def _scratch(shape, dtype) -> torch.Tensor:
    """A CPU buffer of ``shape`` reused by this thread across chunks and calls (each thread
    keeps one, at most ~CPU_CHUNK_BYTES: chunks are that size). Only for calls that record no
    autograd graph."""
    n = 1
    for d in shape:
        n *= d
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buf = torch.empty(n, dtype=dtype)
        _local.buf = buf
    return buf[:n].view(shape)


def _channel_features(hs, spec, tok0, out):
    B, kept, _ = out.shape
    C = hs[spec.final_layer].shape[2]
    acc_dtype = accumulation_dtype(out.dtype)
    if kept == 0:
        out[..., :C].copy_(hs[spec.final_layer][:, tok0:])
        link_unread_groups(out, hs, spec)
        return
    read = [hs[i] for i in spec.used_layers]
    recording = torch.is_grad_enabled() and any(h.requires_grad for h in read)
    reuse = out.device.type == "cpu" and not recording
    workers = chunk_workers(out.device, read) if 4 * B * kept * C >= PARALLEL_MIN_BYTES else 1
    bufs = {}  # without reuse: one accumulator per call, shared by the groups (inline chunks)

    def chunk(t0: int, t1: int) -> None:
        rows = slice(tok0 + t0, tok0 + t1)
        out[:, t0:t1, :C].copy_(hs[spec.final_layer][:, rows])
        for g, (start, stop) in enumerate(spec.groups):
            dst = out[:, t0:t1, (g + 1) * C:(g + 2) * C]
            if stop - start == 1:
                dst.copy_(hs[start][:, rows])
                continue
            if out.dtype == acc_dtype:
                acc = dst
            elif reuse:
                acc = _scratch(dst.shape, acc_dtype)
            else:
                if "acc" not in bufs:
                    bufs["acc"] = torch.empty(dst.shape, dtype=acc_dtype, device=out.device)
                acc = bufs["acc"][:, :t1 - t0]
            acc.copy_(hs[start][:, rows])
            for i in range(start + 1, stop):
                acc.add_(hs[i][:, rows])  # promotes to the accumulator dtype
            acc.div_(stop - start)
            if acc is not dst:
                dst.copy_(acc)  # the single rounding to the output dtype

    _run_chunks(chunk, _token_chunks(kept, B, C, out.device, workers), workers)


def window_sums(x: torch.Tensor, pool: int, acc_dtype: torch.dtype) -> torch.Tensor:
    """``[B, T // pool, C]`` sums of ``pool`` consecutive tokens of ``x = [B, T, C]``.

    The remainder is dropped. Windows are summed in ``acc_dtype`` by a reduction over the
    window axis. An ``x`` already in ``acc_dtype`` is one op; a narrower one is converted and
    summed in window chunks of at most :data:`WINDOW_CHUNK_BYTES` of converted tokens (a
    narrow-dtype reduction with a wider ``dtype=``, or one conversion of a whole 16-image
    layer, was ~8x slower on CPU). Inline, never on the chunk pool: these are a few large ops,
    and on the pool they were up to 2.5x slower on a quiet machine and no faster with a core
    busy (docs/DESIGN.md §8).
    """
    B, T, C = x.shape
    tp = T // pool
    chunks = [(0, tp)] if x.dtype == acc_dtype else \
        _token_chunks(tp, B, C * pool, x.device, chunk_bytes=WINDOW_CHUNK_BYTES)
    if len(chunks) <= 1:
        return x[:, :tp * pool].unflatten(1, (tp, pool)).to(acc_dtype).sum(2)
    out = torch.empty((B, tp, C), dtype=acc_dtype, device=x.device)
    for j0, j1 in chunks:
        win = x[:, j0 * pool:j1 * pool].unflatten(1, (j1 - j0, pool))
        out[:, j0:j1].copy_(win.to(acc_dtype).sum(2))  # copy_, not out=: keeps autograd
    return out


def _token_features(hs, spec, tok0, out):
    base = hs[spec.final_layer][:, tok0:]
    kept = base.shape[1]
    p = spec.pool_size
    tp = kept // p
    acc_dtype = accumulation_dtype(out.dtype)
    out[:, :kept].copy_(base)
    if tp == 0:
        link_unread_groups(out, hs, spec)
        return
    for g, (start, stop) in enumerate(spec.groups):
        acc = None
        for i in range(start, stop):
            s = window_sums(hs[i][:, tok0:], p, acc_dtype)
            acc = s if acc is None else acc.add_(s)
        acc.div_((stop - start) * p)
        out[:, kept + g * tp:kept + (g + 1) * tp].copy_(acc)


def _features_traced(hs: Sequence[torch.Tensor], spec: ConnectorSpec) -> torch.Tensor:
    """The features as ``torch.compile`` should see them: whole-tensor out-of-place ops and one
    ``torch.cat``, the same arithmetic in the same order as the eager ops (each group summed in
    the accumulator dtype layer by layer from its first, divided once, rounded once).

    The eager ops write token chunks into slices of a preallocated output; traced, every such
    in-place write becomes a functional scatter into the whole output: one CLIP image took
    29.5 s to compile and ran at 144 ms a call against 4.5 ms eager (docs/DESIGN.md §8).
    Inductor fuses each group's sum, division and rounding into the concatenation's output.
    """
    tok0 = spec.token_offset
    base = hs[spec.final_layer][:, tok0:]
    acc_dtype = accumulation_dtype(base.dtype)
    sti = spec.connector_type == "sti"
    p = spec.pool_size
    parts = [base]
    for start, stop in spec.groups:
        if sti:  # window_sums is one op per layer while traced (_token_chunks)
            acc = None
            for i in range(start, stop):
                x = window_sums(hs[i][:, tok0:], p, acc_dtype)
                acc = x if acc is None else acc + x
            parts.append((acc / ((stop - start) * p)).to(base.dtype))
            continue
        if stop - start == 1:
            parts.append(hs[start][:, tok0:])
            continue
        acc = hs[start][:, tok0:].to(acc_dtype)
        for i in range(start + 1, stop):
            acc = acc + hs[i][:, tok0:]  # promotes to the accumulator dtype
        parts.append((acc / (stop - start)).to(base.dtype))
    return torch.cat(parts, dim=1 if sti else 2)


def features_torch(hidden_states: Sequence[torch.Tensor], spec: ConnectorSpec,
                   batch: int, tokens: int, channels: int) -> torch.Tensor:
    """Dense Connector features on the torch backend (inputs already validated).

    Returns ``[B, spec.out_tokens(T), spec.out_channels(C)]`` in the input dtype. While
    ``torch.compile`` traces, the same arithmetic as whole-tensor ops
    (:func:`_features_traced`).
    """
    if torch.compiler.is_compiling():
        return _features_traced(hidden_states, spec)
    ref = hidden_states[spec.final_layer]
    out = torch.empty(batch, spec.out_tokens(tokens), spec.out_channels(channels),
                      dtype=ref.dtype, device=ref.device)
    tok0 = spec.token_offset
    if spec.connector_type == "sti":
        _token_features(hidden_states, spec, tok0, out)
    else:
        _channel_features(hidden_states, spec, tok0, out)
    return out


def link_unread_groups(out: torch.Tensor, hs: Sequence[torch.Tensor], spec: ConnectorSpec
                       ) -> None:
    """Record that ``out`` depends on every group member, when no element of theirs is read.

    With no token kept (only CLS), or STI with fewer kept tokens than the pool, the groups
    contribute no element and the ops above never touch their layers; the original's
    ``torch.cat`` (and the Triton backend's custom op) still return an output that requires
    grad, and give those layers zero gradients. An empty copy per layer records the same
    dependency (nothing is copied; called only in that degenerate case).
    """
    if not torch.is_grad_enabled():
        return
    for start, stop in spec.groups:
        for i in range(start, stop):
            if hs[i].requires_grad:
                out[:0, :0, :0].copy_(hs[i][:0, :0, :0])
