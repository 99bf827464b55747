"""Distributed training and tensor parallelism, 2 ranks over gloo on CPU (spawned processes).

Each group of scenarios runs in one spawn of 2 ranks (tests/distributed_workers.py; the kernels
on the Triton interpreter without a GPU, as everywhere in the suite) with a hard deadline; a
rank that fails ends its group, and the remaining scenarios report that they did not run.

Training scenarios compare, after each of two SGD steps, the full parameters and the loss with
a single-process run of the same seed on the whole batch (same backend), made by the spawned
process before it joins the group. Tolerance: the ranks'
gradients are averaged (all-reduce / reduce-scatter) instead of summed over the whole batch
in one GEMM, so they differ by fp32 reassociation: at most ~(rows summed) * 2^-24 * sum|terms|,
here ~1e-7 on gradients of magnitude ~1e-1; after two steps at lr 0.5 with momentum (|update|
<= 1.5 lr |g| per step) that is at most a few 1e-7 on the parameters (measured: 1.5e-8 in
every scenario). rtol 1e-6 / atol 2e-7 holds that bound, while a missing or wrong gradient (the
first layer not all-gathered, a rank's gradient not reduced: 8e-3 when DDP is left out) fails.
Every parameter must also have moved by more than 1e-4 (a run that never updates a parameter
cannot pass).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

import distributed_workers as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch built without torch.distributed")

BACKENDS = ("torch", "triton")
SPAWN_DEADLINE_S = 300
RTOL, ATOL = 1e-6, 2e-7

NATIVE = ([f"{kind}:mlp2x_gelu:{b}" for kind in ("ddp", "ddp_compile", "fsdp2_root",
                                                  "fsdp2_per_linear", "fsdp1")
           for b in BACKENDS]
          + [f"fsdp2_per_linear:linear:{b}" for b in BACKENDS]
          + [f"fsdp1:mlp3x_gelu:{b}" for b in BACKENDS]
          + ["tp::"])
# ZeRO-3 last: one process runs both stages (saves a spawn and DeepSpeed's start-up)
DEEPSPEED = [f"zero{stage}:mlp2x_gelu:{b}" for stage in (2, 3) for b in BACKENDS]


def spawn(scenarios, tmp_path, deadline_s=SPAWN_DEADLINE_S):
    """Run ``scenarios`` on 2 spawned ranks; ``{name: result}`` of rank 0 (and rank 1).

    The ranks are killed at the deadline. Returns whatever the ranks saved, plus
    ``"__exit__"``: None when both ranks ended cleanly, else a description.
    """
    store = tmp_path / "store"
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # the ranks are CPU processes: kernels interpreted
    try:
        ctx = mp.start_processes(W.rank_main, args=(W.WORLD, str(store), str(tmp_path),
                                                    scenarios),
                                 nprocs=W.WORLD, join=False, start_method="spawn")
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    end = time.monotonic() + deadline_s
    problem = None
    try:
        while True:
            try:
                if ctx.join(timeout=1):
                    break
            except Exception as e:  # a rank exited with an error: the others are killed
                problem = f"{type(e).__name__}: {e}"
                break
            if time.monotonic() > end:
                problem = f"deadline of {deadline_s} s passed"
                break
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    results = []
    for rank in range(W.WORLD):
        path = tmp_path / f"rank{rank}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else {})
    results[0]["__exit__"] = problem
    return results


def _result(results, name):
    res = results[0].get(name)
    if res is None:
        pytest.fail(f"{name} did not run: the group ended before it ({results[0]['__exit__']})")
    if "error" in res:
        pytest.fail(f"{name} failed on rank 0:\n{res['error']}")
    other = results[1].get(name)
    if other is not None and "error" in other:
        pytest.fail(f"{name} failed on rank 1:\n{other['error']}")
    return res["ok"], (other or {}).get("ok")


def check_training(results, name):
    got, got1 = _result(results, name)
    _, ptype, backend = name.split(":")
    ref = results[0]["__ref__"][(ptype, backend)]  # the single-process run, in a fresh process
    init = W.build(ptype, backend).state_dict()
    assert list(got["params"][0]) == list(init), "state-dict keys differ from the original's"
    for step in range(W.STEPS):
        for k, v in ref["params"][step].items():
            torch.testing.assert_close(got["params"][step][k], v, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{name}: step {step}, {k}: {m}")
            if got1 is not None:  # rank 1 holds the same full parameters
                torch.testing.assert_close(got1["params"][step][k], v, rtol=RTOL, atol=ATOL)
        assert abs(got["losses"][step] - ref["losses"][step]) <= 1e-5 * ref["losses"][step]
    for k, v in got["params"][-1].items():
        assert (v - init[k]).abs().max() > 1e-4, f"{name}: {k} never changed"
    return got


# --------------------------------------------------------------------------- groups
@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return spawn(NATIVE, tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return spawn(DEEPSPEED, tmp_path_factory.mktemp("deepspeed"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp(native, backend):
    check_training(native, f"ddp:mlp2x_gelu:{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_torch_compile(native, backend):
    # backend "aot_eager": dynamo + AOTAutograd + DDP's graph splitting, without Inductor's C++
    # build (Inductor on the custom ops is covered by test_modules.py). The connector's forward
    # is one graph: DDP's own wrapper code breaks around it, the custom ops do not.
    got = check_training(native, f"ddp_compile:mlp2x_gelu:{backend}")
    assert got["info"]["graphs"] == 1, got["info"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_root_only(native, backend):
    got = check_training(native, f"fsdp2_root:mlp2x_gelu:{backend}")
    assert got["info"]["view_warnings"] == []


@pytest.mark.parametrize("ptype", ("mlp2x_gelu", "linear"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_every_linear_sharded(native, backend, ptype):
    got = check_training(native, f"fsdp2_per_linear:{ptype}:{backend}")
    # the first layer is an nn.Linear: the loop sharding every nn.Linear found it
    assert got["info"]["sharded"] == ([] if ptype == "linear" else ["0", "2"])
    assert got["info"]["view_warnings"] == []


@pytest.mark.parametrize("ptype", ("mlp2x_gelu", "mlp3x_gelu"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp1_linear_auto_wrap(native, backend, ptype):
    got = check_training(native, f"fsdp1:{ptype}:{backend}")
    n_linear = 2 if ptype == "mlp2x_gelu" else 3
    assert got["info"]["wrapped_types"] == sorted(["DenseConnectorLinear"]
                                                  + ["Linear"] * (n_linear - 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepspeed_zero2(deepspeed_runs, backend):
    check_training(deepspeed_runs, f"zero2:mlp2x_gelu:{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepspeed_zero3(deepspeed_runs, backend):
    check_training(deepspeed_runs, f"zero3:mlp2x_gelu:{backend}")


# --------------------------------------------------------------------------- tensor parallel
def _tp(native):
    return _result(native, "tp::")


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ("plain shard", "DTensor Shard(0)"))
def test_column_parallel_first_layer_is_bit_equal(native, how, backend, dtype):
    # H = 27 over 2 ranks: columns 0..13 and 14..26, each rank's output == that slice of the
    # unsharded layer's output, bit for bit (both ranks checked; fp32 on CPU within ~4 ulps:
    # distributed_workers._gemm_equal)
    got, got1 = _tp(native)
    key = f"{how} equal {backend}/{dtype}"
    assert got[key] is True and got1[key] is True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ("linear projector", "features input"))
def test_column_parallel_other_entry_points(native, how, backend):
    # FirstLayerColwiseParallel on a "linear" connector (the root holds the layer), and on the
    # first layer fed ready-made features (DenseConnector.project, the streaming tower)
    got, got1 = _tp(native)
    key = f"{how} equal {backend}"
    assert got[key] is True and got1[key] is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_megatron_projector(native, backend):
    # "0" column-parallel + "2" RowwiseParallel: the row-parallel layer sums the ranks' partial
    # products (an fp32 all-reduce instead of one K loop: reassociation, ~K * 2^-24 relative),
    # so forward and gradients are compared with fp32 tolerances, not bits
    for got in _tp(native):
        res = got[f"megatron {backend}"]
        torch.testing.assert_close(*res["out"], rtol=1e-5, atol=1e-6)
        for k, (g, ref) in res["grads"].items():
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
        for g, ref in res["hs_grads"]:  # replicated inputs: the ranks' partial grads summed
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtensor_arguments(native, backend):
    got, got1 = _tp(native)
    for res in (got, got1):
        # a Shard(0) weight and bias: a Shard(2) DTensor whose full tensor is the unsharded
        # result (an all-gather only concatenates: bit for bit, fp32 on CPU within ~4 ulps)
        assert res[f"fn Shard(0) {backend}"] is True
        assert res[f"features batch-sharded {backend}"] is True
        b = res[f"fn batch-sharded {backend}"]
        assert b["placement"] == "(Shard(dim=0),)"
        torch.testing.assert_close(*b["out"], rtol=1e-6, atol=1e-6)
        # the replicated weight's gradient is the sum of the ranks' shares
        torch.testing.assert_close(*b["wgrad"], rtol=1e-5, atol=1e-5)
    assert got["fsdp2 weight outside forward"] is True


@pytest.mark.parametrize("case,msg", [
    ("weight Shard(1)", r"weight is a DTensor placed Shard\(dim=1\); supported: Shard\(0\)"),
    ("weight Partial", r"weight is a DTensor placed Partial"),
    ("bias unlike weight", r"bias must be placed like the weight"),
    ("hidden states Shard(1)", r"hidden_states\[0\] is a DTensor placed Shard\(dim=1\)"),
    ("column weight + batch shards", r"column-parallel \(Shard\(0\)\) weight needs replicated"),
    ("2-D mesh", r"2-D device mesh are not supported"),
])
def test_unsupported_placements_raise(native, case, msg):
    import re
    err = _tp(native)[0]["errors"][case]
    assert err is not None, f"{case}: no ValueError"
    assert re.search(msg, err), err
