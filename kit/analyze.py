"""`kit analyze`: label statistics and channel plots for a dataset folder or a train.csv.

Input: a dataset folder in the Kaggle layout (its ``train.csv`` and ``train/`` are used) or a
train.csv (``ID,Label``; the images, if wanted, come from ``--images`` or a ``train/`` folder
beside the CSV). Label strings are parsed by `kit.labels` (repeated ids such as ``13|13`` folded,
order ignored), so a "label combination" is a set of class ids.

Output folder (all files written atomically):

- ``label_distribution.png``: images per class (class imbalance), bars named by class.
- ``label_combinations.png``: the most common label sets, and count and cumulative share by rank.
- ``labels_per_image.png``: how many images carry 1, 2, ... labels.
- ``cooccurrence.png``: 19 x 19 heatmap of P(column class | row class) in percent; the diagonal
  shows the class's image count.
- ``channels_<ID>.png``: one sample's red (microtubules), green (protein), blue (nucleus) and
  yellow (ER) channels, each in its colour, and the HPA composite (R = red + yellow / 2,
  G = green + yellow / 2, B = blue: yellow shows as yellow without washing the red out). For
  display each channel is scaled to its own 99.5th percentile (HPA fields are dim and a few bright
  spots would set the maximum); the panel titles give the raw maximum and percentile.
- ``summary.md``: image count, unique combinations, class counts, labels per image, top combinations.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kit.atomic import atomic_open, atomic_path
from kit.errors import ConfigError, DataError
from kit.ids import check_id
from kit.images import CHANNELS, full_scale, read_sample, to_float
from kit.labels import CLASS_NAMES, NUM_CLASSES, read_labels_csv

CHANNEL_ROLES = {"red": "microtubules", "green": "protein of interest", "blue": "nucleus", "yellow": "ER"}
_CHANNEL_RGB = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}
DISPLAY_PERCENTILE = 99.5
MAX_DISPLAY_PX = 1024  # channel plots are downscaled to this many pixels per side


@dataclass
class LabelStats:
    """Label statistics of a train.csv (combinations are sorted tuples of class ids)."""

    n_images: int
    class_counts: np.ndarray  # (19,) images per class
    combinations: list[tuple[tuple[int, ...], int]]  # every distinct label set, most common first
    labels_per_image: dict[int, int]  # number of labels -> images
    cooccurrence: np.ndarray  # (19, 19) images holding both classes; the diagonal is class_counts
    raw_strings: int | None = None  # distinct Label strings exactly as written
    repeated_strings: int | None = None  # Label strings that repeat a class id (e.g. 13|13)

    @property
    def n_combinations(self) -> int:
        return len(self.combinations)


def label_stats(labels: list[list[int]]) -> LabelStats:
    """Statistics of parsed labels (one list of class ids per image, as `read_labels_csv` gives)."""
    n = len(labels)
    multihot = np.zeros((n, NUM_CLASSES), dtype=np.int64)
    for r, ids in enumerate(labels):
        multihot[r, list(ids)] = 1
    combos = Counter(tuple(sorted(set(ids))) for ids in labels)
    per_image = Counter(len(set(ids)) for ids in labels)
    return LabelStats(
        n_images=n,
        class_counts=multihot.sum(axis=0),
        combinations=sorted(combos.items(), key=lambda kv: (-kv[1], kv[0])),
        labels_per_image=dict(sorted(per_image.items())),
        cooccurrence=multihot.T @ multihot,
    )


def combination_name(combo: tuple[int, ...], short: bool = False) -> str:
    """``(0, 16)`` -> ``"0 Nucleoplasm + 16 Cytosol"`` (or ``"0|16"`` with `short`)."""
    if short:
        return "|".join(str(i) for i in combo)
    return " + ".join(f"{i} {CLASS_NAMES[i]}" for i in combo)


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot state, no display needed)
# --------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path, dpi: int = 100) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def plot_label_distribution(stats: LabelStats, path: Path) -> Path:
    """Horizontal bars: images per class, annotated with count and share of images."""
    fig = _figure(11, 7.5)
    ax = fig.add_subplot()
    y = np.arange(NUM_CLASSES)
    counts = stats.class_counts
    ax.barh(y, counts, color="tab:green")
    ax.set_yticks(y, [f"{i} {name}" for i, name in enumerate(CLASS_NAMES)])
    ax.invert_yaxis()
    top = max(int(counts.max()), 1)
    for i, c in enumerate(counts):
        ax.text(c + top * 0.01, i, f"{c:,} ({100 * c / max(stats.n_images, 1):.1f}%)", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.2)
    ax.set_xlabel("images with the class")
    present = counts[counts > 0]
    ratio = f", most/least common = {present.max() / present.min():.0f}x" if len(present) else ""
    ax.set_title(f"Label distribution: {stats.n_images:,} images{ratio}")
    return _save(fig, path)


def plot_label_combinations(stats: LabelStats, path: Path, top: int = 25) -> Path:
    """Left: the `top` most common label sets; right: count and cumulative share by rank."""
    fig = _figure(16, 8)
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1.6, 1])
    shown = stats.combinations[:top]
    y = np.arange(len(shown))
    values = [n for _, n in shown]
    ax.barh(y, values, color="tab:blue")
    ax.set_yticks(y, [combination_name(c) for c, _ in shown], fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,}", va="center", fontsize=8)
    ax.set_xlim(0, max(values, default=1) * 1.15)
    ax.set_xlabel("images")
    ax.set_title(f"{len(shown)} most common of {stats.n_combinations:,} unique label combinations")

    counts = np.array([n for _, n in stats.combinations], dtype=float)
    rank = np.arange(1, len(counts) + 1)
    ax2.loglog(rank, counts, ".", color="tab:blue")
    ax2.set_xlabel("combination rank")
    ax2.set_ylabel("images (log)", color="tab:blue")
    twin = ax2.twinx()
    cumulative = 100 * np.cumsum(counts) / max(counts.sum(), 1)
    twin.plot(rank, cumulative, color="tab:orange")
    twin.set_ylim(0, 101)
    twin.set_ylabel("cumulative % of images", color="tab:orange")
    for share in (50, 90, 99):
        k = int(np.searchsorted(cumulative, share - 1e-9) + 1) if len(cumulative) else 0
        if k:
            twin.axhline(share, color="0.8", lw=0.8)
            twin.text(1, share, f"{share}%: top {k}", fontsize=8, va="bottom")
    ax2.set_title("Images per combination by rank")
    return _save(fig, path)


def plot_labels_per_image(stats: LabelStats, path: Path) -> Path:
    """Bars: number of images carrying k labels."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    ks = list(stats.labels_per_image)
    vs = [stats.labels_per_image[k] for k in ks]
    ax.bar(ks, vs, color="tab:purple")
    for k, v in zip(ks, vs):
        pct = 100 * v / max(stats.n_images, 1)
        ax.text(k, v, f"{v:,}\n{pct:.1f}%" if pct >= 0.1 else f"{v:,}\n<0.1%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(ks)
    ax.set_ylim(0, max(vs, default=1) * 1.2)
    ax.set_xlabel("labels per image")
    ax.set_ylabel("images")
    mean = sum(k * v for k, v in zip(ks, vs)) / max(stats.n_images, 1)
    ax.set_title(f"Labels per image (mean {mean:.2f}, {stats.n_images:,} images)")
    return _save(fig, path)


def cooccurrence_conditional(stats: LabelStats) -> np.ndarray:
    """P(column class | row class): co-occurrence counts divided by the row class's count (NaN if 0)."""
    counts = stats.class_counts.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts[:, None] > 0, stats.cooccurrence / counts[:, None], np.nan)


