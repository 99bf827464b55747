"""Binder-free launches against Triton's own binder, without a GPU (run by test_direct_launch.py).

Run without ``TRITON_INTERPRET`` (the kernels must be real ``JITFunction`` s):
``python tests/direct_launch_worker.py OUT.json``.

For every case the public call runs three times on CPU stand-ins of the real shapes, with the
launchers seeing an sm_80 / sm_90 card (``triton_aot.record_launches``):

A. direct launches on: each launch goes through the JIT entry, where Triton's binder gives the
   values ``JITFunction.run`` would hand the compiled kernel's launcher, and a stand-in for the
   ``CompiledKernel`` is returned (its launcher needs a GPU); the sites capture it;
B. the same call again: every launch must be direct (no JIT entry), and what reaches the
   stand-in's launcher is logged;
C. the same call with ``DC_KERNELS_DIRECT_LAUNCH=0``: through the JIT again, binder values
   logged.

B's launcher arguments must equal C's binder values position by position (grid, stream,
function and metadata of A's kernel for that site, then every parameter: the same input
tensors, outputs of the same layout, the same descriptors and block shapes, the same scalars
and constants). And no tensor call A allocated may still be alive after the three calls: the
plans and their launch sites keep none.
"""

import gc
import json
import os
import sys
import weakref

import torch

import dc_kernels
from dc_kernels import ConnectorSpec
from dc_kernels.ops import direct, gemm_tma, linear, triton_aot


class StandInKernel:
    """Stands in for Triton's ``CompiledKernel``: its ``run`` (the driver launcher) logs."""

    def __init__(self, ident, log, inputs=()):
        self.ident, self.log, self.inputs = ident, log, inputs
        self.function = ("function", ident)
        self.packed_metadata = ("packed", ident)

    def run(self, *args):
        # the launch's head (grid, stream, function, metadata, hooks) and its parameters as
        # descriptions (no tensor is kept)
        self.log.append(("direct", self.ident, args[:9],
                         [describe(v, self.inputs) for v in args[9:]]))


def describe(v, inputs):
    if isinstance(v, torch.Tensor):
        ptr = v.data_ptr()
        return ("tensor", tuple(v.shape), v.stride(), str(v.dtype),
                ptr if ptr in inputs else "new")
    if isinstance(v, tuple) and v:  # layers, or descriptors of A's slabs
        return ("tuple",) + tuple(describe(t, inputs) for t in v)
    if type(v).__name__ == "TensorDescriptor":
        return ("desc", describe(v.base, inputs), tuple(v.shape), tuple(v.strides),
                tuple(v.block_shape))
    return ("value", repr(v))


def _tensors(v):
    # the tensors an argument holds (a tensor, a tuple of them, a descriptor's base)
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, tuple):
        return [t for x in v for t in _tensors(x)]
    if type(v).__name__ == "TensorDescriptor":
        return [v.base]
    return []


