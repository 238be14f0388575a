"""The ``learned`` segmentation backend: classical nucleus seeds, cells grown over a learned landscape.

Steps:
1. The image is reduced to the working scale exactly as the classical backend reduces it
   (`kit.segment.classical.reduce_image`: area averaging to 1/4, plus red and yellow grey-eroded
   by 1 px at full resolution so thin seams survive) and each channel is normalised over the field.
2. Nuclei come from the classical backend (`_find_nuclei`: h-maxima seeds on the blue channel).
3. A tiny U-Net (`kit.segment.segnet`, ~230k parameters, weights shipped in the package as
   ``kit/segment/data/segnet.npz``, trained on synthetic truth by ``benchmarks/train_segnet.py``)
   maps red, yellow, blue and the two seam planes to a cell-foreground and a cell-border
   probability.
4. A seeded watershed from the nuclei over the border probability (cells meet where the
   network sees a border, whatever the brightness on either side), inside the foreground
   (probability above `fg_threshold`, holes filled, united with the nuclei). Every cell keeps
   its seed nucleus, so no cell is invented without one; cells smaller than a fraction of the
   typical nucleus are dropped.

torch is imported only when the backend runs (or checks its weights). The mask cache key holds
the weights file's sha256 (`cache_key`), so retrained weights never reuse stale masks.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from kit.errors import ConfigError
from kit.segment import register_backend
from kit.segment.classical import (
    _find_nuclei,
    _remove_small,
    _relabel,
    _resize_labels,
    normalize_channel,
    reduce_image,
)

__all__ = ["segment_learned", "planes_from_reduced", "input_planes", "default_weights",
           "weights_sha256", "grow_cells"]


def default_weights() -> Path:
    """The weights file shipped in the package."""
    return Path(__file__).with_name("data") / "segnet.npz"


def planes_from_reduced(small: np.ndarray, ero: np.ndarray | None) -> np.ndarray:
    """(h, w, 5) float32 network input from `reduce_image`'s output: red, yellow, blue, eroded
    red, eroded yellow, each normalised over the field (no erosion at full scale: the plain ones)."""
    r, y, b = (normalize_channel(small[..., c]) for c in (0, 3, 2))
    if ero is None:
        er, ey = r, y
    else:
        er, ey = normalize_channel(ero[..., 0]), normalize_channel(ero[..., 1])
    return np.stack([r, y, b, er, ey], axis=-1)


def input_planes(image: np.ndarray, scale: float, min_work_side: int) -> tuple[np.ndarray, np.ndarray]:
    """(planes (h, w, 5), small (h, w, 4)) of a full (H, W, 4) image at its working scale."""
    small, ero = reduce_image(image, scale, min_work_side, 1.0)
    return planes_from_reduced(small, ero), small


def _weights_path(weights: str) -> Path:
    return Path(weights).expanduser() if weights else default_weights()


def _check(options: dict) -> None:
    path = _weights_path(options.get("weights", ""))
    if not path.is_file():
        raise ConfigError(f"learned segmentation backend: weights file {path} not found "
                          "(retrain with benchmarks/train_segnet.py, or pass --option weights=PATH)")
    try:
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch is pinned in requirements.txt
        raise ConfigError("the learned segmentation backend needs torch (pip install torch)") from e


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file's bytes (what keys the mask cache; no torch needed)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cache_key(options: dict) -> dict:
    """Options that change the output, with the weights by content (not by path); no thread count."""
    key = {k: v for k, v in options.items() if k not in ("weights", "threads")}
    path = _weights_path(options.get("weights", ""))
    key["weights_sha256"] = weights_sha256(path) if path.is_file() else None
    return key


@register_backend("learned")
def segment_learned(
    image: np.ndarray,
    *,
    scale: float = 0.25,
    min_work_side: int = 400,
    weights: str = "",
    fg_threshold: float = 0.5,
    distance_weight: float = 0.05,
    min_cell_fraction: float = 0.5,
    threads: int = 1,
    nucleus_threshold: float = 1.0,
    min_contrast: float = 3.0,
    min_nucleus_fraction: float = 0.15,
    nucleus_h: float = 0.3,
    nucleus_log: float = 0.02,
    seed_level: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei and cells of an (H, W, 4) RGBY image (see the module docstring).

    Options: `scale` / `min_work_side` as the classical backend's; `weights` a weights file
    (default: the package's `segnet.npz`); `fg_threshold` foreground probability a cell pixel
    needs; `distance_weight` how much the distance to the nearest nucleus (in nucleus radii) adds
    to the border landscape (breaks ties where the network sees no border); `min_cell_fraction`
    smallest cell as a fraction of the typical nucleus area; `threads` torch threads; the nucleus
    options are the classical backend's (same defaults).
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    h, w = image.shape[:2]
    if min(h, w) < 16:
        return np.zeros((h, w), np.int32), np.zeros((h, w), np.int32)
    planes, small = input_planes(image, scale, min_work_side)
    chans = np.stack([normalize_channel(small[..., c]) for c in range(4)], axis=-1)
    nuclei, ref_area = _find_nuclei(chans, nucleus_threshold=nucleus_threshold, min_contrast=min_contrast,
                                    min_nucleus_fraction=min_nucleus_fraction, nucleus_h=nucleus_h,
                                    nucleus_log=nucleus_log, seed_level=seed_level)
    if nuclei.max(initial=0) == 0:
        empty = np.zeros((h, w), np.int32)
        return empty, empty.copy()
    fg, border = _maps(planes, weights, threads)
    nuclei, cells = grow_cells(nuclei, ref_area, fg, border, fg_threshold=fg_threshold,
                               distance_weight=distance_weight, min_cell_fraction=min_cell_fraction)
    return _resize_labels(nuclei, (h, w)), _resize_labels(cells, (h, w))


def _maps(planes: np.ndarray, weights: str, threads: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from kit.segment.segnet import load_segnet, predict_maps

    model, _ = load_segnet(_weights_path(weights))
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        return predict_maps(model, planes.transpose(2, 0, 1))
    finally:
        torch.set_num_threads(prev)


def grow_cells(nuclei: np.ndarray, ref_area: float, fg: np.ndarray, border: np.ndarray, *,
               fg_threshold: float = 0.5, distance_weight: float = 0.05,
               min_cell_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Seeded watershed of `nuclei` over the `border` probability inside the `fg` probability mask."""
    n_nuc = int(nuclei.max(initial=0))
    ref_radius = max(1.0, float(np.sqrt(ref_area / np.pi)))
    mask = ndi.binary_fill_holes((fg > fg_threshold) | (nuclei > 0))
    elevation = border.astype(np.float32, copy=True)
    if distance_weight > 0:
        d_nuc = cv2.distanceTransform((nuclei == 0).astype(np.uint8), cv2.DIST_L2, 5)
        elevation += np.float32(distance_weight / ref_radius) * d_nuc
    cells = watershed(elevation, nuclei, mask=mask).astype(np.int32)
    cells = _remove_small(cells, min_cell_fraction * ref_area)
    cells, lut = _relabel(cells)
    if lut.size <= n_nuc:
        lut = np.concatenate([lut, np.zeros(n_nuc + 1 - lut.size, lut.dtype)])
    return lut[nuclei], cells


segment_learned.check = _check
segment_learned.cache_key = _cache_key
