"""Regression tests for the bugs of issue 17 (found by attacking the public API), one per case.

The randomized versions live in ``test_fuzz.py``; here every bug has a deterministic test that
failed before its fix:

1. the Triton launchers and the layout of every pointer argument (bias, weight, grads);
2. ``StreamingFeatures`` refusing skipped layers and incomplete accumulations;
3. spec size limits (nothing O(range) is built for an absurd spec);
4. checkpoint errors that name the file and the key; malicious pickles are not run;
5. ``DenseConnector(...)`` argument validation;
6. the backends agree on ``requires_grad`` and on GELU(+inf);
7. bf16 subnormals: the Triton interpreter converts them wrongly (a canary here), the compiled
   kernels are checked on them in a ``gpu`` test.

Triton runs on the CPU interpreter without a GPU (conftest); kernel outputs are poisoned with NaN.
"""

from __future__ import annotations

import math
import os
import pickle
import time

import pytest
import torch

import reference
from conftest import (UNIT_ROUNDOFF, assert_close_to_fp64, accumulation_terms,
                      make_hidden_states, max_abs, poison_outputs)
from dc_kernels import (ConnectorSpec, DenseConnector, StreamingFeatures,
                        dense_connector_features, dense_connector_linear)
from dc_kernels.spec import MAX_HIDDEN_STATES, MAX_POOL_SIZE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPEC = ConnectorSpec("dci", final_layer=4, groups=((0, 3), (2, 5)), drop_cls=True)


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    """Every kernel output starts as NaN: unwritten elements cannot pass."""
    poison_outputs(monkeypatch)


def _linear_exact(hs, spec, w, b, activation):
    # fp64 GEMM on the features as the kernels round them (checked against fp64 elsewhere)
    a = dense_connector_features(hs, spec, backend="torch").double()
    y = torch.nn.functional.linear(a, w.double(), None if b is None else b.double())
    return torch.nn.functional.gelu(y) if activation == "gelu" else y, a


def _assert_linear_close(out, hs, spec, w, b, activation, dtype):
    want, a = _linear_exact(hs, spec, w, b, activation)
    scale = a.abs().reshape(-1, a.shape[-1]) @ w.double().abs().T
    if b is not None:
        scale = scale + b.double().abs()
    atol = 2 * 1.13 * (a.shape[-1] + 2) * UNIT_ROUNDOFF[torch.float32] * float(scale.max())
    torch.testing.assert_close(out.double(), want, rtol=2 * UNIT_ROUNDOFF[dtype], atol=atol)


# --------------------------------------------------------------------------- 1. layouts
def _bias(kind, n, dtype, g):
    if kind == "contiguous":
        return torch.randn(n, generator=g).to(dtype)
    if kind == "step2":  # torch.randn(12)[::2]
        return torch.randn(2 * n, generator=g).to(dtype)[::2]
    if kind == "matrix_column":
        return torch.randn(n, 3, generator=g).to(dtype)[:, 1]
    if kind == "expanded":  # stride 0: the old launcher read n - 1 elements past the storage
        return torch.full((1,), 0.5).to(dtype).expand(n)
    if kind == "offset_view":
        return torch.randn(n + 7, generator=g).to(dtype)[7:]
    raise AssertionError(kind)


BIAS_KINDS = ("contiguous", "step2", "matrix_column", "expanded", "offset_view")


@pytest.mark.parametrize("path", ("fused", "two-pass"))  # "auto" picks one of the two
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", BIAS_KINDS)
def test_linear_bias_layouts(kind, dtype, path):
    g = torch.Generator().manual_seed(1)
    hs = make_hidden_states(5, 2, 9, 6, dtype, seed=2, device=DEVICE)
    w = (torch.randn(11, 18, generator=g) / 4).to(dtype).to(DEVICE)
    b = _bias(kind, 11, dtype, g).to(DEVICE)
    out = dense_connector_linear(hs, SPEC, w, b, "gelu", backend="triton", path=path)
    _assert_linear_close(out, hs, SPEC, w, b, "gelu", dtype)


def _weight(kind, n, k, dtype, g):
    if kind == "transposed_storage":  # [K, N] buffer seen as [N, K]: strides (1, N)
        return (torch.randn(k, n, generator=g) / 4).to(dtype).T
    if kind == "column_window":
        return (torch.randn(n, k + 5, generator=g) / 4).to(dtype)[:, 3:3 + k]
    if kind == "row_step":
        return (torch.randn(2 * n, k, generator=g) / 4).to(dtype)[::2]
    if kind == "expanded_rows":  # every output column the same weights: stride 0 on N
        return (torch.randn(1, k, generator=g) / 4).to(dtype).expand(n, k)
    raise AssertionError(kind)