def run_case(arch, call, inputs):
    seq = []  # every launch in order: ("jit", kernel, grid, values) or ("direct", kernel, args)
    first_call = []  # weak references to the tensors call A allocated

    def stand_in(fn, args, kwargs, grid):
        if not first_call or first_call[0] == "open":
            first_call[:1] = ["open"]
            first_call.extend(weakref.ref(t) for a in args for t in _tensors(a)
                              if t.data_ptr() not in inputs)
        values = triton_aot.bound_values(fn, args, kwargs, arch)
        names = [p.name for p in fn.params]
        if callable(grid):
            grid = grid(dict(zip(names, values)))
        grid = tuple(grid) + (1,) * (3 - len(tuple(grid)))
        ident = len(seq)
        seq.append(("jit", ident, grid, [describe(v, inputs) for v in values]))
        return StandInKernel(ident, seq, inputs)

    with triton_aot.record_launches(arch, record=False, stand_in=stand_in):
        call()                                   # A
        first_call[0] = "closed"
        seq_a = list(seq)
        before = direct.stats()
        call()                                   # B
        after = direct.stats()
        seq_b = seq[len(seq_a):]
        os.environ[direct.DIRECT_ENV] = "0"
        try:
            call()                               # C
        finally:
            del os.environ[direct.DIRECT_ENV]
        seq_c = seq[len(seq_a) + len(seq_b):]
        gc.collect()  # the plans (and their launch sites) are still alive here
        # the split GEMM's arrival counts are a per-(device, stream) cache by design
        # (gemm_tma._arrivals), not state of the first call
        cached = {id(t) for t in gemm_tma._ARRIVALS.values()}
        kept = sum(1 for r in first_call[1:] if r() is not None and id(r()) not in cached)
    problems = []
    if kept:
        problems.append(f"{kept} tensors of the first call are kept alive (by a plan or site)")
    if not seq_a:
        problems.append("no launch")
    if any(e[0] != "direct" for e in seq_b):
        problems.append("launches of the repeated call went through the JIT")
    if any(e[0] != "jit" for e in seq_c):
        problems.append("launches with direct launches off did not go through the JIT")
    if not len(seq_a) == len(seq_b) == len(seq_c):
        problems.append(f"{len(seq_a)} / {len(seq_b)} / {len(seq_c)} launches in A / B / C")
    for k, (a, b, c) in enumerate(zip(seq_a, seq_b, seq_c)):
        _, ident, args, got = b
        if ident != a[1]:
            problems.append(f"launch {k}: kernel of launch {ident}, expected {a[1]}")
        if tuple(args[:3]) != c[2]:
            problems.append(f"launch {k}: grid {args[:3]} != {c[2]}")
        if args[3] != 0 or args[4] != ("function", ident) or args[5] != ("packed", ident) \
                or args[6:9] != (None, None, None):
            problems.append(f"launch {k}: stream/function/metadata/hooks {args[3:9]}")
        values = c[3]
        if got != values:
            diff = [i for i, (g, e) in enumerate(zip(got, values)) if g != e]
            problems.append(f"launch {k}: {len(got)} vs {len(values)} values, differing at "
                            f"{diff}: {[(got[i], values[i]) for i in diff[:3]]}")
    return {"launches": len(seq_a), "direct": after["direct"] - before["direct"],
            "problems": problems}


