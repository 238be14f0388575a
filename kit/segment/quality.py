"""Instance segmentation quality: match predicted to true instances by IoU.

Both inputs are label images of the same shape (0 = background, any positive ids). A predicted and
a true instance match when their IoU is at least `iou` (the competition uses 0.6); for thresholds
above 0.5 a match is necessarily one to one, so no assignment step is needed.
"""
from __future__ import annotations

import numpy as np


def _iou_matrix(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU between every present predicted id (rows) and true id (columns), plus both id lists."""
    if pred.shape != true.shape:
        raise ValueError(f"label images differ in shape: {pred.shape} vs {true.shape}")
    p = np.asarray(pred, np.int64).ravel()
    t = np.asarray(true, np.int64).ravel()
    p_ids, p_inv = np.unique(p, return_inverse=True)
    t_ids, t_inv = np.unique(t, return_inverse=True)
    inter = np.bincount(p_inv * len(t_ids) + t_inv, minlength=len(p_ids) * len(t_ids))
    inter = inter.reshape(len(p_ids), len(t_ids)).astype(np.float64)
    p_area = inter.sum(axis=1)
    t_area = inter.sum(axis=0)
    iou = inter / np.maximum(p_area[:, None] + t_area[None, :] - inter, 1)
    p_keep = p_ids != 0
    t_keep = t_ids != 0
    return iou[np.ix_(p_keep, t_keep)], p_ids[p_keep], t_ids[t_keep]


def match_instances(pred: np.ndarray, true: np.ndarray, iou: float = 0.6) -> list[tuple[int, int, float]]:
    """(pred_id, true_id, IoU) for every pair whose IoU is at least `iou`, best first (greedy)."""
    return _greedy_pairs(*_iou_matrix(pred, true), iou)


def _greedy_pairs(m: np.ndarray, p_ids: np.ndarray, t_ids: np.ndarray, iou: float) -> list[tuple[int, int, float]]:
    """Greedy best-first matching on an IoU matrix (see `match_instances`)."""
    pairs = []
    used_p, used_t = set(), set()
    for i, j in zip(*np.unravel_index(np.argsort(-m, axis=None), m.shape)):
        if m[i, j] < iou:
            break
        if i in used_p or j in used_t:
            continue
        used_p.add(i)
        used_t.add(j)
        pairs.append((int(p_ids[i]), int(t_ids[j]), float(m[i, j])))
    return pairs


def instance_f1(pred_labels: np.ndarray, true_labels: np.ndarray, iou: float = 0.6) -> dict:
    """Instance F1 at an IoU threshold: dict(f1, precision, recall, tp, n_pred, n_true, mean_iou).

    Two empty label images score 1.0 (nothing to find, nothing found).
    """
    m, p_ids, t_ids = _iou_matrix(pred_labels, true_labels)
    pairs = _greedy_pairs(m, p_ids, t_ids, iou)
    n_pred, n_true = len(p_ids), len(t_ids)  # the non-zero ids present
    tp = len(pairs)
    precision = tp / n_pred if n_pred else float(n_true == 0)
    recall = tp / n_true if n_true else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    mean_iou = float(np.mean([p[2] for p in pairs])) if pairs else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp,
            "n_pred": n_pred, "n_true": n_true, "mean_iou": mean_iou}
