"""Ahead-of-time builds of the kernels that actually run, on any machine (no GPU needed).

At run time Triton's binder specializes every launch: an integer argument equal to 1 becomes a
compile-time constant (so a unit channel stride is known and loads vectorize), integers divisible
by 16 and 16-byte-aligned pointers get divisibility hints (so wide loads and cp.async/TMA are
legal). A kernel built with plain ``i32`` arguments is another kernel. This module therefore
never writes a signature by hand:

1. **Record** (:func:`record_launches`): the public functions run as usual on CPU tensors of the
   real shapes (``torch.empty``: no memory is touched), but every Triton launch is recorded
   instead of run: the kernel, its arguments, its grid and, for autotuned kernels, every config
   the autotuner may pick.
2. **Bind** (:func:`bind`): Triton's own binder (``create_function_from_signature`` +
   ``JITFunction._pack_args``, the private API of triton 3.6 and 3.9, used only here) turns the
   recorded arguments into the signature, constants and attributes the runtime would compile.
3. **Build** (:func:`build`): ``triton.compile`` for ``sm_80`` / ``sm_90``; the report reads the
   cubin Triton produced (``cuobjdump -res-usage``: registers, shared, local memory) and its SASS
   (``nvdisasm``; spill instructions, and the instruction mix the static cost model in
   ``benchmarks/static.py`` reads).

Identical specializations are built once (:func:`unique_builds`). ``python -m
dc_kernels.ops.triton_aot`` builds every case (:func:`aot_cases`: the benchmark shapes and the
awkward layouts users can pass) and prints a summary (``--json`` for every report).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["SHARED_LIMIT", "ARCHS", "PORTABLE_ARCHS", "SMS", "LaunchRecord", "record_launches",
           "bind", "build", "read_cubin", "build_problem",
           "unique_builds", "aot_cases", "build_cases", "triton_version"]

#: Opt-in shared memory per block (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) and B200
#: (sm_100) 227 KiB; the 100 KiB cards (sm_86: A10, A40, RTX 30xx; sm_120: RTX 50xx) 99 KiB.
SHARED_LIMIT = {80: 166912, 86: 101376, 90: 232448, 100: 232448, 120: 101376}
#: The architectures every case is built for: the static model's (A100, H100).
ARCHS = (80, 90)
#: The other architectures whose cards run the kernels (``path.TMA_MAJOR``: the portable
#: ones, configs pruned to the card's shared memory): ``tests/test_aot_compile.py`` builds
#: every case for them too (``--arch 86,100,120``).
PORTABLE_ARCHS = (86, 100, 120)
_WARP_SIZE = 32


def triton_version() -> str:
    """The installed triton's version string (recorded beside every ahead-of-time build)."""
    import triton
    return triton.__version__


# --------------------------------------------------------------------------- recording
@dataclass
class LaunchRecord:
    """One kernel launch the launchers would have made."""

    fn: Any                         # the triton.JITFunction
    args: Tuple[Any, ...]           # positional arguments as passed
    kwargs: Dict[str, Any]          # constexprs and launch options as passed
    grid: Any                       # tuple, or callable of the meta-parameters (autotuned)
    configs: Optional[list] = None  # triton.Config list when launched through an autotuner

    @property
    def name(self) -> str:
        return self.fn.__name__

    def variants(self) -> List[Tuple[Optional[int], Tuple[Any, ...], Dict[str, Any],
                                     Tuple[int, ...]]]:
        """``(config index or None, args, full kwargs, grid)`` for every build this launch can
        run. A config's ``pre_hook`` (e.g. setting TMA descriptors' block shapes) is applied to
        copies of the arguments, as the autotuner applies it before a launch."""
        out = []
        names = [p.name for p in self.fn.params]
        for i, cfg in (enumerate(self.configs) if self.configs else [(None, None)]):
            kw = dict(self.kwargs)
            args = self.args
            if cfg is not None:
                kw.update(cfg.all_kwargs())
                if cfg.pre_hook is not None:
                    # (a tuple's members too: the TMA GEMM's in-place A slabs)
                    nargs = {n: tuple(map(copy.copy, v)) if isinstance(v, tuple) else
                             copy.copy(v) for n, v in zip(names, args)}
                    nargs.update(kw)
                    cfg.pre_hook(nargs)
                    args = tuple(nargs[n] for n in names[:len(args)])
            grid = self.grid(kw) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(tuple(grid)))
            out.append((i, args, kw, grid))
        return out


