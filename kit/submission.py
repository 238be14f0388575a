"""Submission files of the HPA 2021 single-cell competition: write, read, validate.

Format (CSV, header line, one row per test image, every test image present)::

    ID,ImageWidth,ImageHeight,PredictionString
    5b931256-bb99-11e8-b2b9-ac1f6b6435d0,2048,2048,0 0.91 eNqL... 5 0.2 eNqL... 0 0.4 eNqd...

- ``PredictionString`` is a space-separated list of triples ``class confidence mask``: ``class`` an
  integer 0..18 (`kit.labels.CLASS_NAMES`), ``confidence`` a finite float > -10 (higher ranks
  first; the host's scoring fails on scores <= -10),
  ``mask`` the cell's mask string (`kit.rle`). A cell with several classes repeats its mask, one
  triple per class. An image with no cells has an empty PredictionString.
- ``ImageWidth``/``ImageHeight`` are the image's size in pixels; every mask decodes to it.
- Ground-truth ("solution") files use the same format with confidence 1: ``class 1 mask`` per true
  cell and label.

We write confidences as the shortest decimal string that reads back as the same float32 (``0.5``,
``0.12345679``, ``1e-05``): compact, and no two float32 scores that differ collapse into a tie.

`ImagePrediction` is the in-memory form of one row. `write_submission` writes atomically (a killed
run never leaves a half file). `read_submission` raises `DataError` naming the file, CSV line and
ID of the first bad row. `validate_submission` (command ``validate-submission``) reports every
problem of a file in one pass.
"""
from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from kit.atomic import atomic_open
from kit.errors import DataError, clip
from kit.ids import check_id, id_problem
from kit.labels import NUM_CLASSES

__all__ = [
    "COLUMNS",
    "Triple",
    "ImagePrediction",
    "format_confidence",
    "format_prediction_string",
    "parse_prediction_string",
    "write_submission",
    "read_submission",
    "validate_submission",
    "configure_validate_submission",
]

COLUMNS: tuple[str, ...] = ("ID", "ImageWidth", "ImageHeight", "PredictionString")
# The host's evaluation keeps only scores > -10 and fails when it drops one (see kit.metric).
SCORE_FLOOR = -10.0
Triple = tuple[int, float, str]  # (class id, confidence, mask string)
ROW_PROBLEMS = 10  # triple problems listed per row by `validate_submission`; the rest are counted

