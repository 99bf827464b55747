"""CUDA-graph safety of the Triton paths (GPU only: CUDA graphs do not exist on the CPU).

A captured graph replays the recorded kernels on the same buffers: the launch path must not
synchronize with the host, call ``.item()``, create tensors on the CPU or autotune inside the
capture. These tests warm every kernel up (autotuning finished), capture the module's forward
and backward (and each Triton path of the first layer), copy new inputs into the static buffers,
replay, and compare with an eager run on the same new inputs.
"""

import pytest
import torch

from dc_kernels import ConnectorSpec, DenseConnector, dense_connector_linear

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="CUDA graphs need a CUDA device")]


def _inputs(spec, B, T, C, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, T, C, device="cuda", dtype=dtype, generator=g)
            for _ in range(spec.num_hidden_states)]


def _capture(fn):
    """Warm ``fn`` up on a side stream (compile, autotune), then capture it; (graph, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


def _replay_with(graph, static, fresh):
    for s, f in zip(static, fresh):
        s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()


@pytest.mark.parametrize("path", ("fused", "two-pass", "overlap", "pipelined", "overlap-sti"))
def test_first_layer_replays_in_a_cuda_graph(path, monkeypatch):
    # (overlap-sti: STI's image chunks, 2 images each: batch slices of the layers, side stream)
    spec = ConnectorSpec.preset("clip", "dci")
    if path == "overlap-sti":
        from dc_kernels.ops import overlap as overlap_ops
        monkeypatch.setattr(overlap_ops, "OVERLAP_CHUNK_IMAGES", 2)
        spec, path = ConnectorSpec.preset("clip", "sti"), "overlap"
    static = _inputs(spec, 4, 577, 64, seed=0)
    w = torch.randn(96, spec.out_channels(64), device="cuda", dtype=torch.bfloat16) / 14
    b = torch.randn(96, device="cuda", dtype=torch.bfloat16)

    def run():
        return dense_connector_linear(static, spec, w, b, "gelu", backend="triton", path=path)

    graph, out = _capture(run)
    fresh = _inputs(spec, 4, 577, 64, seed=1)
    _replay_with(graph, static, fresh)
    want = dense_connector_linear(fresh, spec, w, b, "gelu", backend="triton", path=path)
    assert torch.equal(out, want)


def test_module_forward_and_backward_replay_in_a_cuda_graph():
    spec = ConnectorSpec.preset("clip", "dci")
    conn = DenseConnector(spec, 64, 96, backend="triton").cuda().to(torch.bfloat16)
    static = _inputs(spec, 2, 577, 64, seed=2)
    params = [p for p in conn.parameters()]

    def step():
        y = conn(static)
        return (y,) + torch.autograd.grad(y.float().square().mean(), params)

    graph, outs = _capture(step)
    fresh = _inputs(spec, 2, 577, 64, seed=3)
    _replay_with(graph, static, fresh)
    y = conn(fresh)
    want = (y,) + torch.autograd.grad(y.float().square().mean(), params)
    for got, ref in zip(outs, want):
        assert torch.equal(got, ref)


def test_reduce_overhead_compile_of_the_module():
    spec = ConnectorSpec.preset("clip", "dci")
    conn = DenseConnector(spec, 64, 96, backend="triton").cuda().to(torch.bfloat16)
    compiled = torch.compile(conn, mode="reduce-overhead", fullgraph=True)
    for seed in range(4):
        hs = _inputs(spec, 2, 577, 64, seed=10 + seed)
        with torch.no_grad():
            got = compiled(hs).clone()
            want = conn(hs)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_stream_k_gemm_replays_in_a_cuda_graph():
    # 576 rows, K = 3072, N = 512: 10 tiles, 48 K steps -> stream K (gemm_stream_k). The
    # graph's capture stream has no arrival counts yet (warm-up ran on another stream): the
    # captured launch zeroes its own, and the replays equal the eager result bit for bit (the
    # partials are summed in range order whoever takes the last ticket)
    from dc_kernels.ops import gemm_tma
    if not gemm_tma.tma_kernels_serve(torch.cuda.current_device()):
        pytest.skip("the TMA GEMM (and its stream K) runs on sm_90 cards only")
    g = torch.Generator(device="cuda").manual_seed(5)
    a = torch.randn(576, 3072, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(512, 3072, device="cuda", dtype=torch.bfloat16, generator=g) / 55
    b = torch.randn(512, device="cuda", dtype=torch.bfloat16, generator=g)
    out = torch.empty(576, 512, device="cuda", dtype=torch.bfloat16)
    launch = gemm_tma.prepare_gemm_tma(a, w, b, "gelu", out)
    assert launch.iters > 0

    def run():
        return launch(a, w, b, torch.empty_like(out))

    graph, got = _capture(run)
    fresh = torch.randn(576, 3072, device="cuda", dtype=torch.bfloat16, generator=g)
    for _ in range(3):
        _replay_with(graph, [a], [fresh])
        want = launch(fresh, w, b, torch.empty_like(out))
        torch.cuda.synchronize()
        assert torch.equal(got, want)
    ref = torch.nn.functional.gelu(torch.addmm(b.float(), fresh.float(), w.float().T))
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=2e-2)
    for counts in gemm_tma._ARRIVALS.values():
        assert int(counts.abs().sum()) == 0
