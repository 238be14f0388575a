"""The built-in classical segmenter: thresholds and seeded watershed, at reduced scale.

Steps (all on a copy resized to the working scale, labels brought back with nearest-neighbour
upscaling):
1. Per-channel robust normalisation: (x - p_low) / (p_high - p_low) from percentiles, so 8- and
   16-bit, bright and faint images all look alike; a constant channel becomes 0.
2. Nuclei: lightly smoothed blue, thresholded at the lower of Otsu's threshold and Otsu's in log
   space (so nuclei 10x dimmer than the brightest are kept) but not below the noise floor, times
   `nucleus_threshold`; closed and hole-filled (dark nucleoli and textured chromatin stay inside).
   The typical nucleus radius is measured on the image itself. Seeds are the h-maxima of the
   smoothed distance transform: a maximum counts only if it rises `nucleus_h` nucleus radii above
   the saddle to a higher one, so a lobed, elongated or textured nucleus keeps one seed and only
   nuclei joined by a neck are split (a seeded watershed on the distance map cuts the neck).
3. Cells: a foreground mask from the smoothed mean of the normalised red and yellow channels and
   half the blue (above `cell_threshold` times Otsu's threshold and above the noise floor: background
   level + 4 noise sd, the sd from neighbouring-pixel differences), united with the nuclei; a
   seeded watershed from the nuclei over the inverted cytoplasm signal (cells meet where it is
   dimmest). That relief is taken from red and yellow grey-eroded at full resolution by
   `seam_erode` px before downscaling, so the 1-3 px dim seams between touching cells survive the
   reduction. Seams are also walled explicitly (`seam_line`, on by default): for red and for
   yellow, the darkest straight line of `seam_length` nucleus radii through each pixel (mean of
   log intensity along 8 orientations) is compared with the pixel's neighbourhood; the lower of the
   two channels' dips is added to the elevation. A seam thins the cell in both channels along a
   long line, a gap between filaments or in the ER network dips one channel over a short stretch,
   so the watershed follows seams instead of texture (measured on foreign confluent/crowded fields,
   whose cells are found with nearly perfect nuclei but lost at IoU 0.6 on their boundaries).
   On top, a learned boundary map (`boundary`, on by default at reduced working scale;
   kit.segment.boundary): a tiny MLP on 20 filter and geometry features per pixel, trained on
   synthetic cell truth only, gives P(boundary between two cells), added to the elevation with
   weight `boundary` (foreign held-out confluent/crowded/irregular fields 0.771 -> 0.827 F1, the
   real fields 0.907 -> 0.935).
   Optional terms (off by default; measured, they did not help on the real fields):
   `nucleus_pull` (relief rises with the distance to the nearest nucleus), `edge_weight`
   (walls where the signal steps), `flatten` (relief divided by its local brightness),
   `compactness`, `boundary_smooth`, and `orphan_distance` (cytoplasm at the field's edge far from
   every nucleus, i.e. a cell whose nucleus lies outside the field, is claimed by an "orphan"
   seed and dropped instead of being given to a neighbour).
4. Objects smaller than a fraction of the typical nucleus are dropped; every cell keeps its seed
   nucleus, so cell k contains nucleus k by construction.

Sizes follow the microscope, not the field: every length (smoothing, seed spacing, size limits,
the orphan distance) is a multiple of the typical nucleus radius measured on the image, so a 1728,
2048 or 3072 px field (the same cells at the same pixel size, cropped differently) is treated
alike, and so is a field drawn at a quarter of the size. The working scale is `scale` (1/4 by
default: a 2048 px field is segmented at 512 px) unless that would make the short side smaller
than `min_work_side` px; such small images are segmented at full size. An image whose blue
channel shows no contrast above its noise (blank, constant or pure noise) yields no cells.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from kit.errors import ConfigError
from kit.segment import register_backend

__all__ = ["segment_classical", "normalize_channel", "working_scale", "boundary_inputs"]

# Smallest nucleus component, in working px, counted when measuring the typical nucleus size
# (a nucleus of a 2048 px HPA field at 1/4 scale covers 1,000-6,000 px).
_SPECK_AREA = 40.0


def working_scale(shape: tuple[int, int], scale: float, min_work_side: int) -> float:
    """The scale actually used: `scale`, or 1.0 when `scale` would make the short side < `min_work_side`."""
    short = min(shape[:2])
    return float(scale) if short * scale >= min_work_side else 1.0


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


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_fill_holes` (background 4-connected to the border stays), by one cv2
    flood fill from a one-pixel frame: the same pixels, ~10x faster."""
    h, w = mask.shape
    frame = np.zeros((h + 2, w + 2), np.uint8)
    frame[1:-1, 1:-1] = mask
    cv2.floodFill(frame, None, (0, 0), 2, flags=4)
    return frame[1:-1, 1:-1] != 2


