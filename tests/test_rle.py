"""kit.rle: byte identity with the host's encoder, decoding, crops and errors."""
from __future__ import annotations

import base64
import zlib

import numpy as np
import pytest

from helpers import reference_encode_binary_mask
from kit.errors import DataError
from kit.rle import (
    RLEError,
    counts_to_string,
    decode_binary_mask,
    decode_to_crop,
    encode_binary_mask,
    encode_label_image,
    mask_bbox,
    mask_runs,
    string_to_counts,
)


def ref(mask: np.ndarray) -> str:
    return reference_encode_binary_mask(mask).decode("ascii")


def assert_label_image_matches_reference(labels: np.ndarray) -> None:
    out = encode_label_image(labels)
    ids = sorted(int(i) for i in np.unique(labels) if i != 0)
    assert sorted(out) == ids
    for i in ids:
        assert out[i] == ref(labels == i), f"cell {i}"


def blob_labels(rng, h: int, w: int, n: int) -> np.ndarray:
    """Overlapping random rectangles (later ones win), ids 1..n, some possibly hidden."""
    labels = np.zeros((h, w), np.int32)
    for k in range(1, n + 1):
        y, x = rng.integers(0, h), rng.integers(0, w)
        labels[y:y + rng.integers(1, h // 2 + 2), x:x + rng.integers(1, w // 2 + 2)] = k
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_encode_label_image_identical_to_reference_on_random_images(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(2, 70, 2))
    assert_label_image_matches_reference(blob_labels(rng, h, w, int(rng.integers(1, 12))))
    # salt-and-pepper ids: many tiny runs, runs wrapping from one column into the next
    noisy = rng.integers(0, 4, (h, w)) * (rng.random((h, w)) < 0.5)
    assert_label_image_matches_reference(noisy.astype(np.uint16))


def test_encode_label_image_border_cells_and_one_pixel_cells():
    labels = np.zeros((9, 7), np.int32)
    labels[:, 0] = 1  # whole first column: starts at pixel 0
    labels[:, -1] = 2  # whole last column: ends at the last pixel (no trailing count)
    labels[0, 3] = 3  # one pixel on the top border
    labels[-1, 3] = 4  # one pixel on the bottom border
    labels[-1, 2] = 5  # bottom of column 2 ...
    labels[0, 3] = 5  # ... and top of column 3: a single run across the column boundary
    labels[4, 4] = 6  # one pixel inside
    labels[0, 0] = 7  # one pixel in the corner, splitting cell 1
    labels[-1, -1] = 8  # the last pixel
    assert_label_image_matches_reference(labels)
    full = np.full((5, 6), 3, np.int64)  # one cell covering everything
    assert_label_image_matches_reference(full)
    one = np.zeros((4, 4), np.uint8)
    one[2, 1] = 250
    assert_label_image_matches_reference(one)


def test_encode_label_image_large_ids_and_large_frame_counts():
    labels = np.zeros((300, 280), np.int32)
    labels[10:290, 5:270] = 70_000  # id beyond uint16, runs longer than 5 RLE characters
    labels[0, 0] = 1
    labels[-1, -1] = 2
    assert_label_image_matches_reference(labels)


def test_encode_label_image_empty_image():
    assert encode_label_image(np.zeros((8, 5), np.int32)) == {}
    assert encode_label_image(np.zeros((0, 0), np.int32)) == {}


def test_encode_label_image_rejects_bad_input():
    with pytest.raises(RLEError, match="integer"):
        encode_label_image(np.zeros((4, 4), np.float32))
    with pytest.raises(RLEError, match="integer"):
        encode_label_image(np.zeros((4, 4), bool))
    with pytest.raises(RLEError, match="negative"):
        encode_label_image(np.full((4, 4), -1, np.int32))
    with pytest.raises(RLEError, match="2-D"):
        encode_label_image(np.zeros((2, 4, 4), np.int32))


@pytest.mark.parametrize("seed", range(4))
def test_encode_binary_mask_identical_to_reference(seed):
    rng = np.random.default_rng(100 + seed)
    h, w = (int(v) for v in rng.integers(2, 60, 2))
    for p in (0.0, 0.05, 0.5, 0.95, 1.0):
        mask = rng.random((h, w)) < p
        assert encode_binary_mask(mask) == ref(mask)
    mask = rng.random((h, w, 1)) < 0.3  # a singleton axis is squeezed, as the host's code does
    assert encode_binary_mask(mask) == ref(mask)


def test_encode_binary_mask_errors():
    with pytest.raises(RLEError, match="boolean"):
        encode_binary_mask(np.ones((3, 3), np.uint8))
    with pytest.raises(RLEError, match="2-D"):
        encode_binary_mask(np.ones((2, 3, 3), bool))
    assert issubclass(RLEError, DataError)


def test_counts_string_round_trip_matches_pycocotools():
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(5)
    for _ in range(20):
        counts = rng.integers(1, rng.choice([4, 40, 5000, 3_000_000]), int(rng.integers(1, 40)))
        counts[0] = rng.integers(0, 3)  # a leading zero run is allowed
        h = int(counts.sum())
        coco = coco_mask.frPyObjects({"size": [h, 1], "counts": counts.tolist()}, h, 1)
        assert counts_to_string(counts) == coco["counts"]
        assert np.array_equal(string_to_counts(coco["counts"]), counts)


def test_decode_round_trip_and_crop():
    rng = np.random.default_rng(3)
    labels = blob_labels(rng, 40, 33, 6)
    labels[0, 5] = 9  # one pixel on the border
    labels[-1, 7], labels[0, 8] = 10, 10  # a run wrapping across columns: crop is full height
    for cell, text in encode_label_image(labels).items():
        mask = labels == cell
        full = decode_binary_mask(text, 40, 33)
        assert full.dtype == bool and full.shape == (40, 33) and full.flags.c_contiguous
        assert np.array_equal(full, mask)
        y0, x0, crop = decode_to_crop(text, 40, 33)
        ys, xs = np.nonzero(mask)
        assert (y0, x0, y0 + crop.shape[0], x0 + crop.shape[1]) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        assert np.array_equal(crop, mask[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]])
        runs = mask_runs(text, 40, 33)
        assert runs.area == mask.sum()
        assert mask_bbox(runs) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)