#: Streaming multiprocessors of the cards each architecture stands for (A100, A40, H100 SXM,
#: B200, RTX 5090).
SMS = {80: 108, 86: 84, 90: 132, 100: 148, 120: 170}


@contextlib.contextmanager
def record_launches(arch: int = 90, record: bool = True,
                    stand_in: Optional[Callable[..., Any]] = None, card: Optional[str] = None):
    """Within the block, Triton launches are recorded, not run; yields the record list.

    The launchers see the device they would see on an ``sm_{arch}`` card (its capability, SM
    count and shared-memory limit, so the same kernels, grids and autotune pruning are chosen;
    ``card``: the card-specific calibration the path rule reads, ``gemm_tma.card_of``, e.g.
    ``"h200"``; None: the architecture's) and their device check is relaxed, so that CPU
    tensors of the real shapes stand in for CUDA ones (their alignment is what the binder
    reads: CPU allocations are 64-byte aligned, CUDA ones 256-byte: both give the same 16-byte
    hints). An autotuned launch records the configs
    that survive the autotuner's pruning. ``record=False``: launches are dropped, nothing is
    kept (host-overhead measurements). Must run without ``TRITON_INTERPRET``.

    ``stand_in(fn, args, kwargs, grid)``: what a launch through the JIT returns instead of the
    ``CompiledKernel`` it would compile (an object with ``run``, ``function`` and
    ``packed_metadata``), so that :class:`~dc_kernels.ops.direct.DirectLaunch` sites capture it
    and launch through it afterwards; an autotuned launch then takes the first config that
    survives pruning (``best_config``), applies its pre-hook and passes its constants, as the
    autotuner does. ``direct``'s device and stream lookups answer device 0 and stream 0 inside
    the block.
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    from . import common, gemm_tma, linear

    if common.interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: ahead-of-time builds need the real compiler")
    records: List[LaunchRecord] = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        if record:
            records.append(LaunchRecord(self, args, kwargs, grid))
        if stand_in is not None:
            return stand_in(self, args, kwargs, grid)

    def autotuned_run(self, *args, **kwargs):
        if not record and stand_in is None:
            return
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = list(self.prune_configs(kwargs))
        finally:
            self.nargs = None
        if record:
            records.append(LaunchRecord(self.fn, args, kwargs, grid, configs))
        if stand_in is not None:
            config = self.best_config = configs[0]
            if config.pre_hook is not None:
                config.pre_hook({**dict(zip(self.arg_names, args)), **kwargs,
                                 **config.all_kwargs()})
            return stand_in(self.fn, args, {**kwargs, **config.all_kwargs()}, grid)

    def check_launchable(device, dtype):
        if dtype not in common.TRITON_DTYPES:
            raise ValueError(f"the Triton backend does not support {dtype}")

    from . import direct
    patches = [(JITFunction, "run", jit_run), (Autotuner, "run", autotuned_run),
               (direct, "_current_device", lambda: 0),
               (direct, "_current_stream", lambda device: 0),
               (common, "check_launchable", check_launchable),
               (common, "cuda_device_problem", lambda device: None),
               (gemm_tma, "_capability", lambda index: (arch // 10, arch % 10)),
               (gemm_tma, "_num_sms", lambda index: SMS[arch]),
               (gemm_tma, "_card", lambda index: card),
               (gemm_tma, "_cuda_device", lambda t: True),
               (linear, "_shared_limit", lambda index: SHARED_LIMIT[arch])]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    from .. import plan
    # launch plans hold what was chosen for a device's capability (the signature names the
    # device, not the card it pretends to be): none made outside the block is used inside it,
    # and none made for this sm_{arch} leaks out of it
    plan.clear()
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield records
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        plan.clear()


# --------------------------------------------------------------------------- binding
def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    return make_backend(GPUTarget("cuda", arch, _WARP_SIZE))


_BINDERS: Dict[Tuple[int, int], Callable] = {}


def bind(fn, args: Sequence[Any], kwargs: Dict[str, Any], arch: int):
    """What Triton's runtime derives from a launch: ``(options, signature, constexprs, attrs)``.

    The same calls ``JITFunction.run`` makes (triton 3.6 and 3.9), against a CUDA backend of
    ``sm_{arch}`` instead of the active device.
    """
    backend, kwargs, bound, specialization, options = _bound(fn, args, kwargs, arch)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def bound_values(fn, args: Sequence[Any], kwargs: Dict[str, Any], arch: int) -> List[Any]:
    """The argument values ``JITFunction.run`` hands the compiled kernel's launcher for this
    launch (``*bound_args.values()``: every parameter in order, defaults applied), from
    Triton's own binder."""
    return list(_bound(fn, args, kwargs, arch)[2].values())


