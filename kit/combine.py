"""Combine per-cell and per-image class probabilities into one confidence per (cell, class).

The competition scores every (cell mask, class, confidence) triple, ranked per class over the
whole test set, so a cell's confidence should say both "this field shows class c" (the image
model sees the whole field, it is the strong signal) and "this particular cell shows it" (the
cell model; a field mixes positive and negative cells). The strategies:

========== ====================================================================================
strategy   confidence of class c for a cell (``cell`` = cell probability, ``image`` = the
           probability of its field, broadcast to every cell of the field)
========== ====================================================================================
cell_only  ``cell``
image_only ``image`` (the common public baseline: every cell gets the field's scores)
product    ``cell * image``
geometric  ``cell**w * image**(1-w)`` (weighted geometric mean; product is its ranking at w=0.5)
mean       ``w*cell + (1-w)*image``
rank       ``w*rank(cell) + (1-w)*rank(image)``; ranks per class over all cells given, in (0, 1]
field      ``w*cell + (1-w)*mean(cell over the cell's field)`` (8th place: w = 0.9); needs the
           field of every cell (`groups`), and uses no image model
========== ====================================================================================

Negative (class 18, "no location stained") is handled explicitly, because it is the complement
of the other classes rather than a location of its own:

* ``model``: the strategy applied to class 18 like any other class;
* ``max``: the largest of the cell and the image Negative probability;
* ``complement``: one minus the largest combined location score (classes 0..17), which is
  min over c of (1 - p_c) on the combined scores (23rd place, +0.006);
* ``min_complement``: min over c of (1 - p_c) on the *cell* probabilities alone: Negative when no
  location is likely in this cell, whatever its field shows;
* ``suppress``: Negative as ``model``, and every location score multiplied by ``1 - Negative``
  (``p[0:18] *= 1 - p[18]``, 6th place, +0.003).

Unstained cells (``unstained = t``, 0 = off): a cell whose protein (green) signal is far below its
field's stained cells shows no location, whatever its field shows; models trained on image labels
cannot learn that, since every cell of a positive field is labelled positive. With ``s`` the cell's
mean green over the 0.9 quantile of its field's cells (`stain_fraction`) and ``d = clip(1 - s / t,
0, 1)``: Negative becomes ``max(Negative, d)`` and every location score is multiplied by ``1 - d``.
Cells at or above ``t`` of the field's stained level are untouched (``t = 0.3``: on the four real
2021 train fields the dimmest cell of a positive field is at 0.41; the synthetic Negative cells of a
positive field are at a median of 0.02-0.04).

Border cells (cut by the field edge) are down-weighted: every score is multiplied by
``visible ** border_power`` where ``visible`` is the visible fraction of the cell (from the cell
table: ``nucleus_visible_fraction`` when the segmenter reports it, else ``area / median area``
for cells touching the border, capped at 1; 1 for interior cells). ``border_power = 0`` turns
it off.

The cell policy's area scaling (`kit.cell_policy.confidence_scale`) multiplies the result like
the border power; cells the policy drops get no triples at all.

`tune` sweeps every strategy, weight, Negative mode, border power and unstained threshold (0,
``UNSTAINED`` and 0.5) on out-of-fold predictions and returns them ranked; ``python -m kit
tune-combine --run RUN_DIR`` does it for a run and writes the choice into ``RUN_DIR/combine.yaml`` (which `kit.predict` reads; the run's config.yaml
is its input and is never rewritten). The choice must not be noise: the simple default
(`DEFAULT_SPEC`: product, the winners' choice, Negative from the models, the unstained rule at
``UNSTAINED``) is kept unless the best candidate beats it on the concatenated OOF set by more than
the fold-to-fold spread (standard deviation of the default's per-fold scores); ``reason`` in
combine.yaml says which happened:

.. code-block:: yaml

    strategy: geometric
    weight: 0.4
    negative: max
    border_power: 0.5
    score: 0.6123              # OOF score of this choice
    reason: "best candidate ... beats the default product by 0.031 > fold spread 0.012"
    score_kind: cell_mAP       # or image_macro_AP (proxy; no per-cell truth)
    ranking: [...]             # the best few other choices and their scores

Score used for the choice, in order of preference:

* ``cell_mAP``: where per-cell truth exists (synthetic data: ``DIR/train_solution.csv`` +
  ``DIR/truth/``), the competition metric itself on the OOF images: predicted cells (from the
  mask cache) matched to true cells at IoU >= 0.6, AP per class over all OOF cells, mean over
  classes present. With non-overlapping masks on both sides the IoU >= 0.6 match of a predicted
  cell is unique and independent of confidence, so it is computed once and every candidate costs
  only a sort per class.
* ``image_macro_AP``: otherwise (real data has image labels only) a proxy: each image's score
  for class c is the largest combined score of its cells, scored by macro AP against the image
  labels. It cannot tell a right cell from a wrong cell of the same field; say so when reporting.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from kit.errors import ConfigError, DataError, KitError, clip
from kit.labels import NEGATIVE, NUM_CLASSES

STRATEGIES: tuple[str, ...] = ("cell_only", "image_only", "product", "geometric", "mean", "rank", "field")
# The default sweep leaves out the rank blend: ranks are relative to the set they are taken over,
# and the OOF set mixes K single-fold models while the test set gets their average, so a rank
# weight chosen on OOF transferred worst to the test set in the demo runs (choose it with
# ``tune-combine --strategies ...,rank``).
DEFAULT_STRATEGIES: tuple[str, ...] = ("cell_only", "image_only", "product", "geometric", "mean", "field")
WEIGHTED: frozenset[str] = frozenset({"geometric", "mean", "rank", "field"})
NEGATIVE_MODES: tuple[str, ...] = ("model", "max", "complement", "min_complement", "suppress")
EPS = 1e-6


@dataclass(frozen=True)
class CombineSpec:
    """One combination: strategy, weight of the cell score, Negative mode, border power."""

    strategy: str = "geometric"
    weight: float = 0.5
    negative: str = "model"
    border_power: float = 0.0
    unstained: float = 0.0  # stain fraction below which a cell counts as unstained (0 = off)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"combine strategy {clip(self.strategy)} is not one of {', '.join(STRATEGIES)}")
        if self.negative not in NEGATIVE_MODES:
            raise ConfigError(f"combine negative mode {clip(self.negative)} is not one of {', '.join(NEGATIVE_MODES)}")
        if not 0.0 <= float(self.weight) <= 1.0:
            raise ConfigError(f"combine weight {self.weight} outside [0, 1]")
        if float(self.border_power) < 0:
            raise ConfigError(f"combine border_power {self.border_power} is negative")
        if not 0.0 <= float(self.unstained) < 1.0:
            raise ConfigError(f"combine unstained {self.unstained} outside [0, 1)")

    @property
    def name(self) -> str:
        """Short readable name, e.g. ``geometric(w=0.4) neg=max border^0.5``."""
        text = self.strategy + (f"(w={self.weight:g})" if self.strategy in WEIGHTED else "")
        if self.negative != "model":
            text += f" neg={self.negative}"
        if self.border_power:
            text += f" border^{self.border_power:g}"
        if self.unstained:
            text += f" unstained<{self.unstained:g}"
        return text

    def to_dict(self) -> dict:
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict | None) -> "CombineSpec":
        data = dict(data or {})
        known = {k: data[k] for k in ("strategy", "weight", "negative", "border_power", "unstained") if k in data}
        for key in ("weight", "border_power", "unstained"):
            if key in known:
                known[key] = float(known[key])
        return cls(**known)


CELL_ONLY = CombineSpec("cell_only")
IMAGE_ONLY = CombineSpec("image_only")


# --------------------------------------------------------------------------------------------
# combination


def _check_probs(name: str, probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES:
        raise ValueError(f"{name}: expected N x {NUM_CLASSES} probabilities, got shape {probs.shape}")
    return probs


def broadcast_image_probs(cell_image_ids: Sequence[str], image_ids: Sequence[str], image_probs: np.ndarray) -> np.ndarray:
    """Image probabilities (one row per image id) -> one row per cell, by the cell's image id."""
    image_probs = _check_probs("image_probs", image_probs)
    index = {str(i): r for r, i in enumerate(image_ids)}
    rows = []
    for i in cell_image_ids:
        try:
            rows.append(index[str(i)])
        except KeyError:
            raise DataError(f"no image-level prediction for image {i}") from None
    return image_probs[np.asarray(rows, dtype=np.int64)] if rows else np.zeros((0, NUM_CLASSES))


