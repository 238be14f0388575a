"""kit.ids: an image ID is a file-name stem, refused at every entry point (issue 16.2)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kit.cli import main
from kit.errors import DataError
from test_layout import SIZE, make_clean, write_sample

MAX_ID_BYTES = 200  # kit.ids.MAX_ID_BYTES (imported in the tests: the entry-point tests run on older kits too)
GOOD = ["5b931256-bb99-11e8-b2b9-ac1f6b6435d0", "10580_1610_C1_1", "a", "x.y", "é-ü", "ID with inner space"]
BAD = {
    "": "empty",
    " a": "surrounding spaces",
    "a\t": "surrounding spaces",
    "../x": "path separator",
    "a/b": "path separator",
    "/abs/path/x": "path separator",
    "a\\b": "path separator",
    "C:x": "Windows",
    "..": "'..'",
    "a..b": "'..'",
    ".hidden": "starts with '.'",
    "a\x00b": "U+0000",
    "a\nb": "U+000A",
    "a\ufeffb": "U+FEFF",  # a BOM inside the text (CSV files concatenated)
    "a\u202eb": "U+202E",  # right-to-left override: a name that reads otherwise
    "a*b": "Windows",
    "CON": "device name",
    "nul.x": "device name",
    "x" * (MAX_ID_BYTES + 1): "bytes long",
    "é" * (MAX_ID_BYTES // 2 + 1): "bytes long",  # bytes, not characters
}


@pytest.mark.parametrize("image_id", GOOD)
def test_real_ids_are_accepted(image_id):
    from kit.ids import check_id, id_problem

    assert id_problem(image_id) is None and check_id(image_id) == image_id


@pytest.mark.parametrize("image_id, words", BAD.items())
def test_ids_that_cannot_be_file_stems_are_refused(image_id, words):
    from kit.ids import MAX_ID_BYTES as limit, check_id, id_problem

    assert limit == MAX_ID_BYTES
    assert words in id_problem(image_id)
    with pytest.raises(DataError, match="train.csv: line 7") as err:
        check_id(image_id, "train.csv: line 7")
    message = str(err.value)
    assert "\n" not in message and len(message) < 300  # quoted and cut, one line


def test_a_non_text_id_is_refused():
    from kit.ids import id_problem

    assert "not text" in id_problem(5)


# ------------------------------------------------------------------------------ entry points

def test_every_reader_of_ids_names_the_file_and_line(tmp_path):
    from kit.labels import read_labels_csv
    from kit.layout import read_id_list, read_sample_submission
    from kit.submission import read_submission

    cases = {
        "train.csv": ("ID,Label\nok,0\n../x,1\n", read_labels_csv, 3),
        "sample.csv": (f"ID,ImageWidth,ImageHeight,PredictionString\nok,{SIZE},{SIZE},\n/etc/x,{SIZE},{SIZE},\n",
                       read_sample_submission, 3),
        "ids.csv": ("ID,fold\nok,0\nok2,1\na\\b,0\n", read_id_list, 4),
        "ids.txt": ("# my list\nok\n\nx/../y\n", read_id_list, 4),
        "sub.csv": (f"ID,ImageWidth,ImageHeight,PredictionString\nok,{SIZE},{SIZE},\n.x,{SIZE},{SIZE},\n",
                    read_submission, 3),
    }
    for name, (text, reader, line) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError) as err:
            reader(path)
        assert f"{path}: line {line}" in str(err.value), name
        assert "file-name stem" in str(err.value), name


def test_path_builders_refuse_a_bad_id_as_the_last_line_of_defence(tmp_path):
    from kit.cells import load_tiles, tiles_done
    from kit.fields import field_path
    from kit.images import channel_path, image_size, read_sample, sample_source
    from kit.masks import TruthMasks
    from kit.predict import prediction_path
    from kit.segment.cache import MaskCache

    write_sample(tmp_path / "outside", "x")  # a sample a ../ ID would reach
    images = tmp_path / "images"
    images.mkdir()
    bad = "../outside/x"
    builders = {
        "channel_path": lambda: channel_path(images, bad, "red"),
        "image_size": lambda: image_size(images, bad),
        "read_sample": lambda: read_sample(images, bad),
        "sample_source": lambda: sample_source(images, bad),
        "MaskCache.path": lambda: MaskCache(tmp_path / "masks").path(bad),
        "field_path": lambda: field_path(tmp_path / "fields", bad),
        "tiles": lambda: tiles_done(tmp_path / "tiles", bad),
        "load_tiles": lambda: load_tiles(tmp_path / "tiles", bad),
        "prediction_path": lambda: prediction_path(tmp_path / "predict", bad),
        "TruthMasks": lambda: TruthMasks(tmp_path / "truth").load(bad),
    }
    for name, build in builders.items():
        with pytest.raises(DataError, match="path separator"):
            build()
    assert channel_path(tmp_path / "outside", "x", "red").is_file()  # the same call with a good ID works


def test_a_file_whose_id_part_is_bad_is_not_a_sample(tmp_path):
    from kit.layout import list_image_ids, scan_split

    write_sample(tmp_path, "good")
    write_sample(tmp_path, "bad\x01id")
    write_sample(tmp_path, "CON")
    assert list_image_ids(tmp_path) == ["good"]
    assert sorted(p.name.split("_")[0] for p, _ in scan_split(tmp_path).bad_ids) == ["CON"] * 4 + ["bad\x01id"] * 4


def test_check_data_reports_every_bad_id_in_one_pass(tmp_path):
    from kit.check_data import check_data

    make_clean(tmp_path)
    (tmp_path / "train.csv").write_text("ID,Label\ntr0,0\n../tr1,1\n/abs/tr2,2\ntr3\x00,0\n" + "z" * 100_000 + ",0\n")
    with open(tmp_path / "sample_submission.csv", "a") as f:
        f.write(f"..\\te9,{SIZE},{SIZE},\n")
    write_sample(tmp_path / "train", "a:b")
    problems = check_data(tmp_path)
    bad = [p for p in problems if p.kind == "bad_id"]
    assert [(Path(p.path).name, p.row) for p in bad if p.row] == [
        ("train.csv", 3), ("train.csv", 4), ("train.csv", 5), ("train.csv", 6), ("sample_submission.csv", 4)]
    assert sum(1 for p in bad if p.row is None) == 4  # the four files of 'a:b'
    assert all(p.severity == "error" and len(p.message) < 400 for p in bad)
    # a bad ID is reported once, as a bad ID, not again as an ID without images
    assert not [p for p in problems if p.kind in ("label_without_images", "submission_without_images")]


# --------------------------------------------------------------------------------- commands

def test_segment_ids_outside_the_images_folder_are_refused(tmp_path, capsys):
    images = tmp_path / "images"
    write_sample(images, "ok")
    write_sample(tmp_path / "outside", "x")
    ids = tmp_path / "ids.csv"
    ids.write_text("ID\nok\n../outside/x\n")
    assert main(["segment", "--images", str(images), "--out", str(tmp_path / "cache"), "--ids", str(ids), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ids}: line 3: ID '../outside/x' contains the path separator '/'")
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == [f"x_{c}.png" for c in ("blue", "green", "red", "yellow")]
    assert not list(tmp_path.glob("cache/*/*.npz"))


def test_validate_submission_never_uses_a_bad_id_as_a_path(tmp_path, capsys):
    images = tmp_path / "images"
    write_sample(images, "ok")
    write_sample(tmp_path / "x", "y")  # where '../x/y' would lead
    sub = tmp_path / "sub.csv"
    sub.write_text(f"ID,ImageWidth,ImageHeight,PredictionString\nok,{SIZE},{SIZE},\n../x/y,{SIZE},{SIZE},\n"
                   + "g" * 10_000_000 + f",{SIZE},{SIZE},\n")
    assert main(["validate-submission", str(sub), "--images", str(images)]) == 1
    out, err = capsys.readouterr()
    assert "line 3, ID '../x/y': ID contains the path separator '/'" in out
    assert "line 4, ID 'gggg" in out and "(10,000,000 characters)" in out and "bytes long" in out
    assert len(out) < 2000 and err.splitlines()[-1] == f"2 problem(s) in {sub}"
