"""Throughput bench: the same as ``python -m kit bench`` (see kit/bench.py for what it measures).

    .venv/bin/python benchmarks/bench_throughput.py --backbones resnet18,resnet50 --tile-size 128 --field-size 512
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
