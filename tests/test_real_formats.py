"""Real HPA formats end to end: Kaggle PNG fields (2048/3072 px) and website tinted JPEG fields
(1728/2048 px) through check-data, segment, tiles and predict; a submission for the real test set's
559 IDs and sizes validates. Uses ../shared/data/hpa_real (skipped with a reason when absent);
everything it writes goes to a temporary copy.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kit.submission import ImagePrediction, read_submission, validate_submission, write_submission  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hpa_real"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real HPA fields not found at {REAL} (../shared absent)")

KAGGLE = {"000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0": (2048, "7|1|2|0"), "a7faf0b4-bb99-11e8-b2b9-ac1f6b6435d0": (3072, "17")}
WEBSITE = {"89_B5_1": 1728, "800_A6_1": 2048}


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory) -> Path:
    """train/: two Kaggle PNG fields with their labels; test/: those two plus two website JPEG fields."""
    root = tmp_path_factory.mktemp("real_formats")
    (root / "train").mkdir()
    (root / "test").mkdir()
    for image_id in KAGGLE:
        for p in (REAL / "kaggle2021_fields" / "train").glob(f"{image_id}_*.png"):
            shutil.copy(p, root / "train" / p.name)
            shutil.copy(p, root / "test" / p.name)
    for image_id in WEBSITE:
        for p in (REAL / "website_fields").glob(f"{image_id}_*.jpg"):
            shutil.copy(p, root / "test" / p.name)
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Label"])
        for image_id, (_, label) in KAGGLE.items():
            w.writerow([image_id, label])
    sizes = {**{k: v[0] for k, v in KAGGLE.items()}, **WEBSITE}
    with open(root / "sample_submission.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "ImageWidth", "ImageHeight", "PredictionString"])
        for image_id, side in sizes.items():
            w.writerow([image_id, side, side, "0 1 eNoLCAgIMAEABJkBdQ=="])
    return root


def test_check_data_accepts_real_png_and_jpeg_fields(real_dataset):
    from kit.cli import main
    from kit.check_data import check_data

    problems = check_data(real_dataset, decode=True, workers=1)
    assert [p for p in problems if p.severity == "error"] == []
    assert main(["check-data", str(real_dataset)]) == 0


def test_segment_and_tiles_on_real_fields(real_dataset, tmp_path):
    from kit.cells import load_tiles
    from kit.cli import main
    from kit.images import read_sample
    from kit.segment.cache import MaskCache

    out = tmp_path / "masks"
    assert main(["segment", "--images", str(real_dataset / "test"), "--out", str(out), "--tiles", "32", "--quiet"]) == 0
    cache = MaskCache(out)
    sizes = {**{k: v[0] for k, v in KAGGLE.items()}, **WEBSITE}
    assert sorted(cache.ids()) == sorted(sizes)
    tile_dir = next(out.glob("tiles-32-*"))
    for image_id, side in sizes.items():
        nuclei, cells, table = cache.load(image_id)
        assert cells.shape == nuclei.shape == (side, side)
        assert cells.max() >= 5, f"{image_id}: only {cells.max()} cells"  # every field holds 10+ cells
        tiles, tile_table = load_tiles(tile_dir, image_id)
        assert len(tiles) == cells.max() == len(tile_table)
        assert 32 in np.asarray(tiles).shape[1:] and 4 in np.asarray(tiles).shape[1:]
    # a JPEG field segments like its PNG would: the decoded pixels, not the container, decide
    image = read_sample(real_dataset / "test", "89_B5_1")
    assert image.shape == (1728, 1728, 4) and image.dtype == np.uint8


def test_predict_on_real_fields_validates(real_dataset, tmp_path):
    from test_predict import make_run  # tests/ is on sys.path

    from kit.predict import predict

    run = make_run(tmp_path, real_dataset, n_folds=1)
    out = tmp_path / "submission.csv"
    info = predict(run, real_dataset / "test", out, ids_from=real_dataset / "sample_submission.csv", progress=False)
    assert validate_submission(out, sample=real_dataset / "sample_submission.csv", images=real_dataset / "test") == []
    sub = read_submission(out)
    assert set(sub) == {*KAGGLE, *WEBSITE}
    assert sub["89_B5_1"].width == sub["89_B5_1"].height == 1728
    assert all(pred.triples for pred in sub.values())  # every field got cells
    assert info["cells"] >= 20


def _read_sample(path: Path) -> tuple[list[str], dict[str, tuple[int, int]]]:
    ids, sizes = [], {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            ids.append(row["ID"])
            sizes[row["ID"]] = (int(row["ImageWidth"]), int(row["ImageHeight"]))
    return ids, sizes


def test_submission_for_the_real_sample_submission_validates(tmp_path):
    from kit.rle import encode_binary_mask

    sample = REAL / "labels" / "hpa2021_sample_submission.csv"
    ids, sizes = _read_sample(sample)
    assert len(ids) == 559
    assert sorted({s for s in sizes.values()}) == [(1728, 1728), (2048, 2048), (3072, 3072)]
    masks = {}
    for w, h in set(sizes.values()):  # two synthetic cells per image, drawn at the stated size
        a = np.zeros((h, w), bool)
        a[h // 4:h // 2, w // 5:w // 3] = True
        b = np.zeros((h, w), bool)
        b[-h // 6:, -w // 7:] = True  # touches the bottom-right corner
        masks[(w, h)] = (encode_binary_mask(a), encode_binary_mask(b))
    preds = {}
    for k, image_id in enumerate(ids):
        w, h = sizes[image_id]
        ma, mb = masks[(w, h)]
        triples = [(c, 0.5, ma) for c in range(19)] + [(k % 19, 0.9, mb)]
        preds[image_id] = ImagePrediction(w, h, triples)
    out = write_submission(tmp_path / "submission.csv", preds, ids=ids)
    assert validate_submission(out, sample=sample) == []
    # a mask drawn at the wrong size for one ID is caught, naming it
    wrong = dict(preds)
    first = ids[0]
    w, h = sizes[first]
    other = next(s for s in masks if s != (w, h))
    wrong[first] = ImagePrediction(w, h, [(0, 0.5, masks[other][0])])
    bad = write_submission(tmp_path / "bad.csv", wrong, ids=ids)
    problems = validate_submission(bad, sample=sample)
    assert len(problems) == 1 and first in problems[0]
