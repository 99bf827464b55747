"""The torch path's CPU chunking, A/B in one process: chunks per pool worker, and pool or inline.

    python -m benchmarks.cpu_chunks                        # CLIP DCI, fp32 and bf16, 1 2 4 images
    python -m benchmarks.cpu_chunks --busy-cores 1 --markdown r.md --json r.json

``dense_connector_features(..., backend="torch")`` under ``torch.no_grad()`` on the same inputs,
with ``torch_ops.POOL_CHUNKS_PER_WORKER`` set to each value of ``--per-worker`` (the chunk pool
on) and with the pool off (``DC_KERNELS_CHUNK_POOL=0``: every chunk inline, each op on all
intra-op threads). The settings are timed in turns, ``--rounds`` times, each turn a
:func:`benchmarks.timing.time_fn` median, and the table gives each setting's best median: on a
shared machine the neighbours' load drifts between consecutive runs by more than the effect
measured here, so only settings timed side by side are compared. Each row also checks that
every setting gives the same bits. Inputs rotate over ``--sets`` copies of the hidden states so
that each call reads them from memory, not from cache.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch

from dc_kernels import ConnectorSpec
from dc_kernels.functional import dense_connector_features
from dc_kernels.ops import torch_ops

from .cli import busy_loops
from .machine import machine_info
from .report import write_outputs
from .timing import time_fn

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure(tower: str, kind: str, images: int, dtype: torch.dtype, per_worker: List[int],
            rounds: int, sets: int, budget_s: float) -> Dict[str, float]:
    """Best median ms of each setting (``pool<k>`` for each k, ``inline``), timed in turns."""
    spec = ConnectorSpec.preset(tower, kind)
    tokens, channels = (577, 1024) if tower == "clip" else (729, 1152)
    g = torch.Generator().manual_seed(images)
    copies = [tuple(torch.randn(images, tokens, channels, generator=g).to(dtype)
                    for _ in range(spec.num_hidden_states)) for _ in range(sets)]
    settings = [(f"pool{k}", "1", k) for k in per_worker] + [("inline", "0", None)]
    best: Dict[str, float] = {}
    outs: Dict[str, torch.Tensor] = {}
    saved = (os.environ.get(torch_ops.CHUNK_POOL_ENV), torch_ops.POOL_CHUNKS_PER_WORKER)
    try:
        for _ in range(rounds):
            for name, env, k in settings:
                os.environ[torch_ops.CHUNK_POOL_ENV] = env
                if k is not None:
                    torch_ops.POOL_CHUNKS_PER_WORKER = k
                turn = iter(range(1 << 62))

                def call():
                    return dense_connector_features(copies[next(turn) % sets], spec,
                                                    backend="torch")
                with torch.no_grad():
                    outs.setdefault(name, call())
                    t = time_fn(call, torch.device("cpu"), budget_s=budget_s)
                best[name] = min(best.get(name, float("inf")), t.median_s * 1e3)
    finally:
        if saved[0] is None:
            os.environ.pop(torch_ops.CHUNK_POOL_ENV, None)
        else:
            os.environ[torch_ops.CHUNK_POOL_ENV] = saved[0]
        torch_ops.POOL_CHUNKS_PER_WORKER = saved[1]
    first = next(iter(outs.values()))
    best["same_bits"] = all(torch.equal(first, o) for o in outs.values())
    return best


def _measured_args(argv: List[str]) -> str:
    """The command line without its output paths (they do not change what is measured)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in ("--json", "--markdown"):
            skip = True
        elif not x.startswith(("--json=", "--markdown=")):
            out.append(x)
    return " ".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_chunks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tower", choices=("clip", "siglip"), default="clip")
    p.add_argument("--kind", choices=("dci", "sci", "sti"), default="dci")
    p.add_argument("--images", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dtypes", nargs="+", choices=sorted(_DTYPES), default=["fp32", "bf16"])
    p.add_argument("--per-worker", type=int, nargs="+", default=[4, 2],
                   help="values of POOL_CHUNKS_PER_WORKER to compare (default: 4 2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sets", type=int, default=3, help="copies of the inputs to rotate over")
    p.add_argument("--budget", type=float, default=0.5, help="seconds per timed turn")
    p.add_argument("--busy-cores", type=int, default=0,
                   help="busy-loop processes pinned to the last cores meanwhile")
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args(argv)
    if any(k < 1 for k in a.per_worker) or a.rounds < 1 or a.sets < 1 or a.budget <= 0:
        p.error("--per-worker values, --rounds and --sets must be >= 1, --budget > 0")
    if not 0 <= a.busy_cores <= (os.cpu_count() or 1):
        p.error(f"--busy-cores must be between 0 and {os.cpu_count()}")
    rows = []
    with busy_loops(a.busy_cores):
        for dt in a.dtypes:
            for n in a.images:
                r = measure(a.tower, a.kind, n, _DTYPES[dt], a.per_worker, a.rounds, a.sets,
                            a.budget)
                rows.append(dict(dtype=dt, images=n, **r))
                print(dt, n, {k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in r.items()}, file=sys.stderr, flush=True)
    names = [f"pool{k}" for k in a.per_worker] + ["inline"]
    m = machine_info(torch.device("cpu"))
    head = (f"# torch path CPU chunking, {a.tower} {a.kind}: best median ms of {a.rounds} "
            f"interleaved turns\n\n{m['cpu_model']}, {m['cpu_cores']} cores, "
            f"{m['torch_threads']} intra-op threads, torch {m['torch']}, {m['date']}; "
            f"--busy-cores {a.busy_cores}; `python -m benchmarks.cpu_chunks "
            f"{_measured_args(argv if argv is not None else sys.argv[1:])}`\n\n"
            "| dtype | images | " + " | ".join(names) + f" | pool{a.per_worker[0]} / "
            + " / ".join(names[1:]) + " | same bits |\n|" + "---|" * (len(names) + 4))
    lines = [head]
    for r in rows:
        ratio = " / ".join(f"{r[names[0]] / r[k]:.2f}x" for k in names[1:])
        lines.append(f"| {r['dtype']} | {r['images']} | "
                     + " | ".join(f"{r[k]:.2f}" for k in names) + f" | {ratio} | "
                     + ("yes" if r["same_bits"] else "**no**") + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args = {k: v for k, v in vars(a).items() if k not in ("json", "markdown")}
    write_outputs(a.markdown, text, a.json, dict(args=args, machine=m, rows=rows))
    return 0 if all(r["same_bits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
