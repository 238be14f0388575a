"""kit.matching: the one label-image IoU matcher."""
from __future__ import annotations

import numpy as np

from kit.matching import match_labels, matched_pairs
from kit.segment.quality import instance_f1


def test_match_labels_uses_iou_threshold():
    true = np.zeros((10, 10), np.int32)
    true[0:5, 0:5] = 1  # 25 px
    true[5:10, 5:10] = 2
    pred = np.zeros_like(true)
    pred[0:5, 0:4] = 7  # IoU 20/25 = 0.8 with cell 1
    pred[5:10, 5:8] = 3  # IoU 15/25 = 0.6 with cell 2: a match (>= as the metric)
    pred[0:2, 6:9] = 4  # touches nothing
    assert match_labels(pred, true) == {7: 1, 3: 2}
    assert match_labels(pred, true, iou=0.61) == {7: 1}


def test_quality_and_ceilings_share_the_matcher():
    true = np.zeros((10, 10), np.int32)
    true[0:5, 0:5] = 1
    pred = np.zeros_like(true)
    pred[0:5, 0:4] = 7
    assert matched_pairs(pred, true) == [(7, 1, 0.800000011920929)]  # IoU in float32, as the metric
    assert instance_f1(pred, true)["tp"] == 1 and instance_f1(pred, true, iou=0.81)["tp"] == 0