def binder(fn, arch: int) -> Callable:
    """Triton's binder of ``fn`` against a CUDA backend of ``sm_{arch}`` (made once): what
    ``JITFunction.run`` calls per launch, ``binder(*args, **kwargs) -> (bound_args,
    specialization, options)``."""
    from triton.runtime.jit import create_function_from_signature
    key = (id(fn), arch)
    if key not in _BINDERS:
        _BINDERS[key] = create_function_from_signature(fn.signature, fn.params, _backend(arch))
    return _BINDERS[key]


def _bound(fn, args, kwargs, arch):
    backend = _backend(arch)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    # launch options JITFunction.run adds from Triton's knobs, when this version has them
    from triton import knobs
    fields = backend.parse_options({}).__dict__
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if name in fields and hasattr(knobs.compilation, name):
            kwargs.setdefault(name, getattr(knobs.compilation, name))
    bound, specialization, options = binder(fn, arch)(*args, **kwargs)
    return backend, kwargs, bound, specialization, options


def _tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} not found in the triton package ({path})")
    return path


_SPILL = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(STL|LDL)(\.\w+)*\s", re.M)


@dataclass
class BuildReport:
    """What one ahead-of-time build tells (no GPU involved)."""

    kernel: str
    arch: int
    registers: int
    shared: int          # bytes per block (Triton's dynamic shared memory + static)
    local: int           # bytes of local memory per thread (spill slots, stack)
    spill_stores: int    # STL instructions in the SASS
    spill_loads: int     # LDL instructions in the SASS
    num_warps: int
    num_stages: int
    signature_key: str
    sass: str = field(repr=False, default="")
    ptx: str = field(repr=False, default="")


def read_cubin(cubin: bytes) -> Tuple[str, str]:
    """``(resource usage, SASS)`` of a cubin: ``cuobjdump -res-usage`` and ``nvdisasm -c``, the
    tools shipped in the triton package (a build here, or a kernel the JIT compiled on a GPU).
    Raises RuntimeError when a tool is missing, CalledProcessError when one fails."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
    return res, sass


def build(fn, args, kwargs, arch: int, keep_text: bool = True) -> BuildReport:
    """Compile one launch for ``sm_{arch}`` exactly as the JIT would, and read the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options, signature, constexprs, attrs = bind(fn, args, kwargs, arch)
    src = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, _WARP_SIZE),
                              options=options.__dict__)
    res, sass = read_cubin(compiled.asm["cubin"])
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    static_shared = int(re.search(r"SHARED:(\d+)", res).group(1))
    spills = _SPILL.findall(sass)
    return BuildReport(
        kernel=fn.__name__, arch=arch, registers=regs,
        shared=max(int(compiled.metadata.shared), static_shared), local=local,
        spill_stores=sum(1 for s in spills if s[0] == "STL"),
        spill_loads=sum(1 for s in spills if s[0] == "LDL"),
        num_warps=options.num_warps, num_stages=options.num_stages,
        signature_key=_signature_key(fn, signature, constexprs, attrs, options),
        sass=sass if keep_text else "", ptx=compiled.asm["ptx"] if keep_text else "")


