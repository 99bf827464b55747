"""The first projector layer as a module (DenseConnectorLinear), column shards, outputs.

Single-process tests; the multi-rank ones (DDP, FSDP, DeepSpeed, DTensor) are in
tests/test_distributed.py.
"""

import copy

import pytest
import torch
from torch import nn

import reference
from conftest import GELU_SLOPE, gemm_order_close, make_hidden_states, poison_outputs
from dc_kernels import BACKEND_ENV, ConnectorSpec, DenseConnector, DenseConnectorLinear, \
    dense_connector_features, dense_connector_linear
from dc_kernels.distributed import any_dtensor, shard_range
from dc_kernels.functional import column_shard_path
from dc_kernels.ops import common, linear as linear_ops, path as path_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton")
SPEC = ConnectorSpec.preset("clip", "dci")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    poison_outputs(monkeypatch)


def _hs(C=12, B=2, T=9, dtype=torch.float32, seed=0, **kw):
    return make_hidden_states(SPEC.num_hidden_states, B, T, C, dtype, seed, device=DEVICE, **kw)


# --------------------------------------------------------------------------- structure
def test_first_layer_is_a_called_nn_linear():
    m = DenseConnector(SPEC, 12, 20)
    first = m.get_submodule("0")
    assert isinstance(first, DenseConnectorLinear) and isinstance(first, nn.Linear)
    assert first.activation == "gelu" and (first.in_features, first.out_features) == (36, 20)
    assert list(m.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    calls = []
    first.register_forward_pre_hook(lambda mod, args: calls.append(type(args[0])))
    m(_hs())
    assert calls == [tuple], "the first layer's forward was not called with the hidden states"
    # the generic loop of FSDP2 users finds it
    assert [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)] == ["0", "2"]


def test_from_projector_shares_parameters_with_the_first_layer():
    torch.manual_seed(0)
    proj = reference.build_projector(36, 20, "mlp2x_gelu")
    m = DenseConnector.from_projector(SPEC, proj)
    assert m.get_submodule("0").weight is proj[0].weight
    assert m.get_submodule("0").bias is proj[0].bias
    assert m.get_submodule("2") is proj[2]
    assert {id(p) for p in m.parameters()} == {id(p) for p in proj.parameters()}
    assert type(proj[0]) is nn.Linear  # the user's projector is not modified


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_connector_linear_module_equals_the_function(backend):
    torch.manual_seed(1)
    lin = nn.Linear(36, 21).to(DEVICE)
    layer = DenseConnectorLinear.from_linear(SPEC, lin, "gelu", backend)
    hs = _hs(seed=3)
    expect = dense_connector_linear(hs, SPEC, lin.weight, lin.bias, "gelu", backend=backend)
    assert torch.equal(layer(hs), expect)
    # ready-made features: nn.Linear + GELU
    feats = dense_connector_features(hs, SPEC)
    torch.testing.assert_close(layer(feats), torch.nn.functional.gelu(lin(feats)),
                               rtol=0, atol=0)
    fresh = DenseConnectorLinear(SPEC, 36, 21, bias=False, backend=backend).to(DEVICE)
    assert fresh.bias is None and fresh(hs).shape == (2, 8, 21)


