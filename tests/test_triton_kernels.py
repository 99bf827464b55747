"""Triton kernels (features, fused linear, two-pass) against the reference.

Runs the real kernels: compiled on a CUDA device when there is one, otherwise on the Triton CPU
interpreter (conftest sets TRITON_INTERPRET=1). Shapes are small and ragged (T', C and N are not
multiples of the blocks: the interpreter config uses 16/32 blocks), outputs are poisoned with NaN
before every launch so an element a kernel never writes fails the comparison.

Tolerances:
* features: the kernels accumulate in fp32 and round once: within the single-rounding bound of
  fp64; DCI/SCI sum in the same order as the torch path, so they must equal it bit for bit.
* linear: both paths compute ``round(act(A @ W^T + b))`` with A the features rounded to the
  input dtype. Against an fp64 GEMM on that same rounded A, the error is one rounding of the
  output (u |y|) plus fp32 accumulation over K terms (K u32 sum|a w|, bounded elementwise with
  |A| @ |W|^T); GELU is 1-Lipschitz-ish (|gelu'| <= 1.13) so the pre-activation error carries.
"""

import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import reference
from conftest import (CUSTOM_SPECS, GELU_SLOPE, LAYOUTS, UNIT_ROUNDOFF, accumulation_terms,
                      assert_close_to_fp64, gemm_order_close, make_hidden_states, max_abs,
                      run_gemm_launch_twice, poison_outputs, strided_layer)
from dc_kernels import ConnectorSpec, dense_connector_features, dense_connector_linear
from dc_kernels.ops import common, linear as linear_ops, path as path_ops
from dc_kernels.ops import overlap as overlap_ops, schedule as schedule_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PATHS = ("fused", "two-pass")
TOKENS = {"clip": 21, "siglip": 19}  # T' = 20 / 19: ragged against BLOCK_M 16 and 32


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    """Every kernel output starts as NaN: unwritten elements cannot pass."""
    poison_outputs(monkeypatch)


def _hs(spec, B, T, C, dtype, seed):
    return make_hidden_states(spec.required_hidden_states, B, T, C, dtype, seed, device=DEVICE)


def _features_exact(hs, spec):
    return reference.features_fp64(hs, spec)


def _check_features(hs, spec, dtype):
    out = dense_connector_features(hs, spec, backend="triton")
    B, T, C = hs[spec.final_layer].shape
    assert out.shape == (B, spec.out_tokens(T), spec.out_channels(C))
    assert out.dtype == dtype
    assert_close_to_fp64(out, _features_exact(hs, spec), dtype,
                         terms=accumulation_terms(spec), magnitude=max(1.0, max_abs(hs)))
    if spec.connector_type != "sti":
        # same fp32 summation order as the torch path (STI's window sums are ordered
        # differently by torch's reduction, so only the fp64 bound applies there)
        want = dense_connector_features(hs, spec, backend="torch")
        assert torch.equal(out, want), "Triton features differ from the torch path's bits"
    return out


def _linear_tolerance(a64, w64, b64, dtype):
    k = a64.shape[-1]
    u_out = UNIT_ROUNDOFF[dtype]
    u32 = UNIT_ROUNDOFF[torch.float32]
    scale = (a64.abs() @ w64.abs().T)
    if b64 is not None:
        scale = scale + b64.abs()
    # 1.13 = max |gelu'|; 2x margin over the first-order bound for the tf32-free fp32 dot
    worst = float(scale.max()) if scale.numel() else 0.0
    return 2 * u_out, 2 * 1.13 * (k + 2) * u32 * worst + 1e-30


def _check_linear(hs, spec, w, b, activation, path, dtype):
    out = dense_connector_linear(hs, spec, w, b, activation, backend="triton", path=path)
    B, T, C = hs[spec.final_layer].shape
    assert out.shape == (B, spec.out_tokens(T), w.shape[0])
    assert out.dtype == dtype
    # A as the kernels round it (checked against fp64 by the features tests)
    a64 = dense_connector_features(hs, spec, backend="triton").double()
    w64 = w.double()
    b64 = b.double() if b is not None else None
    y = torch.nn.functional.linear(a64, w64, b64)
    if activation == "gelu":
        y = torch.nn.functional.gelu(y)
    rtol, atol = _linear_tolerance(a64.reshape(-1, a64.shape[-1]), w64, b64, dtype)
    torch.testing.assert_close(out.double(), y, rtol=rtol, atol=atol)
    return out


def _weights(spec, C, N, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    K = spec.out_channels(C)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype=dtype, device=DEVICE)
    b = torch.randn(N, generator=g).to(dtype=dtype, device=DEVICE) if bias else None
    return w, b


# --------------------------------------------------------------------------- features kernel
@pytest.fixture(params=("tma", "ldg"))
def features_kernel(request, monkeypatch):
    """Both DCI/SCI features kernels: the persistent TMA one (sm_90, TMA-compatible layouts)
    and the LDG one (everything else)."""
    from dc_kernels.ops import features
    monkeypatch.setattr(features, "USE_TMA", request.param == "tma")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("connector", ("dci", "sci"))
@pytest.mark.parametrize("encoder", ("clip", "siglip"))
def test_features_presets(encoder, connector, dtype, features_kernel):
    spec = ConnectorSpec.preset(encoder, connector)
    hs = _hs(spec, 2, TOKENS[encoder], 40, dtype, seed=1)
    _check_features(hs, spec, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [n for n in sorted(CUSTOM_SPECS) if not n.startswith("sti")])
def test_features_custom_specs(name, dtype, features_kernel):
    spec, n = CUSTOM_SPECS[name]
    hs = make_hidden_states(n, 3, 11, 19, dtype, seed=2, device=DEVICE)
    _check_features(hs, spec, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_features_strided_views(layout, dtype):
    # every layer a view with unusual strides (the kernels read them in place: UNIFORM=False
    # when strides differ from the base's)
    spec = ConnectorSpec("dci", final_layer=5, groups=((0, 3), (3, 6)), drop_cls=True)
    g = torch.Generator().manual_seed(3)
    hs = [strided_layer(LAYOUTS[(i + LAYOUTS.index(layout)) % len(LAYOUTS)], 2, 13, 17, dtype,
                        g).to(DEVICE) for i in range(6)]
    _check_features(hs, spec, dtype)


def test_features_uniform_views_of_one_buffer():
    # HF-like but non-contiguous: every layer a slice of one [L, B, T, 2C] buffer (same strides)
    spec = ConnectorSpec.preset("clip", "dci")
    big = torch.randn(25, 2, 9, 2 * 24, device=DEVICE).to(torch.bfloat16)
    hs = tuple(big[i, :, :, 24:] for i in range(25))
    _check_features(hs, spec, torch.bfloat16)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_features_int64_offsets(monkeypatch, dtype):
    # the OFF64 code path (taken for tensors of 2^31+ elements) on small tensors
    monkeypatch.setattr(common, "FORCE_OFF64", True)
    spec = ConnectorSpec.preset("clip", "dci")
    _check_features(_hs(spec, 2, 18, 20, dtype, seed=4), spec, dtype)


@pytest.mark.parametrize("T", (1, 2))
def test_features_tiny_and_empty(T):
    spec = ConnectorSpec.preset("clip", "sci")  # T=1: only CLS, T' = 0 -> empty output
    _check_features(_hs(spec, 2, T, 8, torch.float16, seed=5), spec, torch.float16)
    _check_features(_hs(spec, 0, 5, 8, torch.float16, seed=5), spec, torch.float16)  # B = 0


# --------------------------------------------------------------------------- STI
STI_TOKENS = {"clip": 21, "siglip": 27}  # T' = 20 / 27: 2 / 3 pooled tokens, remainders 4 / 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("encoder", ("clip", "siglip"))
def test_sti_features_presets(encoder, dtype):
    spec = ConnectorSpec.preset(encoder, "sti")
    hs = _hs(spec, 3, STI_TOKENS[encoder], 20, dtype, seed=30)
    out = _check_features(hs, spec, dtype)
    orig = reference.dense_connector(reference.select_image_features(hs, encoder == "siglip"),
                                     hs, encoder == "siglip", "sti")
    assert out.shape == orig.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [n for n in sorted(CUSTOM_SPECS) if n.startswith("sti")])
