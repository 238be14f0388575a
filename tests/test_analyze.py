"""kit.analyze: label statistics, plots and summary on hand-made and real label tables."""
from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest

from conftest import REAL_TRAIN_CSV, require
from kit.analyze import analyze, composite_rgb, cooccurrence_conditional, label_stats
from kit.cli import main
from kit.errors import DataError
from kit.images import CHANNELS
from kit.labels import NUM_CLASSES

PLOTS = ("label_distribution.png", "label_combinations.png", "labels_per_image.png", "cooccurrence.png")

# 6 images; {0,16} three times (written two ways), 13|13 folded, one 3-label image.
SMALL_CSV = "ID,Label\na,0|16\nb,16|0\nc,13|13\nd,0\ne,8|5|0\nf,0|16\n"


def assert_png(path, min_side=200):
    assert path.is_file(), path
    img = cv2.imread(str(path))
    assert img is not None and min(img.shape[:2]) >= min_side, path
    assert img.std() > 0  # not a blank canvas


def test_label_stats_counts():
    stats = label_stats([[0, 16], [0, 16], [13], [0], [0, 5, 8]])
    assert stats.n_images == 5
    assert stats.class_counts[0] == 4 and stats.class_counts[16] == 2 and stats.class_counts.sum() == 9
    assert stats.combinations[0] == ((0, 16), 2)
    assert stats.n_combinations == 4
    assert stats.labels_per_image == {1: 2, 2: 2, 3: 1}
    assert stats.cooccurrence.shape == (NUM_CLASSES, NUM_CLASSES)
    assert stats.cooccurrence[0, 16] == stats.cooccurrence[16, 0] == 2
    np.testing.assert_array_equal(np.diag(stats.cooccurrence), stats.class_counts)
    cond = cooccurrence_conditional(stats)
    assert cond[16, 0] == 1.0 and cond[0, 16] == 0.5  # every Cytosol image has Nucleoplasm, not vice versa
    assert np.isnan(cond[1]).all()  # class 1 absent: undefined, not a division warning


def test_composite_adds_yellow_to_red_and_green():
    image = np.zeros((1, 3, 4), np.float32)
    image[0, 0] = [0.2, 0.1, 0.3, 0.5]
    image[0, 1] = [0.0, 0.0, 0.0, 1.0]
    image[0, 2] = [0.9, 0.0, 0.0, 0.5]
    rgb = composite_rgb(image, yellow_weight=1.0)
    np.testing.assert_allclose(rgb[0, 0], [0.7, 0.6, 0.3])
    np.testing.assert_allclose(rgb[0, 1], [1.0, 1.0, 0.0])  # yellow alone shows yellow
    np.testing.assert_allclose(rgb[0, 2], [1.0, 0.5, 0.0])  # clipped to 1
    np.testing.assert_allclose(composite_rgb(image)[0, 0], [0.45, 0.35, 0.3])  # default: half yellow


