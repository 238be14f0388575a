"""What training shows a person: the per-epoch table, ``epochs.csv`` and the plots of a fold.

Figures use matplotlib's object API on the Agg canvas (``Figure``, as kit.analyze does): no
pyplot state and no global ``matplotlib.use``, so importing the kit never changes a user's backend.

Files (written atomically into a fold folder by kit.train, rank 0 only):
  epochs.csv               epoch, train_loss, valid_loss, accuracy_multi, precision, micro_ap,
                           macro_ap, lr, time_s[, image_macro_ap]
  loss_curves.png          training loss per batch (smoothed) and validation loss per epoch
  confusion_matrices.png   one 2x2 matrix per label at threshold 0.5 (best epoch)
  pr_curves.png            precision-recall per class present (best epoch)
  lr_find_<kind>.png       the LR range test (kit.lr_find)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kit.analyze import _figure, _save
from kit.atomic import atomic_open
from kit.labels import NUM_CLASSES

METRIC_COLUMNS = ("train_loss", "valid_loss", "accuracy_multi", "precision", "micro_ap", "macro_ap")


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m:02d}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"


TABLE_HEADER = ("epoch", "train_loss", "valid_loss", "accuracy_multi", "precision", "micro_ap", "macro_ap", "time")


def format_row(row: dict | None = None) -> str:
    """One line of the per-epoch table (the header when row is None), fastai style."""
    widths = [max(7, len(h) + 2) for h in TABLE_HEADER]
    if row is None:
        cells = TABLE_HEADER
    else:
        cells = [str(row["epoch"])] + [f"{row[k]:.6f}" for k in METRIC_COLUMNS] + [fmt_time(row["time_s"])]
    return "".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def plot_loss_curves(history: list[dict], batch_losses: list[float], steps_per_epoch: int, path: Path) -> None:
    """Training loss per batch (smoothed) and validation loss per epoch against batches seen."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
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
    _save(fig, path)


def plot_confusion_matrices(targets: np.ndarray, probs: np.ndarray, path: Path, threshold: float = 0.5) -> None:
    """One 2x2 confusion matrix per label (rows true 0/1, columns predicted 0/1) at `threshold`."""
    from kit.labels import CLASS_NAMES

    t = np.asarray(targets) > 0.5
    p = np.asarray(probs) >= threshold
    fig = _figure(15, 12)
    axes = fig.subplots(4, 5)
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
    _save(fig, path, dpi=80)


def plot_pr_curves(targets: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """Precision-recall curve per class present in validation, AP in the legend."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    from kit.labels import CLASS_NAMES

    from matplotlib import colormaps

    t = np.asarray(targets) > 0.5
    fig = _figure(12, 7)
    ax = fig.add_subplot()
    cmap = colormaps["tab20"]
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
    _save(fig, path)


def plot_lr_find(result: dict, path: Path, title: str = "") -> None:
    fig = _figure(7, 4)
    ax = fig.add_subplot()
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
    _save(fig, path)


def write_epochs_csv(path: Path, history: list[dict]) -> None:
    import pandas as pd

    cols = ["epoch", *METRIC_COLUMNS, "lr", "time_s"]
    if history and "image_macro_ap" in history[0]:
        cols.append("image_macro_ap")
    with atomic_open(path, "w", newline="") as f:
        pd.DataFrame(history, columns=cols).to_csv(f, index=False, float_format="%.6g")
