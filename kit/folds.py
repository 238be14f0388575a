"""Multi-label stratified, optionally grouped, cross-validation folds over image-level labels.

Every experiment must use the same folds to be comparable, so folds are built once, written to
disk, committed, and checked against the labels file they came from every time they are loaded.

Fold file, ``folds/<name>.csv`` (UTF-8, ``\\n`` line ends, rows in the order of the labels file)::

    ID,fold
    5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0,3
    ...

Sidecar, ``folds/<name>.json`` (beside it, same stem)::

    {"format": "kit-folds/1", "folds_file": "<name>.csv",
     "labels_file": "train.csv",            # file NAME only: the hashes identify the content
     "labels_sha256": "<sha256 of the labels file's bytes>",
     "labels_table_sha256": "<sha256 of the normalised (ID, Label) table, see table_sha256>",
     "n_images": 21806, "n_splits": 5, "seed": 42,
     "groups": null | {"source": "column plate" | "file groups.csv", "sha256": ..., "n_groups": ...},
     "method": "...", "versions": {...},
     "report": {... see fold_report ...}}

Report, ``folds/<name>.report.txt``: the same report as a readable table (what `folds` prints).

`load_folds(path, labels_path)` accepts a fold file when the labels file has the recorded byte
sha256, or failing that the recorded *table* sha256 (same IDs with the same label sets: this lets a
Kaggle ``train.csv`` with other line ends, quoting, row order or extra columns use the committed
folds); otherwise it raises ConfigError saying the labels changed and how to rebuild.

Method: iterative stratification (Sechidis et al. 2011, ``iterstrat.MultilabelStratifiedKFold``
with ``shuffle=True, random_state=seed``) over the N x 19 multi-hot matrix. With groups, each
group's labels are the OR of its images' labels, the groups are stratified, and every image takes
its group's fold, so a group is never split. The fold of a row depends on the row order of the
labels table and the seed only (and on the iterstrat version, recorded in the sidecar).

The seed project's "single-label images only" option is `single_label_mask`: it filters the
TRAINING rows of each fold (`split_indices`); the folds themselves and the validation rows never
change.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kit.atomic import atomic_open
from kit.errors import ConfigError, DataError, clip
from kit.labels import CLASS_NAMES, NUM_CLASSES, format_label, read_labels_csv

FORMAT = "kit-folds/1"
METHOD = (
    "iterstrat.MultilabelStratifiedKFold(n_splits, shuffle=True, random_state=seed) over the "
    "19-class multi-hot matrix (over groups with OR-ed labels when groups are given)"
)


class FoldWarning(UserWarning):
    """A fold set that is valid but weaker than asked (a class rarer than the number of folds)."""


# --------------------------------------------------------------------------------------------
# building


def _multihot(labels_df) -> np.ndarray:
    """N x 19 uint8 from the ``labels`` column (lists of ids) of a `read_labels_csv` table."""
    if "labels" in labels_df.columns:
        lists = labels_df["labels"]
    elif "Label" in labels_df.columns:
        from kit.labels import parse_label

        lists = [parse_label(t, row=r) for r, t in enumerate(labels_df["Label"])]
    else:
        raise DataError(f"labels table needs a 'labels' or 'Label' column, found {list(labels_df.columns)}")
    y = np.zeros((len(labels_df), NUM_CLASSES), dtype=np.uint8)
    for r, ids in enumerate(lists):
        y[r, list(ids)] = 1
    return y


def _group_codes(groups: Sequence[Any], n_rows: int) -> np.ndarray:
    """Per-row group labels -> int codes 0..G-1 in order of first appearance.

    None, NaN and "" mean "no group": such a row is a group of its own.
    """
    import pandas as pd

    groups = list(groups)
    if len(groups) != n_rows:
        raise ConfigError(f"groups has {len(groups)} entries but the labels table has {n_rows} rows")
    missing = np.array(
        [g is None or (isinstance(g, float) and math.isnan(g)) or (isinstance(g, str) and not g.strip()) for g in groups],
        dtype=bool,
    )
    codes = np.empty(n_rows, dtype=np.int64)
    if (~missing).any():
        present, _ = pd.factorize(pd.Series([g for g, m in zip(groups, missing) if not m], dtype=object))
        codes[~missing] = present
        n_named = int(present.max()) + 1
    else:
        n_named = 0
    codes[missing] = n_named + np.arange(int(missing.sum()))
    # Renumber in order of first appearance so a table of singletons equals the ungrouped case.
    _, first = np.unique(codes, return_index=True)
    order = np.argsort(first)
    remap = np.empty(len(order), dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[codes]


def make_folds(labels_df, n_splits: int, seed: int, groups: Sequence[Any] | None = None) -> np.ndarray:
    """Fold (0..n_splits-1) of every row of `labels_df`, multi-label stratified.

    `labels_df`: a table as returned by `kit.labels.read_labels_csv` (``ID, Label, labels``).
    `groups`: optional group label per row (images of one group share a fold; None/NaN/"" = own
    group). Warns (FoldWarning, naming the class) when a class occurs in fewer images (groups)
    than there are folds: some validation folds then cannot contain it.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise ConfigError(f"n_splits must be an integer >= 2, got {clip(n_splits)}")
    n_splits = int(n_splits)
    n = len(labels_df)
    if n == 0:
        raise DataError("the labels table is empty: no images to split into folds")
    y = _multihot(labels_df)
    if groups is not None:
        codes = _group_codes(groups, n)
        n_units = int(codes.max()) + 1
        y_units = np.zeros((n_units, NUM_CLASSES), dtype=np.uint8)
        np.maximum.at(y_units, codes, y)  # a group carries every label of its images
        unit = "groups"
    else:
        codes, n_units, y_units, unit = None, n, y, "images"
    if n_splits > n_units:
        raise ConfigError(f"n_splits={n_splits} is larger than the number of {unit} ({n_units})")
    counts = y_units.sum(axis=0)
    for c in np.flatnonzero((counts > 0) & (counts < n_splits)):
        warnings.warn(
            f"class {c} ({CLASS_NAMES[c]}) occurs in only {counts[c]} {unit if counts[c] > 1 else unit[:-1]}, fewer than "
            f"n_splits={n_splits}: {n_splits - counts[c]} fold(s) will have none of it in validation",
            FoldWarning,
            stacklevel=2,
        )
    splitter = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=int(seed))
    unit_folds = np.full(n_units, -1, dtype=np.int64)
    for k, (_, valid) in enumerate(splitter.split(np.zeros((n_units, 1)), y_units)):
        unit_folds[valid] = k
    assert (unit_folds >= 0).all(), "iterative stratification left a row without a fold"
    folds = unit_folds if codes is None else unit_folds[codes]
    empty = [k for k in range(n_splits) if not (folds == k).any()]
    if empty:
        warnings.warn(f"fold(s) {empty} received no images", FoldWarning, stacklevel=2)
    return folds


