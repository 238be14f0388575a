"""The built-in classical segmenter: thresholds and seeded watershed, at reduced scale.

Steps (all on a copy resized by `scale`, labels brought back with nearest-neighbour upscaling):
1. Per-channel robust normalisation: (x - p_low) / (p_high - p_low) from percentiles, so 8- and
   16-bit, bright and faint images all look alike; a constant channel becomes 0.
2. Nuclei: Gaussian-smoothed blue, thresholded at the lower of Otsu's threshold and Otsu's in log
   space (so nuclei 10x dimmer than the brightest are kept) but not below the noise floor, times
   `nucleus_threshold`; holes filled; seeds are the maxima of the distance transform (cv2's, 10x
   faster than scipy's) at least `seed_fraction` nucleus radii apart; a seeded watershed on the
   distance map splits touching nuclei.
3. Cells: a foreground mask from the smoothed maximum of the normalised red, yellow and blue
   channels (above `cell_threshold` times Otsu's threshold and above the noise floor: background
   level + 4 noise sd, the sd from neighbouring-pixel differences), united with the nuclei; a
   seeded watershed from the nuclei over the inverted cytoplasm signal (cells meet where the
   signal is dimmest).
4. Objects smaller than a fraction of the typical nucleus are dropped; every cell keeps its seed
   nucleus, so cell k contains nucleus k by construction.

Sizes are relative: the working scale is `scale` but never makes the short side smaller than
`min_work_side` pixels (so 256-512 px images are segmented at full size), smoothing scales with
the working size, and size thresholds follow the median nucleus area measured on the image itself.
An image whose blue channel shows no contrast above its noise (blank, constant or pure noise)
yields no cells.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from kit.segment import register_backend

__all__ = ["segment_classical", "normalize_channel", "working_scale"]


def working_scale(shape: tuple[int, int], scale: float, min_work_side: int) -> float:
    """The scale actually used: `scale`, raised so the short side keeps `min_work_side` px (<= 1)."""
    short = min(shape[:2])
    return float(min(1.0, max(scale, min_work_side / max(short, 1))))


def normalize_channel(ch: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """float32 copy scaled so the `low` percentile maps to 0 and the `high` one to 1 (clipped).

    Percentiles come from a strided subsample (exact enough, 10x cheaper). A channel without
    spread (blank) maps to all zeros.
    """
    ch = ch.astype(np.float32, copy=False)
    step = max(1, int(np.sqrt(ch.size / 65536)))
    sample = ch[::step, ::step]
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:
        hi = float(sample.max())
    if hi <= lo:
        return np.zeros_like(ch, dtype=np.float32)
    out = (ch - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of float values in [0, 1] (via cv2 on a 256-bin uint8 copy)."""
    u8 = np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


def _contrast(values: np.ndarray, t: float) -> float:
    """(mean above t - mean below t) / std below t: how far the foreground stands out of the noise."""
    fg = values > t
    n_fg = int(fg.sum())
    if n_fg == 0 or n_fg == values.size:
        return 0.0
    bg_vals = values[~fg]
    return float((values[fg].mean() - bg_vals.mean()) / (bg_vals.std() + 1e-6))


def _noise_floor(raw: np.ndarray, smoothed: np.ndarray, sigma: float, k: float = 4.0) -> float:
    """Background level plus `k` noise sd of `smoothed` (a threshold below this would follow noise).

    Noise sd from neighbouring-pixel differences of `raw` (robust to edges: MAD), reduced by the
    Gaussian's averaging; background level from the 2nd percentile of `smoothed`.
    """
    sub = raw[::2, ::2]
    d = np.diff(sub, axis=1).ravel()
    sd_raw = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / np.sqrt(2.0)
    sd_s = sd_raw / max(1.0, 2.0 * np.sqrt(np.pi) * sigma) if sigma > 0 else sd_raw
    return float(np.percentile(smoothed[::2, ::2], 2)) + k * sd_s


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma) if sigma > 0 else x


