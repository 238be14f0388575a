"""The whole job in one command: `run` (any dataset), `demo` (synthetic data + run), `ceiling`.

``python -m kit run --data DIR [--config CONFIG.yaml] [KEY=VALUE ...] [--json]`` on a dataset in
the Kaggle layout (``train/``, ``test/``, ``train.csv``, ``sample_submission.csv``):

======== ==================================================================================
stage    what it does (every stage reuses what a previous run of the same settings wrote)
======== ==================================================================================
check    the whole config, before anything runs: folds, backbones, weights files, segmentation
         backend and options, device (one error line for the first problem)
folds    multi-label stratified folds -> ``WORK/folds/<dataset>-k<K>-s<seed>.csv`` (grouped by the
         labels table's ``group`` column when it has one: `kit external table`)
prepare  one decode of every train image (`kit.prepare`, ``--workers`` processes) writes what is
         missing of: its masks and cell table -> the mask cache ``WORK/cache/<dataset>/masks/``,
         its cell tiles -> ``WORK/cache/<dataset>/tiles/tiles-<S>-<key>/``, its downscaled field
         -> ``WORK/cache/<dataset>/fields/fields-<S>-<key>/``
train    the run's folds of the cell and the image model (resumes from ``last.pt``); writes
         ``config.yaml`` and ``manifest.json`` (`kit.manifest`) once
tune     the cell x image combination chosen on OOF predictions (`kit.combine`) -> combine.yaml
predict  one decode of every test image: segmented into the mask cache, tiles and field cut in
         memory, both models -> ``submission/submission.csv`` (validated as a temporary file, then
         renamed); with truth, the true cells of the classification ceiling in the same pass
evaluate when ``DIR/test_solution.csv`` exists: the submission's mAP, the image-only and cell-only
         rows, and the ceilings (`kit.ceilings`; true cells from ``DIR/truth/`` cell masks or the
         solution file)
record   one row per fold on the leaderboard (`kit.leaderboard`)
report   ``RUN/report/index.html``: one static page with the scores, per-class AP, fields and
         cells (`kit.report`); its path is printed last
======== ==================================================================================

The timings also give the seconds the prepare pass spent decoding, segmenting, cutting tiles and
downscaling fields (``decode``, ``segment``, ``tiles``, ``fields``: summed over its workers). Once the
submission is written, a failure in a later stage is reported (exit 2) after the table, the JSON
and ``summary.json`` are written with what was measured.

Run folder: ``WORK/runs/<dataset>-<config hash>/`` (so a rerun with the same settings finds and
resumes it), holding the train outputs plus ``combine.yaml``, ``summary.json`` (everything printed,
as JSON) and ``comparison.md`` (the table).

With ``--json`` the last line of stdout is one JSON object: ``run`` (run folder), ``submission``,
``timings`` (seconds per stage), ``image_only``, ``cell_only``, ``combined``, ``seg_ceiling``,
``cls_ceiling`` (test mAP of each row of the comparison table; null without test truth), plus
``oof`` (OOF score, its kind, per fold), ``combine`` (the chosen strategy) and ``report`` (the
path of the HTML report, null if writing it failed).

External data: ``data.train_csv=ext/train_all.csv data.extra_images=[ext/images]`` trains on the
Kaggle train images and the images of the extra folders, labelled by that table (`kit.external`);
each image is read from the one folder that holds it (`kit.layout.ImageFolders`).

``python -m kit demo`` = ``synth`` (into ``--out``, default ``demo/``) + ``run``, with defaults that
finish in about 10 minutes on 2 CPU cores. ``configs/cpu.yaml`` is a CPU-sized preset for any
dataset: ``python -m kit run --data DIR --config configs/cpu.yaml`` (a config given with --data
names no data paths; the pipeline fills in every data path the user did not set).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from kit.ceilings import TABLE_ROWS, comparison_table, fmt_score
from kit.errors import ConfigError, DataError, KitError

# The demo's defaults: sized so synth + the whole pipeline end within ~10 minutes on 2 CPU cores.
DEMO_DEFAULTS = dict(seed=0, train=64, test=24, size=256, folds=3, epochs=4, backbone="resnet18",
                     tile_size=48, field_size=256, threads=2)
DEMO_OVERRIDES = [
    "train.batch_size=32",
    "train.lr=0.002",
    "train.workers=0",
    "predict.tta=1",
    "predict.batch_size=128",
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Timer:
    """Wall time per stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        _log(f"== {name}")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 2)


