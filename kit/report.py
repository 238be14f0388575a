"""`python -m kit report`: one static HTML page that shows what a run did and what it called each cell.

``python -m kit report --run RUN [--images DIR] [--out RUN/report]`` writes ``OUT/index.html``
and its pictures (``OUT/img/*.png``, ``OUT/fields/*.png``, ``OUT/tiles/*.png``) plus the dataset's
`kit analyze` plots (``OUT/analysis/``). The page opens from disk: no server, no network, no
scripts, relative links only. Sections:

========== ========================================================================================
settings   the resolved config (``RUN/config.yaml``), grouped
data       the dataset, image sizes, cells predicted, true cells
folds      images and images per class in each fold (the folds file and its sidecar)
timings    seconds per stage (``summary.json``)
scores     the comparison table (image-only, cell-only, combined, ceilings; test mAP and OOF) and
           the OOF score per fold with each fold model's validation macro AP
per class  AP per class, test and OOF side by side, with the true cells per class (bar chart and
           table); PR curves per class; on data without cell truth the image-level AP instead
combine    the combination ranking of ``combine.yaml`` (the chosen row highlighted)
gallery    a few fields per class, chosen to cover every class present: the HPA composite, each
           cell outlined (`kit.draw`) and tagged with its top classes and confidences; with truth
           the true labels beside it and the outline coloured right / wrong / no true cell
errors     per class, the most confident false positives and the missed true cells as cell tiles
           (with per-cell truth); without it the cells ranked highest for each class
training   validation curves per fold (``epochs.csv``), links to the per-fold training plots
analysis   links to the label analysis plots of the dataset (`kit analyze`)
========== ========================================================================================

What is scored: the predictions of the images folder (default the dataset's ``test/``; with
``--images DIR`` that folder, predicted first when the run's predict cache lacks it) combined
with the run's tuned strategy (``combine.yaml``). Truth for a folder ``D/<name>`` is
``D/<name>_solution.csv`` (the submission format with one ``class 1 mask`` triple per true cell
and label; `kit synth` writes it). Cells are matched to true cells at mask IoU >= 0.6 as the
metric does, so the per-class test AP here is the competition's (their mean is the combined row
of the comparison table). The metric ranks each class over the cells of the fields whose truth has
it and ignores it elsewhere, and so does the report: a cell is *right* when, of its field's true
classes, the one it is most confident of is among the labels of the true cell it matches, *wrong*
when not, *no true cell* when it matches none; false positives of a class are cells of fields
whose truth has the class. The OOF curves come from `kit.combine.load_oof` (the cells tuned on).

All run inputs are read by `read_run` (the one function that knows the run folder's files).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kit.atomic import atomic_open
from kit.errors import KitError
from kit.htmlpage import esc, fmt, page, table
from kit.labels import CLASS_NAMES, NEGATIVE, NUM_CLASSES

REPORT_DIR = "report"
PAGE_NAME = "index.html"

SHORT_NAMES: tuple[str, ...] = (
    "Nucleoplasm", "Nuc.membrane", "Nucleoli", "Nuc.fibr.center", "Nuc.speckles", "Nuc.bodies", "ER",
    "Golgi", "Interm.filam.", "Actin", "Microtubules", "Mit.spindle", "Centrosome", "Plasma mem.",
    "Mitochondria", "Aggresome", "Cytosol", "Vesicles", "Negative",
)
# 2-6 letters, for the tags drawn over the fields
TAG_NAMES: tuple[str, ...] = (
    "Nucpl", "NucMem", "Nucli", "NuFib", "Speck", "NucBod", "ER", "Golgi", "IntFil", "Actin", "MT",
    "Spindl", "Centr", "PM", "Mito", "Aggr", "Cyto", "Vesic", "Neg",
)
# outline colours: bright, and none of them the pure red/green/blue/yellow of a channel
RIGHT = (0, 255, 150)
WRONG = (255, 0, 255)
NO_TRUE_CELL = (255, 150, 0)
NO_TRUTH = (255, 255, 255)
MISSED = (255, 150, 0)
VERDICT_COLOUR = {"right": RIGHT, "wrong": WRONG, "no true cell": NO_TRUE_CELL, "": NO_TRUTH}

FIELD_SIDE = 768      # fields larger than this are drawn from a copy downscaled to it
DISPLAY_PX = 768      # smaller fields are shown enlarged by a whole factor to about this size
FIELDS_PER_CLASS = 2
MAX_FIELDS = 24       # after every class present has one field
TILES_PER_CLASS = 6
TILE_PX = 80


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def class_label(c: int) -> str:
    return f"{c} {CLASS_NAMES[c]}"


# --------------------------------------------------------------------------------------------
# reading a run


@dataclass
class RunFiles:
    """Everything the report reads from a run folder and its dataset (built by `read_run`)."""

    run_dir: Path
    cfg: Any
    data_dir: Path
    images_dir: Path
    summary: dict
    combine: dict
    comparison_md: str
    spec: Any                           # kit.combine.CombineSpec of combine.yaml
    results: dict                       # {ID: kit.predict.ImageResult} of images_dir
    masks: Any                          # the mask source the predictions were made with
    solution: dict | None               # {ID: ImagePrediction} truth of images_dir, or None
    solution_path: Path | None
    train_labels: Any                   # DataFrame ID, Label, labels
    train_solution_counts: np.ndarray | None  # true (cell, class) pairs per class in train truth
    cell_oof: Any                       # DataFrame or None
    image_oof: Any
    epochs: dict = field(default_factory=dict)   # {(kind, fold): DataFrame of epochs.csv}
    train_metrics: dict = field(default_factory=dict)
    folds_file: Path | None = None
    folds_info: dict = field(default_factory=dict)
    oof: Any = None                     # kit.combine.OOFSet with per-cell truth, else None
    manifest: Any = None                # kit.manifest.RunManifest

    def cells(self, image_id: str, image: np.ndarray | None = None) -> np.ndarray:
        """The predicted label image of one image (the masks its predictions were made on); an
        entry the mask cache no longer holds is segmented again from `image` (read if not given)."""
        from kit.errors import DataError

        try:
            return self.masks.load(image_id, image)[1]
        except DataError:
            if image is not None:
                raise
            from kit.images import read_sample

            return self.masks.load(image_id, read_sample(self.images_dir, image_id))[1]


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def _read_oof(run_dir: Path, kind: str):
    import pandas as pd

    frames = []
    for path in sorted((run_dir / kind).glob("fold*/oof.csv")):
        if path.parent.name[4:].isdigit():
            frames.append(pd.read_csv(path, dtype={"ID": str}).assign(fold=int(path.parent.name[4:])))
    return pd.concat(frames, ignore_index=True) if frames else None


def _image_ids(images_dir: Path, data_dir: Path) -> list[str]:
    from kit.layout import list_image_ids, read_sample_submission

    sample = data_dir / "sample_submission.csv"
    if images_dir.resolve() == (data_dir / "test").resolve() and sample.is_file():
        return read_sample_submission(sample)[0]
    return list_image_ids(images_dir)


def read_run(run_dir: str | Path, images: str | Path | None = None, *, workers: int = 1,
             progress: bool = False) -> RunFiles:
    """Read a run's files, its dataset's truth and the predictions of `images` (default the
    dataset's ``test/``); images the predict cache lacks are predicted with the run's models.
    The run's inputs (dataset, labels, folds, mask cache) come from its manifest."""
    import pandas as pd

    from kit.combine import read_combine_spec
    from kit.config import load_config
    from kit.folds import read_sidecar
    from kit.labels import read_labels_csv
    from kit.manifest import read_manifest
    from kit.predict import Predictor
    from kit.submission import read_submission

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise KitError(f"{run_dir / 'config.yaml'} not found: is {run_dir} a run folder?")
    cfg = load_config(run_dir / "config.yaml")
    manifest = read_manifest(run_dir)
    data_dir = Path(manifest.data_dir)
    images_dir = Path(images) if images is not None else data_dir / "test"
    if not images_dir.is_dir():
        raise KitError(f"images folder not found: {images_dir}")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    ids = _image_ids(images_dir, data_dir)
    predictor = Predictor(run_dir, cfg)
    masks = predictor.run_masks(images_dir, workers)
    results = predictor.predict_folder(images_dir, ids, masks, progress=progress, workers=workers)
    solution_path = images_dir.parent / f"{images_dir.name}_solution.csv"
    solution = read_submission(solution_path) if solution_path.is_file() else None
    train_solution = data_dir / "train_solution.csv"
    counts = None
    if train_solution.is_file():
        counts = np.zeros(NUM_CLASSES, np.int64)
        for pred in read_submission(train_solution).values():
            for c, _, _ in pred.triples:
                counts[int(c)] += 1
    epochs = {}
    for kind in ("cell", "image"):
        for path in sorted((run_dir / kind).glob("fold*/epochs.csv")):
            if path.parent.name[4:].isdigit():
                epochs[(kind, int(path.parent.name[4:]))] = pd.read_csv(path)
    folds_file = Path(manifest.folds_file) if manifest.folds_file else None
    folds_info = {}
    if folds_file is not None and folds_file.is_file():
        try:
            folds_info = read_sidecar(folds_file)
        except KitError:
            folds_info = {}
    oof = None
    if counts is not None:  # OOF cells matched to their truth (on real data only tuning needs them)
        try:
            from kit.combine import load_oof

            oof = load_oof(run_dir, progress=False)
        except KitError as exc:
            _log(f"report: no out-of-fold cells ({exc}): no OOF precision-recall curves")
    train_metrics = summary.get("train") or (
        json.loads((run_dir / "train_metrics.json").read_text()) if (run_dir / "train_metrics.json").is_file() else {})
    return RunFiles(
        run_dir=run_dir, cfg=cfg, data_dir=data_dir, images_dir=images_dir, summary=summary,
        combine=_read_yaml(run_dir / "combine.yaml"),
        comparison_md=(run_dir / "comparison.md").read_text() if (run_dir / "comparison.md").is_file() else "",
        spec=read_combine_spec(run_dir, cfg), results=results, masks=masks,
        solution=solution, solution_path=solution_path if solution is not None else None,
        train_labels=read_labels_csv(manifest.labels_file), train_solution_counts=counts,
        cell_oof=_read_oof(run_dir, "cell"), image_oof=_read_oof(run_dir, "image"), epochs=epochs,
        train_metrics=train_metrics or {}, folds_file=folds_file, folds_info=folds_info, oof=oof,
        manifest=manifest,
    )


# --------------------------------------------------------------------------------------------
# scoring the cells against truth


@dataclass
class CellScores:
    """Every predicted cell of the scored images, in metric order (sorted image ID, then the
    cell's position in its row), with its combined scores and, where truth exists, its match."""

    image_ids: np.ndarray               # (N,) object
    cell_ids: np.ndarray                # (N,) int64
    scores: np.ndarray                  # (N, 19) combined confidences
    has_truth: bool = False
    truth: np.ndarray | None = None     # (N, 19) bool: labels of the matched true cell
    verified: np.ndarray | None = None  # (N, 19) bool: class among the field's true labels
    matched: np.ndarray | None = None   # (N,) int64 true cell id (0: none at IoU >= 0.6)
    n_pos: np.ndarray | None = None     # (19,) true (cell, class) pairs
    true_cells: list = field(default_factory=list)  # (image ID, true id, classes, row of its match or -1)
    true_classes: dict = field(default_factory=dict)  # {image ID: {true id: classes}}

    def rows_of(self, image_id: str) -> np.ndarray:
        return np.flatnonzero(self.image_ids == image_id)

    def verdict(self, row: int) -> str:
        """With truth: 'right' when, of the classes of the field's truth (the ones the metric
        scores on this field), the cell's most confident is one of its own labels, else 'wrong';
        'no true cell' when no true cell matches at IoU >= 0.6; '' without truth."""
        if not self.has_truth:
            return ""
        if self.matched[row] == 0:
            return "no true cell"
        scored = np.flatnonzero(self.verified[row])
        return "right" if self.truth[row, scored[int(np.argmax(self.scores[row, scored]))]] else "wrong"

    def per_class_ap(self) -> np.ndarray:
        from kit.combine import cell_ap_per_class

        return cell_ap_per_class(self.scores, self.truth, self.verified, self.n_pos)

    def pr_curve(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        from kit.metric import precision_recall

        sel = self.verified[:, c]
        return precision_recall(np.asarray(self.scores[sel, c], np.float32), self.truth[sel, c], int(self.n_pos[c]))


def score_cells(files: RunFiles) -> CellScores:
    """Combine the run's scores and match every predicted cell to the truth (when there is one)."""
    from kit.masks import truth_from_solution
    from kit.matching import match_labels
    from kit.predict import combined_scores

    order = sorted(i for i in files.results if files.solution is None or i in files.solution)
    results = {i: files.results[i] for i in order}
    combined = combined_scores(results, files.spec)
    image_ids = np.concatenate([np.full(len(results[i].cell_ids), i, dtype=object) for i in order]) \
        if order else np.zeros(0, object)
    cell_ids = np.concatenate([results[i].cell_ids for i in order]).astype(np.int64) if order else np.zeros(0, np.int64)
    scores = np.concatenate([combined[i] for i in order]) if order else np.zeros((0, NUM_CLASSES))
    out = CellScores(image_ids, cell_ids, scores)
    if files.solution is None:
        return out
    n = len(cell_ids)
    out.has_truth = True
    out.truth = np.zeros((n, NUM_CLASSES), bool)
    out.verified = np.zeros((n, NUM_CLASSES), bool)
    out.matched = np.zeros(n, np.int64)
    out.n_pos = np.zeros(NUM_CLASSES, np.int64)
    start = 0
    for image_id in order:
        r = results[image_id]
        rows = np.arange(start, start + len(r.cell_ids))
        start += len(r.cell_ids)
        true_labels, classes = truth_from_solution(files.solution[image_id])
        out.true_classes[image_id] = classes
        areas = np.bincount(true_labels.ravel(), minlength=len(classes) + 1)
        present = sorted({c for cls in classes.values() for c in cls})
        if present:
            out.verified[np.ix_(rows, present)] = True
        match = match_labels(files.cells(image_id), true_labels) if len(rows) else {}
        row_of = {int(k): int(row) for k, row in zip(r.cell_ids, rows)}
        match_of_true = {}
        for k, j in match.items():
            if k in row_of:
                out.matched[row_of[k]] = j
                out.truth[row_of[k], classes[j]] = True
                match_of_true[j] = row_of[k]
        for j, cls in classes.items():
            if areas[j] > 0:
                for c in set(cls):
                    out.n_pos[c] += 1
                out.true_cells.append((image_id, j, sorted(set(cls)), match_of_true.get(j, -1)))
    return out


def image_level_oof(files: RunFiles) -> dict | None:
    """Per-class AP of the image model's OOF probabilities against the image labels."""
    from kit.metric import classification_ap

    if files.image_oof is None or not len(files.image_oof):
        return None
    labels = files.train_labels.set_index("ID")
    df = files.image_oof[files.image_oof["ID"].isin(labels.index)]
    from kit.labels import to_multihot

    y = np.stack([to_multihot(labels.loc[i, "labels"]) for i in df["ID"]])
    p = df[[f"p{c}" for c in range(NUM_CLASSES)]].to_numpy(np.float64)
    result = classification_ap(y, p)
    result["y"], result["p"] = y, p
    return result


# --------------------------------------------------------------------------------------------
# plots (matplotlib's object API on the Agg canvas: no display, no pyplot state)


def _figure(width: float, height: float, **margins):
    """A figure with fixed margins (constrained layout costs seconds on the grids drawn here)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(**{"left": 0.06, "right": 0.98, "bottom": 0.08, "top": 0.92, **margins})
    return fig


def _save_fig(fig, path: Path) -> Path:
    from kit.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


def plot_ap_bars(path: Path, series: Sequence[tuple[str, Sequence[float | None], str]],
                 counts: Sequence[str], title: str) -> Path:
    """Horizontal bars per class, one bar per series (name, per-class values, colour)."""
    classes = list(range(NUM_CLASSES))
    fig = _figure(6.5, 7.5, left=0.42, bottom=0.07, top=0.93)
    ax = fig.add_subplot()
    y = np.arange(NUM_CLASSES, dtype=float)
    height = 0.8 / max(len(series), 1)
    for s, (name, values, colour) in enumerate(series):
        v = np.array([np.nan if x is None else float(x) for x in values])
        ax.barh(y - 0.4 + height * (s + 0.5), np.nan_to_num(v), height=height, color=colour, label=name)
        for i in classes:
            if np.isfinite(v[i]):
                ax.text(v[i] + 0.01, y[i] - 0.4 + height * (s + 0.5), f"{v[i]:.2f}", va="center", fontsize=7)
    ax.set_yticks(y, [f"{c} {CLASS_NAMES[c][:28]}  ({counts[c]})" for c in classes], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("average precision")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save_fig(fig, path)


def plot_pr_grid(path: Path, curves: dict[int, list[tuple[str, np.ndarray, np.ndarray, str]]], title: str) -> Path:
    """One small precision-recall plot per class: {class: [(name, precision, recall, style)]};
    the title gives the AP of the first curve."""
    from kit.metric import average_precision

    classes = sorted(curves)
    cols = 5
    rows = max(1, math.ceil(len(classes) / cols))
    height = 2.6 * rows + 0.4
    fig = _figure(14, height, left=0.04, bottom=0.45 / height, top=1 - 0.5 / height, hspace=0.35, wspace=0.18)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, c in zip(axes, classes):
        for name, precision, recall, style in curves[c]:
            ax.plot(np.concatenate([[0.0], recall]), np.concatenate([[precision[0] if len(precision) else 0.0], precision]),
                    style, label=name, lw=1.2, drawstyle="steps-post")
        ax.set_xlim(0, 1.0)
        ax.set_ylim(0, 1.05)
        ap = average_precision(curves[c][0][1], curves[c][0][2])
        ax.set_title(f"{c} {CLASS_NAMES[c][:24]}: AP {ap:.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(classes):]:
        ax.set_axis_off()
    if classes:
        axes[0].legend(fontsize=7, loc="lower left")
        axes[0].set_xlabel("recall", fontsize=8)
        axes[0].set_ylabel("precision", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save_fig(fig, path)


def plot_epochs(path: Path, epochs: dict) -> Path | None:
    """Validation macro AP and loss per epoch, one line per fold, cell and image models."""
    kinds = [k for k in ("cell", "image") if any(kind == k for kind, _ in epochs)]
    if not kinds:
        return None
    fig = _figure(11, 3.2 * len(kinds), hspace=0.45, wspace=0.15, top=1 - 0.35 / (3.2 * len(kinds)),
                  bottom=0.5 / (3.2 * len(kinds)))
    axes = fig.subplots(len(kinds), 2, squeeze=False)
    for r, kind in enumerate(kinds):
        for (k, fold), df in sorted(epochs.items()):
            if k != kind:
                continue
            for ax, col in zip(axes[r], ("macro_ap", "valid_loss")):
                if col in df.columns:
                    ax.plot(df["epoch"], df[col], marker="o", ms=3, label=f"fold {fold}")
        for ax, col in zip(axes[r], ("validation macro AP", "validation loss")):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{kind} model: {col}", fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save_fig(fig, path)


# --------------------------------------------------------------------------------------------
# the gallery and the cell tiles


def choose_fields(cells: CellScores, per_class: int = FIELDS_PER_CLASS,
                  max_fields: int = MAX_FIELDS) -> list[tuple[str, list[int]]]:
    """[(image ID, classes it was chosen for)]: first one field for every class present (rarest
    class first), then more, up to `per_class` fields per class, while fewer than `max_fields`.

    A field has a class when one of its true cells has it (with truth), else when the class is
    the top class of one of its cells. Candidates are ranked by the number of true cells of the
    class (with truth), else by the field's highest confidence for the class.
    """
    rank: dict[int, list[tuple[float, str]]] = {c: [] for c in range(NUM_CLASSES)}
    if cells.has_truth:
        for image_id, classes in sorted(cells.true_classes.items()):
            for c in range(NUM_CLASSES):
                n = sum(1 for cls in classes.values() if c in cls)
                if n:
                    rank[c].append((float(n), image_id))
    else:
        for image_id in sorted(set(cells.image_ids)):
            s = cells.scores[cells.rows_of(image_id)]
            for c in set(int(k) for k in np.argmax(s, axis=1)):
                rank[c].append((float(s[:, c].max()), image_id))
    fields_of = {c: [i for _, i in sorted(r, key=lambda t: (-t[0], t[1]))] for c, r in rank.items()}
    classes = sorted((c for c in fields_of if fields_of[c]), key=lambda c: (len(fields_of[c]), c))
    chosen: "OrderedDict[str, list[int]]" = OrderedDict()
    for rnd in range(per_class):
        for c in classes:
            if rnd > 0 and len(chosen) >= max_fields:
                break
            if sum(1 for i in fields_of[c] if i in chosen) > rnd:
                continue
            pick = next((i for i in fields_of[c] if i not in chosen), None)
            if pick is not None:
                chosen[pick] = [c]
    for image_id, picked in chosen.items():  # every class a chosen field has, its own first
        picked.extend(c for c in classes if c not in picked and image_id in fields_of[c])
    return list(chosen.items())


class FieldPictures:
    """Display composites and label images of fields, read once each (a small LRU)."""

    def __init__(self, files: RunFiles, cells: CellScores, max_side: int = FIELD_SIDE, keep: int = 8):
        self.files, self.cells, self.max_side, self.keep = files, cells, max_side, keep
        self._cache: "OrderedDict[str, tuple]" = OrderedDict()

    def get(self, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(display RGB, predicted labels, true labels or None), all at display size."""
        from kit.draw import display_field, scale_labels
        from kit.images import read_sample

        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id]
        image = read_sample(self.files.images_dir, image_id)
        rgb = display_field(image, self.max_side)
        shape = rgb.shape[:2]
        pred = scale_labels(self.files.cells(image_id, image), shape)
        true = None
        if self.files.solution is not None and image_id in self.files.solution:
            from kit.masks import truth_from_solution

            true = scale_labels(truth_from_solution(self.files.solution[image_id])[0], shape)
        self._cache[image_id] = (rgb, pred, true)
        if len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return self._cache[image_id]


def _top(scores: np.ndarray, k: int = 3) -> list[tuple[int, float]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(c), float(scores[c])) for c in order]


