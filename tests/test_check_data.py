"""kit.check_data: check_data finding every planted problem in one pass, and the command."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from kit.check_data import Problem, check_data, summarize
from kit.cli import main
from kit.errors import DataError
from kit.layout import DatasetIndex
from test_layout import SIZE, make_clean, write_sample


def kinds(problems: list[Problem]) -> Counter:
    return Counter(p.kind for p in problems if p.severity != "info")


# ---------------------------------------------------------------------------------- check_data
def test_clean_dataset_has_no_errors_or_warnings(tmp_path):
    problems = check_data(make_clean(tmp_path))
    assert kinds(problems) == Counter()
    info = [p.message for p in problems if p.severity == "info"]
    assert "train: 4 samples" in info and "test: 2 samples" in info
    assert f"train: 4 images of {SIZE}x{SIZE}" in info


def plant_problems(root: Path) -> dict[str, int]:
    """A dataset with every kind of problem; returns the expected count per kind."""
    make_clean(root, n_train=6, n_test=3)
    train, test = root / "train", root / "test"
    (train / "tr0_yellow.png").unlink()  # missing channel
    (train / "tr1_green.png").unlink()  # missing channel, second sample
    (train / "tr1_red.png").unlink()  # and a second channel of it
    p = train / "tr2_blue.png"
    p.write_bytes(p.read_bytes()[:-30])  # truncated
    (train / "tr3_red.png").write_bytes(b"")  # empty
    (test / "te0_green.png").write_text("this is not an image")  # non-image
    cv2.imwrite(str(train / "tr4_green.png"), np.zeros((SIZE + 8, SIZE), np.uint8))  # shape mismatch
    write_sample(train, "extra")  # unlabelled
    write_sample(train, "extra2")  # unlabelled
    cv2.imwrite(str(train / "tr5_red.tif"), np.zeros((SIZE, SIZE), np.uint8))  # same channel twice
    cv2.imwrite(str(train / "tr5_blue.png"), np.zeros((SIZE, SIZE), np.uint16))  # 16-bit among 8-bit
    write_sample(test, "te_unlisted")  # test image not in sample_submission
    write_sample(test, "tr0")  # ID in train and test
    (train / "README.txt").write_text("x")  # stray
    (test / "te1_red.png.bak").write_text("x")  # stray
    (train / "big_red.PNG").write_text("x")  # stray (upper-case extension is not read)
    (root / "train.csv").write_text(
        "ID,Label\n"
        "tr0,0|5\n"
        "tr1,13|13\n"  # fine: folded
        "tr2,1||2\n"  # bad label (line 4)
        "tr3,abc\n"  # bad label (line 5)
        "tr4,\n"  # bad label (line 6)
        "tr5,42\n"  # bad label (line 7)
        "ghost1,1\n"  # label without images
        "tr0,3\n"  # duplicated ID (line 9)
        "ghost2,2\n"  # label without images
        "short\n"  # wrong number of fields (line 11)
    )
    (root / "sample_submission.csv").write_text(
        "ID,ImageWidth,ImageHeight,PredictionString\n"
        f"te0,{SIZE},{SIZE},\n"
        f"te1,{SIZE + 1},{SIZE},\n"  # size differs from the image
        f"te2,{SIZE},x,\n"  # bad size field
        f"te_ghost,{SIZE},{SIZE},\n"  # no images
        f"te2,{SIZE},{SIZE},\n"  # duplicated
        f"tr0,{SIZE},{SIZE},\n"
    )
    return {
        "missing_channel": 3,
        "unreadable_image": 3,
        "shape_mismatch": 1,
        "bad_label": 4,
        "bad_csv": 2,
        "duplicate_id": 2,
        "label_without_images": 2,
        "submission_without_images": 1,
        "size_mismatch": 1,
        "unlabeled_image": 2,
        "test_image_not_in_submission": 1,
        "train_test_overlap": 1,
        "duplicate_channel_file": 1,
        "mixed_depth_in_sample": 1,
        "stray_file": 3,
    }


def test_check_data_finds_every_planted_problem_in_one_pass(tmp_path):
    expected = plant_problems(tmp_path)
    problems = check_data(tmp_path)
    assert kinds(problems) == Counter(expected)
    by = {}
    for p in problems:
        by.setdefault(p.kind, []).append(p)
    # every problem names where it is
    for p in problems:
        if p.severity != "info":
            assert p.path or p.image_id, p
    assert {p.row for p in by["bad_label"]} == {4, 5, 6, 7}
    assert {p.image_id for p in by["bad_label"]} == {"tr2", "tr3", "tr4", "tr5"}
    assert all("train.csv" in p.message and f"ID {p.image_id}" in p.message for p in by["bad_label"])
    assert {(Path(p.path).name, p.image_id) for p in by["missing_channel"]} == {
        ("tr0_yellow.png", "tr0"), ("tr1_green.png", "tr1"), ("tr1_red.png", "tr1")}
    assert {Path(p.path).name for p in by["unreadable_image"]} == {"tr2_blue.png", "tr3_red.png", "te0_green.png"}
    assert {p.row for p in by["duplicate_id"]} == {9, 6}
    assert {p.image_id for p in by["label_without_images"]} == {"ghost1", "ghost2"}
    assert by["size_mismatch"][0].image_id == "te1" and by["size_mismatch"][0].row == 3
    assert by["submission_without_images"][0].image_id == "te_ghost"
    assert {p.image_id for p in by["unlabeled_image"]} == {"extra", "extra2"}
    assert by["shape_mismatch"][0].image_id == "tr4"
    assert {p.row for p in by["bad_csv"]} == {4, 11}
    assert all(p.severity == "error" for p in by["bad_label"] + by["missing_channel"])
    assert all(p.severity == "warning" for p in by["unlabeled_image"] + by["stray_file"])


def test_check_data_reports_size_and_depth_mix_as_info(tmp_path):
    make_clean(tmp_path, n_train=3)
    write_sample(tmp_path / "train", "tr1", size=(40, 40))
    write_sample(tmp_path / "train", "tr2", size=(40, 40), dtype=np.uint16)
    problems = check_data(tmp_path)
    assert kinds(problems) == Counter()  # a mix is normal in real data
    info = {p.message for p in problems if p.severity == "info"}
    assert {f"train: 1 images of {SIZE}x{SIZE}", "train: 2 images of 40x40"} <= info
    assert {"train: 2 images of 8-bit", "train: 1 images of 16-bit"} <= info


def test_check_data_structure_problems(tmp_path):
    make_clean(tmp_path)
    (tmp_path / "train.csv").unlink()
    for f in (tmp_path / "test").iterdir():
        f.unlink()
    (tmp_path / "test").rmdir()
    found = kinds(check_data(tmp_path))
    assert found["missing_path"] == 2  # train.csv for train/, test/ for sample_submission.csv
    assert found["submission_without_images"] == 2


def test_check_data_csv_without_columns(tmp_path):
    make_clean(tmp_path)
    (tmp_path / "train.csv").write_text("Id,Target\ntr0,1\n")
    (tmp_path / "sample_submission.csv").write_text("")
    problems = check_data(tmp_path)
    messages = [p.message for p in problems if p.kind == "bad_csv"]
    assert any("missing column(s) ID, Label" in m for m in messages)
    assert any("empty file" in m and "sample_submission.csv" in m for m in messages)
    # an unusable header stops the cross-checks: no flood of "unlabelled" images
    assert kinds(problems) == Counter({"bad_csv": 2})


def test_check_data_ids_with_spaces_and_empty_ids(tmp_path):
    make_clean(tmp_path)
    (tmp_path / "train.csv").write_text("ID,Label\ntr0,1\ntr1 ,2\n,3\ntr2,0\ntr3,0\n")
    problems = [p for p in check_data(tmp_path) if p.kind == "bad_id"]
    assert [p.row for p in problems] == [3, 4]
    assert "surrounding spaces" in problems[0].message and "empty ID" in problems[1].message


def test_check_data_missing_root_raises(tmp_path):
    with pytest.raises(DataError, match="not found"):
        check_data(tmp_path / "absent")


def test_decode_finds_corrupt_pixel_data_that_headers_miss(tmp_path):
    make_clean(tmp_path, n_train=3)
    path = tmp_path / "train" / "tr1_green.png"
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(16)  # header and IEND intact, compressed data broken
    path.write_bytes(bytes(data))
    assert kinds(check_data(tmp_path)) == Counter()
    decoded = check_data(tmp_path, decode=True, workers=2)  # spawn pool
    assert kinds(decoded) == Counter({"unreadable_image": 1})
    assert [Path(p.path).name for p in decoded if p.kind == "unreadable_image"] == ["tr1_green.png"]
    assert kinds(check_data(tmp_path, decode=True, workers=1)) == kinds(decoded)


def test_summarize_groups_and_limits_examples(tmp_path):
    expected = plant_problems(tmp_path)
    problems = check_data(tmp_path)
    text = summarize(problems, examples=2)
    assert "bad_label (4)" in text and "... and 2 more" in text
    assert text.index("errors:") < text.index("warnings:") < text.index("info:")
    n_err = sum(p.severity == "error" for p in problems)
    n_warn = sum(p.severity == "warning" for p in problems)
    assert n_err + n_warn == sum(expected.values())
    assert text.strip().endswith(f"result: {n_err} error(s), {n_warn} warning(s)")
    assert "... and" not in summarize(problems, examples=0)


# ---------------------------------------------------------------------------------- command
def test_check_data_command_exit_codes_and_json(tmp_path, capsys):
    clean = make_clean(tmp_path / "clean")
    assert main(["check-data", str(clean)]) == 0
    assert "result: 0 error(s), 0 warning(s): OK" in capsys.readouterr().out

    bad = tmp_path / "bad"
    expected = plant_problems(bad)
    assert main(["check-data", str(bad), "--examples", "1"]) == 1
    out = capsys.readouterr().out
    for kind, n in expected.items():
        assert f"{kind} ({n})" in out
    assert "tr0_yellow.png" in out  # the first example names the file

    assert main(["check-data", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == sum(n for k, n in expected.items() if k in {
        "missing_channel", "unreadable_image", "shape_mismatch", "bad_label", "bad_csv", "duplicate_id",
        "label_without_images", "submission_without_images", "size_mismatch"})
    assert {p["kind"] for p in report["problems"]} >= set(expected)

    assert main(["check-data", str(tmp_path / "absent")]) == 2
    assert "error: dataset folder not found" in capsys.readouterr().err


def test_synthetic_dataset_is_clean(request):
    pytest.importorskip("kit.synth", reason="kit.synth is written in parallel")
    root = request.getfixturevalue("tiny_dataset")
    problems = check_data(root)
    assert kinds(problems) == Counter()
    index = DatasetIndex.open(root)
    assert len(index.train_ids) == 12 and len(index.test_ids) == 4
    assert index.image_size(index.train_ids[0]) == (256, 256)
    assert index.read(index.test_ids[0]).shape == (256, 256, 4)
