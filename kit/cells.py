"""Per-cell tables, the cell policy, cell tiles and the tile cache.

Cell table (`cell_table`, one row per cell, ordered by cell_id; a pandas DataFrame):
  cell_id                   id in the label images (cell k contains nucleus k)
  x0, y0, x1, y1            bounding box in pixels, end exclusive (cells[y0:y1, x0:x1])
  area, nucleus_area        pixel counts
  touches_border            the cell has a pixel on the image's outer row or column
  nucleus_visible_fraction  estimated fraction of the nucleus inside the image: 1.0 for a nucleus
                            off the border, else its area over that of the ellipse (or circle)
                            fitted to its chord on the border, depth and width (`_visible_fraction`)
  with an image also:
  mean_red, mean_green, mean_blue, mean_yellow   mean intensity over the cell, in [0, 1] of full scale
  nucleus_blue              mean blue intensity over the nucleus, in [0, 1] of full scale
                            (means use every 2nd pixel in each direction on images over 1 Mpx)

Cell policy (`filter_cells`): drop border cells smaller than a fraction of the image's median cell
area, cells whose nucleus is mostly outside the image, and cells whose nucleus is faint (blue below
a fraction of the image's median nucleus brightness). All off by default; top HPA 2021 teams gained
points from such pruning, so try e.g. ``min_border_area_fraction=0.25, min_nucleus_intensity=0.3``.

Tiles (`extract_tiles`): (N, 4, S, S) uint8, channel order RGBY, one per table row in the table's
order. Each cell's bounding box is padded to a square around its centre (aspect kept; outside the
image is 0), other cells' pixels are zeroed when `mask_others`, then the square is resized to S
(area interpolation when shrinking, linear when growing). 16-bit input is converted by
`kit.images.to_uint8` (full scale to 255, never by the image's own maximum).

Tile cache: ``<out>/tiles-<size>-<key>/<ID>.npy`` (N x 4 x S x S uint8,
``np.load(path, mmap_mode="r")`` works) and ``<ID>.csv`` (the cell table rows in the same order),
plus ``params.json``; ``<key>`` = `kit.cachekey.cache_key` of the tile size, `mask_others`, the mask
cache's folder name (backend and its parameters) and `TILE_CACHE_VERSION`. Files are written
atomically, ``.npy`` before ``.csv``, so an image is done when its CSV exists; an entry older than
the image's mask cache entry was cut from masks since redone, and is redone too. This module only
writes and reads entries (`write_tiles`, `tiles_done`, `load_tiles`); `kit.prepare` decides what
is missing and fills it from one decode of each image (`build_tile_cache` is that pass for tiles).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from kit.atomic import atomic_open, atomic_path
from kit.cachekey import cache_key
from kit.errors import ConfigError, DataError
from kit.ids import check_id

__all__ = [
    "TABLE_COLUMNS",
    "cell_table",
    "filter_cells",
    "extract_tiles",
    "build_tile_cache",
    "tile_cache_dir",
    "find_tile_dir",
    "write_tiles",
    "tiles_done",
    "load_tiles",
]

TABLE_COLUMNS = ["cell_id", "x0", "y0", "x1", "y1", "area", "nucleus_area", "touches_border",
                 "nucleus_visible_fraction"]
INTENSITY_COLUMNS = ["mean_red", "mean_green", "mean_blue", "mean_yellow", "nucleus_blue"]
TILE_CACHE_VERSION = 2  # 2: the kit.cachekey folder key


def _empty_table(with_image: bool) -> pd.DataFrame:
    cols = TABLE_COLUMNS + (INTENSITY_COLUMNS if with_image else [])
    df = pd.DataFrame({c: pd.Series(dtype="int64") for c in cols})
    df["touches_border"] = df["touches_border"].astype(bool)
    for c in ["nucleus_visible_fraction"] + (INTENSITY_COLUMNS if with_image else []):
        df[c] = df[c].astype("float64")
    return df


def _bboxes(labels: np.ndarray, n: int) -> np.ndarray:
    """(n+1, 4) int array of x0, y0, x1, y1 per id (row 0 and absent ids are zeros)."""
    boxes = np.zeros((n + 1, 4), np.int64)
    for i, sl in enumerate(ndi.find_objects(labels, max_label=n), start=1):
        if sl is not None:
            boxes[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return boxes


def _border_ids(labels: np.ndarray, n: int) -> np.ndarray:
    """Boolean per id: has a pixel on the outer row/column."""
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    touches = np.bincount(edge, minlength=n + 1)[: n + 1] > 0
    touches[0] = False
    return touches


def _visible_fraction(mask: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> float:
    """Estimated fraction of a nucleus inside the image, from its shape at the border.

    `mask` is the nucleus inside its bounding box `box` (x0, y0, x1, y1) in an image of `shape`.
    Per touched side, with chord c (pixels on the border line), depth h (extent inward) and width w
    (extent along the border): when the nucleus widens inward (w > c) its centre is inside and an
    ellipse with semi-axes w/2 and h / (1 + sqrt(1 - (c/w)^2)) fits; otherwise a circle through
    the chord and depth, r = (c^2/4 + h^2) / 2h. The fraction is area / (pi a b), the lowest over
    the touched sides.
    """
    x0, y0, x1, y1 = box
    h_img, w_img = shape
    area = float(mask.sum())
    best = 1.0
    sides = []  # (pixels on the border line, depth inward, width along the border)
    if x0 == 0:
        sides.append((mask[:, 0], x1 - x0, y1 - y0))
    if x1 == w_img:
        sides.append((mask[:, -1], x1 - x0, y1 - y0))
    if y0 == 0:
        sides.append((mask[0, :], y1 - y0, x1 - x0))
    if y1 == h_img:
        sides.append((mask[-1, :], y1 - y0, x1 - x0))
    for line, depth, width in sides:
        chord = float(line.sum())
        if chord == 0:
            continue
        if width > chord + 2:
            a = width / 2.0
            b = depth / (1.0 + np.sqrt(max(0.0, 1.0 - (chord / width) ** 2)))
        else:
            a = b = (chord * chord / 4.0 + depth * depth) / (2.0 * depth)
        best = min(best, area / (np.pi * a * b))
    return float(min(1.0, best))


def _geometry(cells: np.ndarray, n: int) -> tuple[np.ndarray, dict]:
    """(present ids, columns cell_id, x0, y0, x1, y1, area, touches_border) of n >= 1 cells."""
    area = np.bincount(cells.ravel(), minlength=n + 1)[: n + 1]
    ids = np.flatnonzero(area)
    ids = ids[ids > 0]
    boxes = _bboxes(cells, n)
    touches = _border_ids(cells, n)
    return ids, {
        "cell_id": ids.astype(np.int64),
        "x0": boxes[ids, 0], "y0": boxes[ids, 1], "x1": boxes[ids, 2], "y1": boxes[ids, 3],
        "area": area[ids].astype(np.int64), "touches_border": touches[ids],
    }


def cell_table(nuclei: np.ndarray, cells: np.ndarray, image: np.ndarray | None = None) -> pd.DataFrame:
    """The per-cell table of a (nuclei, cells) label pair (columns in the module docstring).

    `image` (H, W, 4) uint8/uint16, when given, adds the mean intensity columns.
    """
    cells = np.asarray(cells)
    nuclei = np.asarray(nuclei)
    if cells.shape != nuclei.shape:
        raise ValueError(f"nuclei {nuclei.shape} and cells {cells.shape} differ in shape")
    if image is not None and image.shape[:2] != cells.shape:
        raise ValueError(f"image {image.shape} and labels {cells.shape} differ in shape")
    n = int(cells.max(initial=0)) if cells.size else 0
    if n == 0:
        return _empty_table(image is not None)
    ids, geo = _geometry(cells, n)
    nuc_area = np.bincount(nuclei.ravel(), minlength=n + 1)[: n + 1]
    visible = np.ones(n + 1)
    n_nuc = int(nuclei.max(initial=0))
    nuc_touch = np.flatnonzero(_border_ids(nuclei, n_nuc))
    if nuc_touch.size:
        nboxes = _bboxes(nuclei, n_nuc)
        for k in nuc_touch[nuc_touch <= n]:
            x0, y0, x1, y1 = nboxes[k]
            visible[k] = _visible_fraction(nuclei[y0:y1, x0:x1] == k, (x0, y0, x1, y1), cells.shape)
    geo["nucleus_area"] = nuc_area[ids].astype(np.int64)
    geo["nucleus_visible_fraction"] = visible[ids]
    data = {c: geo[c] for c in TABLE_COLUMNS}
    if image is not None:
        # Means over a 2x2-strided grid on large images: 4x cheaper, exact enough for a policy.
        step = 2 if cells.size > 1_000_000 else 1
        if step > 1 and (np.bincount(nuclei[::2, ::2].ravel(), minlength=n + 1)[: n + 1][ids] == 0).any():
            step = 1  # a nucleus too small for the grid: use every pixel
        sub_c = cells[::step, ::step].ravel()
        sub_n = nuclei[::step, ::step].ravel()
        sub_img = image[::step, ::step].reshape(-1, 4).astype(np.float32)
        full = 255.0 if image.dtype == np.uint8 else 65535.0
        cnt = np.bincount(sub_c, minlength=n + 1)[: n + 1][ids]
        for c, name in enumerate(["mean_red", "mean_green", "mean_blue", "mean_yellow"]):
            sums = np.bincount(sub_c, weights=sub_img[:, c], minlength=n + 1)[: n + 1]
            data[name] = sums[ids] / (np.maximum(cnt, 1) * full)
        ncnt = np.bincount(sub_n, minlength=n + 1)[: n + 1][ids]
        nsum = np.bincount(sub_n, weights=sub_img[:, 2], minlength=n + 1)[: n + 1]
        data["nucleus_blue"] = nsum[ids] / (np.maximum(ncnt, 1) * full)
    return pd.DataFrame(data)


def filter_cells(
    table: pd.DataFrame,
    min_border_area_fraction: float = 0.0,
    min_nucleus_intensity: float = 0.0,
    min_nucleus_visible_fraction: float = 0.0,
) -> pd.DataFrame:
    """Apply the cell policy to a cell table (one image, or several with an ``ID`` column).

    - `min_border_area_fraction`: drop cells touching the border whose area is below this fraction
      of the image's median cell area (median over cells off the border, or all when none is).
    - `min_nucleus_intensity`: drop cells whose ``nucleus_blue`` is below this fraction of the
      image's median ``nucleus_blue`` (needs a table made with the image).
    - `min_nucleus_visible_fraction`: drop cells whose nucleus is mostly outside the image.
    0 turns a rule off (the default for all three). Returns the kept rows, index reset.
    """
    if len(table) == 0:
        return table.reset_index(drop=True)
    if min_nucleus_intensity > 0 and "nucleus_blue" not in table.columns:
        raise ConfigError("min_nucleus_intensity needs the nucleus_blue column: build the cell table with the image")
    groups = table.groupby("ID", sort=False) if "ID" in table.columns else [(None, table)]
    keep = pd.Series(True, index=table.index)
    for _, t in groups:
        if min_border_area_fraction > 0:
            inner = t.loc[~t["touches_border"].astype(bool), "area"]
            median = float((inner if len(inner) else t["area"]).median())
            small = t["touches_border"].astype(bool) & (t["area"] < min_border_area_fraction * median)
            keep[t.index[small.to_numpy()]] = False
        if min_nucleus_intensity > 0:
            median = float(t["nucleus_blue"].median())
            keep[t.index[(t["nucleus_blue"] < min_nucleus_intensity * median).to_numpy()]] = False
        if min_nucleus_visible_fraction > 0:
            keep[t.index[(t["nucleus_visible_fraction"] < min_nucleus_visible_fraction).to_numpy()]] = False
    return table[keep].reset_index(drop=True)


def _bbox_table(cells: np.ndarray) -> pd.DataFrame:
    """Minimal table (cell_id, bbox, area, touches_border) from a cell label image."""
    n = int(cells.max(initial=0)) if cells.size else 0
    if n == 0:
        return _empty_table(False)[["cell_id", "x0", "y0", "x1", "y1", "area", "touches_border"]]
    return pd.DataFrame(_geometry(cells, n)[1])


def extract_tiles(
    image: np.ndarray,
    cell_labels: np.ndarray,
    size: int,
    mask_others: bool = True,
    table: pd.DataFrame | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Square RGBY tiles of every cell -> ((N, 4, size, size) uint8, table); see the module docstring.

    `table` (e.g. from `cell_table` or the mask cache, possibly filtered) chooses the cells and
    their order via its ``cell_id`` and bbox columns; without it every cell is tiled in id order and
    a minimal table is computed. The returned table is the one used, index reset.
    """
    if image.ndim != 3 or image.shape[2] != 4 or image.shape[:2] != cell_labels.shape:
        raise ValueError(f"image {image.shape} must be (H, W, 4) matching the labels {cell_labels.shape}")
    if size < 1:
        raise ValueError(f"tile size must be positive, got {size}")
    if table is None:
        table = _bbox_table(cell_labels)
    table = table.reset_index(drop=True)
    n = len(table)
    tiles = np.zeros((n, 4, size, size), np.uint8)
    if n == 0:
        return tiles, table
    h, w = cell_labels.shape
    if image.dtype == np.uint16:
        # Same values as kit.images.to_uint8 ((v + 128) // 257; v / 257 is never exactly .5), 5x faster.
        image = cv2.convertScaleAbs(image, alpha=1.0 / 257.0)
    elif image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or uint16 image, got {image.dtype}")
    ids = table["cell_id"].to_numpy()
    boxes = table[["x0", "y0", "x1", "y1"]].to_numpy()
    for i in range(n):
        k = ids[i]
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        side = max(x1 - x0, y1 - y0, 1)
        sx0 = x0 - (side - (x1 - x0)) // 2
        sy0 = y0 - (side - (y1 - y0)) // 2
        # Part of the square inside the image, and where it lands in the square.
        ix0, iy0 = max(sx0, 0), max(sy0, 0)
        ix1, iy1 = min(sx0 + side, w), min(sy0 + side, h)
        square = np.zeros((side, side, 4), np.uint8)
        dst = square[iy0 - sy0: iy1 - sy0, ix0 - sx0: ix1 - sx0]
        crop = image[iy0:iy1, ix0:ix1]
        if mask_others:
            lab = cell_labels[iy0:iy1, ix0:ix1]
            keep = ((lab == k) | (lab == 0)).view(np.uint8)
            cv2.copyTo(crop, keep, dst)  # masked at full resolution, so no neighbour bleeds in
        else:
            dst[...] = crop
        interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        tiles[i] = cv2.resize(square, (size, size), interpolation=interp).transpose(2, 0, 1)
    return tiles, table