def test_sti_features_custom_specs(name, dtype):
    spec, n = CUSTOM_SPECS[name]
    hs = make_hidden_states(n, 2, 23, 18, dtype, seed=31, device=DEVICE)
    _check_features(hs, spec, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sti_features_strided_views(layout):
    spec = ConnectorSpec("sti", final_layer=4, groups=((0, 2), (2, 5)), drop_cls=True,
                         pool_size=4)
    g = torch.Generator().manual_seed(32)
    hs = [strided_layer(LAYOUTS[(i + LAYOUTS.index(layout)) % len(LAYOUTS)], 2, 15, 17,
                        torch.bfloat16, g).to(DEVICE) for i in range(5)]
    _check_features(hs, spec, torch.bfloat16)


def test_sti_features_int64_offsets(monkeypatch):
    monkeypatch.setattr(common, "FORCE_OFF64", True)
    spec = ConnectorSpec.preset("siglip", "sti")
    _check_features(_hs(spec, 2, 19, 12, torch.float16, seed=33), spec, torch.float16)


@pytest.mark.parametrize("T,B", [(5, 2), (9, 2), (1, 2), (17, 0)])
def test_sti_features_few_tokens(T, B):
    # CLIP: T' = 4 < pool (no pooled token), exactly one window, only CLS, empty batch
    spec = ConnectorSpec.preset("clip", "sti")
    _check_features(_hs(spec, B, T, 8, torch.bfloat16, seed=34), spec, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("encoder", ("clip", "siglip"))
def test_sti_linear(encoder, dtype):
    spec = ConnectorSpec.preset(encoder, "sti")
    hs = _hs(spec, 2, STI_TOKENS[encoder], 16, dtype, seed=35)
    w, b = _weights(spec, 16, 29, dtype, seed=36)
    for path in PATHS:  # STI always runs two-pass
        _check_linear(hs, spec, w, b, "gelu", path, dtype)


# --------------------------------------------------------------------------- linear kernels
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("encoder,connector", [("clip", "dci"), ("siglip", "dci"),
                                               ("clip", "sci")])
def test_linear_presets(encoder, connector, dtype, path):
    spec = ConnectorSpec.preset(encoder, connector)
    hs = _hs(spec, 2, TOKENS[encoder], 24, dtype, seed=6)
    w, b = _weights(spec, 24, 37, dtype, seed=7)
    _check_linear(hs, spec, w, b, "gelu", path, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bias", (True, False))
@pytest.mark.parametrize("activation", (None, "gelu"))
def test_linear_epilogues(activation, bias, path):
    spec = ConnectorSpec("dci", final_layer=5, groups=((0, 3), (3, 6)), drop_cls=True)
    hs = _hs(spec, 1, 34, 20, torch.bfloat16, seed=8)
    w, b = _weights(spec, 20, 33, torch.bfloat16, seed=9, bias=bias)
    _check_linear(hs, spec, w, b, activation, path, torch.bfloat16)


@pytest.mark.parametrize("name", ["dci_3groups", "dci_overlap_single", "sci_4layers"])
def test_linear_custom_specs(name):
    spec, n = CUSTOM_SPECS[name]
    hs = make_hidden_states(n, 2, 9, 18, torch.float16, seed=10, device=DEVICE)
    w, b = _weights(spec, 18, 21, torch.float16, seed=11)
    fused = _check_linear(hs, spec, w, b, "gelu", "fused", torch.float16)
    two = _check_linear(hs, spec, w, b, "gelu", "two-pass", torch.float16)
    # same A (rounded once) in both: they differ only in fp32 accumulation order
    torch.testing.assert_close(fused, two, rtol=2 * UNIT_ROUNDOFF[torch.float16], atol=1e-3)


def test_linear_strided_views_take_two_pass_and_are_correct():
    spec = ConnectorSpec("dci", final_layer=5, groups=((0, 3), (3, 6)), drop_cls=True)
    g = torch.Generator().manual_seed(12)
    hs = [strided_layer(LAYOUTS[i % len(LAYOUTS)], 2, 10, 16, torch.bfloat16, g).to(DEVICE)
          for i in range(6)]
    w, b = _weights(spec, 16, 20, torch.bfloat16, seed=13)
    _check_linear(hs, spec, w, b, "gelu", "fused", torch.bfloat16)  # not fusable: two-pass
    assert path_ops.choose_linear_path(18, 16, 20, 6, 3, 2, uniform=False) == "two-pass"


def test_linear_int64_offsets(monkeypatch):
    monkeypatch.setattr(common, "FORCE_OFF64", True)
    spec = ConnectorSpec.preset("clip", "dci")
    hs = _hs(spec, 2, 12, 16, torch.bfloat16, seed=14)
    w, b = _weights(spec, 16, 20, torch.bfloat16, seed=15)
    _check_linear(hs, spec, w, b, "gelu", "auto", torch.bfloat16)


def test_linear_empty_rows_and_zero_width():
    spec = ConnectorSpec.preset("clip", "dci")
    w, b = _weights(spec, 8, 5, torch.float32, seed=16)
    out = dense_connector_linear(_hs(spec, 0, 9, 8, torch.float32, 17), spec, w, b, "gelu",
                                 backend="triton")
    assert out.shape == (0, 8, 5)
    out = dense_connector_linear(_hs(spec, 2, 1, 8, torch.float32, 17), spec, w, b, "gelu",
                                 backend="triton")  # only CLS: no rows
    assert out.shape == (2, 0, 5)
    w0, b0 = _weights(spec, 8, 0, torch.float32, seed=16)  # N = 0
    out = dense_connector_linear(_hs(spec, 2, 4, 8, torch.float32, 17), spec, w0, b0,
                                 backend="triton")
    assert out.shape == (2, 3, 0)


def test_linear_matches_original_projector_layer():
    # end to end: the original's features through nn.Linear + nn.GELU in fp32
    spec = ConnectorSpec.preset("siglip", "dci")
    hs = _hs(spec, 2, 19, 16, torch.float32, seed=18)
    proj = reference.build_projector(spec.out_channels(16), 24).to(DEVICE)
    feats = reference.dense_connector(reference.select_image_features(hs, True), hs, True, "dci")
    want = proj[1](proj[0](feats))
    for path in PATHS:
        got = dense_connector_linear(hs, spec, proj[0].weight.detach(), proj[0].bias.detach(),
                                     "gelu", backend="triton", path=path)
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- second pass, overlap
def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapper(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_pass_uses_tma_gemm_where_layout_allows(monkeypatch, dtype):
    # C = 24 (K = 72) and N = 40: rows of 16-byte multiples, the TMA kernel's layout; the
    # persistent grid (3 programs under the interpreter) walks more tiles than programs
    calls = _count_calls(monkeypatch, linear_ops, "prepare_gemm_tma")
    spec = ConnectorSpec.preset("clip", "dci")
    hs = _hs(spec, 3, 23, 24, dtype, seed=31)
    w, b = _weights(spec, 24, 40, dtype, seed=32)
    _check_linear(hs, spec, w, b, "gelu", "two-pass", dtype)
    assert calls, "the TMA GEMM was not used"
    # a weight whose rows are not 16-byte multiples takes the cp.async kernel, same contract
    w2, b2 = _weights(spec, 24, 21, dtype, seed=33)
    calls.clear()
    _check_linear(hs, spec, w2[:, :], b2, None, "two-pass", dtype)
    assert not calls


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("iters", (0, 3, 5))
@pytest.mark.parametrize("case", ("clip_sci_1img", "siglip_sci_2img", "sci_4layers"))
def test_two_pass_reads_single_layer_slabs_in_place(monkeypatch, dtype, iters, case):
    # every slab one layer (SCI) and each layer's kept rows one 2-D TMA view (one CLIP image:
    # its CLS row skipped by the view's offset; SigLIP images back to back; a custom spec of 5
    # slabs, one layer twice): the two-pass GEMM reads A's slabs from the layers, no features
    # pass. Whole tiles (iters 0) and stream K whose ranges start and end inside slabs (3, 5
    # K steps of 16 per program; a slab is 4 steps), programs in both orders: the same bits as
    # the two-pass path writing A first (16-bit products are exact in fp32, the K order is
    # A's), outputs poisoned; keep_features (A asked for) writes A as before
    from dc_kernels.ops import gemm_tma
    monkeypatch.setattr(gemm_tma, "STREAM_K_ITERS", iters)
    if case == "sci_4layers":
        spec, n_hs = CUSTOM_SPECS[case]
        B, T = 2, 19
    else:
        spec = ConnectorSpec.preset(case.split("_")[0], "sci")
        n_hs = spec.required_hidden_states
        B, T = (1, 37) if case.startswith("clip") else (2, 29)
    C, N = 64, 48
    hs = make_hidden_states(n_hs, B, T, C, dtype, seed=41 + iters, device=DEVICE)
    w, b = _weights(spec, C, N, dtype, seed=42)
    launch = linear_ops.prepare_linear(hs, spec, B, T, C, w, b, "gelu", "two-pass")
    if not gemm_tma.gemm_tma_eligible(hs[0][0], w, torch.empty(8, N, dtype=dtype,
                                                               device=DEVICE)):
        assert not launch.direct
        pytest.skip("the TMA GEMM needs sm_90 (or the interpreter)")
    assert launch.direct
    features_calls = _count_calls(monkeypatch, linear_ops, "prepare_features")
    got = [launch(hs, w, b, keep_pre=True) for _ in range(2)]
    assert not features_calls, "the features pass ran"
    assert got[0][1] is None and torch.equal(got[0][0], got[1][0])
    monkeypatch.setattr(linear_ops, "DIRECT_A", False)
    copy = linear_ops.prepare_linear(hs, spec, B, T, C, w, b, "gelu", "two-pass")
    assert not copy.direct
    out, _, pre = copy(hs, w, b, keep_pre=True)
    assert torch.equal(got[0][0], out) and torch.equal(got[0][2], pre)
    out_k, feats, _ = launch(hs, w, b, keep_features=True)
    assert torch.equal(out_k, out) and feats is not None
    assert torch.equal(feats, dense_connector_features(hs, spec, backend="triton"))
    monkeypatch.setattr(gemm_tma, "REVERSE_PROGRAMS", True)
    monkeypatch.setattr(linear_ops, "DIRECT_A", True)
    rev = linear_ops.prepare_linear(hs, spec, B, T, C, w, b, "gelu", "two-pass")
    assert torch.equal(rev(hs, w, b)[0], out)
    # and within the linear bound of fp64 through the public function
    _check_linear(hs, spec, w, b, "gelu", "two-pass", dtype)


def test_two_pass_writes_a_where_the_layers_cannot_be_read_in_place():
    # what direct_slabs refuses, each on its own: CLIP with 2 images (the dropped CLS rows break
    # the 2-D view), groups of several layers (DCI), fp32, a channel stride != 1, a channel
    # count that is not whole K steps, STI
    from dc_kernels.ops import gemm_tma
    sci = ConnectorSpec.preset("clip", "sci")
    n = sci.required_hidden_states

    def direct(spec, B, C, dtype=torch.bfloat16, layer=None):
        hs = list(make_hidden_states(n, B, 37, C, dtype, seed=3, device=DEVICE))
        if layer is not None:
            hs[7] = layer
        w = torch.empty(48, spec.out_channels(C), dtype=dtype, device=DEVICE)
        return gemm_tma.direct_slabs(hs, spec, B, 37, w) is not None

    if not direct(sci, 1, 64):
        pytest.skip("the TMA GEMM needs sm_90 (or the interpreter)")
    assert not direct(sci, 2, 64)
    assert not direct(ConnectorSpec.preset("clip", "dci"), 1, 64)
    assert not direct(sci, 1, 64, torch.float32)
    wide = torch.zeros(1, 37, 128, dtype=torch.bfloat16, device=DEVICE)
    assert not direct(sci, 1, 64, layer=wide[:, :, ::2])
    assert not direct(sci, 1, 72)
    assert not direct(ConnectorSpec.preset("clip", "sti"), 1, 64)
    assert not linear_ops.prepare_linear(
        make_hidden_states(n, 1, 37, 64, torch.bfloat16, seed=3, device=DEVICE), sci, 1, 37, 64,
        torch.empty(48, 192, dtype=torch.bfloat16, device=DEVICE), None, "gelu", "fused").direct


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", (16, 23, 1000))
def test_overlap_path_equals_two_pass(monkeypatch, dtype, chunk, features_kernel):
    # row chunks of any size (ragged last chunk; one chunk when chunk >= M) give the two-pass
    # result bit for bit: the same A, and every output row from the same GEMM arithmetic (no
    # GEMM here runs stream K: 2 x 2 tiles of 5 K steps)
    monkeypatch.setattr(overlap_ops, "OVERLAP_CHUNK_ROWS", chunk)
    assert schedule_ops.gemm_stream_k(4, 5, 3) == 0
    spec = ConnectorSpec.preset("siglip", "dci")
    hs = _hs(spec, 3, 19, 24, dtype, seed=34)
    w, b = _weights(spec, 24, 40, dtype, seed=35)
    over = _check_linear(hs, spec, w, b, "gelu", "overlap", dtype)
    two = dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path="two-pass")
    if common.interpreting():
        # a chunk's rows sit elsewhere in their tiles than in two-pass's, and the interpreter's
        # tl.dot (numpy's BLAS) may sum a row in another order there (conftest.gemm_order_close)
        feats = dense_connector_features(hs, spec, backend="triton")
        assert gemm_order_close(over, two, feats, w, slope=GELU_SLOPE)
    else:
        assert torch.equal(over, two)


def test_overlap_launch_is_prepared_once_per_chunk_size(monkeypatch):
    # the overlapped path's chunks, features launches and GEMMs are prepared on the first call
    # of a signature and reused; a new chunk size prepares them again
    calls = _count_calls(monkeypatch, overlap_ops, "prepare_overlap")
    monkeypatch.setattr(overlap_ops, "OVERLAP_CHUNK_ROWS", 16)
    spec = ConnectorSpec.preset("clip", "dci")
    dtype = torch.bfloat16
    hs = _hs(spec, 2, 27, 40, dtype, seed=40)  # 52 rows, a shape no other test uses
    w, b = _weights(spec, 40, 48, dtype, seed=41)
    first = _check_linear(hs, spec, w, b, "gelu", "overlap", dtype)
    again = dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path="overlap")
    assert len(calls) == 1 and torch.equal(first, again)
    monkeypatch.setattr(overlap_ops, "OVERLAP_CHUNK_ROWS", 24)
    other = dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path="overlap")
    assert len(calls) == 2 and torch.equal(first, other)


def test_overlap_last_chunk_gemm_may_run_stream_k(monkeypatch):
    # the chunks' GEMMs leave room for the next chunk's features and never run stream K; the
    # last one runs alone and follows the rule (under the interpreter: 1 tile, 18 K steps)
    from dc_kernels.ops import gemm_tma
    monkeypatch.setattr(overlap_ops, "OVERLAP_CHUNK_ROWS", 32)
    dtype = torch.bfloat16
    spec = ConnectorSpec.preset("clip", "dci")
    hs = _hs(spec, 2, 21, 96, dtype, seed=42)  # 40 rows, K = 288
    w, b = _weights(spec, 96, 24, dtype, seed=43)
    _check_linear(hs, spec, w, b, "gelu", "overlap", dtype)
    launch = linear_ops.prepare_linear(hs, spec, 2, 21, 96, w, b, "gelu", path="overlap")
    launch(hs, w, b)
    gemms = launch.overlap.gemms
    assert len(gemms) >= 2
    if common.interpreting():  # (on a GPU the split depends on its SM count)
        assert all(isinstance(g, gemm_tma.GemmTmaLaunch) for g in gemms)
        assert [g.programs for g in gemms[:-1]] == [0] * (len(gemms) - 1)
        assert gemms[-1].programs > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("images", (1, 2, 5))
def test_overlap_on_sti_runs_image_chunks(monkeypatch, dtype, images):
    # STI's overlap runs chunks of whole images (5 images: a ragged last chunk of 1 with 2
    # per chunk; 1 per chunk; one chunk of all): the STI kernel on batch slices of the layers
    # writes the two-pass A bit for bit, and every output row comes from the same GEMM
    # arithmetic (no GEMM here runs stream K), outputs poisoned (conftest); keep_features and
    # keep_pre hand back the same A and Z
    monkeypatch.setattr(overlap_ops, "OVERLAP_CHUNK_IMAGES", images)
    spec = ConnectorSpec.preset("clip", "sti")
    B, T, C, N = 5, 33, 16, 24  # 32 kept tokens, 4 pooled per group: 40 rows per image
    hs = _hs(spec, B, T, C, dtype, seed=36 + images)
    w, b = _weights(spec, C, N, dtype, seed=37)
    launch = linear_ops.prepare_linear(hs, spec, B, T, C, w, b, "gelu", "overlap")
    assert launch.path == "overlap"
    over, feats, pre = launch(hs, w, b, keep_features=True, keep_pre=True)
    k = min(images, B)
    assert launch.overlap.chunks == [(b0 * 40, min(B, b0 + k) * 40) for b0 in range(0, B, k)]
    two = linear_ops.prepare_linear(hs, spec, B, T, C, w, b, "gelu", "two-pass")
    out2, feats2, pre2 = two(hs, w, b, keep_features=True, keep_pre=True)
    assert torch.equal(feats, feats2)
    assert torch.equal(feats, dense_connector_features(hs, spec, backend="triton"))
    if common.interpreting():
        # a chunk's rows sit elsewhere in their tiles than in two-pass's, and the interpreter's
        # tl.dot (numpy's BLAS) may sum a row in another order there: any dtype, in fp32, then
        # one 16-bit rounding (conftest.gemm_order_close)
        assert gemm_order_close(pre, pre2, feats, w)
        assert gemm_order_close(over, out2, feats, w, slope=GELU_SLOPE)
    else:
        assert torch.equal(over, out2) and torch.equal(pre, pre2)
    _check_linear(hs, spec, w, b, "gelu", "overlap", dtype)


def test_overlap_on_sti_needs_aligned_image_chunks():
    # one image, or layers whose batch stride is not a 16-byte multiple (a chunk's slices
    # would be aligned unlike the first call's): two-pass when asked for, never chosen; an
    # STI chunk launch of such layers is refused before any launch
    from dc_kernels.ops import features as features_ops
    spec = ConnectorSpec.preset("clip", "sti")
    dtype = torch.bfloat16
    one = _hs(spec, 1, 33, 16, dtype, seed=38)
    w, b = _weights(spec, 16, 24, dtype, seed=39)
    assert linear_ops.prepare_linear(one, spec, 1, 33, 16, w, b, "gelu", "overlap").path \
        == "two-pass"
    # T = 33, C = 20 bf16: a batch stride of 1320 bytes
    odd = _hs(spec, 3, 33, 20, dtype, seed=40)
    w2, b2 = _weights(spec, 20, 24, dtype, seed=41)
    assert not overlap_ops.sti_overlap_serves(odd, spec, 3, 33)
    assert linear_ops.prepare_linear(odd, spec, 3, 33, 20, w2, b2, "gelu", "overlap").path \
        == "two-pass"
    _check_linear(odd, spec, w2, b2, "gelu", "overlap", dtype)
    with pytest.raises(ValueError, match="16-byte"):
        features_ops.prepare_sti_chunk(odd, spec, 3, 33, 20, images=(1, 3))
    with pytest.raises(ValueError, match="outside the batch"):
        features_ops.prepare_sti_chunk(one, spec, 1, 33, 16, images=(0, 2))
    with pytest.raises(ValueError, match="image chunks"):
        overlap_ops.prepare_overlap(one, spec, 1, 33, 16, w, "gelu")


# --------------------------------------------------------------------------- pipelined path
def _ready_counts_zero():
    from dc_kernels.ops import gemm_tma
    return all(int(buf.abs().sum()) == 0 for buf in gemm_tma._ARRIVALS.values())


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("helper", ("all", "none", "some"))
@pytest.mark.parametrize("encoder,B,T,C,N", (("siglip", 3, 19, 24, 40), ("clip", 2, 38, 32, 72)))
def test_pipelined_path_equals_two_pass(monkeypatch, dtype, helper, encoder, B, T, C, N):
    # the helper writes every row tile ("all"), none ("none": the GEMM's programs produce them
    # all themselves, the deadlock-free fallback), or three per program ("some": both
    # producers); row tiles of 4 rows straddle the GEMM's 32-row blocks (T' = 18 or 37 per
    # image). Same A and same output bits as two-pass (whose GEMM runs whole tiles here),
    # into NaN-poisoned outputs, and every count back to zero afterwards
    from dc_kernels.ops import pipelined
    from dc_kernels import plan
    monkeypatch.setattr(pipelined, "HELPER", helper != "none")
    monkeypatch.setattr(pipelined, "HELPER_ROW_TILES", 3 if helper == "some" else 0)
    plan.clear()
    calls = _count_calls(monkeypatch, linear_ops, "prepare_pipelined")
    spec = ConnectorSpec.preset(encoder, "dci")
    hs = _hs(spec, B, T, C, dtype, seed=50 + B)
    w, b = _weights(spec, C, N, dtype, seed=51)
    M, K = B * spec.out_tokens(T), spec.out_channels(C)
    assert schedule_ops.gemm_stream_k(math.ceil(M / 32) * math.ceil(N / 32), math.ceil(K / 16),
                                  3) == 0
    got = _check_linear(hs, spec, w, b, "gelu", "pipelined", dtype)
    assert calls, "the pipelined path did not run"
    two = dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path="two-pass")
    assert torch.equal(got, two)
    assert _ready_counts_zero()
    # training: A kept and Z stored, both equal to two-pass's
    out, feats, pre = linear_ops.linear_triton_for_training(
        hs, spec, B, T, C, w, b, "gelu", path="pipelined", keep_features=True, keep_pre=True)
    out2, feats2, pre2 = linear_ops.linear_triton_for_training(
        hs, spec, B, T, C, w, b, "gelu", path="two-pass", keep_features=True, keep_pre=True)
    assert torch.equal(out, out2) and torch.equal(feats, feats2) and torch.equal(pre, pre2)
    assert _ready_counts_zero()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("helper", ("all", "none", "some"))
