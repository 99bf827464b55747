"""``torch.library.opcheck`` for every custom op of dc_kernels.

opcheck runs each op through torch's own consistency tests: the schema (no undeclared mutation or
aliasing), the autograd registration, the fake (meta) kernel against the real one (shapes,
dtypes, strides) and ``aot_dispatch_dynamic`` (tracing with dynamic shapes). The ops run on the
Triton interpreter without a GPU (conftest). Cases cover every branch the ops take: channel and
STI specs, CLS dropped or not, a layer in two groups, unread layers, strided inputs and bias,
with and without bias, GELU or none, fused and two-pass, and every op with inputs that require
grad (so the backward formulas are traced too).
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from dc_kernels.autograd import (_kept_for_backward, features_op, linear_custom_op,
                                 scatter_grad_op)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: the custom ops of dc_kernels; a new one must be added here (test_every_op_is_checked)
OPS = {"dc_kernels::features": features_op, "dc_kernels::linear": linear_custom_op,
       "dc_kernels::scatter_grad": scatter_grad_op}


def _states(n, B, T, C, dtype=torch.float32, grad=True, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        if strided and i % 2:
            h = torch.randn(B, T, 2 * C, generator=g).to(dtype).to(DEVICE)[..., ::2]
        else:
            h = torch.randn(B, T, C, generator=g).to(dtype).to(DEVICE)
        out.append(h.requires_grad_(grad))
    return out


# (hidden-state count, final_layer, flattened groups, drop_cls, sti pool or 0)
SPECS = {
    "dci_cls": (5, 4, [0, 2, 2, 5], True, 0),
    "sci": (4, 0, [1, 2, 3, 4], False, 0),
    "dci_overlap_unread_tail": (7, 3, [0, 4, 2, 6], False, 0),
    "sti_cls": (5, 4, [0, 2, 2, 5], True, 3),
    "sti_pool1": (3, 2, [0, 3], False, 1),
}


@pytest.mark.parametrize("name, grad", [(n, True) for n in sorted(SPECS)] + [("sti_cls", False)])
def test_opcheck_features(name, grad):
    n, final, bounds, drop_cls, pool = SPECS[name]
    hs = _states(n, 2, 8, 6, grad=grad, strided=name.startswith("dci"))
    opcheck(features_op, (hs, final, bounds, drop_cls, pool))


@pytest.mark.parametrize("case", [
    ("dci_cls", True, "gelu", "fused", torch.float32, True),
    ("dci_cls", False, "none", "two-pass", torch.float32, True),
    ("sci", True, "gelu", "auto", torch.bfloat16, True),
    ("dci_overlap_unread_tail", True, "none", "fused", torch.float16, True),
    ("sti_cls", True, "gelu", "two-pass", torch.float32, True),
    # a frozen ViT: the op keeps A and Z (fused runs two-pass)
    ("dci_cls", True, "gelu", "fused", torch.float32, False),
    ("sti_cls", True, "gelu", "two-pass", torch.bfloat16, False),
], ids=lambda c: "-".join(str(v) for v in c))
def test_opcheck_linear(case):
    name, has_bias, activation, path, dtype, hs_grad = case
    n, final, bounds, drop_cls, pool = SPECS[name]
    C = 6
    K = C if pool else C * (len(bounds) // 2 + 1)
    g = torch.Generator().manual_seed(1)
    hs = _states(n, 2, 9, C, dtype=dtype, grad=hs_grad, strided=True)
    w = (torch.randn(7, K, generator=g) / 3).to(dtype).to(DEVICE).requires_grad_()
    b = (torch.randn(14, generator=g).to(dtype).to(DEVICE)[::2].requires_grad_()
         if has_bias else None)  # a strided bias
    # the training outputs (A, Z) the public path asks for with these inputs
    keep = _kept_for_backward(hs, final, bounds, w, b, activation)
    opcheck(linear_custom_op, (hs, final, bounds, drop_cls, pool, w, b, activation, path,
                               *keep))


@pytest.mark.parametrize("wanted", ([0, 2, 4], [3], [0, 1, 2, 3, 4]))
def test_opcheck_scatter_grad(wanted):
    # dci_cls: 5 hidden states of [2, 8, 6]; A = [2, 7, 18]
    g = torch.Generator().manual_seed(2)
    grad_a = torch.randn(2, 7, 18, generator=g).to(DEVICE)
    opcheck(scatter_grad_op, (grad_a, 4, [0, 2, 2, 5], True, 8, 5, wanted))
    # a non-contiguous incoming gradient (the op makes its own layout choice)
    opcheck(scatter_grad_op, (grad_a.transpose(0, 1).contiguous().transpose(0, 1), 4,
                              [0, 2, 2, 5], True, 8, 5, wanted))


def test_every_op_is_checked():
    """Every custom op registered under the dc_kernels namespace has opcheck cases here."""
    import dc_kernels  # noqa: F401 -- registers the ops
    registered = {f"dc_kernels::{name}" for name in dir(torch.ops.dc_kernels)
                  if not name.startswith("_") and name not in ("name", "_dir")
                  and isinstance(getattr(torch.ops.dc_kernels, name),
                                 torch._ops.OpOverloadPacket)}
    assert registered == set(OPS), f"custom ops without opcheck cases: {registered - set(OPS)}"
