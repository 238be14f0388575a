"""Leaderboard: rows, idempotent re-adding, public scores, ranking, export, concurrent writers."""
from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pandas as pd
import pytest

from kit.cli import main
from kit.errors import ConfigError, DataError
from kit.leaderboard import OVERALL, Leaderboard, git_commit


def add(lb: Leaderboard, run_id: str, oof: float, test: float | None = None, *, metric: str = "cell_mAP",
        folds: int = 3, dataset: str = "synth", notes: str = "", **kw) -> None:
    lb.add_run(run_id, fold_scores={k: oof + 0.01 * (k - 1) for k in range(folds)}, oof_score=oof,
               metric=metric, test_score=test, backbone="resnet18", combine="geometric:0.5",
               config_hash="c0ffee", notes=notes, dataset=dataset, git_commit="abc123", **kw)


def _writer(db: str, tag: str, n: int, barrier) -> None:
    """Runs in a spawned process: add n runs of its own and rewrite one shared run n times."""
    lb = Leaderboard(db)
    barrier.wait(timeout=60)
    for i in range(n):
        lb.add_run(f"{tag}-{i}", fold_scores={k: 0.1 * k for k in range(5)}, oof_score=0.5, metric="cell_mAP",
                   backbone="resnet18", combine="cell", config_hash=tag, extra={"i": i}, git_commit="x")
        lb.add_run("shared", fold_scores={k: 0.2 for k in range(5)}, oof_score=0.2, metric="cell_mAP",
                   backbone="resnet18", combine="cell", config_hash=tag, git_commit="x")


def test_concurrent_writers_from_two_processes(tmp_path):
    db = tmp_path / "lb.sqlite"  # created by the racing writers themselves
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(db), tag, 25, barrier)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = Leaderboard(db).rows()
    for tag in ("a", "b"):
        for i in range(25):
            got = rows[rows["run_id"] == f"{tag}-{i}"]
            assert sorted(got["fold"]) == [OVERALL, 0, 1, 2, 3, 4]
            assert (got["config_hash"] == tag).all() and all(e == {"i": i} for e in got["extra"])
    shared = rows[rows["run_id"] == "shared"]
    assert sorted(shared["fold"]) == [OVERALL, 0, 1, 2, 3, 4]  # replaced atomically, never doubled
    assert shared["config_hash"].nunique() == 1
    assert len(rows) == 51 * 6
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_rows_of_a_run(tmp_path):
    lb = Leaderboard(tmp_path / "lb.sqlite")
    add(lb, "r1", 0.6, 0.55, notes="first try", extra={"epochs": 3})
    rows = lb.rows()
    assert rows["fold"].tolist() == [0, 1, 2, OVERALL]
    assert rows["fold_score"].tolist() == pytest.approx([0.59, 0.6, 0.61, 0.6])
    assert (rows["oof_score"] == 0.6).all() and (rows["test_score"] == 0.55).all()
    assert rows["public_score"].isna().all()
    assert set(rows["metric"]) == {"cell_mAP"} and set(rows["git_commit"]) == {"abc123"}
    assert rows["extra"].iloc[0] == {"epochs": 3} and rows["notes"].iloc[0] == "first try"
    assert rows["created"].iloc[0].endswith("Z")


def test_readding_a_run_replaces_it_and_keeps_public_score(tmp_path):
    lb = Leaderboard(tmp_path / "lb.sqlite")
    add(lb, "r1", 0.6, folds=5)
    lb.record_public("r1", 0.52)
    created = lb.rows()["created"].iloc[0]
    add(lb, "r1", 0.7, folds=2)
    rows = lb.rows()
    assert rows["fold"].tolist() == [0, 1, OVERALL]
    assert (rows["oof_score"] == 0.7).all() and (rows["public_score"] == 0.52).all()
    assert (rows["created"] == created).all()


def test_record_public(tmp_path):
    lb = Leaderboard(tmp_path / "lb.sqlite")
    with pytest.raises(ConfigError, match="no leaderboard"):
        lb.record_public("r1", 0.5)
    add(lb, "20261125-resnet18", 0.6)
    add(lb, "20261125-resnet50", 0.7)
    add(lb, "other", 0.5)
    assert lb.record_public("other", 0.41, notes="LB 0.41") == "other"
    assert lb.record_public("20261125-resnet5", 0.52) == "20261125-resnet50"  # unique prefix
    with pytest.raises(ConfigError, match="ambiguous"):
        lb.record_public("20261125", 0.5)
    with pytest.raises(ConfigError, match="unknown run 'othr'.*did you mean other"):
        lb.record_public("othr", 0.5)
    for bad in (1.5, -0.1, float("nan"), "x"):
        with pytest.raises(ConfigError):
            lb.record_public("other", bad)
    public = lb.rows().groupby("run_id")["public_score"].agg(["min", "max"])
    assert public.loc["other"].tolist() == [0.41, 0.41]
    assert public.loc["20261125-resnet50"].tolist() == [0.52, 0.52]
    assert public.loc["20261125-resnet18"].isna().all()
    assert set(lb.rows().query("run_id == 'other'")["notes"]) == {"LB 0.41"}