def _signature_key(fn, signature, constexprs, attrs, options) -> str:
    # (maxnreg too: a register-capped config and an uncapped one of the same tiles are two
    # builds, as they are two entries of Triton's own cache; until 2026-12-06 the overlap's
    # capped GEMM was merged into the uncapped one of the last chunk)
    text = repr((fn.__name__, sorted(signature.items(), key=str),
                 sorted(((k, repr(v)) for k, v in constexprs.items()), key=str),
                 sorted(((k, repr(v)) for k, v in attrs.items()), key=str),
                 options.num_warps, options.num_stages, options.arch
                 if hasattr(options, "arch") else None, getattr(options, "maxnreg", None)))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def binding_key(fn, args, kwargs, arch: int) -> str:
    """The key of the kernel the runtime would compile for this launch (dedupes builds)."""
    options, signature, constexprs, attrs = bind(fn, args, kwargs, arch)
    return _signature_key(fn, signature, constexprs, attrs, options)


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    """A public call whose launches are built: ``run()`` calls the public API."""

    name: str
    group: str                    # one of GROUPS
    run: Callable[[], Any]
    facts: Dict[str, Any] = field(default_factory=dict)


def _hidden_states(spec, images, tokens, channels, dtype, layout="contiguous"):
    """Stand-ins for the hidden-state tuple: ``torch.empty`` (no memory touched)."""
    n = spec.required_hidden_states
    B = images
    out = []
    for _ in range(n):
        if layout == "contiguous":
            h = torch.empty(B, tokens, channels, dtype=dtype)
        elif layout == "channel_stride":      # every other channel of a wider tensor
            h = torch.empty(B, tokens, 2 * channels, dtype=dtype)[..., ::2]
        elif layout == "misaligned":          # a view one element into its storage
            h = torch.empty(B * tokens * channels + 1, dtype=dtype)[1:].view(B, tokens,
                                                                            channels)
        elif layout == "token_major":         # [T, B, C] storage seen as [B, T, C]
            h = torch.empty(tokens, B, channels, dtype=dtype).transpose(0, 1)
        else:
            raise ValueError(layout)
        out.append(h)
    return tuple(out)


#: Benchmark shapes: (name, encoder, tokens, channels); N = 4096 (an LLM width of 7B/8B).
TOWERS = (("clip336", "clip", 577, 1024), ("siglip384", "siglip", 729, 1152))
BENCH_IMAGES = (1, 16, 64)
BENCH_N = 4096
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: The kinds of case :func:`aot_cases` returns (its docstring says what each holds).
GROUPS = ("benchmark", "layout", "training")


def _linear_call(hs, spec, N, dtype, path, weight=None, bias=True, train=False):
    """``train``: the weight and bias require grad, so the training launches run (they also
    store Z; a frozen ViT's call keeps A, so it runs two-pass: docs/DESIGN.md §6.1)."""
    import dc_kernels
    C = hs[spec.final_layer].shape[-1]
    w = weight if weight is not None else torch.empty(N, spec.out_channels(C), dtype=dtype)
    b = torch.empty(N, dtype=dtype) if bias else None
    if train:
        w.requires_grad_()
        b = b.requires_grad_() if b is not None else None
    with torch.enable_grad() if train else torch.no_grad():
        return dc_kernels.dense_connector_linear(hs, spec, w, b, "gelu", backend="triton",
                                                path=path)


def _features_call(hs, spec):
    import dc_kernels
    return dc_kernels.dense_connector_features(hs, spec, backend="triton")


def _scatter_call(spec, images, tokens, channels, dtype):
    from ..spec import ConnectorSpec  # noqa: F401
    from ..autograd import _scatter
    B = images
    grad_a = torch.empty(B, spec.out_tokens(tokens), spec.out_channels(channels), dtype=dtype)
    shapes = [torch.Size((B, tokens, channels))] * spec.required_hidden_states
    return _scatter(grad_a, spec, shapes, [True] * len(shapes))


