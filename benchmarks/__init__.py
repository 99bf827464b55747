"""Benchmarks of dc_kernels against the original Dense Connector (eager and ``torch.compile``).

Run ``python -m benchmarks --help`` from the repository root; ``benchmarks/README.md`` explains
the columns, the floor and how the ceilings and peak memory are measured.

Modules (each small, one job):

* :mod:`benchmarks.cases`     -- shape presets, cases (shape x images) and their inputs
* :mod:`benchmarks.costs`     -- floor bytes and FLOPs of every op (docs/DESIGN.md §2)
* :mod:`benchmarks.providers` -- the callables compared: reference, compile, dc_kernels paths
* :mod:`benchmarks.accuracy`  -- the correctness check run before any timing
* :mod:`benchmarks.timing`    -- one timing function (do_bench on GPU, perf_counter on CPU)
* :mod:`benchmarks.memory`    -- peak memory of one call
* :mod:`benchmarks.ceilings`  -- measured copy bandwidth and matmul peak
* :mod:`benchmarks.machine`   -- card, CPU and software versions
* :mod:`benchmarks.runner`    -- runs a selection and returns rows
* :mod:`benchmarks.report`    -- table on stdout, markdown, JSON, plot
* :mod:`benchmarks.bundle`    -- the GPU bundle (tests + issue-3 table + target checks)
* :mod:`benchmarks.cli`       -- ``python -m benchmarks``
"""

__all__ = ["main"]


def main(argv=None) -> int:
    """Entry point of ``python -m benchmarks`` (see :func:`benchmarks.cli.main`)."""
    from .cli import main as _main
    return _main(argv)
