"""The package's public names: every name a module exports in ``__all__`` exists, and every
exported function and class carries a docstring.

A name left in ``__all__`` after its definition went away breaks ``from module import *`` and
every user who imported it; this walks every module of the package (the vLLM model module
only where vLLM is installed: it imports vLLM at the top).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import dc_kernels


def _modules():
    names = [m.name for m in pkgutil.walk_packages(dc_kernels.__path__, "dc_kernels.")]
    assert "dc_kernels.ops.gemm_tma" in names and "dc_kernels.functional" in names
    return ["dc_kernels"] + names


@pytest.mark.parametrize("name", _modules())
def test_exported_names_exist_and_are_documented(name):
    if name == "dc_kernels.integrations.vllm.model":
        pytest.importorskip("vllm")  # imports vLLM itself; covered by the vLLM suite (.ci/vllm)
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", ())
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what the module does not define: {missing}"
    undocumented = [n for n in exported
                    if (inspect.isfunction(getattr(module, n)) or
                        inspect.isclass(getattr(module, n)))
                    and not inspect.getdoc(getattr(module, n))]
    assert not undocumented, f"{name} exports undocumented {undocumented}"