def _classes_text(classes: Sequence[int]) -> str:
    """Short class names, each with its full name on hover."""
    if not classes:
        return "&ndash;"
    return ", ".join(f'<span title="{esc(class_label(c))}">{esc(SHORT_NAMES[c])}</span>' for c in classes)


def render_field(files: RunFiles, cells: CellScores, pictures: FieldPictures, image_id: str,
                 chosen_for: Sequence[int], out: Path) -> str:
    """Write ``fields/<ID>.png`` (composite + outlines) and return the field's HTML block."""
    from kit.draw import draw_outlines, write_png

    try:
        rgb, pred, _ = pictures.get(image_id)
    except KitError as exc:  # e.g. a channel file that cannot be read: no picture, say why
        return f'<p class="warn">field {esc(image_id)}: {esc(exc)}</p>'
    rows = cells.rows_of(image_id)
    colours, tags, body = {}, [], []
    h, w = pred.shape
    n = int(pred.max()) + 1
    ys, xs = np.indices(pred.shape)
    count = np.bincount(pred.ravel(), minlength=n)
    cy = np.bincount(pred.ravel(), weights=ys.ravel(), minlength=n) / np.maximum(count, 1)
    cx = np.bincount(pred.ravel(), weights=xs.ravel(), minlength=n) / np.maximum(count, 1)
    for row in rows:
        k = int(cells.cell_ids[row])
        verdict = cells.verdict(row)
        colours[k] = VERDICT_COLOUR[verdict]
        top = _top(cells.scores[row])
        css = "rgb({},{},{})".format(*colours[k])
        if k < n and count[k]:
            tag = " ".join(f"{TAG_NAMES[c]} {v:.2f}".replace("0.", ".") for c, v in top[:2])
            title = "; ".join(f"{class_label(c)} {v:.3f}" for c, v in top)
            left = min(max(100 * cx[k] / w, 6.0), 94.0)  # keep the tag inside the picture
            tags.append(f'<span class="tag" style="left:{left:.2f}%;top:{100 * cy[k] / h:.2f}%;'
                        f'border-color:{css}" title="cell {k}: {esc(title)}"><b>{k}</b> {esc(tag)}</span>')
        truth = best = ""
        if cells.has_truth:
            j = int(cells.matched[row])
            truth = (_classes_text(cells.true_classes[image_id][j]) if j else "no true cell at IoU &ge; 0.6")
            scored = np.flatnonzero(cells.verified[row])
            c = int(scored[int(np.argmax(cells.scores[row, scored]))])
            best = f"{_classes_text([c])} {cells.scores[row, c]:.2f}"
        row_html = [f'<span class="swatch" style="background:{css}"></span>{k}',
                    ", ".join(f'<span title="{esc(class_label(c))}">{esc(SHORT_NAMES[c])}</span> {v:.2f}' for c, v in top)]
        body.append(row_html + [best, truth, esc(verdict)] if cells.has_truth else row_html)
    picture = draw_outlines(rgb, pred, colours)
    name = f"fields/{image_id}.png"
    write_png(out / name, picture, keep=list(VERDICT_COLOUR.values()))
    r = files.results[image_id]
    headers = ["cell", "top 3 (combined confidence)"] + (
        ["best of the field's true classes", "true labels", "verdict"] if cells.has_truth else [])
    cell_table = table(headers, body, raw=True, cls="cells")
    info = [f"<b>{esc(image_id)}</b> ({r.width}&times;{r.height} px, {len(rows)} cells"
            + (f", shown at {w}&times;{h}" if (w, h) != (r.width, r.height) else "") + ")",
            f"chosen for: {esc(', '.join(class_label(c) for c in chosen_for))}"]
    if cells.has_truth:
        field_labels = sorted({c for cls in cells.true_classes[image_id].values() for c in cls})
        missed = [(j, cls) for (i, j, cls, m) in cells.true_cells if i == image_id and m < 0]
        info.append(f"true labels of the field: {_classes_text(field_labels)}")
        if missed:
            info.append(f"{len(missed)} true cell(s) without a predicted cell at IoU &ge; 0.6")
    else:
        info.append("image model: " + ", ".join(f"{esc(SHORT_NAMES[c])} {s:.2f}" for c, s in _top(r.image_probs)))
    scale = max(1, round(DISPLAY_PX / max(w, h)))
    return (f'<div class="field"><div class="fieldpic" style="width:{w * scale}px;height:{h * scale}px">'
            f'<img src="{name}" width="{w * scale}" height="{h * scale}" alt="field {esc(image_id)} with cell outlines">'
            + "".join(tags) + f'</div><div class="fieldinfo"><p>{"<br>".join(info)}</p>{cell_table}</div></div>')


