"""kit.combine: strategies on hand-made probabilities, the AP it tunes with, the sweep."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kit.combine import (
    STRATEGIES,
    UNSTAINED,
    CombineSpec,
    broadcast_image_probs,
    candidate_specs,
    cell_ap_per_class,
    combine,
    rank01,
    stain_fraction,
    visible_fraction,
)
from kit.errors import ConfigError, DataError
from kit.labels import NEGATIVE, NUM_CLASSES
from kit.masks import truth_from_solution
from kit.matching import match_labels


def _probs(rows: list[dict[int, float]], fill: float = 0.1) -> np.ndarray:
    out = np.full((len(rows), NUM_CLASSES), fill)
    for r, values in enumerate(rows):
        for c, v in values.items():
            out[r, c] = v
    return out


CELL = _probs([{0: 0.2, 5: 0.9, NEGATIVE: 0.3}, {0: 0.8, 5: 0.1, NEGATIVE: 0.05}])
IMAGE = _probs([{0: 0.8, 5: 0.4, NEGATIVE: 0.6}, {0: 0.8, 5: 0.4, NEGATIVE: 0.6}])


def test_cell_only_and_image_only_return_their_input():
    np.testing.assert_array_equal(combine(CELL, IMAGE, CombineSpec("cell_only")), CELL)
    np.testing.assert_array_equal(combine(CELL, IMAGE, CombineSpec("image_only")), IMAGE)


def test_product_and_weighted_means_exact_values():
    prod = combine(CELL, IMAGE, CombineSpec("product"))
    assert prod[0, 0] == pytest.approx(0.16)
    assert prod[0, 5] == pytest.approx(0.36)
    geo = combine(CELL, IMAGE, CombineSpec("geometric", weight=0.5))
    assert geo[0, 0] == pytest.approx(0.4)  # sqrt(0.2 * 0.8)
    assert geo[0, 5] == pytest.approx(0.6)  # sqrt(0.9 * 0.4)
    geo3 = combine(CELL, IMAGE, CombineSpec("geometric", weight=0.25))
    assert geo3[1, 5] == pytest.approx(0.1**0.25 * 0.4**0.75)
    # the extremes of the geometric mean are the single sources
    np.testing.assert_allclose(combine(CELL, IMAGE, CombineSpec("geometric", weight=1.0)), CELL)
    np.testing.assert_allclose(combine(CELL, IMAGE, CombineSpec("geometric", weight=0.0)), IMAGE)
    mean = combine(CELL, IMAGE, CombineSpec("mean", weight=0.75))
    assert mean[0, 5] == pytest.approx(0.75 * 0.9 + 0.25 * 0.4)


def test_rank_blend_exact_values():
    cell = _probs([{0: 0.1}, {0: 0.5}, {0: 0.9}, {0: 0.3}])
    image = _probs([{0: 0.7}, {0: 0.7}, {0: 0.2}, {0: 0.2}])
    out = combine(cell, image, CombineSpec("rank", weight=0.5))
    # cell ranks 1,3,4,2 -> /4; image ranks (ties averaged) 3.5,3.5,1.5,1.5 -> /4
    np.testing.assert_allclose(out[:, 0], 0.5 * np.array([1, 3, 4, 2]) / 4 + 0.5 * np.array([3.5, 3.5, 1.5, 1.5]) / 4)
    np.testing.assert_allclose(rank01(np.array([[3.0], [1.0], [2.0]]))[:, 0], [1.0, 1 / 3, 2 / 3])


def test_negative_modes():
    out = combine(CELL, IMAGE, CombineSpec("product", negative="max"))
    assert out[0, NEGATIVE] == pytest.approx(0.6)
    assert out[1, NEGATIVE] == pytest.approx(0.6)
    out = combine(CELL, IMAGE, CombineSpec("product", negative="complement"))
    # 1 - the largest combined location score: row 0 max is 0.36 (class 5), row 1 0.64 (class 0)
    assert out[0, NEGATIVE] == pytest.approx(1 - 0.36)
    assert out[1, NEGATIVE] == pytest.approx(1 - 0.64)
    out = combine(CELL, IMAGE, CombineSpec("product", negative="model"))
    assert out[0, NEGATIVE] == pytest.approx(0.18)


def test_border_power_scales_every_class_by_visible_fraction():
    visible = np.array([0.25, 1.0])
    base = combine(CELL, IMAGE, CombineSpec("product"))
    out = combine(CELL, IMAGE, CombineSpec("product", border_power=0.5), visible)
    np.testing.assert_allclose(out[0], base[0] * 0.5)
    np.testing.assert_allclose(out[1], base[1])


def test_visible_fraction_from_cell_table():
    table = pd.DataFrame(
        {
            "area": [100, 100, 100, 40, 300],
            "touches_border": [False, False, False, True, True],
            "nucleus_visible_fraction": [1.0, 1.0, 1.0, 0.9, 0.5],
        }
    )
    np.testing.assert_allclose(visible_fraction(table), [1, 1, 1, 0.4, 0.5])
    no_nucleus = table.drop(columns="nucleus_visible_fraction")
    np.testing.assert_allclose(visible_fraction(no_nucleus), [1, 1, 1, 0.4, 1.0])


def test_broadcast_image_probs_and_missing_image():
    image = np.stack([np.full(NUM_CLASSES, 0.1), np.full(NUM_CLASSES, 0.7)])
    out = broadcast_image_probs(["b", "a", "b"], ["a", "b"], image)
    np.testing.assert_array_equal(out[:, 0], [0.7, 0.1, 0.7])
    with pytest.raises(DataError, match="image c"):
        broadcast_image_probs(["c"], ["a", "b"], image)


def test_spec_validation_and_round_trip():
    spec = CombineSpec("geometric", 0.3, "max", 0.5)
    assert CombineSpec.from_dict(spec.to_dict() | {"score": 0.5}) == spec
    assert "geometric(w=0.3)" in spec.name and "neg=max" in spec.name
    with pytest.raises(ConfigError, match="strategy"):
        CombineSpec("sum")
    with pytest.raises(ConfigError, match="weight"):
        CombineSpec("mean", weight=1.5)
    with pytest.raises(ConfigError, match="negative"):
        CombineSpec("mean", negative="min")


def test_cell_ap_exact_values_and_unverified_classes_ignored():
    # class 0: ranked TP, FP, TP with 3 true cells (one never predicted): precision 1, 1/2, 2/3,
    # envelope 1, 2/3, 2/3; recall steps 1/3 at ranks 1 and 3 -> AP = 1/3 + 2/9.
    # Row 3 (score 0.95, FP) is on an image where class 0 is not verified: ignored by the metric.
    scores = np.zeros((4, NUM_CLASSES))
    scores[:, 0] = [0.9, 0.8, 0.7, 0.95]
    truth = np.zeros((4, NUM_CLASSES), bool)
    truth[[0, 2], 0] = True
    verified = np.zeros((4, NUM_CLASSES), bool)
    verified[:3, 0] = True
    n_pos = np.zeros(NUM_CLASSES, int)
    n_pos[0] = 3
    ap = cell_ap_per_class(scores, truth, verified, n_pos)
    assert ap[0] == pytest.approx(1 / 3 + 2 / 9)
    assert np.isnan(ap[1:]).all()  # no truth for the other classes
    verified[3, 0] = True  # now the 0.95 false positive counts and ranks first
    ap = cell_ap_per_class(scores, truth, verified, n_pos)
    # precision 0, 1/2, 1/3, 1/2 -> envelope 1/2 at both recall steps: AP = 1/3 * 1/2 * 2
    assert ap[0] == pytest.approx(1 / 3)


def test_fast_cell_map_equals_kit_metric():
    """The tuner's shortcut (match once, then sort per class) scores exactly as kit.metric."""
    from kit.metric import evaluate_predictions
    from kit.rle import encode_label_image
    from kit.submission import ImagePrediction

    rng = np.random.default_rng(3)
    solution, submission = {}, {}
    all_scores, all_truth, all_verified = [], [], []
    n_pos = np.zeros(NUM_CLASSES, int)
    for image_id in ["img_a", "img_b", "img_c"]:
        true = np.zeros((40, 40), np.int32)
        pred = np.zeros_like(true)
        k = 0
        classes = {}
        for y in range(0, 40, 10):
            for x in range(0, 40, 20):
                k += 1
                true[y:y + 10, x:x + 20] = k
                classes[k] = sorted(set(rng.choice([0, 2, 5, NEGATIVE], size=rng.integers(1, 3)).tolist()))
                # predicted cells: some exact, some shifted (IoU < 0.6), one missing
                if k % 4 == 1:
                    pred[y:y + 10, x:x + 20] = k
                elif k % 4 == 2:
                    pred[y:y + 10, x + 8:x + 20] = k  # IoU 0.6
                elif k % 4 == 3:
                    pred[y:y + 10, x + 12:x + 20] = k  # IoU 0.4
        true_rle = encode_label_image(true)
        solution[image_id] = ImagePrediction(40, 40, [(c, 1.0, true_rle[j]) for j in classes for c in classes[j]])
        pred_rle = encode_label_image(pred)
        ids = sorted(pred_rle)
        scores = np.round(rng.random((len(ids), NUM_CLASSES)), 2)  # rounding makes ties
        submission[image_id] = ImagePrediction(
            40, 40, [(c, float(scores[r, c]), pred_rle[j]) for r, j in enumerate(ids) for c in range(NUM_CLASSES)])
        labels, cls = truth_from_solution(solution[image_id])
        match = match_labels(pred, labels)
        t = np.zeros((len(ids), NUM_CLASSES), bool)
        for r, j in enumerate(ids):
            if j in match:
                t[r, cls[match[j]]] = True
        verified = np.zeros(NUM_CLASSES, bool)
        for c_list in cls.values():
            verified[c_list] = True
            for c in set(c_list):
                n_pos[c] += 1
        all_scores.append(scores)
        all_truth.append(t)
        all_verified.append(np.repeat(verified[None], len(ids), 0))
    expected = evaluate_predictions(solution, submission)
    ap = cell_ap_per_class(np.concatenate(all_scores), np.concatenate(all_truth), np.concatenate(all_verified), n_pos)
    for c in range(NUM_CLASSES):
        ref = expected["per_class_ap"][str(c)]
        if ref is None:
            assert np.isnan(ap[c])
        else:
            assert ap[c] == pytest.approx(ref, abs=1e-12)
    assert np.nanmean(ap) == pytest.approx(expected["mAP"], abs=1e-12)