# ----------------------------------------------------------------------------- tile cache

def tile_cache_dir(out_dir: str | Path, size: int, mask_cache, mask_others: bool = True) -> Path:
    """``<out>/tiles-<size>-<key>`` for these tile settings and this mask cache."""
    key = cache_key("tiles", TILE_CACHE_VERSION, {"size": int(size), "mask_others": bool(mask_others),
                                                  "masks": Path(mask_cache.dir).name})
    return Path(out_dir) / f"tiles-{int(size)}-{key}"


def find_tile_dir(root: str | Path, size: int, mask_cache, mask_others: bool = True) -> tuple[Path, bool]:
    """(tile folder, whether it is the kit's own for these settings) under the tile cache `root`.

    The kit's folder (`tile_cache_dir`) when it exists or when `root` holds no other folder of
    `size` px tiles; otherwise the only ``tiles-<size>-*`` folder there (tiles cut elsewhere, read
    as they are). DataError when several such folders make the choice ambiguous.
    """
    root = Path(root)
    own = tile_cache_dir(root, size, mask_cache, mask_others)
    if own.is_dir():
        return own, True
    others = sorted(p for p in root.glob(f"tiles-{int(size)}-*") if p.is_dir()) if root.is_dir() else []
    if not others:
        return own, True
    if len(others) == 1:
        return others[0], False
    raise DataError(f"several tile caches of {size} px under {root} ({', '.join(p.name for p in others)}), "
                    f"none of them for the mask cache {Path(mask_cache.dir).name}: remove the stale ones")


