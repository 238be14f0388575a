"""`kit external labels`: public label lists mapped into the 2021 classes through the packaged tables."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, SHARED_DIR, require
from kit.errors import DataError
from kit.external import labels as xl
from kit.labels import CLASS_NAMES

REAL_LABELS = SHARED_DIR / "data/hpa_real/labels"


def run_kit(*args):
    return subprocess.run([sys.executable, "-m", "kit", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_2019_table_covers_28_classes_and_the_merges_the_issue_names():
    table = xl.mapping("2019")
    assert sorted(int(k) for k in table) == list(range(28))
    by_name = {e.name: e.class_2021 for e in table.values()}
    vesicles = CLASS_NAMES.index("Vesicles and punctate cytosolic patterns")
    for name in ("Peroxisomes", "Endosomes", "Lysosomes", "Lipid droplets", "Cytoplasmic bodies"):
        assert by_name[name] == vesicles, name
    assert by_name["Microtubule organizing center"] == CLASS_NAMES.index("Centrosome")
    assert by_name["Focal adhesion sites"] == CLASS_NAMES.index("Actin filaments")
    assert by_name["Cell junctions"] == CLASS_NAMES.index("Plasma membrane")
    assert by_name["Mitotic spindle"] == 11 and by_name["Cytosol"] == 16
    assert {n for n, c in by_name.items() if c is None} == {"Microtubule ends", "Cytokinetic bridge", "Rods & rings"}


def test_2019_table_agrees_with_the_name_table():
    """Every 2019 class that has a 2021 class gets the class its name has in the hosts' name table."""
    names = xl.mapping("hpa-names")
    for entry in xl.mapping("2019").values():
        named = names.get(entry.name.casefold())
        assert named is not None, entry.name
        assert named.class_2021 == entry.class_2021, entry.name


def test_every_2021_class_is_reachable_from_names():
    reached = {e.class_2021 for e in xl.mapping("hpa-names").values() if e.class_2021 is not None}
    assert reached == set(range(19))


def test_map_tokens_merges_removes_and_flags_unknown():
    assert xl.map_tokens(["8", "9", "26"], "2019") == ([17], [], [])
    assert xl.map_tokens(["16", "0"], "2019") == ([0], ["16"], [])
    assert xl.map_tokens(["Nucleoplasm", "cell junctions", "Midbody", "Plasmamembrane"], "hpa-names") == (
        [0, 13], ["Midbody"], ["Plasmamembrane"])
    assert xl.split_tokens("13 25|0  2", "2019") == ["13", "25", "0", "2"]
    assert xl.split_tokens("Nucleoplasm,Cytosol;Vesicles", "hpa-names") == ["Nucleoplasm", "Cytosol", "Vesicles"]


def test_antibody_prefix():
    assert xl.antibody_of("10580_1610_C1_1") == "10580"
    assert xl.antibody_of("11651_1732_F3_13_cr580610dc203b9") == "11651"
    assert xl.antibody_of("63683_si35_H1_11") == "63683"  # siRNA plates
    assert xl.antibody_of("5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0") == ""


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_command_2019_list_report_and_outputs(tmp_path):
    src = _write(tmp_path / "v18.csv", "Id,Target\n"
                 "1_10_A1_1,13 25 0\n"      # 13 focal adhesion -> 9, 25 -> 16, 0 -> 0
                 "1_10_A1_2,16\n"           # cytokinetic bridge only: dropped
                 "2_11_B3_1,16 8 9\n"       # bridge removed, peroxisomes+endosomes -> 17 once
                 "3_12_C4_1,27 18\n"        # rods & rings removed, MTOC -> 12
                 "u-u-i-d,23\n")            # a Kaggle-style ID, no antibody
    out = tmp_path / "external.csv"
    result = run_kit("external", "labels", "--in", str(src), "--scheme", "2019", "--out", str(out))
    assert result.returncode == 0, result.stderr
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert df.columns.tolist()[:5] == ["ID", "Label", "source", "source_label", "antibody"]
    assert dict(zip(df.ID, df.Label)) == {"1_10_A1_1": "0|9|16", "2_11_B3_1": "17", "3_12_C4_1": "12", "u-u-i-d": "14"}
    assert dict(zip(df.ID, df.antibody)) == {"1_10_A1_1": "1", "2_11_B3_1": "2", "3_12_C4_1": "3", "u-u-i-d": ""}
    assert set(df.source) == {"v18"}
    dropped = pd.read_csv(tmp_path / "external.dropped.csv")
    assert dropped.to_dict("records") == [{"ID": "1_10_A1_2", "source_label": 16, "reason": "no 2021 class left"}]
    report = json.loads((tmp_path / "external.report.json").read_text())
    assert report["n_rows"] == 5 and report["n_kept"] == 4 and report["n_dropped"] == 1
    rows = {r["source_class"]: r for r in report["per_source_class"]}
    assert rows["16"] == {"source_class": "16", "name": "Cytokinetic bridge", "class_2021": None,
                          "images": 2, "kept": 1, "dropped": 1, "excluded": 0}
    assert rows["8"]["kept"] == 1 and rows["27"]["kept"] == 1 and rows["5"]["images"] == 0
    assert report["images_per_2021_class"][17] == 1 and report["images_per_2021_class"][12] == 1
    text = (tmp_path / "external.report.txt").read_text()
    assert "16 Cytokinetic bridge" in text and "(none: removed)" in text
    assert text in result.stdout