@pytest.mark.parametrize("path", ("fused", "two-pass"))
@pytest.mark.parametrize("kind", ("transposed_storage", "column_window", "row_step",
                                  "expanded_rows"))
def test_linear_weight_layouts(kind, path):
    g = torch.Generator().manual_seed(3)
    hs = make_hidden_states(5, 2, 9, 6, torch.float16, seed=4, device=DEVICE)
    w = _weight(kind, 13, 18, torch.float16, g).to(DEVICE)
    b = _bias("contiguous", 13, torch.float16, g).to(DEVICE)
    out = dense_connector_linear(hs, SPEC, w, b, None, backend="triton", path=path)
    _assert_linear_close(out, hs, SPEC, w, b, None, torch.float16)


def _grad_output(kind, shape, dtype, g):
    if kind == "contiguous":
        return torch.randn(shape, generator=g).to(dtype)
    if kind == "expanded":  # what y.sum().backward() hands over: every stride 0
        return torch.ones(()).to(dtype).expand(shape)
    if kind == "transposed":
        return torch.randn(shape[0], shape[2], shape[1], generator=g).to(dtype).transpose(1, 2)
    if kind == "channel_step":
        return torch.randn(*shape[:2], 2 * shape[2], generator=g).to(dtype)[..., ::2]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ("contiguous", "expanded", "transposed", "channel_step"))
@pytest.mark.parametrize("op", ("features", "linear"))
def test_backward_grad_output_layouts(op, kind):
    # the scatter kernel reads dL/dA: any layout of the incoming gradient is handled
    g = torch.Generator().manual_seed(5)
    hs = [h.requires_grad_() for h in make_hidden_states(5, 2, 7, 6, torch.float32, seed=6,
                                                          device=DEVICE)]
    w = (torch.randn(9, 18, generator=g) / 4).to(DEVICE).requires_grad_()
    b = torch.randn(9, generator=g).to(DEVICE).requires_grad_()
    grads = {}
    for backend in ("triton", "torch"):
        if op == "features":
            y = dense_connector_features(hs, SPEC, backend=backend)
            inputs = [hs[i] for i in SPEC.used_layers]
        else:
            y = dense_connector_linear(hs, SPEC, w, b, "gelu", backend=backend)
            inputs = [hs[i] for i in SPEC.used_layers] + [w, b]
        dy = _grad_output(kind, y.shape, y.dtype, torch.Generator().manual_seed(7)).to(DEVICE)
        grads[backend] = torch.autograd.grad(y, inputs, dy)
    for got, want in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 2. streaming
STREAM_SPEC = ConnectorSpec("dci", final_layer=3, groups=((0, 2), (2, 4)))


def test_streaming_skipping_the_first_read_layer_is_named():
    # before: KeyError: 0 when index 1 arrived with its group's accumulator missing
    hs = make_hidden_states(5, 2, 6, 4)
    acc = StreamingFeatures(STREAM_SPEC)
    with pytest.raises(ValueError, match=r"hidden state 1 arrived but hidden state\(s\) \[0\]"):
        acc.add(1, hs[1])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_streaming_skipping_a_middle_layer_is_refused(dtype):
    # before: a wrong slab (uninitialised memory: errors up to 2e38 in bf16)
    hs = make_hidden_states(5, 2, 6, 4, dtype)
    acc = StreamingFeatures(STREAM_SPEC)
    acc.add(0, hs[0])
    acc.add(1, hs[1])
    with pytest.raises(ValueError, match=r"\[2\], which the spec reads, were skipped"):
        acc.add(3, hs[3])
    with pytest.raises(ValueError, match=r"incomplete.*missing: \[2, 3\]"):
        acc.finish()


def test_streaming_sti_skip_and_unread_layers():
    spec = ConnectorSpec("sti", final_layer=5, groups=((1, 3), (3, 4)), drop_cls=True,
                         pool_size=2)
    hs = make_hidden_states(7, 2, 9, 4)
    acc = StreamingFeatures(spec)
    acc.add(1, hs[1])  # index 0 is not read: skipping it is fine
    acc.add(2, hs[2])
    with pytest.raises(ValueError, match=r"\[3\]"):
        acc.add(4, hs[4])  # index 4 is not read, but 3 (read) was skipped
    acc.add(3, hs[3])
    acc.add(5, hs[5])  # 4 (unread) skipped: fine
    assert torch.equal(acc.finish(), dense_connector_features(hs, spec, backend="torch"))


