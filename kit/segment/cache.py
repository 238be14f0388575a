"""The mask cache and the `segment` command.

Layout: ``<cache>/<backend>-<params-hash>/<ID>.npz`` plus ``params.json`` (backend and resolved
options) in the same folder. The hash covers the backend's resolved options (its defaults updated
with yours), so different settings never share files and a rerun with the same settings finds its
work. Each ``<ID>.npz`` (numpy, compressed, no pickles) holds:
  nuclei, cells   int32 (H, W) label images; background 0, cell k contains nucleus k, ids 1..N
  table           structured array of the per-cell table (`kit.cells.cell_table` with the image,
                  columns cell_id, x0, y0, x1, y1 (end exclusive), area, nucleus_area,
                  touches_border, nucleus_visible_fraction, mean_red/green/blue/yellow, nucleus_blue)
  error           (only for an image that could not be read) the reason; masks are then (0, 0)
Files are written atomically, so a file under its final name is complete; a rerun skips them.

    python -m kit segment --images DIR --out CACHE [--backend classical|hpacellseg]
                          [--ids train.csv] [--workers N] [--shard I/N] [--option KEY=VALUE ...]
                          [--plugin MODULE] [--tiles SIZE]

`--tiles SIZE` also fills the tile cache (`kit.cells`): images segmented in this run are tiled while
in memory, images found in the cache afterwards. `--plugin MODULE` imports a module that registers
a backend (`kit.segment.register_backend`), so a team's own segmenter runs with `--backend NAME`.
`--shard I/N` (I counted from 0) takes every N-th image of the sorted ID list starting at I, so N
array jobs with I = 0..N-1 cover every image exactly once and can share one cache folder.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from kit.atomic import atomic_open, atomic_path
from kit.errors import ConfigError, DataError
from kit.workers import pool_map

__all__ = ["MaskCache", "segment_folder", "parse_shard", "shard_ids", "list_image_ids", "configure_segment"]

_TMP_MAX_AGE_S = 3600  # temp files of killed runs older than this are removed on the next run


def _hash_params(backend: str, params: dict) -> str:
    from kit.segment import get_backend

    key_fn = getattr(get_backend(backend), "cache_key", None)
    key = key_fn(dict(params)) if key_fn else dict(params)
    blob = json.dumps({"backend": backend, "params": key}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _table_to_records(table: pd.DataFrame) -> np.ndarray:
    return table.to_records(index=False)


def _records_to_table(rec: np.ndarray) -> pd.DataFrame:
    if rec.dtype.names is None:
        return pd.DataFrame()
    return pd.DataFrame({name: rec[name] for name in rec.dtype.names})


class MaskCache:
    """Segmentation results of one backend and one set of options, one file per image."""

    def __init__(self, root: str | Path, backend: str = "classical", params: dict | None = None):
        from kit.segment import backend_options, get_backend

        self.root = Path(root)
        self.backend = backend
        self.params = backend_options(backend, params)
        # Spawned workers import this module to find a backend registered outside kit.
        self.backend_module = getattr(get_backend(backend), "__module__", None)
        self.dir = self.root / f"{backend}-{_hash_params(backend, self.params)}"

    def __repr__(self) -> str:
        return f"MaskCache({str(self.dir)!r})"

    def path(self, image_id: str) -> Path:
        """The file of one image (it may not exist yet)."""
        return self.dir / f"{image_id}.npz"

    def has(self, image_id: str) -> bool:
        """True when the image's file is complete (files appear only once fully written)."""
        return self.path(image_id).is_file()

    def ids(self) -> list[str]:
        """IDs of every finished image, sorted."""
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.npz") if not p.name.startswith("."))

    def write_params(self) -> None:
        """Write ``params.json`` (backend and options) once, for people reading the folder."""
        path = self.dir / "params.json"
        if not path.exists():
            with atomic_open(path, "w") as f:
                json.dump({"backend": self.backend, "params": self.params}, f, indent=2, sort_keys=True, default=str)

    def save(self, image_id: str, nuclei: np.ndarray, cells: np.ndarray,
             table: pd.DataFrame | None = None, error: str | None = None) -> Path:
        """Write one image's result atomically; `table` defaults to `cell_table(nuclei, cells)`."""
        from kit.cells import cell_table

        if table is None:
            table = cell_table(nuclei, cells)
        arrays = {"nuclei": np.asarray(nuclei, np.int32), "cells": np.asarray(cells, np.int32),
                  "table": _table_to_records(table)}
        if error is not None:
            arrays["error"] = np.array(error)
        path = self.path(image_id)
        with atomic_path(path) as tmp:
            np.savez_compressed(tmp, **arrays)
        return path

    def load(self, image_id: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        """(nuclei, cells, table) of one image; DataError when it is not in the cache."""
        path = self.path(image_id)
        if not path.is_file():
            raise DataError(f"image {image_id} is not in the mask cache {self.dir} (run `python -m kit segment`)")
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["nuclei"].astype(np.int32, copy=False), z["cells"].astype(np.int32, copy=False), \
                    _records_to_table(z["table"])
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"damaged mask cache file {path}: {exc}; delete it and rerun") from exc

    def error(self, image_id: str) -> str | None:
        """The read error stored for an image that could not be segmented, else None."""
        with np.load(self.path(image_id), allow_pickle=False) as z:
            return str(z["error"]) if "error" in z.files else None

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run this cache's backend with its options on one image."""
        from kit.segment import _REGISTRY, segment_image

        if self.backend not in _REGISTRY and self.backend_module:
            importlib.import_module(self.backend_module)
        return segment_image(image, self.backend, **self.params)

    def segment_and_save(self, image_id: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        """Segment `image`, compute its cell table (with intensities) and save; returns all three."""
        from kit.cells import cell_table

        nuclei, cells = self.segment(image)
        table = cell_table(nuclei, cells, image)
        self.save(image_id, nuclei, cells, table)
        return nuclei, cells, table

    def clean_temp(self, max_age_s: float = _TMP_MAX_AGE_S) -> int:
        """Remove temp files left by killed runs (older than `max_age_s`, so live shards keep theirs)."""
        if not self.dir.is_dir():
            return 0
        now = time.time()
        removed = 0
        for p in self.dir.glob(".*.tmp*"):
            try:
                if now - p.stat().st_mtime > max_age_s:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed


# ----------------------------------------------------------------------------- folders and shards

def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'I/N' (I from 0 to N-1) -> (I, N); None stays None. ConfigError for anything else."""
    if text is None:
        return None
    if isinstance(text, tuple):
        i, n = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise ConfigError(f"--shard must look like I/N (e.g. 0/4), got {text!r}")
        i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {i}/{n}: I must be in 0..N-1 (shards are counted from 0)")
    return i, n


def shard_ids(image_ids: Iterable[str], shard: str | tuple[int, int] | None) -> list[str]:
    """The IDs of one shard: every N-th of the sorted unique IDs, starting at I (all IDs without a shard)."""
    ids = sorted(set(str(i) for i in image_ids))
    sh = parse_shard(shard)
    if sh is None:
        return ids
    i, n = sh
    return ids[i::n]


_CHANNEL_FILE = re.compile(r"^(?P<id>.+)_blue\.(png|tif|tiff|jpg|jpeg)$", re.IGNORECASE)


def list_image_ids(images_dir: str | Path) -> list[str]:
    """IDs of the samples in a folder (every ``<ID>_blue.<ext>`` file), sorted."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"image folder not found: {images_dir}")
    ids = sorted({m.group("id") for p in images_dir.iterdir() if (m := _CHANNEL_FILE.match(p.name))})
    return ids


def _segment_one(job: tuple) -> tuple[str, str | None]:
    """Worker: read, segment, tabulate and save one image; returns (id, error or None)."""
    from kit.images import CHANNELS, ImageReadError, channel_path, read_sample

    images_dir, image_id, cache, tiles = job
    try:
        for c in CHANNELS:
            channel_path(images_dir, image_id, c)
    except ImageReadError as exc:  # a missing file is not cached: the rerun after a fix finds it
        return image_id, str(exc)
    try:
        image = read_sample(images_dir, image_id)
    except ImageReadError as exc:
        # An unreadable sample gets an empty result (and its reason), not a crash of the whole run.
        empty = np.zeros((0, 0), np.int32)
        cache.save(image_id, empty, empty, error=str(exc))
        return image_id, str(exc)
    nuclei, cells, table = cache.segment_and_save(image_id, image)
    if tiles is not None:  # tiles now, while the image is in memory (saves a second read)
        from kit.cells import write_tiles

        tile_dir, size, mask_others = tiles
        write_tiles(tile_dir, image_id, image, cells, table, size, mask_others)
    return image_id, None


def segment_folder(
    images_dir: str | Path,
    image_ids: Iterable[str],
    cache: MaskCache,
    workers: int = 1,
    shard: str | tuple[int, int] | None = None,
    progress: bool = True,
    tiles: tuple[str | Path, int, bool] | None = None,
) -> list[str]:
    """Segment the images of this shard into `cache`, skipping finished ones.

    `tiles` = (tile cache root, tile size, mask_others) also writes the tiles of each image it
    segments (`kit.cells` tile cache; images already in the cache are left to `build_tile_cache`).

    Returns the IDs of this shard that are finished in the cache after the call (skipped ones
    included), sorted. Images that could not be read are saved as empty results with their reason
    and reported in a warning.
    """
    from tqdm import tqdm

    from kit.segment import get_backend

    ids = shard_ids(image_ids, shard)
    check = getattr(get_backend(cache.backend), "check", None)
    if check is not None and ids:
        check(cache.params)  # fail before the first image (missing package, weights, ...)
    cache.dir.mkdir(parents=True, exist_ok=True)
    cache.write_params()
    cache.clean_temp()
    todo = [i for i in ids if not cache.has(i)]
    tile_job = None
    if tiles is not None:
        from kit.cells import prepare_tile_dir

        root, size, mask_others = tiles
        tile_job = (str(prepare_tile_dir(root, size, cache, mask_others)), int(size), bool(mask_others))
    jobs = [(str(images_dir), i, cache, tile_job) for i in todo]
    errors: list[tuple[str, str]] = []
    label = f"segment {cache.backend}" + (f" shard {parse_shard(shard)[0]}/{parse_shard(shard)[1]}" if shard else "")
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc=label, unit="img",
               disable=not progress, file=sys.stderr)
    try:
        for image_id, err in pool_map(_segment_one, jobs, workers, ordered=False):
            if err:
                errors.append((image_id, err))
            bar.update(1)
    finally:
        bar.close()
    if errors:
        shown = "; ".join(f"{i}: {e}" for i, e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        warnings.warn(f"{len(errors)} image(s) could not be read (unreadable ones get empty masks, "
                      f"missing ones are left undone): {shown}{more}", stacklevel=2)
    return [i for i in ids if cache.has(i)]


# ----------------------------------------------------------------------------- command

def _parse_option(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"--option must look like KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"ID list not found: {path}")
    df = pd.read_csv(path, dtype=str)
    if "ID" not in df.columns:
        raise DataError(f"{path} has no ID column (columns: {', '.join(df.columns)})")
    return df["ID"].dropna().tolist()


def _run_segment(args) -> int:
    from kit.segment import available_backends

    for module in args.plugin:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"--plugin {module}: cannot import it ({exc})") from exc
    if args.backend not in available_backends():
        raise ConfigError(f"unknown --backend {args.backend!r}; available: {', '.join(available_backends())}")
    options = dict(_parse_option(o) for o in args.option)
    ids = _read_ids(Path(args.ids)) if args.ids else list_image_ids(args.images)
    if not ids:
        raise DataError(f"no images (<ID>_blue.png files) found in {args.images} "
                        "(for a dataset in the Kaggle layout use its train/ or test/ folder)")
    shard = parse_shard(args.shard)
    cache = MaskCache(args.out, args.backend, options)
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiles = (args.tile_out or args.out, args.tiles, not args.no_mask_others) if args.tiles else None
        done = segment_folder(args.images, ids, cache, workers=args.workers, shard=shard, progress=not args.quiet,
                              tiles=tiles)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    n_shard = len(shard_ids(ids, shard))
    print(f"{len(done)}/{n_shard} images segmented in {cache.dir} ({time.time() - t0:.1f} s)")
    if args.tiles:
        from kit.cells import build_tile_cache

        tile_dir = build_tile_cache(args.images, done, cache, args.tile_out or args.out, args.tiles,
                                    mask_others=not args.no_mask_others, workers=args.workers,
                                    progress=not args.quiet)
        print(f"tiles of {len(done)} images in {tile_dir}")
    return 0 if len(done) == n_shard else 1


def configure_segment(parser) -> None:
    """Arguments of `python -m kit segment`."""
    parser.add_argument("--images", required=True, help="folder with <ID>_{red,green,blue,yellow}.png")
    parser.add_argument("--out", required=True, help="cache root; files go to OUT/<backend>-<params-hash>/<ID>.npz")
    parser.add_argument("--backend", default="classical", help="classical (default) or hpacellseg, or a registered one")
    parser.add_argument("--ids", default=None, help="CSV with an ID column (e.g. train.csv); default: every sample in --images")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--shard", default=None, help="I/N: do only shard I of N (I from 0), for array jobs")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it registers a backend with kit.segment.register_backend)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="backend option, repeatable (e.g. scale=0.5, weights_dir=/path)")
    parser.add_argument("--tiles", type=int, default=0, metavar="SIZE", help="also build the tile cache with SIZE px tiles")
    parser.add_argument("--tile-out", default=None, help="tile cache root (default: --out)")
    parser.add_argument("--no-mask-others", action="store_true", help="keep neighbouring cells' pixels in tiles")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_segment)
