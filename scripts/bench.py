"""Benchmarks of the domain-parallel path: bytes vs minimum, activation memory, FLOPs, time.

Self-launching on CPU (spawns 1, 2 and 4 gloo ranks), or under torchrun for the launched world:

    python scripts/bench.py --raw docs/benchmarks/rows.jsonl --plots docs/benchmarks
    python scripts/bench.py --worlds 2 --resolutions 64x128 --cases conv3x3 --repeats 3
    torchrun --nproc-per-node 4 scripts/bench.py --worlds 4

Same options as ``credit-dtensor bench`` (``--help``); see docs/benchmarks.md.
"""

from __future__ import annotations

import sys

from credit_dtensor.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
