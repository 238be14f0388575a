"""Test and benchmark helpers that are no part of the kit (benchmarks put tests/ on sys.path)."""
from __future__ import annotations

import base64
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np


def reference_encode_binary_mask(mask: np.ndarray) -> bytes:
    """The host's published encoder, verbatim in substance (pycocotools, full frame). For tests."""
    from pycocotools import mask as coco_mask

    if mask.dtype != bool:
        raise ValueError(f"encode_binary_mask expects a binary mask, received dtype == {mask.dtype}")
    mask = np.squeeze(mask)
    if len(mask.shape) != 2:
        raise ValueError(f"encode_binary_mask expects a 2d mask, received shape == {mask.shape}")
    mask_to_encode = mask.reshape(mask.shape[0], mask.shape[1], 1)
    mask_to_encode = mask_to_encode.astype(np.uint8)
    mask_to_encode = np.asfortranarray(mask_to_encode)
    encoded_mask = coco_mask.encode(mask_to_encode)[0]["counts"]
    binary_str = zlib.compress(encoded_mask, zlib.Z_BEST_COMPRESSION)
    return base64.b64encode(binary_str)


def write_random_tiles(tile_dir: str | Path, ids: Sequence[str], targets: np.ndarray, size: int = 32,
                       cells: tuple[int, int] = (2, 5), seed: int = 0) -> Path:
    """A tile cache of random tiles whose green channel carries a per-class
    pattern (so a model can learn something). Writes ``<ID>.npy`` and ``<ID>.csv`` like kit.cells (`kit.cells.write_tiles`)."""
    import pandas as pd

    tile_dir = Path(tile_dir)
    tile_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    patterns = np.stack([np.sin((xx * (1 + c % 5) + yy * (1 + c // 5)) * np.pi / size) for c in range(19)])
    for image_id, t in zip(ids, np.asarray(targets)):
        n = int(rng.integers(cells[0], cells[1] + 1))
        x = rng.integers(0, 60, size=(n, 4, size, size)).astype(np.float32)
        sig = (patterns[np.flatnonzero(t)].sum(0) if t.any() else np.zeros((size, size))) * 80
        x[:, 1] += np.clip(sig, 0, None)
        np.save(tile_dir / f"{image_id}.npy", np.clip(x, 0, 255).astype(np.uint8))
        pd.DataFrame({"cell_id": np.arange(1, n + 1)}).to_csv(tile_dir / f"{image_id}.csv", index=False)
    return tile_dir