@pytest.mark.parametrize("encoder,B,T,C,N,iters", (("siglip", 3, 19, 48, 40, 2),
                                                   ("clip", 2, 38, 32, 72, 1),
                                                   ("clip", 1, 45, 64, 40, 3)))
def test_pipelined_stream_k(monkeypatch, dtype, helper, encoder, B, T, C, N, iters):
    # the stream-K GEMM of the pipelined path (at most ``iters`` K steps of every slab per
    # program, on ceil(positions / iters) programs sharing them evenly; slabs of 2-4 K steps,
    # 16 deep under the interpreter): programs crossing tiles, tiles
    # spread over up to 3 programs, the helper producing every (slab, row tile) unit, none or
    # three per program. A equals two-pass's bit for bit; the output and the training Z are
    # within the GEMM bound of fp64 (their sums run in another order than two-pass's), the
    # same bits on a second call into NaN-poisoned outputs; every count back to zero
    from dc_kernels.ops import features, pipelined
    from dc_kernels import plan
    monkeypatch.setattr(pipelined, "HELPER", helper != "none")
    monkeypatch.setattr(pipelined, "HELPER_ROW_TILES", 3 if helper == "some" else 0)
    monkeypatch.setattr(pipelined, "STREAM_K_ITERS", iters)
    plan.clear()
    spec = ConnectorSpec.preset(encoder, "dci")
    hs = _hs(spec, B, T, C, dtype, seed=60 + B + C)
    w, b = _weights(spec, C, N, dtype, seed=61)
    launch = linear_ops.prepare_linear(hs, spec, B, T, C, w, b, "gelu", path="pipelined")
    tiles = math.ceil(B * spec.tokens_kept(T) / 32) * math.ceil(N / 32)
    assert launch.path == "pipelined"
    assert launch.pipelined.programs == math.ceil(tiles * C // 16 / iters)
    assert launch.pipelined.iters <= iters
    # the split launch's helper: split_helpers' count, its wider steps (masked where C < 64)
    rows = pipelined.HELPER_CONFIG_SPLIT_INTERPRET["ROWS"]
    if helper != "none":
        assert launch.pipelined.helpers == schedule_ops.split_helpers(
            B * math.ceil(spec.tokens_kept(T) / rows), features.INTERPRET_PROGRAMS)
    assert launch.pipelined.helper_meta["BLOCK_C"] == 64
    got = _check_linear(hs, spec, w, b, "gelu", "pipelined", dtype)
    assert _ready_counts_zero()
    again = dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path="pipelined")
    assert torch.equal(got, again) and _ready_counts_zero()
    out, feats, pre = linear_ops.linear_triton_for_training(
        hs, spec, B, T, C, w, b, "gelu", path="pipelined", keep_features=True, keep_pre=True)
    _, feats2, _ = linear_ops.linear_triton_for_training(
        hs, spec, B, T, C, w, b, "gelu", path="two-pass", keep_features=True, keep_pre=True)
    assert torch.equal(feats, feats2) and torch.equal(out, got)
    a64, w64, b64 = feats2.reshape(-1, feats2.shape[-1]).double(), w.double(), b.double()
    rtol, atol = _linear_tolerance(a64, w64, b64, dtype)
    torch.testing.assert_close(pre.reshape(-1, N).double(),
                               torch.nn.functional.linear(a64, w64, b64), rtol=rtol, atol=atol)
    assert _ready_counts_zero()
    # the programs' work taken last to first: every shared tile reduced by another piece
    # (under the interpreter its first, in place), the program of the last tiles waiting on
    # units nobody has claimed yet (it produces them): the same bits
    monkeypatch.setattr(pipelined, "REVERSE_PROGRAMS", True)
    plan.clear()
    rev = dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path="pipelined")
    assert torch.equal(rev, got) and _ready_counts_zero()