def rank01(values: np.ndarray) -> np.ndarray:
    """Per column, the average rank of each value scaled to (0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values.copy()
    return rankdata(values, axis=0, method="average") / len(values)


def visible_fraction(table) -> np.ndarray:
    """Visible fraction of each cell (1 = whole cell in the field) from a cell table DataFrame.

    Uses ``nucleus_visible_fraction`` when present; cells touching the border without it get
    ``min(1, area / median interior area)``; interior cells 1.
    """
    n = len(table)
    if n == 0:
        return np.ones(0)
    cols = set(table.columns)
    vis = np.ones(n, dtype=np.float64)
    border = np.asarray(table["touches_border"], dtype=bool) if "touches_border" in cols else np.zeros(n, bool)
    if "nucleus_visible_fraction" in cols:
        vis = np.asarray(table["nucleus_visible_fraction"], dtype=np.float64).copy()
        vis[~np.isfinite(vis)] = 1.0
    if "area" in cols and border.any():
        area = np.asarray(table["area"], dtype=np.float64)
        ref = area[~border] if (~border).any() else area
        med = float(np.median(ref)) if len(ref) else 0.0
        if med > 0:
            by_area = np.minimum(1.0, area / med)
            # the smaller of the two: a cell can keep its nucleus but lose most of its cytoplasm
            vis = np.where(border, np.minimum(vis, by_area), vis)
    return np.clip(vis, 0.0, 1.0)


# The unstained rule's default threshold. On the learning benchmark 0.5 scored a little higher than 0.3
# on all six datasets (+0.0076 mean; README "The unstained rule"), but 0.5 reaches stained cells of
# the real positive fields we have (dimmest at 0.41-0.49) and 0.3 none of them, and the synthetic
# Negative cells are dimmer than real ones may be; 0.3 is the default, 0.5 a tune-combine candidate.
UNSTAINED = 0.3
STAIN_QUANTILE = 0.9  # the field's stained level: robust to one bright cell or a debris-covered one


def stain_fraction(table) -> np.ndarray:
    """Each cell's mean green (the protein) over the `STAIN_QUANTILE` of its field's cells' (1 = as
    stained as the field's well-stained cells). `table`: one field's cell table, or several with an
    ``ID`` column; without a ``mean_green`` column (a table made without the image) every cell gets 1,
    which turns the unstained rule off."""
    n = len(table)
    if n == 0 or "mean_green" not in table.columns:
        return np.ones(n)
    green = np.asarray(table["mean_green"], dtype=np.float64)
    out = np.ones(n)
    codes = (np.unique(table["ID"].to_numpy(), return_inverse=True)[1].ravel() if "ID" in table.columns
             else np.zeros(n, np.int64))
    for g in range(int(codes.max()) + 1):
        rows = np.flatnonzero(codes == g)
        ref = float(np.quantile(green[rows], STAIN_QUANTILE))
        if ref > 0 and np.isfinite(ref):
            out[rows] = green[rows] / ref
    out[~np.isfinite(out)] = 1.0
    return out


def apply_unstained(values: np.ndarray, stain: np.ndarray, threshold: float) -> np.ndarray:
    """The unstained rule in place on N x 19 `values` (scores, or training targets): with
    ``d = clip(1 - stain / threshold, 0, 1)``, Negative becomes ``max(Negative, d)`` and every
    location is multiplied by ``1 - d``. Returns `values`."""
    st = np.asarray(stain, dtype=np.float64)
    if st.shape != (len(values),):
        raise ValueError(f"stain has shape {st.shape}, expected ({len(values)},)")
    d = np.clip(1.0 - st / float(threshold), 0.0, 1.0).astype(values.dtype)
    values[:, NEGATIVE] = np.maximum(values[:, NEGATIVE], d)
    values[:, :NEGATIVE] *= (1.0 - d)[:, None]
    return values


def field_mean(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per row, the mean of `values` over the rows of the same group (field)."""
    groups = np.asarray(groups)
    if len(groups) != len(values):
        raise ValueError(f"groups has {len(groups)} entries for {len(values)} cells")
    codes = np.unique(groups, return_inverse=True)[1].ravel()
    sums = np.zeros((codes.max() + 1 if len(codes) else 0, values.shape[1]))
    np.add.at(sums, codes, values)
    counts = np.bincount(codes, minlength=len(sums)).astype(np.float64)
    return (sums / np.maximum(counts, 1)[:, None])[codes]


