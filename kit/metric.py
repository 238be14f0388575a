"""The competition's metric, locally: instance-segmentation mAP at IoU 0.6, scored as the host did.

The HPA 2021 host scored with the Open Images challenge instance-segmentation evaluation
(TensorFlow object_detection: ``per_image_evaluation.py``, ``metrics.py``,
``object_detection_evaluation.py``), matching IoU 0.6. The rules, each implemented here:

1. Ground truth is a file in the submission format with confidence 1 (``class 1 mask`` per true
   cell and label; `kit.submission`). An image's *verified labels* are the classes listed among its
   ground-truth rows. Detections of any other class on that image are ignored: neither true nor
   false positives.
2. Per image and class, detections are taken in descending confidence (a stable sort: equal
   confidences keep their order in the PredictionString). Each is compared with the ground-truth
   cell of highest IoU (the first listed on an IoU tie): a true positive if that IoU >= 0.6 and that
   cell is not yet matched, otherwise a false positive. There is no fall-back to the next-best
   unmatched cell.
3. IoU is on masks (``iou_type="mask"``) or on the masks' bounding boxes (``"box"``, boxes with
   exclusive ends, area = pixel count of the box). As in the reference (``np_mask_ops.iou``) the
   IoU is a float32 division of pixel counts, compared with the threshold in float32, so an IoU
   of exactly 0.6 is a match. A predicted mask of zero area is dropped; ground-truth cells of zero
   area are not counted (but still make their class verified on the image).
4. Per class, all detections of all images are ranked by confidence (stable: ties ordered by image
   ID, then by position in the row), precision and recall come from cumulative TP/FP, recall over
   the number of ground-truth (cell, label) pairs, and AP is the VOC all-point area
   (``metrics.compute_average_precision``: precision made non-increasing from the right, summed
   over the recall steps).
5. mAP is the mean over classes with ground truth; a class without ground truth is left out
   (``None`` in ``per_class_ap``) even if predicted; a class with ground truth but no detections
   scores 0.
6. Images of the solution without a submission row have no detections; submission IDs not in the
   solution are ignored; a width/height that contradicts the solution is an error.
7. Confidences are ranked as the float32 a submission file stores (`kit.submission` writes the
   shortest float32 round-trip string), so scoring predictions in memory and scoring the file
   written from them agree exactly. A confidence <= -10 on a verified class is an error: the
   reference drops such scores (``non_max_suppression(..., score_threshold=-10)``) and then fails
   on arrays of different lengths.

Where this differs from a bare Open Images evaluator, on purpose: a ground-truth cell of zero area
is not counted (Open Images would match ground truth without a mask by its box, and ignore the
detections that match it), a
predicted mask of zero area is dropped (Open Images would count it as a false positive), and ties
in confidence are broken by a stable order (the reference's ``np.argsort(scores)[::-1]`` leaves
them to numpy's quicksort).

Memory: no mask is ever decoded to a full frame. Per image, each distinct mask string is decoded
once (a cell with several classes repeats its mask) to its runs, box and area (`kit.rle.mask_runs`);
box overlaps of all (detection, ground truth) pairs are computed at once, and only masks in an
overlapping pair are expanded to a crop of their box (`kit.rle.runs_to_crop`), where the
intersection is counted. Only the (score, TP) pairs outlive an image, so memory stays flat in
the number of images (a few MiB for 559 images of 2048 px).

API: `InstanceSegmentationEvaluator` (``reset`` / ``process`` / ``evaluate``), for training loops
(OOF), notebooks and the CLI; `evaluate_predictions` and `evaluate_files` wrap it;
`classification_ap` gives the image/cell classification metrics (micro/macro AP) of reports.
Command ``python -m kit evaluate --solution S.csv --submission P.csv [--json]``.
"""
from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from kit.errors import ConfigError, DataError, clip
from kit.labels import CLASS_NAMES, NUM_CLASSES
from kit.rle import RLEError, mask_bbox, mask_runs, runs_to_crop
from kit.submission import SCORE_FLOOR, ImagePrediction, read_submission

__all__ = [
    "InstanceSegmentationEvaluator",
    "evaluate_predictions",
    "evaluate_files",
    "average_precision",
    "precision_recall",
    "classification_ap",
    "format_report",
    "configure_evaluate",
]

