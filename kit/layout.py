"""The dataset in the Kaggle layout, and the one home for listing and reading image IDs.

Layout (the HPA 2021 competition's, also written by `kit synth`)::

    DIR/train/<ID>_<channel>.<ext>     channel: red, green, blue, yellow; ext: png, tif, tiff, jpg, jpeg
    DIR/test/<ID>_<channel>.<ext>
    DIR/train.csv                      ID,Label              (Label: class ids joined by '|', e.g. 8|5|0)
    DIR/sample_submission.csv          ID,ImageWidth,ImageHeight,PredictionString

An ID may itself contain underscores (HPA website IDs such as ``10580_1610_C1_1``): the channel is
the text after the last underscore. Real data mixes image sizes (1728, 2048, 3072 and 4096 px
squares) and, outside Kaggle, 8- and 16-bit files; both are normal.

The ID lists every command reads come from here:

- `list_image_ids(folder)`: the IDs of a folder of channel files (any channel present), sorted;
- `read_id_list(path)`: an ID list file: a CSV with an ``ID`` column (train.csv, a folds file, a
  sample submission), or one ID per line (an optional ``ID`` header, ``#`` comments);
- `read_sample_submission(path)`: the IDs, their order and their sizes from a sample submission
  (``ID,ImageWidth,ImageHeight``); a duplicated ID or a bad size names the file and the line.

Training images may live in several folders (the Kaggle ``train/`` plus downloaded public HPA
images, `kit.external`): `ImageFolders` finds the one folder that holds each ID, and
``DatasetIndex(root, extra_train_dirs=[...])`` looks train IDs up in all of them.

Every ID read here passes `kit.ids.check_id` (an ID is a file-name stem: no path separators, no
``..``, no control characters); a bad one names the file and the line. A channel file whose ID
part is not a valid ID is not taken for a sample (`SplitFiles.bad_ids`; `check-data` reports it).

`kit.check_data` reports every problem of a dataset at once; `DatasetIndex` is strict instead.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

from kit.errors import ConfigError, DataError, clip
from kit.ids import check_id, id_problem
from kit.images import CHANNELS, EXTENSIONS, ImageInfo, ImageReadError, image_size, read_image_info, read_sample
from kit.labels import read_labels_csv

__all__ = ["SPLITS", "SplitFiles", "scan_split", "ImageFolders", "DatasetIndex", "list_image_ids", "read_id_list",
           "read_sample_submission"]

SPLITS: tuple[str, ...] = ("train", "test")


@dataclass
class SplitFiles:
    """The channel files of one split folder, grouped by ID."""

    samples: dict[str, dict[str, list[Path]]]  # ID -> channel -> paths (extension preference order)
    stray: list[Path]  # entries that are not <ID>_<channel>.<ext>
    bad_ids: list[tuple[Path, str]] = field(default_factory=list)  # channel files whose ID is not valid, why


def scan_split(folder: str | Path) -> SplitFiles:
    """List `folder` once and group its channel files by ID (an absent folder gives no files)."""
    folder = Path(folder)
    samples: dict[str, dict[str, list[Path]]] = {}
    stray: list[Path] = []
    bad_ids: list[tuple[Path, str]] = []
    if not folder.is_dir():
        return SplitFiles(samples, stray, bad_ids)
    ext_rank = {e: i for i, e in enumerate(EXTENSIONS)}
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = entry.name
        stem, dot, ext = name.rpartition(".")
        image_id, _, channel = stem.rpartition("_")
        if (
            not dot
            or "." + ext not in ext_rank
            or not image_id
            or channel not in CHANNELS
            or name.startswith(".")
            or not entry.is_file()
        ):
            stray.append(folder / name)
            continue
        problem = id_problem(image_id)
        if problem is not None:
            bad_ids.append((folder / name, problem))
            continue
        samples.setdefault(image_id, {}).setdefault(channel, []).append(folder / name)
    for channels in samples.values():
        for paths in channels.values():
            paths.sort(key=lambda p: ext_rank[p.suffix])  # the order images.channel_path tries
    return SplitFiles(samples, stray, bad_ids)


class ImageFolders:
    """The images of one split spread over several folders, e.g. ``data/train`` + ``external/images``.

    Each folder is listed once, on first use. `folder_of(id)` is the folder holding the ID's channel
    files; an ID with files in two folders is ambiguous, a DataError naming both (the same field
    twice: keep one copy, see `kit dedup`). The first folder is the primary one: an ID found nowhere
    is looked for there, so a missing file is reported under it.
    """

    def __init__(self, folders: "str | Path | Sequence[str | Path]"):
        if isinstance(folders, (str, Path)):
            folders = [folders]
        self.folders = [Path(f) for f in folders]
        if not self.folders:
            raise ConfigError("ImageFolders needs at least one folder")
        self._where: dict[str, Path] | None = None
        self._twice: dict[str, list[Path]] = {}

    def __repr__(self) -> str:
        return f"ImageFolders({[str(f) for f in self.folders]!r})"

    def _index(self) -> dict[str, Path]:
        if self._where is None:
            where: dict[str, Path] = {}
            for folder in self.folders:
                for image_id in scan_split(folder).samples:
                    if image_id in where:
                        self._twice.setdefault(image_id, [where[image_id]]).append(folder)
                    else:
                        where[image_id] = folder
            self._where = where
        return self._where

    def ids(self) -> list[str]:
        """Every ID with files in any of the folders, sorted."""
        return sorted(self._index())

    def ambiguous(self) -> dict[str, list[Path]]:
        """ID -> the folders holding its files, for every ID found in more than one folder."""
        self._index()
        return dict(self._twice)

    def folder_of(self, image_id: str) -> Path:
        """The folder holding `image_id` (the primary folder when none does); DataError if two do."""
        folder = self._index().get(image_id, self.folders[0])
        if image_id in self._twice:
            raise DataError(f"image {image_id} has files in more than one folder: "
                            f"{', '.join(map(str, self._twice[image_id]))}; keep one copy")
        return folder

    def by_folder(self, image_ids: Sequence[str]) -> dict[Path, list[str]]:
        """`image_ids` grouped by their folder (order kept within a folder); DataError for ambiguous IDs."""
        self._index()
        twice = [i for i in image_ids if i in self._twice]
        if twice:
            raise DataError(f"{len(twice)} image(s) have files in more than one of "
                            f"{', '.join(map(str, self.folders))}, e.g. {twice[0]} in "
                            f"{', '.join(map(str, self._twice[twice[0]]))}; keep one copy")
        out: dict[Path, list[str]] = {}
        for image_id in image_ids:
            out.setdefault(self.folder_of(image_id), []).append(image_id)
        return out


class DatasetIndex:
    """Index over a dataset folder in the Kaggle layout (see the module docstring).

    Listings and CSVs are read once, on first use. `labels` is strict (the first bad row raises
    a DataError): run `check_data` to see every problem at once.
    """

    def __init__(self, root: str | Path, extra_train_dirs: Sequence[str | Path] = ()):
        self.root = Path(root)
        self.extra_train_dirs = [Path(d) for d in extra_train_dirs]
        self._scans: dict[str, SplitFiles] = {}

    @classmethod
    def open(cls, root: str | Path, extra_train_dirs: Sequence[str | Path] = ()) -> "DatasetIndex":
        """Open a dataset folder; raises DataError if it is not a folder in the Kaggle layout (or an
        extra train folder does not exist)."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset folder not found: {root}")
        if not any((root / n).exists() for n in ("train", "test", "train.csv")):
            raise DataError(f"{root}: not a dataset in the Kaggle layout (no train/, test/ or train.csv)")
        for extra in extra_train_dirs:
            if not Path(extra).is_dir():
                raise DataError(f"extra train image folder not found: {extra}")
        return cls(root, extra_train_dirs)

    @cached_property
    def train_folders(self) -> ImageFolders:
        """``train/`` and the extra train folders, as one lookup."""
        return ImageFolders([self.image_dir("train"), *self.extra_train_dirs])

    def folder_of(self, image_id: str, split: str | None = None) -> Path:
        """The folder holding an image's files (train IDs may be in an extra folder)."""
        split = split or self.split_of(image_id)
        return self.train_folders.folder_of(image_id) if split == "train" else self.image_dir(split)

    @property
    def train_csv(self) -> Path:
        return self.root / "train.csv"

    @property
    def sample_submission_csv(self) -> Path:
        return self.root / "sample_submission.csv"

    def image_dir(self, split: str) -> Path:
        """The folder of `split` ('train' or 'test')."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {clip(split)}; expected one of {', '.join(SPLITS)}")
        return self.root / split

    def scan(self, split: str) -> SplitFiles:
        """The grouped channel files of a split (listed once, then cached; train: all its folders)."""
        if split not in self._scans:
            scans = [scan_split(self.image_dir(split))]
            if split == "train":
                scans += [scan_split(d) for d in self.extra_train_dirs]
            samples: dict[str, dict[str, list[Path]]] = {}
            for sc in scans:
                for image_id, channels in sc.samples.items():
                    samples.setdefault(image_id, channels)  # the first folder wins; folder_of reports a twin
            self._scans[split] = SplitFiles(samples, [p for sc in scans for p in sc.stray],
                                            [b for sc in scans for b in sc.bad_ids])
        return self._scans[split]

    def files(self, split: str) -> dict[str, dict[str, Path]]:
        """ID -> channel -> path for every ID with at least one channel file in `split`."""
        return {i: {c: p[0] for c, p in ch.items()} for i, ch in self.scan(split).samples.items()}

    @cached_property
    def labels(self):
        """train.csv as `kit.labels.read_labels_csv` returns it (columns ID, Label, labels)."""
        return read_labels_csv(self.train_csv)

    @cached_property
    def train_ids(self) -> list[str]:
        """IDs of train.csv in file order; without train.csv, the IDs found in train/ (sorted)."""
        if self.train_csv.is_file():
            return self.labels["ID"].tolist()
        return sorted(self.scan("train").samples)

    @cached_property
    def sample_submission(self) -> tuple[list[str], dict[str, tuple[int, int]]] | None:
        """sample_submission.csv as `read_sample_submission` returns it, or None when absent."""
        if not self.sample_submission_csv.is_file():
            return None
        return read_sample_submission(self.sample_submission_csv)

    @cached_property
    def test_ids(self) -> list[str]:
        """IDs of sample_submission.csv in file order; without it, the IDs found in test/ (sorted)."""
        if self.sample_submission is not None:
            return list(self.sample_submission[0])
        return sorted(self.scan("test").samples)

    def split_of(self, image_id: str) -> str:
        """'train' or 'test': the split whose folder holds files of `image_id`."""
        for split in SPLITS:
            if image_id in self.scan(split).samples:
                return split
        extra = "".join(f", {d}" for d in self.extra_train_dirs)
        raise DataError(f"{self.root}: no image files for ID {clip(image_id)} in train/{extra} or test/")

    def channel_paths(self, image_id: str, split: str | None = None) -> dict[str, Path]:
        """channel -> path of one sample; raises ImageReadError naming the first missing file."""
        split = split or self.split_of(image_id)
        found = self.scan(split).samples.get(image_id, {})
        for c in CHANNELS:
            if c not in found:
                raise ImageReadError(f"missing channel file: {self.folder_of(image_id, split) / f'{image_id}_{c}.png'}")
        return {c: found[c][0] for c in CHANNELS}

    def image_info(self, image_id: str, split: str | None = None) -> ImageInfo:
        """Header of the sample's red channel (size and depth without decoding)."""
        return read_image_info(self.channel_paths(image_id, split)["red"], check_end=False)

    def image_size(self, image_id: str, split: str | None = None) -> tuple[int, int]:
        """(width, height) of a sample, from a channel file's header (`kit.images.image_size`)."""
        return image_size(self.folder_of(image_id, split), image_id)

    def read(self, image_id: str, split: str | None = None) -> np.ndarray:
        """The sample as `kit.images.read_sample` returns it: (H, W, 4) RGBY, uint8 or uint16."""
        return read_sample(self.folder_of(image_id, split), image_id)


