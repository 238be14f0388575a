"""The mask cache and the `segment` command.

Layout: ``<cache>/<backend>-<key>/<ID>.npz`` plus ``params.json`` (backend and resolved options)
in the same folder; ``<key>`` = `kit.cachekey.cache_key` of the backend, its resolved options (its
defaults updated with yours) and `MASK_CACHE_VERSION`, so different settings never share files and
a rerun with the same settings finds its work. Each ``<ID>.npz`` (numpy, compressed, no pickles) holds:
  source          the channel files it was made from (`kit.images.sample_source`: name, size and
                  mtime of each); an entry whose files changed since is stale and is redone
  nuclei, cells   (H, W) label images, stored uint16 (int32 past 65535 ids), read as int32;
                  background 0, cell k contains nucleus k, ids 1..N
  table           structured array of the per-cell table (`kit.cells.cell_table` with the image,
                  columns cell_id, x0, y0, x1, y1 (end exclusive), area, nucleus_area,
                  touches_border, nucleus_visible_fraction, mean_red/green/blue/yellow, nucleus_blue)
  error           (only for files that could not be decoded) the reason; masks are then (0, 0).
                  It records that these exact files are unreadable: fixing or replacing them
                  changes `source`, and the image is segmented again. A missing file is never recorded.
Files are written atomically, so a file under its final name is complete; a rerun skips current ones.

    python -m kit segment --images DIR [DIR ...] --out CACHE [--backend classical|hpacellseg]
                          [--ids train.csv] [--workers N] [--shard I/N] [--option KEY=VALUE ...]
                          [--plugin MODULE] [--tiles SIZE]

`--tiles SIZE` also fills the tile cache (`kit.cells`) from the same decode of each image
(`kit.prepare`). `--plugin MODULE` imports a module that registers a backend
(`kit.segment.register_backend`), so a team's own segmenter runs with `--backend NAME`.
`--shard I/N` (I counted from 0) takes every N-th image of the sorted ID list starting at I, so N
array jobs with I = 0..N-1 cover every image exactly once and can share one cache folder.
"""
from __future__ import annotations

import importlib
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd

from kit.atomic import atomic_open, atomic_path, remove_stale_temps
from kit.cachekey import cache_key
from kit.errors import ConfigError, DataError, clip
from kit.ids import check_id

__all__ = ["MASK_CACHE_VERSION", "MaskCache", "MaskEntry", "segment_folder", "parse_shard", "shard_ids",
           "configure_segment"]

MASK_CACHE_VERSION = 2  # 2: entries record their source files


def _table_to_records(table: pd.DataFrame) -> np.ndarray:
    return table.to_records(index=False)


def _records_to_table(rec: np.ndarray) -> pd.DataFrame:
    if rec.dtype.names is None:
        return pd.DataFrame()
    return pd.DataFrame({name: rec[name] for name in rec.dtype.names})


class MaskEntry(NamedTuple):
    """What an entry says about itself without its masks: its source files and its read error."""

    source: str | None
    error: str | None
    mtime_ns: int


