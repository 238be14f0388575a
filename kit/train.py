"""Per-fold training of the cell and image classifiers; command `train`.

    python -m kit train --config configs/default.yaml [--fold K|all] [--kind cell|image|both]
                        [--resume] [--run-dir DIR] [key=value ...]
    torchrun --nproc_per_node N -m kit train ...          # DistributedDataParallel, rank 0 writes

Read top to bottom as torchvision's ``references/classification/train.py``: `train_one_epoch`,
`evaluate`, and `train_fold` = `build_fold` (data, model, loss, optimiser) -> `resume_fold`
(``last.pt``) -> per epoch `run_epoch` + `save_epoch` -> `finish_fold` (plots). `train_all` runs
every kind and fold, and the pseudo-label rounds (kit.pseudo). The LR range test is kit.lr_find;
the epoch table and the plots are kit.reporting. Rank-0 work goes through `is_main_process` and
`on_main`.

Inputs: labels (``data.train_csv``, kit.labels), folds (``data.folds_file``, kit.folds: ``ID,fold``),
cell tiles (tile cache of kit.cells) for the cell model, downscaled fields (kit.fields) for the image
model, made where missing by one `kit.prepare` pass; see kit.torchdata. How the cell model learns from image labels
is ``train.cell_mode``: ``broadcast`` (every cell gets its image's labels) or ``mil`` (bags of
cells with a cell head and a bag head, kit.mil); ``train.pseudo_rounds`` K > 0 retrains it K
times on labels derived from its own out-of-fold predictions (kit.pseudo); the cell policy
(``cells:``, kit.cell_policy) chooses the training cells; ``train.unstained_targets`` gives dim
cells the targets the unstained rule scores them with (kit.combine); ``train.negative_aug`` adds
dimmed-green Negative tiles.

Run folder (rank 0 writes, every file atomically)::

    <run_dir>/config.yaml                  the resolved config, written once (a rerun must not change how it trains)
    <run_dir>/manifest.json                the run's inputs (kit.manifest: caches, folds file and sha256, folds, sizes)
    <run_dir>/train_metrics.json           per kind (and round) and fold: best validation metrics
    <run_dir>/pseudo_rounds.csv            round, OOF image-level proxy of the cell model (pseudo rounds)
    <run_dir>/<kind>/fold<k>/last.pt       checkpoint after the latest epoch (resume from here)
                            best.pt        checkpoint of the best validation macro-AP
                            epochs.csv     see kit.reporting
                            oof.csv        validation probabilities of best.pt: cell ID,cell_id,p0..p18; image ID,p0..p18
                            oof_bag.csv    MIL only: the bag head's image probabilities ID,p0..p18
                            loss_curves.png, confusion_matrices.png, pr_curves.png
    <kind> is ``image``, ``cell`` (round 0) or ``cell_pseudo<r>`` (round r).

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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from kit.atomic import atomic_open, atomic_path
from kit.config import Config, config_hash, load_config, save_config, to_dict
from kit.device import resolve_device
from kit.errors import ConfigError, DataError, KitError, clip
from kit.labels import NUM_CLASSES
from kit.models import build_from_config, preprocess, unwrap
from kit.reporting import METRIC_COLUMNS, format_row, plot_confusion_matrices, plot_loss_curves, plot_pr_curves, write_epochs_csv

KINDS = ("cell", "image")


# ---------------------------------------------------------------------------------------------
# Distributed setup and the two rank-0 helpers


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


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the one process that writes and prints."""
    return dist_info()[0] == 0


