"""The comparison rows of a run on a test set with per-cell truth, and its two ceilings.

Rows (test mAP, `kit.metric`): ``image_only`` (every cell gets its field's scores), ``cell_only``,
``combined`` (the run's tuned combination: the submission itself), and

- ``seg_ceiling``: true labels on the predicted masks: each predicted cell gets confidence 1 for
  the classes of the true cell it matches (`kit.matching`, IoU >= 0.6) and 0 for the others; what
  perfect classifiers would score with this segmentation;
- ``cls_ceiling``: predicted labels on the true masks: the run's models on the true cells
  (`kit.masks.truth_masks`: ``truth/<ID>_cell_mask.png``, else the cells of the solution file),
  combined as the run combines; what this classification would score with perfect masks.

Both need the true cells only (``test_solution.csv``, and ``truth/`` cell masks when there):
nuclei masks are not needed. In `kit run`, the true cells are cut and classified in the same pass
that predicts the test images (`kit.predict.Predictor.predict_sources`), from the one decode of
each image. ``python -m kit ceiling --run RUN_DIR [--data DIR]`` computes the rows of a finished
run alone and writes them to ``RUN_DIR/ceiling.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from kit.errors import DataError, KitError
from kit.labels import NUM_CLASSES

__all__ = ["TABLE_ROWS", "comparison_table", "fmt_score", "seg_ceiling_predictions", "score_rows",
           "ceiling", "configure_ceiling"]

TABLE_ROWS = (
    ("image_only", "image-only broadcast"),
    ("cell_only", "cell-only"),
    ("combined", "tuned combination"),
    ("seg_ceiling", "segmentation ceiling (true labels, predicted masks)"),
    ("cls_ceiling", "classification ceiling (predicted labels, true masks)"),
)


def fmt_score(x: float | None) -> str:
    """A score for the tables: 4 decimals, `n/a` for none."""
    return "   n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def comparison_table(test: dict, oof: dict | None, combine_name: str,
                     rounds: Sequence[tuple[int, float | None]] = ()) -> str:
    """Markdown table of the comparison rows (test mAP, and the OOF score where it exists);
    `rounds`: the OOF score of each pseudo-label round's cell model (kit.pseudo)."""
    if not oof:
        lines = ["| row | test mAP |", "|---|---:|"]
    else:
        kind = "OOF cell mAP" if oof.get("score_kind") == "cell_mAP" else "OOF image proxy"
        lines = [f"| row | test mAP | {kind} |", "|---|---:|---:|"]
    oof_rows = {"image_only": "image_only", "cell_only": "cell_only", "combined": "overall"}
    for key, label in TABLE_ROWS:
        if key == "combined":
            label = f"{label}: {combine_name}"
        row = f"| {label} | {fmt_score(test.get(key))} |"
        if oof:
            row += f" {fmt_score(oof.get(oof_rows[key])) if key in oof_rows else ''} |"
        lines.append(row)
    for r, score in rounds:
        label = f"{combine_name} with the cell model of pseudo-label round {r}"
        lines.append(f"| {label} | | {fmt_score(score)} |" if oof else f"| {label} | |")
    return "\n".join(lines)


def seg_ceiling_predictions(results: dict, solution: dict) -> dict:
    """True labels on predicted masks (see the module docstring); {ID: ImagePrediction}."""
    from kit.masks import truth_from_solution
    from kit.matching import match_labels
    from kit.rle import decode_to_crop
    from kit.submission import ImagePrediction

    preds = {}
    for image_id, r in results.items():
        if image_id not in solution:
            continue
        true_labels, classes = truth_from_solution(solution[image_id])
        pred_labels = np.zeros((r.height, r.width), np.int32)
        for k, text in zip(r.cell_ids, r.masks):
            y0, x0, crop = decode_to_crop(str(text), r.height, r.width)
            if crop.size:
                region = pred_labels[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]]
                region[crop.astype(bool)] = int(k)
        match = match_labels(pred_labels, true_labels)
        triples = []
        for k, text in zip(r.cell_ids, r.masks):
            labels = set(classes.get(match.get(int(k), 0), []))
            triples.extend((c, 1.0 if c in labels else 0.0, str(text)) for c in range(NUM_CLASSES))
        preds[image_id] = ImagePrediction(r.width, r.height, triples)
    return preds