def _disk(radius: float) -> np.ndarray:
    r = max(1, int(round(radius)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


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


def _h_maxima(dist: np.ndarray, h: float, mask: np.ndarray) -> np.ndarray:
    """Regional maxima of `dist` whose dynamic is at least `h` (morphological reconstruction).

    Reconstruction by geodesic dilation of ``dist - h`` under `dist` (8-connected), iterated with
    cv2 until stable: the same result as `skimage.morphology.reconstruction`, ~10x faster here.
    """
    dist = dist.astype(np.float32, copy=False)
    marker = np.maximum(dist - np.float32(h), 0)
    k = np.ones((3, 3), np.uint8)
    for _ in range(4 * sum(dist.shape)):
        grown = np.minimum(cv2.dilate(marker, k), dist)
        if np.array_equal(grown, marker):
            break
        marker = grown
    # The plateau tops of the reconstruction are the h-domes' peaks.
    return ((dist - marker) >= h - 1e-3 * max(h, 1e-6)) & mask


def _line_valleys(x: np.ndarray, length: int, n_angles: int = 8, offset: float = 0.05) -> np.ndarray:
    """How far each pixel's darkest straight line of `length` px lies below its neighbourhood (log units).

    log(x + offset) is averaged along `n_angles` line segments through each pixel; the minimum over
    orientations is subtracted from the isotropic mean over the same span. A seam between two
    touching cells is a long, straight-ish dim line and stands out; the gaps of filament and ER
    texture are short and average away along a line. Log units make a seam in a dim cell count as
    much as one in a bright cell. A line mean is a sum of `length` shifted views of the padded image
    (a line has `length` taps; a dense length x length kernel would cost `length` times more).
    """
    x = np.log(np.maximum(_blur(x, 1.0), 0.0) + np.float32(offset))
    h, w = x.shape
    c = length // 2
    pad = cv2.copyMakeBorder(x, c, c, c, c, cv2.BORDER_REFLECT)
    steps = np.arange(-c, c + 1)
    lows = None
    acc = np.empty_like(x)
    for th in np.linspace(0.0, np.pi, n_angles, endpoint=False):
        dy = np.rint(steps * np.sin(th)).astype(int)
        dx = np.rint(steps * np.cos(th)).astype(int)
        acc.fill(0.0)
        for oy, ox in zip(dy, dx):
            acc += pad[c + oy:c + oy + h, c + ox:c + ox + w]
        if lows is None:
            lows = acc.copy()
        else:
            np.minimum(lows, acc, out=lows)
    lows *= np.float32(1.0 / steps.size)
    return np.clip(_blur(x, length / 4.0) - lows, 0.0, None)


def _nucleus_mask(blue_n: np.ndarray, *, nucleus_threshold: float, min_contrast: float,
                  nucleus_log: float) -> tuple[np.ndarray | None, float]:
    """Binary nucleus mask from normalised blue, or None when the image has no nuclei."""
    blue = _blur(blue_n, 1.0)
    t_nuc = _otsu(blue)
    if t_nuc <= 0 or _contrast(blue, t_nuc) < min_contrast:
        return None, 0.0
    if nucleus_log > 0:
        # Otsu in log space: nuclei 5-10x dimmer than the brightest still clear the threshold.
        c = np.log1p(1.0 / nucleus_log)
        t_log = _otsu(np.log1p(blue / nucleus_log) / c)
        t_nuc = min(t_nuc, max(nucleus_log * np.expm1(t_log * c), _noise_floor(blue_n, blue, 1.0)))
    return blue > t_nuc * nucleus_threshold, t_nuc


def _typical_area(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Connected components of `mask` and the area of a typical single nucleus among them."""
    n_comp, comp, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    big = areas[areas >= _SPECK_AREA]
    if big.size == 0:
        big = areas
    ref = float(np.median(big)) if big.size else 0.0
    # Merged nuclei inflate the median; the lower-middle components are single nuclei.
    if big.size >= 5:
        ref = min(ref, float(np.percentile(big, 40)))
    return comp, areas, ref


def _segment_small(
    chans: np.ndarray,
    *,
    nucleus_threshold: float,
    cell_threshold: float,
    min_contrast: float,
    min_nucleus_fraction: float,
    min_cell_fraction: float,
    nucleus_h: float,
    compactness: float,
    nucleus_log: float,
    boundary_smooth: float,
    orphan_distance: float,
    seed_level: float,
    nucleus_pull: float,
    edge_weight: float,
    flatten: float,
    seam_line: float = 0.0,
    seam_length: float = 1.2,
    seams: np.ndarray | None = None,
    seam_channels: tuple[np.ndarray, np.ndarray] | None = None,
    boundary: float = 0.0,
    collect: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment normalised float32 channels (h, w, 4 RGBY) at working scale -> (nuclei, cells) int32.

    `collect`, when a dict, receives the boundary model's inputs (``features``, ``fg``): the
    training script of that model (benchmarks/train_boundary.py) reads them."""
    h, w = chans.shape[:2]
    empty = (np.zeros((h, w), np.int32), np.zeros((h, w), np.int32))

    # --- nuclei ---
    nuc_mask, _ = _nucleus_mask(chans[..., 2], nucleus_threshold=nucleus_threshold,
                                min_contrast=min_contrast, nucleus_log=nucleus_log)
    if nuc_mask is None or not nuc_mask.any():
        return empty
    _, _, ref_area = _typical_area(nuc_mask)
    ref_radius = max(1.0, np.sqrt(ref_area / np.pi))
    # Close small gaps of textured chromatin, then fill (nucleoli are dark holes).
    nuc_mask = cv2.morphologyEx(nuc_mask.view(np.uint8), cv2.MORPH_CLOSE, _disk(0.08 * ref_radius)) > 0
    nuc_mask = _fill_holes(nuc_mask)
    comp, areas, ref_area = _typical_area(nuc_mask)
    ref_radius = max(1.0, np.sqrt(ref_area / np.pi))
    min_nuc_area = min_nucleus_fraction * ref_area
    keep_comp = np.concatenate([[False], areas >= min_nuc_area])
    nuc_mask = keep_comp[comp]
    if not nuc_mask.any():
        return empty

    seed_mask = nuc_mask
    if seed_level > 0:
        # Touching nuclei meet in a dim line that smoothing hides: for the seeds, only pixels at
        # least `seed_level` of their neighbourhood's mean nucleus brightness count as nucleus.
        blue = chans[..., 2]
        m = nuc_mask.astype(np.float32)
        k = max(1.0, 0.5 * ref_radius)
        local = _blur(blue * m, k) / np.maximum(_blur(m, k), 1e-3)
        seed_mask = nuc_mask & (_blur(blue, 0.7) > seed_level * local)
        seed_mask = _fill_holes(seed_mask)
    dist = cv2.distanceTransform(seed_mask.view(np.uint8), cv2.DIST_L2, 5)
    dist = _blur(dist, max(1.0, 0.1 * ref_radius))
    peaks = _h_maxima(dist, nucleus_h * ref_radius, seed_mask & (dist > 0.2 * ref_radius))
    _, markers = cv2.connectedComponents(peaks.view(np.uint8), connectivity=8)
    nuclei = watershed(-dist, markers, mask=nuc_mask).astype(np.int32)
    # Components that got no seed (too thin for one) become nuclei of their own.
    lost = nuc_mask & (nuclei == 0)
    if lost.any():
        _, lost_lab = cv2.connectedComponents(lost.view(np.uint8), connectivity=8)
        nuclei = np.where(lost, lost_lab + nuclei.max(), nuclei).astype(np.int32)
    nuclei = _remove_small(nuclei, min_nuc_area)
    nuclei, _ = _relabel(nuclei)
    n_nuc = int(nuclei.max())
    if n_nuc == 0:
        return empty

    # --- cells ---
    sigma = max(1.0, 0.05 * ref_radius)
    raw = (chans[..., 0] + chans[..., 3]) * 0.5
    raw = np.maximum(raw, chans[..., 2] * 0.5)
    cyto = _blur(raw, sigma)
    t_cell = max(_otsu(cyto) * cell_threshold, _noise_floor(raw, cyto, sigma))
    fg = (cyto > t_cell) | (nuclei > 0)
    holes = fg
    fg = _fill_holes(fg)
    holes = fg & ~holes
    relief = cyto if seams is None else _blur(np.maximum(seams, chans[..., 2] * 0.5), sigma)
    relief = _blur(relief, sigma * boundary_smooth) if boundary_smooth > 1 else relief
    if flatten > 0:
        # Divide by the local brightness (over `flatten` nucleus radii): a dim cell beside a bright
        # one then meets it at the step between them, not deep inside the dim cell.
        m = fg.astype(np.float32)
        k = flatten * ref_radius
        local = _blur(relief * m, k) / np.maximum(_blur(m, k), 1e-3)
        relief = relief / (local + 0.05 * float(local.max()) + 1e-6)
    relief = relief / max(float(np.percentile(relief[fg], 99)) if fg.any() else 1.0, 1e-6)
    # Basins are the bright cytoplasm (cells meet where it is dimmest) ...
    elevation = -relief
    if nucleus_pull > 0:
        # ... deepened near each nucleus, so a flat stretch is shared by distance, not by noise.
        d_nuc = cv2.distanceTransform((nuclei == 0).astype(np.uint8), cv2.DIST_L2, 5)
        elevation = elevation + nucleus_pull * (d_nuc / ref_radius)
    if edge_weight > 0:
        # ... and walled where the signal steps (a bright cell against a dim neighbour).
        gy = cv2.Sobel(relief, cv2.CV_32F, 0, 1, ksize=3)
        gx = cv2.Sobel(relief, cv2.CV_32F, 1, 0, ksize=3)
        elevation = elevation + edge_weight * ref_radius * 0.125 * np.sqrt(gx * gx + gy * gy)
    red, yellow = seam_channels if seam_channels is not None else (chans[..., 0], chans[..., 3])
    lines = None
    if seam_line > 0 or boundary > 0 or collect is not None:
        length = max(5, int(round(seam_length * ref_radius)) | 1)
        lines = (_line_valleys(red, length), _line_valleys(yellow, length))
    if seam_line > 0:
        # ... and walled along long dim lines that dip in red AND yellow (a seam thins both;
        # a gap in the filaments or the ER network dips one channel only).
        elevation = elevation + seam_line * np.minimum(*lines)
    if boundary > 0 or collect is not None:
        # ... and raised where the learned boundary map (kit.segment.boundary) sees a seam.
        from kit.segment.boundary import boundary_features, boundary_probability, load_model

        feats = boundary_features(red, yellow, chans[..., 2], relief, nuclei, fg, ref_radius, lines)
        if collect is not None:
            collect.update(features=feats, fg=fg)
        if boundary > 0:
            elevation = elevation + boundary * boundary_probability(feats, fg, load_model())
    markers = nuclei.copy()
    orphan = None
    if orphan_distance > 0:
        # Cytoplasm at the field's edge far from every nucleus belongs to a cell whose nucleus is
        # outside the field: seed it, so it is not grown into a neighbour.
        far = cv2.distanceTransform((nuclei == 0).view(np.uint8) if nuclei.dtype == np.bool_ else
                                    (nuclei == 0).astype(np.uint8), cv2.DIST_L2, 5)
        inner = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
        border = np.zeros((h, w), bool)
        border[:2, :] = border[-2:, :] = True
        border[:, :2] = border[:, -2:] = True
        orphan = fg & border & (far > orphan_distance * ref_radius) & (inner >= 1)
        if orphan.any():
            markers[orphan] = n_nuc + 1
    cells = watershed(elevation, markers, mask=fg, compactness=compactness).astype(np.int32)
    if seam_line > 0 and holes.any():
        # A dim gap enclosed by touching cells is ringed by seam walls, so the first cell over the
        # wall would claim all of it: share such a filled hole by distance among the cells around
        # it. A hole that touches a nucleus is a dim cell's own cytoplasm and stays with the flood.
        n_h, hole_lab = cv2.connectedComponents(holes.view(np.uint8), connectivity=8)
        near_nuc = cv2.dilate((nuclei > 0).view(np.uint8), np.ones((3, 3), np.uint8)) > 0
        touching = np.zeros(n_h, bool)
        touching[hole_lab[near_nuc & holes]] = True
        gaps = holes & ~touching[hole_lab]
        if gaps.any():
            # The nearest non-gap pixel of a gap pixel borders the gap: a crop around the gaps
            # (+2 px) gives the same answer as the whole field at a fraction of the cost.
            ys, xs = np.nonzero(gaps)
            y0, y1 = max(0, ys.min() - 2), min(h, ys.max() + 3)
            x0, x1 = max(0, xs.min() - 2), min(w, xs.max() + 3)
            sub = gaps[y0:y1, x0:x1]
            _, (iy, ix) = ndi.distance_transform_edt(sub, return_indices=True)
            crop = cells[y0:y1, x0:x1]
            cells[y0:y1, x0:x1] = np.where(sub, crop[iy, ix], crop)
    cells[cells > n_nuc] = 0
    min_cell_area = min_cell_fraction * ref_area
    cells = _remove_small(cells, min_cell_area)
    cells, lut = _relabel(cells)
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
    min_work_side: int = 400,
    nucleus_threshold: float = 1.0,
    cell_threshold: float = 0.15,
    min_contrast: float = 3.0,
    min_nucleus_fraction: float = 0.15,
    min_cell_fraction: float = 0.5,
    nucleus_h: float = 0.3,
    compactness: float = 0.0,
    nucleus_log: float = 0.02,
    boundary_smooth: float = 1.0,
    orphan_distance: float = 0.0,
    seed_level: float = 0.5,
    nucleus_pull: float = 0.0,
    edge_weight: float = 0.0,
    seam_erode: float = 1.0,
    flatten: float = 0.0,
    seam_line: float = 2.0,
    seam_length: float = 1.2,
    boundary: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Classical nuclei and cell segmentation of an (H, W, 4) RGBY image (see the module docstring).

    Options: `scale` working scale (default 1/4; 1.0 = full resolution), `min_work_side` smallest
    working short side in px (smaller images are segmented at full size), `nucleus_threshold` /
    `cell_threshold` factors on the Otsu thresholds of blue / cytoplasm, `min_contrast`
    foreground-vs-noise contrast below which the image has no nuclei, `min_nucleus_fraction` /
    `min_cell_fraction` smallest nucleus / cell as a fraction of the typical nucleus area,
    `nucleus_h` how far (in nucleus radii) a distance maximum must rise above its saddle to seed a
    nucleus of its own, `compactness` of the cell watershed (0 = follow the signal only),
    `nucleus_log` offset of the log transform for the nucleus threshold (0 = linear Otsu only),
    `boundary_smooth` extra smoothing of the cell watershed's relief, `orphan_distance` (nucleus
    radii; 0 = off) beyond which cytoplasm at the field edge is a nucleus-free cell and dropped,
    `seed_level` share of the local nucleus brightness a pixel needs to count for the seeds (0 =
    off), `nucleus_pull` / `edge_weight` / `flatten` extra relief terms (see the module docstring),
    `seam_erode` full-resolution grey-erosion radius (px) that keeps thin seams (0 = off),
    `seam_line` weight of the long-dim-line seam term in the cell watershed (0 = off),
    `seam_length` the length of its lines in nucleus radii, and `boundary` the weight of the
    learned boundary map (kit.segment.boundary; 0 = off).
    """
    options = dict(locals())  # every option by name, as _run and boundary_inputs take them
    del options["image"]
    return _run(image, options)


def boundary_inputs(image: np.ndarray, **options) -> dict:
    """The learned boundary map's inputs for `image` at working scale (``features``, ``fg``, and
    ``shape``, the working shape), with the segmenter's options (for benchmarks/train_boundary.py)."""
    from kit.segment import backend_options

    opts = backend_options("classical", options)  # the defaults, updated and type-checked
    got: dict = {}
    _run(image, opts, collect=got)
    return got


def _run(image: np.ndarray, o: dict, collect: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    scale, min_work_side, seam_erode = o["scale"], o["min_work_side"], o["seam_erode"]
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
    seams = seam_channels = None
    if seam_erode > 0 and s < 1:
        # Seams between touching cells are 1-3 px dim lines at full resolution that averaging
        # down to the working scale washes out; a grey erosion before downscaling keeps them.
        k = _disk(seam_erode)
        ry = [cv2.resize(cv2.erode(image[..., c], k), (small.shape[1], small.shape[0]), interpolation=cv2.INTER_AREA)
              for c in (0, 3)]
        seam_channels = (normalize_channel(ry[0]), normalize_channel(ry[1]))
        seams = (seam_channels[0] + seam_channels[1]) * 0.5
    small_opts = {k: v for k, v in o.items() if k not in ("scale", "min_work_side", "seam_erode")}
    if s >= 1:
        # The boundary map was trained on reduced-scale inputs (fields of 1,600 px and more); at
        # full size the texture is finer and it misfires (kit synth 512 px: F1 0.996 -> 0.942).
        small_opts["boundary"] = 0.0
    nuclei, cells = _segment_small(chans, **small_opts, seams=seams, seam_channels=seam_channels, collect=collect)
    if collect is not None:
        collect["shape"] = chans.shape[:2]
    return _resize_labels(nuclei, (h, w)), _resize_labels(cells, (h, w))


# option -> (low, high, low included): the ranges the algorithm is defined on. Types are checked by
# `kit.segment.backend_options`; this runs before the first image (`MaskCache.setup`, `kit run`).
_OPTION_RANGES = {
    "scale": (0.0, 1.0, False),
    "min_work_side": (16, None, True),
    "nucleus_threshold": (0.0, None, False),
    "cell_threshold": (0.0, None, False),
    "min_contrast": (0.0, None, True),
    "min_nucleus_fraction": (0.0, None, True),
    "min_cell_fraction": (0.0, None, True),
    "nucleus_h": (0.0, None, True),
    "compactness": (0.0, None, True),
    "boundary_smooth": (0.0, None, True),
    "orphan_distance": (0.0, None, True),
    "seed_level": (0.0, 1.0, True),
    "seam_erode": (0.0, None, True),
    "seam_line": (0.0, None, True),
    "seam_length": (0.0, None, False),
    "boundary": (0.0, None, True),
}


def _check(options: dict) -> None:
    """ConfigError for an option outside its range (e.g. ``scale=5``: the working scale is at most 1)."""
    for key, (low, high, closed) in _OPTION_RANGES.items():
        value = options.get(key)
        if value is None:
            continue
        if (value < low if closed else value <= low) or (high is not None and value > high):
            span = f"{'[' if closed else '('}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            raise ConfigError(f"option {key} of segmentation backend 'classical': must be in {span}, got {value:g}")


segment_classical.check = _check