def prepare_tile_dir(out_dir: str | Path, size: int, mask_cache, mask_others: bool = True) -> Path:
    """Create the tile cache folder with its ``params.json``; returns it."""
    tile_dir = tile_cache_dir(out_dir, size, mask_cache, mask_others)
    tile_dir.mkdir(parents=True, exist_ok=True)
    params = tile_dir / "params.json"
    if not params.exists():
        with atomic_open(params, "w") as f:
            json.dump({"size": int(size), "mask_others": bool(mask_others), "mask_cache": str(mask_cache.dir),
                       "backend": mask_cache.backend, "backend_params": mask_cache.params,
                       "version": TILE_CACHE_VERSION}, f, indent=2, default=str)
    return tile_dir


def _tile_paths(tile_dir: Path, image_id: str) -> tuple[Path, Path]:
    check_id(image_id)
    return tile_dir / f"{image_id}.npy", tile_dir / f"{image_id}.csv"


def write_tiles(tile_dir: str | Path, image_id: str, image: np.ndarray, cells: np.ndarray,
                table: pd.DataFrame, size: int, mask_others: bool = True) -> int:
    """Write one image's ``<ID>.npy`` and ``<ID>.csv`` into a tile cache folder; returns the cell count.

    An image whose masks do not match it (one that could not be read when segmented) gets no cells.
    """
    if cells.shape != image.shape[:2]:
        table = table.iloc[:0]
        cells = np.zeros(image.shape[:2], np.int32)
    tiles, table = extract_tiles(image, cells, size, mask_others=mask_others, table=table)
    npy, csv = _tile_paths(Path(tile_dir), image_id)
    with atomic_path(npy) as tmp:
        np.save(tmp, tiles)
    with atomic_open(csv, "w", newline="") as f:  # written last: its presence marks the image done
        table.to_csv(f, index=False)
    return len(table)