def cases():
    clip = ConnectorSpec.preset("clip", "dci")
    sti = ConnectorSpec.preset("siglip", "sti")

    def hs_of(spec, images=1, tokens=577, channels=1024, dtype=torch.bfloat16, layout="contiguous"):
        return triton_aot._hidden_states(spec, images, tokens, channels, dtype, layout)

    def linear_case(spec, hs, N, path, dtype=torch.bfloat16):
        C = hs[spec.final_layer].shape[-1]
        w = torch.empty(N, spec.out_channels(C), dtype=dtype)
        b = torch.empty(N, dtype=dtype)
        return (lambda: dc_kernels.dense_connector_linear(hs, spec, w, b, "gelu",
                                                          backend="triton", path=path),
                [w, b])

    def prepared_case(spec, hs, N, path, first):
        # one prepared first-layer launch called twice per call: with ``first`` keywords
        # (an epilogue storing Z too), then plain -- both variants of each site
        B, T, C = hs[0].shape
        w = torch.empty(N, spec.out_channels(C), dtype=torch.bfloat16)
        b = torch.empty(N, dtype=torch.bfloat16)
        launch = []

        def call():
            if not launch:
                launch.append(linear.prepare_linear(hs, spec, B, T, C, w, b, "gelu", path=path))
            launch[0](hs, w, b, **first)
            launch[0](hs, w, b)
        return call, [w, b]

    out = []
    hs = hs_of(clip)
    out.append((90, "features clip dci (TMA)", hs,
                lambda: dc_kernels.dense_connector_features(hs, clip, backend="triton"), []))
    hs_s = hs_of(sti, tokens=729, channels=1152)
    out.append((90, "features siglip sti", hs_s,
                lambda: dc_kernels.dense_connector_features(hs_s, sti, backend="triton"), []))
    hs_c = hs_of(clip, tokens=37, channels=96, layout="channel_stride")
    out.append((90, "features channel stride 2 (LDG)", hs_c,
                lambda: dc_kernels.dense_connector_features(hs_c, clip, backend="triton"), []))
    for arch in (90, 80):
        call, extra = linear_case(clip, hs, 4096, "two-pass")
        out.append((arch, "linear two-pass bf16", hs, call, extra))
    hs_f = hs_of(clip, tokens=41, channels=64)
    call, extra = prepared_case(clip, hs_f, 48, "fused", dict(keep_pre=True))
    out.append((90, "linear fused, with and without STORE_PRE", hs_f, call, extra))
    call, extra = prepared_case(clip, hs, 4096, "two-pass",
                                dict(keep_features=True, keep_pre=True))
    out.append((90, "linear two-pass training (keep A and Z) and inference", hs, call, extra))
    hs4 = hs_of(clip, images=4)  # 2304 rows: three chunks (TMA features, leave-room GEMM)
    call, extra = linear_case(clip, hs4, 4096, "overlap")
    out.append((90, "linear overlap, TMA features chunks", hs4, call, extra))
    hs4c = hs_of(clip, images=4, layout="channel_stride")  # LDG features chunks
    call, extra = linear_case(clip, hs4c, 4096, "overlap")
    out.append((90, "linear overlap, LDG features chunks", hs4c, call, extra))
    # the pipelined path: the helper (side stream) and the ready-count GEMM, both variants
    call, extra = linear_case(clip, hs4, 4096, "pipelined")
    out.append((90, "linear pipelined, helper and ready GEMM", hs4, call, extra))
    call, extra = prepared_case(clip, hs4, 4096, "pipelined",
                                dict(keep_features=True, keep_pre=True))
    out.append((90, "linear pipelined training (keep A and Z) and inference", hs4, call, extra))
    # SCI: the two-pass GEMM reads A's slabs in place (a tuple of descriptors, one per layer),
    # stream K at one CLIP image, whole tiles (autotuned) at 16 SigLIP images
    sci, sci_s = ConnectorSpec.preset("clip", "sci"), ConnectorSpec.preset("siglip", "sci")
    hs_sci = hs_of(sci)
    call, extra = linear_case(sci, hs_sci, 4096, "two-pass")
    out.append((90, "linear two-pass SCI, A in place, stream K", hs_sci, call, extra))
    hs_sci16 = hs_of(sci_s, images=16, tokens=729, channels=1152)
    call, extra = linear_case(sci_s, hs_sci16, 4096, "two-pass")
    out.append((90, "linear two-pass SCI, A in place, whole tiles", hs_sci16, call, extra))
    hs32 = hs_of(clip, tokens=65, channels=128, dtype=torch.float32)
    call, extra = linear_case(clip, hs32, 256, "two-pass", dtype=torch.float32)
    out.append((90, "linear two-pass fp32 (cp.async GEMM)", hs32, call, extra))
    return out


def fallbacks():
    """Where the repeated call must go through the JIT again: a launch hook registered
    (profilers), another current device. {scenario: JIT entries of the repeated call}."""
    from triton import knobs
    clip = ConnectorSpec.preset("clip", "dci")
    hs = triton_aot._hidden_states(clip, 1, 33, 64, torch.bfloat16)
    out = {}
    for scenario in ("launch hook", "other device"):
        entries = []

        def stand_in(fn, args, kwargs, grid):
            entries.append(fn.__name__)
            return StandInKernel(len(entries), [])
        with triton_aot.record_launches(90, record=False, stand_in=stand_in):
            dc_kernels.dense_connector_features(hs, clip, backend="triton")
            n = len(entries)
            hook = lambda metadata: None  # noqa: E731
            if scenario == "launch hook":
                knobs.runtime.launch_enter_hook.add(hook)
            else:
                direct._current_device = lambda: 1
            try:
                dc_kernels.dense_connector_features(hs, clip, backend="triton")
            finally:
                knobs.runtime.launch_enter_hook.remove(hook)
        out[scenario] = len(entries) - n
    return out


def main(path):
    report = {}
    for arch, name, hs, call, extra in cases():
        inputs = {t.data_ptr() for t in list(hs) + extra}
        report[f"sm_{arch}: {name}"] = run_case(arch, call, inputs)
    report["fallbacks"] = fallbacks()
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
