"""Peak memory of transformers' LLaVA family, stock vs ``dc_kernels.patch_llava(model)`` (no spec).

    python -m benchmarks.hf_llava_memory                       # all cases, fp32, CPU
    python -m benchmarks.hf_llava_memory --cases llava15 --images 1 8
    python -m benchmarks.hf_llava_memory --json r.json --markdown r.md

The patch keeps the model's own ``vision_feature_layer`` and projector and gives the same logits
(the tests check them bit for bit); what it changes is how the tower runs: layer by layer, the
layers after the last one read are not run, and the layers read are copied into the features as
they are produced instead of being collected and concatenated. This measures what that saves.

Cases (random weights at the real shapes; the language model is a single 4096-wide Llama layer
with a small MLP and vocabulary -- it is not what is measured, but the projector's output width
and the full forward need it):

* ``llava15``: LLaVA-1.5 -- CLIP ViT-L/14-336 (24 layers, 1024 wide, 577 tokens),
  ``vision_feature_layer=-2``, ``"default"`` (CLS dropped), projector to 4096.
* ``granite-anyres``: a Granite-Vision-style LLaVA-NeXT -- SigLIP so400m/14-384 (27 layers, 1152
  wide, 729 tokens), ``vision_feature_layer=[-24, -20, -12, -1]``, ``"full"``, AnyRes: one image
  of 300 x 700 px (a 1 x 2 grid + the base image = 3 crops), ``image_newline`` packing.

Ops, each measured on the same inputs for ``stock`` (unpatched) and ``dc_kernels`` (patched):

* ``image_features``: ``model.get_image_features(...)`` (tower + projector + packing);
* ``forward``: ``model(input_ids, pixel_values, ...)`` (the language model included);
* ``forward+hidden``: the same with ``output_hidden_states=True`` (a user reading the language
  model's hidden states): transformers then collects every vision hidden state too.

Every measurement runs in a fresh interpreter (``--child``), after one warm-up call on one image
(library initialisation), under ``torch.no_grad()``; peak memory is
``benchmarks.memory.peak_memory_bytes`` (CPU: resident-set high-water mark during the call above
the RSS before it, after trimming the heap and resetting the mark; CUDA:
``max_memory_allocated`` above ``memory_allocated``). On CPU the children run with glibc's
``MALLOC_MMAP_THRESHOLD_=131072`` so every tensor above 128 KiB is its own mapping, returned to
the OS when freed, and the RSS follows the live tensors. Each child also reports the sum and the
largest magnitude of its output; the table says whether stock and dc_kernels agree exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = ("llava15", "granite-anyres")
OPS = ("image_features", "forward", "forward+hidden")
MODES = ("stock", "dc_kernels")
LLM_WIDTH = 4096
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                     num_attention_heads=16, image_size=384, patch_size=14)
TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=28,
            patch_size=4)
IMAGE_TOKEN = 999


def _text_config(tiny: bool):
    from transformers import LlamaConfig
    width = 64 if tiny else LLM_WIDTH
    return LlamaConfig(hidden_size=width, intermediate_size=256, num_hidden_layers=1,
                       num_attention_heads=8 if tiny else 32, num_key_value_heads=8,
                       vocab_size=1000, max_position_embeddings=8192)


def build(case: str, tiny: bool, dtype):
    """(model, inputs without input_ids) of a case, random weights, eval mode."""
    import torch
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration,
                              SiglipVisionConfig)
    torch.manual_seed(0)
    if case == "llava15":
        shape = dict(TINY, num_hidden_layers=24) if tiny else CLIP_L_336
        config = LlavaConfig(vision_config=CLIPVisionConfig(**shape),
                             text_config=_text_config(tiny), image_token_id=IMAGE_TOKEN,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(config)
        side = shape["image_size"]
        inputs = lambda images: dict(pixel_values=torch.randn(images, 3, side, side))  # noqa
    elif case == "granite-anyres":
        shape = dict(TINY, num_hidden_layers=27) if tiny else SIGLIP_SO400M
        side = shape["image_size"]
        config = LlavaNextConfig(vision_config=SiglipVisionConfig(**shape),
                                 text_config=_text_config(tiny), image_token_id=IMAGE_TOKEN,
                                 vision_feature_layer=[-24, -20, -12, -1],
                                 vision_feature_select_strategy="full",
                                 image_grid_pinpoints=[[side, 2 * side], [2 * side, side]])
        model = LlavaNextForConditionalGeneration(config)
        size = [side * 300 // 384, side * 700 // 384]  # (h, w): a 1 x 2 grid, 3 crops

        def inputs(images):
            return dict(pixel_values=torch.randn(images, 3, 3, side, side),
                        image_sizes=torch.tensor([size] * images))
    else:
        raise ValueError(f"unknown case {case!r}; known: {CASES}")
    model.requires_grad_(False)
    return model.to(dtype).eval(), inputs


def child(case: str, mode: str, op: str, images: int, tiny: bool, dtype_name: str) -> dict:
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import dc_kernels
    from benchmarks.memory import METHOD, peak_memory_bytes

    dtype = getattr(torch, dtype_name)
    model, make_inputs = build(case, tiny, dtype)
    if mode == "dc_kernels":
        dc_kernels.patch_llava(model)
    device = torch.device("cpu")

    def cast(d):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in d.items()}

    def prepare(inputs):
        """The measured call; for the forward ops the prompt (as many image tokens as the
        features have rows) is built from an unmeasured image pass on the same inputs."""
        if op == "image_features":
            return lambda: model.get_image_features(**inputs).pooler_output
        counts = [f.shape[0] for f in model.get_image_features(**inputs).pooler_output]
        ids = torch.cat([torch.full((n,), IMAGE_TOKEN) for n in counts]
                        + [torch.arange(8)])[None]
        kwargs = dict(output_hidden_states=True) if op == "forward+hidden" else {}
        return lambda: model(input_ids=ids, **inputs, **kwargs).logits

    with torch.no_grad():
        prepare(cast(make_inputs(1)))()  # warm-up on one image: library initialisation
        fn = prepare(cast(make_inputs(images)))
        kept = {}

        def measured():
            kept["out"] = fn()
            return kept["out"]

        t0 = time.perf_counter()
        peak = peak_memory_bytes(measured, device)
        seconds = time.perf_counter() - t0
    out = kept["out"]
    flat = torch.cat([o.reshape(-1) for o in out]) if isinstance(out, (list, tuple)) \
        else out.reshape(-1)
    return dict(case=case, mode=mode, op=op, images=images, dtype=dtype_name, tiny=tiny,
                peak_mib=None if peak is None else peak / 2 ** 20, seconds=seconds,
                out_numel=flat.numel(), out_sum=flat.double().sum().item(),
                out_absmax=flat.abs().max().item(), threads=torch.get_num_threads(),
                method=METHOD["cpu"])


def measure(case, mode, op, images, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.hf_llava_memory", "--child", case, mode, op,
           str(images), "--dtype", args.dtype]
    if args.tiny:
        cmd.append("--tiny")
    env = dict(os.environ)
    env.pop("DC_KERNELS_BACKEND", None)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout,
                          cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}/{mode}/{op} x {images} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results, args, info) -> str:
    lines = ["# LLaVA family, stock transformers vs dc_kernels.patch_llava (no spec): peak memory",
             "",
             f"- machine: {info['cpu_model']}, {info['cpu_cores']} usable cores, torch threads "
             f"{results[0]['threads']}; torch {info['torch']}, transformers "
             f"{info['transformers']}, python {info['python']}",
             f"- date: {info['date']} ({info['time_utc']}); dtype **{args.dtype}**; "
             f"{'TINY shapes (smoke test)' if args.tiny else 'real tower shapes, random weights'}",
             f"- peak memory: {results[0]['method']}; every cell a fresh process, one warm-up "
             "call on one image first, MALLOC_MMAP_THRESHOLD_=131072",
             "- command: `python -m benchmarks.hf_llava_memory " + " ".join(args.argv) + "`",
             "- cases: see the module docstring (`benchmarks/hf_llava_memory.py`); the language "
             "model is one 4096-wide Llama layer",
             "- time: one call on a shared 2-core machine (indicative only, not a timing "
             "benchmark)",
             "",
             "| case | op | images | stock MiB | dc_kernels MiB | saved | stock s | dc_kernels s "
             "| outputs equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case in args.cases:
        for op in args.ops:
            for images in args.images:
                row = {r["mode"]: r for r in results
                       if (r["case"], r["op"], r["images"]) == (case, op, images)}
                if set(row) != set(MODES):
                    continue
                s, d = row["stock"], row["dc_kernels"]
                equal = all(s[k] == d[k] for k in ("out_numel", "out_sum", "out_absmax"))
                saved = "n/a" if s["peak_mib"] is None or d["peak_mib"] is None else \
                    f"{100 * (1 - d['peak_mib'] / s['peak_mib']):.0f}%"
                lines.append(
                    f"| {case} | {op} | {images} | {s['peak_mib']:.0f} | {d['peak_mib']:.0f} | "
                    f"{saved} | {s['seconds']:.1f} | {d['seconds']:.1f} | "
                    f"{'yes' if equal else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (a smoke test)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--child", nargs=4, metavar=("CASE", "MODE", "OP", "IMAGES"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.child:
        case, mode, op, images = args.child
        print(json.dumps(child(case, mode, op, int(images), args.tiny, args.dtype)))
        return 0

    import torch
    import transformers
    from benchmarks.machine import machine_info
    from benchmarks.report import write_outputs
    info = machine_info(torch.device("cpu"))
    info["transformers"] = transformers.__version__
    results = []
    for case in args.cases:
        for op in args.ops:
            for images in args.images:
                for mode in MODES:
                    r = measure(case, mode, op, images, args)
                    results.append(r)
                    print(f"# {case} {op} x{images} {mode}: {r['peak_mib']:.1f} MiB, "
                          f"{r['seconds']:.1f} s", file=sys.stderr, flush=True)
    table = markdown(results, args, info)
    print(table)
    write_outputs(args.markdown, table, args.json, dict(machine=info, results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
