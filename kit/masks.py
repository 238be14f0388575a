"""Where an image's cells come from: mask sources with one interface.

A mask source has

- ``key``: a string that names it (it keys the prediction cache: other masks, other results);
- ``prepare(ids)``: what it can check or load for many images at once before they are read one by
  one (the segmentation backend and its weights, that truth files exist, a solution file parsed);
- ``load(image_id, image) -> (nuclei, cells, table)``: int32 label images (background 0, cell k
  contains nucleus k) and the per-cell table (`kit.cells.cell_table`) of one image. `image` is the
  decoded image when the caller has it (a cached segmentation segments it when its entry is missing).

Sources:

- `CachedMasks`: a run's segmentation, from the mask cache (`kit.segment.cache.MaskCache`) of the
  backend and options the run was trained with (its manifest, `kit.manifest`);
- `TruthMasks`: ``truth/<ID>_cell_mask.png`` (uint16, `kit synth` writes them, so can annotators),
  with ``<ID>_nuclei_mask.png`` when present (cells stand in for nuclei otherwise: the
  classification ceiling needs cells only);
- `SolutionMasks`: the cells of a solution file in the submission format (``test_solution.csv``):
  every distinct mask string is one true cell (`truth_from_solution`).

`truth_masks(data_dir)` picks the truth a dataset has (truth/ first, else its test solution).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from kit.errors import DataError
from kit.ids import check_id

__all__ = ["MaskSource", "CachedMasks", "TruthMasks", "SolutionMasks", "truth_masks", "truth_from_solution"]


class MaskSource(Protocol):
    key: str

    def prepare(self, ids: Sequence[str], progress: bool = True) -> None: ...

    def load(self, image_id: str, image: np.ndarray | None): ...


class CachedMasks:
    """A run's segmentation of the images in `images_dir`, kept in `cache` (a MaskCache)."""

    def __init__(self, cache, images_dir: str | Path, workers: int = 1):
        self.cache = cache
        self.images_dir = Path(images_dir)
        self.workers = workers

    @property
    def key(self) -> str:
        return "cache:" + Path(self.cache.dir).name

    def prepare(self, ids: Sequence[str], progress: bool = True) -> None:
        """Check the backend (package, weights) and open the cache folder; images are segmented
        one by one in `load`, from the decode their reader makes anyway (`kit.prepare.prepare_folder`
        segments a whole folder in a pooled pass instead)."""
        self.cache.setup()

    def load(self, image_id: str, image: np.ndarray | None):
        from kit.images import sample_source

        source = sample_source(self.images_dir, image_id).signature
        entry = self.cache.entry(image_id)
        if entry is not None and entry.source == source and entry.error is None:
            return self.cache.load(image_id)
        if image is None:
            raise DataError(f"image {image_id} has no current entry in the mask cache {self.cache.dir} "
                            "and was not given to segment")
        return self.cache.segment_and_save(image_id, image, source)


class _FileMasks:
    """A source read from one file or folder: its key is the kind and the absolute path."""

    kind = ""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.path.resolve()}"


class TruthMasks(_FileMasks):
    """True cells from ``<truth_dir>/<ID>_cell_mask.png`` (and ``_nuclei_mask.png`` when present)."""

    kind = "truth"

    def _path(self, image_id: str, name: str) -> Path:
        return self.path / f"{check_id(image_id)}_{name}_mask.png"

    def prepare(self, ids: Sequence[str], progress: bool = True) -> None:
        missing = [i for i in ids if not self._path(i, "cell").is_file()]
        if missing:
            raise DataError(f"{len(missing)} image(s) have no true cell mask, e.g. {self._path(missing[0], 'cell')}")

    def load(self, image_id: str, image: np.ndarray | None = None):
        import cv2

        from kit.cells import cell_table

        def read(path: Path) -> np.ndarray:
            m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if m is None or m.ndim != 2:
                raise DataError(f"true mask not found or unreadable: {path}")
            return m.astype(np.int32)

        cells = read(self._path(image_id, "cell"))
        nuclei_path = self._path(image_id, "nuclei")
        nuclei = read(nuclei_path) if nuclei_path.is_file() else cells
        return nuclei, cells, cell_table(nuclei, cells, image)  # intensities when the image is given


@lru_cache(maxsize=4)
def _read_solution(path: str, mtime_ns: int) -> dict:
    from kit.submission import read_submission

    return read_submission(path)


class SolutionMasks(_FileMasks):
    """True cells decoded from a solution file in the submission format (one row per image)."""

    kind = "solution"

    def _rows(self) -> dict:
        if not self.path.is_file():
            raise DataError(f"solution file not found: {self.path}")
        return _read_solution(str(self.path), self.path.stat().st_mtime_ns)

    def prepare(self, ids: Sequence[str], progress: bool = True) -> None:
        rows = self._rows()
        missing = [i for i in ids if i not in rows]
        if missing:
            raise DataError(f"{self.path}: {len(missing)} image(s) have no row, e.g. {missing[0]}")

    def load(self, image_id: str, image: np.ndarray | None = None):
        from kit.cells import cell_table

        row = self._rows().get(image_id)
        if row is None:
            raise DataError(f"{self.path}: no row for image {image_id}")
        cells, _ = truth_from_solution(row)
        return cells, cells, cell_table(cells, cells, image)


def truth_masks(data_dir: str | Path) -> TruthMasks | SolutionMasks | None:
    """The true cells of a dataset's test images: ``truth/`` when it holds cell masks, else
    ``test_solution.csv``, else None."""
    data_dir = Path(data_dir)
    truth = data_dir / "truth"
    if truth.is_dir() and next(truth.glob("*_cell_mask.png"), None) is not None:
        return TruthMasks(truth)
    if (data_dir / "test_solution.csv").is_file():
        return SolutionMasks(data_dir / "test_solution.csv")
    return None


def truth_from_solution(pred) -> tuple[np.ndarray, dict[int, list[int]]]:
    """A solution row (kit.submission.ImagePrediction) -> (true label image, {true id: classes}).

    Each distinct mask string is one true cell (ids 1.. in order of first appearance).
    """
    from kit.rle import decode_to_crop

    labels = np.zeros((pred.height, pred.width), np.int32)
    ids: dict[str, int] = {}
    classes: dict[int, list[int]] = {}
    for cls, _, text in pred.triples:
        k = ids.get(text)
        if k is None:
            k = ids[text] = len(ids) + 1
            y0, x0, crop = decode_to_crop(text, pred.height, pred.width)
            if crop.size:
                region = labels[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]]
                region[crop.astype(bool)] = k
            classes[k] = []
        classes[k].append(int(cls))
    return labels, classes
