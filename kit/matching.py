"""The one label-image matcher: predicted instances to true instances by mask IoU.

Both inputs are label images of the same shape (0 = background, any positive ids, one id per
pixel). IoU is computed in float32 from pixel counts, as `kit.metric` does, and a pair matches
when its IoU is at least `iou` (the competition uses 0.6). For thresholds above 0.5 a match is
necessarily one to one (non-overlapping masks), whatever the confidences: that is what lets
`kit.combine` score the metric without re-matching, and the ceilings and segmentation quality
(`kit.segment.quality`) use the same pairs. Below 0.5, pairs are taken greedily, best IoU first.
"""
from __future__ import annotations

import numpy as np

from kit.errors import DataError

__all__ = ["overlap_ious", "matched_pairs", "match_labels"]


def overlap_ious(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred ids, true ids, float32 IoU) of every pair of instances that overlap at all."""
    if pred.shape != true.shape:
        raise DataError(f"predicted masks {pred.shape} and true masks {true.shape} differ in size")
    p = np.asarray(pred).ravel().astype(np.int64)
    t = np.asarray(true).ravel().astype(np.int64)
    both = (p > 0) & (t > 0)
    if not both.any():
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    area_p, area_t = np.bincount(p), np.bincount(t)
    base = int(t.max()) + 1
    pairs, inter = np.unique(p[both] * base + t[both], return_counts=True)
    pi, ti = pairs // base, pairs % base
    ious = inter.astype(np.float32) / (area_p[pi] + area_t[ti] - inter).astype(np.float32)
    return pi, ti, ious


def matched_pairs(pred: np.ndarray, true: np.ndarray, iou: float = 0.6) -> list[tuple[int, int, float]]:
    """(pred id, true id, IoU) of every match at IoU >= `iou`, best first, each id used once."""
    pi, ti, ious = overlap_ious(pred, true)
    ok = ious >= np.float32(iou)
    order = np.argsort(-ious[ok], kind="stable")
    out, used_p, used_t = [], set(), set()
    for a, b, v in zip(pi[ok][order].tolist(), ti[ok][order].tolist(), ious[ok][order].tolist()):
        if a in used_p or b in used_t:
            continue
        used_p.add(a)
        used_t.add(b)
        out.append((int(a), int(b), float(v)))
    return out


def match_labels(pred: np.ndarray, true: np.ndarray, iou: float = 0.6) -> dict[int, int]:
    """{predicted id: true id} for the matches at IoU >= `iou` (see the module docstring)."""
    return {a: b for a, b, _ in matched_pairs(pred, true, iou)}
