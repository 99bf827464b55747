"""Peak memory of DenseConnectorVisionTower, streaming vs collected, on CLIP-L/336-shaped towers.

    python examples/measure_tower_memory.py                     # 1, 8, 32 images, fp32, CPU
                                                                # (the README's table)
    python examples/measure_tower_memory.py --batches 1 4 8 --dtype bfloat16
    python examples/measure_tower_memory.py --device cuda       # torch.cuda.max_memory_allocated

Every measurement runs in a fresh interpreter (``--child``), so one does not inherit another's
allocator state. In the child:

1. build the tower -- ``CLIPVisionModel`` with random weights and the real ViT-L/14-336 shape
   (24 layers, width 1024, 16 heads, MLP 4096, 336 px images, 14 px patches: 577 tokens) --, a
   ``DenseConnector`` (DCI preset, mlp2x_gelu to an LLM width of 4096) and the pixel values;
2. one warm-up forward on a single image (lazy imports, library initialisation: ~20 MB that
   are not the mode's), ``gc.collect()``, ``malloc_trim(0)`` (glibc: return freed heap pages
   to the OS, so building leaves no resident free memory for the forward to reuse unseen),
   then reset the peak RSS by writing ``5`` to ``/proc/self/clear_refs``: the baseline is
   ``ru_maxrss`` right after (``resource.getrusage``); where the reset is refused, the child
   says so;
3. one forward under ``torch.no_grad()``; the result is ``ru_maxrss`` after it minus the
   baseline (ru_maxrss is in KiB on Linux), reported in MiB.

glibc's malloc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB) resident for
reuse, which adds noise of tens of MiB at one image (one hidden state of CLIP-L is 2.3 MiB). By
default the children therefore run with ``MALLOC_MMAP_THRESHOLD_=131072``: every tensor above
128 KiB is its own mapping, returned to the OS when freed, so the peak RSS follows the peak of
live tensors (the README's table). ``--mmap-threshold glibc`` keeps glibc's dynamic threshold
(the left half of the table below).

Modes: ``streaming`` (hooks fold each layer into the features; the default of the wrapper),
``collected`` (the wrapper with ``streaming=False``: every hidden state kept, as
``output_hidden_states=True`` does, then the DenseConnector), and ``original`` (the original
pipeline: transformers' ``output_hidden_states=True`` + ``reference.dense_connector`` with its
``torch.stack`` copies + the projector).

Measured on a 2-core CPU machine (torch 2.13 CPU, transformers 5.24, fp32, 2 threads, DCI,
projector to 4096; a shared machine, so the times are noisy), peak RSS delta in MiB:

    images  streaming  collected  original  | the same with the default --mmap-threshold 131072
         1         88        174       142  |        41         86        88
         8        511        942      1012  |       326        687       705
        32       1307       2754      2825  |      1300       2743      2813

(25 hidden states of CLIP-L in fp32 are 56 / 451 / 1803 MiB for 1 / 8 / 32 images. What remains
in streaming mode is mostly the tower's own per-layer transients -- the MLP's 4096-wide
activations --: the bare tower forward, ``tower(pixels)`` without hidden states, peaks at
1156 MiB for 32 images with --mmap-threshold 131072, so streaming adds ~145 MiB to it and
collecting ~1590 MiB.)

On CUDA (``--device cuda``) the child reports ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` instead of RSS.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=4,
            image_size=56, patch_size=8)
MODES = ("streaming", "collected", "original")
#: MALLOC_MMAP_THRESHOLD_ of the children unless --mmap-threshold says otherwise (128 KiB)
DEFAULT_MMAP_THRESHOLD = 131072


def _mmap_threshold(text: str):
    if text.strip().lower() == "glibc":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count or 'glibc', got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"the threshold must be >= 0, got {value}")
    return value


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    """Trim the heap and reset the peak RSS to the current RSS; False if the kernel refuses."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss <= _status_kib("VmRSS") + 1024  # reset took effect (within 1 MiB)


