"""kit.metric: every scoring rule on hand-computed cases, properties, a brute-force cross-check, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kit.cli import main
from kit.errors import ConfigError, DataError
from kit.metric import (
    InstanceSegmentationEvaluator,
    average_precision,
    classification_ap,
    evaluate_files,
    evaluate_predictions,
    precision_recall,
)
from kit.rle import decode_binary_mask, encode_binary_mask, encode_label_image
from kit.submission import ImagePrediction, write_submission

H = W = 10


def rect(y0, y1, x0, x1, h=H, w=W) -> str:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return encode_binary_mask(m)


EMPTY = encode_binary_mask(np.zeros((H, W), bool))


def img(*triples, h=H, w=W) -> ImagePrediction:
    return ImagePrediction(w, h, list(triples))


def score(solution, submission, **kw) -> dict:
    return evaluate_predictions(solution, submission, **kw)


# ------------------------------------------------------------------------------------------
# AP helpers
# ------------------------------------------------------------------------------------------

def test_average_precision_hand_values():
    # ranks TP, FP, TP over 2 GT: P = 1, 1/2, 2/3 at R = 1/2, 1/2, 1 -> 1/2 * 1 + 1/2 * 2/3
    assert average_precision([1, 0.5, 2 / 3], [0.5, 0.5, 1.0]) == pytest.approx(5 / 6)
    # the envelope: a later, higher precision lifts the earlier recall step
    assert average_precision([0.0, 0.5], [0.0, 0.5]) == pytest.approx(0.25)
    assert average_precision([], []) == 0.0
    p, r = precision_recall([0.2, 0.9, 0.5], [True, True, False], 4)
    assert np.allclose(p, [1, 0.5, 2 / 3]) and np.allclose(r, [0.25, 0.25, 0.5])
    with pytest.raises(ValueError):
        precision_recall([0.5], [True], 0)


def test_classification_ap_hand_values():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    s = np.array([[0.9, 0.1, 0.05], [0.8, 0.2, 0.05], [0.7, 0.3, 0.05], [0.1, 0.4, 0.05]])
    out = classification_ap(y, s)
    assert out["per_class"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert out["per_class"][1] == pytest.approx(1 / 3)
    assert out["per_class"][2] is None  # no positives: left out of the macro mean
    assert out["macro"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)
    assert out["micro"] == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    with pytest.raises(ValueError):
        classification_ap(y, s[:, :2])


# ------------------------------------------------------------------------------------------
# matching rules, hand-computed
# ------------------------------------------------------------------------------------------

def test_iou_exactly_0_6_is_a_match_and_below_is_not():
    gt = {"a": img((0, 1.0, rect(0, 2, 0, 5)))}  # 10 px
    exact = score(gt, {"a": img((0, 0.9, rect(0, 2, 0, 3)))})  # 6 px inside: 6 / 10
    assert exact["per_class_ap"]["0"] == 1.0 and exact["n_tp"]["0"] == 1
    below = score(gt, {"a": img((0, 0.9, rect(0, 1, 0, 5)))})  # 5 / 10
    assert below["per_class_ap"]["0"] == 0.0 and below["n_tp"]["0"] == 0
    # 0.6 also holds on bigger counts: 60 of a 100-px cell
    gt100 = {"a": img((0, 1.0, rect(0, 10, 0, 10)))}
    assert score(gt100, {"a": img((0, 0.9, rect(0, 6, 0, 10)))})["mAP"] == 1.0
    assert score(gt100, {"a": img((0, 0.9, rect(0, 6, 0, 10)))}, iou=0.61)["mAP"] == 0.0


def test_duplicates_are_false_positives():
    gt = {"a": img((0, 1.0, rect(0, 2, 0, 5)), (0, 1.0, rect(5, 7, 0, 5)))}
    sub = {"a": img((0, 0.9, rect(0, 2, 0, 5)), (0, 0.8, rect(0, 2, 0, 5)), (0, 0.7, rect(5, 7, 0, 5)))}
    r = score(gt, sub)
    assert r["per_class_ap"]["0"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert (r["n_gt"]["0"], r["n_det"]["0"], r["n_tp"]["0"]) == (2, 3, 2)


def test_no_fall_back_to_the_next_best_cell():
    # two overlapping true cells; the second detection's best cell is already taken: FP, even
    # though it overlaps the free cell at IoU 10/12 >= 0.6
    gt = {"a": img((0, 1.0, rect(0, 2, 0, 5)), (0, 1.0, rect(0, 2, 0, 6)))}
    sub = {"a": img((0, 0.9, rect(0, 2, 0, 5)), (0, 0.8, rect(0, 2, 0, 5)))}
    r = score(gt, sub)
    assert r["n_tp"]["0"] == 1
    assert r["per_class_ap"]["0"] == pytest.approx(0.5)  # a fall-back would give 1.0


def test_iou_tie_goes_to_the_first_listed_cell():
    g1, g2 = rect(0, 2, 0, 5), rect(0, 2, 1, 6)  # 10 px each
    wide = rect(0, 2, 0, 6)  # 12 px: IoU 10/12 with both
    sub = {"a": img((0, 0.9, wide), (0, 0.8, g2))}
    first_g1 = score({"a": img((0, 1.0, g1), (0, 1.0, g2))}, sub)
    assert first_g1["per_class_ap"]["0"] == 1.0  # wide takes g1, the exact g2 detection takes g2
    first_g2 = score({"a": img((0, 1.0, g2), (0, 1.0, g1))}, sub)
    assert first_g2["per_class_ap"]["0"] == pytest.approx(0.5)  # wide takes g2; the exact one is FP


def test_detections_of_classes_not_on_the_image_are_ignored():
    cell = rect(0, 3, 0, 3)
    gt = {"a": img((0, 1.0, cell)), "b": img((3, 1.0, cell))}
    sub = {"a": img((3, 0.9, cell), (0, 0.5, cell)), "b": img((3, 0.4, cell))}
    r = score(gt, sub)
    assert r["per_class_ap"]["3"] == 1.0  # counting a's class-3 detection would give 0.5
    assert (r["n_det"]["3"], r["n_ignored"]) == (1, 1)
    assert r["mAP"] == 1.0


def test_empty_predicted_masks_are_dropped_and_empty_truth_not_counted():
    cell = rect(0, 3, 0, 3)
    gt = {"a": img((0, 1.0, cell), (0, 1.0, EMPTY), (5, 1.0, EMPTY))}
    sub = {"a": img((0, 0.99, EMPTY), (0, 0.5, cell), (5, 0.7, cell))}
    r = score(gt, sub)
    assert r["n_gt"]["0"] == 1 and r["n_gt"]["5"] == 0 and r["n_gt_empty"] == 2
    assert r["per_class_ap"]["0"] == 1.0  # the empty 0.99 detection is not a false positive
    assert r["n_dropped_empty"] == 1
    assert r["per_class_ap"]["5"] is None  # no ground truth left: not scored
    assert r["n_det"]["5"] == 1  # but class 5 is verified on the image: its detection is scored
    assert r["mAP"] == 1.0


def test_missing_images_unknown_images_and_size_contradiction():
    cell = rect(0, 3, 0, 3)
    gt = {"a": img((0, 1.0, cell)), "b": img((0, 1.0, cell))}
    r = score(gt, {"a": img((0, 0.9, cell)), "zz": img((0, 0.9, cell))})
    assert r["per_class_ap"]["0"] == pytest.approx(0.5)  # b has no row: its cell is missed
    assert r["n_unscored_submission_images"] == 1
    with pytest.raises(DataError, match=r"ID a: submission says 10 x 12 \(width x height\), the solution 10 x 10"):
        score(gt, {"a": img((0, 0.9, rect(0, 3, 0, 3, h=12)), h=12)})


def test_classes_without_truth_are_left_out_and_missed_classes_score_zero():
    cell = rect(0, 3, 0, 3)
    gt = {"a": img((0, 1.0, cell), (1, 1.0, cell))}
    r = score(gt, {"a": img((0, 0.9, cell), (7, 0.9, cell))})
    assert r["per_class_ap"]["0"] == 1.0
    assert r["per_class_ap"]["1"] == 0.0
    assert r["per_class_ap"]["7"] is None and r["n_det"]["7"] == 0  # ignored: not on the image
    assert all(r["per_class_ap"][str(c)] is None for c in range(2, 19))
    assert r["mAP"] == pytest.approx(0.5)
    assert score({"a": img()}, {"a": img((0, 0.9, cell))})["mAP"] is None


def test_confidence_ties_are_ordered_by_image_id_then_row_position():
    good, bad = rect(0, 3, 0, 3), rect(6, 9, 6, 9)
    gt = {"b": img((0, 1.0, good)), "a": img((0, 1.0, good))}
    sub = {"a": img((0, 0.5, bad)), "b": img((0, 0.5, good))}
    # a's false positive ranks before b's true positive: P = 0, 1/2 at R = 0, 1/2
    assert score(gt, sub)["per_class_ap"]["0"] == pytest.approx(0.25)
    ev = InstanceSegmentationEvaluator()
    for image_id in ("b", "a"):  # processing order does not matter
        ev.process(image_id, gt[image_id], sub[image_id])
    assert ev.evaluate()["per_class_ap"]["0"] == pytest.approx(0.25)
    one = {"a": img((0, 1.0, good))}
    assert score(one, {"a": img((0, 0.5, bad), (0, 0.5, good))})["per_class_ap"]["0"] == pytest.approx(0.5)
    assert score(one, {"a": img((0, 0.5, good), (0, 0.5, bad))})["per_class_ap"]["0"] == 1.0


def test_confidences_rank_as_the_stored_float32():
    good, bad = rect(0, 3, 0, 3), rect(6, 9, 6, 9)
    gt = {"a": img((0, 1.0, good))}
    # equal as float32 (what the file holds), so row order decides: bad first
    sub = {"a": img((0, 0.3 + 1e-12, bad), (0, 0.3, good))}
    assert score(gt, sub)["per_class_ap"]["0"] == pytest.approx(0.5)


def test_box_iou_uses_the_bounding_boxes():
    gt = {"a": img((0, 1.0, rect(0, 4, 0, 4)))}
    ell = np.zeros((H, W), bool)
    ell[0, 0:4] = ell[0:4, 0] = True  # 7 px, box 4 x 4: mask IoU 7/16, box IoU 1
    sub = {"a": img((0, 0.9, encode_binary_mask(ell)))}
    assert score(gt, sub)["mAP"] == 0.0
    assert score(gt, sub, iou_type="box")["mAP"] == 1.0
    with pytest.raises(ConfigError):
        InstanceSegmentationEvaluator(iou_type="polygon")


def test_bad_confidences_and_masks_raise_naming_image_and_triple():
    cell = rect(0, 3, 0, 3)
    gt = {"a": img((0, 1.0, cell))}
    with pytest.raises(DataError, match="ID a: submission triple 1: confidence -10.0 is <= -10"):
        score(gt, {"a": img((0, 0.5, cell), (0, -10.0, cell))})
    with pytest.raises(DataError, match="ID a: submission triple 0: confidence nan is not finite"):
        score(gt, {"a": img((0, float("nan"), cell))})
    with pytest.raises(DataError, match="ID a: submission triple 0: .*sum to 16 pixels"):
        score(gt, {"a": img((0, 0.5, rect(0, 1, 0, 1, h=4, w=4)))})
    with pytest.raises(DataError, match="ID a: submission triple 0: class id 19 is not an integer in 0..18"):
        score(gt, {"a": img((19, 0.5, cell))})
    with pytest.raises(DataError, match="ID a: solution triple 0: class id -1"):
        score({"a": img((-1, 1.0, cell))}, {})
    with pytest.raises(DataError, match="ID a: solution triple 0: .*not valid base64"):
        score({"a": img((0, 1.0, "@@@"))}, {})


def test_a_failed_image_leaves_the_evaluator_unchanged():
    cell = rect(0, 3, 0, 3)
    ev = InstanceSegmentationEvaluator()
    with pytest.raises(DataError, match="not a number"):
        ev.process("a", img((0, 1.0, cell)), img((0, "high", cell)))
    assert ev.num_images == 0 and ev.evaluate()["n_gt"]["0"] == 0
    ev.process("a", img((0, 1.0, cell)), img((0, 0.5, cell)))  # the same ID again, now valid
    assert ev.evaluate()["mAP"] == 1.0


def test_evaluator_api_reset_twice_and_image_subset():
    cell = rect(0, 3, 0, 3)
    gt = {"a": img((0, 1.0, cell)), "b": img((0, 1.0, cell))}
    sub = {"a": img((0, 0.9, cell)), "b": img((0, 0.9, rect(6, 9, 6, 9)))}
    ev = InstanceSegmentationEvaluator(0.6, "mask")
    ev.process("a", gt["a"], sub["a"])
    with pytest.raises(DataError, match="processed twice"):
        ev.process("a", gt["a"], sub["a"])
    assert ev.evaluate()["mAP"] == 1.0 and ev.num_images == 1
    ev.reset()
    assert ev.num_images == 0 and ev.evaluate()["mAP"] is None
    assert score(gt, sub, image_ids=["b"])["mAP"] == 0.0
    assert score(gt, sub, image_ids=["a"])["mAP"] == 1.0
    with pytest.raises(DataError, match="not in the solution, e.g. c"):
        score(gt, sub, image_ids=["a", "c"])


# ------------------------------------------------------------------------------------------
# properties and a brute-force cross-check on random data
# ------------------------------------------------------------------------------------------

def random_set(seed: int, n_images: int = 8, size: int = 24):
    """Random solution and a noisy submission with overlapping detections and tied scores."""
    rng = np.random.default_rng(seed)
    solution, submission = {}, {}
    for i in range(n_images):
        labels = np.zeros((size, size + 3), np.int32)
        for k in range(1, int(rng.integers(1, 7))):
            y, x = rng.integers(0, size, 2)
            labels[y:y + rng.integers(3, 11), x:x + rng.integers(3, 11)] = k
        classes = rng.choice(19, size=2, replace=False)
        cells = encode_label_image(labels)
        cell_class = {k: int(rng.choice(classes)) for k in cells}
        gt = [(cell_class[k], 1.0, m) for k, m in cells.items()]
        if rng.random() < 0.3:
            gt.append((int(classes[0]), 1.0, encode_binary_mask(np.zeros(labels.shape, bool))))
        det = []
        for k, m in cells.items():
            mask = decode_binary_mask(m, *labels.shape)
            for _ in range(int(rng.integers(1, 5))):
                noisy = np.roll(mask, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 2)))
                noisy ^= rng.random(mask.shape) < 0.002
                if rng.random() < 0.05:
                    noisy[:] = False  # an empty prediction: dropped
                c = cell_class[k] if rng.random() < 0.6 else int(rng.choice([*classes, rng.integers(0, 19)]))
                det.append((c, round(float(rng.random()), 1), encode_binary_mask(noisy)))
        rng.shuffle(det)
        image_id = f"im{rng.integers(0, 10**6):06d}"
        solution[image_id] = ImagePrediction(labels.shape[1], labels.shape[0], gt)
        if rng.random() < 0.85:
            submission[image_id] = ImagePrediction(labels.shape[1], labels.shape[0], det)
    return solution, submission


def brute_force_map(solution, submission, thr=0.6):
    """Full-frame masks, straight loops: the rules as the module docstring states them."""
    scores = {c: [] for c in range(19)}
    n_gt = np.zeros(19, int)
    for image_id in sorted(solution):
        gt = solution[image_id]
        full = lambda t: decode_binary_mask(t, gt.height, gt.width)  # noqa: E731
        verified = {c for c, _, _ in gt.triples}
        gts = {c: [full(m) for cc, _, m in gt.triples if cc == c and full(m).any()] for c in verified}
        for c in verified:
            n_gt[c] += len(gts[c])
        dets = submission.get(image_id)
        for c in verified:
            mine = [(np.float32(s), full(m)) for cc, s, m in (dets.triples if dets else []) if cc == c and full(m).any()]
            mine.sort(key=lambda d: -d[0])  # Python's sort is stable
            used = [False] * len(gts[c])
            for s, m in mine:
                ious = [np.float32((m & g).sum()) / np.float32((m | g).sum()) for g in gts[c]]
                tp = False
                if ious:
                    j = int(np.argmax(ious))
                    if ious[j] >= np.float32(thr) and not used[j]:
                        used[j] = tp = True
                scores[c].append((s, tp))
    aps = []
    for c in range(19):
        if n_gt[c] == 0:
            continue
        ranked = sorted(scores[c], key=lambda d: -d[0])
        tp = fp = 0
        points = []
        for _, t in ranked:
            tp, fp = tp + t, fp + (not t)
            points.append((tp / n_gt[c], tp / (tp + fp)))
        ap, prev_r = 0.0, 0.0
        for k, (r, _) in enumerate(points):
            if r > prev_r:
                ap += (r - prev_r) * max(p for _, p in points[k:])
                prev_r = r
        aps.append(ap)
    return float(np.mean(aps))


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_brute_force_full_frame_implementation(seed):
    solution, submission = random_set(seed)
    assert score(solution, submission)["mAP"] == pytest.approx(brute_force_map(solution, submission), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_solution_against_itself_scores_one_and_row_order_does_not_matter(tmp_path, seed):
    solution, submission = random_set(seed)
    sol_path = write_submission(tmp_path / "solution.csv", solution)
    assert evaluate_files(sol_path, sol_path)["mAP"] == 1.0
    sub_path = write_submission(tmp_path / "sub.csv", submission)
    reference = evaluate_files(sol_path, sub_path)
    assert reference == score(solution, submission)  # in memory == through the files
    rng = np.random.default_rng(seed)
    for _ in range(3):
        sol_ids, sub_ids = list(solution), list(submission)
        rng.shuffle(sol_ids)
        rng.shuffle(sub_ids)
        write_submission(tmp_path / "solution2.csv", {k: solution[k] for k in sol_ids})
        write_submission(tmp_path / "sub2.csv", {k: submission[k] for k in sub_ids})
        assert evaluate_files(tmp_path / "solution2.csv", tmp_path / "sub2.csv") == reference


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def test_evaluate_cli_table_json_and_exit_codes(tmp_path, capsys):
    cell = rect(0, 3, 0, 3)
    sol = write_submission(tmp_path / "sol.csv", {"a": img((0, 1.0, cell)), "b": img((4, 1.0, cell))})
    sub = write_submission(tmp_path / "sub.csv", {"a": img((0, 0.9, cell))})
    assert main(["evaluate", "--solution", str(sol), "--submission", str(sub), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["mAP"] == pytest.approx(0.5)
    assert set(result["per_class_ap"]) == {str(c) for c in range(19)}
    assert result["per_class_ap"]["0"] == 1.0 and result["per_class_ap"]["4"] == 0.0
    assert result["per_class_ap"]["1"] is None
    assert any("Nucleoplasm" in line for line in out)
    assert any(line.startswith("mAP@IoU0.6 (mask) = 0.5000") for line in out)

    ids = tmp_path / "ids.txt"
    ids.write_text("a\n")
    assert main(["evaluate", "--solution", str(sol), "--submission", str(sub), "--ids", str(ids), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mAP"] == 1.0

    folds = tmp_path / "folds.csv"
    folds.write_text("ID,fold\na,0\nb,1\n")
    assert main(["evaluate", "--solution", str(sol), "--submission", str(sub), "--ids", str(folds), "--fold", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mAP"] == 0.0
    assert main(["evaluate", "--solution", str(sol), "--submission", str(sub), "--fold", "1"]) == 2
    assert "--fold needs --ids" in capsys.readouterr().err

    wrong = write_submission(tmp_path / "wrong.csv", {"a": img(h=12)})
    assert main(["evaluate", "--solution", str(sol), "--submission", str(wrong)]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["evaluate", "--solution", str(tmp_path / "none.csv"), "--submission", str(sub)]) == 2
    assert "not found" in capsys.readouterr().err
