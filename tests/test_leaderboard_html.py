"""`kit leaderboard export --html`: runs side by side, differing settings highlighted, report links."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kit.cli import main
from kit.leaderboard import Leaderboard


def _run_dir(root: Path, name: str, lr: float, report: bool) -> Path:
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"lr": lr, "epochs": 4}, "model": {"backbone": "resnet18"}}))
    if report:
        (run / "report").mkdir()
        (run / "report" / "index.html").write_text("<html></html>")
    return run


def test_export_html_puts_runs_side_by_side(tmp_path):
    db = tmp_path / "lb.sqlite"
    board = Leaderboard(db)
    a = _run_dir(tmp_path, "run-a", 0.002, report=True)
    b = _run_dir(tmp_path, "run-b", 0.01, report=False)
    for run, test, folds in ((a, 0.61, {0: 0.5, 1: 0.7}), (b, 0.42, {0: 0.4, 1: 0.45})):
        board.add_run(run.name, fold_scores=folds, oof_score=sum(folds.values()) / 2, metric="cell_mAP",
                      test_score=test, backbone="resnet18", combine="product", config_hash=run.name,
                      dataset="synth", extra={"run_dir": str(run), "seg_ceiling": 0.9, "timings": {"train": 12.0}})
    out = tmp_path / "pages" / "lb.html"
    assert main(["leaderboard", "--db", str(db), "export", "--html", str(out)]) == 0
    text = out.read_text()
    assert "<script" not in text and not re.search(r'(src|href)="[a-z]+://', text)
    # columns in rank order: the better test score first
    assert text.index("1. run-a") < text.index("2. run-b")
    for value in ("0.6100", "0.4200", "0.6000", "0.4250", "0.9000"):
        assert value in text, value
    # the setting that differs is highlighted in the second run's column, the rest folded away
    row = re.search(r"<tr><td><b>train\.lr</b></td>(.*?)</tr>", text).group(1)
    assert re.findall(r'<td( class="diff")?>([^<]*)</td>', row) == [("", "0.002"), (' class="diff"', "0.01")]
    assert "2 setting(s) the same in every run" in text
    # links to each run's report, relative to the page; a run without one says so
    links = re.findall(r'href="([^"#]+)"', text)
    assert len(links) == 1 and (out.parent / links[0]).resolve() == (a / "report" / "index.html").resolve()
    assert "no report" in text


def test_export_needs_a_target_and_an_html_name(tmp_path):
    db = tmp_path / "lb.sqlite"
    Leaderboard(db).add_run("r", fold_scores={0: 0.5}, oof_score=0.5, metric="cell_mAP", backbone="x",
                            combine="product", config_hash="h")
    assert main(["leaderboard", "--db", str(db), "export"]) == 2
    assert main(["leaderboard", "--db", str(db), "export", "--html", str(tmp_path / "lb.txt")]) == 2
    assert main(["leaderboard", "--db", str(db), "export", str(tmp_path / "lb.md"), "--html",
                 str(tmp_path / "lb.html")]) == 0
    assert (tmp_path / "lb.md").is_file() and (tmp_path / "lb.html").is_file()


def test_export_html_of_an_empty_board(tmp_path):
    out = Leaderboard(tmp_path / "none.sqlite").export(tmp_path / "lb.html")
    assert "no runs recorded" in out.read_text()


@pytest.mark.parametrize("name", ["lb.htm", "LB.HTML"])
def test_html_suffixes(tmp_path, name):
    board = Leaderboard(tmp_path / "lb.sqlite")
    board.add_run("r", fold_scores={0: 0.5}, oof_score=0.5, metric="cell_mAP", backbone="x", combine="product",
                  config_hash="h")
    assert "1. r" in board.export(tmp_path / name).read_text()