def dataset_key(data_dir: str | Path) -> str:
    """``<folder name>-<6 hex of its absolute path>``: caches of two datasets never mix."""
    path = Path(data_dir).resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:6]}"


# --------------------------------------------------------------------------------------------
# configuration


def build_config(data_dir: Path, work: Path, config: str | Path | None, overrides: Sequence[str],
                 n_splits: int, fold_seed: int):
    """The run's config: the user's file and overrides, with the pipeline's data paths filled in
    wherever the user set none (a value the user gave is kept, even one equal to the default)."""
    from kit.config import config_hash, load_config

    explicit: set[str] = set()
    cfg = load_config(config, list(overrides), explicit=explicit)
    key = dataset_key(data_dir)
    cache = work / "cache" / key
    d = cfg.data
    if "data.data_dir" not in explicit:
        d.data_dir = str(data_dir)
    elif Path(d.data_dir).resolve() != data_dir.resolve():
        raise ConfigError(f"--data {data_dir} and the config's data.data_dir {d.data_dir} differ: give one")
    defaults = {"mask_cache": cache / "masks", "tile_cache": cache / "tiles", "field_cache": cache / "fields",
                "folds_file": work / "folds" / f"{key}-k{n_splits}-s{fold_seed}.csv"}
    for name, value in defaults.items():
        if f"data.{name}" not in explicit:
            setattr(d, name, str(value))
    if not cfg.run_dir:
        cfg.run_dir = str(work / "runs" / f"{Path(d.data_dir).resolve().name}-{config_hash(cfg)[:8]}")
    return cfg


def check_run(cfg, n_splits: int, n_labels: int) -> None:
    """Every setting a run needs, checked before its first stage: ConfigError naming the first bad one."""
    from kit.device import resolve_device
    from kit.models import build_from_config
    from kit.segment.cache import MaskCache

    if n_splits < 2:
        raise ConfigError(f"--folds must be at least 2 (the number of cross-validation folds), got {n_splits}")
    if n_labels < n_splits:
        raise ConfigError(f"{cfg.data.labels_path}: {n_labels} images cannot make {n_splits} folds")
    if cfg.train.folds != "all":
        bad = sorted(f for f in cfg.train.folds if not 0 <= f < n_splits)
        if bad:
            raise ConfigError(f"config key train.folds: fold(s) {', '.join(map(str, bad))} do not exist with "
                              f"{n_splits} folds (folds are 0..{n_splits - 1}; set --folds or train.folds)")
    for kind in ("cell", "image"):
        m = cfg.model(kind)
        try:
            build_from_config(m, pretrained=False)
        except ConfigError as exc:
            raise ConfigError(f"config key {kind}_model.backbone: {exc}") from None
        if m.pretrained == "imagenet":  # the weights a package ships (kit.models.packaged_weights)
            from kit.models import packaged_weights

            try:
                packaged_weights(m.backbone)
            except KitError as exc:
                raise ConfigError(f"config key {kind}_model.pretrained: {exc}") from None
        elif m.pretrained and not Path(m.pretrained).is_file():
            raise ConfigError(f"config key {kind}_model.pretrained: weights file not found: {m.pretrained}")
    masks = MaskCache(cfg.data.mask_cache, cfg.data.segment_backend)
    from kit.segment import get_backend

    check = getattr(get_backend(masks.backend), "check", None)
    if check is not None:
        check(masks.params)
    resolve_device(cfg.train.device)


# --------------------------------------------------------------------------------------------
# stages


