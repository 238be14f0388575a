"""`kit external table` + grouped folds: Kaggle train and external lists in one table; antibodies never straddle folds."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kit.cli import main as kit_main
from kit.errors import DataError
from kit.external.table import merge_tables
from kit.folds import combine_groups, groups_split, load_folds


def test_combine_groups_is_the_union_of_groupings():
    a = ["x", "x", None, "y", None, ""]
    b = [None, "p", "p", None, "q", "q"]
    codes = combine_groups([a, b])
    # rows 0,1 share x; 1,2 share p -> {0,1,2}; 3 alone; 4,5 share q
    assert codes.tolist() == [0, 0, 0, 1, 2, 2]
    assert combine_groups([a]).tolist() == [0, 0, 1, 2, 3, 4]


def test_groups_split_counts_groups_over_several_folds():
    assert groups_split([0, 0, 1, 1, 2], ["a", "a", "b", "b", None]) == 0
    assert groups_split([0, 1, 1, 1, 2], ["a", "a", "b", "b", "a"]) == 1


@pytest.fixture
def tables(tmp_path):
    rng = np.random.default_rng(0)
    kaggle = pd.DataFrame({"ID": [f"k{i:03d}" for i in range(60)],
                           "Label": ["|".join(map(str, sorted(set(rng.integers(0, 19, 2))))) for _ in range(60)]})
    kaggle.to_csv(tmp_path / "train.csv", index=False)
    ext_ids = [f"{ab}_{1000 + ab}_A{f}_{f}" for ab in range(1, 31) for f in range(1, 5)]  # 30 antibodies x 4 fields
    ext = pd.DataFrame({"ID": ext_ids, "Label": ["|".join(map(str, sorted(set(rng.integers(0, 18, 2))))) for _ in ext_ids],
                        "source": "hpav18"})
    ext["antibody"] = ext.ID.str.split("_").str[0]
    ext = pd.concat([ext, pd.DataFrame({"ID": ["k000"], "Label": ["3"], "source": ["hpav18"], "antibody": [""]})])
    ext.to_csv(tmp_path / "external.csv", index=False)
    dedup = pd.DataFrame({"ID": ["k001", "1_1001_A1_1", "k002", "2_1002_A1_1", "t1", "k003", "t2"],
                          "group": ["g1", "g1", "g2", "g2", "g3", "g3", "g4"],
                          "folder": "x", "group_size": [2, 2, 2, 2, 2, 2, 1],
                          "is_test": [0, 0, 0, 0, 1, 0, 1], "drop": [0, 0, 0, 0, 0, 1, 0]})
    dedup.to_csv(tmp_path / "dedup.csv", index=False)
    return tmp_path


def test_merge_sources_antibody_groups_duplicates_and_drops(tables):
    merged, report = merge_tables(tables / "train.csv", [tables / "external.csv"], dedup=tables / "dedup.csv")
    assert merged.columns.tolist() == ["ID", "Label", "source", "antibody", "dup_group", "group"]
    assert report["per_source"] == {"kaggle": 59, "hpav18": 120}  # k003 dropped: it duplicates test image t1
    assert report["overlap_dropped"] == {"hpav18": 1} and report["test_duplicates_dropped"] == 1
    row = merged.set_index("ID")
    assert row.loc["k000", "Label"] != "3" and row.loc["k000", "source"] == "kaggle"  # Kaggle labels win
    assert "k003" not in row.index and "t1" not in row.index
    # the 4 fields of an antibody share a group; a Kaggle duplicate joins its twin's antibody group
    assert row.loc[[f"1_1001_A{f}_{f}" for f in range(1, 5)], "group"].nunique() == 1
    assert row.loc["k001", "group"] == row.loc["1_1001_A1_1", "group"]
    assert row.loc["k002", "group"] == row.loc["2_1002_A1_1", "group"] != row.loc["k001", "group"]
    assert row.loc["k010", "group"] == "k010"  # no antibody, no duplicate: a group of one
    assert report["n_groups"] == 30 + (59 - 2)


def test_command_then_grouped_folds_keep_antibodies_together(tables, capsys):
    out = tables / "train_all.csv"
    assert kit_main(["external", "table", "--kaggle", str(tables / "train.csv"), "--external",
                     str(tables / "external.csv"), "--dedup", str(tables / "dedup.csv"), "--out", str(out)]) == 0
    assert "179 images: kaggle 59, hpav18 120" in capsys.readouterr().out
    folds_file = tables / "folds.csv"
    assert kit_main(["folds", "--labels", str(out), "--groups", "group", "--n-splits", "4",
                     "--out", str(folds_file)]) == 0
    text = capsys.readouterr().out
    assert "no group is split across folds" in text and "kaggle: 59 images; per fold:" in text
    folds = load_folds(folds_file, out)
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert groups_split(folds["fold"].to_numpy(), table["group"].to_numpy()) == 0
    per_ab = table.assign(fold=folds["fold"].to_numpy()).query("antibody != ''").groupby("antibody").fold.nunique()
    assert (per_ab == 1).all()
    meta = json.loads(folds_file.with_suffix(".json").read_text())
    assert meta["report"]["groups_split"] == 0 and set(meta["report"]["source_fold_counts"]) == {"kaggle", "hpav18"}
    # several --groups combine: antibody + dup_group gives the same grouping as the group column
    f2 = tables / "folds2.csv"
    assert kit_main(["folds", "--labels", str(out), "--groups", "antibody", "--groups", "dup_group",
                     "--n-splits", "4", "--out", str(f2)]) == 0
    meta2 = json.loads(f2.with_suffix(".json").read_text())
    assert meta2["groups"]["n_groups"] == meta["groups"]["n_groups"]
    assert meta2["groups"]["source"] == "column antibody + column dup_group"
    # --check of an ungrouped fold file with --groups reports the split groups and fails
    f3 = tables / "folds3.csv"
    assert kit_main(["folds", "--labels", str(out), "--n-splits", "4", "--out", str(f3)]) == 0
    capsys.readouterr()
    code = kit_main(["folds", "--labels", str(out), "--check", str(f3), "--groups", "group"])
    assert "SPLIT across folds" in capsys.readouterr().out and code == 1


def test_bad_external_label_names_the_file_and_line(tables):
    bad = tables / "bad.csv"
    bad.write_text("ID,Label\n1_1_A1_1,0\n1_1_A1_2,25\n")
    with pytest.raises(DataError, match=r"bad.csv: class id '?25'? outside .*row 3, ID 1_1_A1_2"):
        merge_tables(tables / "train.csv", [bad])
