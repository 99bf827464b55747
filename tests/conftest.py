"""Shared helpers for the dc_kernels test suite (CPU now; Triton/GPU tests reuse them later).

Everything here is backend-agnostic:

* :func:`make_hidden_states` builds a Hugging Face-like tuple of ``[B, T, C]`` hidden states,
  deterministically from a seed, on any device.
* :func:`tolerances_vs_fp64` / :func:`assert_close_to_fp64` state how far a result that
  accumulates in fp32 and rounds ONCE to the output dtype may be from the exact (float64)
  features.
* :func:`assert_close_to_original` is the looser bound against the original Dense Connector's
  arithmetic (which rounds several times in the input dtype).
* :func:`accumulation_terms` and :func:`max_abs` supply the two numbers the bounds need.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch

from dc_kernels import ConnectorSpec

# Without a GPU the Triton kernels run on the CPU interpreter. Set before anything imports
# triton: ``triton.jit`` reads it when the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Unit roundoff u = 2^-p of each dtype (p = significand bits incl. the implicit one): rounding
# to nearest moves a value by at most u * |value| (half an ulp), outside the subnormal range.
UNIT_ROUNDOFF = {
    torch.bfloat16: 2.0 ** -8,
    torch.float16: 2.0 ** -11,
    torch.float32: 2.0 ** -24,
    torch.float64: 2.0 ** -53,
}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype the project promises: fp64 for fp64, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_hidden_states(n: int, B: int, T: int, C: int, dtype: torch.dtype = torch.float32,
                       seed: int = 0, *, device="cpu", scale: float = 1.0,
                       requires_grad: bool = False) -> Tuple[torch.Tensor, ...]:
    """A tuple of ``n`` independent ``[B, T, C]`` hidden states, like ``output_hidden_states``.

    Values are ``scale * N(0, 1)`` drawn in fp32 on the CPU from ``torch.Generator(seed)`` and
    then cast to ``dtype`` and moved to ``device``, so the same seed gives the same values (up
    to the cast) on every device and for every dtype. Each tensor is contiguous and a separate
    allocation (a leaf that requires grad if ``requires_grad``).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        h = (torch.randn(B, T, C, generator=g) * scale).to(dtype=dtype, device=device)
        out.append(h.requires_grad_(requires_grad) if requires_grad else h)
    return tuple(out)


def max_abs(tensors: Sequence[torch.Tensor]) -> float:
    """Largest |value| over a sequence of tensors (0.0 if all are empty)."""
    m = 0.0
    for t in tensors:
        if t.numel():
            m = max(m, t.detach().abs().max().double().item())
    return m


def accumulation_terms(spec) -> int:
    """Most input values summed into one output value for a ConnectorSpec-like object.

    ``len(group)`` for DCI/SCI, ``len(group) * pool_size`` for STI (each pooled token averages
    ``pool_size`` tokens of every layer of its group); at least 1 (the copied base features).
    """
    per_value = spec.pool_size if spec.connector_type == "sti" else 1
    return max([1] + [(stop - start) * per_value for start, stop in spec.groups])


def tolerances_vs_fp64(dtype: torch.dtype, *, terms: int = 32,
                       magnitude: float = 1.0) -> Tuple[float, float]:
    """``(rtol, atol)`` for "accumulate in fp32 (fp64 for fp64), round once to ``dtype``".

    Justification. An output value is y = (1/k) * sum of k inputs x_j with |x_j| <= M
    (``terms`` = k, ``magnitude`` = M); the inputs are exact in the output dtype, so the only
    errors are the implementation's own:

    * accumulation in the accumulator dtype (unit roundoff u_acc = 2^-24, or 2^-53 for fp64),
      summed in ANY order: |error of the sum| <= (k - 1) u_acc sum|x_j| <= k^2 u_acc M, i.e.
      <= k u_acc M on the mean, plus u_acc |y| for rounding the division. This is absolute (it
      scales with the data, not with |y|, which cancellation can make tiny), hence atol.
    * ONE rounding of the accumulated y' to the output dtype: <= u_out |y'| -- half an ulp:
      bf16 u = 2^-8, fp16 u = 2^-11, fp32 u = 2^-24, fp64 u = 2^-53. Hence rtol = u_out + u_acc
      (for fp32 that is 2 * 2^-24 ~ 1.2e-7; the k-scaled part lives in atol: k 2^-24 M).
    * values in the subnormal range round with an absolute error up to half the subnormal
      spacing, smallest_normal * u_out (2^-25 for fp16); added to atol.

    The 1.01 factor absorbs second-order terms (u_out * accumulation error). A result that
    rounds twice in a narrow dtype, or accumulates in it, exceeds rtol by ~2x on random data.
    """
    if dtype not in UNIT_ROUNDOFF:
        raise ValueError(f"no tolerance for {dtype}")
    u_out = UNIT_ROUNDOFF[dtype]
    u_acc = UNIT_ROUNDOFF[accumulator_dtype(dtype)]
    rtol = u_out + u_acc
    atol = 1.01 * max(terms, 1) * u_acc * magnitude + torch.finfo(dtype).smallest_normal * u_out
    return rtol, atol