def stage_folds(cfg, n_splits: int, seed: int) -> Path:
    import pandas as pd

    from kit import folds as kfolds
    from kit.labels import read_labels_csv

    path = Path(cfg.data.folds_file)
    labels_path = cfg.data.labels_path
    if path.is_file():
        try:
            kfolds.load_folds(path, labels_path)
            _log(f"folds: reusing {path}")
            return path
        except KitError as exc:
            _log(f"folds: {path} is stale ({exc}); rebuilding")
    labels = read_labels_csv(labels_path)
    # a labels table with a group column (`kit external table`: antibodies, duplicates) keeps groups together
    groups = desc = None
    if "group" in pd.read_csv(labels_path, nrows=0).columns:
        groups, desc, _ = kfolds.read_groups(labels, "group", labels_path)
    folds = kfolds.make_folds(labels, n_splits, seed, groups=groups)
    report = kfolds.fold_report(labels, folds, groups)
    kfolds.save_folds(path, labels["ID"].tolist(), folds, labels_path, report, n_splits=n_splits, seed=seed,
                      groups=desc, labels_df=labels)
    _log(f"folds: wrote {path}")
    return path


# --------------------------------------------------------------------------------------------
# report


def pseudo_round_scores(run_dir: Path, cfg, spec) -> list[tuple[int, float | None]]:
    """(round, OOF score of `spec` with that round's cell model) for a run with pseudo-label rounds."""
    from kit.combine import load_oof
    from kit.pseudo import cell_dir_name

    out = []
    for r in range(cfg.train.pseudo_rounds + 1):
        try:
            out.append((r, load_oof(run_dir, cfg, progress=False, cell_dir=cell_dir_name(r)).score(spec)))
        except KitError:
            out.append((r, None))
    return out if cfg.train.pseudo_rounds > 0 else []


def _margin_note(test: dict) -> str | None:
    c, i, e = test.get("combined"), test.get("image_only"), test.get("cell_only")
    if None in (c, i, e):
        return None
    return (f"combination vs image-only: {c - i:+.4f} mAP; vs cell-only: {c - e:+.4f} mAP "
            f"({'beats both' if c > i and c > e else 'does NOT beat both'})")


# --------------------------------------------------------------------------------------------
# the pipeline


