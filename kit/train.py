"""Per-fold training of the cell and image classifiers; LR finder; commands `train` and `lr-find`.

    python -m kit train --config configs/default.yaml [--fold K|all] [--kind cell|image|both]
                        [--resume] [--run-dir DIR] [key=value ...]
    torchrun --nproc_per_node N -m kit train ...          # DistributedDataParallel, rank 0 writes
    python -m kit lr-find --config RUN_DIR/config.yaml --out DIR [--kind cell|image]

Inputs: labels (``data.train_csv``, kit.labels), folds (``data.folds_file``, kit.folds: ``ID,fold``),
cell tiles (tile cache of kit.cells) for the cell model, downscaled fields (kit.fields) for the image
model, made where missing by one `kit.prepare` pass; see kit.torchdata. Every cell is trained on its
image's labels.

Run folder (rank 0 writes, every file atomically)::

    <run_dir>/config.yaml                  the resolved config, written once (a rerun must not change how it trains)
    <run_dir>/manifest.json                the run's inputs (kit.manifest: caches, folds file and sha256, folds, sizes)
    <run_dir>/train_metrics.json           per kind and fold: best validation metrics
    <run_dir>/<kind>/fold<k>/last.pt       checkpoint after the latest epoch (resume from here)
                            best.pt        checkpoint of the best validation macro-AP
                            epochs.csv     epoch,train_loss,valid_loss,accuracy_multi,precision,micro_ap,macro_ap,lr,time_s[,image_macro_ap]
                                           (image_macro_ap, cell model only: max over each image's cells vs its labels)
                            oof.csv        validation probabilities of best.pt: cell ID,cell_id,p0..p18; image ID,p0..p18
                            loss_curves.png, confusion_matrices.png (one 2x2 per label), pr_curves.png

Checkpoint dict (torchvision-reference style): ``model, optimizer, lr_scheduler, scaler, epoch``
(epochs completed), ``config`` (plain dict), ``best_score, best_epoch, history, batch_losses, rng``
(python, numpy, torch and CUDA generator states). Data order and augmentation depend only on
(seed, epoch) (kit.torchdata.EpochSampler), so ``--resume`` continues exactly where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from kit.atomic import atomic_open, atomic_path
from kit.config import Config, config_hash, load_config, save_config, to_dict
from kit.device import resolve_device
from kit.errors import ConfigError, DataError, KitError
from kit.labels import NUM_CLASSES
from kit.models import build_from_config, preprocess, unwrap

KINDS = ("cell", "image")
METRIC_COLUMNS = ("train_loss", "valid_loss", "accuracy_multi", "precision", "micro_ap", "macro_ap")


# ---------------------------------------------------------------------------------------------
# Distributed setup


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 when not distributed)."""
    from kit.device import local_rank

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local_rank()


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); returns (rank, world)."""
    rank, world, _ = dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------
# Inputs


def load_fold_table(cfg: Config):
    """Labels joined with folds: DataFrame ``ID, Label, labels, fold`` in the labels file's order."""
    import pandas as pd

    from kit.labels import read_labels_csv

    labels = read_labels_csv(cfg.data.labels_path)
    if not cfg.data.folds_file:
        raise ConfigError(
            "config key data.folds_file is not set: make folds first "
            f"(python -m kit folds --labels {cfg.data.labels_path} --out folds/NAME.csv) and set data.folds_file"
        )
    from kit import folds as kfolds

    path = Path(cfg.data.folds_file)
    if kfolds.sidecar_path(path).is_file():
        folds = kfolds.load_folds(path, cfg.data.labels_path)
    else:  # a bare ID,fold table (e.g. a published split): check the IDs ourselves
        folds = kfolds.load_folds(path)
        missing = sorted(set(labels["ID"]) - set(folds["ID"]))
        if missing:
            raise ConfigError(f"{path}: {len(missing)} image(s) of {cfg.data.labels_path} have no fold, e.g. {missing[0]}")
    table = labels.merge(folds[["ID", "fold"]], on="ID", how="left", validate="one_to_one")
    return table


def fold_split(table, fold: int, single_label_only: bool = False):
    """(train rows, validation rows) of `table` for `fold`; single_label_only filters training only."""
    from kit import folds as kfolds

    train_mask = kfolds.single_label_mask(table) if single_label_only else None
    train, valid = kfolds.split_indices(table["fold"].to_numpy(), fold, train_mask)
    return table.iloc[train].reset_index(drop=True), table.iloc[valid].reset_index(drop=True)


def _targets(table) -> np.ndarray:
    from kit.labels import to_multihot

    if len(table) == 0:
        return np.zeros((0, NUM_CLASSES), np.float32)
    return np.stack([to_multihot(x) for x in table["labels"]]).astype(np.float32)


