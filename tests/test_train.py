"""kit.config and kit.train: config parsing, fold loop outputs, exact resume, LR finder, image model."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kit.config import ConfigError, config_hash, load_config, save_config
from kit.torchdata import EpochSampler, augment
from kit.labels import format_label, to_multihot
from kit.lr_find import suggest_lr
from kit.train import compute_metrics, fold_split, train_fold
from helpers import write_random_tiles


def _write_dataset(root, n=12, folds=3, seed=0, tiles=True):
    rng = np.random.default_rng(seed)
    ids = [f"img{i:03d}" for i in range(n)]
    labels = [[int(rng.integers(0, 3))] if i % 4 else [int(rng.integers(0, 3)), 4] for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"ID": ids, "Label": [format_label(x) for x in labels]}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"ID": ids, "fold": [i % folds for i in range(n)]}).to_csv(root / "folds.csv", index=False)
    if tiles:
        write_random_tiles(root / "tiles" / "tiles-32-test", ids, np.stack([to_multihot(x) for x in labels]),
                           size=32, cells=(2, 3), seed=seed)
    return ids, labels


def _cfg(root, *extra):
    return load_config(None, [
        f"data.train_csv={root}/train.csv", f"data.folds_file={root}/folds.csv", f"data.tile_cache={root}/tiles",
        "data.tile_size=32", "model.backbone=resnet18", "train.batch_size=8", "train.workers=0",
        "train.epochs=2", f"run_dir={root}/run", *extra,
    ])


# --------------------------------------------------------------------------------------------- config


def test_config_overrides_types_and_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {backbone: resnet34}\nimage_model: {batch_size: 4}\ntrain: {epochs: 5, lr: 1e-3}\n")
    cfg = load_config(path, ["train.epochs=3", "cell_model.backbone=resnet18", "train.folds=[0,2]"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 1e-3
    assert cfg.cell_model.backbone == "resnet18" and cfg.image_model.backbone == "resnet34"
    assert cfg.train.folds == [0, 2]
    assert cfg.train_for("image").batch_size == 4 and cfg.train_for("cell").batch_size == cfg.train.batch_size
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(path, ["train.epochs=4"])) != config_hash(cfg)


@pytest.mark.parametrize("override, key", [
    ("train.epoch=3", "train.epoch"),
    ("train.epochs=three", "train.epochs"),
    ("train.loss=hinge", "train.loss"),
    ("model.dropout=1.5", "cell_model.dropout"),
    ("nosuch.key=1", "nosuch"),
    ("train.amp=maybe", "train.amp"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.epochz"):
        load_config(bad)


# --------------------------------------------------------------------------------------------- pieces


def test_sampler_is_a_function_of_seed_and_epoch_and_shards_disjointly():
    s = EpochSampler(10, seed=3)
    s.set_epoch(1)
    a = list(s)
    s.set_epoch(1)
    assert list(s) == a
    s.set_epoch(2)
    assert list(s) != a
    assert sorted(i for i, _ in a) == list(range(10))
    shards = []
    for rank in range(2):
        r = EpochSampler(10, seed=3, rank=rank, world=2)
        r.set_epoch(1)
        shards.append([i for i, _ in r])
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_augment_keeps_shape_dtype_and_is_seeded():
    x = np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    a = augment(x, np.random.default_rng(5))
    b = augment(x, np.random.default_rng(5))
    assert a.shape == x.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    geo = augment(x, np.random.default_rng(5), intensity=0.0)  # dihedral only: same pixel multiset
    assert np.array_equal(np.sort(geo.ravel()), np.sort(x.ravel()))


def test_single_label_only_filters_training_rows_only(tmp_path):
    _write_dataset(tmp_path, tiles=False)
    from kit.train import load_fold_table

    table = load_fold_table(_cfg(tmp_path))
    tr_all, va_all = fold_split(table, 0)
    tr_single, va_single = fold_split(table, 0, single_label_only=True)
    assert va_all["ID"].tolist() == va_single["ID"].tolist()
    assert len(tr_single) < len(tr_all) and (tr_single["labels"].map(len) == 1).all()


def test_metrics_perfect_and_prior():
    t = np.zeros((6, 19))
    t[:3, 0] = 1
    t[3:, 2] = 1
    m = compute_metrics(t, t * 0.9 + 0.05)
    assert m["macro_ap"] == pytest.approx(1.0) and m["accuracy_multi"] == 1.0
    assert m["prior_ap"] == pytest.approx(0.5)


def test_lr_suggestion_on_a_synthetic_curve():
    lrs = np.logspace(-7, 1, 200)
    x = np.log10(lrs)
    # loss flat, falls fastest at lr = 1e-3, bottoms out, then explodes after 1e-1
    losses = 1.0 - 0.8 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -1, (x + 1) ** 2, 0)
    sug = suggest_lr(lrs, losses)
    assert 10 ** -3.1 < sug < 10 ** -2.9
    with pytest.raises(ValueError):
        suggest_lr([1e-3, 1e-2], [1.0, 0.5])


# --------------------------------------------------------------------------------------------- training


def test_resume_reproduces_the_next_epoch_exactly(tmp_path):
    _write_dataset(tmp_path)
    full = train_fold(_cfg(tmp_path, f"run_dir={tmp_path}/full"), "cell", 0, progress=False)
    part_cfg = _cfg(tmp_path, f"run_dir={tmp_path}/part")
    first = train_fold(part_cfg, "cell", 0, stop_after=1, progress=False)
    assert first["epochs_done"] == 1
    resumed = train_fold(part_cfg, "cell", 0, resume=True, progress=False)
    assert resumed["epochs_done"] == 2
    a = pd.read_csv(tmp_path / "full/cell/fold0/epochs.csv")
    b = pd.read_csv(tmp_path / "part/cell/fold0/epochs.csv")
    assert a["train_loss"].tolist() == b["train_loss"].tolist()
    assert a["valid_loss"].tolist() == b["valid_loss"].tolist()
    assert full["weights_sha256"] == resumed["weights_sha256"]

    # the run folder holds what the contract says
    fold_dir = tmp_path / "full/cell/fold0"
    for name in ("last.pt", "best.pt", "epochs.csv", "oof.csv", "loss_curves.png",
                 "confusion_matrices.png", "pr_curves.png"):
        assert (fold_dir / name).is_file(), name
    assert list(a.columns[:7]) == ["epoch", "train_loss", "valid_loss", "accuracy_multi", "precision",
                                   "micro_ap", "macro_ap"]
    oof = pd.read_csv(fold_dir / "oof.csv")
    assert list(oof.columns) == ["ID", "cell_id"] + [f"p{c}" for c in range(19)]
    assert len(oof) == full["n_valid"] and set(oof["ID"]) == {f"img{i:03d}" for i in range(0, 12, 3)}
    assert ((oof.iloc[:, 2:] >= 0) & (oof.iloc[:, 2:] <= 1)).all().all()
    ckpt = torch.load(fold_dir / "best.pt", weights_only=True)
    assert ckpt["epoch"] == full["best_epoch"] + 1
    assert set(ckpt) >= {"model", "optimizer", "lr_scheduler", "scaler", "epoch", "config", "best_score"}
    assert ckpt["config"]["cell_model"]["backbone"] == "resnet18"


def _write_images(root, ids, labels, size=64):
    import cv2

    from kit.images import CHANNELS

    rng = np.random.default_rng(1)
    (root / "train").mkdir(parents=True, exist_ok=True)
    for image_id, lab in zip(ids, labels):
        for c, ch in enumerate(CHANNELS):
            img = rng.integers(0, 40, (size, size)).astype(np.uint8)
            if ch == "green":
                img[:, : 8 * (lab[0] + 1)] += 120
            cv2.imwrite(str(root / "train" / f"{image_id}_{ch}.png"), img)


def test_image_model_with_field_cache_triplet_loss_and_sampler(tmp_path):
    ids, labels = _write_dataset(tmp_path, n=9, tiles=False)
    _write_images(tmp_path, ids, labels)
    cfg = _cfg(tmp_path, f"data.data_dir={tmp_path}", f"data.field_cache={tmp_path}/fields", "data.field_size=32",
               "train.epochs=1", "train.loss=ce_triplet", "train.imbalance=sampler", "train.schedule=cosine")
    res = train_fold(cfg, "image", 1, progress=False)
    assert res["n_train"] == 6 and res["n_valid"] == 3
    fields = list((tmp_path / "fields").glob("fields-32-*/*.npy"))
    assert len(fields) == 9
    arr = np.load(fields[0])
    assert arr.shape == (4, 32, 32) and arr.dtype == np.uint8
    oof = pd.read_csv(tmp_path / "run/image/fold1/oof.csv")
    assert list(oof.columns) == ["ID"] + [f"p{c}" for c in range(19)] and len(oof) == 3


def test_train_and_lr_find_commands(tmp_path, capsys):
    from kit.cli import main

    _write_dataset(tmp_path)
    cfg = _cfg(tmp_path, "train.epochs=1")
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--kind", "cell", "--fold", "2",
                 "--run-dir", str(tmp_path / "cli_run")]) == 0
    assert (tmp_path / "cli_run/config.yaml").is_file()
    assert (tmp_path / "cli_run/cell/fold2/best.pt").is_file()
    assert main(["lr-find", "--config", str(tmp_path / "cli_run/config.yaml"), "--out", str(tmp_path / "lr"),
                 "--num-iter", "12"]) == 0
    out = capsys.readouterr().out
    assert "suggested learning rate" in out
    assert (tmp_path / "lr/lr_find_cell.png").is_file()
    sweep = pd.read_csv(tmp_path / "lr/lr_find_cell.csv")
    assert (np.diff(sweep["lr"]) > 0).all()
    # a user mistake is a one-line error, exit 2
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "train.epochs=zero"]) == 2


def test_resume_refuses_a_changed_training_config(tmp_path):
    from kit.train import train_all

    _write_dataset(tmp_path, tiles=False)
    save_config(_cfg(tmp_path, "train.epochs=2"), tmp_path / "run" / "config.yaml")
    with pytest.raises(ConfigError, match="train.epochs"):
        train_all(_cfg(tmp_path, "train.epochs=3"), kinds=("cell",), resume=True, progress=False)


def test_config_yaml_is_written_once(tmp_path):
    """A run folder trains one way: another training config is refused, with or without --resume."""
    from kit.train import write_run_config

    _write_dataset(tmp_path, tiles=False)
    path = write_run_config(_cfg(tmp_path, "train.epochs=2"))
    stamp = path.stat().st_mtime_ns
    assert write_run_config(_cfg(tmp_path, "train.epochs=2", "train.workers=3")) == path  # kept as it is
    assert path.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="train.lr differ .* a run folder trains one way"):
        write_run_config(_cfg(tmp_path, "train.epochs=2", "train.lr=0.1"))



@pytest.mark.parametrize("n,batches", [(33, [32]), (34, [32, 2]), (32, [32]), (1, [1])])
def test_training_loader_never_ends_on_a_batch_of_one(n, batches):
    """BatchNorm cannot train on one sample of 1 x 1 features: a training epoch drops a last batch
    of one (and only that); the validation loader (no sampler) keeps every item."""
    from torch.utils.data import Dataset

    from kit.train import make_loader

    class Items(Dataset):  # takes the sampler's (index, aug seed) keys, or plain indices
        def __len__(self):
            return n

        def __getitem__(self, key):
            return torch.tensor(key[0] if isinstance(key, tuple) else key)

    tcfg = load_config(None, ["train.workers=0", "train.batch_size=32"]).train
    train = make_loader(Items(), tcfg, EpochSampler(n, shuffle=True, seed=0), torch.device("cpu"))
    assert [len(b) for b in train] == batches
    assert sum(len(b) for b in make_loader(Items(), tcfg, None, torch.device("cpu"))) == n
