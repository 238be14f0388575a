"""The classical segmenter on real HPA fields: the F1 floor against the HPA Cell Segmentator masks,
crops and scales of one field segmented alike, and the independent foreign generator's truth.

Needs ../shared/data/hpa_real (skipped with the reason when absent).
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from kit.images import read_sample
from kit.segment import instance_f1, match_instances, segment_image

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hpa_real" / "kaggle2021_fields"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real HPA fields not found at {REAL} (../shared absent)")

# Measured with the defaults (bench_segment.py --real): mean 0.907, lowest 0.824. The floor the
# issue sets is mean >= 0.90 and no field below 0.80.
MEAN_FLOOR, FIELD_FLOOR = 0.90, 0.80


def _field(image_id: str):
    image = read_sample(REAL / "train", image_id)
    ref = cv2.imread(str(REAL / "masks" / f"{image_id}_predictedmask.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
    return image, ref


def _ids() -> list[str]:
    return sorted(p.name.split("_")[0] for p in (REAL / "masks").glob("*_predictedmask.png"))


@needs_real
def test_classical_matches_the_reference_masks_on_real_fields():
    f1 = {}
    for image_id in _ids():
        image, ref = _field(image_id)
        _, cells = segment_image(image)
        f1[image_id[:8]] = round(instance_f1(cells, ref)["f1"], 3)
    assert len(f1) == 4
    assert min(f1.values()) >= FIELD_FLOOR, f1
    assert np.mean(list(f1.values())) >= MEAN_FLOOR, f1


@needs_real
def test_a_crop_is_segmented_like_the_whole_field():
    """1728/2048/3072 px fields are crops at one pixel size: the same cells, the same masks."""
    image, _ = _field("a7faf0b4-bb99-11e8-b2b9-ac1f6b6435d0")  # 3072 px
    _, full = segment_image(image)
    areas = np.bincount(full.ravel())

    def inside(y0, x0):  # cells of the full field that lie wholly inside the crop
        ref = full[y0:y0 + 1728, x0:x0 + 1728]
        return [i for i, a in enumerate(np.bincount(ref.ravel(), minlength=areas.size)) if i and a and a == areas[i]]

    y0, x0 = max(((y, x) for y in (0, 672, 1344) for x in (0, 672, 1344)), key=lambda yx: len(inside(*yx)))
    crop = np.ascontiguousarray(image[y0:y0 + 1728, x0:x0 + 1728])
    _, cells = segment_image(crop)
    ref = full[y0:y0 + 1728, x0:x0 + 1728]
    inside = inside(y0, x0)
    assert len(inside) >= 4
    pairs = {t: iou for _, t, iou in match_instances(cells, ref, 0.6)}
    assert all(pairs.get(i, 0) >= 0.9 for i in inside), {i: pairs.get(i) for i in inside}


@needs_real
def test_a_downscaled_field_gives_the_same_cells():
    """A field drawn at a quarter of the size (as kit synth's 512 px fields are) is segmented alike."""
    image, ref = _field("000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0")
    _, full = segment_image(image)
    small = cv2.resize(image, (512, 512), interpolation=cv2.INTER_AREA)
    _, cells = segment_image(small)
    full_small = cv2.resize(full.astype(np.uint16), (512, 512), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    assert instance_f1(cells, full_small)["f1"] >= 0.9


def test_foreign_generator_truth_is_consistent():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.foreign_fields import draw_field, score_field

    field = draw_field(5, "sparse", size=1024)
    cells, nuclei = field["cells"], field["nuclei"]
    assert field["image"].shape == (1024, 1024, 4) and field["image"].dtype == np.uint8
    ids = set(np.unique(cells)) - {0}
    assert ids and set(np.unique(nuclei)) - {0} <= ids
    inside = nuclei > 0
    assert (cells[inside] == nuclei[inside]).all()  # each nucleus lies in its own cell
    truth_ids = ids - field["ignore"]
    assert all((nuclei == i).any() for i in truth_ids)  # every counted cell shows its nucleus
    assert score_field(cells, field)["f1"] == 1.0  # the truth scores itself perfectly
    dropped = np.where(cells == min(truth_ids), 0, cells)
    assert score_field(dropped, field)["recall"] < 1.0