def test_candidate_specs_cover_the_sweep():
    specs = candidate_specs(weights=[0.2, 0.8], border_powers=[0.0, 1.0])
    names = {s.strategy for s in specs}
    assert names == {"cell_only", "image_only", "product", "geometric", "mean", "field"}  # rank only on request
    # unweighted: 3 * 5 negatives * 2 powers; weighted: 3 * 2 weights * 5 * 2; each without the
    # unstained rule and at two thresholds
    assert len(specs) == 3 * (3 * 5 * 2 + 3 * 2 * 5 * 2)
    assert {s.unstained for s in specs} == {0.0, UNSTAINED, 0.5}
    with_rank = candidate_specs(strategies=STRATEGIES, weights=[0.2, 0.8], border_powers=[0.0, 1.0])
    assert len(with_rank) == len(specs) + 3 * 2 * 5 * 2
    assert len(set(specs)) == len(specs)
    assert len(candidate_specs(weights=[0.2], border_powers=[0.0], unstained=[0.0])) == 3 * 5 + 3 * 5


def test_stain_fraction_is_relative_to_each_fields_stained_cells():
    table = pd.DataFrame({"ID": ["a"] * 5 + ["b"] * 3,
                          "mean_green": [0.5, 0.5, 0.5, 0.5, 0.01, 0.02, 0.02, 0.02]})
    s = stain_fraction(table)
    assert s[:4] == pytest.approx([1.0] * 4)
    assert s[4] == pytest.approx(0.02)  # a dim cell in a stained field
    assert s[5:] == pytest.approx([1.0] * 3)  # a uniformly faint field is its own reference
    one_field = stain_fraction(table.iloc[:5].drop(columns="ID"))
    assert one_field == pytest.approx(s[:5])
    # a table made without the image has no green: the rule is inert
    assert stain_fraction(table.drop(columns="mean_green")) == pytest.approx(np.ones(8))
    assert stain_fraction(pd.DataFrame({"ID": ["a"], "mean_green": [0.0]})) == pytest.approx([1.0])


