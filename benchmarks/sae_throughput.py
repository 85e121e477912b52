"""SAE training throughput vs EleutherAI sparsify (issue 4): the same as `diffdissect bench sae`.

    python benchmarks/sae_throughput.py [--no-install] [--json FILE]

Installs the peer (pip package eai-sparsify) if it is missing, or skips it if that fails. All logic
lives in diffdissect.bench.sae; this script only forwards its arguments to the CLI.
"""
from __future__ import annotations

import sys

from diffdissect.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "sae", *sys.argv[1:]]))