def aot_cases(dtypes: Iterable[str] = tuple(DTYPES)) -> List[Case]:
    """Every public call whose kernels the AOT checks build.

    * ``benchmark``: the benchmark shapes (CLIP-L/336 and SigLIP-384 presets; DCI, SCI, STI; 1,
      16 and 64 images; N = 4096): features, linear on every path, and the backward's scatter.
    * ``layout``: what users can also pass: channel stride != 1, views misaligned by one
      element, token-major storage, sizes not divisible by 16, a transposed weight, fp32 with
      TF32 allowed.
    * ``training``: the launches of a training forward (the epilogue also stores Z): a frozen
      ViT (CLIP DCI, 16 images, every path asked for; A is kept, so fused runs two-pass), a
      trainable ViT (hidden states that require grad: fused runs fused) and odd sizes.
    """
    from ..spec import ConnectorSpec
    cases: List[Case] = []
    for dt in dtypes:
        dtype = DTYPES[dt]
        for tower, enc, T, C in TOWERS:
            for ct in ("dci", "sci", "sti"):
                spec = ConnectorSpec.preset(enc, ct)
                for images in BENCH_IMAGES:
                    facts = dict(tower=tower, connector=ct, images=images, dtype=dt,
                                 M=images * spec.out_tokens(T), K=spec.out_channels(C),
                                 N=BENCH_N, C=C, layers=len(spec.used_layers))
                    base = f"{tower}-{ct}-{images}img-{dt}"

                    def hs(spec=spec, images=images, T=T, C=C, dtype=dtype):
                        return _hidden_states(spec, images, T, C, dtype)
                    cases.append(Case(f"features/{base}", "benchmark",
                                      lambda hs=hs, spec=spec: _features_call(hs(), spec),
                                      dict(facts, op="features")))
                    paths = ("two-pass", "overlap") if ct == "sti" else (
                        "fused", "two-pass", "overlap", "pipelined")
                    for path in paths:
                        cases.append(Case(
                            f"linear-{path}/{base}", "benchmark",
                            lambda hs=hs, spec=spec, dtype=dtype, path=path:
                                _linear_call(hs(), spec, BENCH_N, dtype, path),
                            dict(facts, op="linear", path=path)))
                    if ct != "sti":
                        cases.append(Case(
                            f"scatter/{base}", "benchmark",
                            lambda spec=spec, images=images, T=T, C=C, dtype=dtype:
                                _scatter_call(spec, images, T, C, dtype),
                            dict(facts, op="scatter")))
        # awkward layouts: CLIP DCI (the widest group fan-in of CLIP), 2 images
        spec = ConnectorSpec.preset("clip", "dci")
        sti = ConnectorSpec.preset("clip", "sti")
        for layout in ("channel_stride", "misaligned", "token_major"):
            for sp in (spec, sti):
                def hs(sp=sp, layout=layout, dtype=dtype):
                    return _hidden_states(sp, 2, 577, 1024, dtype, layout)
                base = f"{sp.connector_type}-{layout}-{dt}"
                cases.append(Case(f"features/{base}", "layout",
                                  lambda hs=hs, sp=sp: _features_call(hs(), sp),
                                  dict(op="features", layout=layout, dtype=dt)))
                cases.append(Case(f"linear-auto/{base}", "layout",
                                  lambda hs=hs, sp=sp, dtype=dtype:
                                      _linear_call(hs(), sp, 1000, dtype, "auto"),
                                  dict(op="linear", layout=layout, dtype=dt)))
        # sizes not divisible by 16 (T' = 100, C = 200, N = 1000), fused and two-pass
        for path in ("fused", "two-pass"):
            cases.append(Case(
                f"linear-{path}/odd-sizes-{dt}", "layout",
                lambda dtype=dtype, path=path:
                    _linear_call(_hidden_states(spec, 3, 101, 200, dtype), spec, 1000, dtype,
                                 path),
                dict(op="linear", layout="odd-sizes", dtype=dt)))
        cases.append(Case(
            f"scatter/odd-sizes-{dt}", "layout",
            lambda dtype=dtype: _scatter_call(spec, 3, 101, 200, dtype),
            dict(op="scatter", layout="odd-sizes", dtype=dt)))
        # a weight that is a transposed view (unit stride on N, not on K)
        cases.append(Case(
            f"linear-two-pass/weight-transposed-{dt}", "layout",
            lambda dtype=dtype: _linear_call(
                _hidden_states(spec, 1, 577, 1024, dtype), spec, 4096, dtype, "two-pass",
                weight=torch.empty(3072, 4096, dtype=dtype).t()),
            dict(op="linear", layout="weight-transposed", dtype=dt)))
        # training launches (STORE_PRE): frozen and trainable ViT
        for path in ("fused", "two-pass", "overlap", "pipelined"):
            for vit in ("frozen", "trainable"):
                if vit == "trainable" and path != "fused":
                    continue  # the other paths run the frozen ViT's launches

                def train_call(dtype=dtype, path=path, vit=vit):
                    hs = _hidden_states(spec, 16, 577, 1024, dtype)
                    if vit == "trainable":
                        hs = tuple(h.requires_grad_() for h in hs)
                    return _linear_call(hs, spec, BENCH_N, dtype, path, train=True)
                cases.append(Case(f"linear-train-{path}/{vit}-vit-clip336-dci-16img-{dt}",
                                  "training", train_call,
                                  dict(op="linear-train", path=path, dtype=dt)))
        # the pipelined path's stream-K GEMM (1 image) storing Z too, beside its helper (SigLIP:
        # the widest helper step, 13-layer groups)
        for tower, enc, T, C in TOWERS:
            sp = ConnectorSpec.preset(enc, "dci")
            cases.append(Case(
                f"linear-train-pipelined/frozen-vit-{tower}-dci-1img-{dt}", "training",
                lambda dtype=dtype, sp=sp, T=T, C=C: _linear_call(
                    _hidden_states(sp, 1, T, C, dtype), sp, BENCH_N, dtype, "pipelined",
                    train=True),
                dict(op="linear-train", path="pipelined", dtype=dt)))
        cases.append(Case(
            f"linear-train-two-pass/odd-sizes-{dt}", "training",
            lambda dtype=dtype: _linear_call(_hidden_states(spec, 3, 101, 200, dtype), spec,
                                             1000, dtype, "two-pass", train=True),
            dict(op="linear-train", layout="odd-sizes", dtype=dt)))
    if "fp32" in dtypes:
        def tf32_call():
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                for path in ("fused", "two-pass"):
                    _linear_call(_hidden_states(spec, 1, 577, 1024, torch.float32), spec,
                                 4096, torch.float32, path)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        cases.append(Case("linear-both/tf32-fp32", "layout", tf32_call,
                          dict(op="linear", layout="tf32", dtype="fp32")))
    return cases