class MaskCache:
    """Segmentation results of one backend and one set of options, one file per image.

    `folder` pins the exact folder (a run's manifest records the one its models were trained on);
    by default it is ``<root>/<backend>-<key>``.
    """

    def __init__(self, root: str | Path, backend: str = "classical", params: dict | None = None, *,
                 folder: str | Path | None = None):
        from kit.segment import backend_options, get_backend

        self.backend = backend
        self.params = backend_options(backend, params)
        # Spawned workers import this module to find a backend registered outside kit.
        self.backend_module = getattr(get_backend(backend), "__module__", None)
        if folder is not None:
            self.dir = Path(folder)
            self.root = self.dir.parent
        else:
            self.root = Path(root)
            key_fn = getattr(get_backend(backend), "cache_key", None)
            key = key_fn(dict(self.params)) if key_fn else dict(self.params)
            self.dir = self.root / f"{backend}-{cache_key('masks', MASK_CACHE_VERSION, {'backend': backend, 'params': key})}"

    def __repr__(self) -> str:
        return f"MaskCache({str(self.dir)!r})"

    def path(self, image_id: str) -> Path:
        """The file of one image (it may not exist yet); DataError for a bad ID (`kit.ids`)."""
        return self.dir / f"{check_id(image_id)}.npz"

    def entry(self, image_id: str) -> MaskEntry | None:
        """The entry's source and error (None when there is no entry or it cannot be read)."""
        path = self.path(image_id)
        try:
            mtime = path.stat().st_mtime_ns
            with np.load(path, allow_pickle=False) as z:
                source = str(z["source"]) if "source" in z.files else None
                error = str(z["error"]) if "error" in z.files else None
        except (OSError, ValueError, KeyError):
            return None
        return MaskEntry(source, error, mtime)

    def has(self, image_id: str, source: str | None = None) -> bool:
        """True when the image's file is complete and, given a `kit.images.sample_source`
        signature, was made from exactly those files."""
        if source is None:
            return self.path(image_id).is_file()
        entry = self.entry(image_id)
        return entry is not None and entry.source == source

    def ids(self) -> list[str]:
        """IDs of every finished image, sorted."""
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.npz") if not p.name.startswith("."))

    def setup(self) -> None:
        """Before writing: check the backend (missing package, weights), create the folder with its
        ``params.json``, and remove temp files that killed runs left behind."""
        from kit.segment import get_backend

        check = getattr(get_backend(self.backend), "check", None)
        if check is not None:
            check(self.params)  # fail before the first image
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "params.json"
        if not path.exists():
            with atomic_open(path, "w") as f:
                json.dump({"backend": self.backend, "params": self.params}, f, indent=2, sort_keys=True, default=str)
        remove_stale_temps(self.dir)

    def save(self, image_id: str, nuclei: np.ndarray, cells: np.ndarray,
             table: pd.DataFrame | None = None, error: str | None = None, source: str | None = None) -> Path:
        """Write one image's result atomically; `table` defaults to `cell_table(nuclei, cells)`."""
        from kit.cells import cell_table

        if table is None:
            table = cell_table(nuclei, cells)
        arrays = {}
        if source is not None:
            arrays["source"] = np.array(source)
        arrays.update({"nuclei": _compact(nuclei), "cells": _compact(cells), "table": _table_to_records(table)})
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
        entry = self.entry(image_id)
        return entry.error if entry is not None else None

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run this cache's backend with its options on one image."""
        from kit.segment import _REGISTRY, segment_image

        if self.backend not in _REGISTRY and self.backend_module:
            importlib.import_module(self.backend_module)
        return segment_image(image, self.backend, **self.params)

    def segment_and_save(self, image_id: str, image: np.ndarray, source: str | None = None
                         ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        """Segment `image`, compute its cell table (with intensities) and save; returns all three."""
        from kit.cells import cell_table

        nuclei, cells = self.segment(image)
        table = cell_table(nuclei, cells, image)
        self.save(image_id, nuclei, cells, table, source=source)
        return nuclei, cells, table


def _compact(labels: np.ndarray) -> np.ndarray:
    """uint16 when the ids fit (always, for cells of one field): half the bytes to deflate, 2.3x
    faster to save here; `load` returns int32 whichever was stored."""
    labels = np.asarray(labels)
    fits = labels.size == 0 or (labels.min() >= 0 and labels.max() < 65536)
    return labels.astype(np.uint16 if fits else np.int32, copy=False)


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
            raise ConfigError(f"--shard must look like I/N (e.g. 0/4), got {clip(text)}")
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


def segment_folder(
    images_dir: str | Path,
    image_ids: Iterable[str],
    cache: MaskCache,
    workers: int = 1,
    shard: str | tuple[int, int] | None = None,
    progress: bool = True,
) -> list[str]:
    """Segment the images of this shard into `cache` (one `kit.prepare` pass), skipping current ones.

    Returns the IDs of this shard that are finished in the cache after the call (skipped ones
    included), sorted. Images that could not be read are recorded with their reason (see the
    module docstring) and reported in a warning; missing files are left undone.
    """
    from kit.prepare import Plan, prepare_folder

    ids = shard_ids(image_ids, shard)
    label = f"segment {cache.backend}" + (f" shard {parse_shard(shard)[0]}/{parse_shard(shard)[1]}" if shard else "")
    report = prepare_folder(images_dir, ids, Plan(masks=cache), workers=workers, progress=progress, desc=label)
    report.warn("unreadable ones are recorded, missing ones are left undone")
    return [i for i in ids if cache.has(i)]


# ----------------------------------------------------------------------------- command

def _parse_option(text: str) -> tuple[str, object]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"--option must look like KEY=VALUE, got {clip(text)}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _run_segment(args) -> int:
    from kit.layout import ImageFolders, list_image_ids, read_id_list
    from kit.segment import available_backends

    for module in args.plugin:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"--plugin {module}: cannot import it ({exc})") from exc
    if args.backend not in available_backends():
        raise ConfigError(f"unknown --backend {clip(args.backend)}; available: {', '.join(available_backends())}")
    if args.tiles < 0:
        raise ConfigError(f"--tiles must be a positive tile size, got {args.tiles}")
    options = dict(_parse_option(o) for o in args.option)
    for folder in args.images:
        list_image_ids(folder)  # DataError for a folder that does not exist
    folders = ImageFolders(args.images)
    ids = read_id_list(Path(args.ids)) if args.ids else folders.ids()
    if not ids:
        raise DataError(f"no images (<ID>_<channel>.png files) found in {', '.join(args.images)} "
                        "(for a dataset in the Kaggle layout use its train/ or test/ folder)")
    shard = parse_shard(args.shard)
    cache = MaskCache(args.out, args.backend, options)
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tile_dir = None
        if args.tiles:  # masks and tiles from one decode of each image
            from kit.cells import prepare_tile_dir

            tile_dir = prepare_tile_dir(args.tile_out or args.out, args.tiles, cache, not args.no_mask_others)
        done = []
        # each image from the one folder that holds it (several folders: e.g. train/ and external images)
        for folder, todo in folders.by_folder(shard_ids(ids, shard)).items():
            if tile_dir is not None:
                from kit.prepare import Plan, prepare_folder

                plan = Plan(masks=cache, tile_dir=tile_dir, tile_size=args.tiles, mask_others=not args.no_mask_others)
                prepare_folder(folder, todo, plan, workers=args.workers, progress=not args.quiet,
                               desc=f"segment {cache.backend} + tiles").warn()
                done += [i for i in todo if cache.has(i)]
            else:
                done += segment_folder(folder, todo, cache, workers=args.workers, progress=not args.quiet)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    n_shard = len(shard_ids(ids, shard))
    print(f"{len(done)}/{n_shard} images segmented in {cache.dir} ({time.time() - t0:.1f} s)")
    if args.tiles:
        print(f"tiles of {len(done)} images in {tile_dir}")
    return 0 if len(done) == n_shard else 1


def configure_segment(parser) -> None:
    """Arguments of `python -m kit segment`."""
    from kit.cli import folder_arg

    parser.add_argument("--images", required=True, nargs="+",
                        help="folder(s) with <ID>_{red,green,blue,yellow}.png (several: each ID from the one that holds it)")
    parser.add_argument("--out", required=True, type=folder_arg, help="cache root; files go to OUT/<backend>-<params-hash>/<ID>.npz")
    parser.add_argument("--backend", default="classical", help="classical (default) or hpacellseg, or a registered one")
    parser.add_argument("--ids", default=None, help="CSV with an ID column (e.g. train.csv); default: every sample in --images")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--shard", default=None, help="I/N: do only shard I of N (I from 0), for array jobs")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it registers a backend with kit.segment.register_backend)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="backend option, repeatable (e.g. scale=0.5, weights_dir=/path)")
    parser.add_argument("--tiles", type=int, default=0, metavar="SIZE", help="also build the tile cache with SIZE px tiles")
    parser.add_argument("--tile-out", default=None, type=folder_arg, help="tile cache root (default: --out)")
    parser.add_argument("--no-mask-others", action="store_true", help="keep neighbouring cells' pixels in tiles")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_segment)
