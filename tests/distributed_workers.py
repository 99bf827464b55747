"""Code that runs inside the ranks spawned by tests/test_distributed.py.

The ranks run on CPU over gloo, the Triton kernels on the interpreter (the spawner sets
``TRITON_INTERPRET=1`` for them, also on a machine with a GPU).

Every rank runs a list of scenarios in order and writes its results to ``rank{r}.pt`` after
each one, so a scenario that fails (or hangs and is killed) leaves the earlier results readable.
A rank that fails records the traceback and exits, ending the group: the scenarios after it are
reported as not run.

Training scenarios: a DenseConnector (CLIP DCI preset, C = 12, H = 27: ragged for every tile
size) trained for two SGD steps (lr 0.5, momentum 0.9) on a global batch of 4 images, each of
the 2 ranks feeding its 2 images; the loss is the mean squared error, so the mean over the ranks
of their gradients is the gradient of the single-process run on the whole batch. The results
are the parameters (full, gathered) after each step and the loss of each step.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

from conftest import fp32_gemm_close, make_hidden_states
from dc_kernels import ConnectorSpec, DenseConnector, dense_connector_features, \
    dense_connector_linear

SPEC = ConnectorSpec.preset("clip", "dci")
C, H, T, B = 12, 27, 9, 4
STEPS = 2
LR, MOMENTUM = 0.5, 0.9
WORLD = 2
PG_TIMEOUT_S = 60


def _gemm_equal(a, b) -> bool:
    """The same GEMM output: bit for bit, fp32 on CPU within ~4 ulps (conftest.fp32_gemm_close:
    a column shard need not reproduce the unsharded bits there)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dtype == torch.float32 and a.device.type == "cpu":
        return fp32_gemm_close(a, b)
    return torch.equal(a, b)


# --------------------------------------------------------------------------- shared
def build(ptype: str, backend: str) -> DenseConnector:
    """The model every run starts from (same seed, same parameters)."""
    torch.manual_seed(0)
    return DenseConnector(SPEC, C, H, ptype, backend=backend)


def batch(step: int):
    """The global batch of ``step``: 25 hidden states [B, T, C] (no grad, as from a frozen
    ViT) and a target [B, T', H]."""
    hs = make_hidden_states(SPEC.num_hidden_states, B, T, C, torch.float32, seed=100 + step)
    g = torch.Generator().manual_seed(200 + step)
    return hs, torch.randn(B, SPEC.out_tokens(T), H, generator=g)


def local_batch(step: int, rank: int, world: int):
    """Rank ``rank``'s images of the global batch (views of it: strided batch slices)."""
    hs, target = batch(step)
    per = B // world
    rows = slice(rank * per, (rank + 1) * per)
    return [h[rows] for h in hs], target[rows]


def loss_fn(y, target):
    return ((y - target) ** 2).mean()


def single_process(ptype: str, backend: str):
    """The reference: the same training on the whole batch in one process."""
    model = build(ptype, backend)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    out = {"params": [], "losses": []}
    for step in range(STEPS):
        hs, target = batch(step)
        opt.zero_grad()
        loss = loss_fn(model(hs), target)
        loss.backward()
        opt.step()
        out["losses"].append(loss.item())
        out["params"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


# --------------------------------------------------------------------------- training runs
def _mean_loss(loss):
    t = loss.detach().clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _train(model, forward, backward, step_fn, zero_grad, full_params, rank, world):
    out = {"params": [], "losses": []}
    for step in range(STEPS):
        hs, target = local_batch(step, rank, world)
        zero_grad()
        loss = loss_fn(forward(hs), target)
        backward(loss)
        step_fn()
        out["losses"].append(_mean_loss(loss))
        out["params"].append(full_params())
    return out


def _plain_training(model, wrapped, rank, world, full_params=None):
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR, momentum=MOMENTUM)
    if full_params is None:
        def full_params():
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _train(wrapped, wrapped, lambda loss: loss.backward(), opt.step,
                  lambda: opt.zero_grad(), full_params, rank, world)