def test_streaming_finish_before_anything_was_added():
    with pytest.raises(ValueError, match=r"incomplete.*missing: \[0, 1, 2, 3\]"):
        StreamingFeatures(STREAM_SPEC).finish()


# --------------------------------------------------------------------------- 3. spec limits
@pytest.mark.parametrize("kwargs, match", [
    (dict(groups=((0, 10 ** 9),)), r"groups\[0\] = \(0, 1000000000\): stop is out of range"),
    (dict(groups=((0, MAX_HIDDEN_STATES + 1),)), "out of range"),
    (dict(groups=(range(10 ** 9),)), r"groups\[0\] must be a pair of ints"),
    (dict(groups=((0, 1),), final_layer=10 ** 30), "final_layer=.* is out of range"),
    (dict(groups=((0, 1),), num_hidden_states=10 ** 12), "num_hidden_states=.* too large"),
    (dict(connector_type="sti", groups=((0, 1),), pool_size=2 ** 63), "pool_size=.* too large"),
    (dict(connector_type="sti", groups=((0, 1),), pool_size=MAX_POOL_SIZE + 1), "too large"),
])
def test_spec_refuses_absurd_sizes_at_once(kwargs, match):
    args = dict(connector_type="dci", final_layer=0)
    args.update(kwargs)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        ConnectorSpec(**args)
    # before: used_layers / StreamingFeatures built the whole range (MemoryError after 37 s)
    assert time.perf_counter() - t0 < 5.0


def test_spec_largest_accepted_sizes_work():
    spec = ConnectorSpec("dci", final_layer=0, groups=((MAX_HIDDEN_STATES - 1,
                                                        MAX_HIDDEN_STATES),))
    assert spec.used_layers == (0, MAX_HIDDEN_STATES - 1)
    assert StreamingFeatures(spec).last_index == MAX_HIDDEN_STATES - 1


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_sti_largest_pool_size(backend):
    # before: pool_size >= 2**63 was accepted; the Triton path failed on the int argument
    spec = ConnectorSpec("sti", final_layer=2, groups=((0, 2),), pool_size=MAX_POOL_SIZE)
    hs = make_hidden_states(3, 2, 5, 4, device=DEVICE)
    out = dense_connector_features(hs, spec, backend=backend)
    assert torch.equal(out, hs[2])  # no window fits: only the base tokens
    w = torch.randn(3, 4, device=DEVICE)
    y = dense_connector_linear(hs, spec, w, None, backend=backend)
    torch.testing.assert_close(y, hs[2] @ w.T, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 4. checkpoints
def _connector():
    return DenseConnector(ConnectorSpec.preset("clip", "dci"), 4, 6)


def test_checkpoint_empty_file(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"'.*empty\.bin' is empty or truncated"):
        _connector().load_mm_projector(path)


@pytest.mark.parametrize("content", [os.urandom(2000), b"hello, not a checkpoint\n",
                                     pickle.dumps({"0.weight": [1.0]}, protocol=4)],
                         ids=("random", "text", "plain_pickle"))
def test_checkpoint_corrupt_file(tmp_path, content):
    path = tmp_path / "mm_projector.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"'.*mm_projector\.bin' is not a readable PyTorch "
                                         r"checkpoint \(corrupt"):
        _connector().load_mm_projector(path)


def test_checkpoint_truncated_file(tmp_path):
    path = tmp_path / "cut.bin"
    torch.save(_connector().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"'.*cut\.bin' is (not a readable|empty or trunc)"):
        _connector().load_mm_projector(path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates a file if the pickle is ever executed


def test_checkpoint_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"0.weight": _Exploit(str(marker))}, path)
    with pytest.raises(ValueError, match=r"'.*evil\.bin' holds Python objects other than "
                                         r"tensors.*GLOBAL"):
        _connector().load_mm_projector(path)
    assert not marker.exists(), "the checkpoint's code ran"


def test_checkpoint_non_tensor_value_and_non_string_key(tmp_path):
    m = _connector()
    sd = dict(m.state_dict())
    sd["0.bias"] = [0.0] * 6
    with pytest.raises(TypeError, match=r"checkpoint: the value of '0.bias' is a list"):
        m.load_mm_projector(sd)
    path = tmp_path / "keys.bin"
    torch.save({**m.state_dict(), 7: torch.zeros(1)}, path)
    with pytest.raises(TypeError, match=r"'.*keys\.bin' has a key 7 of type int"):
        m.load_mm_projector(path)
    path = tmp_path / "list.bin"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(TypeError, match=r"'.*list\.bin' must be a state dict.*got list"):
        m.load_mm_projector(path)
    with pytest.raises(FileNotFoundError):
        m.load_mm_projector(tmp_path / "missing.bin")


