"""One training table: the Kaggle train set and external lists in one labels file.

    python -m kit external table --kaggle train.csv --external external.csv [more.csv ...]
        [--kaggle-groups FILE] [--dedup groups.csv] --out train_all.csv

Output columns ``ID,Label,source,antibody,dup_group,group``:

- ``source``: ``kaggle`` for train.csv rows, the external list's own ``source`` column otherwise
  (`kit external labels` writes it: e.g. ``hpa2019_external_HPAv18RBGY_wodpl``);
- ``antibody``: the ID prefix of a public image (``10580_1610_C1_1`` -> ``10580``); for Kaggle
  images the ``--kaggle-groups`` file (``ID,group``) where one is known, else empty;
- ``dup_group``: the image's group in a `kit dedup` groups file (``--dedup``), else empty;
- ``group``: what folds must keep together: images that share an antibody OR a duplicate group
  share a group (connected components, `kit.folds.combine_groups`), so fields of one antibody never
  straddle folds, and neither do the copies of a field. Images with neither are groups of one.

A Kaggle ID that is also in an external list keeps its Kaggle labels (a later list never overrides
an earlier one); images that `kit dedup --exclude-test` marked ``drop=1`` (they duplicate a test
image) are left out. Both are counted in the report printed and written as ``<stem>.report.txt``.
Then::

    python -m kit folds --labels train_all.csv --groups group --out folds/train_all_grouped.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from kit.atomic import atomic_open
from kit.errors import DataError
from kit.external.labels import antibody_of

KAGGLE = "kaggle"


def _read(path: Path, what: str):
    import pandas as pd

    if not Path(path).is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot read as CSV: {exc}") from exc


def merge_tables(kaggle: Path, externals: Sequence[Path], *, kaggle_groups: Path | None = None,
                 dedup: Path | None = None):
    """(merged DataFrame, report dict); see the module doc for the columns and rules."""
    import pandas as pd

    from kit.folds import combine_groups
    from kit.labels import read_labels_csv

    k = read_labels_csv(kaggle)
    parts = [pd.DataFrame({"ID": k["ID"], "Label": k["Label"], "source": KAGGLE, "antibody": ""})]
    if kaggle_groups is not None:
        g = _read(kaggle_groups, "Kaggle groups file")
        if not {"ID", "group"} <= set(g.columns):
            raise DataError(f"{kaggle_groups}: needs columns ID,group (found {list(g.columns)})")
        parts[0]["antibody"] = parts[0]["ID"].map(dict(zip(g["ID"], g["group"]))).fillna("")
    for path in externals:
        e = read_labels_csv(path)  # validates IDs and 2021 labels, names the line of an error
        raw = _read(path, "external list").set_index("ID")
        source = raw["source"].reindex(e["ID"]).fillna(Path(path).stem).to_numpy() if "source" in raw.columns \
            else np.full(len(e), Path(path).stem, dtype=object)
        if "antibody" in raw.columns:
            ab = raw["antibody"].reindex(e["ID"]).fillna("").to_numpy()
        else:
            ab = np.array([antibody_of(i) for i in e["ID"]], dtype=object)
        parts.append(pd.DataFrame({"ID": e["ID"], "Label": e["Label"], "source": source, "antibody": ab}))
    merged = pd.concat(parts, ignore_index=True)
    dup_id = merged["ID"].duplicated()
    overlap = merged[dup_id].groupby("source").size().to_dict()
    merged = merged[~dup_id].reset_index(drop=True)
    merged["dup_group"] = ""
    n_test_dups = 0
    if dedup is not None:
        d = _read(dedup, "dedup groups file")
        if not {"ID", "group"} <= set(d.columns):
            raise DataError(f"{dedup}: needs columns ID,group (a `kit dedup` groups.csv; found {list(d.columns)})")
        drop = set(d.loc[d.get("drop", pd.Series("0", index=d.index)).isin(["1", "True", "true"]), "ID"])
        n_test_dups = int(merged["ID"].isin(drop).sum())
        merged = merged[~merged["ID"].isin(drop)].reset_index(drop=True)
        train_rows = d[~d["ID"].isin(drop) & (d.get("is_test", pd.Series("0", index=d.index)) != "1")]
        merged["dup_group"] = merged["ID"].map(dict(zip(train_rows["ID"], train_rows["group"]))).fillna("")
    codes = combine_groups([merged["antibody"].replace("", None).to_numpy(dtype=object),
                            merged["dup_group"].replace("", None).to_numpy(dtype=object)])
    # a readable, stable group name: the first ID (in table order) of the group
    first = {}
    for c, i in zip(codes, merged["ID"]):
        first.setdefault(c, i)
    merged["group"] = [first[c] for c in codes]
    sizes = merged.groupby("group")["ID"].transform("size")
    report = {
        "n_images": int(len(merged)),
        "per_source": {s: int(n) for s, n in merged["source"].value_counts(sort=False).items()},
        "overlap_dropped": {s: int(n) for s, n in overlap.items()},
        "test_duplicates_dropped": n_test_dups,
        "n_antibodies": int(merged.loc[merged["antibody"] != "", "antibody"].nunique()),
        "n_dup_groups": int(merged.loc[merged["dup_group"] != "", "dup_group"].nunique()),
        "n_groups": int(len(first)),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "images_in_shared_groups": int((sizes > 1).sum()),
    }
    return merged, report


def format_report(report: dict) -> str:
    lines = [f"{report['n_images']} images: " + ", ".join(f"{s} {n}" for s, n in report["per_source"].items())]
    for s, n in report["overlap_dropped"].items():
        lines.append(f"  {n} rows of {s} left out: their ID is already in an earlier table (its labels win)")
    if report["test_duplicates_dropped"]:
        lines.append(f"  {report['test_duplicates_dropped']} images left out: they duplicate a test image (dedup drop=1)")
    lines.append(f"{report['n_groups']} groups ({report['n_antibodies']} antibodies, {report['n_dup_groups']} "
                 f"duplicate groups); {report['images_in_shared_groups']} images share a group; "
                 f"largest group {report['largest_group']} images")
    return "\n".join(lines) + "\n"


def configure_table(parser: argparse.ArgumentParser) -> None:
    """Merge the Kaggle train set and external lists into one labels table with source and groups."""
    parser.add_argument("--kaggle", required=True, type=Path, help="the Kaggle train.csv (ID,Label)")
    parser.add_argument("--external", nargs="+", required=True, type=Path,
                        help="external lists in the 2021 scheme (from `kit external labels`)")
    parser.add_argument("--kaggle-groups", type=Path, help="CSV ID,group: known antibody (or other) groups of Kaggle images")
    parser.add_argument("--dedup", type=Path, help="groups.csv of `kit dedup` (duplicate groups; drop=1 rows left out)")
    parser.add_argument("--out", required=True, type=Path, help="merged labels file to write")
    parser.set_defaults(func=_run_table)


def _run_table(args: argparse.Namespace) -> int:
    merged, report = merge_tables(args.kaggle, args.external, kaggle_groups=args.kaggle_groups, dedup=args.dedup)
    with atomic_open(args.out, "w", newline="", encoding="utf-8") as f:
        merged.to_csv(f, index=False, lineterminator="\n")
    text = format_report(report)
    report_file = args.out.with_name(args.out.stem + ".report.txt")
    with atomic_open(report_file, "w", encoding="utf-8") as f:
        f.write(text)
    print(text, end="")
    print(f"wrote {args.out} and {report_file}; folds: python -m kit folds --labels {args.out} --groups group")
    return 0
