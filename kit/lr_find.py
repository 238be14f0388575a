"""Learning-rate range test (Smith 2015 / fastai) and the command `lr-find`.

    python -m kit lr-find --config RUN_DIR/config.yaml --out DIR [--kind cell|image] [--fold K]

The LR grows exponentially from ``--start-lr`` to ``--end-lr`` over ``--num-iter`` batches of the
fold's training data (the same datasets, loss and model as kit.train, a MIL model and its bags
when ``train.cell_mode=mil``) while the exponentially smoothed loss is recorded; the suggestion is
the rate at the steepest descent. Writes ``lr_find_<kind>.png`` (kit.reporting) and
``lr_find_<kind>.csv`` (lr, loss_smoothed, loss).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kit.atomic import atomic_open
from kit.config import Config, load_config
from kit.errors import ConfigError
from kit.models import build_from_config
from kit.device import resolve_device
from kit.train import (KINDS, _forward_loss, _seed_everything, fold_split, load_fold_table, make_dataset, make_loader,
                       make_optimizer, measured_layout)


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

    from kit.torchdata import EpochSampler
    from kit.losses import build_loss
    from kit.mil import MILLoss

    tcfg = cfg.train_for(kind)
    device = resolve_device(tcfg.device)
    table = load_fold_table(cfg)
    fold = int(table["fold"].min()) if fold is None else fold
    train_df, _ = fold_split(table, fold, cfg.data.single_label_only)
    ds = make_dataset(cfg, kind, train_df, train=True, progress=progress)
    _seed_everything(tcfg.seed)
    mil = kind == "cell" and tcfg.cell_mode == "mil"
    model = build_from_config(cfg.model(kind), bag_pool=tcfg.bag_pool if mil else None).to(device)
    tcfg = measured_layout(tcfg, model, cfg.data.tile_size if kind == "cell" else cfg.data.field_size, device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(tcfg).to(device)
    if mil:
        loss_fn = MILLoss(loss_fn, tcfg.cell_loss_weight)
    optimizer = make_optimizer(model, dataclasses.replace(tcfg, lr=start_lr))
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.amp and device.type == "cuda")
    amp = tcfg.amp and device.type == "cuda"
    sampler = EpochSampler(len(ds), shuffle=True, seed=tcfg.seed, augment=tcfg.augment)
    loader = make_loader(ds, tcfg, sampler, device, batch_size=max(1, tcfg.batch_size // tcfg.bag_size) if mil else None)
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


def configure_lr_find(parser: argparse.ArgumentParser) -> None:
    from kit.cli import folder_arg

    parser.add_argument("--config", required=True, help="YAML config (e.g. RUN_DIR/config.yaml)")
    parser.add_argument("--out", required=True, type=folder_arg, help="folder for lr_find_<kind>.png and .csv")
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
    from kit.reporting import plot_lr_find

    plot_lr_find(res, png, title=f"LR range test: {args.kind} model, {cfg.model(args.kind).backbone}")
    with atomic_open(out / f"lr_find_{args.kind}.csv", "w", newline="") as f:
        pd.DataFrame({"lr": res["lrs"], "loss_smoothed": res["losses"], "loss": res["raw_losses"]}).to_csv(f, index=False)
    print(f"suggested learning rate (steepest descent): {res['suggestion']:.2e}")
    print(f"plot: {png}")
    return 0