@dataclass
class TileRequest:
    key: str               # strip the tile belongs to
    image_id: str
    which: str             # "pred" or "true": which label image the cell id refers to
    cell_id: int
    colour: tuple
    caption: str


def render_tiles(pictures: FieldPictures, requests: list[TileRequest], out: Path) -> dict[str, str]:
    """Write one PNG strip per key; returns {key: HTML (strip + captions)}. Each field is read once."""
    from kit.draw import cell_tile, tile_strip, write_png

    tiles: dict[tuple[str, int], np.ndarray] = {}
    for image_id in sorted({r.image_id for r in requests}):
        try:
            rgb, pred, true = pictures.get(image_id)
        except KitError:  # the gallery says why; its tiles stay black
            rgb, pred, true = np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int32)
        for i, r in enumerate(requests):
            if r.image_id == image_id:
                labels = pred if r.which == "pred" else true
                tiles[(r.key, i)] = cell_tile(rgb, labels, r.cell_id, r.colour, TILE_PX)
    html = {}
    for key in dict.fromkeys(r.key for r in requests):
        mine = [(i, r) for i, r in enumerate(requests) if r.key == key]
        name = f"tiles/{key}.png"
        write_png(out / name, tile_strip([tiles[(key, i)] for i, _ in mine]), keep=[r.colour for _, r in mine])
        caps = "".join(f'<div class="cap">{r.caption}</div>' for _, r in mine)
        html[key] = (f'<div class="strip"><img src="{name}" alt="cells: {esc(key)}" '
                     f'width="{len(mine) * (TILE_PX + 4) - 4}" height="{TILE_PX}"><div class="caps">{caps}</div></div>')
    return html