def test_backend_set_on_the_connector_reaches_the_first_layer(monkeypatch):
    m = DenseConnector(SPEC, 12, 20, backend="torch")
    calls = []
    # the custom op (compile) and the eager plan route
    for name in ("linear_triton", "linear_triton_for_training", "prepare_linear"):
        real = getattr(linear_ops, name)
        monkeypatch.setattr(linear_ops, name,
                            lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    m(_hs())
    assert not calls
    m.backend = "triton"
    assert m.get_submodule("0").backend == "triton"
    m(_hs())
    assert calls
    with pytest.raises(ValueError, match="backend must be one of"):
        m.backend = "cuda"


# --------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ptype", ("linear", "mlp2x_gelu", "mlp3x_gelu", "identity"))
def test_outputs_are_not_views(backend, ptype):
    # FSDP2 warns about (and an in-place op would skip the hook of) a returned view
    m = DenseConnector(SPEC, 12, 20, ptype, backend=backend).to(DEVICE)
    hs = _hs()
    assert m(hs)._base is None
    feats = dense_connector_features(hs, SPEC, backend=backend)
    assert feats._base is None and m.project(feats)._base is None
    if ptype != "identity":
        first = m.first_layer()
        assert first(hs)._base is None
        w, b = first.weight, first.bias
        assert dense_connector_linear(hs, SPEC, w, b, backend=backend)._base is None
        assert dense_connector_linear(hs, SPEC, w, None, "gelu", backend=backend)._base is None


def test_first_layer_of_each_projector_type():
    lin = DenseConnector(SPEC, 12, 20, "linear")
    first = lin.first_layer()
    assert first.weight is lin.weight and first.bias is lin.bias and first.activation is None
    assert list(lin.state_dict()) == ["weight", "bias"]
    assert torch.equal(first(_hs()), lin(_hs()))
    with pytest.raises(ValueError, match="no first layer"):
        DenseConnector(SPEC, 12, 20, "identity").first_layer()


# --------------------------------------------------------------------------- column shards
@pytest.mark.parametrize("n,world", [(27, 2), (45, 4), (13, 3), (5, 8), (0, 2), (64, 1)])
def test_shard_range_is_torch_chunk(n, world):
    chunks = torch.arange(n).chunk(world) if n else ()
    got = [shard_range(n, r, world) for r in range(world)]
    assert sum(stop - start for start, stop in got) == n
    for r, (start, stop) in enumerate(got):
        expect = chunks[r].tolist() if r < len(chunks) else []
        assert list(range(start, stop)) == expect


def test_shard_range_errors():
    with pytest.raises(ValueError, match="rank must be in"):
        shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        shard_range(10, 0, 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        shard_range(10, 0.5, 2)


# Bit-equality needs the GEMM to compute a column the same way whatever the width: true for
# the Triton kernels by construction (the column is one tile's, its K loop does not depend on N;
# the path is pinned, below), and for the torch backend as far as the BLAS gives it. Measured
# with MKL (torch 2.13 CPU): bf16/fp16 always; fp32 for shards >= 12 columns wide (narrower
# ones take another MKL kernel and differ in the last bits). The widths here are >= 12 for fp32.
# Under the interpreter the Triton kernels' tl.dot is numpy's matmul, whose BLAS may sum a
# column in another order by its place in the tile, in fp32 and so also before a 16-bit
# rounding: there every dtype is held to the sum-order bound (conftest.gemm_order_close).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("n,world", [(27, 2), (52, 4), (40, 3)])
def test_column_shards_are_bit_equal_slices(backend, dtype, n, world):
    order = backend == "triton" and common.interpreting()
    torch.manual_seed(2)
    proj = reference.build_projector(36, n, "mlp2x_gelu").to(DEVICE, dtype)
    first = DenseConnector.from_projector(SPEC, proj, backend=backend).first_layer()
    hs = _hs(dtype=dtype, seed=4, B=3)
    hs = [h.transpose(0, 1).contiguous().transpose(0, 1) for h in hs]  # strided views
    with torch.no_grad():  # inference, as the shards below (a training launch of a frozen
        full = first(hs)   # ViT keeps A and so runs two-pass: docs/DESIGN.md §6.1)
    feats = dense_connector_features(hs, SPEC, backend=backend)  # the GEMM's A
    cols = []
    for rank in range(world):
        shard = first.column_shard(rank, world)
        start, stop = shard_range(n, rank, world)
        assert (shard.shard_offset, shard.out_features, shard.full_out_features) == (
            start, stop - start, n)
        assert not shard.weight.requires_grad
        out = shard(hs)
        if order:
            assert gemm_order_close(out, full[..., start:stop], feats,
                                    first.weight[start:stop], GELU_SLOPE), f"rank {rank}"
        else:
            assert torch.equal(out, full[..., start:stop]), f"rank {rank}"
        cols.append(out)
    assert (gemm_order_close(torch.cat(cols, -1), full, feats, first.weight, GELU_SLOPE)
            if order else torch.equal(torch.cat(cols, -1), full))


def test_column_shard_copies_and_nests():
    first = DenseConnector(SPEC, 12, 20).first_layer()
    shard = first.column_shard(1, 2)
    assert shard.weight.data_ptr() != first.weight.data_ptr()
    sub = shard.column_shard(1, 2)  # a shard of a shard: offsets add up
    assert (sub.shard_offset, sub.out_features, sub.full_out_features) == (15, 5, 20)
    assert torch.equal(sub.weight, first.weight[15:20])


def test_column_shard_takes_the_unsharded_path(monkeypatch):
    # The Triton path rule sees the output width. With a rule that flips between the full width
    # (two-pass) and a shard's (fused), a shard that chose for itself would round A's K blocks
    # differently from the unsharded layer (C = 12 is not a multiple of the 16-wide K block).
    def rule(M, C, N, *a, **k):
        return "two-pass" if N > 30 else "fused"
    monkeypatch.setattr(path_ops, "choose_linear_path", rule)
    monkeypatch.setattr(linear_ops, "choose_linear_path", rule)
    torch.manual_seed(5)
    proj = reference.build_projector(36, 45, "mlp2x_gelu").to(DEVICE)
    first = DenseConnector.from_projector(SPEC, proj, backend="triton").first_layer()
    hs = _hs(seed=6)
    full = first(hs)
    shard = first.column_shard(0, 2)
    assert column_shard_path(hs, SPEC, shard.weight, 45, "triton") == "two-pass"
    assert torch.equal(shard(hs), full[..., :23])
    # the control: the same shard choosing its own path (fused) is not bit-equal on the
    # interpreter, whose tl.dot sums each K block separately (a GPU's fp32 FMA chain may agree)
    alone = dense_connector_linear(hs, SPEC, shard.weight, shard.bias, "gelu", backend="triton")
    if common.interpreting():
        assert not torch.equal(alone, full[..., :23])
    torch.testing.assert_close(alone, full[..., :23], rtol=1e-5, atol=1e-5)
    # the torch backend and explicit paths are left alone
    assert column_shard_path(hs, SPEC, shard.weight, 45, "torch") == "auto"
    assert column_shard_path(hs, SPEC, shard.weight, 45, "triton", "fused") == "fused"


def test_column_shard_path_validates_first():
    with pytest.raises(TypeError, match="hidden_states must be a tuple or list"):
        column_shard_path(torch.zeros(2, 9, 12), SPEC, torch.zeros(4, 36), 8, "triton")


def test_megatron_split_by_hand_matches_the_projector():
    # column shards of layer 0 + row shards of layer 2, partial sums added: the projector
    torch.manual_seed(7)
    m = DenseConnector(SPEC, 12, 26).to(DEVICE)
    hs = _hs(seed=8)
    full = m(hs)
    lin2 = m.get_submodule("2")
    total = lin2.bias.detach().clone()
    for rank in range(2):
        start, stop = shard_range(26, rank, 2)
        x = m.first_layer().column_shard(rank, 2)(hs)
        total = total + x @ lin2.weight[:, start:stop].detach().T
    torch.testing.assert_close(total, full.detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- misc
def test_no_dtensor_import_for_plain_tensors():
    assert not any_dtensor(_hs(), torch.zeros(2))


def test_dense_connector_linear_errors():
    with pytest.raises(TypeError, match="ConnectorSpec"):
        DenseConnectorLinear("clip", 36, 20)
    with pytest.raises(ValueError, match="activation must be one of"):
        DenseConnectorLinear(SPEC, 36, 20, activation="relu")
    with pytest.raises(ValueError, match="backend must be one of"):
        DenseConnectorLinear(SPEC, 36, 20, backend="cuda")
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        DenseConnectorLinear.from_linear(SPEC, nn.Conv1d(3, 3, 1))
    layer = DenseConnectorLinear(SPEC, 36, 20)
    with pytest.raises(ValueError, match="weights are torch.float32, the features"):
        layer(torch.zeros(2, 8, 36, dtype=torch.float64))
    with pytest.raises(ValueError, match="exactly 25 hidden states"):
        layer(list(_hs())[:20])


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_and_training_step(backend):
    # a copied connector trains on its own (no parameter left shared with the original)
    m = DenseConnector(SPEC, 12, 20, backend=backend).to(DEVICE)
    c = copy.deepcopy(m)
    opt = torch.optim.SGD(c.parameters(), lr=0.1)
    c(_hs()).square().mean().backward()
    opt.step()
    assert not torch.equal(c.get_submodule("0").weight, m.get_submodule("0").weight)
    assert c.get_submodule("0").weight.grad is not None and m.get_submodule("0").weight.grad \
        is None