def combine(
    cell_probs: np.ndarray,
    image_probs: np.ndarray,
    spec: CombineSpec,
    visible: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    stain: np.ndarray | None = None,
) -> np.ndarray:
    """Combined N x 19 confidences for N cells (see the module doc for each strategy).

    `image_probs` is already broadcast (one row per cell, see `broadcast_image_probs`).
    `visible` (length N, in [0, 1]) is used when ``spec.border_power > 0``. The rank strategy
    ranks over the N cells given, so give it all the cells that will be scored together.
    `groups` (length N: the field of each cell, e.g. its image ID) is needed by ``field``;
    `scale` (length N, e.g. the cell policy's area factor) multiplies every score; `stain` (length N,
    `stain_fraction`) is needed by ``spec.unstained > 0``.
    """
    cell = _check_probs("cell_probs", cell_probs)
    image = _check_probs("image_probs", image_probs)
    if cell.shape != image.shape:
        raise ValueError(f"cell_probs {cell.shape} and image_probs {image.shape} differ")
    w = float(spec.weight)
    s = spec.strategy
    if s == "cell_only":
        out = cell.copy()
    elif s == "image_only":
        out = image.copy()
    elif s == "product":
        out = cell * image
    elif s == "geometric":
        # in log space: exact for w in {0, 1}, no 0**0 surprises
        out = np.exp(w * np.log(np.clip(cell, EPS, 1.0)) + (1.0 - w) * np.log(np.clip(image, EPS, 1.0)))
    elif s == "mean":
        out = w * cell + (1.0 - w) * image
    elif s == "field":
        if groups is None:
            raise ValueError("the field strategy needs the field (groups) of every cell")
        out = w * cell + (1.0 - w) * field_mean(cell, groups) if len(cell) else cell.copy()
    else:  # rank
        out = w * rank01(cell) + (1.0 - w) * rank01(image)
    if len(out):
        if spec.negative == "max":
            out[:, NEGATIVE] = np.maximum(cell[:, NEGATIVE], image[:, NEGATIVE])
        elif spec.negative == "complement":
            out[:, NEGATIVE] = 1.0 - out[:, :NEGATIVE].max(axis=1)
        elif spec.negative == "min_complement":
            out[:, NEGATIVE] = (1.0 - cell[:, :NEGATIVE]).min(axis=1)
        elif spec.negative == "suppress":
            out[:, :NEGATIVE] *= 1.0 - np.clip(out[:, NEGATIVE:NEGATIVE + 1], 0.0, 1.0)
    if spec.unstained and len(out):
        if stain is None:
            raise ValueError("the unstained rule needs the stain fraction (stain) of every cell")
        apply_unstained(out, stain, spec.unstained)
    if scale is not None and len(out):
        sc = np.asarray(scale, dtype=np.float64)
        if sc.shape != (len(out),):
            raise ValueError(f"scale has shape {sc.shape}, expected ({len(out)},)")
        out = out * sc[:, None]
    if spec.border_power and visible is not None and len(out):
        vis = np.clip(np.asarray(visible, dtype=np.float64), 0.0, 1.0)
        if vis.shape != (len(out),):
            raise ValueError(f"visible has shape {vis.shape}, expected ({len(out)},)")
        out = out * (vis ** float(spec.border_power))[:, None]
    return out