@pytest.mark.parametrize("programs,helpers", ((5, 2), (18, 7), (40, 1)))
def test_pipelined_sweep_switches(monkeypatch, programs, helpers):
    # the sweep's switches (benchmarks.sweep): stream K over the slabs on exactly that many
    # programs (at most one per position: 9 tiles x 2 K steps per slab here), beside that
    # many helper programs; each value a plan of its own (a switch of the plan key, no
    # plan.clear between them); A as two-pass's, the output within the GEMM bound of fp64
    # into NaN-poisoned outputs, every count back to zero
    from dc_kernels.ops import pipelined
    from dc_kernels import plan
    spec = ConnectorSpec.preset("clip", "dci")
    B, T, C, N = 2, 38, 32, 72
    hs = _hs(spec, B, T, C, torch.bfloat16, seed=70 + programs)
    w, b = _weights(spec, C, N, torch.bfloat16, seed=71)
    plan.clear()
    default = linear_ops.prepare_linear(hs, spec, B, T, C, w, b, "gelu", path="pipelined")
    dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path="pipelined")
    monkeypatch.setattr(pipelined, "STREAM_K_PROGRAMS", programs)
    monkeypatch.setattr(pipelined, "HELPER_PROGRAMS", helpers)
    launch = linear_ops.prepare_linear(hs, spec, B, T, C, w, b, "gelu", path="pipelined")
    assert launch.pipelined.programs == min(programs, 18)
    assert launch.pipelined.gemm_site.grid == (min(programs, 18),)
    assert launch.pipelined.helpers == helpers
    assert (default.pipelined.programs, default.pipelined.helpers) != (programs, helpers)
    misses = plan.stats()["misses"]
    dense_connector_linear(hs, spec, w, b, "gelu", backend="triton", path="pipelined")
    assert plan.stats()["misses"] == misses + 1  # not the default's plan
    _check_linear(hs, spec, w, b, "gelu", "pipelined", torch.bfloat16)
    assert _ready_counts_zero()
    two = linear_ops.linear_triton_for_training(hs, spec, B, T, C, w, b, "gelu",
                                                path="two-pass", keep_features=True)[1]
    feats = linear_ops.linear_triton_for_training(hs, spec, B, T, C, w, b, "gelu",
                                                  path="pipelined", keep_features=True)[1]
    assert torch.equal(feats, two) and _ready_counts_zero()
    for name in ("STREAM_K_PROGRAMS", "HELPER_PROGRAMS"):
        for bad in (-1, 2.0):
            with monkeypatch.context() as m:
                m.setattr(pipelined, name, bad)
                with pytest.raises(ValueError, match=f"pipelined.{name} must be an int"):
                    linear_ops.prepare_linear(hs, spec, B, T, C, w, b, "gelu",
                                              path="pipelined")


def test_pipelined_stream_k_rule():
    rule = schedule_ops.pipelined_stream_k
    # CLIP-L/336 -> 4096 (80 tiles of 128 x 256 per image, 3 slabs of 16 K steps), 132 SMs:
    # 1 image: 128 programs of 10 steps of every slab (30 + partials against 48 whole); 2
    # images (144 tiles: two whole tiles on 12 SMs): 128 of 18; 16 images (1152 tiles):
    # whole tiles
    assert rule(80, 16, 3, 132) == 128
    assert rule(144, 16, 3, 132) == 128
    assert rule(1152, 16, 3, 132) == 0 and rule(128, 16, 3, 132) == 0
    assert rule(0, 16, 3, 132) == rule(80, 0, 3, 132) == rule(1, 1, 1, 132) == 0
    # one wave of tiles: taken when no slower than whole tiles (which cannot overlap the
    # features there): one SigLIP image, 96 tiles of 18 K steps per slab, 124 programs of
    # at most 14: 49.1 step-equivalents against 54
    assert rule(96, 18, 3, 132) == 124
    assert schedule_ops._pipelined_split_steps(96, 18, 3, 124) == pytest.approx(49.1)
    assert rule(96, 18, 1, 132) == 0  # one slab: 14 + partials against 18, no margin
    # ... and the launcher takes it only where the replayed schedule beats whole tiles (the
    # committed sm_90 calibration), on the programs whose replay is fastest: 1 and 2 CLIP
    # DCI images (72 helper programs, one per 8-row unit of a slab), SigLIP's 1 (92): 128
    # programs of 13-14 positions, every tile over 2 programs (124 of 14 put some over 3),
    # not 16 images, nor SCI's one image (a unit of a one-layer slab keeps too few bytes in
    # flight)
    programs = path_ops.pipelined_stream_k_programs
    assert programs(576, 1024, 4096, 25, 3, 2) == 128
    assert programs(1152, 1024, 4096, 25, 3, 2) >= 128
    assert programs(729, 1152, 4096, 27, 3, 2) == 128
    assert programs(9216, 1024, 4096, 25, 3, 2) == 0
    assert programs(576, 1024, 4096, 3, 3, 2) == 0
    assert schedule_ops.stream_k_shape(96, 18, 128) == (14, 2, 2)
    assert schedule_ops.stream_k_shape(96, 18, 124) == (14, 2, 3)
    whole, replays = path_ops.pipelined_stream_k_replays(576, 1024, 4096, 25, 3, 2)
    split = min(replays.values())
    t = path_ops.estimate_linear_times(576, 1024, 4096, 25, 3, 2)
    assert split < whole and t["pipelined"] == split < t["two-pass"]
    # the replays the rule chose from: the fewest programs of ceil(positions / SMs) (128
    # for 1280 positions) up to one per SM; its pick is their fastest
    assert sorted(replays) == list(range(128, 133)) and replays[128] == split
    # programs and helpers given: only those replayed (none past the positions); the
    # default helpers are split_helpers' 72 (one per 8-row unit of a slab). Fewer helpers
    # read no faster than each keeps bytes in flight for (helper_program_bytes_per_s: 18
    # read at a quarter of the bandwidth, slower; without the cap 18 came out ahead, 32.9
    # against 33.8 us); at 72 the cap does not bind (72 x 42.5 GB/s is over the 3 TB/s)
    _, some = path_ops.pipelined_stream_k_replays(576, 1024, 4096, 25, 3, 2,
                                                  programs=(96, 128, 2000))
    assert sorted(some) == [96, 128] and some[128] == replays[128]
    _, own = path_ops.pipelined_stream_k_replays(576, 1024, 4096, 25, 3, 2,
                                                 programs=(128,), helpers=72)
    uncapped = {k: v for k, v in path_ops.PATH_MODEL.items()
                if k != "helper_program_bytes_per_s"}
    assert uncapped != path_ops.PATH_MODEL  # (the committed sm_90 calibration has the key)
    few, few_uncapped = (path_ops.pipelined_stream_k_replays(
        576, 1024, 4096, 25, 3, 2, model=m, programs=(128,), helpers=18)[1][128]
        for m in (path_ops.PATH_MODEL, uncapped))
    assert own[128] == replays[128] < few and few_uncapped < own[128]
    assert path_ops.pipelined_stream_k_replays(
        576, 1024, 4096, 25, 3, 2, model=uncapped)[1] == replays
    assert path_ops.choose_linear_path(576, 1024, 4096, 25, 3, 2, arch=90,
                                       pipelined=True) == "pipelined"
    # a group that reads only the base layer (1 distinct layer, 2 slabs) still reads a layer
    # per unit: the split's replay runs (it divided by zero when it counted none)
    _, split = path_ops.pipelined_stream_k_replays(576, 1024, 4096, 1, 2, 2)
    assert split and min(split.values()) > 0
    assert path_ops.choose_linear_path(576, 1024, 4096, 1, 2, 2, pipelined=True) in (
        "fused", "pipelined", "two-pass", "overlap")


def test_split_helpers():
    # as few helper programs as take the same number of rounds per slab as one per SM
    split = schedule_ops.split_helpers
    assert split(72, 132) == 72  # one CLIP image: one round per slab
    assert split(144, 132) == 72  # two: two rounds either way, of 72 units each
    assert split(133, 132) == 67 and split(264, 132) == 132 and split(265, 132) == 89
    assert split(1, 132) == 1 and split(0, 132) == 132 and split(5, 3) == 3
    # the replay: 72 programs make every slab of one image ready sooner than 132 (same
    # aggregate bandwidth; 144 group units over 132 programs leave 12 to a second round)
    args = (576, 4096, 128, 256, 8, 16, 128, 0.69e-6)
    rows = dict(unit_rows=8, alone_s_per_row=1.8e-8, beside_s_per_row=1.97e-8,
                slab_bytes=(2.0, 13.0, 13.0))
    few = schedule_ops.pipelined_stream_k_makespan(*args, sms=72, **rows)
    many = schedule_ops.pipelined_stream_k_makespan(*args, sms=132, **rows)
    assert few < 0.85 * many
    # the launcher's split helper (sm_90 builds): 8 x 256 steps where a step of the largest
    # group fits what triton 3.6's stream-K GEMM leaves of shared memory (CLIP's 12-layer
    # groups: 48 KiB, SigLIP's 13: 52 KiB beside its 161 KiB), else 8 x 128 (17 layers: 68
    # KiB)
    from dc_kernels.ops import pipelined
    for layers, rows, width, programs in ((12, 72, 256, 72), (13, 92, 256, 92), (17, 92, 128, 92),
                                          (1, 72, 256, 72)):
        n, cfg, cap, cap_pre = pipelined._helper_launch(True, False, rows, 132, layers, 2)
        assert (n, cfg["BLOCK_C"], cfg["num_warps"]) == (programs, width, 4)
        assert layers * cfg["ROWS"] * cfg["BLOCK_C"] * 2 <= pipelined.SPLIT_HELPER_SHARED
        assert 216 * 256 + cap * 128 <= 65536 and 224 * 256 + cap_pre * 128 <= 65536
    assert pipelined.HELPER_CONFIG_SPLIT["BLOCK_C"] == 256  # the table's entry is unchanged
    n, cfg, _, _ = pipelined._helper_launch(False, False, 72, 132, 12, 2)
    assert (n, cfg) == (132, pipelined.HELPER_CONFIG)