def test_decode_empty_mask():
    text = encode_binary_mask(np.zeros((6, 4), bool))
    assert not decode_binary_mask(text, 6, 4).any()
    y0, x0, crop = decode_to_crop(text, 6, 4)
    assert (y0, x0, crop.shape) == (0, 0, (0, 0))
    assert mask_bbox(mask_runs(text, 6, 4)) is None


def _wrap(raw: bytes) -> str:
    return base64.b64encode(zlib.compress(raw)).decode()


@pytest.mark.parametrize(
    "text, match",
    [
        ("not base64!!", "base64"),
        ("", "empty"),
        (base64.b64encode(b"plain bytes, not zlib").decode(), "zlib"),
        (_wrap(b"0 1"), "not a COCO RLE character"),  # space is below '0'
        (_wrap(b"P"), "middle of a value"),  # 'P' - 48 = 0x20: 'more follows', and nothing does
        (_wrap(b""), "empty RLE"),
    ],
)
def test_decode_errors(text, match):
    with pytest.raises(RLEError, match=match):
        decode_binary_mask(text, 4, 4)


def test_decode_errors_size_and_negative_runs():
    text = encode_binary_mask(np.ones((4, 4), bool))
    with pytest.raises(RLEError, match="sum to 16 pixels, but 4 x 5 = 20"):
        decode_binary_mask(text, 4, 5)
    with pytest.raises(RLEError, match="positive"):
        decode_binary_mask(text, 0, 16)
    # counts [3, 5, 2, -1]: the 4th value is a delta (-1 - 5) and decodes to a negative run
    negative = _wrap(counts_to_string(np.array([3, 5, 2, -1])))
    with pytest.raises(RLEError, match="negative"):
        decode_binary_mask(negative, 3, 3)


def test_encode_accepts_any_memory_layout():
    rng = np.random.default_rng(11)
    labels = (rng.integers(0, 5, (30, 41)) * (rng.random((30, 41)) < 0.7)).astype(np.int32)
    for view in (np.asfortranarray(labels), labels[::2, 1::3], labels.T):
        assert_label_image_matches_reference(view)
        assert encode_binary_mask(view == 2) == ref(view == 2)