# --------------------------------------------------------------------------------------------
# scoring on out-of-fold predictions


@dataclass
class OOFSet:
    """Out-of-fold cells of a run, ready to score combinations (built by `load_oof`).

    Rows are cells, grouped by image in sorted image-ID order and in cell-table order within an
    image: the order `kit.predict` writes triples in, so equal confidences are tie-broken exactly
    as `kit.metric` does (by image ID, then position in the row).

    ``score_kind == "cell_mAP"``: `truth` (N x 19) holds the labels of the true cell each
    predicted cell matches at IoU >= 0.6 (zeros when none), `verified` (N x 19) whether the class
    is among its image's true labels (the metric ignores detections of other classes), and
    `image_n_pos` (M x 19) the true (cell, class) pairs of every OOF image, matched or not.
    ``score_kind == "image_macro_AP"``: `image_labels` (M x 19) are the image labels (proxy).
    """

    image_ids: np.ndarray
    cell_ids: np.ndarray
    folds: np.ndarray
    cell_probs: np.ndarray
    image_probs: np.ndarray
    visible: np.ndarray
    images: np.ndarray
    image_folds: np.ndarray
    score_kind: str = "cell_mAP"
    truth: np.ndarray | None = None
    verified: np.ndarray | None = None
    image_n_pos: np.ndarray | None = None
    image_labels: np.ndarray | None = None
    image_level_probs: np.ndarray | None = None  # M x 19 image-model OOF probabilities
    notes: list[str] = field(default_factory=list)
    scale: np.ndarray | None = None  # N: the cell policy's confidence factor (None = 1)
    image_source: str = "field"  # where image_probs came from: field | bag | mean
    stain: np.ndarray | None = None  # N: stain fraction (kit.combine.stain_fraction; None = 1)

    def __len__(self) -> int:
        return len(self.cell_ids)

    def subset(self, fold: int) -> "OOFSet":
        """The cells and images of one fold."""
        rows = self.folds == fold
        imgs = self.image_folds == fold
        pick = lambda a, m: None if a is None else a[m]  # noqa: E731
        return OOFSet(
            self.image_ids[rows], self.cell_ids[rows], self.folds[rows], self.cell_probs[rows],
            self.image_probs[rows], self.visible[rows], self.images[imgs], self.image_folds[imgs],
            self.score_kind, pick(self.truth, rows), pick(self.verified, rows), pick(self.image_n_pos, imgs),
            pick(self.image_labels, imgs), pick(self.image_level_probs, imgs), list(self.notes),
            pick(self.scale, rows),
            stain=pick(self.stain, rows),
        )

    def select(self, rows: np.ndarray) -> "OOFSet":
        """The same images with only the cells where `rows` (bool, N) is true (a cell policy that
        drops cells: the dropped cells' true positives stay counted, as missed)."""
        rows = np.asarray(rows, bool)
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return dataclasses.replace(
            self, image_ids=self.image_ids[rows], cell_ids=self.cell_ids[rows], folds=self.folds[rows],
            cell_probs=self.cell_probs[rows], image_probs=self.image_probs[rows], visible=self.visible[rows],
            truth=pick(self.truth), verified=pick(self.verified), scale=pick(self.scale), notes=list(self.notes),
            stain=pick(self.stain))

    def combined(self, spec: CombineSpec) -> np.ndarray:
        stain = self.stain if self.stain is not None else np.ones(len(self.cell_ids))
        return combine(self.cell_probs, self.image_probs, spec, self.visible, groups=self.image_ids, scale=self.scale,
                       stain=stain)

    def per_class(self, spec: CombineSpec) -> np.ndarray:
        """Per-class AP (NaN for classes without truth) of `spec` on this set."""
        scores = self.combined(spec)
        if self.score_kind == "cell_mAP":
            return cell_ap_per_class(scores, self.truth, self.verified, self.image_n_pos.sum(axis=0))
        return image_proxy_per_class(scores, self.image_ids, self.images, self.image_labels)

    def score(self, spec: CombineSpec) -> float:
        """mAP over classes with truth (the choice criterion of `tune`)."""
        ap = self.per_class(spec)
        present = ~np.isnan(ap)
        return float(ap[present].mean()) if present.any() else float("nan")