def test_pipelined_falls_back_where_it_is_not_built():
    # fp32, STI and weights TMA cannot read run two-pass when "pipelined" is asked for
    spec = ConnectorSpec.preset("clip", "dci")
    hs = _hs(spec, 2, 21, 24, torch.float32, seed=52)
    w, b = _weights(spec, 24, 40, torch.float32, seed=53)
    launch = linear_ops.prepare_linear(hs, spec, 2, 21, 24, w, b, "gelu", path="pipelined")
    assert launch.path == "two-pass"
    _check_linear(hs, spec, w, b, "gelu", "pipelined", torch.float32)
    sti = ConnectorSpec.preset("clip", "sti")
    hs = _hs(sti, 2, 33, 16, torch.bfloat16, seed=54)
    w, b = _weights(sti, 16, 24, torch.bfloat16, seed=55)
    assert linear_ops.prepare_linear(hs, sti, 2, 33, 16, w, b, None,
                                     path="pipelined").path == "two-pass"
    _check_linear(hs, sti, w, b, None, "pipelined", torch.bfloat16)
    # a weight whose rows are not 16-byte multiples (K = 21): no TMA descriptor for it
    hs = _hs(spec, 2, 21, 7, torch.bfloat16, seed=56)
    w, b = _weights(spec, 7, 24, torch.bfloat16, seed=57)
    assert linear_ops.prepare_linear(hs, spec, 2, 21, 7, w, b, None,
                                     path="pipelined").path == "two-pass"
    _check_linear(hs, spec, w, b, None, "pipelined", torch.bfloat16)


def test_pipelined_makespan():
    # the schedule replay of the pipelined GEMM: no ramp -> whole tiles over the programs;
    # a ramp delays it by less than the ramp (programs that start early take more tiles)
    span = schedule_ops.pipelined_makespan
    assert span(1024, 4096, 128, 256, 8, 132, 1.0, 0.0, 0.0) == 1.0  # 128 tiles, 132 programs
    assert span(9216, 4096, 128, 256, 8, 132, 1.0, 0.0, 0.0) == 9.0  # 1152 tiles: 8.7 waves
    ramp = 1e-3 * 9 * 128  # the first wave's 9 row blocks
    ramped = span(9216, 4096, 128, 256, 8, 132, 1.0, 1e-3, 0.0)
    assert 9.0 < ramped < 9.0 + ramp
    # a helper slower than the GEMM bounds it: the last row block is ready after all rows
    slow = span(9216, 4096, 128, 256, 8, 132, 1.0, 1e-3, 1e-2)
    assert slow >= ramp + 1e-2 * (9216 - 9 * 128)


# --------------------------------------------------------------------------- stream-K GEMM
def test_stream_k_partials():
    count = schedule_ops.stream_k_partials
    # 1 CLIP image (80 tiles x 48 K steps, 128 programs of 30 steps; tiles over 2-3
    # programs): the piece ending a program (a tile's slot 0) or filling one (slot 1)
    # finishes last and reduces in place, so a program stores its first segment's partial
    # and loads the partials of the tile it ends: at most 2 (the first protocol: 5)
    busiest, stored, loaded = count(80, 48, 128)
    assert busiest == 2 and stored == loaded
    shape = schedule_ops.stream_k_shape(80, 48, 128)
    assert shape == (30, 2, 3)
    # every shared tile's pieces but its reducer store: stored = pieces - shared tiles
    pieces = sum((((t + 1) * 48 - 1) // 30 - (t * 48) // 30 + 1) for t in range(80))
    shared = sum(1 for t in range(80) if ((t + 1) * 48 - 1) // 30 != (t * 48) // 30)
    assert stored == pieces - shared
    # the pipelined GEMM runs the longer of two segments first: a tile's tail piece (slot 2)
    # can end a program and reduce, in place like any slot (loads the other 2): at most 3
    # (2026-12-03, when a reducer past slot 1 stored its own and reloaded all: 5)
    assert count(80, 16, 128, longer_first=True)[0] == 3
    assert count(80, 16, 128)[0] == 2
    # the reducer never stores: every shared tile's loads are its other pieces' stores
    busiest, stored, loaded = count(80, 16, 128, longer_first=True)
    assert stored == loaded
    # no split: nothing stored
    assert count(4, 48, 4) == (0, 0, 0) and count(0, 48, 30) == (0, 0, 0)
    # the rule's cost follows: steps + partials x SPLIT_PARTIAL_STEPS
    assert schedule_ops.stream_k_program_steps(30, 2) == 30 + 2 * schedule_ops.SPLIT_PARTIAL_STEPS


def test_stream_k_bounds():
    # equal shares to one step, the kernels' own formulas: program p of P starts at
    # p S // P; the owner of a step is the last program starting at or before it
    bounds, owner = schedule_ops.stream_k_bounds, schedule_ops.stream_k_owner
    for total, programs in ((1728, 128), (1728, 124), (3840, 128), (7, 3), (5, 5), (9, 1)):
        b = bounds(total, programs)
        assert b[0] == 0 and b[-1] == total and len(b) == programs + 1
        sizes = [b[p + 1] - b[p] for p in range(programs)]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        assert [owner(x, total, programs) for x in range(total)] == [
            p for p in range(programs) for _ in range(sizes[p])]
    # SigLIP, 1 image (96 tiles of 18 positions): 128 programs of 13-14 put every tile over
    # 2 programs, 124 of at most 14 put some over 3
    assert schedule_ops.stream_k_shape(96, 18, 128)[2] == 2
    assert schedule_ops.stream_k_shape(96, 18, 124)[2] == 3
    with pytest.raises(ValueError, match="programs"):
        schedule_ops.stream_k_shape(2, 3, 7)
    with pytest.raises(ValueError, match="programs"):
        schedule_ops.stream_k_shape(2, 3, 0)


def test_stream_k_rule():
    rule, shape = schedule_ops.gemm_stream_k, schedule_ops.stream_k_shape
    # CLIP-L/336, 1 image -> 4096: 80 tiles of 128 x 256 for 132 SMs, 48 K steps each: 128
    # programs of 30 steps; a program touches 2 tiles, a tile spans 3 programs
    assert rule(80, 48, 132) == 128 and shape(80, 48, 128) == (30, 2, 3)
    # SigLIP-384, 1 image (96 tiles, 54 steps: 130 programs of at most 40) and CLIP, 2
    # images (144 tiles: 2 per program on 12 SMs with whole tiles; 131 programs of at most
    # 53)
    assert rule(96, 54, 132) == 130 and rule(144, 48, 132) == 131
    assert shape(96, 54, 130)[0] == 40 and shape(144, 48, 131)[0] == 53
    # whole waves of tiles (16 images; 128 tiles), or too few steps: whole tiles
    assert rule(1152, 48, 132) == rule(128, 48, 132) == rule(2, 5, 3) == 0
    assert rule(0, 48, 132) == rule(80, 0, 132) == 0
    # the path model's GEMM estimate shrinks exactly where the kernel runs stream K
    assert path_ops.gemm_split_gain(576, 4096, 3072) < 0.9
    assert path_ops.gemm_split_gain(16 * 576, 4096, 3072) == 1.0


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("iters", (1, 2, 3, 5))
@pytest.mark.parametrize("M,N,K,bias,activation", [(70, 96, 80, True, "gelu"),
                                                   (33, 40, 48, False, None),
                                                   (17, 24, 112, True, None)])
def test_stream_k_gemm(monkeypatch, dtype, iters, M, N, K, bias, activation):
    # at most ``iters`` K steps per program, ceil(steps / iters) programs sharing the steps
    # evenly (under the interpreter 16 deep: K = 48-112 is 3-7 steps
    # per tile, 3-12 tiles): tiles spread over up to 7 programs, programs crossing up to 3
    # tiles, tiles one program runs whole; edge tiles in M and N; outputs, pre-activations
    # and partials poisoned. Every shared tile's partials are summed in K order by whichever
    # piece takes the last ticket: the same bits on every call, the counts back to zero, and
    # within the GEMM bound of fp64
    from dc_kernels.ops import gemm_tma
    if not gemm_tma.gemm_tma_eligible(torch.empty(M, K, dtype=dtype, device=DEVICE),
                                      torch.empty(N, K, dtype=dtype, device=DEVICE),
                                      torch.empty(M, N, dtype=dtype, device=DEVICE)):
        pytest.skip("the TMA GEMM needs sm_90 (or the interpreter)")
    monkeypatch.setattr(gemm_tma, "STREAM_K_ITERS", iters)
    g = torch.Generator().manual_seed(M * 1000 + N + K + iters)
    a = torch.randn(M, K, generator=g).to(dtype=dtype, device=DEVICE)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype=dtype, device=DEVICE)
    b = torch.randn(N, generator=g).to(dtype=dtype, device=DEVICE) if bias else None
    launch = gemm_tma.prepare_gemm_tma(a, w, b, activation, torch.empty(M, N, dtype=dtype,
                                                                        device=DEVICE))
    steps = launch.tiles * math.ceil(K / launch.meta["BLOCK_K"])
    assert launch.programs == math.ceil(steps / iters) and 0 < launch.iters <= iters
    out, pre = run_gemm_launch_twice(launch, a, w, b)
    a64, w64 = a.double(), w.double()
    b64 = b.double() if b is not None else None
    z = torch.nn.functional.linear(a64, w64, b64)
    y = torch.nn.functional.gelu(z) if activation == "gelu" else z
    rtol, atol = _linear_tolerance(a64, w64, b64, dtype)
    torch.testing.assert_close(out.double(), y, rtol=rtol, atol=atol)
    torch.testing.assert_close(pre.double(), z, rtol=rtol, atol=atol)
    # the programs' work taken last to first: under the interpreter every shared tile is then
    # reduced by its first piece (slot 0: its registers, then the later partials) instead of
    # its last (slot 1-6: the earlier partials summed first, then its registers): the same
    # bits
    monkeypatch.setattr(gemm_tma, "REVERSE_PROGRAMS", True)
    rev = gemm_tma.prepare_gemm_tma(a, w, b, activation, torch.empty(M, N, dtype=dtype,
                                                                     device=DEVICE))
    out_r, pre_r = run_gemm_launch_twice(rev, a, w, b)
    assert torch.equal(out_r, out) and torch.equal(pre_r, pre)


def test_stream_k_taken_by_the_rule_and_end_to_end(monkeypatch):
    # under the interpreter (3 programs, 32 x 32 tiles) one tile and 18 K steps take stream K
    # on their own (6 steps per program); the two-pass path then runs it and stays within
    # the linear bound
    from dc_kernels.ops import gemm_tma
    dtype = torch.bfloat16
    spec = ConnectorSpec.preset("clip", "dci")
    hs = _hs(spec, 1, 21, 96, dtype, seed=38)  # K = 288: 18 steps of 16
    w, b = _weights(spec, 96, 24, dtype, seed=39)
    a = dense_connector_features(hs, spec, backend="triton").reshape(20, 288)
    out = torch.empty(20, 24, dtype=dtype, device=DEVICE)
    if not gemm_tma.gemm_tma_eligible(a, w, out):
        pytest.skip("the TMA GEMM needs sm_90 (or the interpreter)")
    if common.interpreting():
        launch = gemm_tma.prepare_gemm_tma(a, w, b, "gelu", out)
        assert (launch.programs, launch.iters) == (3, 6)
    _check_linear(hs, spec, w, b, "gelu", "two-pass", dtype)


def test_stream_k_arrivals_per_stream_and_device():
    # one zeroed buffer per (device, stream), reused, grown when a launch has more tiles
    from dc_kernels.ops import gemm_tma
    t = torch.empty(4, device=DEVICE)
    first = gemm_tma._arrivals(t, 10)
    assert first.dtype == torch.int32 and first.numel() >= 10 and int(first.abs().sum()) == 0
    assert gemm_tma._arrivals(t, 10) is first
    bigger = gemm_tma._arrivals(t, first.numel() + 1)
    assert bigger.numel() > first.numel() and gemm_tma._arrivals(t, 10) is bigger


def test_features_row_range_writes_only_those_rows():
    from dc_kernels.ops.features import features_triton
    spec = ConnectorSpec.preset("clip", "dci")
    hs = _hs(spec, 2, 13, 20, torch.bfloat16, seed=38)
    full = dense_connector_features(hs, spec, backend="triton")
    out = torch.full_like(full, float("nan"))
    features_triton(hs, spec, 2, 13, 20, out=out, rows=(5, 17))
    flat, ref = out.view(-1, full.shape[-1]), full.view(-1, full.shape[-1])
    assert torch.equal(flat[5:17], ref[5:17])
    assert torch.isnan(flat[:5]).all() and torch.isnan(flat[17:]).all()
    with pytest.raises(ValueError, match="outside"):
        features_triton(hs, spec, 2, 13, 20, out=out, rows=(3, 25))


def test_config_pruning_keeps_shared_memory_within_the_limit():
    # the bound the launcher prunes by; the AOT tests check it against every real build
    for configs in linear_ops.CONFIG_LISTS.values():
        for limit in (166912, 232448):
            for group in (1, 12, 13):
                kept = linear_ops.prune_configs(configs, group, 2, limit, aligned=True)
                assert kept
                fits = [c for c in configs
                        if linear_ops.shared_bytes_bound(c, group, 2) <= limit]
                assert kept == (fits or kept)
        odd = linear_ops.prune_configs(configs, 1, 2, 232448, aligned=False)
        assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 128 for c in odd) or \
            len(odd) == 1
    # odd sizes with wide groups (12-13 layer tiles per K step): K blocks of 16 only (a
    # 32-deep one spills on sm_80 with triton 3.6); the fused lists have such a config
    for configs in (linear_ops.FUSED_CONFIGS_16, linear_ops.FUSED_CONFIGS_32):
        for e in (2, 4):
            odd = linear_ops.prune_configs(configs, 12, e, 166912, aligned=False)
            assert odd and all(c.kwargs["BLOCK_K"] <= 16 for c in odd)
    # fp32 with odd sizes on sm_100: tiles of at most 64 x 64 (64 x 128 x 16 spills there);
    # other architectures and 16-bit operands keep 64 x 128
    for arch, e, tile in ((100, 4, 64 * 64), (103, 4, 64 * 64), (90, 4, 64 * 128),
                          (120, 4, 64 * 128), (100, 2, 64 * 128), (None, 4, 64 * 128)):
        configs = linear_ops.FUSED_CONFIGS_32 if e == 4 else linear_ops.FUSED_CONFIGS_16
        odd = linear_ops.prune_configs(configs, 12 if e == 4 else 1, e, 232448,
                                       aligned=False, arch=arch)
        assert odd and max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in odd) == tile, \
            (arch, e, odd)


