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

from kit.errors import ConfigError, DataError, clip
from kit.ids import check_id, id_problem
from kit.images import CHANNELS, EXTENSIONS, ImageInfo, ImageReadError, image_size, read_image_info, read_sample
from kit.labels import read_labels_csv

__all__ = ["SPLITS", "SplitFiles", "scan_split", "DatasetIndex", "list_image_ids", "read_id_list",
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


class DatasetIndex:
    """Index over a dataset folder in the Kaggle layout (see the module docstring).

    Listings and CSVs are read once, on first use. `labels` is strict (the first bad row raises
    a DataError): run `check_data` to see every problem at once.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._scans: dict[str, SplitFiles] = {}

    @classmethod
    def open(cls, root: str | Path) -> "DatasetIndex":
        """Open a dataset folder; raises DataError if it is not a folder in the Kaggle layout."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset folder not found: {root}")
        if not any((root / n).exists() for n in ("train", "test", "train.csv")):
            raise DataError(f"{root}: not a dataset in the Kaggle layout (no train/, test/ or train.csv)")
        return cls(root)

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
        """The grouped channel files of a split (listed once, then cached)."""
        if split not in self._scans:
            self._scans[split] = scan_split(self.image_dir(split))
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
        raise DataError(f"{self.root}: no image files for ID {clip(image_id)} in train/ or test/")

    def channel_paths(self, image_id: str, split: str | None = None) -> dict[str, Path]:
        """channel -> path of one sample; raises ImageReadError naming the first missing file."""
        split = split or self.split_of(image_id)
        found = self.scan(split).samples.get(image_id, {})
        for c in CHANNELS:
            if c not in found:
                raise ImageReadError(f"missing channel file: {self.image_dir(split) / f'{image_id}_{c}.png'}")
        return {c: found[c][0] for c in CHANNELS}

    def image_info(self, image_id: str, split: str | None = None) -> ImageInfo:
        """Header of the sample's red channel (size and depth without decoding)."""
        return read_image_info(self.channel_paths(image_id, split)["red"], check_end=False)

    def image_size(self, image_id: str, split: str | None = None) -> tuple[int, int]:
        """(width, height) of a sample, from a channel file's header (`kit.images.image_size`)."""
        return image_size(self.image_dir(split or self.split_of(image_id)), image_id)

    def read(self, image_id: str, split: str | None = None) -> np.ndarray:
        """The sample as `kit.images.read_sample` returns it: (H, W, 4) RGBY, uint8 or uint16."""
        split = split or self.split_of(image_id)
        return read_sample(self.image_dir(split), image_id)


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