def tile_requests(cells: CellScores, classes: Sequence[int], n: int = TILES_PER_CLASS) -> list[TileRequest]:
    """False positives and missed true cells per class (with truth), else the top cells per class."""
    reqs = []
    for c in classes:
        if cells.has_truth:
            fp = np.flatnonzero(cells.verified[:, c] & ~cells.truth[:, c])
            fp = fp[np.argsort(-cells.scores[fp, c], kind="stable")][:n]
            for row in fp:
                j = int(cells.matched[row])
                truth = _classes_text(cells.true_classes[cells.image_ids[row]][j]) if j else "no true cell"
                reqs.append(TileRequest(f"fp{c}", cells.image_ids[row], "pred", int(cells.cell_ids[row]),
                                        WRONG if j else NO_TRUE_CELL,
                                        f"{cells.scores[row, c]:.3f}<br>true: {truth}"))
            col = cells.scores[cells.verified[:, c], c]
            missed = []
            for image_id, j, cls, row in cells.true_cells:
                if c in cls:
                    missed.append((-1.0 if row < 0 else float(cells.scores[row, c]), image_id, j, row, cls))
            missed.sort(key=lambda t: (t[0], t[1], t[2]))
            for score, image_id, j, row, cls in missed[:n]:
                if row < 0:
                    cap = "not segmented: no predicted cell at IoU &ge; 0.6"
                else:
                    rank = int((col > score).sum()) + 1
                    cap = f"{score:.3f} (rank {rank} of {len(col)})"
                reqs.append(TileRequest(f"miss{c}", image_id, "true", j, MISSED,
                                        f"{cap}<br>true: {_classes_text(cls)}"))
        else:
            top = np.argsort(-cells.scores[:, c], kind="stable")[:n]
            for row in top:
                rest = ", ".join(f"{SHORT_NAMES[k]} {s:.2f}" for k, s in _top(cells.scores[row]) if k != c)[:60]
                reqs.append(TileRequest(f"top{c}", cells.image_ids[row], "pred", int(cells.cell_ids[row]), NO_TRUTH,
                                        f"{cells.scores[row, c]:.3f}<br>{esc(rest)}"))
    return reqs


