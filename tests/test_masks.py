"""kit.masks: the mask sources (cached segmentation, truth PNGs, a solution file) and their one interface."""
from __future__ import annotations

import numpy as np

from kit.labels import NEGATIVE
from kit.masks import truth_from_solution


def test_truth_from_solution_builds_label_image():
    from kit.rle import encode_label_image
    from kit.submission import ImagePrediction

    labels = np.zeros((6, 8), np.int32)
    labels[1:3, 1:4] = 1
    labels[3:6, 4:8] = 2
    rle = encode_label_image(labels)
    row = ImagePrediction(8, 6, [(0, 1.0, rle[2]), (16, 1.0, rle[2]), (NEGATIVE, 1.0, rle[1])])
    out, classes = truth_from_solution(row)
    # ids follow first appearance: cell 2 of the input is 1 here
    np.testing.assert_array_equal(out == 1, labels == 2)
    np.testing.assert_array_equal(out == 2, labels == 1)
    assert classes == {1: [0, 16], 2: [NEGATIVE]}
