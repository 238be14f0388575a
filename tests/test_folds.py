"""Folds: stratification quality, groups, reproducibility, the labels-file check, bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import KFold

from kit.cli import main
from kit.errors import ConfigError, DataError, KitError
from kit.folds import (
    FoldWarning,
    fold_report,
    groups_from_pairs,
    load_folds,
    make_folds,
    read_groups,
    save_folds,
    sidecar_path,
    single_label_mask,
    split_indices,
)
from kit.labels import NUM_CLASSES, format_label, read_labels_csv

from conftest import REAL_TRAIN_CSV, REPO, require

# Small random tables have classes rarer than the folds; the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore::kit.folds.FoldWarning")


def random_labels(n: int, seed: int) -> pd.DataFrame:
    """A random multi-label table shaped like HPA: skewed class frequencies, 1-4 labels per image."""
    rng = np.random.default_rng(seed)
    freq = np.geomspace(0.35, 0.01, NUM_CLASSES)
    rows = []
    for i in range(n):
        ids = np.flatnonzero(rng.random(NUM_CLASSES) < freq).tolist()
        if not ids:
            ids = [int(rng.choice(NUM_CLASSES, p=freq / freq.sum()))]
        rows.append((f"img{i:05d}", format_label(ids), sorted(ids)))
    return pd.DataFrame(rows, columns=["ID", "Label", "labels"])


def write_labels(df: pd.DataFrame, path, extra: dict | None = None):
    out = df[["ID", "Label"]].copy()
    for k, v in (extra or {}).items():
        out[k] = v
    out.to_csv(path, index=False)
    return path


def test_every_image_in_exactly_one_fold(tmp_path):
    df = random_labels(400, 0)
    folds = make_folds(df, 5, seed=1)
    assert folds.shape == (400,)
    assert set(folds.tolist()) == set(range(5))
    labels = write_labels(df, tmp_path / "train.csv")
    save_folds(tmp_path / "f.csv", df["ID"], folds, labels, fold_report(df, folds), n_splits=5, seed=1)
    back = pd.read_csv(tmp_path / "f.csv", dtype={"ID": str})
    assert back["ID"].tolist() == df["ID"].tolist()  # each ID exactly once, in the labels order
    assert back["fold"].tolist() == folds.tolist()


def test_same_seed_same_file_bytes(tmp_path):
    labels = write_labels(random_labels(300, 1), tmp_path / "train.csv")
    outs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / name / "f.csv"
        assert main(["folds", "--labels", str(labels), "--n-splits", "4", "--seed", str(seed), "--out", str(out)]) == 0
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert sidecar_path(outs[0]).read_bytes() == sidecar_path(outs[1]).read_bytes()
    assert outs[0].read_bytes() != outs[2].read_bytes()  # the seed matters


def test_stratification_beats_plain_kfold():
    for seed in (0, 1, 2):
        df = random_labels(600, 10 + seed)
        ours = fold_report(df, make_folds(df, 5, seed=seed))
        plain = np.zeros(len(df), dtype=int)
        for k, (_, valid) in enumerate(KFold(5, shuffle=True, random_state=seed).split(df)):
            plain[valid] = k
        base = fold_report(df, plain)
        assert ours["max_deviation"] < base["max_deviation"], (ours["max_deviation"], base["max_deviation"])
        # and class by class on average, not only at the worst class
        assert np.mean(ours["class_max_deviation"]) < np.mean(base["class_max_deviation"])


def test_report_counts_are_consistent():
    df = random_labels(200, 3)
    folds = make_folds(df, 4, seed=0)
    r = fold_report(df, folds)
    assert sum(r["images_per_fold"]) == 200
    assert r["images_per_fold"] == np.bincount(folds).tolist()
    y = np.zeros((200, NUM_CLASSES), int)
    for i, ids in enumerate(df["labels"]):
        y[i, ids] = 1
    assert np.array_equal(np.array(r["class_fold_counts"]).sum(axis=1), y.sum(axis=0))
    assert r["class_fold_counts"][5][2] == int(y[folds == 2, 5].sum())
    d = [x for x in r["class_max_deviation"] if x is not None]
    assert r["max_deviation"] == max(d)


def test_groups_never_split():
    df = random_labels(500, 4)
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 90, size=500).astype(str)  # about 5-6 images per group
    folds = make_folds(df, 5, seed=3, groups=groups)
    per_group = pd.DataFrame({"g": groups, "f": folds}).groupby("g")["f"].nunique()
    assert (per_group == 1).all()
    assert set(folds.tolist()) == set(range(5))


def test_singleton_groups_equal_ungrouped():
    df = random_labels(150, 5)
    plain = make_folds(df, 3, seed=9)
    assert np.array_equal(make_folds(df, 3, seed=9, groups=df["ID"].tolist()), plain)
    assert np.array_equal(make_folds(df, 3, seed=9, groups=[None] * 150), plain)


def test_groups_file_and_column_through_cli(tmp_path, capsys):
    df = random_labels(120, 6)
    plates = [f"p{i // 4}" for i in range(120)]
    labels = write_labels(df, tmp_path / "train.csv", extra={"plate": plates})
    out = tmp_path / "col.csv"
    assert main(["folds", "--labels", str(labels), "--groups", "plate", "--out", str(out)]) == 0
    got = pd.read_csv(out, dtype={"ID": str}).assign(plate=plates)
    assert (got.groupby("plate")["fold"].nunique() == 1).all()
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["groups"] == {"source": "column plate", "n_groups": 30}

    # a file listing only duplicate pairs: the rest become groups of their own, with a warning
    pairs = [(df["ID"][i], df["ID"][i + 1]) for i in range(0, 40, 2)] + [(df["ID"][1], df["ID"][2])]
    gfile = tmp_path / "groups.csv"
    groups_from_pairs(pairs).to_csv(gfile, index=False)
    out2 = tmp_path / "file.csv"
    capsys.readouterr()
    assert main(["folds", "--labels", str(labels), "--groups", str(gfile), "--out", str(out2)]) == 0
    assert "80 of 120 images are not in groups.csv" in capsys.readouterr().err
    f2 = pd.read_csv(out2)["fold"].to_numpy()
    assert len(set(f2[0:4])) == 1  # 0-1, 1-2, 2-3 chain into one group
    for i in range(4, 40, 2):
        assert f2[i] == f2[i + 1]
    assert json.loads(sidecar_path(out2).read_text())["groups"]["n_groups"] == 19 + 80


def test_groups_from_pairs_components():
    g = groups_from_pairs([("a", "b"), ("c", "d"), ("b", "c"), ("x", "y")])
    comp = g.groupby("group")["ID"].apply(sorted).tolist()
    assert sorted(comp) == [["a", "b", "c", "d"], ["x", "y"]]


def test_bad_groups(tmp_path):
    df = random_labels(30, 7)
    labels = write_labels(df, tmp_path / "train.csv")
    unknown = tmp_path / "unknown.csv"
    pd.DataFrame({"ID": [df["ID"][0], "test-image-1"], "group": ["g", "g"]}).to_csv(unknown, index=False)
    with pytest.raises(DataError, match=r"1 ID\(s\) are not in the labels file.*test-image-1"):
        read_groups(df, unknown, labels)
    groups, desc, messages = read_groups(df, unknown, labels, ignore_unknown=True)
    assert groups[0] == "g" and groups[1] is None and any("ignored" in m for m in messages)
    twice = tmp_path / "twice.csv"
    pd.DataFrame({"ID": [df["ID"][0], df["ID"][0]], "group": ["g1", "g2"]}).to_csv(twice, index=False)
    with pytest.raises(DataError, match="more than one group"):
        read_groups(df, twice, labels)
    badcols = tmp_path / "badcols.csv"
    pd.DataFrame({"image": ["x"], "g": ["y"]}).to_csv(badcols, index=False)
    with pytest.raises(DataError, match="columns ID,group"):
        read_groups(df, badcols, labels)
    with pytest.raises(ConfigError, match="neither a file nor a column"):
        read_groups(df, "plate", labels)
    with pytest.raises(ConfigError, match="number of groups"):
        make_folds(df, 5, seed=0, groups=["one"] * 28 + ["two"] * 2)


def test_labels_change_is_refused(tmp_path):
    df = random_labels(100, 8)
    labels = write_labels(df, tmp_path / "train.csv")
    out = tmp_path / "folds" / "f.csv"
    assert main(["folds", "--labels", str(labels), "--n-splits", "3", "--out", str(out)]) == 0
    ok = load_folds(out, labels)
    assert ok["ID"].tolist() == df["ID"].tolist() and ok.attrs["meta"]["n_splits"] == 3

    # same labelled set, other bytes (CRLF, rows shuffled, label order, an extra column): accepted
    other = df.sample(frac=1, random_state=0)
    copy = tmp_path / "kaggle_train.csv"
    pd.DataFrame({"ID": other["ID"], "Label": ["|".join(map(str, reversed(l))) for l in other["labels"]],
                  "x": 1}).to_csv(copy, index=False, lineterminator="\r\n")
    again = load_folds(out, copy)
    assert again["ID"].tolist() == other["ID"].tolist()
    assert again.set_index("ID")["fold"].equals(ok.set_index("ID")["fold"].loc[other["ID"]])

    # one label changed: refused, naming both files and how to rebuild
    changed = df.copy()
    changed.loc[3, "Label"] = "18" if changed.loc[3, "Label"] != "18" else "0"
    write_labels(changed, labels)
    with pytest.raises(ConfigError, match=r"labels changed since the folds .* rebuild them: python -m kit folds"):
        load_folds(out, labels)
    assert main(["folds", "--labels", str(labels), "--check", str(out)]) == 2


def test_edited_fold_file_or_missing_sidecar_refused(tmp_path):
    df = random_labels(60, 9)
    labels = write_labels(df, tmp_path / "train.csv")
    out = tmp_path / "f.csv"
    assert main(["folds", "--labels", str(labels), "--n-splits", "3", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")  # an image lost its fold
    with pytest.raises(ConfigError, match="1 image\\(s\\) without a fold"):
        load_folds(out, labels)
    out.write_text("\n".join(lines[:-1] + [lines[1]]) + "\n")
    with pytest.raises(ConfigError, match="appears twice"):
        load_folds(out, labels)
    out.write_text("\n".join(lines[:2] + [lines[2].split(",")[0] + ",x"] + lines[3:]) + "\n")
    with pytest.raises(ConfigError, match="line 3: fold 'x'"):
        load_folds(out, labels)
    out.write_text("\n".join(lines) + "\n")
    assert len(load_folds(out, labels)) == 60
    sidecar_path(out).unlink()
    with pytest.raises(ConfigError, match="no sidecar"):
        load_folds(out, labels)


def test_bad_inputs(tmp_path, capsys):
    header_only = tmp_path / "empty.csv"
    header_only.write_text("ID,Label\n")
    with pytest.raises(DataError, match="no rows"):
        read_labels_csv(header_only)
    assert main(["folds", "--labels", str(header_only), "--out", str(tmp_path / "x.csv")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()
    zero = tmp_path / "zero.csv"
    zero.write_bytes(b"")
    assert main(["folds", "--labels", str(zero), "--out", str(tmp_path / "x.csv")]) == 2
    with pytest.raises(DataError, match="empty"):
        make_folds(random_labels(5, 0).iloc[:0], 5, seed=0)

    df = random_labels(40, 11)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ConfigError, match="n_splits"):
            make_folds(df, bad, seed=0)
    with pytest.raises(ConfigError, match="larger than the number of images"):
        make_folds(df, 41, seed=0)


def test_rare_class_warns_naming_it(tmp_path, capsys):
    df = random_labels(80, 12)
    df["labels"] = [[l for l in ids if l != 11] or [0] for ids in df["labels"]]
    df.loc[[4, 9], "labels"] = pd.Series([[11], [11, 2]], index=[4, 9])
    df["Label"] = [format_label(l) for l in df["labels"]]
    with pytest.warns(FoldWarning, match=r"class 11 \(Mitotic spindle\) occurs in only 2 images"):
        make_folds(df, 5, seed=0)
    labels = write_labels(df, tmp_path / "train.csv")
    assert main(["folds", "--labels", str(labels), "--out", str(tmp_path / "f.csv")]) == 0
    assert "warning: class 11 (Mitotic spindle)" in capsys.readouterr().err


def test_single_label_filter_changes_training_rows_only():
    df = random_labels(200, 13)
    folds = make_folds(df, 4, seed=0)
    mask = single_label_mask(df)
    assert np.array_equal(mask, np.array([len(l) == 1 for l in df["labels"]]))
    assert 0 < mask.sum() < 200
    for k in range(4):
        train, valid = split_indices(folds, k, train_mask=mask)
        full_train, full_valid = split_indices(folds, k)
        assert np.array_equal(valid, full_valid) and np.array_equal(valid, np.flatnonzero(folds == k))
        assert np.array_equal(train, full_train[mask[full_train]])
        assert mask[train].all() and not np.isin(train, valid).any()
    assert np.array_equal(make_folds(df, 4, seed=0), folds)  # the filter never touched the folds
    with pytest.raises(KitError):
        split_indices(folds, 7)


def test_real_2021_table_and_committed_folds():
    path = require(REAL_TRAIN_CSV)
    df = read_labels_csv(path)
    folds = make_folds(df, 5, seed=42)
    r = fold_report(df, folds)
    assert r["n_images"] == len(df) and sum(r["images_per_fold"]) == len(df)
    assert r["max_deviation"] < 0.15 and r["max_deviation_100"] < 0.05
    committed = REPO / "folds" / "hpa2021_5fold_seed42.csv"
    if committed.exists():
        got = load_folds(committed, path)  # also checks the recorded sha256
        assert np.array_equal(got["fold"].to_numpy(), folds), "committed folds are not reproducible"