def assert_close_to_fp64(actual: torch.Tensor, exact_fp64: torch.Tensor, dtype: torch.dtype,
                         *, terms: int = 32, magnitude: Optional[float] = None) -> None:
    """Assert ``actual`` (in ``dtype``) is within the single-rounding bound of the exact result.

    Args:
        actual: the computed features; must have dtype ``dtype`` and ``exact_fp64``'s shape.
        exact_fp64: the exact features in float64 (e.g. ``reference.features_fp64``).
        dtype: the dtype of the inputs and of ``actual``.
        terms: most inputs averaged into one output value (see :func:`accumulation_terms`);
            the default 32 covers every preset except STI.
        magnitude: the largest |input| (see :func:`max_abs`); defaults to
            ``max(1, max|exact_fp64|)``, which is right for data of magnitude ~1 -- pass it
            explicitly when the inputs may be larger than the outputs.

    See :func:`tolerances_vs_fp64` for the justification of the bounds.
    """
    assert actual.dtype == dtype, f"dtype {actual.dtype}, expected {dtype}"
    assert exact_fp64.dtype == torch.float64
    assert actual.shape == exact_fp64.shape, f"shape {tuple(actual.shape)} != " \
                                             f"{tuple(exact_fp64.shape)}"
    if magnitude is None:
        magnitude = max(1.0, max_abs([exact_fp64]))
    rtol, atol = tolerances_vs_fp64(dtype, terms=terms, magnitude=magnitude)
    torch.testing.assert_close(actual.detach().double().cpu(), exact_fp64.detach().cpu(),
                               rtol=rtol, atol=atol, equal_nan=False)


def assert_close_to_original(actual: torch.Tensor, original: torch.Tensor, dtype: torch.dtype,
                             *, terms: int = 32, magnitude: float = 1.0) -> None:
    """Looser check against the original's arithmetic (``reference.features_from_spec``).

    The original rounds to ``dtype`` up to three times per value (the stacked sum -- torch's
    CPU/GPU reductions accumulate in fp32 internally and round the sum once, an error of
    u |sum| <= u k M, i.e. u M on the mean --, the divide, and for STI the AvgPool1d), so it is
    within about 2 u M + u |y| (+ fp32 accumulation) of the exact value, and ``actual`` within
    u |y| (+ fp32 accumulation). Their difference is bounded by rtol = 2 u, atol = 3 u M + the
    two accumulation errors, 2 k u_acc M. (Valid while the original does not overflow: its
    fp16 stacked sum of k values near the fp16 maximum is inf, the fp32-accumulated mean not.)
    """
    assert actual.dtype == original.dtype == dtype
    assert actual.shape == original.shape
    u = UNIT_ROUNDOFF[dtype]
    u_acc = UNIT_ROUNDOFF[accumulator_dtype(dtype)]
    atol = 3 * u * magnitude + 2.02 * max(terms, 1) * u_acc * magnitude
    torch.testing.assert_close(actual.double(), original.double(), rtol=2 * u, atol=atol)