def single_label_mask(labels_df) -> np.ndarray:
    """True for images with exactly one label (the seed project trained only on those).

    Apply it to TRAINING rows only (see `split_indices`); validation and the folds never change.
    """
    return _multihot(labels_df).sum(axis=1) == 1


def split_indices(folds: Sequence[int], fold: int, train_mask: Sequence[bool] | None = None):
    """(train row indices, validation row indices) of one fold.

    `train_mask` (e.g. `single_label_mask(df)`) filters the training rows only.
    """
    folds = np.asarray(folds)
    if not (folds == fold).any():
        raise ConfigError(f"fold {fold} has no rows (folds present: {sorted(set(folds.tolist()))})")
    train = folds != fold
    if train_mask is not None:
        train_mask = np.asarray(train_mask, dtype=bool)
        if train_mask.shape != folds.shape:
            raise ValueError(f"train_mask has shape {train_mask.shape}, folds {folds.shape}")
        train &= train_mask
    return np.flatnonzero(train), np.flatnonzero(folds == fold)


# --------------------------------------------------------------------------------------------
# report


def fold_report(labels_df, folds: Sequence[int], groups: Sequence[Any] | None = None,
                sources: Sequence[str] | None = None) -> dict:
    """How well the folds keep every class's share; a JSON-ready dict.

    Keys: ``n_images``, ``n_splits``, ``images_per_fold`` [K], ``class_counts`` [19],
    ``class_fold_counts`` [19][K], ``class_max_deviation`` [19] (None for an absent class),
    ``max_deviation``, ``max_deviation_class``, ``max_deviation_100`` (classes with >= 100 images);
    with `groups`: ``n_groups`` and ``groups_split`` (groups spread over several folds: must be 0);
    with `sources` (per row, e.g. the ``source`` column of Kaggle train + external):
    ``source_fold_counts`` {source: [K]}.

    Deviation of class c in fold k: ``|n_ck - e_ck| / e_ck`` with ``e_ck = n_c * n_k / N``, the
    count fold k would hold if it had exactly its share ``n_k / N`` of every class.
    """
    folds = np.asarray(folds, dtype=np.int64)
    y = _multihot(labels_df).astype(np.int64)
    if len(folds) != len(y):
        raise ValueError(f"{len(folds)} folds for {len(y)} rows")
    k = int(folds.max()) + 1 if len(folds) else 0
    onehot = np.zeros((len(folds), k), dtype=np.int64)
    onehot[np.arange(len(folds)), folds] = 1
    per_fold = onehot.sum(axis=0)  # n_k
    per_class_fold = y.T @ onehot  # 19 x K: n_ck
    counts = y.sum(axis=0)  # n_c
    expected = np.outer(counts, per_fold) / max(len(folds), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dev = np.abs(per_class_fold - expected) / expected
    class_dev = [float(dev[c].max()) if counts[c] > 0 else None for c in range(NUM_CLASSES)]
    present = [c for c in range(NUM_CLASSES) if counts[c] > 0]
    worst = max(present, key=lambda c: class_dev[c]) if present else None
    big = [class_dev[c] for c in present if counts[c] >= 100]
    extra: dict = {}
    if groups is not None:
        extra["n_groups"] = int(_group_codes(groups, len(folds)).max()) + 1 if len(folds) else 0
        extra["groups_split"] = groups_split(folds, groups)
    if sources is not None:
        src = np.asarray(sources, dtype=str)
        extra["source_fold_counts"] = {s: np.bincount(folds[src == s], minlength=k).tolist() for s in dict.fromkeys(src)}
    return {
        "n_images": int(len(folds)),
        "n_splits": k,
        "images_per_fold": per_fold.tolist(),
        "class_counts": counts.tolist(),
        "class_fold_counts": per_class_fold.tolist(),
        "class_max_deviation": [None if d is None else round(d, 6) for d in class_dev],
        "max_deviation": None if worst is None else round(class_dev[worst], 6),
        "max_deviation_class": worst,
        "max_deviation_100": round(max(big), 6) if big else None,
        **extra,
    }


def format_report(report: dict, title: str | None = None) -> str:
    """The report as a fixed-width table (printed by `folds`, saved as ``<name>.report.txt``)."""
    k = report["n_splits"]
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{report['n_images']} images in {k} folds; images per fold: "
                 + " ".join(str(v) for v in report["images_per_fold"]))
    if report.get("n_groups") is not None:
        split = report.get("groups_split")
        lines.append(f"{report['n_groups']} groups" + (" (no group is split across folds)" if not split
                                                       else f"; {split} groups are SPLIT across folds"))
    for source, per in (report.get("source_fold_counts") or {}).items():
        lines.append(f"  {source}: {sum(per)} images; per fold: " + " ".join(str(v) for v in per))
    head = f"{'class':<45}{'images':>7}" + "".join(f"{'fold' + str(i):>7}" for i in range(k)) + f"{'max dev':>9}"
    lines += [head, "-" * len(head)]
    for c in range(NUM_CLASSES):
        d = report["class_max_deviation"][c]
        name = f"{c:>2} {CLASS_NAMES[c]}"[:44]
        lines.append(
            f"{name:<45}{report['class_counts'][c]:>7}"
            + "".join(f"{v:>7}" for v in report["class_fold_counts"][c])
            + (f"{d * 100:>8.1f}%" if d is not None else f"{'-':>9}")
        )
    lines.append("-" * len(head))
    if report["max_deviation"] is not None:
        c = report["max_deviation_class"]
        text = (f"largest relative deviation of a class's share in a fold from its overall share: {report['max_deviation'] * 100:.1f}% "
                f"(class {c} {CLASS_NAMES[c]}, {report['class_counts'][c]} images)")
        if report.get("max_deviation_100") is not None:
            text += f"; classes with >= 100 images: {report['max_deviation_100'] * 100:.1f}%"
        lines.append(text)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# hashing, saving, loading


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def table_sha256(labels_df) -> str:
    """sha256 of the labelled set: ``ID,Label\\n`` lines, labels normalised, sorted by ID.

    Identical for two files with the same images and label sets whatever their bytes, row order,
    quoting, line ends or extra columns (a Kaggle train.csv vs a derived copy).
    """
    labels = labels_df["Label"] if "labels" not in labels_df.columns else [format_label(l) for l in labels_df["labels"]]
    rows = sorted(zip(labels_df["ID"].astype(str), labels))
    h = hashlib.sha256()
    for image_id, label in rows:
        h.update(f"{image_id},{label}\n".encode())
    return h.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    """``folds/<name>.csv`` -> ``folds/<name>.json``."""
    path = Path(path)
    return path.with_name(path.stem + ".json")


