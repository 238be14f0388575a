"""One decode per image: given a decoded image, write whatever of its stage files is missing.

An image's stage files (each format is documented in the module that owns it):

============ =============================== ========================== ===================================
part         module                          file                       current while
============ =============================== ========================== ===================================
masks        `kit.segment.cache.MaskCache`   ``<mask dir>/<ID>.npz``    its channel files are unchanged
             (label images + cell table)                                (name, size, mtime: ``source``)
tiles        `kit.cells`                     ``<tile dir>/<ID>.npy/csv`` not older than the mask entry
field        `kit.fields`                    ``<field dir>/<ID>.npy``   not older than any channel file
============ =============================== ========================== ===================================

`Plan` says which parts a pass keeps. `prepare_folder(images_dir, ids, plan, workers)` first looks
at each image's files (stat calls and the mask entry's small ``source`` record; no decode), then
decodes every image that lacks anything exactly once, in a spawn pool (`kit.workers.pool_map`),
and writes what is missing from that one array: the segmentation and its cell table, the tiles cut
from the masks, the downscaled field. Finished images are skipped, so a killed pass resumes.
`prepare_image` is the same work in memory for one decoded image (`kit.predict` uses it, so a test
image is decoded once for its masks, its tiles, its field and the classification ceiling's masks).

Failures, collected in a `PrepareReport`: a missing channel file is reported and nothing is
written; a file that cannot be decoded is recorded in the mask cache (tied to that exact file, so
fixing it redoes the image), its tiles are empty (no cells), and no field is written for it.
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from kit.errors import DataError

__all__ = ["Plan", "PrepareReport", "PreparedImage", "prepare_folder", "prepare_image", "cut_cells", "prepare_run"]

_MISSING = "missing channel file"


@dataclass(frozen=True)
class Plan:
    """The parts a pass keeps: masks (a `kit.segment.cache.MaskCache`), tiles, field (see module doc)."""

    masks: object | None = None
    tile_dir: Path | None = None
    tile_size: int = 0
    mask_others: bool = True
    field_dir: Path | None = None
    field_size: int = 0

    def __post_init__(self) -> None:
        if self.tile_dir is not None and (self.masks is None or self.tile_size < 1):
            raise ValueError("tiles need a mask cache and a tile size")
        if self.field_dir is not None and self.field_size < 1:
            raise ValueError("fields need a field size")


@dataclass
class PrepareReport:
    """What a pass could not do, and the seconds spent per part (summed over workers)."""

    images: int = 0
    prepared: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)  # (ID, message): nothing written
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (ID, message): recorded, no field
    seconds: dict[str, float] = field(default_factory=dict)  # decode, segment, tiles, fields; wall

    def failures(self) -> list[tuple[str, str]]:
        return self.missing + self.unreadable

    def merge(self, other: "PrepareReport") -> None:
        """Add another pass's counts, failures and seconds (one pass per image folder)."""
        self.images += other.images
        self.prepared += other.prepared
        self.missing += other.missing
        self.unreadable += other.unreadable
        _add_seconds(self.seconds, other.seconds)

    def message(self) -> str:
        bad = self.failures()
        shown = "; ".join(f"{i}: {e}" for i, e in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        return f"{len(bad)} image(s) could not be read: {shown}{more}"

    def warn(self, note: str = "") -> None:
        """A UserWarning naming the failed images (nothing when every image was read)."""
        if self.failures():
            warnings.warn(self.message() + (f" ({note})" if note else ""), stacklevel=3)

    def raise_missing(self) -> None:
        """DataError for missing channel files (a user error: the data is incomplete)."""
        if self.missing:
            image_id, msg = self.missing[0]
            more = f" (and {len(self.missing) - 1} more image(s))" if len(self.missing) > 1 else ""
            raise DataError(f"{msg}{more}")

    def raise_failures(self, what: str) -> None:
        """DataError when any image failed: `what` says which stage needed them."""
        if self.failures():
            raise DataError(f"{what}: {self.message()}; fix or remove these images and rerun (finished ones are kept)")


def _add_seconds(total: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        total[k] = round(total.get(k, 0.0) + v, 3)


def _look(plan: Plan, images_dir: Path, image_id: str):
    """(parts to write, source signature, recorded read error, missing-file message) of one image."""
    from kit.cells import tiles_done
    from kit.fields import field_done
    from kit.images import ImageReadError, sample_source

    try:
        src = sample_source(images_dir, image_id)
    except ImageReadError as exc:
        return (), None, None, str(exc)
    parts = []
    entry, current = None, False
    if plan.masks is not None:
        entry = plan.masks.entry(image_id)
        current = entry is not None and entry.source == src.signature
        if not current:
            parts.append("masks")
    if plan.tile_dir is not None and not (current and tiles_done(plan.tile_dir, image_id, entry.mtime_ns)):
        parts.append("tiles")
    recorded = entry.error if current else None
    # A mask entry made from other files means the image changed: its field is redone as well.
    if plan.field_dir is not None and recorded is None and (
            (entry is not None and not current) or not field_done(plan.field_dir, image_id, src.newest_ns)):
        parts.append("field")
    return tuple(parts), src.signature, recorded, None


def _empty_tiles(plan: Plan, image_id: str) -> None:
    from kit.cells import write_tiles

    table = plan.masks.load(image_id)[2].iloc[:0]
    write_tiles(plan.tile_dir, image_id, np.zeros((0, 0, 4), np.uint8), np.zeros((0, 0), np.int32), table,
                plan.tile_size, plan.mask_others)


def _prepare_job(job: tuple) -> tuple[str, str | None, dict[str, float]]:
    """Worker: decode one image once and write its missing parts; returns (ID, error, seconds)."""
    from kit.cells import write_tiles
    from kit.fields import write_field
    from kit.images import ImageReadError, read_sample

    images_dir, image_id, plan, parts, source, recorded = job
    seconds: dict[str, float] = {}
    if recorded is not None:  # these exact files failed to decode before: no cells, no decode now
        _empty_tiles(plan, image_id)
        return image_id, recorded, seconds
    t = time.perf_counter()
    try:
        image = read_sample(images_dir, image_id)
    except ImageReadError as exc:
        if str(exc).startswith(_MISSING):  # removed since we looked: nothing to record
            return image_id, str(exc), seconds
        if "masks" in parts:
            empty = np.zeros((0, 0), np.int32)
            plan.masks.save(image_id, empty, empty, error=str(exc), source=source)
            if "tiles" in parts:
                _empty_tiles(plan, image_id)
        return image_id, str(exc), seconds
    seconds["decode"] = time.perf_counter() - t
    if "masks" in parts:
        t = time.perf_counter()
        _, cells, table = plan.masks.segment_and_save(image_id, image, source)
        seconds["segment"] = time.perf_counter() - t
    elif "tiles" in parts:
        _, cells, table = plan.masks.load(image_id)
    if "tiles" in parts:
        t = time.perf_counter()
        write_tiles(plan.tile_dir, image_id, image, cells, table, plan.tile_size, plan.mask_others)
        seconds["tiles"] = time.perf_counter() - t
    if "field" in parts:
        t = time.perf_counter()
        write_field(plan.field_dir, image_id, image, plan.field_size)
        seconds["fields"] = time.perf_counter() - t
    return image_id, None, seconds


def prepare_folder(images_dir: str | Path, image_ids: Sequence[str], plan: Plan, workers: int = 1,
                   progress: bool = True, desc: str = "prepare") -> PrepareReport:
    """Write every missing part of `plan` for `image_ids` (see the module docstring).

    Returns the report; the caller decides whether a failure is an error (`raise_failures`), a
    user error only for missing files (`raise_missing`), or a warning (`warn`).
    """
    from tqdm import tqdm

    from kit.atomic import remove_stale_temps
    from kit.workers import pool_map

    images_dir = Path(images_dir)
    ids = list(dict.fromkeys(str(i) for i in image_ids))
    report = PrepareReport(images=len(ids))
    if plan.masks is None and plan.tile_dir is None and plan.field_dir is None:
        return report  # nothing to keep: no image is looked at
    t0 = time.perf_counter()
    if plan.masks is not None and ids:
        plan.masks.setup()  # the backend's package and weights are checked before the first image
    jobs = []
    for image_id in ids:
        parts, source, recorded, missing = _look(plan, images_dir, image_id)
        if missing is not None:
            report.missing.append((image_id, missing))
        elif recorded is not None:
            report.unreadable.append((image_id, recorded))
            if "tiles" in parts:
                jobs.append((str(images_dir), image_id, plan, ("tiles",), source, recorded))
        elif parts:
            jobs.append((str(images_dir), image_id, plan, parts, source, None))
    for folder in (plan.tile_dir, plan.field_dir):
        if folder is not None and jobs:
            Path(folder).mkdir(parents=True, exist_ok=True)
            remove_stale_temps(folder)
    bar = tqdm(total=len(ids), initial=len(ids) - len(jobs), desc=desc, unit="img", disable=not progress,
               file=sys.stderr)
    try:
        for image_id, error, seconds in pool_map(_prepare_job, jobs, workers, ordered=False):
            _add_seconds(report.seconds, seconds)
            if error is None:
                report.prepared += 1
            elif error.startswith(_MISSING):
                report.missing.append((image_id, error))
            elif (image_id, error) not in report.unreadable:
                report.unreadable.append((image_id, error))
            bar.update(1)
    finally:
        bar.close()
    report.seconds["wall"] = round(time.perf_counter() - t0, 3)
    return report


# --------------------------------------------------------------------------------------------
# in memory (predict)


@dataclass
class PreparedImage:
    """One decoded image cut into model inputs: its field, and per mask source its cells and tiles."""

    image_id: str
    width: int
    height: int
    field: np.ndarray | None  # 4 x S x S uint8
    cells: dict[str, tuple[np.ndarray, object, np.ndarray]]  # source key -> (cell labels, table, tiles)


def cut_cells(image_id: str, image: np.ndarray, source, tile_size: int,
              policy=None) -> tuple[np.ndarray, object, np.ndarray]:
    """(cell labels, cell table, tiles) of one decoded image with the masks of `source` (`kit.masks`;
    a cached segmentation segments and stores what it lacks); `policy` (`kit.cell_policy`): only
    the cells it keeps are in the table and the tiles."""
    from kit.cell_policy import kept_cells
    from kit.cells import extract_tiles

    nuclei, cells, table = source.load(image_id, image)
    if cells.shape != image.shape[:2]:  # no usable masks for this image: no cells
        cells = np.zeros(image.shape[:2], np.int32)
        table = table.iloc[:0]
    else:
        table = kept_cells(table, policy, nuclei, cells, image)
    tiles, table = extract_tiles(image, cells, tile_size, table=table)
    return cells, table, tiles


def prepare_image(image_id: str, image: np.ndarray, sources: Sequence, tile_size: int,
                  field_size: int | None, policy=None) -> PreparedImage:
    """The cells and tiles of every mask source (`cut_cells`, with the cell `policy`) and the
    downscaled field (none when `field_size` is None) of one decoded image, all in memory."""
    from kit.fields import downscale_field

    cells_by_source = {source.key: cut_cells(image_id, image, source, tile_size, policy) for source in sources}
    field_ = downscale_field(image, field_size) if field_size else None
    return PreparedImage(image_id, int(image.shape[1]), int(image.shape[0]), field_, cells_by_source)


# --------------------------------------------------------------------------------------------
# a run's training inputs


def prepare_run(manifest, image_ids: Sequence[str], kinds: Sequence[str] = ("cell", "image"), workers: int = 1,
                progress: bool = True) -> PrepareReport:
    """The training inputs of a run for `image_ids`, in one pass: masks and tiles for the cell model
    (when the run's tile folder is the kit's own; tiles cut elsewhere are read as they are), fields
    for the image model. DataError naming the images that could not be read."""
    from kit.cells import prepare_tile_dir, tile_cache_dir

    masks = manifest.masks()
    tile_dir = Path(manifest.tile_dir)
    own = tile_dir.resolve() == tile_cache_dir(tile_dir.parent, manifest.tile_size, masks,
                                               manifest.mask_others).resolve()
    cell = "cell" in kinds and own
    if cell:
        prepare_tile_dir(tile_dir.parent, manifest.tile_size, masks, manifest.mask_others)
    plan = Plan(masks=masks if cell else None, tile_dir=tile_dir if cell else None, tile_size=manifest.tile_size,
                mask_others=manifest.mask_others,
                field_dir=Path(manifest.field_dir) if "image" in kinds else None, field_size=manifest.field_size)
    desc = "prepare " + " + ".join(p for p, on in (("masks + tiles", cell), ("fields", "image" in kinds)) if on)
    folders = manifest.image_folders()
    report = PrepareReport(images=0)
    for folder, ids in folders.by_folder(list(dict.fromkeys(map(str, image_ids)))).items():  # one pass per folder
        part = prepare_folder(folder, ids, plan, workers=workers, progress=progress,
                              desc=desc + (f" ({folder.name})" if len(folders.folders) > 1 else ""))
        report.merge(part)
    report.raise_failures("training inputs from " + ", ".join(map(str, folders.folders)))
    return report
