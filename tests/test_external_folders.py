"""Train images from several folders (Kaggle train/ + external images): the index, check-data, segment
and the whole pipeline read each image from the one folder that holds it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kit.cli import main as kit_main
from kit.errors import DataError
from kit.layout import DatasetIndex, ImageFolders


@pytest.fixture
def split_dataset(tiny_dataset, tmp_path):
    """The tiny dataset with 4 of its 12 train images moved to ``external/``, and a merged labels
    table (``train_all.csv``: source, group) in which two moved images share an antibody group."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data, copy_function=shutil.copyfile)
    labels = pd.read_csv(data / "train.csv", dtype=str)
    moved = labels.ID.tolist()[-4:]
    ext = tmp_path / "external"
    ext.mkdir()
    for image_id in moved:
        for f in (data / "train").glob(f"{image_id}_*"):
            f.rename(ext / f.name)
    merged = labels.assign(source=["external" if i in moved else "kaggle" for i in labels.ID],
                           group=[("ab7" if i in moved[:2] else i) for i in labels.ID])
    merged.to_csv(tmp_path / "train_all.csv", index=False)
    return data, ext, moved, tmp_path / "train_all.csv"


def test_image_folders_find_each_id_once(split_dataset, tmp_path):
    data, ext, moved, _ = split_dataset
    folders = ImageFolders([data / "train", ext])
    assert len(folders.ids()) == 12
    assert folders.folder_of(moved[0]) == ext
    assert folders.folder_of("not-there") == data / "train"  # the primary folder: its missing file is named
    groups = folders.by_folder(folders.ids())
    assert sorted(groups[ext]) == sorted(moved) and len(groups[data / "train"]) == 8
    index = DatasetIndex.open(data, extra_train_dirs=[ext])
    assert index.split_of(moved[0]) == "train"
    assert index.read(moved[0]).shape == (256, 256, 4)
    assert index.channel_paths(moved[0])["green"].parent == ext
    assert index.image_size(moved[0]) == (256, 256)
    # the same ID in two folders is ambiguous
    twin = data / "train"
    for f in ext.glob(f"{moved[0]}_*"):
        shutil.copyfile(f, twin / f.name)
    folders = ImageFolders([data / "train", ext])
    with pytest.raises(DataError, match=f"{moved[0]} has files in more than one folder"):
        folders.folder_of(moved[0])
    with pytest.raises(DataError, match="keep one copy"):
        folders.by_folder(moved)
    with pytest.raises(DataError, match="extra train image folder not found"):
        DatasetIndex.open(data, extra_train_dirs=[tmp_path / "nope"])


def test_check_data_with_extra_folders_and_a_merged_table(split_dataset, capsys):
    data, ext, moved, merged = split_dataset
    # without the extra folder, the moved images are labelled but have no files
    assert kit_main(["check-data", str(data), "--labels", str(merged), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["counts"].get("label_without_images") == 4
    assert kit_main(["check-data", str(data), "--labels", str(merged), "--extra-images", str(ext), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == 0, report["problems"]
    for f in ext.glob(f"{moved[1]}_*"):
        shutil.copyfile(f, data / "train" / f.name)
    assert kit_main(["check-data", str(data), "--labels", str(merged), "--extra-images", str(ext), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == report["counts"] | {"image_in_two_folders": 1}


def test_segment_several_folders(split_dataset, tmp_path, capsys):
    data, ext, moved, merged = split_dataset
    cache = tmp_path / "cache"
    assert kit_main(["segment", "--images", str(data / "train"), str(ext), "--out", str(cache), "--ids", str(merged),
                     "--tiles", "32", "--quiet"]) == 0
    assert "12/12 images segmented" in capsys.readouterr().out
    masks = next(p for p in cache.iterdir() if p.name.startswith("classical-"))
    assert {p.stem for p in masks.glob("*.npz")} == set(pd.read_csv(merged).ID)
    tiles = next(p for p in cache.iterdir() if p.name.startswith("tiles-32-"))
    assert all((tiles / f"{i}.npy").is_file() for i in moved)


def test_pipeline_trains_on_train_and_external_folders(split_dataset, tmp_path):
    pytest.importorskip("torch")
    import test_pipeline  # noqa: F401  registers the tiny test backbone

    from kit.manifest import read_manifest
    from kit.pipeline import DEMO_OVERRIDES, run_pipeline

    data, ext, moved, merged = split_dataset
    summary = run_pipeline(
        data, overrides=["model.backbone=tiny_test_cnn", "train.epochs=1", "data.tile_size=32", "data.field_size=64",
                         *DEMO_OVERRIDES, "train.batch_size=16", f"data.train_csv={merged}", f"data.extra_images=[{ext}]"],
        work=tmp_path / "work", submission=tmp_path / "submission.csv", n_splits=2, fold_seed=3, workers=1,
        leaderboard=tmp_path / "lb.sqlite", ceilings=False)
    assert Path(summary["submission"]).is_file() and not summary["errors"]
    manifest = read_manifest(summary["run"])
    assert manifest.extra_images_dirs == [str(ext.resolve())]
    assert manifest.labels_file == str(merged.resolve())
    # the external images were prepared like the others: fields and tiles, from their own folder
    assert all((Path(manifest.field_dir) / f"{i}.npy").is_file() for i in moved)
    assert all((Path(manifest.tile_dir) / f"{i}.npy").is_file() for i in moved)
    # folds built from the table's group column: the two images of antibody ab7 share a fold
    folds = pd.read_csv(manifest.folds_file).set_index("ID")["fold"]
    assert folds[moved[0]] == folds[moved[1]]
    meta = json.loads(Path(manifest.folds_file).with_suffix(".json").read_text())
    assert meta["groups"]["source"] == "column group" and meta["report"]["groups_split"] == 0
    oof_ids = {i for k in (0, 1) for i in pd.read_csv(Path(summary["run"]) / "image" / f"fold{k}" / "oof.csv").ID}
    assert set(moved) <= oof_ids  # the external images were validated out of fold, like the others