# --------------------------------------------------------------------------------------------
# the page


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in values.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _link(path: Path, out: Path, text: str | None = None) -> str:
    return f'<a href="{esc(_rel(path, out))}">{esc(text or path.name)}</a>'


def section_settings(files: RunFiles, out: Path) -> str:
    from kit.config import to_dict

    cfg = to_dict(files.cfg)
    blocks = []
    for group, values in cfg.items():
        items = _flatten(values) if isinstance(values, dict) else [(group, values)]
        rows = [(esc(k), esc(v) if v not in (None, "") else "&ndash;") for k, v in items]
        blocks.append(f"<div><h3>{esc(group)}</h3>" + table(["key", "value"], rows, raw=True) + "</div>")
    from kit import __version__

    if files.manifest is not None:  # what the settings resolved to
        rows = [(esc(k), esc(v) if v not in (None, "") else "&ndash;") for k, v in _flatten(files.manifest.to_dict())]
        blocks.insert(0, "<div><h3>manifest</h3>" + table(["key", "value"], rows, raw=True) + "</div>")
    head = (f"<p>{_link(files.run_dir / 'config.yaml', out, 'config.yaml')} (the settings as given), "
            f"{_link(files.run_dir / 'manifest.json', out, 'manifest.json')} (what they resolved to); "
            f"kit {esc(__version__)}; config hash <code>{esc(files.summary.get('config_hash', ''))}</code></p>")
    return head + '<div class="grid">' + "".join(blocks) + "</div>"


def section_data(files: RunFiles, cells: CellScores) -> str:
    sizes = sorted({(r.width, r.height) for r in files.results.values()})
    n_cells = len(cells.cell_ids)
    rows = [
        ("dataset", esc(files.data_dir)),
        ("train images (train.csv)", len(files.train_labels)),
        ("scored images", f"{esc(files.images_dir)}: {len(files.results)}"),
        ("image sizes (w&times;h)", ", ".join(f"{w}&times;{h}" for w, h in sizes) or "&ndash;"),
        ("predicted cells", f"{n_cells} ({n_cells / max(len(files.results), 1):.1f} per image)"),
        ("segmentation", esc(f"{files.manifest.mask_backend} (mask cache {files.manifest.mask_cache})")),
    ]
    if cells.has_truth:
        rows.append(("true cells", f"{len(cells.true_cells)} in {esc(files.solution_path)}; "
                     f"{int((cells.matched > 0).sum())} predicted cells match one at IoU &ge; 0.6"))
    else:
        rows.append(("cell truth", f"none ({esc(files.images_dir.parent / (files.images_dir.name + '_solution.csv'))} absent): "
                     "test AP per cell cannot be measured; the image-level AP and the top cells are shown"))
    if files.train_solution_counts is not None:
        rows.append(("train cell truth", f"{int(files.train_solution_counts.sum())} true (cell, class) pairs "
                     f"in {esc(files.data_dir / 'train_solution.csv')}"))
    return table([], rows, raw=True)


