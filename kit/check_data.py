"""`check-data`: every problem of a dataset in the Kaggle layout (`kit.layout`), in one pass.

`check_data` returns a list of `Problem` records (severity, kind, message, and where known the
file, the 1-based CSV line and the ID). By default it reads only file headers and ends
(`kit.images.read_image_info`: PNG IHDR and IEND, TIFF IFD and strip extents, JPEG SOF and EOI),
which finds missing, empty, truncated and non-image files and shape mismatches in seconds for the
full 87k-file train set; ``decode=True`` decodes every file as well, in a worker pool.

Severities: ``error`` (training or prediction would fail or be wrong; `check-data` exits 1),
``warning`` (ignored files, ambiguity), ``info`` (counts: images, sizes, bit depths).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from kit.errors import ConfigError, DataError, clip
from kit.ids import id_problem
from kit.images import CHANNELS, ImageReadError, read_channel, read_image_info
from kit.labels import LabelError, parse_label
from kit.layout import SPLITS, DatasetIndex
from kit.workers import pool_map

# kind -> (severity, heading used in the grouped summary). The order is the summary's order.
KINDS: dict[str, tuple[str, str]] = {
    "missing_path": ("error", "required files or folders missing"),
    "bad_csv": ("error", "CSV files that cannot be read, or bad rows/fields in them"),
    "bad_label": ("error", "bad Label values in train.csv"),
    "duplicate_id": ("error", "IDs listed more than once"),
    "bad_id": ("error", "IDs that cannot be file names (empty, spaces, path separators, '..', control characters)"),

    "missing_channel": ("error", "channel files missing"),
    "unreadable_image": ("error", "empty, truncated or unreadable image files"),
    "shape_mismatch": ("error", "samples whose channels differ in shape"),
    "label_without_images": ("error", "train.csv IDs without images in train/"),
    "image_in_two_folders": ("error", "train IDs with files in more than one train folder (--extra-images)"),
    "submission_without_images": ("error", "sample_submission.csv IDs without images in test/"),
    "size_mismatch": ("error", "sample_submission.csv sizes that differ from the images"),
    "unlabeled_image": ("warning", "images in train/ not listed in train.csv (ignored)"),
    "test_image_not_in_submission": ("warning", "images in test/ not listed in sample_submission.csv"),
    "train_test_overlap": ("warning", "IDs present in both train and test"),
    "duplicate_channel_file": ("warning", "one channel stored in more than one format"),
    "mixed_depth_in_sample": ("warning", "samples mixing 8- and 16-bit channels (read as 16-bit)"),
    "no_images": ("warning", "image folders without any image"),
    "stray_file": ("warning", "files that are not <ID>_<channel>.<ext> channel images (ignored)"),
    "no_sample_submission": ("warning", "test/ without sample_submission.csv"),
    "counts": ("info", "samples"),
    "image_size": ("info", "image sizes"),
    "bit_depth": ("info", "bit depths"),
}
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")


@dataclass(frozen=True)
class Problem:
    """One finding of `check_data`. `row` is the 1-based line in the CSV file (header = line 1);
    `image_id` of a bad ID is quoted and cut to a readable length, as in the message."""

    severity: str
    kind: str
    message: str
    path: str | None = None
    row: int | None = None
    image_id: str | None = None


def _problem(kind: str, message: str, **where) -> Problem:
    return Problem(KINDS[kind][0], kind, message, **where)


def _read_csv(path: Path, required: tuple[str, ...], problems: list[Problem],
              allow_empty: bool = False) -> list[tuple[int, dict]] | None:
    """[(line, row dict)] of the data rows, or None when the file or its header is unusable.

    Problems go to `problems`. Names are not stripped, as `kit.labels.read_labels_csv` does not
    strip them either: ``ID, Label`` lacks a ``Label`` column there and here alike.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                problems.append(_problem(
                    "bad_csv", f"{path}: empty file (expected header {','.join(required)})", path=str(path)
                ))
                return None
            missing = [c for c in required if c not in header]
            if missing:
                problems.append(_problem(
                    "bad_csv", f"{path}: missing column(s) {', '.join(missing)} (found {clip(','.join(header))})",
                    path=str(path), row=1
                ))
                return None
            rows = []
            for fields in reader:
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # blank line
                if len(fields) != len(header):
                    problems.append(_problem(
                        "bad_csv", f"{path}: line {reader.line_num}: {len(fields)} fields, header has {len(header)}",
                        path=str(path), row=reader.line_num,
                    ))
                    continue
                rows.append((reader.line_num, dict(zip(header, fields))))
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        problems.append(_problem("bad_csv", f"{path}: cannot read as CSV: {exc}", path=str(path)))
        return None
    if not rows and not allow_empty:
        problems.append(_problem("bad_csv", f"{path}: no rows below the header", path=str(path)))
    return rows