# --------------------------------------------------------------------------- 5. arguments
@pytest.mark.parametrize("args, exc, match", [
    ((2.5, 8), TypeError, r"vision_hidden_size must be an int, got 2\.5"),
    ((True, 8), TypeError, "vision_hidden_size must be an int, got True"),
    (("4", 8), TypeError, "vision_hidden_size must be an int"),
    ((-4, 8), ValueError, "vision_hidden_size must be >= 1, got -4"),
    ((0, 8), ValueError, "vision_hidden_size must be >= 1, got 0"),
    ((4, 8.0), TypeError, "hidden_size must be an int"),
    ((4, -1), ValueError, "hidden_size must be >= 1, got -1"),
    ((4, 8, None), TypeError, "projector_type must be a str"),
    ((4, 8, "mlp0x_gelu"), ValueError, "projector_type must be one of"),
    ((4, 8, "mlp2x_relu"), ValueError, "projector_type must be one of"),
    ((4, 8, "mlp2x_gelu", "cuda"), ValueError, "backend must be one of"),
    ((4, 8, "mlp2x_gelu", None), ValueError, "backend must be one of"),
])
def test_dense_connector_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        DenseConnector(ConnectorSpec.preset("clip", "sti"), *args)


def test_dense_connector_accepts_integer_scalars():
    np = pytest.importorskip("numpy")
    m = DenseConnector(ConnectorSpec.preset("clip", "dci"), np.int64(4), np.int32(6), "mlp3x_gelu")
    assert (m.vision_hidden_size, m.hidden_size) == (4, 6) and type(m.hidden_size) is int


