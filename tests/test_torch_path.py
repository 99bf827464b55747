"""dense_connector_features on the pure-PyTorch path, against the exact (fp64) features.

Every result is checked against ``reference.features_fp64`` with the single-rounding bound of
``conftest.assert_close_to_fp64`` and, more loosely, against the original's own arithmetic
(``reference.features_from_spec``). Pieces that are exact by construction (the base features
and single-layer groups are copies: the mean of one value is representable) must be bit-equal.
``backend="triton"`` is not exercised here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import reference
from conftest import (ALL_FLOAT_DTYPES, UNIT_ROUNDOFF, accumulation_terms,
                      assert_close_to_fp64, assert_close_to_original, make_hidden_states,
                      max_abs, tolerances_vs_fp64, CUSTOM_SPECS, LAYOUTS, strided_layer)
from dc_kernels import BACKEND_ENV, ConnectorSpec, dense_connector_features

ENCODER_TOKENS = {"clip": 17, "siglip": 29}  # ragged: 16 kept (clip); 29 = 3 * 8 + 5 (siglip)
C = 24


@pytest.fixture(scope="module", autouse=True)
def _no_backend_env():
    """backend="auto" must resolve to torch here: unset $DC_KERNELS_BACKEND for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(BACKEND_ENV, raising=False)
        yield


def check_features(hs, spec, backend="torch", compare_original=True):
    """Run the op and check everything that must hold for any valid input; return the output.

    ``compare_original=False`` skips the comparison with the original's arithmetic (for inputs
    where the original itself overflows).
    """
    ref = hs[spec.final_layer]
    B, T, Cin = ref.shape
    dtype = ref.dtype
    out = dense_connector_features(hs, spec, backend=backend)

    assert out.dtype == dtype
    assert out.device == ref.device
    assert out.shape == (B, spec.out_tokens(T), spec.out_channels(Cin))

    tok0 = spec.token_offset
    kept = T - tok0
    base = hs[spec.final_layer][:, tok0:]
    # exact pieces: the base features are a copy ...
    if spec.connector_type == "sti":
        assert torch.equal(out[:, :kept], base)
    else:
        assert torch.equal(out[..., :Cin], base)
        # ... and so is a group of one layer (its mean is itself, representable exactly)
        for g, (start, stop) in enumerate(spec.groups):
            if stop - start == 1:
                assert torch.equal(out[..., (g + 1) * Cin:(g + 2) * Cin], hs[start][:, tok0:])

    terms = accumulation_terms(spec)
    magnitude = max(max_abs(hs), 1e-30)
    exact = reference.features_fp64(hs, spec)
    assert_close_to_fp64(out, exact, dtype, terms=terms, magnitude=magnitude)
    # The original's nn.AvgPool1d raises when fewer tokens than one window remain (we return the
    # base features alone, like a pool that produced zero tokens), so no comparison there.
    original_defined = spec.connector_type != "sti" or kept >= spec.pool_size
    if compare_original and original_defined and dtype != torch.float64:
        original = reference.features_from_spec(hs, spec)
        assert_close_to_original(out, original, dtype, terms=terms, magnitude=magnitude)
    return out


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("backend", ("torch", "auto"))
@pytest.mark.parametrize("B", (1, 3))
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("connector", ("dci", "sci", "sti"))
@pytest.mark.parametrize("encoder", ("clip", "siglip"))
def test_presets(encoder, connector, dtype, B, backend):
    spec = ConnectorSpec.preset(encoder, connector)
    T = ENCODER_TOKENS[encoder]
    # deterministic seed, the same data for every dtype / backend
    seed = 100 * ("clip", "siglip").index(encoder) + 10 * ("dci", "sci", "sti").index(connector) + B
    hs = make_hidden_states(spec.num_hidden_states, B, T, C, dtype, seed=seed)
    out = check_features(hs, spec, backend)
    kept = T - spec.token_offset
    if connector == "sti":
        assert out.shape == (B, kept + 2 * (kept // 8), C)
    else:
        assert out.shape == (B, kept, 3 * C)


def test_auto_backend_honours_env_torch(monkeypatch):
    spec = ConnectorSpec.preset("clip", "dci")
    hs = make_hidden_states(25, 2, 17, 8, torch.float32, seed=11)
    want = dense_connector_features(hs, spec, backend="torch")
    for value in ("torch", " TORCH "):
        monkeypatch.setenv(BACKEND_ENV, value)
        assert torch.equal(dense_connector_features(hs, spec, backend="auto"), want)
    monkeypatch.setenv(BACKEND_ENV, "")  # empty = unset
    assert torch.equal(dense_connector_features(hs, spec), want)


# --------------------------------------------------------------------------- custom specs
@pytest.mark.parametrize("B", (1, 3))
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CUSTOM_SPECS))
def test_custom_specs(name, dtype, B):
    spec, n = CUSTOM_SPECS[name]
    T = 14  # ragged for every pool size above (13 or 14 kept tokens)
    hs = make_hidden_states(n, B, T, 10, dtype, seed=sorted(CUSTOM_SPECS).index(name) * 7 + B)
    check_features(hs, spec)