def cell_ap_per_class(scores: np.ndarray, truth: np.ndarray, verified: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """Competition AP per class of per-cell `scores` whose IoU match is already known.

    As `kit.metric`: confidences are compared as the float32 the submission stores, detections of a
    class not verified on the image are ignored, ties keep row order.
    """
    from kit.metric import average_precision as voc_ap
    from kit.metric import precision_recall

    scores = np.asarray(scores, dtype=np.float32)
    ap = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        if n_pos[c] <= 0:
            continue
        sel = verified[:, c]
        precision, recall = precision_recall(scores[sel, c], truth[sel, c], int(n_pos[c]))
        ap[c] = voc_ap(precision, recall)
    return ap


def image_proxy_per_class(scores: np.ndarray, cell_image_ids: np.ndarray, images: np.ndarray,
                          image_labels: np.ndarray) -> np.ndarray:
    """Per-class AP of each image's largest cell score against its image labels (the proxy)."""
    from kit.metric import classification_ap

    index = {str(i): k for k, i in enumerate(images)}
    rows = np.array([index[str(i)] for i in cell_image_ids], dtype=np.int64)
    per_image = np.full((len(images), scores.shape[1]), -np.inf)
    np.maximum.at(per_image, rows, scores)
    keep = np.isfinite(per_image).all(axis=1)  # images without cells have no prediction
    if not keep.any():
        return np.full(scores.shape[1], np.nan)
    result = classification_ap(np.asarray(image_labels)[keep], per_image[keep])
    return np.array([np.nan if v is None else v for v in result["per_class"]])


def _read_oof_folder(run_dir: Path, kind: str, name: str = "oof.csv"):
    import pandas as pd

    frames = []
    for path in sorted((run_dir / kind).glob(f"fold*/{name}")):
        suffix = path.parent.name[4:]
        if not suffix.isdigit():
            continue
        df = pd.read_csv(path, dtype={"ID": str})
        missing = [c for c in [f"p{c}" for c in range(NUM_CLASSES)] if c not in df.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        df["fold"] = int(suffix)
        frames.append(df)
    if not frames:
        raise KitError(f"no {kind} out-of-fold predictions under {run_dir / kind}/fold*/{name}: train the {kind} model first")
    return pd.concat(frames, ignore_index=True)


def image_sources(run_dir: Path, cell_dir: str) -> dict[str, Path]:
    """The image-score sources a run has: ``field`` (the image model), ``bag`` (the MIL bag head)."""
    found = {}
    if any((run_dir / "image").glob("fold*/oof.csv")):
        found["field"] = run_dir / "image"
    if any((run_dir / cell_dir).glob("fold*/oof_bag.csv")):
        found["bag"] = run_dir / cell_dir
    return found


def resolve_image_source(source: str, available: Sequence[str]) -> str:
    """``auto`` -> ``field`` (the image model) when there is one, else ``bag`` (a MIL run without an
    image model). Not ``mean``: it lost to ``field`` on the held-out seeds of bench_learning."""
    available = set(available)
    if source == "auto":
        if not available:
            raise KitError("no image-level predictions: train the image model (or the cell model with train.cell_mode=mil)")
        return "field" if "field" in available else "bag"
    need = {"field", "bag"} if source == "mean" else {source}
    if not need <= available:
        raise ConfigError(f"predict.image_source={source} but the run has {', '.join(sorted(available)) or 'no'} "
                          "image-level predictions (field: the image model; bag: train.cell_mode=mil)")
    return source


def _image_oof(run_dir: Path, cell_dir: str, source: str):
    """Image-level OOF table (index ID; p0..p18, fold) of the chosen source."""
    found = image_sources(run_dir, cell_dir)
    source = resolve_image_source(source, found)
    frames = []
    for name in (("field", "bag") if source == "mean" else (source,)):
        df = _read_oof_folder(run_dir, found[name].name, "oof.csv" if name == "field" else "oof_bag.csv")
        if df["ID"].duplicated().any():
            dup = df["ID"][df["ID"].duplicated()].iloc[0]
            raise DataError(f"image {dup} is out-of-fold in two folds of {found[name]}: are the folds consistent?")
        frames.append(df.set_index("ID"))
    out = frames[0]
    if len(frames) == 2:
        other = frames[1].reindex(out.index)
        out = out.copy()
        out[PROB_COLUMNS] = 0.5 * (out[PROB_COLUMNS].to_numpy() + other[PROB_COLUMNS].fillna(out[PROB_COLUMNS]).to_numpy())
    return out, source


PROB_COLUMNS = [f"p{c}" for c in range(NUM_CLASSES)]


def load_oof(run_dir: str | Path, cfg=None, progress: bool = True, truth: bool | None = None,
             cell_dir: str | None = None, image_source: str | None = None, policy=None) -> OOFSet:
    """Read a run's OOF predictions, its mask cache and (when present) the per-cell truth.

    The run's inputs come from its manifest (`kit.manifest.read_manifest`): truth is
    ``<data_dir>/train_solution.csv`` (synthetic data, or any data with cell annotations in the
    submission format); without it (or with ``truth=False``) the set scores with the image-level
    proxy. The predicted cells are those of the run's mask cache; labels from its labels file.
    Its settings come from `cfg` (default: the run's config.yaml): `cell_dir`, the cell model's
    folder (default: the last pseudo-label round, `kit.pseudo`); `image_source`: field | bag |
    mean | auto (default ``predict.image_source``); `policy`: the cell policy (default the run's
    ``cells`` section): dropped cells are left out, the area factor goes into ``scale``.
    """
    from tqdm import tqdm

    from kit.labels import read_labels_csv
    from kit.manifest import read_manifest
    from kit.masks import truth_from_solution
    from kit.matching import match_labels

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if cfg is None:  # the run's settings (config.yaml, written once); its inputs are the manifest's
        from kit.config import load_config

        if not (run_dir / "config.yaml").is_file():
            raise KitError(f"{run_dir / 'config.yaml'} not found: is {run_dir} a run folder?")
        cfg = load_config(run_dir / "config.yaml")
    from kit.cell_policy import confidence_scale, keep_mask
    from kit.pseudo import cell_dir_name

    cell_dir = cell_dir or cell_dir_name(cfg.train.pseudo_rounds)
    policy = cfg.cells if policy is None else policy
    cell_oof = _read_oof_folder(run_dir, cell_dir)
    image_oof, used_source = _image_oof(run_dir, cell_dir, image_source or cfg.predict.image_source)
    lost = sorted(set(cell_oof["ID"]) - set(image_oof.index))
    if lost:
        raise DataError(f"{len(lost)} image(s) have cell OOF predictions but no image OOF prediction, e.g. {lost[0]}: "
                        "train the image model on every fold the cell model has")
    images = np.array(sorted(image_oof.index), dtype=object)
    solution_path = Path(manifest.data_dir) / "train_solution.csv"
    use_truth = solution_path.is_file() if truth is None else (truth and solution_path.is_file())
    notes = []
    solution = None
    if use_truth:
        from kit.submission import read_submission

        solution = read_submission(solution_path)
        missing = [i for i in images if i not in solution]
        if missing:
            raise DataError(f"{solution_path}: {len(missing)} OOF image(s) have no row, e.g. {missing[0]}")
    else:
        notes.append(f"no per-cell truth ({solution_path} absent): scored with the image-level proxy "
                     "(macro AP of each image's largest cell score against its image labels); "
                     "cell-level mAP is unavailable")

    cache = manifest.masks()
    by_image = {k: g for k, g in cell_oof.groupby("ID", sort=False)}
    parts: dict[str, list] = {k: [] for k in ("ids", "cells", "folds", "cp", "vis", "truth", "verified", "scale",
                                                   "stain")}
    image_n_pos = np.zeros((len(images), NUM_CLASSES), np.int64)
    for m, image_id in enumerate(tqdm(images, desc="oof cells", unit="img", disable=not progress, leave=False)):
        g = by_image.get(image_id)
        verified_row = np.zeros(NUM_CLASSES, bool)
        true_labels = classes = None
        if solution is not None:
            true_labels, classes = truth_from_solution(solution[image_id])
            areas = np.bincount(true_labels.ravel(), minlength=len(classes) + 1)
            for k, cls in classes.items():
                verified_row[cls] = True
                if areas[k] > 0:
                    for c in set(cls):
                        image_n_pos[m, c] += 1
        if g is None or len(g) == 0:
            continue
        _, pred_cells, table = cache.load(image_id)
        position = {int(k): r for r, k in enumerate(table["cell_id"].to_numpy())} if len(table) else {}
        unknown = [int(k) for k in g["cell_id"] if int(k) not in position]
        if unknown:
            raise DataError(f"image {image_id}: OOF cell {unknown[0]} is not in the mask cache {cache.dir}: "
                            "were the tiles made from another segmentation (data.mask_cache, data.segment_backend)?")
        g = g.assign(_pos=[position[int(k)] for k in g["cell_id"]]).sort_values("_pos", kind="stable")
        kept = keep_mask(table, policy)
        g = g[kept[g["_pos"].to_numpy()]]  # the policy's dropped cells get no triples
        vis_all = visible_fraction(table)
        stain_all = np.ones(len(table))
        stain_all[kept] = stain_fraction(table[kept])  # over the cells predicted, as kit.predict does
        n = len(g)
        parts["scale"].append(confidence_scale(table, policy, pred_cells.size)[g["_pos"].to_numpy()])
        parts["ids"].append(np.full(n, image_id, dtype=object))
        parts["cells"].append(g["cell_id"].to_numpy(np.int64))
        parts["folds"].append(g["fold"].to_numpy(np.int64))
        parts["cp"].append(g[PROB_COLUMNS].to_numpy(np.float64))
        parts["vis"].append(vis_all[g["_pos"].to_numpy()])
        parts["stain"].append(stain_all[g["_pos"].to_numpy()])
        if solution is not None:
            match = match_labels(pred_cells, true_labels)
            t = np.zeros((n, NUM_CLASSES), bool)
            for r, k in enumerate(g["cell_id"].to_numpy()):
                j = match.get(int(k))
                if j:
                    t[r, classes[j]] = True
            parts["truth"].append(t)
            parts["verified"].append(np.repeat(verified_row[None], n, 0))
    cat = lambda key, shape, dt: np.concatenate(parts[key]) if parts[key] else np.zeros(shape, dt)  # noqa: E731
    image_ids = cat("ids", (0,), object)
    image_level = image_oof.loc[list(images), PROB_COLUMNS].to_numpy(np.float64)
    oof = OOFSet(
        image_ids=image_ids,
        cell_ids=cat("cells", (0,), np.int64),
        folds=cat("folds", (0,), np.int64),
        cell_probs=cat("cp", (0, NUM_CLASSES), np.float64),
        image_probs=broadcast_image_probs(image_ids, list(images), image_level),
        visible=cat("vis", (0,), np.float64),
        images=images,
        image_folds=image_oof.loc[list(images), "fold"].to_numpy(np.int64),
        score_kind="cell_mAP" if solution is not None else "image_macro_AP",
        truth=cat("truth", (0, NUM_CLASSES), bool) if solution is not None else None,
        verified=cat("verified", (0, NUM_CLASSES), bool) if solution is not None else None,
        image_n_pos=image_n_pos if solution is not None else None,
        image_level_probs=image_level,
        notes=notes,
        scale=cat("scale", (0,), np.float64),
        image_source=used_source,
        stain=cat("stain", (0,), np.float64),
    )
    labels = read_labels_csv(manifest.labels_file).set_index("ID")
    from kit.labels import to_multihot

    oof.image_labels = np.stack([to_multihot(labels.loc[i, "labels"]) for i in images]) if len(images) else \
        np.zeros((0, NUM_CLASSES))
    return oof


def candidate_specs(
    strategies: Iterable[str] = DEFAULT_STRATEGIES,
    weights: Iterable[float] = tuple(np.round(np.linspace(0.1, 0.9, 9), 2)),
    negatives: Iterable[str] = NEGATIVE_MODES,
    border_powers: Iterable[float] = (0.0, 0.5, 1.0),
    unstained: Iterable[float] = (0.0, UNSTAINED, 0.5),
) -> list[CombineSpec]:
    """Every combination of the sweep (weights only for the weighted strategies)."""
    specs = []
    weights = [float(w) for w in weights]
    for s, neg, bp in itertools.product(list(strategies), list(negatives), [float(b) for b in border_powers]):
        for w in weights if s in WEIGHTED else [0.5]:
            for u in unstained:
                specs.append(CombineSpec(s, w, neg, bp, float(u)))
    return specs


def tune(oof: OOFSet, specs: Sequence[CombineSpec] | None = None, progress: bool = False) -> list[tuple[CombineSpec, float]]:
    """Score every candidate on the OOF set; returns (spec, score) best first.

    Ties go to the simpler choice (earlier in `specs`: cell_only/image_only/product before the
    weighted ones, Negative ``model`` and no border weighting first).
    """
    specs = list(specs) if specs is not None else candidate_specs()
    # The unstained rule changes nothing when no cell is below its threshold (a run without the
    # green column has stain 1 everywhere): such a candidate scores as its unstained=0 twin and
    # is dropped unscored when that twin is a candidate too (it comes first and would win the
    # tie): with no cell below 0.5, two thirds of the default sweep (thresholds 0 / 0.3 / 0.5).
    low = float(np.min(oof.stain)) if oof.stain is not None and len(oof.stain) else 1.0
    present = set(specs)
    specs = [s for s in specs if not (s.unstained and low >= s.unstained
                                      and dataclasses.replace(s, unstained=0.0) in present)]
    iterator = specs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(specs, desc="tune-combine", unit="cand", leave=False)
    scored = [(spec, oof.score(spec)) for spec in iterator]
    order = sorted(range(len(scored)), key=lambda i: (-_nan_low(scored[i][1]), i))
    return [scored[i] for i in order]


# The simple default: the winners' product (Negative from the models; the complement Negative won on
# 2 of 3 held-out seeds by less than its spread, so it is a candidate of tune-combine), with the
# unstained rule (UNSTAINED) on top: on the learning benchmark's held-out seeds it gained on every seed
# and style, far beyond the spread (README "The unstained rule"). predict.combine_unstained is the
# same default for a run that was never tuned.
DEFAULT_SPEC = CombineSpec("product", unstained=UNSTAINED)


def fold_spread(oof: OOFSet, spec: CombineSpec) -> float:
    """Standard deviation over folds of `spec`'s per-fold OOF score (0 with one fold)."""
    scores = [oof.subset(f).score(spec) for f in sorted(set(int(f) for f in oof.image_folds))]
    scores = [x for x in scores if np.isfinite(x)]
    return float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0


MIN_MARGIN = 0.001  # below a tenth of a mAP point no candidate replaces the default, whatever the spread


def choose(oof: OOFSet, ranking: Sequence[tuple[CombineSpec, float]],
           default: CombineSpec = DEFAULT_SPEC) -> tuple[CombineSpec, float, str]:
    """(spec, score, reason): the best of `ranking` only when it beats `default` on the OOF set by
    more than the default's fold-to-fold spread (and `MIN_MARGIN`); otherwise `default`. Deterministic."""
    best, best_score = ranking[0]
    base = oof.score(default)
    spread = max(fold_spread(oof, default), MIN_MARGIN)
    if not np.isfinite(base):
        return best, best_score, f"the default {default.name} cannot be scored here; best candidate taken"
    margin = best_score - base
    if best != default and margin > spread:
        return best, best_score, (f"{best.name} beats the default {default.name} on OOF by {margin:.4f}, "
                                  f"more than the fold-to-fold spread {spread:.4f}")
    return default, base, (f"kept the default {default.name}: the best candidate {best.name} beats it by "
                            f"{margin:.4f}, not more than the fold-to-fold spread {spread:.4f}")


def _nan_low(x: float) -> float:
    return -math.inf if x is None or np.isnan(x) else x


def oof_report(oof: OOFSet, spec: CombineSpec) -> dict:
    """{"overall", "per_fold", "per_class", "score_kind"} of `spec`; overall is on the concatenated OOF
    (every fold's cells ranked together, as the test set would be), not a mean of the folds."""
    per_class = oof.per_class(spec)
    per_fold = {}
    for fold in sorted(set(int(f) for f in oof.image_folds)):
        per_fold[str(fold)] = _round(oof.subset(fold).score(spec))
    present = ~np.isnan(per_class)
    return {
        "score_kind": oof.score_kind,
        "overall": _round(float(per_class[present].mean()) if present.any() else float("nan")),
        "per_fold": per_fold,
        "per_class": [None if np.isnan(v) else _round(v) for v in per_class],
    }


def image_oof_macro_ap(oof: OOFSet) -> float | None:
    """Image-level macro AP of the image model's OOF probabilities (available on any data)."""
    from kit.metric import classification_ap

    if oof.image_labels is None or oof.image_level_probs is None or not len(oof.images):
        return None
    return classification_ap(oof.image_labels, oof.image_level_probs)["macro"]


def _round(x: float | None, digits: int = 6) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), digits)