# --------------------------------------------------------------------------- shared cases
# Custom specs beyond the presets: name -> (spec, number of hidden states to feed it).
CUSTOM_SPECS = {
    # three groups (the README's custom example), fed exactly min_hidden_states
    "dci_3groups": (ConnectorSpec("dci", final_layer=23, groups=((0, 8), (8, 16), (16, 24)),
                                  drop_cls=True), 24),
    # layer 2 and 3 in two groups; (3, 4) is a DCI group of one layer; base inside a group
    "dci_overlap_single": (ConnectorSpec("dci", final_layer=3, groups=((0, 4), (2, 6), (3, 4))),
                           6),
    # base outside and after the groups, a tuple longer than needed (no num_hidden_states)
    "dci_longer_tuple": (ConnectorSpec("dci", final_layer=9, groups=((1, 4), (4, 5)),
                                       drop_cls=True), 14),
    "sci_4layers": (ConnectorSpec("sci", final_layer=0, groups=((5, 6), (1, 2), (5, 6), (3, 4))),
                    7),
    "sti_pool3_multilayer": (ConnectorSpec("sti", final_layer=6, groups=((0, 3), (2, 7)),
                                           drop_cls=True, pool_size=3), 8),
    "sti_pool1": (ConnectorSpec("sti", final_layer=2, groups=((0, 3),), pool_size=1), 3),
    "sti_3groups_fixed": (ConnectorSpec("sti", final_layer=4, groups=((0, 2), (1, 4), (4, 5)),
                                        pool_size=4, num_hidden_states=6), 6),
}


def strided_layer(kind, B, T, Cc, dtype, g):
    """A [B, T, C] view with an unusual layout, filled with fresh random values."""
    if kind == "every_other_channel":
        return torch.randn(B, T, 2 * Cc, generator=g).to(dtype)[:, :, ::2]
    if kind == "channel_window":
        return torch.randn(B, T, Cc + 9, generator=g).to(dtype)[..., 5:5 + Cc]
    if kind == "transposed_tc":
        return torch.randn(B, Cc, T, generator=g).to(dtype).transpose(1, 2)
    if kind == "transposed_bt":
        return torch.randn(T, B, Cc, generator=g).to(dtype).transpose(0, 1)
    if kind == "expanded_batch":
        return torch.randn(1, T, Cc, generator=g).to(dtype).expand(B, T, Cc)
    if kind == "token_stride":
        return torch.randn(B, 2 * T, Cc, generator=g).to(dtype)[:, 1::2]
    raise AssertionError(kind)


LAYOUTS = ("every_other_channel", "channel_window", "transposed_tc", "transposed_bt",
           "expanded_batch", "token_stride")


def nan_empty(shape, dtype, device):
    """Stands in for ``dc_kernels.ops.common.empty`` (every buffer the kernels' launchers
    allocate): NaN-filled, so an element a kernel does not write cannot pass a comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def poison_outputs(monkeypatch) -> None:
    """Makes every kernel output of the test start as NaN (:func:`nan_empty`)."""
    from dc_kernels.ops import common
    monkeypatch.setattr(common, "empty", nan_empty)


def fp32_gemm_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two fp32 GEMM results on CPU that should be the same bits, within ~4 ulps (rtol 5e-7,
    atol 1e-7): on CPU the fp32 product (torch's BLAS, or numpy's behind the interpreter's
    ``tl.dot``) may round a row or column by its place in the block, FMA or not (seen: OpenBLAS
    and torch on an AVX-512 AMD EPYC), so a chunk or a column shard need not reproduce the
    unchunked bits. 16-bit products are exact in fp32: there, and on a GPU, callers keep
    ``torch.equal``. Where the K-sum itself may run in another order (the interpreter's
    ``tl.dot`` on a chunk), no relative tolerance holds near zero: :func:`gemm_order_close`."""
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=5e-7, atol=1e-7))


# the steepest slope of exact GELU, x * Phi(x): 1.1289 at x = sqrt(2)
GELU_SLOPE = 1.13


