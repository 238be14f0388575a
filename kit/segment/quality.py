"""Instance segmentation quality against truth: instance F1 at an IoU threshold.

Both inputs are label images of the same shape (0 = background, any positive ids); instances are
matched by `kit.matching` (the matcher the metric's ceilings and the combination tuner use).
"""
from __future__ import annotations

import numpy as np

from kit.matching import matched_pairs as match_instances

__all__ = ["instance_f1", "match_instances"]


def instance_f1(pred_labels: np.ndarray, true_labels: np.ndarray, iou: float = 0.6) -> dict:
    """Instance F1 at an IoU threshold: dict(f1, precision, recall, tp, n_pred, n_true, mean_iou).

    Two empty label images score 1.0 (nothing to find, nothing found).
    """
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"label images differ in shape: {pred_labels.shape} vs {true_labels.shape}")
    pairs = match_instances(pred_labels, true_labels, iou)
    n_pred = int(np.count_nonzero(np.unique(pred_labels)))  # the non-zero ids present
    n_true = int(np.count_nonzero(np.unique(true_labels)))
    tp = len(pairs)
    precision = tp / n_pred if n_pred else float(n_true == 0)
    recall = tp / n_true if n_true else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    mean_iou = float(np.mean([p[2] for p in pairs])) if pairs else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "tp": tp,
            "n_pred": n_pred, "n_true": n_true, "mean_iou": mean_iou}