def test_analyze_small_csv(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text(SMALL_CSV)
    out = tmp_path / "out"
    res = analyze(csv, out)
    s = res.stats
    assert s.n_images == 6
    assert s.n_combinations == 4
    assert s.raw_strings == 5 and s.repeated_strings == 1
    assert s.class_counts[0] == 5 and s.class_counts[16] == 3 and s.class_counts[13] == 1
    assert s.labels_per_image == {1: 2, 2: 3, 3: 1}
    assert res.sample_id is None  # no images beside the CSV
    for name in PLOTS:
        assert_png(out / name)
    summary = (out / "summary.md").read_text()
    assert "- images: 6" in summary
    assert "- unique label combinations: 4 " in summary
    assert "| 0 | Nucleoplasm | 5 | 83.33 |" in summary
    assert "| 16 | Cytosol | 3 | 50.00 |" in summary
    assert "| 2 | 3 | 50.00 |" in summary  # 3 images with 2 labels
    assert "| 1 | 0\\|16 | 0 Nucleoplasm + 16 Cytosol | 3 | 50.00 |" in summary
    assert not list(out.glob(".*"))  # no temporary files left behind


def make_dataset(root, ids, size=(40, 56), dtype=np.uint16):
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id in ids:
        for c in CHANNELS:
            cv2.imwrite(str(root / "train" / f"{image_id}_{c}.png"), rng.integers(0, 3000, size).astype(dtype))
    return root


def test_analyze_dataset_folder_plots_first_complete_sample(tmp_path):
    root = make_dataset(tmp_path / "ds", ["c", "d", "e"])  # a and b have labels but no images
    (root / "train.csv").write_text(SMALL_CSV)
    out = tmp_path / "out"
    res = analyze(root, out)
    assert res.sample_id == "c"
    assert_png(out / "channels_c.png")
    assert "channels_c.png" in (out / "summary.md").read_text()

    res = analyze(root, out, sample="e")
    assert_png(out / "channels_e.png")


def test_analyze_csv_uses_train_folder_beside_it(tmp_path):
    root = make_dataset(tmp_path / "ds", ["d"], dtype=np.uint8)
    (root / "train.csv").write_text(SMALL_CSV)
    res = analyze(root / "train.csv", tmp_path / "out")
    assert res.sample_id == "d" and (tmp_path / "out" / "channels_d.png").is_file()


def test_analyze_cli_and_errors(tmp_path, capsys):
    csv = tmp_path / "train.csv"
    csv.write_text(SMALL_CSV)
    assert main(["analyze", str(csv), "--out", str(tmp_path / "out")]) == 0
    assert "6 images, 4 unique label combinations" in capsys.readouterr().out
    # --sample without any images folder
    assert main(["analyze", str(csv), "--out", str(tmp_path / "o2"), "--sample", "a"]) == 2
    assert "--sample a" in capsys.readouterr().err
    # a sample whose files are missing names the file
    root = make_dataset(tmp_path / "ds", ["d"])
    (root / "train.csv").write_text(SMALL_CSV)
    assert main(["analyze", str(root), "--out", str(tmp_path / "o3"), "--sample", "zz"]) == 2
    assert "zz_red" in capsys.readouterr().err
    with pytest.raises(DataError, match="not found"):
        analyze(tmp_path / "absent.csv", tmp_path / "o4")
    csv.write_text("ID,Label\na,1|99\n")
    with pytest.raises(DataError, match="row 2"):
        analyze(csv, tmp_path / "o5")


def test_analyze_real_train_csv(tmp_path):
    path = require(REAL_TRAIN_CSV)
    res = analyze(path, tmp_path / "real")
    s = res.stats
    # independent count straight from the file
    lines = path.read_text().splitlines()[1:]
    sets = [frozenset(int(t) for t in line.split(",", 1)[1].split("|")) for line in lines]
    assert s.n_images == len(sets) == 21806  # the documented size of the 2021 train.csv
    assert s.n_combinations == len(set(sets))
    per_class = Counter(c for ids in sets for c in ids)
    assert s.class_counts.tolist() == [per_class[c] for c in range(NUM_CLASSES)]
    assert s.labels_per_image == dict(sorted(Counter(len(x) for x in sets).items()))
    assert s.repeated_strings == sum(len(set(line.split(",", 1)[1].split("|"))) != len(line.split(",", 1)[1].split("|")) for line in lines)
    summary = (tmp_path / "real" / "summary.md").read_text()
    assert "- images: 21,806" in summary
    assert f"- unique label combinations: {len(set(sets)):,} " in summary
    for name in PLOTS:
        assert_png(tmp_path / "real" / name)


def test_analyze_synthetic_dataset(request, tmp_path):
    pytest.importorskip("kit.synth", reason="kit.synth is written in parallel")
    root = request.getfixturevalue("tiny_dataset")
    res = analyze(root, tmp_path / "out")
    lines = (root / "train.csv").read_text().splitlines()[1:]
    first_id = lines[0].split(",")[0]
    assert res.stats.n_images == len(lines) == 12
    assert res.sample_id == first_id
    assert_png(tmp_path / "out" / f"channels_{first_id}.png")
