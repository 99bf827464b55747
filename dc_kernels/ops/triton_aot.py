"""Ahead-of-time compilation of the Triton kernels for real GPUs, on any machine.

``triton.compile`` builds PTX and a cubin for a target architecture without a GPU; the ptxas that
Triton itself uses then reports registers and spills. The tests use this to check, on CPU-only CI,
what the interpreter cannot: every kernel x dtype x config compiles for sm_80 and sm_90, spills no
registers, fits shared memory, and uses wgmma on Hopper.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import common, features, linear

__all__ = ["CompileReport", "compile_linear", "compile_features", "compile_sti_features",
           "SHARED_LIMIT", "aot_cases", "build_case"]

_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: Opt-in shared memory per block (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
_WARP_SIZE = 32


@dataclass
class CompileReport:
    """What one ahead-of-time build tells."""

    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    wgmma: bool
    ptx: str


def _layer_sig(dtype, n):
    ptr = "*" + _TRITON_TYPE[dtype]
    return {"layers": (ptr,) * n, "stride_b": ("i32",) * n, "stride_t": ("i32",) * n,
            "stride_c": ("i32",) * n}


def _ptxas_report(ptx: str, arch: int) -> Tuple[int, int, int]:
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch) if "arch" in get_ptxas.__code__.co_varnames else get_ptxas()
    ptxas = getattr(ptxas, "path", ptxas)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu}:\n{res.stderr}")
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return (int(regs.group(1)) if regs else 0,
            int(spills.group(1)) if spills else 0, int(spills.group(2)) if spills else 0)


def _build(fn, signature, constexprs, arch, num_warps, num_stages) -> CompileReport:
    for k in constexprs:
        signature[k] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    target = GPUTarget("cuda", arch, _WARP_SIZE)
    compiled = triton.compile(src, target=target,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    regs, st, ld = _ptxas_report(ptx, arch)
    return CompileReport(arch, regs, st, ld, compiled.metadata.shared, "wgmma" in ptx, ptx)


def compile_linear(arch: int, dtype: torch.dtype, starts, sizes, config: triton.Config, *,
                   tok0=1, uniform=True, off64=False, has_bias=True, activation=1,
                   input_precision="ieee") -> CompileReport:
    """Build ``_linear_kernel`` for ``sm_{arch}``; ``sizes=()`` is the plain GEMM."""
    n = 1 + sum(sizes)
    sig = _layer_sig(dtype, n)
    t = "*" + _TRITON_TYPE[dtype]
    sig.update({"w": t, "stride_wn": "i32", "stride_wk": "i32", "bias": t, "out": t,
                "stride_om": "i32", "M": "i32", "N": "i32", "C": "i32", "T_KEEP": "i32",
                "M_BUCKET": "i32"})
    const = dict(TOK0=tok0, STARTS=tuple(starts), SIZES=tuple(sizes), UNIFORM=uniform,
                 OFF64=off64, EMULATE_RNE=False, HAS_BIAS=has_bias, ACTIVATION=activation, DOT_FP32=False,
                 INPUT_PRECISION=input_precision, **config.kwargs)
    return _build(linear._linear_kernel, sig, const, arch, config.num_warps,
                  config.num_stages)


def compile_features(arch: int, dtype: torch.dtype, starts, sizes, config: dict, *, tok0=1,
                     uniform=True, off64=False) -> CompileReport:
    """Build ``_features_kernel`` for ``sm_{arch}`` with a config of ``FEATURES_CONFIG``'s form."""
    n = 1 + sum(sizes)
    sig = _layer_sig(dtype, n)
    sig.update({"out": "*" + _TRITON_TYPE[dtype], "stride_om": "i32", "M": "i32", "C": "i32",
                "T_KEEP": "i32"})
    const = dict(TOK0=tok0, STARTS=tuple(starts), SIZES=tuple(sizes), UNIFORM=uniform,
                 OFF64=off64, EMULATE_RNE=False, BLOCK_M=config["BLOCK_M"], BLOCK_C=config["BLOCK_C"])
    return _build(features._features_kernel, sig, const, arch, config["num_warps"], 1)


def compile_sti_features(arch: int, dtype: torch.dtype, starts, sizes, config: dict, *,
                         pool=8, tok0=1, uniform=True, off64=False) -> CompileReport:
    """Build ``_sti_features_kernel`` for ``sm_{arch}``."""
    n = 1 + sum(sizes)
    sig = _layer_sig(dtype, n)
    sig.update({"out": "*" + _TRITON_TYPE[dtype], "stride_ob": "i32", "stride_ot": "i32",
                "B": "i32", "C": "i32", "T_KEEP": "i32", "TP": "i32"})
    const = dict(POOL=pool, TOK0=tok0, STARTS=tuple(starts), SIZES=tuple(sizes),
                 UNIFORM=uniform, OFF64=off64, EMULATE_RNE=False, BLOCK_M=config["BLOCK_M"],
                 BLOCK_C=config["BLOCK_C"])
    return _build(features._sti_features_kernel, sig, const, arch, config["num_warps"], 1)