def score_rows(solution: dict, results: dict, spec, ids: Sequence[str], truth_results: dict | None = None,
               timer=None, ceilings: bool = True, out: dict | None = None, image_source: str = "auto") -> dict:
    """Test mAP of every row: the three prediction rows, the segmentation ceiling (with `ceilings`)
    and the classification ceiling (when `truth_results`, predictions on true masks, are given).
    `image_source`: the image score (``predict.image_source``, `kit.combine.resolve_image_source`).

    `timer` (anything with a ``stage(name)`` context manager, e.g. `kit.pipeline.Timer`) times the
    ``evaluate`` and ``ceilings`` stages. Rows go into `out` as they are scored, so a caller keeps
    those measured before a failure.
    """
    from contextlib import nullcontext

    from kit.combine import CELL_ONLY, IMAGE_ONLY
    from kit.metric import evaluate_predictions
    from kit.predict import build_predictions

    stage = timer.stage if timer is not None else (lambda name: nullcontext())
    ids = [i for i in ids if i in solution]
    scores: dict[str, float | None] = {} if out is None else out
    with stage("evaluate"):
        for key, s in (("image_only", IMAGE_ONLY), ("cell_only", CELL_ONLY), ("combined", spec)):
            scores[key] = evaluate_predictions(solution, build_predictions(results, s, image_source=image_source),
                                               image_ids=ids)["mAP"]
    if not ceilings:
        return scores
    with stage("ceilings"):
        scores["seg_ceiling"] = evaluate_predictions(solution, seg_ceiling_predictions(results, solution),
                                                     image_ids=ids)["mAP"]
        if truth_results is not None:
            scores["cls_ceiling"] = evaluate_predictions(
                solution, build_predictions(truth_results, spec, image_source=image_source), image_ids=ids)["mAP"]
    return scores


def ceiling(run_dir: str | Path, data_dir: str | Path | None = None, workers: int = 1) -> dict:
    """The comparison rows of a finished run on its dataset's test set (needs test_solution.csv)."""
    from kit.combine import read_combine_spec
    from kit.layout import list_image_ids, read_sample_submission
    from kit.manifest import read_manifest
    from kit.masks import truth_masks
    from kit.predict import Predictor
    from kit.submission import read_submission

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise KitError(f"{run_dir / 'config.yaml'} not found: is {run_dir} a run folder?")
    data_dir = Path(data_dir or read_manifest(run_dir).data_dir)
    solution_path = data_dir / "test_solution.csv"
    if not solution_path.is_file():
        raise DataError(f"{solution_path} not found: the ceilings need per-cell truth "
                        "(synthetic data, or your own annotated cells in the submission format)")
    test_dir = data_dir / "test"
    sample = data_dir / "sample_submission.csv"
    test_ids = read_sample_submission(sample)[0] if sample.is_file() else list_image_ids(test_dir)
    predictor = Predictor(run_dir)
    spec = read_combine_spec(run_dir, predictor.cfg)
    t0 = time.perf_counter()
    results, truth_results = predictor.predict_sources(
        test_dir, test_ids, [predictor.run_masks(test_dir), truth_masks(data_dir)], workers=workers)
    t1 = time.perf_counter()
    scores = score_rows(read_submission(solution_path), results, spec, test_ids, truth_results,
                        image_source=predictor.cfg.predict.image_source)
    scores["timings"] = {"predict": round(t1 - t0, 2), "score": round(time.perf_counter() - t1, 2)}
    scores["combine"] = spec.name
    from kit.atomic import atomic_open

    with atomic_open(run_dir / "ceiling.json", "w") as f:
        json.dump(scores, f, indent=2)
    return scores


def configure_ceiling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder")
    parser.add_argument("--data", type=Path, help="dataset with test/ and test_solution.csv (default: the run's data folder)")
    parser.add_argument("--workers", type=int, default=1, help="processes that decode and segment images (default 1)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_run_ceiling)


def _run_ceiling(args) -> int:
    scores = ceiling(args.run, args.data, args.workers)
    if args.json:
        print(json.dumps(scores))
        return 0
    print(comparison_table(scores, None, scores["combine"]))
    seg, cls, comb = scores.get("seg_ceiling"), scores.get("cls_ceiling"), scores.get("combined")
    if None not in (seg, cls, comb):
        gap_labels, gap_masks = seg - comb, cls - comb
        which = "classification" if gap_labels > gap_masks else "segmentation"
        print(f"\nperfect labels on these masks would add {gap_labels:+.4f} mAP, perfect masks with these "
              f"classifiers {gap_masks:+.4f}: improve the {which} first")
    print(f"wrote {Path(args.run) / 'ceiling.json'}")
    return 0