def gemm_order_close(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                     slope: float = 1.0) -> bool:
    """Two results of the same GEMM ``a @ w.T`` (+ bias, then an activation of slope at most
    ``slope``: 1.13 bounds exact GELU's) whose fp32 K-sums may run in different orders: under
    the interpreter ``tl.dot`` is numpy's BLAS, which may sum a row in another order by its place
    in the tile (seen: OpenBLAS 0.3.31 on an AMD EPYC, a chunk's rows against the same rows of
    the unchunked GEMM). Each order is within ``K * u * sum_k |a_k w_k|`` of the exact sum
    (u = 2**-24), so two orders are within twice that, and after the activation within ``slope``
    times it; a 16-bit result may then round to the neighbouring value (one ulp of ``y``'s
    dtype, at most ``eps * |y|``). A bound, not a fitted tolerance: near-zero outputs of large
    terms get the room their terms need, exact ones none. On a GPU, callers keep
    ``torch.equal``."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    k = a.shape[-1]
    mag = a.reshape(-1, k).double().abs() @ w.double().abs().t()
    bound = 2 * k * UNIT_ROUNDOFF[torch.float32] * slope * mag.reshape(y.shape)
    if y.dtype != torch.float32:
        fi = torch.finfo(y.dtype)
        bound = bound + fi.eps * y.double().abs() + fi.smallest_normal
    return bool(((x.double() - y.double()).abs() <= bound).all())


def run_gemm_launch_twice(launch, a, w, b):
    """Two calls of a prepared TMA GEMM launch (``dc_kernels.ops.gemm_tma``) into NaN-poisoned
    outputs and pre-activations: asserts the same bits both times and every stream-K arrival
    count back to zero; returns ``(out, pre)`` of the first call."""
    from dc_kernels.ops import gemm_tma
    M, N = a.shape[0], w.shape[0]
    got = []
    for _ in range(2):
        out = torch.full((M, N), float("nan"), dtype=a.dtype, device=a.device)
        pre = torch.full((M, N), float("nan"), dtype=a.dtype, device=a.device)
        launch(a, w, b, out, pre)
        got.append((out, pre))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    for counts in gemm_tma._ARRIVALS.values():
        assert int(counts.abs().sum()) == 0, "a stream-K launch left arrival counts behind"
    return got[0]


# --------------------------------------------------------------------------- hypothesis profiles
# Chosen with $HYPOTHESIS_PROFILE, else "ci" when $CI is set, else "dev":
# * ci: derandomized (the same examples every run: CI is reproducible) and sized so that the
#   fuzz suite (test_fuzz.py) costs about half a minute on CI's 2 CPU cores with the interpreter;
# * dev: the same counts, fresh random examples every run;
# * thorough: 20x the examples, for a long local run (`HYPOTHESIS_PROFILE=thorough pytest
#   tests/test_fuzz.py`).
# Tests that pass their own ``@settings(max_examples=...)`` keep their count; test_fuzz.py scales
# its counts with FUZZ_SCALE.
def wrong_dc_kernels(monkeypatch) -> None:
    """Make the benchmarks' ``dc_kernels`` provider return one output element off by 1.0 (its
    kernels untouched): the runner's check must catch it and record the provider as failed."""
    from dataclasses import replace
    from benchmarks import runner
    real = runner.prepare

    def prepare(provider, op, inputs):
        prepared = real(provider, op, inputs)
        if provider != "dc_kernels":
            return prepared
        fn = prepared.fn

        def wrong():
            out = fn()
            out = out if isinstance(out, tuple) else (out,)
            bad = tuple(o.clone() for o in out)
            bad[0].view(-1)[0] += 1.0  # one element off
            return bad if len(bad) > 1 else bad[0]
        return replace(prepared, fn=wrong)
    monkeypatch.setattr(runner, "prepare", prepare)


from hypothesis import HealthCheck, settings as _hyp_settings  # noqa: E402

_HYP_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                         HealthCheck.data_too_large])
_hyp_settings.register_profile("ci", derandomize=True, print_blob=True, **_HYP_COMMON)
_hyp_settings.register_profile("dev", **_HYP_COMMON)
_hyp_settings.register_profile("thorough", **_HYP_COMMON)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or (
    "ci" if os.environ.get("CI", "").strip().lower() not in ("", "0", "false") else "dev")
_hyp_settings.load_profile(HYPOTHESIS_PROFILE)
#: multiplier of test_fuzz.py's example counts
FUZZ_SCALE = 20 if HYPOTHESIS_PROFILE == "thorough" else 1


def pytest_report_header(config):
    return f"hypothesis profile: {HYPOTHESIS_PROFILE} (fuzz scale {FUZZ_SCALE})"


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_launch_plans():
    # every test starts without launch plans (dc_kernels.plan): a test that spies on a
    # launcher's preparation sees it called, whatever ran before
    from dc_kernels import plan
    plan.clear()
    yield