def record_case(case: Case, arch: int = 90, card: Optional[str] = None) -> List[LaunchRecord]:
    """The launches one case makes on an ``sm_{arch}`` card (``card``: as
    :func:`record_launches`)."""
    with record_launches(arch, card=card) as records:
        case.run()
    return records


@dataclass
class Build:
    """One unique kernel build and every (case, launch, config) that runs it."""

    key: str
    arch: int
    record: LaunchRecord
    config: Optional[int]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    uses: List[Dict[str, Any]] = field(default_factory=list)


def _slim(value: Any) -> Any:
    # What the binder reads of a stand-in tensor is its dtype and its address's alignment (a
    # TensorDescriptor adds its shape, strides and block shape, kept): a one-element tensor at
    # the same address mod 64 binds identically. The builds keep these instead of the
    # stand-ins (tens of GB of untouched but committed CPU memory over the whole set, which
    # made forking the build workers fail with ENOMEM).
    if isinstance(value, torch.Tensor):
        e = value.element_size()
        buf = torch.empty(256, dtype=torch.uint8)
        skip = (value.data_ptr() - buf.data_ptr()) % 64
        return buf[skip:skip + e].view(value.dtype)
    if isinstance(value, tuple):
        return tuple(_slim(v) for v in value)
    if type(value).__name__ == "TensorDescriptor":
        desc = copy.copy(value)
        desc.base = _slim(value.base)
        return desc
    return value


def _slim_record(rec: LaunchRecord) -> LaunchRecord:
    return LaunchRecord(rec.fn, tuple(_slim(a) for a in rec.args),
                        {k: _slim(v) for k, v in rec.kwargs.items()}, rec.grid, rec.configs)


def unique_builds(cases: Sequence[Case], archs: Sequence[int] = ARCHS,
                  cards: Sequence[Tuple[int, str]] = ()) -> List[Build]:
    """Record every case and group its launches by the kernel the runtime would compile.

    ``cards``: ``(arch, card)`` targets recorded besides the architectures (the benchmark
    cases only: what the static model estimates per card), where the launchers read the
    card's calibration (:func:`record_launches`); each use says its ``card`` (None: the
    architecture's), and a build two targets share is built once."""
    builds: Dict[Tuple[int, str], Build] = {}
    targets = [(arch, None) for arch in archs] + list(cards)
    for case in cases:
        for arch, card in targets:
            if card is not None and case.group != "benchmark":
                continue
            for li, rec in enumerate(_slim_record(r) for r in record_case(case, arch, card)):
                for ci, args, kw, grid in rec.variants():
                    key = binding_key(rec.fn, args, kw, arch)
                    b = builds.setdefault((arch, key), Build(key, arch, rec, ci, args, kw))
                    b.uses.append(dict(case=case.name, group=case.group, launch=li, card=card,
                                       kernel=rec.name, config=ci,
                                       config_desc=_config_desc(kw), grid=list(grid),
                                       facts=case.facts, args=_scalar_args(rec)))
    return list(builds.values())