def test_unstained_cells_become_negative_and_lose_their_locations():
    cell = _probs([{0: 0.8, NEGATIVE: 0.1}, {0: 0.8, NEGATIVE: 0.1}, {0: 0.8, NEGATIVE: 0.1}])
    image = _probs([{0: 0.9}] * 3)
    stain = np.array([1.0, 0.15, 0.0])  # stained, half below the threshold, no green at all
    plain = combine(cell, image, CombineSpec("product"))
    out = combine(cell, image, CombineSpec("product", unstained=0.3), stain=stain)
    assert out[0] == pytest.approx(plain[0])  # at or above the threshold: untouched
    assert out[1, NEGATIVE] == pytest.approx(0.5) and out[1, 0] == pytest.approx(plain[1, 0] * 0.5)
    assert out[2, NEGATIVE] == pytest.approx(1.0) and out[2, :NEGATIVE] == pytest.approx(np.zeros(NEGATIVE))
    # the model's Negative is kept where it is higher than the rule's
    cell[1, NEGATIVE] = 0.9
    assert combine(cell, image, CombineSpec("cell_only", unstained=0.3), stain=stain)[1, NEGATIVE] == 0.9
    with pytest.raises(ValueError, match="stain"):
        combine(cell, image, CombineSpec("product", unstained=0.3))
    with pytest.raises(ConfigError, match="unstained"):
        CombineSpec("product", unstained=1.5)
    spec = CombineSpec("field", 0.7, "complement", 0.5, 0.3)
    assert CombineSpec.from_dict(spec.to_dict()) == spec and "unstained<0.3" in spec.name