# --------------------------------------------------------------------------------------------
# the run's choice: combine.yaml


def combine_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "combine.yaml"


def read_combine_spec(run_dir: str | Path, cfg=None) -> CombineSpec:
    """The run's combination: ``combine.yaml`` when tuned, else the config's predict.combine/_weight/_unstained."""
    import yaml

    path = combine_path(run_dir)
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        try:
            return CombineSpec.from_dict(data)
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if cfg is None:
        return DEFAULT_SPEC
    return CombineSpec(cfg.predict.combine, float(cfg.predict.combine_weight),
                       unstained=float(cfg.predict.combine_unstained))


def tune_run(run_dir: str | Path, specs: Sequence[CombineSpec] | None = None, write: bool = True,
             progress: bool = True, truth: bool | None = None) -> dict:
    """Tune the combination of a run on its OOF predictions; writes combine.yaml (only).

    Returns the content of combine.yaml: the chosen spec, its OOF score (overall, per fold, per
    class), the score kind, the cell-only and image-only baselines and the best 10 candidates.
    config.yaml is the run's input and is never rewritten: `read_combine_spec` reads combine.yaml.
    """
    import yaml

    from kit.atomic import atomic_open

    run_dir = Path(run_dir)
    oof = load_oof(run_dir, progress=progress, truth=truth)
    if len(oof) == 0:
        raise DataError(f"{run_dir}: the OOF predictions hold no cells")
    ranking = tune(oof, specs, progress=progress)
    best, best_score, reason = choose(oof, ranking)
    result = {
        **best.to_dict(),
        "name": best.name,
        "score": _round(best_score),
        "reason": reason,
        "image_source": oof.image_source,
        "score_kind": oof.score_kind,
        "oof": oof_report(oof, best),
        "baselines": {
            "cell_only": _round(oof.score(CELL_ONLY)),
            "image_only": _round(oof.score(IMAGE_ONLY)),
        },
        "image_oof_macro_ap": _round(image_oof_macro_ap(oof)),
        "n_cells": int(len(oof)),
        "n_images": int(len(oof.images)),
        "n_candidates": len(ranking),
        "ranking": [{"name": s.name, "score": _round(v), **s.to_dict()} for s, v in ranking[:10]],
        "notes": list(oof.notes),
    }
    if write:
        with atomic_open(combine_path(run_dir), "w") as f:
            f.write("# written by `python -m kit tune-combine`: the combination chosen on out-of-fold predictions\n")
            yaml.safe_dump(result, f, sort_keys=False, default_flow_style=None)
    return result