def tiles_done(tile_dir: str | Path, image_id: str, newer_than_ns: int | None = None) -> bool:
    """True when the image's tiles are complete in `tile_dir` (and, given the mtime of the mask
    entry they were cut from, not older than it)."""
    npy, csv = _tile_paths(Path(tile_dir), image_id)
    try:
        mtime = csv.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return npy.exists() and (newer_than_ns is None or mtime >= newer_than_ns)


def build_tile_cache(
    images_dir: str | Path,
    image_ids: Iterable[str],
    mask_cache,
    out_dir: str | Path,
    size: int,
    mask_others: bool = True,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write the tile cache for `image_ids` (see the module docstring); returns its folder.

    One `kit.prepare` pass: images missing from `mask_cache` (a `kit.segment.cache.MaskCache`) are
    segmented into it from the same decode. Finished images are skipped, so a killed run resumes.
    DataError naming the file when an image has a missing channel file.
    """
    from kit.prepare import Plan, prepare_folder

    tile_dir = prepare_tile_dir(out_dir, size, mask_cache, mask_others)
    plan = Plan(masks=mask_cache, tile_dir=tile_dir, tile_size=int(size), mask_others=bool(mask_others))
    report = prepare_folder(images_dir, list(dict.fromkeys(str(i) for i in image_ids)), plan, workers=workers,
                            progress=progress, desc=f"tiles {size}px")
    report.raise_missing()
    return tile_dir


def load_tiles(tile_dir: str | Path, image_id: str) -> tuple[np.ndarray, pd.DataFrame]:
    """(tiles memory-mapped read-only, cell table) of one image from a tile cache folder."""
    npy, csv = _tile_paths(Path(tile_dir), image_id)
    if not csv.exists() or not npy.exists():
        raise DataError(f"no tiles for image {image_id} in {tile_dir} (expected {npy.name} and {csv.name})")
    tiles = np.load(npy, mmap_mode="r")
    table = pd.read_csv(csv)
    if len(table) != tiles.shape[0]:
        raise DataError(f"{csv} has {len(table)} rows but {npy} holds {tiles.shape[0]} tiles")
    return tiles, table
