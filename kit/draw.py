"""Pictures of fields and cells for people: HPA composites, cell outlines, cell tiles, PNG files.

Conventions (what `kit.report` draws and its tests check):

- A field is shown as HPA shows it: red = microtubules, green = the protein of interest, blue =
  nuclei, yellow = ER (added to red and green at half weight, `kit.analyze.composite_rgb`). Each
  channel is scaled to its own 99.5th percentile first (`kit.analyze.display_channel`): HPA
  fields are dim and a few bright spots would otherwise set the maximum.
- Large fields are drawn from a downscaled copy: `display_field` shrinks the image (area
  interpolation) so its longer side is at most ``max_side`` pixels, and `scale_labels` shrinks
  the label image to exactly that shape by nearest-neighbour sampling (pixel centres), so masks
  and image stay aligned. Small fields keep their size (the page scales them up).
- An outline is the inner boundary of a cell in the displayed label image: the pixels of cell k
  with a 4-neighbour inside the image that is not k (`outline_mask`). It is drawn 1 display pixel
  wide, in the colour of the cell; a composite pixel that happens to have an outline colour is
  moved by one blue level, so the pixels of an outline colour are exactly the outline pixels.

Arrays: images H x W x 4 (RGBY, uint8 or uint16, `kit.images.read_sample`); label images H x W
int (0 background, k > 0 cell k); RGB pictures H x W x 3 uint8.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from kit.atomic import atomic_path

RGB = tuple[int, int, int]


def display_field(image: np.ndarray, max_side: int = 768) -> np.ndarray:
    """An RGBY image -> the HPA composite as H' x W' x 3 uint8, longer side at most `max_side`."""
    import cv2

    from kit.analyze import composite_rgb, display_channel
    from kit.images import to_float

    raw = to_float(image)
    h, w = raw.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        raw = cv2.resize(raw, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    shown = np.stack([display_channel(raw[..., k])[0] for k in range(4)], axis=-1)
    return np.round(composite_rgb(shown) * 255.0).astype(np.uint8)


def scale_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label image to `shape` (rows, cols) at pixel centres."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def outline_mask(labels: np.ndarray) -> np.ndarray:
    """Boolean H x W: pixels of a cell with a 4-neighbour (inside the image) of another label."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    dv = lab[1:, :] != lab[:-1, :]
    dh = lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    return edge & (lab > 0)


def draw_outlines(rgb: np.ndarray, labels: np.ndarray, colours: Mapping[int, RGB],
                  default: RGB | None = (255, 255, 255)) -> np.ndarray:
    """A copy of `rgb` with each cell's outline in ``colours[cell id]`` (`default` for the rest;
    None leaves cells without a colour undrawn)."""
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"picture {rgb.shape[:2]} and labels {labels.shape} differ in size")
    out = rgb.copy()
    edge = outline_mask(labels)
    ids = labels[edge]
    n = int(labels.max()) + 1 if labels.size else 1
    table = np.zeros((n, 3), np.uint8)
    drawn = np.zeros(n, bool)
    if default is not None:
        table[:] = default
        drawn[1:] = True
    for k, colour in colours.items():
        if 0 < int(k) < n:
            table[int(k)] = colour
            drawn[int(k)] = True
    keep = drawn[ids]
    ys, xs = np.nonzero(edge)
    for colour in np.unique(table[drawn], axis=0) if drawn.any() else []:
        # a picture pixel that happens to have an outline colour moves by one blue level, so
        # that pixels of an outline colour are exactly the outline pixels
        same = (out == colour).all(axis=-1)
        out[same, 2] = np.where(out[same, 2] > 0, out[same, 2] - 1, 1)
    out[ys[keep], xs[keep]] = table[ids[keep]]
    return out


def cell_boxes(labels: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """{cell id: (x0, y0, x1, y1)} (ends exclusive) of every cell of a label image."""
    from scipy import ndimage

    boxes = {}
    for k, sl in enumerate(ndimage.find_objects(np.asarray(labels, np.int64)), start=1):
        if sl is not None:
            boxes[k] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return boxes


def cell_tile(rgb: np.ndarray, labels: np.ndarray, cell_id: int, colour: RGB, size: int = 96,
              pad: float = 0.25) -> np.ndarray:
    """A `size` x `size` picture of one cell: its box grown by `pad` on each side, made square,
    with the cell's outline drawn; the field outside the image is black."""
    import cv2

    mask = labels == cell_id
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return np.zeros((size, size, 3), np.uint8)
    cy, cx = (ys.min() + ys.max() + 1) / 2.0, (xs.min() + xs.max() + 1) / 2.0
    half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * (0.5 + pad)
    half = max(half, 4.0)
    y0, x0 = int(np.floor(cy - half)), int(np.floor(cx - half))
    side = int(np.ceil(2 * half))
    crop = np.zeros((side, side, 3), np.uint8)
    crop_lab = np.zeros((side, side), np.int32)
    h, w = labels.shape
    sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(h, y0 + side), min(w, x0 + side)
    crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    crop_lab[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = mask[sy0:sy1, sx0:sx1]
    # outline at the tile's resolution, so it stays 1 px wide whatever the zoom
    crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR if side < size else cv2.INTER_AREA)
    crop_lab = scale_labels(crop_lab, (size, size))
    return draw_outlines(crop, crop_lab, {1: colour}, default=None)


def tile_strip(tiles: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Tiles of one size side by side, `gap` px of white between them."""
    if not tiles:
        raise ValueError("no tiles")
    h, w = tiles[0].shape[:2]
    strip = np.full((h, len(tiles) * (w + gap) - gap, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        strip[:, i * (w + gap):i * (w + gap) + w] = t
    return strip


def write_png(path: str | Path, rgb: np.ndarray, keep: Sequence[RGB] = (), colours: int | None = 256) -> Path:
    """Write an RGB uint8 picture as PNG, atomically.

    With `colours` (default 256) it is stored as a palette image of that many colours (median
    cut; fluorescence composites look the same and take about half the bytes), except that the
    colours in `keep` (the outline colours) get palette entries of their own, so every pixel of
    those colours keeps its exact value. `colours=None` writes full RGB.
    """
    import cv2

    path = Path(path)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    with atomic_path(path) as tmp:
        if colours is None:
            if not cv2.imwrite(str(tmp), rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 6]):
                raise OSError(f"could not write {path}")
            return path
        from PIL import Image

        keep = list(dict.fromkeys(tuple(int(v) for v in c) for c in keep))
        n = colours - len(keep)
        if n < 2:
            raise ValueError(f"{colours} colours cannot keep {len(keep)} exact ones")
        exact = [(rgb == np.array(colour, np.uint8)).all(axis=-1) for colour in keep]
        base = rgb.copy()
        for mask in exact:
            base[mask] = 0  # the kept pixels do not shape the palette of the rest
        quantized = Image.fromarray(base).quantize(n, method=Image.Quantize.MEDIANCUT)
        index = np.array(quantized, dtype=np.uint8)
        palette = list(quantized.getpalette()[:3 * n])
        palette += [0] * (3 * n - len(palette))
        for j in range(n):  # an averaged colour equal to a kept one moves by one blue level
            if tuple(palette[3 * j:3 * j + 3]) in keep:
                palette[3 * j + 2] += -1 if palette[3 * j + 2] > 0 else 1
        for i, (colour, mask) in enumerate(zip(keep, exact)):
            index[mask] = n + i
            palette += list(colour)
        h, w = index.shape
        out = Image.frombuffer("P", (w, h), index.tobytes(), "raw", "P", 0, 1)
        out.putpalette(palette)
        out.save(tmp, format="PNG", optimize=True)
    return path
