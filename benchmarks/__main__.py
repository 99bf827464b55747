"""``python -m benchmarks``: see ``python -m benchmarks --help``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