def _fake_run(root):
    """A run folder with hand-made OOF predictions, its mask cache and per-cell truth.

    Two images of four cells (quadrants); class 0 is in 3 cells of image A and 1 cell of image B.
    The image model knows A has more class-0 cells (0.9 vs 0.3); the cell model ranks the cells
    right within each image but is miscalibrated across images (B's cells all above A's). Only a
    combination ranks every positive cell first.
    """
    from kit.cells import cell_table
    from kit.config import load_config, save_config
    from kit.rle import encode_label_image
    from kit.segment.cache import MaskCache

    data = root / "data"
    data.mkdir()
    cells = np.zeros((32, 32), np.int32)
    cells[:16, :16], cells[:16, 16:], cells[16:, :16], cells[16:, 16:] = 1, 2, 3, 4
    nuclei = np.zeros_like(cells)
    for k, (y, x) in enumerate([(8, 8), (8, 24), (24, 8), (24, 24)], start=1):
        nuclei[y - 3:y + 3, x - 3:x + 3] = k
    rle = encode_label_image(cells)
    positives = {"imgA": [1, 2, 3], "imgB": [4]}
    image_prob = {"imgA": 0.9, "imgB": 0.3}
    cell_prob = {"imgA": (0.3, 0.2), "imgB": (0.8, 0.7)}  # (positive cell, negative cell)
    cfg = load_config(None, [f"data.data_dir={data}", f"data.mask_cache={root / 'masks'}",
                             f"data.tile_cache={root / 'tiles'}"])
    cache = MaskCache(cfg.data.mask_cache, cfg.data.segment_backend)
    sol, train, cell_rows, image_rows = [], [], [], []
    for fold, (image_id, pos) in enumerate(positives.items()):
        cache.save(image_id, nuclei, cells, cell_table(nuclei, cells))
        triples = " ".join(f"{0 if k in pos else 18} 1 {rle[k]}" for k in range(1, 5))
        sol.append(f"{image_id},32,32,{triples}")
        train.append(f"{image_id},0")
        for k in range(1, 5):
            p = np.full(NUM_CLASSES, 0.05)
            p[0] = cell_prob[image_id][0 if k in pos else 1]
            cell_rows.append((fold, f"{image_id},{k}," + ",".join(f"{v:g}" for v in p)))
        p = np.full(NUM_CLASSES, 0.05)
        p[0] = image_prob[image_id]
        image_rows.append((fold, f"{image_id}," + ",".join(f"{v:g}" for v in p)))
    (data / "train_solution.csv").write_text("ID,ImageWidth,ImageHeight,PredictionString\n" + "\n".join(sol) + "\n")
    (data / "train.csv").write_text("ID,Label\n" + "\n".join(train) + "\n")
    run = root / "run"
    cols = ",".join(f"p{c}" for c in range(NUM_CLASSES))
    for kind, rows, head in (("cell", cell_rows, "ID,cell_id," + cols), ("image", image_rows, "ID," + cols)):
        for fold in (0, 1):
            path = run / kind / f"fold{fold}" / "oof.csv"
            path.parent.mkdir(parents=True)
            path.write_text(head + "\n" + "\n".join(r for f, r in rows if f == fold) + "\n")
    cfg.run_dir = str(run)
    save_config(cfg, run / "config.yaml")
    return run