def compile_scatter(arch: int, dtype: torch.dtype, slabs, num_groups: int, config: dict, *,
                    tok0=1, off64=False) -> CompileReport:
    """Build ``_scatter_grad_kernel`` for ``sm_{arch}``; ``slabs[i]``: the slabs output i reads."""
    from .scatter import _scatter_grad_kernel
    t = "*" + _TRITON_TYPE[dtype]
    sig = {"grad_a": t, "stride_ab": "i32", "stride_at": "i32", "grads": (t,) * len(slabs),
           "stride_gb": "i32", "stride_gt": "i32", "M": "i32", "T": "i32", "T_KEEP": "i32",
           "C": "i32"}
    const = dict(TOK0=tok0, SLABS=tuple(tuple(x) for x in slabs),
                 SLAB_SCALE=(1.0,) + (0.5,) * num_groups, OFF64=off64, EMULATE_RNE=False,
                 BLOCK_M=config["BLOCK_M"], BLOCK_C=config["BLOCK_C"])
    return _build(_scatter_grad_kernel, sig, const, arch, config["num_warps"], 1)


# --------------------------------------------------------------------------- the full matrix
ARCHS = (80, 90)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _siglip_layout():
    # SigLIP's DCI: two groups of 13 layers, the most layer tiles any preset keeps in flight
    from ..spec import ConnectorSpec
    spec = ConnectorSpec.preset("siglip", "dci")
    _, starts, sizes = common.layer_entries([None] * spec.num_hidden_states, spec)
    return starts, sizes


def _config_list(kind: str, dtype_name: str):
    return linear.CONFIG_LISTS[(kind, 32 if dtype_name == "fp32" else 16)]


def aot_cases():
    """Every (kernel, arch, dtype, config, layout) a launcher can pick, as JSON-able dicts.

    ``wgmma`` says whether the build must use wgmma on sm_90 (16-bit or tf32 tensor-core dots).
    """
    cases = []
    for arch in ARCHS:
        for dt in DTYPES:
            for i, _ in enumerate(_config_list("fused", dt)):
                # the fused kernel runs only with uniform strides and 32-bit offsets
                cases.append(dict(kernel="fused", arch=arch, dtype=dt, config=i, uniform=True,
                                  off64=False, precision="ieee", wgmma=dt != "fp32"))
            for i, _ in enumerate(_config_list("gemm", dt)):
                for off64 in (False, True):
                    cases.append(dict(kernel="gemm", arch=arch, dtype=dt, config=i, uniform=True,
                                      off64=off64, precision="ieee", wgmma=dt != "fp32"))
            if dt == "fp32":  # torch.backends.cuda.matmul.allow_tf32: tensor cores
                for kind in ("fused", "gemm"):
                    for i, _ in enumerate(_config_list(kind, dt)):
                        cases.append(dict(kernel=kind, arch=arch, dtype=dt, config=i,
                                          uniform=True, off64=False, precision="tf32",
                                          wgmma=True))
            for off64 in (False, True):
                cases.append(dict(kernel="scatter", arch=arch, dtype=dt, config=0, uniform=True,
                                  off64=off64, precision="ieee", wgmma=False))
            for kernel in ("features", "sti-features"):
                for uniform in (True, False):
                    for off64 in (False, True):
                        cases.append(dict(kernel=kernel, arch=arch, dtype=dt, config=0,
                                          uniform=uniform, off64=off64, precision="ieee",
                                          wgmma=False))
    for c in cases:
        c["id"] = "{kernel}-sm{arch}-{dtype}-cfg{config}-{precision}{u}{o}".format(
            u="" if c["uniform"] else "-strided", o="-off64" if c["off64"] else "", **c)
    return cases


def build_case(case: dict) -> dict:
    """Compile one case of :func:`aot_cases`; returns its report (without the PTX) or error."""
    starts, sizes = _siglip_layout()
    dtype = DTYPES[case["dtype"]]
    try:
        if case["kernel"] == "features":
            r = compile_features(case["arch"], dtype, starts, sizes, features.FEATURES_CONFIG,
                                 uniform=case["uniform"], off64=case["off64"])
        elif case["kernel"] == "scatter":
            # CLIP DCI: 24 layer gradients, layer 23 from both the base slab and group 2
            from ..spec import ConnectorSpec
            from .scatter import SCATTER_CONFIG, layer_slabs
            spec = ConnectorSpec.preset("clip", "dci")
            slabs = [s for s in layer_slabs(spec, spec.num_hidden_states) if s]
            r = compile_scatter(case["arch"], dtype, slabs, spec.num_groups, SCATTER_CONFIG,
                                off64=case["off64"])
        elif case["kernel"] == "sti-features":
            # pooled groups of 13 layers (a custom STI spec; the presets pool single layers)
            r = compile_sti_features(case["arch"], dtype, starts, sizes,
                                     features.STI_FEATURES_CONFIG, uniform=case["uniform"],
                                     off64=case["off64"])
        else:
            cfg = _config_list(case["kernel"], case["dtype"])[case["config"]]
            fused = case["kernel"] == "fused"
            r = compile_linear(case["arch"], dtype, starts if fused else (),
                               sizes if fused else (), cfg, tok0=1 if fused else 0,
                               uniform=case["uniform"], off64=case["off64"],
                               input_precision=case["precision"])
    except Exception as e:  # reported per case by the tests
        return dict(case, error=f"{type(e).__name__}: {e}")
    return dict(case, registers=r.registers, spill_stores=r.spill_stores,
                spill_loads=r.spill_loads, shared=r.shared, has_wgmma=r.wgmma,
                shared_limit=SHARED_LIMIT[case["arch"]])


def main() -> None:
    """``python -m dc_kernels.ops.triton_aot``: build every case, print JSON reports.

    Must run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels the compiler
    needs); builds run in parallel over the machine's cores.
    """
    import json
    import sys
    from concurrent.futures import ProcessPoolExecutor

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: ahead-of-time builds need the real compiler")
    cases = aot_cases()
    with ProcessPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        reports = list(pool.map(build_case, cases))
    json.dump(reports, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