def test_layer_in_two_groups_counts_in_both():
    """Direct check of overlap: group means computed by hand from slices."""
    spec = ConnectorSpec("dci", final_layer=1, groups=((0, 3), (2, 4)))
    hs = make_hidden_states(4, 2, 5, 6, torch.float64, seed=3)
    out = dense_connector_features(hs, spec)
    torch.testing.assert_close(out[..., 6:12], (hs[0] + hs[1] + hs[2]) / 3)
    torch.testing.assert_close(out[..., 12:18], (hs[2] + hs[3]) / 2)


def test_list_input_accepted():
    spec = ConnectorSpec.preset("siglip", "sti")
    hs = make_hidden_states(27, 2, 29, 5, torch.float32, seed=4)
    assert torch.equal(dense_connector_features(list(hs), spec),
                       dense_connector_features(hs, spec))


# --------------------------------------------------------------------------- numerics
def test_fp16_group_sum_does_not_overflow():
    """fp32 accumulation: a sum of 12 fp16 values near 60000 overflows fp16, their mean doesn't."""
    spec = ConnectorSpec.preset("clip", "dci")
    g = torch.Generator().manual_seed(5)
    hs = tuple((50000 + 15000 * torch.rand(2, 17, 8, generator=g)).half() for _ in range(25))
    out = check_features(hs, spec, compare_original=False)
    assert torch.isfinite(out).all()
    # the original's fp16 stack-sum overflows on exactly this input: the test is meaningful
    assert torch.isinf(reference.features_from_spec(hs, spec)[..., 8:]).all()


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("connector", ("dci", "sti"))
def test_tolerance_rejects_the_originals_double_rounding(connector, dtype):
    """The single-rounding bound is tight enough to tell fp32 accumulation from the original.

    The original (sum rounded to the dtype, then divided, then pooled) breaks the bound that
    ``assert_close_to_fp64`` holds dc_kernels to, somewhere on random data; dc_kernels meets it.
    A sanity check of the test design: it shows the tolerance is not vacuous.
    """
    spec = ConnectorSpec("sti" if connector == "sti" else "dci", final_layer=26,
                         groups=((0, 13), (13, 26)), pool_size=3)
    hs = make_hidden_states(27, 2, 29, 24, dtype, seed=21)
    ours = dense_connector_features(hs, spec)
    original = reference.features_from_spec(hs, spec)
    exact = reference.features_fp64(hs, spec)
    rtol, atol = tolerances_vs_fp64(dtype, terms=accumulation_terms(spec), magnitude=max_abs(hs))
    bound = atol + rtol * exact.abs()
    assert ((ours.double() - exact).abs() <= bound).all()
    assert ((original.double() - exact).abs() > bound).any()


# --------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("encoder, connector", [("clip", "dci"), ("clip", "sci"),
                                                ("clip", "sti"), ("siglip", "sti"),
                                                ("siglip", "dci")])
def test_strided_views(encoder, connector, dtype):
    spec = ConnectorSpec.preset(encoder, connector)
    B, T, Cc = 3, ENCODER_TOKENS[encoder], 7
    g = torch.Generator().manual_seed(8)
    hs = [strided_layer(LAYOUTS[i % len(LAYOUTS)], B, T, Cc, dtype, g)
          for i in range(spec.num_hidden_states)]
    hs[spec.final_layer] = strided_layer("transposed_tc", B, T, Cc, dtype, g)
    hs[5] = hs[3]  # the same tensor object at two indices
    assert sum(not h.is_contiguous() for h in hs) >= spec.num_hidden_states - 1
    hs = tuple(hs)
    out = check_features(hs, spec)
    assert out.is_contiguous()
    contiguous = tuple(h.contiguous() for h in hs)
    torch.testing.assert_close(out, dense_connector_features(contiguous, spec), rtol=0,
                               atol=2 * UNIT_ROUNDOFF[dtype] * max_abs(hs))


