"""Pseudo-label rounds: relabel the training cells from out-of-fold cell predictions, retrain.

Round 0 is the cell model trained on broadcast labels (or MIL). After round r, every training
image's cells have an out-of-fold prediction (from the fold model that did not train on that
image); `pseudo_targets` turns them into cell labels *within the image's own labels*, as the 5th
place did ("single biggest boost"): a cell keeps location class c of its image when

* it is the image's top cell for c (so every image label stays shown by at least one cell), or
* its OOF probability for c is above ``threshold`` (default 0.9), or
* it is above the image's mean for c by more than ``n_std`` standard deviations (default 0.5);

a cell that keeps no class becomes Negative (class 18); the cells of a Negative image stay
Negative. Classes the image does not have are never added (Negative aside). ``soft=True`` gives
kept classes 1 and the other image classes half their OOF probability relative to the image's top
cell (never above 0.5), and Negative ``1 - max`` of those. Round r+1 retrains every fold on these
targets. Only training images' OOF predictions and image labels are used: never a test image,
never per-cell truth.

Run folder: round 0 is ``<run>/cell/fold<k>/``, round r >= 1 is ``<run>/cell_pseudo<r>/fold<k>/``
(same files as any cell model); ``<run>/pseudo_rounds.csv`` has one row per round with its OOF
score (the image-level proxy: macro AP of each image's top cell score; `kit.pipeline` adds the true
cell mAP where truth exists). `kit.predict` and `kit.combine` use the last round.

Leakage note (standard for OOF distillation): the targets of fold j's images come from fold j's
model, which saw the other folds' image labels, so round r+1's validation images influence their
own model a little through those labels. Image labels only; the test set is never touched.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kit.labels import NEGATIVE, NUM_CLASSES


def cell_dir_name(round_: int) -> str:
    """Folder (under the run) of the cell model of pseudo-label round `round_` (0: ``cell``)."""
    return "cell" if int(round_) <= 0 else f"cell_pseudo{int(round_)}"


def pseudo_targets(img_idx: np.ndarray, probs: np.ndarray, image_targets: np.ndarray, threshold: float = 0.9,
                   n_std: float = 0.5, soft: bool = False) -> np.ndarray:
    """N_cells x 19 targets from OOF cell probabilities (see the module doc).

    img_idx: image row of each cell (into `image_targets`, M x 19 multi-hot); probs: N x 19."""
    img_idx = np.asarray(img_idx)
    probs = np.asarray(probs, dtype=np.float64)
    image_targets = np.asarray(image_targets) > 0.5
    out = np.zeros((len(probs), NUM_CLASSES), np.float32)
    order = np.argsort(img_idx, kind="stable")
    bounds = np.flatnonzero(np.diff(img_idx[order])) + 1
    for rows in np.split(order, bounds) if len(order) else []:
        labels = [c for c in np.flatnonzero(image_targets[img_idx[rows[0]]]) if c != NEGATIVE]
        if not labels:
            out[rows, NEGATIVE] = 1.0
            continue
        p = probs[np.ix_(rows, labels)]
        top = p == p.max(axis=0, keepdims=True)
        std = p.std(axis=0, keepdims=True) if len(rows) > 1 else np.full((1, len(labels)), np.inf)
        keep = top | (p > threshold) | (p > p.mean(axis=0, keepdims=True) + n_std * std)
        if soft:
            rel = 0.5 * p / np.maximum(p.max(axis=0, keepdims=True), 1e-6)
            value = np.where(keep, 1.0, np.minimum(rel, 0.5))
            out[np.ix_(rows, labels)] = value
            out[rows, NEGATIVE] = 1.0 - value.max(axis=1)
        else:
            out[np.ix_(rows, labels)] = keep
            out[rows, NEGATIVE] = ~keep.any(axis=1)
    return out


def round_targets(oof, labels, threshold: float = 0.9, n_std: float = 0.5,
                  soft: bool = False) -> dict[tuple[str, int], np.ndarray]:
    """{(image ID, cell id): 19 targets} for every cell of a round's OOF table.

    oof: DataFrame ``ID, cell_id, p0..p18`` (all folds of the round); labels: DataFrame with
    ``ID`` and ``labels`` (lists of class ids), e.g. kit.labels.read_labels_csv."""
    from kit.labels import to_multihot

    ids = oof["ID"].astype(str).to_numpy()
    uniq, img_idx = np.unique(ids, return_inverse=True)
    by_id = dict(zip(labels["ID"].astype(str), labels["labels"]))
    image_targets = np.stack([to_multihot(by_id[i]) for i in uniq]) if len(uniq) else np.zeros((0, NUM_CLASSES))
    probs = oof[[f"p{c}" for c in range(NUM_CLASSES)]].to_numpy(np.float64)
    t = pseudo_targets(img_idx, probs, image_targets, threshold, n_std, soft)
    cells = oof["cell_id"].to_numpy(np.int64)
    return {(ids[r], int(cells[r])): t[r] for r in range(len(t))}


def read_round_oof(run_dir: str | Path, round_: int):
    """All folds' cell OOF predictions of one round (DataFrame ``ID, cell_id, p0..p18, fold``)."""
    from kit.combine import _read_oof_folder

    return _read_oof_folder(Path(run_dir), cell_dir_name(round_))
