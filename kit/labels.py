"""The 19 classes of the HPA 2021 single-cell competition and their label strings.

A label string lists class ids separated by '|', e.g. ``"8|5|0"``. Order does not matter and a
repeated id (``"13|13"``, 146 times in the real train.csv) is folded. We write label strings
sorted ascending (``"0|5|8"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from kit.errors import DataError, clip
from kit.ids import check_id

CLASS_NAMES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Intermediate filaments",
    "Actin filaments",
    "Microtubules",
    "Mitotic spindle",
    "Centrosome",
    "Plasma membrane",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Vesicles and punctate cytosolic patterns",
    "Negative",
)
NUM_CLASSES = len(CLASS_NAMES)  # 19
NEGATIVE = 18


class LabelError(DataError):
    """A label string that cannot be parsed; the message names the row and image ID."""


def _where(row: int | None, image_id: str | None) -> str:
    parts = []
    if row is not None:
        parts.append(f"row {row}")
    if image_id is not None:
        parts.append(f"ID {clip(image_id, bare=True)}")
    return f" ({', '.join(parts)})" if parts else ""


def parse_label(text: str, *, row: int | None = None, image_id: str | None = None) -> list[int]:
    """Parse ``"8|5|0"`` into sorted unique class ids ``[0, 5, 8]``.

    Raises LabelError for an empty string, an empty or non-numeric token, or an id outside 0..18.
    `row` and `image_id` only serve the error message.
    """
    if text is None or (isinstance(text, float) and np.isnan(text)):
        raise LabelError(f"empty label{_where(row, image_id)}")
    text = str(text).strip()
    if not text:
        raise LabelError(f"empty label{_where(row, image_id)}")
    ids = set()
    for token in text.split("|"):
        token = token.strip()
        if not token:
            raise LabelError(f"empty class id in label {clip(text)}{_where(row, image_id)}")
        if not (token.isascii() and token.isdigit()):  # str.isdigit alone accepts '²', which int() rejects
            raise LabelError(f"non-numeric class id {clip(token)} in label {clip(text)}{_where(row, image_id)}")
        value = int(token) if len(token) <= 3 else NUM_CLASSES  # int() refuses > 4300 digits
        if not 0 <= value < NUM_CLASSES:
            raise LabelError(
                f"class id {clip(token)} outside 0..{NUM_CLASSES - 1} in label {clip(text)}{_where(row, image_id)}"
            )
        ids.add(value)
    return sorted(ids)


def format_label(ids: Iterable[int]) -> str:
    """Class ids -> label string, sorted and de-duplicated (``[8, 5, 0]`` -> ``"0|5|8"``)."""
    ids = sorted({int(i) for i in ids})
    for i in ids:
        if not 0 <= i < NUM_CLASSES:
            raise ValueError(f"class id {i} outside 0..{NUM_CLASSES - 1}")
    return "|".join(str(i) for i in ids)


def to_multihot(ids: Iterable[int]) -> np.ndarray:
    """Class ids -> float32 vector of length 19 with ones at the ids (ValueError outside 0..18)."""
    vec = np.zeros(NUM_CLASSES, dtype=np.float32)
    for i in ids:
        if not 0 <= int(i) < NUM_CLASSES:  # a negative id would silently index from the end
            raise ValueError(f"class id {i} outside 0..{NUM_CLASSES - 1}")
        vec[int(i)] = 1.0
    return vec


def from_multihot(vec: Sequence[float] | np.ndarray, threshold: float = 0.5) -> list[int]:
    """Multi-hot (or probability) vector -> sorted class ids whose value is >= threshold."""
    vec = np.asarray(vec)
    if vec.shape != (NUM_CLASSES,):
        raise ValueError(f"expected a vector of {NUM_CLASSES} values, got shape {vec.shape}")
    return [int(i) for i in np.flatnonzero(vec >= threshold)]


def label_matrix(labels: Iterable[str]) -> np.ndarray:
    """Label strings -> N x 19 uint8 multi-hot matrix (errors name the 0-based row)."""
    rows = [parse_label(text, row=r) for r, text in enumerate(labels)]
    out = np.zeros((len(rows), NUM_CLASSES), dtype=np.uint8)
    for r, ids in enumerate(rows):
        out[r, ids] = 1
    return out


def read_labels_csv(path: str | Path):
    """Read a train.csv (``ID,Label``) into a DataFrame with normalised labels.

    Returns columns ``ID`` (str), ``Label`` (sorted, de-duplicated string) and ``labels``
    (list of ints). Errors name the file, the 1-based CSV line (header = line 1) and the ID; an ID
    must be a file-name stem (`kit.ids.check_id`).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for a malformed CSV
        raise DataError(f"{path}: cannot read as CSV: {exc}") from exc
    missing = [c for c in ("ID", "Label") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found {list(df.columns)})")
    if len(df) == 0:
        raise DataError(f"{path}: no rows")
    for r, image_id in enumerate(df["ID"]):
        check_id(image_id, f"{path}: line {r + 2}")
    dup = df["ID"][df["ID"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: duplicated ID {clip(dup.iloc[0])} (line {dup.index[0] + 2})")
    parsed = []
    for r, (image_id, text) in enumerate(zip(df["ID"], df["Label"])):
        try:
            parsed.append(parse_label(text, row=r + 2, image_id=image_id))
        except LabelError as exc:
            raise LabelError(f"{path}: {exc}") from None
    out = pd.DataFrame({"ID": df["ID"].astype(str), "Label": [format_label(p) for p in parsed]})
    out["labels"] = parsed
    return out
