"""The correctness check every benchmarked (provider, op, case) passes before it is timed.

Two tests, both against a "yardstick" built once per (op, case) from the eager reference:

1. **Element-wise, rigorous**: ``|output - reference| <= bound`` for every element, where the
   bound is a worst-case bound on how far two correct implementations can drift apart,
   propagated through the arithmetic (u: unit roundoff of the dtype, 2^-8 for bf16; fp32
   accumulation, u32 = 2^-24):

   * features: each correct implementation is within ``2u|A| + k*u32*X`` of the exact features
     (the original rounds the stacked sum and then the divide, dc_kernels rounds once; k layers
     of magnitude <= X summed in any order); two of them within twice that.
   * a Linear ``z = x W^T + b`` of width K: an input difference ``dx`` propagates as
     ``dx @ |W|^T``; fp32 accumulation adds ``K*u32`` and up to two roundings to the dtype add
     ``2u`` per implementation, both relative to ``S = |x| @ |W|^T + |b| >= |z|``.
   * exact GELU: slope <= 1.13; the output rounding adds ``u|y|`` per implementation.
   * gradients of ``sum(gelu(z))``: ``g = gelu'(z)``, curvature <= 0.8, so ``|dg| <= 0.8 dz +
     2u|g|``; ``dW = g^T A`` and ``db = sum(g)`` propagate ``dg`` and ``dA`` over the M rows.

   It can never fail a correct implementation, and catches garbage, NaN, unwritten tiles, wrong
   layers or slabs by orders of magnitude, but it assumes every rounding error has the same
   sign, so for the GEMM ops it is ~30x looser than the typical error.

2. **Norm-wise, against the exact result**: the relative Frobenius error
   ``||output - exact|| / ||exact||`` must be at most ``3 * (the reference's own) + u/4 +
   4 * u32 * sqrt(n)``, n the accumulation length behind the output (layers per group for the
   features, K for the first layer, K + H for the connector, K + M for the gradients): the
   last term is a few times the typical error of an fp32 accumulation in another order
   (measured: torch.compile's fp32 bias gradient has 6x the eager one's error, still 40x
   under that term).
   "Exact" = float64 features (``reference.features_fp64``, a few images at a time), then the
   GEMMs and GELU in fp32 for 16-bit runs (fp64 for fp32 runs; tf32 off). Over millions of
   elements rounding errors average out, so this is tight: it catches what the element-wise
   bound lets through -- a missing bias, a features slab off by a few ulps, fp32 computed in
   tf32 -- while any implementation that rounds no more often than the original stays well
   inside it (measured on CPU: dc_kernels' error equals the reference's within a few %).

:func:`check` raises :class:`CorrectnessError` on a failure of either, on a non-finite value or
on a shape/dtype mismatch; the CLI turns that into a loud non-zero exit.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import reference

from .cases import Inputs

__all__ = ["UNIT_ROUNDOFF", "CorrectnessError", "Yardstick", "CheckResult", "yardstick", "check",
           "relative_error", "NORM_FACTOR"]

#: Unit roundoff (half an ulp, relative) of each benchmarked dtype.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
#: Every implementation accumulates in fp32 (the GEMMs, the layer sums, the reductions).
U_ACC = 2.0 ** -24
GELU_SLOPE = 1.13  # max |d/dx x*Phi(x)| = 1.1289...
GELU_CURVE = 0.8  # max |d2/dx2 x*Phi(x)| = 2*phi(0) = 0.7979...
# accumulation bounds (n - 1) u grow to n u (1 + n u); 1.01 covers that for n u < 0.01
_SLACK = 1.01
#: Norm-wise test: relative error <= NORM_FACTOR * reference's + u / 4 + ORDER_FACTOR * u32 *
#: sqrt(accumulation length).
NORM_FACTOR = 3.0
ORDER_FACTOR = 4.0


class CorrectnessError(AssertionError):
    """A provider's result is wrong: the benchmark must not report its time."""


@dataclass
class Yardstick:
    """Per output of one (op, case): the reference's values, the element-wise bound (fp32), the
    exact values and the reference's own relative error against them."""

    names: Tuple[str, ...]
    expected: Tuple[torch.Tensor, ...]
    bounds: Tuple[torch.Tensor, ...]
    exact: Tuple[torch.Tensor, ...]
    reference_rel_error: Tuple[float, ...]
    rel_limits: Tuple[float, ...]


