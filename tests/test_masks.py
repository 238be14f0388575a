"""kit.masks: the mask sources (cached segmentation, truth PNGs, a solution file) and their one interface."""
from __future__ import annotations

import numpy as np
import pytest

from kit.errors import DataError
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


def test_a_read_error_is_tied_to_the_file_and_redone_once_it_is_fixed(tmp_path):
    """Issue 16.1: an unreadable image's record must not outlive the file it was made from."""
    import shutil

    from kit.segment.cache import MaskCache, segment_folder
    from test_segment import ellipse_field, write_sample

    images = tmp_path / "images"
    write_sample(images, "x", ellipse_field(size=96, grid=2)[0])
    good = images / "x_blue.png"
    backup = tmp_path / "x_blue.png"
    shutil.copy2(good, backup)
    good.write_bytes(b"")  # the file is emptied (a failed copy, a full disk...)
    cache = MaskCache(tmp_path / "masks")
    with pytest.warns(UserWarning, match="could not be read"):
        segment_folder(images, ["x"], cache, progress=False)
    assert cache.error("x") and cache.load("x")[1].size == 0
    shutil.move(backup, good)  # restored, with its original mtime
    assert segment_folder(images, ["x"], cache, progress=False) == ["x"]
    assert cache.error("x") is None and cache.load("x")[1].max() == 4
    # a copy of the data in another folder (new files) gets its own results, not these entries
    copy = tmp_path / "copy"
    shutil.copytree(images, copy, copy_function=shutil.copyfile)
    from kit.images import sample_source

    assert not cache.has("x", sample_source(copy, "x").signature)


def test_truth_masks_need_the_cell_masks_only(tmp_path):
    """Issue 16.4: the classification ceiling's truth without nuclei masks."""
    import cv2

    from kit.masks import SolutionMasks, TruthMasks
    from kit.rle import encode_label_image

    cells = np.zeros((16, 16), np.uint16)
    cells[2:8, 2:8], cells[9:15, 9:15] = 1, 2
    truth = tmp_path / "truth"
    truth.mkdir()
    cv2.imwrite(str(truth / "a_cell_mask.png"), cells)
    src = TruthMasks(truth)
    src.prepare(["a"])
    nuclei, got, table = src.load("a", None)
    assert (got == cells).all() and (nuclei == cells).all() and table["cell_id"].tolist() == [1, 2]
    with pytest.raises(DataError, match="b_cell_mask.png"):
        src.prepare(["a", "b"])
    rle = encode_label_image(cells.astype(np.int32))
    (tmp_path / "sol.csv").write_text("ID,ImageWidth,ImageHeight,PredictionString\n"
                                      f"a,16,16,0 1 {rle[1]} 3 1 {rle[2]}\n")
    sol = SolutionMasks(tmp_path / "sol.csv")
    sol.prepare(["a"])
    assert (sol.load("a")[1] == got).all() and sol.key != src.key
