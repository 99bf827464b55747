"""Whole-module forward + backward: DenseConnector vs the original, side by side.

``python -m benchmarks.module_fwd_bwd [--dtype fp32|bf16] [--images N] [--device cpu|cuda]``

CLIP-L/336 DCI (25 hidden states ``[B, 577, 1024]``) -> ``mlp2x_gelu`` projector to 4096; the
loss is ``output.sum()``, the projector's parameters take gradients, the hidden states do not
(the frozen ViT of the Dense Connector). Reports the median time and the peak memory above the
inputs (``benchmarks.memory``) of each, measured in the same run.
"""

from __future__ import annotations

import argparse

import torch

import dc_kernels
import reference
from benchmarks.memory import peak_memory_bytes
from benchmarks.timing import time_fn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    spec = dc_kernels.ConnectorSpec.preset("clip", "dci")
    hs = tuple(torch.randn(args.images, 577, 1024, device=device).to(dtype)
               for _ in range(spec.num_hidden_states))
    proj = reference.build_projector(spec.out_channels(1024), 4096).to(device, dtype)
    module = dc_kernels.DenseConnector.from_projector(spec, proj)

    def original():
        feats = reference.dense_connector(reference.select_image_features(hs, False), hs, False)
        proj(feats).sum().backward()

    def ours():
        module(hs).sum().backward()

    print(f"CLIP-L/336 DCI -> 4096, {args.images} images, {args.dtype}, {device.type}; "
          "forward + backward (projector grads)")
    for name, fn in (("reference", original), ("dc_kernels", ours)):
        fn()  # warm-up; the parameter gradients then exist in both runs alike
        peak = peak_memory_bytes(fn, device)
        t = time_fn(fn, device, budget_s=3.0)
        mem = f"{peak / 2 ** 20:.1f} MiB" if peak is not None else "n/a"
        print(f"{name:>10}: median {t.median_s * 1e3:.1f} ms (p20-p80 {t.p20_s * 1e3:.1f}-"
              f"{t.p80_s * 1e3:.1f}), peak {mem}")


if __name__ == "__main__":
    main()