def plot_cooccurrence(stats: LabelStats, path: Path) -> Path:
    """Annotated heatmap of P(column | row) in percent; the diagonal shows n (images per class)."""
    fig = _figure(14, 12)
    ax = fig.add_subplot()
    cond = cooccurrence_conditional(stats) * 100
    shown = cond.copy()
    np.fill_diagonal(shown, np.nan)
    im = ax.imshow(np.ma.masked_invalid(shown), cmap="Blues", vmin=0, vmax=max(np.nanmax(shown, initial=0), 1))
    ax.set_facecolor("0.9")
    names = [f"{i} {n}" for i, n in enumerate(CLASS_NAMES)]
    ax.set_xticks(range(NUM_CLASSES), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(NUM_CLASSES), names, fontsize=8)
    vmax = im.norm.vmax
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            if i == j:
                ax.text(j, i, f"n={stats.class_counts[i]}", ha="center", va="center", fontsize=6)
            elif np.isfinite(cond[i, j]) and stats.cooccurrence[i, j] > 0:
                ax.text(j, i, f"{cond[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if cond[i, j] > 0.6 * vmax else "black")
    ax.set_xlabel("co-occurring class")
    ax.set_ylabel("class")
    fig.colorbar(im, ax=ax, shrink=0.7, label="% of the row class's images that also have the column class")
    ax.set_title("Class co-occurrence: P(column | row) in %")
    return _save(fig, path)


def display_channel(channel: np.ndarray) -> tuple[np.ndarray, float]:
    """Float channel in [0, 1] -> display values scaled to its percentile (returned as well)."""
    hi = float(np.percentile(channel, DISPLAY_PERCENTILE))
    hi = hi if hi > 0 else float(channel.max()) or 1.0
    return np.clip(channel / hi, 0.0, 1.0), hi


def composite_rgb(image: np.ndarray, yellow_weight: float = 0.5) -> np.ndarray:
    """(H, W, 4) RGBY floats in [0, 1] -> (H, W, 3) HPA composite (R + wY, G + wY, B), clipped to 1."""
    r, g, b, y = (image[..., i] for i in range(4))
    return np.clip(np.stack([r + yellow_weight * y, g + yellow_weight * y, b], axis=-1), 0.0, 1.0)


def plot_channels(image: np.ndarray, image_id: str, path: Path, label: str | None = None) -> Path:
    """Each channel in its colour, then the composite (see the module docstring for the scaling)."""
    import cv2

    h, w = image.shape[:2]
    raw = to_float(image)
    scale = min(1.0, MAX_DISPLAY_PX / max(h, w))
    if scale < 1.0:
        raw = cv2.resize(raw, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    full = full_scale(image)
    fig = _figure(22, 5.2)
    axes = fig.subplots(1, 5)
    display = np.empty_like(raw)
    for k, name in enumerate(CHANNELS):
        display[..., k], hi = display_channel(raw[..., k])
        rgb = display[..., k, None] * np.array(_CHANNEL_RGB[name], dtype=np.float32)
        axes[k].imshow(rgb, interpolation="nearest")
        axes[k].set_title(
            f"{name} ({CHANNEL_ROLES[name]})\nmax {int(image[..., k].max())}, p{DISPLAY_PERCENTILE:g} {hi * full:.0f}",
            fontsize=10,
        )
    axes[4].imshow(composite_rgb(display), interpolation="nearest")
    axes[4].set_title("composite: R=red+yellow/2, G=green+yellow/2, B=blue", fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    depth = "16-bit" if image.dtype == np.uint16 else "8-bit"
    fig.suptitle(f"{image_id}  ({w}x{h}, {depth})" + (f"   labels: {label}" if label else ""), fontsize=12)
    return _save(fig, path, dpi=150)  # ~650 px per panel: enough to see single cells


# --------------------------------------------------------------------------------------------
# Summary and the command
# --------------------------------------------------------------------------------------------
@dataclass
class AnalysisResult:
    """What `analyze` computed and wrote."""

    stats: LabelStats
    files: dict[str, Path] = field(default_factory=dict)
    sample_id: str | None = None


def write_summary(stats: LabelStats, path: Path, source: Path, sample: str | None, files: dict[str, Path],
                  top: int = 15) -> Path:
    """The markdown summary (see the module docstring)."""
    n = max(stats.n_images, 1)
    lines = [f"# Label analysis of `{source}`", ""]
    lines.append(f"- images: {stats.n_images:,}")
    extra = ""
    if stats.raw_strings is not None:
        extra = (f" (label sets, order and repeats ignored; {stats.raw_strings:,} distinct Label strings as written, "
                 f"{stats.repeated_strings:,} of the {stats.n_images:,} strings repeat a class such as `13|13`)")
    lines.append(f"- unique label combinations: {stats.n_combinations:,}{extra}")
    singles = sum(v for c, v in stats.combinations if v == 1)
    lines.append(f"- combinations seen in one image only: {singles:,}")
    mean = sum(k * v for k, v in stats.labels_per_image.items()) / n
    lines.append(f"- labels per image: mean {mean:.2f}, max {max(stats.labels_per_image, default=0)}")
    present = stats.class_counts[stats.class_counts > 0]
    if len(present):
        lines.append(f"- class imbalance: {present.max():,} to {present.min():,} images per class "
                     f"({present.max() / present.min():.0f}x); classes absent: "
                     f"{', '.join(str(i) for i in np.flatnonzero(stats.class_counts == 0)) or 'none'}")
    lines += ["", "## Images per class", "", "| id | class | images | % of images |", "|---:|---|---:|---:|"]
    for i, name in enumerate(CLASS_NAMES):
        c = int(stats.class_counts[i])
        lines.append(f"| {i} | {name} | {c:,} | {100 * c / n:.2f} |")
    lines += ["", "## Labels per image", "", "| labels | images | % of images |", "|---:|---:|---:|"]
    for k, v in stats.labels_per_image.items():
        lines.append(f"| {k} | {v:,} | {100 * v / n:.2f} |")
    lines += ["", f"## Most common label combinations (top {min(top, stats.n_combinations)})", "",
              "| rank | labels | classes | images | % of images |", "|---:|---|---|---:|---:|"]
    for rank, (combo, v) in enumerate(stats.combinations[:top], 1):
        ids = combination_name(combo, short=True).replace("|", r"\|")  # a bare | would split the table cell
        lines.append(f"| {rank} | {ids} | {combination_name(combo)} | {v:,} | {100 * v / n:.2f} |")
    lines += ["", "## Files", ""]
    for key, p in files.items():
        lines.append(f"- `{p.name}`: {key}")
    if sample is None:
        lines.append("- no channel plot (no images given; pass a dataset folder, `--images DIR` or `--sample ID`)")
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _raw_label_strings(csv_path: Path) -> tuple[int, int]:
    """(distinct Label strings as written, strings that repeat a class id)."""
    import pandas as pd

    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, usecols=["Label"])["Label"].str.strip()
    tokens = raw.str.split("|")
    repeated = int(sum(len(t) != len(set(t)) for t in tokens))
    return int(raw.nunique()), repeated


def _resolve_input(source: Path, images: Path | None) -> tuple[Path, Path | None]:
    """(train.csv, folder of train images or None)."""
    if source.is_dir():
        csv_path = source / "train.csv"
        if not csv_path.is_file():
            raise DataError(f"{source}: no train.csv in this folder (pass a dataset folder or a train.csv)")
        return csv_path, images or (source / "train" if (source / "train").is_dir() else None)
    if source.is_file():
        beside = source.parent / "train"
        return source, images or (beside if beside.is_dir() else None)
    raise DataError(f"not found: {source} (expected a dataset folder or a train.csv)")


def _first_complete_sample(folder: Path, ids: list[str]) -> str | None:
    from kit.layout import scan_split

    samples = scan_split(folder).samples
    return next((i for i in ids if len(samples.get(i, {})) == len(CHANNELS)), None)


def analyze(source: str | Path, out: str | Path, *, sample: str | None = None, images: str | Path | None = None,
            top: int = 25) -> AnalysisResult:
    """Compute the label statistics of `source` and write the plots and summary.md into `out`.

    `source` is a dataset folder or a train.csv. The channel plot shows `sample`, by default the
    first train.csv ID with all four channels in the images folder (none without images).
    """
    source, out = Path(source), Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    images = Path(images) if images is not None else None
    if images is not None and not images.is_dir():
        raise DataError(f"images folder not found: {images}")
    if sample is not None:
        check_id(sample, "--sample")
    csv_path, image_dir = _resolve_input(source, images)
    df = read_labels_csv(csv_path)
    stats = label_stats(df["labels"].tolist())
    stats.raw_strings, stats.repeated_strings = _raw_label_strings(csv_path)

    out.mkdir(parents=True, exist_ok=True)
    result = AnalysisResult(stats)
    result.files["label distribution (images per class)"] = plot_label_distribution(stats, out / "label_distribution.png")
    result.files["unique label combinations"] = plot_label_combinations(stats, out / "label_combinations.png", top=top)
    result.files["labels per image"] = plot_labels_per_image(stats, out / "labels_per_image.png")
    result.files["class co-occurrence"] = plot_cooccurrence(stats, out / "cooccurrence.png")

    if sample is not None and image_dir is None:
        raise DataError(f"--sample {sample}: no images folder (pass --images DIR or a dataset folder)")
    if image_dir is not None:
        sample = sample or _first_complete_sample(image_dir, df["ID"].tolist())
    if sample is not None:
        image = read_sample(image_dir, sample)
        match = df.loc[df["ID"] == sample, "labels"]
        label = None if match.empty else ", ".join(f"{i} {CLASS_NAMES[i]}" for i in match.iloc[0])
        name = f"channels_{sample}.png"
        result.files[f"channels of {sample}"] = plot_channels(image, sample, out / name, label)
        result.sample_id = sample
    result.files["summary"] = write_summary(stats, out / "summary.md", csv_path, sample,
                                            {k: v for k, v in result.files.items()})
    return result


def configure_analyze(parser) -> None:
    """Arguments of `python -m kit analyze`."""
    parser.add_argument("source", type=Path, help="dataset folder (uses train.csv and train/) or a train.csv")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the PNGs and summary.md")
    parser.add_argument("--sample", default=None,
                        help="ID whose channels to plot (default: the first train.csv ID with all four channels)")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder of <ID>_<channel> files (default: train/ of the dataset or beside the CSV)")
    parser.add_argument("--top", type=int, default=25, help="label combinations shown in the plot")
    parser.set_defaults(func=_run_analyze)


def _run_analyze(args) -> int:
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    res = analyze(args.source, args.out, sample=args.sample, images=args.images, top=args.top)
    s = res.stats
    print(f"{s.n_images:,} images, {s.n_combinations:,} unique label combinations, "
          f"labels per image: {', '.join(f'{k}: {v:,}' for k, v in s.labels_per_image.items())}")
    for key, path in res.files.items():
        print(f"  {path}  ({key})")
    return 0