def make_dataset(cfg: Config, kind: str, table, train: bool, progress: bool = True, build: bool = True):
    """The Dataset of `kind` over the images of `table` (augmented when `train`).

    build: make missing inputs first (`kit.prepare.prepare_run`: cell tiles, downscaled fields)."""
    from kit import torchdata
    from kit.manifest import resolve_inputs

    targets = _targets(table)
    ids = table["ID"].tolist()
    tcfg = cfg.train_for(kind)
    inputs = resolve_inputs(cfg, folds=False)
    if build:
        from kit.prepare import prepare_run

        prepare_run(inputs, ids, (kind,), workers=max(1, tcfg.workers), progress=progress)
    if kind == "cell":
        ds = torchdata.CellTileDataset(
            inputs.tile_dir, ids, targets, augment=train and tcfg.augment,
            max_cells_per_image=tcfg.max_cells_per_image if train else 0, seed=tcfg.seed,
        )
        if len(ds.missing) == len(ids):
            raise DataError(
                f"none of the {len(ids)} images has tiles in {ds.tile_dir}: build the tile cache "
                f"(kit.cells) for these images first"
            )
    else:
        ds = torchdata.FieldDataset(inputs.field_dir, ids, targets, augment=train and tcfg.augment)
    return ds


def make_loader(ds, tcfg, sampler, device: torch.device, batch_size: int | None = None):
    from torch.utils.data import DataLoader

    from kit.torchdata import worker_init_fn

    kwargs = {}
    if tcfg.workers > 0:
        kwargs = dict(
            num_workers=tcfg.workers, multiprocessing_context="spawn", persistent_workers=True,
            worker_init_fn=worker_init_fn, prefetch_factor=4,
        )
    # Own generator: the loader never draws from the global torch RNG (kept exact for resume).
    return DataLoader(
        ds, batch_size=batch_size or tcfg.batch_size, sampler=sampler, drop_last=False,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(tcfg.seed), **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(model: nn.Module, tcfg) -> torch.optim.Optimizer:
    """AdamW (default), Adam or SGD; no weight decay on biases and normalisation weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tcfg.lr)
    if tcfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=tcfg.lr)
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tcfg.lr, momentum=0.9, nesterov=True)
    raise ConfigError(f"config key train.optimizer: unknown optimizer {tcfg.optimizer!r}")


def make_scheduler(optimizer, tcfg, total_steps: int):
    """Per-step schedule: one-cycle, cosine with linear warm-up, or constant."""
    total_steps = max(1, total_steps)
    if tcfg.schedule == "onecycle" and total_steps >= 4:
        # OneCycleLR needs at least one step in each phase.
        pct = min(max(tcfg.warmup_pct, 1.5 / total_steps), 1.0 - 1.5 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=tcfg.lr, total_steps=total_steps, pct_start=pct)
    warmup = int(tcfg.warmup_pct * total_steps)
    if tcfg.schedule in ("cosine", "onecycle"):  # onecycle with < 4 steps: cosine instead
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def measured_layout(tcfg, model: nn.Module, side: int, device: torch.device):
    """`tcfg` with ``channels_last: auto`` resolved: the layout measured faster for a training step of
    this model on this machine (`kit.throughput.training_layout`, cached per machine + model)."""
    if tcfg.channels_last != "auto":
        return tcfg
    from kit.throughput import default_batch, training_layout

    n = default_batch(side, min(tcfg.batch_size, 16))
    example = np.random.default_rng(0).integers(0, 256, (n, 4, side, side), dtype=np.uint8)
    layout = training_layout(model, example, device, amp=tcfg.amp, cache=True)
    return dataclasses.replace(tcfg, channels_last=bool(layout["channels_last"]))


def _forward_loss(model, loss_fn, x, y, device, amp: bool, channels_last: bool):
    x = preprocess(x.to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = y.to(device, non_blocking=True)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
        if loss_fn.needs_embedding:
            logits, emb = model(x, return_embedding=True)
            loss = loss_fn(logits, y, emb)
        else:
            logits = model(x)
            loss = loss_fn(logits, y)
    return loss, logits


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, device, tcfg,
                    progress: bool = True, desc: str = "train") -> tuple[float, list[float]]:
    """One pass over `loader`; steps the scheduler per batch. Returns (mean loss, per-batch losses)."""
    from tqdm import tqdm

    model.train()
    amp = tcfg.amp and device.type == "cuda"
    losses: list[float] = []
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch", dynamic_ncols=True)
    for x, y in bar:
        loss, _ = _forward_loss(model, loss_fn, x, y, device, amp, tcfg.channels_last)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tcfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise KitError(f"training diverged: loss {value} (lower train.lr or enable train.grad_clip)")
        losses.append(value)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    return float(np.mean(losses)) if losses else float("nan"), losses


@torch.no_grad()
def evaluate(model, loader, loss_fn, device, tcfg, progress: bool = True, desc: str = "valid") -> dict:
    """Validation pass: ``{"valid_loss", "probs" (N x 19), "targets" (N x 19)}`` in loader order."""
    from tqdm import tqdm

    model.eval()
    amp = tcfg.amp and device.type == "cuda"
    total, count, probs, targets = 0.0, 0, [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch", dynamic_ncols=True):
        loss, logits = _forward_loss(model, loss_fn, x, y, device, amp, tcfg.channels_last)
        total += float(loss) * len(x)
        count += len(x)
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(y.numpy())
    return {
        "valid_loss": total / max(count, 1),
        "probs": np.concatenate(probs) if probs else np.zeros((0, NUM_CLASSES), np.float32),
        "targets": np.concatenate(targets) if targets else np.zeros((0, NUM_CLASSES), np.float32),
    }


# ---------------------------------------------------------------------------------------------
# Metrics and the epoch table


def compute_metrics(targets: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """accuracy_multi (element-wise at threshold), precision (macro over labels present), micro-AP,
    macro-AP (mean over classes with a positive) and prior_ap (macro-AP of a constant predictor)."""
    from sklearn.metrics import precision_score

    from kit.metric import classification_ap

    t = np.asarray(targets) > 0.5
    p = np.asarray(probs, dtype=np.float64)
    out = {"accuracy_multi": float(((p >= threshold) == t).mean()) if t.size else float("nan")}
    present = np.flatnonzero(t.any(0))
    if len(t) == 0 or len(present) == 0:
        return {**out, "precision": float("nan"), "micro_ap": float("nan"), "macro_ap": float("nan"), "prior_ap": float("nan")}
    out["precision"] = float(precision_score(t, p >= threshold, average="macro", zero_division=0))
    ap = classification_ap(t, p)
    out["micro_ap"], out["macro_ap"] = ap["micro"], ap["macro"]
    out["prior_ap"] = float(t[:, present].mean(0).mean())
    return out


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m:02d}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"


TABLE_HEADER = ("epoch", "train_loss", "valid_loss", "accuracy_multi", "precision", "micro_ap", "macro_ap", "time")


def format_row(row: dict | None = None) -> str:
    """One line of the per-epoch table (the header when row is None), fastai style."""
    widths = [max(7, len(h) + 2) for h in TABLE_HEADER]
    if row is None:
        cells = TABLE_HEADER
    else:
        cells = [str(row["epoch"])] + [f"{row[k]:.6f}" for k in METRIC_COLUMNS] + [_fmt_time(row["time_s"])]
    return "".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(history: list[dict], batch_losses: list[float], steps_per_epoch: int, path: Path) -> None:
    """Training loss per batch (smoothed) and validation loss per epoch against batches seen."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    if batch_losses:
        b = np.asarray(batch_losses)
        k = max(1, min(len(b) // 20, 50))
        smooth = np.convolve(b, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(1, len(b) + 1), b, color="C0", alpha=0.25, lw=0.8)
        ax.plot(np.arange(k, len(b) + 1), smooth, color="C0", label="train (per batch, smoothed)")
    if history:
        x = [(r["epoch"] + 1) * steps_per_epoch for r in history]
        ax.plot(x, [r["valid_loss"] for r in history], "o-", color="C1", label="valid (per epoch)")
    ax.set_xlabel("batches processed")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def plot_confusion_matrices(targets: np.ndarray, probs: np.ndarray, path: Path, threshold: float = 0.5) -> None:
    """One 2x2 confusion matrix per label (rows true 0/1, columns predicted 0/1) at `threshold`."""
    from kit.labels import CLASS_NAMES

    plt = _plt()
    t = np.asarray(targets) > 0.5
    p = np.asarray(probs) >= threshold
    fig, axes = plt.subplots(4, 5, figsize=(15, 12))
    for c, ax in enumerate(axes.ravel()):
        if c >= NUM_CLASSES:
            ax.axis("off")
            continue
        m = np.array([[np.sum(~t[:, c] & ~p[:, c]), np.sum(~t[:, c] & p[:, c])],
                      [np.sum(t[:, c] & ~p[:, c]), np.sum(t[:, c] & p[:, c])]])
        ax.imshow(m, cmap="Blues")
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(m[i, j]), ha="center", va="center",
                        color="white" if m[i, j] > m.max() / 2 else "black")
        ax.set_xticks([0, 1], ["pred 0", "pred 1"])
        ax.set_yticks([0, 1], ["true 0", "true 1"])
        ax.set_title(f"{c}: {CLASS_NAMES[c][:24]}", fontsize=9)
    fig.suptitle(f"Per-label confusion matrices on validation (threshold {threshold})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def plot_pr_curves(targets: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """Precision-recall curve per class present in validation, AP in the legend."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    from kit.labels import CLASS_NAMES

    plt = _plt()
    t = np.asarray(targets) > 0.5
    fig, ax = plt.subplots(figsize=(12, 7))
    cmap = plt.get_cmap("tab20")
    for c in range(NUM_CLASSES):
        if not t[:, c].any():
            continue
        prec, rec, _ = precision_recall_curve(t[:, c], probs[:, c])
        ap = average_precision_score(t[:, c], probs[:, c])
        ax.plot(rec, prec, color=cmap(c), lw=1.2, label=f"{c} {CLASS_NAMES[c][:20]} AP={ap:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Per-class precision-recall on validation")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename (never a half-written checkpoint)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _weights_digest(model: nn.Module) -> str:
    """sha256 of the parameters (not the BN running stats: DDP syncs those from rank 0 at the
    start of each forward, so after the last step each rank still holds its own)."""
    h = hashlib.sha256()
    for name, t in unwrap(model).named_parameters():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def ensure_run_dir(cfg: Config) -> Config:
    """Fill an empty cfg.run_dir with ``runs/<UTC date-time>-<config hash>``."""
    if not cfg.run_dir:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        cfg.run_dir = str(Path("runs") / f"{stamp}-{config_hash(cfg)[:8]}")
    return cfg


def _per_image_max(img_idx: np.ndarray, probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell rows -> one row per image: max probability over its cells, the image's target."""
    uniq, inv = np.unique(img_idx, return_inverse=True)
    out = np.zeros((len(uniq), probs.shape[1]), np.float32)
    np.maximum.at(out, inv, probs)
    tgt = np.zeros_like(out)
    tgt[inv] = targets
    return out, tgt


def _write_oof(path: Path, ds, kind: str, probs: np.ndarray) -> None:
    import pandas as pd

    cols = {"ID": ds.image_ids()}
    if kind == "cell":
        cols["cell_id"] = ds.cell_ids
    df = pd.DataFrame(cols)
    for c in range(NUM_CLASSES):
        df[f"p{c}"] = probs[:, c]
    with atomic_open(path, "w", newline="") as f:
        df.to_csv(f, index=False, float_format="%.6g")


def _write_epochs_csv(path: Path, history: list[dict]) -> None:
    import pandas as pd

    cols = ["epoch", *METRIC_COLUMNS, "lr", "time_s"]
    if history and "image_macro_ap" in history[0]:
        cols.append("image_macro_ap")
    with atomic_open(path, "w", newline="") as f:
        pd.DataFrame(history, columns=cols).to_csv(f, index=False, float_format="%.6g")


# ---------------------------------------------------------------------------------------------
# The fold loop


def train_fold(cfg: Config, kind: str, fold: int, resume: bool = False, stop_after: int | None = None,
               progress: bool = True, build: bool = True) -> dict:
    """Train the `kind` ("cell"/"image") model on all folds but `fold`, validate on `fold`.

    resume: continue from ``last.pt`` when it exists (exactly: same batches, augmentations, RNG).
    stop_after: stop once this many epochs are completed (a time-limited session; resume later).
    build: make missing tiles/fields of the fold's images first (`train_all` made them already).
    Returns the best epoch's validation metrics plus ``fold, kind, best_epoch, epochs_done,
    n_train, n_valid, fold_dir, weights_sha256``. Under torchrun every rank trains; rank 0 writes.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind must be 'cell' or 'image', got {kind!r}")
    ensure_run_dir(cfg)
    tcfg = cfg.train_for(kind)
    mcfg = cfg.model(kind)
    device = resolve_device(tcfg.device)
    rank, world = setup_distributed(device)
    is_main = rank == 0
    progress = progress and is_main
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    fold_dir = Path(cfg.run_dir) / kind / f"fold{fold}"
    say = (lambda msg: __import__("tqdm").tqdm.write(msg)) if is_main else (lambda msg: None)

    table = load_fold_table(cfg)
    train_df, valid_df = fold_split(table, fold, cfg.data.single_label_only)
    if len(train_df) == 0:
        raise ConfigError(f"fold {fold}: no training images left (data.single_label_only={cfg.data.single_label_only})")
    # Rank 0 builds caches (field cache) first; the others then find them complete.
    if is_main:
        train_ds = make_dataset(cfg, kind, train_df, train=True, progress=progress, build=build)
        valid_ds = make_dataset(cfg, kind, valid_df, train=False, progress=progress, build=build)
        _barrier(world)
    else:
        _barrier(world)
        train_ds = make_dataset(cfg, kind, train_df, train=True, progress=False, build=False)
        valid_ds = make_dataset(cfg, kind, valid_df, train=False, progress=False, build=False)
    missing = len(train_ds.missing) + len(valid_ds.missing)
    if missing:
        say(f"note: {missing} image(s) have no cell tiles and are skipped")

    from kit.losses import build_loss, pos_weight_from_targets
    from kit.torchdata import EpochSampler, balancing_weights

    _seed_everything(tcfg.seed)
    model = build_from_config(mcfg).to(device)
    tcfg = measured_layout(tcfg, model, cfg.data.tile_size if kind == "cell" else cfg.data.field_size, device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pos_weight = None
    if tcfg.imbalance == "pos_weight":
        pos_weight = pos_weight_from_targets(train_ds.sample_targets(), tcfg.pos_weight_max).to(device)
    loss_fn = build_loss(tcfg, pos_weight).to(device)
    weights = balancing_weights(train_ds.sample_targets()) if tcfg.imbalance == "sampler" else None
    train_sampler = EpochSampler(len(train_ds), shuffle=True, seed=tcfg.seed, weights=weights,
                                 rank=rank, world=world, augment=tcfg.augment)
    train_loader = make_loader(train_ds, tcfg, train_sampler, device)
    valid_loader = make_loader(valid_ds, tcfg, None, device, batch_size=tcfg.batch_size * 2)
    steps_per_epoch = len(train_loader)
    optimizer = make_optimizer(model, tcfg)
    scheduler = make_scheduler(optimizer, tcfg, tcfg.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.amp and device.type == "cuda")
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch, best_score, best_epoch, history, batch_losses = 0, -1.0, -1, [], []
    best_metrics: dict = {}
    last_path = fold_dir / "last.pt"
    if resume and last_path.is_file():
        from kit.models import load_checkpoint

        ckpt = load_checkpoint(last_path, map_location="cpu")  # RNG states must stay on the CPU
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_score, best_epoch = ckpt["epoch"], ckpt["best_score"], ckpt["best_epoch"]
        history, batch_losses = list(ckpt["history"]), list(ckpt["batch_losses"])
        best_metrics = dict(ckpt.get("best_metrics", {}))
        _set_rng_state(ckpt["rng"])
        if ckpt.get("epochs", tcfg.epochs) != tcfg.epochs:
            raise ConfigError(f"{last_path}: trained for {ckpt.get('epochs')} epochs, config now says {tcfg.epochs}; "
                              "the schedule cannot change on resume")
        say(f"resuming {kind} fold {fold} after epoch {start_epoch} (best macro-AP {best_score:.4f})")
    elif is_main and fold_dir.exists() and not resume:
        for name in ("last.pt", "best.pt", "epochs.csv", "oof.csv"):
            (fold_dir / name).unlink(missing_ok=True)

    if is_main:
        say(f"{kind} fold {fold}: {len(train_ds)} train / {len(valid_ds)} valid "
            f"{'cells' if kind == 'cell' else 'fields'}, {mcfg.backbone}, {tcfg.epochs} epochs, "
            f"{steps_per_epoch} steps/epoch, device {device}{f' x{world}' if world > 1 else ''}")
        if start_epoch < tcfg.epochs:
            say(format_row(None))
    cfg_dict = to_dict(cfg)
    best_changed = False
    for epoch in range(start_epoch, tcfg.epochs):
        if stop_after is not None and epoch >= stop_after:
            break
        t0 = time.time()
        train_sampler.set_epoch(epoch)
        train_loss, losses = train_one_epoch(model, train_loader, loss_fn, optimizer, scheduler, scaler, device,
                                             tcfg, progress, desc=f"{kind} f{fold} e{epoch}")
        if world > 1:
            t = torch.tensor([train_loss], device=device)
            torch.distributed.all_reduce(t)
            train_loss = float(t) / world
        batch_losses.extend(losses)
        if is_main:
            ev = evaluate(unwrap(model), valid_loader, loss_fn, device, tcfg, progress, desc="valid")
            metrics = compute_metrics(ev["targets"], ev["probs"])
            if kind == "cell" and len(valid_ds):  # image level: max over each image's cells
                img_probs, img_targets = _per_image_max(valid_ds.img_idx, ev["probs"], ev["targets"])
                metrics["image_macro_ap"] = compute_metrics(img_targets, img_probs)["macro_ap"]
            row = {"epoch": epoch, "train_loss": train_loss, "valid_loss": ev["valid_loss"], **metrics,
                   "lr": optimizer.param_groups[0]["lr"], "time_s": time.time() - t0}
            history.append({k: row[k] for k in ("epoch", *METRIC_COLUMNS, "lr", "time_s", "image_macro_ap") if k in row})
            say(format_row(row))
            score = metrics["macro_ap"] if math.isfinite(metrics["macro_ap"]) else -ev["valid_loss"]
            improved = score > best_score
            if improved:
                best_score, best_epoch = score, epoch
                best_metrics = {"valid_loss": ev["valid_loss"], **metrics}
            state = {
                "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch + 1, "epochs": tcfg.epochs, "config": cfg_dict, "kind": kind, "fold": fold,
                "best_score": best_score, "best_epoch": best_epoch, "best_metrics": best_metrics,
                "history": history, "batch_losses": batch_losses, "rng": _rng_state(),
            }
            save_checkpoint(state, last_path)
            if improved:
                shutil.copyfile(last_path, fold_dir / ".best.pt.tmp")
                os.replace(fold_dir / ".best.pt.tmp", fold_dir / "best.pt")
                _write_oof(fold_dir / "oof.csv", valid_ds, kind, ev["probs"])
                best_changed = True
            _write_epochs_csv(fold_dir / "epochs.csv", history)
            plot_loss_curves(history, batch_losses, steps_per_epoch, fold_dir / "loss_curves.png")
        _barrier(world)
    # Per-label plots of the best epoch, once per call (they take seconds; not every epoch).
    plots = [fold_dir / "confusion_matrices.png", fold_dir / "pr_curves.png"]
    if is_main and (fold_dir / "oof.csv").is_file() and (best_changed or not all(p.is_file() for p in plots)):
        import pandas as pd

        probs = pd.read_csv(fold_dir / "oof.csv")[[f"p{c}" for c in range(NUM_CLASSES)]].to_numpy(np.float32)
        targets = valid_ds.sample_targets()
        if len(probs) == len(targets):
            plot_confusion_matrices(targets, probs, plots[0])
            plot_pr_curves(targets, probs, plots[1])
    epochs_done = len(history) if is_main else None
    result = {
        "kind": kind, "fold": fold, "best_epoch": best_epoch, "epochs_done": epochs_done,
        "n_train": len(train_ds), "n_valid": len(valid_ds), "fold_dir": str(fold_dir),
        "weights_sha256": _weights_digest(model), "rank": rank, **best_metrics,
    }
    return result


def _training_signature(cfg: Config) -> dict:
    """The settings a resumed run must share with the original, flattened to dotted keys (paths,
    workers, device, folds and the predict section may change)."""
    d = to_dict(cfg)
    out = {f"data.{k}": d["data"][k] for k in ("tile_size", "field_size", "single_label_only", "segment_backend")}
    for section in ("cell_model", "image_model", "train"):
        for k, v in d[section].items():
            if k not in ("workers", "device", "folds", "pretrained"):
                out[f"{section}.{k}"] = v
    return out


def _fold_list(cfg: Config, folds) -> list[int]:
    if folds is None:
        folds = cfg.train.folds
    if folds == "all":
        table = load_fold_table(cfg)
        return sorted(int(f) for f in table["fold"].unique())
    if isinstance(folds, int):
        return [folds]
    return [int(f) for f in folds]


def write_run_config(cfg: Config, resume: bool = False) -> Path:
    """Write ``RUN_DIR/config.yaml`` once. An existing one is kept as it is: a rerun may change only
    what does not change training (paths, workers, device, folds, the predict section); anything
    else is a ConfigError naming the keys, with or without --resume."""
    cfg_path = Path(cfg.run_dir) / "config.yaml"
    if not cfg_path.is_file():
        return save_config(cfg, cfg_path)
    old_sig, new_sig = _training_signature(load_config(cfg_path)), _training_signature(cfg)
    changed = sorted(k for k in set(old_sig) | set(new_sig) if old_sig.get(k) != new_sig.get(k))
    if changed:
        how = "a resumed run must train the same way" if resume else "a run folder trains one way"
        raise ConfigError(f"{'--resume: ' if resume else ''}{', '.join(changed)} differ from {cfg_path}; {how} "
                          f"(resume with --config {cfg_path}, or use a new --run-dir)")
    return cfg_path


def train_all(cfg: Config, kinds: Sequence[str] = KINDS, folds=None, resume: bool = False,
              progress: bool = True, prepare: bool = True) -> dict:
    """Train every requested kind and fold; writes config.yaml and manifest.json once, and
    train_metrics.json (rank 0). The inputs of every fold are made first, in one `kit.prepare` pass
    (`prepare=False`: the caller just made them).

    folds: None -> cfg.train.folds; "all", an int or a list. Returns ``{kind: {fold: metrics}}``.
    """
    from kit.manifest import resolve_inputs, write_manifest

    ensure_run_dir(cfg)
    run_dir = Path(cfg.run_dir)
    rank = dist_info()[0]
    inputs = resolve_inputs(cfg)  # ConfigError when train.folds names a fold the folds file lacks
    fold_ids = _fold_list(cfg, folds)
    available = _fold_list(cfg, "all")
    unknown = sorted(set(fold_ids) - set(available))
    if unknown:
        raise ConfigError(f"fold(s) {', '.join(map(str, unknown))} not in {cfg.data.folds_file} "
                          f"(it has folds {', '.join(map(str, available))})")
    if rank == 0:
        write_run_config(cfg, resume)
        write_manifest(run_dir, inputs)
        if prepare:
            from kit.prepare import prepare_run

            prepare_run(inputs, load_fold_table(cfg)["ID"].tolist(), kinds, workers=max(1, cfg.train.workers),
                        progress=progress)
    results: dict = {}
    metrics_path = run_dir / "train_metrics.json"
    if rank == 0 and metrics_path.is_file():
        try:
            results = json.loads(metrics_path.read_text())
        except ValueError:
            results = {}
    for kind in kinds:
        results.setdefault(kind, {})
        for fold in fold_ids:
            r = train_fold(cfg, kind, fold, resume=resume, progress=progress, build=False)  # prepared above
            results[kind][str(fold)] = {k: v for k, v in r.items() if k not in ("rank",)}
            if rank == 0:
                with atomic_open(metrics_path, "w") as f:
                    json.dump(results, f, indent=2)
    if rank == 0:
        for kind in kinds:
            scores = [m.get("macro_ap", float("nan")) for m in results[kind].values()]
            if scores:
                print(f"{kind}: macro-AP per fold {', '.join(f'{s:.4f}' for s in scores)}; mean {np.nanmean(scores):.4f}")
    return results


# ---------------------------------------------------------------------------------------------
# LR finder


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], skip_start: int = 5, skip_end: int = 3) -> float:
    """The learning rate at the steepest descent of the (smoothed) loss against log10(lr)."""
    lrs, losses = np.asarray(lrs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if len(lrs) != len(losses) or len(lrs) < 3:
        raise ValueError("need at least 3 (lr, loss) points")
    end = len(lrs) - skip_end if len(lrs) - skip_end - skip_start >= 3 else len(lrs)
    start = skip_start if end - skip_start >= 3 else 0
    x, y = np.log10(lrs[start:end]), losses[start:end]
    grad = np.gradient(y, x)
    return float(lrs[start + int(np.argmin(grad))])


def lr_find(cfg: Config, kind: str = "cell", fold: int | None = None, start_lr: float = 1e-7, end_lr: float = 10.0,
            num_iter: int = 100, beta: float = 0.98, diverge: float = 4.0, progress: bool = True) -> dict:
    """Exponential LR range test (Smith 2015 / fastai): the LR grows from start_lr to end_lr over
    num_iter batches while the exponentially smoothed loss is recorded; stops when it exceeds
    `diverge` x the best. Trains on the training images of `fold` (default: the first fold).
    Returns ``{"lrs", "losses" (smoothed), "raw_losses", "suggestion"}``."""
    from tqdm import tqdm

    from kit.losses import build_loss
    from kit.torchdata import EpochSampler

    tcfg = cfg.train_for(kind)
    device = resolve_device(tcfg.device)
    table = load_fold_table(cfg)
    fold = int(table["fold"].min()) if fold is None else fold
    train_df, _ = fold_split(table, fold, cfg.data.single_label_only)
    ds = make_dataset(cfg, kind, train_df, train=True, progress=progress)
    _seed_everything(tcfg.seed)
    model = build_from_config(cfg.model(kind)).to(device)
    tcfg = measured_layout(tcfg, model, cfg.data.tile_size if kind == "cell" else cfg.data.field_size, device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(tcfg).to(device)
    optimizer = make_optimizer(model, dataclasses.replace(tcfg, lr=start_lr))
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.amp and device.type == "cuda")
    amp = tcfg.amp and device.type == "cuda"
    sampler = EpochSampler(len(ds), shuffle=True, seed=tcfg.seed, augment=tcfg.augment)
    loader = make_loader(ds, tcfg, sampler, device)
    mult = (end_lr / start_lr) ** (1.0 / max(1, num_iter - 1))
    lrs, smoothed, raw = [], [], []
    avg, best, it, epoch = 0.0, float("inf"), 0, 0
    bar = tqdm(total=num_iter, desc="lr-find", disable=not progress, unit="batch")
    model.train()
    while it < num_iter:
        sampler.set_epoch(epoch)
        for x, y in loader:
            lr = start_lr * mult**it
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, _ = _forward_loss(model, loss_fn, x, y, device, amp, tcfg.channels_last)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            value = float(loss.detach())
            avg = beta * avg + (1 - beta) * value
            s = avg / (1 - beta ** (it + 1))
            lrs.append(lr)
            raw.append(value)
            smoothed.append(s)
            best = min(best, s)
            it += 1
            bar.update()
            if not math.isfinite(s) or s > diverge * best or it >= num_iter:
                it = num_iter if (not math.isfinite(s) or s > diverge * best) else it
                break
        epoch += 1
    bar.close()
    return {"lrs": lrs, "losses": smoothed, "raw_losses": raw, "suggestion": suggest_lr(lrs, smoothed)}


def plot_lr_find(result: dict, path: Path, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result["lrs"], result["losses"], color="C0")
    sug = result["suggestion"]
    y = np.interp(np.log10(sug), np.log10(result["lrs"]), result["losses"])
    ax.plot([sug], [y], "o", color="C3", label=f"steepest descent: {sug:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss (smoothed)")
    ax.set_title(title or "LR range test")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Commands


def _parse_folds_arg(text: str | None):
    if text is None:
        return None
    if text == "all":
        return "all"
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ConfigError(f"--fold: expected a fold number, a comma list or 'all', got {text!r}") from None


def configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (e.g. configs/default.yaml or RUN_DIR/config.yaml)")
    parser.add_argument("--fold", help="fold number, comma list or 'all' (default: train.folds of the config)")
    parser.add_argument("--kind", choices=("cell", "image", "both"), default="both", help="which model(s) to train")
    parser.add_argument("--resume", action="store_true", help="continue each fold from its last.pt")
    parser.add_argument("--run-dir", help="run folder (default: run_dir of the config, else runs/<date>-<hash>)")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. train.epochs=3 model.backbone=resnet18")
    parser.set_defaults(func=_run_train)


def _run_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    elif args.resume and not cfg.run_dir and args.config:
        cfg.run_dir = str(Path(args.config).parent)
    if args.resume and not cfg.run_dir:
        raise ConfigError("--resume needs the run folder: pass --run-dir or --config RUN_DIR/config.yaml")
    kinds = KINDS if args.kind == "both" else (args.kind,)
    ensure_run_dir(cfg)
    if dist_info()[0] == 0:
        print(f"run folder: {cfg.run_dir}")
    train_all(cfg, kinds=kinds, folds=_parse_folds_arg(args.fold), resume=args.resume)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def configure_lr_find(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (e.g. RUN_DIR/config.yaml)")
    parser.add_argument("--out", required=True, help="folder for lr_find_<kind>.png and .csv")
    parser.add_argument("--kind", choices=KINDS, default="cell")
    parser.add_argument("--fold", type=int, help="train on this fold's training images (default: the first fold)")
    parser.add_argument("--start-lr", type=float, default=1e-7)
    parser.add_argument("--end-lr", type=float, default=10.0)
    parser.add_argument("--num-iter", type=int, default=100)
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE")
    parser.set_defaults(func=_run_lr_find)


def _run_lr_find(args) -> int:
    import pandas as pd

    if not 0 < args.start_lr < args.end_lr:
        raise ConfigError(f"--start-lr must be > 0 and below --end-lr, got {args.start_lr} and {args.end_lr}")
    if args.num_iter < 10:
        raise ConfigError(f"--num-iter must be at least 10, got {args.num_iter}")
    cfg = load_config(args.config, args.overrides)
    res = lr_find(cfg, args.kind, args.fold, args.start_lr, args.end_lr, args.num_iter)
    out = Path(args.out)
    png = out / f"lr_find_{args.kind}.png"
    plot_lr_find(res, png, title=f"LR range test: {args.kind} model, {cfg.model(args.kind).backbone}")
    with atomic_open(out / f"lr_find_{args.kind}.csv", "w", newline="") as f:
        pd.DataFrame({"lr": res["lrs"], "loss_smoothed": res["losses"], "loss": res["raw_losses"]}).to_csv(f, index=False)
    print(f"suggested learning rate (steepest descent): {res['suggestion']:.2e}")
    print(f"plot: {png}")
    return 0