# --------------------------------------------------------------------------- property-based
@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.data())
def test_random_shapes_and_specs(data):
    n_layers = data.draw(st.integers(2, 8), label="layers")
    n_groups = data.draw(st.integers(1, 3), label="groups")
    groups = []
    for _ in range(n_groups):
        a = data.draw(st.integers(0, n_layers - 1))
        b = data.draw(st.integers(a + 1, n_layers))
        groups.append((a, b))
    spec = ConnectorSpec("dci", final_layer=data.draw(st.integers(0, n_layers - 1)),
                         groups=tuple(groups), drop_cls=data.draw(st.booleans()))
    B = data.draw(st.integers(1, 3), label="B")
    T = data.draw(st.integers(1, 40), label="T")
    C = data.draw(st.integers(1, 40), label="C")
    N = data.draw(st.integers(1, 40), label="N")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    hs = make_hidden_states(n_layers, B, T, C, dtype, seed, device=DEVICE)
    _check_features(hs, spec, dtype)
    w, b = _weights(spec, C, N, dtype, seed + 1)
    _check_linear(hs, spec, w, b, data.draw(st.sampled_from((None, "gelu"))),
                  data.draw(st.sampled_from(PATHS)), dtype)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.data())
def test_random_sti_specs(data):
    n_layers = data.draw(st.integers(1, 6), label="layers")
    groups = []
    for _ in range(data.draw(st.integers(1, 3), label="groups")):
        a = data.draw(st.integers(0, n_layers - 1))
        groups.append((a, data.draw(st.integers(a + 1, n_layers))))
    spec = ConnectorSpec("sti", final_layer=data.draw(st.integers(0, n_layers - 1)),
                         groups=tuple(groups), drop_cls=data.draw(st.booleans()),
                         pool_size=data.draw(st.integers(1, 9), label="pool"))
    B, T, C = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 40)),
               data.draw(st.integers(1, 33)))
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    hs = make_hidden_states(n_layers, B, T, C, dtype, seed, device=DEVICE)
    _check_features(hs, spec, dtype)
    w, b = _weights(spec, C, data.draw(st.integers(1, 30), label="N"), dtype, seed + 1)
    _check_linear(hs, spec, w, b, "gelu", "auto", dtype)


# --------------------------------------------------------------------------- backward scatter
def _scatter_case(spec, n, B, T, C, dtype, seed, needs=None):
    from dc_kernels.autograd import scatter_to_layers
    from dc_kernels.ops.scatter import scatter_grad_triton
    g = torch.Generator().manual_seed(seed)
    grad_a = torch.randn(B, spec.tokens_kept(T), spec.out_channels(C), generator=g).to(dtype)
    shapes = [torch.Size((B, T, C))] * n
    needs = needs or [True] * n
    got = scatter_grad_triton(grad_a.to(DEVICE), spec, shapes, needs)
    exact = scatter_to_layers(grad_a.double(), spec, shapes, needs)  # fp64 formulation
    read = set(spec.used_layers)
    for i in range(n):
        if i not in read or not needs[i]:
            assert got[i] is None, f"layer {i} should get no gradient"
            continue
        assert got[i].dtype == dtype and got[i].shape == (B, T, C)
        # each element: a sum of at most 2 scaled slab values in fp32, rounded once
        assert_close_to_fp64(got[i], exact[i], dtype, terms=2)
        if spec.drop_cls:
            assert not got[i][:, 0].any(), "CLS position must get a zero gradient"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("encoder,connector", [("clip", "dci"), ("siglip", "dci"),
                                               ("clip", "sci")])
def test_scatter_grad_presets(encoder, connector, dtype):
    spec = ConnectorSpec.preset(encoder, connector)
    _scatter_case(spec, spec.num_hidden_states, 2, 13, 20, dtype, seed=40)


@pytest.mark.parametrize("name", ["dci_3groups", "dci_overlap_single", "sci_4layers",
                                  "dci_longer_tuple"])
def test_scatter_grad_custom_and_partial(name):
    spec, n = CUSTOM_SPECS[name]
    _scatter_case(spec, n, 3, 9, 17, torch.bfloat16, seed=41)
    needs = [i % 2 == 0 for i in range(n)]  # only some layers require grad
    _scatter_case(spec, n, 3, 9, 17, torch.float32, seed=42, needs=needs)


def test_scatter_grad_int64_offsets(monkeypatch):
    monkeypatch.setattr(common, "FORCE_OFF64", True)
    spec = ConnectorSpec.preset("clip", "dci")
    _scatter_case(spec, 25, 2, 11, 12, torch.float16, seed=43)