def section_folds(files: RunFiles, out: Path) -> str:
    info = files.folds_info or {}
    rep = info.get("report") or {}
    if not rep:
        return f"<p class=\"note\">folds file {esc(files.folds_file)}: no sidecar report found.</p>"
    k = int(rep.get("n_splits", info.get("n_splits", 0)))
    head = (f"<p>{_link(files.folds_file, out)}: {k} folds, seed {esc(info.get('seed'))}, "
            f"{esc(rep.get('n_images'))} images; {esc(info.get('method', ''))}</p>")
    per_fold = rep.get("images_per_fold") or []
    rows = [["images"] + list(per_fold)]
    for c, counts in enumerate(rep.get("class_fold_counts") or []):
        if sum(counts):
            rows.append([class_label(c)] + list(counts))
    return head + table(["images per fold"] + [f"fold {i}" for i in range(len(per_fold))], rows,
                        numeric=[False] + [True] * len(per_fold))


def section_timings(files: RunFiles) -> str:
    t = dict(files.summary.get("timings") or {})
    if not t:
        return "<p class=\"note\">no summary.json: stage timings unknown (the run was not made by `kit run`).</p>"
    total = t.get("total") or sum(v for k, v in t.items() if k != "total")
    rows = [(k, float(v), f"{100 * float(v) / total:.1f}%" if total and k != "total" else "")
            for k, v in t.items()]
    return table(["stage", "seconds", "share"], rows, numeric=[False, True, True], digits=1)


def section_scores(files: RunFiles, cells: CellScores) -> str:
    from kit.pipeline import TABLE_ROWS

    s = files.summary
    oof = s.get("oof") or {}
    kind = "OOF cell mAP" if oof.get("score_kind", files.combine.get("score_kind")) == "cell_mAP" else "OOF image-level proxy"
    oof_row = {"image_only": oof.get("image_only"), "cell_only": oof.get("cell_only"), "combined": oof.get("overall")}
    rows = []
    for key, label in TABLE_ROWS:
        if key == "combined":
            label = f"{label}: {files.spec.name}"
        rows.append((label, s.get(key), oof_row.get(key)))
    out = []
    test_dir = files.data_dir / "test"
    if files.images_dir.resolve() != test_dir.resolve():
        out.append(f'<p class="warn">These are the run\'s scores on its test set {esc(test_dir)}; the sections '
                   f"below show {esc(files.images_dir)}.</p>")
    out.append(table(["row", "test mAP", kind], rows, numeric=[False, True, True], cls="comparison"))
    notes = list(s.get("notes") or [])
    out += [f'<p class="note">note: {esc(n)}</p>' for n in notes]
    if not s:
        out.append('<p class="warn">summary.json is absent: only the OOF rows from combine.yaml are known.</p>')
    # per fold: the OOF score of the chosen combination and each fold model's validation metrics
    per_fold = oof.get("per_fold") or ((files.combine.get("oof") or {}).get("per_fold")) or {}
    folds = sorted({int(f) for f in per_fold} | {f for _, f in files.epochs})
    tm = files.train_metrics
    rows = []
    for f in folds:
        cm = (tm.get("cell") or {}).get(str(f)) or {}
        im = (tm.get("image") or {}).get(str(f)) or {}
        rows.append((f, per_fold.get(str(f)), cm.get("macro_ap"), cm.get("image_macro_ap"), im.get("macro_ap"),
                     f"{cm.get('n_train', '')}/{cm.get('n_valid', '')}", f"{im.get('n_train', '')}/{im.get('n_valid', '')}",
                     cm.get("best_epoch"), im.get("best_epoch")))
    out.append("<h3>OOF scores per fold</h3>")
    out.append(table(["fold", f"{kind} (chosen combination)", "cell model: valid macro AP",
                      "cell model: image macro AP (max over cells)", "image model: valid macro AP",
                      "cells train/valid", "fields train/valid", "cell best epoch", "image best epoch"],
                     rows, numeric=[False, True, True, True, True, True, True, True, True], cls="perfold"))
    return "".join(out)


def section_per_class(files: RunFiles, cells: CellScores, image_oof: dict | None, out: Path) -> tuple[str, dict]:
    """Bar chart + table of per-class AP; PR curves. Returns (HTML, the numbers shown)."""
    oof_per_class = (files.combine.get("oof") or {}).get("per_class") or [None] * NUM_CLASSES
    n_true_oof = files.train_solution_counts
    numbers: dict = {}
    if cells.has_truth:
        test_ap = cells.per_class_ap()
        present = ~np.isnan(test_ap)
        numbers["test_mAP"] = float(test_ap[present].mean()) if present.any() else None
        numbers["test_ap"] = [None if np.isnan(v) else float(v) for v in test_ap]
        counts = [f"{int(cells.n_pos[c])} / {int(n_true_oof[c]) if n_true_oof is not None else '?'}"
                  for c in range(NUM_CLASSES)]
        series = [("test (cell AP, IoU 0.6)", numbers["test_ap"], "tab:blue"),
                  ("OOF (cell AP)", oof_per_class, "tab:orange")]
        title = f"AP per class of {files.spec.name}\n(in brackets: true cells in test / OOF)"
        rows = [(class_label(c), int(cells.n_pos[c]), numbers["test_ap"][c],
                 int(n_true_oof[c]) if n_true_oof is not None else None, oof_per_class[c],
                 image_oof["per_class"][c] if image_oof else None) for c in range(NUM_CLASSES)]
        head = ["class", "true cells (test)", "test AP", "true cells (OOF)", "OOF AP", "image model OOF AP"]
        curves = {c: [("test", *cells.pr_curve(c), "-")] for c in range(NUM_CLASSES) if cells.n_pos[c] > 0}
        oof = files.oof
        if oof is not None and oof.score_kind == "cell_mAP" and len(oof):
            from kit.metric import precision_recall

            oof_scores = np.asarray(oof.combined(files.spec), np.float32)
            n_pos = oof.image_n_pos.sum(axis=0)
            for c in curves:
                if n_pos[c] > 0:
                    sel = oof.verified[:, c]
                    curves[c].append(("OOF", *precision_recall(oof_scores[sel, c], oof.truth[sel, c], int(n_pos[c])), "--"))
        pr_title = ("precision-recall per class of the test cells (solid; AP in the title) and the out-of-fold "
                    "cells (dashed); cells matched at IoU 0.6")
        lead = (f"<p>Mean over the {int(present.sum())} classes with true cells: <b class=\"testmap\">"
                f"{fmt(numbers['test_mAP'])}</b> (the combined row of the comparison table).</p>")
    else:
        img_counts = np.zeros(NUM_CLASSES, np.int64)
        for labels in files.train_labels["labels"]:
            for c in labels:
                img_counts[c] += 1
        counts = [f"{int(img_counts[c])} images" for c in range(NUM_CLASSES)]
        series = [("OOF image model (image-level AP)", image_oof["per_class"] if image_oof else [None] * 19, "tab:green"),
                  ("OOF combination, image-level proxy", oof_per_class, "tab:orange")]
        title = "image-level AP per class (no cell truth)\n(in brackets: train images with the class)"
        rows = [(class_label(c), int(img_counts[c]), image_oof["per_class"][c] if image_oof else None,
                 oof_per_class[c]) for c in range(NUM_CLASSES)]
        head = ["class", "train images", "image model OOF AP", "combination OOF proxy AP"]
        curves = {}
        if image_oof:
            from kit.metric import precision_recall

            for c in range(NUM_CLASSES):
                if image_oof["y"][:, c].sum():
                    p, r = precision_recall(image_oof["p"][:, c], image_oof["y"][:, c].astype(bool), int(image_oof["y"][:, c].sum()))
                    curves[c] = [("image model OOF", p, r, "g-")]
        pr_title = "OOF image-level precision-recall per class (image model)"
        lead = ("<p class=\"warn\">No per-cell truth for these images: cell-level AP is unavailable. Shown: the "
                "image model's OOF AP against the image labels and the combination's OOF proxy.</p>")
        numbers["image_oof_ap"] = image_oof["per_class"] if image_oof else None
    plot_ap_bars(out / "img" / "ap_per_class.png", series, counts, title)
    html = [lead, '<div class="side"><img class="plot" src="img/ap_per_class.png" alt="AP per class">',
            table(head, rows, numeric=[False] + [True] * (len(head) - 1), cls="perclass"), "</div>"]
    if curves:
        plot_pr_grid(out / "img" / "pr_curves.png", curves, pr_title)
        html.append(f'<h3 id="pr">PR curves</h3><img class="plot" src="img/pr_curves.png" alt="{esc(pr_title)}">')
    return "".join(html), numbers