def test_ranking_order(tmp_path):
    lb = Leaderboard(tmp_path / "lb.sqlite")
    add(lb, "oof-best", 0.9)  # no test score: ranked after every run that has one
    add(lb, "test-low", 0.8, 0.40)
    add(lb, "test-high", 0.5, 0.60)
    add(lb, "oof-low", 0.3)
    add(lb, "real-a", 0.45, metric="image_macro_AP", dataset="hpa")
    add(lb, "real-b", 0.55, metric="image_macro_AP", dataset="hpa")
    r = lb.ranked()
    synth = r[r["dataset"] == "synth"]
    assert synth["run_id"].tolist() == ["test-high", "test-low", "oof-best", "oof-low"]
    assert synth["rank"].tolist() == [1, 2, 3, 4]
    assert synth["score"].tolist() == pytest.approx([0.60, 0.40, 0.9, 0.3])
    real = r[r["dataset"] == "hpa"]
    assert real["run_id"].tolist() == ["real-b", "real-a"] and real["rank"].tolist() == [1, 2]
    assert r.loc[r["run_id"] == "real-b", ["fold0", "fold1", "fold2"]].to_numpy().tolist() == [
        pytest.approx([0.54, 0.55, 0.56])]
    assert r.loc[r["run_id"] == "real-b", "fold_mean"].item() == pytest.approx(0.55)


def test_export_csv_and_markdown(tmp_path):
    lb = Leaderboard(tmp_path / "lb.sqlite")
    add(lb, "r1", 0.6, 0.5, notes="a|b")
    add(lb, "r2", 0.7, 0.65)
    lb.record_public("r2", 0.52)
    csv_path = lb.export(tmp_path / "out" / "board.csv")
    back = pd.read_csv(csv_path, keep_default_na=False, na_values=[""])
    ranked = lb.ranked()
    assert back["run_id"].tolist() == ["r2", "r1"] == ranked["run_id"].tolist()
    assert back.columns.tolist() == ranked.columns.tolist()
    assert back["public_score"].iloc[0] == 0.52 and pd.isna(back["public_score"].iloc[1])
    md = lb.export(tmp_path / "board.md").read_text().splitlines()
    assert len(md) == 2 + 2
    assert md[0].startswith("| rank | run_id |") and set(md[1]) <= set("|-:")
    assert md[2].startswith("| 1 | r2 |") and "0.5200" in md[2]
    assert "a\\|b" in md[3] and md[3].count(" | ") == md[0].count(" | ")
    every = pd.read_csv(lb.export(tmp_path / "all.csv", all_rows=True))
    assert len(every) == 8 and sorted(every["fold"].unique()) == [OVERALL, 0, 1, 2]
    with pytest.raises(ConfigError, match=".csv or .md"):
        lb.export(tmp_path / "board.xlsx")


def test_bad_inputs(tmp_path):
    lb = Leaderboard(tmp_path / "lb.sqlite")
    with pytest.raises(ConfigError, match="metric"):
        add(lb, "r", 0.5, metric="accuracy")
    with pytest.raises(ConfigError, match="must be finite"):
        add(lb, "r", float("nan"))
    with pytest.raises(ConfigError, match="oof_score"):
        lb.add_run("r", fold_scores={0: 0.5}, oof_score="high", metric="cell_mAP", backbone="b", combine="c",
                   config_hash="h", git_commit="x")
    with pytest.raises(ConfigError, match="run_id"):
        add(lb, " ", 0.5)
    with pytest.raises(ConfigError, match="fold numbers"):
        lb.add_run("r", fold_scores={-2: 0.5}, oof_score=0.5, metric="cell_mAP", backbone="b", combine="c",
                   config_hash="h", git_commit="x")
    assert lb.rows().empty  # nothing half-written
    assert lb.ranked().empty and Leaderboard(tmp_path / "none.sqlite").ranked().empty
    assert not (tmp_path / "none.sqlite").exists()  # reading never creates the file
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(DataError, match="junk.sqlite"):
        add(Leaderboard(tmp_path / "junk.sqlite"), "r", 0.5)


def test_git_commit_best_effort(tmp_path):
    assert git_commit(tmp_path) is None  # not a git tree
    lb = Leaderboard(tmp_path / "lb.sqlite")
    lb.add_run("r", fold_scores={0: 0.5}, oof_score=0.5, metric="cell_mAP", backbone="b", combine="c",
               config_hash="h")
    commit = lb.rows()["git_commit"].iloc[0]
    assert commit is None or len(commit.split("+")[0]) == 40


def test_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KIT_LEADERBOARD", raising=False)
    add(Leaderboard("leaderboard.sqlite"), "run-a", 0.6, 0.55)  # the default path: ./leaderboard.sqlite
    add(Leaderboard("leaderboard.sqlite"), "run-b", 0.5, 0.58)
    assert main(["leaderboard"]) == 0
    out = capsys.readouterr().out
    assert out.index("run-b") < out.index("run-a") and "cell_mAP on synth" in out
    assert main(["leaderboard", "record", "run-a", "--public", "0.52"]) == 0
    assert "recorded public score 0.5200 for run run-a" in capsys.readouterr().out
    assert main(["leaderboard", "record", "nope", "--public", "0.5"]) == 2
    assert "unknown run 'nope'" in capsys.readouterr().err
    assert main(["leaderboard", "export", "board.md"]) == 0
    assert "| run-b |" in (tmp_path / "board.md").read_text()

    other = tmp_path / "elsewhere" / "lb.sqlite"
    monkeypatch.setenv("KIT_LEADERBOARD", str(other))  # the environment variable ...
    add(Leaderboard(), "env-run", 0.4)
    assert other.is_file()
    assert main(["leaderboard"]) == 0 and "env-run" in capsys.readouterr().out
    # ... and --db, before or after the action, wins over it
    assert main(["leaderboard", "--db", "leaderboard.sqlite", "export", "x.csv"]) == 0
    assert main(["leaderboard", "export", "y.csv", "--db", "leaderboard.sqlite"]) == 0
    assert pd.read_csv("x.csv")["run_id"].tolist() == pd.read_csv("y.csv")["run_id"].tolist() == ["run-b", "run-a"]
    assert main(["leaderboard", "--db", "leaderboard.sqlite", "remove", "run-b"]) == 0
    assert Leaderboard("leaderboard.sqlite").ranked()["run_id"].tolist() == ["run-a"]
