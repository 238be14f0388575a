"""kit.submission: prediction strings, atomic writing, reading errors, the validator and its CLI."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from kit.cli import main
from kit.errors import DataError
from kit.rle import encode_binary_mask, encode_label_image
from kit.submission import (
    ImagePrediction,
    format_confidence,
    format_prediction_string,
    parse_prediction_string,
    read_submission,
    validate_submission,
    write_submission,
)


def masks(h=6, w=5, n=3) -> list[str]:
    labels = np.zeros((h, w), np.int32)
    for k in range(1, n + 1):
        labels[k - 1, : k + 1] = k
    return list(encode_label_image(labels).values())


def write_csv(path, rows, header=("ID", "ImageWidth", "ImageHeight", "PredictionString")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_format_confidence_is_compact_and_float32_exact():
    assert format_confidence(1.0) == "1"
    assert format_confidence(0.5) == "0.5"
    assert format_confidence(0) == "0"
    assert format_confidence(1e-6) == "1e-06"
    rng = np.random.default_rng(0)
    for v in rng.random(200).astype(np.float32):
        text = format_confidence(v)
        assert np.float32(float(text)) == v
        assert len(text) <= 12
    # two float32 neighbours stay distinct (a %.6g format would make them a tie)
    a = np.float32(0.9999999)
    b = np.nextafter(a, np.float32(0))
    assert format_confidence(a) != format_confidence(b)
    with pytest.raises(DataError, match="finite"):
        format_confidence(float("nan"))


def test_prediction_string_round_trip():
    m = masks()
    triples = [(0, 0.25, m[0]), (18, 1.0, m[1]), (5, 0.125, m[0])]
    text = format_prediction_string(triples)
    assert text == f"0 0.25 {m[0]} 18 1 {m[1]} 5 0.125 {m[0]}"
    assert parse_prediction_string(text, image_id="x") == triples
    assert parse_prediction_string("", image_id="x") == []
    assert parse_prediction_string(float("nan")) == []
    assert format_prediction_string([]) == ""


@pytest.mark.parametrize(
    "text, match",
    [
        ("0 0.5", "not a multiple of 3"),
        ("19 0.5 abc", r"triple 0: class id 19 outside 0\.\.18"),
        ("0 0.5 abc x 0.5 abc", r"triple 1: class id 'x' is not an integer"),
        ("0 nan abc", "triple 0: confidence 'nan' is not finite"),
        ("0 high abc", "triple 0: confidence 'high' is not a number"),
    ],
)
def test_parse_prediction_string_errors_name_image_and_triple(text, match):
    with pytest.raises(DataError, match=match) as info:
        parse_prediction_string(text, image_id="img7")
    assert "img7" in str(info.value)


def test_format_prediction_string_rejects_bad_triples():
    m = masks()[0]
    with pytest.raises(DataError, match="triple 1: class id 19"):
        format_prediction_string([(0, 0.5, m), (19, 0.5, m)])
    with pytest.raises(DataError, match="not finite"):
        format_prediction_string([(0, float("inf"), m)])
    with pytest.raises(DataError, match="-10"):
        format_prediction_string([(0, -12.0, m)])
    with pytest.raises(DataError, match="mask"):
        format_prediction_string([(0, 0.5, "a b")])
    with pytest.raises(DataError, match="integer"):
        format_prediction_string([(0.0, 0.5, m)])


def test_write_submission_every_id_and_read_back(tmp_path):
    m = masks(6, 5)
    preds = {"b": ImagePrediction(5, 6, [(3, 0.75, m[0]), (4, 0.5, m[0])])}
    path = write_submission(tmp_path / "sub" / "submission.csv", preds, ids=["a", "b", "c"],
                            sizes={"a": (5, 6), "c": (7, 8)})
    lines = path.read_text().splitlines()
    assert lines[0] == "ID,ImageWidth,ImageHeight,PredictionString"
    assert lines[1] == "a,5,6,"
    assert lines[2] == f"b,5,6,3 0.75 {m[0]} 4 0.5 {m[0]}"
    assert lines[3] == "c,7,8,"
    back = read_submission(path)
    assert list(back) == ["a", "b", "c"]
    assert back["b"] == preds["b"]
    assert back["a"] == ImagePrediction(5, 6, [])
    assert back["c"] == ImagePrediction(7, 8, [])
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]  # no temporary left


def test_write_submission_errors_leave_previous_file_intact(tmp_path):
    path = tmp_path / "submission.csv"
    write_submission(path, {"a": ImagePrediction(5, 6, [])})
    before = path.read_bytes()
    m = masks()[0]
    with pytest.raises(DataError, match="ID b has no prediction and no size"):
        write_submission(path, {"a": ImagePrediction(5, 6, [(0, 0.5, m)])}, ids=["a", "b"])
    with pytest.raises(DataError, match="not in the test list, e.g. z"):
        write_submission(path, {"z": ImagePrediction(5, 6, [])}, ids=["a"])
    with pytest.raises(DataError, match="ID a: triple 0: class id 25"):
        write_submission(path, {"a": ImagePrediction(5, 6, [(25, 0.5, m)])})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


def test_read_submission_handles_rows_beyond_csv_field_limit(tmp_path):
    big = np.zeros((400, 400), np.int32)
    big[::4, ::4] = np.arange(1, 101 * 101)[: 100 * 100].reshape(100, 100)  # 10,000 one-pixel cells
    enc = list(encode_label_image(big).values())
    preds = {"big": ImagePrediction(400, 400, [(c % 19, 0.5, t) for c, t in enumerate(enc)])}
    path = write_submission(tmp_path / "s.csv", preds)
    assert path.stat().st_size > 200_000  # one field above csv's default 128 KiB limit
    assert read_submission(path) == preds


@pytest.mark.parametrize(
    "rows, header, match",
    [
        ([["a", "5", "6", ""]], ("ID", "ImageWidth", "PredictionString"), "missing column.*ImageHeight"),
        ([["a", "5", "6", ""], ["a", "5", "6", ""]], None, "line 3, ID a: duplicated ID"),
        ([["a", "5", "x", ""]], None, "line 2, ID a: ImageWidth/ImageHeight must be positive integers"),
        ([["a", "5", "6", ""], ["b", "5", "6", "0 0.5"]], None, "line 3, ID b: 2 tokens"),
        ([["", "5", "6", ""]], None, "line 2: empty ID"),
    ],
)
def test_read_submission_errors_name_line_and_id(tmp_path, rows, header, match):
    path = write_csv(tmp_path / "s.csv", rows, header or ("ID", "ImageWidth", "ImageHeight", "PredictionString"))
    with pytest.raises(DataError, match=match):
        read_submission(path)


def test_read_submission_binary_garbage_is_a_data_error(tmp_path):
    path = tmp_path / "s.csv"
    path.write_bytes(b"ID,ImageWidth,ImageHeight,PredictionString\n\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match="cannot read as CSV"):
        read_submission(path)
    assert "cannot read as CSV" in validate_submission(path)[0]


def test_read_submission_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_submission(tmp_path / "nope.csv")


def test_validate_lists_every_problem_with_id_and_triple(tmp_path):
    good = encode_binary_mask(np.eye(6, 5, dtype=bool))
    wrong_size = encode_binary_mask(np.ones((3, 3), bool))
    rows = [
        ["a", "5", "6", f"0 0.9 {good} 19 0.5 {good} 2 nan {good}"],
        ["b", "5", "6", f"1 0.5 {wrong_size} 1 0.5 garbage@@"],
        ["a", "5", "6", ""],
        ["c", "0", "6", f"0 -11 {good}"],
        ["d", "5", "6", f"0 0.5 {good} 1"],
    ]
    path = write_csv(tmp_path / "s.csv", rows)
    problems = validate_submission(path)
    text = "\n".join(problems)
    assert "line 2, ID a: triple 1: class id 19 outside 0..18" in text
    assert "line 2, ID a: triple 2: confidence 'nan' is not finite" in text
    assert "line 3, ID b: triple 0: mask does not decode: run lengths sum to 9 pixels, but 6 x 5 = 30" in text
    assert "line 3, ID b: triple 1: mask does not decode" in text
    assert "line 4, ID a: duplicated ID (first on line 2)" in text
    assert "line 5, ID c: ImageWidth/ImageHeight must be positive integers" in text
    assert "line 5, ID c: triple 0: confidence -11 <= -10" in text
    assert "line 6, ID d: 4 tokens, not a multiple of 3" in text
    assert len(problems) == 8


def test_validate_against_sample_and_images(tmp_path):
    import cv2

    m = masks(6, 5)
    sample = write_csv(tmp_path / "sample.csv", [["a", "5", "6", ""], ["b", "5", "6", ""], ["c", "4", "4", ""]])
    images = tmp_path / "test"
    images.mkdir()
    for image_id, (h, w) in {"a": (6, 5), "b": (7, 5), "x": (6, 5)}.items():
        for ch in ("red", "green", "blue", "yellow"):
            cv2.imwrite(str(images / f"{image_id}_{ch}.png"), np.zeros((h, w), np.uint8))
    path = write_submission(tmp_path / "s.csv", {
        "a": ImagePrediction(5, 6, [(0, 0.5, m[0])]),
        "b": ImagePrediction(5, 6, []),
        "x": ImagePrediction(5, 6, []),
    })
    problems = validate_submission(path, sample=sample, images=images)
    text = "\n".join(problems)
    assert "line 3, ID b: size 5 x 6, the image is 5 x 7" in text
    assert "ID c: in the sample submission but missing from s.csv" in text
    assert "line 4, ID x: not in the sample submission" in text
    assert len(problems) == 3
    assert validate_submission(path, sample=sample, images=images, check_masks=False) == problems
    fixed = write_submission(tmp_path / "ok.csv", {"a": ImagePrediction(5, 6, [(0, 0.5, m[0])])},
                             ids=["a", "b", "c"], sizes={"b": (5, 6), "c": (4, 4)})
    problems = validate_submission(fixed, sample=sample)
    assert problems == []
    mismatch = write_submission(tmp_path / "mm.csv", {}, ids=["a", "b", "c"], sizes={"a": (5, 6), "b": (5, 6), "c": (5, 4)})
    assert validate_submission(mismatch, sample=sample) == ["line 4, ID c: size 5 x 4, the sample says 4 x 4"]


def test_validate_unreadable_file_is_one_problem(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("foo,bar\n1,2\n")
    problems = validate_submission(path)
    assert len(problems) == 1 and "missing column" in problems[0]


def test_validate_submission_cli_exit_codes(tmp_path, capsys):
    m = masks(6, 5)
    ok = write_submission(tmp_path / "ok.csv", {"a": ImagePrediction(5, 6, [(0, 0.5, m[0])])})
    assert main(["validate-submission", str(ok)]) == 0
    assert "ok:" in capsys.readouterr().out
    bad = write_csv(tmp_path / "bad.csv", [["a", "5", "6", f"19 0.5 {m[0]}"], ["a", "5", "6", ""]])
    assert main(["validate-submission", str(bad), "--max-problems", "1"]) == 1
    out = capsys.readouterr()
    assert "line 2, ID a: triple 0: class id 19" in out.out
    assert "... and 1 more" in out.out
    assert "2 problem(s)" in out.err
    assert main(["validate-submission", str(tmp_path / "missing.csv")]) == 2
    assert "not found" in capsys.readouterr().err
