"""Map the labels of public HPA image lists into the 19 classes of the 2021 competition.

Two input schemes:

- ``2019``: the 28-class scheme of the 2019 Kaggle competition ("Human Protein Atlas Image
  Classification"), space- or ``|``-separated class ids, e.g. the community HPAv18 list
  ``HPAv18RBGY_wodpl.csv`` (``Id,Target``: ``10580_1610_C1_1,13 25 0 2 21``) or the 2019 train.csv.
- ``hpa-names``: HPA location names separated by ``,`` ``;`` or ``|``, e.g. the hosts'
  ``kaggle_2021.tsv`` (columns ``Image`` = the field's URL stem, ``Label`` = names, ``Cellline``,
  ``in_trainset``).

The mapping is data, not code: two tables shipped in the package,

- ``kit/data/hpa_location_names.csv`` (``name,class_2021,basis``): the hosts' table of HPA location
  names -> 2021 classes, ``all_locations`` in the hosts' public-data notebook
  (kaggle.com/lnhtrang/hpa-public-data-download-and-hpacellseg) and
  ``all_locations_merged.json`` in trangle1302/HPA_SingleCellClassification_Analysis at commit
  d2a68622612832f39de271e93148fd76012de8f6 (both list the same 27 names), plus HPA location names
  that table leaves out (an empty ``class_2021``: no 2021 class, dropped) and the HPA v18 name
  "Microtubule organizing center" (renamed "Centriolar satellite" in HPA v19).
- ``kit/data/label_map_2019_to_2021.csv`` (``class_2019,name_2019,class_2021,basis``): the 28
  class names of 2019 (``LABEL_NAMES`` in CellProfiling/HPA-competition-solutions,
  bestfitting/src/config/config.py, commit 23e0ffab2d204450fe464ef89d4788936115da4f) looked up in
  the hosts' name table. Checked against the 21,806 images that are in both the 2019 and the 2021
  Kaggle train sets (the 2021 set re-labelled them): e.g. 178 of the 179 images labelled only
  "Microtubule organizing center" in 2019 are "Centrosome" (12) in 2021, all 129 "Cytoplasmic
  bodies" images are 17. Run ``kit external labels --in 2019_train.csv --kaggle-train train.csv``
  to print that agreement.

Classes without a 2021 counterpart (2019: Microtubule ends, Cytokinetic bridge, Rods & rings) are
removed from an image's labels; an image left with no class is dropped (it is not Negative: the
2021 Negative class means "no staining", which those images are not). A name or id the tables do
not know is an error naming the row (``--drop-unknown`` drops such labels instead, counted in the
report), so a typo never silently loses data.

Output (``--out external.csv``): ``ID,Label,source,source_label,antibody`` plus the input's other
columns; ``Label`` in the 2021 scheme (``0|16``); ``antibody`` the ID prefix of HPA website IDs
(``<antibody>_<plate>_<well>_<field>``), empty for Kaggle UUIDs. Beside it: ``<stem>.report.txt``
and ``<stem>.report.json`` (images kept and dropped per source class, images per 2021 class) and
``<stem>.dropped.csv`` (``ID,source_label,reason``).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from kit.atomic import atomic_open
from kit.errors import ConfigError, DataError
from kit.labels import CLASS_NAMES, NUM_CLASSES, format_label

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
MAP_2019 = DATA_DIR / "label_map_2019_to_2021.csv"
LOCATION_NAMES = DATA_DIR / "hpa_location_names.csv"
SCHEMES = ("2019", "hpa-names")

# The 17 cell lines of the 2021 competition, as the hosts' public-data notebook filters them.
COMPETITION_CELL_LINES = (
    "A-431", "A549", "EFO-21", "HAP1", "HEK 293", "HUVEC TERT2", "HaCaT", "HeLa", "PC-3", "RH-30",
    "RPTEC TERT1", "SH-SY5Y", "SK-MEL-30", "SiHa", "U-2 OS", "U-251 MG", "hTCEpi",
)
# <antibody>_<plate>_<well>_<field>[_suffix]; plates are numbers or e.g. "si35" (siRNA plates)
HPA_ID = re.compile(r"^(?P<antibody>\d+)_(?P<rest>[A-Za-z]*\d+_[A-Za-z]+\d+_\d+(?:_\w+)?)$")


@dataclass(frozen=True)
class MapEntry:
    """One source class or name: its 2021 class (None: no counterpart) and why."""

    key: str
    name: str
    class_2021: int | None
    basis: str


def _read_table(path: Path, key: str) -> dict[str, MapEntry]:
    out: dict[str, MapEntry] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            target = row["class_2021"].strip()
            cls = int(target) if target else None
            if cls is not None and not 0 <= cls < NUM_CLASSES:
                raise DataError(f"{path}: class_2021 {cls} outside 0..{NUM_CLASSES - 1}")
            name = row.get("name_2019") or row["name"]
            k = row[key].strip()
            out[k if key != "name" else k.casefold()] = MapEntry(k, name, cls, row["basis"])
    return out


@lru_cache(maxsize=None)
def mapping(scheme: str) -> dict[str, MapEntry]:
    """The table of `scheme`: source token (a 2019 class id, or a casefolded HPA name) -> MapEntry."""
    if scheme == "2019":
        return _read_table(MAP_2019, "class_2019")
    if scheme == "hpa-names":
        return _read_table(LOCATION_NAMES, "name")
    raise ConfigError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def split_tokens(text: str, scheme: str) -> list[str]:
    """A source label string -> its tokens (2019: ids split on spaces or '|'; names on , ; |)."""
    pattern = r"[\s|]+" if scheme == "2019" else r"[,;|]"
    return [t.strip() for t in re.split(pattern, str(text)) if t.strip()]


def lookup(token: str, scheme: str) -> MapEntry | None:
    """The table entry of one source token (names match case-insensitively, ids without zeros)."""
    key = token.casefold() if scheme == "hpa-names" else (str(int(token)) if token.isdigit() else token)
    return mapping(scheme).get(key)


def map_tokens(tokens: Sequence[str], scheme: str) -> tuple[list[int], list[str], list[str]]:
    """Source tokens -> (sorted unique 2021 ids, tokens without a 2021 class, unknown tokens)."""
    ids: set[int] = set()
    dropped: list[str] = []
    unknown: list[str] = []
    for tok in tokens:
        entry = lookup(tok, scheme)
        if entry is None:
            unknown.append(tok)
        elif entry.class_2021 is None:
            dropped.append(tok)
        else:
            ids.add(entry.class_2021)
    return sorted(ids), dropped, unknown


def antibody_of(image_id: str) -> str:
    """The antibody of an HPA website ID (``10580_1610_C1_1`` -> ``10580``); '' for other IDs."""
    m = HPA_ID.match(str(image_id))
    return m.group("antibody") if m else ""


# ----------------------------------------------------------------------------------------- input


def read_source_list(path: str | Path, scheme: str):
    """Read a public list into a DataFrame with ``ID``, ``source_label`` and its other columns.

    ID column: ``ID``/``Id``, or an ``Image`` URL stem (``https://.../10580/1610_C1_1`` ->
    ``10580_1610_C1_1``, as the hosts' notebook names files). Label column: ``Label``/``Target``.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"label list not found: {path}")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for a malformed file
        raise DataError(f"{path}: cannot read as {'TSV' if sep == chr(9) else 'CSV'}: {exc}") from exc
    id_col = next((c for c in ("ID", "Id", "id") if c in df.columns), None)
    if id_col is None and "Image" in df.columns:
        df.insert(0, "ID", ["_".join(str(u).rstrip("/").split("/")[-2:]) for u in df["Image"]])
        id_col = "ID"
    label_col = next((c for c in ("Label", "Target", "label", "target") if c in df.columns), None)
    if id_col is None or label_col is None:
        raise DataError(f"{path}: needs an ID (ID, Id or Image) and a label (Label or Target) column; "
                        f"found {list(df.columns)}")
    df = df.rename(columns={id_col: "ID", label_col: "source_label"})
    if len(df) == 0:
        raise DataError(f"{path}: no rows")
    blank = df.index[df["ID"].str.strip() == ""]
    if len(blank):
        raise DataError(f"{path}: line {blank[0] + 2}: empty ID")
    dup = df["ID"].duplicated()
    if dup.any():
        r = int(dup.to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: line {r + 2}: ID {df['ID'].iloc[r]!r} appears twice")
    return df


# --------------------------------------------------------------------------------------- mapping


def map_table(df, scheme: str, *, source: str, drop_unknown: bool = False, exclude_ids=(),
              cell_lines: Sequence[str] | None = None, path: str | Path = "input"):
    """Map a `read_source_list` table -> (kept DataFrame, dropped DataFrame, report dict).

    `exclude_ids`: IDs to leave out (e.g. the Kaggle train set, whose own labels win);
    `cell_lines`: keep only these values of a ``Cellline`` column. Rows with ``in_trainset``
    true are left out, as the hosts' notebook does.
    """
    import pandas as pd

    table = mapping(scheme)
    exclude = set(map(str, exclude_ids))
    keep_rows, labels, drop_rows = [], [], []
    per_source: dict[str, dict[str, int]] = {}
    n_unknown_rows = 0
    for r, (image_id, text) in enumerate(zip(df["ID"], df["source_label"])):
        tokens = split_tokens(text, scheme)
        if not tokens:
            raise DataError(f"{path}: line {r + 2}: ID {image_id}: empty label")
        if scheme == "2019":
            bad = [t for t in tokens if not t.isdigit()]
            if bad:
                raise DataError(f"{path}: line {r + 2}: ID {image_id}: {bad[0]!r} is not a 2019 class id")
        ids, no_class, unknown = map_tokens(tokens, scheme)
        if unknown and not drop_unknown:
            known = ", ".join(sorted({e.name for e in table.values()})) if scheme == "hpa-names" else "0..27"
            raise DataError(f"{path}: line {r + 2}: ID {image_id}: unknown {'location name' if scheme == 'hpa-names' else 'class id'} "
                            f"{unknown[0]!r} (known: {known}); pass --drop-unknown to drop such labels")
        n_unknown_rows += bool(unknown)
        if image_id in exclude:
            reason = "in the Kaggle train set"
        elif "in_trainset" in df.columns and str(df["in_trainset"].iloc[r]).strip().lower() in ("true", "1", "yes"):
            reason = "in_trainset"
        elif cell_lines is not None and "Cellline" in df.columns and df["Cellline"].iloc[r] not in cell_lines:
            reason = "cell line not in the competition"
        elif not ids:
            reason = "no 2021 class left"
        else:
            reason = ""
        for tok in dict.fromkeys(tokens):
            entry = lookup(tok, scheme)
            key = entry.key if entry else f"unknown:{tok}"
            stats = per_source.setdefault(key, {"images": 0, "kept": 0, "dropped": 0, "excluded": 0})
            stats["images"] += 1
            if not reason:
                stats["kept"] += 1
            elif reason == "no 2021 class left":
                stats["dropped"] += 1
            else:
                stats["excluded"] += 1
        if reason:
            drop_rows.append((image_id, text, reason))
        else:
            keep_rows.append(r)
            labels.append(format_label(ids))
    kept = df.iloc[keep_rows].copy()
    extra = [c for c in kept.columns if c not in ("ID", "source_label")]
    kept = pd.DataFrame({
        "ID": kept["ID"].to_numpy(), "Label": labels, "source": source,
        "source_label": kept["source_label"].to_numpy(),
        "antibody": [antibody_of(i) for i in kept["ID"]],
        **{c: kept[c].to_numpy() for c in extra},
    })
    dropped = pd.DataFrame(drop_rows, columns=["ID", "source_label", "reason"])
    report = _report(df, kept, dropped, per_source, scheme, source, n_unknown_rows)
    return kept, dropped, report


def _report(df, kept, dropped, per_source, scheme, source, n_unknown_rows) -> dict:
    table = mapping(scheme)
    rows = []
    order = list(table) + sorted(k for k in per_source if k.startswith("unknown:"))
    for key in order:
        entry = table.get(key)
        stats = per_source.get(entry.key if entry else key)
        if stats is None and entry is not None and scheme == "hpa-names":
            continue  # list only the names that occur
        stats = stats or {"images": 0, "kept": 0, "dropped": 0, "excluded": 0}
        rows.append({
            "source_class": entry.key if entry else key,
            "name": entry.name if entry else key.split(":", 1)[1],
            "class_2021": entry.class_2021 if entry else None,
            **stats,
        })
    per_2021 = [0] * NUM_CLASSES
    for text in kept["Label"]:
        for t in text.split("|"):
            per_2021[int(t)] += 1
    reasons = dropped["reason"].value_counts().to_dict() if len(dropped) else {}
    return {
        "source": source, "scheme": scheme, "n_rows": int(len(df)), "n_kept": int(len(kept)),
        "n_dropped": int(len(dropped)), "dropped_by_reason": {k: int(v) for k, v in reasons.items()},
        "n_rows_with_unknown_labels": int(n_unknown_rows),
        "n_antibodies": int(kept.loc[kept["antibody"] != "", "antibody"].nunique()),
        "n_without_antibody": int((kept["antibody"] == "").sum()),
        "per_source_class": rows, "images_per_2021_class": per_2021,
    }


def agreement(kept, kaggle_df) -> dict:
    """How often the mapped labels equal a Kaggle 2021 table's labels on the shared IDs.

    Returns ``n_shared``, ``exact`` (same label set), and per 2021 class ``tp, fp, fn`` of the
    mapped labels against the Kaggle ones.
    """
    theirs = dict(zip(kaggle_df["ID"].astype(str), kaggle_df["Label"]))
    shared = [(a, theirs[i]) for i, a in zip(kept["ID"], kept["Label"]) if i in theirs]
    exact = 0
    per = [[0, 0, 0] for _ in range(NUM_CLASSES)]
    for mine, their in shared:
        a = {int(t) for t in mine.split("|")}
        b = {int(t) for t in str(their).split("|")}
        exact += a == b
        for c in a & b:
            per[c][0] += 1
        for c in a - b:
            per[c][1] += 1
        for c in b - a:
            per[c][2] += 1
    return {"n_shared": len(shared), "exact": exact,
            "per_class": [{"class": c, "tp": p[0], "fp": p[1], "fn": p[2]} for c, p in enumerate(per)]}


def format_report(report: dict) -> str:
    """The mapping report as a fixed-width table."""
    lines = [f"{report['source']} ({report['scheme']} scheme): {report['n_rows']} images, "
             f"{report['n_kept']} kept, {report['n_dropped']} dropped"
             + (" (" + ", ".join(f"{v} {k}" for k, v in report["dropped_by_reason"].items()) + ")"
                if report["dropped_by_reason"] else "")]
    if report.get("n_rows_with_unknown_labels"):
        lines.append(f"{report['n_rows_with_unknown_labels']} images had unknown labels (dropped from their label sets)")
    lines.append(f"{report['n_antibodies']} antibodies among the kept images"
                 + (f"; {report['n_without_antibody']} kept images have no antibody in their ID"
                    if report.get("n_without_antibody") else ""))
    lines.append("")
    lines.append("images: with the class; kept: in the output (a class without a 2021 counterpart is removed "
                 "from its labels); dropped: no 2021 class left; excluded: in the Kaggle train set, in_trainset "
                 "or another cell line")
    lines.append(f"{'source class':<40} {'-> 2021 class':<44} {'images':>7} {'kept':>7} {'dropped':>7} {'excluded':>8}")
    for row in report["per_source_class"]:
        src = f"{row['source_class']} {row['name']}" if row["source_class"] != row["name"] else row["name"]
        tgt = f"{row['class_2021']} {CLASS_NAMES[row['class_2021']]}" if row["class_2021"] is not None else "(none: removed)"
        lines.append(f"{src[:40]:<40} {tgt[:44]:<44} {row['images']:>7} {row['kept']:>7} {row['dropped']:>7} {row['excluded']:>8}")
    lines.append("")
    lines.append("images per 2021 class in the output:")
    for c, n in enumerate(report["images_per_2021_class"]):
        lines.append(f"  {c:>2} {CLASS_NAMES[c]:<42} {n:>7}")
    agree = report.get("agreement")
    if agree:
        lines.append("")
        share = agree["exact"] / agree["n_shared"] if agree["n_shared"] else 0.0
        lines.append(f"against {agree['against']}: {agree['n_shared']} shared IDs, mapped label set equal to theirs "
                     f"for {agree['exact']} ({share:.1%}); per class (tp/fp/fn): "
                     + " ".join(f"{p['class']}:{p['tp']}/{p['fp']}/{p['fn']}" for p in agree["per_class"]))
    return "\n".join(lines) + "\n"


def side_paths(out: Path) -> dict[str, Path]:
    """The files written beside `out`: report text and JSON, dropped rows."""
    stem = out.with_suffix("")
    return {"report": Path(f"{stem}.report.txt"), "json": Path(f"{stem}.report.json"),
            "dropped": Path(f"{stem}.dropped.csv")}


# --------------------------------------------------------------------------------------- command


def configure_labels(parser: argparse.ArgumentParser) -> None:
    """Map a public label list (2019 scheme or HPA names) into the 2021 classes."""
    parser.add_argument("--in", dest="inp", required=True, type=Path, help="the public list (CSV or TSV)")
    parser.add_argument("--scheme", required=True, choices=SCHEMES, help="2019 (28 class ids) or hpa-names")
    parser.add_argument("--out", required=True, type=Path, help="external.csv to write (ID,Label,...)")
    parser.add_argument("--source", help="value of the source column (default: the input's file stem)")
    parser.add_argument("--kaggle-train", type=Path,
                        help="a Kaggle 2021 train.csv: its IDs are left out (their own labels win) and the "
                        "agreement of the mapped labels with theirs is reported")
    parser.add_argument("--competition-cell-lines", action="store_true",
                        help="keep only the 17 cell lines of the 2021 competition (needs a Cellline column)")
    parser.add_argument("--drop-unknown", action="store_true",
                        help="drop labels the tables do not know instead of failing")
    parser.set_defaults(func=_run_labels)


def _run_labels(args: argparse.Namespace) -> int:
    from kit.labels import read_labels_csv

    if args.out.suffix != ".csv":
        raise ConfigError(f"--out {args.out}: must end in .csv")
    df = read_source_list(args.inp, args.scheme)
    kaggle = read_labels_csv(args.kaggle_train) if args.kaggle_train else None
    if args.competition_cell_lines and "Cellline" not in df.columns:
        raise ConfigError(f"--competition-cell-lines: {args.inp} has no Cellline column")
    source = args.source or args.inp.stem
    kept, dropped, report = map_table(
        df, args.scheme, source=source, drop_unknown=args.drop_unknown,
        exclude_ids=kaggle["ID"] if kaggle is not None else (),
        cell_lines=COMPETITION_CELL_LINES if args.competition_cell_lines else None, path=args.inp)
    if kaggle is not None:
        # Agreement is measured before leaving those IDs out: map them once more, unfiltered.
        shared = df[df["ID"].isin(set(kaggle["ID"]))]
        if len(shared):
            mapped, _, _ = map_table(shared, args.scheme, source=source, drop_unknown=True, path=args.inp)
            report["agreement"] = {"against": args.kaggle_train.name, **agreement(mapped, kaggle)}
    paths = side_paths(args.out)
    with atomic_open(args.out, "w", newline="", encoding="utf-8") as f:
        kept.to_csv(f, index=False, lineterminator="\n")
    with atomic_open(paths["dropped"], "w", newline="", encoding="utf-8") as f:
        dropped.to_csv(f, index=False, lineterminator="\n")
    text = format_report(report)
    with atomic_open(paths["report"], "w", encoding="utf-8") as f:
        f.write(text)
    with atomic_open(paths["json"], "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=1) + "\n")
    print(text, end="")
    print(f"wrote {args.out} ({len(kept)} images), {paths['report']}, {paths['json']}, {paths['dropped']}")
    return 0