@pytest.mark.parametrize("interpret", ("1", "0"))
@pytest.mark.parametrize("backend", ("torch", "triton", "auto"))
@pytest.mark.parametrize("kind", ("dci", "sti"))
def test_meta_tensors_give_meta_outputs_on_every_backend(monkeypatch, interpret, backend, kind):
    """Meta inputs (no data: shape inference, a model built on ``torch.device("meta")``) give
    meta outputs shaped as real inputs' outputs, with autograd, on every backend and whether or
    not the interpreter is on. Before 2026-12-07 the Triton backend launched a kernel on them
    (NotImplementedError from inside Triton's interpreter) or refused them as not CUDA."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    spec = ConnectorSpec.preset("clip", kind)
    B, T, C, N = 2, 10, 8, 12
    real = make_hidden_states(25, B, T, C, seed=0)
    w_real = torch.randn(N, spec.out_channels(C))
    feats_shape = dense_connector_features(real, spec, backend="torch").shape
    lin_shape = dense_connector_linear(real, spec, w_real, None, "gelu", backend="torch").shape
    hs = [torch.empty(B, T, C, device="meta", requires_grad=True) for _ in range(25)]
    w = torch.empty(N, spec.out_channels(C), device="meta", requires_grad=True)
    b = torch.empty(N, device="meta", requires_grad=True)
    feats = dense_connector_features(hs, spec, backend=backend)
    assert (feats.device.type, feats.shape, feats.dtype) == ("meta", feats_shape, torch.float32)
    assert feats.requires_grad
    for bias in (None, b):
        y = dense_connector_linear(hs, spec, w, bias, "gelu", backend=backend)
        assert (y.device.type, y.shape, y.requires_grad) == ("meta", lin_shape, True)
        y.sum().backward()
        assert w.grad is not None and w.grad.device.type == "meta" and w.grad.shape == w.shape
        for i in spec.used_layers:
            assert hs[i].grad is not None and hs[i].grad.shape == (B, T, C), i
        w.grad = None
    with torch.no_grad():  # the plan routes (no autograd) as well
        assert dense_connector_features(hs, spec, backend=backend).shape == feats_shape
        assert dense_connector_linear(hs, spec, w, b, None, backend=backend).shape == lin_shape
    if backend != "torch":  # the dtype check still applies (fp64 has no Triton path)
        hs64 = [h.detach().double() for h in hs]
        if backend == "triton":
            with pytest.raises(ValueError, match="Triton backend supports"):
                dense_connector_features(hs64, spec, backend=backend)
        else:
            assert dense_connector_features(hs64, spec, backend=backend).dtype == torch.float64


# --------------------------------------------------------------------------- 6. agreement
@pytest.mark.parametrize("case", ("sti_no_window", "only_cls", "unread_layer_only"))
@pytest.mark.parametrize("op", ("features", "linear"))
def test_backends_agree_on_requires_grad(case, op):
    if case == "sti_no_window":  # 4 kept tokens < pool 8: the groups add no token
        spec, T, wants = ConnectorSpec("sti", 2, ((0, 2),), pool_size=8), 5, {0, 1}
    elif case == "only_cls":  # T' = 0: nothing is read at all
        spec, T, wants = ConnectorSpec("dci", 2, ((0, 2),), drop_cls=True), 1, {0}
    else:  # the only layer that requires grad is not read by the spec
        spec, T, wants = ConnectorSpec("dci", 1, ((0, 2),)), 5, {2}
    hs = [h.requires_grad_(i in wants) for i, h in
          enumerate(make_hidden_states(3, 2, T, 4, device=DEVICE))]
    read = [hs[i] for i in spec.used_layers if i in wants]
    flags, grads = {}, {}
    for backend in ("torch", "triton"):
        if op == "features":
            y = dense_connector_features(hs, spec, backend=backend)
        else:
            y = dense_connector_linear(hs, spec, torch.randn(3, 4 * (spec.num_groups + 1)
                                                             if spec.connector_type != "sti"
                                                             else 4, device=DEVICE),
                                       None, "gelu", backend=backend)
        flags[backend] = y.requires_grad
        if y.requires_grad:
            grads[backend] = torch.autograd.grad(y.sum(), read)
    # the original: torch.cat of (possibly empty) pieces of the read layers
    assert flags["torch"] == flags["triton"] == bool(read)
    for backend in grads:  # no element read: zero gradients
        for gr in grads[backend]:
            assert gr.shape == hs[0].shape and not gr.any()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_backends_agree_on_gelu_of_infinities(dtype):
    # +inf -> +inf (torch's vectorised CPU GELU gave NaN, Triton +inf); -inf -> NaN on both
    spec = ConnectorSpec("sci", final_layer=0, groups=((1, 2),))
    hs = make_hidden_states(2, 2, 13, 3, dtype, seed=8, device=DEVICE)
    w = torch.randn(20, 6, generator=torch.Generator().manual_seed(9)).to(dtype).to(DEVICE)
    b = torch.zeros(20, dtype=dtype, device=DEVICE)
    b[::3] = math.inf
    b[1::3] = -math.inf
    outs = {}
    for backend in ("torch", "triton"):
        for grad in (False, True):  # in-place (inference) and autograd variants of the torch path
            w.requires_grad_(grad)
            outs[backend, grad] = dense_connector_linear(hs, spec, w, b, "gelu",
                                                         backend=backend).detach()
    want = outs["torch", False]
    assert torch.isposinf(want[..., ::3]).all() and torch.isnan(want[..., 1::3]).all()
    assert torch.isfinite(want[..., 2::3]).all()
    for key, got in outs.items():
        torch.testing.assert_close(got, want, rtol=2 * UNIT_ROUNDOFF[dtype], atol=1e-2,
                                   equal_nan=True, msg=lambda m: f"{key}: {m}")


# --------------------------------------------------------------------------- 7. bf16 subnormals
def _subnormal_states(n, device):
    # bf16 values in and around the subnormal range (|x| < 2^-126), with signs
    tiny = torch.finfo(torch.bfloat16).smallest_normal
    g = torch.Generator().manual_seed(10)
    return tuple((torch.randn(2, 9, 24, generator=g) * tiny).to(torch.bfloat16).to(device)
                 for _ in range(n))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a canary of the CPU interpreter")
def test_interpreter_still_converts_bf16_subnormals_wrongly():
    """Why the interpreter tests keep bf16 data out of the subnormal range.

    triton 3.9's interpreter converts bf16 subnormals wrongly (to fp32 and back: 2^-127 reads
    as 0), so group means of subnormal inputs are wrong under the interpreter only. The fuzz
    suite (``test_fuzz.py``, ``magnitudes``) therefore draws bf16 data away from that range on
    the interpreter, and ``test_bf16_subnormal_group_means_compiled`` covers it on a GPU. When
    this canary fails, the interpreter is fixed: drop the exclusion in ``test_fuzz.py``.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def upcast(x, y, N: tl.constexpr):
        o = tl.arange(0, N)
        tl.store(y + o, tl.load(x + o).to(tl.float32))

    tiny = torch.finfo(torch.bfloat16).smallest_normal
    x = torch.tensor([tiny / 2, tiny / 4, tiny * 0.75, tiny * 1.5], dtype=torch.bfloat16)
    y = torch.empty(4)
    upcast[(1,)](x, y, 4)
    assert not torch.equal(y, x.float()), "the interpreter now converts bf16 subnormals right"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled kernels)")