def report_path(path: str | Path) -> Path:
    """``folds/<name>.csv`` -> ``folds/<name>.report.txt``."""
    path = Path(path)
    return path.with_name(path.stem + ".report.txt")


def _dumps(obj: Any, indent: int = 0) -> str:
    """JSON with nested dicts indented and lists of scalars on one line (readable diffs)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _dumps(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("iterative-stratification", "scikit-learn", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def save_folds(
    path: str | Path,
    ids: Sequence[str],
    folds: Sequence[int],
    labels_path: str | Path,
    report: dict,
    *,
    n_splits: int | None = None,
    seed: int | None = None,
    groups: dict | None = None,
    labels_df=None,
    write_report_text: bool = True,
) -> Path:
    """Write ``ID,fold`` to `path` and the sidecar JSON (and report text) beside it, atomically.

    `labels_path` is hashed (sha256 of its bytes and of its normalised table); only its file name
    is stored. `groups`: a description stored as is (source, sha256, n_groups). `labels_df`:
    the parsed labels file, to skip reading it again. Returns `path`.
    """
    path = Path(path)
    ids = [str(i) for i in ids]
    folds = np.asarray(folds, dtype=np.int64)
    if len(ids) != len(folds):
        raise ValueError(f"{len(ids)} IDs but {len(folds)} folds")
    if len(set(ids)) != len(ids):
        raise DataError("duplicated ID in the fold table")
    labels_path = Path(labels_path)
    if labels_df is None:
        labels_df = read_labels_csv(labels_path)
    meta = {
        "format": FORMAT,
        "folds_file": path.name,
        "labels_file": labels_path.name,
        "labels_sha256": file_sha256(labels_path),
        "labels_table_sha256": table_sha256(labels_df),
        "n_images": len(ids),
        "n_splits": int(n_splits if n_splits is not None else folds.max() + 1),
        "seed": seed,
        "groups": groups,
        "method": METHOD,
        "versions": _versions(),
        "report": report,
    }
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["ID", "fold"])
        writer.writerows(zip(ids, folds.tolist()))
    with atomic_open(sidecar_path(path), "w", encoding="utf-8") as f:
        f.write(_dumps(meta) + "\n")
    if write_report_text:
        title = f"folds {path.name} from {labels_path.name} (n_splits={meta['n_splits']}, seed={seed})"
        with atomic_open(report_path(path), "w", encoding="utf-8") as f:
            f.write(format_report(report, title))
    return path


def read_sidecar(path: str | Path) -> dict:
    """The sidecar JSON of a fold file; ConfigError if missing or unreadable."""
    side = sidecar_path(path)
    if not side.is_file():
        raise ConfigError(
            f"{path}: no sidecar {side.name} beside it, so the labels file it was built from cannot be "
            f"checked; rebuild it with `python -m kit folds --labels <train.csv> --out {path}`"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{side}: cannot read the fold sidecar: {exc}") from exc
    if not isinstance(meta, dict) or "labels_sha256" not in meta:
        raise ConfigError(f"{side}: not a fold sidecar (no labels_sha256)")
    return meta


def _read_fold_csv(path: Path):
    import pandas as pd

    if not path.is_file():
        raise ConfigError(f"fold file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for a malformed CSV
        raise ConfigError(f"{path}: cannot read as CSV: {exc}") from exc
    if list(df.columns[:2]) != ["ID", "fold"]:
        raise ConfigError(f"{path}: expected columns ID,fold, found {list(df.columns)}")
    if len(df) == 0:
        raise ConfigError(f"{path}: no rows")
    bad = ~df["fold"].str.fullmatch(r"\d+")
    if bad.any():
        r = int(np.flatnonzero(bad.to_numpy())[0])
        raise ConfigError(f"{path}: line {r + 2}: fold {clip(df['fold'].iloc[r])} is not a non-negative integer")
    dup = df["ID"].duplicated()
    if dup.any():
        r = int(np.flatnonzero(dup.to_numpy())[0])
        raise ConfigError(f"{path}: line {r + 2}: ID {clip(df['ID'].iloc[r])} appears twice")
    return pd.DataFrame({"ID": df["ID"], "fold": df["fold"].astype(np.int64)})


def load_folds(path: str | Path, labels_path: str | Path | None = None):
    """Read a fold file -> DataFrame ``ID, fold`` (int); the sidecar dict is in ``.attrs["meta"]``.

    With `labels_path`, refuse (ConfigError) unless the labels file is the one the folds were
    built from (byte sha256, or else the normalised table sha256) and its IDs are exactly the fold
    file's; the rows are then returned in the labels file's order. Without it, only the fold file
    is checked (and the sidecar, when present).
    """
    path = Path(path)
    df = _read_fold_csv(path)
    if labels_path is None:
        side = sidecar_path(path)
        meta = read_sidecar(path) if side.is_file() else None
        if meta is not None and meta.get("n_images") not in (None, len(df)):
            raise ConfigError(f"{path}: {len(df)} rows but its sidecar records {meta['n_images']}")
        df.attrs["meta"] = meta
        return df
    labels_path = Path(labels_path)
    meta = read_sidecar(path)
    if not labels_path.is_file():
        raise ConfigError(f"labels file not found: {labels_path} (needed to check the folds {path})")
    labels_df = read_labels_csv(labels_path)
    sha = file_sha256(labels_path)
    if sha != meta["labels_sha256"] and table_sha256(labels_df) != meta.get("labels_table_sha256"):
        rebuild = (f"python -m kit folds --labels {labels_path} --n-splits {meta.get('n_splits', 5)} "
                   f"--seed {meta.get('seed', 42)} --out {path}")
        raise ConfigError(
            f"the labels changed since the folds {path} were built: they were built from "
            f"{meta.get('labels_file')} with sha256 {meta['labels_sha256'][:12]}..., but {labels_path} has "
            f"sha256 {sha[:12]}... and different images or labels. Folds from other labels would mix "
            f"validation images into training; rebuild them: {rebuild}"
        )
    fold_ids, label_ids = set(df["ID"]), set(labels_df["ID"])
    if fold_ids != label_ids:
        extra, missing = sorted(fold_ids - label_ids), sorted(label_ids - fold_ids)
        raise ConfigError(
            f"{path}: IDs do not match {labels_path}: {len(missing)} image(s) without a fold"
            f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(extra)} fold row(s) for unknown images"
            f"{' (e.g. ' + extra[0] + ')' if extra else ''}; the fold file was edited? rebuild it"
        )
    k = meta.get("n_splits")
    if k is not None and (df["fold"] >= k).any():
        raise ConfigError(f"{path}: fold {int(df['fold'].max())} out of range for n_splits={k}")
    df = df.set_index("ID").loc[labels_df["ID"]].reset_index()
    df.attrs["meta"] = meta
    return df


# --------------------------------------------------------------------------------------------
# groups


def read_groups(labels_df, spec: str | Path, labels_path: str | Path | None = None, *,
                ignore_unknown: bool = False) -> tuple[np.ndarray, dict, list[str]]:
    """Resolve ``--groups``: a column of the labels CSV, or a CSV file with columns ``ID,group``.

    Returns (group per row of `labels_df`, None where the image has no group; a JSON description
    for the sidecar; warning messages). A file listing IDs absent from the labels is an error
    (unless `ignore_unknown`: e.g. a duplicate search that also covered test images); images the
    file does not list, and blank cells, form a group of their own (a warning says how many).
    """
    import pandas as pd

    spec_path = Path(spec)
    messages: list[str] = []
    ids = labels_df["ID"].astype(str).tolist()
    if spec_path.is_file():
        try:
            g = pd.read_csv(spec_path, dtype=str, keep_default_na=False)
        except Exception as exc:
            raise DataError(f"{spec_path}: cannot read the groups file as CSV: {exc}") from exc
        if "ID" not in g.columns or "group" not in g.columns:
            raise DataError(f"{spec_path}: a groups file needs columns ID,group (found {list(g.columns)})")
        g = g[["ID", "group"]].drop_duplicates()
        dup = g["ID"].duplicated(keep=False)
        if dup.any():
            first = g[dup].iloc[0]["ID"]
            both = g.loc[g["ID"] == first, "group"].tolist()
            raise DataError(f"{spec_path}: ID {clip(first)} is in more than one group ({', '.join(map(repr, both))})")
        known = set(ids)
        unknown = [i for i in g["ID"] if i not in known]
        if unknown:
            text = (f"{spec_path}: {len(unknown)} ID(s) are not in the labels file"
                    f"{' ' + Path(labels_path).name if labels_path else ''} (e.g. {clip(unknown[0])})")
            if not ignore_unknown:
                raise DataError(text + "; remove them (test or external images?) or pass --ignore-unknown-groups")
            messages.append(text + "; ignored")
        mapping = dict(zip(g["ID"], g["group"]))
        groups = [mapping.get(i) for i in ids]
        desc = {"source": f"file {spec_path.name}", "sha256": file_sha256(spec_path)}
        n_missing = sum(v is None for v in groups)
        if n_missing:
            messages.append(f"{n_missing} of {len(ids)} images are not in {spec_path.name}; each is a group of its own")
    else:
        if labels_path is None:
            raise ConfigError(f"--groups {spec}: no such file (and no labels CSV to look up a column)")
        raw = pd.read_csv(labels_path, dtype=str, keep_default_na=False)
        if str(spec) not in raw.columns:
            raise ConfigError(
                f"--groups {spec}: neither a file nor a column of {labels_path} (columns: {', '.join(raw.columns)})"
            )
        if raw["ID"].tolist() != ids:
            raise DataError(f"{labels_path}: rows do not match the parsed labels table")
        groups = [v if v.strip() else None for v in raw[str(spec)]]
        desc = {"source": f"column {spec}"}
        n_missing = sum(v is None for v in groups)
        if n_missing:
            messages.append(f"{n_missing} of {len(ids)} images have an empty {clip(spec)}; each is a group of its own")
    arr = np.empty(len(groups), dtype=object)
    arr[:] = groups
    desc["n_groups"] = int(_group_codes(arr, len(arr)).max()) + 1 if len(arr) else 0
    return arr, desc, messages


def combine_groups(groupings: Sequence[Sequence[Any]]) -> np.ndarray:
    """Several per-row groupings -> one: rows that share a group in ANY of them share a group.

    E.g. antibody groups of public images and near-duplicate groups across sources: a Kaggle
    image that duplicates an external one joins that external image's antibody. None/NaN/"" mean
    "no group" in a grouping. Returns int group codes 0..G-1 in order of first appearance.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    groupings = list(groupings)
    if not groupings:
        raise ValueError("combine_groups needs at least one grouping")
    n = len(groupings[0])
    rows, cols = [], []
    for g in groupings:
        codes = _group_codes(g, n)
        _, first = np.unique(codes, return_index=True)
        rows.append(np.arange(n))
        cols.append(first[codes])  # every row linked to its group's first row
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return _group_codes(labels, n)