def _remove_small(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Zero the labels with fewer than `min_area` pixels (in place) and return `labels`."""
    if labels.max(initial=0) == 0:
        return labels
    areas = np.bincount(labels.ravel())
    small = areas < min_area
    small[0] = False
    if small.any():
        labels[small[labels]] = 0
    return labels


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber present ids 1..N; returns (new labels, lut old->new)."""
    n = int(labels.max(initial=0))
    present = np.bincount(labels.ravel(), minlength=n + 1) > 0
    present[0] = False
    lut = np.zeros(n + 1, np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    return lut[labels], lut


def _segment_small(
    chans: np.ndarray,
    *,
    smooth: float,
    nucleus_threshold: float,
    cell_threshold: float,
    min_contrast: float,
    min_nucleus_fraction: float,
    min_cell_fraction: float,
    seed_fraction: float,
    compactness: float,
    nucleus_log: float,
    boundary_smooth: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment normalised float32 channels (h, w, 4 RGBY) at working scale -> (nuclei, cells) int32."""
    h, w = chans.shape[:2]
    short = min(h, w)
    sigma = smooth * short
    empty = (np.zeros((h, w), np.int32), np.zeros((h, w), np.int32))

    # --- nuclei ---
    blue = _blur(chans[..., 2], sigma)
    t_nuc = _otsu(blue)
    if t_nuc <= 0 or _contrast(blue, t_nuc) < min_contrast:
        return empty
    if nucleus_log > 0:
        # Otsu in log space: nuclei 5-10x dimmer than the brightest still clear the threshold.
        c = np.log1p(1.0 / nucleus_log)
        t_log = _otsu(np.log1p(blue / nucleus_log) / c)
        t_nuc = min(t_nuc, max(nucleus_log * np.expm1(t_log * c), _noise_floor(chans[..., 2], blue, sigma)))
    nuc_mask = blue > t_nuc * nucleus_threshold
    nuc_mask = ndi.binary_fill_holes(nuc_mask)
    n_comp, comp, stats, _ = cv2.connectedComponentsWithStats(nuc_mask.view(np.uint8), connectivity=8)
    if n_comp <= 1:
        return empty
    comp_areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    # Typical nucleus area: the median of the components that are not specks.
    big = comp_areas[comp_areas >= 0.001 * short * short]
    ref_area = float(np.median(big)) if big.size else float(comp_areas.max())
    # Components of merged nuclei inflate the median; the lower-middle ones are single nuclei.
    ref_area = min(ref_area, float(np.percentile(big, 40))) if big.size >= 5 else ref_area
    ref_radius = max(1.0, np.sqrt(ref_area / np.pi))
    min_nuc_area = min_nucleus_fraction * ref_area
    keep_comp = np.concatenate([[False], comp_areas >= min_nuc_area])
    nuc_mask = keep_comp[comp]
    if not nuc_mask.any():
        return empty

    dist = cv2.distanceTransform(nuc_mask.view(np.uint8), cv2.DIST_L2, 5)
    dist = _blur(dist, max(1.0, 0.15 * ref_radius))
    r_peak = max(1, int(round(seed_fraction * ref_radius)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_peak + 1, 2 * r_peak + 1))
    peaks = (dist >= cv2.dilate(dist, kernel)) & (dist > 0.25 * ref_radius) & nuc_mask
    n_markers, markers = cv2.connectedComponents(peaks.view(np.uint8), connectivity=8)
    nuclei = watershed(-dist, markers, mask=nuc_mask).astype(np.int32)
    # Components that got no seed (a small nucleus beside a big one) become nuclei of their own.
    lost = nuc_mask & (nuclei == 0)
    if lost.any():
        n_lost, lost_lab = cv2.connectedComponents(lost.view(np.uint8), connectivity=8)
        nuclei = np.where(lost, lost_lab + nuclei.max(), nuclei).astype(np.int32)
    nuclei = _remove_small(nuclei, min_nuc_area)
    nuclei, _ = _relabel(nuclei)
    if nuclei.max() == 0:
        return empty

    # --- cells ---
    raw = np.maximum(np.maximum(chans[..., 0], chans[..., 3]), chans[..., 2])
    cyto = _blur(raw, sigma)
    t_cell = max(_otsu(cyto) * cell_threshold, _noise_floor(raw, cyto, sigma))
    fg = (cyto > t_cell) | (nuclei > 0)
    fg = ndi.binary_fill_holes(fg)
    elevation = _blur(cyto, sigma * boundary_smooth) if boundary_smooth > 1 else cyto
    cells = watershed(-elevation, nuclei, mask=fg, compactness=compactness).astype(np.int32)
    min_cell_area = min_cell_fraction * ref_area
    cells = _remove_small(cells, min_cell_area)
    cells, lut = _relabel(cells)
    n_nuc = int(nuclei.max())
    if lut.size <= n_nuc:
        lut = np.concatenate([lut, np.zeros(n_nuc + 1 - lut.size, lut.dtype)])
    nuclei = lut[nuclei]  # cells removed above take their nuclei with them
    return nuclei, cells


def _resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if labels.shape == tuple(shape):
        return labels
    src = labels.astype(np.uint16) if labels.max(initial=0) < 65536 else labels
    out = cv2.resize(src, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)
    return out.astype(np.int32, copy=False)


@register_backend("classical")
def segment_classical(
    image: np.ndarray,
    *,
    scale: float = 0.25,
    min_work_side: int = 512,
    smooth: float = 0.004,
    nucleus_threshold: float = 1.0,
    cell_threshold: float = 0.15,
    min_contrast: float = 3.0,
    min_nucleus_fraction: float = 0.15,
    min_cell_fraction: float = 0.5,
    seed_fraction: float = 0.6,
    compactness: float = 0.0,
    nucleus_log: float = 0.02,
    boundary_smooth: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Classical nuclei and cell segmentation of an (H, W, 4) RGBY image (see the module docstring).

    Options: `scale` working scale (default 1/4; 1.0 = full resolution), `min_work_side` smallest
    working short side in px, `smooth` Gaussian sigma as a fraction of the working short side,
    `nucleus_threshold` / `cell_threshold` factors on the Otsu thresholds of blue / cytoplasm,
    `min_contrast` foreground-vs-noise contrast below which the image has no nuclei,
    `min_nucleus_fraction` / `min_cell_fraction` smallest nucleus / cell as a fraction of the
    median nucleus area, `seed_fraction` seed spacing as a fraction of the nucleus radius,
    `compactness` of the cell watershed (0 = follow the signal only), `nucleus_log` offset of the
    log transform for the nucleus threshold (0 = linear Otsu only).
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    h, w = image.shape[:2]
    if min(h, w) < 16:  # too small to hold a cell
        return np.zeros((h, w), np.int32), np.zeros((h, w), np.int32)
    s = working_scale((h, w), scale, min_work_side)
    if s < 1:
        small = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    else:
        small = image
    chans = np.stack([normalize_channel(small[..., c]) for c in range(4)], axis=-1)
    nuclei, cells = _segment_small(
        chans,
        smooth=smooth,
        nucleus_threshold=nucleus_threshold,
        cell_threshold=cell_threshold,
        min_contrast=min_contrast,
        min_nucleus_fraction=min_nucleus_fraction,
        min_cell_fraction=min_cell_fraction,
        seed_fraction=seed_fraction,
        compactness=compactness,
        nucleus_log=nucleus_log,
        boundary_smooth=boundary_smooth,
    )
    return _resize_labels(nuclei, (h, w)), _resize_labels(cells, (h, w))