def test_tune_run_chooses_a_combination_that_beats_both_sources(tmp_path):
    from kit.combine import read_combine_spec, tune_run
    from kit.config import load_config

    run = _fake_run(tmp_path)
    specs = candidate_specs(strategies=["cell_only", "image_only", "product"], negatives=["model"],
                            border_powers=[0.0])
    result = tune_run(run, specs, progress=False)
    assert result["score_kind"] == "cell_mAP"
    # class 0 only (Negative 18 is scored too: 4 negative cells, probabilities 0.05 everywhere)
    assert result["strategy"] == "product"
    assert result["oof"]["per_class"][0] == pytest.approx(1.0)
    assert result["score"] > result["baselines"]["cell_only"]
    assert result["score"] > result["baselines"]["image_only"]
    from kit.combine import CELL_ONLY, IMAGE_ONLY, load_oof

    oof = load_oof(run, progress=False)
    # cell-only: B+ (TP), B- x3, A+ x3, A-: precision envelope 1 at recall 1/4, 4/7 up to recall 1
    assert oof.per_class(CELL_ONLY)[0] == pytest.approx(0.25 + 0.75 * 4 / 7)
    # image-only: A's cells tie (row order: +, +, +, -), then B's (-, -, -, +)
    assert oof.per_class(IMAGE_ONLY)[0] == pytest.approx(0.75 + 0.25 * 4 / 8)
    assert set(result["oof"]["per_fold"]) == {"0", "1"}
    from kit.combine import DEFAULT_SPEC

    assert read_combine_spec(run) == DEFAULT_SPEC  # the default kept: product beats it by no more than the spread
    assert load_config(run / "config.yaml").predict.combine == "product"


