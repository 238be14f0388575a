"""kit.pipeline end to end: a tiny synthetic dataset -> folds .. train .. submission -> mAP in [0, 1]."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from unittest import mock

torch = pytest.importorskip("torch")
nn = torch.nn

from kit.models import register_backbone  # noqa: E402


@register_backbone("tiny_test_cnn")
def _tiny(in_chans: int):
    """Two strided convolutions: trains in well under a second per fold on 32 px tiles."""
    features = nn.Sequential(
        nn.Conv2d(in_chans, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
    )
    return features, 16


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory):
    from kit.pipeline import demo

    root = tmp_path_factory.mktemp("pipeline")
    db = root / "lb.sqlite"
    summary = demo(
        root / "demo", seed=3, n_train=8, n_test=3, size=128, n_splits=2, epochs=1, backbone="tiny_test_cnn",
        tile_size=32, field_size=64, workers=1, submission=root / "submission" / "submission.csv",
        leaderboard=db, overrides=["train.batch_size=16"],
    )
    return root, db, summary


def test_demo_writes_a_valid_scored_submission(demo_result):
    from kit.submission import validate_submission

    root, db, summary = demo_result
    data = Path(summary["run"]).parents[1] / "synth-s3-8-3-128px"
    sub = Path(summary["submission"])
    assert sub == root / "submission" / "submission.csv" and sub.is_file()
    assert validate_submission(sub, sample=data / "sample_submission.csv", images=data / "test") == []
    for key in ("image_only", "cell_only", "combined", "seg_ceiling", "cls_ceiling"):
        value = summary[key]
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)
    # the combined row is the score of the file itself, as the competition's evaluator sees it
    from kit.metric import evaluate_files

    assert evaluate_files(data / "test_solution.csv", sub)["mAP"] == pytest.approx(summary["combined"], abs=1e-9)
    oof = summary["oof"]
    assert oof["score_kind"] == "cell_mAP"
    assert set(oof["per_fold"]) == {"0", "1"}
    assert 0.0 <= oof["overall"] <= 1.0
    run = Path(summary["run"])
    for name in ("summary.json", "comparison.md", "combine.yaml", "config.yaml"):
        assert (run / name).is_file(), name
    stages = summary["timings"]
    for stage in ("synth", "folds", "segment", "tiles", "train", "tune", "predict", "evaluate", "ceilings"):
        assert stage in stages and stages[stage] >= 0
    assert json.loads((run / "summary.json").read_text())["combined"] == summary["combined"]


def test_demo_records_the_run_on_the_leaderboard(demo_result):
    from kit.leaderboard import Leaderboard

    _, db, summary = demo_result
    rows = Leaderboard(db).rows().to_dict("records")
    run_id = Path(summary["run"]).name
    mine = [r for r in rows if r["run_id"] == run_id]
    assert sorted(r["fold"] for r in mine) == [-1, 0, 1]
    assert all(r["metric"] == "cell_mAP" for r in mine)
    assert math.isclose(mine[0]["test_score"], summary["combined"])


def test_rerun_reuses_caches_and_checkpoints(demo_result):
    from kit.pipeline import demo

    root, db, summary = demo_result
    run = Path(summary["run"])
    ckpts = sorted(run.glob("*/fold*/last.pt"))
    assert len(ckpts) == 4  # cell and image, 2 folds
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    again = demo(
        root / "demo", seed=3, n_train=8, n_test=3, size=128, n_splits=2, epochs=1, backbone="tiny_test_cnn",
        tile_size=32, field_size=64, workers=1, submission=root / "submission" / "submission.csv",
        leaderboard=db, overrides=["train.batch_size=16"], ceilings=False,
    )
    assert again["run"] == summary["run"]
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps  # nothing retrained
    assert again["combined"] == pytest.approx(summary["combined"])


def test_print_summary_json_last_line(demo_result, capsys):
    from kit.pipeline import print_summary

    _, _, summary = demo_result
    print_summary(summary, as_json=True)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads(last)
    assert {"run", "submission", "timings", "image_only", "cell_only", "combined", "seg_ceiling",
            "cls_ceiling"} <= set(data)


def test_ceiling_command_on_the_run(demo_result):
    from kit.ceilings import ceiling

    _, _, summary = demo_result
    scores = ceiling(summary["run"])
    assert scores["seg_ceiling"] == pytest.approx(summary["seg_ceiling"])
    assert scores["cls_ceiling"] == pytest.approx(summary["cls_ceiling"])
    assert (Path(summary["run"]) / "ceiling.json").is_file()


def test_tune_combine_on_the_run_without_truth_uses_the_proxy(demo_result):
    from kit.combine import candidate_specs, tune_run

    _, _, summary = demo_result
    specs = candidate_specs(weights=[0.5], border_powers=[0.0])
    result = tune_run(summary["run"], specs, write=False, progress=False, truth=False)
    assert result["n_candidates"] == len(specs)
    assert result["score_kind"] == "image_macro_AP"
    assert any("cell-level mAP is unavailable" in n for n in result["notes"])
    assert 0.0 <= result["score"] <= 1.0


def test_the_run_manifest_records_its_inputs(demo_result):
    from kit import __version__
    from kit.manifest import read_manifest

    _, _, summary = demo_result
    m = read_manifest(summary["run"])
    assert not m.legacy and m.kit_version == __version__
    assert m.folds == [0, 1] and m.tile_size == 32 and m.field_size == 64 and m.mask_backend == "classical"
    assert Path(m.tile_dir).name.startswith("tiles-32-") and Path(m.field_dir).name.startswith("fields-64-")
    ids = [line.split(",")[0] for line in (Path(m.data_dir) / "train.csv").read_text().splitlines()[1:]]
    assert all((Path(m.mask_cache) / f"{i}.npz").is_file() for i in ids)
    from kit.folds import file_sha256

    assert m.folds_sha256 == file_sha256(m.folds_file)


# ------------------------------------------------------------------------- one decode, reliability

_OPENS: dict | None = None  # channel file -> opens, while a run is counted


def _count_opens(event: str, args) -> None:
    if _OPENS is not None and event == "open" and isinstance(args[0], (str, Path)):
        path = Path(args[0])
        if path.parent.name in ("train", "test") and path.suffix == ".png":
            _OPENS[str(path)] = _OPENS.get(str(path), 0) + 1


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory, demo_result):
    """A new dataset (the demo's, copied, its truth without nuclei masks) run from scratch in this
    process (workers=1) with every opening of a channel file counted (an audit hook sees Python's
    open() and numpy's fromfile alike); its leaderboard path is a folder, so recording fails after
    the submission is written."""
    import shutil
    import sys

    from kit.pipeline import DEMO_OVERRIDES, run_pipeline

    global _OPENS
    root = tmp_path_factory.mktemp("fresh")
    src = Path(demo_result[2]["run"]).parents[1] / "synth-s3-8-3-128px"
    data = root / "data"
    shutil.copytree(src, data, copy_function=shutil.copyfile)
    for p in (data / "truth").glob("*_nuclei_mask.png"):
        p.unlink()
    (root / "lb").mkdir()
    import kit.report

    before_report: dict = {}
    write_report = kit.report.write_report

    def counted_report(*args, **kwargs):  # the opens of the run proper, before the report reads
        before_report.update(_OPENS)
        return write_report(*args, **kwargs)

    sys.addaudithook(_count_opens)
    _OPENS = {}
    try:
        with mock.patch.object(kit.report, "write_report", counted_report):
            summary = run_pipeline(
                data, overrides=["model.backbone=tiny_test_cnn", "train.epochs=1", "data.tile_size=32",
                                 "data.field_size=64", *DEMO_OVERRIDES, "train.batch_size=16"],
                work=root / "work", submission=root / "submission.csv", n_splits=2, fold_seed=3, workers=1,
                leaderboard=root / "lb")
        opens = dict(_OPENS)
    finally:
        _OPENS = None
    return data, root, summary, (before_report, opens)


def test_every_channel_file_is_opened_once_per_run(fresh_run):
    """Issue 13.1: one decode per image: train (masks, tiles, field) and test (masks, tiles, field,
    the classification ceiling's true cells, the submission's size check) alike. The report, for
    people, after the run, opens the fields it shows once more."""
    data, _, summary, (opens, with_report) = fresh_run
    files = sorted(str(p) for split in ("train", "test") for p in (data / split).glob("*.png"))
    assert len(files) == 4 * (8 + 3)
    assert sorted(opens) == files
    assert set(opens.values()) == {1}, {Path(k).name: v for k, v in opens.items() if v != 1}
    # the report, written after the run, reads again (at display size) the fields it shows
    assert summary["report"] and max(with_report.values()) == 2
    assert summary["timings"]["decode"] > 0 and summary["timings"]["segment"] > 0


def test_ceilings_need_the_true_cells_only(fresh_run):
    """Issue 16.4: truth/ with cell masks but no nuclei masks still gives both ceilings."""
    _, _, summary, _ = fresh_run
    for key in ("seg_ceiling", "cls_ceiling"):
        assert isinstance(summary[key], float) and 0.0 <= summary[key] <= 1.0


def test_a_failure_after_the_submission_keeps_what_was_measured(fresh_run, capsys):
    """Issue 16.4: recording fails (the leaderboard path is a folder): the submission, the scores,
    summary.json and comparison.md are all there, the error is reported and the exit code is 2."""
    from kit.pipeline import print_summary

    _, root, summary, _ = fresh_run
    assert (root / "submission.csv").is_file()
    assert len(summary["errors"]) == 1 and "record failed" in summary["errors"][0]
    saved = json.loads((Path(summary["run"]) / "summary.json").read_text())
    assert saved["errors"] == summary["errors"] and saved["combined"] == summary["combined"]
    assert (Path(summary["run"]) / "comparison.md").is_file()
    print_summary(summary, as_json=True)
    out = capsys.readouterr()
    assert "record failed" in out.err and json.loads(out.out.strip().splitlines()[-1])["errors"]


@pytest.mark.parametrize("args, words", [
    (["--folds", "0"], "--folds must be at least 2"),
    (["--folds", "2", "train.folds=[5]"], "train.folds"),
    (["model.backbone=resnet999"], "resnet999"),
])
def test_the_whole_config_is_checked_before_the_first_stage(tiny_dataset, tmp_path, capsys, args, words):
    """Issue 16.10: one clear line, exit 2, and nothing made (no folds, no cache)."""
    from kit.cli import main

    assert main(["run", "--data", str(tiny_dataset), "--work", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_config_without_data_paths_goes_with_data(tmp_path):
    """Issue 12.5: configs/cpu.yaml names no data paths; a value equal to a default is still the user's."""
    from kit.errors import ConfigError
    from kit.pipeline import build_config

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    cfg = build_config(data, tmp_path / "work", repo / "configs" / "cpu.yaml", [], 3, 0)
    assert cfg.data.data_dir == str(data) and cfg.cell_model.backbone == "resnet18" and cfg.data.tile_size == 64
    assert cfg.data.mask_cache.startswith(str(tmp_path / "work" / "cache"))
    with pytest.raises(ConfigError, match="differ"):
        build_config(data, tmp_path / "work", repo / "configs" / "demo_cpu.yaml", [], 3, 0)
    mine = tmp_path / "mine.yaml"
    mine.write_text("data:\n  mask_cache: cache/masks\n")  # the default value, set on purpose
    assert build_config(data, tmp_path / "work", mine, [], 3, 0).data.mask_cache == "cache/masks"
    assert build_config(data, tmp_path / "work", None, ["data.tile_cache=cache/tiles"], 3, 0).data.tile_cache == \
        "cache/tiles"


def test_tune_combine_writes_only_combine_yaml(demo_result):
    """Issue 13.2: config.yaml is the run's input, written once; tuning never rewrites it."""
    from kit.combine import candidate_specs, tune_run

    _, _, summary = demo_result
    run = Path(summary["run"])
    config, combine = run / "config.yaml", run / "combine.yaml"
    before, kept = config.stat().st_mtime_ns, combine.read_bytes()
    try:
        tune_run(run, candidate_specs(strategies=["image_only"], border_powers=[0.0]), progress=False)
        assert config.stat().st_mtime_ns == before
        assert "image_only" in combine.read_text()
    finally:
        combine.write_bytes(kept)
