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

Memory: masks are decoded per image to their bounding-box crops (`kit.rle.decode_to_crop`), one
decode per distinct mask string (a cell with several classes repeats its mask), and IoU is
computed only for pairs whose boxes overlap, on the crops. Only (score, TP) pairs outlive an image.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from kit.errors import ConfigError, DataError
from kit.labels import CLASS_NAMES, NUM_CLASSES
from kit.rle import RLEError, mask_bbox, mask_runs, runs_to_crop
from kit.submission import ImagePrediction, read_submission

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

@dataclass
class _Mask:
    area: int
    box: tuple[int, int, int, int] | None  # y0, x0, y1, x1 (exclusive); None when empty
    crop: np.ndarray | None = None  # bool crop of the box, decoded on first use
    _runs: object = None


class _ImageMasks:
    """Decodes each distinct mask string of one image once, to its box (and crop when needed)."""

    def __init__(self, height: int, width: int, image_id: str, iou_type: str):
        self.height, self.width, self.image_id, self.iou_type = height, width, image_id, iou_type
        self._masks: dict[str, _Mask] = {}
        self._iou: dict[tuple[str, str], np.float32] = {}

    def get(self, text: str, what: str) -> _Mask:
        m = self._masks.get(text)
        if m is None:
            try:
                runs = mask_runs(text, self.height, self.width)
            except RLEError as exc:
                raise DataError(f"ID {self.image_id}: {what}: {exc}") from None
            box = mask_bbox(runs)
            if self.iou_type == "box":
                area = 0 if box is None else (box[2] - box[0]) * (box[3] - box[1])
            else:
                area = runs.area
            m = _Mask(area, box, None, runs if self.iou_type == "mask" else None)
            self._masks[text] = m
        return m

    def iou(self, det: str, gt: str) -> np.float32:
        key = (det, gt)
        v = self._iou.get(key)
        if v is None:
            v = self._iou[key] = self._compute_iou(self._masks[det], self._masks[gt])
        return v

    def _compute_iou(self, a: _Mask, b: _Mask) -> np.float32:
        if a.box is None or b.box is None:
            return np.float32(0.0)
        y0, x0 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
        y1, x1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
        if y1 <= y0 or x1 <= x0:
            return np.float32(0.0)
        if self.iou_type == "box":
            inter = (y1 - y0) * (x1 - x0)
        else:
            ca, cb = self._crop(a), self._crop(b)
            inter = np.count_nonzero(
                ca[y0 - a.box[0]:y1 - a.box[0], x0 - a.box[1]:x1 - a.box[1]]
                & cb[y0 - b.box[0]:y1 - b.box[0], x0 - b.box[1]:x1 - b.box[1]]
            )
        union = a.area + b.area - inter
        # float32 as np_mask_ops.iou (sums with dtype float32, then divide)
        return np.float32(inter) / np.float32(max(union, 1e-7))

    @staticmethod
    def _crop(m: _Mask) -> np.ndarray:
        if m.crop is None:
            m.crop = runs_to_crop(m._runs)[2]
            m._runs = None
        return m.crop


# ----------------------------------------------------------------------------------------------
# the evaluator
# ----------------------------------------------------------------------------------------------

class InstanceSegmentationEvaluator:
    """Accumulates images, then scores them as the host did (see the module docstring).

    >>> ev = InstanceSegmentationEvaluator()
    >>> for image_id, gt in solution.items():            # doctest: +SKIP
    ...     ev.process(image_id, gt, submission.get(image_id))
    >>> ev.evaluate()["mAP"]                             # doctest: +SKIP
    """

    def __init__(self, iou_threshold: float = 0.6, iou_type: str = "mask"):
        if iou_type not in IOU_TYPES:
            raise ConfigError(f"iou_type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
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
        detections: ImagePrediction | None,
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
        self._seen.add(image_id)
        image_index = len(self._images)
        self._images.append(image_id)
        masks = _ImageMasks(int(ground_truth.height), int(ground_truth.width), image_id, self.iou_type)

        gt_by_class: dict[int, list[str]] = defaultdict(list)
        for i, (cls, _, text) in enumerate(ground_truth.triples):
            cls = int(cls)
            m = masks.get(text, f"ground-truth triple {i}")
            cells = gt_by_class[cls]  # the class is verified even if all its cells are empty
            if m.area > 0:
                cells.append(text)
            else:
                self._n_gt_empty += 1
        for cls, cells in gt_by_class.items():
            self._n_gt[cls] += len(cells)
        if detections is None:
            return

        det_by_class: dict[int, list[tuple[float, str]]] = defaultdict(list)
        for i, (cls, score, text) in enumerate(detections.triples):
            cls = int(cls)
            if cls not in gt_by_class:
                self._n_ignored += 1
                continue
            if masks.get(text, f"triple {i}").area == 0:
                self._n_dropped_empty += 1
                continue
            det_by_class[cls].append((float(score), text))

        for cls, dets in det_by_class.items():
            scores = np.array([s for s, _ in dets], dtype=np.float64)
            order = np.argsort(-scores, kind="stable")
            cells = gt_by_class[cls]
            matched = np.zeros(len(cells), dtype=bool)
            tp = np.zeros(len(dets), dtype=bool)
            if cells:
                for rank, d in enumerate(order):
                    text = dets[d][1]
                    ious = np.array([masks.iou(text, g) for g in cells], dtype=np.float32)
                    j = int(np.argmax(ious))  # first on a tie
                    if ious[j] >= self._thr32 and not matched[j]:
                        matched[j] = True
                        tp[rank] = True
            self._scores[cls].append(scores[order])
            self._tp[cls].append(tp)
            self._image_of[cls].append(np.full(len(dets), image_index, dtype=np.int64))

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
    ignored (their count is ``n_unscored_submission_images`` in the result).
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
    return result


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
    try:
        return evaluate_predictions(solution, submission, iou, iou_type, image_ids, progress=progress)
    except DataError as exc:
        raise DataError(f"{submission_path}: {exc}") from None


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
    parser.add_argument("--json", action="store_true", help="end stdout with one line of JSON: mAP, per-class AP and counts")
    parser.set_defaults(func=_evaluate_main)


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"IDs file not found: {path}")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if lines and "," in lines[0]:
        header = lines[0].split(",")
        if "ID" not in header:
            raise DataError(f"{path}: a CSV needs an ID column (found {header})")
        k = header.index("ID")
        return [ln.split(",")[k] for ln in lines[1:]]
    if lines and lines[0] == "ID":
        lines = lines[1:]
    return lines


def _evaluate_main(args) -> int:
    ids = _read_ids(args.ids) if args.ids else None
    result = evaluate_files(args.solution, args.submission, args.iou, args.iou_type, ids, progress=True)
    print(format_report(result))
    if args.json:
        print(json.dumps(result, sort_keys=False))
    return 0