def test_oof_cells_carry_the_stain_fraction_of_their_mask_cache_table(tmp_path):
    """The OOF set gets each cell's stain fraction as kit.predict does, so tune-combine scores the
    unstained rule on the cells it will be applied to."""
    from kit.cells import cell_table
    from kit.combine import load_oof
    from kit.config import load_config
    from kit.segment.cache import MaskCache

    run = _fake_run(tmp_path)
    cfg = load_config(run / "config.yaml")
    cache = MaskCache(cfg.data.mask_cache, cfg.data.segment_backend)
    nuclei, cells, table = cache.load("imgA")
    # imgA's cell 4 is its Negative cell: make it unstained (green 2% of the others')
    image = np.zeros(cells.shape + (4,), np.uint8)
    image[..., 1] = np.where(cells == 4, 2, 100)
    cache.save("imgA", nuclei, cells, cell_table(nuclei, cells, image))
    oof = load_oof(run, progress=False)
    a = oof.image_ids == "imgA"
    assert oof.stain[a] == pytest.approx([1.0, 1.0, 1.0, 0.02])
    assert oof.stain[~a] == pytest.approx(np.ones(4))  # imgB's table has no intensities: inert
    plain, gated = CombineSpec("product"), CombineSpec("product", unstained=0.3)
    assert oof.per_class(gated)[NEGATIVE] > oof.per_class(plain)[NEGATIVE]
    assert oof.subset(0).stain == pytest.approx(oof.stain[oof.folds == 0])


def test_tune_skips_unstained_candidates_only_where_the_rule_changes_nothing(tmp_path):
    """Without a cell below a candidate's threshold the rule is a no-op: that candidate is not
    scored (its unstained=0 twin is); with such a cell every threshold above it is scored."""
    from kit.cells import cell_table
    from kit.combine import load_oof, tune
    from kit.config import load_config
    from kit.segment.cache import MaskCache

    run = _fake_run(tmp_path)
    specs = candidate_specs(strategies=["cell_only", "product"], negatives=["model"], border_powers=[0.0],
                            unstained=[0.0, 0.3, 0.5])
    inert = tune(load_oof(run, progress=False), specs)  # no intensities: stain 1 everywhere
    assert sorted(s.name for s, _ in inert) == sorted(s.name for s in specs if not s.unstained)
    cfg = load_config(run / "config.yaml")
    cache = MaskCache(cfg.data.mask_cache, cfg.data.segment_backend)
    nuclei, cells, _ = cache.load("imgA")
    image = np.zeros(cells.shape + (4,), np.uint8)
    image[..., 1] = np.where(cells == 4, 40, 100)  # cell 4 at stain 0.4: below 0.5, above 0.3
    cache.save("imgA", nuclei, cells, cell_table(nuclei, cells, image))
    oof = load_oof(run, progress=False)
    ranked = tune(oof, specs)
    assert sorted(s.name for s, _ in ranked) == sorted(s.name for s in specs if s.unstained != 0.3)
    scores = dict((s.name, v) for s, v in ranked)
    assert scores["product unstained<0.5"] != scores["product"]  # the rule acts at 0.5
    assert oof.score(CombineSpec("product", unstained=0.3)) == pytest.approx(scores["product"])


def test_an_untuned_run_takes_the_unstained_threshold_from_its_config(tmp_path):
    from kit.combine import DEFAULT_SPEC, read_combine_spec
    from kit.config import load_config

    cfg = load_config(None, ["predict.combine_unstained=0.2"])
    assert read_combine_spec(tmp_path, cfg) == CombineSpec("product", unstained=0.2)
    assert read_combine_spec(tmp_path, load_config(None, [])) == DEFAULT_SPEC
    assert read_combine_spec(tmp_path, load_config(None, ["predict.combine_unstained=0"])).unstained == 0.0
    with pytest.raises(ConfigError, match="predict.combine_unstained"):
        load_config(None, ["predict.combine_unstained=1.5"])