def run_ddp(ptype, backend, rank, world, compile_it=False):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = build(ptype, backend)
    ddp = DDP(model)
    info = {}
    if compile_it:
        import torch._dynamo
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        ddp = torch.compile(ddp, backend="aot_eager")
    out = _plain_training(model, ddp, rank, world)
    if compile_it:
        counters = torch._dynamo.utils.counters
        info["graphs"] = int(counters["stats"]["unique_graphs"])
        info["graph_breaks"] = dict(counters["graph_break"])
    out["info"] = info
    return out


def _fsdp2_full_params(model):
    def full():
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in model.state_dict().items()}
    return full


def run_fsdp2(ptype, backend, rank, world, per_linear):
    import warnings
    from torch.distributed.fsdp import fully_shard
    model = build(ptype, backend)
    sharded = []
    if per_linear:
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                fully_shard(m)
                sharded.append(name)
    fully_shard(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _plain_training(model, model, rank, world, _fsdp2_full_params(model))
    out["info"] = {"sharded": sharded,
                   "view_warnings": [str(w.message) for w in caught if "view" in str(w.message)]}
    return out


def run_fsdp1(ptype, backend, rank, world):
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, \
        StateDictType
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    model = build(ptype, backend)
    fsdp = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
                device_id=torch.device("cpu"))
    wrapped = sorted(name for name, m in fsdp.named_modules()
                     if isinstance(m, FSDP) and m is not fsdp)
    wrapped_types = sorted(type(m.module).__name__ for m in fsdp.modules()
                           if isinstance(m, FSDP) and m is not fsdp)

    def full():
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, cfg):
            return {k: v.detach().clone() for k, v in fsdp.state_dict().items()}
    out = _plain_training(model, fsdp, rank, world, full)
    out["info"] = {"wrapped": wrapped, "wrapped_types": wrapped_types}
    return out


def run_deepspeed(ptype, backend, rank, world, stage):
    import deepspeed
    import deepspeed.ops
    # DeepSpeed's CPU accelerator JIT-compiles an optional shared-memory collective kernel (its
    # inference all-reduce) with ninja on first use: ~3 min on a 2-core machine. Training's
    # collectives go through torch.distributed (gloo) either way; mark the kernel unavailable.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    model = build(ptype, backend)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    config = {
        "train_micro_batch_size_per_gpu": B // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    def full():
        params = dict(engine.module.named_parameters())
        if stage == 3:
            with deepspeed.zero.GatheredParameters(list(params.values())):
                return {k: v.detach().clone() for k, v in params.items()}
        return {k: v.detach().clone() for k, v in params.items()}
    out = _train(engine, engine, engine.backward, engine.step, lambda: None, full, rank, world)
    out["info"] = {"stage": stage}
    return out