def _check_ids(path: Path, rows: list[tuple[int, str]], problems: list[Problem]) -> set[str]:
    """Report bad (`kit.ids.id_problem`) and duplicated IDs of a CSV; returns the bad ones."""
    first: dict[str, int] = {}
    bad: set[str] = set()
    for line, image_id in rows:
        problem = id_problem(image_id)
        if problem == "is empty":
            problems.append(_problem("bad_id", f"{path}: line {line}: empty ID", path=str(path), row=line))
        elif problem is not None:
            problems.append(_problem(
                "bad_id", f"{path}: line {line}: ID {clip(image_id)} {problem} (an ID is a file-name stem)",
                path=str(path), row=line, image_id=clip(image_id),
            ))
        if problem is not None:
            bad.add(image_id)
            continue
        if image_id in first:
            problems.append(_problem(
                "duplicate_id", f"{path}: line {line}: ID {image_id} already on line {first[image_id]}",
                path=str(path), row=line, image_id=image_id,
            ))
        else:
            first[image_id] = line
    return bad


def _check_sample(job: tuple[str, str, str, dict[str, list[str]], bool]) -> tuple[list[Problem], tuple | None]:
    """Check one sample's channel files. Returns its problems and (width, height, depth) or None."""
    split, folder, image_id, channels, decode = job
    problems: list[Problem] = []
    shapes: dict[str, tuple[int, int, int]] = {}
    for channel in CHANNELS:
        paths = channels.get(channel)
        if not paths:
            path = os.path.join(folder, f"{image_id}_{channel}.png")
            problems.append(_problem(
                "missing_channel", f"{split}/{image_id}_{channel}.png missing (ID {image_id})", path=path, image_id=image_id
            ))
            continue
        if len(paths) > 1:
            problems.append(_problem(
                "duplicate_channel_file",
                f"{split}/{image_id}_{channel}: {len(paths)} files ({', '.join(Path(p).name for p in paths)}); "
                f"{Path(paths[0]).name} is used",
                path=paths[0], image_id=image_id,
            ))
        path = paths[0]
        try:
            info = read_image_info(path)
            if decode:
                img = read_channel(path)
                shapes[channel] = (img.shape[1], img.shape[0], 16 if img.dtype == np.uint16 else 8)
            else:
                shapes[channel] = (info.width, info.height, info.bit_depth)
        except ImageReadError as exc:
            problems.append(_problem("unreadable_image", str(exc), path=path, image_id=image_id))
    if not shapes:
        return problems, None
    sizes = {c: s[:2] for c, s in shapes.items()}
    if len(set(sizes.values())) > 1:
        desc = ", ".join(f"{c} {w}x{h}" for c, (w, h) in sizes.items())
        problems.append(_problem("shape_mismatch", f"{split}/{image_id}: channels differ: {desc}", image_id=image_id))
    depths = {s[2] for s in shapes.values()}
    if len(depths) > 1:
        desc = ", ".join(f"{c} {s[2]}-bit" for c, s in shapes.items())
        problems.append(_problem("mixed_depth_in_sample", f"{split}/{image_id}: {desc}", image_id=image_id))
    first = next(iter(shapes.values()))
    return problems, (first[0], first[1], max(depths))