@pytest.mark.parametrize("path", ("fused", "two-pass"))
def test_bf16_subnormal_group_means_compiled(path):
    spec = ConnectorSpec("dci", final_layer=5, groups=((0, 3), (3, 6)), drop_cls=True)
    hs = _subnormal_states(6, "cuda")
    out = dense_connector_features(hs, spec, backend="triton")
    assert torch.equal(out, dense_connector_features(hs, spec, backend="torch"))
    assert_close_to_fp64(out, reference.features_fp64(hs, spec), torch.bfloat16,
                         terms=accumulation_terms(spec), magnitude=max_abs(hs))
    sti = ConnectorSpec("sti", final_layer=5, groups=((0, 3), (3, 6)), drop_cls=True,
                        pool_size=2)
    got = dense_connector_features(hs, sti, backend="triton")
    assert_close_to_fp64(got, reference.features_fp64(hs, sti), torch.bfloat16,
                         terms=accumulation_terms(sti), magnitude=max_abs(hs))
    # the linear kernel builds the same means in its K loop; weights of 2^64 bring the
    # products into the normal fp32 range, so only the subnormal A is under test
    w = (torch.randn(16, spec.out_channels(24), device="cuda") * 2.0 ** 64).to(torch.bfloat16)
    y = dense_connector_linear(hs, spec, w, None, None, backend="triton", path=path)
    _assert_linear_close(y, hs, spec, w, None, None, torch.bfloat16)


# --------------------------------------------------------------------------- CPU chunk pool
# The torch path deals its cache-sized token chunks to worker threads with one intra-op thread
# each (robust on a machine where another process holds a core; benchmarks/results/*-loaded*).
# The arithmetic per element is the same, so the result must be the same bits as inline.
# fp32 accumulates in its output slab, bf16 in a per-worker fp32 buffer (fp64 and fp16 take
# the same two branches)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", ("dci", "sci", "sti"))
def test_chunk_pool_gives_the_inline_bits(monkeypatch, kind, dtype):
    from dc_kernels.ops import torch_ops
    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)  # the pool needs at least two intra-op threads
    spec = ConnectorSpec.preset("clip", kind)
    hs = make_hidden_states(25, 3, 97, 256, dtype, seed=11)  # 3*96*256*4 B: above the minimum
    assert 4 * 3 * 96 * 256 >= torch_ops.PARALLEL_MIN_BYTES
    assert torch_ops.chunk_workers(torch.device("cpu"), hs) > 1
    calls = []
    real = torch_ops._run_chunks
    monkeypatch.setattr(torch_ops, "_run_chunks",
                        lambda fn, chunks, workers: (calls.append(workers),
                                                     real(fn, chunks, workers))[1])
    pooled = dense_connector_features(hs, spec, backend="torch")
    if kind == "sti":  # STI's few large window sums run inline by design (torch_ops.window_sums)
        assert max(calls, default=1) == 1, "STI's window sums went to the pool"
    else:
        assert max(calls) > 1, "the pool was not used"
    monkeypatch.setenv(torch_ops.CHUNK_POOL_ENV, "0")
    calls.clear()
    inline = dense_connector_features(hs, spec, backend="torch")
    assert max(calls, default=1) == 1
    assert torch.equal(pooled, inline)
    assert torch.equal(pooled, torch_ops.features_torch(hs, spec, 3, 97, 256))
    assert_close_to_fp64(pooled, reference.features_fp64(hs, spec), dtype,
                         terms=accumulation_terms(spec), magnitude=max_abs(hs))


@pytest.mark.parametrize("tokens,batch,channels", [(576, 1, 1024), (576, 2, 1024), (729, 4, 1152),
                                                    (72, 1, 8192), (97, 3, 256), (3, 1, 8),
                                                    (1, 1, 8), (5, 1, 1 << 19)])