# --------------------------------------------------------------------------- degenerate sizes
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("encoder, T", [("clip", 5), ("clip", 8), ("siglip", 7), ("siglip", 1)])
def test_sti_fewer_tokens_than_pool(encoder, T, dtype):
    spec = ConnectorSpec.preset(encoder, "sti")
    hs = make_hidden_states(spec.num_hidden_states, 2, T, 6, dtype, seed=T)
    out = check_features(hs, spec)
    kept = T - spec.token_offset
    assert out.shape == (2, kept, 6)
    assert torch.equal(out, hs[spec.final_layer][:, spec.token_offset:])


@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
def test_sti_exactly_one_window(dtype):
    spec = ConnectorSpec.preset("clip", "sti")
    hs = make_hidden_states(25, 2, 9, 6, dtype, seed=9)  # 8 kept tokens
    out = check_features(hs, spec)
    assert out.shape == (2, 8 + 2, 6)


@pytest.mark.parametrize("connector", ("dci", "sci", "sti"))
def test_only_cls_token(connector):
    spec = ConnectorSpec.preset("clip", connector)
    hs = make_hidden_states(25, 2, 1, 6, torch.float32, seed=1)
    out = check_features(hs, spec)
    assert out.shape == (2, 0, spec.out_channels(6))


@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("encoder, connector", [(e, c) for e in ("clip", "siglip")
                                                for c in ("dci", "sci", "sti")])
def test_empty_batch(encoder, connector, dtype):
    spec = ConnectorSpec.preset(encoder, connector)
    T = ENCODER_TOKENS[encoder]
    hs = make_hidden_states(spec.num_hidden_states, 0, T, 6, dtype)
    out = check_features(hs, spec)
    assert out.shape == (0, spec.out_tokens(T), spec.out_channels(6))


# --------------------------------------------------------------------------- aliasing
ALIAS_SPECS = [
    ConnectorSpec.preset("clip", "dci"),
    ConnectorSpec.preset("siglip", "sci"),
    ConnectorSpec.preset("siglip", "sti"),
    # the output equals hidden_states[0] exactly: a lazy implementation could return it
    ConnectorSpec("sti", final_layer=0, groups=((0, 1),), pool_size=64),
    ConnectorSpec("dci", final_layer=0, groups=((0, 1),)),
]


@pytest.mark.parametrize("spec", ALIAS_SPECS, ids=lambda s: f"{s.connector_type}-"
                         f"{s.final_layer}-{len(s.groups)}")
def test_output_is_not_an_alias_of_inputs(spec):
    n = spec.required_hidden_states
    hs = make_hidden_states(n, 2, 29, 5, torch.float32, seed=13)
    before = [h.clone() for h in hs]
    out = dense_connector_features(hs, spec)
    assert all(out.untyped_storage().data_ptr() != h.untyped_storage().data_ptr() for h in hs)
    out.fill_(float("nan"))
    for h, b in zip(hs, before):
        assert torch.equal(h, b)


# --------------------------------------------------------------------------- property test
@st.composite
def _cases(draw):
    connector = draw(st.sampled_from(("dci", "sci", "sti")))
    n = draw(st.integers(1, 10))
    groups = []
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, n - 1))
        stop = start + 1 if connector == "sci" else draw(st.integers(start + 1, n))
        groups.append((start, stop))
    drop_cls = draw(st.booleans())
    fixed = draw(st.booleans())
    spec = ConnectorSpec(connector, final_layer=draw(st.integers(0, n - 1)),
                         groups=tuple(groups), drop_cls=drop_cls,
                         pool_size=draw(st.integers(1, 6)),
                         num_hidden_states=n if fixed else None)
    n_given = n if fixed else n + draw(st.integers(0, 3))
    B = draw(st.integers(0, 3))
    T = draw(st.integers(int(drop_cls), 20))
    Cc = draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(ALL_FLOAT_DTYPES))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return spec, n_given, B, T, Cc, dtype, seed


@settings(max_examples=25, deadline=None)
@given(_cases())
def test_random_specs_and_shapes(case):
    spec, n, B, T, Cc, dtype, seed = case
    hs = make_hidden_states(n, B, T, Cc, dtype, seed=seed)
    check_features(hs, spec)


# --------------------------------------------------------------------------- gradients
def _fp64_leaves(n, B, T, Cc, seed):
    return make_hidden_states(n, B, T, Cc, torch.float64, seed=seed, requires_grad=True)


def _with(hs, replacements):
    hs = list(hs)
    for i, t in replacements.items():
        hs[i] = t
    return tuple(hs)


