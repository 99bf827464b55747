"""A realistic training step of the whole connector: DenseConnector vs the original, side by side.

``python -m benchmarks.module_fwd_bwd [--dtype fp32|bf16|fp16] [--images N] [--device cpu|cuda]
[--budget S] [--saved-images 1,4,16] [--json PATH] [--markdown PATH]``

CLIP-L/336 DCI (25 hidden states ``[B, 577, 1024]``) -> ``mlp2x_gelu`` projector to 4096, as the
Dense Connector is trained (the ViT frozen, the projector training). One step:

1. the frozen tower's hidden states are made under ``torch.no_grad()`` (copies of a fixed pool:
   the bytes a tower writes; the same for every provider);
2. the connector's forward; the hidden states are then dropped (only what autograd kept stays);
3. ``out.backward(dY)`` with a fixed random upstream gradient (what the LLM would send back);
   the projector's ``.grad`` are reset to None first, as ``zero_grad()`` does.

Three tables, measured in one run (docs/DESIGN.md §6):

* **step**: median time, peak memory above the inputs (``benchmarks.memory``: the RSS
  high-water mark on CPU) and the tensor peak (:func:`tensor_peak_bytes`: tensors only,
  independent of malloc and of other processes) of
  ``reference`` (the original, eager), ``reference+compile`` (``torch.compile`` of its forward;
  the mode of ``benchmarks.providers.compile_mode``) and ``dc_kernels`` (``DenseConnector``,
  ``backend="auto"``: the torch path on CPU, Triton on CUDA). Every row's parameter gradients
  are checked against the reference's first.
* **backward strategies** (``emulated/...`` rows): the Triton op's possible save/recompute
  choices for the first layer, written with torch ops (the torch path's features, ``addmm``,
  ``gelu``) so they run on any device: ``keep-hs`` keeps the hidden states and recomputes A and
  Z = A W^T + b in backward (dc_kernels before issue 13), ``keep-A-Z`` keeps A and Z (what the
  Triton op does now), ``keep-A`` keeps A and recomputes Z (the alternative for GELU'). Same
  formulas as ``dc_kernels/autograd.py``; the Triton kernels' own speed is not in them.
* **saved for backward**: bytes autograd keeps between forward and backward (distinct storages
  seen by ``torch.autograd.graph.saved_tensors_hooks``), how many of them are hidden states, and
  the backward's GEMM FLOPs (``torch.utils.flop_counter``), for the reference and both
  dc_kernels backends. Computed on fake tensors (``FakeTensorMode``) at the real shapes, so the
  Triton backend is covered on any machine: shapes and dtypes decide these numbers, no kernel
  runs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import weakref
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import dc_kernels
import reference
from benchmarks.machine import machine_info
from benchmarks.memory import METHOD as MEMORY_METHOD, peak_memory_bytes
from benchmarks.providers import compile_mode
from benchmarks.report import write_outputs
from benchmarks.timing import time_fn
from dc_kernels.ops.torch_ops import features_torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
C, T, H = 1024, 577, 4096


# --------------------------------------------------------------------------- emulated strategies
class _FirstLayer(torch.autograd.Function):
    """``gelu(A @ W^T + b)`` with A built from frozen hidden states, in torch ops, keeping for
    backward what ``strategy`` says: ``keep-hs``, ``keep-A-Z`` or ``keep-A`` (module doc)."""

    @staticmethod
    def forward(ctx, weight, bias, strategy, spec, *hidden_states):
        B = hidden_states[0].shape[0]
        a = features_torch(hidden_states, spec, B, hidden_states[0].shape[1], C)
        a2 = a.reshape(-1, a.shape[-1])
        z = torch.addmm(bias, a2, weight.t())
        y = F.gelu(z)
        ctx.strategy, ctx.spec, ctx.hs_shape = strategy, spec, hidden_states[0].shape
        ctx.n_hs = len(hidden_states)
        if strategy == "keep-hs":
            ctx.save_for_backward(weight, bias, *hidden_states)
        elif strategy == "keep-A-Z":
            ctx.save_for_backward(a2, z)
        else:
            ctx.save_for_backward(weight, bias, a2)
        return y.reshape(B, -1, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        if ctx.strategy == "keep-hs":
            weight, bias, *hs = saved
            B, Tk, _ = ctx.hs_shape
            a2 = features_torch(hs, ctx.spec, B, Tk, C).flatten(0, 1)
            z = torch.addmm(bias, a2, weight.t())
        elif ctx.strategy == "keep-A-Z":
            a2, z = saved
        else:
            weight, bias, a2 = saved
            z = torch.addmm(bias, a2, weight.t())
        dz = torch.ops.aten.gelu_backward(dy.reshape(z.shape), z)
        return (dz.t() @ a2, dz.sum(0), None, None) + (None,) * ctx.n_hs


def _emulated(strategy: str, spec, proj):
    def forward(hs):
        y = _FirstLayer.apply(proj[0].weight, proj[0].bias, strategy, spec, *hs)
        return proj[2](y)
    return forward


# --------------------------------------------------------------------------- the step
def _providers(spec, proj, device) -> Dict[str, Callable]:
    def original(hs):
        return proj(reference.dense_connector(reference.select_image_features(hs, False), hs,
                                              False))
    module = dc_kernels.DenseConnector.from_projector(spec, proj)
    torch._dynamo.reset()
    compiled = torch.compile(original, mode=compile_mode(device), dynamic=False)
    out = {"reference": original, "reference+compile": compiled, "dc_kernels": module}
    for strategy in ("keep-hs", "keep-A-Z", "keep-A"):
        out[f"emulated/{strategy}"] = _emulated(strategy, spec, proj)
    return out


def _step(forward, pool, params, dy):
    def step():
        for p in params:
            p.grad = None
        with torch.no_grad():
            hs = tuple(h.clone() for h in pool)  # the frozen tower writes them
        out = forward(hs)
        del hs  # only what autograd kept survives
        out.backward(dy)
    return step


def tensor_peak_bytes(fn: Callable[[], object]) -> int:
    """Most bytes of tensors alive at once during ``fn()``, above those alive before it.

    Counted from the allocation and free events ``torch.profiler`` records
    (``profile_memory=True``): every tensor of the device's allocator, not allocator caches or
    library scratch, so it does not depend on malloc's behaviour.
    """
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def run_steps(dtype, images, device, budget_s, rounds=3) -> List[dict]:
    """Time and peak memory of one training step per provider (table **step** + strategies).

    The providers are timed in ``rounds`` interleaved rounds of ``budget_s / rounds`` each
    (load from other processes drifts; interleaving spreads it over every provider); the
    reported median and p20/p80 are the medians over the rounds of each round's values.
    """
    torch.manual_seed(0)
    spec = dc_kernels.ConnectorSpec.preset("clip", "dci")
    pool = tuple(torch.randn(images, T, C, device=device).to(dtype)
                 for _ in range(spec.num_hidden_states))
    proj = reference.build_projector(spec.out_channels(C), H).to(device, dtype)
    params = list(proj.parameters())
    dy = torch.randn(images, T - 1, H, device=device).to(dtype)
    u, u32 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float32]
    # the sums behind dW run over M rows: fp32 sums in another order differ by ~u32 sqrt(M)
    bound = 8 * u + 8 * u32 * math.sqrt(images * (T - 1))
    rows, steps, ref_grads = [], {}, None
    for name, forward in _providers(spec, proj, device).items():
        step = _step(forward, pool, params, dy)
        t0 = time.perf_counter()
        step()  # warm-up (compiles); its gradients are checked
        first_s = time.perf_counter() - t0
        grads = [p.grad.clone() for p in params]
        if ref_grads is None:
            ref_grads = grads
        err = max(_rel_err(g, r) for g, r in zip(grads, ref_grads))
        if not err <= bound:
            sys.exit(f"CORRECTNESS FAILURE: {name}: relative gradient error {err:.3g} > "
                     f"{bound:.3g}")
        steps[name] = step
        rows.append(dict(provider=name, grad_rel_err=err, grad_rel_err_bound=bound,
                         first_call_s=first_s))
    timings: Dict[str, list] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            timings[name].append(time_fn(step, device, budget_s=budget_s / rounds))
    for r in rows:
        ts = timings[r["provider"]]
        med = lambda xs: float(np.median(xs))  # noqa: E731
        loads = [t.other_load for t in ts if t.other_load is not None]
        peak = peak_memory_bytes(steps[r["provider"]], device)
        for p in params:  # released outside the count: the step's own allocations only
            p.grad = None
        tensor_peak = tensor_peak_bytes(steps[r["provider"]])
        r.update(median_ms=med([t.median_s for t in ts]) * 1e3,
                 p20_ms=med([t.p20_s for t in ts]) * 1e3, p80_ms=med([t.p80_s for t in ts]) * 1e3,
                 round_medians_ms=[t.median_s * 1e3 for t in ts],
                 peak_mib=None if peak is None else peak / 2 ** 20,
                 tensor_peak_mib=tensor_peak / 2 ** 20,
                 other_cpu_load=max(loads) if loads else None)
        print(f"  {r['provider']}: {r['median_ms']:.1f} ms, peak "
              f"{'n/a' if peak is None else f'{peak / 2 ** 20:.1f} MiB'}, tensor peak "
              f"{tensor_peak / 2 ** 20:.1f} MiB", file=sys.stderr)
    ref = {r["provider"]: r for r in rows}
    for r in rows:
        r["vs_ref"] = ref["reference"]["median_ms"] / r["median_ms"]
        r["vs_compile"] = ref["reference+compile"]["median_ms"] / r["median_ms"]
    return rows


# --------------------------------------------------------------------------- saved for backward
@contextlib.contextmanager
def _fake_tensor_env():
    # The Triton backend refuses CPU tensors unless TRITON_INTERPRET is set; on fake tensors
    # nothing launches, the flag only lets the dispatch through. The torch path's CPU chunk
    # pool runs chunks on worker threads, where FakeTensorMode (thread-local) is not active:
    # off here (DC_KERNELS_CHUNK_POOL=0; the same ops run inline).
    # The torch path's GELU checks its input for +inf with a data-dependent reduction (a CPU
    # fix-up, dc_kernels.functional._gelu) that fake tensors cannot answer: F.gelu here, the
    # same op, the same saved tensors.
    from unittest import mock

    from dc_kernels import functional
    from dc_kernels.ops.torch_ops import CHUNK_POOL_ENV
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", CHUNK_POOL_ENV)}
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ[CHUNK_POOL_ENV] = "0"
    try:
        with mock.patch.object(functional, "_gelu", F.gelu):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


class _Box:
    # what the pack hook hands autograd: alive exactly as long as the saved tensor is kept
    # (detached: a node saving its own output would otherwise keep itself alive through it)
    def __init__(self, t):
        self.t = t.detach()


def saved_for_backward(dtype, images: Sequence[int]) -> List[dict]:
    """Bytes kept for backward and backward GEMM FLOPs at the real shapes (fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    spec = dc_kernels.ConnectorSpec.preset("clip", "dci")
    rows = []
    with _fake_tensor_env(), FakeTensorMode():
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            proj = reference.build_projector(spec.out_channels(C), H)
        finally:
            torch.set_default_dtype(default)
        for n in images:
            with torch.no_grad():
                hs = tuple(torch.empty(n, T, C, dtype=dtype)
                           for _ in range(spec.num_hidden_states))
            dy = torch.empty(n, T - 1, H, dtype=dtype)
            runs = {"reference": lambda h: proj(reference.dense_connector(
                        reference.select_image_features(h, False), h, False))}
            for backend in ("torch", "triton"):
                m = dc_kernels.DenseConnector.from_projector(spec, proj, backend=backend)
                runs[f"dc_kernels ({backend})"] = m
            for name, fn in runs.items():
                boxes = []

                def pack(t):
                    box = _Box(t)
                    boxes.append(weakref.ref(box))
                    return box
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
                    out = fn(hs)
                # the saved tensors still held when the forward returns, by base tensor (fake
                # tensors have no data pointers; views of one base share its storage)
                kept: Dict[int, tuple] = {}
                for ref in boxes:
                    box = ref()
                    if box is not None:
                        t = box.t
                        base = t._base if t._base is not None else t
                        kept[id(base)] = (base, base.untyped_storage().nbytes())
                hs_kept = sum(any(k is h or k._base is h for h in hs)
                              for k, _ in kept.values())
                with FlopCounterMode(display=False) as fc:
                    out.backward(dy)
                for p in proj.parameters():
                    p.grad = None
                rows.append(dict(images=n, provider=name,
                                 saved_mib=sum(b for _, b in kept.values()) / 2 ** 20,
                                 hidden_states_kept=hs_kept,
                                 backward_gflop=fc.get_total_flops() / 1e9))
                del out, kept, boxes
    for r in rows:
        ref = next(x for x in rows if x["images"] == r["images"] and x["provider"] == "reference")
        r["saved_vs_ref"] = r["saved_mib"] / ref["saved_mib"]
        r["flops_vs_ref"] = r["backward_gflop"] / ref["backward_gflop"]
    return rows


# --------------------------------------------------------------------------- report
def _markdown(info, args, steps, saved) -> str:
    dt = args.dtype
    lines = [f"# Training step: DenseConnector vs the original ({info['device_name']}, {dt})",
             "",
             f"- device: **{info['device_name']}** ({info['device']}), {info['cpu_cores']} usable "
             f"cores, torch threads {info['torch_threads']}",
             f"- torch {info['torch']}, triton {info['triton']}, python {info['python']}, "
             f"{info['platform']}; date {info['date']} ({info['time_utc']})",
             f"- command: `python -m benchmarks.module_fwd_bwd {' '.join(args.argv)}`",
             f"- CLIP-L/336 DCI, 25 hidden states [{args.images}, 577, 1024] -> mlp2x_gelu -> "
             f"4096 (M = {args.images * 576}); step = hidden states made under no_grad (copies of "
             "a pool), forward, hidden states dropped, `out.backward(dY)` (fixed random dY), "
             "projector grads reset to None before each step",
             f"- timing: `benchmarks.timing.time_fn`, providers interleaved over {args.rounds} "
             "rounds, median (p20-p80) = medians over the rounds; other CPU load = the largest "
             "share of all cores other processes used during a round; tensor peak: most bytes "
             "of tensors alive at once during one step (torch.profiler memory events, "
             "allocator-independent); peak memory: "
             f"{MEMORY_METHOD[info['device']]}",
             "- gradients of every row checked first: max over the 4 projector parameters of "
             "||g - g_ref|| / ||g_ref||, bound 8u + 8 u32 sqrt(M)",
             "- `emulated/*`: the Triton op's save/recompute strategies written with torch ops "
             "(see the module docstring); they show the cost of each choice, not the kernels' "
             "speed",
             ]
    if steps:
        lines += ["", "## Step", "",
                  "| provider | median ms | p20-p80 ms | peak MiB | tensor peak MiB | vs ref | "
                  "vs compile | grad rel err | other CPU load |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        load = "-" if r["other_cpu_load"] is None else f"{100 * r['other_cpu_load']:.0f}%"
        lines.append(f"| {r['provider']} | {r['median_ms']:.1f} | {r['p20_ms']:.1f}-"
                     f"{r['p80_ms']:.1f} | {peak} | {r['tensor_peak_mib']:.1f} | "
                     f"{r['vs_ref']:.2f}x | {r['vs_compile']:.2f}x "
                     f"| {r['grad_rel_err']:.2g} | {load} |")
    lines += ["", "## Saved for backward (fake tensors, real shapes, "
              f"{args.saved_dtype})", "",
              "Distinct storages autograd keeps between forward and backward (the second "
              "Linear's input and weight, GELU's input, the first Linear's input and whatever "
              "else each implementation keeps), how many of them are hidden states, and the "
              "backward's GEMM FLOPs. Hidden states made under no_grad; projector trains.", "",
              "| images | provider | saved MiB | vs ref | hidden states kept | backward GFLOP "
              "| vs ref |", "|---|---|---|---|---|---|---|"]
    for r in saved:
        lines.append(f"| {r['images']} | {r['provider']} | {r['saved_mib']:.1f} | "
                     f"{r['saved_vs_ref']:.2f}x | {r['hidden_states_kept']} | "
                     f"{r['backward_gflop']:.1f} | {r['flops_vs_ref']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of samples per row")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds (the budget is split over them)")
    p.add_argument("--saved-images", default="1,4,16",
                   help="image counts of the saved-for-backward table")
    p.add_argument("--saved-dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--no-step", action="store_true",
                   help="only the saved-for-backward table (no timing)")
    p.add_argument("--json", help="write every row and the machine here")
    p.add_argument("--markdown", help="write the tables here")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    images = [int(x) for x in args.saved_images.split(",") if x]
    info = machine_info(device)
    print(f"step: CLIP-L/336 DCI -> 4096, {args.images} images, {args.dtype}, {device}",
          file=sys.stderr)
    steps = [] if args.no_step else run_steps(dtype, args.images, device, args.budget,
                                                   args.rounds)
    saved = saved_for_backward(DTYPES[args.saved_dtype], images)
    md = _markdown(info, args, steps, saved)
    print(md)
    write_outputs(args.markdown, md, args.json,
                  {"machine": info, "args": vars(args), "step": steps, "saved": saved})


if __name__ == "__main__":
    main()