@pytest.mark.parametrize("workers", (1, 2, 3, 4))
def test_token_chunks_cover_the_tokens_in_near_equal_cache_sized_shares(tokens, batch, channels,
                                                                         workers):
    from dc_kernels.ops import torch_ops
    chunks = torch_ops._token_chunks(tokens, batch, channels, torch.device("cpu"), workers)
    assert chunks[0][0] == 0 and chunks[-1][1] == tokens
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])), "gaps or overlaps"
    sizes = [t1 - t0 for t0, t1 in chunks]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    per_token = 4 * batch * channels
    assert max(sizes) * per_token <= max(torch_ops.CPU_CHUNK_BYTES, per_token)
    if workers > 1 and len(chunks) < tokens:
        assert len(chunks) % workers == 0
        assert len(chunks) >= workers * torch_ops.POOL_CHUNKS_PER_WORKER
        # no more rounds than the cache bound or the per-worker minimum asks for
        fewer = len(chunks) - workers
        assert fewer < workers * torch_ops.POOL_CHUNKS_PER_WORKER or \
            -(-tokens // fewer) * per_token > torch_ops.CPU_CHUNK_BYTES
    elif workers > 1:  # fewer tokens than the chunks asked for: one token each
        assert len(chunks) == tokens
    else:
        assert len(chunks) == -(-tokens // max(1, torch_ops.CPU_CHUNK_BYTES // per_token))
    assert torch_ops._token_chunks(0, batch, channels, torch.device("cpu"), workers) == []
    assert torch_ops._token_chunks(tokens, batch, channels, torch.device("meta"),
                                   workers) == [(0, tokens)]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
def test_window_sums_in_chunks_give_the_whole_ops_bits(monkeypatch, dtype):
    # STI's window sums convert a narrow input in window chunks (WINDOW_CHUNK_BYTES); a
    # budget of two windows forces the chunked loop, ragged (61 tokens: 15 windows of 4,
    # one token dropped) on a strided view; the sums must equal one whole op's and fp64's
    from dc_kernels.ops import torch_ops
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(3, 62, 80, generator=g) * 3).to(dtype)[:, 1:, ::2]
    whole = torch_ops.window_sums(x, 4, torch.float32)
    monkeypatch.setattr(torch_ops, "WINDOW_CHUNK_BYTES", 2 * 4 * 3 * 40 * 4)
    calls = []
    real = x.__class__.to
    monkeypatch.setattr(x.__class__, "to", lambda t, *a, **k: (calls.append(t.shape),
                                                               real(t, *a, **k))[1])
    chunked = torch_ops.window_sums(x, 4, torch.float32)
    monkeypatch.undo()
    if dtype != torch.float32:
        assert [c[1] for c in calls] == [1] + [2] * 7, calls  # 15 windows: 8 near-equal chunks
    assert chunked.dtype == torch.float32 and chunked.shape == (3, 15, 40)
    assert torch.equal(chunked, whole)
    exact = x.double()[:, :60].unflatten(1, (15, 4)).sum(2)
    assert_close_to_fp64(chunked, exact, torch.float32, terms=4, magnitude=max_abs([x]))


def test_chunk_pool_is_not_used_while_recording_autograd():
    from dc_kernels.ops import torch_ops
    hs = [h.requires_grad_() for h in make_hidden_states(3, 3, 97, 256, seed=12)]
    assert torch_ops.chunk_workers(torch.device("cpu"), hs) == 1
    with torch.no_grad():
        assert torch_ops.chunk_workers(torch.device("cpu"), hs) == torch.get_num_threads() \
            or torch.get_num_threads() == 1


def test_chunk_pool_keeps_the_callers_thread_settings_and_raises_worker_errors():
    import threading
    from dc_kernels.ops import torch_ops
    n = max(2, torch.get_num_threads())
    torch.set_num_threads(n)
    torch_ops._get_pool(n)
    assert torch.get_num_threads() == n
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [n], "a thread started after the pool must get the process's setting"
    assert torch_ops._get_pool(n).submit(torch.get_num_threads).result() == 1

    def boom(t0, t1):
        if t0 == 2:
            raise ValueError("chunk 2 failed")
    with pytest.raises(ValueError, match="chunk 2 failed"):
        torch_ops._run_chunks(boom, [(0, 1), (1, 2), (2, 3), (3, 4)], n)


@pytest.mark.parametrize("kind", BIAS_KINDS)
def test_gemm_launcher_bias_layouts(kind):
    # the second-pass GEMM launcher (persistent TMA kernel where eligible, else the cp.async
    # one) called directly, as the overlapped path does, with a bias of any layout
    from dc_kernels.ops import linear as linear_ops
    g = torch.Generator().manual_seed(13)
    a = torch.randn(37, 48, generator=g).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(40, 48, generator=g) / 7).to(torch.bfloat16).to(DEVICE)
    b = _bias(kind, 40, torch.bfloat16, g).to(DEVICE)
    out = torch.full((37, 40), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    linear_ops.gemm(a, w, b, "gelu", out)
    want = torch.nn.functional.gelu(a.double() @ w.double().T + b.double())
    scale = a.double().abs() @ w.double().abs().T + b.double().abs()
    atol = 2 * 1.13 * 50 * UNIT_ROUNDOFF[torch.float32] * float(scale.max())
    torch.testing.assert_close(out.double(), want, rtol=2 * UNIT_ROUNDOFF[torch.bfloat16],
                               atol=atol)


def test_features_launcher_refuses_a_strided_out():
    from dc_kernels.ops.features import features_triton
    spec = ConnectorSpec.preset("clip", "dci")
    hs = make_hidden_states(25, 2, 9, 8, device=DEVICE)
    bad = torch.empty(2, 8, 48, device=DEVICE)[..., :24]
    with pytest.raises(ValueError, match="out must be a contiguous"):
        features_triton(hs, spec, 2, 9, 8, out=bad)
    good = torch.full((2, 8, 24), float("nan"), device=DEVICE)
    assert features_triton(hs, spec, 2, 9, 8, out=good) is good
    assert torch.equal(good, dense_connector_features(hs, spec, backend="torch"))


# --------------------------------------------------------------------------- the interpreter
@pytest.fixture
def fresh_probe():
    from dc_kernels.ops import common
    common.interpreter_problem.cache_clear()
    yield common
    common.interpreter_problem.cache_clear()  # the real probe again for later tests


@pytest.mark.skipif(torch.cuda.is_available(), reason="probes the CPU interpreter")
def test_interpreter_probe_passes_where_the_interpreter_runs(fresh_probe):
    assert fresh_probe.interpreter_problem() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="probes the CPU interpreter")