@pytest.mark.parametrize("spec, wrt", [
    (ConnectorSpec("dci", final_layer=3, groups=((0, 3), (2, 4)), drop_cls=True), (0, 2, 3)),
    (ConnectorSpec("sci", final_layer=3, groups=((1, 2), (3, 4))), (1, 3)),
    (ConnectorSpec("sti", final_layer=2, groups=((0, 2), (1, 3)), drop_cls=True, pool_size=2),
     (1, 2)),
], ids=("dci", "sci", "sti"))
def test_gradcheck(spec, wrt):
    hs = make_hidden_states(5, 1, 5 if spec.connector_type != "sti" else 6, 3, torch.float64,
                            seed=17)
    inputs = tuple(hs[i].clone().requires_grad_(True) for i in wrt)

    def f(*xs):
        return dense_connector_features(_with(hs, dict(zip(wrt, xs))), spec, backend="torch")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("spec", [
    ConnectorSpec("dci", final_layer=3, groups=((0, 3), (2, 4)), drop_cls=True),
    ConnectorSpec("sti", final_layer=3, groups=((0, 3), (2, 4), (3, 4)), drop_cls=True,
                  pool_size=2),
    ConnectorSpec.preset("clip", "dci"),
], ids=("dci", "sti", "clip-dci"))
def test_gradients_match_fp64_reference(spec):
    # at least one unused layer (CLIP's index 24; else an extra one)
    n = spec.num_hidden_states or spec.min_hidden_states + 1
    unused = sorted(set(range(n)) - set(spec.used_layers))
    assert unused
    hs = _fp64_leaves(n, 2, 6, 3, seed=23)
    out = dense_connector_features(hs, spec)
    upstream = torch.randn(out.shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(29))
    got = torch.autograd.grad(out, hs, upstream, allow_unused=True)
    want = torch.autograd.grad(reference.features_fp64(hs, spec), hs, upstream,
                               allow_unused=True)
    for i, (a, b) in enumerate(zip(got, want)):
        a = torch.zeros_like(hs[i]) if a is None else a
        b = torch.zeros_like(hs[i]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"grad of hs[{i}]")
    for i in unused:
        assert got[i] is None or not got[i].any(), f"unused hs[{i}] got a gradient"


def test_gradient_of_layer_in_two_groups_and_base():
    """Layer 2 is in both groups, layer 3 is the base and in group 2; CLS gets nothing."""
    Cc = 3
    spec = ConnectorSpec("dci", final_layer=3, groups=((0, 3), (2, 4)), drop_cls=True)
    hs = _fp64_leaves(4, 2, 5, Cc, seed=31)
    out = dense_connector_features(hs, spec)
    gout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, hs, gout)
    g_base, g1, g2 = gout[..., :Cc], gout[..., Cc:2 * Cc], gout[..., 2 * Cc:]
    expect = {0: g1 / 3, 1: g1 / 3, 2: g1 / 3 + g2 / 2, 3: g_base + g2 / 2}
    for i, e in expect.items():
        assert not grads[i][:, 0].any(), f"CLS of hs[{i}] got a gradient"
        torch.testing.assert_close(grads[i][:, 1:], e, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("connector", ("dci", "sti"))
def test_backward_in_low_precision(connector, dtype):
    spec = ConnectorSpec.preset("siglip", connector)
    hs = make_hidden_states(27, 2, 29, 4, dtype, seed=37, requires_grad=True)
    out = dense_connector_features(hs, spec)
    assert out.requires_grad
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(41)).to(dtype)
    got = torch.autograd.grad(out, hs, upstream, allow_unused=True)
    hs64 = tuple(h.detach().double().requires_grad_(True) for h in hs)
    want = torch.autograd.grad(reference.features_fp64(hs64, spec), hs64, upstream.double(),
                               allow_unused=True)
    u = UNIT_ROUNDOFF[dtype]
    scale = upstream.abs().max().item()
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None or not a.any()
            continue
        assert a is not None and a.dtype == dtype, f"hs[{i}]"
        # each grad is upstream / len (one or two roundings) plus, for a layer that is both
        # base and group member, a sum of two such terms: a few ulps of |upstream|
        torch.testing.assert_close(a.double(), b, rtol=2 * u, atol=4 * u * scale,
                                   msg=f"grad of hs[{i}]")


def test_no_grad_output_when_inputs_do_not_require_grad():
    spec = ConnectorSpec.preset("clip", "sti")
    hs = make_hidden_states(25, 1, 17, 4, torch.float32, seed=2)
    assert not dense_connector_features(hs, spec).requires_grad
    leaves = make_hidden_states(25, 1, 17, 4, torch.float32, seed=2, requires_grad=True)
    with torch.no_grad():
        assert not dense_connector_features(leaves, spec).requires_grad