def section_combine(files: RunFiles) -> str:
    c = files.combine
    if not c:
        return f"<p class=\"note\">no combine.yaml: the run uses {esc(files.spec.name)} from its config.</p>"
    chosen = c.get("name", files.spec.name)
    rows, classes = [], []
    best = c.get("score")
    for i, r in enumerate(c.get("ranking") or [], start=1):
        score = r.get("score")
        rows.append((i, r.get("name"), score, None if score is None or best is None else score - best))
        classes.append("chosen" if r.get("name") == chosen else "")
    base = c.get("baselines") or {}
    for name in ("cell_only", "image_only"):
        if name in base:
            rows.append(("baseline", name, base[name], None if base[name] is None or best is None else base[name] - best))
            classes.append("")
    kind = c.get("score_kind", "")
    head = (f"<p>Chosen on out-of-fold predictions: <b>{esc(chosen)}</b>, {esc(kind)} {fmt(best)} over "
            f"{esc(c.get('n_candidates', '?'))} candidates, {esc(c.get('n_cells', '?'))} cells of "
            f"{esc(c.get('n_images', '?'))} images.</p>")
    notes = "".join(f'<p class="note">note: {esc(n)}</p>' for n in c.get("notes") or [])
    return head + table(["rank", "combination", f"OOF {kind}", "vs chosen"], rows,
                        numeric=[True, False, True, True], row_class=classes, cls="ranking") + notes


def section_training(files: RunFiles, out: Path) -> str:
    html = []
    if plot_epochs(out / "img" / "epochs.png", files.epochs):
        html.append('<img class="plot" src="img/epochs.png" alt="validation curves per fold">')
    links = []
    for kind in ("cell", "image"):
        for d in sorted((files.run_dir / kind).glob("fold*")):
            plots = [_link(p, out, p.stem.replace("_", " ")) for p in sorted(d.glob("*.png"))]
            extra = [_link(p, out) for p in (d / "epochs.csv", d / "oof.csv") if p.is_file()]
            if plots or extra:
                links.append(f"<li>{esc(kind)} {esc(d.name)}: {', '.join(plots + extra)}</li>")
    if links:
        html.append("<ul>" + "".join(links) + "</ul>")
    return "".join(html) or '<p class="note">no training outputs found.</p>'


def section_analysis(files: RunFiles, out: Path) -> str:
    """`kit analyze` of the dataset's labels into OUT/analysis (redone only when train.csv
    changed), linked."""
    from kit.analyze import analyze
    from kit.folds import file_sha256

    folder = out / "analysis"
    stamp = folder / "analysis.json"
    labels = Path(files.manifest.labels_file)
    digest = file_sha256(labels)
    try:
        made = json.loads(stamp.read_text())
    except (OSError, ValueError):
        made = {}
    listed = made.get("files") or {}
    if made.get("labels_sha256") != digest or not all((folder / n).is_file() for n in listed.values()):
        try:
            result = analyze(files.data_dir, folder)
        except KitError as exc:
            return f'<p class="warn">kit analyze failed: {esc(exc)}</p>'
        listed = {name: p.name for name, p in result.files.items()}
        with atomic_open(stamp, "w") as f:
            json.dump({"labels": str(labels), "labels_sha256": digest, "files": listed}, f, indent=2)
    items = "".join(f"<li>{_link(folder / n, out, name)}</li>" for name, n in listed.items())
    return f"<p><code>kit analyze {esc(files.data_dir)}</code> (the labels of the train images):</p><ul>{items}</ul>"


EXTRA_CSS = """
.field { display: flex; align-items: flex-start; gap: 16px; margin: 18px 0; padding-bottom: 12px; border-bottom: 1px solid #eaeef2; }
.fieldpic { position: relative; flex: none; }
.fieldpic img { display: block; image-rendering: pixelated; }
.tag { position: absolute; transform: translate(-50%, -50%); font: 9px/1.1 system-ui, sans-serif; color: #fff;
       background: rgba(0,0,0,.62); border: 1px solid; border-radius: 3px; padding: 0 2px; white-space: nowrap;
       pointer-events: auto; }
.tag:hover { z-index: 5; background: #000; }
#hidetags:checked ~ .fields .tag { display: none; }
.fieldinfo { font-size: 12px; min-width: 380px; }
table.cells td { font-size: 11px; padding: 1px 5px; }
table.cells td:first-child { white-space: nowrap; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 4px; border: 1px solid #555; }
.strip { margin: 4px 0 14px; }
.strip img { display: block; image-rendering: pixelated; }
.caps { display: flex; gap: 4px; }
.cap { width: 80px; font-size: 10px; line-height: 1.15; color: #333; overflow-wrap: anywhere; }
.legend span { margin-right: 14px; }
.side { display: flex; gap: 16px; align-items: flex-start; }
.side img { flex: none; }
"""