# --------------------------------------------------------------------------------------------
# ID lists
# --------------------------------------------------------------------------------------------
def list_image_ids(folder: str | Path) -> list[str]:
    """IDs with at least one channel file in `folder`, sorted (a missing channel fails later, by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    return sorted(scan_split(folder).samples)


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line, row)]) of a CSV file, blank lines skipped; DataError naming the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [(reader.line_num, row) for row in reader if any((v or "").strip() for v in row.values())]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as CSV: {exc}") from None
    return header, rows


def read_id_list(path: str | Path, *, fold: int | None = None) -> list[str]:
    """The IDs of an ID list file (see the module docstring), in file order.

    `fold` keeps the rows of that fold (a CSV with ``ID`` and ``fold`` columns, e.g. folds/<name>.csv).
    DataError naming the file for a missing file, no ID column, or no IDs at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ID list not found: {path}")
    try:
        first = next((ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()
                      if ln.strip() and not ln.startswith("#")), None)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if first is None:
        raise DataError(f"{path}: no IDs")
    if "," not in first:  # one ID per line
        if fold is not None:
            raise DataError(f"{path}: --fold needs a CSV with ID and fold columns (e.g. folds/<name>.csv)")
        rows = [(n, {"ID": ln}) for n, ln in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1)
                if ln.strip() and not ln.startswith("#")]
        if rows[0][1]["ID"].strip() == "ID":
            rows = rows[1:]
    else:
        header, rows = _csv_rows(path)
        if "ID" not in header:
            raise DataError(f"{path}: a CSV needs an ID column (found {header})")
        if fold is not None:
            if "fold" not in header:
                raise DataError(f"{path}: no fold column for --fold (found {header})")
            rows = [(n, r) for n, r in rows if str(r["fold"]).strip() == str(fold)]
            if not rows:
                raise DataError(f"{path}: no image in fold {fold}")
    ids = [check_id((r["ID"] or "").strip(), f"{path}: line {n}") for n, r in rows]
    if not ids:
        raise DataError(f"{path}: no IDs")
    return ids