def _run_sample_checks(jobs: list, decode: bool, workers: int, progress: bool):
    from tqdm import tqdm

    desc = "decoding images" if decode else "checking image headers"
    bar = dict(total=len(jobs), desc=desc, unit="sample", disable=not progress, file=sys.stderr)
    workers = workers if decode else 1  # header checks are cheaper than starting processes
    chunk = max(1, min(16, len(jobs) // (max(workers, 1) * 8)))
    yield from tqdm(pool_map(_check_sample, jobs, workers, chunksize=chunk), **bar)


def check_data(
    root: str | Path, *, decode: bool = False, workers: int | None = None, progress: bool = False,
    extra_train_dirs: Sequence[str | Path] = (), labels: str | Path | None = None,
) -> list[Problem]:
    """Check a dataset in the Kaggle layout and return every problem found, in one pass.

    Raises DataError only when `root` (or an extra train folder) is not a folder. With `decode`,
    every channel file is fully decoded in `workers` spawn processes (default: CPU count, at most
    8) besides the header checks. `extra_train_dirs`: more folders of train images (external data),
    checked as train images; `labels`: the labels table to check instead of ``train.csv`` (e.g. the
    merged table of `kit external table`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    for extra in extra_train_dirs:
        if not Path(extra).is_dir():
            raise DataError(f"extra train image folder not found: {extra}")
    index = DatasetIndex(root, extra_train_dirs)
    problems: list[Problem] = []
    train_dir, test_dir = root / "train", root / "test"
    train_csv, sub_csv = (Path(labels) if labels else index.train_csv), index.sample_submission_csv
    has_train, has_test = train_dir.is_dir(), test_dir.is_dir()

    # Structure.
    if not has_train and not has_test:
        problems.append(_problem("missing_path", f"{root}: neither train/ nor test/ exists", path=str(root)))
    if has_train and not train_csv.is_file():
        problems.append(_problem("missing_path", f"{train_csv} missing (train/ exists)", path=str(train_csv)))
    if train_csv.is_file() and not has_train:
        problems.append(_problem("missing_path", f"{train_dir}/ missing (train.csv exists)", path=str(train_dir)))
    if sub_csv.is_file() and not has_test:
        problems.append(_problem("missing_path", f"{test_dir}/ missing (sample_submission.csv exists)", path=str(test_dir)))
    if has_test and not sub_csv.is_file():
        problems.append(_problem(
            "no_sample_submission", f"{sub_csv} missing; test IDs are taken from the files in test/", path=str(sub_csv)
        ))

    # train.csv: every row checked, nothing stops at the first problem.
    train_label_ids: list[str] | None = None
    if train_csv.is_file():
        rows = _read_csv(train_csv, ("ID", "Label"), problems)
        bad = _check_ids(train_csv, [(line, r["ID"]) for line, r in rows or []], problems)
        train_label_ids = None if rows is None else [r["ID"] for _, r in rows if r["ID"] not in bad]
        for line, r in rows or []:
            image_id = r["ID"]
            try:
                parse_label(r["Label"], row=line, image_id=image_id or None)
            except LabelError as exc:
                problems.append(_problem("bad_label", f"{train_csv}: {exc}", path=str(train_csv), row=line,
                                         image_id=clip(image_id) if image_id in bad else image_id))

    # sample_submission.csv.
    sub_sizes: dict[str, tuple[int, tuple[int, int] | None]] = {}
    sub_ids: list[str] | None = None
    if sub_csv.is_file():
        rows = _read_csv(sub_csv, ("ID",), problems, allow_empty=True)  # an empty test set is consistent
        bad = _check_ids(sub_csv, [(line, r["ID"]) for line, r in rows or []], problems)
        if rows is not None:
            rows = [(line, r) for line, r in rows if r["ID"] not in bad]
            sub_ids = [r["ID"] for _, r in rows]
        for line, r in rows or []:
            size = None
            if "ImageWidth" in r and "ImageHeight" in r:
                try:
                    size = (int(r["ImageWidth"]), int(r["ImageHeight"]))
                except ValueError:
                    problems.append(_problem(
                        "bad_csv",
                        f"{sub_csv}: line {line}: ImageWidth/ImageHeight {clip(r['ImageWidth'])}/"
                        f"{clip(r['ImageHeight'])} are not integers (ID {r['ID']})",
                        path=str(sub_csv), row=line, image_id=r["ID"],
                    ))
            sub_sizes.setdefault(r["ID"], (line, size))

    # Image files.
    scans = {split: index.scan(split) for split in SPLITS}
    for split in SPLITS:
        for path in scans[split].stray:
            problems.append(_problem("stray_file", f"{split}/{clip(path.name, bare=True)}: not a channel image name",
                                     path=str(path)))
        for path, problem in scans[split].bad_ids:
            problems.append(_problem(
                "bad_id", f"{split}/{clip(path.name, bare=True)}: its ID {problem} (an ID is a file-name stem); "
                "the file is not read", path=str(path),
            ))
        if (root / split).is_dir() and not scans[split].samples:
            problems.append(_problem("no_images", f"{root / split}/ holds no channel images", path=str(root / split)))
    twins = index.train_folders.ambiguous()
    for image_id, where in twins.items():
        problems.append(_problem("image_in_two_folders", f"ID {image_id} has files in {', '.join(map(str, where))}; "
                                 f"{where[0]} is used (keep one copy)", path=str(where[1]), image_id=image_id))
    where_train = {i: str(ws[0]) for i, ws in twins.items()}
    jobs = [
        (split, where_train.get(image_id) or (str(index.train_folders.folder_of(image_id)) if split == "train"
                                              else str(root / split)),
         image_id, {c: [str(p) for p in ps] for c, ps in channels.items()}, decode)
        for split in SPLITS
        for image_id, channels in scans[split].samples.items()
    ]
    workers = workers or min(os.cpu_count() or 1, 8)
    sample_shape: dict[tuple[str, str], tuple] = {}
    # enumerate, not zip: zip would stop before the generator (and its progress bar) finishes.
    for i, (found, shape) in enumerate(_run_sample_checks(jobs, decode, workers, progress)):
        job = jobs[i]
        problems.extend(found)
        if shape is not None:
            sample_shape[(job[0], job[2])] = shape

    # Cross-checks between the CSVs and the files.
    train_files, test_files = scans["train"].samples, scans["test"].samples
    if train_label_ids is not None:
        labelled = set(train_label_ids)
        for image_id in dict.fromkeys(train_label_ids):
            if image_id.strip() and image_id not in train_files:
                problems.append(_problem(
                    "label_without_images", f"{train_csv}: ID {image_id} has no files in train/",
                    path=str(train_csv), image_id=image_id,
                ))
        if has_train:
            for image_id in train_files:
                if image_id not in labelled:
                    problems.append(_problem(
                        "unlabeled_image", f"train/{image_id}_*: ID {image_id} not in train.csv",
                        path=str(train_dir), image_id=image_id,
                    ))
    if sub_ids is not None:
        listed = set(sub_ids)
        for image_id, (line, size) in sub_sizes.items():
            if not image_id.strip():
                continue
            if image_id not in test_files:
                problems.append(_problem(
                    "submission_without_images", f"{sub_csv}: line {line}: ID {image_id} has no files in test/",
                    path=str(sub_csv), row=line, image_id=image_id,
                ))
            elif size is not None and ("test", image_id) in sample_shape:
                w, h = sample_shape[("test", image_id)][:2]
                if (w, h) != size:
                    problems.append(_problem(
                        "size_mismatch",
                        f"{sub_csv}: line {line}: ID {image_id} says {size[0]}x{size[1]}, the image is {w}x{h}",
                        path=str(sub_csv), row=line, image_id=image_id,
                    ))
        for image_id in test_files:
            if image_id not in listed:
                problems.append(_problem(
                    "test_image_not_in_submission", f"test/{image_id}_*: ID {image_id} not in sample_submission.csv",
                    path=str(test_dir), image_id=image_id,
                ))
    for image_id in sorted(set(train_files) & set(test_files)):
        problems.append(_problem("train_test_overlap", f"ID {image_id} has files in both train/ and test/", image_id=image_id))

    # Information: counts, sizes and depths per split.
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        shapes = [s for (sp, _), s in sample_shape.items() if sp == split]
        problems.append(_problem("counts", f"{split}: {len(scans[split].samples)} samples"))
        for (w, h), n in sorted(Counter(s[:2] for s in shapes).items(), key=lambda kv: (-kv[1], kv[0])):
            problems.append(_problem("image_size", f"{split}: {n} images of {w}x{h}"))
        for depth, n in sorted(Counter(s[2] for s in shapes).items()):
            problems.append(_problem("bit_depth", f"{split}: {n} images of {depth}-bit"))
    return problems


def summarize(problems: list[Problem], examples: int = 5) -> str:
    """A grouped, human-readable report: per severity, per kind, a count and the first examples."""
    by_kind: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    lines = []
    for severity in SEVERITIES:
        kinds = [k for k in KINDS if KINDS[k][0] == severity and by_kind.get(k)]
        if not kinds:
            continue
        total = sum(len(by_kind[k]) for k in kinds)
        if severity == "info":
            lines.append("info:")
        else:
            lines.append(f"{severity}s: {total} in {len(kinds)} kind(s)")
        for kind in kinds:
            found = by_kind[kind]
            if severity == "info":
                lines.extend(f"  {p.message}" for p in found)
                continue
            lines.append(f"  {kind} ({len(found)}): {KINDS[kind][1]}")
            shown = found if examples <= 0 else found[:examples]
            lines.extend(f"    {p.message}" for p in shown)
            if len(found) > len(shown):
                lines.append(f"    ... and {len(found) - len(shown)} more (--examples 0 shows all)")
    n_err = sum(p.severity == "error" for p in problems)
    n_warn = sum(p.severity == "warning" for p in problems)
    lines.append(f"result: {n_err} error(s), {n_warn} warning(s)" + ("" if n_err else ": OK"))
    return "\n".join(lines)


def configure_check_data(parser) -> None:
    """Arguments of `python -m kit check-data`."""
    parser.add_argument("dir", type=Path, help="dataset folder (train/, test/, train.csv, sample_submission.csv)")
    parser.add_argument("--decode", action="store_true",
                        help="fully decode every channel file (slow; default: headers and file ends only)")
    parser.add_argument("--workers", type=int, default=None, help="processes for --decode (default: CPUs, max 8)")
    parser.add_argument("--examples", type=int, default=5, help="examples shown per problem kind (0: all)")
    parser.add_argument("--json", action="store_true", help="print the problems as JSON instead of the summary")
    parser.add_argument("--extra-images", nargs="+", default=[], type=Path, metavar="DIR",
                        help="more folders of train images (external data), checked as train images")
    parser.add_argument("--labels", type=Path, help="labels table to check instead of DIR/train.csv (e.g. train_all.csv)")
    parser.set_defaults(func=_run_check_data)


def _run_check_data(args) -> int:
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    problems = check_data(args.dir, decode=args.decode, workers=args.workers, progress=True,
                          extra_train_dirs=args.extra_images, labels=args.labels)
    n_err = sum(p.severity == "error" for p in problems)
    if args.json:
        report = {
            "root": str(args.dir),
            "decoded": bool(args.decode),
            "errors": n_err,
            "warnings": sum(p.severity == "warning" for p in problems),
            "counts": dict(Counter(p.kind for p in problems)),
            "problems": [asdict(p) for p in problems],
        }
        print(json.dumps(report, indent=1))
    else:
        print(f"check-data {args.dir} ({'decoded' if args.decode else 'headers and file ends; --decode decodes'})")
        print(summarize(problems, args.examples))
    if n_err:  # the one line a script reads to learn why the exit status is 1
        print(f"{n_err} error(s) in {args.dir}", file=sys.stderr)
    return 1 if n_err else 0