def _config_desc(kw: Dict[str, Any]) -> str:
    tiles = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C")
                     if k in kw)
    # stream K: the most tiles a program touches x the most programs a tile is spread over
    sk = f" sk{kw['SEGMENTS']}x{kw['PARTS']}" if kw.get("SEGMENTS", 0) else ""
    # stages: a kernel's own ring depth (STAGES: the TMA features kernel, the pipelined
    # helper) where it has one, else Triton's num_stages
    stages = kw.get("STAGES", kw.get("num_stages", 3))
    return f"{tiles} w{kw.get('num_warps', 4)} s{stages}{sk}"


def _scalar_args(rec: LaunchRecord) -> Dict[str, Any]:
    # the integer arguments of a launch, by parameter name (for the cost model)
    names = [p.name for p in rec.fn.params]
    out = {}
    for name, v in zip(names, rec.args):
        if isinstance(v, int) and not isinstance(v, bool):
            out[name] = v
    return out


def _build_one(b: Build) -> Dict[str, Any]:
    try:
        r = build(b.record.fn, b.args, b.kwargs, b.arch)
    except Exception as e:  # reported per build by the tests
        return dict(key=b.key, arch=b.arch, kernel=b.record.name, config=b.config,
                    uses=b.uses, error=f"{type(e).__name__}: {e}")
    from . import ordering
    from . import sass as sass_mod
    constexprs = {k: v for k, v in b.kwargs.items() if k.isupper() and
                  isinstance(v, (int, bool, str, tuple))}
    try:
        facts = ordering.audit(r.ptx)
        problems = ordering.protocol_problems(r.kernel, constexprs, facts)
    except ValueError as e:  # PTX the audit cannot read: a failed check, reported per build
        facts, problems = {}, [f"{r.kernel}: memory ordering not read from the PTX: {e}"]
    return dict(key=b.key, arch=b.arch, kernel=r.kernel, config=b.config, uses=b.uses,
                registers=r.registers, shared=r.shared, shared_limit=SHARED_LIMIT[b.arch],
                local=r.local, spill_stores=r.spill_stores, spill_loads=r.spill_loads,
                num_warps=r.num_warps, num_stages=r.num_stages, maxnreg=b.kwargs.get("maxnreg"),
                constexprs=constexprs, has_wgmma="wgmma" in r.ptx,
                sass_stats=sass_mod.analyze(r.sass), ordering=facts,
                ordering_problems=problems)


def build_problem(report: Dict[str, Any]) -> Optional[str]:
    """What is wrong with one :func:`build_cases` report (None: nothing): the build failed,
    spilled, exceeds its architecture's shared memory, or its PTX breaks the memory ordering
    its cross-program protocol needs (:func:`dc_kernels.ops.ordering.protocol_problems`)."""
    if "error" in report:
        return report["error"]
    if report["spill_stores"] or report["spill_loads"]:
        return f"spills {report['spill_stores']} STL / {report['spill_loads']} LDL"
    if report["shared"] > report["shared_limit"]:
        return f"shared {report['shared']} > {report['shared_limit']}"
    if report.get("ordering_problems"):
        return "; ".join(report["ordering_problems"])
    return None


