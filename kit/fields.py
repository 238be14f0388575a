"""Whole fields for the image model: the downscaling and the field cache.

``downscale_field(image, size)``: an (H, W, 4) uint8/uint16 RGBY image (`kit.images.read_sample`)
-> ``4 x size x size`` uint8, channels first: `kit.images.to_uint8`, then cv2.resize with
INTER_AREA (INTER_LINEAR when enlarging).

Field cache: ``<data.field_cache>/fields-<S>-<key>/<ID>.npy``, one downscaled field per image
(`np.save`, written atomically). ``<key>`` = `kit.cachekey.cache_key` of the field size, the
images folder's absolute path (two datasets never share a cache) and `FIELD_CACHE_VERSION`. An
entry is current when it is newer than every channel file of its image (a field written before
the image was replaced is redone). `kit.prepare` writes the entries, from the image it decodes
once for every stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from kit.atomic import atomic_path
from kit.cachekey import cache_key
from kit.ids import check_id

__all__ = ["FIELD_CACHE_VERSION", "downscale_field", "field_cache_dir", "field_path", "write_field", "field_done"]

FIELD_CACHE_VERSION = 1


def downscale_field(image: np.ndarray, size: int) -> np.ndarray:
    """H x W x 4 (uint8/uint16) -> 4 x size x size uint8 (to_uint8, then INTER_AREA resize)."""
    from kit.images import to_uint8

    img = to_uint8(image)
    if img.shape[0] != size or img.shape[1] != size:
        interp = cv2.INTER_AREA if min(img.shape[:2]) >= size else cv2.INTER_LINEAR
        img = cv2.resize(img, (size, size), interpolation=interp)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def field_cache_dir(root: str | Path, size: int, images_dir: str | Path | Sequence[str | Path]) -> Path:
    """``<root>/fields-<size>-<key>`` for fields of `size` px of the images in `images_dir` (one
    folder, or the list of a run's train folders: the key then covers every folder)."""
    folders = [images_dir] if isinstance(images_dir, (str, Path)) else list(images_dir)
    images = [str(Path(f).resolve()) for f in folders]
    key = cache_key("fields", FIELD_CACHE_VERSION, {"size": int(size), "images": images[0] if len(images) == 1 else images})
    return Path(root) / f"fields-{int(size)}-{key}"


def field_path(field_dir: str | Path, image_id: str) -> Path:
    return Path(field_dir) / f"{check_id(image_id)}.npy"


def write_field(field_dir: str | Path, image_id: str, image: np.ndarray, size: int) -> Path:
    """Downscale `image` and save it as the image's entry (atomically)."""
    path = field_path(field_dir, image_id)
    with atomic_path(path) as tmp:
        np.save(tmp, downscale_field(image, size))
    return path


def field_done(field_dir: str | Path, image_id: str, newest_source_ns: int | None = None) -> bool:
    """True when the entry exists (and, given the newest channel file's mtime, is not older than it)."""
    try:
        mtime = field_path(field_dir, image_id).stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return newest_source_ns is None or mtime >= newest_source_ns
