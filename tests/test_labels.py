"""kit.labels: label strings, multi-hot vectors and train.csv reading."""
from __future__ import annotations

import numpy as np
import pytest

from kit.errors import DataError
from kit.labels import (
    CLASS_NAMES,
    NEGATIVE,
    NUM_CLASSES,
    LabelError,
    format_label,
    from_multihot,
    label_matrix,
    parse_label,
    read_labels_csv,
    to_multihot,
)


def test_class_names_in_competition_order():
    assert NUM_CLASSES == 19 and len(CLASS_NAMES) == 19
    assert CLASS_NAMES[0] == "Nucleoplasm"
    assert CLASS_NAMES[11] == "Mitotic spindle"
    assert CLASS_NAMES[17] == "Vesicles and punctate cytosolic patterns"
    assert CLASS_NAMES[NEGATIVE] == "Negative" and NEGATIVE == 18


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8|5|0", [0, 5, 8]),
        ("0", [0]),
        ("18", [18]),
        ("13|13", [13]),  # 146 times in the real train.csv: folded
        ("2|13|2|13", [2, 13]),
        (" 8 | 5 |0 ", [0, 5, 8]),  # whitespace around tokens and the string
        ("16|0", [0, 16]),  # order does not matter
        ("0|16", [0, 16]),
    ],
)
def test_parse_label(text, expected):
    assert parse_label(text) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty label"),
        ("   ", "empty label"),
        (None, "empty label"),
        (float("nan"), "empty label"),  # what pandas gives for an empty cell by default
        ("1||2", "empty class id"),
        ("1|", "empty class id"),
        ("|1", "empty class id"),
        ("a", "non-numeric"),
        ("1|x", "non-numeric"),
        ("1.5", "non-numeric"),
        ("-1", "non-numeric"),
        ("\u00b2", "non-numeric"),  # '²'.isdigit() is True but int('²') fails
        ("19", "outside 0..18"),
        ("0|100", "outside 0..18"),
    ],
)
def test_parse_label_errors_name_row_and_id(text, words):
    with pytest.raises(LabelError) as info:
        parse_label(text, row=7, image_id="abc-123")
    message = str(info.value)
    assert words in message
    assert "row 7" in message and "ID abc-123" in message


def test_label_error_is_a_data_error():
    assert issubclass(LabelError, DataError)


def test_format_label_sorts_and_folds():
    assert format_label([8, 5, 0]) == "0|5|8"
    assert format_label([13, 13]) == "13"
    assert format_label(np.array([3, 1])) == "1|3"
    with pytest.raises(ValueError):
        format_label([19])
    with pytest.raises(ValueError):
        format_label([-1])


def test_multihot_round_trip_every_class():
    for ids in ([0], [18], [0, 5, 8], list(range(NUM_CLASSES))):
        vec = to_multihot(ids)
        assert vec.shape == (NUM_CLASSES,) and vec.dtype == np.float32
        assert vec.sum() == len(ids)
        assert from_multihot(vec) == ids
        assert parse_label(format_label(from_multihot(vec))) == ids


def test_to_multihot_folds_and_rejects_out_of_range():
    assert to_multihot([13, 13]).sum() == 1
    with pytest.raises(ValueError):
        to_multihot([-1])  # must not silently set class 18
    with pytest.raises(ValueError):
        to_multihot([19])


def test_from_multihot_threshold_and_shape():
    probs = np.zeros(NUM_CLASSES)
    probs[[2, 7]] = [0.9, 0.3]
    assert from_multihot(probs) == [2]
    assert from_multihot(probs, threshold=0.25) == [2, 7]
    with pytest.raises(ValueError):
        from_multihot(np.zeros(18))


def test_label_matrix():
    m = label_matrix(["0|5", "18", "13|13"])
    assert m.shape == (3, NUM_CLASSES) and m.dtype == np.uint8
    assert m[0].nonzero()[0].tolist() == [0, 5]
    assert m[1].nonzero()[0].tolist() == [18]
    assert m[2].nonzero()[0].tolist() == [13]
    with pytest.raises(LabelError, match="row 1"):
        label_matrix(["0", "1||2"])


def test_read_labels_csv_normalises(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("ID,Label\na,8|5|0\nb,13|13\nc, 2 \n")
    df = read_labels_csv(path)
    assert df["ID"].tolist() == ["a", "b", "c"]
    assert df["Label"].tolist() == ["0|5|8", "13", "2"]
    assert df["labels"].tolist() == [[0, 5, 8], [13], [2]]


def test_read_labels_csv_keeps_extra_columns_out_and_ids_as_strings(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("ID,Label,fold\n001,1,3\n2,0,1\n")
    df = read_labels_csv(path)
    assert df["ID"].tolist() == ["001", "2"]  # not parsed as numbers
    assert list(df.columns) == ["ID", "Label", "labels"]


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "not found"),
        ("", "cannot read"),  # empty file
        ("ID,Label\n", "no rows"),
        ("Id,Target\na,1\n", "missing column"),
        ("ID\na\n", "missing column(s) Label"),
        ("ID,Label\na,1\nb,2\na,3\n", "duplicated ID 'a' (line 4)"),
        ("ID,Label\na,1\n,2\n", "line 3: empty ID"),
    ],
)
def test_read_labels_csv_file_errors(tmp_path, content, words):
    path = tmp_path / "train.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as info:
        read_labels_csv(path)
    assert words in str(info.value)
    assert str(path) in str(info.value)


def test_read_labels_csv_bad_label_names_file_line_and_id(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("ID,Label\na,1\nb,1|20\n")
    with pytest.raises(LabelError) as info:
        read_labels_csv(path)
    message = str(info.value)
    assert str(path) in message and "row 3" in message and "ID b" in message and "20" in message


def test_read_labels_csv_empty_label_cell(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("ID,Label\na,1\nb,\n")
    with pytest.raises(LabelError, match="empty label.*row 3, ID b"):
        read_labels_csv(path)