# --------------------------------------------------------------------------- tensor parallel
def run_tensor_parallel(rank, world):
    """Column-parallel first layer: plain shards, DTensor Shard(0), the Megatron projector,
    DTensor placements and their errors. Returns a dict of named checks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module
    from dc_kernels.distributed import FirstLayerColwiseParallel, shard_range
    mesh = init_device_mesh("cpu", (world,))
    checks = {}
    hs, target = batch(0)
    for backend in ("torch", "triton"):
        for dtype in (torch.float32, torch.bfloat16):
            model = build("mlp2x_gelu", backend).to(dtype)
            hsd = [h.to(dtype) for h in hs]
            first = model.first_layer()
            # forwards in inference, as the plain shard's (a training launch of a frozen ViT
            # keeps A and so runs two-pass where fused was picked: docs/DESIGN.md §6.1)
            with torch.no_grad():
                full = first(hsd)
            start, stop = shard_range(H, rank, world)
            key = f"{backend}/{str(dtype)[6:]}"
            # a plain local shard (serving engines)
            shard = first.column_shard(rank, world)
            checks[f"plain shard equal {key}"] = _gemm_equal(shard(hsd), full[..., start:stop])
            # DTensor Shard(0) through parallelize_module
            tp = parallelize_module(copy.deepcopy(model), mesh,
                                    {"0": FirstLayerColwiseParallel()})
            with torch.no_grad():
                local = tp.get_submodule("0")(hsd)
            checks[f"DTensor Shard(0) equal {key}"] = (
                type(local) is torch.Tensor and _gemm_equal(local, full[..., start:stop]))
    for backend in ("torch", "triton"):
        # the "linear" projector: the connector itself is the layer
        model = build("linear", backend)
        full = model(hs).detach()
        start, stop = shard_range(H, rank, world)
        tp = parallelize_module(model, mesh, FirstLayerColwiseParallel())
        checks[f"linear projector equal {backend}"] = _gemm_equal(tp(hs), full[..., start:stop])
        # ready-made features through a column-parallel first layer (project(), streaming)
        model = build("mlp2x_gelu", backend)
        feats = dense_connector_features(hs, SPEC)
        full = model.first_layer()(feats).detach()
        tp = parallelize_module(model, mesh, {"0": FirstLayerColwiseParallel()})
        checks[f"features input equal {backend}"] = _gemm_equal(
            tp.get_submodule("0")(feats), full[..., start:stop])
    # the whole projector, Megatron style: "0" column-, "2" row-parallel; forward and grads
    for backend in ("torch", "triton"):
        model = build("mlp2x_gelu", backend)
        ref = copy.deepcopy(model)
        # H = 27 splits unevenly (14 + 13): the first layer hands RowwiseParallel its DTensor,
        # which knows the global width (a local tensor would be taken as an even split)
        tp = parallelize_module(model, mesh, {"0": FirstLayerColwiseParallel(
            use_local_output=False), "2": RowwiseParallel()})
        hs_g = [h.clone().requires_grad_(i in SPEC.used_layers) for i, h in enumerate(hs)]
        hs_r = [h.clone().requires_grad_(i in SPEC.used_layers) for i, h in enumerate(hs)]
        y = tp(hs_g)
        y_ref = ref(hs_r)
        loss_fn(y, target).backward()
        loss_fn(y_ref, target).backward()
        grads = {k: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                 for k, p in tp.named_parameters()}
        checks[f"megatron {backend}"] = {
            "out": (y.detach(), y_ref.detach()),
            "grads": {k: (grads[k], p.grad) for k, p in ref.named_parameters()},
            "hs_grads": [(hs_g[i].grad, hs_r[i].grad) for i in SPEC.used_layers],
        }
    # dense_connector_linear on DTensors directly
    model = build("mlp2x_gelu", "torch")
    w, b = model.first_layer().weight.detach(), model.first_layer().bias.detach()
    for backend in ("torch", "triton"):
        ref = dense_connector_linear(hs, SPEC, w, b, "gelu", backend=backend)
        wd = distribute_tensor(w, mesh, [Shard(0)])
        bd = distribute_tensor(b, mesh, [Shard(0)])
        y = dense_connector_linear(hs, SPEC, wd, bd, "gelu", backend=backend)
        checks[f"fn Shard(0) {backend}"] = (
            isinstance(y, DTensor) and y.placements == (Shard(2),)
            and _gemm_equal(y.full_tensor(), ref))
        # batch-sharded hidden states, replicated weight: Shard(0) output, weight grads summed
        wr = distribute_tensor(w.clone().requires_grad_(), mesh, [Replicate()])
        hsd = [distribute_tensor(h, mesh, [Shard(0)]) for h in hs]
        y = dense_connector_linear(hsd, SPEC, wr, None, None, backend=backend)
        w_ref = w.clone().requires_grad_()
        y_ref = dense_connector_linear(hs, SPEC, w_ref, None, None, backend=backend)
        (y.full_tensor() * target[..., :1]).sum().backward()
        (y_ref * target[..., :1]).sum().backward()
        checks[f"fn batch-sharded {backend}"] = {
            "placement": str(y.placements), "out": (y.full_tensor().detach(), y_ref.detach()),
            "wgrad": (wr.grad.full_tensor(), w_ref.grad)}
        f = dense_connector_features(hsd, SPEC, backend=backend)
        checks[f"features batch-sharded {backend}"] = (
            f.placements == (Shard(0),)
            and torch.equal(f.full_tensor(), dense_connector_features(hs, SPEC,
                                                                      backend=backend)))
    # an FSDP2-sharded layer's weight (a Shard(0) DTensor outside forward) is column-parallel
    from torch.distributed.fsdp import fully_shard
    model = build("mlp2x_gelu", "triton")
    ref_out = model.first_layer()(hs).detach()
    fully_shard(model.get_submodule("0"))
    fully_shard(model)
    y = dense_connector_linear(hs, SPEC, model.get_submodule("0").weight,
                               model.get_submodule("0").bias, "gelu", backend="triton")
    checks["fsdp2 weight outside forward"] = _gemm_equal(y.full_tensor().detach(), ref_out)
    # unsupported placements
    errors = {}

    def expect(name, fn):
        try:
            fn()
        except ValueError as e:
            errors[name] = str(e)
        else:
            errors[name] = None
    expect("weight Shard(1)", lambda: dense_connector_linear(
        hs, SPEC, distribute_tensor(w, mesh, [Shard(1)]), None))
    expect("weight Partial", lambda: dense_connector_linear(
        hs, SPEC, DTensor.from_local(w / world, mesh, [Partial()]), None))
    expect("bias unlike weight", lambda: dense_connector_linear(
        hs, SPEC, distribute_tensor(w, mesh, [Shard(0)]), distribute_tensor(b, mesh,
                                                                           [Replicate()])))
    expect("hidden states Shard(1)", lambda: dense_connector_linear(
        [distribute_tensor(h, mesh, [Shard(1)]) for h in hs], SPEC, w, b))
    expect("column weight + batch shards", lambda: dense_connector_linear(
        [distribute_tensor(h, mesh, [Shard(0)]) for h in hs], SPEC,
        distribute_tensor(w, mesh, [Shard(0)]), None))
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("a", "b"))
    expect("2-D mesh", lambda: dense_connector_linear(
        hs, SPEC, distribute_tensor(w, mesh2, [Shard(0), Replicate()]), None))
    checks["errors"] = errors
    return checks


# --------------------------------------------------------------------------- the rank
def scenario_fn(name):
    kind, ptype, backend = name.split(":")
    if kind == "ddp":
        return lambda r, w: run_ddp(ptype, backend, r, w)
    if kind == "ddp_compile":
        return lambda r, w: run_ddp(ptype, backend, r, w, compile_it=True)
    if kind == "fsdp2_root":
        return lambda r, w: run_fsdp2(ptype, backend, r, w, per_linear=False)
    if kind == "fsdp2_per_linear":
        return lambda r, w: run_fsdp2(ptype, backend, r, w, per_linear=True)
    if kind == "fsdp1":
        return lambda r, w: run_fsdp1(ptype, backend, r, w)
    if kind in ("zero2", "zero3"):
        return lambda r, w: run_deepspeed(ptype, backend, r, w, int(kind[-1]))
    if kind == "tp":
        return run_tensor_parallel
    raise ValueError(name)


def references(scenarios):
    """``{(ptype, backend): single_process(...)}`` for the training scenarios in the list."""
    wanted = sorted({tuple(n.split(":")[1:]) for n in scenarios if not n.startswith("tp:")})
    return {key: single_process(*key) for key in wanted}


def rank_main(rank: int, world: int, store: str, out_dir: str, scenarios):
    """The spawned process: the single-process references first (before anything
    distributed is set up; every rank computes them, rank 0's are used), then join the gloo
    group, run ``scenarios``, save after each."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # 2 ranks on a small shared machine
    path = os.path.join(out_dir, f"rank{rank}.pt")
    results = {"__ref__": references(scenarios)}
    torch.save(results, path)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        for name in scenarios:
            try:
                results[name] = {"ok": scenario_fn(name)(rank, world)}
            except BaseException:
                results[name] = {"error": traceback.format_exc()}
                torch.save(results, path)
                sys.stderr.write(f"rank {rank}: {name} failed\n{results[name]['error']}")
                sys.stderr.flush()
                os._exit(3)  # the other rank may wait in a collective: end the group
            torch.save(results, path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
