"""Capture overhead and memory benchmark (issue 2): the same as `diffdissect bench capture`.

    python benchmarks/capture.py [--sd15] [--repeats N] [--json FILE]

All logic lives in diffdissect.bench.capture; this script only forwards its arguments to the CLI.
"""
from __future__ import annotations

import sys

from diffdissect.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "capture", *sys.argv[1:]]))