@dataclass(frozen=True)
class CheckResult:
    """What :func:`check` measured (errors of the first output; ratios over all outputs).

    Attributes:
        max_abs_error: largest |output - reference|.
        worst_ratio: largest element-wise error / bound (<= 1 passes).
        max_abs_error_exact: largest |output - exact|.
        rel_error_exact: ||output - exact|| / ||exact||.
        rel_error_limit: the norm-wise limit that relative error had to meet.
    """

    max_abs_error: float
    worst_ratio: float
    max_abs_error_exact: float
    rel_error_exact: float
    rel_error_limit: float


def _u(dtype: torch.dtype) -> float:
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"no rounding model for {dtype}")
    return UNIT_ROUNDOFF[dtype]


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """``||actual - exact||_F / ||exact||_F`` computed in float64 (0 for empty tensors)."""
    if exact.numel() == 0:
        return 0.0
    diff = torch.linalg.vector_norm((actual.double() - exact.double()))
    return (diff / torch.linalg.vector_norm(exact.double()).clamp_min(1e-300)).item()


@contextlib.contextmanager
def _ieee_fp32():
    """fp32 matmuls in full fp32 (no tf32) while the exact results are computed."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _exact_features(inputs: Inputs, dtype: torch.dtype, chunk_rows: int = 1 << 14
                    ) -> torch.Tensor:
    """Float64 features (``reference.features_fp64``) a few images at a time, stored in
    ``dtype``."""
    hs = inputs.hidden_states
    rows_per_image = inputs.spec.out_tokens(hs[0].shape[1])
    step = max(1, chunk_rows // max(rows_per_image, 1))
    parts = [reference.features_fp64(tuple(h[b0:b0 + step] for h in hs), inputs.spec).to(dtype)
             for b0 in range(0, hs[0].shape[0], step)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _features_bound(a_ref: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    u = _u(a_ref.dtype)
    hs = inputs.hidden_states
    magnitude = max(hs[i].abs().max().item() for i in inputs.spec.used_layers)
    tiny = torch.finfo(a_ref.dtype).smallest_normal * u  # subnormal rounding
    per_impl_abs = _SLACK * inputs.case.max_group * U_ACC * magnitude + tiny
    return a_ref.float().abs().mul_(4 * u * (1 + 4 * u)).add_(2 * per_impl_abs)


def _linear_bound(x_abs: torch.Tensor, dx: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """Bound on the difference of two ``x W^T + b`` (output rounding included)."""
    u = _u(weight.dtype)
    c = 2 * _SLACK * weight.shape[1] * U_ACC + 4 * u
    w_abs = weight.detach().float().abs()
    return F.linear(dx + c * x_abs, w_abs, c * bias.detach().float().abs())


def _gelu_bound(dz: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
    u = _u(y_ref.dtype)
    return dz.mul(GELU_SLOPE * (1 + 2 * u)).add_(y_ref.float().abs(), alpha=2 * u)


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype)


def _bounds_and_exact(op: str, inputs: Inputs, a_ref: torch.Tensor, y_ref: Optional[torch.Tensor]):
    """Element-wise bounds and exact values of every output of ``op``."""
    u = _u(a_ref.dtype)
    x = torch.float64 if a_ref.dtype == torch.float32 else torch.float32  # "exact" GEMM dtype
    a_x = _exact_features(inputs, x)
    da = _features_bound(a_ref, inputs)
    if op == "features":
        return (da,), (a_x,)
    w1, b1 = inputs.w1, inputs.b1
    a_abs = a_ref.float().abs()
    dz = _linear_bound(a_abs, da, w1, b1)
    dy = _gelu_bound(dz, y_ref)
    z_x = F.linear(a_x, _as(w1, x), _as(b1, x))
    y_x = F.gelu(z_x)
    if op == "linear":
        return (dy,), (y_x,)
    if op == "connector":
        y1 = inputs.projector[1](inputs.projector[0](a_ref))
        dy2 = _linear_bound(y1.float().abs(), dy, inputs.w2, inputs.b2)
        return (dy2,), (F.linear(y_x, _as(inputs.w2, x), _as(inputs.b2, x)),)
    # linear-fwd-bwd: outputs (y, dW, db) with dW = g^T A, db = sum(g), g = gelu'(z)
    g_x = _gelu_grad(z_x).flatten(0, -2)
    exact = (y_x, g_x.t() @ a_x.flatten(0, -2), g_x.sum(0))
    g = g_x.float().abs()
    dg = dz.flatten(0, -2).mul_(GELU_CURVE).add_(g, alpha=2 * _SLACK * u)
    c = 2 * _SLACK * g.shape[0] * U_ACC + 4 * u
    a2 = a_abs.flatten(0, -2)
    d_dw = dg.t() @ a2 + g.t() @ (da.flatten(0, -2) + c * a2)
    d_db = dg.sum(0) + c * g.sum(0)
    return (dy, d_dw, d_db), exact


def yardstick(op: str, inputs: Inputs, ref_outputs: Sequence[torch.Tensor]) -> Yardstick:
    """The yardstick of ``op`` on ``inputs``, given the reference provider's outputs."""
    from .providers import reference_features
    names = {"features": ("features",), "linear": ("y",), "connector": ("y",),
             "linear-fwd-bwd": ("y", "dW", "db")}[op]
    with torch.no_grad(), _ieee_fp32():
        a_ref = reference_features(inputs)
        bounds, exact = _bounds_and_exact(op, inputs, a_ref,
                                          None if op == "features" else ref_outputs[0])
        ref_rel = tuple(relative_error(r, e) for r, e in zip(ref_outputs, exact))
    case = inputs.case
    k, n, m = case.features_width, case.shape.hidden, case.rows
    lengths = {"features": (case.max_group,), "linear": (k,), "connector": (k + n,),
               "linear-fwd-bwd": (k, k + m, k + m)}[op]
    u = _u(a_ref.dtype)
    limits = tuple(NORM_FACTOR * r + u / 4 + ORDER_FACTOR * U_ACC * math.sqrt(length)
                   for r, length in zip(ref_rel, lengths))
    return Yardstick(names, tuple(ref_outputs), bounds, exact, ref_rel, limits)