def format_tune_result(result: dict) -> str:
    kind = result["score_kind"]
    label = "OOF cell mAP" if kind == "cell_mAP" else "OOF image-level proxy (max cell score, macro AP)"
    lines = [f"{label} over {result['n_candidates']} candidates, {result['n_cells']} cells of {result['n_images']} images:"]
    for r in result["ranking"][:5]:
        lines.append(f"  {r['score']:.4f}  {r['name']}")
    lines.append(f"  baselines: cell_only {result['baselines']['cell_only']:.4f}, image_only {result['baselines']['image_only']:.4f}")
    per_fold = ", ".join(f"fold {k} {v:.4f}" for k, v in result["oof"]["per_fold"].items() if v is not None)
    lines.append(f"chosen: {result['name']} -> {result['score']:.4f} overall ({per_fold})")
    lines.append(f"why: {result['reason']}")
    lines.extend(f"note: {n}" for n in result["notes"])
    return "\n".join(lines)


def configure_tune_combine(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder with cell/ and image/ fold<k>/oof.csv")
    parser.add_argument("--strategies", help=f"comma list from {','.join(STRATEGIES)} "
                        f"(default: {','.join(DEFAULT_STRATEGIES)})")
    parser.add_argument("--weights", help="comma list of cell weights for the weighted strategies (default 0.1..0.9)")
    parser.add_argument("--no-truth", action="store_true", help="use the image-level proxy even when per-cell truth exists")
    parser.add_argument("--dry-run", action="store_true", help="print the result without writing combine.yaml")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_run_tune_combine)


def _run_tune_combine(args) -> int:
    kwargs = {}
    if args.strategies:
        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        bad = [s for s in names if s not in STRATEGIES]
        if bad:
            raise ConfigError(f"--strategies: unknown {', '.join(bad)} (known: {', '.join(STRATEGIES)})")
        kwargs["strategies"] = names
    if args.weights:
        try:
            kwargs["weights"] = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ConfigError(f"--weights: expected numbers, got {clip(args.weights)}") from None
    specs = candidate_specs(**kwargs)
    result = tune_run(args.run, specs, write=not args.dry_run, progress=True, truth=False if args.no_truth else None)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_tune_result(result))
        if not args.dry_run:
            print(f"wrote {combine_path(args.run)}")
    return 0