# --------------------------------------------------------------------------- dispatch, errors
def test_dispatch_rule():
    choose = path_ops.choose_linear_path
    # a narrow output (one N-tile): no re-reads, the fused kernel saves the A round trip
    assert choose(576, 1024, 128, 24, 3, 2) == "fused"
    # CLIP DCI -> 4096: 32 N-tiles each rebuild the features: not fused
    assert choose(576, 1024, 4096, 24, 3, 2) == "two-pass"  # one overlap chunk: two-pass
    # many rows: the features pass hides under the GEMM
    assert choose(16 * 576, 1024, 4096, 24, 3, 2) == "overlap"
    assert choose(16 * 576, 1024, 4096, 24, 3, 2, cuda=False) == "two-pass"  # no streams
    # the pipelined path (where it can run): one GEMM launch instead of chunks; at one CLIP
    # or SigLIP image its stream-K GEMM over the slabs with one helper per unit of a slab
    assert choose(16 * 576, 1024, 4096, 24, 3, 2, pipelined=True) == "pipelined"
    assert choose(64 * 576, 1024, 4096, 24, 3, 2, pipelined=True) == "pipelined"
    assert choose(576, 1024, 4096, 24, 3, 2, pipelined=True) == "pipelined"
    assert choose(729, 1152, 4096, 26, 3, 2, pipelined=True) == "pipelined"
    assert choose(729, 1152, 4096, 26, 3, 2) == "two-pass"  # where pipelined cannot run
    assert choose(16 * 576, 1024, 4096, 24, 3, 2, pipelined=True, cuda=False) == "two-pass"
    # SCI (3 layers): beside the GEMM its features keep too few bytes in flight to hide
    assert choose(16 * 576, 1024, 4096, 3, 3, 2) == "two-pass"
    assert choose(64 * 576, 1024, 4096, 3, 3, 2) == "two-pass"
    # layouts the fused kernel is not built for
    assert choose(576, 1024, 128, 24, 3, 2, off64=True) == "two-pass"
    assert choose(576, 1024, 128, 24, 3, 2, uniform=False) == "two-pass"
    assert choose(576, 1024, 128, 3, 1, 2, sti=True) == "two-pass"
    # STI: two-pass, or the overlap of whole-image chunks where they can run (sti_rows) and
    # its estimate is smaller: not at 2 CLIP images (one image per chunk leaves most tile
    # waves empty), at 64 (the features of 16-image chunks hide under the GEMM)
    sti = dict(sti=True, sti_rows=(576, 720))
    assert choose(2 * 720, 1024, 4096, 3, 3, 2, **sti) == "two-pass"
    assert choose(64 * 720, 1024, 4096, 3, 3, 2, **sti) == "overlap"
    assert choose(64 * 720, 1024, 4096, 3, 3, 2, sti=True) == "two-pass"  # no sti_rows
    assert choose(64 * 720, 1024, 4096, 3, 3, 2, cuda=False, **sti) == "two-pass"
    assert choose(64 * 720, 1024, 4096, 3, 3, 4, **sti) == "two-pass"  # fp32: the GEMM rules
    t = path_ops.estimate_sti_times(64, 576, 720, 1024, 4096, 3, 2)
    assert t["overlap"] < t["two-pass"]
    assert path_ops.sti_overlap_images(64, 576, 720, 1024, 4096, 3, 2) == 16
    assert path_ops.sti_overlap_images(1, 576, 720, 1024, 4096, 3, 2) == 1
    with pytest.raises(ValueError, match="whole images"):
        choose(64 * 720 + 1, 1024, 4096, 3, 3, 2, **sti)
    # an sm_80 card reads its own calibration: 108 SMs, the cp.async GEMM's 128 x 128 tiles
    # (whole waves: 1280 rows for N = 4096), and its GEMM never splits K
    a100 = path_ops.model_for(80)
    assert path_ops.model_for(90) is path_ops.PATH_MODEL is path_ops.model_for(None)
    assert a100["sms"] == 108 and a100["gemm_split_k"] is False  # no stream K there
    assert path_ops.overlap_chunk_rows(16 * 576, 4096, a100) == 1280
    assert path_ops.gemm_split_gain(576, 4096, 3072, a100) == 1.0
    # STI chunks there: rows in multiples of 16 (its cp.async GEMM keeps only narrow tiles
    # otherwise): SigLIP's 911 rows per image need 16-image chunks, so 16 images stay whole
    assert path_ops.sti_chunk_row_multiple(80) == 16
    assert path_ops.sti_chunk_row_multiple(90) == path_ops.sti_chunk_row_multiple(None) == 1
    assert path_ops.sti_overlap_images(16, 729, 911, 1152, 4096, 3, 2, a100, 16) == 16
    assert path_ops.sti_overlap_images(64, 729, 911, 1152, 4096, 3, 2, a100, 16) % 16 == 0
    assert choose(16 * 911, 1152, 4096, 3, 3, 2, sti=True, sti_rows=(729, 911), arch=80) \
        == "two-pass"
    # the choice is the smallest estimate among the paths that run
    for M, N in ((576, 128), (576, 4096), (9216, 256), (9216, 4096)):
        t = path_ops.estimate_linear_times(M, 1024, N, 24, 3, 2)
        assert choose(M, 1024, N, 24, 3, 2, pipelined=True) == min(t, key=t.get)
        t.pop("pipelined")
        assert choose(M, 1024, N, 24, 3, 2) == min(t, key=t.get)


def test_path_rule_counts_no_features_pass_where_a_is_read_in_place():
    # SCI whose layers the GEMM reads in place (linear.direct_serves): two-pass is the GEMM
    # alone plus a ring refill per slab boundary, so it costs less than with the features pass
    # by about that pass, and one CLIP image runs it (estimates)
    est = path_ops.estimate_linear_times
    for M, C in ((576, 1024), (729, 1152), (16 * 729, 1152)):
        copy = est(M, C, 4096, 3, 3, 2)["two-pass"]
        direct = est(M, C, 4096, 3, 3, 2, direct=True)["two-pass"]
        m = path_ops.PATH_MODEL
        feats = (3 * M * C + M * 3 * C) * 2 / (m["dram_bytes_per_s"] * m["features_efficiency"])
        assert 0 < copy - direct <= feats
        assert est(M, C, 4096, 3, 3, 2, direct=True)["pipelined"] == \
            est(M, C, 4096, 3, 3, 2)["pipelined"]
    assert path_ops.choose_linear_path(576, 1024, 4096, 3, 3, 2, pipelined=True,
                                       direct=True) == "two-pass"


def _as_cuda_card(monkeypatch, capability=(9, 0), card=None, sms=132):
    # gemm_tma's device lookups answering for a CUDA card, as the ahead-of-time builds stub
    # them (triton_aot.record_launches): CPU tensors stand in for the card's
    from dc_kernels.ops import gemm_tma
    monkeypatch.setattr(gemm_tma, "_cuda_device", lambda t: True)
    monkeypatch.setattr(gemm_tma, "_capability", lambda index: capability)
    monkeypatch.setattr(gemm_tma, "_card", lambda index: card)
    monkeypatch.setattr(gemm_tma, "_num_sms", lambda index: sms)


@pytest.mark.parametrize("connector, images, dtype, stages", (
    ("sci", 16, torch.bfloat16, 5), ("sci", 64, torch.float16, 5),  # 3 KiB tiles: deeper
    ("sci", 1, torch.bfloat16, 3),  # ~2 tiles per program: a deeper ring only lengthens it
    ("sci", 16, torch.float32, 3),  # 6 KiB tiles: 2 ahead x 4 programs = 48 KiB already
    ("dci", 16, torch.bfloat16, 3), ("dci", 1, torch.bfloat16, 3)))
