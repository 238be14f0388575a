"""Shared fixtures. Real HPA files live in ../shared beside the clone; tests skip when absent."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO.parent / "shared"
REAL_TRAIN_CSV = SHARED_DIR / "data/hpa_real/labels/hpa2021_train.csv"
REAL_PORTABLE_DIR = SHARED_DIR / "data/hpa_real/HPACellSegmentatorPortable"


def require(path: Path) -> Path:
    """Skip the calling test, saying which file is missing, when `path` does not exist."""
    if not path.exists():
        pytest.skip(f"real HPA data not found at {path} (../shared beside the clone)")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic dataset in the Kaggle layout, with truth; shared by the whole session.

    12 train and 4 test images of 256 px (8-bit). Tests must not modify it.
    """
    from kit.synth import generate_dataset

    out = tmp_path_factory.mktemp("tiny_synth")
    generate_dataset(out, n_train=12, n_test=4, size=256, seed=7, bit_depth=8)
    return out


@pytest.fixture(autouse=True, scope="session")
def _throughput_cache(tmp_path_factory):
    """The throughput probe's cache (kit.throughput) in a temporary file, never in the user's home."""
    import os

    os.environ.setdefault("KIT_THROUGHPUT_CACHE", str(tmp_path_factory.mktemp("throughput") / "throughput.json"))
    # the suite runs the baseline path unless a test switches the probe on (tests/test_throughput.py):
    # probing every tiny test model would add minutes on a shared 2-core machine
    os.environ.setdefault("KIT_THROUGHPUT_PROBE", "0")
