"""kit.layout: the dataset index over the Kaggle layout and the ID lists."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from kit.errors import ConfigError, DataError
from kit.images import CHANNELS, ImageReadError
from kit.layout import DatasetIndex, scan_split

SIZE = 24


def write_sample(folder: Path, image_id: str, size=(SIZE, SIZE), dtype=np.uint8, ext=".png", channels=CHANNELS,
                 seed=0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    high = 256 if dtype == np.uint8 else 65536
    for c in channels:
        h, w = size
        assert cv2.imwrite(str(folder / f"{image_id}_{c}{ext}"), rng.integers(0, high, (h, w)).astype(dtype))


def make_clean(root: Path, n_train=4, n_test=2) -> Path:
    for i in range(n_train):
        write_sample(root / "train", f"tr{i}", seed=i)
    for i in range(n_test):
        write_sample(root / "test", f"te{i}", seed=10 + i)
    labels = ["0|5", "13|13", "16", "18"]
    (root / "train.csv").write_text("ID,Label\n" + "".join(f"tr{i},{labels[i % 4]}\n" for i in range(n_train)))
    (root / "sample_submission.csv").write_text(
        "ID,ImageWidth,ImageHeight,PredictionString\n" + "".join(f"te{i},{SIZE},{SIZE},\n" for i in range(n_test))
    )
    return root


# ---------------------------------------------------------------------------------- index
def test_scan_split_groups_ids_with_underscores(tmp_path):
    write_sample(tmp_path, "10580_1610_C1_1")
    write_sample(tmp_path, "b", ext=".tif")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "c_purple.png").write_bytes(b"x")
    (tmp_path / ".hidden_red.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    scan = scan_split(tmp_path)
    assert sorted(scan.samples) == ["10580_1610_C1_1", "b"]
    assert set(scan.samples["b"]) == set(CHANNELS)
    assert sorted(p.name for p in scan.stray) == [".hidden_red.png", "c_purple.png", "notes.txt", "sub"]


def test_dataset_index(tmp_path):
    root = make_clean(tmp_path)
    write_sample(root / "train", "big", size=(20, 36))
    index = DatasetIndex.open(root)
    assert index.train_ids == ["tr0", "tr1", "tr2", "tr3"]  # from train.csv, in file order
    assert index.test_ids == ["te0", "te1"]
    assert index.labels["Label"].tolist() == ["0|5", "13", "16", "18"]
    assert index.image_dir("train") == root / "train"
    assert index.split_of("te1") == "test"
    assert index.image_size("big") == (36, 20)
    assert index.image_info("tr0").bit_depth == 8
    assert index.read("tr1").shape == (SIZE, SIZE, 4)
    assert index.channel_paths("tr0")["yellow"] == root / "train" / "tr0_yellow.png"
    with pytest.raises(ConfigError):
        index.image_dir("valid")
    with pytest.raises(DataError, match="nope"):
        index.split_of("nope")


def test_dataset_index_test_ids_from_files_without_sample_submission(tmp_path):
    root = make_clean(tmp_path, n_test=3)
    (root / "sample_submission.csv").unlink()
    (root / "train.csv").unlink()
    index = DatasetIndex.open(root)
    assert index.test_ids == ["te0", "te1", "te2"]
    assert index.train_ids == ["tr0", "tr1", "tr2", "tr3"]  # from the files


def test_dataset_index_missing_channel_names_file(tmp_path):
    root = make_clean(tmp_path)
    (root / "train" / "tr2_blue.png").unlink()
    with pytest.raises(ImageReadError, match="tr2_blue"):
        DatasetIndex.open(root).channel_paths("tr2")


def test_dataset_index_open_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        DatasetIndex.open(tmp_path / "absent")
    with pytest.raises(DataError, match="Kaggle layout"):
        DatasetIndex.open(tmp_path)


# ---------------------------------------------------------------------------------- ID lists
def test_list_image_ids_and_id_list_formats(tmp_path):
    from kit.layout import list_image_ids, read_id_list

    write_sample(tmp_path / "imgs", "b")
    write_sample(tmp_path / "imgs", "a", channels=("red",))  # listed: its missing channels fail by name later
    assert list_image_ids(tmp_path / "imgs") == ["a", "b"]
    with pytest.raises(DataError, match="not found"):
        list_image_ids(tmp_path / "absent")
    lines = tmp_path / "ids.txt"
    lines.write_text("# chosen\nID\nx1\n\nx2\n")
    assert read_id_list(lines) == ["x1", "x2"]
    folds = tmp_path / "folds.csv"
    folds.write_text("ID,fold\nx1,0\nx2,1\nx3,0\n")
    assert read_id_list(folds) == ["x1", "x2", "x3"] and read_id_list(folds, fold=0) == ["x1", "x3"]
    for text, words in (("", "no IDs"), ("Name,Label\nx,1\n", "ID column")):
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(DataError, match=words):
            read_id_list(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="--fold needs a CSV"):
        read_id_list(lines, fold=0)


def test_read_sample_submission_names_the_file_and_line(tmp_path):
    from kit.layout import read_sample_submission

    path = tmp_path / "sample.csv"
    path.write_text("ID,ImageWidth,ImageHeight,PredictionString\na,64,32,\nb,128,128,\n")
    assert read_sample_submission(path) == (["a", "b"], {"a": (64, 32), "b": (128, 128)})
    for body, words in (("a,64,32,\na,64,32,\n", "line 3: ID a already on line 2"),
                        ("a,64,x,\n", "line 2, ID a: ImageWidth/ImageHeight"),
                        (",64,64,\n", "line 2: empty ID")):
        path.write_text("ID,ImageWidth,ImageHeight,PredictionString\n" + body)
        with pytest.raises(DataError, match=words):
            read_sample_submission(path)
    path.write_text("")
    with pytest.raises(DataError, match="empty file"):
        read_sample_submission(path)
    path.write_text("ID,Label\na,1\n")
    with pytest.raises(DataError, match="missing column ImageWidth"):
        read_sample_submission(path)