def groups_split(folds: Sequence[int], groups: Sequence[Any]) -> int:
    """Number of groups whose images fall in more than one fold (0 for folds built with them)."""
    folds = np.asarray(folds, dtype=np.int64)
    codes = _group_codes(groups, len(folds))
    first = np.full(codes.max() + 1 if len(codes) else 0, -1, np.int64)
    first[codes[::-1]] = folds[::-1]  # the fold of each group's first row
    return int(len(np.unique(codes[folds != first[codes]])))


def groups_from_pairs(pairs: Iterable[tuple[str, str]]):
    """Duplicate pairs ``(ID_a, ID_b)`` -> DataFrame ``ID, group`` (connected components).

    Write it with ``df.to_csv("groups.csv", index=False)`` and pass ``--groups groups.csv``;
    images in no pair need not be listed (each is then a group of its own).
    """
    import pandas as pd

    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(str(a)), find(str(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    ids = sorted(parent)
    roots = [find(i) for i in ids]
    return pd.DataFrame({"ID": ids, "group": roots})


# --------------------------------------------------------------------------------------------
# command


def _source_column(labels_path: Path, labels_df) -> list[str] | None:
    """The ``source`` column of a merged labels file (Kaggle train + external), if it has one."""
    import pandas as pd

    head = pd.read_csv(labels_path, nrows=0).columns
    if "source" not in head:
        return None
    raw = pd.read_csv(labels_path, usecols=["ID", "source"], dtype=str, keep_default_na=False)
    return raw.set_index("ID").loc[labels_df["ID"], "source"].tolist()


def configure_folds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", required=True, type=Path, help="train.csv (ID,Label)")
    parser.add_argument("--n-splits", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--seed", type=int, default=42, help="random seed of the stratification (default 42)")
    parser.add_argument(
        "--groups", action="append",
        help="images that must share a fold: a column of the labels CSV, or a CSV file ID,group "
        "(unlisted images are groups of their own); give it several times to combine groupings "
        "(e.g. --groups antibody --groups dedup.csv); see README 'Groups for folds'",
    )
    parser.add_argument("--ignore-unknown-groups", action="store_true",
                        help="drop groups-file IDs absent from the labels (e.g. test images) instead of failing")
    parser.add_argument("--out", type=Path,
                        help="fold file to write (default folds/<labels-stem>_<K>fold_seed<S>.csv); "
                        "the sidecar .json and .report.txt go beside it")
    parser.add_argument("--check", type=Path, metavar="FOLDS_CSV",
                        help="do not build: check an existing fold file against --labels and print its report")
    parser.set_defaults(func=_run_folds)


def _run_folds(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    labels_df = read_labels_csv(args.labels)
    sources = _source_column(args.labels, labels_df)
    groups = desc = None
    if args.groups:
        parts = []
        for spec in args.groups:
            g, d, messages = read_groups(labels_df, spec, args.labels, ignore_unknown=args.ignore_unknown_groups)
            parts.append((g, d))
            for m in messages:
                print(f"warning: {m}", file=sys.stderr)
        groups = parts[0][0] if len(parts) == 1 else combine_groups([g for g, _ in parts])
        desc = parts[0][1] if len(parts) == 1 else {
            "source": " + ".join(d["source"] for _, d in parts), "parts": [d for _, d in parts],
            "n_groups": int(np.max(groups)) + 1}
    if args.check is not None:
        df = load_folds(args.check, args.labels)
        report = fold_report(labels_df, df["fold"].to_numpy(), groups, sources)
        print(format_report(report, f"{args.check}: matches {args.labels} (sha256 checked)"), end="")
        return 1 if report.get("groups_split") else 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FoldWarning)
        folds = make_folds(labels_df, args.n_splits, args.seed, groups=groups)
    for w in caught:
        if issubclass(w.category, FoldWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    report = fold_report(labels_df, folds, groups, sources)
    out = args.out
    if out is None:
        out = Path("folds") / f"{args.labels.stem}_{args.n_splits}fold_seed{args.seed}{'_grouped' if groups is not None else ''}.csv"
    if out.suffix != ".csv":
        raise ConfigError(f"--out {out}: the fold file must end in .csv")
    save_folds(out, labels_df["ID"], folds, args.labels, report, n_splits=args.n_splits, seed=args.seed,
               groups=desc, labels_df=labels_df)
    title = f"folds {out.name} from {args.labels.name} (n_splits={args.n_splits}, seed={args.seed})"
    print(format_report(report, title), end="")
    print(f"wrote {out}, {sidecar_path(out)} and {report_path(out)} in {time.perf_counter() - t0:.1f} s")
    return 0
