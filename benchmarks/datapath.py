"""The store-to-batch data path vs a raw read (issue 20): the same as `diffdissect bench datapath`.

    python benchmarks/datapath.py [--rows N] [--rounds R] [--json FILE]

All logic lives in diffdissect.bench.datapath; this script only forwards its arguments to the CLI.
"""
from __future__ import annotations

import sys

from diffdissect.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "datapath", *sys.argv[1:]]))