def run_pipeline(data_dir: str | Path, *, config: str | Path | None = None, overrides: Sequence[str] = (),
                 work: str | Path = ".", submission: str | Path = "submission/submission.csv",
                 n_splits: int = 5, fold_seed: int = 42, workers: int = 2, ceilings: bool = True,
                 leaderboard: str | Path | None = None, notes: str = "", timer: Timer | None = None) -> dict:
    """Every stage on one dataset (see the module doc); returns the summary dict.

    ``summary["errors"]`` lists the failures of stages after the submission was written (their
    rows are then None); everything before the submission raises as usual.
    """
    from kit.combine import format_tune_result, read_combine_spec, tune_run
    from kit.config import config_hash
    from kit.layout import DatasetIndex
    from kit.manifest import resolve_inputs
    from kit.masks import truth_masks
    from kit.predict import Predictor, build_predictions, write_and_validate
    from kit.prepare import prepare_run

    data_dir, work = Path(data_dir), Path(work)
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    timer = timer or Timer()
    t_start = time.perf_counter()
    cfg = build_config(data_dir, work, config, overrides, n_splits, fold_seed)
    # train images may also live in data.extra_images (external data), labelled by data.train_csv
    index = DatasetIndex.open(data_dir, extra_train_dirs=cfg.data.extra_images)
    if not cfg.data.labels_path.is_file():
        raise DataError(f"{cfg.data.labels_path} not found: --data must be a dataset in the Kaggle layout"
                        + (" (data.train_csv names the labels file)" if cfg.data.train_csv else ""))
    from kit.labels import read_labels_csv

    train_ids = read_labels_csv(cfg.data.labels_path)["ID"].tolist()
    check_run(cfg, n_splits, len(train_ids))
    run_dir = Path(cfg.run_dir)
    sample = data_dir / "sample_submission.csv"
    test_ids, sizes = _test_ids(data_dir)
    test_dir = data_dir / "test"
    solution_path = data_dir / "test_solution.csv"
    truth = truth_masks(data_dir) if ceilings and solution_path.is_file() else None
    _log(f"run folder: {run_dir}  ({len(train_ids)} train, {len(test_ids)} test images)")
    _print_estimate(cfg, test_ids, sizes, test_dir, n_splits)

    with timer.stage("folds"):
        stage_folds(cfg, n_splits, fold_seed)
    inputs = resolve_inputs(cfg)
    with timer.stage("prepare"):
        report = prepare_run(inputs, train_ids, workers=workers)
    for part in ("decode", "segment", "tiles", "fields"):
        timer.add(part, report.seconds.get(part, 0.0))
    with timer.stage("train"):
        from kit.train import train_all

        train_metrics = train_all(cfg, kinds=("cell", "image"), resume=True, prepare=False)
    with timer.stage("tune"):
        tuned = tune_run(run_dir)
        spec = read_combine_spec(run_dir)
        _log(_indent(format_tune_result(tuned)))
    truth_failures: dict = {}  # the ceilings' true cells are optional: their failures are reported
    with timer.stage("predict"):
        predictor = Predictor(run_dir)
        sources = [predictor.run_masks(test_dir)] + ([truth] if truth is not None else [])
        results, *truth_results = predictor.predict_sources(test_dir, test_ids, sources, workers=workers,
                                                            failures=truth_failures)
        lost = [i for i in test_ids if i not in results]
        if lost:
            raise DataError(f"no prediction for {len(lost)} test image(s), e.g. {lost[0]}")
        preds = build_predictions(results, spec, image_source=cfg.predict.image_source)
        sub_path = write_and_validate(submission, preds, test_ids, sizes, sample=sample if sample.is_file() else None,
                                      image_sizes={i: (r.width, r.height) for i, r in results.items()})

    # The submission is written: from here on a failure must not lose what was measured.
    errors: list[str] = []
    test_scores: dict = {key: None for key, _ in TABLE_ROWS}
    has_truth = solution_path.is_file()
    notes_out = list(tuned.get("notes", [])) + ([] if has_truth else [f"{solution_path} absent: no test mAP"])
    for key, failed in truth_failures.items():
        shown = "; ".join(f"{i}: {m}" for i, m in failed[:3])
        errors.append(f"classification ceiling skipped: true cells unavailable for {len(failed)} image(s) "
                      f"({key}): {shown}"[:600])
    if has_truth:
        try:
            from kit.ceilings import score_rows
            from kit.submission import read_submission

            usable = truth_results[0] if truth_results and not truth_failures else None
            score_rows(read_submission(solution_path), results, spec, test_ids, usable, timer, ceilings=ceilings,
                       out=test_scores, image_source=cfg.predict.image_source)
        except Exception as exc:  # noqa: BLE001 - reported below, after the summary is saved
            errors.append(_failure("evaluate", exc))
    oof = dict(tuned["oof"])
    oof["image_only"] = tuned["baselines"]["image_only"]
    oof["cell_only"] = tuned["baselines"]["cell_only"]
    rounds = pseudo_round_scores(run_dir, cfg, spec)
    table = comparison_table(test_scores, oof, spec.name, rounds)
    from kit.atomic import atomic_open

    lb_path = None
    with timer.stage("record"):
        try:
            lb_path = _record(leaderboard, run_dir, cfg, spec, tuned, test_scores, timer, notes, data_dir)
        except Exception as exc:  # noqa: BLE001
            errors.append(_failure("record", exc))
    timings = dict(timer.seconds)
    timings["total"] = round(time.perf_counter() - t_start + timings.get("synth", 0.0), 2)
    summary = {
        "run": str(run_dir),
        "submission": str(sub_path),
        "timings": timings,
        **{key: test_scores.get(key) for key, _ in TABLE_ROWS},
        "combine": spec.to_dict() | {"name": spec.name},
        "oof": {"score_kind": tuned["score_kind"], "overall": oof.get("overall"), "per_fold": oof.get("per_fold"),
                "image_only": oof["image_only"], "cell_only": oof["cell_only"],
                "image_oof_macro_ap": tuned.get("image_oof_macro_ap")},
        "train": train_metrics,
        "notes": notes_out,
        "errors": errors,
        "leaderboard": str(lb_path) if lb_path else None,
        "config_hash": config_hash(cfg),
    }
    margin = _margin_note(test_scores)
    if margin:
        summary["notes"].append(margin)
    with atomic_open(run_dir / "comparison.md", "w") as f:
        f.write(f"# {run_dir.name}: comparison on {data_dir / 'test'}\n\n{table}\n")
        if margin:
            f.write(f"\n{margin}\n")
    with atomic_open(run_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    summary["report"] = _report(run_dir, timer, workers, errors)
    summary["timings"]["report"] = timer.seconds["report"]
    summary["timings"]["total"] = round(timings["total"] + timer.seconds["report"], 2)
    with atomic_open(run_dir / "summary.json", "w") as f:  # again, with the report's time (or failure)
        json.dump(summary, f, indent=2, default=str)
    summary["table"] = table
    summary["written"] = _written(inputs, run_dir, sub_path, lb_path) | {
        "report": summary["report"] or "(failed: see the errors)"}
    return summary


def _report(run_dir: Path, timer: Timer, workers: int, errors: list[str]) -> str | None:
    """Write the run's HTML report (`kit.report`), last; a failure joins `errors` (exit 2), the
    finished run and its summary stay."""
    from kit.report import write_report

    with timer.stage("report"):
        try:
            return str(write_report(run_dir, workers=workers))
        except Exception as exc:  # noqa: BLE001 - reported with the other late failures
            errors.append(_failure("report", exc))
            return None


def _failure(stage: str, exc: Exception) -> str:
    """One line for a stage that failed after the submission was written (bugs keep their traceback)."""
    if not isinstance(exc, KitError):
        traceback.print_exc(file=sys.stderr)
    return f"{stage} failed after the submission was written: {str(exc)[:300]}"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _print_estimate(cfg, test_ids: list[str], sizes: dict | None, test_dir: Path, n_folds: int) -> None:
    """Before the long work: how long predicting the test set will take (`kit.runtime`, measured figures)."""
    from kit import runtime
    from kit.images import image_size

    sizes = sizes or {i: image_size(test_dir, i) for i in test_ids if (test_dir / f"{i}_red.png").exists()}
    est = runtime.config_estimate(cfg, runtime.size_mix(sizes=sizes), n_folds=n_folds, tta=cfg.predict.tta)
    for line in (est.lines() if est else []):
        _log(line)


def _test_ids(data_dir: Path) -> tuple[list[str], dict | None]:
    """Test IDs and sizes from sample_submission.csv, else the IDs in test/ (sizes None)."""
    from kit.layout import list_image_ids, read_sample_submission

    sample = data_dir / "sample_submission.csv"
    if sample.is_file():
        return read_sample_submission(sample)
    return list_image_ids(data_dir / "test"), None


def _record(path, run_dir: Path, cfg, spec, tuned: dict, test_scores: dict, timer: Timer, notes: str,
            data_dir: Path) -> Path | None:
    from kit.config import config_hash
    from kit.leaderboard import Leaderboard

    lb = Leaderboard(path)
    per_fold = {int(k): v for k, v in tuned["oof"]["per_fold"].items() if v is not None}
    lb.add_run(
        run_dir.name,
        fold_scores=per_fold,
        oof_score=tuned["oof"]["overall"],
        metric=tuned["score_kind"],
        test_score=test_scores.get("combined"),
        backbone=cfg.cell_model.backbone if cfg.cell_model.backbone == cfg.image_model.backbone
        else f"{cfg.cell_model.backbone}+{cfg.image_model.backbone}",
        combine=spec.name,
        config_hash=config_hash(cfg),
        notes=notes,
        extra={"timings": dict(timer.seconds), **{k: test_scores.get(k) for k, _ in TABLE_ROWS},
               "run_dir": str(run_dir)},
        dataset=data_dir.resolve().name,
    )
    return Path(lb.path)


def _written(inputs, run_dir: Path, sub_path: Path, lb_path: Path | None) -> dict:
    return {
        "submission": str(sub_path),
        "run folder": str(run_dir),
        "comparison table": str(run_dir / "comparison.md"),
        "summary": str(run_dir / "summary.json"),
        "combination": str(run_dir / "combine.yaml"),
        "manifest": str(run_dir / "manifest.json"),
        "folds": inputs.folds_file,
        "mask cache": inputs.mask_cache,
        "tile cache": inputs.tile_dir,
        "field cache": inputs.field_dir,
        "leaderboard": str(lb_path) if lb_path else "(not recorded)",
    }


def print_summary(summary: dict, as_json: bool) -> None:
    t = summary["timings"]
    print("stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    oof = summary["oof"]
    if oof["score_kind"] == "cell_mAP":
        folds = ", ".join(f"fold {k} {fmt_score(v)}" for k, v in (oof.get("per_fold") or {}).items())
        print(f"OOF cell mAP (concatenated OOF): {fmt_score(oof['overall'])}  ({folds})")
    else:
        print(f"OOF image-level macro AP (proxy): {fmt_score(oof['overall'])}; cell-level mAP is unavailable "
              "(no per-cell truth for this data)")
    print()
    print(summary["table"])
    for note in summary.get("notes", []):
        print(f"note: {note}")
    for error in summary.get("errors", []):
        print(f"error: {error}", file=sys.stderr)
    print("\nwritten:")
    for k, v in summary["written"].items():
        print(f"  {k:<17} {v}")
    if summary.get("report"):
        print(f"\nreport: {summary['report']}")
    if as_json:
        keys = ("run", "submission", "timings", "image_only", "cell_only", "combined", "seg_ceiling", "cls_ceiling",
                "oof", "combine", "errors", "report")
        print(json.dumps({k: summary.get(k) for k in keys}, default=str))


# --------------------------------------------------------------------------------------------
# commands


def _add_common(parser: argparse.ArgumentParser) -> None:
    from kit.cli import file_arg, folder_arg

    parser.add_argument("--config", type=Path, help="YAML config (kit.config); the pipeline fills in the data paths")
    parser.add_argument("--work", type=folder_arg, help="folder for cache/, folds/ and runs/ (default: the current folder)")
    parser.add_argument("--submission", type=file_arg, default=Path("submission/submission.csv"),
                        help="where to write the submission (default submission/submission.csv)")
    parser.add_argument("--folds", type=int, help="number of cross-validation folds, at least 2 (default: run 5, demo 3)")
    parser.add_argument("--workers", type=int, default=2, help="processes that decode images (masks, tiles, fields) (default 2)")
    parser.add_argument("--leaderboard", type=Path, help="leaderboard database (default leaderboard.sqlite or $KIT_LEADERBOARD)")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the segmentation/classification ceilings")
    parser.add_argument("--notes", default="", help="free text stored with the run on the leaderboard")
    parser.add_argument("--json", action="store_true", help="last line of stdout: the result as one JSON object")


def configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="dataset folder in the Kaggle layout")
    _add_common(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. train.epochs=3 model.backbone=resnet18")
    parser.set_defaults(func=_run_run)


def _check_workers(workers: int) -> int:
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    return workers


def _run_run(args) -> int:
    summary = run_pipeline(
        args.data, config=args.config, overrides=args.overrides, work=args.work or Path("."),
        submission=args.submission, n_splits=5 if args.folds is None else args.folds,
        workers=_check_workers(args.workers), ceilings=not args.no_ceilings, leaderboard=args.leaderboard,
        notes=args.notes,
    )
    print_summary(summary, args.json)
    return 2 if summary.get("errors") else 0


def configure_demo(parser: argparse.ArgumentParser) -> None:
    from kit.cli import folder_arg

    d = DEMO_DEFAULTS
    parser.add_argument("--out", type=folder_arg, default=Path("demo"), help="folder for the synthetic data, caches and runs (default demo/)")
    parser.add_argument("--seed", type=int, default=d["seed"], help=f"synthetic data seed (default {d['seed']})")
    parser.add_argument("--train", type=int, default=d["train"], help=f"train images (default {d['train']})")
    parser.add_argument("--test", type=int, default=d["test"], help=f"test images (default {d['test']})")
    parser.add_argument("--size", type=int, default=d["size"], help=f"image side in px (default {d['size']})")
    parser.add_argument("--epochs", type=int, default=d["epochs"], help=f"epochs per fold and model (default {d['epochs']})")
    parser.add_argument("--backbone", default=d["backbone"], help=f"backbone of both models (default {d['backbone']}; resnet50 works)")
    parser.add_argument("--tile-size", type=int, default=d["tile_size"], help=f"cell tile side in px (default {d['tile_size']})")
    parser.add_argument("--field-size", type=int, default=d["field_size"], help=f"image-model field side in px (default {d['field_size']})")
    parser.add_argument("--threads", type=int, default=d["threads"], help=f"torch threads, fixed for a reproducible table (default {d['threads']})")
    _add_common(parser)
    parser.add_argument("overrides", nargs="*", help="more config overrides KEY=VALUE")
    parser.set_defaults(func=_run_demo)


def synth_dataset(out: Path, seed: int, n_train: int, n_test: int, size: int, workers: int = 1) -> Path:
    """The demo's synthetic dataset under `out` (generated once per parameter set, then reused)."""
    from kit.synth import generate_dataset

    data = out / f"synth-s{seed}-{n_train}-{n_test}-{size}px"
    if (data / "truth" / "cell_labels.csv").is_file() and (data / "test_solution.csv").is_file():
        _log(f"synth: reusing {data}")
        return data
    generate_dataset(data, n_train=n_train, n_test=n_test, size=size, seed=seed, workers=workers)
    return data


def demo(out: Path = Path("demo"), *, seed: int = DEMO_DEFAULTS["seed"], n_train: int = DEMO_DEFAULTS["train"],
         n_test: int = DEMO_DEFAULTS["test"], size: int = DEMO_DEFAULTS["size"], n_splits: int = DEMO_DEFAULTS["folds"],
         epochs: int = DEMO_DEFAULTS["epochs"], backbone: str = DEMO_DEFAULTS["backbone"],
         tile_size: int = DEMO_DEFAULTS["tile_size"], field_size: int = DEMO_DEFAULTS["field_size"],
         workers: int = 2, overrides: Sequence[str] = (), config: Path | None = None,
         submission: Path = Path("submission/submission.csv"), ceilings: bool = True,
         leaderboard: Path | None = None, notes: str = "", threads: int = DEMO_DEFAULTS["threads"]) -> dict:
    """synth + run_pipeline with the demo's defaults; returns the summary.

    `threads`: torch's intra-op threads, fixed so that the table is the same on a rerun and on
    any core count (the float reductions of a convolution depend on how many threads split it)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    timer = Timer()
    with timer.stage("synth"):
        data = synth_dataset(Path(out), seed, n_train, n_test, size, workers)
    # Tried: the image model at batch 8 for 4x the epochs (better image macro-AP, but a lower OOF
    # and test cell mAP for image-only and for the combination): not the default.
    ov = [f"model.backbone={backbone}", f"train.epochs={epochs}", f"data.tile_size={tile_size}",
          f"data.field_size={field_size}", *DEMO_OVERRIDES, *overrides]
    return run_pipeline(data, config=config, overrides=ov, work=out, submission=submission, n_splits=n_splits,
                        fold_seed=seed, workers=workers, ceilings=ceilings, leaderboard=leaderboard,
                        notes=notes or "demo", timer=timer)


def _run_demo(args) -> int:
    summary = demo(
        args.out, seed=args.seed, n_train=args.train, n_test=args.test, size=args.size,
        n_splits=DEMO_DEFAULTS["folds"] if args.folds is None else args.folds, epochs=args.epochs,
        backbone=args.backbone, tile_size=args.tile_size, field_size=args.field_size,
        workers=_check_workers(args.workers), overrides=args.overrides,
        config=args.config, submission=args.submission, ceilings=not args.no_ceilings,
        leaderboard=args.leaderboard, notes=args.notes, threads=args.threads,
    )
    if args.work:
        _log("note: demo keeps caches and runs under --out; --work is ignored")
    print_summary(summary, args.json)
    return 2 if summary.get("errors") else 0