def _legend(has_truth: bool) -> str:
    if not has_truth:
        return ('<p class="legend"><span><span class="swatch" style="background:rgb(255,255,255)"></span>'
                'predicted cell (no truth to compare with)</span></p>')
    items = [("right: of the field's true classes, the cell's most confident is one of its labels", RIGHT),
             ("wrong: it is not", WRONG), ("no true cell at IoU &ge; 0.6", NO_TRUE_CELL)]
    return ('<p class="legend">' + "".join(f'<span><span class="swatch" style="background:rgb{c}"></span>{t}</span>'
                                           for t, c in items) + "</p>"
            '<p class="note">The metric ranks each class over the cells of the fields whose truth has it and '
            "ignores it elsewhere, so a cell is judged on its field's true classes; the tags and the table show "
            "its top classes over all 19.</p>")


class _Clock:
    """Wall and CPU seconds of each part of the report (written to report.json)."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, float]] = {}
        self._start = (time.perf_counter(), time.process_time())

    @contextlib.contextmanager
    def part(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.parts[name] = {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}

    def total(self) -> dict[str, float]:
        return {"wall_s": round(time.perf_counter() - self._start[0], 3),
                "cpu_s": round(time.process_time() - self._start[1], 3)}


def _gallery(files: RunFiles, cells: CellScores, pictures: "FieldPictures", out: Path) -> tuple[str, list]:
    chosen = choose_fields(cells)
    fields_html = "".join(render_field(files, cells, pictures, i, cls, out) for i, cls in chosen)
    covered = sorted({c for _, cls in chosen for c in cls})
    html = (_legend(cells.has_truth)
            + f"<p>{len(chosen)} fields covering {len(covered)} classes: "
            + esc(", ".join(SHORT_NAMES[c] for c in covered)) + ". Tags: the cell number, then its two top classes and combined confidences "
            "(hover for the class names); the table lists the top three.</p>"
            '<input type="checkbox" id="hidetags"> <label for="hidetags">hide tags</label>'
            f'<div class="fields">{fields_html}</div>')
    return html, chosen


def _errors(cells: CellScores, pictures: "FieldPictures", out: Path) -> str:
    # with truth: the classes with true cells; without: every class (the submission ranks them all)
    classes = [c for c in range(NUM_CLASSES) if cells.n_pos[c] > 0] if cells.has_truth else \
        (list(range(NUM_CLASSES)) if len(cells.scores) else [])
    strips = render_tiles(pictures, tile_requests(cells, classes), out)
    blocks = []
    for c in classes:
        if cells.has_truth:
            fp, miss = strips.get(f"fp{c}"), strips.get(f"miss{c}")
            blocks.append(f"<h3>{esc(class_label(c))}</h3><div class=\"grid\">"
                          + f"<div><p>most confident false positives</p>{fp or '<p>none</p>'}</div>"
                          + f"<div><p>true cells given the lowest confidence</p>{miss or '<p>none</p>'}</div></div>")
        elif strips.get(f"top{c}"):
            blocks.append(f"<h3>{esc(class_label(c))}</h3><p>cells ranked highest for the class</p>{strips[f'top{c}']}")
    lead = ("<p>Per class: the predicted cells with the highest confidence for the class whose true cell lacks it "
            "(outline magenta; orange: no true cell), and the true cells with the class that got the lowest "
            "confidence (outline orange: the true cell's mask). Captions: confidence for the class, rank among "
            "the class's scored cells, the cell's true labels.</p>" if cells.has_truth else
            "<p>No cell truth: per class, the cells the model ranks highest (the top of the submission).</p>")
    return lead + "".join(blocks)


def write_report(run_dir: str | Path, images: str | Path | None = None, out: str | Path | None = None, *,
                 workers: int = 1, progress: bool = False) -> Path:
    """Write the run's report (see the module doc); returns the path of ``index.html``."""
    clock = _Clock()
    with clock.part("read"):
        files = read_run(run_dir, images, workers=workers, progress=progress)
        out = Path(out) if out is not None else files.run_dir / REPORT_DIR
        (out / "img").mkdir(parents=True, exist_ok=True)
    with clock.part("score"):
        cells = score_cells(files)
        image_oof = image_level_oof(files)
    pictures = FieldPictures(files, cells)
    sections: list[tuple[str, str, str]] = []
    with clock.part("plots"):
        sections.append(("scores", "Scores", section_scores(files, cells)))
        per_class_html, numbers = section_per_class(files, cells, image_oof, out)
        sections.append(("perclass", "Per class", per_class_html))
        sections.append(("combine", "Combination", section_combine(files)))
    with clock.part("gallery"):
        gallery_html, chosen = _gallery(files, cells, pictures, out)
        sections.append(("gallery", "Gallery", gallery_html))
    with clock.part("tiles"):
        sections.append(("errors", "Errors" if cells.has_truth else "Top cells", _errors(cells, pictures, out)))
    with clock.part("training"):
        sections.append(("training", "Training", section_training(files, out)))
        sections += [("data", "Data", section_data(files, cells)), ("folds", "Folds", section_folds(files, out)),
                     ("timings", "Timings", section_timings(files)), ("settings", "Settings", section_settings(files, out))]
    with clock.part("analysis"):
        sections.append(("analysis", "Dataset analysis", section_analysis(files, out)))
    s = files.summary
    oof = s.get("oof") or {}
    headline = (f"combined test mAP {fmt(s.get('combined'))}, " if s.get("combined") is not None else "") + \
        f"OOF {esc(oof.get('score_kind', files.combine.get('score_kind', '')))} {fmt(oof.get('overall', files.combine.get('score')))}"
    subtitle = (f"{esc(files.run_dir)} &middot; {headline} &middot; combination {esc(files.spec.name)} "
                f"&middot; written {time.strftime('%Y-%m-%d %H:%M')} in {clock.total()['wall_s']:.1f} s")
    body = "".join(f'<section id="{a}"><h2>{esc(t)}</h2>{h}</section>' for a, t, h in sections)
    text = page(f"kit report: {files.run_dir.name}", body, subtitle=subtitle,
                nav=[(a, t) for a, t, _ in sections], css=EXTRA_CSS)
    path = out / PAGE_NAME
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    covered = sorted({c for _, cls in chosen for c in cls})
    with atomic_open(out / "report.json", "w") as f:
        json.dump({"page": PAGE_NAME, "fields": [i for i, _ in chosen], "classes_covered": covered,
                   "time": clock.total(), "parts": clock.parts, **numbers}, f, indent=2)
    return path


# --------------------------------------------------------------------------------------------
# command


def configure_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder (config.yaml, fold models, summary.json)")
    parser.add_argument("--images", type=Path, help="folder of images to show (default: the dataset's test/); "
                        "predicted with the run's models when not yet in its predict cache")
    parser.add_argument("--out", type=Path, help="output folder (default RUN/report)")
    parser.add_argument("--workers", type=int, default=1, help="segmentation workers for images not yet segmented")
    parser.set_defaults(func=_run_report)


def _run_report(args) -> int:
    path = write_report(args.run, args.images, args.out, workers=args.workers, progress=True)
    print(f"wrote {path}")
    return 0