def on_main(fn: Callable, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` on rank 0 only (None elsewhere), as torchvision's ``save_on_master``."""
    return fn(*args, **kwargs) if is_main_process() else None


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _say(msg: str) -> None:
    on_main(__import__("tqdm").tqdm.write, msg)


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


def make_dataset(cfg: Config, kind: str, table, train: bool, progress: bool = True, build: bool = True,
                 cell_targets: dict | None = None):
    """The Dataset of `kind` over the images of `table` (augmented when `train`).

    build: make missing inputs first (`kit.prepare.prepare_run`: cell tiles, downscaled fields).
    Cell model: the cell policy picks the training cells (validation keeps every cell: the OOF
    file covers them all and kit.combine applies the policy); `cell_targets` (pseudo rounds)
    relabel cells; in MIL mode the training set is one bag per image (kit.mil.CellBagDataset)."""
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
            policy=cfg.cells if train else None, cell_targets=cell_targets if train else None,
            negative_aug=tcfg.negative_aug if train else 0.0,
            unstained=tcfg.unstained_targets if train else 0.0,
        )
        if len(ds.missing) == len(ids):
            raise DataError(
                f"none of the {len(ids)} images has tiles in {ds.tile_dir}: build the tile cache "
                f"(kit.cells) for these images first"
            )
        if train and tcfg.cell_mode == "mil":
            from kit.mil import CellBagDataset

            ds = CellBagDataset(ds, targets, tcfg.bag_size, augment=tcfg.augment)
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
    batch_size = batch_size or tcfg.batch_size
    # A training epoch never ends on a batch of one: BatchNorm cannot train on one sample of 1 x 1
    # features (EfficientNet-Lite's head failed on 353 cells in batches of 32); other sizes keep all.
    drop_last = sampler is not None and len(sampler) > 1 and len(sampler) % batch_size == 1
    # Own generator: the loader never draws from the global torch RNG (kept exact for resume).
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
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
    raise ConfigError(f"config key train.optimizer: unknown optimizer {clip(tcfg.optimizer)}")


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
    this model on this machine (`kit.throughput.training_layout`, cached per machine + model),
    measured by rank 0 and the same on every rank (DDP checks that parameters have one layout)."""
    if tcfg.channels_last != "auto":
        return tcfg
    from kit.throughput import default_batch, training_layout

    choice = [None]
    if is_main_process():
        n = default_batch(side, min(tcfg.batch_size, 16))
        example = np.random.default_rng(0).integers(0, 256, (n, 4, side, side), dtype=np.uint8)
        choice = [bool(training_layout(model, example, device, amp=tcfg.amp, cache=True)["channels_last"])]
    if torch.distributed.is_initialized():  # every rank takes rank 0's layout: DDP needs one
        torch.distributed.broadcast_object_list(choice, src=0)
    return dataclasses.replace(tcfg, channels_last=choice[0])


def _to_device(x, device: torch.device, channels_last: bool):
    x = preprocess(x.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _forward_loss(model, loss_fn, x, y, device, amp: bool, channels_last: bool):
    """(loss, logits) of one batch. A MIL batch is ((tiles B x N x ..., mask), (target, cell targets, mask))."""
    if isinstance(x, (list, tuple)):  # MIL bags: the B*N cells go through the backbone at once
        tiles, mask = x
        mask = mask.to(device, non_blocking=True)
        xb = _to_device(tiles.flatten(0, 1), device, channels_last)
        y = tuple(t.to(device, non_blocking=True) for t in y)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            outputs = model(xb, mask)
            loss = loss_fn(outputs, y)
        return loss, outputs[1]
    x = _to_device(x, device, channels_last)
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
    """Validation pass: ``{"valid_loss", "probs" (N x 19), "targets" (N x 19)}`` in loader order;
    a MIL model also returns ``"embeddings"`` (N x D, for its bag head, kit.mil)."""
    from tqdm import tqdm

    from kit.mil import is_mil

    model.eval()
    amp = tcfg.amp and device.type == "cuda"
    keep_emb = is_mil(model)
    total, count, probs, targets, embs = 0.0, 0, [], [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch", dynamic_ncols=True):
        if keep_emb:
            xd = _to_device(x, device, tcfg.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits, emb = model(xd, return_embedding=True)
                loss = loss_fn(logits, y.to(device))
            embs.append(emb.float())
        else:
            loss, logits = _forward_loss(model, loss_fn, x, y, device, amp, tcfg.channels_last)
        total += float(loss) * len(x)
        count += len(x)
        probs.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(y.numpy())
    out = {
        "valid_loss": total / max(count, 1),
        "probs": np.concatenate(probs) if probs else np.zeros((0, NUM_CLASSES), np.float32),
        "targets": np.concatenate(targets) if targets else np.zeros((0, NUM_CLASSES), np.float32),
    }
    if keep_emb:
        out["embeddings"] = torch.cat(embs) if embs else torch.zeros((0, unwrap(model).embedding_dim), device=device)
    return out


# ---------------------------------------------------------------------------------------------
# Metrics


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


# ---------------------------------------------------------------------------------------------
# The fold loop: build -> resume -> (one epoch -> save) x epochs -> finish


@dataclass
class FoldRun:
    """Everything one fold's training holds (made by `build_fold`)."""

    cfg: Config
    kind: str
    fold: int
    fold_dir: Path
    tcfg: Any
    device: torch.device
    rank: int
    world: int
    train_ds: Any
    valid_ds: Any
    model: nn.Module
    loss_fn: nn.Module
    valid_loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    train_sampler: Any
    train_loader: Any
    valid_loader: Any
    progress: bool = True
    start_epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    batch_losses: list = field(default_factory=list)
    best_changed: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


def build_fold(cfg: Config, kind: str, fold: int, subdir: str | None = None, cell_targets: dict | None = None,
               progress: bool = True, build: bool = True) -> FoldRun:
    """Datasets, loaders, model (MIL when train.cell_mode=mil), loss, optimiser and schedule of one fold.

    build: make missing tiles/fields of the fold's images first (`train_all` made them already)."""
    from kit.torchdata import EpochSampler, balancing_weights
    from kit.losses import build_loss, pos_weight_from_targets

    tcfg = cfg.train_for(kind)
    device = resolve_device(tcfg.device)
    rank, world = setup_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    table = load_fold_table(cfg)
    train_df, valid_df = fold_split(table, fold, cfg.data.single_label_only)
    if len(train_df) == 0:
        raise ConfigError(f"fold {fold}: no training images left (data.single_label_only={cfg.data.single_label_only})")
    # Rank 0 builds caches (field cache) first; the others then find them complete.
    if is_main_process():
        train_ds = make_dataset(cfg, kind, train_df, train=True, progress=progress, build=build,
                                cell_targets=cell_targets)
        valid_ds = make_dataset(cfg, kind, valid_df, train=False, progress=progress, build=build)
        _barrier(world)
    else:
        _barrier(world)
        train_ds = make_dataset(cfg, kind, train_df, train=True, progress=False, build=False, cell_targets=cell_targets)
        valid_ds = make_dataset(cfg, kind, valid_df, train=False, progress=False, build=False)
    missing = len(train_ds.missing) + len(valid_ds.missing)
    if missing:
        _say(f"note: {missing} image(s) have no cell tiles and are skipped")

    mil = kind == "cell" and tcfg.cell_mode == "mil"
    _seed_everything(tcfg.seed)
    model = build_from_config(cfg.model(kind), bag_pool=tcfg.bag_pool if mil else None).to(device)
    tcfg = measured_layout(tcfg, model, cfg.data.tile_size if kind == "cell" else cfg.data.field_size, device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pos_weight = None
    if tcfg.imbalance == "pos_weight":
        pos_weight = pos_weight_from_targets(train_ds.sample_targets(), tcfg.pos_weight_max).to(device)
    valid_loss_fn = build_loss(tcfg, pos_weight).to(device)
    loss_fn = valid_loss_fn
    if mil:
        from kit.mil import MILLoss

        loss_fn = MILLoss(valid_loss_fn, tcfg.cell_loss_weight).to(device)
    weights = balancing_weights(train_ds.sample_targets()) if tcfg.imbalance == "sampler" else None
    train_sampler = EpochSampler(len(train_ds), shuffle=True, seed=tcfg.seed, weights=weights,
                                 rank=rank, world=world, augment=tcfg.augment)
    # A bag holds up to bag_size cells: its batch holds as many cells as a broadcast batch.
    batch = max(1, tcfg.batch_size // tcfg.bag_size) if mil else tcfg.batch_size
    train_loader = make_loader(train_ds, tcfg, train_sampler, device, batch_size=batch)
    valid_loader = make_loader(valid_ds, tcfg, None, device, batch_size=tcfg.batch_size * 2)
    optimizer = make_optimizer(model, tcfg)
    scheduler = make_scheduler(optimizer, tcfg, tcfg.epochs * len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.amp and device.type == "cuda")
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fold_dir = Path(cfg.run_dir) / (subdir or kind) / f"fold{fold}"
    return FoldRun(cfg, kind, fold, fold_dir, tcfg, device, rank, world, train_ds, valid_ds, model, loss_fn,
                   valid_loss_fn, optimizer, scheduler, scaler, train_sampler, train_loader, valid_loader,
                   progress=progress and is_main_process())


def resume_fold(run: FoldRun, resume: bool) -> None:
    """Continue from ``last.pt`` (weights, optimiser, schedule, scaler, history, RNG) when asked;
    otherwise start clean (rank 0 removes a previous attempt's files)."""
    last = run.fold_dir / "last.pt"
    if resume and last.is_file():
        from kit.models import load_checkpoint

        ckpt = load_checkpoint(last, map_location="cpu")  # RNG states must stay on the CPU
        if ckpt.get("epochs", run.tcfg.epochs) != run.tcfg.epochs:
            raise ConfigError(f"{last}: trained for {ckpt.get('epochs')} epochs, config now says {run.tcfg.epochs}; "
                              "the schedule cannot change on resume")
        unwrap(run.model).load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["lr_scheduler"])
        run.scaler.load_state_dict(ckpt["scaler"])
        run.start_epoch, run.best_score, run.best_epoch = ckpt["epoch"], ckpt["best_score"], ckpt["best_epoch"]
        run.history, run.batch_losses = list(ckpt["history"]), list(ckpt["batch_losses"])
        run.best_metrics = dict(ckpt.get("best_metrics", {}))
        _set_rng_state(ckpt["rng"])
        _say(f"resuming {run.fold_dir.parent.name} fold {run.fold} after epoch {run.start_epoch} "
             f"(best macro-AP {run.best_score:.4f})")
    elif not resume and run.fold_dir.exists():
        on_main(_clean_fold_dir, run.fold_dir)


def _clean_fold_dir(fold_dir: Path) -> None:
    for name in ("last.pt", "best.pt", "epochs.csv", "oof.csv", "oof_bag.csv"):
        (fold_dir / name).unlink(missing_ok=True)


def run_epoch(run: FoldRun, epoch: int) -> dict | None:
    """Train one epoch (every rank), then validate (rank 0): the epoch's row, None elsewhere."""
    t0 = time.time()
    run.train_sampler.set_epoch(epoch)
    train_loss, losses = train_one_epoch(run.model, run.train_loader, run.loss_fn, run.optimizer, run.scheduler,
                                         run.scaler, run.device, run.tcfg, run.progress,
                                         desc=f"{run.fold_dir.parent.name} f{run.fold} e{epoch}")
    if run.world > 1:
        t = torch.tensor([train_loss], device=run.device)
        torch.distributed.all_reduce(t)
        train_loss = float(t) / run.world
    run.batch_losses.extend(losses)
    return on_main(_validate, run, epoch, train_loss, t0)


def _validate(run: FoldRun, epoch: int, train_loss: float, t0: float) -> dict:
    ev = evaluate(unwrap(run.model), run.valid_loader, run.valid_loss_fn, run.device, run.tcfg, run.progress)
    metrics = compute_metrics(ev["targets"], ev["probs"])
    if run.kind == "cell" and len(run.valid_ds):  # image level: max over each image's cells
        img_probs, img_targets = _per_image_max(run.valid_ds.img_idx, ev["probs"], ev["targets"])
        metrics["image_macro_ap"] = compute_metrics(img_targets, img_probs)["macro_ap"]
    if "embeddings" in ev and len(run.valid_ds):  # MIL: the bag head over all of each image's cells
        from kit.mil import bag_probs_by_image

        rows, ev["bag_probs"] = bag_probs_by_image(unwrap(run.model), ev["embeddings"], run.valid_ds.img_idx)
        ev["bag_ids"] = [run.valid_ds.ids[int(i)] for i in rows]
        metrics["bag_macro_ap"] = compute_metrics(_targets_of(run.valid_ds, rows), ev["bag_probs"])["macro_ap"]
    row = {"epoch": epoch, "train_loss": train_loss, "valid_loss": ev["valid_loss"], **metrics,
           "lr": run.optimizer.param_groups[0]["lr"], "time_s": time.time() - t0}
    row["_ev"] = ev
    return row


def _targets_of(ds, rows: np.ndarray) -> np.ndarray:
    return ds.targets[np.asarray(rows, dtype=np.int64)]


def save_epoch(run: FoldRun, epoch: int, row: dict) -> None:
    """Rank 0: the epoch's line, ``last.pt``, and on a new best ``best.pt`` + the OOF files."""
    ev = row.pop("_ev")
    keys = ("epoch", *METRIC_COLUMNS, "lr", "time_s", "image_macro_ap", "bag_macro_ap")
    run.history.append({k: row[k] for k in keys if k in row})
    _say(format_row(row))
    score = row["macro_ap"] if math.isfinite(row["macro_ap"]) else -ev["valid_loss"]
    improved = score > run.best_score
    if improved:
        run.best_score, run.best_epoch = score, epoch
        run.best_metrics = {k: v for k, v in row.items() if k not in ("epoch", "train_loss", "lr", "time_s")}
    state = {
        "model": unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
        "epoch": epoch + 1, "epochs": run.tcfg.epochs, "config": to_dict(run.cfg), "kind": run.kind,
        "fold": run.fold, "best_score": run.best_score, "best_epoch": run.best_epoch,
        "best_metrics": run.best_metrics, "history": run.history, "batch_losses": run.batch_losses,
        "rng": _rng_state(),
    }
    last = run.fold_dir / "last.pt"
    save_checkpoint(state, last)
    if improved:
        shutil.copyfile(last, run.fold_dir / ".best.pt.tmp")
        os.replace(run.fold_dir / ".best.pt.tmp", run.fold_dir / "best.pt")
        _write_oof(run.fold_dir / "oof.csv", run.valid_ds, run.kind, ev["probs"])
        if "bag_probs" in ev:
            from kit.mil import write_bag_oof

            write_bag_oof(run.fold_dir / "oof_bag.csv", ev["bag_ids"], ev["bag_probs"])
        run.best_changed = True
    write_epochs_csv(run.fold_dir / "epochs.csv", run.history)
    plot_loss_curves(run.history, run.batch_losses, run.steps_per_epoch, run.fold_dir / "loss_curves.png")


def finish_fold(run: FoldRun) -> dict:
    """Rank 0: the per-label plots of the best epoch (once per call); every rank: the result dict."""
    on_main(_best_epoch_plots, run)
    return {
        "kind": run.kind, "fold": run.fold, "best_epoch": run.best_epoch,
        "epochs_done": len(run.history) if is_main_process() else None,
        "n_train": len(run.train_ds), "n_valid": len(run.valid_ds), "fold_dir": str(run.fold_dir),
        "weights_sha256": _weights_digest(run.model), "rank": run.rank, **run.best_metrics,
    }


def _best_epoch_plots(run: FoldRun) -> None:
    plots = [run.fold_dir / "confusion_matrices.png", run.fold_dir / "pr_curves.png"]
    oof = run.fold_dir / "oof.csv"
    if not oof.is_file() or not (run.best_changed or not all(p.is_file() for p in plots)):
        return
    import pandas as pd

    probs = pd.read_csv(oof)[[f"p{c}" for c in range(NUM_CLASSES)]].to_numpy(np.float32)
    targets = run.valid_ds.sample_targets()
    if len(probs) == len(targets):
        plot_confusion_matrices(targets, probs, plots[0])
        plot_pr_curves(targets, probs, plots[1])


def train_fold(cfg: Config, kind: str, fold: int, resume: bool = False, stop_after: int | None = None,
               progress: bool = True, subdir: str | None = None, cell_targets: dict | None = None,
               build: bool = True) -> dict:
    """Train the `kind` ("cell"/"image") model on all folds but `fold`, validate on `fold`.

    resume: continue from ``last.pt`` when it exists (exactly: same batches, augmentations, RNG).
    stop_after: stop once this many epochs are completed (a time-limited session; resume later).
    subdir / cell_targets: a pseudo-label round's folder and cell labels (kit.pseudo).
    build: make missing tiles/fields of the fold's images first (`train_all` made them already).
    Returns the best epoch's validation metrics plus ``fold, kind, best_epoch, epochs_done,
    n_train, n_valid, fold_dir, weights_sha256``. Under torchrun every rank trains; rank 0 writes.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind must be 'cell' or 'image', got {kind!r}")
    ensure_run_dir(cfg)
    run = build_fold(cfg, kind, fold, subdir, cell_targets, progress, build)
    resume_fold(run, resume)
    _say(f"{run.fold_dir.parent.name} fold {fold}: {len(run.train_ds)} train "
         f"{'bags' if kind == 'cell' and run.tcfg.cell_mode == 'mil' else 'cells' if kind == 'cell' else 'fields'} / "
         f"{len(run.valid_ds)} valid, {cfg.model(kind).backbone}, {run.tcfg.epochs} epochs, "
         f"{run.steps_per_epoch} steps/epoch, device {run.device}{f' x{run.world}' if run.world > 1 else ''}")
    if run.start_epoch < run.tcfg.epochs:
        _say(format_row(None))
    for epoch in range(run.start_epoch, run.tcfg.epochs):
        if stop_after is not None and epoch >= stop_after:
            break
        row = run_epoch(run, epoch)
        on_main(save_epoch, run, epoch, row)
        _barrier(run.world)
    return finish_fold(run)


def _training_signature(cfg: Config) -> dict:
    """The settings a resumed run must share with the original, flattened to dotted keys (paths,
    workers, device, folds and the predict section may change)."""
    d = to_dict(cfg)
    out = {f"data.{k}": d["data"][k] for k in ("tile_size", "field_size", "single_label_only", "segment_backend")}
    for section in ("cell_model", "image_model", "train", "cells"):
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


def _read_metrics(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _write_json(path: Path, obj) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)


def round_proxy_score(cfg: Config, round_: int) -> float | None:
    """OOF image-level proxy of a round's cell model: macro AP of each image's top cell score."""
    from kit.labels import read_labels_csv, to_multihot
    from kit.metric import classification_ap
    from kit.pseudo import read_round_oof

    try:
        oof = read_round_oof(cfg.run_dir, round_)
    except KitError:
        return None
    probs = oof.groupby("ID", sort=True)[[f"p{c}" for c in range(NUM_CLASSES)]].max()
    labels = read_labels_csv(cfg.data.labels_path).set_index("ID")
    t = np.stack([to_multihot(labels.loc[i, "labels"]) for i in probs.index])
    return classification_ap(t, probs.to_numpy())["macro"]


def _write_rounds_table(cfg: Config, rounds: list[dict]) -> None:
    import pandas as pd

    with atomic_open(Path(cfg.run_dir) / "pseudo_rounds.csv", "w", newline="") as f:
        pd.DataFrame(rounds).to_csv(f, index=False, float_format="%.6g")


def _pseudo_targets_for(cfg: Config, round_: int) -> dict:
    """Cell labels for round `round_` >= 1 from round - 1's OOF predictions (kit.pseudo)."""
    from kit.labels import read_labels_csv
    from kit.pseudo import read_round_oof, round_targets

    t = cfg.train
    return round_targets(read_round_oof(cfg.run_dir, round_ - 1), read_labels_csv(cfg.data.labels_path),
                         t.pseudo_threshold, t.pseudo_std, t.pseudo_soft)


def train_all(cfg: Config, kinds: Sequence[str] = KINDS, folds=None, resume: bool = False,
              progress: bool = True, prepare: bool = True) -> dict:
    """Train every requested kind and fold (and the cell model's pseudo-label rounds); writes
    config.yaml and manifest.json once, train_metrics.json and pseudo_rounds.csv (rank 0). The
    inputs of every fold are made first, in one `kit.prepare` pass (`prepare=False`: the caller
    just made them).

    folds: None -> cfg.train.folds; "all", an int or a list. Returns ``{kind: {fold: metrics}}``
    (round r >= 1 of the cell model under ``cell_pseudo<r>``).
    """
    from kit.manifest import resolve_inputs, write_manifest
    from kit.pseudo import cell_dir_name

    ensure_run_dir(cfg)
    run_dir = Path(cfg.run_dir)
    inputs = resolve_inputs(cfg)  # ConfigError when train.folds names a fold the folds file lacks
    fold_ids = _fold_list(cfg, folds)
    available = _fold_list(cfg, "all")
    unknown = sorted(set(fold_ids) - set(available))
    if unknown:
        raise ConfigError(f"fold(s) {', '.join(map(str, unknown))} not in {cfg.data.folds_file} "
                          f"(it has folds {', '.join(map(str, available))})")
    if is_main_process():
        write_run_config(cfg, resume)
        write_manifest(run_dir, inputs)
        if prepare:
            from kit.prepare import prepare_run

            prepare_run(inputs, load_fold_table(cfg)["ID"].tolist(), kinds, workers=max(1, cfg.train.workers),
                        progress=progress)
    metrics_path = run_dir / "train_metrics.json"
    results: dict = on_main(_read_metrics, metrics_path) or {}
    jobs = []  # (kind, folder, round)
    for kind in kinds:
        rounds = range(cfg.train.pseudo_rounds + 1) if kind == "cell" else [0]
        jobs += [(kind, cell_dir_name(r) if kind == "cell" else kind, r) for r in rounds]
    round_rows = []
    for kind, subdir, round_ in jobs:
        targets = _pseudo_targets_for(cfg, round_) if round_ > 0 else None
        results.setdefault(subdir, {})
        for fold in fold_ids:
            r = train_fold(cfg, kind, fold, resume=resume, progress=progress, subdir=subdir, cell_targets=targets,
                           build=False)  # prepared above
            results[subdir][str(fold)] = {k: v for k, v in r.items() if k not in ("rank",)}
            on_main(_write_json, metrics_path, results)
        if kind == "cell" and cfg.train.pseudo_rounds > 0 and is_main_process():
            round_rows.append({"round": round_, "folder": subdir, "oof_image_proxy": round_proxy_score(cfg, round_)})
            _write_rounds_table(cfg, round_rows)
    if is_main_process():
        for name, per_fold in results.items():
            scores = [m.get("macro_ap", float("nan")) for m in per_fold.values()]
            if scores and name in {j[1] for j in jobs}:
                print(f"{name}: macro-AP per fold {', '.join(f'{s:.4f}' for s in scores)}; mean {np.nanmean(scores):.4f}")
        for row in round_rows:
            print(f"pseudo round {row['round']} ({row['folder']}): OOF image-level proxy {row['oof_image_proxy']:.4f}")
    return results


# ---------------------------------------------------------------------------------------------
# Command


def _parse_folds_arg(text: str | None):
    if text is None:
        return None
    if text == "all":
        return "all"
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ConfigError(f"--fold: expected a fold number, a comma list or 'all', got {clip(text)}") from None


def configure_train(parser: argparse.ArgumentParser) -> None:
    from kit.cli import folder_arg

    parser.add_argument("--config", help="YAML config (e.g. configs/default.yaml or RUN_DIR/config.yaml)")
    parser.add_argument("--fold", help="fold number, comma list or 'all' (default: train.folds of the config)")
    parser.add_argument("--kind", choices=("cell", "image", "both"), default="both", help="which model(s) to train")
    parser.add_argument("--resume", action="store_true", help="continue each fold from its last.pt")
    parser.add_argument("--run-dir", type=folder_arg, help="run folder (default: run_dir of the config, else runs/<date>-<hash>)")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. train.epochs=3 model.backbone=resnet18")
    parser.set_defaults(func=_run_train)


def _run_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        cfg.run_dir = str(args.run_dir)  # a Path from folder_arg; the config holds text
    elif args.resume and not cfg.run_dir and args.config:
        cfg.run_dir = str(Path(args.config).parent)
    if args.resume and not cfg.run_dir:
        raise ConfigError("--resume needs the run folder: pass --run-dir or --config RUN_DIR/config.yaml")
    kinds = KINDS if args.kind == "both" else (args.kind,)
    ensure_run_dir(cfg)
    on_main(print, f"run folder: {cfg.run_dir}")
    train_all(cfg, kinds=kinds, folds=_parse_folds_arg(args.fold), resume=args.resume)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