# A row of a 3072 px image with 100+ cells and several classes each is far above csv's default
# 128 KiB field limit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class ImagePrediction:
    """One submission row: image size and ``(class_id, confidence, mask string)`` triples."""

    width: int
    height: int
    triples: list[tuple[int, float, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# prediction strings
# ----------------------------------------------------------------------------------------------

def format_confidence(value: float) -> str:
    """Shortest decimal that reads back as the same float32 (``1.0`` -> ``"1"``)."""
    v = np.float32(value)
    if not np.isfinite(v):
        raise DataError(f"confidence {clip(value)} is not finite")
    if v != 0 and (abs(v) < 1e-4 or abs(v) >= 1e7):
        return np.format_float_scientific(v, unique=True, trim="-")
    return np.format_float_positional(v, unique=True, trim="-")


def _check_triple(triple: Sequence, where: str) -> tuple[int, float, str]:
    if len(triple) != 3:
        raise DataError(f"{where}: expected (class, confidence, mask), got {len(triple)} values")
    cls, conf, mask = triple
    if isinstance(cls, (bool, np.bool_)) or not isinstance(cls, (int, np.integer)):
        raise DataError(f"{where}: class id must be an integer, got {clip(cls)}")
    if not 0 <= int(cls) < NUM_CLASSES:
        raise DataError(f"{where}: class id {cls} outside 0..{NUM_CLASSES - 1}")
    try:
        conf_f = float(conf)
    except (TypeError, ValueError):
        raise DataError(f"{where}: confidence {clip(conf)} is not a number") from None
    if not math.isfinite(conf_f):
        raise DataError(f"{where}: confidence {clip(conf)} is not finite")
    if conf_f <= SCORE_FLOOR:
        raise DataError(f"{where}: confidence {clip(conf)} <= {SCORE_FLOOR:g} breaks the host's scoring; write probabilities")
    if isinstance(mask, bytes):
        mask = mask.decode("ascii")
    if not isinstance(mask, str) or not mask or any(ch.isspace() for ch in mask):
        raise DataError(f"{where}: mask must be a non-empty base64 string without spaces")
    return int(cls), conf_f, mask


def format_prediction_string(triples: Iterable[Sequence]) -> str:
    """Triples -> ``"class confidence mask class confidence mask ..."`` (empty for none)."""
    parts = []
    for i, triple in enumerate(triples):
        cls, conf, mask = _check_triple(triple, f"triple {i}")
        parts.append(f"{cls} {format_confidence(conf)} {mask}")
    return " ".join(parts)


def _parse_triples(text: str | None, check_floor: bool = False) -> tuple[list[tuple[int, float, str]], list[str]]:
    """Parse a PredictionString, collecting every problem (``"triple i: ..."``) instead of raising.

    `check_floor` also reports confidences <= -10 (the validator's job; reading accepts them).
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return [], []
    tokens = str(text).split()
    problems: list[str] = []
    triples: list[tuple[int, float, str]] = []
    if len(tokens) % 3:
        problems.append(
            f"{len(tokens)} tokens, not a multiple of 3 (class confidence mask); "
            f"the last triple is incomplete"
        )
    for i in range(len(tokens) // 3):
        cls_s, conf_s, mask = tokens[3 * i: 3 * i + 3]
        ok = True
        try:
            cls = int(cls_s)
            if not 0 <= cls < NUM_CLASSES:
                problems.append(f"triple {i}: class id {cls} outside 0..{NUM_CLASSES - 1}")
                ok = False
        except ValueError:
            problems.append(f"triple {i}: class id {clip(cls_s)} is not an integer")
            ok = False
        try:
            conf = float(conf_s)
            if not math.isfinite(conf):
                problems.append(f"triple {i}: confidence {clip(conf_s)} is not finite")
                ok = False
            elif check_floor and conf <= SCORE_FLOOR:
                problems.append(
                    f"triple {i}: confidence {clip(conf_s, bare=True)} <= {SCORE_FLOOR:g} breaks the host's scoring "
                    f"(its NMS step drops it); submit probabilities"
                )
                ok = False
        except ValueError:
            problems.append(f"triple {i}: confidence {clip(conf_s)} is not a number")
            ok = False
        if ok:
            triples.append((cls, conf, mask))
    return triples, problems


def parse_prediction_string(text: str | None, *, image_id: str | None = None) -> list[tuple[int, float, str]]:
    """``"class confidence mask ..."`` -> triples. Empty or NaN text gives ``[]``.

    Raises DataError naming `image_id` and the triple index for a bad class id (not an integer
    in 0..18), a confidence that is not a finite number, or a token count not a multiple of 3.
    Masks are not decoded here (`kit.rle.decode_binary_mask` does that).
    """
    triples, problems = _parse_triples(text)
    if problems:
        where = f"ID {clip(image_id, bare=True)}: " if image_id is not None else ""
        raise DataError(where + problems[0])
    return triples


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

def write_submission(
    path: str | os.PathLike,
    predictions: Mapping[str, ImagePrediction],
    ids: Sequence[str] | None = None,
    sizes: Mapping[str, tuple[int, int]] | None = None,
) -> Path:
    """Write a submission CSV atomically; returns the path.

    Rows follow `ids` when given (every test ID gets a row; an image without an entry in
    `predictions` gets an empty PredictionString and its size from ``sizes[id] = (width, height)``,
    the order of the CSV columns), else the order of `predictions`. A prediction for an ID not in
    `ids` is an error (it would be silently dropped otherwise), as is a missing size.
    """
    path = Path(path)
    if ids is None:
        ids = list(predictions)
    else:
        ids = [str(i) for i in ids]
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise DataError(f"ID {i} listed twice in the IDs to write to {path}")
            seen.add(i)
        unknown = [k for k in predictions if k not in seen]
        if unknown:
            raise DataError(
                f"{path}: {len(unknown)} prediction(s) for IDs not in the test list, e.g. {unknown[0]}"
            )
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for image_id in ids:
            pred = predictions.get(image_id)
            if pred is not None:
                width, height = pred.width, pred.height
                try:
                    text = format_prediction_string(pred.triples)
                except DataError as exc:
                    raise DataError(f"{path}: ID {image_id}: {exc}") from None
            else:
                if sizes is None or image_id not in sizes:
                    raise DataError(f"{path}: ID {image_id} has no prediction and no size in `sizes`")
                width, height = sizes[image_id]
                text = ""
            width, height = int(width), int(height)
            if width <= 0 or height <= 0:
                raise DataError(f"{path}: ID {image_id}: width/height must be positive, got {width} x {height}")
            writer.writerow((image_id, width, height, text))
    return path


def _open_rows(path: Path):
    """Yield (line number, row dict) of a submission-format CSV; header problems raise DataError."""
    if not path.is_file():
        raise DataError(f"submission file not found: {path}")
    f = open(path, newline="", encoding="utf-8-sig")
    try:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if header is None:
            raise DataError(f"{path}: empty file (expected header {','.join(COLUMNS)})")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found {header})")
        extra = [c for c in header if c not in COLUMNS]
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: line {reader.line_num + 1}: cannot read as CSV: {exc}") from None
            yield reader.line_num, row, extra
    except (csv.Error, UnicodeDecodeError) as exc:  # in the header
        raise DataError(f"{path}: cannot read as CSV: {exc}") from None
    finally:
        f.close()


def _parse_size(value: str | None) -> int | None:
    try:
        v = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def read_submission(path: str | os.PathLike) -> dict[str, ImagePrediction]:
    """Read a submission (or solution) CSV into ``{ID: ImagePrediction}`` in file order.

    Raises DataError naming the file, CSV line and ID for: missing columns, a field more than the
    header, an empty, duplicated or bad ID (`kit.ids`: an ID is a file-name stem), a width/height
    that is not a positive integer, a malformed PredictionString. Masks are not decoded (use `validate_submission` for a full check).
    """
    path = Path(path)
    out: dict[str, ImagePrediction] = {}
    for line, row, _ in _open_rows(path):
        where = f"{path}: line {line}"
        image_id = check_id((row.get("ID") or "").strip(), where)
        where += f", ID {image_id}"
        if None in row:  # DictReader puts surplus fields under the key None; pandas (the host) refuses them
            raise DataError(f"{where}: {len(row[None])} field(s) more than the header")
        if image_id in out:
            raise DataError(f"{where}: duplicated ID")
        width, height = _parse_size(row.get("ImageWidth")), _parse_size(row.get("ImageHeight"))
        if width is None or height is None:
            raise DataError(
                f"{where}: ImageWidth/ImageHeight must be positive integers, "
                f"got {clip(row.get('ImageWidth'))} x {clip(row.get('ImageHeight'))}"
            )
        triples, problems = _parse_triples(row.get("PredictionString"))
        if problems:
            raise DataError(f"{where}: {problems[0]}")
        out[image_id] = ImagePrediction(width, height, triples)
    return out


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def validate_submission(
    path: str | os.PathLike,
    sample: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    *,
    image_sizes: dict[str, tuple[int, int]] | None = None,
    check_masks: bool = True,
    progress: bool = False,
) -> list[str]:
    """Every problem of a submission file, one message each (empty list: the file is valid).

    Checks the columns; IDs (valid file-name stems (`kit.ids`), unique; the same set as `sample`
    when given; a bad ID is never used as a path); width/height
    (positive integers, equal to the sample's and to the image files' in folder `images`, read from
    their headers, or to `image_sizes` ({ID: (width, height)}) for images already decoded); every
    triple (class id 0..18, finite confidence) and, with `check_masks`, that every mask decodes
    to the row's width x height. Messages name the CSV line, the ID and the triple index.
    A missing file raises DataError.
    """
    from kit.images import ImageReadError, image_size
    from kit.rle import RLEError, mask_runs

    path = Path(path)
    if not path.is_file():
        raise DataError(f"submission file not found: {path}")
    problems: list[str] = []
    sample_rows: dict[str, tuple[int | None, int | None]] | None = None
    if sample is not None:
        sample_rows = {}
        try:
            for line, row, _ in _open_rows(Path(sample)):
                sid = (row.get("ID") or "").strip()
                sample_rows[sid] = (_parse_size(row.get("ImageWidth")), _parse_size(row.get("ImageHeight")))
        except DataError as exc:
            raise DataError(f"sample submission: {exc}") from None
    image_dir = Path(images) if images is not None else None
    if image_dir is not None and not image_dir.is_dir():
        raise DataError(f"images folder not found: {image_dir}")

    seen: dict[str, int] = {}
    try:
        rows = list(_open_rows(path))
    except DataError as exc:
        return [str(exc)]
    if rows and rows[0][2]:
        problems.append(f"{path}: unexpected column(s) {', '.join(rows[0][2])} (expected {','.join(COLUMNS)})")
    iterator = rows
    if progress:
        from tqdm import tqdm

        iterator = tqdm(rows, desc="validate", unit="row", file=sys.stderr)
    for line, row, _ in iterator:
        image_id = (row.get("ID") or "").strip()
        bad_id = id_problem(image_id)
        where = f"line {line}, ID {clip(image_id, bare=not bad_id)}" if image_id else f"line {line}"
        if None in row:  # DictReader puts surplus fields under the key None
            problems.append(f"{where}: {len(row[None])} field(s) more than the header")
        if not image_id:
            problems.append(f"{where}: empty ID")
        elif bad_id:
            problems.append(f"{where}: ID {bad_id} (an ID is a file-name stem)")
        elif image_id in seen:
            problems.append(f"{where}: duplicated ID (first on line {seen[image_id]})")
        else:
            seen[image_id] = line
        width, height = _parse_size(row.get("ImageWidth")), _parse_size(row.get("ImageHeight"))
        if width is None or height is None:
            problems.append(
                f"{where}: ImageWidth/ImageHeight must be positive integers, "
                f"got {clip(row.get('ImageWidth'))} x {clip(row.get('ImageHeight'))}"
            )
        if sample_rows is not None and image_id in sample_rows:
            sw, sh = sample_rows[image_id]
            if (sw, sh) != (width, height) and None not in (sw, sh, width, height):
                problems.append(f"{where}: size {width} x {height}, the sample says {sw} x {sh}")
        if (image_dir is not None or image_sizes is not None) and image_id and not bad_id:
            size = None
            if image_sizes is not None:
                size = image_sizes.get(image_id)
            else:
                try:
                    size = image_size(image_dir, image_id)
                except ImageReadError as exc:
                    problems.append(f"{where}: {exc}" if not str(exc).startswith("missing channel file")
                                    else f"{where}: no image file {image_id}_<channel>.png in {image_dir}")
                    size = False
            if size is None:
                problems.append(f"{where}: no decoded image {image_id}")
            elif size and width is not None and height is not None and tuple(size) != (width, height):
                problems.append(f"{where}: size {width} x {height}, the image is {size[0]} x {size[1]}")
        triples, row_problems = _parse_triples(row.get("PredictionString"), check_floor=True)
        if check_masks and width is not None and height is not None:
            checked: dict[str, str | None] = {}
            for i, (_, _, mask) in enumerate(triples):
                if mask not in checked:
                    try:
                        mask_runs(mask, height, width)
                        checked[mask] = None
                    except RLEError as exc:
                        checked[mask] = str(exc)
                if checked[mask] is not None:
                    row_problems.append(f"triple {i}: mask does not decode: {checked[mask]}")
        problems.extend(f"{where}: {p}" for p in row_problems[:ROW_PROBLEMS])
        if len(row_problems) > ROW_PROBLEMS:  # a garbage line must not make a million messages
            problems.append(f"{where}: ... and {len(row_problems) - ROW_PROBLEMS:,} more problems in this row")
    if not rows:
        problems.append(f"{path}: no rows")
    if sample_rows is not None:
        missing = [i for i in sample_rows if i not in seen]
        extra = [i for i in seen if i not in sample_rows]
        for i in missing:
            problems.append(f"ID {clip(i, bare=True)}: in the sample submission but missing from {path.name}")
        for i in extra:
            problems.append(f"line {seen[i]}, ID {i}: not in the sample submission")
    return problems


def configure_validate_submission(parser) -> None:
    parser.add_argument("file", type=Path, help="submission CSV to check")
    parser.add_argument("--sample", type=Path, help="sample_submission.csv: the IDs and sizes expected")
    parser.add_argument("--images", type=Path, help="folder of test images: check each row's size against its image")
    parser.add_argument("--no-masks", action="store_true", help="skip decoding every mask (faster)")
    parser.add_argument("--max-problems", type=int, default=200, help="print at most this many problems (all are counted)")
    parser.set_defaults(func=_validate_main)


def _validate_main(args) -> int:
    problems = validate_submission(
        args.file, sample=args.sample, images=args.images, check_masks=not args.no_masks, progress=True
    )
    if not problems:
        subs = read_submission(args.file)
        n_triples = sum(len(p.triples) for p in subs.values())
        n_with = sum(1 for p in subs.values() if p.triples)
        print(f"ok: {args.file}: {len(subs)} rows, {n_with} with predictions, {n_triples} triples")
        return 0
    for p in problems[: args.max_problems]:
        print(p)
    if len(problems) > args.max_problems:
        print(f"... and {len(problems) - args.max_problems} more")
    print(f"{len(problems)} problem(s) in {args.file}", file=sys.stderr)
    return 1