def test_command_hpa_names_tsv_with_in_trainset_and_cell_lines(tmp_path):
    src = _write(tmp_path / "kaggle_2021.tsv", "Image\tLabel\tCellline\tin_trainset\n"
                 "https://images.example/10/1_A1_1\tNucleoplasm,Mitochondria\tU-2 OS\tFalse\n"
                 "https://images.example/10/1_A1_2\tNucleoplasm\tU-2 OS\tTrue\n"
                 "https://images.example/11/2_B1_1\tNo staining\tBJ\tFalse\n"
                 "https://images.example/12/3_C1_1\tKinetochore,Lipid droplets\tHeLa\tFalse\n")
    out = tmp_path / "ext.csv"
    result = run_kit("external", "labels", "--in", str(src), "--scheme", "hpa-names", "--out", str(out),
                     "--competition-cell-lines")
    assert result.returncode == 0, result.stderr
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert dict(zip(df.ID, df.Label)) == {"10_1_A1_1": "0|14", "12_3_C1_1": "17"}
    assert "Cellline" in df.columns and "Image" in df.columns
    reasons = dict(pd.read_csv(tmp_path / "ext.dropped.csv").set_index("ID")["reason"])
    assert reasons == {"10_1_A1_2": "in_trainset", "11_2_B1_1": "cell line not in the competition"}


def test_unknown_label_names_the_row_unless_dropped(tmp_path):
    src = _write(tmp_path / "l.csv", "ID,Label\n1_1_A1_1,Nucleoplasm\n1_1_A1_2,Nucleoplsm\n")
    with pytest.raises(DataError, match=r"line 3: ID 1_1_A1_2: unknown location name 'Nucleoplsm'"):
        xl.map_table(xl.read_source_list(src, "hpa-names"), "hpa-names", source="l", path=src)
    kept, dropped, report = xl.map_table(xl.read_source_list(src, "hpa-names"), "hpa-names", source="l",
                                         drop_unknown=True, path=src)
    assert kept.ID.tolist() == ["1_1_A1_1"] and dropped.reason.tolist() == ["no 2021 class left"]
    assert report["n_rows_with_unknown_labels"] == 1
    bad = _write(tmp_path / "b.csv", "Id,Target\n1_1_A1_1,0 x\n")
    result = run_kit("external", "labels", "--in", str(bad), "--scheme", "2019", "--out", str(tmp_path / "o.csv"))
    assert result.returncode == 2 and "line 2" in result.stderr and "'x' is not a 2019 class id" in result.stderr
    dup = _write(tmp_path / "d.csv", "Id,Target\n1_1_A1_1,0\n1_1_A1_1,2\n")
    with pytest.raises(DataError, match="line 3: ID '1_1_A1_1' appears twice"):
        xl.read_source_list(dup, "2019")


def test_kaggle_train_ids_are_excluded_and_agreement_reported(tmp_path):
    src = _write(tmp_path / "t2019.csv", "Id,Target\na,0 25\nb,18\nc,23\n")
    kaggle = _write(tmp_path / "train.csv", "ID,Label\na,0|16\nb,12|13\n")
    out = tmp_path / "o.csv"
    result = run_kit("external", "labels", "--in", str(src), "--scheme", "2019", "--out", str(out),
                     "--kaggle-train", str(kaggle))
    assert result.returncode == 0, result.stderr
    assert pd.read_csv(out).ID.tolist() == ["c"]
    agree = json.loads((tmp_path / "o.report.json").read_text())["agreement"]
    assert agree["n_shared"] == 2 and agree["exact"] == 1
    assert agree["per_class"][12] == {"class": 12, "tp": 1, "fp": 0, "fn": 0}
    assert agree["per_class"][13] == {"class": 13, "tp": 0, "fp": 0, "fn": 1}


@pytest.mark.parametrize("name,n_rows", [("hpa2019_external_HPAv18RBGY_wodpl.csv", 74606), ("hpa2019_train.csv", 31072)])
def test_real_2019_lists(name, n_rows):
    """The shared community lists: every row is accounted for and only the three unmapped classes drop images."""
    path = require(REAL_LABELS / name)
    df = xl.read_source_list(path, "2019")
    kept, dropped, report = xl.map_table(df, "2019", source=path.stem, path=path)
    assert report["n_rows"] == n_rows == len(kept) + len(dropped)
    dropping = {r["source_class"] for r in report["per_source_class"] if r["dropped"]}
    assert dropping <= {"15", "16", "27"}
    assert report["images_per_2021_class"][18] == 0  # the 2019 scheme has no Negative
    # every dropped image carries only unmapped classes
    unmapped = {"15", "16", "27"}
    assert all(set(xl.split_tokens(t, "2019")) <= unmapped for t in dropped.source_label)


def test_real_2019_train_agrees_with_the_2021_relabelling():
    """The 2021 train set re-labelled 21,806 of the 2019 train images: the table reproduces 97% of them."""
    from kit.labels import read_labels_csv

    path = require(REAL_LABELS / "hpa2019_train.csv")
    kaggle = read_labels_csv(require(REAL_LABELS / "hpa2021_train.csv"))
    df = xl.read_source_list(path, "2019")
    kept, _, _ = xl.map_table(df[df.ID.isin(set(kaggle.ID))], "2019", source="t", path=path)
    agree = xl.agreement(kept, kaggle)
    assert agree["n_shared"] >= 21800
    assert agree["exact"] / agree["n_shared"] > 0.97
    for c in (12, 17):  # MTOC -> centrosome, the five vesicle-like classes -> 17
        p = agree["per_class"][c]
        assert p["tp"] / (p["tp"] + p["fp"]) > 0.98, p