def build_cases(cases: Optional[Sequence[Case]] = None, archs: Sequence[int] = ARCHS,
                workers: Optional[int] = None, cards: Sequence[Tuple[int, str]] = ()
                ) -> List[Dict[str, Any]]:
    """Build every unique kernel of ``cases`` (default :func:`aot_cases`) in parallel
    (``cards``: more targets, :func:`unique_builds`).

    Returns one JSON-able report per build: resources, whether it uses wgmma, the SASS
    statistics (:func:`dc_kernels.ops.sass.analyze`) and every use (case, launch, config, grid,
    integer arguments).
    """
    from concurrent.futures import ProcessPoolExecutor
    builds = unique_builds(cases if cases is not None else aot_cases(), archs, cards)
    workers = workers or max(1, os.cpu_count() or 1)
    if workers == 1:
        return [_build_one(b) for b in builds]
    # forked workers inherit the builds (kernels and tensors do not pickle); they get indices
    import multiprocessing
    global _PENDING
    _PENDING = builds
    try:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            return list(pool.map(_build_index, range(len(builds)), chunksize=1))
    finally:
        _PENDING = []


_PENDING: List[Build] = []


def _build_index(i: int) -> Dict[str, Any]:
    return _build_one(_PENDING[i])


def summarize(reports: Sequence[Dict[str, Any]]) -> str:
    """A short human summary of :func:`build_cases` reports."""
    lines = [f"triton {triton_version()}: {len(reports)} unique builds"]
    bad = [r for r in reports if build_problem(r)]
    by_kernel: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for r in reports:
        by_kernel.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (kernel, arch), rs in sorted(by_kernel.items()):
        ok = [r for r in rs if "error" not in r]
        regs = [r["registers"] for r in ok]
        smem = [r["shared"] for r in ok]
        lines.append(f"  {kernel:28s} sm_{arch}: {len(rs):3d} builds, registers "
                     f"{min(regs, default=0)}-{max(regs, default=0)}, shared "
                     f"{min(smem, default=0)}-{max(smem, default=0)} B")
    if bad:
        lines.append(f"PROBLEMS in {len(bad)} builds:")
        for r in bad[:20]:
            what = build_problem(r)
            lines.append(f"  {r['kernel']} sm_{r['arch']} cfg {r['config']} "
                         f"({r['uses'][0]['case']}): {what}")
    else:
        protocols = sum(1 for r in reports if r["ordering"]["counts"]["acquire"]
                        or r["ordering"]["counts"]["release"])
        lines.append("no spills, every build within its architecture's shared memory; the "
                     f"{protocols} builds with cross-program protocols keep the memory "
                     "ordering they need")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dc_kernels.ops.triton_aot [--json PATH|-] [--arch 80,90] [--dtypes ...]
    [--group benchmark,layout,training]``."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m dc_kernels.ops.triton_aot",
                                description="Build every kernel as the JIT specializes it for "
                                            "the benchmark shapes and awkward layouts; report "
                                            "registers, shared memory and spills.")
    p.add_argument("--json", metavar="PATH", help="write every report as JSON ('-': stdout)")
    p.add_argument("--arch", default="80,90",
                   help=f"comma-separated SM versions (80,90; known: "
                        f"{','.join(map(str, sorted(SHARED_LIMIT)))})")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: bf16,fp16,fp32")
    p.add_argument("--group", default=None,
                   help="comma-separated: only the cases of these groups (benchmark, layout, "
                        "training; default: every case)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--check", action="store_true",
                   help="exit 1 if any build fails, spills, exceeds its shared memory or "
                        "breaks the memory ordering of its cross-program protocol")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: ahead-of-time builds need the real compiler",
              file=sys.stderr)
        return 2
    archs = tuple(int(x) for x in a.arch.split(","))
    dtypes = tuple(x.strip() for x in a.dtypes.split(","))
    groups = None if a.group is None else tuple(x.strip() for x in a.group.split(","))
    bad = ([x for x in archs if x not in SHARED_LIMIT] + [d for d in dtypes if d not in DTYPES]
           + [g for g in groups or () if g not in GROUPS])
    if bad:
        print(f"unknown arch/dtype/group: {bad}", file=sys.stderr)
        return 2
    cases = [c for c in aot_cases(dtypes) if groups is None or c.group in groups]
    reports = build_cases(cases, archs, a.workers)
    if a.json == "-":
        json.dump(reports, sys.stdout, indent=1, default=str)
    else:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(reports, f, indent=1, default=str)
        print(summarize(reports))
    if a.check:
        bad = [r for r in reports if build_problem(r)]
        if bad:
            print(f"--check: {len(bad)} of {len(reports)} builds fail, spill, exceed shared "
                  f"memory or break their memory ordering (triton {triton_version()})",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