def child(mode: str, batch: int, dtype_name: str, tiny: bool, llm_width: int,
          device: str) -> dict:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    try:
        import reference
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import reference
    from dc_kernels import ConnectorSpec, DenseConnector, DenseConnectorVisionTower

    dtype = getattr(torch, dtype_name)
    shape = TINY if tiny else CLIP_L_336
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**shape)).eval().to(device=device, dtype=dtype)
    tower.requires_grad_(False)
    spec = ConnectorSpec.preset("clip", "dci")
    width = shape["hidden_size"]
    projector = reference.build_projector(spec.out_channels(width), llm_width).to(device, dtype)
    connector = DenseConnector.from_projector(spec, projector)
    wrapper = DenseConnectorVisionTower(tower, connector, streaming=(mode == "streaming"))
    pixels = torch.randn(batch, 3, shape["image_size"], shape["image_size"]).to(device, dtype)

    def original(px):
        hs = tower(px, output_hidden_states=True).hidden_states
        feats = reference.dense_connector(reference.select_image_features(hs, False), hs,
                                          False, "dci")
        return projector(feats)

    fn = original if mode == "original" else wrapper
    with torch.no_grad():  # warm-up on one image: lazy imports and library initialisation
        fn(pixels[:1])
    run = lambda: fn(pixels)  # noqa: E731
    gc.collect()
    result = dict(mode=mode, batch=batch, dtype=dtype_name, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = run()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        result.update(metric="cuda max_memory_allocated",
                      delta_mib=(torch.cuda.max_memory_allocated() - base) / 2 ** 20)
    else:
        reset = _reset_peak_rss()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        with torch.no_grad():
            out = run()
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result.update(metric="peak RSS (ru_maxrss) delta", peak_reset=reset,
                      base_mib=base / 1024, delta_mib=(peak - base) / 1024)
    result.update(seconds=seconds, out_shape=list(out.shape), threads=torch.get_num_threads())
    return result


def measure(mode, batch, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, str(batch),
           "--dtype", args.dtype, "--llm-width", str(args.llm_width), "--device", args.device]
    if args.tiny:
        cmd.append("--tiny")
    env = dict(os.environ)
    env.pop("DC_KERNELS_BACKEND", None)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} x {batch} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hidden_states_mib(batch, shape, dtype_bytes) -> float:
    tokens = (shape["image_size"] // shape["patch_size"]) ** 2 + 1
    return (shape["num_hidden_layers"] + 1) * batch * tokens * shape["hidden_size"] \
        * dtype_bytes / 2 ** 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--llm-width", type=int, default=4096)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (a smoke test)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--mmap-threshold", type=_mmap_threshold, default=DEFAULT_MMAP_THRESHOLD,
                        metavar="BYTES|glibc",
                        help="glibc's MALLOC_MMAP_THRESHOLD_ in the children: blocks above it "
                             "are mmapped and unmapped on free, so the RSS follows the live "
                             f"tensors (default {DEFAULT_MMAP_THRESHOLD}, as in the README's "
                             "table); 'glibc' keeps glibc's dynamic threshold, which keeps freed "
                             "blocks of up to 32 MiB resident for reuse")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.dtype, args.tiny,
                               args.llm_width, args.device)))
        return 0

    shape = TINY if args.tiny else CLIP_L_336
    dtype_bytes = 4 if args.dtype == "float32" else 2
    results = []
    for batch in args.batches:
        for mode in args.modes:
            r = measure(mode, batch, args)
            results.append(r)
            print(f"# {mode:9s} x {batch:3d}: {r['delta_mib']:9.1f} MiB, {r['seconds']:7.1f} s",
                  file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))

    first = results[0]
    name = "tiny CLIP (24 layers, width 32)" if args.tiny else "CLIP-L/336 (24 layers, 1024 wide)"
    print(f"{name}, DCI, mlp2x_gelu to {args.llm_width}, {args.dtype}, {args.device}, "
          f"torch.no_grad(), {first['threads']} threads; {first['metric']} in MiB"
          + ("" if args.device == "cuda" else
             f" (peak reset by clear_refs: {all(r['peak_reset'] for r in results)}; "
             + ("glibc default malloc" if args.mmap_threshold is None else
                f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}") + ")"))
    header = ["images"] + args.modes + ["hidden states (25 layers)"] + \
        [f"time {m} (s)" for m in args.modes]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for batch in args.batches:
        row = {r["mode"]: r for r in results if r["batch"] == batch}
        cells = [str(batch)] + [f"{row[m]['delta_mib']:.0f}" for m in args.modes] + \
            [f"{hidden_states_mib(batch, shape, dtype_bytes):.0f}"] + \
            [f"{row[m]['seconds']:.1f}" for m in args.modes]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