def test_interpreter_probe_under_a_fake_tensor_mode_is_real(fresh_probe):
    # a shape-only trace (benchmarks.module_fwd_bwd's saved-tensor table) may make the first
    # Triton call of a process: the probe must still launch on real tensors (a fake one failed
    # and was cached), and the call then reaches the op's fake kernel
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    spec = ConnectorSpec.preset("clip", "dci")
    with FakeTensorMode():
        hs = tuple(torch.empty(2, 577, 1024, dtype=torch.bfloat16) for _ in range(25))
        w = torch.empty(4096, spec.out_channels(1024), dtype=torch.bfloat16)
        b = torch.empty(4096, dtype=torch.bfloat16)
        y = dense_connector_linear(hs, spec, w, b, "gelu", backend="triton")
    assert isinstance(y, FakeTensor) and y.shape == (2, 576, 4096) and y.dtype == torch.bfloat16
    assert fresh_probe.interpreter_problem.cache_info().currsize == 1
    assert fresh_probe.interpreter_problem() is None


class _ProbeStandIn:
    """Stands in for the probe kernel: ``[grid](out, n, STEP=...)`` raises or writes zeros.
    The real failure (triton 3.6 with numpy 2.4) is run by .ci/interp36."""

    def __init__(self, error):
        self.error = error

    def __getitem__(self, grid):
        def launch(out, n, STEP):
            if self.error is not None:
                raise self.error
            out.zero_()
        return launch


@pytest.mark.parametrize("error, match", [
    (TypeError("only 0-dimensional arrays can be converted to Python scalars"),
     r"cannot run dc_kernels' kernels with numpy .*0-dimensional.*install numpy<2\.4"),
    (None, r"cannot run dc_kernels' kernels .*wrong result \[0\.0, 0\.0"),
])
def test_interpreter_that_cannot_run_here_is_named_before_any_launch(monkeypatch, fresh_probe,
                                                                      error, match):
    monkeypatch.setattr(fresh_probe, "_interpreter_probe_kernel", _ProbeStandIn(error))
    monkeypatch.setattr(fresh_probe, "interpreting", lambda: True)

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel launched after the probe failed")
    monkeypatch.setattr(fresh_probe, "empty", no_launch)  # every kernel output is made here
    hs = make_hidden_states(25, 1, 5, 16, torch.float32, seed=3)
    with pytest.raises(RuntimeError, match=match):
        dense_connector_features(hs, ConnectorSpec.preset("clip", "dci"), backend="triton")