def read_sample_submission(path: str | Path) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """IDs (file order) and ``{ID: (width, height)}`` of a sample submission.

    DataError naming the file and line for a missing file or column, an empty ID, a duplicated ID
    or a size that is not a positive integer.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sample submission not found: {path}")
    header, rows = _csv_rows(path)
    if not header:
        raise DataError(f"{path}: empty file (expected the header ID,ImageWidth,ImageHeight,PredictionString)")
    for col in ("ID", "ImageWidth", "ImageHeight"):
        if col not in header:
            raise DataError(f"{path}: missing column {col} (found {header})")
    ids: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    first: dict[str, int] = {}
    for line, row in rows:
        image_id = check_id((row["ID"] or "").strip(), f"{path}: line {line}")
        if image_id in first:
            raise DataError(f"{path}: line {line}: ID {image_id} already on line {first[image_id]}")
        first[image_id] = line
        try:
            w, h = int(row["ImageWidth"]), int(row["ImageHeight"])
        except (TypeError, ValueError):
            w = h = 0
        if w <= 0 or h <= 0:
            raise DataError(f"{path}: line {line}, ID {image_id}: ImageWidth/ImageHeight "
                            f"{clip(row['ImageWidth'])}/{clip(row['ImageHeight'])} are not positive integers")
        ids.append(image_id)
        sizes[image_id] = (w, h)
    return ids, sizes