def test_tma_features_ring_keeps_enough_bytes_in_flight(monkeypatch, connector, images, dtype,
                                                        stages):
    # the TMA features kernel's ring deepens where the configured one keeps fewer than
    # INFLIGHT_RING_PER_SM bytes in flight per SM and programs walk enough tiles to fill it;
    # beside the GEMM (the overlap's later chunks) it keeps its configured 2 stages
    from dc_kernels.ops import features as features_ops
    _as_cuda_card(monkeypatch)
    monkeypatch.setattr(common, "interpreting", lambda: False)
    spec = ConnectorSpec.preset("clip", connector)
    hs = tuple(torch.empty(images, 577, 1024, dtype=dtype) for _ in range(25))
    tiles = (0, features_ops.row_tiles(spec, images, 577))
    alone = features_ops.prepare_features_chunk(hs, spec, images, 577, 1024, tiles=tiles)
    meta = alone.meta
    assert meta["STAGES"] == stages
    per_sm = -(-meta["NUM_PROGRAMS"] // 132)
    tile = (1 + sum(meta["SIZES"])) * meta["ROWS"] * meta["BLOCK_C"] * hs[0].element_size()
    n_tiles = (tiles[1] - tiles[0]) * (1024 // meta["BLOCK_C"])
    if n_tiles >= features_ops.MIN_TILES_PER_PROGRAM * meta["NUM_PROGRAMS"]:
        assert (stages - 1) * tile * per_sm >= features_ops.INFLIGHT_RING_PER_SM
    if stages > features_ops.FEATURES_TMA_CONFIG["STAGES"]:  # the shallowest that suffices
        assert (stages - 2) * tile * per_sm < features_ops.INFLIGHT_RING_PER_SM
    beside = features_ops.prepare_features_chunk(hs, spec, images, 577, 1024, tiles=tiles,
                                                 programs=132, beside_gemm=True)
    assert beside.meta["STAGES"] == features_ops.FEATURES_TMA_CONFIG_BESIDE["STAGES"]


def _spy_on_the_rule(monkeypatch, keyword):
    # the launchers' calls of choose_linear_path answer "two-pass"; returns the list of the
    # ``keyword`` argument of each call
    seen = []
    monkeypatch.setattr(path_ops, "choose_linear_path",
                        lambda *a, **k: seen.append(k[keyword]) or "two-pass")
    monkeypatch.setattr(linear_ops, "choose_linear_path", path_ops.choose_linear_path)
    return seen


@pytest.mark.parametrize("capability, tma", (((8, 0), False), ((8, 6), False), ((9, 0), True),
                                             ((10, 0), False), ((12, 0), False)))
def test_only_sm90_cards_run_the_tma_kernels(monkeypatch, capability, tma):
    # the TMA / wgmma kernels are built and checked for sm_90 (path.TMA_MAJOR): an sm_100
    # build of the stream-K GEMM needs 254 registers and the pipelined GEMM spills, sm_120
    # spills 20-55 (triton 3.9, as the JIT binds them), so a B200 or an RTX 50xx runs the
    # portable kernels, and the path rule reads the calibration of the kernels that run
    # (sm_90's only on sm_90). Device lookups stubbed as the ahead-of-time builds do; the
    # interpreter (which runs the TMA kernels anywhere) switched off for the checks
    from dc_kernels.ops import features as features_ops, gemm_tma, pipelined
    _as_cuda_card(monkeypatch, capability)
    monkeypatch.setattr(common, "interpreting", lambda: False)
    a = torch.empty(576, 3072, dtype=torch.bfloat16)
    w = torch.empty(4096, 3072, dtype=torch.bfloat16)
    out = torch.empty(576, 4096, dtype=torch.bfloat16)
    assert gemm_tma.tma_kernels_serve(0) is tma
    assert gemm_tma.gemm_tma_eligible(a, w, out) is tma
    spec = ConnectorSpec.preset("clip", "dci")
    hs = tuple(torch.empty(1, 577, 1024, dtype=torch.bfloat16) for _ in range(25))
    entries, _, _ = common.layer_entries(hs, spec)
    assert features_ops.features_tma_eligible(entries, hs[0].device) is tma
    assert pipelined.pipelined_eligible(entries, spec, w, True) is tma
    arch = 10 * capability[0] + capability[1]
    assert path_ops.runs_tma_kernels(arch) is tma and not path_ops.runs_tma_kernels(None)
    assert path_ops.calibration_file(arch) == path_ops.CALIBRATION_FILES[90 if tma else 80]
    assert (path_ops.model_for(arch)["gemm_split_k"]) is tma


def _picks_moved_by(model, image_counts, widths, **card):
    # CLIP DCI / SCI shapes: the rule's pick for the card (``card``: choose_linear_path's
    # card / sms keywords) is the smallest estimate of its ``model`` on every shape; returns on
    # how many the pick differs from the H100 SXM's (a card model no pick follows is dead
    # weight)
    differ = 0
    for images in image_counts:
        for N in widths:
            for layers in (24, 3):
                M = images * 576
                t = path_ops.estimate_linear_times(M, 1024, N, layers, 3, 2, model)
                pick = path_ops.choose_linear_path(M, 1024, N, layers, 3, 2, arch=90,
                                                   pipelined=True, **card)
                assert pick == min(t, key=t.get), (M, N, layers)
                differ += pick != path_ops.choose_linear_path(M, 1024, N, layers, 3, 2,
                                                              arch=90, pipelined=True)
    return differ


def test_the_path_rule_counts_the_cards_sms(monkeypatch):
    # the calibrations are an H100 SXM's (132 SMs), an H200's (132) and an A100's (108); on a
    # card with other SMs (an H100 PCIe's 114, an L4's 58, an L40S's 142) the model counts
    # the card's, each at the calibration card's rates, so the overlap's chunks are whole
    # waves of that card's tiles and the rule's picks follow (*estimates*: its DRAM and L2
    # stay the calibration's)
    h100 = path_ops.model_for(90)
    assert path_ops.model_for(90, sms=132) is h100
    pcie = path_ops.model_for(90, sms=114)
    assert pcie is path_ops.model_for(90, None, 114) and pcie["sms"] == 114
    assert pcie["flop_per_s"] == pytest.approx(h100["flop_per_s"] * 114 / 132)
    assert pcie["issue_per_s"] == pytest.approx(h100["issue_per_s"] * 114 / 132)
    for same in ("dram_bytes_per_s", "l2_bytes_per_s", "gemm_tile_m", "gemm_tile_n",
                 "gemm_split_k", "launch_s", "measured_over_estimated"):
        assert pcie[same] == h100[same], same
    assert h100["sms"] == 132  # the calibration itself is untouched
    with pytest.raises(ValueError, match="sms must be a positive SM count"):
        path_ops.model_for(80, sms=0)
    for arch in (80, 90):
        for sms in (58, 72, 114, 132, 142):
            m = path_ops.model_for(arch, sms=sms)
            rows = path_ops.overlap_chunk_rows(16 * 576, 4096, m)
            tiles = rows // m["gemm_tile_m"] * math.ceil(4096 / m["gemm_tile_n"])
            assert tiles / (math.ceil(tiles / sms) * sms) >= 0.95, (arch, sms, rows)
    assert _picks_moved_by(pcie, (1, 2, 4, 8, 16, 64), (4096, 7168), sms=114) >= 1
    # the launchers pass the device's count (gemm_tma.sms_of; stubbed as the ahead-of-time
    # builds do): the auto path and the overlap's chunks
    from dc_kernels.ops import gemm_tma
    spec = ConnectorSpec.preset("clip", "dci")
    hs = tuple(torch.randn(16, 577, 64, dtype=torch.bfloat16) for _ in range(25))
    w = torch.randn(4096, 192, dtype=torch.bfloat16)
    assert gemm_tma.sms_of(hs[0]) is None
    seen = _spy_on_the_rule(monkeypatch, "sms")
    _as_cuda_card(monkeypatch, sms=114)
    assert linear_ops.auto_path(hs, spec, w) == "two-pass" and seen == [114]
    launch = overlap_ops.prepare_overlap(hs, spec, 16, 577, 64, w, "gelu")
    rows = launch.chunks[0][1] - launch.chunks[0][0]
    assert rows == path_ops.overlap_chunk_rows(16 * 576, 4096, pcie) != \
        path_ops.overlap_chunk_rows(16 * 576, 4096, h100)


def test_an_h200_reads_its_own_calibration(monkeypatch):
    # the H200 (the cards this project's GPU runs borrow) is the H100's chip with 1.4x the
    # DRAM bandwidth: by its device name it takes its own calibration, whose picks differ
    key = path_ops.card_key
    assert key("NVIDIA H200") == key("NVIDIA H200 NVL") == key("nvidia h200") == "h200"
    for other in ("NVIDIA H100 80GB HBM3", "NVIDIA GH200 480GB", "NVIDIA H20", "NVIDIA H2000",
                  "NVIDIA A100-SXM4-80GB", "", None):
        assert key(other) is None, other
    h100, h200 = path_ops.model_for(90), path_ops.model_for(90, "h200")
    assert h200 is path_ops.model_for(None, "h200") and h200 is not h100
    assert h200["dram_bytes_per_s"] > 1.4 * h100["dram_bytes_per_s"]
    for same in ("sms", "flop_per_s", "gemm_tile_m", "gemm_tile_n", "gemm_split_k"):
        assert h200[same] == h100[same], same
    with pytest.raises(ValueError, match="no calibration for card 'b200'"):
        path_ops.model_for(90, "b200")
    # the rule is the smallest estimate of the card's model; on some benchmark-sized shapes
    # the two cards' picks differ (else a second calibration would be dead weight)
    assert _picks_moved_by(h200, (1, 2, 3, 4, 8, 16), (4096, 5120, 7168), card="h200") >= 1
    # off CUDA no card is known; the launchers' auto path is the rule's pick for the card
    # the device reports (gemm_tma.card_of, stubbed here as the ahead-of-time builds do)
    from dc_kernels.ops import gemm_tma
    spec = ConnectorSpec.preset("clip", "dci")
    hs = tuple(torch.randn(1, 577, 64, dtype=torch.bfloat16) for _ in range(25))
    w = torch.randn(256, 192, dtype=torch.bfloat16)
    assert gemm_tma.card_of(hs[0]) is None
    seen = _spy_on_the_rule(monkeypatch, "card")
    assert linear_ops.auto_path(hs, spec, w) == "two-pass" and seen == [None]
    _as_cuda_card(monkeypatch, card="h200")
    assert linear_ops.auto_path(hs, spec, w) == "two-pass" and seen == [None, "h200"]


@pytest.mark.parametrize("arch, card", ((90, None), (80, None), (90, "h200")))
def test_path_rule_agrees_with_the_static_report(arch, card):
    # the path rule (a small roofline model, one calibration per architecture, and per card
    # where one has its own: the H200) against the committed static report (every kernel
    # built as the JIT builds it, estimated from its SASS): for every DCI / SCI / STI
    # benchmark case, the path the rule picks is within 10 % of the report's fastest path
    # (both are estimates; the rule is the coarser one)
    import glob
    import json
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    name = card or f"sm{arch}"
    reports = sorted(glob.glob(os.path.join(here, "benchmarks", "results",
                                            f"*-static-{name}.json")))
    assert reports, f"no committed static report for {name}"
    with open(reports[-1]) as f:
        rows = json.load(f)["rows"]
    towers = {"clip336": ("clip", 576, 1024), "siglip384": ("siglip", 729, 1152)}
    times, direct = {}, set()
    for r in rows:
        if r["case"].startswith("linear-") and r["dtype"] != "fp32":
            path, case = r["case"][len("linear-"):].split("/")
            times.setdefault(case, {})[path] = r["est_s"]
            if path == "two-pass" and len(r["launches"]) == 1:  # A read in place: no features
                direct.add(case)
    checked = 0
    for case, t in times.items():
        tower, connector, images, _ = case.split("-")
        enc, tokens, C = towers[tower]
        spec = ConnectorSpec.preset(enc, connector)
        T = tokens + spec.drop_cls
        M = int(images[:-3]) * spec.out_tokens(T)
        # (STI: the report's overlap rows are image chunks; one image runs two-pass)
        sti_rows = (spec.tokens_kept(T), spec.out_tokens(T)) \
            if connector == "sti" and images != "1img" else None
        pick = path_ops.choose_linear_path(M, C, 4096, len(spec.used_layers),
                                           spec.num_groups + 1, 2, arch=arch,
                                           sti=connector == "sti", sti_rows=sti_rows,
                                           pipelined="pipelined" in t, card=card,
                                           direct=case in direct)
        assert t[pick] <= 1.10 * min(t.values()), (case, pick, t)
        checked += 1
    assert checked >= 18


@pytest.mark.parametrize("path", sorted(set(path_ops.CALIBRATION_FILES.values())
                                         | set(path_ops.CARD_CALIBRATION_FILES.values())))
def test_calibration_file_is_complete(tmp_path, path):
    cal = path_ops.load_calibration(path)
    assert cal["source"], "the calibration must say where its numbers come from"
    assert cal["source"].startswith("estimate") or "measured" in cal["source"]
    bad = tmp_path / "cal.json"
    bad.write_text('{"dram_bytes_per_s": 1}')
    with pytest.raises(ValueError, match="lacks"):
        path_ops.load_calibration(str(bad))


def test_every_calibration_file_ships_in_the_wheel():
    # path.py loads every calibration at import: one missing from the package data would
    # break `import dc_kernels` in any non-editable install
    import fnmatch
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:  # (tomllib is Python 3.11+)
        text = f.read()
    table = text.split("[tool.setuptools.package-data]", 1)[1]
    globs = re.findall(r'"([^"]+)"', re.search(r"^dc_kernels\s*=\s*\[([^\]]*)\]", table,
                                                re.M).group(1))
    package = os.path.join(root, "dc_kernels")
    files = set(path_ops.CALIBRATION_FILES.values()) | set(path_ops.CARD_CALIBRATION_FILES.values())
    for path in files:
        rel = os.path.relpath(path, package).replace(os.sep, "/")
        assert any(fnmatch.fnmatch(rel, g) for g in globs), (rel, globs)


def test_triton_backend_rejects_fp64():
    spec = ConnectorSpec.preset("clip", "dci")
    hs = _hs(spec, 1, 17, 8, torch.float64, 19)
    with pytest.raises(ValueError, match="float64"):
        dense_connector_features(hs, spec, backend="triton")
    # auto never picks a path that does not exist
    assert dense_connector_features(hs, spec, backend="auto").dtype == torch.float64


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setattr(common, "interpreting", lambda: False)
    spec = ConnectorSpec.preset("clip", "dci")
    hs = make_hidden_states(spec.num_hidden_states, 1, 17, 8, torch.float32, 20)  # CPU
    with pytest.raises(ValueError, match="CUDA"):
        dense_connector_features(hs, spec, backend="triton")


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_linear_parameter_errors(backend):
    spec = ConnectorSpec.preset("clip", "dci")
    hs = _hs(spec, 1, 9, 8, torch.float32, 21)
    w, b = _weights(spec, 8, 6, torch.float32, 22)
    cases = [
        (dict(weight=w[:, :-1]), ValueError, r"weight must be \[N, 24\]"),
        (dict(weight=w.T), ValueError, "weight must be"),
        (dict(weight=w.double()), ValueError, "weight is torch.float64"),
        (dict(weight=w.tolist()), TypeError, "weight must be a torch.Tensor"),
        (dict(bias=b[:-1]), ValueError, r"bias must be \[6\]"),
        (dict(bias=b.half()), ValueError, "bias is torch.float16"),
        (dict(bias=3.0), TypeError, "bias must be a torch.Tensor"),
        (dict(activation="relu"), ValueError, "activation must be one of"),
        (dict(path="three-pass"), ValueError, "path must be one of"),
    ]
    for kw, exc, msg in cases:
        args = dict(weight=w, bias=b, activation="gelu", path="auto")
        args.update(kw)
        with pytest.raises(exc, match=msg):
            dense_connector_linear(hs, spec, args["weight"], args["bias"], args["activation"],
                                   backend=backend, path=args["path"])


def test_autotune_env_keeps_one_config():
    import subprocess
    import sys
    code = ("from dc_kernels.ops import linear as T; "
            "print(sorted({len(k.configs) for k in T._AUTOTUNED.values()}))")
    for value, want in (("0", "[1]"), ("1", None)):
        env = dict(os.environ, DC_KERNELS_AUTOTUNE=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        if want:
            assert out == want
        else:
            assert out != "[1]"  # the full lists
