"""The learned boundary map of the classical segmenter (kit.segment.boundary) and its training script."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from kit.segment import segment_image
from kit.segment.boundary import FEATURES, MODEL_PATH, boundary_probability, load_model
from kit.segment.classical import boundary_inputs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _reference_mlp(spec: dict, x: np.ndarray) -> np.ndarray:
    """The model as its file documents it: standardise, dense + ReLU, dense + sigmoid."""
    h = (x - np.asarray(spec["mean"])) / np.asarray(spec["std"])
    *hidden, last = spec["layers"]
    for layer in hidden:
        h = np.maximum(h @ np.asarray(layer["W"]) + np.asarray(layer["b"]), 0.0)
    z = h @ np.asarray(last["W"]) + np.asarray(last["b"])
    return 1.0 / (1.0 + np.exp(-z[..., 0]))


def test_the_shipped_model_matches_its_documented_format_and_is_zero_off_the_mask():
    spec = json.loads(MODEL_PATH.read_text())
    assert spec["version"] == 1 and tuple(spec["features"]) == FEATURES
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 30, len(FEATURES))).astype(np.float32) * np.asarray(spec["std"], np.float32) \
        + np.asarray(spec["mean"], np.float32)
    mask = rng.random((40, 30)) < 0.7
    prob = boundary_probability(np.ascontiguousarray(np.moveaxis(feats, -1, 0)), mask, load_model())
    assert prob.dtype == np.float32 and prob.shape == mask.shape
    assert np.all(prob[~mask] == 0)
    np.testing.assert_allclose(prob[mask], _reference_mlp(spec, feats)[mask], atol=2e-5)
    assert 0.05 < prob[mask].mean() < 0.95  # not a constant


def test_a_missing_or_foreign_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json.*train_boundary.py"):
        load_model(str(tmp_path / "nope.json"))
    bad = tmp_path / "other.json"
    spec = json.loads(MODEL_PATH.read_text())
    spec["features"] = spec["features"][:-1]
    bad.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="other.json"):
        load_model(str(bad))


def test_boundary_target_marks_pixels_between_two_cells_only():
    from benchmarks.train_boundary import boundary_target

    t = np.zeros((8, 9), np.int32)
    t[1:7, 1:4] = 1
    t[1:7, 4:7] = 2  # touches cell 1 along a vertical line; background around both
    y = boundary_target(t)
    assert y[1:7, 3].all() and y[1:7, 4].all()       # both sides of the shared edge
    assert not y[:, :3].any() and not y[:, 5:].any()  # cell-background edges are not boundaries
    assert not y[0].any() and not y[7].any()


def test_boundary_inputs_are_the_documented_features_at_working_scale():
    from kit import synth

    f = synth.draw_field(np.random.default_rng([3, 0, 0]), 512)
    got = boundary_inputs(synth.quantise(f.image, 8), scale=0.5, min_work_side=64)
    assert tuple(got["shape"]) == (256, 256)
    assert got["features"].shape == (len(FEATURES), *got["shape"])
    assert got["fg"].shape == tuple(got["shape"]) and got["fg"].any()
    assert np.isfinite(got["features"]).all()


def test_the_boundary_map_finds_more_cells_on_crowded_fields_of_another_generator():
    """Crowded fields of the independent generator (a tuning seed; 100-104 are held out): with the
    learned boundary map the watershed gets clearly more cells right at IoU 0.6 than without it."""
    from benchmarks.foreign_fields import draw_field, score_field

    field = draw_field(1, "crowded", size=1728)
    _, cells = segment_image(field["image"])
    _, plain = segment_image(field["image"], boundary=0.0)
    f1, f1_plain = score_field(cells, field)["f1"], score_field(plain, field)["f1"]
    assert f1 >= f1_plain + 0.05, (f1, f1_plain)