# --------------------------------------------------------------------------- torch.compile
def _traced_cases():
    for encoder in ("clip", "siglip"):
        for connector in ("dci", "sci", "sti"):
            yield f"{encoder}-{connector}", ConnectorSpec.preset(encoder, connector)
    for name, (spec, _) in CUSTOM_SPECS.items():
        yield name, spec


@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name, spec", list(_traced_cases()), ids=[n for n, _ in _traced_cases()])
@pytest.mark.parametrize("T", (1, 7, 29), ids=lambda t: f"T{t}")
def test_traced_formulation_gives_the_eager_bits(name, spec, dtype, T):
    """What torch.compile traces (whole-tensor ops and one cat, torch_ops._features_traced)
    does the eager path's arithmetic in its order: bit-equal to it, evaluated eagerly, on
    strided views, ragged tokens (T=29), only CLS (T=1) and STI with fewer tokens than a window
    (T=7). The compiled graph is checked in the next tests."""
    from dc_kernels.ops import torch_ops
    g = torch.Generator().manual_seed(T)
    n = spec.num_hidden_states or spec.min_hidden_states
    hs = tuple(strided_layer(LAYOUTS[i % len(LAYOUTS)], 2, T, 5, dtype, g) for i in range(n))
    eager = dense_connector_features(hs, spec, backend="torch")
    traced = torch_ops._features_traced(hs, spec)
    assert traced.shape == eager.shape and traced.dtype == eager.dtype
    assert torch.equal(traced, eager)


def _count_graph_nodes(fn, *args):
    nodes = []

    def backend(gm, example_inputs):
        nodes.append(len(gm.graph.nodes))
        return gm.forward
    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return out, sum(nodes)


@pytest.mark.parametrize("connector", ("dci", "sti"))
def test_compile_traces_whole_tensor_ops_not_token_chunks(monkeypatch, connector):
    """Traced, the eager path's token chunks were in-place writes into slices of the output,
    each a functional scatter into the whole output: one CLIP image compiled in ~50 s and ran
    35x slower than eager (docs/DESIGN.md §8). The traced graph is the same size whatever the
    chunking would be: here 1-token chunks (CPU_CHUNK_BYTES and WINDOW_CHUNK_BYTES set to one
    token's fp32) on 33 tokens."""
    from dc_kernels.ops import torch_ops
    spec = ConnectorSpec.preset("clip", connector)
    hs = make_hidden_states(25, 2, 33, 8, torch.bfloat16, seed=3)
    sizes = []
    for chunk in (1 << 20, 2 * 8 * 4):
        monkeypatch.setattr(torch_ops, "CPU_CHUNK_BYTES", chunk)
        monkeypatch.setattr(torch_ops, "WINDOW_CHUNK_BYTES", chunk)
        with torch.no_grad():
            out, nodes = _count_graph_nodes(
                lambda h: dense_connector_features(h, spec, backend="torch"), hs)
        assert torch.equal(out, dense_connector_features(hs, spec, backend="torch"))
        sizes.append(nodes)
    assert sizes[0] == sizes[1], sizes
    # inputs, one slice, one conversion and one add per layer read, a division and a
    # rounding per group, one cat, the output
    assert sizes[0] <= 4 * len(spec.used_layers) + 3 * len(spec.groups) + 30, sizes


@pytest.mark.parametrize("encoder, connector, dtype", [
    ("clip", "dci", torch.bfloat16), ("siglip", "sci", torch.float16),
    ("clip", "sti", torch.float32), ("siglip", "sti", torch.bfloat16)], ids=str)
def test_inductor_compiled_torch_path(encoder, connector, dtype):
    """torch.compile (inductor, fullgraph) of the torch path: DCI/SCI give the eager bits (the
    same elementwise adds in the same order); STI's window sums are reductions whose order
    inductor picks, so STI is held to the fp64 single-rounding bound (and must not be a
    different formula: that bound is a few units in the last place)."""
    spec = ConnectorSpec.preset(encoder, connector)
    g = torch.Generator().manual_seed(11)
    T = ENCODER_TOKENS[encoder]
    hs = tuple(strided_layer(LAYOUTS[i % len(LAYOUTS)], 2, T, C, dtype, g)
               for i in range(spec.num_hidden_states))
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(lambda h: dense_connector_features(h, spec, backend="torch"),
                                 fullgraph=True, dynamic=False)(hs)
    torch._dynamo.reset()
    eager = dense_connector_features(hs, spec, backend="torch")
    assert compiled.shape == eager.shape and compiled.dtype == dtype
    if connector == "sti":
        assert_close_to_fp64(compiled, reference.features_fp64(hs, spec), dtype,
                             terms=accumulation_terms(spec), magnitude=max_abs(hs))
    else:
        assert torch.equal(compiled, eager)
