"""Repository shortcut: ``import reference`` from a clone is :mod:`dc_kernels.reference`.

The reference ships inside the ``dc_kernels`` package (the wheel installs no other top-level
name); this folder only keeps the short import the tests, benchmarks and examples use.
"""

from dc_kernels.reference import *  # noqa: F401,F403
from dc_kernels.reference import __all__  # noqa: F401
