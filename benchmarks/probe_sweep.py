"""Probe sweep cost (issue 5): the same as `diffdissect bench probe`.

    python benchmarks/probe_sweep.py [--n-images N] [--json FILE]
"""
from __future__ import annotations

import sys

from diffdissect.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "probe", *sys.argv[1:]]))