def check(outputs: Sequence[torch.Tensor], stick: Yardstick, label: str) -> CheckResult:
    """Run both tests on ``outputs``; raise :class:`CorrectnessError` when one fails."""
    if len(outputs) != len(stick.expected):
        raise CorrectnessError(f"{label}: {len(outputs)} outputs, expected {len(stick.expected)}")
    worst, first = 0.0, None
    for name, out, exp, bound, exact, ref_rel, limit in zip(
            stick.names, outputs, stick.expected, stick.bounds, stick.exact,
            stick.reference_rel_error, stick.rel_limits):
        if out.shape != exp.shape or out.dtype != exp.dtype:
            raise CorrectnessError(
                f"{label}: {name} is {out.dtype} {tuple(out.shape)}, expected {exp.dtype} "
                f"{tuple(exp.shape)}")
        with torch.no_grad():
            if not bool(torch.isfinite(out).all()):
                raise CorrectnessError(f"{label}: {name} has non-finite values")
            err = (out.float() - exp.float()).abs_()
            ratio_t = err / bound
            ratio = ratio_t.max().item() if err.numel() else 0.0
            max_err = err.max().item() if err.numel() else 0.0
            if not ratio <= 1.0:
                where = tuple(int(j) for j in torch.unravel_index(ratio_t.argmax(), err.shape))
                raise CorrectnessError(
                    f"{label}: {name} differs from the reference by up to {max_err:.3g}; at "
                    f"{where} the error {err[where].item():.3g} exceeds the worst-case bound "
                    f"{bound[where].item():.3g} (reference {exp[where].item():.4g}, got "
                    f"{out[where].item():.4g})")
            del err, ratio_t
            rel = relative_error(out, exact)
            if not rel <= limit:
                raise CorrectnessError(
                    f"{label}: {name} has relative error {rel:.3g} against the exact result; "
                    f"the reference's is {ref_rel:.3g}, the limit {limit:.3g} "
                    f"({NORM_FACTOR:g}x the reference's + u/4 + {ORDER_FACTOR:g} u32 sqrt(n))")
            if first is None:
                max_exact = (out.to(exact.dtype) - exact).abs().max().item() if out.numel() \
                    else 0.0
                first = (max_err, max_exact, rel, limit)
        worst = max(worst, ratio)
    return CheckResult(first[0], worst, first[1], first[2], first[3])