IOU_TYPES = ("mask", "box")
# SCORE_FLOOR (kit.submission): np_box_mask_list_ops.non_max_suppression keeps only scores > -10


# ----------------------------------------------------------------------------------------------
# AP helpers (Open Images / VOC)
# ----------------------------------------------------------------------------------------------

def precision_recall(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each detection, ranked by descending score (stable sort).

    As ``metrics.compute_precision_recall`` of the Open Images evaluation, except that ties keep
    the given order (numpy's default quicksort leaves it unspecified).
    """
    scores = np.asarray(scores, dtype=np.float64)
    tp = np.asarray(tp, dtype=bool)
    if num_gt <= 0:
        raise ValueError("precision/recall need at least one ground-truth instance")
    if tp.sum() > num_gt:
        raise ValueError("more true positives than ground-truth instances")
    order = np.argsort(-scores, kind="stable")
    tp_sorted = tp[order]
    cum_tp = np.cumsum(tp_sorted, dtype=np.float64)
    cum_fp = np.cumsum(~tp_sorted, dtype=np.float64)
    precision = cum_tp / np.maximum(cum_tp + cum_fp, 1)
    recall = cum_tp / float(num_gt)
    return precision, recall


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """VOC all-point AP, exactly ``metrics.compute_average_precision`` of the Open Images code.

    Pads recall with 0 and 1 and precision with 0 and 0, makes precision non-increasing from the
    right, and sums precision times the recall step wherever recall changes. Empty arrays give 0.
    """
    precision = np.asarray(precision, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    if precision.shape != recall.shape:
        raise ValueError("precision and recall must have the same length")
    r = np.concatenate(([0.0], recall, [1.0]))
    p = np.concatenate(([0.0], precision, [0.0]))
    p = np.maximum.accumulate(p[::-1])[::-1]
    idx = np.flatnonzero(r[1:] != r[:-1]) + 1
    return float(np.sum((r[idx] - r[idx - 1]) * p[idx]))


# ----------------------------------------------------------------------------------------------
# masks of one image
# ----------------------------------------------------------------------------------------------

class _ImageMasks:
    """The distinct mask strings of one image: decoded once each, to a box, an area and, only for
    masks whose box overlaps another's, a crop of the box."""

    def __init__(self, height: int, width: int, image_id: str, iou_type: str):
        self.height, self.width, self.image_id, self.iou_type = height, width, image_id, iou_type
        self.index: dict[str, int] = {}
        self.boxes: list[tuple[int, int, int, int]] = []  # y0, x0, y1, x1 (exclusive); zeros when empty
        self.areas: list[int] = []
        self._runs: list = []
        self._crops: dict[int, np.ndarray] = {}

    def add(self, text: str, what: str) -> int:
        """Index of `text` (decoding it on first sight); RLE errors become DataError naming `what`."""
        k = self.index.get(text)
        if k is None:
            try:
                runs = mask_runs(text, self.height, self.width)
            except RLEError as exc:
                raise DataError(f"ID {self.image_id}: {what}: {exc}") from None
            box = mask_bbox(runs) or (0, 0, 0, 0)
            area = (box[2] - box[0]) * (box[3] - box[1]) if self.iou_type == "box" else runs.area
            k = self.index[text] = len(self.boxes)
            self.boxes.append(box)
            self.areas.append(area)
            self._runs.append(runs if self.iou_type == "mask" else None)
        return k

    def _crop(self, k: int) -> np.ndarray:
        crop = self._crops.get(k)
        if crop is None:
            crop = self._crops[k] = runs_to_crop(self._runs[k], self.boxes[k])[2]
        return crop

    def iou_matrix(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """float32 IoU of masks `rows` x masks `cols`, as ``np_mask_ops.iou`` computes it."""
        boxes = np.asarray(self.boxes, dtype=np.int64).reshape(-1, 4)
        areas = np.asarray(self.areas, dtype=np.int64)
        a, b = boxes[rows], boxes[cols]
        y0 = np.maximum(a[:, None, 0], b[None, :, 0])
        x0 = np.maximum(a[:, None, 1], b[None, :, 1])
        y1 = np.minimum(a[:, None, 2], b[None, :, 2])
        x1 = np.minimum(a[:, None, 3], b[None, :, 3])
        box_inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
        if self.iou_type == "box":
            inter = box_inter
        else:
            inter = np.zeros_like(box_inter)
            for i, j in zip(*np.nonzero(box_inter)):  # only pairs whose boxes overlap
                r, c = int(rows[i]), int(cols[j])
                ra, rb = self.boxes[r], self.boxes[c]
                ty0, tx0, ty1, tx1 = int(y0[i, j]), int(x0[i, j]), int(y1[i, j]), int(x1[i, j])
                inter[i, j] = np.count_nonzero(
                    self._crop(r)[ty0 - ra[0]:ty1 - ra[0], tx0 - ra[1]:tx1 - ra[1]]
                    & self._crop(c)[ty0 - rb[0]:ty1 - rb[0], tx0 - rb[1]:tx1 - rb[1]]
                )
        union = areas[rows][:, None] + areas[cols][None, :] - inter
        # float32 sums and division, as the reference (exact for counts below 2**24)
        return inter.astype(np.float32) / np.maximum(union.astype(np.float32), np.float32(1e-7))


# ----------------------------------------------------------------------------------------------
# the evaluator
# ----------------------------------------------------------------------------------------------

def _check_class(cls, image_id: str, what: str) -> int:
    try:
        c = int(cls)
    except (TypeError, ValueError):
        c = -1
    if c != cls or not 0 <= c < NUM_CLASSES:
        raise DataError(f"ID {image_id}: {what}: class id {clip(cls)} is not an integer in 0..{NUM_CLASSES - 1}")
    return c


def _check_score(score, image_id: str, what: str) -> float:
    """The confidence as the float32 a submission file stores; DataError when unusable."""
    try:
        with np.errstate(over="ignore"):
            value = float(np.float32(score))
    except (TypeError, ValueError):
        raise DataError(f"ID {image_id}: {what}: confidence {clip(score)} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"ID {image_id}: {what}: confidence {clip(score)} is not finite")
    if value <= SCORE_FLOOR:
        raise DataError(
            f"ID {image_id}: {what}: confidence {clip(value)} is <= {SCORE_FLOOR:g}: the host's evaluation "
            f"drops such scores in its NMS step and then fails on the misaligned arrays; submit probabilities"
        )
    return value


class InstanceSegmentationEvaluator:
    """Accumulates images, then scores them as the host did (see the module docstring).

    >>> ev = InstanceSegmentationEvaluator()
    >>> for image_id, gt in solution.items():            # doctest: +SKIP
    ...     ev.process(image_id, gt, submission.get(image_id))
    >>> ev.evaluate()["mAP"]                             # doctest: +SKIP
    """

    def __init__(self, iou_threshold: float = 0.6, iou_type: str = "mask"):
        if iou_type not in IOU_TYPES:
            raise ConfigError(f"iou_type must be one of {', '.join(IOU_TYPES)}, got {clip(iou_type)}")
        if not 0.0 < float(iou_threshold) <= 1.0:
            raise ConfigError(f"IoU threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = float(iou_threshold)
        self.iou_type = iou_type
        self._thr32 = np.float32(self.iou_threshold)
        self.reset()

    def reset(self) -> None:
        """Forget every processed image."""
        self._scores: list[list[np.ndarray]] = [[] for _ in range(NUM_CLASSES)]
        self._tp: list[list[np.ndarray]] = [[] for _ in range(NUM_CLASSES)]
        self._image_of: list[list[np.ndarray]] = [[] for _ in range(NUM_CLASSES)]
        self._n_gt = np.zeros(NUM_CLASSES, dtype=np.int64)
        self._n_ignored = 0
        self._n_dropped_empty = 0
        self._n_gt_empty = 0
        self._images: list[str] = []
        self._seen: set[str] = set()

    @property
    def num_images(self) -> int:
        return len(self._images)

    def process(
        self,
        image_id: str,
        ground_truth: ImagePrediction,
        detections: ImagePrediction | None = None,
    ) -> None:
        """Match one image's detections to its ground truth and keep the (score, TP) pairs.

        `detections` None means the image has no submission row (no detections). A width/height
        that differs from the ground truth's raises DataError, as does a mask that does not decode
        or an image processed twice.
        """
        image_id = str(image_id)
        if image_id in self._seen:
            raise DataError(f"ID {image_id}: image processed twice")
        if detections is not None and (detections.width, detections.height) != (ground_truth.width, ground_truth.height):
            raise DataError(
                f"ID {image_id}: submission says {detections.width} x {detections.height} (width x height), "
                f"the solution {ground_truth.width} x {ground_truth.height}"
            )
        masks = _ImageMasks(int(ground_truth.height), int(ground_truth.width), image_id, self.iou_type)
        n_gt_empty = n_ignored = n_dropped = 0

        gt_by_class: dict[int, list[int]] = defaultdict(list)  # class -> mask index per GT instance
        for i, (cls, _, text) in enumerate(ground_truth.triples):
            cls = _check_class(cls, image_id, f"solution triple {i}")
            k = masks.add(text, f"solution triple {i}")
            cells = gt_by_class[cls]  # the class is verified even if all its cells are empty
            if masks.areas[k] > 0:
                cells.append(k)
            else:
                n_gt_empty += 1

        det_by_class: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for i, (cls, score, text) in enumerate(detections.triples if detections is not None else ()):
            cls = _check_class(cls, image_id, f"submission triple {i}")
            if cls not in gt_by_class:
                n_ignored += 1
                continue
            score = _check_score(score, image_id, f"submission triple {i}")
            k = masks.add(text, f"submission triple {i}")
            if masks.areas[k] == 0:
                n_dropped += 1
                continue
            det_by_class[cls].append((score, k))

        results = []  # (class, scores in rank order, TP flags), committed once all went well
        if det_by_class:
            det_masks = np.unique([k for dets in det_by_class.values() for _, k in dets])
            gt_masks = np.unique([k for cells in gt_by_class.values() for k in cells]).astype(np.int64)
            iou = masks.iou_matrix(det_masks, gt_masks) if len(gt_masks) else None
            det_row = {int(k): r for r, k in enumerate(det_masks)}
            gt_col = {int(k): c for c, k in enumerate(gt_masks)}
            for cls, dets in det_by_class.items():
                scores = np.array([s for s, _ in dets], dtype=np.float32)
                order = np.argsort(-scores, kind="stable")
                cells = gt_by_class[cls]
                tp = np.zeros(len(dets), dtype=bool)
                if cells:
                    sub = iou[np.ix_([det_row[dets[d][1]] for d in order], [gt_col[k] for k in cells])]
                    best = sub.argmax(axis=1)  # the first listed cell on an IoU tie
                    hit = sub[np.arange(len(order)), best] >= self._thr32
                    matched = np.zeros(len(cells), dtype=bool)
                    for rank in np.flatnonzero(hit):  # greedy in descending confidence, no fall-back
                        j = best[rank]
                        if not matched[j]:
                            matched[j] = tp[rank] = True
                results.append((cls, scores[order].astype(np.float64), tp))

        image_index = len(self._images)
        self._seen.add(image_id)
        self._images.append(image_id)
        for cls, cells in gt_by_class.items():
            self._n_gt[cls] += len(cells)
        for cls, scores, tp in results:
            self._scores[cls].append(scores)
            self._tp[cls].append(tp)
            self._image_of[cls].append(np.full(len(scores), image_index, dtype=np.int64))
        self._n_gt_empty += n_gt_empty
        self._n_ignored += n_ignored
        self._n_dropped_empty += n_dropped

    def evaluate(self) -> dict:
        """Score everything processed so far.

        Returns ``{"mAP": float | None, "per_class_ap": {"0": float | None, ...},
        "n_gt": {"0": int, ...}, "n_det": {...}, "n_tp": {...}, "n_images", "n_ignored",
        "n_dropped_empty", "n_gt_empty", "iou", "iou_type"}``. ``n_det`` counts the detections
        that were scored (verified class, non-empty mask); ``mAP`` is None when no class has
        ground truth.
        """
        # ties across images are ordered by image ID, so the result does not depend on the order
        # in which images were processed
        image_rank = np.empty(len(self._images), dtype=np.int64)
        image_rank[np.argsort(np.array(self._images, dtype=object), kind="stable")] = np.arange(len(self._images))
        per_class: dict[str, float | None] = {}
        n_det: dict[str, int] = {}
        n_tp: dict[str, int] = {}
        aps = []
        for cls in range(NUM_CLASSES):
            if self._scores[cls]:
                scores = np.concatenate(self._scores[cls])
                tp = np.concatenate(self._tp[cls])
                images = image_rank[np.concatenate(self._image_of[cls])]
                # within one image the arrays are already in matching order (stable by score)
                order = np.lexsort((images, -scores))
                scores, tp = scores[order], tp[order]
            else:
                scores = np.zeros(0)
                tp = np.zeros(0, dtype=bool)
            n_det[str(cls)] = int(len(scores))
            n_tp[str(cls)] = int(tp.sum())
            if self._n_gt[cls] == 0:
                per_class[str(cls)] = None
                continue
            precision, recall = precision_recall(scores, tp, int(self._n_gt[cls]))
            ap = average_precision(precision, recall)
            per_class[str(cls)] = ap
            aps.append(ap)
        return {
            "mAP": float(np.mean(aps)) if aps else None,
            "per_class_ap": per_class,
            "n_gt": {str(c): int(self._n_gt[c]) for c in range(NUM_CLASSES)},
            "n_det": n_det,
            "n_tp": n_tp,
            "n_images": len(self._images),
            "n_ignored": int(self._n_ignored),
            "n_dropped_empty": int(self._n_dropped_empty),
            "n_gt_empty": int(self._n_gt_empty),
            "iou": self.iou_threshold,
            "iou_type": self.iou_type,
        }


def evaluate_predictions(
    solution: Mapping[str, ImagePrediction],
    submission: Mapping[str, ImagePrediction],
    iou: float = 0.6,
    iou_type: str = "mask",
    image_ids: Iterable[str] | None = None,
    *,
    progress: bool = False,
) -> dict:
    """Score `submission` against `solution` (both ``{ID: ImagePrediction}``).

    `image_ids` restricts scoring to those solution images (e.g. one fold's out-of-fold images);
    an ID there that the solution lacks is an error. Submission IDs outside the scored set are
    ignored (their count is ``n_unscored_submission_images`` in the result); scored images without
    a submission row are scored as predicting no cell (``n_missing_submission_images`` in the result,
    the first few in ``missing_submission_examples``).
    """
    if image_ids is None:
        ids = list(solution)
    else:
        ids = [str(i) for i in image_ids]
        missing = [i for i in ids if i not in solution]
        if missing:
            raise DataError(f"{len(missing)} image ID(s) to score are not in the solution, e.g. {missing[0]}")
    evaluator = InstanceSegmentationEvaluator(iou, iou_type)
    iterator: Iterable[str] = ids
    if progress:
        from tqdm import tqdm

        iterator = tqdm(ids, desc="evaluate", unit="image", file=sys.stderr)
    for image_id in iterator:
        evaluator.process(image_id, solution[image_id], submission.get(image_id))
    result = evaluator.evaluate()
    scored = set(ids)
    result["n_unscored_submission_images"] = sum(1 for k in submission if k not in scored)
    missing = [i for i in ids if i not in submission]
    result["n_missing_submission_images"] = len(missing)
    result["missing_submission_examples"] = sorted(missing)[:5]  # independent of row order
    return result


def missing_rows_warning(result: dict, submission: str | Path) -> str | None:
    """A warning naming how many scored images lack a submission row, and what the mAP then is."""
    n, total = result.get("n_missing_submission_images", 0), result["n_images"]
    if not n:
        return None
    what = (f"none of the {total} scored images has a row" if n == total else
            f"{n} of the {total} scored images have no row (e.g. {result['missing_submission_examples'][0]})")
    return (f"{submission}: {what}; every true cell of those images counts as missed, so this mAP is that of "
            "empty predictions for them, not of a complete submission (Kaggle refuses a file with missing rows)")


def evaluate_files(
    solution_path,
    submission_path,
    iou: float = 0.6,
    iou_type: str = "mask",
    image_ids: Iterable[str] | None = None,
    *,
    progress: bool = False,
) -> dict:
    """`evaluate_predictions` on two CSV files in the submission format."""
    try:
        solution = read_submission(solution_path)
    except DataError as exc:
        raise DataError(f"solution: {exc}") from None
    submission = read_submission(submission_path)
    # errors of evaluate_predictions name the ID and say "solution" or "submission" triple
    return evaluate_predictions(solution, submission, iou, iou_type, image_ids, progress=progress)


# ----------------------------------------------------------------------------------------------
# classification metrics (image or cell level)
# ----------------------------------------------------------------------------------------------

def classification_ap(y_true, y_score) -> dict:
    """Micro- and macro-averaged average precision (scikit-learn) of N x C labels and scores.

    Returns ``{"micro": float | None, "macro": float | None, "per_class": [float | None] * C}``.
    A class without positives gets None and is left out of the macro mean (scikit-learn would
    count it as 0 with a warning); micro pools every (sample, class) pair.
    """
    from sklearn.metrics import average_precision_score

    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim == 1:
        y_true, y_score = y_true[:, None], y_score[:, None]
    if y_true.shape != y_score.shape or y_true.ndim != 2:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} must both be N x C")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must be 0/1")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score has NaN or infinite values")
    y_true = y_true.astype(np.int64)
    per_class: list[float | None] = []
    for c in range(y_true.shape[1]):
        if y_true[:, c].sum() == 0:
            per_class.append(None)
        else:
            per_class.append(float(average_precision_score(y_true[:, c], y_score[:, c])))
    valid = [v for v in per_class if v is not None]
    micro = float(average_precision_score(y_true.ravel(), y_score.ravel())) if y_true.sum() else None
    return {"micro": micro, "macro": float(np.mean(valid)) if valid else None, "per_class": per_class}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def format_report(result: dict) -> str:
    """A per-class table (AP, GT and detection counts) and the mAP, for people."""
    width = max(len(n) for n in CLASS_NAMES)
    lines = [f"{'id':>2}  {'class':<{width}}  {'GT':>6}  {'det':>7}  {'TP':>6}  {'AP':>6}"]
    for c in range(NUM_CLASSES):
        ap = result["per_class_ap"][str(c)]
        ap_s = "   -  " if ap is None else f"{ap:6.4f}"
        lines.append(
            f"{c:>2}  {CLASS_NAMES[c]:<{width}}  {result['n_gt'][str(c)]:>6}  "
            f"{result['n_det'][str(c)]:>7}  {result['n_tp'][str(c)]:>6}  {ap_s}"
        )
    m = result["mAP"]
    n_cls = sum(1 for v in result["per_class_ap"].values() if v is not None)
    lines.append(
        f"mAP@IoU{result['iou']:g} ({result['iou_type']}) = "
        + ("n/a (no ground truth)" if m is None else f"{m:.4f}")
        + f" over {n_cls} classes with ground truth, {result['n_images']} images"
    )
    extra = []
    if result.get("n_ignored"):
        extra.append(f"{result['n_ignored']} detections of classes not on their image ignored")
    if result.get("n_dropped_empty"):
        extra.append(f"{result['n_dropped_empty']} empty predicted masks dropped")
    if result.get("n_gt_empty"):
        extra.append(f"{result['n_gt_empty']} empty ground-truth cells not counted")
    if result.get("n_unscored_submission_images"):
        extra.append(f"{result['n_unscored_submission_images']} submission rows not in the solution ignored")
    if extra:
        lines.append("note: " + "; ".join(extra))
    return "\n".join(lines)


def configure_evaluate(parser) -> None:
    parser.add_argument("--solution", type=Path, required=True, help="ground truth in the submission format (class 1 mask)")
    parser.add_argument("--submission", type=Path, required=True, help="submission CSV to score")
    parser.add_argument("--iou", type=float, default=0.6, help="matching IoU threshold (default 0.6, the competition's)")
    parser.add_argument("--iou-type", choices=IOU_TYPES, default="mask", help="IoU on masks (default) or on their bounding boxes")
    parser.add_argument("--ids", type=Path, help="score only the IDs in this file (one per line, or a CSV with an ID column)")
    parser.add_argument("--fold", type=int, help="with --ids FOLDS.csv: score only the images of this fold (out-of-fold)")
    parser.add_argument("--json", action="store_true", help="end stdout with one line of JSON: mAP, per-class AP and counts")
    parser.set_defaults(func=_evaluate_main)


def _evaluate_main(args) -> int:
    if args.fold is not None and not args.ids:
        raise ConfigError("--fold needs --ids FOLDS.csv (a CSV with ID and fold columns)")
    from kit.layout import read_id_list

    ids = read_id_list(args.ids, fold=args.fold) if args.ids else None
    result = evaluate_files(args.solution, args.submission, args.iou, args.iou_type, ids, progress=True)
    warning = missing_rows_warning(result, args.submission)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(format_report(result))
    if args.json:
        print(json.dumps(result, sort_keys=False))
    return 0
