"""Dense Connector on a Hugging Face CLIP tower, end to end, offline.

Builds a tiny random CLIP vision tower (the real depth, 24 layers; a small width) and a
``dc_kernels.DenseConnector``; saves a projector in the original Dense Connector's checkpoint
format (``model.mm_projector.0.weight`` ... via ``torch.save``, as the original's stage-1
``mm_projector.bin``) and loads it with ``DenseConnector.load_mm_projector``; runs a batch of
images through ``DenseConnectorVisionTower`` (streaming and not) and through the original
pipeline (the tower with ``output_hidden_states=True``, ``reference.dense_connector``, the
original projector); prints shapes, the largest error and times.

    python examples/dense_connector_demo.py [--batch 4] [--connector dci|sci|sti]
                                             [--dtype float32|bfloat16] [--width 64]

Exits with status 1 if the error exceeds ``--tol`` (default: 1e-5 for fp32, 6e-2 for bf16,
relative to the largest output). With pretrained weights, replace the tower by
``CLIPVisionModel.from_pretrained("openai/clip-vit-large-patch14-336")`` and the checkpoint by the
original's ``mm_projector.bin``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import reference
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import reference

import dc_kernels
from dc_kernels import ConnectorSpec, DenseConnector, DenseConnectorVisionTower

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# fp32: both sides accumulate in fp32 (the original rounds its group sums in fp32 too).
# bf16: the original rounds group sums and means in bf16, dc_kernels once; outputs are bf16.
DEFAULT_TOL = {"float32": 1e-5, "bfloat16": 6e-2}


def build_tower(width: int, layers: int, image_size: int, patch_size: int, seed: int):
    """A random CLIP vision tower (transformers), built from a config: no download."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width,
                              num_hidden_layers=layers, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size)
    return CLIPVisionModel(config).eval()


def timed(fn, repeats: int = 3):
    """(result, best wall time in ms over ``repeats`` runs)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--connector", choices=("dci", "sci", "sti"), default="dci")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--width", type=int, default=64, help="ViT width C")
    parser.add_argument("--llm-width", type=int, default=128, help="LLM width H")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=None)
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    tol = DEFAULT_TOL[args.dtype] if args.tol is None else args.tol

    spec = ConnectorSpec.preset("clip", args.connector)
    tower = build_tower(args.width, spec.num_hidden_states - 1, args.image_size,
                        args.patch_size, args.seed).to(dtype)

    # The original's projector and its checkpoint (keys "model.mm_projector.0.weight", ...)
    torch.manual_seed(args.seed + 1)
    original_projector = reference.build_projector(spec.out_channels(args.width),
                                                   args.llm_width, "mlp2x_gelu").to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mm_projector.bin"
        torch.save({f"model.mm_projector.{k}": v
                    for k, v in original_projector.state_dict().items()}, path)
        connector = DenseConnector(spec, args.width, args.llm_width, "mlp2x_gelu").to(dtype)
        connector.load_mm_projector(path)
    print(f"checkpoint keys: {sorted(connector.state_dict())} (loaded from model.mm_projector.*)")

    g = torch.Generator().manual_seed(args.seed + 2)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(dtype)

    def original():
        hs = tower(pixels, output_hidden_states=True).hidden_states
        feats = reference.dense_connector(reference.select_image_features(hs, False), hs, False,
                                          args.connector)
        return original_projector(feats)

    streaming = DenseConnectorVisionTower(tower, connector, streaming=True)
    collected = DenseConnectorVisionTower(tower, connector, streaming=False)
    with torch.no_grad():
        want, t_orig = timed(original)
        got, t_stream = timed(lambda: streaming(pixels))
        got_collected, t_coll = timed(lambda: collected(pixels))

    scale = max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    err_collected = (got_collected.double() - want.double()).abs().max().item()
    max_rel_error = max(err, err_collected) / scale
    print(f"dc_kernels {dc_kernels.__version__}, torch {torch.__version__}, {args.dtype}, "
          f"{args.connector}, backend {connector.backend}")
    print(f"pixel_values:          {tuple(pixels.shape)}")
    print(f"hidden states:         {spec.num_hidden_states} x "
          f"{tuple(tower(pixels[:1], output_hidden_states=True).hidden_states[0].shape[1:])}"
          " per image")
    print(f"image tokens (output): {tuple(got.shape)}  [B, tokens, LLM width]")
    print(f"max abs error vs original: streaming {err:.3e}, collected {err_collected:.3e} "
          f"(largest |output| {scale:.3f})")
    print(f"time (best of 3): original {t_orig:.1f} ms, streaming {t_stream:.1f} ms, "
          f"collected {t_coll:.1f} ms")
    print(f"max_rel_error={max_rel_error:.6e} tol={tol:.1e}")
    if not max_rel_error <= tol:
        print("FAILED: error above tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
